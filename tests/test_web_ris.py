"""RIS orders on the pages, and the HL7 messages not accepted for admins: the study page's
"Order (RIS)" section, the row's clinical question and "order cancelled" badge (kept current
by the live worklist), and ``/api/v1/admin/ris/rejected`` with its admin page. The API and
pages are served by uvicorn with a real Redis; the browser is Debian's Chromium under
Playwright."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from html import unescape

import httpx
import pytest
import redis
from playwright.sync_api import Browser, expect

from tests.browser import axe_violations, describe, offline_context, shot, sign_in
from tests.conftest import serve_api
from tests.test_api import make_item
from tests.test_web import _row
from triage.audit import AUDIT_KEY, AuditAction
from triage.priority import PriorityClass
from triage.ris.store import RejectedMessage, keep_rejected
from triage.settings import Settings
from triage.tokens import Role, create_token
from triage.web.ris import order_priority, patient_class
from triage.worklist import OrderItem, OrderStatus, Worklist, WorklistItem

pytestmark = pytest.mark.servers
TIMEOUT_MS = 15_000
RECEIVED = datetime(2026, 3, 2, 14, 5, 9, tzinfo=UTC)
UPDATED = datetime(2026, 3, 2, 14, 31, 40, tzinfo=UTC)
REASON = "clinical: STAT order (RIS)"
QUESTION = "Sudden severe headache since 2 h, rule out subarachnoid haemorrhage"
HOSTILE = "<script>window.pwned = true</script> & <b>bold</b>"


def stat_order(n: int, question: str = QUESTION) -> OrderItem:
    return OrderItem(
        key=f"ris-main|P100{n}|F200{n}", sender="ris-main", placer_order_number=f"P100{n}",
        filler_order_number=f"F200{n}", accession_number=f"A{n}", order_control="NW",
        priority_code="S", priority=PriorityClass.URGENT, patient_class="E",
        ordering_location="Emergency department, bay 4", clinical_question=question,
        procedure="CT head without contrast", received_at=RECEIVED, updated_at=RECEIVED)


def ordered_item(n: int, question: str = QUESTION) -> WorklistItem:
    """A head CT whose STAT order from the emergency department raised it to urgent."""
    return make_item(n, PriorityClass.URGENT, 3).model_copy(update={
        "clinical_priority": PriorityClass.URGENT, "priority_reasons": [REASON],
        "orders": [stat_order(n, question)]})


def end_order(worklist: Worklist, uid: str, status: OrderStatus, control: str) -> None:
    """As the service records it: the RIS called the order off (``order`` event)."""
    def change(item: WorklistItem) -> WorklistItem:
        orders = [o.model_copy(update={"status": status, "order_control": control,
                                       "updated_at": UPDATED}) for o in item.orders]
        return item.model_copy(update={"orders": orders})

    assert worklist.update(uid, change, event="order") is not None


class Site:
    def __init__(self, base: str, settings: Settings) -> None:
        self.base = base
        self.redis = redis.Redis.from_url(settings.redis_connection_url)
        self.worklist = Worklist(self.redis)
        self.tokens: dict[Role, str] = {}

    def reset(self) -> None:
        self.redis.flushall()
        self.tokens = {role: create_token(self.redis, role=role, owner=f"{role.value}.a")
                       for role in (Role.RADIOLOGIST, Role.ADMIN)}

    def put(self, item: WorklistItem) -> None:
        self.worklist.upsert(item.study_instance_uid, lambda _old: item, event="order")

    def api(self, path: str, role: Role | None, **params: object) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.tokens[role]}"} if role else {}
        return httpx.get(self.base + path, headers=headers, params=params,  # type: ignore[arg-type]
                         timeout=10)

    @contextmanager
    def web(self, role: Role = Role.RADIOLOGIST) -> Iterator[httpx.Client]:
        """A signed-in browser session, without a browser."""
        with httpx.Client(base_url=self.base, timeout=10) as client:
            answer = client.post("/login", data={"token": self.tokens[role]})
            assert answer.status_code == 303, answer.text
            yield client


@pytest.fixture(scope="module")
def site(redis_settings: Settings) -> Iterator[Site]:
    with serve_api(redis_settings) as base:
        yield Site(base, redis_settings)


@pytest.fixture
def clean(site: Site) -> Site:
    site.reset()
    return site


def _text(html: str) -> str:
    """What a reader sees of some HTML: tags gone, entities decoded, spaces collapsed."""
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", html)).split())


def _section(html: str, opening: str, closing: str) -> str:
    start = html.index(opening)
    return html[start:html.index(closing, start)]


def _row_html(html: str, uid: str) -> str:
    return _section(html, f'data-uid="{uid}"', "</tr>")


def test_priority_and_patient_class_are_spelled_out() -> None:
    assert order_priority("S") == "STAT (S)" and order_priority("a") == "ASAP (A)"
    assert order_priority("R^Routine^HL70485") == "Routine (R)"
    assert order_priority("TM30") == "Timing critical (within 30 minutes) (TM30)"
    assert order_priority("X9") == "X9" and order_priority(" ") == ""
    assert patient_class("E") == "Emergency (E)" and patient_class("I") == "Inpatient (I)"
    assert patient_class("Q") == "Q" and patient_class("") == ""


def test_admins_see_the_messages_not_accepted(clean: Site) -> None:
    site = clean
    for n, (answer, reason) in enumerate([
            ("AR", "unsupported message type ADT^A01"),
            ("AE", "no patient identifier (PID-3)"),
            ("closed", "message larger than 1048576 bytes")]):
        keep_rejected(site.redis, RejectedMessage(
            at=datetime(2026, 3, 2, 9, n, tzinfo=UTC), peer=f"10.0.0.{n}:5012{n}",
            sender="ris-main" if n < 2 else "", answer=answer, reason=reason,
            message_type=["ADT^A01", "ORM^O01", ""][n], control_id=f"MSG{n}", size=300 + n,
            excerpt=f"MSH|^~\\&|RIS|HOSP|||20260302||ORM^O01|MSG{n}|P|2.5.1\n"
                    f"OBR|1|P1||CT^{HOSTILE}"))

    answer = site.api("/api/v1/admin/ris/rejected", Role.ADMIN)
    assert answer.status_code == 200
    found = [RejectedMessage.model_validate(m) for m in answer.json()]
    assert [m.control_id for m in found] == ["MSG2", "MSG1", "MSG0"]  # newest first
    assert found[1].answer == "AE" and found[1].reason == "no patient identifier (PID-3)"
    assert found[1].peer == "10.0.0.1:50121" and found[1].size == 301
    assert HOSTILE in found[0].excerpt
    limited = site.api("/api/v1/admin/ris/rejected", Role.ADMIN, limit=2).json()
    assert [m["control_id"] for m in limited] == ["MSG2", "MSG1"]
    for bad in (0, 1001):
        assert site.api("/api/v1/admin/ris/rejected", Role.ADMIN,
                        limit=bad).status_code == 422
    assert site.api("/api/v1/admin/ris/rejected", Role.RADIOLOGIST).status_code == 403
    assert site.api("/api/v1/admin/ris/rejected", None).status_code == 401

    with site.web(Role.ADMIN) as web:
        assert 'href="/admin/ris"' in web.get("/admin").text  # from the console
        html = web.get("/admin/ris").text
        rows = re.findall(r'<tr class="rejected-message">.*?</tr>', html, re.S)
        assert len(rows) == 3
        assert _text(rows[1]).startswith(
            "2026-03-02 09:01:00 10.0.0.1:50121 ris-main AE no patient identifier (PID-3) "
            "ORM^O01 MSG1 301 bytes Show MSH|")
        assert "unknown closed message larger than 1048576 bytes" in _text(rows[0])
        excerpt = _section(rows[0], "<pre", "</pre>")
        assert "OBR|1|P1||CT^&lt;script&gt;window.pwned = true&lt;/script&gt; &amp; " in excerpt
        assert "<script>" not in html.split("</head>", 1)[1]
        for limit, shown in (("1", 1), ("0", 1), ("x", 3)):
            answer = web.get("/admin/ris", params={"limit": limit})
            assert answer.status_code == 200
            assert answer.text.count('<tr class="rejected-message">') == shown, limit
    with site.web(Role.RADIOLOGIST) as web:
        assert web.get("/admin/ris").status_code == 403
    # The excerpts hold patient data: every reading is audited (two by the API, four pages).
    viewed = [entry for entry in map(json.loads, site.redis.lrange(AUDIT_KEY, 0, -1))
              if entry["action"] == AuditAction.HL7_REJECTED_VIEWED.value]
    assert [e["details"]["messages"] for e in viewed] == [3, 2, 3, 1, 1, 3]
    assert {e["role"] for e in viewed} == {"admin"}


def test_study_page_and_row_show_the_order_and_its_end(clean: Site) -> None:
    site = clean
    site.put(ordered_item(1))
    site.put(ordered_item(2, question=HOSTILE + " " + "x" * 120))
    site.put(make_item(3, PriorityClass.ROUTINE, 9))  # no order
    with site.web() as web:
        study = web.get("/studies/1.2.3.1").text
        section = _text(_section(study, '<section class="card orders"', "</section>"))
        for shown in ("Order (RIS)", "CT head without contrast", "State Active",
                      "Priority as sent STAT (S) — raises the study to at least urgent",
                      "Patient class Emergency (E)",
                      "Ordering location Emergency department, bay 4",
                      f"Clinical question {QUESTION}", "Accession A1",
                      "Placer / filler order number P1001 / F2001", "From ris-main",
                      "Received (UTC) 2026-03-02 14:05:09",
                      "Updated (UTC) 2026-03-02 14:05:09"):
            assert shown in section, shown
        assert "cancelled" not in section and 'id="order-ended"' not in study
        assert REASON in _text(study)
        assert 'id="orders"' not in web.get("/studies/1.2.3.3").text

        rows = web.get("/ui/worklist/rows").text
        assert f"Question: {QUESTION}" in _text(_row_html(rows, "1.2.3.1"))
        assert "order-badge" not in rows
        assert "Question:" not in _row_html(rows, "1.2.3.3")
        # Free text from the RIS is text, not markup; a long one is cut, whole in the title.
        long_row = _row_html(rows, "1.2.3.2")
        assert "<script>" not in long_row and "<b>" not in long_row
        question = re.search(r'<div class="question" title="([^"]*)">(.*?)</div>', long_row)
        assert question is not None
        assert unescape(question.group(1)) == HOSTILE + " " + "x" * 120
        shown = _text(question.group(2))
        assert shown.startswith("Question: " + HOSTILE) and shown.endswith("x…")
        assert len(shown) == len("Question: ") + 90
        page2 = web.get("/studies/1.2.3.2").text
        assert "<script>window.pwned" not in page2
        assert "&lt;script&gt;window.pwned = true&lt;/script&gt; &amp; &lt;b&gt;" in page2

        end_order(site.worklist, "1.2.3.1", OrderStatus.CANCELLED, "CA")
        end_order(site.worklist, "1.2.3.2", OrderStatus.DISCONTINUED, "DC")
        rows = web.get("/ui/worklist/rows").text
        assert re.search(r'<span class="order-badge">order cancelled</span>',
                         _row_html(rows, "1.2.3.1"))
        assert re.search(r'<span class="order-badge">order discontinued</span>',
                         _row_html(rows, "1.2.3.2"))
        study = web.get("/studies/1.2.3.1").text
        section = _text(_section(study, '<section class="card orders"', "</section>"))
        assert "CT head without contrast Order cancelled" in section
        assert "State Order cancelled (order control CA)" in section
        assert "Updated (UTC) 2026-03-02 14:31:40" in section
        assert ("neither removes the study from the worklist nor lowers its priority"
                in section)
        assert 'id="order-ended">order cancelled<' in study
        assert "Order discontinued" in _text(web.get("/studies/1.2.3.2").text)
    # The study keeps its place and its priority.
    item = site.worklist.get("1.2.3.1")
    assert item is not None and item.priority is PriorityClass.URGENT
    assert item.priority_reasons == [REASON]


def test_an_order_cancelled_while_the_pages_are_open_shows_at_once(
        clean: Site, browser: Browser) -> None:
    site = clean
    site.put(ordered_item(1))
    site.put(make_item(2, PriorityClass.ROUTINE, 30))
    with offline_context(browser) as (context, outside):
        page = context.new_page()
        sign_in(page, site.base, site.tokens[Role.RADIOLOGIST])
        expect(page.locator("#live-state")).to_contain_text("Live", timeout=TIMEOUT_MS)
        row = _row(page, "1.2.3.1")
        expect(row.locator(".question")).to_have_text(f"Question: {QUESTION}")
        expect(row.locator(".order-badge")).to_have_count(0)

        page.evaluate("() => { window.notReloaded = true; }")
        end_order(site.worklist, "1.2.3.1", OrderStatus.CANCELLED, "CA")
        expect(row.locator(".order-badge")).to_have_text("order cancelled", timeout=TIMEOUT_MS)
        expect(row.locator(".badge.urgent")).to_have_text("URGENT")
        assert page.evaluate("() => window.notReloaded") is True
        shot(page, "worklist-order-cancelled")

        # The study page says it changed, like for any other change of the study.
        study = context.new_page()
        with study.expect_response(lambda r: "/api/v1/worklist/events" in r.url):
            study.goto(site.base + "/studies/1.2.3.1")
        notice = study.locator(".study-page > p.message[role=status]")
        for _ in range(3):  # the stream may still be starting: announce again
            end_order(site.worklist, "1.2.3.1", OrderStatus.DISCONTINUED, "DC")
            try:
                expect(notice).to_contain_text("This study changed", timeout=3000)
                break
            except AssertionError:
                continue
        expect(notice).to_contain_text("This study changed (analysed, urgent).")
        notice.locator("a").click()
        expect(study.locator("section#orders .order-state")).to_have_text(
            "Order discontinued", timeout=TIMEOUT_MS)
        assert outside.urls == []


@pytest.mark.parametrize("theme", ["dark", "light"])
def test_order_section_and_badge_pass_axe(clean: Site, browser: Browser, theme: str) -> None:
    site = clean
    site.put(ordered_item(1))
    site.put(ordered_item(2))
    end_order(site.worklist, "1.2.3.2", OrderStatus.CANCELLED, "CA")
    with offline_context(browser, theme=theme, base_url=site.base, bypass_csp=True) as (
            context, _):
        page = context.new_page()
        sign_in(page, site.base, site.tokens[Role.RADIOLOGIST])
        expect(page.locator(".order-badge")).to_have_count(1)
        checks = {"worklist": axe_violations(page)}
        page.goto(site.base + "/studies/1.2.3.2")
        expect(page.locator("section#orders")).to_have_count(1)
        checks["study"] = axe_violations(page)
        shot(page, f"study-order-{theme}")
        found = {name: v for name, v in checks.items() if v}
        assert not found, describe([{"page": k, "violations": v} for k, v in found.items()])


def test_admin_page_of_messages_not_accepted_passes_axe(clean: Site, browser: Browser) -> None:
    site = clean
    keep_rejected(site.redis, RejectedMessage(
        at=datetime(2026, 3, 2, 9, 0, tzinfo=UTC), peer="10.0.0.9:50123", sender="ris-main",
        answer="AR", reason="unsupported message type ADT^A01", message_type="ADT^A01",
        control_id="MSG9", size=120, excerpt=f"MSH|^~\\&|RIS|HOSP\nNTE|1||{HOSTILE}"))
    with offline_context(browser, base_url=site.base, bypass_csp=True) as (context, outside):
        page = context.new_page()
        sign_in(page, site.base, site.tokens[Role.ADMIN], "/admin")
        page.click("#ris-link")
        expect(page.locator("h1")).to_have_text("HL7 messages not accepted")
        page.locator("td.excerpt summary").click()
        expect(page.locator("td.excerpt pre")).to_have_text(
            f"MSH|^~\\&|RIS|HOSP\nNTE|1||{HOSTILE}")
        assert page.evaluate("() => window.pwned") is None
        violations = axe_violations(page)
        shot(page, "admin-ris-rejected")
        assert not violations, describe(violations)
        assert outside.urls == []
