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


def _millimetre_package(models: Path) -> None:
    """The head-CT graph behind a manifest that resamples images to 1 mm pixels."""
    folder = models / "head-ct-millimetres"
    shutil.copytree(HEAD_CT, folder)
    manifest = yaml.safe_load((folder / "manifest.yaml").read_text())
    manifest.update(id="head-ct-millimetres", version="0.1.0", name="Head CT in millimetres")
    manifest["preprocessing"]["pixel_spacing_mm"] = 1.0
    (folder / "manifest.yaml").write_text(yaml.safe_dump(manifest))


def _send_without_spacing(servers: Servers, tmp_path: Path, spacing: list[str] | None,
                          models: Path) -> str:
    """Send the hyperdense sample with ``spacing`` as its Pixel Spacing (``None``: without
    one) and analyse it with the packages in ``models``."""
    paths = write_study(tmp_path / "study", "head-ct-hyperdense")
    for path in paths:
        ds = pydicom.dcmread(path)
        if spacing is None:
            del ds.PixelSpacing
        else:
            ds.PixelSpacing = spacing
        ds.save_as(path, enforce_file_format=True)
    os.environ["TRIAGE_MODELS_DIR"] = str(models)
    jobs.context.cache_clear()
    try:
        storescu(servers.settings, paths)
        watch_until(servers, Watcher(servers.settings, servers.orthanc, servers.redis), 1)
        run_worker(burst=True)
    finally:
        del os.environ["TRIAGE_MODELS_DIR"]
        jobs.context.cache_clear()
    return str(pydicom.dcmread(paths[0]).StudyInstanceUID)


def test_a_model_in_millimetres_is_left_out_without_pixel_spacing_while_others_run(
        clean_servers: Servers, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(HEAD_CT, models / "head-ct-hyperdensity")
    _millimetre_package(models)
    study = _send_without_spacing(clean_servers, tmp_path, None, models)
    item = Worklist(clean_servers.redis).get(study)
    assert item is not None and item.status is StudyStatus.ANALYSED, item
    assert {r.model for r in item.results} == {"head-ct-hyperdensity"}
    assert item.priority.value == "critical"
    assert item.status_reason == ("not analysed by head-ct-millimetres: Pixel Spacing is "
                                  "missing: the model needs the images' size in millimetres")


@pytest.mark.parametrize("spacing", [["0", "0"], ["0.478516", "0.478516"]])
def test_a_model_in_millimetres_alone(clean_servers: Servers, tmp_path: Path,
                                      spacing: list[str]) -> None:
    """Zero spacing: skipped, naming the attribute; a real one: the bleed is found at 1 mm."""
    models = tmp_path / "models"
    _millimetre_package(models)
    study = _send_without_spacing(clean_servers, tmp_path, spacing, models)
    item = Worklist(clean_servers.redis).get(study)
    assert item is not None
    if spacing[0] == "0":
        assert item.status is StudyStatus.SKIPPED
        assert item.status_reason.startswith("Pixel Spacing is zero or negative")
    else:
        assert item.status is StudyStatus.ANALYSED, item.status_reason
        assert item.priority.value == "critical"
