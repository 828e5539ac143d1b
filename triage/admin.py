"""What admins see and do about the pipeline: queue depths, workers, failed jobs, requeue."""

from __future__ import annotations

from datetime import datetime

import redis
from pydantic import BaseModel
from rq import Worker
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry

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


class WorkerState(BaseModel):
    name: str
    state: str
    alive: bool
    current_job: str | None
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


def queue_depths(connection: redis.Redis) -> list[QueueDepth]:
    return [QueueDepth(name=q.name, queued=q.count,
                       started=StartedJobRegistry(queue=q).count,
                       scheduled=ScheduledJobRegistry(queue=q).count,
                       failed=FailedJobRegistry(queue=q).count)
            for q in queues(connection)]


def workers(connection: redis.Redis) -> list[WorkerState]:
    states = []
    for worker in Worker.all(connection=connection):
        job_id = worker.get_current_job_id()
        states.append(WorkerState(
            name=worker.name, state=str(worker.get_state()),
            alive=bool(connection.exists(alive_key(worker.name))),
            current_job=job_id, last_heartbeat=worker.last_heartbeat,
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
