"""`triage models list|validate|run` from a shell, with no Orthanc or Redis running."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from triage.samples import write_samples
from triage.settings import PROJECT_ROOT

HEAD_CT = PROJECT_ROOT / "models" / "head-ct-hyperdensity"


def triage(*args: str, tmp_path: Path, models_dir: Path | None = None
           ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TRIAGE_DATA_DIR": str(tmp_path / "var"),
           # Nothing listens here: the commands must not need a server.
           "TRIAGE_REDIS_URL": "redis://127.0.0.1:1/0", "TRIAGE_ORTHANC_URL": "http://127.0.0.1:1"}
    if models_dir is not None:
        env["TRIAGE_MODELS_DIR"] = str(models_dir)
    return subprocess.run([sys.executable, "-m", "triage.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def tampered_models(tmp_path: Path) -> Path:
    """A models folder with the head-CT package intact and a copy whose weights changed."""
    models = tmp_path / "models"
    shutil.copytree(HEAD_CT, models / "head-ct-hyperdensity")
    shutil.copytree(HEAD_CT, models / "tampered")
    with open(models / "tampered" / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    return models


def test_list_shows_valid_and_refused_packages(tmp_path: Path, tampered_models: Path) -> None:
    proc = triage("models", "list", tmp_path=tmp_path, models_dir=tampered_models)
    assert proc.returncode == 0, proc.stderr
    assert "head-ct-hyperdensity 1.1.0" in proc.stdout and "ok" in proc.stdout
    assert "tampered  REFUSED" in proc.stdout and "does not match manifest sha256" in proc.stdout


def test_validate_accepts_the_reference_model_and_refuses_a_tampered_one(
        tmp_path: Path, tampered_models: Path) -> None:
    good = triage("models", "validate", str(HEAD_CT), tmp_path=tmp_path)
    assert good.returncode == 0, good.stderr
    assert "valid" in good.stdout
    bad = triage("models", "validate", str(tampered_models / "tampered"), tmp_path=tmp_path)
    assert bad.returncode == 1
    assert "SHA-256" in bad.stderr


def test_validate_names_the_bad_manifest_field(tmp_path: Path) -> None:
    package = tmp_path / "broken"
    shutil.copytree(HEAD_CT, package)
    manifest = package / "manifest.yaml"
    manifest.write_text(manifest.read_text().replace("threshold: 0.5", "threshold: 1.5"))
    proc = triage("models", "validate", str(package), tmp_path=tmp_path)
    assert proc.returncode == 1
    assert "outputs.0.threshold" in proc.stderr and "1.5" in proc.stderr


def test_run_prints_findings_priority_and_timings(tmp_path: Path) -> None:
    write_samples(tmp_path / "samples")
    proc = triage("models", "run", "head-ct-hyperdensity", str(tmp_path / "samples"),
                  tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    studies = proc.stdout.split("study ")[1:]
    assert len(studies) == 4
    positive = [s for s in studies if "POSITIVE" in s]
    assert len(positive) == 1 and "priority: critical" in positive[0]
    assert "inference" in positive[0] and " ms" in positive[0]
    assert sum("skipped: no applicable model: modality" in s for s in studies) == 2


def test_readme_example_manifest_is_valid() -> None:
    """The manifest of the README's "Bring your own model" example passes the schema."""
    import re

    import yaml

    from triage.manifest import Manifest

    readme = (PROJECT_ROOT / "README.md").read_text()
    section = readme.split("## Bring your own model", 1)[1]
    example = re.search(r"```yaml\n(.*?)```", section, re.DOTALL)
    assert example is not None
    manifest = Manifest.model_validate(yaml.safe_load(example.group(1)))
    assert manifest.id == "pe-ct" and manifest.outputs[0].priority.value == "critical"
