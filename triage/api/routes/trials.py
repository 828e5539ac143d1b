"""Admin endpoints of shadow trials: the versions of each model and their states, promotion
and rollback, and the shadow report of a version on trial against the active one.

A change of state is written with its entry in the vigilance audit trail (PostgreSQL) in one
transaction, and in the service's audit trail; running workers apply it to new studies
within ``TRIAGE_VIGILANCE_STATES_SECONDS``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Request, status
from pydantic import BaseModel, ConfigDict

from triage.api.deps import AdminDep, SettingsDep, audit
from triage.api.routes.vigilance import (
    EndQuery,
    ModelQuery,
    ProportionOut,
    StartQuery,
    _records,
    period,
)
from triage.audit import AuditAction
from triage.vigilance.figures import active_version, version_exists
from triage.vigilance.records import RecordError, Transition, promote, set_state, versions
from triage.vigilance.shadow import report
from triage.vigilance.statistics import Confusion

router = APIRouter(prefix="/api/v1/admin/vigilance", tags=["vigilance"])


class VersionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    version: str
    sha256: str
    state: str
    changed_at: datetime
    changed_by: str


class ModelOut(BaseModel):
    model_id: str
    versions: list[VersionOut]


class ModelsOut(BaseModel):
    models: list[ModelOut]


class StateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state: Literal["active", "shadow", "retired"]


class TransitionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    model_id: str
    version: str
    old_state: str
    new_state: str


class ChangeOut(BaseModel):
    changes: list[TransitionOut]
    versions: list[VersionOut]


class TruthOut(BaseModel):
    """Decisions of one version against ground truth on the paired studies that have it."""

    studies: int
    ppv: ProportionOut
    specificity: ProportionOut
    agreement: ProportionOut


class DiscordantOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    study_uid: str
    active_score: float
    shadow_score: float
    active_flagged: bool
    shadow_flagged: bool


class ShadowTruthOut(BaseModel):
    active: TruthOut | None
    shadow: TruthOut | None


class LabelOut(BaseModel):
    label: str
    code: str
    paired: int
    both_flagged: int
    active_only: int
    shadow_only: int
    neither: int
    agreement: ProportionOut
    kappa: float | None
    mcnemar_p: float
    mcnemar_test: str
    discordant_total: int
    discordant: list[DiscordantOut]
    truth: ShadowTruthOut


class ShadowOut(BaseModel):
    model_id: str
    active_version: str
    shadow_version: str
    start: datetime
    end: datetime
    labels: list[LabelOut]


MCNEMAR_TEST = "exact binomial (two-sided) on the discordant pairs"
_RESPONSES: dict[int | str, dict[str, str]] = {
    404: {"description": "no such model version"},
    409: {"description": "the change is not allowed"},
    503: {"description": "PostgreSQL unreachable"},
}


@router.get("/models", response_model=ModelsOut,
            responses={503: {"description": "PostgreSQL unreachable"}})
def get_models(_admin: AdminDep, settings: SettingsDep) -> ModelsOut:
    """Every registered version of every model with its state and its last change."""
    with _records(settings) as connection:
        found = versions(connection)
    by_model: dict[str, list[VersionOut]] = {}
    for v in found:
        by_model.setdefault(v.model_id, []).append(VersionOut.model_validate(v))
    return ModelsOut(models=[ModelOut(model_id=m, versions=vs)
                             for m, vs in sorted(by_model.items())])


def _changed(request: Request, admin: AdminDep, settings: SettingsDep, model_id: str,
             version: str, change: str) -> ChangeOut:
    with _records(settings) as connection:
        try:
            if change == "active":
                made: list[Transition] = promote(connection, model_id, version, admin.owner)
            else:
                made = set_state(connection, model_id, version, change, admin.owner)
        except RecordError as error:
            known = version_exists(connection, model_id, version)
            raise HTTPException(status.HTTP_409_CONFLICT if known
                                else status.HTTP_404_NOT_FOUND, str(error)) from error
        now = [VersionOut.model_validate(v) for v in versions(connection, model_id)]
    for t in made:
        audit(request, admin, AuditAction.MODEL_STATE_CHANGED,
              details={"model": t.model_id, "version": t.version, "from": t.old_state,
                       "to": t.new_state})
    return ChangeOut(changes=[TransitionOut.model_validate(t) for t in made], versions=now)


@router.post("/models/{model_id}/versions/{version}/promote", response_model=ChangeOut,
             responses=_RESPONSES)
def promote_version(model_id: str, version: str, request: Request, admin: AdminDep,
                    settings: SettingsDep) -> ChangeOut:
    """Make the version active (the version active until now goes to shadow, so rolling back
    is promoting it again). Workers apply it to new studies within
    TRIAGE_VIGILANCE_STATES_SECONDS."""
    return _changed(request, admin, settings, model_id, version, "active")


@router.post("/models/{model_id}/versions/{version}/state", response_model=ChangeOut,
             responses=_RESPONSES)
def change_state(model_id: str, version: str, body: StateIn, request: Request,
                 admin: AdminDep, settings: SettingsDep) -> ChangeOut:
    """Put the version in shadow, retire it, or make it active (a promotion)."""
    return _changed(request, admin, settings, model_id, version, body.state)


def _truth(table: Confusion | None) -> TruthOut | None:
    if table is None:
        return None
    return TruthOut(studies=table.tp + table.fp + table.fn + table.tn,
                    ppv=ProportionOut.model_validate(table.ppv()),
                    specificity=ProportionOut.model_validate(table.specificity()),
                    agreement=ProportionOut.model_validate(table.agreement()))


@router.get("/shadow", response_model=ShadowOut, responses=_RESPONSES)
def get_shadow(_admin: AdminDep, settings: SettingsDep, model: ModelQuery,
               version: Annotated[str, Query(min_length=1, description="the shadow version")],
               start: StartQuery = None, end: EndQuery = None,
               against: Annotated[str | None, Query(
                   min_length=1, description="the version compared with; the active one "
                   "when absent")] = None) -> ShadowOut:
    """The shadow report: per output label, the 2x2 agreement of the two versions' decisions
    on the studies both analysed, Cohen's kappa, McNemar's exact test, the discordant studies
    for review, and both versions against ground truth where it is known."""
    first, last = period(start, end)
    with _records(settings) as connection:
        reference = against or active_version(connection, model)
        if reference is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND,
                                f"model {model} has no active version; name one in 'against'")
        for v in (version, reference):
            if not version_exists(connection, model, v):
                raise HTTPException(status.HTTP_404_NOT_FOUND,
                                    f"no version {v} of model {model} in the records")
        found = report(connection, model, reference, version, first, last)
    return ShadowOut(
        model_id=found.model_id, active_version=found.active_version,
        shadow_version=found.shadow_version, start=found.start, end=found.end,
        labels=[LabelOut(
            label=lc.label, code=lc.code, paired=lc.paired, both_flagged=lc.comparison.both,
            active_only=lc.comparison.active_only, shadow_only=lc.comparison.shadow_only,
            neither=lc.comparison.neither,
            agreement=ProportionOut.model_validate(lc.comparison.agreement),
            kappa=lc.comparison.kappa, mcnemar_p=lc.comparison.mcnemar_p,
            mcnemar_test=MCNEMAR_TEST, discordant_total=lc.discordant_total,
            discordant=[DiscordantOut.model_validate(d) for d in lc.discordant],
            truth=ShadowTruthOut(active=_truth(lc.active_truth),
                                 shadow=_truth(lc.shadow_truth)))
            for lc in found.labels])
