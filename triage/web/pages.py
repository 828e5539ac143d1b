"""The web pages: the radiologists' worklist and study pages.

Pages are rendered on the server and call the same core functions as the ``/api/v1`` routes
(``Worklist.query``, ``triage.workflow``), with the same roles and the same audit records.
The browser session (``triage.web.sessions``) authenticates them; a page asked for without
one sends the browser to the sign-in page and back.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from datetime import date, datetime, time, tzinfo
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, HTTPException, Request, Response, status
from fastapi.responses import RedirectResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from triage.api.deps import audit, client_address, session_user
from triage.api.routes.studies import _detail
from triage.audit import AuditAction
from triage.errors import TransientError, TriageError
from triage.keyimage import render_png
from triage.manifest import Manifest, load_manifest
from triage.orthanc import OrthancClient
from triage.priority import PriorityClass
from triage.tokens import Role, TokenRecord
from triage.uids import sr_series_uid
from triage.vigilance.assessment import AssessmentError, give_feedback
from triage.workflow import (
    ClaimConflict,
    InvalidFeedback,
    StillArriving,
    StudyNotFound,
    claim,
    mark_read,
    release,
)
from triage.worklist import (
    DEFAULT_PAGE_SIZE,
    Feedback,
    FindingVerdict,
    StudyStatus,
    Worklist,
    WorklistItem,
    WorklistPage,
    WorklistQuery,
    utcnow,
)

from .render import finding_key, page

router = APIRouter(include_in_schema=False)
log = logging.getLogger(__name__)
READERS = (Role.RADIOLOGIST, Role.ADMIN)


class SignInNeeded(Exception):
    """The page needs a session: the browser goes to the sign-in page and comes back."""

    def __init__(self, target: str, reason: str | None = None) -> None:
        self.target = target
        self.reason = reason


def sign_in_redirect(request: Request, exc: SignInNeeded) -> Response:
    query = {"next": exc.target, **({"reason": exc.reason} if exc.reason else {})}
    if request.headers.get("hx-request") or request.headers.get("x-triage-background"):
        # A fragment cannot redirect the whole page: htmx and the page script do it.
        return Response(status_code=status.HTTP_401_UNAUTHORIZED,
                        headers={"HX-Redirect": "/login?" + urlencode(query)})
    return RedirectResponse("/login?" + urlencode(query), status_code=status.HTTP_303_SEE_OTHER)


async def page_user(request: Request, roles: tuple[Role, ...] = READERS) -> TokenRecord:
    """The user of the session, or a trip to the sign-in page."""
    # After signing in the browser comes back with a GET: to the page, not to an action.
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "") if (
        request.method == "GET" and not request.url.path.startswith("/ui/")) else "/"
    try:
        user = await session_user(request)
    except HTTPException as exc:
        if exc.status_code == status.HTTP_401_UNAUTHORIZED:
            raise SignInNeeded(target, "locked") from exc
        raise
    if user is None:
        raise SignInNeeded(target, "expired" if request.cookies.get("triage_session")
                           else None)
    if user.role not in roles:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"role {user.role.value} may not")
    return user


# -- the worklist -----------------------------------------------------------------------


class Filters(BaseModel):
    """The worklist's filters as the page's URL carries them (every one optional)."""

    status: StudyStatus | None = None
    priority: PriorityClass | None = None
    modality: str | None = None
    model: str | None = None
    finding: str | None = None
    claimed: str | None = None  # "mine", "unclaimed" or empty
    read: str | None = None  # "read", "unread" or empty
    start: date | None = None
    end: date | None = None
    offset: int = 0

    @classmethod
    def from_request(cls, request: Request) -> Filters:
        raw = {k: v.strip() for k, v in request.query_params.items() if v.strip()}
        try:
            return cls.model_validate({k: raw[k] for k in cls.model_fields if k in raw})
        except ValidationError:
            return cls()  # a mangled URL shows the whole list, never an error page

    def query(self, user: str, zone: tzinfo) -> WorklistQuery:
        """The worklist query; dates are days in the site's time zone."""
        return WorklistQuery(
            status=self.status, priority=self.priority,
            modality=(self.modality or "")[:16].upper() or None,
            model=(self.model or "")[:64] or None, finding=(self.finding or "")[:64] or None,
            claimed_by=user if self.claimed == "mine" else None,
            unclaimed=True if self.claimed == "unclaimed" else None,
            read={"read": True, "unread": False}.get(self.read or ""),
            received_from=datetime.combine(self.start, time.min, zone) if self.start else None,
            received_to=datetime.combine(self.end, time.max, zone) if self.end else None)

    def url(self, **changes: Any) -> str:
        values = {**self.model_dump(mode="json", exclude_defaults=True), **changes}
        values = {k: v for k, v in values.items() if v not in (None, "", 0)}
        return "/?" + urlencode(values) if values else "/"


@lru_cache(maxsize=8)
def _manifests(models_dir: Path, stamp: float) -> tuple[dict[str, Manifest], dict[str, str]]:
    found: dict[str, Manifest] = {}
    refused: dict[str, str] = {}
    for folder in sorted(p for p in models_dir.iterdir() if p.is_dir()):
        try:
            manifest = load_manifest(folder / "manifest.yaml")
        except (OSError, ValueError, TriageError) as exc:
            refused[folder.name] = str(exc).splitlines()[0][:300]
            continue
        found[f"{manifest.id} {manifest.version}"] = manifest
    return found, refused


def manifests(models_dir: Path) -> tuple[dict[str, Manifest], dict[str, str]]:
    """The installed models' manifests by ``id version``, and refused packages (cached until
    the models folder changes)."""
    try:
        stamp = max([models_dir.stat().st_mtime] + [
            p.stat().st_mtime for p in models_dir.glob("*/manifest.yaml")])
    except OSError:
        return {}, {}
    return _manifests(models_dir, stamp)


def row_version(item: WorklistItem, now: datetime) -> str:
    """Changes whenever what a row shows changes (the page replaces only those rows)."""
    claim_active = bool(item.claim_expires_at and item.claim_expires_at > now)
    text = item.model_dump_json(include={"status", "status_reason", "priority",
                                         "priority_reasons", "findings", "claimed_by",
                                         "read_at", "patient_name", "patient_id",
                                         "study_description", "accession_number",
                                         "arriving", "orders"})
    return hashlib.sha256(f"{text}{claim_active}".encode()).hexdigest()[:16]


def _row_id(uid: str) -> str:
    return "s" + hashlib.sha256(uid.encode()).hexdigest()[:20]


def _worklist_context(request: Request, user: TokenRecord, filters: Filters,
                      result: WorklistPage) -> dict[str, Any]:
    models, _ = manifests(request.app.state.settings.models_dir)
    codes = sorted({(o.concept.code_value, o.concept.code_meaning)
                    for m in models.values() for o in m.outputs})
    return dict(items=result.items, total=result.total, counts=result.counts,
                filters=filters, user=user, classes=list(PriorityClass),
                statuses=list(StudyStatus), model_ids=sorted({m.id for m in models.values()}),
                finding_codes=codes, page_size=DEFAULT_PAGE_SIZE, row_version=row_version,
                row_id=_row_id)


async def _query(request: Request, user: TokenRecord, filters: Filters) -> WorklistPage:
    worklist = Worklist(request.app.state.redis)
    query = filters.query(user.owner, request.app.state.settings.site_zone)
    return await run_in_threadpool(worklist.query, query, limit=DEFAULT_PAGE_SIZE,
                                   offset=max(0, filters.offset))


@router.get("/")
async def worklist_page(request: Request) -> Response:
    return await _worklist(request, "worklist.html", "page")


@router.get("/ui/worklist/rows")
async def worklist_rows(request: Request) -> Response:
    """The rows and the counts of the page's current filters, for live updates."""
    return await _worklist(request, "fragment.html", "live")


async def _worklist(request: Request, template: str, via: str) -> Response:
    """The worklist for the filters in the URL, audited as a view (as the JSON API is)."""
    user = await page_user(request)
    filters = Filters.from_request(request)
    result = await _query(request, user, filters)
    await request.app.state.audit.record(
        actor=user.owner, role=user.role.value, source=client_address(request),
        action=AuditAction.WORKLIST_VIEWED,
        details={"filters": filters.model_dump(mode="json", exclude_defaults=True),
                 "shown": len(result.items), "via": via})
    return page(request, template, **_worklist_context(request, user, filters, result))


# -- one study ------------------------------------------------------------------------


def _item(request: Request, uid: str) -> WorklistItem:
    item = Worklist(request.app.state.redis).get(uid)
    if item is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "study not on the worklist")
    return item


def _orthanc(request: Request) -> OrthancClient:
    client = getattr(request.app.state, "orthanc", None)
    if client is None:
        client = request.app.state.orthanc = OrthancClient.from_settings(
            request.app.state.settings)
    return client


def earlier_results(request: Request, item: WorklistItem) -> list[dict[str, str]]:
    """The SRs the service wrote into the study, newest first: the current result and those
    it superseded (read from Orthanc; empty when Orthanc cannot be reached)."""
    try:
        orthanc = _orthanc(request)
        own = str(sr_series_uid(item.study_instance_uid))
        found = []
        for series in orthanc.study_series(item.orthanc_id):
            if series.get("MainDicomTags", {}).get("SeriesInstanceUID") != own:
                continue
            for instance in orthanc.series_instances(series["ID"]):
                tags = instance.get("MainDicomTags", {})
                uid = tags.get("SOPInstanceUID", "")
                found.append({"sop_instance_uid": uid,
                              "when": f"{tags.get('InstanceCreationDate', '')} "
                                      f"{tags.get('InstanceCreationTime', '')}".strip(),
                              "number": str(tags.get("InstanceNumber", "")),
                              "current": "yes" if uid == item.sr_sop_instance_uid else ""})
        return sorted(found, key=lambda r: r["when"], reverse=True)  # newest first
    except (TriageError, OSError) as exc:
        log.warning("earlier results not read from Orthanc: %s", type(exc).__name__)
        return []


def _study_context(request: Request, user: TokenRecord, item: WorklistItem,
                   **extra: Any) -> dict[str, Any]:
    models, _ = manifests(request.app.state.settings.models_dir)
    detail = _detail(item, request.app.state.settings)
    mine = [f for f in item.feedback if f.user == user.owner]
    verdicts = {(v.model, v.model_version, v.code): v.agree
                for record in mine for v in record.findings}
    outcomes = {code: present for record in mine for code, present in record.outcomes.items()}
    return dict(item=item, viewer_url=detail.viewer_url, models=models, user=user,
                verdicts=verdicts, outcomes=outcomes,
                claim_active=bool(item.claimed_by and item.claim_expires_at
                                  and item.claim_expires_at > utcnow()),
                **extra)


@router.get("/studies/{study_instance_uid}")
async def study_page(study_instance_uid: str, request: Request) -> Response:
    user = await page_user(request)
    item = await run_in_threadpool(_item, request, study_instance_uid)
    earlier = await run_in_threadpool(earlier_results, request, item)
    await run_in_threadpool(audit, request, user, AuditAction.STUDY_VIEWED,
                            study_instance_uid=study_instance_uid,
                            details={"via": "page"})
    return page(request, "study.html", earlier=earlier,
                **_study_context(request, user, item))


def _act(request: Request, user: TokenRecord, uid: str, action: AuditAction,
         change: Callable[[Worklist], WorklistItem]
         ) -> tuple[WorklistItem, TriageError | None]:
    worklist = Worklist(request.app.state.redis)
    try:
        item = change(worklist)
    except StudyNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "study not on the worklist") from exc
    except (ClaimConflict, StillArriving) as exc:
        current = worklist.get(uid)
        if current is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "study not on the worklist") from exc
        return current, exc
    details: dict[str, Any] = {"via": "page"}
    if action is AuditAction.STUDY_READ and item.arriving:
        details["arriving"] = item.arriving  # read before the study was complete
    audit(request, user, action, study_instance_uid=uid, details=details)
    return item, None


_ACTIONS: dict[str, tuple[AuditAction, str]] = {
    "claim": (AuditAction.STUDY_CLAIMED, "Claimed"),
    "release": (AuditAction.STUDY_RELEASED, "Released"),
    "read": (AuditAction.STUDY_READ, "Marked read"),
}


@router.post("/ui/studies/{study_instance_uid}/feedback")
async def study_feedback(study_instance_uid: str, request: Request) -> Response:
    """Agree / disagree per finding and present in the final read, from the study page."""
    user = await page_user(request)
    form = await request.form()
    item = await run_in_threadpool(_item, request, study_instance_uid)
    verdicts: list[FindingVerdict] = []
    outcomes: dict[str, bool] = {}
    for finding in item.findings:
        # Fields are named after the finding, not its place: a re-analysis between showing
        # the form and saving it can reorder the findings.
        n = finding_key(finding.model, finding.model_version, finding.code)
        agree = form.get(f"agree-{n}")
        if agree in ("yes", "no"):
            verdicts.append(FindingVerdict(model=finding.model,
                                           model_version=finding.model_version,
                                           code=finding.code, agree=agree == "yes"))
        present = form.get(f"present-{n}")
        if present in ("yes", "no"):
            outcomes[finding.code] = present == "yes"
    if not verdicts and not outcomes:
        return page(request, "feedback.html", status_code=422,
                    message="Choose at least one answer before saving.", conflict=True,
                    **_study_context(request, user, item))
    feedback = Feedback(findings=verdicts, outcomes=outcomes)
    try:
        await run_in_threadpool(give_feedback, request.app.state.settings,
                                Worklist(request.app.state.redis), request.app.state.redis,
                                _orthanc(request), study_instance_uid, user.owner, feedback)
    except StudyNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "study not on the worklist") from exc
    except TransientError:
        return page(request, "feedback.html", status_code=503, conflict=True,
                    message="The image server cannot be reached: nothing was saved. "
                    "Try again in a moment.", **_study_context(request, user, item))
    except (InvalidFeedback, AssessmentError) as exc:
        return page(request, "feedback.html", status_code=422, message=str(exc),
                    conflict=True, **_study_context(request, user, item))
    await run_in_threadpool(audit, request, user, AuditAction.FEEDBACK_RECORDED,
                            study_instance_uid=study_instance_uid,
                            details={**feedback.model_dump(mode="json"), "via": "page"})
    item = await run_in_threadpool(_item, request, study_instance_uid)
    return page(request, "feedback.html", message="Feedback saved.", conflict=False,
                **_study_context(request, user, item))


@router.get("/ui/studies/{study_instance_uid}/key-image/{sop_instance_uid}.png")
async def key_image(study_instance_uid: str, sop_instance_uid: str,
                    request: Request) -> Response:
    """The slice a finding points to, in the model's display window, as a PNG: served by
    the service with the caller's session and audited; Orthanc is never exposed to the
    browser. Only the key slices of the study's own findings are served."""
    user = await page_user(request)
    item = await run_in_threadpool(_item, request, study_instance_uid)
    finding = next((f for f in item.findings if f.key_sop_instance_uid == sop_instance_uid),
                   None)
    if finding is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no AI key image with this UID")
    models, _ = manifests(request.app.state.settings.models_dir)
    manifest = models.get(f"{finding.model} {finding.model_version}")
    window = None
    if manifest is not None:
        chosen = manifest.display_window or manifest.preprocessing.window
        window = (chosen.center, chosen.width) if chosen else None

    def render() -> bytes:
        orthanc = _orthanc(request)
        instance = orthanc.lookup_instance(sop_instance_uid)
        if instance is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "key image no longer in Orthanc")
        return render_png(orthanc.instance_dataset(instance), window)

    try:
        png = await run_in_threadpool(render)
    except TriageError as exc:
        log.warning("key image not rendered: %s", type(exc).__name__)
        raise HTTPException(status.HTTP_502_BAD_GATEWAY, "key image could not be read") from exc
    await run_in_threadpool(audit, request, user, AuditAction.KEY_IMAGE_VIEWED,
                            study_instance_uid=study_instance_uid,
                            details={"sop_instance_uid": sop_instance_uid})
    return Response(png, media_type="image/png",
                    headers={"Cache-Control": "no-store", "Content-Disposition": "inline"})


# Last: the routes above with fixed names (feedback) come first.
@router.post("/ui/studies/{study_instance_uid}/{action}")
async def study_action(study_instance_uid: str, action: str, request: Request) -> Response:
    """Claim, release or mark read from a page; answers the study's action bar. Marking read
    a study whose images are still arriving needs ``confirm=yes`` (form field): without it
    the answer is a conflict whose action bar asks for the confirmation."""
    user = await page_user(request)
    if action not in _ACTIONS:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such action")
    settings = request.app.state.settings
    uid = study_instance_uid
    confirm = action == "read" and (await request.form()).get("confirm") == "yes"

    def change(worklist: Worklist) -> WorklistItem:
        if action == "claim":
            return claim(worklist, uid, user.owner, minutes=settings.claim_minutes)
        if action == "release":
            return release(worklist, uid, user.owner, force=user.role is Role.ADMIN)
        return mark_read(worklist, uid, user.owner, confirm=confirm)

    audit_action, done = _ACTIONS[action]
    item, conflict = await run_in_threadpool(_act, request, user, uid, audit_action, change)
    return page(request, "study_actions.html", status_code=409 if conflict else 200,
                message=str(conflict) if conflict else done, conflict=conflict is not None,
                confirm_read=isinstance(conflict, StillArriving),
                **_study_context(request, user, item))
