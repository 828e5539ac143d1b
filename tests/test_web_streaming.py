"""A study whose images are still arriving, on the pages and through the API: the "images
still arriving (N)" badge (kept current by the live worklist), the preliminary findings on
the study page, and marking read, which asks for confirmation until the study is complete.
The API and pages are served by uvicorn with a real Redis; the browser is Debian's Chromium
under Playwright."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
import redis
from playwright.sync_api import Browser, Dialog, Page, expect

from tests.browser import axe_violations, describe, offline_context, shot, sign_in
from tests.conftest import serve_api
from tests.test_api import make_item
from tests.test_web import _row
from triage.audit import AuditAction, records
from triage.priority import PriorityClass
from triage.settings import Settings
from triage.tokens import Role, create_token
from triage.workflow import StillArriving, mark_read
from triage.worklist import PreliminaryItem, StudyStatus, Worklist, WorklistItem

pytestmark = pytest.mark.servers
TIMEOUT_MS = 15_000
RAISED = datetime(2026, 3, 2, 14, 5, 9, tzinfo=UTC)
REASON = ("AI, preliminary: 40 images so far: Intracranial hemorrhage "
          "(p=0.93, head-ct-hyperdensity 1.0.0)")


def arriving_item(n: int, arriving: int = 52) -> WorklistItem:
    """A routine head CT raised to critical by a preliminary finding on its first 40 images,
    with ``arriving`` images received so far."""
    return make_item(n, PriorityClass.CRITICAL, 2).model_copy(update={
        "status": StudyStatus.QUEUED, "findings": [], "arriving": arriving,
        "priority_reasons": [REASON],
        "preliminary": [PreliminaryItem(
            model="head-ct-hyperdensity", model_version="1.0.0",
            series_instance_uid=f"1.2.3.{n}.1", code="1386000", scheme="SCT",
            meaning="Intracranial hemorrhage", probability=0.93, threshold=0.5,
            priority=PriorityClass.CRITICAL, n_images=40, raised_at=RAISED)]})


def set_arriving(worklist: Worklist, uid: str, arriving: int) -> None:
    """As the service announces it: more images counted (``preliminary``), or the study
    complete and queued for its final analysis (``queued``)."""
    worklist.update(uid, lambda item: item.model_copy(update={"arriving": arriving}),
                    event="preliminary" if arriving else "queued")


class Site:
    def __init__(self, base: str, settings: Settings) -> None:
        self.base = base
        self.redis = redis.Redis.from_url(settings.redis_connection_url)
        self.worklist = Worklist(self.redis)
        self.token = create_token(self.redis, role=Role.RADIOLOGIST, owner="dr.reader")

    def post(self, path: str, **options: object) -> httpx.Response:
        return httpx.post(self.base + path, timeout=10,
                          headers={"Authorization": f"Bearer {self.token}"}, **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def site(redis_settings: Settings) -> Iterator[Site]:
    with serve_api(redis_settings) as base:
        yield Site(base, redis_settings)


@pytest.fixture
def clean(site: Site) -> Site:
    site.redis.flushall()
    site.token = create_token(site.redis, role=Role.RADIOLOGIST, owner="dr.reader")
    return site


def _reads(site: Site) -> list[dict]:
    found = [json.loads(raw) for _, raw in records(site.redis)]
    return [r for r in found if r["action"] == AuditAction.STUDY_READ.value]


def test_api_asks_to_confirm_reading_a_study_still_arriving(clean: Site) -> None:
    site = clean
    for n in (1, 2):
        site.worklist.put(arriving_item(n))
    site.worklist.put(make_item(3, PriorityClass.URGENT, 5))  # complete, never streamed

    detail = httpx.get(f"{site.base}/api/v1/studies/1.2.3.1", timeout=10,
                       headers={"Authorization": f"Bearer {site.token}"}).json()
    assert detail["arriving"] == 52 and detail["priority_reasons"] == [REASON]
    assert detail["preliminary"][0]["n_images"] == 40

    refused = site.post("/api/v1/studies/1.2.3.1/read")
    assert refused.status_code == 409
    assert refused.json() == {"detail": "images still arriving (52): confirm to mark read"}
    assert site.worklist.get("1.2.3.1").read_at is None  # type: ignore[union-attr]
    assert site.post("/api/v1/studies/1.2.3.1/read", params={"confirm": "false"}
                     ).status_code == 409
    assert site.post("/api/v1/studies/1.2.3.1/read", json={"confirm": False}
                     ).status_code == 409

    by_query = site.post("/api/v1/studies/1.2.3.1/read", params={"confirm": "true"})
    assert by_query.status_code == 200 and by_query.json()["read_by"] == "dr.reader"
    by_body = site.post("/api/v1/studies/1.2.3.2/read", json={"confirm": True})
    assert by_body.status_code == 200 and by_body.json()["read_by"] == "dr.reader"
    # A complete study is marked read as before: no confirmation, no body.
    assert site.post("/api/v1/studies/1.2.3.3/read").status_code == 200
    # The trail says which reads were of a study whose images were still arriving.
    details = {r["study_instance_uid"]: r["details"] for r in _reads(site)}
    assert details["1.2.3.1"] == {"arriving": 52} and details["1.2.3.2"] == {"arriving": 52}
    assert details["1.2.3.3"] == {}

    # Once the study is complete, nothing is asked.
    site.worklist.put(arriving_item(4))
    with pytest.raises(StillArriving, match=r"images still arriving \(52\)"):
        mark_read(site.worklist, "1.2.3.4", "dr.other")
    set_arriving(site.worklist, "1.2.3.4", 0)
    assert site.post("/api/v1/studies/1.2.3.4/read").status_code == 200


def _answer_dialogs(page: Page, accept: list[bool]) -> list[str]:
    """Answers the page's confirmation dialogs in turn (True accepts), recording them."""
    asked: list[str] = []

    def answer(dialog: Dialog) -> None:
        asked.append(dialog.message)
        if accept.pop(0) if accept else False:
            dialog.accept()
        else:
            dialog.dismiss()

    page.on("dialog", answer)
    return asked


def test_worklist_badge_is_live_and_m_asks_before_marking_read(clean: Site,
                                                               browser: Browser) -> None:
    site = clean
    site.worklist.put(arriving_item(1))
    site.worklist.put(make_item(2, PriorityClass.ROUTINE, 30))
    with offline_context(browser) as (context, outside):
        page = context.new_page()
        answers: list[bool] = [False, True]
        asked = _answer_dialogs(page, answers)
        sign_in(page, site.base, site.token)
        expect(page.locator("#live-state")).to_contain_text("Live", timeout=TIMEOUT_MS)
        row = _row(page, "1.2.3.1")
        expect(row.locator(".arriving-badge")).to_have_text("images still arriving (52)")
        expect(row.locator(".reasons")).to_contain_text(REASON)
        expect(_row(page, "1.2.3.2").locator(".arriving-badge")).to_have_count(0)

        # More images arrive: the live update re-renders the badge without reloading.
        page.evaluate("() => { window.notReloaded = true; }")
        set_arriving(site.worklist, "1.2.3.1", 97)
        expect(row.locator(".arriving-badge")).to_have_text("images still arriving (97)",
                                                            timeout=TIMEOUT_MS)
        assert page.evaluate("() => window.notReloaded") is True

        row.click()
        page.keyboard.press("m")  # declined: nothing is marked
        expect(page.locator("#live-state")).to_have_text("Not marked read.")
        assert asked == ["Images are still arriving for this study (97 received so far). "
                         "Mark it read anyway?"]
        assert site.worklist.get("1.2.3.1").read_at is None  # type: ignore[union-attr]
        page.keyboard.press("m")  # accepted
        expect(row.locator(".claim")).to_contain_text("read by dr.reader",
                                                      timeout=TIMEOUT_MS)
        assert len(asked) == 2

        # Complete now: the badge goes, and the next read asks nothing.
        site.worklist.put(arriving_item(3))
        expect(_row(page, "1.2.3.3").locator(".arriving-badge")).to_have_count(
            1, timeout=TIMEOUT_MS)
        set_arriving(site.worklist, "1.2.3.3", 0)
        row3 = _row(page, "1.2.3.3")
        expect(row3.locator(".arriving-badge")).to_have_count(0, timeout=TIMEOUT_MS)
        expect(row3.locator(".reasons")).to_contain_text(REASON)  # the reason stays
        row3.click()
        page.keyboard.press("m")
        expect(row3.locator(".claim")).to_contain_text("read by dr.reader",
                                                       timeout=TIMEOUT_MS)
        assert len(asked) == 2 and outside.urls == []
        shot(page, "worklist-streaming")


def test_study_page_shows_preliminary_and_confirms_reading(clean: Site,
                                                          browser: Browser) -> None:
    site = clean
    site.worklist.put(arriving_item(1))
    site.worklist.put(make_item(2, PriorityClass.ROUTINE, 30))
    with offline_context(browser) as (context, outside):
        page = context.new_page()
        answers: list[bool] = [True]
        asked = _answer_dialogs(page, answers)
        sign_in(page, site.base, site.token, "/studies/1.2.3.1")
        expect(page.locator(".patient-banner #arriving")).to_have_text(
            "images still arriving (52)")
        expect(page.locator(".priority-line")).to_contain_text(REASON)
        section = page.locator("section#preliminary")
        expect(section.locator("h2")).to_contain_text(
            "Preliminary (before the study was complete)")
        cells = section.locator("tbody tr").first.locator("td")
        expect(cells.nth(0)).to_contain_text("Intracranial hemorrhage")
        expect(cells.nth(1)).to_have_text("40")
        expect(cells.nth(2)).to_contain_text("p 0.93")
        expect(cells.nth(4)).to_have_text("head-ct-hyperdensity 1.0.0")
        expect(cells.nth(5)).to_have_text("2026-03-02 14:05:09")
        shot(page, "study-preliminary")

        page.click("#mark-read")  # the confirmation dialog, accepted
        expect(page.locator("#actions")).to_contain_text("Marked read", timeout=TIMEOUT_MS)
        assert len(asked) == 1 and "still arriving" in asked[0]
        item = site.worklist.get("1.2.3.1")
        assert item is not None and item.read_by == "dr.reader"

        # A page shown while the study looked complete: images started arriving since, so
        # the server asks for the confirmation step in the action bar.
        page.goto(site.base + "/studies/1.2.3.2")
        expect(page.locator("#arriving")).to_have_count(0)
        expect(page.locator("section#preliminary")).to_have_count(0)
        set_arriving(site.worklist, "1.2.3.2", 7)
        page.click("#mark-read")
        expect(page.locator("#actions .error")).to_have_text(
            "images still arriving (7): confirm to mark read", timeout=TIMEOUT_MS)
        assert site.worklist.get("1.2.3.2").read_at is None  # type: ignore[union-attr]
        page.click("#mark-read-confirm")
        expect(page.locator("#actions")).to_contain_text("Marked read", timeout=TIMEOUT_MS)
        assert site.worklist.get("1.2.3.2").read_by == "dr.reader"  # type: ignore[union-attr]

        # Complete again: marking read asks nothing; the preliminary history stays.
        site.worklist.put(arriving_item(3, arriving=0))
        page.goto(site.base + "/studies/1.2.3.3")
        expect(page.locator("#arriving")).to_have_count(0)
        expect(page.locator("section#preliminary tbody tr")).to_have_count(1)
        page.click("#mark-read")
        expect(page.locator("#actions")).to_contain_text("Marked read", timeout=TIMEOUT_MS)
        assert len(asked) == 1 and outside.urls == []
        assert site.worklist.get("1.2.3.3").read_by == "dr.reader"  # type: ignore[union-attr]



@pytest.mark.parametrize("theme", ["dark", "light"])
def test_badge_and_preliminary_section_pass_axe(clean: Site, browser: Browser,
                                                theme: str) -> None:
    site = clean
    site.worklist.put(arriving_item(1))
    with offline_context(browser, theme=theme, base_url=site.base, bypass_csp=True) as (
            context, _):
        page = context.new_page()
        sign_in(page, site.base, site.token)
        expect(page.locator(".arriving-badge")).to_have_count(1)
        checks = {"worklist": axe_violations(page)}
        page.goto(site.base + "/studies/1.2.3.1")
        expect(page.locator("section#preliminary")).to_have_count(1)
        checks["study"] = axe_violations(page)
        found = {name: v for name, v in checks.items() if v}
        assert not found, describe([{"page": k, "violations": v} for k, v in found.items()])
