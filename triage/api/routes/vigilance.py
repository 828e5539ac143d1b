"""Admin endpoints of post-market surveillance: performance figures of a model version over a
period, overall and per subgroup, read from the vigilance records in PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, TypeVar

import psycopg
from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.responses import StreamingResponse
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


@router.get("/export", response_class=StreamingResponse, responses={
    200: {"description": "the dataset as a file (CSV or Parquet)",
          "content": {"text/csv": {}, "application/vnd.apache.parquet": {}}},
    404: {"description": "no such model or version"},
    422: {"description": "the period ends before it starts"},
    503: {"description": "PostgreSQL unreachable, or no export key configured"}})
def export_dataset(request: Request, user: AdminDep, settings: SettingsDep, model: ModelQuery,
                   version: Annotated[str | None, Query(
                       min_length=1, description="one version; every version when absent")]
                   = None,
                   start: Annotated[date | None, Query(
                       description="first UTC day; from the first record when absent")] = None,
                   end: Annotated[date | None, Query(
                       description="first UTC day after the period; up to now when absent")]
                   = None,
                   file_format: Annotated[str, Query(alias="format", pattern="^(csv|parquet)$",
                                                     description="csv or parquet")] = "csv",
                   min_count: Annotated[int, Query(
                       ge=DEFAULT_MIN_COUNT, description="subgroup values shared by fewer "
                       "studies are suppressed")] = DEFAULT_MIN_COUNT) -> StreamingResponse:
    """The pseudonymised evaluation dataset of a model (one row per analysis and output label:
    study pseudonym, version, role, day, score, threshold, flag, ground truth, feedback
    agreement, subgroup attributes with small cells suppressed), as a file to download.
    Audited, in the vigilance trail too."""
    from triage.vigilance import clock
    from triage.vigilance.export import (
        ExportFormat,
        ExportQuery,
        UnknownModelVersion,
        dataset,
        file_chunks,
        record_export,
    )

    export_format = ExportFormat(file_format)
    try:
        query = ExportQuery(model_id=model, version=version, start=start, end=end,
                            min_count=min_count)
    except ValueError as error:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(error)) from error
    try:
        key = settings.vigilance_export_secret
    except ValueError as error:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(error)) from error
    with _records(settings) as connection:
        try:
            rows = dataset(connection, key, query)
        except UnknownModelVersion as error:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(error)) from error
        record_export(connection, actor=user.owner, query=query, export_format=export_format,
                      rows=len(rows), at=clock.now(settings))
    audit(request, user, AuditAction.VIGILANCE_EXPORTED,
          details={**query.described(), "format": export_format.value, "rows": len(rows)})
    filename = query.filename(export_format)
    return StreamingResponse(file_chunks(rows, export_format), media_type=export_format.media_type,
                             headers={"Content-Disposition": f'attachment; filename="{filename}"'})


# -- Drift and volume alerts, baselines and the flag-rate chart ----------------------------

class AlertOut(BaseModel):
    """An alert of the surveillance; open while ``acknowledged_at`` is null."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    kind: str = Field(description="output-cusum, score-ks, input-drift, volume or "
                      "shadow-agreement")
    model_id: str | None = Field(description="none for the arrivals of a modality")
    version: str | None
    label: str | None = Field(description="the output label, or the modality of a volume "
                              "alert; none for input drift")
    summary: str
    detail: dict[str, object]
    raised_at: datetime
    acknowledged_at: datetime | None
    acknowledged_by: str | None
    note: str | None


class AlertsOut(BaseModel):
    alerts: list[AlertOut]


class AcknowledgeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    note: str = Field(default="", max_length=2000, description="what was found or done")


@router.get("/alerts", response_model=AlertsOut, responses={503: _RESPONSES[503]})
def get_alerts(_admin: AdminDep, settings: SettingsDep,
               open_only: Annotated[bool | None, Query(
                   alias="open", description="true: open alerts only; false: acknowledged "
                   "ones only; absent: both")] = None,
               model: Annotated[str | None, Query(min_length=1, description="one model")]
               = None) -> AlertsOut:
    """The alerts of the drift and volume checks, latest first (at most 500)."""
    from triage.vigilance.alerts import alerts

    with _records(settings) as connection:
        found = alerts(connection, open_only=open_only, model_id=model)
    return AlertsOut(alerts=[AlertOut.model_validate(alert) for alert in found])


@router.post("/alerts/{alert_id}/acknowledge", response_model=AlertOut, responses={
    404: {"description": "no such alert"}, 409: {"description": "already acknowledged"},
    503: _RESPONSES[503]})
def acknowledge_alert(alert_id: int, body: AcknowledgeIn, request: Request, user: AdminDep,
                      settings: SettingsDep) -> AlertOut:
    """Acknowledge an alert: who saw it, when, and a note; audited, in the vigilance trail
    too. The same subject alerts again only on records later than this alert's."""
    from triage.vigilance import clock
    from triage.vigilance.alerts import (
        AlertNotFound,
        AlreadyAcknowledged,
        acknowledge,
        publish_open,
    )

    with _records(settings) as connection:
        try:
            alert = acknowledge(connection, alert_id, user.owner, body.note,
                                now=clock.now(settings))
        except AlertNotFound as error:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(error)) from error
        except AlreadyAcknowledged as error:
            raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from error
        publish_open(connection, request.app.state.redis)
    audit(request, user, AuditAction.ALERT_ACKNOWLEDGED,
          details={"alert_id": alert.id, "kind": alert.kind, "model": alert.model_id,
                   "version": alert.version, "label": alert.label})
    return AlertOut.model_validate(alert)


class BaselineOut(BaseModel):
    """The expected daily flag rate of one output label, learnt over a period."""

    model_config = ConfigDict(from_attributes=True)

    label: str
    period_start: datetime
    period_end: datetime
    mean: float
    sigma: float
    studies: int
    days: int = Field(description="days of the period with studies")
    created_at: datetime
    created_by: str


class FlagRateDayOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    date: date
    analysed: int
    flagged: int
    rate: float
    cusum_high: float | None = Field(description="none before the baseline ends")
    cusum_low: float | None
    alarm: bool


class FlagRateOut(BaseModel):
    model_id: str
    version: str
    label: str
    baseline: BaselineOut | None
    k: float
    h: float
    days: list[FlagRateDayOut]


@router.get("/flag-rate", response_model=FlagRateOut, responses=_RESPONSES)
def get_flag_rate(_admin: AdminDep, settings: SettingsDep, model: ModelQuery,
                  version: VersionQuery = None,
                  label: Annotated[str | None, Query(
                      min_length=1, description="the output label; needed when the version "
                      "has several")] = None,
                  start: StartQuery = None, end: EndQuery = None) -> FlagRateOut:
    """The daily flag rate of one output label of a version (days with studies), with its
    baseline and the two-sided CUSUM the checks run from the end of the baseline."""
    from triage.vigilance import clock
    from triage.vigilance.drift import flag_rate_chart, labels

    first, last = period(start, end, clock.now(settings).date())

    def chart(connection: psycopg.Connection[TupleRow], chosen: str) -> list[FlagRateOut]:
        known = labels(connection, model, chosen)
        wanted = label or (known[0] if len(known) == 1 else None)
        if wanted is None or wanted not in known:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                f"name the label: one of {', '.join(known) or 'none recorded'}")
        found = flag_rate_chart(connection, settings, model, chosen, wanted, first, last)
        return [FlagRateOut(
            model_id=model, version=chosen, label=wanted,
            baseline=BaselineOut.model_validate(found.baseline) if found.baseline else None,
            k=found.k, h=found.h, days=[FlagRateDayOut.model_validate(d) for d in found.days])]

    return _read(settings, model, version, chart)[0]


class BaselineIn(BaseModel):
    """The period of UTC days ``[start, end)`` a version's flag rates are learnt over."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=128)
    version: str = Field(min_length=1, max_length=64)
    start: date
    end: date = Field(description="first UTC day after the period")


class BaselineSetOut(BaseModel):
    model_id: str
    version: str
    period_start: datetime
    period_end: datetime
    labels: list[BaselineOut]


@router.post("/baselines", response_model=BaselineSetOut, responses=_RESPONSES)
def post_baseline(body: BaselineIn, request: Request, user: AdminDep,
                  settings: SettingsDep) -> BaselineSetOut:
    """Set a version's baseline over a period (one per output label); the checks judge its
    later flag rates, scores and inputs against it. Refused (422) for a period with too few
    days or studies. Audited, in the vigilance trail too."""
    from triage.vigilance.drift import set_baseline
    from triage.vigilance.records import RecordError

    with _records(settings) as connection:
        if not version_exists(connection, body.model, body.version):
            raise HTTPException(status.HTTP_404_NOT_FOUND,
                                f"no version {body.version} of model {body.model} in the records")
        try:
            stored = set_baseline(connection, body.model, body.version, day_start(body.start),
                                  day_start(body.end), user.owner,
                                  min_days=settings.vigilance_baseline_min_days,
                                  min_studies=settings.vigilance_baseline_min_studies)
        except RecordError as error:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(error)) from error
    audit(request, user, AuditAction.BASELINE_SET,
          details={"model": body.model, "version": body.version,
                   "start": body.start.isoformat(), "end": body.end.isoformat(),
                   "labels": [b.label for b in stored]})
    return BaselineSetOut(model_id=body.model, version=body.version,
                          period_start=day_start(body.start), period_end=day_start(body.end),
                          labels=[BaselineOut.model_validate(b) for b in stored])
