"""``make screenshots``: the README's pictures, taken from the real pages.

``python -m bench.screenshots [OUTPUT_DIR]`` (default ``docs/screenshots``) starts a local
stack as the benchmark does (``bench.stack``: real Orthanc and Redis, the watcher, the workers
and the API on free ports in a temporary folder, with the shipped models), sends the bundled
sample studies (``triage.samples``; the head CT with the hyperdense region becomes critical)
with storescu, waits until they are analysed, signs in through the login page in Debian's
Chromium (Playwright; no browser is downloaded) and saves:

- ``worklist.png``: the worklist, dark theme (the default);
- ``worklist-light.png``: the same with the ``triage_theme=light`` cookie;
- ``study.png``: the critical head CT's study page, whole page, once its key image is shown;
- ``admin.png``: the admin console, whole page, once every panel has loaded.

The stack is stopped at the end, by PID. Every patient in the pictures is a sample's made-up
demonstration patient.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.measure import wait_analysed
from bench.stack import BenchStack
from triage.priority import PriorityClass
from triage.samples import SAMPLES, write_samples
from triage.settings import PROJECT_ROOT
from triage.tokens import Role, create_token
from triage.uids import derived_uid
from triage.worklist import StudyStatus

if TYPE_CHECKING:
    from playwright.sync_api import ViewportSize

CHROMIUM = "/usr/bin/chromium"
VIEWPORT: ViewportSize = {"width": 1600, "height": 1000}
DEFAULT_OUTPUT = PROJECT_ROOT / "docs" / "screenshots"
CRITICAL_SAMPLE = "head-ct-hyperdense"
TIMEOUT_MS = 30_000


def _sign_in(page: Any, base: str, token: str, path: str) -> None:
    page.goto(f"{base}/login?next={path}")
    page.fill("#token", token)
    page.click("form[action='/login'] button[type=submit]")
    page.wait_for_url(base + path)


def _worklist_ready(page: Any, rows: int) -> None:
    page.wait_for_function(
        "(n) => document.querySelectorAll('#rows tr.row').length >= n"
        " && (document.getElementById('live-state') || {}).textContent.startsWith('Live')",
        arg=rows, timeout=TIMEOUT_MS)


def _set_theme(context: Any, base: str, theme: str) -> None:
    context.add_cookies([{"name": "triage_theme", "value": theme, "url": base + "/"}])


def take(base: str, tokens: dict[Role, str], critical_uid: str, rows: int,
         output: Path) -> list[Path]:
    from playwright.sync_api import sync_playwright

    output.mkdir(parents=True, exist_ok=True)
    saved = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            context = browser.new_context(viewport=VIEWPORT)
            page = context.new_page()
            _sign_in(page, base, tokens[Role.RADIOLOGIST], "/")
            _worklist_ready(page, rows)
            saved.append(output / "worklist.png")
            page.screenshot(path=str(saved[-1]))

            _set_theme(context, base, "light")
            page.goto(base + "/")
            _worklist_ready(page, rows)
            saved.append(output / "worklist-light.png")
            page.screenshot(path=str(saved[-1]))
            _set_theme(context, base, "dark")

            page.goto(f"{base}/studies/{critical_uid}")
            image = page.locator(".key-image img").first
            image.scroll_into_view_if_needed()
            page.wait_for_function(
                "() => { const i = document.querySelector('.key-image img');"
                " return i && i.complete && i.naturalWidth > 0; }", timeout=TIMEOUT_MS)
            page.evaluate("() => window.scrollTo(0, 0)")
            saved.append(output / "study.png")
            page.screenshot(path=str(saved[-1]), full_page=True)
            context.close()

            context = browser.new_context(viewport=VIEWPORT)
            page = context.new_page()
            _sign_in(page, base, tokens[Role.ADMIN], "/admin")
            page.wait_for_function(
                "() => !document.body.innerText.includes('Loading…')", timeout=TIMEOUT_MS)
            # The charts draw once their data has come (uPlot); none when it is missing.
            page.wait_for_function(
                "() => !window.uPlot || document.querySelectorAll('#charts .uplot').length >= 3",
                timeout=TIMEOUT_MS)
            saved.append(output / "admin.png")
            page.screenshot(path=str(saved[-1]), full_page=True)
            context.close()
        finally:
            browser.close()
    return saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.screenshots",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("output", nargs="?", type=Path, default=DEFAULT_OUTPUT,
                        help="folder for the PNG files (default: docs/screenshots)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="triage-screenshots-"))
    models = work / "models"
    shutil.copytree(PROJECT_ROOT / "models", models,
                    ignore=shutil.ignore_patterns("__pycache__"))
    stack = BenchStack(work / "data", models, stable_age=2)
    ok = False
    try:
        stack.start_servers()
        stack.start_service()
        for folder in write_samples(work / "samples"):
            stack.storescu(sorted(folder.glob("*.dcm")))
        uids = {s.key: derived_uid("sample-study", s.key) for s in SAMPLES}
        final = wait_analysed(stack.worklist, list(uids.values()), 180.0, stack.check_alive)
        critical = stack.worklist.get(uids[CRITICAL_SAMPLE])
        if (critical is None or final[uids[CRITICAL_SAMPLE]] != StudyStatus.ANALYSED.value
                or critical.priority is not PriorityClass.CRITICAL):
            raise RuntimeError(f"the hyperdense head CT is not critical: {critical}")
        assert stack.redis is not None
        tokens = {role: create_token(stack.redis, role=role, owner=owner, days=1)
                  for role, owner in ((Role.RADIOLOGIST, "dr.demo"), (Role.ADMIN, "admin"))}
        base = f"http://127.0.0.1:{stack.settings.api_port}"
        for path in take(base, tokens, uids[CRITICAL_SAMPLE], len(uids), args.output):
            print(path)
        ok = True
    finally:
        stack.stop()
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"stack data kept in {work}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
