"""End-to-end pipeline on a real Orthanc and Redis: C-STORE in, SR and worklist item out."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from tests.conftest import Servers
from tests.senders import pynetdicom_send, storescu
from tests.validators import dciodvfy_errors, dsrdump
from triage.queues import QueueName, enqueue_analysis
from triage.samples import SAMPLES, build_sample
from triage.uids import sr_series_uid
from triage.watcher import Watcher
from triage.workers import run_worker
from triage.worklist import StudyStatus, Worklist, WorklistItem

pytestmark = pytest.mark.servers
SAMPLE = {s.key: s for s in SAMPLES}


def write_study(directory: Path, key: str) -> list[Path]:
    paths = []
    directory.mkdir(parents=True, exist_ok=True)
    for ds in build_sample(SAMPLE[key]):
        path = directory / f"{key}-{ds.InstanceNumber:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def watch_until(servers: Servers, watcher: Watcher, n_studies: int) -> None:
    """Poll Orthanc's change log until ``n_studies`` studies are on the worklist."""
    worklist = Worklist(servers.redis)
    servers.wait_until(lambda: watcher.poll_once() >= 0 and worklist.page()[1] >= n_studies,
                       timeout=30, what=f"{n_studies} stable studies")


def our_srs(servers: Servers, item: WorklistItem) -> list[str]:
    """Orthanc ids of the SR instances the service wrote into a study."""
    ids = []
    for series in servers.orthanc.study_series(item.orthanc_id):
        tags = series["MainDicomTags"]
        if tags.get("SeriesInstanceUID") == str(sr_series_uid(item.study_instance_uid)):
            ids += series["Instances"]
    return ids


def sr_dataset(servers: Servers, item: WorklistItem, tmp_path: Path) -> Path:
    [instance] = our_srs(servers, item)
    path = tmp_path / f"{instance}.dcm"
    path.write_bytes(servers.orthanc.instance_file(instance))
    return path


def test_studies_end_analysed_or_skipped_with_one_conformant_sr(
        clean_servers: Servers, tmp_path: Path) -> None:
    servers = clean_servers
    storescu(servers.settings, write_study(tmp_path, "head-ct-normal")
             + write_study(tmp_path, "mr-small"))
    statuses = pynetdicom_send(
        servers.settings,
        [*build_sample(SAMPLE["head-ct-hyperdense"]), *build_sample(SAMPLE["chest-cr"])])
    assert set(statuses) == {0}
    # A JPEG 2000 head CT from pydicom's test files, sent as it is (its own UIDs).
    storescu(servers.settings, [Path(get_testdata_file("J2K_pixelrep_mismatch.dcm"))])

    watcher = Watcher(servers.settings, servers.orthanc, servers.redis)
    watch_until(servers, watcher, 5)
    run_worker(burst=True)

    items, total = Worklist(servers.redis).page()
    assert total == 5
    by_patient = {i.patient_name: i for i in items}
    assert all(i.status.terminal for i in items), [(i.patient_name, i.status) for i in items]

    positive = by_patient["DEMO^HEADCT PHANTOM"]
    normal = by_patient["DEMO^HEADCT NORMAL"]
    j2k = next(i for i in items if not i.patient_name.startswith("DEMO"))
    for item in (positive, normal, j2k):
        assert item.status is StudyStatus.ANALYSED, item.status_reason
        assert item.findings and item.results
        assert item.findings[0].model == "head-ct-hyperdensity"
        path = sr_dataset(servers, item, tmp_path)
        assert dciodvfy_errors(path) == []
        dump = dsrdump(path)
        assert "Intracranial hemorrhage" in dump
        sr = pydicom.dcmread(path)
        assert sr.StudyInstanceUID == item.study_instance_uid
        assert sr.SOPInstanceUID == item.sr_sop_instance_uid
        assert sr.VerificationFlag == "UNVERIFIED"
    assert positive.priority.value == "critical" and positive.findings[0].positive
    assert positive.priority_reasons and "Intracranial hemorrhage" in positive.priority_reasons[0]
    assert normal.priority.value == "routine" and not normal.findings[0].positive
    # The critical study is first on the worklist.
    assert items[0].study_instance_uid == positive.study_instance_uid

    for key, modality in (("DEMO^MR", "MR"), ("DEMO^CHEST", "CR")):
        item = by_patient[key]
        assert item.status is StudyStatus.SKIPPED
        assert modality in item.status_reason
        assert our_srs(servers, item) == []


def test_resending_or_rerunning_a_study_writes_no_second_sr(
        clean_servers: Servers, tmp_path: Path) -> None:
    servers = clean_servers
    files = write_study(tmp_path, "head-ct-hyperdense")
    storescu(servers.settings, files)
    watcher = Watcher(servers.settings, servers.orthanc, servers.redis)
    watch_until(servers, watcher, 1)
    run_worker(burst=True)
    [item] = Worklist(servers.redis).page()[0]
    assert item.status is StudyStatus.ANALYSED
    first_sr = our_srs(servers, item)
    assert len(first_sr) == 1

    # The SR the service stored makes the study stable once more, and the same instances
    # are sent again: neither queues a second analysis.
    seen = servers.orthanc.last_change()
    storescu(servers.settings, files)
    servers.wait_until(lambda: _stable_since(servers, seen), timeout=15,
                       what="the study to be stable again")
    assert watcher.poll_once() == 0
    assert _queued(servers) == 0

    # Re-running the very same job (an admin requeue, a retry) stores the same SR UID.
    enqueue_analysis(servers.redis, servers.settings, queue=QueueName.DEFAULT,
                     job_id=item.job_id + "-rerun", orthanc_id=item.orthanc_id,
                     study_instance_uid=item.study_instance_uid, inputs=item.inputs)
    run_worker(burst=True)
    again = Worklist(servers.redis).get(item.study_instance_uid)
    assert again is not None and again.status is StudyStatus.ANALYSED
    assert again.sr_sop_instance_uid == item.sr_sop_instance_uid
    assert our_srs(servers, item) == first_sr


def _stable_since(servers: Servers, seq: int) -> bool:
    return any(c.change_type == "StableStudy" for c in servers.orthanc.changes(seq).changes)


def _queued(servers: Servers) -> int:
    from triage.queues import queues

    return sum(q.count for q in queues(servers.redis))


def test_stow_rs_ingest_is_analysed(clean_servers: Servers, tmp_path: Path) -> None:
    """A study stored through DICOMweb STOW-RS is analysed like one sent by C-STORE."""
    import httpx

    servers = clean_servers
    files = write_study(tmp_path, "head-ct-hyperdense")
    boundary = "triage-test-boundary"
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + path.read_bytes()
        + b"\r\n" for path in files) + f"--{boundary}--\r\n".encode()
    response = httpx.post(
        f"{servers.settings.orthanc_base_url}/dicom-web/studies", content=body,
        headers={"Content-Type":
                 f'multipart/related; type="application/dicom"; boundary={boundary}',
                 "Accept": "application/dicom+json"},
        auth=(servers.settings.orthanc_username, servers.settings.orthanc_secret), timeout=30)
    assert response.status_code == 200, response.text
    watcher = Watcher(servers.settings, servers.orthanc, servers.redis)
    watch_until(servers, watcher, 1)
    run_worker(burst=True)
    [item] = Worklist(servers.redis).page()[0]
    assert item.status is StudyStatus.ANALYSED
    assert item.priority.value == "critical"
    assert len(our_srs(servers, item)) == 1
