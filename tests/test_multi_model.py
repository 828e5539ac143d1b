"""A study that two models apply to gets both results in one SR and one worklist item;
a tampered package is refused while the others keep working."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pydicom
import pytest
import yaml

from tests.conftest import Servers
from tests.senders import storescu
from tests.test_pipeline import our_srs, watch_until, write_study
from tests.validators import dciodvfy_errors, dsrdump, pixelmed_sr_errors
from triage import jobs
from triage.settings import PROJECT_ROOT
from triage.watcher import Watcher
from triage.workers import run_worker
from triage.worklist import StudyStatus, Worklist

pytestmark = pytest.mark.servers
HEAD_CT = PROJECT_ROOT / "models" / "head-ct-hyperdensity"


@pytest.fixture
def models_dir(tmp_path: Path, clean_servers: Servers):
    """The head-CT package, a second package built on the same graph, and a tampered one."""
    models = tmp_path / "models"
    shutil.copytree(HEAD_CT, models / "head-ct-hyperdensity")
    second = models / "head-ct-second-opinion"
    shutil.copytree(HEAD_CT, second)
    manifest = yaml.safe_load((second / "manifest.yaml").read_text())
    manifest.update(id="head-ct-second-opinion", version="0.9.0", name="Head CT second opinion")
    manifest["outputs"][0]["threshold"] = 0.9
    manifest["outputs"][0]["priority"] = "urgent"
    (second / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    shutil.copytree(HEAD_CT, models / "tampered")
    with open(models / "tampered" / "model.onnx", "ab") as handle:
        handle.write(b"tampered")
    os.environ["TRIAGE_MODELS_DIR"] = str(models)
    jobs.context.cache_clear()
    yield models
    del os.environ["TRIAGE_MODELS_DIR"]
    jobs.context.cache_clear()


def test_two_models_one_sr(clean_servers: Servers, models_dir: Path, tmp_path: Path) -> None:
    servers = clean_servers
    assert set(jobs.context().registry.errors) == {"tampered"}
    storescu(servers.settings, write_study(tmp_path / "study", "head-ct-hyperdense"))
    watch_until(servers, Watcher(servers.settings, servers.orthanc, servers.redis), 1)
    run_worker(burst=True)

    [item] = Worklist(servers.redis).page()[0]
    assert item.status is StudyStatus.ANALYSED, item.status_reason
    assert {(r.model, r.model_version) for r in item.results} == {
        ("head-ct-hyperdensity", "1.1.0"), ("head-ct-second-opinion", "0.9.0")}
    assert {f.model for f in item.findings} == {"head-ct-hyperdensity",
                                                "head-ct-second-opinion"}
    assert item.priority.value == "critical"  # the higher of critical and urgent
    [sr_id] = our_srs(servers, item)
    path = tmp_path / "sr.dcm"
    path.write_bytes(servers.orthanc.instance_file(sr_id))
    sr = pydicom.dcmread(path)
    algorithms = {e.ManufacturerModelName for e in sr.ContributingEquipmentSequence
                  if e.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"}
    assert algorithms == {"Head CT hyperdensity", "Head CT second opinion"}
    assert dciodvfy_errors(path) == []
    assert pixelmed_sr_errors(path) == []
    dump = dsrdump(path)
    assert "Head CT second opinion" in dump and "Head CT hyperdensity" in dump
