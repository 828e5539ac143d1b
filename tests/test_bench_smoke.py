"""``python -m bench.run --smoke`` completes and writes every section with real numbers.

No timing is asserted: the smoke run's counts are too small to mean anything, and CI
machines differ. ``make bench`` is where the numbers are judged.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from triage.settings import PROJECT_ROOT

pytest.importorskip("matplotlib")
pytestmark = pytest.mark.servers

SECTIONS = ("ttn", "efficiency", "urgent_backlog", "ingest", "api", "memory", "web",
            "shadow", "streaming")
STATS = ("n", "p50", "p95", "p99", "max", "mean")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(
        value)


def _stats(value: dict[str, Any]) -> None:
    assert set(STATS) <= set(value), value
    assert value["n"] >= 1
    assert all(_number(value[k]) for k in STATS), value


@pytest.mark.timeout(240)
def test_bench_smoke(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "bench.run", "--smoke", "--output",
                           str(tmp_path)], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=230)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((tmp_path / "latest.json").read_text())
    assert results["smoke"] is True
    assert set(SECTIONS) <= set(results["sections"])
    s = results["sections"]

    for kind in ("radiograph", "head_ct"):
        ttn = s["ttn"][kind]
        assert isinstance(ttn["met"], bool)
        for part in ("ttn", "stable_wait", "queue_wait", "fetch", "decode", "inference",
                     "sr_build", "store", "other"):
            _stats(ttn["summary"][part])
        assert ttn["summary"]["ttn"]["p50"] > 0
    for section in ("efficiency", "urgent_backlog", "ingest"):
        assert _number(s[section]["ratio"]) and s[section]["ratio"] > 0, section
        assert isinstance(s[section]["met"], bool)
    assert s["efficiency"]["pipeline"]["studies_per_second"] > 0
    assert s["efficiency"]["limit"]["studies_per_second"] > 0
    assert s["urgent_backlog"]["under_backlog"]["ttn"] > 0
    for mode in ("alone", "with_service"):
        assert s["ingest"][mode]["instances_per_second"] > 0
    for load in ("closed_loop", "paced", "under_change"):
        _stats(s["api"][load]["latency_ms"])
        assert s["api"][load]["errors"] == 0
        assert s["api"][load]["requests"] > 0
    assert s["api"]["under_change"]["changes"] > 0
    assert s["api"]["capacity"] and all(load["requests"] > 0 for load in s["api"]["capacity"])
    assert s["api"]["items_per_page"] > 0
    assert all(_number(v) and v >= 0
               for v in s["efficiency"]["pipeline"]["cpu_seconds_per_study"].values())
    assert s["api"]["indexed"] >= results["config"]["api_indexed"]
    web = s["web"]
    assert web["target_seconds"] == 1.0
    assert all(isinstance(web[k], bool) for k in ("met", "first_page_met", "live_change_met"))
    _stats(web["first_page"]["summary"])
    _stats(web["live_change"]["summary"])
    assert web["first_page"]["cold"]["seconds"] > 0
    assert web["first_page"]["rows"] == min(100, web["studies"])
    assert web["live_change"]["changes"] == results["config"]["web_changes"]
    assert web["live_change"]["off_page"]["ok"] is True  # counts changed, rows kept
    memory = s["memory"]
    assert len(memory["samples"]) >= 2 and memory["workers"]
    for worker in memory["workers"].values():
        assert worker["last_kib"] > 0 and _number(worker["growth_percent"])
    shadow = s["shadow"]
    for phase, state in (("without", "retired"), ("with", "shadow")):
        ph = shadow[phase]
        assert ph["trial_state"] == state
        _stats(ph["ttn"])
        assert ph["ttn"]["p50"] > 0 and ph["studies"] == results["config"]["shadow_studies"]
        assert ph["one_sr_each"] is True and ph["shadow_drained"] is True
    # Only the version in shadow runs again, once per study, and writes no SR.
    assert shadow["without"]["shadow_analyses"] == 0
    assert shadow["with"]["shadow_analyses"] == shadow["with"]["studies"]
    assert _number(shadow["p95_ratio"]) and shadow["p95_ratio"] > 0
    assert results["models"]["radiograph_model_gmacs"] > 2.5
    for name in ("summary.md", "ttn.png", "memory.png", "api.png", "ratios.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "## Shadow trials" in (tmp_path / "summary.md").read_text()
    # Streaming off, then on: the positive CT is flagged by the analysis at stability, then
    # by a preliminary result, on a slice of its bleed either way.
    bleed = range(*results["config"]["streaming_bleed"])
    for mode, on in (("off", False), ("on", True)):
        m = s["streaming"][mode]
        assert m["streaming"] is on
        pos = m["positive"]
        assert _number(pos["flag_after_first_over_threshold"])
        assert _number(pos["flag_after_last_slice"])
        assert {r["flag_source"] for r in pos["records"]} == {
            "preliminary" if on else "analysis"}
        assert all(r["key_slice"] in bleed for r in pos["records"])
        _stats(m["negative"]["summary"])
        _stats(m["radiograph"]["summary"])
        # The ingest and efficiency measures are rerun per mode by the full run only.
        assert m["ingest_ratio"] is None and m["efficiency_ratio"] is None
        assert all(isinstance(v, bool) for v in m["met"].values())
    assert "## Streaming" in (tmp_path / "summary.md").read_text()
