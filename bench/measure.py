"""Measurements taken from the running stack: time-to-notification and its parts, worker
memory, and summary statistics."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import redis
from rq.job import Job

from triage.worklist import StudyStatus, Worklist

# The parts of a time-to-notification, in pipeline order; they add up to ``ttn``.
TTN_PARTS = ("stable_wait", "queue_wait", "fetch", "decode", "inference", "sr_build", "store",
             "other")
TIMING_PARTS = ("fetch", "decode", "inference", "sr_build", "store")


def summary(values: Sequence[float]) -> dict[str, float | int]:
    """n, p50, p95, p99, max and mean of ``values`` (seconds or whatever they are)."""
    if not values:
        return {"n": 0, "p50": float("nan"), "p95": float("nan"), "p99": float("nan"),
                "max": float("nan"), "mean": float("nan")}
    array = np.asarray(values, dtype=float)
    return {"n": len(array), "p50": float(np.percentile(array, 50)),
            "p95": float(np.percentile(array, 95)), "p99": float(np.percentile(array, 99)),
            "max": float(array.max()), "mean": float(array.mean())}


def _epoch(value: datetime | None) -> float:
    if value is None:
        return float("nan")
    if value.tzinfo is None:  # RQ stores UTC
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def wait_analysed(worklist: Worklist, study_uids: Sequence[str], timeout: float,
                  alive: Callable[[], None] | None = None) -> dict[str, str]:
    """Wait until every study is terminal; returns the final status of each.

    Reads the status index sets (one call per terminal status, whatever the number of
    studies), so that waiting for hundreds of studies takes no CPU from the pipeline being
    measured. Times come from the items (``analysed_at``), not from when this noticed.
    """
    pending = list(study_uids)
    final: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    interval = 0.02 if len(pending) <= 10 else 0.25
    terminal = [s.value for s in StudyStatus if s.terminal]
    while pending:
        for status in terminal:
            members = worklist.in_facet(f"status:{status}", pending)
            final.update((uid, status) for uid, done in zip(pending, members, strict=True)
                         if done)
            pending = [uid for uid, done in zip(pending, members, strict=True) if not done]
        if not pending:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} studies not analysed within {timeout:.0f} s")
        if alive is not None:
            alive()
        time.sleep(interval)
    return final


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User and system CPU seconds of each named process with its living descendants, from
    one reading of /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    used: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue  # ended while being read
        # After the command: state, ppid, ..., utime (12th), stime (13th).
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        used[int(entry.name)] = (int(fields[11]) + int(fields[12])) / ticks

    def tree(pid: int) -> float:
        return used.get(pid, 0.0) + sum(tree(child) for child in children.get(pid, []))

    return {name: tree(pid) for name, pid in pids.items()}


def ttn_breakdown(connection: redis.Redis, study_uid: str, acked: float) -> dict[str, float]:
    """Time from the last C-STORE acknowledged (``acked``, epoch seconds) to the worklist
    item ``analysed``, and its parts:

    - ``stable_wait``: until the watcher enqueued the job (the stable age, the watcher's
      poll interval and its reading of the study);
    - ``queue_wait``: RQ ``enqueued_at`` to ``started_at``;
    - ``fetch`` (until the last instance is downloaded), ``decode`` (decoding not hidden
      behind the downloads, and stacking), ``inference``, ``sr_build`` (the SR built and
      encoded), ``store`` (Orthanc storing it): the item's ``results[].timings``, summed
      over models;
    - ``other``: the rest of the job until ``analysed_at`` (study snapshot, size check, model
      selection, worklist writes).
    """
    item = Worklist(connection).get(study_uid)
    if item is None or item.status is not StudyStatus.ANALYSED or item.analysed_at is None:
        raise ValueError(f"study {study_uid} is not analysed")
    job = Job.fetch(item.job_id, connection=connection)
    enqueued, started = _epoch(job.enqueued_at), _epoch(job.started_at)
    analysed = item.analysed_at.timestamp()
    parts = {name: sum(r.timings.get(name, 0.0) for r in item.results) for name in TIMING_PARTS}
    record = {"ttn": analysed - acked, "stable_wait": enqueued - acked,
              "queue_wait": started - enqueued, **parts}
    record["other"] = analysed - started - sum(parts.values())
    return record


def breakdown_summary(records: Sequence[dict[str, float]]) -> dict[str, dict[str, float | int]]:
    keys = ("ttn", *TTN_PARTS)
    return {key: summary([r[key] for r in records]) for key in keys}


def vm_rss_kib(pid: int) -> int:
    """Resident set size of a process (VmRSS in /proc/PID/status), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ValueError(f"no VmRSS for PID {pid}")


class MemorySampler(threading.Thread):
    """Samples the workers' VmRSS each time ``every`` more studies have been analysed."""

    def __init__(self, connection: redis.Redis, pids: Sequence[int], every: int) -> None:
        super().__init__(daemon=True)
        self.worklist = Worklist(connection)
        self.pids = list(pids)
        self.every = every
        self.base = self.analysed()
        self.samples: list[dict[str, object]] = []
        self.stopping = threading.Event()

    def analysed(self) -> int:
        return self.worklist.count_facet(f"status:{StudyStatus.ANALYSED.value}")

    def sample(self, done: int) -> None:
        rss = {str(pid): vm_rss_kib(pid) for pid in self.pids}
        self.samples.append({"analysed": done, "rss_kib": rss, "at": time.time()})

    def run(self) -> None:
        self.sample(0)
        next_mark = self.every
        while not self.stopping.wait(0.2):
            done = self.analysed() - self.base
            if done >= next_mark:
                self.sample(done)
                next_mark = (done // self.every + 1) * self.every

    def stop(self) -> None:
        self.stopping.set()
        self.join()
        self.sample(self.analysed() - self.base)
