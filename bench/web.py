"""The worklist page in a real browser, with a long worklist (``make bench``, section "web").

Debian's Chromium, driven by Playwright, signs in through the login page as a radiologist
and opens ``/`` while ``web_studies`` studies are on the worklist. Two things are timed, each
against a goal of one second:

- **First page:** from the start of ``page.goto("/")`` until the first page of rows
  (``#rows tr.row``, the page size or all) and the class counts are in the page, as this
  process sees it through Playwright. The first load after signing in (the browser's and the
  API's first worklist page) is reported on its own as ``cold``; the statistics are over the
  loads after it. For reference, the page's own clock: when a ``MutationObserver`` installed
  before the page's first byte first saw those rows and counts, and the Navigation Timing
  entries (response end, DOMContentLoaded end, load end) and the first contentful paint, all
  in milliseconds from the start of the navigation.
- **Live change:** with the page open and connected to the live events, ``Worklist.update``
  in this process raises one routine study to critical (``event="priority"``), one every
  ``interval`` seconds. The time is from just before the write (``time.time()`` here) until
  a ``MutationObserver`` in the page saw that study's row with ``data-priority="critical"``
  (``Date.now()`` there; both clocks are this machine's). The studies raised are the
  routine studies that have waited longest, so that once critical they belong on the first
  page: with thousands of studies, the first page shows only critical ones. Then one
  routine study that is not on the first page becomes urgent: the counts must change, and
  the rows shown must stay as they were, without the page reloading.

The worklist is filled as the API section fills it (``api_load.index_studies``), then every
study it added is given what a real one has (``realistic``): a patient, a modality and a
description, the findings of the models that apply, priority reasons, a result and a
delivery, and for many a read or a claim.
"""

from __future__ import annotations

import re
import time
import uuid
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from bench import api_load
from bench.measure import summary
from triage.priority import PriorityClass
from triage.uids import derived_uid
from triage.worklist import (
    DEFAULT_PAGE_SIZE,
    WORKLIST_KEY,
    DeliveryItem,
    DeliveryStatus,
    FindingItem,
    ResultItem,
    SeriesItem,
    StudyStatus,
    Worklist,
    WorklistItem,
    WorklistQuery,
    utcnow,
)

if TYPE_CHECKING:
    from playwright.sync_api import ViewportSize

TARGET_SECONDS = 1.0
CHROMIUM = "/usr/bin/chromium"
VIEWPORT: ViewportSize = {"width": 1440, "height": 900}
# ``api_load.index_studies`` gives study n the class CLASSES[n % 11] and this accession.
CLASSES = (PriorityClass.ROUTINE,) * 8 + (PriorityClass.URGENT,) * 2 + (
    PriorityClass.CRITICAL,)
_LOAD_ACCESSION = re.compile(r"BL(\d{8})$")
_LOAD_DESCRIPTION = "LOAD TEST"

# -- realistic worklist items ---------------------------------------------------------------

_SURNAMES = ("MARTIN", "BERNARD", "DUBOIS", "THOMAS", "ROBERT", "RICHARD", "PETIT", "DURAND",
             "LEROY", "MOREAU", "SIMON", "LAURENT", "LEFEBVRE", "MICHEL", "GARCIA", "DAVID",
             "BERTRAND", "ROUX", "VINCENT", "FOURNIER", "MOREL", "GIRARD", "ANDRE", "MERCIER")
_GIVEN = ("ANNE", "PIERRE", "MARIE", "JEAN", "SOPHIE", "LUC", "CLAIRE", "PAUL", "JULIE",
          "MARC", "LEA", "HUGO", "EMMA", "LOUIS", "CHLOE", "NOAH", "ALICE", "JULES")
_RADIOLOGISTS = ("dr.lambert", "dr.nguyen", "dr.okafor", "dr.schmidt")


class _Model:
    def __init__(self, model_id: str, version: str, name: str,
                 outputs: tuple[tuple[str, str, float, PriorityClass], ...]) -> None:
        self.id, self.version, self.name, self.outputs = model_id, version, name, outputs


# The shipped reference model, and a chest-radiograph model as a site would install one.
HEAD_CT = _Model("head-ct-hyperdensity", "1.1.0", "Head CT hyperdensity",
                 (("1386000", "Intracranial hemorrhage", 0.5, PriorityClass.CRITICAL),))
CHEST_XR = _Model("chest-xr-triage", "2.3.0", "Chest radiograph triage",
                  (("36118008", "Pneumothorax", 0.4, PriorityClass.CRITICAL),
                   ("60046008", "Pleural effusion", 0.5, PriorityClass.URGENT)))
# (modality, description, model or None, body part)
_EXAMS = (
    ("CT", "CT HEAD WITHOUT CONTRAST", HEAD_CT, "HEAD"),
    ("CR", "XR CHEST PA AND LATERAL", CHEST_XR, "CHEST"),
    ("DX", "XR CHEST AP PORTABLE", CHEST_XR, "CHEST"),
    ("MR", "MR BRAIN WITHOUT CONTRAST", None, "BRAIN"),
    ("CT", "CT HEAD WITHOUT CONTRAST", HEAD_CT, "HEAD"),
    ("DX", "XR CHEST PA", CHEST_XR, "CHEST"),
    ("CT", "CT ABDOMEN PELVIS WITH CONTRAST", None, "ABDOMEN"),
)


def _fraction(n: int, salt: int) -> float:
    """A deterministic number in [0, 1) for study ``n``."""
    return ((n * 2654435761 + salt * 40503) % 10007) / 10007


def realistic(item: WorklistItem, n: int, now: datetime) -> WorklistItem:
    """``item`` (study ``n`` of ``api_load.index_studies``) as a real study would look.

    Its UID, Orthanc id, accession and arrival stay; its class is ``CLASSES[n % 11]`` again
    (the watcher may have promoted it since). Critical studies have a positive finding that
    raised them; urgent ones a positive urgent finding or a clinical reason; routine ones
    negative findings, or no analysis (queued, or no model applies). Routine studies that
    waited more than 30 minutes, and others more than 3 hours, have been read, so that the
    watcher promotes none of them while the benchmark runs.
    """
    priority = CLASSES[n % len(CLASSES)]
    modality, description, model, body_part = _EXAMS[n % len(_EXAMS)]
    if priority is PriorityClass.CRITICAL and model is None:
        modality, description, model, body_part = _EXAMS[0]
    waited = now - item.received_at
    status = StudyStatus.ANALYSED
    status_reason = ""
    reasons: list[str] = []
    if model is None:
        status, status_reason = StudyStatus.SKIPPED, "no installed model applies to this study"
    elif priority is PriorityClass.ROUTINE and n % 3 == 1 and waited < timedelta(minutes=5):
        status = StudyStatus.QUEUED
    if priority is PriorityClass.URGENT and (model is not CHEST_XR or n % 3 == 0):
        reasons.append("clinical: emergency department")
    study_uid = item.study_instance_uid
    series_uid = derived_uid("bench-web-series", study_uid)
    findings: list[FindingItem] = []
    results: list[ResultItem] = []
    deliveries: list[DeliveryItem] = []
    sr_uid = None
    if status is StudyStatus.ANALYSED and model is not None:
        sr_uid = derived_uid("bench-web-sr", study_uid)
        for index, (code, meaning, threshold, raises) in enumerate(model.outputs):
            # Positive when this output is what made the study critical or urgent.
            positive = (priority is raises and not reasons
                        and (priority is PriorityClass.CRITICAL or index == 1))
            low = _fraction(n, index) * threshold * 0.9
            probability = round(threshold + (1 - threshold) * (0.15 + 0.8 * _fraction(
                n, index + 7)) if positive else low, 3)
            findings.append(FindingItem(
                code=code, scheme="SCT", meaning=meaning, probability=probability,
                threshold=threshold, positive=positive, priority=raises, model=model.id,
                model_version=model.version,
                key_sop_instance_uid=derived_uid("bench-web-key", study_uid, code)
                if positive else None))
            if positive:
                reasons.append(f"AI: {meaning} (p={probability:.2f}, {model.id} "
                               f"{model.version})")
        slices = 1 if modality in ("CR", "DX") else 180 + n % 140
        results.append(ResultItem(
            model=model.id, model_version=model.version, model_name=model.name,
            weights_sha256=uuid.UUID(int=n).hex * 2, regulatory_status="research-use-only",
            series_instance_uid=series_uid, n_instances=slices,
            timings={"fetch": 0.006 * slices, "decode": 0.002 * slices, "inference": 0.06,
                     "sr_build": 0.02, "store": 0.005}))
        deliveries.append(DeliveryItem(
            target="PACS", kind="dicom", sr_sop_instance_uid=sr_uid,
            status=DeliveryStatus.DELIVERED, attempts=1,
            delivered_at=item.received_at + timedelta(seconds=4)))
    read = waited > (timedelta(minutes=30) if priority is PriorityClass.ROUTINE
                     else timedelta(hours=3))
    claimed = not read and n % 7 == 3
    radiologist = _RADIOLOGISTS[n % len(_RADIOLOGISTS)]
    age = 18 + n % 75
    birth = now.date().replace(year=now.year - age, month=1 + n % 12, day=1 + n % 28)
    return item.model_copy(update={
        "patient_name": f"{_SURNAMES[n % len(_SURNAMES)]}^{_GIVEN[n // 7 % len(_GIVEN)]}",
        "patient_id": f"MRN{4_100_000 + n * 37:08d}",
        "patient_birth_date": birth.strftime("%Y%m%d"), "patient_sex": "FM"[n % 2],
        "patient_age": f"{age:03d}Y", "modality": modality, "study_description": description,
        "study_date": item.received_at.strftime("%Y%m%d"),
        "status": status, "status_reason": status_reason,
        "clinical_priority": PriorityClass.URGENT if any(
            r.startswith("clinical:") for r in reasons) else PriorityClass.ROUTINE,
        "priority": priority, "priority_reasons": reasons,
        "score": max((f.probability for f in findings), default=0.0), "findings": findings,
        "analysed_at": item.received_at + timedelta(seconds=3)
        if status is StudyStatus.ANALYSED else None,
        "sr_sop_instance_uid": sr_uid, "job_id": uuid.UUID(int=n + 1).hex,
        "series": [SeriesItem(series_instance_uid=series_uid, modality=modality,
                              description=description, body_part=body_part,
                              n_instances=1 if modality in ("CR", "DX") else 200)],
        "results": results, "deliveries": deliveries,
        "read_by": radiologist if read else None,
        "read_at": item.received_at + timedelta(minutes=20) if read else None,
        "claimed_by": radiologist if claimed else None,
        "claim_expires_at": now + timedelta(days=1) if claimed else None,
    })


def seed(worklist: Worklist, target: int) -> dict[str, int]:
    """Fill the worklist to ``target`` studies as the API section does, then make every
    study that ``api_load.index_studies`` added (now or before) realistic."""
    added = api_load.index_studies(worklist, target)
    now = utcnow()
    made = 0

    def change(item: WorklistItem) -> WorklistItem | None:
        match = _LOAD_ACCESSION.match(item.accession_number)
        if match is None or item.study_description != _LOAD_DESCRIPTION:
            return None
        return realistic(item, int(match.group(1)), now)

    for raw in cast(list[bytes], worklist.redis.zrange(WORKLIST_KEY, 0, -1)):
        if worklist.update(raw.decode(), change, event="updated") is not None:
            made += 1
    return {"added": added, "made_realistic": made}


# -- in the browser -------------------------------------------------------------------------

# Installed before each page's first byte: when the first page of rows and the counts are
# in the page, by the page's clock (milliseconds since the navigation started).
_FIRST_PAGE_OBSERVER = """(want) => {
  if (location.pathname !== "/") return;
  window.__benchVisible = null;
  const ready = () => {
    const counts = document.querySelectorAll("#counts-holder .n[data-class]");
    return document.querySelectorAll("#rows tr.row").length >= want && counts.length === 3
      && Array.from(counts).every((c) => c.textContent.trim() !== "");
  };
  const observer = new MutationObserver(() => {
    if (window.__benchVisible === null && ready()) {
      window.__benchVisible = performance.now();
      observer.disconnect();
    }
  });
  observer.observe(document, {childList: true, subtree: true});
}"""

_FIRST_PAGE_READY = """(want) => {
  const counts = document.querySelectorAll("#counts-holder .n[data-class]");
  return document.querySelectorAll("#rows tr.row").length >= want && counts.length === 3
    && Array.from(counts).every((c) => c.textContent.trim() !== "");
}"""

_NAVIGATION = """() => {
  const n = performance.getEntriesByType("navigation")[0];
  const paint = performance.getEntriesByName("first-contentful-paint")[0];
  return {response_start: n.responseStart, response_end: n.responseEnd,
          dom_content_loaded: n.domContentLoadedEventEnd, load: n.loadEventEnd,
          first_contentful_paint: paint ? paint.startTime : null,
          visible: window.__benchVisible, html_bytes: n.decodedBodySize,
          rows: document.querySelectorAll("#rows tr.row").length};
}"""

# Installed on the open page before the changes: the first time (Date.now()) each watched
# study's row shows the wanted priority, or the counts show the wanted numbers.
_CHANGE_OBSERVER = """() => {
  const b = window.__bench = {watch: {}, seen: {}, painted: {}, counts: null,
                              countsSeen: null};
  window.__benchNotReloaded = true;
  const counts = () => Object.fromEntries(Array.from(
    document.querySelectorAll("#counts-holder .n[data-class]"),
    (c) => [c.dataset.class, Number(c.textContent.trim())]));
  const check = () => {
    const now = Date.now();
    for (const [uid, want] of Object.entries(b.watch)) {
      if (b.seen[uid] !== undefined) continue;
      const row = document.querySelector('#rows tr.row[data-uid="' + CSS.escape(uid) + '"]');
      if (row && row.dataset.priority === want) {
        b.seen[uid] = now;
        requestAnimationFrame(() => { b.painted[uid] = Date.now(); });
      }
    }
    if (b.counts && b.countsSeen === null) {
      const have = counts();
      if (Object.entries(b.counts).every(([k, v]) => have[k] === v)) b.countsSeen = now;
    }
  };
  new MutationObserver(check).observe(document.getElementById("worklist"), {
    childList: true, subtree: true, attributes: true, characterData: true});
  return counts();
}"""


def _first_page_count(worklist: Worklist) -> int:
    return min(DEFAULT_PAGE_SIZE, int(worklist.redis.zcard(WORKLIST_KEY)))


def _sign_in(page: Any, base: str, token: str) -> None:
    """Through the login page, landing on /healthz: the first worklist load stays cold."""
    page.goto(base + "/login?next=/healthz")
    page.fill("#token", token)
    page.click("form[action='/login'] button[type=submit]")
    page.wait_for_url(base + "/healthz")


def _load(page: Any, base: str, want: int) -> dict[str, Any]:
    started = time.perf_counter()
    page.goto(base + "/", wait_until="commit")
    page.wait_for_function(_FIRST_PAGE_READY, arg=want, polling="raf", timeout=30_000)
    seconds = time.perf_counter() - started
    page.wait_for_load_state("load")
    timing = page.evaluate(_NAVIGATION)
    if timing["rows"] < want:
        raise RuntimeError(f"the worklist page shows {timing['rows']} rows, not {want}")

    def s(name: str) -> float | None:
        value = timing[name]
        return None if value is None else value / 1000

    return {"seconds": seconds, "in_page_seconds": s("visible"),
            "response_start": s("response_start"), "response_end": s("response_end"),
            "dom_content_loaded": s("dom_content_loaded"), "load": s("load"),
            "first_contentful_paint": s("first_contentful_paint"),
            "html_bytes": timing["html_bytes"], "rows": timing["rows"]}


def _stats(records: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return summary([r[name] for r in records if r[name] is not None])


def _escalation_candidates(worklist: Worklist, count: int) -> list[str]:
    """The routine studies that have waited longest: raised to critical, each belongs on
    the first page (the critical class comes first, longest waiting first)."""
    uids = [item.study_instance_uid for item in worklist.query(
        WorklistQuery(priority=PriorityClass.ROUTINE), limit=count).items]
    if len(uids) < count:
        raise RuntimeError(f"only {len(uids)} routine studies to raise, {count} needed")
    return uids


def _off_page_routine(worklist: Worklist) -> str | None:
    """The newest routine study, if it is after the first page and stays after it once
    urgent (with thousands of studies it does; with a short list it may not)."""
    last = cast(list[tuple[bytes, float]], worklist.redis.zrange(
        WORKLIST_KEY, DEFAULT_PAGE_SIZE - 1, DEFAULT_PAGE_SIZE - 1, withscores=True))
    newest = worklist.query(WorklistQuery(priority=PriorityClass.ROUTINE), limit=1,
                            offset=max(0, worklist.query_counts()["routine"] - 1)).items
    if not last or not newest:
        return None
    urgent = newest[0].model_copy(update={"priority": PriorityClass.URGENT})
    return newest[0].study_instance_uid if urgent.order_key > last[0][1] else None


def _raise(worklist: Worklist, uid: str, to: PriorityClass, reason: str) -> None:
    worklist.update(uid, lambda item: item.model_copy(update={
        "priority": to, "priority_reasons": [*item.priority_reasons, reason]}),
        event="priority")


def live_changes(page: Any, worklist: Worklist, changes: int,
                 interval: float) -> dict[str, Any]:
    page.wait_for_function(
        "() => (document.getElementById('live-state') || {}).textContent.startsWith('Live')",
        timeout=30_000)
    before = page.evaluate(_CHANGE_OBSERVER)
    uids = _escalation_candidates(worklist, changes)
    written: dict[str, float] = {}
    ranks: list[int] = []
    for n, uid in enumerate(uids):
        page.evaluate("(uid) => { window.__bench.watch[uid] = 'critical'; }", uid)
        if n:
            time.sleep(max(0.0, interval - (time.time() - written[uids[n - 1]] / 1000)))
        written[uid] = time.time() * 1000
        _raise(worklist, uid, PriorityClass.CRITICAL, "bench: raised to critical")
        ranks.append(int(cast(int, worklist.redis.zrank(WORKLIST_KEY, uid))))
    page.wait_for_function(
        "(n) => Object.keys(window.__bench.painted).length >= n", arg=len(uids),
        timeout=30_000)
    seen = page.evaluate("() => window.__bench")
    records = [{"uid": uid, "seconds": (seen["seen"][uid] - written[uid]) / 1000,
                "painted_seconds": (seen["painted"][uid] - written[uid]) / 1000,
                "rank_after": rank} for uid, rank in zip(uids, ranks, strict=True)]
    if max(ranks) >= DEFAULT_PAGE_SIZE:
        raise RuntimeError(f"a raised study is at position {max(ranks)}, not on the first page")
    latency = summary([r["seconds"] for r in records])
    out: dict[str, Any] = {
        "changes": len(records), "interval_seconds": interval,
        "change": "routine -> critical, Worklist.update with event priority",
        "summary": latency, "painted": summary([r["painted_seconds"] for r in records]),
        "met": latency["p95"] < TARGET_SECONDS, "records": records,
        "off_page": off_page_change(page, worklist, before, len(uids))}
    out["met"] = out["met"] and out["off_page"]["ok"] is not False
    return out


def off_page_change(page: Any, worklist: Worklist, before: dict[str, int],
                    raised: int) -> dict[str, Any]:
    """A routine study after the first page becomes urgent, and stays after the first page:
    the counts change, the rows shown stay as they are, and the page is not reloaded. When
    no such study exists (a short list), a new routine study arrives at the end instead."""
    uid = _off_page_routine(worklist)
    if int(worklist.redis.zcard(WORKLIST_KEY)) < DEFAULT_PAGE_SIZE:
        return {"ok": None, "change": "none: every study is on the first page"}
    rows_before = page.evaluate(
        "() => Array.from(document.querySelectorAll('#rows tr.row'), "
        "(r) => r.dataset.uid + ' ' + r.dataset.version)")
    want = {**before, "critical": before["critical"] + raised,
            "routine": before["routine"] - raised}
    if uid is not None:
        change = "routine -> urgent, after the first page"
        want.update(routine=want["routine"] - 1, urgent=want["urgent"] + 1)
    else:
        change = "a new routine study, after the first page"
        want.update(routine=want["routine"] + 1)
    page.evaluate("(want) => { window.__bench.counts = want; }", want)
    written = time.time() * 1000
    if uid is not None:
        _raise(worklist, uid, PriorityClass.URGENT, "bench: raised to urgent")
    else:
        now = utcnow()
        uid = f"2.25.{uuid.uuid4().int}"
        worklist.put(realistic(WorklistItem(
            study_instance_uid=uid, orthanc_id=uuid.uuid4().hex, received_at=now), 0, now),
            event="queued")
    page.wait_for_function("() => window.__bench.countsSeen !== null", timeout=30_000)
    after = page.evaluate(
        "() => ({seen: window.__bench.countsSeen, same: window.__benchNotReloaded === true,"
        " live: document.getElementById('live-state').textContent,"
        " rows: Array.from(document.querySelectorAll('#rows tr.row'),"
        " (r) => r.dataset.uid + ' ' + r.dataset.version)})")
    rows_kept = after["rows"] == rows_before
    shown = bool(page.locator(f"#rows tr.row[data-uid='{uid}']").count())
    return {"ok": rows_kept and after["same"] and not shown
            and after["live"].startswith("Live"), "change": change,
            "counts_seconds": (after["seen"] - written) / 1000, "counts": want,
            "rows_kept": rows_kept, "not_reloaded": after["same"], "shown": shown,
            "live_state": after["live"]}


def measure(base: str, worklist: Worklist, token: str, *, loads: int, changes: int,
            interval: float) -> dict[str, Any]:
    """Sign in, ``loads`` loads of ``/`` (the first one cold), then ``changes`` live changes
    on the open page. Needs Debian's Chromium (``CHROMIUM``); no browser is downloaded."""
    from playwright.sync_api import sync_playwright

    want = _first_page_count(worklist)
    studies = int(worklist.redis.zcard(WORKLIST_KEY))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            context = browser.new_context(viewport=VIEWPORT)
            context.add_init_script(f"({_FIRST_PAGE_OBSERVER})({want});")
            page = context.new_page()
            _sign_in(page, base, token)
            records = [_load(page, base, want) for _ in range(loads)]
            live = live_changes(page, worklist, changes, interval)
            version = browser.version
            context.close()
        finally:
            browser.close()
    cold, warm = records[0], records[1:] or records[:1]
    first = {
        "loads": len(records), "rows": want, "cold": cold,
        "summary": _stats(warm, "seconds"),
        "in_page": _stats(warm, "in_page_seconds"),
        "navigation": {name: _stats(warm, name) for name in (
            "response_start", "response_end", "dom_content_loaded", "load",
            "first_contentful_paint")},
        "html_bytes": warm[-1]["html_bytes"], "records": records,
    }
    first["met"] = (first["summary"]["p95"] < TARGET_SECONDS
                    and cold["seconds"] < TARGET_SECONDS)
    return {"target_seconds": TARGET_SECONDS, "met": first["met"] and live["met"],
            "first_page_met": first["met"], "live_change_met": live["met"],
            "studies": studies, "page_size": DEFAULT_PAGE_SIZE,
            "browser": f"Chromium {version} (headless, {CHROMIUM}), Playwright",
            "viewport": VIEWPORT, "first_page": first, "live_change": live}
