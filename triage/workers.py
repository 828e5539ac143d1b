"""The analysis worker: an RQ worker serving urgent, default and bulk, in that order.

Jobs run in the worker process itself (no fork per job), so the onnxruntime sessions loaded at
start are reused by every study.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from rq.job import Job
from rq.queue import Queue
from rq.worker import SimpleWorker

from triage.jobs import WorkerContext, context
from triage.queues import worker_queues
from triage.recovery import Heartbeat

log = logging.getLogger(__name__)

# How often an idle worker looks up from waiting on Redis to see whether it should stop.
STOP_CHECK_SECONDS = 1


class AnalysisWorker(SimpleWorker):
    """A worker whose SIGTERM never strands a study.

    RQ's warm shutdown raises out of the dequeue call when the worker is not marked busy,
    which can drop a job that was just taken off the queue. Here a stop request only sets a
    flag: the current study is finished, and the worker waits on Redis in short slices so it
    notices the flag within ``STOP_CHECK_SECONDS`` when idle.
    """

    def work(self, *args: Any, **kwargs: Any) -> bool:
        heartbeat = Heartbeat(self.connection, self.name)
        heartbeat.start()
        try:
            return super().work(*args, **kwargs)
        finally:
            heartbeat.stop()

    def _shutdown(self) -> None:
        self._stop_requested = True
        if self.scheduler:
            self.stop_scheduler()

    def dequeue_job_and_maintain_ttl(self, timeout: int | None,
                                     max_idle_time: int | None = None
                                     ) -> tuple[Job, Queue] | None:
        if timeout is None:  # burst mode: take what is queued, never wait
            return super().dequeue_job_and_maintain_ttl(None, max_idle_time)
        while not self._stop_requested:
            result = super().dequeue_job_and_maintain_ttl(STOP_CHECK_SECONDS,
                                                          max_idle_time=STOP_CHECK_SECONDS)
            if result is not None:
                return result
        return None


def lower_priority(nice: int) -> None:
    """Give up ``nice`` steps of CPU priority (never regained by this process), and mark the
    process as batch work.

    Analysis is advisory and can wait a moment; receiving images cannot. Orthanc stores a
    study one C-STORE at a time, so what slows it is having to wait for a core each time it
    wakes: at the default of 10, Orthanc gets about ten times a worker's share of a busy CPU,
    and as batch work (SCHED_BATCH) a worker never preempts it on waking. Unlike an idle-only
    policy this cannot starve analysis on a server kept busy by something else, and an idle
    server still gives a worker every cycle it wants.
    """
    if nice <= 0:
        return
    current = os.nice(0)
    if nice > current:
        os.nice(nice - current)
    if hasattr(os, "SCHED_BATCH"):  # Linux
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


def _schedule_vigilance(ctx: WorkerContext) -> None:
    """Make sure the next drift and volume checks are scheduled (every worker asks; the
    slot's job is created once). Never stops a worker from starting."""
    from triage.vigilance.drift import schedule_check

    try:
        schedule_check(ctx.redis, ctx.settings)
    except Exception as exc:
        log.warning("vigilance checks not scheduled (%s)", type(exc).__name__)


def run_worker(*, burst: bool = False, name: str | None = None) -> bool:
    """Work until stopped (or, with ``burst``, until the queues are empty)."""
    ctx = context()
    loaded = ", ".join(f"{p.identity.id} {p.identity.version}" for p in ctx.registry.packages)
    log.info("worker ready with models: %s", loaded or "none")
    if not burst:  # a burst worker drains the queues and leaves nothing scheduled behind
        _schedule_vigilance(ctx)
    worker = AnalysisWorker(worker_queues(ctx.redis), connection=ctx.redis, name=name)
    return worker.work(burst=burst, with_scheduler=True, logging_level="WARNING")
