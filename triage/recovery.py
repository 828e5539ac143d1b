"""Finding work that a dead worker left behind, and putting it back on its queue.

A worker killed outright (SIGKILL, out of memory, a lost container) cannot report anything.
Each worker therefore keeps an ``alive`` key fresh from a thread of its own, which keeps
beating while a study is analysed. When the key has expired, the studies that worker held
are queued again at the front of their queue; their deterministic SR UID means the rerun
never writes a second SR.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import cast

import redis
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.registry import ScheduledJobRegistry, StartedJobRegistry

from triage.logs import pseudonym
from triage.priority import PriorityClass
from triage.queues import QueueName, enqueue_analysis, queues
from triage.settings import get_settings
from triage.worklist import StudyStatus, Worklist, WorklistItem

log = logging.getLogger(__name__)

ALIVE_TTL_SECONDS = 15
HEARTBEAT_SECONDS = 5
# A job taken off a queue but not yet registered as started is nowhere for a moment; only
# one still nowhere this long after it was first seen is stranded.
STRANDED_AFTER_SECONDS = 30


def alive_key(worker_name: str) -> str:
    return f"triage:worker:{worker_name}:alive"


class Heartbeat:
    """Keeps ``alive_key(name)`` fresh from a daemon thread until ``stop()``."""

    def __init__(self, connection: redis.Redis, worker_name: str) -> None:
        self.connection = connection
        self.key = alive_key(worker_name)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _beat(self) -> None:
        while True:
            try:
                self.connection.set(self.key, "1", ex=ALIVE_TTL_SECONDS)
            except redis.RedisError as exc:  # Redis restarting: the worker waits it out too
                log.warning("heartbeat not recorded: %s", exc)
            if self._stop.wait(HEARTBEAT_SECONDS):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(HEARTBEAT_SECONDS)
        self.connection.delete(self.key)


def recover_abandoned(connection: redis.Redis, *,
                      stranded_after: int = STRANDED_AFTER_SECONDS) -> list[str]:
    """Queue again every job whose worker is no longer alive, and every job that a worker
    took off its queue and died before starting; returns their ids."""
    recovered = []
    worklist = Worklist(connection)
    for queue in queues(connection):
        registry = StartedJobRegistry(queue=queue)
        for job_id in registry.get_job_ids(cleanup=False):
            job = _fetch(connection, job_id)
            if job is None or job.get_status(refresh=False) != JobStatus.STARTED:
                continue
            if job.worker_name and connection.exists(alive_key(job.worker_name)):
                continue
            registry.remove_executions(job)
            recovered.append(_requeue(queue, job, worklist))
    recovered += _recover_popped(connection, worklist, stranded_after)
    recovered += release_overdue(connection)
    return recovered


# A live RQ scheduler moves a due job to its queue within a second or two.
OVERDUE_AFTER_SECONDS = 15


def release_overdue(connection: redis.Redis, *,
                    overdue_after: float = OVERDUE_AFTER_SECONDS) -> list[str]:
    """Queue the jobs waiting for a retry (or for RQ's own handling of an abandoned job)
    whose time is ``overdue_after`` seconds past; returns their ids.

    RQ's scheduler runs inside one worker at a time, under a lock. When that worker is
    killed, the lock outlives it and the other workers try to take it over only every few
    minutes; until then a study whose retry is due would wait. Each job is claimed by
    removing it from the registry first, so a job is queued once even when the scheduler
    comes back at the same moment.
    """
    released = []
    cutoff = int(time.time() - overdue_after)
    for queue in queues(connection):
        registry = ScheduledJobRegistry(queue=queue)
        for job_id in registry.get_jobs_to_schedule(cutoff):
            if not connection.zrem(registry.key, job_id):
                continue  # the scheduler took it meanwhile
            job = _fetch(connection, job_id)
            if job is None:
                continue
            queue.enqueue_job(job)
            log.warning("job %s: its retry was overdue (RQ's scheduler is not running); "
                        "queued", job_id)
            released.append(job_id)
    return released


def _recover_popped(connection: redis.Redis, worklist: Worklist,
                    stranded_after: int) -> list[str]:
    """Jobs of studies still waiting on the worklist that are on no queue and in no registry.

    A worker serving several queues takes a job with BLPOP; killed before it registers the
    job as started, it leaves the job nowhere. Such a job is queued again once it has been
    seen nowhere twice, ``stranded_after`` seconds apart.
    """
    recovered = []
    by_name = {q.name: q for q in queues(connection)}
    for status in (StudyStatus.QUEUED, StudyStatus.ANALYSING):
        for item in worklist.with_facet(f"status:{status.value}"):
            job = _fetch(connection, item.job_id) if item.job_id else None
            if job is None and item.job_id and status is StudyStatus.QUEUED:
                # Shown as queued, but its job was never created (the watcher stopped, or
                # Redis went away, between writing the item and enqueueing): create it.
                if _stranded(connection, item.job_id, stranded_after):
                    recovered.append(_enqueue_missing(connection, item))
                continue
            if job is None or job.get_status(refresh=False) not in (JobStatus.QUEUED,
                                                                    JobStatus.STARTED):
                continue
            queue = by_name.get(job.origin)
            if queue is None or _somewhere(connection, queue, job):
                connection.delete(_missing_key(job.id))
                continue
            if _stranded(connection, job.id, stranded_after):
                recovered.append(_requeue(queue, job, worklist))
    return recovered


def _stranded(connection: redis.Redis, job_id: str, stranded_after: int) -> bool:
    """Whether a job missing now was already missing ``stranded_after`` seconds ago."""
    marker = _missing_key(job_id)
    if connection.set(marker, "1", nx=True, ex=stranded_after * 4):
        return False  # first sighting: it may be between two places right now
    if int(connection.ttl(marker)) > stranded_after * 3:  # type: ignore[arg-type]
        return False
    connection.delete(marker)
    return True


def _enqueue_missing(connection: redis.Redis, item: WorklistItem) -> str:
    queue = QueueName.URGENT if item.priority.rank < PriorityClass.ROUTINE.rank else (
        QueueName.DEFAULT)
    enqueue_analysis(connection, get_settings(), queue=queue, job_id=item.job_id,
                     orthanc_id=item.orthanc_id, study_instance_uid=item.study_instance_uid,
                     inputs=item.inputs)
    log.warning("study %s: queued without a job; job created", pseudonym(
        item.study_instance_uid))
    return item.job_id


def _somewhere(connection: redis.Redis, queue: Queue, job: Job) -> bool:
    """Whether the job is where some process will run it: on its queue, waiting for its
    retry, or started by a worker that is alive. RQ's list of jobs just taken off a queue
    (``<queue>:intermediate``) does not count: a worker killed there (or while Redis
    restarted under it) leaves the job to RQ's own clean-up, minutes later, which fails it
    without the study's failure being recorded."""
    if connection.lpos(queue.key, job.id) is not None:
        return True
    if job.id in ScheduledJobRegistry(queue=queue):
        return True
    if job.id in StartedJobRegistry(queue=queue):
        worker = job.worker_name
        return bool(worker) and bool(connection.exists(alive_key(str(worker))))
    return False


def _missing_key(job_id: str) -> str:
    return f"triage:missing-job:{job_id}"


def _fetch(connection: redis.Redis, job_id: str) -> Job | None:
    try:
        return Job.fetch(job_id, connection=connection)
    except NoSuchJobError:
        return None


def _requeue(queue: Queue, job: Job, worklist: Worklist) -> str:
    # Out of RQ's lists of taken and started jobs first, so that its clean-up never fails
    # or retries the job again behind the run queued here.
    started = StartedJobRegistry(queue=queue)
    raw = cast(list[bytes], queue.connection.zrange(started.key, 0, -1))
    entries = [entry for entry in raw if started.parse_job_id(entry.decode()) == job.id]
    if entries:
        queue.connection.zrem(started.key, *entries)
    queue.connection.lrem(queue.intermediate_queue_key, 0, job.id)
    queue.enqueue_job(job, at_front=True)
    study_uid, inputs = str(job.args[1]), str(job.args[2])
    worklist.update(study_uid, lambda item: item.model_copy(update={
        "status": StudyStatus.QUEUED,
        "status_reason": "the worker stopped during the analysis; analysing again"})
        if item.inputs == inputs and not item.status.terminal else None, event="status")
    log.warning("study %s: job of a stopped worker queued again", pseudonym(study_uid))
    return job.id
