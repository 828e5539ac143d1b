"""Worklist requests against the API (``triage api``) from ``wrk``, many connections at once.

The load comes from wrk (Debian's package, written in C) rather than from Python: at a
thousand pages a second, a Python client parsing each 100-item answer would take as much of
the two cores as the server it measures. wrk reports latencies from its HdrHistogram through
the Lua ``done`` hook below, as one line of JSON.
"""

from __future__ import annotations

import json
import random
import subprocess
import tempfile
import threading
import uuid
from datetime import timedelta
from pathlib import Path

from triage.priority import PriorityClass
from triage.worklist import StudyStatus, Worklist, WorklistItem, utcnow

WORKLIST_PATH = "/api/v1/worklist"
WRK_THREADS = 2

# ``TRIAGE_BENCH_THINK_MS``: after each answer a connection waits a random time with this
# mean (exponentially distributed, as the pauses of people working independently are)
# before its next request; 0: back to back. A fixed wait would keep all the connections in
# step, every request arriving in one burst with the 49 others.
_SCRIPT = r"""
local think = tonumber(os.getenv("TRIAGE_BENCH_THINK_MS") or "0")
function init(args)
  math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)") or "0", 16))
end
if think > 0 then
  function delay() return math.floor(-think * math.log(1 - math.random())) end
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"p50": %.1f, "p95": %.1f, "p99": %.1f, "max": %.1f, "mean": %.1f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99),
    latency.max, latency.mean))
end
"""


def index_studies(worklist: Worklist, target: int) -> int:
    """Put items with ``Worklist.put`` until the worklist holds ``target`` studies; returns
    how many were added. Classes, statuses and modalities are mixed as on a real list."""
    have = int(worklist.redis.zcard("triage:worklist"))
    now = utcnow()
    classes = (PriorityClass.ROUTINE,) * 8 + (PriorityClass.URGENT,) * 2 + (
        PriorityClass.CRITICAL,)
    statuses = (StudyStatus.ANALYSED,) * 6 + (StudyStatus.QUEUED, StudyStatus.SKIPPED)
    added = 0
    for n in range(max(0, target - have)):
        priority = classes[n % len(classes)]
        worklist.put(WorklistItem(
            study_instance_uid=f"2.25.{uuid.uuid4().int}", orthanc_id=uuid.uuid4().hex,
            accession_number=f"BL{n:08d}", patient_name=f"LOAD^{n}", patient_id=f"L{n}",
            modality=("CT", "CR", "MR", "DX")[n % 4], study_description="LOAD TEST",
            status=statuses[n % len(statuses)], clinical_priority=PriorityClass.ROUTINE,
            priority=priority, received_at=now - timedelta(seconds=n * 7),
        ))
        added += 1
    return added


def run_load(base_url: str, token: str, *, clients: int, seconds: float,
             think: float = 0.0) -> dict[str, object]:
    """``clients`` connections requesting the worklist (first page, default size) for
    ``seconds``; after each answer a connection waits ``think`` seconds on average before
    asking again (0: back to back). Returns wrk's counts, errors and latencies
    (microseconds)."""
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "worklist.lua"
        script.write_text(_SCRIPT)
        argv = ["wrk", f"-t{min(WRK_THREADS, clients)}", f"-c{clients}",
                f"-d{max(1, round(seconds))}s", "--timeout", "10s", "-s", str(script),
                "-H", f"Authorization: Bearer {token}", base_url + WORKLIST_PATH]
        done = subprocess.run(argv, capture_output=True, text=True, check=True,
                              env={"TRIAGE_BENCH_THINK_MS": str(round(think * 1000)),
                                   "PATH": "/usr/bin:/bin"})
    line = next(x for x in done.stdout.splitlines() if x.startswith('{"requests"'))
    return json.loads(line)


class Changes(threading.Thread):
    """Changes one indexed study ``per_second`` times a second (its score), so that every
    page cached before is out of date, as on a busy worklist."""

    def __init__(self, worklist: Worklist, per_second: float) -> None:
        super().__init__(daemon=True)
        self.worklist = worklist
        self.interval = 1.0 / per_second
        self.stopping = threading.Event()
        self.count = 0

    def run(self) -> None:
        uids = [u.decode() for u in self.worklist.redis.zrange("triage:worklist", 0, 499)]
        while not self.stopping.wait(self.interval):
            self.worklist.update(random.choice(uids), lambda item: item.model_copy(
                update={"score": random.random()}))
            self.count += 1

    def stop(self) -> int:
        self.stopping.set()
        self.join()
        return self.count
