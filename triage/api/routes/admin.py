"""Admin endpoints: queues, workers, failed jobs and requeueing."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel

from triage.admin import (
    FailedJob,
    JobNotFound,
    QueueDepth,
    WorkerState,
    failed_jobs,
    queue_depths,
    requeue,
    requeue_all,
    workers,
)
from triage.api.deps import AdminDep, RedisDep

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


@router.post("/jobs/failed/requeue", response_model=Requeued)
def requeue_failed(admin: AdminDep, connection: RedisDep) -> Requeued:
    """Requeue every failed job."""
    return Requeued(requeued=requeue_all(connection, by=admin.owner))


@router.post("/jobs/{job_id}/requeue", response_model=Requeued,
             responses={404: {"description": "no failed job with this id"}})
def requeue_job(job_id: str, admin: AdminDep, connection: RedisDep) -> Requeued:
    try:
        requeue(connection, job_id, by=admin.owner)
    except JobNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    return Requeued(requeued=[job_id])
