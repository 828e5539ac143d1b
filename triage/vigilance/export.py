"""The pseudonymised evaluation dataset of a model: what each version concluded, with the ground
truth and the subgroup attributes, for validation and statistics outside the service.

One row per analysis and output label, for the studies a model's versions analysed (as the
active model or in shadow) over a period of UTC days. A study appears only as its pseudonym:
the HMAC-SHA256 of its Study Instance UID with the export key (``TRIAGE_VIGILANCE_EXPORT_KEY``),
the same in every export made with the same key, so that rows of one study can be joined across
exports and versions, while the UID cannot be recovered or guessed without the key. No name,
patient ID, accession number, birth date or DICOM UID is written; patients appear only by their
age band and sex, as the records keep them. The analysis time is cut to its UTC day: a time to
the second could be matched against the RIS or modality logs.

The ground truth of a study for a finding is its latest ground-truth row, read as the
performance figures read it (``figures.latest_truth``: rows for this model or for no model in
particular, the latest statement wins, a tie counts "present"), with the source of that row.
The feedback agreement says whether the latest radiologist feedback on the finding (the same
rule, feedback rows only) matches the row's flag; it is empty without feedback.

Small cells are suppressed: in each subgroup column, a value that fewer than ``min_count``
distinct studies of the exported rows share is replaced by ``suppressed (<min_count)``. Studies
are counted rather than rows, as one study has a row per label and per version: a rare scanner
seen in one study stays hidden however many rows that study has. Each column is judged on its
own; missing attributes read ``unknown`` and follow the same rule.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from enum import Enum
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
from psycopg.rows import TupleRow

from triage.errors import TriageError
from triage.vigilance import trail
from triage.vigilance.figures import (
    DEFAULT_MIN_COUNT,
    UNKNOWN,
    Truth,
    day_start,
    slice_thickness_band,
)

Connection = psycopg.Connection[TupleRow]
FEEDBACK_SOURCE = "feedback"
# Every subgroup column of the dataset, each suppressed on its own.
SUBGROUP_COLUMNS = ("manufacturer", "manufacturer_model", "station", "calling_ae",
                    "institution", "age_band", "sex", "slice_thickness_band", "kvp",
                    "reconstruction_kernel")
COLUMNS = ("study_pseudonym", "model_id", "version", "role", "analysed_date", "label", "code",
           "score", "threshold", "flagged", "truth_present", "truth_source", "feedback_agrees",
           *SUBGROUP_COLUMNS)
SCHEMA = pa.schema([
    ("study_pseudonym", pa.string()), ("model_id", pa.string()), ("version", pa.string()),
    ("role", pa.string()), ("analysed_date", pa.date32()), ("label", pa.string()),
    ("code", pa.string()), ("score", pa.float64()), ("threshold", pa.float64()),
    ("flagged", pa.bool_()), ("truth_present", pa.bool_()), ("truth_source", pa.string()),
    ("feedback_agrees", pa.bool_()),
    *((name, pa.string()) for name in SUBGROUP_COLUMNS),
])
_CSV_CHUNK_ROWS = 500


class ExportFormat(str, Enum):
    CSV = "csv"
    PARQUET = "parquet"

    @property
    def media_type(self) -> str:
        return "text/csv; charset=utf-8" if self is ExportFormat.CSV else (
            "application/vnd.apache.parquet")


class UnknownModelVersion(TriageError):
    """The records know no such model, or no such version of it."""


@dataclass(frozen=True)
class ExportQuery:
    """What to export: a model, one version or all, and the UTC days ``[start, end)`` (each
    end open when None)."""

    model_id: str
    version: str | None = None
    start: date | None = None
    end: date | None = None
    min_count: int = DEFAULT_MIN_COUNT

    def __post_init__(self) -> None:
        if "\x00" in self.model_id or "\x00" in (self.version or ""):
            raise ValueError("a model or version name cannot contain NUL characters")
        if self.min_count < 1:
            raise ValueError(f"the minimum count of a subgroup must be at least 1, "
                             f"got {self.min_count}")
        if self.start and self.end and self.end <= self.start:
            raise ValueError(f"the period must end after it starts, got {self.start} to "
                             f"{self.end}")

    def filename(self, export_format: ExportFormat) -> str:
        """A file name that says what the file holds (no identifier in it)."""
        parts = [self.model_id, self.version or "all-versions",
                 self.start.isoformat() if self.start else "", "to",
                 self.end.isoformat() if self.end else ""]
        name = "-".join(part for part in parts if part)
        return f"vigilance-{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}.{export_format.value}"

    def described(self) -> dict[str, Any]:
        """The query for audit records."""
        return {"model": self.model_id, "version": self.version,
                "start": self.start.isoformat() if self.start else None,
                "end": self.end.isoformat() if self.end else None,
                "min_count": self.min_count}


def pseudonym(key: bytes, study_uid: str) -> str:
    """The study's pseudonym: HMAC-SHA256 of its Study Instance UID, hexadecimal."""
    if not key:
        raise ValueError("the export key is empty")
    return hmac.new(key, study_uid.encode("ascii"), hashlib.sha256).hexdigest()


def suppressed_marker(min_count: int) -> str:
    return f"suppressed (<{min_count})"


_ANALYSES = """
SELECT a.study_uid, a.model_id, a.version, a.role, a.analysed_at, o.label, o.code, o.score,
       o.threshold, o.flagged, a.manufacturer, a.manufacturer_model_name, a.station_name,
       a.calling_aet, a.institution, a.age_band, a.sex, a.slice_thickness_mm, a.kvp,
       a.reconstruction_kernel
FROM analyses a JOIN analysis_outputs o ON o.analysis_id = a.id
WHERE a.model_id = %(model)s AND (%(version)s::text IS NULL OR a.version = %(version)s)
  AND (%(start)s::timestamptz IS NULL OR a.analysed_at >= %(start)s)
  AND (%(end)s::timestamptz IS NULL OR a.analysed_at < %(end)s)
"""

_TRUTH = """
SELECT g.study_uid, g.code, g.present, g.source, g.recorded_at
FROM ground_truth g
WHERE (g.model_id IS NULL OR g.model_id = %(model)s)
  AND g.study_uid IN (
      SELECT a.study_uid FROM analyses a
      WHERE a.model_id = %(model)s AND (%(version)s::text IS NULL OR a.version = %(version)s)
        AND (%(start)s::timestamptz IS NULL OR a.analysed_at >= %(start)s)
        AND (%(end)s::timestamptz IS NULL OR a.analysed_at < %(end)s))
"""


def check_known(conn: Connection, query: ExportQuery) -> None:
    """Raise ``UnknownModelVersion`` unless the records know the model (and the version)."""
    row = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE version = %s) FROM model_versions "
        "WHERE model_id = %s", (query.version, query.model_id)).fetchone()
    assert row is not None
    if row[0] == 0:
        raise UnknownModelVersion(f"no model {query.model_id} in the records")
    if query.version is not None and row[1] == 0:
        raise UnknownModelVersion(f"no version {query.version} of model {query.model_id} "
                                  "in the records")


def latest_truths(truths: Sequence[Truth]) -> dict[tuple[str, str], Truth]:
    """The row that decides each (study, code), by ``figures.latest_truth``'s rule: the latest
    statement, "present" on a tie (then the source named last alphabetically, so that the
    answer never depends on the order rows were read)."""
    chosen: dict[tuple[str, str], Truth] = {}
    for truth in truths:
        key = (truth.study_uid, truth.code)
        held = chosen.get(key)
        if held is None or (truth.recorded_at, truth.present, truth.source) > (
                held.recorded_at, held.present, held.source):
            chosen[key] = truth
    return chosen


def dataset(conn: Connection, key: bytes, query: ExportQuery) -> list[dict[str, Any]]:
    """The rows of the export, ordered by day, pseudonym, version, role and label (never by
    the time of day nor by UID). Raises ``UnknownModelVersion``."""
    check_known(conn, query)
    params = {"model": query.model_id, "version": query.version,
              "start": day_start(query.start) if query.start else None,
              "end": day_start(query.end) if query.end else None}
    truths = [Truth(study_uid=r[0], code=r[1], present=r[2], source=r[3], recorded_at=r[4])
              for r in conn.execute(_TRUTH, params)]
    truth = latest_truths(truths)
    feedback = latest_truths([t for t in truths if t.source == FEEDBACK_SOURCE])
    rows: list[dict[str, Any]] = []
    studies: list[str] = []
    for record in conn.execute(_ANALYSES, params):
        (study_uid, model_id, version, role, analysed_at, label, code, score, threshold,
         flagged, manufacturer, manufacturer_model, station, calling_ae, institution,
         age_band, sex, thickness, kvp, kernel) = record
        decided = truth.get((study_uid, code))
        said = feedback.get((study_uid, code))
        studies.append(study_uid)
        rows.append({
            "study_pseudonym": pseudonym(key, study_uid), "model_id": model_id,
            "version": version, "role": role,
            "analysed_date": analysed_at.astimezone(UTC).date(), "label": label, "code": code,
            "score": score, "threshold": threshold, "flagged": flagged,
            "truth_present": decided.present if decided else None,
            "truth_source": decided.source if decided else None,
            "feedback_agrees": (said.present == flagged) if said else None,
            "manufacturer": _known(manufacturer),
            "manufacturer_model": _known(manufacturer_model), "station": _known(station),
            "calling_ae": _known(calling_ae), "institution": _known(institution),
            "age_band": _known(age_band), "sex": _known(sex),
            "slice_thickness_band": slice_thickness_band(thickness),
            "kvp": f"{kvp:g}" if kvp is not None else UNKNOWN,
            "reconstruction_kernel": _known(kernel),
        })
    _suppress(rows, studies, query.min_count)
    rows.sort(key=lambda r: (r["analysed_date"], r["study_pseudonym"], r["version"], r["role"],
                             r["label"]))
    return rows


def _known(value: str | None) -> str:
    return (value or "").strip() or UNKNOWN


def _suppress(rows: list[dict[str, Any]], studies: Sequence[str], min_count: int) -> None:
    """Replace each subgroup value shared by fewer than ``min_count`` studies."""
    marker = suppressed_marker(min_count)
    for column in SUBGROUP_COLUMNS:
        holders: dict[str, set[str]] = defaultdict(set)
        for row, study in zip(rows, studies, strict=True):
            holders[row[column]].add(study)
        rare = {value for value, seen in holders.items() if len(seen) < min_count}
        for row in rows:
            if row[column] in rare:
                row[column] = marker


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def csv_chunks(rows: Sequence[dict[str, Any]]) -> Iterator[bytes]:
    """The CSV file (UTF-8, a header row, ``true``/``false``, empty for none) in pieces."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    for n, row in enumerate(rows, 1):
        writer.writerow([_csv_cell(row[column]) for column in COLUMNS])
        if n % _CSV_CHUNK_ROWS == 0:
            yield buffer.getvalue().encode()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue().encode()


def parquet_bytes(rows: Sequence[dict[str, Any]]) -> bytes:
    """The Parquet file (the types of ``SCHEMA``; none as null)."""
    table = pa.Table.from_pylist(list(rows), schema=SCHEMA)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def file_chunks(rows: Sequence[dict[str, Any]], export_format: ExportFormat
                ) -> Iterator[bytes]:
    """The file in ``export_format``, in pieces to stream."""
    if export_format is ExportFormat.CSV:
        yield from csv_chunks(rows)
    else:
        yield parquet_bytes(rows)


def record_export(conn: Connection, *, actor: str, query: ExportQuery,
                  export_format: ExportFormat, rows: int, at: datetime | None = None) -> None:
    """Write the export in the vigilance audit trail (in the caller's transaction)."""
    trail.record(conn, actor=actor, action="vigilance.exported", model_id=query.model_id,
                 version=query.version, at=at,
                 details={**query.described(), "format": export_format.value, "rows": rows})
