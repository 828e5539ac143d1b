"""Drift detection, volume watch and alerts over a real PostgreSQL: seeded simulations of
weeks of analyses and arrivals, checks run at an injected time; a stable period raises
nothing, a step in the flag rate one CUSUM alert (never twice while open, again after an
acknowledgement when the alarm persists), a new scanner with other scores input and score
drift, a modality that stops arriving a volume alert within hours (a quiet night none); the
alerts reach a real local webhook receiver and the /metrics gauge, and the admin API
acknowledges them with both audit trails."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import numpy as np
import psycopg
import pytest
import redis
from click.testing import CliRunner
from fastapi.testclient import TestClient
from rq import Queue, SimpleWorker
from scipy.stats import binom

from tests.conftest import free_port
from triage import jobs
from triage.api.app import create_app
from triage.audit import AUDIT_KEY
from triage.cli import main
from triage.queues import VIGILANCE_QUEUE
from triage.settings import Settings, Webhook
from triage.tokens import Role, create_token
from triage.vigilance import trail
from triage.vigilance.alerts import AlreadyAcknowledged, acknowledge, alerts
from triage.vigilance.drift import (
    CHECK_JOB,
    INPUTS,
    baselines,
    input_tests,
    run_checks,
    schedule_check,
    set_baseline,
)
from triage.vigilance.figures import day_start
from triage.vigilance.recording import ARRIVALS, enqueue_arrival, flush
from triage.vigilance.records import RecordError
from triage.vigilance.statistics import correct

pytestmark = pytest.mark.servers

MODEL = "head-ct-hyperdensity"
SHA = "cd" * 32
ICH, ICH_CODE = "ich", "SCT:1386000"
FRACTURE, FRACTURE_CODE = "fracture", "SCT:72704001"
DAY0 = date(2026, 9, 1)
PER_DAY = 40
SCANNERS = [("GE", "Revolution", "STANDARD"), ("SIEMENS", "SOMATOM Force", "Hr40")]
NEW_SCANNER = ("Canon", "Aquilion ONE", "FC43")


def at(day: int, hour: float = 0.0) -> datetime:
    return day_start(DAY0) + timedelta(days=day, hours=hour)


def add_version(conn: psycopg.Connection, version: str = "1.0", state: str = "active") -> None:
    conn.execute("INSERT INTO model_versions (model_id, version, sha256, state, changed_by) "
                 "VALUES (%s, %s, %s, %s, 'test')", (MODEL, version, SHA, state))


def simulate(conn: psycopg.Connection, rng: random.Random, first: int, last: int, *,
             rate: float = 0.2, new_scanner_share: float = 0.0, version: str = "1.0",
             rate_from: tuple[int, float] | None = None) -> None:
    """``PER_DAY`` studies a day over days ``[first, last)``, ICH flagged at ``rate`` (from
    day ``rate_from[0]`` at ``rate_from[1]``), fracture at 30%; a share of studies from a new
    scanner whose ICH scores sit just below the threshold."""
    outputs = []
    for day in range(first, last):
        p = rate_from[1] if rate_from and day >= rate_from[0] else rate
        for n in range(PER_DAY):
            new = rng.random() < new_scanner_share
            manufacturer, model_name, kernel = NEW_SCANNER if new else rng.choice(SCANNERS)
            row = conn.execute(
                "INSERT INTO analyses (study_uid, model_id, version, role, analysed_at, "
                "modality, manufacturer, manufacturer_model_name, reconstruction_kernel, "
                "slice_thickness_mm, kvp, pixel_spacing_row_mm, pixel_spacing_column_mm) "
                "VALUES (%s, %s, %s, 'active', %s, 'CT', %s, %s, %s, %s, %s, %s, %s) "
                "RETURNING id",
                (f"1.2.826.0.1.3680043.8.498.{day}.{n}", MODEL, version,
                 at(day, rng.uniform(0, 24)), manufacturer, model_name, kernel,
                 rng.choice([0.625, 1.25, 2.5, 5.0]), rng.choice([100.0, 120.0]),
                 round(rng.gauss(0.45, 0.03), 3), round(rng.gauss(0.45, 0.03), 3))).fetchone()
            assert row is not None
            if new:
                ich = rng.uniform(0.35, 0.5)
            else:
                ich = rng.uniform(0.5, 1.0) if rng.random() < p else rng.uniform(0.0, 0.5)
            fracture = rng.uniform(0.5, 1.0) if rng.random() < 0.3 else rng.uniform(0.0, 0.5)
            outputs += [(row[0], ICH, ICH_CODE, ich, ich >= 0.5),
                        (row[0], FRACTURE, FRACTURE_CODE, fracture, fracture >= 0.5)]
    with conn.cursor() as cursor:
        cursor.executemany("INSERT INTO analysis_outputs (analysis_id, label, code, score, "
                           "threshold, flagged) VALUES (%s, %s, %s, %s, 0.5, %s)", outputs)
    conn.commit()


def kinds(raised: list[Any]) -> list[tuple[str, str | None]]:
    return sorted((a.kind, a.label) for a in raised)


# -- Redis, webhook receiver -----------------------------------------------------------------

@pytest.fixture
def store(redis_settings: Settings, vigilance_database: Settings) -> Iterator[Settings]:
    """Settings with both the Redis and a fresh records database."""
    settings = redis_settings.model_copy(update={
        "database_url": vigilance_database.database_url})
    connection = redis.Redis.from_url(settings.redis_connection_url)
    connection.flushall()
    yield settings


class Receiver:
    """A webhook endpoint on a free local port that keeps what it was sent."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.status = 200
        received = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server interface
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if received.status < 300:
                    received.bodies.append(json.loads(body))
                self.send_response(received.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    yield running
    running.close()


# -- Flag rate, scores, inputs ---------------------------------------------------------------

def test_a_stable_period_raises_nothing(vigilance_db: psycopg.Connection,
                                        vigilance_database: Settings) -> None:
    add_version(vigilance_db)
    simulate(vigilance_db, random.Random(21), 0, 30)
    raised = run_checks(vigilance_db, vigilance_database, at(30, 10))
    assert raised == []
    # The automatic baseline: the first 14 days, per label, set by the vigilance.
    learnt = baselines(vigilance_db, MODEL, "1.0")
    assert set(learnt) == {ICH, FRACTURE}
    ich = learnt[ICH]
    assert (ich.period_start, ich.period_end) == (at(0), at(14))
    assert ich.created_by == "vigilance" and ich.days == 14 and ich.studies == 14 * PER_DAY
    assert 0.15 < ich.mean < 0.25 and ich.sigma > 0
    [entry] = trail.entries(vigilance_db, action="baseline.set")
    assert entry.actor == "vigilance" and entry.model_id == MODEL
    # Checking again sets no second baseline and raises nothing.
    assert run_checks(vigilance_db, vigilance_database, at(30, 11)) == []
    assert len(trail.entries(vigilance_db, action="baseline.set")) == 1


def test_a_step_in_the_flag_rate_raises_one_cusum_alert(
        vigilance_db: psycopg.Connection, vigilance_database: Settings) -> None:
    add_version(vigilance_db)
    simulate(vigilance_db, random.Random(12), 0, 30, rate_from=(20, 0.45))
    raised = run_checks(vigilance_db, vigilance_database, at(26, 10))
    cusum = [a for a in raised if a.kind == "output-cusum"]
    assert [(a.label, a.version) for a in cusum] == [(ICH, "1.0")]
    alert = cusum[0]
    assert alert.detail["direction"] == "rose"
    first_alarm = alert.detail["alarm_days"][0]
    assert "2026-09-21" <= first_alarm <= "2026-09-23", "a 3-sigma step is caught in days"
    assert alert.detail["alarm_day"] <= "2026-09-26"  # the last complete day
    assert alert.evidence_end is not None and alert.evidence_end <= at(26)
    assert "flag rate of ich rose" in alert.summary

    # Running again, even later, adds nothing while the alert is open.
    assert [a for a in run_checks(vigilance_db, vigilance_database, at(26, 11))
            if a.kind == "output-cusum"] == []
    assert [a for a in run_checks(vigilance_db, vigilance_database, at(29, 11))
            if a.kind == "output-cusum"] == []
    acknowledge(vigilance_db, alert.id, "dr-admin", "known: new protocol", now=at(29, 12))
    # The alarm persists on the days after the acknowledged evidence: a new alert.
    again = [a for a in run_checks(vigilance_db, vigilance_database, at(30, 10))
             if a.kind == "output-cusum"]
    assert len(again) == 1 and again[0].id != alert.id and again[0].label == ICH
    assert again[0].evidence_start >= alert.evidence_end  # type: ignore[operator]
    open_cusum = [a for a in alerts(vigilance_db, open_only=True) if a.kind == "output-cusum"]
    assert [a.id for a in open_cusum] == [again[0].id]
    with pytest.raises(AlreadyAcknowledged):
        acknowledge(vigilance_db, alert.id, "someone", "")


def test_a_new_scanner_with_other_scores_raises_input_and_score_drift(
        vigilance_db: psycopg.Connection, vigilance_database: Settings) -> None:
    add_version(vigilance_db)
    rng = random.Random(13)
    simulate(vigilance_db, rng, 0, 23)
    simulate(vigilance_db, rng, 23, 30, new_scanner_share=0.4)
    raised = run_checks(vigilance_db, vigilance_database, at(30, 10))
    found = {(a.kind, a.label): a for a in raised}
    drift = found[("input-drift", None)]
    drifted = {entry["attribute"] for entry in drift.detail["drifted"]}
    assert {"manufacturer", "manufacturer_model_name", "reconstruction_kernel"} <= drifted
    assert "kvp" not in drifted and "slice_thickness_mm" not in drifted
    manufacturer = next(e for e in drift.detail["drifted"] if e["attribute"] == "manufacturer")
    assert manufacturer["window_shares"]["Canon"] > 0.3
    assert "Canon" not in manufacturer["baseline_shares"]
    assert drift.detail["window_start"].startswith("2026-09-24")  # the last 7 complete days
    assert ("score-ks", ICH) in found and ("score-ks", FRACTURE) not in found
    assert found[("score-ks", ICH)].detail["adjusted_p"] < 0.01
    # Again the same day: nothing new; after acknowledging, still nothing on the same window.
    assert run_checks(vigilance_db, vigilance_database, at(30, 12)) == []
    acknowledge(vigilance_db, drift.id, "dr-admin", "", now=at(30, 13))
    assert run_checks(vigilance_db, vigilance_database, at(30, 14)) == []


def test_corrected_input_tests_rarely_alarm_on_stable_days() -> None:
    """Days of realistic acquisition attributes (discrete thicknesses and kVp, rare kernels,
    absent values) drawn from the baseline's own distributions: BH at 5% keeps the days with
    any input alarm near 5%."""
    rng = np.random.default_rng(20260901)
    manufacturers = ["GE", "SIEMENS", "Philips", "Canon", None]
    kernels = ["STANDARD", "BONE", "Hr40", "Qr40", "FC43", "YA", None]

    def rows(size: int) -> list[tuple[Any, ...]]:
        m = rng.choice(len(manufacturers), size, p=[0.4, 0.3, 0.15, 0.1, 0.05])
        k = rng.choice(len(kernels), size, p=[0.3, 0.25, 0.2, 0.15, 0.05, 0.03, 0.02])
        return [(manufacturers[i], f"model-{i}" if manufacturers[i] else None, kernels[j],
                 float(rng.choice([0.625, 1.25, 2.5, 5.0])), float(rng.choice([100, 120])),
                 float(rng.normal(0.45, 0.03)), None) for i, j in zip(m, k, strict=True)]

    days = 200
    alarming = 0
    for _ in range(days):
        tests = input_tests(rows(560), rows(280), 30)
        assert {t.name for t in tests} == set(INPUTS) - {"pixel_spacing_column_mm"}
        alarming += any(t.alarm for t in correct(tests, 0.05))
    assert alarming <= binom.ppf(0.999, days, 0.05)


def test_baselines_set_by_an_admin_are_checked_and_audited(
        vigilance_db: psycopg.Connection) -> None:
    add_version(vigilance_db)
    simulate(vigilance_db, random.Random(14), 0, 10)
    with pytest.raises(RecordError, match="3 days with studies and 120 studies; a baseline "
                                          "needs at least 7 days and 100 studies"):
        set_baseline(vigilance_db, MODEL, "1.0", at(0), at(3), "dr-admin")
    with pytest.raises(RecordError, match="no registered version 9.9"):
        set_baseline(vigilance_db, MODEL, "9.9", at(0), at(8), "dr-admin")
    with pytest.raises(RecordError, match="end after it starts"):
        set_baseline(vigilance_db, MODEL, "1.0", at(8), at(0), "dr-admin")
    stored = set_baseline(vigilance_db, MODEL, "1.0", at(1), at(9), "dr-admin")
    assert [b.label for b in stored] == [FRACTURE, ICH]
    assert all(b.days == 8 and b.studies == 8 * PER_DAY for b in stored)
    [entry] = trail.entries(vigilance_db, action="baseline.set")
    assert entry.actor == "dr-admin" and set(entry.details["labels"]) == {ICH, FRACTURE}


# -- Volume ------------------------------------------------------------------------------------

def add_arrivals(conn: psycopg.Connection, rng: np.random.Generator, modality: str,
                 start: datetime, end: datetime, day_rate: float, night_rate: float) -> int:
    rows = []
    hour = start
    while hour < end:
        rate = day_rate if 8 <= hour.hour < 20 else night_rate
        for n in range(rng.poisson(rate)):
            rows.append((f"2.25.{ord(modality[0])}{int(hour.timestamp())}{n}", modality,
                         hour + timedelta(minutes=float(rng.uniform(0, 59)))))
        hour += timedelta(hours=1)
    with conn.cursor() as cursor:
        cursor.executemany("INSERT INTO arrivals (study_uid, modality, received_at) "
                           "VALUES (%s, %s, %s)", rows)
    conn.commit()
    return len(rows)


def test_a_modality_that_stops_arriving_raises_a_volume_alert_within_hours(
        vigilance_db: psycopg.Connection, vigilance_database: Settings) -> None:
    rng = np.random.default_rng(15)
    stop = at(28, 10)
    add_arrivals(vigilance_db, rng, "CT", at(0), stop, 12, 1)
    add_arrivals(vigilance_db, rng, "MR", at(0), at(29), 6, 0.5)
    # Normal hours of the day and a quiet night raise nothing.
    for hour in (0.0, 4.3, 9.5, 10.2):
        assert run_checks(vigilance_db, vigilance_database, at(28, hour)) == [], hour
    raised = []
    for hour in (11.2, 12.2, 13.2):
        raised += run_checks(vigilance_db, vigilance_database, at(28, hour))
    [alert] = raised
    assert (alert.kind, alert.model_id, alert.label) == ("volume", None, "CT")
    assert alert.detail["expected"] > 20 and alert.detail["observed"] < 15
    assert alert.raised_at <= at(28, 13.2)
    assert alert.summary.startswith(f"Only {alert.detail['observed']} CT studies arrived")


def test_a_model_that_stops_analysing_raises_a_volume_alert(
        vigilance_db: psycopg.Connection, vigilance_database: Settings) -> None:
    rng = np.random.default_rng(16)
    add_version(vigilance_db)
    add_arrivals(vigilance_db, rng, "CT", at(0), at(16), 12, 1)
    # The model analyses about half of the CT studies, until 08:00 of day 15.
    rows = vigilance_db.execute("SELECT study_uid, received_at FROM arrivals "
                                "WHERE received_at < %s", (at(15, 8),)).fetchall()
    with vigilance_db.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO analyses (study_uid, model_id, version, role, analysed_at, modality) "
            "VALUES (%s, %s, '1.0', 'active', %s, 'CT')",
            [(uid, MODEL, received + timedelta(minutes=1)) for uid, received in rows
             if rng.random() < 0.5])
    vigilance_db.commit()
    assert run_checks(vigilance_db, vigilance_database, at(15, 9)) == []
    [alert] = run_checks(vigilance_db, vigilance_database, at(15, 14.5))
    assert (alert.kind, alert.model_id, alert.version, alert.label) == (
        "volume", MODEL, "1.0", "CT")
    assert alert.detail["reason"] == "model-silent" and 0.4 < alert.detail["share"] < 0.6
    assert f"{MODEL} 1.0 analysed no study for 6 hours" in alert.summary


def test_arrivals_go_through_the_outbox(store: Settings,
                                        vigilance_db: psycopg.Connection) -> None:
    connection = redis.Redis.from_url(store.redis_connection_url)
    enqueue_arrival(connection, "1.2.3.4", "CT", at(1, 9))
    enqueue_arrival(connection, "1.2.3.4", "CT", at(1, 10))  # the same study again
    enqueue_arrival(connection, "1.2.3.5", "\x00", at(1, 11))
    enqueue_arrival(connection, "not-a-uid", "MR", at(1, 11))
    assert connection.llen(ARRIVALS) == 3
    assert flush(connection, store) == 3
    rows = vigilance_db.execute("SELECT study_uid, modality, received_at FROM arrivals "
                                "ORDER BY study_uid").fetchall()
    assert rows == [("1.2.3.4", "CT", at(1, 9)), ("1.2.3.5", "unknown", at(1, 11))]
    assert connection.llen(ARRIVALS) == 0


# -- Notifications, metrics, API ---------------------------------------------------------------

def test_alerts_reach_the_webhooks_and_a_failure_is_retried(
        vigilance_db: psycopg.Connection, vigilance_database: Settings,
        receiver: Receiver) -> None:
    settings = vigilance_database.model_copy(update={"webhooks": [
        Webhook(name="pager", url=receiver.url, timeout_seconds=5)]})
    add_version(vigilance_db)
    simulate(vigilance_db, random.Random(12), 0, 27, rate_from=(20, 0.45))
    receiver.status = 503
    raised = run_checks(vigilance_db, settings, at(26, 10))
    assert raised and receiver.bodies == []
    pending = vigilance_db.execute("SELECT attempts, last_error FROM alert_notifications "
                                   "WHERE delivered_at IS NULL").fetchall()
    assert pending and all(row == (1, "answered 503") for row in pending)
    receiver.status = 200
    assert run_checks(vigilance_db, settings, at(26, 11)) == []
    assert {body["alert"]["id"] for body in receiver.bodies} == {a.id for a in raised}
    body = next(b for b in receiver.bodies if b["alert"]["kind"] == "output-cusum")
    assert body["event"] == "vigilance.alert"
    assert body["alert"]["model_id"] == MODEL and body["alert"]["label"] == ICH
    assert "1.2.826" not in json.dumps(body), "no study identifiers"
    assert vigilance_db.execute("SELECT count(*) FROM alert_notifications "
                                "WHERE delivered_at IS NULL").fetchone() == (0,)


def bearer(connection: redis.Redis, role: Role) -> dict[str, str]:
    return {"Authorization": f"Bearer {create_token(connection, role=role, owner='dr-admin')}"}


def gauge(client: TestClient, connection: redis.Redis) -> dict[str, float]:
    answer = client.get("/metrics", headers=bearer(connection, Role.INTEGRATION))
    assert answer.status_code == 200
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in answer.text.splitlines()
            if line.startswith("triage_vigilance_alerts_open{")}


def test_admins_acknowledge_alerts_through_the_api(
        store: Settings, vigilance_db: psycopg.Connection) -> None:
    add_version(vigilance_db)
    simulate(vigilance_db, random.Random(12), 0, 27, rate_from=(20, 0.45))
    connection = redis.Redis.from_url(store.redis_connection_url)
    client = TestClient(create_app(store))
    admin = bearer(connection, Role.ADMIN)
    assert gauge(client, connection) == {}
    raised = run_checks(vigilance_db, store, at(26, 10), connection=connection)
    cusum = next(a for a in raised if a.kind == "output-cusum")
    series = (f'triage_vigilance_alerts_open{{kind="output-cusum",model="{MODEL}",'
              'model_version="1.0"}')
    assert gauge(client, connection)[series] == 1.0

    assert client.get("/api/v1/admin/vigilance/alerts",
                      headers=bearer(connection, Role.RADIOLOGIST)).status_code == 403
    listed = client.get("/api/v1/admin/vigilance/alerts", headers=admin,
                        params={"open": "true", "model": MODEL})
    assert listed.status_code == 200, listed.text
    entry = next(a for a in listed.json()["alerts"] if a["id"] == cusum.id)
    assert entry["kind"] == "output-cusum" and entry["label"] == ICH
    assert entry["summary"] == cusum.summary and entry["acknowledged_at"] is None
    assert entry["detail"]["alarm_day"] == cusum.detail["alarm_day"]

    path = f"/api/v1/admin/vigilance/alerts/{cusum.id}/acknowledge"
    answer = client.post(path, headers=admin, json={"note": "new CT protocol since 21 Sep"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["acknowledged_by"] == "dr-admin" and body["note"].startswith("new CT")
    assert body["acknowledged_at"] is not None
    assert client.post(path, headers=admin, json={"note": ""}).status_code == 409
    assert client.post("/api/v1/admin/vigilance/alerts/999999/acknowledge", headers=admin,
                       json={}).status_code == 404
    assert gauge(client, connection)[series] == 0.0
    audited = [json.loads(r) for r in connection.lrange(AUDIT_KEY, 0, -1)]
    [record] = [r for r in audited if r["action"] == "vigilance.alert_acknowledged"]
    assert record["actor"] == "dr-admin" and record["details"]["alert_id"] == cusum.id
    [entry_trail] = trail.entries(vigilance_db, action="alert.acknowledged")
    assert entry_trail.actor == "dr-admin" and entry_trail.details["alert_id"] == cusum.id
    closed = client.get("/api/v1/admin/vigilance/alerts", headers=admin,
                        params={"open": "false"}).json()["alerts"]
    assert [a["id"] for a in closed] == [cusum.id]


def test_flag_rate_chart_and_baselines_through_the_api(
        store: Settings, vigilance_db: psycopg.Connection) -> None:
    add_version(vigilance_db)
    simulate(vigilance_db, random.Random(12), 0, 27, rate_from=(20, 0.45))
    connection = redis.Redis.from_url(store.redis_connection_url)
    client = TestClient(create_app(store))
    admin = bearer(connection, Role.ADMIN)
    url = "/api/v1/admin/vigilance/baselines"
    short = {"model": MODEL, "version": "1.0", "start": "2026-09-01", "end": "2026-09-03"}
    answer = client.post(url, headers=admin, json=short)
    assert answer.status_code == 422 and "needs at least 7 days" in answer.json()["detail"]
    assert client.post(url, headers=admin, json={**short, "version": "9"}).status_code == 404
    answer = client.post(url, headers=admin, json={**short, "end": "2026-09-15"})
    assert answer.status_code == 200, answer.text
    assert [b["label"] for b in answer.json()["labels"]] == [FRACTURE, ICH]
    audited = [json.loads(r) for r in connection.lrange(AUDIT_KEY, 0, -1)]
    assert [r["action"] for r in audited] == ["vigilance.baseline_set"]
    assert trail.entries(vigilance_db, action="baseline.set")[0].actor == "dr-admin"

    chart_url = "/api/v1/admin/vigilance/flag-rate"
    query = {"model": MODEL, "start": "2026-09-10", "end": "2026-09-27"}
    assert client.get(chart_url, headers=admin, params=query).status_code == 422  # 2 labels
    answer = client.get(chart_url, headers=admin, params={**query, "label": ICH})
    assert answer.status_code == 200, answer.text
    chart = answer.json()
    assert chart["version"] == "1.0" and (chart["k"], chart["h"]) == (0.5, 4.0)
    assert chart["baseline"]["period_end"].startswith("2026-09-15")
    days = chart["days"]
    assert [d["date"] for d in days][:1] == ["2026-09-10"] and len(days) == 17
    assert all(d["cusum_high"] is None for d in days if d["date"] < "2026-09-15")
    assert not any(d["alarm"] for d in days if d["date"] < "2026-09-20")
    assert any(d["alarm"] for d in days if d["date"] >= "2026-09-21")
    flagged = vigilance_db.execute(
        "SELECT count(*) FILTER (WHERE o.flagged), count(*) FROM analyses a JOIN "
        "analysis_outputs o ON o.analysis_id = a.id WHERE o.label = %s AND a.analysed_at >= %s "
        "AND a.analysed_at < %s", (ICH, at(9), at(10))).fetchone()
    assert (days[0]["flagged"], days[0]["analysed"]) == flagged


def test_vigilance_routes_answer_503_without_postgres(redis_settings: Settings) -> None:
    settings = redis_settings.model_copy(update={
        "database_url": f"postgresql://triage:s3cr3t-Pa55@127.0.0.1:{free_port()}/triage"})
    connection = redis.Redis.from_url(settings.redis_connection_url)
    client = TestClient(create_app(settings))
    admin = bearer(connection, Role.ADMIN)
    assert client.get("/api/v1/admin/vigilance/alerts", headers=admin).status_code == 503
    assert client.post("/api/v1/admin/vigilance/alerts/1/acknowledge", headers=admin,
                       json={}).status_code == 503
    # /metrics still answers, with the last published counts.
    connection.hset("triage:metrics:vigilance-alerts-open",
                    json.dumps(["volume", "", ""]), 2)
    series = 'triage_vigilance_alerts_open{kind="volume",model="",model_version=""}'
    assert gauge(client, connection)[series] == 2.0


# -- Scheduling and the command ------------------------------------------------------------

def test_checks_are_scheduled_once_per_slot(store: Settings) -> None:
    connection = redis.Redis.from_url(store.redis_connection_url)
    job_id = schedule_check(connection, store)
    assert job_id is not None and job_id.startswith("vigilance-check-")
    assert schedule_check(connection, store) is None
    queue = Queue(VIGILANCE_QUEUE, connection=connection)
    assert queue.scheduled_job_registry.get_job_ids() == [job_id]
    slot = int(job_id.rsplit("-", 1)[1])
    assert slot % (store.vigilance_check_minutes * 60) == 0


def _a_flag_rate_step_seen_on_day_26(store: Settings, conn: psycopg.Connection,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A version whose flag rate steps up on day 20, and the environment of a command run
    with the vigilance clock on day 26."""
    add_version(conn)
    simulate(conn, random.Random(12), 0, 27, rate_from=(20, 0.45))
    offset = (at(26, 10) - datetime.now(UTC)).total_seconds() / 86400
    monkeypatch.setenv("TRIAGE_DATA_DIR", str(store.data_dir))
    monkeypatch.setenv("TRIAGE_REDIS_PORT", str(store.redis_port))
    monkeypatch.setenv("TRIAGE_DATABASE_URL", str(store.database_url))
    monkeypatch.setenv("TRIAGE_VIGILANCE_CLOCK_OFFSET_DAYS", str(offset))


def test_the_check_command_prints_the_alerts(
        store: Settings, vigilance_db: psycopg.Connection,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _a_flag_rate_step_seen_on_day_26(store, vigilance_db, monkeypatch)
    result = CliRunner().invoke(main, ["vigilance", "check"])
    assert result.exit_code == 0, result.output
    assert "output-cusum: head-ct-hyperdensity 1.0: the daily flag rate of ich rose" in (
        result.output)
    again = CliRunner().invoke(main, ["vigilance", "check"])
    assert again.output.strip().endswith("0 alerts raised")


def test_a_worker_runs_the_scheduled_check_and_schedules_the_next(
        store: Settings, vigilance_db: psycopg.Connection,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _a_flag_rate_step_seen_on_day_26(store, vigilance_db, monkeypatch)
    jobs.context.cache_clear()
    connection = redis.Redis.from_url(store.redis_connection_url)
    queue = Queue(VIGILANCE_QUEUE, connection=connection)
    try:
        job = queue.enqueue(CHECK_JOB, job_id="vigilance-check-now")
        SimpleWorker([queue], connection=connection).work(burst=True)
    finally:
        jobs.context.cache_clear()
    assert job.get_status() == "finished" and job.return_value() == "2 alerts raised"
    assert {a.kind for a in alerts(vigilance_db, open_only=True)} == {"output-cusum",
                                                                     "score-ks"}
    [scheduled] = queue.scheduled_job_registry.get_job_ids()
    assert scheduled.startswith("vigilance-check-")
