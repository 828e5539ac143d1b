"""Metrics aggregated through Redis: studies analysed by two worker processes show up in the
API's Prometheus text (real Orthanc, Redis, storescu, `triage worker` processes), and the admin
console's charts bucket the per-study records they left."""

from __future__ import annotations

import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from rq import Worker
from rq.job import Job

from tests.conftest import STABLE_AGE, Servers
from tests.senders import storescu
from tests.test_api import auth
from tests.test_pipeline import SAMPLE, write_study
from triage import metrics
from triage.api.app import create_app
from triage.metrics import Stage, StudyMeasurement
from triage.queues import QueueName, enqueue_analysis
from triage.recovery import alive_key
from triage.samples import build_sample
from triage.servers import ManagedProcess
from triage.tokens import Role
from triage.watcher import Watcher
from triage.worklist import StudyStatus, Worklist

pytestmark = pytest.mark.servers

HEAD_CT = {"model": "head-ct-hyperdensity", "model_version": "1.1.0"}
NO_MODEL = {"model": "", "model_version": ""}
SENT = ("head-ct-hyperdense", "head-ct-normal", "mr-small")
QUEUES = ("urgent", "default", "bulk")
JOB_STATES = ("queued", "started", "scheduled", "failed", "deferred", "canceled")


def _workers_ready(servers: Servers, n: int) -> bool:
    names = [w.name for w in Worker.all(connection=servers.redis)]
    return len(names) == n and all(servers.redis.exists(alive_key(w)) for w in names)


def _samples(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def _value(samples: list[Sample], name: str, **labels: str) -> float:
    [value] = [s.value for s in samples if s.name == name and s.labels == labels]
    return value


def _series(samples: list[Sample], name: str, **labels: str) -> tuple[float, float]:
    """(count, sum) of one histogram series; its buckets must be cumulative up to +Inf."""
    buckets = [s for s in samples if s.name == f"{name}_bucket"
               and {k: v for k, v in s.labels.items() if k != "le"} == labels]
    counts = [b.value for b in buckets]
    count = _value(samples, f"{name}_count", **labels)
    assert counts == sorted(counts) and buckets[-1].labels["le"] == "+Inf"
    assert counts[-1] == count
    return count, _value(samples, f"{name}_sum", **labels)


def test_two_worker_processes_add_to_the_same_metrics(clean_servers: Servers,
                                                      tmp_path: Path) -> None:
    servers = clean_servers
    # Every stage of the analysis at stability is timed here: with streaming, the images'
    # decoding and inference would have happened while they arrived (tests/test_streaming.py).
    env = {**servers.env, "TRIAGE_STREAMING": "false"}
    workers = [ManagedProcess(f"worker-{n}", [sys.executable, "-m", "triage.cli", "worker"],
                              tmp_path / f"worker-{n}.log", env=env) for n in (1, 2)]
    stop = threading.Event()
    watcher = threading.Thread(target=Watcher(
        servers.settings.model_copy(update={"streaming": False}), servers.orthanc,
        servers.redis).run, args=(stop,))
    for worker in workers:
        worker.start()
    watcher.start()
    worklist = Worklist(servers.redis)
    try:
        servers.wait_until(lambda: _workers_ready(servers, 2), timeout=30, what="two workers")
        storescu(servers.settings,
                 [p for key in SENT for p in write_study(tmp_path / key, key)])
        servers.wait_until(lambda: worklist.page()[1] == len(SENT) and all(
            i.status.terminal for i in worklist.page()[0]), timeout=30, what="studies done")
        client = TestClient(create_app(servers.settings))
        response = client.get("/metrics", headers=auth(servers, Role.INTEGRATION))
        charts = client.get("/api/v1/admin/charts", params={"window": "24h"},
                            headers=auth(servers, Role.ADMIN))
    finally:
        stop.set()
        watcher.join(10)
        for worker in workers:
            worker.stop()

    items = worklist.page()[0]
    assert sorted(i.status.value for i in items) == ["analysed", "analysed", "skipped"]
    # Both processes analysed studies: each added to the figures the API reads.
    performed_by = {Job.fetch(i.job_id, connection=servers.redis).worker_name for i in items}
    assert len(performed_by) == 2, performed_by

    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    samples = _samples(response.text)
    assert _value(samples, "triage_studies_total", outcome="analysed", **HEAD_CT) == 2
    assert _value(samples, "triage_studies_total", outcome="skipped", **NO_MODEL) == 1
    assert not [s for s in samples if s.name == "triage_studies_total"
                and s.labels["outcome"] == "failed"]

    # Every stage of both analysed studies, in seconds that make sense on this machine.
    expected_mean = {Stage.STABLE_WAIT: (STABLE_AGE, STABLE_AGE + 5.0),
                     Stage.QUEUE_WAIT: (0.0, 10.0)}
    for stage in Stage:
        count, total = _series(samples, "triage_stage_seconds", stage=stage.value, **HEAD_CT)
        low, high = expected_mean.get(stage, (0.0, 10.0))
        assert count == 2 and low <= total / count < high, (stage, count, total)
        if stage in metrics.MODEL_STAGES or stage in (Stage.SR_BUILD, Stage.STORE):
            assert total > 0, stage
    # The skipped study was timed until it was skipped.
    for stage in (Stage.STABLE_WAIT, Stage.QUEUE_WAIT):
        assert _series(samples, "triage_stage_seconds", stage=stage.value, **NO_MODEL)[0] == 1
    ttn_count, ttn_sum = _series(samples, "triage_time_to_notification_seconds", **HEAD_CT)
    stable_sum = _series(samples, "triage_stage_seconds", stage="stable_wait", **HEAD_CT)[1]
    assert ttn_count == 2 and stable_sum < ttn_sum < 2 * 30

    for queue in QUEUES:
        for state in JOB_STATES:
            assert _value(samples, "triage_queue_jobs", queue=queue, state=state) == 0
    assert _value(samples, "triage_workers_alive") == 2
    assert _value(samples, "triage_worklist_studies", status="analysed") == 2
    assert _value(samples, "triage_worklist_studies", status="skipped") == 1
    assert sum(s.value for s in samples if s.name == "triage_worklist_studies_by_priority") == 3

    # Nothing that names a patient or a study, in the labels or anywhere else.
    sent = [next(build_sample(SAMPLE[key])) for key in SENT]
    secrets = {str(v) for ds in sent for v in (ds.PatientName, ds.PatientID,
                                               ds.StudyInstanceUID, ds.AccessionNumber)}
    labels = {v for s in samples for v in s.labels.values()}
    assert not [(s, v) for s in secrets for v in labels if s.lower() in v.lower()]
    assert not [s for s in secrets if s in response.text]
    records = servers.redis.zrange(metrics.RECORDS_KEY, 0, -1)
    assert len(records) == 3
    assert not [s for s in secrets for r in records if s.encode() in r]

    # The watcher's loop sampled the queues once; nobody samples again within the minute.
    assert servers.redis.zcard(metrics.QUEUE_DEPTH_KEY) == 1
    assert metrics.sample_queue_depth_if_due(servers.redis) is False

    assert charts.status_code == 200
    body = charts.json()
    assert body["window"] == "24h" and body["bucket_seconds"] == 3600
    assert len(body["buckets"]) == 24
    assert sum(body["studies"]["analysed"]) == 2 and sum(body["studies"]["skipped"]) == 1
    p50 = [v for v in body["ttn"]["head-ct-hyperdensity 1.1.0"]["p50"] if v is not None]
    assert p50 and all(STABLE_AGE <= v < 30 for v in p50)
    assert body["queue_depth"]["depth"] == [0]


# Epoch seconds on both a 6-hour and an hour boundary; "now" is half past T0 + 5 h.
T0 = 78704 * 6 * 3600
HOUR = 3600
NOW = T0 + 5 * HOUR + 1800
A = ("model-a", "2.0")
B = ("model-b", "0.9")


def _record(servers: Servers, n: int, outcome: StudyStatus, finished: float,
            ttn: float | None = None, models: tuple[tuple[str, str], ...] = (A,)) -> None:
    """A study that ended at ``finished`` with time to notification ``ttn``, recorded by
    ``record_study`` as a worker would (with its job and the watcher's note)."""
    job = Job.create("triage.jobs.analyse_study", connection=servers.redis, id=f"job-{n}")
    measurement = StudyMeasurement()
    if outcome is StudyStatus.ANALYSED:
        for model, version in models:
            measurement.models.append(metrics.ModelRun(model, version, {Stage.INFERENCE: 0.1}))
        measurement.seconds = {Stage.SR_BUILD: 0.05, Stage.STORE: 0.02}
    if ttn is not None:
        received = finished - ttn
        metrics.note_queued(servers.redis, job.id, queued=received + STABLE_AGE,
                            received=datetime.fromtimestamp(received, UTC))
    metrics.record_study(servers.redis, outcome, measurement, job=job, now=finished)


def _spread(n: int, values: dict[int, float], empty: float | None = None
            ) -> list[float | None]:
    """``n`` buckets holding ``values`` (bucket index -> value), ``empty`` elsewhere."""
    return [values.get(i, empty) for i in range(n)]


def test_charts_bucket_the_records_by_hour_and_by_six_hours(clean_servers: Servers) -> None:
    servers = clean_servers
    for n in range(1, 11):  # ten studies in the last hour, 1 to 10 s
        _record(servers, n, StudyStatus.ANALYSED, T0 + 5 * HOUR + 60 * n, ttn=float(n))
    _record(servers, 11, StudyStatus.ANALYSED, T0 + 2 * HOUR + 10, ttn=2.0, models=(A, B))
    _record(servers, 12, StudyStatus.ANALYSED, T0 + 2 * HOUR + 20, ttn=4.0, models=(A, B))
    _record(servers, 13, StudyStatus.SKIPPED, T0 + 3 * HOUR, ttn=1.5)
    _record(servers, 14, StudyStatus.FAILED, T0 - 1 * HOUR)
    _record(servers, 15, StudyStatus.ANALYSED, T0 - 30 * HOUR, ttn=100.0)  # 7 days only
    _record(servers, 16, StudyStatus.ANALYSED, T0 - 18 * HOUR - 1, ttn=8.0)  # 7 days only
    _record(servers, 17, StudyStatus.ANALYSED, T0 - 18 * HOUR, ttn=7.0)  # first hour of 24
    _record(servers, 18, StudyStatus.ANALYSED, NOW + 1, ttn=50.0)  # after "now"
    enqueue = [(QueueName.URGENT, "q1"), (QueueName.URGENT, "q2"), (QueueName.BULK, "q3")]
    enqueue_analysis(servers.redis, servers.settings, queue=enqueue[0][0], job_id="q1",
                     orthanc_id="o", study_instance_uid="1.2.3", inputs="i")
    metrics.sample_queue_depth(servers.redis, now=T0 - 30 * HOUR)
    for queue, job_id in enqueue[1:]:
        enqueue_analysis(servers.redis, servers.settings, queue=queue, job_id=job_id,
                         orthanc_id="o", study_instance_uid="1.2.3", inputs="i")
    metrics.sample_queue_depth(servers.redis, now=T0 + 5 * HOUR + 100)
    metrics.sample_queue_depth(servers.redis, now=NOW + 60)

    day = metrics.charts(servers.redis, "24h", now=NOW)
    assert day["window"] == "24h" and day["bucket_seconds"] == HOUR
    assert day["buckets"] == [T0 - 18 * HOUR + i * HOUR for i in range(24)]
    assert set(day) == {"window", "bucket_seconds", "buckets", "ttn", "studies", "queue_depth"}

    assert day["ttn"] == {
        "model-a 2.0": {"p50": _spread(24, {0: 7.0, 20: 3.0, 23: 5.5}),
                        "p95": _spread(24, {0: 7.0, 20: 3.9, 23: 9.55})},
        "model-b 0.9": {"p50": _spread(24, {20: 3.0}), "p95": _spread(24, {20: 3.9})},
    }
    assert day["studies"] == {"analysed": _spread(24, {0: 1, 20: 2, 23: 10}, 0),
                              "skipped": _spread(24, {21: 1}, 0), "failed": _spread(24, {17: 1}, 0)}
    assert day["queue_depth"] == {"times": [T0 + 5 * HOUR + 100], "depth": [3]}

    week = metrics.charts(servers.redis, metrics.ChartWindow.WEEK, now=NOW)
    six = 6 * HOUR
    assert week["bucket_seconds"] == six
    assert week["buckets"] == [T0 - 27 * six + i * six for i in range(28)]

    # The last six hours hold twelve studies of model A: 1..10 s, 2 s and 4 s.
    assert week["ttn"] == {
        "model-a 2.0": {"p50": _spread(28, {22: 100.0, 23: 8.0, 24: 7.0, 27: 4.5}),
                        "p95": _spread(28, {22: 100.0, 23: 8.0, 24: 7.0, 27: 9.45})},
        "model-b 0.9": {"p50": _spread(28, {27: 3.0}), "p95": _spread(28, {27: 3.9})},
    }
    assert week["studies"] == {"analysed": _spread(28, {22: 1, 23: 1, 24: 1, 27: 12}, 0),
                               "skipped": _spread(28, {27: 1}, 0),
                               "failed": _spread(28, {26: 1}, 0)}
    assert week["queue_depth"] == {"times": [T0 - 30 * HOUR, T0 + 5 * HOUR + 100],
                                   "depth": [1, 3]}
    with pytest.raises(ValueError):
        metrics.charts(servers.redis, "1h", now=NOW)


def test_the_charts_route_is_for_admins_and_checks_the_window(clean_servers: Servers) -> None:
    client = TestClient(create_app(clean_servers.settings))
    admin = auth(clean_servers, Role.ADMIN)
    week = client.get("/api/v1/admin/charts", params={"window": "7d"}, headers=admin)
    assert week.status_code == 200
    body = week.json()
    assert body["bucket_seconds"] == 6 * HOUR and len(body["buckets"]) == 28
    assert body["ttn"] == {} and body["studies"]["analysed"] == [0] * 28
    assert body["queue_depth"] == {"times": [], "depth": []}
    assert client.get("/api/v1/admin/charts", params={"window": "1h"},
                      headers=admin).status_code == 422
    assert client.get("/api/v1/admin/charts",
                      headers=auth(clean_servers, Role.INTEGRATION)).status_code == 403
