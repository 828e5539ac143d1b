"""One study: detail with series, results and a viewer link; claim, release, read, feedback."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Body, HTTPException, Query, Request, status
from pydantic import BaseModel

from triage.api.deps import ReaderDep, RedisDep, SettingsDep, WorklistDep, audit
from triage.audit import AuditAction
from triage.errors import TransientError
from triage.orthanc import OrthancClient
from triage.settings import Settings
from triage.tokens import Role, TokenRecord
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
from triage.worklist import Feedback, FeedbackRecord, WorklistItem

router = APIRouter(prefix="/api/v1/studies", tags=["studies"])


class StudyDetail(WorklistItem):
    viewer_url: str


def _detail(item: WorklistItem, settings: Settings) -> StudyDetail:
    # Values from the study are quoted: an accession number with & or # cannot change the
    # link's meaning.
    url = settings.viewer_url_template.format(
        orthanc_url=settings.orthanc_browser_url, orthanc_id=quote(item.orthanc_id, safe=""),
        study_instance_uid=quote(item.study_instance_uid, safe=""),
        accession_number=quote(item.accession_number, safe=""))
    return StudyDetail(**item.model_dump(), viewer_url=url)


def _translate(exc: Exception) -> HTTPException:
    if isinstance(exc, StudyNotFound):
        return HTTPException(status.HTTP_404_NOT_FOUND, "study not on the worklist")
    if isinstance(exc, ClaimConflict | StillArriving):
        return HTTPException(status.HTTP_409_CONFLICT, str(exc))
    return HTTPException(422, str(exc))  # unprocessable content


def _act(request: Request, user: TokenRecord, settings: Settings, action: AuditAction,
         study_instance_uid: str, change: Callable[[], WorklistItem]) -> StudyDetail:
    """Run one workflow change, translate its conflicts, audit it, answer the detail."""
    try:
        item = change()
    except (StudyNotFound, ClaimConflict, StillArriving) as exc:
        raise _translate(exc) from exc
    # Reading a study whose images were still arriving is kept in the trail with the count.
    details = {"arriving": item.arriving} if action is AuditAction.STUDY_READ and (
        item.arriving) else None
    audit(request, user, action, study_instance_uid=study_instance_uid, details=details)
    return _detail(item, settings)


@router.get("/{study_instance_uid}", response_model=StudyDetail)
def study(study_instance_uid: str, request: Request, user: ReaderDep, worklist: WorklistDep,
          settings: SettingsDep) -> StudyDetail:
    """The study's worklist item with its series, per-model results, findings with the key
    image, priority reasons, feedback, and a link that opens it in the viewer."""
    item = worklist.get(study_instance_uid)
    if item is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "study not on the worklist")
    audit(request, user, AuditAction.STUDY_VIEWED, study_instance_uid=study_instance_uid)
    return _detail(item, settings)


@router.post("/{study_instance_uid}/claim", response_model=StudyDetail,
             responses={409: {"description": "another radiologist holds the study"}})
def claim_study(study_instance_uid: str, request: Request, user: ReaderDep,
                worklist: WorklistDep, settings: SettingsDep) -> StudyDetail:
    """Take the study for ``TRIAGE_CLAIM_MINUTES``; claiming again extends one's own claim."""
    return _act(request, user, settings, AuditAction.STUDY_CLAIMED, study_instance_uid,
                lambda: claim(worklist, study_instance_uid, user.owner,
                              minutes=settings.claim_minutes))


@router.post("/{study_instance_uid}/release", response_model=StudyDetail,
             responses={409: {"description": "another radiologist holds the study"}})
def release_study(study_instance_uid: str, request: Request, user: ReaderDep,
                  worklist: WorklistDep, settings: SettingsDep) -> StudyDetail:
    """End one's claim; an admin may end anyone's."""
    return _act(request, user, settings, AuditAction.STUDY_RELEASED, study_instance_uid,
                lambda: release(worklist, study_instance_uid, user.owner,
                                force=user.role is Role.ADMIN))


class MarkRead(BaseModel):
    confirm: bool = False


@router.post("/{study_instance_uid}/read", response_model=StudyDetail,
             responses={409: {"description": "another radiologist holds the study, or the "
                                             "study's images are still arriving and the "
                                             "call did not confirm"}})
def read_study(study_instance_uid: str, request: Request, user: ReaderDep,
               worklist: WorklistDep, settings: SettingsDep,
               confirm: Annotated[bool, Query()] = False,
               body: Annotated[MarkRead | None, Body()] = None) -> StudyDetail:
    """Mark the study read by the caller. While its images are still arriving (``arriving``
    above 0: a preliminary AI result raised it before it was complete) the call must
    confirm (``?confirm=true``, or ``{"confirm": true}`` as body), else it is answered 409
    "images still arriving (N): confirm to mark read"."""
    confirmed = confirm or bool(body and body.confirm)
    return _act(request, user, settings, AuditAction.STUDY_READ, study_instance_uid,
                lambda: mark_read(worklist, study_instance_uid, user.owner,
                                  confirm=confirmed))


def _orthanc(request: Request, settings: Settings) -> OrthancClient:
    client = getattr(request.app.state, "orthanc", None)
    if client is None:
        client = request.app.state.orthanc = OrthancClient.from_settings(settings)
    return client


@router.post("/{study_instance_uid}/feedback", response_model=FeedbackRecord,
             status_code=status.HTTP_201_CREATED,
             responses={503: {"description": "Orthanc unreachable: nothing recorded"}})
def feedback(study_instance_uid: str, body: Feedback, request: Request, user: ReaderDep,
             worklist: WorklistDep, connection: RedisDep,
             settings: SettingsDep) -> FeedbackRecord:
    """Agree or disagree with each AI finding, and record whether each finding is present
    in the final read; kept for monitoring the models' performance. The assessment is
    stored in the study as a DICOM SR (docs/assessment-sr.md) and as ground truth in the
    vigilance records."""
    try:
        stored = give_feedback(settings, worklist, connection, _orthanc(request, settings),
                               study_instance_uid, user.owner, body)
    except (StudyNotFound, InvalidFeedback, AssessmentError) as exc:
        raise _translate(exc) from exc
    except TransientError as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            "Orthanc unreachable: feedback not recorded") from exc
    audit(request, user, AuditAction.FEEDBACK_RECORDED, study_instance_uid=study_instance_uid,
          details=body.model_dump(mode="json"))
    return stored
