"""The web pages in a real browser (Debian's Chromium under Playwright) against the real
stack (``triage up`` on free ports): signing in, the live worklist, the study page, the
keyboard, reconnection, the admin console, /docs without internet, accessibility."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import yaml
from playwright.sync_api import Browser, Page, expect

from tests.browser import axe_violations, describe, offline_context, shot, sign_in
from tests.conftest import stack_env
from tests.test_stack import UpProcess, send
from triage.samples import SAMPLES, build_sample
from triage.settings import PROJECT_ROOT, Settings
from triage.tokens import Role, create_token
from triage.workflow import claim, release
from triage.worklist import Worklist

pytestmark = pytest.mark.servers
SAMPLE = {s.key: s for s in SAMPLES}
HEAD_CT = PROJECT_ROOT / "models" / "head-ct-hyperdensity"
LIVE_TIMEOUT_MS = 30_000


class Stack:
    def __init__(self, up: UpProcess, settings: Settings, folder: Path) -> None:
        self.up = up
        self.base = up.api
        self.settings = settings
        self.redis = redis.Redis.from_url(settings.redis_connection_url)
        self.worklist = Worklist(self.redis)
        self.folder = folder
        self.tokens = {role: create_token(self.redis, role=role, owner=f"dr.{role.value}")
                       for role in (Role.RADIOLOGIST, Role.ADMIN)}

    def send(self, key: str) -> str:
        """Send one sample study with storescu; returns its Study Instance UID."""
        folder = self.folder / key
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for ds in build_sample(SAMPLE[key]):
            path = folder / f"{ds.InstanceNumber:03d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
            uid = str(ds.StudyInstanceUID)
        send(self.up.env, paths)
        return uid

    def api(self, path: str, role: Role = Role.ADMIN) -> httpx.Response:
        return httpx.get(self.base + path, timeout=10,
                         headers={"Authorization": f"Bearer {self.tokens[role]}"})

    def study(self, uid: str) -> dict:
        return self.api(f"/api/v1/studies/{uid}").json()

    def wait(self, predicate, what: str, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}")


def _models(folder: Path) -> Path:
    """The head-CT model, and a package that fails at run time on MR brain studies (for the
    admin's failed jobs): its manifest names an input the graph does not have."""
    shutil.copytree(HEAD_CT, folder / "head-ct-hyperdensity")
    broken = folder / "mr-broken"
    shutil.copytree(HEAD_CT, broken)
    manifest = yaml.safe_load((broken / "manifest.yaml").read_text())
    manifest["id"] = "mr-broken"
    manifest["applicability"] = {"modalities": ["MR"], "descriptions": ["*BRAIN*"]}
    manifest["preprocessing"]["input"] = "no-such-input"
    manifest["preprocessing"]["rescale"] = "raw"
    (broken / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    return folder


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("web")
    env = {**os.environ, **stack_env(root / "var"),
           "TRIAGE_MODELS_DIR": str(_models(root / "models")), "TRIAGE_JOB_RETRIES": "0",
           "TRIAGE_API_WORKERS": "1"}
    up = UpProcess(env, root / "up.log", "--workers", "2")
    up.start()
    settings = Settings(data_dir=root / "var", redis_port=int(env["TRIAGE_REDIS_PORT"]))
    try:
        yield Stack(up, settings, root / "studies")
    finally:
        up.stop()


def _row(page: Page, uid: str):  # type: ignore[no-untyped-def]
    return page.locator(f"#rows tr.row[data-uid='{uid}']")


def test_token_sign_in_live_worklist_and_key_image(stack: Stack, browser: Browser) -> None:
    with offline_context(browser) as (context, outside):
        page = context.new_page()
        console: list[str] = []
        page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
        sign_in(page, stack.base, stack.tokens[Role.RADIOLOGIST])
        [cookie] = [c for c in context.cookies() if c["name"] == "triage_session"]
        assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
        expect(page.locator("#live-state")).to_contain_text("Live", timeout=10_000)
        page.evaluate("() => { window.notReloaded = true; }")

        normal = stack.send("head-ct-normal")
        expect(_row(page, normal)).to_have_count(1, timeout=LIVE_TIMEOUT_MS)
        expect(_row(page, normal).locator(".status")).to_contain_text(
            "analysed", timeout=LIVE_TIMEOUT_MS)

        bleed = stack.send("head-ct-hyperdense")
        row = _row(page, bleed)
        expect(row).to_have_count(1, timeout=LIVE_TIMEOUT_MS)
        expect(row).to_have_attribute("data-priority", "critical", timeout=LIVE_TIMEOUT_MS)
        expect(row).to_have_class(re.compile(r"\balert-new\b"))
        expect(row.locator(".badge")).to_have_text("CRITICAL")  # text, never colour alone
        expect(row).to_contain_text("DEMO-HEAD-CT-HYPERDENSE")  # a second identifier
        expect(row.locator(".finding.positive")).to_contain_text("threshold 0.50")
        expect(page.locator("#counts-holder .n[data-class='critical']")).to_have_text("1")
        assert page.evaluate("() => window.notReloaded === true"), "the page was reloaded"
        shot(page, "worklist")

        row.locator("a.open").click()
        page.wait_for_url(re.compile(r".*/studies/.*"))
        expect(page.locator(".ai-result")).to_contain_text("unverified decision support")
        expect(page.locator(".ai-result")).to_contain_text("Research use only")
        image = page.locator(".key-image img")
        expect(image).to_have_count(1)
        page.wait_for_function(
            "() => { const i = document.querySelector('.key-image img');"
            " return i && i.complete && i.naturalWidth > 0; }", timeout=20_000)
        expect(page.locator(".key-image figcaption")).to_contain_text(
            "AI key image, not for diagnosis")
        shot(page, "study")
        # Nothing about patients is kept by the browser.
        assert page.evaluate("() => localStorage.length + sessionStorage.length") == 0
        headers = page.request.get(page.url).headers
        assert headers["cache-control"] == "no-store"
        assert outside.urls == []
        assert [m for m in console if "Content Security Policy" in m] == []

        # The idle lock (here: the Lock button) hides patient data and ends access until the
        # same user signs in again.
        # The screen locks at once; the session ends when the lock request is answered.
        with page.expect_response(lambda r: r.url.endswith("/session/lock")) as ended:
            page.click("#lock-now")
        assert ended.value.ok
        expect(page.locator("#lock-screen")).to_be_visible()
        assert "DEMO" not in page.locator("body").inner_text()
        locked = page.request.get(stack.base + "/api/v1/worklist")
        assert locked.status == 401
        page.click("#unlock")
        page.fill("#token", stack.tokens[Role.RADIOLOGIST])
        page.click("form[action='/login'] button[type=submit]")
        page.wait_for_url(re.compile(r".*/studies/.*"))
        assert page.request.get(stack.base + "/api/v1/worklist").status == 200


def test_sign_in_refuses_bad_tokens_and_sign_out_ends_the_session(
        stack: Stack, browser: Browser) -> None:
    with offline_context(browser) as (context, _):
        page = context.new_page()
        page.goto(stack.base + "/login")
        page.fill("#token", "trg_not-a-token")
        page.click("form[action='/login'] button[type=submit]")
        expect(page.locator("#login-error")).to_contain_text("not valid")
        sign_in(page, stack.base, stack.tokens[Role.RADIOLOGIST])
        page.click("text=Sign out")
        page.wait_for_url(re.compile(r".*/login\?reason=signed-out"))
        assert page.request.get(stack.base + "/api/v1/worklist").status == 401
        # A radiologist is not an admin.
        sign_in(page, stack.base, stack.tokens[Role.RADIOLOGIST])
        assert page.goto(stack.base + "/admin").status == 403
        # Changes need the session's CSRF token, not only its cookie.
        uid = stack.worklist.page()[0][0].study_instance_uid
        forged = page.request.post(f"{stack.base}/ui/studies/{uid}/claim")
        assert forged.status == 403


def _bleed_uid(stack: Stack) -> str:
    items = [i for i in stack.worklist.page()[0] if i.patient_id == "DEMO-HEAD-CT-HYPERDENSE"]
    if not items:
        uid = stack.send("head-ct-hyperdense")
        stack.wait(lambda: stack.study(uid).get("status") == "analysed", "analysis")
        return uid
    return items[0].study_instance_uid


def test_claim_feedback_and_read_are_stored(stack: Stack, browser: Browser) -> None:
    uid = _bleed_uid(stack)
    with offline_context(browser) as (context, _):
        page = context.new_page()
        sign_in(page, stack.base, stack.tokens[Role.RADIOLOGIST], f"/studies/{uid}")
        # Someone else claims it after the page was shown: the conflict is said on screen.
        claim(stack.worklist, uid, "dr.other", minutes=5)
        page.click("#claim")
        expect(page.locator("#actions .error")).to_contain_text("claimed by dr.other")
        expect(page.locator("#claim")).to_be_disabled()
        release(stack.worklist, uid, "dr.other")
        page.reload()
        page.click("#claim")
        expect(page.locator("#actions")).to_contain_text("Claimed by dr.radiologist")
        assert stack.study(uid)["claimed_by"] == "dr.radiologist"

        page.check("fieldset.verdict input[name^='agree-'][value='yes']")
        page.check("fieldset.verdict input[name^='present-'][value='yes']")
        page.click("#save-feedback")
        expect(page.locator("#feedback")).to_contain_text("Feedback saved")
        [feedback] = stack.study(uid)["feedback"]
        assert feedback["user"] == "dr.radiologist"
        assert feedback["findings"][0]["agree"] is True
        assert feedback["outcomes"] == {"1386000": True}

        page.click("#mark-read")
        expect(page.locator("#actions")).to_contain_text("Read by dr.radiologist")
        stored = stack.study(uid)
        assert stored["read_by"] == "dr.radiologist" and stored["claimed_by"] is None


def _focused_row_uid(page: Page) -> str | None:
    return page.evaluate("() => { const r = document.activeElement.closest('tr.row');"
                         " return r ? r.dataset.uid : null; }")


def test_keyboard_only(stack: Stack, browser: Browser) -> None:
    _bleed_uid(stack)
    if len(stack.worklist.page()[0]) < 2:
        uid = stack.send("head-ct-normal")
        stack.wait(lambda: stack.study(uid).get("status") == "analysed", "analysis")
    with offline_context(browser) as (context, _):
        page = context.new_page()
        sign_in(page, stack.base, stack.tokens[Role.RADIOLOGIST])
        expect(page.locator("#live-state")).to_contain_text("Live", timeout=10_000)
        uids = page.eval_on_selector_all("#rows tr.row", "rows => rows.map(r => r.dataset.uid)")
        page.keyboard.press("j")
        assert _focused_row_uid(page) == uids[0]
        outline = page.evaluate("() => getComputedStyle(document.activeElement).outlineStyle")
        assert outline not in ("none", ""), "focus must be visible"
        page.keyboard.press("j")
        assert _focused_row_uid(page) == uids[1]
        page.keyboard.press("k")
        page.keyboard.press("ArrowDown")
        assert _focused_row_uid(page) == uids[1]
        target = uids[1]
        for key, said, done in (
                ("c", "Claimed", lambda: stack.study(target)["claimed_by"] == "dr.radiologist"),
                ("r", "Released", lambda: stack.study(target)["claimed_by"] is None),
                ("m", "Marked read", lambda: stack.study(target)["read_by"] == "dr.radiologist")):
            assert _focused_row_uid(page) == target, f"focus left the row before {key!r}"
            page.keyboard.press(key)
            expect(page.locator("#live-state")).to_contain_text(said)
            stack.wait(done, said)
            page.evaluate("() => { document.getElementById('live-state').textContent = ''; }")
        page.keyboard.press("?")
        expect(page.locator("#help")).to_be_visible()
        page.keyboard.press("Escape")
        expect(page.locator("#help")).to_be_hidden()
        page.keyboard.press("Enter")
        page.wait_for_url(re.compile(r".*/studies/.*"))
        assert target in page.url.replace("%2E", ".")
        # On the study page, the actions are reached with Tab.
        for _ in range(40):
            page.keyboard.press("Tab")
            if page.evaluate("() => document.activeElement.id") == "claim":
                break
        else:
            raise AssertionError("Tab never reached the claim button")
        page.keyboard.press("Enter")
        expect(page.locator("#actions")).to_contain_text("Claimed by dr.radiologist")
        stack.wait(lambda: stack.study(target)["claimed_by"] == "dr.radiologist", "claim")
        shot(page, "keyboard-study")


def test_a_row_changed_while_disconnected_is_right_after_reconnecting(
        stack: Stack, browser: Browser) -> None:
    uid = _bleed_uid(stack)
    stack.worklist.update(uid, lambda i: i.model_copy(
        update={"claimed_by": None, "claim_expires_at": None}))
    with offline_context(browser) as (context, _):
        page = context.new_page()
        sign_in(page, stack.base, stack.tokens[Role.RADIOLOGIST])
        expect(page.locator("#live-state")).to_contain_text("Live", timeout=10_000)
        expect(_row(page, uid)).not_to_contain_text("claimed by dr.elsewhere")
        api = stack.up.pids()["api"]
        os.kill(api, signal.SIGKILL)  # the live connection drops
        expect(page.locator("#live-state")).to_contain_text("reconnecting", timeout=10_000)
        claim(stack.worklist, uid, "dr.elsewhere", minutes=5)  # changed meanwhile
        stack.wait(lambda: stack.up.pids().get("api") not in (None, api), "API restarted")
        expect(_row(page, uid)).to_contain_text("claimed by dr.elsewhere",
                                                timeout=LIVE_TIMEOUT_MS)
        expect(page.locator("#live-state")).to_contain_text("Live")


def test_admin_sees_a_failed_job_and_requeues_it(stack: Stack, browser: Browser) -> None:
    uid = stack.send("mr-small")
    stack.wait(lambda: stack.study(uid).get("status") == "failed", "failure", timeout=90)
    with offline_context(browser) as (context, _):
        page = context.new_page()
        console: list[str] = []
        page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
        sign_in(page, stack.base, stack.tokens[Role.ADMIN], "/admin")
        for chart in ("ttn", "studies", "queue"):
            expect(page.locator(f"#chart-{chart} .uplot")).to_have_count(1)
        job = page.locator("#panel-jobs tr.job", has_text=uid)
        expect(job).to_have_count(1, timeout=15_000)
        expect(job).to_contain_text("no model input no-such-input")
        expect(page.locator("#panel-queues")).to_contain_text("default")
        expect(page.locator("#panel-workers")).to_contain_text("yes")
        expect(page.locator("#panel-models")).to_contain_text("mr-broken")
        shot(page, "admin")
        job_id = job.get_attribute("data-job")
        job.locator("button.requeue").click()
        expect(page.locator("#panel-jobs")).to_contain_text(f"Requeued {job_id}")
        audit = stack.api("/api/v1/admin/audit").text
        assert '"admin.job_requeued"' in audit and job_id in audit
        # The job ran again (and failed again: the package is still broken).
        stack.wait(lambda: stack.study(uid)["status_reason"] != "", "re-run")
        assert [m for m in console if "Content Security Policy" in m] == []


def test_docs_render_with_outbound_network_blocked(stack: Stack, browser: Browser) -> None:
    with offline_context(browser) as (context, outside):
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(stack.base + "/docs")
        expect(page.locator(".swagger-ui .info .title")).to_contain_text("Triage",
                                                                         timeout=20_000)
        expect(page.locator(".opblock-tag-section").first).to_be_visible()
        shot(page, "docs")
        assert outside.urls == [] and errors == []


@pytest.mark.parametrize("theme", ["dark", "light"])
def test_pages_have_no_serious_accessibility_violations(stack: Stack, browser: Browser,
                                                        theme: str) -> None:
    uid = _bleed_uid(stack)
    with offline_context(browser, theme=theme, base_url=stack.base, bypass_csp=True) as (
            context, _):
        page = context.new_page()
        sign_in(page, stack.base, stack.tokens[Role.ADMIN])
        assert page.evaluate("() => document.documentElement.dataset.theme") == theme
        checks = {}
        checks["worklist"] = axe_violations(page)
        page.keyboard.press("j")
        page.keyboard.press("j")
        checks["worklist after keyboard"] = axe_violations(page)
        page.keyboard.press("?")
        checks["worklist with dialog"] = axe_violations(page)
        page.keyboard.press("Escape")
        page.goto(f"{stack.base}/studies/{uid}")
        page.wait_for_function("() => document.querySelector('.key-image img')"
                               " && document.querySelector('.key-image img').complete")
        checks["study"] = axe_violations(page)
        page.goto(stack.base + "/admin")
        expect(page.locator("text=Loading…")).to_have_count(0, timeout=15_000)
        checks["admin"] = axe_violations(page)
        page.click("#lock-now")
        expect(page.locator("#lock-screen")).to_be_visible()
        checks["lock screen"] = axe_violations(page)
        shot(page, f"lock-{theme}")
        found = {name: v for name, v in checks.items() if v}
        assert not found, describe([{"page": k, "violations": v} for k, v in found.items()])


@pytest.mark.parametrize(("width", "height", "min_font_px"),
                         [(1280, 800, 14), (3840, 2160, 22)])
def test_readable_on_a_laptop_and_a_4k_monitor(stack: Stack, browser: Browser, width: int,
                                               height: int, min_font_px: float) -> None:
    uid = _bleed_uid(stack)
    with offline_context(browser, viewport={"width": width, "height": height}) as (
            context, _):
        page = context.new_page()
        sign_in(page, stack.base, stack.tokens[Role.RADIOLOGIST])
        for path in ("/", f"/studies/{uid}"):
            page.goto(stack.base + path)
            sizes = page.evaluate("""() => ({
                overflow: document.documentElement.scrollWidth - window.innerWidth,
                font: parseFloat(getComputedStyle(document.body).fontSize)})""")
            assert sizes["overflow"] <= 0, f"{path} scrolls sideways at {width}px"
            assert sizes["font"] >= min_font_px, f"{path} text too small at {width}px"
        shot(page, f"study-{width}x{height}")


def test_a_lock_in_one_tab_locks_every_tab(stack: Stack, browser: Browser) -> None:
    with offline_context(browser) as (context, _):
        first = context.new_page()
        sign_in(first, stack.base, stack.tokens[Role.RADIOLOGIST])
        second = context.new_page()
        second.goto(stack.base + "/")
        expect(second.locator("#rows")).to_be_visible()
        # Every tab locks at once; the session ends when the lock request is answered.
        with first.expect_response(lambda r: r.url.endswith("/session/lock")) as ended:
            first.click("#lock-now")
        assert ended.value.ok
        expect(second.locator("#lock-screen")).to_be_visible()
        assert second.locator("#rows").count() == 0  # its patient data is gone too
        assert second.request.get(stack.base + "/api/v1/worklist").status == 401
