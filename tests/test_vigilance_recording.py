"""Every analysis recorded in PostgreSQL through the Redis outbox: records built from real and
hostile DICOM attributes, the flush into a real PostgreSQL (upserts, versions registered,
refused records set aside), a down database that keeps the outbox and backs off, and a study
analysed by the real worker that ends with its analysis row in PostgreSQL."""

from __future__ import annotations

import socket
import time
from datetime import UTC, datetime, timedelta

import psycopg
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from rq import Queue

from tests.conftest import Servers, free_port
from tests.senders import pynetdicom_send
from triage import jobs
from triage.findings import CodedConcept, Finding, ModelIdentity, ModelResult
from triage.ingest import StudySnapshot
from triage.queues import VIGILANCE_QUEUE
from triage.samples import SAMPLES, build_sample
from triage.settings import Settings
from triage.vigilance import recording
from triage.vigilance.recording import (
    OUTBOX,
    REJECTED,
    RETRY_AFTER,
    AnalysisRecord,
    age_band,
    build_records,
    enqueue,
    flush,
)
from triage.watcher import Watcher
from triage.workers import run_worker
from triage.worklist import StudyStatus, Worklist

pytestmark = pytest.mark.servers

SHA = "a" * 64
STUDY = "1.2.826.0.1.3680043.8.498.1"
SR = "1.2.826.0.1.3680043.8.498.2"
NOW = datetime(2026, 11, 30, 7, 0, tzinfo=UTC)


def result(series_uid: str, *, version: str = "1.0.0", sha: str = SHA,
           scores: tuple[float, ...] = (0.8, 0.1)) -> ModelResult:
    findings = tuple(
        Finding(concept=CodedConcept(str(230000000 + i), "SCT", f"Finding {i}"),
                probability=score, threshold=0.5, priority=None,
                key_sop_instance_uid="1.2.3", key_sop_class_uid="1.2.840.10008.5.1.4.1.1.2")
        for i, score in enumerate(scores))
    return ModelResult(model=ModelIdentity("head-ct", version, "Head CT", "Triage", sha,
                                           "research"),
                       series_instance_uid=series_uid, input_sop_instance_uids=("1.2.3",),
                       findings=findings)


def snapshot(*, study_uid: str = STUDY, age: str = "045Y", birth: str = "", sex: str = "F",
             study_date: str = "20260101", calling_aet: str = "CT01",
             first_instance: dict[str, object] | None = None) -> StudySnapshot:
    return StudySnapshot(orthanc_id="o", study_instance_uid=study_uid, accession_number="ACC1",
                         patient_name="DOE^JANE", patient_id="PID1", study_description="",
                         study_date=study_date, series=(), first_instance=first_instance or {},
                         calling_aet=calling_aet, patient_birth_date=birth, patient_sex=sex,
                         patient_age=age)


def ct_small() -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)


def hostile(ds: pydicom.Dataset, **values: bytes) -> pydicom.Dataset:
    """``ds`` with attributes set to raw bytes, as a modality may send them (read lazily,
    like a file's)."""
    for keyword, value in values.items():
        tag = Tag(keyword)
        ds._dict[tag] = RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, True,
                                       True)
    return ds


def rows(conn: psycopg.Connection, sql: str) -> list[tuple[object, ...]]:
    conn.rollback()
    return conn.execute(sql).fetchall()


# -- building records ------------------------------------------------------------------------

def test_records_from_a_real_ct_header() -> None:
    header = ct_small()
    [record] = build_records(snapshot(), [result(header.SeriesInstanceUID)],
                             {header.SeriesInstanceUID: [header]}, SR, NOW)
    assert (record.modality, record.manufacturer, record.manufacturer_model_name,
            record.station_name, record.institution) == (
        "CT", "GE MEDICAL SYSTEMS", "RHAPSODE", "CT01_OC0", "JFK IMAGING CENTER")
    assert (record.slice_thickness_mm, record.kvp, record.reconstruction_kernel) == (
        5.0, 120.0, "STANDARD")
    assert record.pixel_spacing_row_mm == pytest.approx(0.661468)
    assert (record.age_band, record.sex, record.calling_aet) == ("40-49", "F", "CT01")
    assert [(o.code, o.flagged) for o in record.outputs] == [
        ("SCT:230000000", True), ("SCT:230000001", False)]


def test_a_workers_snapshot_takes_the_patient_from_the_images() -> None:
    """A worker's snapshot has no patient module: age band and sex come from the header."""
    header = ct_small()
    header.PatientAge, header.PatientSex = "067Y", "M"
    [record] = build_records(snapshot(age="", sex="", study_date=""),
                             [result(header.SeriesInstanceUID)],
                             {header.SeriesInstanceUID: [header]}, SR, NOW)
    assert (record.age_band, record.sex) == ("60-69", "M")
    text = record.model_dump_json()
    for identifier in ("DOE", "PID1", "ACC1", "CT_small"):
        assert identifier not in text


@pytest.mark.parametrize(("age", "birth", "study_date", "band"), [
    ("045Y", "", "", "40-49"), ("090Y", "", "", "90+"), ("011M", "", "", "0-9"),
    ("003W", "", "", "0-9"), ("005D", "", "", "0-9"), ("", "19800615", "20260101", "40-49"),
    ("45", "", "", None), ("abcY", "", "", None), ("", "1980", "20260101", None),
    ("", "20300101", "20260101", None), ("999Y", "", "", None), ("\x00", "x" * 99, "", None),
])
def test_age_bands(age: str, birth: str, study_date: str, band: str | None) -> None:
    assert age_band(age, birth, study_date) == band


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's, about the hostile values
def test_hostile_values_never_raise_and_fit_the_schema() -> None:
    header = hostile(ct_small(), SliceThickness=b"-2.5", KVP=b"abc", StationName=b"S" * 200,
                     Manufacturer=b"  \x00ACME\r\n  ", PixelSpacing=b"nan\\1e400",
                     ConvolutionKernel=b"B30f\\\x01")
    [record] = build_records(snapshot(age="12Q", sex="unknown"),
                             [result(header.SeriesInstanceUID)],
                             {header.SeriesInstanceUID: [header]}, SR, NOW)
    assert record.slice_thickness_mm is None and record.kvp is None
    assert record.pixel_spacing_row_mm is None and record.pixel_spacing_column_mm is None
    assert record.station_name == "S" * 64
    assert record.manufacturer == "ACME"
    assert record.reconstruction_kernel == "B30f"
    assert record.age_band is None and record.sex is None
    # From Orthanc's tags of the first instance when the series' headers are missing.
    [fallback] = build_records(
        snapshot(first_instance={"Modality": "MR", "SliceThickness": "0", "KVP": "",
                                 "PixelSpacing": "0.5\\0.6", "StationName": 12}),
        [result("9.9")], {}, None, NOW)
    assert (fallback.modality, fallback.slice_thickness_mm, fallback.kvp,
            fallback.pixel_spacing_row_mm, fallback.pixel_spacing_column_mm,
            fallback.station_name) == ("MR", None, None, 0.5, 0.6, "12")


# -- the outbox and the flush ----------------------------------------------------------------

def record(study_uid: str = STUDY, *, version: str = "1.0.0", sha: str = SHA,
           scores: tuple[float, ...] = (0.8, 0.1), at: datetime = NOW) -> AnalysisRecord:
    header = ct_small()
    [built] = build_records(snapshot(study_uid=study_uid),
                            [result(header.SeriesInstanceUID, version=version, sha=sha,
                                    scores=scores)],
                            {header.SeriesInstanceUID: [header]}, SR, at)
    return built


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_flush_writes_replaces_and_registers_versions(
        clean_servers: Servers, vigilance_database: Settings,
        vigilance_db: psycopg.Connection) -> None:
    connection = clean_servers.redis
    bad = hostile(ct_small(), KVP=b"abc", SliceThickness=b"-1", StationName=b"\x00" * 300,
                  InstitutionName=bytes(range(256)))
    [odd] = build_records(snapshot(study_uid="1.2.3.4", age="xx"),
                          [result(bad.SeriesInstanceUID)], {bad.SeriesInstanceUID: [bad]},
                          None, NOW)
    enqueue(connection, [record(), odd])
    started = time.perf_counter()
    assert flush(connection, vigilance_database) == 2
    print(f"flush of 2 records: {1000 * (time.perf_counter() - started):.1f} ms")
    assert connection.llen(OUTBOX) == 0 and connection.llen(REJECTED) == 0
    assert rows(vigilance_db, "SELECT model_id, version, state FROM model_versions") == [
        ("head-ct", "1.0.0", "active")]
    assert rows(vigilance_db, "SELECT study_uid, kvp, slice_thickness_mm, station_name, "
                "age_band, sex FROM analyses ORDER BY study_uid") == [
        ("1.2.3.4", None, None, None, None, "F"),
        (STUDY, 120.0, 5.0, "CT01_OC0", "40-49", "F")]

    # A re-analysis by the same version replaces the row and its outputs; another version
    # is registered in shadow and recorded beside it.
    enqueue(connection, [record(scores=(0.2,), at=NOW + timedelta(minutes=5)),
                         record(version="2.0.0", sha="b" * 64)])
    started = time.perf_counter()
    assert flush(connection, vigilance_database) == 2
    print(f"flush of 2 records, second time: {1000 * (time.perf_counter() - started):.1f} ms")
    assert rows(vigilance_db, "SELECT version, state FROM model_versions ORDER BY version") == [
        ("1.0.0", "active"), ("2.0.0", "shadow")]
    assert rows(vigilance_db, "SELECT a.version, o.label, o.score, o.flagged FROM analyses a "
                f"JOIN analysis_outputs o ON o.analysis_id = a.id WHERE a.study_uid = '{STUDY}'"
                " ORDER BY a.version, o.label") == [
        ("1.0.0", "Finding 0", 0.2, False),
        ("2.0.0", "Finding 0", 0.8, True), ("2.0.0", "Finding 1", 0.1, False)]
    # An older record arriving late leaves the newer analysis in place.
    enqueue(connection, [record(scores=(0.9,), at=NOW - timedelta(days=1))])
    assert flush(connection, vigilance_database) == 1
    assert rows(vigilance_db, "SELECT o.score FROM analyses a JOIN analysis_outputs o "
                "ON o.analysis_id = a.id WHERE a.version = '1.0.0' "
                f"AND a.study_uid = '{STUDY}'") == [(0.2,)]

    # One record, timed alone.
    enqueue(connection, [record(study_uid="1.2.3.5")])
    started = time.perf_counter()
    assert flush(connection, vigilance_database) == 1
    print(f"flush of 1 record: {1000 * (time.perf_counter() - started):.1f} ms")
    started = time.perf_counter()
    assert flush(connection, vigilance_database) == 0
    print(f"flush of an empty outbox: {1000 * (time.perf_counter() - started):.2f} ms")


def test_refused_records_are_set_aside(clean_servers: Servers, vigilance_database: Settings,
                                       vigilance_db: psycopg.Connection) -> None:
    connection = clean_servers.redis
    enqueue(connection, [record()])
    connection.rpush(OUTBOX, b"{not json")
    enqueue(connection, [record(study_uid="not-a-uid"),  # the schema's dicom_uid refuses it
                         record(study_uid="1.2.3.6", sha="c" * 64),  # 1.0.0 has other weights
                         record(study_uid="1.2.3.7", scores=(1.5,))])  # a score above 1
    enqueue(connection, [record(study_uid="1.2.3.8")])
    assert flush(connection, vigilance_database) == 2
    assert connection.llen(OUTBOX) == 0
    assert connection.llen(REJECTED) == 4
    assert rows(vigilance_db, "SELECT study_uid FROM analyses ORDER BY study_uid") == [
        ("1.2.3.8",), (STUDY,)]


def test_a_down_database_keeps_the_outbox_and_backs_off(
        clean_servers: Servers, vigilance_database: Settings,
        vigilance_db: psycopg.Connection) -> None:
    connection = clean_servers.redis
    down = vigilance_database.model_copy(update={
        "database_url": f"postgresql://triage:not-it@127.0.0.1:{free_port()}/triage"})
    enqueue(connection, [record(), record(study_uid="1.2.3.9")])
    started = time.perf_counter()
    assert flush(connection, down) == 0
    failed = time.perf_counter() - started
    assert connection.llen(OUTBOX) == 2
    assert 25_000 < connection.pttl(RETRY_AFTER) <= 30_000
    # Within the back-off no process tries again, not even with a database that is up.
    started = time.perf_counter()
    assert flush(connection, vigilance_database) == 0
    skipped = time.perf_counter() - started
    print(f"flush with PostgreSQL down: {1000 * failed:.1f} ms; "
          f"within the back-off: {1000 * skipped:.2f} ms")
    assert skipped < 0.1 and connection.llen(OUTBOX) == 2
    assert rows(vigilance_db, "SELECT count(*) FROM analyses") == [(0,)]
    connection.delete(RETRY_AFTER)  # 30 s later
    assert flush(connection, vigilance_database) == 2
    assert connection.llen(OUTBOX) == 0
    assert rows(vigilance_db, "SELECT count(*) FROM analyses") == [(2,)]


def test_a_database_that_does_not_answer_costs_one_short_attempt(
        clean_servers: Servers, vigilance_database: Settings) -> None:
    """A listening socket that never answers: the connection gives up after its timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        hung = vigilance_database.model_copy(update={
            "database_url": f"postgresql://triage:not-it@127.0.0.1:{port}/triage"})
        enqueue(clean_servers.redis, [record()])
        started = time.perf_counter()
        assert flush(clean_servers.redis, hung) == 0
        first = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(20):  # every worker between its studies
            assert flush(clean_servers.redis, hung) == 0
        rest = time.perf_counter() - started
    print(f"silent PostgreSQL: first flush {first:.2f} s, 20 more {1000 * rest:.1f} ms")
    assert first < recording.CONNECT_TIMEOUT_SECONDS + 1.5
    assert rest < 0.5
    assert clean_servers.redis.llen(OUTBOX) == 1


def test_only_the_lock_holder_flushes(clean_servers: Servers, vigilance_database: Settings,
                                      vigilance_db: psycopg.Connection) -> None:
    connection = clean_servers.redis
    enqueue(connection, [record()])
    connection.set(recording.LOCK, "another-worker", px=30_000)
    assert flush(connection, vigilance_database) == 0
    assert connection.llen(OUTBOX) == 1
    connection.delete(recording.LOCK)
    assert flush(connection, vigilance_database) == 1
    assert connection.get(recording.LOCK) is None


def test_records_left_waiting_are_flushed_by_a_job_the_leading_watcher_queues(
        clean_servers: Servers, vigilance_database: Settings, vigilance_db: psycopg.Connection,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A record appended while another worker held the lock, with no study after it: the
    watcher's periodic chores queue one flush job, which a worker runs."""
    connection = clean_servers.redis
    assert vigilance_database.database_url is not None
    monkeypatch.setenv("TRIAGE_DATABASE_URL", vigilance_database.database_url)
    jobs.context.cache_clear()
    watcher = Watcher(clean_servers.settings, clean_servers.orthanc, connection)
    vigilance = Queue(VIGILANCE_QUEUE, connection=connection)
    watcher.maintain(datetime.now(UTC))
    assert vigilance.count == 0, "nothing waits: nothing queued"

    enqueue(connection, [record(), record(study_uid="1.2.3.6")])
    connection.set(recording.LOCK, "another-worker", px=30_000)
    assert flush(connection, vigilance_database) == 0  # the worker after the study
    watcher.maintain(datetime.now(UTC))
    assert vigilance.count == 0, "a flusher holds the lock: it may still take them"
    connection.delete(recording.LOCK)  # it ended before the records were appended
    connection.set(RETRY_AFTER, "1", px=30_000)
    watcher.maintain(datetime.now(UTC))
    assert vigilance.count == 0, "PostgreSQL is backed off: nothing queued until it ends"
    connection.delete(RETRY_AFTER)
    watcher.maintain(datetime.now(UTC))
    watcher.maintain(datetime.now(UTC))
    assert vigilance.job_ids == [recording.FLUSH_JOB_ID], "one job, however often asked"

    run_worker(burst=True)
    jobs.context.cache_clear()
    assert connection.llen(OUTBOX) == 0
    assert rows(vigilance_db, "SELECT study_uid FROM analyses ORDER BY study_uid") == [
        ("1.2.3.6",), (STUDY,)]
    # The job leaves nothing behind: the next records get a job again.
    enqueue(connection, [record(study_uid="1.2.3.7")])
    assert recording.schedule_flush(connection) == recording.FLUSH_JOB_ID


# -- the worker ------------------------------------------------------------------------------

def test_an_analysed_study_ends_in_postgresql(
        clean_servers: Servers, vigilance_database: Settings, vigilance_db: psycopg.Connection,
        monkeypatch: pytest.MonkeyPatch) -> None:
    servers = clean_servers
    assert vigilance_database.database_url is not None
    monkeypatch.setenv("TRIAGE_DATABASE_URL", vigilance_database.database_url)
    jobs.context.cache_clear()
    sample = next(s for s in SAMPLES if s.key == "head-ct-hyperdense")
    datasets = list(build_sample(sample))
    assert set(pynetdicom_send(servers.settings, datasets)) == {0}
    watcher = Watcher(servers.settings, servers.orthanc, servers.redis)
    worklist = Worklist(servers.redis)
    servers.wait_until(lambda: watcher.poll_once() >= 0 and worklist.page()[1] >= 1,
                       timeout=30, what="the study on the worklist")
    run_worker(burst=True)
    jobs.context.cache_clear()

    [item] = worklist.page()[0]
    assert item.status is StudyStatus.ANALYSED
    assert servers.redis.llen(OUTBOX) == 0, "the worker flushes after the study"
    [(study_uid, model_id, role, sr_uid, modality, slice_thickness)] = rows(
        vigilance_db, "SELECT study_uid, model_id, role, sr_sop_instance_uid, modality, "
        "slice_thickness_mm FROM analyses")
    assert (study_uid, sr_uid, role, modality) == (
        item.study_instance_uid, item.sr_sop_instance_uid, "active", "CT")
    assert model_id == item.results[0].model
    assert slice_thickness == pytest.approx(float(datasets[0].SliceThickness))
    outputs = rows(vigilance_db, "SELECT code, score, flagged FROM analysis_outputs")
    assert [(f"{f.scheme}:{f.code}", f.positive) for f in item.findings] == [
        (code, flagged) for code, _, flagged in outputs]
    assert rows(vigilance_db, "SELECT state FROM model_versions") == [("active",)]
