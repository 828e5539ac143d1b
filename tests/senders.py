"""Real DICOM senders for the tests: dcmtk's storescu and pynetdicom."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pydicom
from pynetdicom import AE

from triage.settings import Settings

# storescu needs to be told which compressed transfer syntax to propose (DESIGN.md, gotchas).
_STORESCU_SYNTAX_FLAGS = {
    "1.2.840.10008.1.2.4.50": "-xy",   # JPEG baseline
    "1.2.840.10008.1.2.4.51": "-xx",   # JPEG extended
    "1.2.840.10008.1.2.4.70": "-xs",   # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80": "-xt",   # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "-xu",   # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": "-xv",   # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "-xw",   # JPEG 2000
    "1.2.840.10008.1.2.5": "-xr",      # RLE
    "1.2.840.10008.1.2.1.99": "-xd",   # deflated
}


def storescu(settings: Settings, files: Sequence[Path]) -> None:
    """Send files with storescu, one association per transfer syntax."""
    by_flag: dict[str, list[str]] = {}
    for path in files:
        syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        by_flag.setdefault(_STORESCU_SYNTAX_FLAGS.get(str(syntax), ""), []).append(str(path))
    for flag, paths in by_flag.items():
        argv = ["storescu", "-aet", "TESTSCU", "-aec", settings.orthanc_aet]
        argv += [flag] if flag else []
        argv += ["127.0.0.1", str(settings.orthanc_dicom_port), *paths]
        subprocess.run(argv, check=True, capture_output=True,
                       env={**os.environ, "TCP_NODELAY": "1"})


def pynetdicom_send(settings: Settings, datasets: Sequence[pydicom.Dataset]) -> list[int]:
    """C-STORE datasets with pynetdicom; returns the status of each."""
    ae = AE(ae_title="TESTPYNET")
    contexts = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}
    for sop_class, syntax in sorted(contexts):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", settings.orthanc_dicom_port,
                         ae_title=settings.orthanc_aet)
    if not assoc.is_established:
        raise RuntimeError("association with Orthanc refused")
    # Nagle's algorithm slows C-STORE 10-20x against Debian's Orthanc (DESIGN.md, gotchas).
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def storescu_as(settings: Settings, files: Sequence[Path], aet: str, *,
                tls: tuple[Path | None, Path | None, Path] | None = None,
                host: str = "127.0.0.1") -> subprocess.CompletedProcess[str]:
    """storescu from calling AE title ``aet``, over DICOM TLS when ``tls`` is given.

    ``tls`` is (client private key, client certificate, CA that signed Orthanc's certificate),
    PEM files; the client verifies Orthanc's certificate and presents its own (none when the
    key and certificate are None: anonymous TLS). Returns the finished process: a refusal is
    a non-zero return code, not an exception.
    """
    argv = ["storescu", "-aet", aet, "-aec", settings.orthanc_aet]
    if tls is not None:
        key, cert, ca = tls
        argv += ["+tls", str(key), str(cert), "-pw"] if key and cert else ["+tla"]
        argv += ["+cf", str(ca)]
    argv += [host, str(settings.orthanc_dicom_port), *map(str, files)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "TCP_NODELAY": "1"})
