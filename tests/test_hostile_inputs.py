"""The hostile corpus (tests/hostile.py and its attribute sweep, tests/hostile_attributes.py)
through the whole pipeline, on one shared stack: each case ends as it declares, none ends
``failed``, every SR and key image the service writes passes dciodvfy (but for the invalid
identifiers a case lists, which are copied as sent), identifiers are copied byte for byte, the
worker stays up, and the next normal study is analysed."""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from rq.registry import FailedJobRegistry

from tests.conftest import Servers
from tests.hostile import ANALYSED, FAILED, REFUSED, HostileCase, hostile_cases
from tests.hostile_attributes import SITE_TIMEZONE, attribute_cases
from tests.senders import storescu
from tests.test_delivery import Receiver
from tests.test_pipeline import watch_until
from tests.validators import dciodvfy_errors, dsrdump, pixelmed_sr_errors
from triage import jobs
from triage.copying import values as dicom_values
from triage.copying.header import IDENTIFIERS, raw_bytes
from triage.errors import PermanentError
from triage.queues import queues
from triage.reindex import read_report
from triage.samples import SAMPLES, build_sample
from triage.uids import key_image_series_uid, sr_series_uid
from triage.watcher import Watcher
from triage.workers import run_worker
from triage.worklist import StudyStatus, Worklist, WorklistItem

# Type 2 attributes of the Patient and General Study modules: present in every object the
# service writes, empty when the source has nothing valid.
TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
          "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")


def test_the_corpus_is_large_and_every_case_is_its_own_study() -> None:
    cases = hostile_cases()
    assert len(cases) >= 30
    assert len({c.study_instance_uid for c in cases}) == len(cases)
    assert sum(c.status == REFUSED for c in cases) < len(cases) // 4  # mostly accepted
    assert sum(c.status == ANALYSED for c in cases) < len(cases) // 2  # mostly hostile


def test_the_attribute_sweep_covers_every_class_of_value() -> None:
    cases = attribute_cases()
    names = [c.name for c in cases]
    assert len({c.study_instance_uid for c in cases} | {c.study_instance_uid
                                                        for c in hostile_cases()}) == (
        len(cases) + len(hostile_cases()))
    for kind in ("absent", "empty", "over-long", "multi-valued", "control-character",
                 "latin1-bytes-declared-utf8", "utf8-bytes-declared-latin1",
                 "iso2022-escapes-undeclared", "iso2022-declared-empty-first-value"):
        assert any(kind in name for name in names), kind
    for keyword in ("patientid", "accessionnumber", "patientname", "studydescription",
                    "patientbirthdate", "bodypartexamined", "imagetype", "pixelspacing",
                    "slicethickness", "rescaleslope", "windowcenter", "kvp",
                    "convolutionkernel", "manufacturer", "manufacturermodelname",
                    "stationname", "institutionname", "patientage", "specificcharacterset",
                    "requestedprocedurepriority"):
        assert any(name.startswith(keyword + "-") for name in names), keyword
    assert not any(c.status == FAILED for c in cases)


@pytest.fixture
def hostile_stack(clean_servers: Servers, tmp_path: Path) -> Iterator[tuple[Servers, Receiver]]:
    """The shared stack with the site's time zone set and a PACS that wants key images."""
    receiver = Receiver(tmp_path / "pacs")
    receiver.start()
    os.environ["TRIAGE_TIMEZONE"] = SITE_TIMEZONE
    os.environ["TRIAGE_DESTINATIONS"] = json.dumps([{
        "name": "pacs", "aet": "PACS", "host": "127.0.0.1", "port": receiver.port,
        "send": "all", "key_images": True}])
    jobs.context.cache_clear()
    yield clean_servers, receiver
    receiver.process.stop()
    for name in ("TRIAGE_TIMEZONE", "TRIAGE_DESTINATIONS"):
        del os.environ[name]
    jobs.context.cache_clear()


@pytest.mark.servers
def test_hostile_studies_end_as_declared_with_valid_objects(
        hostile_stack: tuple[Servers, Receiver], tmp_path: Path) -> None:
    servers, _ = hostile_stack
    started = time.monotonic()
    cases = hostile_cases() + attribute_cases()
    problems: list[str] = []
    accepted: list[HostileCase] = []
    for case in cases:
        refused = _store(servers, case)
        if case.status == REFUSED:
            if not refused:
                problems.append(f"{case.name}: expected {REFUSED}, but Orthanc stored it")
            elif servers.orthanc.lookup_study(case.study_instance_uid) is not None:
                problems.append(f"{case.name}: refused, yet the study is in Orthanc")
        elif refused:
            problems.append(f"{case.name}: expected {case.status}, but {REFUSED}: {refused}")
        else:
            accepted.append(case)

    watcher = Watcher(servers.settings, servers.orthanc, servers.redis)
    watch_until(servers, watcher, len(accepted))
    assert run_worker(burst=True)  # the worker returns: no hostile study took it down
    stored = time.monotonic()

    worklist = Worklist(servers.redis)
    objects = 0
    for case in accepted:
        item = worklist.get(case.study_instance_uid)
        if item is None:
            problems.append(f"{case.name}: not on the worklist")
            continue
        found = _outcome_problems(case, item)
        if not found and case.status == ANALYSED:
            found, written = _object_problems(servers, case, item, tmp_path)
            objects += written
        problems += [f"{case.name}: {p}" for p in found]
    # Nothing ended as an unexpected exception in RQ's failed jobs.
    failed_jobs = [job for queue in queues(servers.redis)
                   for job in FailedJobRegistry(queue=queue).get_job_ids()]
    if failed_jobs:
        problems.append(f"jobs failed with exceptions: {failed_jobs}")
    assert not problems, f"{len(problems)} problems in {len(cases)} cases:\n" + "\n".join(
        problems)
    print(f"\n{len(cases)} hostile cases ({len(cases) - len(accepted)} refused by Orthanc), "
          f"{objects} objects validated; sent and analysed in {stored - started:.1f} s, "
          f"checked in {time.monotonic() - stored:.1f} s")

    # The same worker process then analyses the next normal study.
    normal = next(s for s in SAMPLES if s.key == "head-ct-normal")
    datasets = list(build_sample(normal))
    for ds in datasets:
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
        servers.orthanc.store(buffer.getvalue())
    watch_until(servers, watcher, len(accepted) + 1)
    assert run_worker(burst=True)
    item = worklist.get(str(datasets[0].StudyInstanceUID))
    assert item is not None and item.status is StudyStatus.ANALYSED, item
    assert item.findings and item.sr_sop_instance_uid


def _outcome_problems(case: HostileCase, item: WorklistItem) -> list[str]:
    got = f"{item.status.value} ({item.status_reason!r})"
    if not item.status.terminal:
        return [f"not terminal: {got}"]
    if item.status.value != case.status or case.reason not in item.status_reason:
        return [f"expected {case.status} ({case.reason!r}), got {got}"]
    problems = []
    if "HOSTILE" in item.status_reason.upper():
        problems.append(f"reason carries patient data: {item.status_reason}")
    if "Error" in item.status_reason or "Exception" in item.status_reason:
        problems.append(f"reason names an exception: {item.status_reason}")
    if case.status == ANALYSED:
        if not item.findings or not item.sr_sop_instance_uid:
            problems.append("analysed without findings or SR")
        used = {r.series_instance_uid for r in item.results}
        if case.analysed_series is not None and used != {case.analysed_series}:
            problems.append(f"analysed series {used}, expected {case.analysed_series}")
        if case.priority is not None and item.priority.value != case.priority:
            problems.append(f"priority {item.priority.value}, expected {case.priority}")
    return problems


def _object_problems(servers: Servers, case: HostileCase, item: WorklistItem,
                     tmp_path: Path) -> tuple[list[str], int]:
    """What is wrong with the SR and key image the service wrote into the case's study, and
    how many objects it wrote there."""
    source = pydicom.dcmread(io.BytesIO(case.files[0]), stop_before_pixels=True)
    problems = []
    written = own_objects(servers, item)
    kinds = sorted(written)
    wanted = sorted(["SR", "key image"] if case.priority == "critical" else ["SR"])
    if kinds != wanted:
        problems.append(f"wrote {kinds} into the study, expected {wanted}")
    for kind, data in written.items():
        path = tmp_path / f"{case.name}-{kind.replace(' ', '-')}.dcm"
        path.write_bytes(data)
        errors = [e for e in dciodvfy_errors(path)
                  if not any(f"</{keyword}(" in e for keyword in case.identifier_errors)]
        if errors:
            problems.append(f"{kind} fails dciodvfy: {errors}")
        ds = pydicom.dcmread(path)
        if kind == "SR":
            dsrdump(path)
            problems += _read_back_problems(ds, item, source)
        for keyword in IDENTIFIERS:
            sent = (raw_bytes(source, keyword) or b"").rstrip(b" \0")
            copied = raw_bytes(ds, keyword)
            if copied is None and (sent or keyword != "IssuerOfPatientID"):
                problems.append(f"{kind} has no {keyword}")
            elif (copied or b"").rstrip(b" \0") != sent:
                problems.append(f"{kind} changed {keyword}: {sent!r} -> {copied!r}")
        missing = [k for k in TYPE_2 if k not in ds]
        if missing:
            problems.append(f"{kind} lacks Type 2 attributes {missing}")
        # The service's own times are of one moment, at the declared offset.
        own = {str(ds.get(k, "")) for k in ("ContentDate", "InstanceCreationDate",
                                           "DateOfSecondaryCapture") if k in ds}
        if len(own) != 1:
            problems.append(f"{kind} has dates of different days: {sorted(own)}")
        if case.utc_offset is not None and ds.get("TimezoneOffsetFromUTC") != case.utc_offset:
            problems.append(f"{kind} offset {ds.get('TimezoneOffsetFromUTC')!r}, expected "
                            f"{case.utc_offset}")
    return problems, len(written)


def _read_back_problems(sr: pydicom.Dataset, item: WorklistItem,
                        source: pydicom.Dataset) -> list[str]:
    """The SR read back as a rebuild of the worklist reads it (``triage reindex``): the same
    findings; and it keeps the scanner that made the images when the source names one."""
    problems = []
    read = read_report(sr)
    if read.sop_instance_uid != item.sr_sop_instance_uid or {
            (f.code, f.model_id, round(f.probability, 6)) for f in read.findings} != {
            (f.code, f.model, round(f.probability, 6)) for f in item.findings}:
        problems.append(f"SR read back differs from the worklist: {read}")
    if dicom_values.string(source.get("Manufacturer"), "LO", ("latin_1", "utf_8")):
        acquisition = [e for e in sr.ContributingEquipmentSequence
                       if e.PurposeOfReferenceCodeSequence[0].CodeValue == "109101"]
        if len(acquisition) != 1:
            problems.append("SR does not name the equipment that acquired the images")
    return problems


def own_objects(servers: Servers, item: WorklistItem) -> dict[str, bytes]:
    """The SR and key image the service stored in the study, by kind."""
    kinds = {str(sr_series_uid(item.study_instance_uid)): "SR",
             str(key_image_series_uid(item.study_instance_uid)): "key image"}
    found = {}
    for series in servers.orthanc.study_series(item.orthanc_id):
        kind = kinds.get(series["MainDicomTags"].get("SeriesInstanceUID", ""))
        if kind is not None:
            [instance] = series["Instances"]
            found[kind] = servers.orthanc.instance_file(instance)
    return found


@pytest.mark.servers
def test_an_unidentified_head_ct_with_a_bleed_is_critical_with_a_valid_sr(
        clean_servers: Servers, tmp_path: Path) -> None:
    """An emergency study sent before the patient is registered: no Patient ID element at
    all (nor name, birth date, sex, accession); sent by dcmtk's storescu."""
    servers = clean_servers
    sample = next(s for s in SAMPLES if s.hyperdense_region)
    paths = []
    for ds in build_sample(sample):
        for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                        "AccessionNumber"):
            if keyword in ds:
                delattr(ds, keyword)
        path = tmp_path / f"{ds.InstanceNumber:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    study_uid = str(ds.StudyInstanceUID)
    storescu(servers.settings, paths)
    watch_until(servers, Watcher(servers.settings, servers.orthanc, servers.redis), 1)
    assert run_worker(burst=True)

    item = Worklist(servers.redis).get(study_uid)
    assert item is not None, "not on the worklist"
    assert (item.status, item.priority.value) == (StudyStatus.ANALYSED, "critical"), item
    assert servers.orthanc.lookup_study(study_uid) == item.orthanc_id
    sr_bytes = own_objects(servers, item)["SR"]
    path = tmp_path / "sr.dcm"
    path.write_bytes(sr_bytes)
    sr = pydicom.dcmread(path)
    assert sr.StudyInstanceUID == study_uid and sr.SOPInstanceUID == item.sr_sop_instance_uid
    assert (sr.PatientID, sr.PatientName, sr.AccessionNumber) == ("", "", "")
    assert dciodvfy_errors(path) == []
    assert pixelmed_sr_errors(path) == []
    assert "Intracranial hemorrhage" in dsrdump(path)


def _store(servers: Servers, case: HostileCase) -> str:
    """Store a case's files; the error text when Orthanc refuses one, else ''."""
    for data in case.files:
        try:
            servers.orthanc.store(data)
        except PermanentError as exc:
            return str(exc)
    return ""
