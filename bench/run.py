"""``make bench``: the service's performance on this machine, against its targets.

Runs a local stack (real Orthanc and Redis, the watcher, two workers and the API as
subprocesses, on free ports in a temporary data directory), sends real DICOM with dcmtk's
``storescu`` and writes ``<output>/latest.json``, ``<output>/summary.md`` and PNG plots.
``--smoke`` runs every section with tiny counts (for the test suite); its numbers mean nothing.

Results JSON (``latest.json``); every duration is in seconds unless its name says otherwise:

    schema: 1
    smoke: bool
    started_at, finished_at: ISO 8601 UTC
    machine: {nproc, cpu_model, ram_gib, debian, python, orthanc, redis, onnxruntime,
              git_commit, git_dirty}
    config: the counts used (see ``Config``)
    models: {reference_model, radiograph_model, radiograph_model_gmacs,
             radiograph_model_megabytes}
    sections:
      ttn:         {stable_age, radiograph: TTN, head_ct: TTN}
                   TTN = {target_p95, met, studies, slices,
                          summary: {ttn|stable_wait|queue_wait|fetch|decode|inference|
                                    sr_build|store|other: STATS},
                          records: [{ttn, stable_wait, ..., other}]}
                   STATS = {n, p50, p95, p99, max, mean}
      efficiency:  {target_ratio, met, ratio, studies, processes,
                    pipeline: {studies_per_second, seconds, mean_parts: {fetch, decode,
                               inference, sr_build, store, other},
                               cpu_seconds_per_study: {orthanc, redis, watcher, worker-N,
                                                       api, bench}},
                    limit: {studies_per_second, seconds, mean_seconds_per_study}}
      urgent_backlog: {target_ratio, met, ratio, backlog, backlog_left_when_stat_analysed,
                       alone: {summary: STATS, records: [...]}, under_backlog: {ttn record}}
      ingest:      {target_ratio, met, ratio, series, slices_per_series,
                    alone: INGEST, with_service: INGEST}
                   INGEST = {instances, megabytes, seconds, instances_per_second,
                             megabytes_per_second, cpu_seconds: {process: s}}
      api:         {target_p99_ms, met, paced_met, under_change_met, indexed, clients,
                    items_per_page, load_generator,
                    closed_loop: LOAD + {cpu_ms_per_request: {api, redis}},
                    paced: LOAD, under_change: LOAD + {changes, changes_per_second},
                    capacity: [LOAD with think_seconds 0.1, 0.05, 0.02]}
                   LOAD = {think_seconds, requests, requests_per_second, errors,
                           error_kinds, latency_ms: STATS}
      memory:      {met, studies, every, growth_limit_percent,
                    workers: {pid: {warm_kib, last_kib, max_kib, growth_percent,
                                    slope_kib_per_100_studies}},
                    samples: [{analysed, rss_kib: {pid: kib}, at}]}
      web:         {target_seconds, met, first_page_met, live_change_met, studies, added,
                    made_realistic, page_size, browser, viewport,
                    first_page: {met, loads, rows, html_bytes, cold: LOAD,
                                 summary: STATS, in_page: STATS,
                                 navigation: {response_start|response_end|
                                              dom_content_loaded|load|
                                              first_contentful_paint: STATS},
                                 records: [LOAD]},
                    live_change: {met, changes, interval_seconds, change, summary: STATS,
                                  painted: STATS,
                                  records: [{uid, seconds, painted_seconds, rank_after}],
                                  off_page: {ok, change, counts_seconds, counts, rows_kept,
                                             not_reloaded, shown, live_state}}}
                   LOAD = {seconds, in_page_seconds, response_start, response_end,
                           dom_content_loaded, load, first_contentful_paint, html_bytes, rows}
                   (the worklist page in Chromium: see bench/web.py; STATS of first_page
                   are over the loads after the cold one)
      shadow:      {model, active_version, trial_version, trial_threshold, studies, slices,
                    interval_seconds, states_seconds, p95_ratio,
                    without: PHASE (the trial version retired),
                    with: PHASE (the trial version in shadow)}
                   PHASE = {trial_state, studies, ttn: STATS (of the active result),
                            summary: {ttn|stable_wait|...|other: STATS}, records: [...],
                            shadow_analyses, shadow_drain_seconds, one_sr_each,
                            sr_counts: {n_srs: studies}}
                   (head CT studies sent one every interval_seconds without waiting for
                   the previous; shadow_analyses counts the rows of role 'shadow' in
                   PostgreSQL's analyses for the phase's studies, once the shadow queue has
                   drained, taking shadow_drain_seconds after the last active result)
      streaming:   {stable_age, pace_images_per_second,
                    goals: {flag_after_first_over_threshold, negative_ttn_p95,
                            radiograph_ttn_p95, ingest_ratio, efficiency_ratio},
                    off: MODE, on: MODE}   (TRIAGE_STREAMING false, then true)
                   MODE = {streaming: bool,
                           positive: {studies, slices, bleed: [first, last slice],
                                      flag_after_first_over_threshold,
                                      flag_after_last_slice (the largest of the studies;
                                      negative when the flag came before the last slice),
                                      summary: {flag_after_...: STATS},
                                      records: [{uid, flag_source (preliminary|analysis),
                                                 flag_after_first_over_threshold,
                                                 flag_after_last_slice, seen_after_flag,
                                                 arriving_when_seen, sent_seconds,
                                                 analysed_after_last_slice: TTN record,
                                                 key_slice, reasons, preliminary?}]},
                           negative: {studies, slices, summary: STATS (of ttn),
                                      parts: {stable_wait|...|other: STATS}, records},
                           radiograph: {studies, summary: STATS (of ttn), parts, records},
                           ingest_ratio, ingest: {round_ratios, series, slices_per_series,
                                                  cpu_seconds: {alone, with_service}},
                           efficiency_ratio, efficiency: {studies,
                               pipeline_studies_per_second, limit_studies_per_second,
                               mean_parts, cpu_seconds_per_study},
                           met: {positive, negative, radiograph, ingest, efficiency}}
                   (head CTs sent one C-STORE at a time at pace_images_per_second; see
                   bench/streaming.py)

With ``--only``, the sections run are written to ``partial.json`` and also put into
``latest.json`` (created if absent) in place of the same sections there, the other sections'
numbers kept; ``partial_runs`` in it says when and at which commit each such section ran.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rq import Queue
from rq.job import Job
from rq.registry import StartedJobRegistry

from bench import api_load, report, streaming, web
from bench.limit import measure_limit
from bench.measure import (
    TIMING_PARTS,
    MemorySampler,
    breakdown_summary,
    ttn_breakdown,
    wait_analysed,
)
from bench.models import RADIOGRAPH_MODEL, TRIAL_THRESHOLD, write_models, write_trial_model
from bench.stack import WORKERS, BenchStack
from bench.studies import head_ct, radiograph
from triage.ingest import snapshot_study
from triage.queues import QueueName
from triage.registry import ModelRegistry
from triage.settings import PROJECT_ROOT
from triage.tokens import create_token
from triage.uids import derived_uid, sr_series_uid
from triage.vigilance import db, recording
from triage.vigilance.records import register_version, set_state
from triage.worklist import DEFAULT_PAGE_SIZE, StudyStatus, WorklistPage

DEFAULT_OUTPUT = PROJECT_ROOT / "bench" / "results"
SECTIONS = frozenset({"ingest", "ttn", "efficiency", "urgent_backlog", "memory", "api",
                      "web", "shadow", "streaming"})
MEMORY_GROWTH_LIMIT_PERCENT = 5.0
BENCH_ACTOR = "bench"  # who changes the version states in the shadow section


@dataclass(frozen=True)
class Config:
    stable_age: int = 2
    ttn_radiographs: int = 20
    ttn_head_cts: int = 5
    ct_slices: int = 300
    efficiency_studies: int = 200
    efficiency_rounds: int = 3
    stat_alone: int = 3
    backlog: int = 500
    memory_studies: int = 1000
    memory_every: int = 50
    ingest_series: int = 4
    ingest_rounds: int = 5
    api_indexed: int = 10_000
    api_clients: int = 50
    api_seconds: float = 30.0
    api_paced_seconds: float = 20.0
    api_think_seconds: float = 1.0
    api_changes_per_second: float = 20.0
    api_capacity_seconds: float = 10.0
    api_capacity_think_seconds: tuple[float, ...] = (0.1, 0.05, 0.02)
    web_studies: int = 10_000
    web_loads: int = 20
    web_changes: int = 30
    web_change_interval: float = 0.3
    shadow_studies: int = 20
    shadow_interval: float = 3.0
    streaming_slices: int = 300
    streaming_bleed: tuple[int, int] = (100, 121)  # range of the slices with a bleed
    streaming_pace: float = 25.0  # images per second, as a CT scanner sends them
    streaming_positives: int = 3
    streaming_negatives: int = 5
    streaming_radiographs: int = 10
    streaming_ingest_rounds: int = 3
    # The ingest and efficiency measures again, in each mode (their own sections check that
    # they work: the smoke run leaves them out here).
    streaming_reruns: bool = True


SMOKE = Config(stable_age=1, ttn_radiographs=2, ttn_head_cts=1, ct_slices=10,
               efficiency_studies=4, efficiency_rounds=1, stat_alone=1, backlog=5,
               memory_studies=10, memory_every=5, ingest_series=1, ingest_rounds=1,
               api_indexed=200, api_clients=5,
               api_seconds=2.0, api_paced_seconds=2.0, api_think_seconds=0.5,
               api_changes_per_second=5.0, api_capacity_seconds=1.0,
               api_capacity_think_seconds=(0.1,), web_studies=200, web_loads=3,
               web_changes=3, shadow_studies=1, shadow_interval=0.5,
               streaming_slices=40, streaming_bleed=(10, 16), streaming_positives=1,
               streaming_negatives=1, streaming_radiographs=1, streaming_ingest_rounds=1,
               streaming_reruns=False)


def study_uid(key: str) -> str:
    return derived_uid("bench-study", key)


class Bench:
    def __init__(self, config: Config, work: Path, *, trial: bool = False) -> None:
        self.config = config
        self.work = work
        self.files = work / "files"
        self.files.mkdir(parents=True)
        self.models_dir = work / "models"
        self.models = write_models(self.models_dir)
        # (model, installed version, version on trial) of the shadow section.
        self.trial = write_trial_model(self.models_dir) if trial else None
        self.stack = BenchStack(work / "data", self.models_dir, config.stable_age)
        self.tag = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
        self.sampler: MemorySampler | None = None

    @property
    def redis(self) -> Any:
        return self.stack.redis

    def key(self, kind: str, n: int) -> str:
        return f"{self.tag}-{kind}-{n}"

    def timeout(self, studies: int) -> float:
        return 120.0 + 2.0 * studies

    def alive(self) -> None:
        self.stack.check_alive()

    # -- sections --------------------------------------------------------------------------

    def ingest(self, mode: str) -> dict[str, Any]:
        """Sends ``ingest_series`` CT series back to back, one storescu each."""
        c = self.config
        series = [head_ct(self.files, self.key(f"ingest-{mode}", n), c.ct_slices)
                  for n in range(c.ingest_series)]
        size = sum(p.stat().st_size for files in series for p in files)
        cpu_before, children_before = self.stack.cpu_by_process(), _children_cpu()
        started = time.perf_counter()
        for files in series:
            self.stack.storescu(files)
        seconds = time.perf_counter() - started
        cpu_after = self.stack.cpu_by_process()
        # Who used the CPU while the images came in: storescu, Orthanc, and the service.
        cpu = {name: cpu_after[name] - cpu_before.get(name, 0.0) for name in cpu_after
               if name != "bench"}
        cpu["storescu"] = _children_cpu() - children_before
        instances = sum(len(files) for files in series)
        for files in series:
            shutil.rmtree(files[0].parent)
        return {"instances": instances, "megabytes": size / 2**20, "seconds": seconds,
                "instances_per_second": instances / seconds,
                "megabytes_per_second": size / 2**20 / seconds, "cpu_seconds": cpu}

    def ttn(self, kind: str, count: int, make: Any, target: float | None) -> dict[str, Any]:
        records = []
        for n in range(count):
            key = self.key(kind, n)
            files = make(key, n)
            acked = self.stack.storescu(files)
            uid = study_uid(key)
            final = wait_analysed(self.stack.worklist, [uid], self.timeout(len(files)),
                                  self.alive)
            if final[uid] != StudyStatus.ANALYSED.value:
                raise RuntimeError(f"{kind} study ended {final[uid]}: "
                                   f"{self.stack.worklist.get(uid)}")
            records.append(ttn_breakdown(self.redis, uid, acked))
            for path in files:
                path.unlink()
        stats = breakdown_summary(records)
        met = None if target is None else stats["ttn"]["p95"] <= target
        return {"target_p95": target, "met": met,
                "studies": count, "summary": stats, "records": records}

    def send_queued(self, keys: list[str], make: Any) -> None:
        """Send one study per key in one storescu association; wait until all are queued."""
        files = [p for n, key in enumerate(keys) for p in make(key, n)]
        for start in range(0, len(files), 100):  # storescu's command line stays short
            self.stack.storescu(files[start : start + 100])
        for path in files:
            path.unlink()
        worklist = self.stack.worklist
        uids = [study_uid(k) for k in keys]

        def queued() -> bool:
            return all((item := worklist.get(u)) is not None and item.job_id for u in uids)

        self.stack.wait_until(queued, self.timeout(len(keys)), "studies queued", interval=0.5)

    def efficiency(self) -> dict[str, Any]:
        """``efficiency_rounds`` rounds of pipeline then limit; the median round decides (one
        round on a shared virtual machine can be 15% off)."""
        c = self.config
        rounds = [self.efficiency_round(n) for n in range(c.efficiency_rounds)]
        median = sorted(rounds, key=lambda r: r["ratio"])[len(rounds) // 2]
        return {**median, "met": median["ratio"] >= 0.9,
                "rounds": [{"ratio": r["ratio"],
                            "pipeline_studies_per_second": r["pipeline"]["studies_per_second"],
                            "limit_studies_per_second": r["limit"]["studies_per_second"]}
                           for r in rounds]}

    def efficiency_round(self, round_number: int) -> dict[str, Any]:
        c = self.config
        self.stack.stop_workers()
        keys = [self.key(f"efficiency{round_number}", n) for n in range(c.efficiency_studies)]
        self.send_queued(keys, lambda key, n: radiograph(self.files, key, n))
        self.stack.start_workers()
        cpu_before = self.stack.cpu_by_process()
        uids = [study_uid(k) for k in keys]
        final = wait_analysed(self.stack.worklist, uids, self.timeout(len(uids)), self.alive)
        cpu_after = self.stack.cpu_by_process()
        not_analysed = {s for s in final.values() if s != StudyStatus.ANALYSED.value}
        if not_analysed:
            raise RuntimeError(f"efficiency studies ended {', '.join(sorted(not_analysed))}")
        items = [self.stack.worklist.get(u) for u in uids]
        starts, ends, parts = [], [], {name: [] for name in (*TIMING_PARTS, "other")}
        for item in items:
            if item is None or item.analysed_at is None:
                raise RuntimeError("an analysed study has no analysis time")
            job = Job.fetch(item.job_id, connection=self.redis)
            if job.started_at is None:
                raise RuntimeError(f"job {job.id} has no start time")
            started = job.started_at.timestamp()
            starts.append(started)
            ends.append(item.analysed_at.timestamp())
            timings = {n: sum(r.timings.get(n, 0.0) for r in item.results) for n in TIMING_PARTS}
            for name, value in timings.items():
                parts[name].append(value)
            parts["other"].append(ends[-1] - started - sum(timings.values()))
        seconds = max(ends) - min(starts)
        pipeline = {"studies_per_second": len(uids) / seconds, "seconds": seconds,
                    "mean_parts": {n: float(np.mean(v)) for n, v in parts.items()},
                    # Where the CPU went while the studies were analysed, per study.
                    "cpu_seconds_per_study": {
                        name: (cpu_after[name] - cpu_before.get(name, 0.0)) / len(uids)
                        for name in cpu_after}}
        assert self.stack.orthanc is not None
        instance_ids = [list(snapshot_study(self.stack.orthanc, item.orthanc_id)
                             .series[0].instance_ids) for item in items if item is not None]
        limit = measure_limit(self.models_dir / RADIOGRAPH_MODEL, instance_ids, WORKERS)
        ratio = pipeline["studies_per_second"] / limit["studies_per_second"]
        self.stack.delete_all_studies()
        return {"target_ratio": 0.9, "met": ratio >= 0.9, "ratio": ratio,
                "studies": len(uids), "processes": WORKERS, "model": RADIOGRAPH_MODEL,
                "pipeline": pipeline, "limit": limit}

    def urgent_backlog_and_memory(self) -> tuple[dict[str, Any], dict[str, Any]]:
        c = self.config

        def stat(key: str, n: int) -> list[Path]:
            return radiograph(self.files, key, 0, stat=True)

        alone = self.ttn("stat-alone", c.stat_alone, stat, None)
        self.stack.stop_workers()
        keys = [self.key("backlog", n) for n in range(c.backlog)]
        self.send_queued(keys, lambda key, n: radiograph(self.files, key, n))
        self.stack.start_workers()
        sampler = MemorySampler(self.redis, self.stack.worker_pids(), c.memory_every)
        sampler.start()
        default = Queue("default", connection=self.redis)
        backlog_at_send = default.count
        key = self.key("stat-backlog", 0)
        files = stat(key, 0)
        acked = self.stack.storescu(files)
        uid = study_uid(key)
        wait_analysed(self.stack.worklist, [uid], self.timeout(c.backlog), self.alive)
        left = default.count
        record = ttn_breakdown(self.redis, uid, acked)
        files[0].unlink()
        alone_p50 = alone["summary"]["ttn"]["p50"]
        ratio = record["ttn"] / alone_p50
        backlog = {"target_ratio": 2.0, "met": ratio <= 2.0, "ratio": ratio,
                   "backlog": c.backlog, "backlog_when_stat_sent": backlog_at_send,
                   "backlog_left_when_stat_analysed": left,
                   "alone": {"summary": alone["summary"], "records": alone["records"]},
                   "under_backlog": record}
        wait_analysed(self.stack.worklist, [study_uid(k) for k in keys],
                      self.timeout(c.backlog), self.alive)
        # Top up to ``memory_studies`` analysed since the workers started.
        more = max(0, c.memory_studies - (sampler.analysed() - sampler.base))
        extra = [self.key("memory", n) for n in range(more)]
        for start in range(0, len(extra), 100):
            batch = extra[start : start + 100]
            self.send_queued(batch, lambda key, n: radiograph(self.files, key, n))
        wait_analysed(self.stack.worklist, [study_uid(k) for k in extra],
                      self.timeout(len(extra)), self.alive)
        sampler.stop()
        self.stack.delete_all_studies()
        return backlog, memory_result(sampler, c)

    def api(self) -> dict[str, Any]:
        c = self.config
        indexed = api_load.index_studies(self.stack.worklist, c.api_indexed)
        token = create_token(self.redis, role="radiologist", owner="bench", days=1)
        base = f"http://127.0.0.1:{self.stack.settings.api_port}"
        shown = self._check_worklist_answer(base, token)
        api_load.run_load(base, token, clients=c.api_clients, seconds=1)  # warm-up
        cpu_before = self.stack.cpu_by_process()
        closed = api_load.run_load(base, token, clients=c.api_clients, seconds=c.api_seconds)
        cpu_after = self.stack.cpu_by_process()
        paced = api_load.run_load(base, token, clients=c.api_clients,
                                  seconds=c.api_paced_seconds, think=c.api_think_seconds)
        changes = api_load.Changes(self.stack.worklist, c.api_changes_per_second)
        changes.start()
        changing = api_load.run_load(base, token, clients=c.api_clients,
                                     seconds=c.api_seconds)
        changed = changes.stop()
        # What the API sustains while keeping its latency: clients waiting less and less.
        capacity = [{**_load_result(api_load.run_load(base, token, clients=c.api_clients,
                                                      seconds=c.api_capacity_seconds,
                                                      think=think), think)}
                    for think in c.api_capacity_think_seconds]
        out: dict[str, Any] = {
            "target_p99_ms": 50.0, "indexed": int(self.redis.zcard("triage:worklist")),
            "added": indexed, "clients": c.api_clients, "items_per_page": shown,
            "request": f"GET {api_load.WORKLIST_PATH} (first page, default size)",
            "load_generator": f"wrk, {api_load.WRK_THREADS} threads",
            "closed_loop": _load_result(closed, 0.0),
            "paced": _load_result(paced, c.api_think_seconds),
            "under_change": {**_load_result(changing, 0.0), "changes": changed,
                             "changes_per_second": c.api_changes_per_second},
            "capacity": capacity,
        }
        requests = max(1, closed["requests"])
        out["closed_loop"]["cpu_ms_per_request"] = {
            name: (cpu_after[name] - cpu_before.get(name, 0.0)) * 1000 / requests
            for name in ("api", "redis") if name in cpu_after}
        for name, key in (("closed_loop", "met"), ("paced", "paced_met"),
                          ("under_change", "under_change_met")):
            out[key] = out[name]["latency_ms"]["p99"] <= 50.0 and out[name]["errors"] == 0
        return out

    def web(self) -> dict[str, Any]:
        """The worklist page in Chromium with ``web_studies`` realistic studies on the list:
        first page and live changes (``bench/web.py``)."""
        c = self.config
        seeded = web.seed(self.stack.worklist, c.web_studies)
        token = create_token(self.redis, role="radiologist", owner="bench-web", days=1)
        base = f"http://127.0.0.1:{self.stack.settings.api_port}"
        out = web.measure(base, self.stack.worklist, token, loads=c.web_loads,
                          changes=c.web_changes, interval=c.web_change_interval)
        return {**out, **seeded}

    def _check_worklist_answer(self, base: str, token: str) -> int:
        """One request checked in full before the load: 200, a valid page, a full page."""
        answer = httpx.get(base + api_load.WORKLIST_PATH, timeout=30,
                           headers={"Authorization": f"Bearer {token}"})
        answer.raise_for_status()
        page = WorklistPage.model_validate_json(answer.content)
        if len(page.items) != min(DEFAULT_PAGE_SIZE, page.total):
            raise RuntimeError(f"worklist answered {len(page.items)} items of {page.total}")
        return len(page.items)

    def register_trial(self) -> None:
        """Record the installed head-CT version active and the one on trial retired before
        the workers start, so that no other section runs it in shadow (a worker registering
        a fresh installation would put the later version in shadow at once)."""
        assert self.trial is not None
        model, installed, trial = self.trial
        registry = ModelRegistry.load(self.models_dir)
        sha = {p.manifest.version: p.manifest.sha256 for p in registry.packages
               if p.manifest.id == model}
        with db.connect(self.stack.settings) as conn:
            for version in (installed, trial):
                register_version(conn, model, version, sha[version], BENCH_ACTOR)
            set_state(conn, model, trial, "retired", BENCH_ACTOR)
            conn.commit()

    def set_trial_state(self, state: str, *, wait: bool = True) -> None:
        """Put the trial version in ``state``; when that changed it and ``wait``, wait until
        every worker has read it anew."""
        assert self.trial is not None
        model, _, trial = self.trial
        with db.connect(self.stack.settings) as conn:
            changed = set_state(conn, model, trial, state, BENCH_ACTOR)
            conn.commit()
        if changed and wait:
            time.sleep(self.stack.settings.vigilance_states_seconds + 0.5)

    def shadow(self) -> dict[str, Any]:
        """The active head-CT version's TTN with no version in shadow, then with one: head
        CT studies sent at a steady pace, the trial version switched between ``retired``
        and ``shadow`` in PostgreSQL while the workers run."""
        assert self.trial is not None
        c = self.config
        model, installed, trial = self.trial
        phases = {}
        for name, state in (("without", "retired"), ("with", "shadow")):
            self.set_trial_state(state)
            phases[name] = self.shadow_phase(name, state)
        # Not waited for: only the streaming section may follow, and it restarts the workers.
        self.set_trial_state("retired", wait=False)
        without, with_shadow = (phases[n]["ttn"]["p95"] for n in ("without", "with"))
        return {"model": model, "active_version": installed, "trial_version": trial,
                "trial_threshold": TRIAL_THRESHOLD, "studies": c.shadow_studies,
                "slices": c.ct_slices, "interval_seconds": c.shadow_interval,
                "states_seconds": self.stack.settings.vigilance_states_seconds,
                "p95_ratio": with_shadow / without, **phases}

    def shadow_phase(self, name: str, state: str) -> dict[str, Any]:
        """``shadow_studies`` head CTs, one every ``shadow_interval`` seconds (the next one
        written while waiting); then the active results, the shadow analyses once their
        queue has drained, and the SRs of each study."""
        c = self.config
        keys = [self.key(f"shadow-{name}", n) for n in range(c.shadow_studies)]
        acked: dict[str, float] = {}
        files = head_ct(self.files, keys[0], c.ct_slices)
        started = time.monotonic()
        for n, key in enumerate(keys):
            delay = started + n * c.shadow_interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            acked[key] = self.stack.storescu(files)
            shutil.rmtree(files[0].parent)
            self.alive()
            if n + 1 < len(keys):
                files = head_ct(self.files, keys[n + 1], c.ct_slices)
        uids = [study_uid(k) for k in keys]
        final = wait_analysed(self.stack.worklist, uids, self.timeout(len(uids) * c.ct_slices),
                              self.alive)
        ended = {s for s in final.values() if s != StudyStatus.ANALYSED.value}
        if ended:
            raise RuntimeError(f"shadow-phase studies ended {', '.join(sorted(ended))}")
        records = [ttn_breakdown(self.redis, study_uid(k), acked[k]) for k in keys]
        last_active = max(acked[k] + r["ttn"] for k, r in zip(keys, records, strict=True))
        expected = len(uids) if state == "shadow" else 0
        count, drained = self._wait_shadow_analyses(uids, expected,
                                                    timeout=60.0 + 30.0 * expected)
        srs = [self._sr_count(uid) for uid in uids]
        self.stack.delete_all_studies()
        stats = breakdown_summary(records)
        return {"trial_state": state, "studies": len(uids), "ttn": stats["ttn"],
                "summary": stats, "records": records, "shadow_analyses": count,
                "shadow_drained": drained,
                "shadow_drain_seconds": max(0.0, time.time() - last_active) if expected
                else 0.0,
                "one_sr_each": all(n == 1 for n in srs),
                "sr_counts": {str(n): srs.count(n) for n in sorted(set(srs))}}

    def _wait_shadow_analyses(self, uids: list[str], expected: int,
                              timeout: float) -> tuple[int, bool]:
        """Wait until the shadow queue is empty and idle twice in a row (a deferred shadow
        job queues itself again before it ends) with ``expected`` shadow analyses recorded
        for ``uids``, moving the records waiting in Redis to PostgreSQL meanwhile; returns
        the count, and whether the queue drained within ``timeout``."""
        queue = Queue(QueueName.SHADOW.value, connection=self.redis)
        running = StartedJobRegistry(QueueName.SHADOW.value, connection=self.redis)
        deadline = time.monotonic() + timeout
        idle_before = False
        while True:
            idle = running.count == 0 and queue.count == 0
            recording.flush(self.redis, self.stack.settings)
            count = self._shadow_count(uids)
            if idle and idle_before and count >= expected:
                return count, True
            if time.monotonic() > deadline:
                return count, False
            idle_before = idle
            self.alive()
            time.sleep(0.25)

    def _shadow_count(self, uids: list[str]) -> int:
        with db.connect(self.stack.settings) as conn:
            row = conn.execute("SELECT count(*) FROM analyses WHERE role = 'shadow' "
                               "AND study_uid = ANY(%s)", (uids,)).fetchone()
        return int(row[0]) if row else 0

    def _sr_count(self, uid: str) -> int:
        """The SR instances the service wrote into the study (its own SR series)."""
        assert self.stack.orthanc is not None
        item = self.stack.worklist.get(uid)
        if item is None:
            raise RuntimeError(f"study {uid} left the worklist")
        series_uid = str(sr_series_uid(uid))
        return sum(len(s["Instances"]) for s in self.stack.orthanc.study_series(item.orthanc_id)
                   if s["MainDicomTags"].get("SeriesInstanceUID") == series_uid)

    # -- the whole run ---------------------------------------------------------------------

    def run(self, only: frozenset[str] = SECTIONS) -> dict[str, Any]:
        """Every section in ``only`` (all by default), in the order they must run."""
        c = self.config
        sections: dict[str, Any] = {}
        self.stack.start_servers()
        try:
            if "shadow" in only:
                self.stack.start_postgres()
                self.register_trial()
            if only - {"streaming"}:  # the streaming section starts the service its own way
                self.stack.start_service()
            if "ingest" in only:
                sections["ingest"] = self.ingest_section()
            if "ttn" in only:
                age = c.stable_age
                sections["ttn"] = {
                    "stable_age": age,
                    "radiograph": self.ttn("ttn-cr", c.ttn_radiographs,
                                           lambda key, n: radiograph(self.files, key, n),
                                           age + 1.0),
                    "head_ct": {**self.ttn("ttn-ct", c.ttn_head_cts,
                                           lambda key, n: head_ct(self.files, key, c.ct_slices),
                                           age + 3.0), "slices": c.ct_slices},
                }
                self.stack.delete_all_studies()
            if "efficiency" in only:
                sections["efficiency"] = self.efficiency()
            if only & {"urgent_backlog", "memory"}:
                sections["urgent_backlog"], sections["memory"] = (
                    self.urgent_backlog_and_memory())
            if "api" in only:
                sections["api"] = self.api()
            if "web" in only:
                sections["web"] = self.web()
            if "shadow" in only:
                sections["shadow"] = self.shadow()
            if "streaming" in only:  # last: it restarts the service with streaming off, on
                sections["streaming"] = streaming.section(self)
            versions = self._versions()
        finally:
            self.stack.stop()
        return {"sections": sections, "versions": versions}

    def ingest_section(self, rounds: int | None = None, label: str = "") -> dict[str, Any]:
        """``ingest_rounds`` (or ``rounds``) pairs of runs: Orthanc alone (the service's
        processes stopped with SIGSTOP, using no CPU), then at once the same with the service
        running and analysing what arrives. The two runs of a pair are seconds apart, so a
        change in the speed of a shared machine affects both; the median ratio of the pairs
        decides. ``label`` keeps the studies of another section's run apart."""
        c = self.config
        rounds = c.ingest_rounds if rounds is None else rounds
        pairs = []
        for round_number in range(rounds):
            self.stack.pause_service()
            alone = self.ingest(f"{label}alone{round_number}")
            # Gone before the watcher wakes: it must not analyse them during the next run.
            self.stack.delete_all_studies()
            self.stack.resume_service()
            with_service = self.ingest(f"{label}service{round_number}")
            uids = [study_uid(self.key(f"ingest-{label}service{round_number}", n))
                    for n in range(c.ingest_series)]
            wait_analysed(self.stack.worklist, uids, self.timeout(c.ct_slices * len(uids)),
                          self.alive)
            self.stack.delete_all_studies()
            pairs.append((alone, with_service))
        ratios = [s["instances_per_second"] / a["instances_per_second"] for a, s in pairs]
        median = sorted(range(len(pairs)), key=ratios.__getitem__)[len(pairs) // 2]
        return {"target_ratio": 0.9, "met": ratios[median] >= 0.9, "ratio": ratios[median],
                "series": c.ingest_series, "slices_per_series": c.ct_slices,
                "rounds": rounds, "round_ratios": ratios,
                "alone": pairs[median][0], "with_service": pairs[median][1],
                "all_alone": [a for a, _ in pairs], "all_with_service": [s for _, s in pairs]}

    def _versions(self) -> dict[str, str]:
        assert self.stack.orthanc is not None and self.redis is not None
        return {"orthanc": str(self.stack.orthanc.system().get("Version", "")),
                "redis": str(self.redis.info("server").get("redis_version", ""))}


def _children_cpu() -> float:
    times = os.times()
    return times.children_user + times.children_system


def _load_result(load: dict[str, Any], think: float) -> dict[str, Any]:
    """wrk's numbers in the results' terms (milliseconds, errors by kind)."""
    kinds = {kind: n for kind, n in load["errors"].items() if n}
    latency = load["latency_us"]
    return {"think_seconds": think, "requests": load["requests"],
            "requests_per_second": load["requests"] / (load["duration_us"] / 1e6),
            "errors": sum(kinds.values()), "error_kinds": kinds,
            "latency_ms": {"n": load["requests"],
                           **{k: latency[k] / 1000 for k in ("p50", "p95", "p99", "max",
                                                              "mean")}}}


def memory_result(sampler: MemorySampler, config: Config) -> dict[str, Any]:
    samples = sampler.samples
    total = int(samples[-1]["analysed"]) if samples else 0  # type: ignore[call-overload]
    warm_mark = max(config.memory_every, total // 10)
    workers: dict[str, Any] = {}
    met = True
    for pid in (samples[0]["rss_kib"] if samples else {}):  # type: ignore[union-attr]
        points = [(int(s["analysed"]), int(s["rss_kib"][pid]))  # type: ignore[call-overload,index]
                  for s in samples]
        warm = [p for p in points if p[0] >= warm_mark] or points
        x = np.array([p[0] for p in warm], dtype=float)
        y = np.array([p[1] for p in warm], dtype=float)
        slope = float(np.polyfit(x, y, 1)[0] * 100) if len(set(x)) > 1 else 0.0
        growth = (warm[-1][1] - warm[0][1]) / warm[0][1] * 100
        met = met and growth < MEMORY_GROWTH_LIMIT_PERCENT
        workers[pid] = {"warm_kib": warm[0][1], "last_kib": points[-1][1],
                        "max_kib": max(p[1] for p in points), "growth_percent": growth,
                        "slope_kib_per_100_studies": slope}
    return {"met": met, "studies": total, "every": config.memory_every,
            "warm_from_studies": warm_mark, "growth_limit_percent": MEMORY_GROWTH_LIMIT_PERCENT,
            "workers": workers, "samples": samples}


def machine() -> dict[str, Any]:
    def first(path: str, prefix: str) -> str:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
        return ""

    import onnxruntime

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True,
                              text=True).stdout.strip()

    return {
        "nproc": int(subprocess.run(["nproc"], capture_output=True, text=True).stdout),
        "cpu_model": first("/proc/cpuinfo", "model name"),
        "ram_gib": round(int(first("/proc/meminfo", "MemTotal").split()[0]) / 2**20, 1),
        "debian": Path("/etc/debian_version").read_text().strip(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--", "triage")),
    }


def _headline(sections: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a partial run worth printing (no per-study records or samples)."""
    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in ("records", "samples")}
        return value

    return strip(sections)


def merge_into_latest(path: Path, results: dict[str, Any]) -> None:
    """Put the sections of a partial run into ``path`` (a whole run's results, or a new file),
    replacing the same sections and keeping every other section's numbers."""
    latest = json.loads(path.read_text()) if path.exists() else {**results, "sections": {}}
    latest["sections"].update(results["sections"])
    runs = latest.setdefault("partial_runs", {})
    for name in results["sections"]:
        runs[name] = {"started_at": results["started_at"],
                      "finished_at": results["finished_at"],
                      "git_commit": results["machine"]["git_commit"],
                      "git_dirty": results["machine"]["git_dirty"],
                      "config": results["config"]}
    path.write_text(json.dumps(latest, indent=2, default=str))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny counts, for the tests")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help="folder for latest.json, summary.md and the plots")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary data directory (logs, Orthanc, Redis)")
    parser.add_argument("--only", default="", metavar="SECTION[,SECTION]",
                        help="run only these sections (" + ", ".join(sorted(SECTIONS)) + "); "
                        "writes partial.json and puts them into latest.json")
    args = parser.parse_args(argv)
    only = frozenset(filter(None, args.only.split(","))) or SECTIONS
    if only - SECTIONS:
        parser.error(f"unknown sections: {', '.join(sorted(only - SECTIONS))}")
    config = SMOKE if args.smoke else Config()
    work = Path(tempfile.mkdtemp(prefix="triage-bench-"))
    started = datetime.now(UTC)
    ok = False
    try:
        bench = Bench(config, work, trial="shadow" in only)
        outcome = bench.run(only)
        ok = True
    finally:
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"benchmark data kept in {work}", file=sys.stderr)
    results = {
        "schema": 1, "smoke": args.smoke, "started_at": started.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "machine": {**machine(), **outcome["versions"]},
        "config": asdict(config), "models": bench.models, "sections": outcome["sections"],
    }
    args.output.mkdir(parents=True, exist_ok=True)
    if only != SECTIONS:
        (args.output / "partial.json").write_text(json.dumps(results, indent=2, default=str))
        if not args.smoke:
            merge_into_latest(args.output / "latest.json", results)
        print(json.dumps(_headline(results["sections"]), indent=2, default=str))
        return 0
    (args.output / "latest.json").write_text(json.dumps(results, indent=2, default=str))
    report.write(results, args.output)
    print((args.output / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
