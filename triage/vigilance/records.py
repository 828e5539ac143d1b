"""The records of the vigilance: which version of each model is in which state, and what
turned out to be true in the studies (the ground truth performance is judged against).

A model version is ``active`` (it decides priorities; at most one per model), ``shadow`` (it
runs on the same studies, its results kept for comparison but never shown) or ``retired``.
Every change of state is kept with who made it and when.

Ground truth comes from radiologists' feedback, signed reports, pathology and follow-up. An
outcome is stated once: importing the same file again adds nothing. Outcomes exported from
the RIS name a study by accession number and patient ID; both must match one study in Orthanc
for the outcome to be attached to it, so a reused accession number never attaches an outcome
to another patient's study. Nothing here stores or reports a patient ID or accession number.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

import psycopg
from psycopg.rows import TupleRow

from triage.errors import TriageError
from triage.orthanc import OrthancClient
from triage.settings import Settings
from triage.vigilance import trail

Connection = psycopg.Connection[TupleRow]
Resolver = Callable[[str, str], list[str]]

STATES = ("shadow", "active", "retired")
SOURCES = ("feedback", "report", "pathology", "follow-up")

# The rules of the schema's domains and checks, applied before writing so that a bad value
# is refused with a reason rather than a database error.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_CODE = re.compile(r"[A-Za-z0-9_.-]+:.+", re.DOTALL)
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Characters a DICOM query reads as wildcards or as a list of values.
_QUERY_SPECIAL = set("*?\\")
# Key class of the advisory locks that serialise the changes of one model's versions.
_MODEL_LOCK_CLASS = 0x74726961  # "tria"


class RecordError(TriageError):
    """A vigilance record cannot be written as asked (unknown version, conflicting
    registration, invalid value); nothing was changed."""


# -- model versions ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelVersion:
    """A version of a model and the state it is in now."""

    model_id: str
    version: str
    sha256: str
    state: str
    changed_at: datetime
    changed_by: str


@dataclass(frozen=True)
class StateChange:
    """One entry of a model's history: a version entering a state."""

    model_id: str
    version: str
    state: str
    changed_at: datetime
    changed_by: str


@dataclass(frozen=True)
class Transition:
    """A change of state made by ``set_state`` or ``promote``."""

    model_id: str
    version: str
    old_state: str
    new_state: str


def _lock_model(conn: Connection, model_id: str) -> None:
    """Serialise the changes of ``model_id``'s versions until the transaction ends."""
    conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
                 (_MODEL_LOCK_CLASS, model_id))


def _check_actor(actor: str) -> None:
    if not actor.strip():
        raise RecordError("a change of state needs the name of who made it")


def register_version(conn: Connection, model_id: str, version: str, sha256: str,
                     actor: str) -> str:
    """Record that ``version`` of ``model_id`` exists, with the SHA-256 of its weights; return
    its state.

    The first version registered for a model becomes ``active``, any later one ``shadow``
    (a committee promotes it when its results are judged). A version already registered is
    left in its state. Raises ``RecordError`` when the version was registered with other
    weights (a different SHA-256): a version names one set of weights for its whole life.
    """
    _check_actor(actor)
    if not model_id or not version:
        raise RecordError("a model version needs a model id and a version")
    if not _SHA256.fullmatch(sha256):
        raise RecordError("the SHA-256 must be 64 lowercase hexadecimal digits")
    with conn.transaction():
        _lock_model(conn, model_id)
        row = conn.execute("SELECT sha256, state FROM model_versions "
                           "WHERE model_id = %s AND version = %s",
                           (model_id, version)).fetchone()
        if row is not None:
            if row[0] != sha256:
                raise RecordError(f"{model_id} {version} is registered with SHA-256 "
                                  f"{row[0]}, not {sha256}")
            state = str(row[1])
        else:
            known = conn.execute("SELECT 1 FROM model_versions WHERE model_id = %s LIMIT 1",
                                 (model_id,)).fetchone()
            state = "shadow" if known else "active"
            conn.execute("INSERT INTO model_versions (model_id, version, sha256, state, "
                         "changed_by) VALUES (%s, %s, %s, %s, %s)",
                         (model_id, version, sha256, state, actor))
            trail.record(conn, actor=actor, action="model.registered", model_id=model_id,
                         version=version, details={"state": state, "sha256": sha256})
    conn.commit()
    return state


def _current_states(conn: Connection, model_id: str) -> dict[str, str]:
    rows = conn.execute("SELECT version, state FROM model_versions WHERE model_id = %s",
                        (model_id,)).fetchall()
    return {str(version): str(state) for version, state in rows}


def _change(conn: Connection, model_id: str, version: str, state: str, actor: str,
            old: str, action: str) -> None:
    conn.execute("UPDATE model_versions SET state = %s, changed_at = now(), changed_by = %s "
                 "WHERE model_id = %s AND version = %s", (state, actor, model_id, version))
    trail.record(conn, actor=actor, action=action, model_id=model_id, version=version,
                 details={"from": old, "to": state})


def set_state(conn: Connection, model_id: str, version: str, state: str,
              actor: str) -> list[Transition]:
    """Put ``version`` of ``model_id`` in ``state``; return the changes made (none when it
    was already in that state).

    Making a version ``active`` is a promotion (see ``promote``). Making the active version
    ``shadow`` or ``retired`` leaves the model with no active version: its studies are then
    no longer prioritised by it. Raises ``RecordError`` for an unknown version or state.
    """
    if state not in STATES:
        raise RecordError(f"unknown state {state!r}; one of {', '.join(STATES)}")
    if state == "active":
        return promote(conn, model_id, version, actor)
    _check_actor(actor)
    with conn.transaction():
        _lock_model(conn, model_id)
        states = _current_states(conn, model_id)
        if version not in states:
            raise RecordError(f"{model_id} has no registered version {version}")
        old = states[version]
        if old != state:
            _change(conn, model_id, version, state, actor, old, "model.state_changed")
    conn.commit()
    return [Transition(model_id, version, old, state)] if old != state else []


def promote(conn: Connection, model_id: str, version: str, actor: str) -> list[Transition]:
    """Make ``version`` the active version of ``model_id``; return the changes made.

    The version active until then becomes ``shadow``, not ``retired``: it keeps running on
    the same studies, so its results stay comparable with the new version's, and rolling
    back is promoting it again. Both changes are made in one transaction, so the model never
    has two active versions nor, in between, none. Raises ``RecordError`` for an unknown
    version; promoting the active version changes nothing.
    """
    _check_actor(actor)
    transitions: list[Transition] = []
    with conn.transaction():
        _lock_model(conn, model_id)
        states = _current_states(conn, model_id)
        if version not in states:
            raise RecordError(f"{model_id} has no registered version {version}")
        if states[version] != "active":
            for other, state in sorted(states.items()):
                if state == "active":  # demoted first: one active version at a time
                    _change(conn, model_id, other, "shadow", actor, state, "model.demoted")
                    transitions.append(Transition(model_id, other, "active", "shadow"))
            _change(conn, model_id, version, "active", actor, states[version],
                    "model.promoted")
            transitions.append(Transition(model_id, version, states[version], "active"))
    conn.commit()
    return transitions


def versions(conn: Connection, model_id: str | None = None) -> list[ModelVersion]:
    """The registered versions (of ``model_id``, or of every model), by model and version."""
    rows = conn.execute(
        "SELECT model_id, version, sha256, state, changed_at, changed_by FROM model_versions "
        "WHERE %(model)s::text IS NULL OR model_id = %(model)s ORDER BY model_id, version",
        {"model": model_id}).fetchall()
    return [ModelVersion(*row) for row in rows]


def history(conn: Connection, model_id: str) -> list[StateChange]:
    """Every state the versions of ``model_id`` entered, oldest first (registration
    included)."""
    rows = conn.execute(
        "SELECT model_id, version, state, changed_at, changed_by FROM model_version_changes "
        "WHERE model_id = %s ORDER BY id", (model_id,)).fetchall()
    return [StateChange(*row) for row in rows]


# -- ground truth ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    """What an observer stated about one finding in one study.

    ``code`` is the finding as "scheme:value" (e.g. "SCT:233604007"); ``model_id`` is set when
    the statement assesses one model's result (radiologist feedback), with the SR that holds
    the assessment where there is one.
    """

    study_uid: str
    label: str
    code: str
    present: bool
    source: str
    observer: str
    recorded_at: datetime
    model_id: str | None = None
    sr_sop_instance_uid: str | None = None


def _is_uid(value: str) -> bool:
    return len(value) <= 64 and _UID.fullmatch(value) is not None


def _check_outcome(outcome: Outcome) -> None:
    problem = _outcome_problem(outcome)
    if problem is not None:
        raise RecordError(f"outcome refused: {problem}")


def _outcome_problem(outcome: Outcome) -> str | None:
    """Why the schema would refuse ``outcome``, in words free of patient data; None if it
    would not."""
    if not _is_uid(outcome.study_uid):
        return "the Study Instance UID is not a DICOM UID"
    if outcome.sr_sop_instance_uid is not None and not _is_uid(outcome.sr_sop_instance_uid):
        return "the SR's SOP Instance UID is not a DICOM UID"
    if not _CODE.fullmatch(outcome.code):
        return "bad finding code (expected scheme:value)"
    if not outcome.label:
        return "the label is empty"
    if outcome.source not in SOURCES:
        return f"source must be one of {', '.join(SOURCES)}"
    if not outcome.observer.strip():
        return "the observer is empty"
    if outcome.recorded_at.utcoffset() is None:
        return "recorded_at has no UTC offset"
    return None


_INSERT_OUTCOME = """
INSERT INTO ground_truth (study_uid, model_id, label, code, present, source, observer,
                          recorded_at, sr_sop_instance_uid)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT DO NOTHING
"""


def _insert(conn: Connection, outcome: Outcome) -> bool:
    """Insert ``outcome``; False when the same statement was already recorded."""
    cursor = conn.execute(_INSERT_OUTCOME, (
        outcome.study_uid, outcome.model_id, outcome.label, outcome.code, outcome.present,
        outcome.source, outcome.observer, outcome.recorded_at, outcome.sr_sop_instance_uid))
    return cursor.rowcount == 1


def record_ground_truth(conn: Connection, outcomes: Iterable[Outcome]) -> int:
    """Record ``outcomes`` in one transaction; return how many were new.

    An outcome already recorded (same study, model, finding, source, observer and time) is
    left as it is, so recording the same outcomes again changes nothing. Raises
    ``RecordError``, recording none of them, when one is invalid.
    """
    batch = list(outcomes)
    for outcome in batch:
        _check_outcome(outcome)
    with conn.transaction():
        inserted = sum(_insert(conn, outcome) for outcome in batch)
    conn.commit()
    return inserted


@dataclass
class ImportReport:
    """What an import of outcomes did: rows inserted, rows already recorded, and rows refused
    with their line number in the file and the reason (free of patient data)."""

    inserted: int = 0
    duplicates: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.inserted} inserted, {self.duplicates} already recorded, "
                f"{len(self.rejected)} rejected")


CSV_COLUMNS = ("accession_number", "patient_id", "finding_code", "present")
CSV_OPTIONAL_COLUMNS = ("source", "recorded_at", "label", "study_instance_uid")
_YES = {"yes", "true", "1", "y"}
_NO = {"no", "false", "0", "n"}


class _Rejected(Exception):
    """A row of an import is refused, for the reason given (free of patient data)."""


def _parse_present(value: str) -> bool:
    lowered = value.lower()
    if lowered in _YES:
        return True
    if lowered in _NO:
        return False
    raise _Rejected("present must be yes or no")


def _parse_time(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise _Rejected("recorded_at must be an ISO 8601 date and time") from None
    if moment.utcoffset() is None:
        raise _Rejected("recorded_at must give its UTC offset (e.g. 2026-03-01T10:00:00Z)")
    return moment


def _study_of(row: dict[str, str], resolve: Resolver) -> str:
    explicit = row.get("study_instance_uid", "")
    if explicit:
        if not _is_uid(explicit):
            raise _Rejected("study_instance_uid is not a DICOM UID")
        return explicit
    accession, patient_id = row.get("accession_number", ""), row.get("patient_id", "")
    if not accession or not patient_id:
        raise _Rejected("accession_number and patient_id are both required "
                        "(or a study_instance_uid)")
    if _QUERY_SPECIAL & set(accession + patient_id):
        raise _Rejected("accession_number and patient_id must not contain * ? or \\")
    found = sorted(set(resolve(accession, patient_id)))
    if not found:
        raise _Rejected("no study with this accession number and patient ID")
    if len(found) > 1:
        raise _Rejected(f"{len(found)} studies match this accession number and patient ID")
    return found[0]


def _rows(stream: TextIO) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, cleaned values) of each data row; header names are matched without
    regard to case or surrounding spaces."""
    reader = csv.reader(stream)
    header = next(reader, None)
    if header is None:
        raise RecordError("the file is empty; it needs a header row with the columns "
                          + ", ".join(CSV_COLUMNS))
    names = [name.strip().lstrip("\ufeff").strip().lower() for name in header]
    missing = [name for name in CSV_COLUMNS if name not in names]
    if missing:
        raise RecordError("the header row lacks the columns " + ", ".join(missing))
    for values in reader:
        if not any(value.strip() for value in values):
            continue  # blank line
        row = {name: value.strip() for name, value in zip(names, values, strict=False)}
        yield reader.line_num, row


def _already_stated(conn: Connection, outcome: Outcome) -> bool:
    """Whether the latest statement of the same observer and source about this finding in
    this study says the same (for rows that give no time of their own)."""
    row = conn.execute(
        "SELECT present FROM ground_truth WHERE study_uid = %s AND model_id IS NULL "
        "AND code = %s AND source = %s AND observer = %s "
        "ORDER BY recorded_at DESC, id DESC LIMIT 1",
        (outcome.study_uid, outcome.code, outcome.source, outcome.observer)).fetchone()
    return row is not None and bool(row[0]) == outcome.present


def import_outcomes_csv(conn: Connection, stream: TextIO, resolve: Resolver, *,
                        default_source: str = "report", observer: str) -> ImportReport:
    """Import outcomes from a CSV file (comma-separated, with a header row).

    Columns (in any order; others are ignored):

    - ``accession_number``, ``patient_id``: the study, found with ``resolve(accession,
      patient_id)``, which returns the Study Instance UIDs matching both; the row is
      refused unless exactly one study matches.
    - ``finding_code``: the finding as "scheme:value" (e.g. "SCT:233604007").
    - ``present``: yes/no, true/false or 1/0 (any case).
    - ``source`` (optional): feedback, report, pathology or follow-up; ``default_source``
      when absent or empty.
    - ``recorded_at`` (optional): when the observer stated it, ISO 8601 with a UTC offset;
      the time of the import when absent or empty.
    - ``label`` (optional): the finding's name; the code's value when absent or empty.
    - ``study_instance_uid`` (optional): the study itself, used instead of looking it up.

    ``observer`` names who stated the outcomes (a person or the exporting system). Each row
    is imported or refused on its own; the refused rows are reported with their line number
    and a reason that never repeats the accession number or patient ID. Importing the same
    file again inserts nothing: a row with a ``recorded_at`` is the same statement again,
    and a row without one is taken as already recorded when the latest statement of the same
    observer and source about that finding in that study says the same. Raises
    ``RecordError`` when the header row lacks a required column, and lets an error of
    ``resolve`` (the image server unreachable) end the import with nothing recorded.
    """
    return import_outcome_rows(conn, _rows(stream), resolve, default_source=default_source,
                               observer=observer)


def import_outcome_rows(conn: Connection, rows: Iterable[tuple[int, dict[str, str]]],
                        resolve: Resolver, *, default_source: str = "report",
                        observer: str) -> ImportReport:
    """Import outcomes given as (position, values by column name) with the columns and rules
    of ``import_outcomes_csv``; the position (a line number, or an index in a request) names
    a refused row in the report."""
    if default_source not in SOURCES:
        raise RecordError(f"source must be one of {', '.join(SOURCES)}")
    if not observer.strip():
        raise RecordError("an import needs the name of the observer")
    report = ImportReport()
    imported_at = datetime.now(UTC)
    with conn.transaction():
        for line, row in rows:
            try:
                outcome, timed = _outcome_of(row, resolve, default_source=default_source,
                                             observer=observer, imported_at=imported_at)
            except _Rejected as reason:
                report.rejected.append((line, str(reason)))
                continue
            if not timed and _already_stated(conn, outcome):
                report.duplicates += 1
            elif _insert(conn, outcome):
                report.inserted += 1
            else:
                report.duplicates += 1
        trail.record(conn, actor=observer, action="outcomes.imported",
                     details={"source": default_source, "inserted": report.inserted,
                              "duplicates": report.duplicates,
                              "rejected": len(report.rejected)})
    conn.commit()
    return report


def _outcome_of(row: dict[str, str], resolve: Resolver, *, default_source: str,
                observer: str, imported_at: datetime) -> tuple[Outcome, bool]:
    """The outcome a row states, and whether the row gave its time; ``_Rejected`` if the
    row is refused."""
    code = row.get("finding_code", "")
    if not _CODE.fullmatch(code):
        raise _Rejected("bad finding code (expected scheme:value, e.g. SCT:233604007)")
    present = _parse_present(row.get("present", ""))
    source = row.get("source") or default_source
    if source not in SOURCES:
        raise _Rejected(f"source must be one of {', '.join(SOURCES)}")
    given_time = row.get("recorded_at", "")
    recorded_at = _parse_time(given_time) if given_time else imported_at
    label = row.get("label") or code.split(":", 1)[1]
    outcome = Outcome(study_uid=_study_of(row, resolve), label=label, code=code,
                      present=present, source=source, observer=observer,
                      recorded_at=recorded_at)
    problem = _outcome_problem(outcome)
    if problem is not None:
        raise _Rejected(problem)
    return outcome, bool(given_time)


# -- finding studies in Orthanc ------------------------------------------------------------

def orthanc_resolver(source: OrthancClient | Settings) -> Resolver:
    """A ``resolve(accession_number, patient_id)`` for ``import_outcomes_csv`` that asks
    Orthanc for the studies whose Accession Number and Patient ID are both exactly the given
    ones (never by accession number alone: the same number may belong to another patient's
    study, at another site or after a reuse).

    Empty values and values with a DICOM wildcard or list separator (``*``, ``?``, ``\\``)
    are refused with ``RecordError``. Errors of Orthanc are raised as ``TransientError`` or
    ``PermanentError``.
    """
    client = source if isinstance(source, OrthancClient) else OrthancClient.from_settings(source)

    def resolve(accession_number: str, patient_id: str) -> list[str]:
        for value in (accession_number, patient_id):
            if not value or _QUERY_SPECIAL & set(value):
                raise RecordError("a study is looked up by a non-empty accession number and "
                                  "patient ID without * ? or \\")
        found: Any = client._call(
            "POST /tools/find", client._api.post_tools_find,
            json={"Level": "Study", "Expand": True,
                  "Query": {"AccessionNumber": accession_number, "PatientID": patient_id}})
        uids = set()
        for study in found:
            tags = study.get("MainDicomTags", {})
            patient = study.get("PatientMainDicomTags", {})
            # Orthanc's matching is checked again: only exact equality attaches an outcome.
            if (tags.get("AccessionNumber") == accession_number
                    and patient.get("PatientID") == patient_id
                    and tags.get("StudyInstanceUID")):
                uids.add(str(tags["StudyInstanceUID"]))
        return sorted(uids)

    return resolve
