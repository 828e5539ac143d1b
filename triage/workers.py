"""The analysis worker: an RQ worker serving urgent, default and bulk, in that order.

Jobs run in the worker process itself (no fork per job), so the onnxruntime sessions loaded at
start are reused by every study.
"""

from __future__ import annotations

import logging

from rq.worker import SimpleWorker

from triage.jobs import context
from triage.queues import queues

log = logging.getLogger(__name__)


def run_worker(*, burst: bool = False, name: str | None = None) -> bool:
    """Work until stopped (or, with ``burst``, until the queues are empty)."""
    ctx = context()
    loaded = ", ".join(f"{p.identity.id} {p.identity.version}" for p in ctx.registry.packages)
    log.info("worker ready with models: %s", loaded or "none")
    worker = SimpleWorker(queues(ctx.redis), connection=ctx.redis, name=name)
    return worker.work(burst=burst, with_scheduler=True, logging_level="WARNING")
