"""Driving Debian's Chromium with Playwright: no browser is ever downloaded, and every request
to a host other than this machine is blocked and recorded (the pages must need nothing from
outside the hospital). Screenshots go to ``test-artifacts/``."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from playwright.sync_api import Browser, BrowserContext, Page, Playwright, Route

from triage.settings import PROJECT_ROOT

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = PROJECT_ROOT / "test-artifacts"
AXE = PROJECT_ROOT / "node_modules" / "axe-core" / "axe.min.js"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


def launch(playwright: Playwright) -> Browser:
    return playwright.chromium.launch(executable_path=CHROMIUM)


class Outside:
    """Requests the pages tried to send outside this machine (all refused)."""

    def __init__(self) -> None:
        self.urls: list[str] = []

    def route(self, route: Route) -> None:
        url = route.request.url
        host = urlsplit(url).hostname or ""
        if url.startswith(("data:", "blob:")) or host in LOCAL_HOSTS:
            route.continue_()
        else:
            self.urls.append(url)
            route.abort("blockedbyclient")


@contextmanager
def offline_context(browser: Browser, *, theme: str | None = None, base_url: str = "",
                    **options: object) -> Iterator[tuple[BrowserContext, Outside]]:
    """A fresh browser profile whose requests outside this machine are blocked."""
    options = {"viewport": {"width": 1440, "height": 900}, **options}
    context = browser.new_context(**options)
    outside = Outside()
    context.route("**/*", outside.route)
    if theme and base_url:
        host = urlsplit(base_url).hostname or "127.0.0.1"
        context.add_cookies([{"name": "triage_theme", "value": theme, "domain": host,
                              "path": "/"}])
    try:
        yield context, outside
    finally:
        context.close()


def shot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def sign_in(page: Page, base: str, token: str, path: str = "/") -> None:
    page.goto(base + path)
    page.wait_for_url(re.compile(r".*/login.*"))
    page.fill("#token", token)
    page.click("form[action='/login'] button[type=submit]")
    try:
        page.wait_for_url(re.compile(re.escape(base) + re.escape(path) + r"(\?.*)?$"),
                          timeout=15_000)
    except Exception as exc:
        shot(page, "sign-in-failed")
        raise AssertionError(f"sign-in did not reach {path}: at {page.url}: "
                             f"{page.locator('body').inner_text()[:300]}") from exc


def axe_violations(page: Page, impacts: tuple[str, ...] = ("serious", "critical")
                   ) -> list[dict]:
    """axe-core's violations of the given impacts on the page as it is now. The page's
    context must bypass its CSP (axe is injected as an inline script)."""
    if not page.evaluate("() => typeof window.axe !== 'undefined'"):
        page.add_script_tag(path=str(AXE))
    result = page.evaluate("""async () => {
        const r = await axe.run(document, {resultTypes: ['violations']});
        return r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
            nodes: v.nodes.slice(0, 5).map(n => n.target.join(' '))}));
    }""")
    return [v for v in result if v["impact"] in impacts]


def describe(violations: list[dict]) -> str:
    return json.dumps(violations, indent=1)
