"""The vigilance page of the admin console in a real browser (Debian's Chromium under
Playwright) against the API served by uvicorn with a real Redis and a real records database:
figures with their intervals, subgroups with suppressed cells, the export links, accessibility
(axe) in both themes, and every section saying "not available" when the records are.

The flag-rate chart, the alerts, the shadow comparison and the version states each have a test
named after their route: it fails with a clear message while that route is not served, then
checks what the page shows against what the route answers."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import httpx
import psycopg
import pytest
import redis
from playwright.sync_api import Browser, Page, expect

from tests.browser import axe_violations, describe, offline_context, shot, sign_in
from tests.conftest import free_port, serve_api
from tests.test_vigilance_export import MODEL, SHADOWED, START, STUDIES, populate
from triage.settings import Settings
from triage.tokens import Role, create_token

pytestmark = pytest.mark.servers
PERIOD = "start=2026-11-01&end=2026-11-05"
PAGE = f"/admin/vigilance?model={MODEL}&version=1.0&{PERIOD}"
SECTIONS = ("v-rate", "v-figures", "v-subgroups", "v-alerts", "v-shadow", "v-states")
TIMEOUT_MS = 15_000


class Site:
    """The API and pages on a free port, and an admin's and a radiologist's tokens."""

    def __init__(self, base: str, settings: Settings) -> None:
        self.base = base
        self.settings = settings
        connection = redis.Redis.from_url(settings.redis_connection_url)
        self.tokens = {role: create_token(connection, role=role, owner=f"dr.{role.value}")
                       for role in (Role.ADMIN, Role.RADIOLOGIST)}

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.base + path, timeout=10,
                         headers={"Authorization": f"Bearer {self.tokens[Role.ADMIN]}"})

    def require_route(self, path: str) -> dict[str, Any]:
        """The route's JSON answer; fails naming the route while it is not served."""
        answer = self.get(path)
        if answer.status_code == 404 and answer.json().get("detail") == "Not Found":
            pytest.fail(f"GET {path.split('?')[0]} is not served yet: this test checks the "
                        "vigilance page against it once the route exists")
        assert answer.status_code == 200, f"{path}: {answer.status_code} {answer.text}"
        return answer.json()


@contextmanager
def serve(settings: Settings) -> Iterator[Site]:
    redis.Redis.from_url(settings.redis_connection_url).flushall()
    with serve_api(settings) as base:
        yield Site(base, settings)


@pytest.fixture
def site(vigilance_db: psycopg.Connection, vigilance_database: Settings,
         redis_settings: Settings) -> Iterator[Site]:
    populate(vigilance_db)
    with serve(redis_settings.model_copy(
            update={"database_url": vigilance_database.database_url})) as running:
        yield running


def open_page(page: Page, site: Site, path: str = PAGE) -> None:
    page.goto(site.base + path)
    expect(page.locator("#vigilance")).to_have_attribute("data-loaded", "true",
                                                         timeout=TIMEOUT_MS)


def watch(page: Page) -> list[str]:
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" and
            "Content Security Policy" in m.text else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    return problems


def test_page_shows_figures_subgroups_and_export(site: Site, browser: Browser) -> None:
    with offline_context(browser) as (context, outside):
        page = context.new_page()
        problems = watch(page)
        sign_in(page, site.base, site.tokens[Role.ADMIN], "/admin")
        page.click("#vigilance-link")
        expect(page).to_have_url(re.compile(r".*/admin/vigilance$"))
        expect(page.locator("#v-model")).to_have_value(MODEL)  # the installed model
        open_page(page, site)
        for section in SECTIONS:  # each one shown, or saying it is not available
            expect(page.locator(f"#{section} .v-body")).to_have_attribute(
                "data-state", re.compile("shown|unavailable"))

        ich = page.locator("#v-figures tr[data-version='1.0'][data-label='ich']")
        expect(ich).to_have_count(1)
        cells = ich.locator("td")
        expect(cells.nth(1)).to_have_text(str(STUDIES))
        expect(cells.nth(2)).to_contain_text("95% CI")
        expect(cells.nth(3)).to_contain_text("/40")  # ground-truth coverage of 40 studies
        expect(cells.nth(6)).to_contain_text("needs report outcomes for every analysed study")
        expect(page.locator("#v-figures-note")).to_contain_text(
            "Sensitivity and NPV come only from report outcomes")
        expect(page.locator("#v-label option")).to_have_text(["fracture", "ich"])

        canon = page.locator("#v-subgroups tr.suppressed[data-dimension='manufacturer']"
                             "[data-value='Canon Model Canon'][data-label='ich']")
        expect(canon).to_contain_text("suppressed (fewer than 5 studies)")
        ge = page.locator("#v-subgroups tr[data-dimension='manufacturer']"
                          "[data-value='GE Model GE'][data-label='ich'] td")
        expect(ge.nth(2)).to_have_text(str(STUDIES - 9))
        shot(page, "vigilance")

        href = page.locator("#v-export-csv").get_attribute("href")
        assert href == (f"/api/v1/admin/vigilance/export?model={MODEL}&version=1.0&"
                        f"{PERIOD}&format=csv")
        answer = page.request.get(site.base + href)  # with the session cookie
        assert answer.status == 200 and answer.headers["content-type"].startswith("text/csv")
        assert "attachment" in answer.headers["content-disposition"]
        assert len(list(csv.DictReader(io.StringIO(answer.text())))) == 2 * STUDIES
        parquet = page.locator("#v-export-parquet").get_attribute("href")
        assert parquet is not None and parquet.endswith("format=parquet")
        assert page.request.get(site.base + parquet).status == 200
        assert problems == [] and outside.urls == []

    with offline_context(browser) as (context, _):
        page = context.new_page()
        sign_in(page, site.base, site.tokens[Role.RADIOLOGIST])
        assert page.goto(site.base + PAGE).status == 403  # type: ignore[union-attr]


def test_page_has_no_serious_accessibility_violations(site: Site, browser: Browser) -> None:
    with offline_context(browser, theme="dark", base_url=site.base, bypass_csp=True) as (
            context, _):
        page = context.new_page()
        sign_in(page, site.base, site.tokens[Role.ADMIN], PAGE)
        expect(page.locator("#vigilance")).to_have_attribute("data-loaded", "true",
                                                             timeout=TIMEOUT_MS)
        if page.locator("#v-rate summary").count():
            page.click("#v-rate summary")  # the daily values' table open too
        checks = {"dark": axe_violations(page)}
        page.click("#theme-toggle")
        checks["light"] = axe_violations(page)
        found = {name: v for name, v in checks.items() if v}
        assert not found, describe([{"theme": k, "violations": v} for k, v in found.items()])


def test_sections_say_not_available_without_postgres(redis_settings: Settings,
                                                     browser: Browser) -> None:
    settings = redis_settings.model_copy(update={
        "database_url": f"postgresql://triage:s3cr3t-Pa55@127.0.0.1:{free_port()}/triage"})
    with serve(settings) as running, offline_context(browser) as (context, _):
        page = context.new_page()
        problems = watch(page)
        sign_in(page, running.base, running.tokens[Role.ADMIN], PAGE)
        expect(page.locator("#vigilance")).to_have_attribute("data-loaded", "true",
                                                             timeout=TIMEOUT_MS)
        for section in SECTIONS:
            body = page.locator(f"#{section} .v-body")
            expect(body).to_have_attribute("data-state", "unavailable")
            expect(body).to_contain_text("Not available:")
        expect(page.locator("#v-figures .v-body")).to_contain_text("PostgreSQL unreachable")
        assert problems == []


# -- the sections whose routes come with the surveillance checks -------------------------------

def test_flag_rate_route_chart(site: Site, browser: Browser,
                               vigilance_db: psycopg.Connection) -> None:
    vigilance_db.execute(
        "INSERT INTO baselines (model_id, version, label, period_start, period_end, studies, "
        "days, flag_rate_mean, flag_rate_sigma, created_by) VALUES "
        "(%s, '1.0', 'ich', %s, %s, 300, 30, 0.3, 0.05, 'test')",
        (MODEL, START - timedelta(days=30), START))
    vigilance_db.commit()
    data = site.require_route(f"/api/v1/admin/vigilance/flag-rate?model={MODEL}&version=1.0"
                              f"&label=ich&{PERIOD}")
    with offline_context(browser) as (context, _):
        page = context.new_page()
        sign_in(page, site.base, site.tokens[Role.ADMIN], PAGE + "&label=ich")
        expect(page.locator("#v-rate .v-body")).to_have_attribute("data-state", "shown",
                                                                  timeout=TIMEOUT_MS)
        charts = page.locator("#v-rate svg.v-chart[role='img']")
        expect(charts).to_have_count(2)
        expect(charts.first).to_have_attribute("aria-label", re.compile("baseline mean 30.0%"))
        expect(page.locator("#v-rate")).to_contain_text(f"h = {data['h']:g}")
        rows = page.locator("#v-rate tbody tr")
        expect(rows).to_have_count(len(data["days"]))
        for n, day in enumerate(data["days"]):
            cells = rows.nth(n)
            expect(cells.locator("th")).to_have_text(day["date"])
            expect(cells.locator("td").nth(0)).to_have_text(str(day["analysed"]))
            expect(cells.locator("td").nth(1)).to_have_text(str(day["flagged"]))
        shot(page, "vigilance-flag-rate")


def test_alerts_route_acknowledge(site: Site, browser: Browser,
                                  vigilance_db: psycopg.Connection) -> None:
    row = vigilance_db.execute(
        "INSERT INTO alerts (kind, model_id, version, label, detail, raised_at) VALUES "
        "('output-cusum', %s, '1.0', 'ich', '{}', %s) RETURNING id",
        (MODEL, START + timedelta(days=4))).fetchone()
    vigilance_db.commit()
    assert row is not None
    alert_id = row[0]
    data = site.require_route("/api/v1/admin/vigilance/alerts?open=true")
    assert [a["id"] for a in data["alerts"]] == [alert_id]
    with offline_context(browser) as (context, _):
        page = context.new_page()
        sign_in(page, site.base, site.tokens[Role.ADMIN], PAGE)
        alert = page.locator(f"#v-alerts li.v-alert[data-alert='{alert_id}']")
        expect(alert).to_contain_text("output-cusum", timeout=TIMEOUT_MS)
        alert.get_by_label("Note").fill("checked the CT protocol change")
        alert.get_by_role("button", name="Acknowledge").click()
        expect(page.locator("#v-alerts")).to_contain_text(f"Alert {alert_id} acknowledged.")
        expect(page.locator("#v-alerts li.v-alert")).to_have_count(0)
    acknowledged = vigilance_db.execute(
        "SELECT acknowledged_by, note FROM alerts WHERE id = %s", (alert_id,)).fetchone()
    assert acknowledged == ("dr.admin", "checked the CT protocol change")


def test_shadow_route_comparison(site: Site, browser: Browser) -> None:
    data = site.require_route(f"/api/v1/admin/vigilance/shadow?model={MODEL}&version=2.0"
                              f"&{PERIOD}")
    by_label = {entry["label"]: entry for entry in data["labels"]}
    assert by_label["ich"]["paired"] == SHADOWED
    with offline_context(browser) as (context, _):
        page = context.new_page()
        sign_in(page, site.base, site.tokens[Role.ADMIN], PAGE)
        version = page.locator("#v-shadow .v-shadow-version[data-version='2.0']")
        expect(version).to_have_count(1, timeout=TIMEOUT_MS)
        ich = version.locator("tr[data-label='ich'] td")
        for n, name in enumerate(("paired", "both_flagged", "active_only", "shadow_only",
                                  "neither")):
            expect(ich.nth(n)).to_have_text(str(by_label["ich"][name]))
        shot(page, "vigilance-shadow")


def test_models_route_promote(site: Site, browser: Browser,
                              vigilance_db: psycopg.Connection) -> None:
    data = site.require_route("/api/v1/admin/vigilance/models")
    model = next(m for m in data["models"] if m["model_id"] == MODEL)
    assert {v["version"]: v["state"] for v in model["versions"]} == {"1.0": "active",
                                                                     "2.0": "shadow"}
    with offline_context(browser) as (context, _):
        page = context.new_page()
        sign_in(page, site.base, site.tokens[Role.ADMIN], PAGE)
        states = page.locator("#v-states")
        expect(states.locator("tr[data-version='2.0']")).to_have_attribute(
            "data-state", "shadow", timeout=TIMEOUT_MS)
        states.get_by_role("button", name="Promote version 2.0").click()
        expect(states).to_contain_text("Version 2.0: promote done.", timeout=TIMEOUT_MS)
        expect(states.locator("tr[data-version='2.0']")).to_have_attribute("data-state",
                                                                           "active")
        expect(states.locator("tr[data-version='1.0']")).to_have_attribute("data-state",
                                                                           "shadow")
    rows = vigilance_db.execute("SELECT version, state FROM model_versions WHERE model_id = %s "
                                "ORDER BY version", (MODEL,)).fetchall()
    assert rows == [("1.0", "shadow"), ("2.0", "active")]
