"""The RQ queues of the service and how an analysis is enqueued.

Every worker serves ``urgent`` before ``default`` before ``bulk`` (DESIGN.md, "Priorities"):
urgent work never waits behind a backlog of routine work. ``shadow`` comes last: the
analyses of model versions on trial run only when nothing else waits.
"""

from __future__ import annotations

from enum import Enum

import redis
from redis.client import Pipeline
from rq import Queue, Retry
from rq.job import Job, JobStatus

from triage.settings import Settings

# Waits between retries of a transient failure (Orthanc or Redis briefly unreachable).
RETRY_INTERVALS = [5, 15, 60]
# How long RQ keeps finished and failed jobs (seconds): long enough for admins to look.
RESULT_TTL = 24 * 3600
FAILURE_TTL = 14 * 24 * 3600


class QueueName(str, Enum):
    URGENT = "urgent"
    DEFAULT = "default"
    BULK = "bulk"
    SHADOW = "shadow"


QUEUE_ORDER = (QueueName.URGENT, QueueName.DEFAULT, QueueName.BULK, QueueName.SHADOW)
# Images analysed as they arrive (``triage.streaming``): served after the analyses of complete
# studies (urgent, default) and before re-analyses (bulk). Kept out of ``QUEUE_ORDER``: its
# jobs are not analyses of studies (recovery, metrics and autoscaling count those), and a
# lost one costs nothing (the analysis at stability computes what it did not).
STREAM_QUEUE = "stream"
# A finished streaming job is of no interest for long.
STREAM_RESULT_TTL = 60

# The periodic drift and volume checks: served by every worker after all the analysis queues,
# and kept apart from them so that the check scheduled for the next slot never counts as
# analysis work waiting (metrics, autoscaling).
VIGILANCE_QUEUE = "vigilance"


def queues(connection: redis.Redis) -> list[Queue]:
    """The service's queues in the order workers serve them."""
    return [Queue(name.value, connection=connection) for name in QUEUE_ORDER]


def job_pending(connection: redis.Redis, job_id: str) -> bool:
    """True when the job exists and has not ended (queued, started, scheduled for retry)."""
    try:
        job = Job.fetch(job_id, connection=connection)
    except Exception:  # noqa: BLE001 - rq raises NoSuchJobError or a deserialisation error
        return False
    return job.get_status(refresh=False) in (
        JobStatus.QUEUED, JobStatus.STARTED, JobStatus.SCHEDULED, JobStatus.DEFERRED,
    )


def enqueue_analysis(connection: redis.Redis, settings: Settings, *, queue: QueueName,
                     job_id: str, orthanc_id: str, study_instance_uid: str,
                     inputs: str, pipeline: Pipeline | None = None) -> Job:
    """Enqueue ``triage.jobs.analyse_study`` under a deterministic job id; with a
    ``pipeline`` (in MULTI), as part of the caller's transaction."""
    retries = settings.job_retries
    return Queue(queue.value, connection=connection).enqueue(
        "triage.jobs.analyse_study",
        orthanc_id, study_instance_uid, inputs,
        job_id=job_id,
        job_timeout=settings.job_timeout,
        result_ttl=RESULT_TTL,
        failure_ttl=FAILURE_TTL,
        retry=Retry(max=retries, interval=RETRY_INTERVALS[:retries] or [0]) if retries else None,
        description=f"analyse study {orthanc_id}",
        pipeline=pipeline,
    )


def enqueue_shadow(connection: redis.Redis, settings: Settings, *, orthanc_id: str,
                   study_instance_uid: str, inputs: str, model_id: str, version: str) -> Job:
    """Enqueue ``triage.jobs.analyse_shadow`` of one shadow version on one study, on the
    lowest queue. Not retried: a shadow analysis lost to an outage is a missing pair in the
    comparison, never a missing result."""
    return Queue(QueueName.SHADOW.value, connection=connection).enqueue(
        "triage.jobs.analyse_shadow",
        orthanc_id, study_instance_uid, inputs, model_id, version,
        job_timeout=settings.job_timeout,
        result_ttl=RESULT_TTL,
        failure_ttl=FAILURE_TTL,
        description=f"shadow analysis of study {orthanc_id} by {model_id} {version}",
    )


def worker_queues(connection: redis.Redis) -> list[Queue]:
    """Every queue a worker serves, in the order it serves them."""
    ordered = queues(connection)
    at = [q.name for q in ordered].index(QueueName.BULK.value)
    return [*ordered[:at], Queue(STREAM_QUEUE, connection=connection), *ordered[at:],
            Queue(VIGILANCE_QUEUE, connection=connection)]


def enqueue_stream(connection: redis.Redis, settings: Settings, *, study_id: str,
                   study_instance_uid: str, series_id: str, instance_ids: list[str],
                   pipeline: Pipeline | None = None) -> Job:
    """Enqueue ``triage.streaming.arrivals.analyse_arrivals`` of a batch of images of one
    series. Never retried: what it did not do, the analysis at stability does."""
    return Queue(STREAM_QUEUE, connection=connection).enqueue(
        "triage.streaming.arrivals.analyse_arrivals",
        study_id, study_instance_uid, series_id, instance_ids,
        job_timeout=min(settings.job_timeout, 120),
        result_ttl=STREAM_RESULT_TTL,
        failure_ttl=3600,
        description=f"stream {len(instance_ids)} images of series {series_id}",
        pipeline=pipeline,
    )
