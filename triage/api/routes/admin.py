"""Admin endpoints: queues, workers, failed jobs and requeueing."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from triage.admin import (
    FailedJob,
    JobNotFound,
    JobState,
    QueueDepth,
    WorkerState,
    delete_job,
    failed_jobs,
    jobs_in,
    queue_depths,
    requeue,
    requeue_all,
    workers,
)
from triage.api.deps import AdminDep, RedisDep, SettingsDep, audit
from triage.audit import AuditAction, Verification, export, verify
from triage.delivery import retry_failed, undelivered
from triage.metrics import ChartWindow, charts
from triage.registry import ModelRegistry
from triage.ris.store import RejectedMessage, rejected_messages
from triage.tokens import (
    DEFAULT_TOKEN_DAYS,
    Role,
    TokenNotFound,
    TokenRecord,
    create_token,
    list_tokens,
    revoke_token,
    verify_token,
)
from triage.worklist import DeliveryItem

router = APIRouter(prefix="/api/v1/admin", tags=["admin"])


class Requeued(BaseModel):
    requeued: list[str]


@router.get("/queues", response_model=list[QueueDepth])
def get_queues(_admin: AdminDep, connection: RedisDep) -> list[QueueDepth]:
    """Jobs waiting, running, scheduled for a retry and failed, per queue."""
    return queue_depths(connection)


@router.get("/workers", response_model=list[WorkerState])
def get_workers(_admin: AdminDep, connection: RedisDep) -> list[WorkerState]:
    """Every registered worker: alive or not, its current job, its last heartbeat."""
    return workers(connection)


@router.get("/jobs/failed", response_model=list[FailedJob])
def get_failed_jobs(_admin: AdminDep, connection: RedisDep) -> list[FailedJob]:
    """Jobs that failed for good, with the study and the end of the error."""
    return failed_jobs(connection)


@router.get("/jobs", response_model=list[JobState],
            responses={404: {"description": "no such job state"}})
def get_jobs(_admin: AdminDep, connection: RedisDep,
             state: Annotated[str, Query(description="queued, started, scheduled, failed, "
                                                     "finished, deferred or canceled")]
             = "failed",
             limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[JobState]:
    """Jobs in one state across the queues (at most ``limit``), oldest first."""
    try:
        return jobs_in(connection, state, limit)
    except JobNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc


@router.delete("/jobs/{job_id}", status_code=status.HTTP_204_NO_CONTENT,
               responses={404: {"description": "no such job, or it is running"}})
def remove_job(job_id: str, request: Request, admin: AdminDep, connection: RedisDep) -> None:
    """Delete a job that is not running (the study keeps its worklist item)."""
    try:
        delete_job(connection, job_id)
    except JobNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    audit(request, admin, AuditAction.JOB_DELETED, details={"jobs": [job_id]})


@router.post("/jobs/failed/requeue", response_model=Requeued)
def requeue_failed(request: Request, admin: AdminDep, connection: RedisDep) -> Requeued:
    """Requeue every failed job."""
    requeued = requeue_all(connection, by=admin.owner)
    audit(request, admin, AuditAction.JOB_REQUEUED, details={"jobs": requeued})
    return Requeued(requeued=requeued)


@router.post("/jobs/{job_id}/requeue", response_model=Requeued,
             responses={404: {"description": "no failed job with this id"}})
def requeue_job(job_id: str, request: Request, admin: AdminDep,
                connection: RedisDep) -> Requeued:
    try:
        requeue(connection, job_id, by=admin.owner)
    except JobNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    audit(request, admin, AuditAction.JOB_REQUEUED, details={"jobs": [job_id]})
    return Requeued(requeued=[job_id])


class TokenCreate(BaseModel):
    owner: str = Field(min_length=1, max_length=128)
    role: Role
    days: int | None = Field(default=DEFAULT_TOKEN_DAYS, ge=1, le=3650)


class TokenCreated(TokenRecord):
    token: str = Field(description="shown once; only its hash is kept")


@router.get("/tokens", response_model=list[TokenRecord])
def get_tokens(_admin: AdminDep, connection: RedisDep) -> list[TokenRecord]:
    """Every token: owner, role, creation, expiry, revocation (never the secret)."""
    return list_tokens(connection)


@router.post("/tokens", response_model=TokenCreated, status_code=status.HTTP_201_CREATED)
def post_token(body: TokenCreate, request: Request, admin: AdminDep,
               connection: RedisDep) -> TokenCreated:
    token = create_token(connection, role=body.role, owner=body.owner, days=body.days)
    record = verify_token(connection, token)
    assert record is not None
    audit(request, admin, AuditAction.TOKEN_CREATED,
          details={"token_id": record.id, "owner": body.owner, "role": body.role.value})
    return TokenCreated(**record.model_dump(), token=token)


@router.delete("/tokens/{token_id}", response_model=TokenRecord,
               responses={404: {"description": "no token with this id"}})
def delete_token(token_id: str, request: Request, admin: AdminDep,
                 connection: RedisDep) -> TokenRecord:
    """Revoke a token; it stops working at once."""
    try:
        record = revoke_token(connection, token_id)
    except TokenNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    audit(request, admin, AuditAction.TOKEN_REVOKED, details={"token_id": token_id})
    return record


class ModelState(BaseModel):
    folder: str
    id: str | None = None
    version: str | None = None
    name: str | None = None
    regulatory_status: str | None = None
    sha256: str | None = None
    refused: str | None = None


@router.get("/models", response_model=list[ModelState])
def get_models(_admin: AdminDep, settings: SettingsDep) -> list[ModelState]:
    """The model packages the workers load, and those refused with the reason."""
    registry = ModelRegistry.load(settings.models_dir)
    states = [ModelState(folder=p.folder.name, id=p.manifest.id, version=p.manifest.version,
                         name=p.manifest.name, regulatory_status=p.manifest.regulatory_status,
                         sha256=p.manifest.sha256) for p in registry.packages]
    states += [ModelState(folder=folder, refused=error)
               for folder, error in registry.errors.items()]
    return states


@router.get("/audit/verify", response_model=Verification)
def verify_audit(_admin: AdminDep, connection: RedisDep) -> Verification:
    """Walk the audit trail's hash chain: whether any record was altered, removed or
    inserted, and the first broken link."""
    return verify(connection)


@router.get("/audit", response_class=StreamingResponse,
            responses={200: {"content": {"application/x-ndjson": {}}}})
def get_audit(request: Request, admin: AdminDep, connection: RedisDep,
              start: datetime | None = None, end: datetime | None = None) -> StreamingResponse:
    """The audit trail between ``start`` and ``end`` as JSON lines, each with its hash."""
    audit(request, admin, AuditAction.AUDIT_EXPORTED,
          details={"start": start.isoformat() if start else None,
                   "end": end.isoformat() if end else None})
    return StreamingResponse(export(connection, start, end),
                             media_type="application/x-ndjson")


class DeliveryState(BaseModel):
    study_instance_uid: str
    accession_number: str
    delivery: DeliveryItem


@router.get("/deliveries", response_model=list[DeliveryState])
def get_deliveries(_admin: AdminDep, connection: RedisDep) -> list[DeliveryState]:
    """Results not yet acknowledged by their DICOM destination or webhook: failed, then
    pending (being retried), with the last error."""
    return [DeliveryState(study_instance_uid=item.study_instance_uid,
                          accession_number=item.accession_number, delivery=d)
            for item, d in undelivered(connection)]


@router.post("/deliveries/retry", response_model=Requeued)
def retry_deliveries(request: Request, admin: AdminDep, connection: RedisDep) -> Requeued:
    """Send every failed delivery again."""
    retried = retry_failed(connection)
    audit(request, admin, AuditAction.JOB_REQUEUED, details={"deliveries": retried})
    return Requeued(requeued=retried)


@router.get("/ris/rejected", response_model=list[RejectedMessage])
def get_rejected_hl7(request: Request, admin: AdminDep, connection: RedisDep,
                     limit: Annotated[int, Query(ge=1, le=1000)] = 100
                     ) -> list[RejectedMessage]:
    """HL7 v2 messages from the RIS that the MLLP listener did not accept, newest first (at
    most ``limit``): why, the answer the sender got (AR, AE, or the connection closed), and
    the start of the message as received (it holds patient data: the reading is audited)."""
    found = rejected_messages(connection, limit)
    audit(request, admin, AuditAction.HL7_REJECTED_VIEWED, details={"messages": len(found)})
    return found


class Percentiles(BaseModel):
    p50: list[float | None]
    p95: list[float | None]


class StudyCounts(BaseModel):
    analysed: list[int]
    skipped: list[int]
    failed: list[int]


class QueueDepthSeries(BaseModel):
    times: list[int] = Field(description="epoch seconds of each sample")
    depth: list[int] = Field(description="jobs waiting on all queues")


class Charts(BaseModel):
    window: ChartWindow
    bucket_seconds: int
    buckets: list[int] = Field(description="start of each bucket, epoch seconds")
    ttn: dict[str, Percentiles] = Field(
        description="time to notification (s) per bucket, by '<model id> <version>'; "
                    "null where the model analysed nothing")
    studies: StudyCounts = Field(description="studies per outcome per bucket")
    queue_depth: QueueDepthSeries


@router.get("/charts", response_model=Charts)
def get_charts(_admin: AdminDep, connection: RedisDep,
               window: ChartWindow = ChartWindow.DAY) -> dict[str, Any]:
    """Time to notification (50th and 95th percentiles) per model version, studies per
    outcome, in hour buckets over 24 hours or 6-hour buckets over 7 days; queue depth."""
    return charts(connection, window)
