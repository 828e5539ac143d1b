"""Every analysis recorded in PostgreSQL, without ever slowing or failing the analysis.

The worker puts the result on the worklist first; only then does it describe the analysis as
an ``AnalysisRecord`` (the model version, the study's acquisition attributes, an age band and
sex, and each output's score, threshold and flag; never a patient name, ID, birth date or
accession number) and append it to an outbox in Redis, in one round trip. ``flush`` moves the
outbox to PostgreSQL later, between studies:

- one flusher at a time, under a short Redis lock;
- a batch is written in one transaction: the model version registered when it is new (the
  first version of a model is ``active``, later ones ``shadow``), the analysis upserted on
  (study, model, version), so that a re-analysis replaces the row and its outputs;
- records leave the outbox only once PostgreSQL committed them;
- when PostgreSQL is down or failing, the outbox stays as it is and no process tries again
  for ``RETRY_SECONDS``: a down database costs at most one short connection attempt per
  period across all workers;
- a record PostgreSQL refuses as invalid is moved to the ``REJECTED`` list for
  administrators, so it never blocks the records behind it.

Values from modalities can be anything: every attribute is parsed defensively and cut to what
the schema accepts, so that a record is refused only when it cannot be stored at all.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import psycopg
import redis
from psycopg.rows import TupleRow
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError
from rq import Queue
from rq.exceptions import DuplicateJobError

from triage.findings import ModelResult
from triage.ingest import StudySnapshot
from triage.lease import release_if_held
from triage.queues import VIGILANCE_QUEUE
from triage.selection import patient_age_years
from triage.settings import Settings
from triage.vigilance import db
from triage.vigilance.records import RecordError, register_version

log = logging.getLogger(__name__)

OUTBOX = "triage:vigilance:outbox"
REJECTED = "triage:vigilance:outbox:rejected"
RETRY_AFTER = "triage:vigilance:outbox:retry_after"
LOCK = "triage:vigilance:outbox:lock"
# Studies as they arrive (``ArrivalRecord``), for the volume watch; flushed with the analyses.
ARRIVALS = "triage:vigilance:outbox:arrivals"

RETRY_SECONDS = 30
LOCK_SECONDS = 30
CONNECT_TIMEOUT_SECONDS = 2
STATEMENT_TIMEOUT_MS = 5000
# A flush stops starting new batches after this long, well within the lock's lifetime.
FLUSH_BUDGET_SECONDS = 10.0
FLUSH_FAILURE_TTL = 300
ACTOR = "triage-worker"
TEXT_LIMIT = 64
# Larger values of these attributes are errors of the sending modality, not acquisitions.
_LIMITS = {"SliceThickness": 1000.0, "KVP": 1000.0, "PixelSpacing": 1000.0}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_MAX_AGE_YEARS = 130

Connection = psycopg.Connection[TupleRow]


class AnalysisOutput(BaseModel):
    """One output label of an analysis: its score, its threshold and whether it flagged."""

    model_config = ConfigDict(frozen=True)

    label: str
    code: str  # "scheme:value"
    score: float
    threshold: float
    flagged: bool


class AnalysisRecord(BaseModel):
    """What one model version concluded on one study, with the attributes that define the
    subgroups and input drift of the surveillance; free of patient identifiers."""

    model_config = ConfigDict(frozen=True)

    study_uid: str
    model_id: str
    version: str
    sha256: str
    role: Literal["active", "shadow"] = "active"
    analysed_at: datetime
    sr_sop_instance_uid: str | None = None
    modality: str | None = None
    manufacturer: str | None = None
    manufacturer_model_name: str | None = None
    station_name: str | None = None
    calling_aet: str | None = None
    institution: str | None = None
    age_band: str | None = None
    sex: Literal["M", "F", "O"] | None = None
    slice_thickness_mm: float | None = None
    kvp: float | None = None
    pixel_spacing_row_mm: float | None = None
    pixel_spacing_column_mm: float | None = None
    reconstruction_kernel: str | None = None
    outputs: list[AnalysisOutput] = []


class ArrivalRecord(BaseModel):
    """A study that reached the service, whether or not a model analyses it: its modality
    and when (the vigilance clock); the volume watch counts them per hour."""

    model_config = ConfigDict(frozen=True)

    study_uid: str = Field(pattern=r"^[0-9]+(\.[0-9]+)*$", max_length=64)
    modality: str = Field(min_length=1, max_length=16)
    received_at: AwareDatetime


# -- building records ------------------------------------------------------------------------

def _get(attributes: Mapping[str, Any] | Any, keyword: str) -> Any:
    """The value of ``keyword`` in a pydicom dataset or Orthanc's simplified tags; None when
    absent or unreadable."""
    try:
        return attributes.get(keyword)
    except Exception:  # a malformed element pydicom cannot convert
        return None


def _values(value: Any) -> list[str]:
    """The values of a (possibly multi-valued) attribute as strings."""
    if value is None:
        return []
    if isinstance(value, bytes):
        value = value.decode("latin-1", "replace")
    if isinstance(value, str):
        return value.split("\\")
    try:
        return [str(v) for v in value]
    except TypeError:
        return [str(value)]


def clean_text(value: Any, limit: int = TEXT_LIMIT) -> str | None:
    """Free text made safe to store: control characters (NUL included) replaced by spaces,
    each value stripped, the non-empty ones joined by ``\\`` and cut to ``limit``; None when
    nothing is left."""
    try:
        values = (_CONTROL.sub(" ", v).strip() for v in _values(value))
        text = "\\".join(v for v in values if v)
    except Exception:
        return None
    return text[:limit].strip() or None


def positive_number(value: Any, limit: float = 1e6) -> float | None:
    """A finite number above 0 and below ``limit``, or None."""
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) and 0 < number < limit else None


def age_band(age: str, birth_date: str, study_date: str) -> str | None:
    """The decade of age ("40-49", "90+") from Patient's Age (``045Y``), else from the birth
    and study dates; None when neither gives a plausible age."""
    try:
        years = patient_age_years(age.strip().upper(), birth_date.strip(), study_date.strip())
    except Exception:
        return None
    if years is None or not math.isfinite(years) or not 0 <= years <= _MAX_AGE_YEARS:
        return None
    if years >= 90:
        return "90+"
    decade = int(years // 10) * 10
    return f"{decade}-{decade + 9}"


def _sex(value: str) -> Literal["M", "F", "O"] | None:
    cleaned = value.strip().upper()
    if cleaned == "M":
        return "M"
    if cleaned == "F":
        return "F"
    if cleaned == "O":
        return "O"
    return None


def _spacing(attributes: Mapping[str, Any] | Any) -> tuple[float | None, float | None]:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        values = _values(_get(attributes, keyword))
        if len(values) == 2:
            return (positive_number(values[0], _LIMITS["PixelSpacing"]),
                    positive_number(values[1], _LIMITS["PixelSpacing"]))
    return None, None


def _text(value: str) -> str:
    return value if isinstance(value, str) else ""


def _outputs(result: ModelResult) -> list[AnalysisOutput]:
    outputs: dict[str, AnalysisOutput] = {}
    for finding in result.findings:
        label = clean_text(finding.concept.meaning) or finding.concept.value
        score, threshold = float(finding.probability), float(finding.threshold)
        outputs.setdefault(label, AnalysisOutput(
            label=label, code=f"{finding.concept.scheme}:{finding.concept.value}",
            score=score, threshold=threshold, flagged=score >= threshold))
    return list(outputs.values())


def build_records(snapshot: StudySnapshot, results: Iterable[ModelResult],
                  headers_by_series: Mapping[str, Sequence[Any]], sr_uid: str | None,
                  now: datetime, role: Literal["active", "shadow"] = "active"
                  ) -> list[AnalysisRecord]:
    """The records of an analysis: one per model result.

    Acquisition attributes come from the first header of the series the model analysed
    (``headers_by_series``: Series Instance UID to pydicom datasets), else from the study's
    first instance. Never raises on the values of the images: an unreadable attribute is
    left out.
    """
    analysed_at = now.astimezone(UTC) if now.utcoffset() is not None else now.replace(
        tzinfo=UTC)
    records = []
    for result in results:
        headers = headers_by_series.get(result.series_instance_uid) or ()
        attributes: Mapping[str, Any] | Any = (headers[0] if headers
                                               else snapshot.first_instance)
        # A worker's snapshot has no patient module (it skips the study's own resource):
        # where the snapshot is silent, the analysed images say who the patient is.
        band = age_band(
            _text(snapshot.patient_age) or _text(_get(attributes, "PatientAge")),
            _text(snapshot.patient_birth_date) or _text(_get(attributes, "PatientBirthDate")),
            _text(snapshot.study_date) or _text(_get(attributes, "StudyDate")))
        sex = _sex(_text(snapshot.patient_sex) or _text(_get(attributes, "PatientSex")))
        row, column = _spacing(attributes)
        records.append(AnalysisRecord(
            study_uid=snapshot.study_instance_uid,
            model_id=result.model.id, version=result.model.version,
            sha256=result.model.weights_sha256, role=role,
            analysed_at=analysed_at, sr_sop_instance_uid=sr_uid,
            modality=clean_text(_get(attributes, "Modality"), 16),
            manufacturer=clean_text(_get(attributes, "Manufacturer")),
            manufacturer_model_name=clean_text(_get(attributes, "ManufacturerModelName")),
            station_name=clean_text(_get(attributes, "StationName")),
            calling_aet=clean_text(snapshot.calling_aet, 16),
            institution=clean_text(_get(attributes, "InstitutionName")),
            age_band=band, sex=sex,
            slice_thickness_mm=positive_number(_get(attributes, "SliceThickness"),
                                               _LIMITS["SliceThickness"]),
            kvp=positive_number(_get(attributes, "KVP"), _LIMITS["KVP"]),
            pixel_spacing_row_mm=row, pixel_spacing_column_mm=column,
            reconstruction_kernel=clean_text(_get(attributes, "ConvolutionKernel")),
            outputs=_outputs(result),
        ))
    return records


# -- the outbox ------------------------------------------------------------------------------

def enqueue(connection: redis.Redis, records: Sequence[AnalysisRecord]) -> None:
    """Append ``records`` to the outbox, in one round trip."""
    if records:
        connection.rpush(OUTBOX, *(r.model_dump_json() for r in records))


def enqueue_arrival(connection: redis.Redis, study_uid: str, modality: str | None,
                    received_at: datetime) -> None:
    """Append the arrival of a study to its outbox (one round trip); ``received_at`` from
    ``triage.vigilance.clock.now``. A modality that cannot be read counts as "unknown"; a
    Study Instance UID that is not a DICOM UID is not recorded."""
    try:
        record = ArrivalRecord(study_uid=study_uid, modality=clean_text(modality, 16) or "unknown",
                               received_at=received_at)
    except ValidationError:
        log.warning("arrival not recorded: the Study Instance UID is not a DICOM UID")
        return
    connection.rpush(ARRIVALS, record.model_dump_json())


# Trim what was written and keep the refused records aside, only while holding the lock.
_TRIM = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('LTRIM', KEYS[2], tonumber(ARGV[2]), -1)
for i = 3, #ARGV do redis.call('RPUSH', KEYS[3], ARGV[i]) end
return 1
"""


def flush(connection: redis.Redis, settings: Settings, *, batch: int = 200) -> int:
    """Move the outbox to PostgreSQL; return how many records were written.

    Does nothing (returns 0) when the outbox is empty, while another process flushes, or
    within ``RETRY_SECONDS`` of a failure of PostgreSQL. Raises only errors of Redis.
    """
    pipe = connection.pipeline(transaction=False)
    pipe.exists(RETRY_AFTER)
    pipe.llen(OUTBOX)
    pipe.llen(ARRIVALS)
    backing_off, pending, arrivals = pipe.execute()
    if backing_off or not (pending or arrivals):
        return 0
    token = secrets.token_hex(16)
    if not connection.set(LOCK, token, nx=True, px=LOCK_SECONDS * 1000):
        return 0
    try:
        if connection.exists(RETRY_AFTER):  # a flusher failed since the first look
            return 0
        return _drain(connection, settings, token, batch)
    finally:
        release_if_held(connection, LOCK, token)


FLUSH_JOB = "triage.vigilance.recording.flush_job"
FLUSH_JOB_ID = "vigilance-flush"


def schedule_flush(connection: redis.Redis) -> str | None:
    """Queue one flush on the vigilance queue when records wait and nobody flushes them.

    Workers flush after each study, so records wait only when no study follows: the last
    study of a quiet night, a record appended while another worker held the lock, or the
    outbox kept through PostgreSQL's back-off. The leading watcher calls this with its
    periodic chores; it never touches PostgreSQL itself (a slow database must not delay the
    change log). Returns the job id when a job was queued.
    """
    pipe = connection.pipeline(transaction=False)
    pipe.exists(RETRY_AFTER)
    pipe.exists(LOCK)
    pipe.llen(OUTBOX)
    pipe.llen(ARRIVALS)
    backing_off, locked, pending, arrivals = pipe.execute()
    if backing_off or locked or not (pending or arrivals):
        return None
    try:
        Queue(VIGILANCE_QUEUE, connection=connection).enqueue(
            FLUSH_JOB, job_id=FLUSH_JOB_ID, unique=True, result_ttl=0,
            failure_ttl=FLUSH_FAILURE_TTL, job_timeout=LOCK_SECONDS + FLUSH_BUDGET_SECONDS,
            description="vigilance records to PostgreSQL")
    except DuplicateJobError:  # one is queued already
        return None
    return FLUSH_JOB_ID


def flush_job() -> int:
    """RQ job: move the outbox to PostgreSQL (see ``schedule_flush``)."""
    from triage.jobs import context

    ctx = context()
    return flush(ctx.redis, ctx.settings)


def _connect(settings: Settings) -> Connection:
    return db.connect(settings, timeout_seconds=CONNECT_TIMEOUT_SECONDS,
                      statement_timeout_ms=STATEMENT_TIMEOUT_MS)


def _back_off(connection: redis.Redis, error: Exception) -> None:
    """Remember the failure so that no process tries again for ``RETRY_SECONDS``."""
    connection.set(RETRY_AFTER, f"{time.time():.3f}", px=RETRY_SECONDS * 1000)
    state = getattr(error, "sqlstate", None)
    log.warning("vigilance records not written (%s%s); %d kept in the outbox, "
                "next attempt in %d s", type(error).__name__, f" {state}" if state else "",
                connection.llen(OUTBOX), RETRY_SECONDS)


def _drain(connection: redis.Redis, settings: Settings, token: str, batch: int) -> int:
    try:
        conn = _connect(settings)
    except Exception as error:  # unreachable, refused, or no credentials to connect with
        _back_off(connection, error)
        return 0
    written = 0
    deadline = time.monotonic() + FLUSH_BUDGET_SECONDS
    try:
        while time.monotonic() < deadline:
            raw: list[bytes] = list(connection.lrange(OUTBOX, 0, batch - 1))  # type: ignore[arg-type]
            if not raw:
                break
            try:
                rejected = _write(conn, raw)
            except Exception as error:  # PostgreSQL failing (not refusing one record)
                _back_off(connection, error)
                return written
            if rejected:
                log.warning("%d vigilance records refused by PostgreSQL, kept in %s",
                            len(rejected), REJECTED)
            if not connection.eval(_TRIM, 2 + 1, LOCK, OUTBOX, REJECTED, token, len(raw),
                                   *rejected):
                break  # the lock expired: the next flusher writes them again (upserts)
            written += len(raw) - len(rejected)
            if len(raw) < batch:
                break
        while time.monotonic() < deadline:
            raw = list(connection.lrange(ARRIVALS, 0, batch - 1))  # type: ignore[arg-type]
            if not raw:
                break
            try:
                rejected = _write_arrivals(conn, raw)
            except Exception as error:  # PostgreSQL failing
                _back_off(connection, error)
                break
            if not connection.eval(_TRIM, 2 + 1, LOCK, ARRIVALS, REJECTED, token, len(raw),
                                   *rejected):
                break
            written += len(raw) - len(rejected)
            if len(raw) < batch:
                break
    finally:
        conn.close()
    return written


def _write_arrivals(conn: Connection, raw: list[bytes]) -> list[bytes]:
    """Write a batch of arrivals (a study already recorded keeps its first arrival); return
    the entries refused as invalid."""
    from triage.vigilance.drift import record_arrival

    rejected: list[bytes] = []
    with conn.transaction():
        for item in raw:
            try:
                arrival = ArrivalRecord.model_validate_json(item)
                with conn.transaction():
                    record_arrival(conn, arrival.study_uid, arrival.modality,
                                   arrival.received_at)
            except (ValidationError, *_REFUSED):
                rejected.append(item)
    return rejected


_UPSERT_ANALYSIS = """
INSERT INTO analyses (study_uid, model_id, version, role, analysed_at, sr_sop_instance_uid,
                      modality, manufacturer, manufacturer_model_name, station_name,
                      calling_aet, institution, age_band, sex, slice_thickness_mm, kvp,
                      pixel_spacing_row_mm, pixel_spacing_column_mm, reconstruction_kernel)
VALUES (%(study_uid)s, %(model_id)s, %(version)s, %(role)s, %(analysed_at)s,
        %(sr_sop_instance_uid)s, %(modality)s, %(manufacturer)s, %(manufacturer_model_name)s,
        %(station_name)s, %(calling_aet)s, %(institution)s, %(age_band)s, %(sex)s,
        %(slice_thickness_mm)s, %(kvp)s, %(pixel_spacing_row_mm)s,
        %(pixel_spacing_column_mm)s, %(reconstruction_kernel)s)
ON CONFLICT (study_uid, model_id, version) DO UPDATE SET
    role = EXCLUDED.role, analysed_at = EXCLUDED.analysed_at,
    sr_sop_instance_uid = EXCLUDED.sr_sop_instance_uid, modality = EXCLUDED.modality,
    manufacturer = EXCLUDED.manufacturer,
    manufacturer_model_name = EXCLUDED.manufacturer_model_name,
    station_name = EXCLUDED.station_name, calling_aet = EXCLUDED.calling_aet,
    institution = EXCLUDED.institution, age_band = EXCLUDED.age_band, sex = EXCLUDED.sex,
    slice_thickness_mm = EXCLUDED.slice_thickness_mm, kvp = EXCLUDED.kvp,
    pixel_spacing_row_mm = EXCLUDED.pixel_spacing_row_mm,
    pixel_spacing_column_mm = EXCLUDED.pixel_spacing_column_mm,
    reconstruction_kernel = EXCLUDED.reconstruction_kernel
WHERE analyses.analysed_at <= EXCLUDED.analysed_at
RETURNING id
"""
_INSERT_OUTPUT = """
INSERT INTO analysis_outputs (analysis_id, label, code, score, threshold, flagged)
VALUES (%s, %s, %s, %s, %s, %s)
"""
_REFUSED = (psycopg.errors.IntegrityError, psycopg.errors.DataError)


def _write(conn: Connection, raw: list[bytes]) -> list[bytes]:
    """Write a batch of outbox entries; return those refused as invalid (unreadable, a
    version registered with other weights, a value the schema refuses)."""
    rejected: list[bytes] = []
    records: list[tuple[bytes, AnalysisRecord]] = []
    for item in raw:
        try:
            records.append((item, AnalysisRecord.model_validate_json(item)))
        except ValidationError:
            rejected.append(item)
    # register_version commits on its own; registering is idempotent, so a version
    # registered by a batch that fails later is simply found registered next time.
    usable: dict[tuple[str, str, str], bool] = {}
    for _, record in records:
        key = (record.model_id, record.version, record.sha256)
        if key not in usable:
            try:
                register_version(conn, record.model_id, record.version, record.sha256, ACTOR)
                usable[key] = True
            except (RecordError, *_REFUSED):
                conn.rollback()
                usable[key] = False
    with conn.transaction():
        for item, record in records:
            if not usable[(record.model_id, record.version, record.sha256)]:
                rejected.append(item)
                continue
            try:
                with conn.transaction():  # a savepoint: one refused record spares the others
                    _upsert(conn, record)
            except _REFUSED:
                rejected.append(item)
    return rejected


def _upsert(conn: Connection, record: AnalysisRecord) -> None:
    row = conn.execute(_UPSERT_ANALYSIS, record.model_dump(exclude={"sha256", "outputs"})
                       ).fetchone()
    if row is None:  # a later analysis of the same version is already recorded
        return
    conn.execute("DELETE FROM analysis_outputs WHERE analysis_id = %s", (row[0],))
    with conn.cursor() as cursor:
        cursor.executemany(_INSERT_OUTPUT, [
            (row[0], o.label, o.code, o.score, o.threshold, o.flagged)
            for o in record.outputs])
