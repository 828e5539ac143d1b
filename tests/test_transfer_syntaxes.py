"""Every image in pydicom's and pydicom-data's test files goes through the whole pipeline:
each ends analysed or skipped with a reason, whatever its transfer syntax, and no worker dies."""

from __future__ import annotations

import io
import json
import os
import shutil
import warnings
from collections import Counter
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.data import get_testdata_files

from tests.conftest import Servers
from tests.test_delivery import Receiver
from tests.test_hostile_inputs import own_objects
from tests.test_pipeline import watch_until
from tests.validators import dciodvfy_errors
from triage import jobs
from triage.copying.header import IDENTIFIERS, raw_bytes
from triage.errors import PermanentError
from triage.settings import PROJECT_ROOT
from triage.uids import derived_uid
from triage.watcher import Watcher
from triage.workers import run_worker
from triage.worklist import StudyStatus, Worklist

pytestmark = pytest.mark.servers
HEAD_CT = PROJECT_ROOT / "models" / "head-ct-hyperdensity"


def image_files() -> list[tuple[str, str, pydicom.Dataset]]:
    """(name, path, dataset) of every test file with pixel data, a storage class, a syntax."""
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in sorted(get_testdata_files()):
            try:
                ds = pydicom.dcmread(path)
            except Exception:  # noqa: BLE001 - files that are not DICOM at all
                continue
            meta = getattr(ds, "file_meta", None)
            if ("PixelData" in ds and "SOPClassUID" in ds and meta is not None
                    and "TransferSyntaxUID" in meta):
                found.append((path.rsplit("/", 1)[-1], path, ds))
    return found


def as_own_study(name: str, path: str, ds: pydicom.Dataset) -> bytes:
    """The file with new study, series and instance UIDs (many test files share them).

    A file pydicom cannot write back (a few have malformed elements) is sent as it is.
    """
    ds.StudyInstanceUID = derived_uid("syntax-study", name)
    ds.SeriesInstanceUID = derived_uid("syntax-series", name)
    ds.SOPInstanceUID = derived_uid("syntax-instance", name)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.save_as(buffer, enforce_file_format=True)
    except (TypeError, ValueError, AttributeError):
        with open(path, "rb") as handle:
            return handle.read()
    return buffer.getvalue()


def test_every_transfer_syntax_ends_analysed_or_skipped(clean_servers: Servers) -> None:
    servers = clean_servers
    files = image_files()
    syntaxes = Counter(ds.file_meta.TransferSyntaxUID.name for _, _, ds in files)
    assert len(syntaxes) >= 10, syntaxes  # the sweep really covers the compressed syntaxes
    studies, refused = set(), []
    for name, path, ds in files:
        try:
            studies.add(servers.orthanc.store(as_own_study(name, path, ds))["ParentStudy"])
        except PermanentError:
            refused.append(name)  # Orthanc itself rejects a few deliberately broken files
    stored = len(studies)
    assert len(refused) <= 5, refused
    assert stored >= len(files) - 15, (stored, len(files))

    watcher = Watcher(servers.settings, servers.orthanc, servers.redis)
    watch_until(servers, watcher, stored)
    assert run_worker(burst=True)

    items, total = Worklist(servers.redis).page(1000)
    assert total == stored
    outcomes = Counter(i.status for i in items)
    failed = [(i.study_description, i.status_reason) for i in items
              if i.status is StudyStatus.FAILED]
    assert failed == []
    assert set(outcomes) <= {StudyStatus.ANALYSED, StudyStatus.SKIPPED}
    assert outcomes[StudyStatus.ANALYSED] >= 1
    print(f"\n{stored} studies, refused by Orthanc: {refused}; {dict(outcomes)}")
    for reason, n in Counter(i.status_reason for i in items).most_common():
        print(f"  {n:3d} {reason}")
    assert all(i.status_reason for i in items if i.status is StudyStatus.SKIPPED)


@pytest.fixture
def any_image_model(tmp_path: Path, clean_servers: Servers):
    """The head-CT graph behind a manifest that takes any greyscale image of any modality,
    stored values, and reports every image positive: every decodable test file gets an SR
    and a key image."""
    models = tmp_path / "models"
    shutil.copytree(HEAD_CT, models / "any-image")
    path = models / "any-image" / "manifest.yaml"
    manifest = yaml.safe_load(path.read_text())
    manifest.update(id="any-image", version="0.0.1", name="Any image (test)")
    manifest["applicability"] = {"modalities": ["CT", "MR", "US", "CR", "DX", "OT", "NM", "MG",
                                                "XA", "RF", "PT", "SC", "RTDOSE", "SEG"]}
    manifest["preprocessing"]["rescale"] = "raw"
    manifest["outputs"][0].update(threshold=0.0, priority="urgent")
    path.write_text(yaml.safe_dump(manifest))
    os.environ["TRIAGE_MODELS_DIR"] = str(models)
    receiver = Receiver(tmp_path / "pacs")
    receiver.start()
    os.environ["TRIAGE_DESTINATIONS"] = json.dumps([{
        "name": "pacs", "aet": "PACS", "host": "127.0.0.1", "port": receiver.port,
        "send": "all", "key_images": True}])
    jobs.context.cache_clear()
    yield
    receiver.process.stop()
    del os.environ["TRIAGE_MODELS_DIR"], os.environ["TRIAGE_DESTINATIONS"]
    jobs.context.cache_clear()


def test_every_result_on_real_world_files_is_valid(clean_servers: Servers, any_image_model,
                                                   tmp_path: Path) -> None:
    """pydicom's test files come from many scanners and toolkits, with their own ways of
    writing patient, study and equipment attributes: the SR and key image of each pass
    dciodvfy, except errors of identifiers the source itself sent invalid."""
    servers = clean_servers
    sources = {}
    for name, path, ds in image_files():
        data = as_own_study(name, path, ds)
        try:
            servers.orthanc.store(data)
        except PermanentError:
            continue
        sources[str(derived_uid("syntax-study", name))] = (name, data)
    watch_until(servers, Watcher(servers.settings, servers.orthanc, servers.redis),
                len(sources))
    assert run_worker(burst=True)

    items = {i.study_instance_uid: i for i in Worklist(servers.redis).page(1000)[0]}
    problems, checked = [], 0
    for study, (name, data) in sources.items():
        item = items[study]
        if item.status is StudyStatus.FAILED:
            problems.append(f"{name}: failed: {item.status_reason}")
        if item.status is not StudyStatus.ANALYSED:
            continue
        source = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        accepted = invalid_identifiers(source)
        written_objects = own_objects(servers, item)
        if sorted(written_objects) != ["SR", "key image"]:
            problems.append(f"{name}: wrote {sorted(written_objects)}")
        for kind, written in written_objects.items():
            path = tmp_path / f"{name}-{kind}.dcm"
            path.write_bytes(written)
            errors = [e for e in dciodvfy_errors(path)
                      if not any(f"</{keyword}(" in e for keyword in accepted)]
            if errors:
                problems.append(f"{name} {kind}: {errors}")
            checked += 1
    analysed = sum(i.status is StudyStatus.ANALYSED for i in items.values())
    print(f"\n{len(sources)} studies, {analysed} analysed, {checked} objects validated")
    assert not problems, "\n".join(problems)
    assert analysed >= 80 and checked == 2 * analysed


def invalid_identifiers(source: pydicom.Dataset) -> set[str]:
    """The identifiers the source sent invalid for their VR (too long for it, or holding a
    value delimiter or control character): the service copies them as they are."""
    limits = {"PatientID": 64, "IssuerOfPatientID": 64, "AccessionNumber": 16,
              "StudyInstanceUID": 64}
    invalid = set()
    for keyword in IDENTIFIERS:
        raw = (raw_bytes(source, keyword) or b"").rstrip(b" \0")
        if len(raw) > limits[keyword] or any(b < 0x20 or b == 0x5C for b in raw) or (
                not raw.isascii() and "SpecificCharacterSet" not in source):
            invalid.add(keyword)
    return invalid
