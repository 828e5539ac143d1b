"""What admins see and do about the pipeline: queue depths, workers, failed jobs, requeue."""

from __future__ import annotations

from datetime import datetime

import redis
from pydantic import BaseModel
from rq import Queue, Worker
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.registry import (
    BaseRegistry,
    CanceledJobRegistry,
    DeferredJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)

from triage.errors import TriageError
from triage.queues import queues
from triage.recovery import alive_key
from triage.worklist import StudyStatus, Worklist

# How much of a failure's traceback the admin list shows: the end, where the error is.
ERROR_TAIL_CHARS = 1200


class JobNotFound(TriageError):
    """No failed job has this id."""


class QueueDepth(BaseModel):
    name: str
    queued: int
    started: int
    scheduled: int
    failed: int
    finished: int = 0
    deferred: int = 0
    canceled: int = 0
    oldest_queued_at: datetime | None = None


class WorkerState(BaseModel):
    name: str
    state: str
    alive: bool
    current_job: str | None
    current_study: str | None = None
    queues: list[str] = []
    last_heartbeat: datetime | None
    successful_jobs: int
    failed_jobs: int


class FailedJob(BaseModel):
    job_id: str
    queue: str
    study_instance_uid: str | None
    status_reason: str
    error: str
    failed_at: datetime | None


# The job registries of a queue, by the name the console and the API use.
REGISTRIES: dict[str, type[BaseRegistry]] = {
    "started": StartedJobRegistry, "scheduled": ScheduledJobRegistry,
    "failed": FailedJobRegistry, "finished": FinishedJobRegistry,
    "deferred": DeferredJobRegistry, "canceled": CanceledJobRegistry,
}
JOB_STATES = ("queued", *REGISTRIES)


def _oldest_queued(queue: Queue) -> datetime | None:
    """When the job waiting longest on ``queue`` was enqueued."""
    for job_id in queue.get_job_ids(0, 0):
        job = queue.fetch_job(job_id)
        if job is not None:
            return job.enqueued_at
    return None


def queue_depths(connection: redis.Redis) -> list[QueueDepth]:
    """Jobs per queue in every registry, and the oldest waiting job."""
    return [QueueDepth(name=q.name, queued=q.count,
                       oldest_queued_at=_oldest_queued(q),
                       **{state: registry(queue=q).count
                          for state, registry in REGISTRIES.items()})
            for q in queues(connection)]


class JobState(BaseModel):
    job_id: str
    queue: str
    state: str
    study_instance_uid: str | None
    function: str
    enqueued_at: datetime | None
    started_at: datetime | None
    ended_at: datetime | None
    error: str = ""


def jobs_in(connection: redis.Redis, state: str, limit: int = 100) -> list[JobState]:
    """Up to ``limit`` jobs in one state (``JOB_STATES``) across the queues."""
    if state not in JOB_STATES:
        raise JobNotFound(f"no job state {state}")
    found: list[JobState] = []
    for queue in queues(connection):
        ids = (queue.get_job_ids(0, limit - 1) if state == "queued"
               else REGISTRIES[state](queue=queue).get_job_ids(0, limit - 1))
        for job in Job.fetch_many(ids, connection=connection):
            if job is None:
                continue
            error = ""
            if state == "failed":
                result = job.latest_result()
                error = ((result.exc_string if result is not None else "") or "")[
                    -ERROR_TAIL_CHARS:]
            found.append(JobState(
                job_id=job.id, queue=queue.name, state=state,
                study_instance_uid=str(job.args[1]) if len(job.args) > 1 else None,
                function=(job.func_name or "").rsplit(".", 1)[-1], enqueued_at=job.enqueued_at,
                started_at=job.started_at, ended_at=job.ended_at, error=error))
    return found[:limit]


def delete_job(connection: redis.Redis, job_id: str) -> None:
    """Delete a job that is not running, from whichever registry holds it."""
    try:
        job = Job.fetch(job_id, connection=connection)
    except (NoSuchJobError, ValueError) as exc:  # ValueError: not a job id at all
        raise JobNotFound(f"no job {job_id}") from exc
    if job.get_status() == "started":
        raise JobNotFound(f"job {job_id} is running; stop its worker first")
    job.delete(remove_from_queue=True, delete_dependents=False)


def workers(connection: redis.Redis) -> list[WorkerState]:
    states = []
    for worker in Worker.all(connection=connection):
        job_id = worker.get_current_job_id()
        job = worker.get_current_job() if job_id else None
        states.append(WorkerState(
            name=worker.name, state=str(worker.get_state()),
            alive=bool(connection.exists(alive_key(worker.name))),
            current_job=job_id,
            current_study=str(job.args[1]) if job is not None and len(job.args) > 1 else None,
            queues=worker.queue_names(), last_heartbeat=worker.last_heartbeat,
            successful_jobs=worker.successful_job_count, failed_jobs=worker.failed_job_count))
    return states


def failed_jobs(connection: redis.Redis) -> list[FailedJob]:
    worklist = Worklist(connection)
    found = []
    for queue in queues(connection):
        for job_id in FailedJobRegistry(queue=queue).get_job_ids():
            try:
                job = Job.fetch(job_id, connection=connection)
            except NoSuchJobError:
                continue
            study_uid = str(job.args[1]) if len(job.args) > 1 else None
            item = worklist.get(study_uid) if study_uid else None
            result = job.latest_result()
            error = result.exc_string if result is not None else ""
            found.append(FailedJob(job_id=job_id, queue=queue.name,
                                   study_instance_uid=study_uid,
                                   status_reason=item.status_reason if item else "",
                                   error=(error or "")[-ERROR_TAIL_CHARS:],
                                   failed_at=job.ended_at))
    return found


def requeue(connection: redis.Redis, job_id: str, *, by: str) -> str:
    """Put a failed job back on its queue; the study shows ``queued`` again."""
    for queue in queues(connection):
        registry = FailedJobRegistry(queue=queue)
        if job_id not in registry:
            continue
        job = Job.fetch(job_id, connection=connection)
        registry.requeue(job_id)
        if len(job.args) > 2:
            _show_requeued(connection, str(job.args[1]), str(job.args[2]), by)
        return queue.name
    raise JobNotFound(f"no failed job {job_id}")


def _show_requeued(connection: redis.Redis, study_uid: str, inputs: str, by: str) -> None:
    Worklist(connection).update(study_uid, lambda item: item.model_copy(update={
        "status": StudyStatus.QUEUED, "status_reason": f"requeued by {by}"})
        if item.inputs == inputs else None, event="status")


def requeue_all(connection: redis.Redis, *, by: str) -> list[str]:
    return [job.job_id for job in failed_jobs(connection)
            if requeue(connection, job.job_id, by=by)]
