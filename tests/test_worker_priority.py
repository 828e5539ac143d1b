"""A worker process analyses at a lower CPU priority, as batch work, than Orthanc receives
images at."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from rq import Worker

from tests.conftest import Servers
from tests.test_restarts import triage_process

pytestmark = pytest.mark.servers


def _nice(pid: int) -> int:
    # /proc/PID/stat after the command: state is field 3; nice is field 19.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[16])


def _policy(pid: int) -> int:
    return os.sched_getscheduler(pid)


@pytest.mark.parametrize("nice", [0, 7])
def test_worker_runs_at_the_configured_nice_level(clean_servers: Servers, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  nice: int) -> None:
    servers = clean_servers
    monkeypatch.setitem(servers.env, "TRIAGE_WORKER_NICE", str(nice))
    worker = triage_process(servers, "worker", tmp_path)
    try:
        servers.wait_until(lambda: len(Worker.all(connection=servers.redis)) == 1,
                           what="the worker to register")
        assert worker.pid is not None and _nice(worker.pid) == nice
        expected = os.SCHED_BATCH if nice else os.SCHED_OTHER
        assert _policy(worker.pid) == expected
        assert _nice(servers.orthanc_process.pid or 0) == 0
        assert _policy(servers.orthanc_process.pid or 0) == os.SCHED_OTHER
    finally:
        worker.stop()
