"""The vigilance through the real pipeline (Orthanc, Redis, PostgreSQL, watcher, workers):
300 small head CT studies over 12 days of an injected clock, with a known truth that holds
false positives (hyperdense look-alikes) and false negatives (sub-threshold bleeds), a
station too rare to show, outcomes from reports and radiologists' feedback. The figures,
coverage and suppression are what the truth makes them; after 8 stable days, another
manufacturer with a shifted score distribution raises the drift alerts in the API,
``/metrics`` and a webhook; and emptying Redis then reindexing changes no figure.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import expect, sync_playwright
from statsmodels.stats.proportion import proportion_confint

from tests.browser import launch, offline_context, sign_in
from tests.conftest import Servers, serve_api
from tests.headct import HeadCT, study_uid, write_head_ct
from tests.senders import storescu
from tests.test_delivery import Pager
from tests.test_pipeline import watch_until
from triage import jobs
from triage.api.app import create_app
from triage.reindex import reindex
from triage.settings import Settings
from triage.tokens import Role, create_token
from triage.vigilance import trail
from triage.vigilance.db import connect, migrate
from triage.vigilance.drift import check_now
from triage.watcher import Watcher
from triage.workers import run_worker
from triage.worklist import StudyStatus, Worklist

pytestmark = pytest.mark.servers
MODEL = "head-ct-hyperdensity"
CODE = "SCT:1386000"
BASELINE_DAYS, SHIFTED_DAYS, PER_DAY = 8, 4, 25
DAYS = BASELINE_DAYS + SHIFTED_DAYS
RARE_STATION = "CT-MOBILE"  # 3 studies: under the suppression count of 5
# What the model sees (disc diameters, tests/headct.py) for each kind of study: flagged from
# 7 mm (probability 0.72) up.
DISCS = {"tp": (8, 10), "fn": (6, 6.5), "fp": (7, 8), "tn": (0, 0, 5)}


@dataclass(frozen=True)
class Case:
    study: HeadCT
    day: int  # 1..DAYS
    present: bool

    @property
    def flagged(self) -> bool:
        return self.study.disc_mm >= 7


def _cases() -> list[Case]:
    rng = random.Random(1500)
    cases = []
    rare_left = 3
    for day in range(1, DAYS + 1):
        shifted = day > BASELINE_DAYS
        for n in range(PER_DAY):
            kind = rng.choices(["tn", "tp", "fn", "fp"], weights=[64, 18, 9, 9])[0]
            disc = float(rng.choice(DISCS[kind]))
            other_vendor = shifted and n % 2 == 0
            if other_vendor and kind == "tn":
                # Its images give look-alikes: scores shifted up, half of them flagged ...
                disc = 7.0 if n % 4 == 0 else 6.5
            if other_vendor and kind == "fn":
                disc = 8.0  # ... and no bleed missed
            station = rng.choice(["CT1", "CT2"])
            if not shifted and rare_left and n == 7:
                station, rare_left = RARE_STATION, rare_left - 1
            cases.append(Case(HeadCT(
                f"w{day:02d}-{n:02d}", disc_mm=disc, station=station,
                manufacturer="Other Vendor" if other_vendor else "ACME Medical",
                model_name="OV-128" if other_vendor else "Scanner 64",
                sex=rng.choice("FM"), age=f"{rng.randint(20, 90):03d}Y"),
                day=day, present=kind in ("tp", "fn")))
    return cases


@pytest.fixture
def drill(tmp_path: Path, clean_servers: Servers, vigilance_database: Settings
          ) -> Iterator[tuple[Settings, Pager]]:
    with connect(vigilance_database) as conn:
        migrate(conn)
        conn.commit()
    pager = Pager()
    saved = dict(os.environ)
    os.environ.update(
        TRIAGE_DATABASE_URL=str(vigilance_database.database_url),
        TRIAGE_WEBHOOKS=json.dumps([{"name": "committee", "url": pager.url, "on": "critical"}]),
        TRIAGE_VIGILANCE_WINDOW_DAYS=str(SHIFTED_DAYS),
        TRIAGE_VIGILANCE_CHECK_MINUTES="100000")
    jobs.context.cache_clear()
    try:
        yield Settings(), pager
    finally:
        pager.server.shutdown()
        os.environ.clear()
        os.environ.update(saved)
        jobs.context.cache_clear()


def _today() -> date:
    return datetime.now(UTC).date()


def _day(day: int) -> date:
    """The date of drill day ``day``: the last drill day is yesterday."""
    return _today() - timedelta(days=DAYS + 1 - day)


def _run_day(servers: Servers, tmp_path: Path, cases: list[Case], day: int,
             total: int) -> None:
    os.environ["TRIAGE_VIGILANCE_CLOCK_OFFSET_DAYS"] = str(-(DAYS + 1 - day))
    jobs.context.cache_clear()
    files = [p for c in cases for p in write_head_ct(tmp_path / "studies", c.study)]
    storescu(servers.settings, files)
    watch_until(servers, Watcher(servers.settings, servers.orthanc, servers.redis), total)
    run_worker(burst=True)


def _expected(cases: list[Case]) -> dict[str, int]:
    return {"tp": sum(c.flagged and c.present for c in cases),
            "fp": sum(c.flagged and not c.present for c in cases),
            "fn": sum(not c.flagged and c.present for c in cases),
            "tn": sum(not c.flagged and not c.present for c in cases)}


def _wilson(count: int, total: int) -> tuple[float, float]:
    low, high = proportion_confint(count, total, alpha=0.05, method="wilson")
    return float(low), float(high)


def _check(proportion: dict, count: int, total: int) -> None:
    assert (proportion["count"], proportion["total"]) == (count, total)
    assert proportion["value"] == pytest.approx(count / total)
    assert (proportion["low"], proportion["high"]) == pytest.approx(_wilson(count, total))


def test_vigilance_through_the_pipeline(drill: tuple[Settings, Pager], clean_servers: Servers,
                                        tmp_path: Path) -> None:
    settings, pager = drill
    servers = clean_servers
    cases = _cases()
    assert len(cases) == 300
    by_day = {d: [c for c in cases if c.day == d] for d in range(1, DAYS + 1)}
    sent = 0
    for day in range(1, DAYS + 1):
        sent += len(by_day[day])
        _run_day(servers, tmp_path, by_day[day], day, sent)
    worklist = Worklist(servers.redis)
    for case in cases:  # every study analysed, as the truth expects the model to see it
        item = worklist.get(study_uid(case.study))
        assert item is not None and item.status is StudyStatus.ANALYSED, case
        assert item.findings[0].positive == case.flagged, (case, item.findings[0].probability)

    with connect(settings) as conn:  # every arrival counted once, by modality
        assert conn.execute("SELECT modality, count(*) FROM arrivals GROUP BY modality"
                            ).fetchall() == [("CT", len(cases))]

    os.environ["TRIAGE_VIGILANCE_CLOCK_OFFSET_DAYS"] = "0"
    client = TestClient(create_app(Settings()))
    admin = {"Authorization": "Bearer " + create_token(servers.redis, role=Role.ADMIN,
                                                       owner="dr.committee")}
    reader = {"Authorization": "Bearer " + create_token(servers.redis, role=Role.RADIOLOGIST,
                                                        owner="dr.reader")}
    integration = {"Authorization": "Bearer " + create_token(
        servers.redis, role=Role.INTEGRATION, owner="ris")}

    baseline = [c for c in cases if c.day <= BASELINE_DAYS]
    # Report outcomes for every baseline study (the RIS), feedback on a few flagged ones.
    outcomes = [{"study_instance_uid": study_uid(c.study), "finding_code": CODE,
                 "present": c.present, "source": "report"} for c in baseline]
    answer = client.post("/api/v1/integration/outcomes", json={"outcomes": outcomes},
                         headers=integration)
    assert answer.status_code == 200, answer.text
    assert answer.json()["inserted"] == len(baseline)
    reviewed = [c for c in baseline if c.flagged][:6]
    for case in reviewed:
        answer = client.post(
            f"/api/v1/studies/{study_uid(case.study)}/feedback", headers=reader,
            json={"findings": [{"model": MODEL, "model_version": "1.1.0", "code": "1386000",
                                "agree": case.present}],
                  "outcomes": {"1386000": case.present}})
        assert answer.status_code == 201, answer.text

    # Figures of the baseline days: complete report coverage, so sensitivity and NPV too.
    period = {"model": MODEL, "start": _day(1).isoformat(),
              "end": _day(BASELINE_DAYS + 1).isoformat()}
    answer = client.get("/api/v1/admin/vigilance/figures", params=period, headers=admin)
    assert answer.status_code == 200, answer.text
    [figures] = answer.json()
    e = _expected(baseline)
    assert figures["analysed"] == len(baseline)
    _check(figures["flagged"], e["tp"] + e["fp"], len(baseline))
    _check(figures["coverage"], len(baseline), len(baseline))
    _check(figures["ppv"], e["tp"], e["tp"] + e["fp"])
    _check(figures["specificity"], e["tn"], e["tn"] + e["fp"])
    _check(figures["sensitivity"], e["tp"], e["tp"] + e["fn"])
    _check(figures["npv"], e["tn"], e["tn"] + e["fn"])
    assert e["fp"] > 0 and e["fn"] > 0
    for n, day in enumerate(figures["daily"], start=1):
        cases_of_day = by_day[n]
        assert day["date"] == _day(n).isoformat()
        _check(day["flagged"], sum(c.flagged for c in cases_of_day), len(cases_of_day))

    # The whole period: truth for the baseline studies only; no sensitivity, and why.
    whole = {"model": MODEL, "start": _day(1).isoformat(), "end": _today().isoformat()}
    [figures] = client.get("/api/v1/admin/vigilance/figures", params=whole,
                           headers=admin).json()
    assert figures["analysed"] == len(cases)
    _check(figures["coverage"], len(baseline), len(cases))
    assert figures["sensitivity"] is None and figures["npv"] is None
    assert figures["sensitivity_note"]

    # Subgroups: counts per station and manufacturer; the rare station suppressed.
    cells = client.get("/api/v1/admin/vigilance/subgroups", params=whole,
                       headers=admin).json()
    by_cell = {(c["dimension"], c["value"]): c for c in cells}
    rare = [k for k in by_cell if k[1] == RARE_STATION]
    assert rare and all(by_cell[k]["suppressed"] and by_cell[k]["analysed"] is None
                        for k in rare)
    for vendor, scanner in (("Other Vendor", "OV-128"), ("ACME Medical", "Scanner 64")):
        cell = by_cell[("manufacturer", f"{vendor} {scanner}")]
        group = [c for c in cases if c.study.manufacturer == vendor]
        assert cell["analysed"] == len(group)
        _check(cell["flagged"], sum(c.flagged for c in group), len(group))
        with_truth = [c for c in group if c.day <= BASELINE_DAYS]
        _check(cell["coverage"], len(with_truth), len(group))
    for sex in "FM":
        group = [c for c in cases if c.study.sex == sex]
        assert by_cell[("sex", sex)]["analysed"] == len(group)

    # Reindexing after Redis lost everything changes no figure.
    before = [client.get(f"/api/v1/admin/vigilance/{what}", params=whole,
                         headers=admin).json() for what in ("figures", "subgroups")]
    servers.redis.flushall()
    rebuilt = reindex(Settings(), servers.orthanc, servers.redis)
    assert (rebuilt.analysed_from_sr, rebuilt.assessments) == (len(cases), len(reviewed))
    admin = {"Authorization": "Bearer " + create_token(servers.redis, role=Role.ADMIN,
                                                       owner="dr.committee")}
    after = [client.get(f"/api/v1/admin/vigilance/{what}", params=whole,
                        headers=admin).json() for what in ("figures", "subgroups")]
    assert after == before
    for case in reviewed:  # the feedback is back, from the assessment SRs
        item = worklist.get(study_uid(case.study))
        assert item is not None and len(item.feedback) == 1

    _drift(client, admin, servers, pager)


def _drift(client: TestClient, admin: dict[str, str], servers: Servers, pager: Pager) -> None:
    """The committee's baseline is the 8 stable days; checking on day 9 finds nothing,
    checking after the 4 shifted days raises the output, score and input alerts."""
    answer = client.post("/api/v1/admin/vigilance/baselines", headers=admin, json={
        "model": MODEL, "version": "1.1.0", "start": _day(1).isoformat(),
        "end": _day(BASELINE_DAYS + 1).isoformat()})
    assert answer.status_code in (200, 201), answer.text

    os.environ["TRIAGE_VIGILANCE_CLOCK_OFFSET_DAYS"] = str(-(DAYS - BASELINE_DAYS))
    assert check_now(Settings(), servers.redis) == []  # a stable period does not alarm
    os.environ["TRIAGE_VIGILANCE_CLOCK_OFFSET_DAYS"] = "0"
    raised = check_now(Settings(), servers.redis)
    kinds = {a.kind for a in raised if a.model_id == MODEL}
    assert {"output-cusum", "score-ks", "input-drift"} <= kinds, raised
    drifted = next(a for a in raised if a.kind == "input-drift")
    assert "manufacturer" in json.dumps(drifted.detail)

    # In the API, ...
    listed = client.get("/api/v1/admin/vigilance/alerts", params={"open": "true"},
                        headers=admin).json()["alerts"]
    assert {a["kind"] for a in listed} >= kinds
    # ... in /metrics, ...
    metrics = client.get("/metrics", headers=admin).text
    for kind in ("output-cusum", "score-ks", "input-drift"):
        assert any(line.startswith("triage_vigilance_alerts_open{") and f'kind="{kind}"' in line
                   and not line.endswith(" 0") and not line.endswith(" 0.0")
                   for line in metrics.splitlines()), metrics
    # ... and at the committee's webhook, without patient data.
    messages = [json.loads(b) for b in pager.bodies]
    alerts = [m["alert"] for m in messages if m.get("event") == "vigilance.alert"]
    assert {a["kind"] for a in alerts} >= kinds
    text = json.dumps(alerts)
    assert "VIGILANCE^" not in text and "V-w" not in text

    # ... in the admin console's vigilance page, ...
    _console_shows(Settings(), admin["Authorization"].split()[1], kinds)

    # Acknowledging is audited; the alert leaves the open list.
    first = listed[0]
    answer = client.post(f"/api/v1/admin/vigilance/alerts/{first['id']}/acknowledge",
                         headers=admin, json={"note": "new scanner reviewed by physics"})
    assert answer.status_code == 200, answer.text
    still_open = client.get("/api/v1/admin/vigilance/alerts", params={"open": "true"},
                            headers=admin).json()["alerts"]
    assert first["id"] not in {a["id"] for a in still_open}
    with connect(Settings()) as conn:
        acknowledged = trail.entries(conn, action="alert.acknowledged")
    assert [e.actor for e in acknowledged] == ["dr.committee"]


def _console_shows(settings: Settings, token: str, kinds: set[str]) -> None:
    """The vigilance page, served as the API serves it, lists an open alert of each kind."""
    with serve_api(settings) as base, sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            with offline_context(browser) as (context, _):
                page = context.new_page()
                sign_in(page, base, token, "/admin/vigilance")
                listed = page.locator("#v-alerts")
                for kind in sorted(kinds):
                    expect(listed).to_contain_text(kind, timeout=15_000)
                assert page.locator("#v-alerts li.v-alert").count() >= len(kinds)
        finally:
            browser.close()
