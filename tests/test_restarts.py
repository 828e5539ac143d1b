"""Restarting the watcher and a worker in the middle of a batch loses and repeats nothing."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from tests.conftest import Servers
from tests.senders import storescu
from tests.studies import ct_studies
from tests.test_pipeline import our_srs
from triage.servers import ManagedProcess
from triage.worklist import StudyStatus, Worklist

pytestmark = pytest.mark.servers
BATCH = 24


def triage_process(servers: Servers, command: str, log_dir: Path) -> ManagedProcess:
    process = ManagedProcess(command, [sys.executable, "-m", "triage.cli", command],
                             log_dir / f"{command}-{id(log_dir)}.log", env=servers.env)
    process.start()
    return process


def test_watcher_and_worker_restarts_mid_batch(clean_servers: Servers, tmp_path: Path) -> None:
    servers = clean_servers
    worklist = Worklist(servers.redis)
    studies = ct_studies(tmp_path, BATCH, tag="restart")
    half = BATCH // 2

    watcher = triage_process(servers, "watcher", tmp_path)
    worker = triage_process(servers, "worker", tmp_path)
    try:
        storescu(servers.settings, [p for s in studies[:half] for p in s])
        servers.wait_until(lambda: worklist.page()[1] >= 3, what="first studies queued")
        # The watcher dies without warning; studies keep arriving while it is down.
        watcher.signal(signal.SIGKILL)
        watcher.stop()
        storescu(servers.settings, [p for s in studies[half:] for p in s])
        watcher = triage_process(servers, "watcher", tmp_path)

        def analysed() -> int:
            return sum(i.status is StudyStatus.ANALYSED for i in worklist.page(1000)[0])

        servers.wait_until(lambda: analysed() >= 2, what="first analyses")
        # A worker restart mid-batch: SIGTERM lets it finish its current study first.
        worker.stop()
        assert analysed() < BATCH, "the batch ended before the worker restart"
        worker = triage_process(servers, "worker", tmp_path)
        servers.wait_until(lambda: analysed() == BATCH, timeout=120, what="every study analysed")
    finally:
        for process in (watcher, worker):
            process.stop()

    items, total = worklist.page(1000)
    assert total == BATCH
    for item in items:
        assert item.status is StudyStatus.ANALYSED, item.status_reason
        assert item.analysis_runs == 1, f"{item.patient_id} analysed {item.analysis_runs} times"
        assert len(our_srs(servers, item)) == 1
