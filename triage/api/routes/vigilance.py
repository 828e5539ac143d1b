"""Admin endpoints of post-market surveillance: performance figures of a model version over a
period, overall and per subgroup, read from the vigilance records in PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, TypeVar

import psycopg
from fastapi import APIRouter, HTTPException, Query, Request, status
from psycopg.rows import TupleRow
from pydantic import BaseModel, ConfigDict, Field

from triage.api.deps import AdminDep, IntegrationDep, SettingsDep, audit
from triage.audit import AuditAction
from triage.errors import TransientError
from triage.settings import Settings
from triage.vigilance.db import connect
from triage.vigilance.figures import (
    DEFAULT_MIN_COUNT,
    active_version,
    day_start,
    figures,
    subgroups,
    version_exists,
)

router = APIRouter(prefix="/api/v1/admin/vigilance", tags=["vigilance"])
# Outcomes from a RIS or reporting system: the integration role.
outcomes_router = APIRouter(tags=["integration"])

# The period shown when none is asked for: the last 30 days, today included.
DEFAULT_PERIOD_DAYS = 30
UNAVAILABLE = "vigilance records unavailable: PostgreSQL unreachable"

T = TypeVar("T")


class ProportionOut(BaseModel):
    """``count`` out of ``total`` with its 95% Wilson interval (None when total is 0)."""

    model_config = ConfigDict(from_attributes=True)

    count: int
    total: int
    value: float | None
    low: float | None
    high: float | None


class DayOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    date: date
    analysed: int
    flagged: ProportionOut


class FiguresOut(BaseModel):
    """Figures of one output label of a version; the period includes start, excludes end."""

    model_config = ConfigDict(from_attributes=True)

    model_id: str
    version: str
    label: str
    code: str
    start: datetime
    end: datetime
    analysed: int
    flagged: ProportionOut
    daily: list[DayOut]
    coverage: ProportionOut
    report_coverage: ProportionOut
    ppv: ProportionOut
    specificity: ProportionOut
    agreement: ProportionOut
    sensitivity: ProportionOut | None
    npv: ProportionOut | None
    sensitivity_note: str | None


class SubgroupOut(BaseModel):
    """Figures of one output label in one subgroup; a suppressed cell carries no counts."""

    model_config = ConfigDict(from_attributes=True)

    dimension: str
    value: str
    label: str
    code: str
    suppressed: bool
    analysed: int | None
    flagged: ProportionOut | None
    coverage: ProportionOut | None
    ppv: ProportionOut | None
    specificity: ProportionOut | None


ModelQuery = Annotated[str, Query(min_length=1, description="the model's identifier")]
VersionQuery = Annotated[str | None, Query(
    min_length=1, description="the model version; the active version when absent")]
StartQuery = Annotated[date | None, Query(
    description="first UTC day of the period; 30 days before the end when absent")]
EndQuery = Annotated[date | None, Query(
    description="first UTC day after the period; tomorrow (today included) when absent")]
_RESPONSES: dict[int | str, dict[str, str]] = {
    404: {"description": "no such model version"},
    422: {"description": "the period ends before it starts"},
    503: {"description": "PostgreSQL unreachable"},
}


def period(start: date | None, end: date | None, today: date | None = None
           ) -> tuple[datetime, datetime]:
    """The instants ``[start, end)`` of a period of UTC days, with the defaults filled in."""
    last = end or (today or datetime.now(UTC).date()) + timedelta(days=1)
    first = start or last - timedelta(days=DEFAULT_PERIOD_DAYS)
    if last <= first:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            f"the period must end after it starts, got {first} to {last}")
    return day_start(first), day_start(last)


@contextmanager
def _records(settings: Settings) -> Iterator[psycopg.Connection[TupleRow]]:
    """A connection to the records; 503 when PostgreSQL cannot be reached."""
    try:
        connection = connect(settings)
    except TransientError as error:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, UNAVAILABLE) from error
    try:
        with connection:
            yield connection
    except psycopg.OperationalError as error:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, UNAVAILABLE) from error


def _read(settings: Settings, model: str, version: str | None,
          read: Callable[[psycopg.Connection[TupleRow], str], list[T]]) -> list[T]:
    with _records(settings) as connection:
        chosen = version or active_version(connection, model)
        if chosen is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND,
                                f"model {model} has no active version; name one")
        if not version_exists(connection, model, chosen):
            raise HTTPException(status.HTTP_404_NOT_FOUND,
                                f"no version {chosen} of model {model} in the records")
        return read(connection, chosen)


@router.get("/figures", response_model=list[FiguresOut], responses=_RESPONSES)
def get_figures(_admin: AdminDep, settings: SettingsDep, model: ModelQuery,
                version: VersionQuery = None, start: StartQuery = None, end: EndQuery = None,
                label: Annotated[str | None, Query(description="only this output label")]
                = None) -> list[FiguresOut]:
    """Performance figures of a model version as the active model, one entry per output label:
    flag rate (overall and per UTC day), ground-truth coverage, PPV, specificity and agreement
    with 95% Wilson intervals; sensitivity and NPV only when every study of the period has a
    report outcome."""
    first, last = period(start, end)
    found = _read(settings, model, version, lambda connection, chosen: figures(
        connection, model, chosen, first, last, label=label))
    return [FiguresOut.model_validate(entry) for entry in found]


@router.get("/subgroups", response_model=list[SubgroupOut], responses=_RESPONSES)
def get_subgroups(_admin: AdminDep, settings: SettingsDep, model: ModelQuery,
                  version: VersionQuery = None, start: StartQuery = None, end: EndQuery = None,
                  min_count: Annotated[int, Query(ge=1, description="cells with fewer studies "
                                                        "show no counts")] = DEFAULT_MIN_COUNT
                  ) -> list[SubgroupOut]:
    """Figures of a model version per subgroup (manufacturer, station, institution, age band,
    sex, slice-thickness band) and output label."""
    first, last = period(start, end)
    found = _read(settings, model, version, lambda connection, chosen: subgroups(
        connection, model, chosen, first, last, min_count=min_count))
    return [SubgroupOut.model_validate(cell) for cell in found]


class OutcomeIn(BaseModel):
    """One outcome of a final report: the study by accession number and Patient ID together
    (or by its Study Instance UID), the finding and whether it was present."""

    model_config = ConfigDict(extra="forbid")

    accession_number: str = Field(default="", max_length=16)
    patient_id: str = Field(default="", max_length=64)
    study_instance_uid: str = Field(default="", max_length=64)
    finding_code: str = Field(max_length=80, description='"scheme:value", e.g. "SCT:233604007"')
    present: bool
    source: str = Field(default="report", max_length=16,
                        description="report, pathology, follow-up or feedback")
    recorded_at: datetime | None = Field(
        default=None, description="When it was stated, with its UTC offset; now when absent")
    label: str = Field(default="", max_length=64)


class OutcomesIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    outcomes: list[OutcomeIn] = Field(min_length=1, max_length=1000)


class RejectedOut(BaseModel):
    index: int
    reason: str


class OutcomesOut(BaseModel):
    inserted: int
    duplicates: int
    rejected: list[RejectedOut]


@outcomes_router.post("/api/v1/integration/outcomes", response_model=OutcomesOut,
                      responses={503: {"description": "PostgreSQL or Orthanc unreachable"}})
def import_outcomes(body: OutcomesIn, request: Request, user: IntegrationDep,
                    settings: SettingsDep) -> OutcomesOut:
    """Record outcomes from final reports as ground truth, as `triage outcomes import` does
    for a file: each outcome is recorded or refused on its own (refused ones by their index,
    with a reason free of patient data), and sending the same outcomes again records nothing
    new."""
    from triage.vigilance.records import import_outcome_rows, orthanc_resolver

    rows = [(index, {
        "accession_number": o.accession_number.strip(), "patient_id": o.patient_id.strip(),
        "study_instance_uid": o.study_instance_uid.strip(), "finding_code": o.finding_code,
        "present": "yes" if o.present else "no", "source": o.source,
        "recorded_at": o.recorded_at.isoformat() if o.recorded_at else "",
        "label": o.label.strip()}) for index, o in enumerate(body.outcomes)]
    with _records(settings) as connection:
        try:
            report = import_outcome_rows(connection, rows, orthanc_resolver(settings),
                                         observer=f"integration:{user.owner}")
        except TransientError as error:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                                "Orthanc unreachable: no outcome recorded") from error
    audit(request, user, AuditAction.OUTCOMES_IMPORTED,
          details={"inserted": report.inserted, "duplicates": report.duplicates,
                   "rejected": len(report.rejected), "via": "integration"})
    return OutcomesOut(inserted=report.inserted, duplicates=report.duplicates,
                       rejected=[RejectedOut(index=i, reason=r) for i, r in report.rejected])
