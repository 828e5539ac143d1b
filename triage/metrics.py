"""Pipeline metrics kept in Redis, so that every worker adds to the same figures.

Workers run in other containers and pods than the API: prometheus_client's multiprocess
directory, which lives on one machine, cannot gather what they measure. Instead a worker adds
what it measured of a study, once the study reaches a terminal status, to Redis hashes (bucket
counts, sums and counts of Prometheus histograms; counters) in one transaction, and the API's
``RedisCollector`` turns them into Prometheus metrics when scraped. A capped, time-ordered
record per study (no patient data, no UIDs: a pseudonym at most) and queue-depth samples feed
the admin console's charts (``charts``).

Stages of one study, in seconds:
``stable_wait``  last instance received by Orthanc -> queued by the watcher (``LastUpdate`` of
                 the study in Orthanc, which counts whole seconds);
``queue_wait``   enqueued -> job started (RQ's ``enqueued_at`` and ``started_at``);
``fetch``, ``decode``, ``inference``  per model;
``sr_build``, ``store``  the study's SR, built and stored in Orthanc.
Time to notification: last instance received -> terminal status on the worklist.

Every figure is labelled with the model id and version that produced a result (a study analysed
by two models counts for each); studies without a result (skipped, or failed before any model
ended) have ``model=""`` and ``model_version=""``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any, cast

import numpy as np
import redis
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from rq import Worker
from rq.job import Job
from rq.registry import (
    CanceledJobRegistry,
    DeferredJobRegistry,
    FailedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)

from triage.findings import ModelResult
from triage.priority import PriorityClass
from triage.queues import queues
from triage.recovery import alive_key
from triage.worklist import StudyStatus, Worklist

log = logging.getLogger(__name__)

KEY_PREFIX = "triage:metrics"
# Hashes of Prometheus figures. Fields are label values and a bucket joined by "|" (label
# values never contain it, see ``_label``): "outcome|model|version" -> studies;
# "stage|model|version|<upper bound>" -> observations in that bucket alone (the collector
# makes them cumulative), "...|sum" and "...|count".
STUDIES_KEY = f"{KEY_PREFIX}:studies"
STAGES_KEY = f"{KEY_PREFIX}:stage-seconds"
TTN_KEY = f"{KEY_PREFIX}:ttn-seconds"
# Sorted sets scored by epoch seconds: one JSON record per study analysis, queue-depth samples.
RECORDS_KEY = f"{KEY_PREFIX}:records"
QUEUE_DEPTH_KEY = f"{KEY_PREFIX}:queue-depth"
# Taken for a minute by the watcher that samples the queues (only one of several does).
QUEUE_SAMPLE_KEY = f"{KEY_PREFIX}:queue-depth:sampled"
# Open vigilance alerts, published by the checks and acknowledgements
# (``triage.vigilance.alerts.publish_open``): JSON [kind, model, version] -> count.
VIGILANCE_ALERTS_KEY = f"{KEY_PREFIX}:vigilance-alerts-open"

KEPT_SECONDS = 7 * 24 * 3600
RECORDS_KEPT = 50_000
QUEUE_SAMPLE_SECONDS = 60
QUEUE_SAMPLES_KEPT = KEPT_SECONDS // QUEUE_SAMPLE_SECONDS + 60
# Label values: what Prometheus label values and the Redis fields above can carry safely.
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")
LABEL_MAX_CHARS = 64
SEPARATOR = "|"


class Stage(str, Enum):
    """A timed stage of a study's way through the pipeline (see the module docstring)."""

    STABLE_WAIT = "stable_wait"
    QUEUE_WAIT = "queue_wait"
    FETCH = "fetch"
    DECODE = "decode"
    INFERENCE = "inference"
    SR_BUILD = "sr_build"
    STORE = "store"


MODEL_STAGES = (Stage.FETCH, Stage.DECODE, Stage.INFERENCE)

_PER_STUDY_CPU = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_TRANSFER = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Upper bounds of the histogram buckets (seconds); +Inf is added by the collector.
BUCKETS: dict[Stage, tuple[float, ...]] = {
    # The stable age (seconds, 5 by default) dominates; LastUpdate counts whole seconds.
    Stage.STABLE_WAIT: (0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0),
    # Nothing when workers are idle; minutes to hours behind a backlog.
    Stage.QUEUE_WAIT: (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
                       3600.0, 14400.0),
    Stage.FETCH: _TRANSFER,
    Stage.DECODE: _TRANSFER,
    Stage.INFERENCE: _PER_STUDY_CPU,
    Stage.SR_BUILD: _PER_STUDY_CPU,
    Stage.STORE: _PER_STUDY_CPU,
}
TTN_BUCKETS = (1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
               3600.0, 14400.0)


def _label(value: str) -> str:
    """A label value safe for Prometheus and for the hash fields: model ids and versions
    come from trusted manifests, but nothing else reaches a label."""
    return _UNSAFE.sub("_", value)[:LABEL_MAX_CHARS]


def _field(*parts: str) -> str:
    return SEPARATOR.join(parts)


def _queued_key(job_id: str) -> str:
    """When the watcher queued a job, and when its study's last instance arrived."""
    return f"{KEY_PREFIX}:queued:{job_id}"


@dataclass
class ModelRun:
    """One model's part of an analysis: its manifest id and version, and its stages."""

    model: str
    version: str
    seconds: dict[Stage, float] = field(default_factory=dict)


@dataclass
class StudyMeasurement:
    """What an analysis measured of one study, filled in as the analysis goes."""

    models: list[ModelRun] = field(default_factory=list)
    seconds: dict[Stage, float] = field(default_factory=dict)
    # Epoch seconds at which the result reached the worklist (else: when recorded).
    notified_at: float | None = None

    def add_result(self, result: ModelResult) -> None:
        """A model produced ``result`` (its ``timings`` hold the per-model stages)."""
        self.models.append(ModelRun(
            model=result.model.id, version=result.model.version,
            seconds={s: result.timings[s.value] for s in MODEL_STAGES
                     if s.value in result.timings}))


def note_queued(connection: redis.Redis, job_id: str, *, received: datetime | None,
                queued: float | None = None) -> None:
    """Remember, for the worker that will record the analysis, when the watcher queued
    ``job_id`` (epoch seconds, now if not given) and when the study's last instance reached
    Orthanc. Kept as long as the records; a job rerun later finds it again."""
    note = {"queued": time.time() if queued is None else queued,
            "received": received.timestamp() if received is not None else None}
    connection.set(_queued_key(job_id), json.dumps(note), ex=KEPT_SECONDS)


def _observe(pipe: redis.client.Pipeline, key: str, labels: Sequence[str], seconds: float,
             bounds: Sequence[float]) -> None:
    """Queue the commands that add one observation to a histogram series."""
    bucket = next((format(b, "g") for b in bounds if seconds <= b), None)
    if bucket is not None:  # above the last bound: counted in +Inf only (``count``)
        pipe.hincrby(key, _field(*labels, bucket), 1)
    pipe.hincrbyfloat(key, _field(*labels, "sum"), seconds)
    pipe.hincrby(key, _field(*labels, "count"), 1)


def record_study(connection: redis.Redis, outcome: StudyStatus | str,
                 measurement: StudyMeasurement, *, job: Job | None = None,
                 study_key: str = "", now: float | None = None) -> dict[str, Any]:
    """Add what was measured of a study that reached ``outcome`` (a terminal status) to the
    shared metrics and the per-study records; returns the record.

    ``job`` (the RQ job of the analysis) gives the queue wait, and the note the watcher left
    (``note_queued``) the stable wait and the time to notification. ``study_key`` is the
    study's pseudonym (``triage.logs.pseudonym``), never a UID. One read (the note) and one
    transaction.
    """
    outcome = StudyStatus(outcome)
    if not outcome.terminal:
        raise ValueError(f"not a terminal status: {outcome.value!r}")
    finished = time.time() if now is None else now
    stages = dict(measurement.seconds)
    received = None
    if job is not None:
        if job.enqueued_at is not None and job.started_at is not None:
            stages[Stage.QUEUE_WAIT] = (job.started_at - job.enqueued_at).total_seconds()
        raw = connection.get(_queued_key(job.id))
        note = json.loads(cast(bytes, raw)) if raw else {}
        received = note.get("received")
        if received is not None:
            stages[Stage.STABLE_WAIT] = note["queued"] - received
    ttn = None
    if received is not None:
        ttn = max(0.0, (measurement.notified_at or finished) - received)
    stages = {stage: max(0.0, seconds) for stage, seconds in stages.items()}
    runs = measurement.models or [ModelRun(model="", version="")]
    record = {
        "finished_at": round(finished, 3), "outcome": outcome.value, "study": study_key,
        "models": [{"model": _label(r.model), "version": _label(r.version),
                    "stages": {s.value: round(v, 4) for s, v in r.seconds.items()}}
                   for r in measurement.models],
        "ttn": round(ttn, 3) if ttn is not None else None,
        "stages": {s.value: round(v, 4) for s, v in stages.items()},
    }
    with connection.pipeline(transaction=True) as pipe:
        for run in runs:
            labels = (_label(run.model), _label(run.version))
            pipe.hincrby(STUDIES_KEY, _field(outcome.value, *labels), 1)
            for stage, seconds in {**stages, **run.seconds}.items():
                _observe(pipe, STAGES_KEY, (stage.value, *labels), max(0.0, seconds),
                         BUCKETS[stage])
            if ttn is not None:
                _observe(pipe, TTN_KEY, labels, ttn, TTN_BUCKETS)
        pipe.zadd(RECORDS_KEY, {json.dumps(record, sort_keys=True): finished})
        pipe.zremrangebyscore(RECORDS_KEY, "-inf", f"({finished - KEPT_SECONDS}")
        pipe.zremrangebyrank(RECORDS_KEY, 0, -RECORDS_KEPT - 1)
        pipe.execute()
    return record


def sample_queue_depth(connection: redis.Redis, now: float | None = None) -> dict[str, int]:
    """Append the number of jobs waiting on each queue to the queue-depth series; returns
    it (queue name -> jobs)."""
    at = time.time() if now is None else now
    names = queues(connection)
    with connection.pipeline(transaction=False) as pipe:
        for queue in names:
            pipe.llen(queue.key)
        counts = pipe.execute()
    depth = {q.name: int(n) for q, n in zip(names, counts, strict=True)}
    sample = json.dumps({"t": round(at, 3), "queues": depth}, sort_keys=True)
    with connection.pipeline(transaction=True) as pipe:
        pipe.zadd(QUEUE_DEPTH_KEY, {sample: at})
        pipe.zremrangebyscore(QUEUE_DEPTH_KEY, "-inf", f"({at - KEPT_SECONDS}")
        pipe.zremrangebyrank(QUEUE_DEPTH_KEY, 0, -QUEUE_SAMPLES_KEPT - 1)
        pipe.execute()
    return depth


def sample_queue_depth_if_due(connection: redis.Redis) -> bool:
    """``sample_queue_depth`` unless any process sampled within ``QUEUE_SAMPLE_SECONDS``:
    with several watchers, the one that takes the minute samples. Returns whether it did."""
    if not connection.set(QUEUE_SAMPLE_KEY, "1", nx=True, ex=QUEUE_SAMPLE_SECONDS):
        return False
    sample_queue_depth(connection)
    return True


# --- Prometheus ---------------------------------------------------------------------------

# The RQ registries reported per queue, beside the jobs waiting on the queue itself.
_REGISTRIES = {"started": StartedJobRegistry, "scheduled": ScheduledJobRegistry,
               "failed": FailedJobRegistry, "deferred": DeferredJobRegistry,
               "canceled": CanceledJobRegistry}


def _decoded(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


def _histograms(raw: dict[str, str], n_labels: int,
                bounds_of: Callable[[tuple[str, ...]], Sequence[float] | None]
                ) -> Iterator[tuple[tuple[str, ...], list[tuple[str, float]], float]]:
    """(labels, cumulative buckets ending with +Inf, sum) of each series stored in a hash.

    ``bounds_of(labels)`` gives the series' bucket bounds, or ``None`` to leave it out.
    """
    series: dict[tuple[str, ...], dict[str, str]] = defaultdict(dict)
    for name, value in raw.items():
        parts = name.split(SEPARATOR)
        if len(parts) == n_labels + 1:
            series[tuple(parts[:-1])][parts[-1]] = value
    for labels, values in sorted(series.items()):
        bounds = bounds_of(labels)
        if bounds is None or "count" not in values:
            continue
        buckets, running = [], 0.0
        for bound in bounds:
            running += float(values.get(format(bound, "g"), 0))
            buckets.append((floatToGoString(bound), running))
        buckets.append(("+Inf", float(values["count"])))
        yield tuple(_label(v) for v in labels), buckets, float(values.get("sum", 0))


def _stage_bounds(labels: tuple[str, ...]) -> tuple[float, ...] | None:
    try:
        return BUCKETS[Stage(labels[0])]
    except ValueError:  # a stage this version no longer measures
        return None


class RedisCollector(Collector):
    """Reads the pipeline's metrics from Redis on every scrape.

    Yields ``triage_studies_total``, ``triage_stage_seconds``,
    ``triage_time_to_notification_seconds``, ``triage_queue_jobs``, ``triage_workers_alive``
    and the worklist gauges ``triage_worklist_studies`` (by status) and
    ``triage_worklist_studies_by_priority``, and ``triage_vigilance_alerts_open`` (the last
    counts the vigilance published, so it answers while PostgreSQL is down). No label carries
    patient data.
    """

    def __init__(self, connection: redis.Redis) -> None:
        self.redis = connection

    def collect(self) -> Iterable[Metric]:
        names = queues(self.redis)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(STUDIES_KEY)
            pipe.hgetall(STAGES_KEY)
            pipe.hgetall(TTN_KEY)
            pipe.hgetall(VIGILANCE_ALERTS_KEY)
            for queue in names:
                pipe.llen(queue.key)
                for registry in _REGISTRIES.values():
                    pipe.zcard(registry(queue=queue).key)
            studies, stages, ttn, alerts, *counts = pipe.execute()
        yield self._studies(_decoded(studies))
        yield self._stages(_decoded(stages))
        yield self._ttn(_decoded(ttn))
        yield self._queue_jobs([q.name for q in names], counts)
        yield self._workers_alive()
        yield from self._worklist()
        yield self._vigilance_alerts(_decoded(alerts))

    @staticmethod
    def _vigilance_alerts(raw: dict[str, str]) -> Metric:
        family = GaugeMetricFamily(
            "triage_vigilance_alerts_open", "Vigilance alerts not yet acknowledged, by kind and "
            "model version (model=\"\" for a modality's arrivals)",
            labels=["kind", "model", "model_version"])
        for name, value in sorted(raw.items()):
            try:
                kind, model, version = json.loads(name)
                family.add_metric([_label(kind), _label(model), _label(version)], float(value))
            except (ValueError, TypeError):  # a field this version does not write
                continue
        return family

    @staticmethod
    def _studies(raw: dict[str, str]) -> Metric:
        family = CounterMetricFamily(
            "triage_studies", "Studies whose analysis ended, by outcome (analysed, skipped, "
            "failed) and model version that produced a result (model=\"\" for none)",
            labels=["outcome", "model", "model_version"])
        for name, value in sorted(raw.items()):
            parts = name.split(SEPARATOR)
            if len(parts) == 3:
                family.add_metric([_label(p) for p in parts], float(value))
        return family

    @staticmethod
    def _stages(raw: dict[str, str]) -> Metric:
        family = HistogramMetricFamily(
            "triage_stage_seconds", "Seconds each study spent in each pipeline stage "
            "(stable_wait, queue_wait, fetch, decode, inference, sr_build, store)",
            labels=["stage", "model", "model_version"])
        for labels, buckets, total in _histograms(raw, 3, _stage_bounds):
            family.add_metric(list(labels), buckets, total)
        return family

    @staticmethod
    def _ttn(raw: dict[str, str]) -> Metric:
        family = HistogramMetricFamily(
            "triage_time_to_notification_seconds", "Seconds from a study's last instance "
            "received by Orthanc to its result (or status) on the worklist",
            labels=["model", "model_version"])
        for labels, buckets, total in _histograms(raw, 2, lambda _labels: TTN_BUCKETS):
            family.add_metric(list(labels), buckets, total)
        return family

    @staticmethod
    def _queue_jobs(names: list[str], counts: list[int]) -> Metric:
        family = GaugeMetricFamily("triage_queue_jobs", "Jobs per queue and state",
                                   labels=["queue", "state"])
        states = ["queued", *_REGISTRIES]
        for index, name in enumerate(names):
            for offset, state in enumerate(states):
                family.add_metric([name, state], counts[index * len(states) + offset])
        return family

    def _workers_alive(self) -> Metric:
        prefix = Worker.redis_worker_namespace_prefix
        names = [key.removeprefix(prefix) for key in Worker.all_keys(connection=self.redis)]
        with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.exists(alive_key(name))
            alive = sum(int(n) for n in pipe.execute()) if names else 0
        return GaugeMetricFamily("triage_workers_alive",
                                 "Registered workers whose heartbeat is fresh", value=alive)

    def _worklist(self) -> Iterator[Metric]:
        worklist = Worklist(self.redis)
        by_status = GaugeMetricFamily("triage_worklist_studies",
                                      "Studies on the worklist by status", labels=["status"])
        for status in StudyStatus:
            by_status.add_metric([status.value], worklist.count_facet(f"status:{status.value}"))
        yield by_status
        by_priority = GaugeMetricFamily("triage_worklist_studies_by_priority",
                                        "Studies on the worklist by priority class",
                                        labels=["priority"])
        counts = worklist.query_counts()
        for priority in PriorityClass:
            by_priority.add_metric([priority.value], counts.get(priority.value, 0))
        yield by_priority


# --- Charts for the admin console ---------------------------------------------------------


class ChartWindow(str, Enum):
    """How far back the admin console's charts look, and in buckets of what size."""

    DAY = "24h"
    WEEK = "7d"

    @property
    def bucket_seconds(self) -> int:
        return 3600 if self is ChartWindow.DAY else 6 * 3600

    @property
    def n_buckets(self) -> int:
        return 24 if self is ChartWindow.DAY else 28


OUTCOMES = (StudyStatus.ANALYSED, StudyStatus.SKIPPED, StudyStatus.FAILED)


def _percentiles(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    p50, p95 = np.percentile(np.asarray(values, dtype=float), [50, 95])
    return round(float(p50), 3), round(float(p95), 3)


def charts(connection: redis.Redis, window: ChartWindow | str,
           now: float | None = None) -> dict[str, Any]:
    """The admin console's charts over ``window`` up to ``now`` (epoch seconds, included).

    Buckets are aligned on multiples of their size in epoch seconds (hours for 24h, 6 hours
    for 7d, in UTC), the last one holding ``now``. Per bucket: the 50th and 95th percentiles
    of the time to notification of each model version (``null`` when it analysed nothing
    then), and studies per outcome; and every queue-depth sample in the window (jobs waiting
    on all queues). Studies of a record that came from several models count for each model.
    """
    window = ChartWindow(window)
    at = time.time() if now is None else now
    step = window.bucket_seconds
    first = (int(at // step) - window.n_buckets + 1) * step
    with connection.pipeline(transaction=False) as pipe:
        pipe.zrangebyscore(RECORDS_KEY, first, at, withscores=True)
        pipe.zrangebyscore(QUEUE_DEPTH_KEY, first, at, withscores=True)
        records, samples = pipe.execute()
    studies = {o.value: [0] * window.n_buckets for o in OUTCOMES}
    ttn: dict[str, list[list[float]]] = {}
    for raw, finished in records:
        record = json.loads(raw)
        index = int((finished - first) // step)
        if record["outcome"] in studies:
            studies[record["outcome"]][index] += 1
        if record["outcome"] != StudyStatus.ANALYSED.value or record["ttn"] is None:
            continue
        for model in record["models"]:
            series = ttn.setdefault(f"{model['model']} {model['version']}",
                                    [[] for _ in range(window.n_buckets)])
            series[index].append(record["ttn"])
    ttn_chart = {}
    for key, buckets in sorted(ttn.items()):
        pairs = [_percentiles(values) for values in buckets]
        ttn_chart[key] = {"p50": [p[0] for p in pairs], "p95": [p[1] for p in pairs]}
    depth = [(int(when), sum(json.loads(raw)["queues"].values())) for raw, when in samples]
    return {
        "window": window.value,
        "bucket_seconds": step,
        "buckets": [first + i * step for i in range(window.n_buckets)],
        "ttn": ttn_chart,
        "studies": studies,
        "queue_depth": {"times": [t for t, _ in depth], "depth": [n for _, n in depth]},
    }
