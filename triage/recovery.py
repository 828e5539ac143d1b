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

import redis
from rq.exceptions import NoSuchJobError
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.registry import StartedJobRegistry

from triage.logs import pseudonym
from triage.queues import queues
from triage.worklist import StudyStatus, Worklist

log = logging.getLogger(__name__)

ALIVE_TTL_SECONDS = 15
HEARTBEAT_SECONDS = 5
# A job taken off a queue but not yet registered as started belongs to nobody for a moment;
# only one still unclaimed this long after it was first seen is stranded.
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


def recover_abandoned(connection: redis.Redis) -> list[str]:
    """Queue again every job whose worker is no longer alive; returns their ids."""
    recovered = []
    worklist = Worklist(connection)
    for queue in queues(connection):
        registry = StartedJobRegistry(queue=queue)
        started = registry.get_job_ids(cleanup=False)
        for job_id in started:
            job = _fetch(connection, job_id)
            if job is None or job.get_status(refresh=False) != JobStatus.STARTED:
                continue
            if job.worker_name and connection.exists(alive_key(job.worker_name)):
                continue
            registry.remove_executions(job)
            recovered.append(_requeue(queue, job, worklist))
        intermediate = IntermediateQueue(queue.key, connection=connection)
        for job_id in intermediate.get_job_ids():
            if job_id in started:
                continue
            seen = f"triage:stranded:{job_id}"
            if connection.set(seen, "1", nx=True, ex=STRANDED_AFTER_SECONDS * 4):
                continue  # first sighting: it may be on its way to the started registry
            if connection.ttl(seen) > STRANDED_AFTER_SECONDS * 3:
                continue
            job = _fetch(connection, job_id)
            intermediate.remove(job_id)
            if job is not None and job.get_status(refresh=False) in (JobStatus.QUEUED,
                                                                    JobStatus.STARTED):
                recovered.append(_requeue(queue, job, worklist))
    return recovered


def _fetch(connection: redis.Redis, job_id: str) -> Job | None:
    try:
        return Job.fetch(job_id, connection=connection)
    except NoSuchJobError:
        return None


def _requeue(queue: Queue, job: Job, worklist: Worklist) -> str:
    queue.enqueue_job(job, at_front=True)
    study_uid, inputs = str(job.args[1]), str(job.args[2])
    worklist.update(study_uid, lambda item: item.model_copy(update={
        "status": StudyStatus.QUEUED,
        "status_reason": "the worker stopped during the analysis; analysing again"})
        if item.inputs == inputs and not item.status.terminal else None, event="status")
    log.warning("study %s: job of a stopped worker queued again", pseudonym(study_uid))
    return job.id
