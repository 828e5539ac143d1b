"""The Markdown summary and the PNG plots of a benchmark run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend is chosen first

from bench.measure import TTN_PARTS  # noqa: E402


def _ok(met: bool | None) -> str:
    return "n/a" if met is None else ("**met**" if met else "**not met**")


def targets(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(what, target, measured, verdict) per target."""
    s = results["sections"]
    ttn = s["ttn"]
    age = ttn["stable_age"]
    rows = []
    for name, label in (("radiograph", "TTN p95, radiograph (CR, 1 image)"),
                        ("head_ct", f"TTN p95, head CT ({ttn['head_ct']['slices']} slices)")):
        t = ttn[name]
        st = t["summary"]["ttn"]
        rows.append((label, f"<= {t['target_p95']:.1f} s (stable age {age} s + "
                     f"{t['target_p95'] - age:.0f} s)",
                     f"p50 {st['p50']:.2f} s, p95 {st['p95']:.2f} s, max {st['max']:.2f} s",
                     _ok(t["met"])))
    e = s["efficiency"]
    spread = ", ".join(f"{r['ratio']:.2f}" for r in e.get("rounds", []))
    rows.append(("Efficiency (pipeline / limit)", ">= 0.9",
                 f"{e['ratio']:.2f} ({e['pipeline']['studies_per_second']:.2f} vs "
                 f"{e['limit']['studies_per_second']:.2f} studies/s; median of rounds "
                 f"{spread})", _ok(e["met"])))
    u = s["urgent_backlog"]
    rows.append((f"STAT under {u['backlog']} routine", "<= 2x alone",
                 f"{u['ratio']:.2f}x ({u['under_backlog']['ttn']:.2f} s vs "
                 f"{u['alone']['summary']['ttn']['p50']:.2f} s alone)", _ok(u["met"])))
    i = s["ingest"]
    spread = ", ".join(f"{r:.2f}" for r in i.get("round_ratios", []))
    rows.append(("Ingest with service / alone", ">= 0.9",
                 f"{i['ratio']:.2f} ({i['with_service']['megabytes_per_second']:.0f} vs "
                 f"{i['alone']['megabytes_per_second']:.0f} MB/s in the median pair; pairs "
                 f"{spread})",
                 _ok(i["met"])))
    a = s["api"]
    for name, label, key in (
            ("closed_loop", "back to back", "met"),
            ("paced", f"each asking every {a['paced']['think_seconds']:g} s on average",
             "paced_met"),
            ("under_change", f"back to back, {a['under_change']['changes_per_second']:g} "
             "worklist changes/s", "under_change_met")):
        lat = a[name]["latency_ms"]
        met = a[key]
        rows.append((f"Worklist API, {a['clients']} clients, {label}", "p99 <= 50 ms, no errors",
                     f"p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms, "
                     f"{a[name]['requests_per_second']:.0f} req/s, {a[name]['errors']} errors",
                     _ok(met)))
    best = [load for load in a.get("capacity", []) if load["latency_ms"]["p99"] <= 50.0
            and load["errors"] == 0]
    if a.get("capacity"):
        top = max(best, key=lambda load: load["requests_per_second"]) if best else None
        rows.append((f"Worklist API, {a['clients']} clients, most load within the target",
                     "p99 <= 50 ms, no errors",
                     f"{top['requests_per_second']:.0f} req/s (each asking every "
                     f"{top['think_seconds'] * 1000:.0f} ms on average), p99 "
                     f"{top['latency_ms']['p99']:.0f} ms" if top else "none of the loads tried",
                     "n/a"))
    m = s["memory"]
    growth = ", ".join(f"{w['warm_kib'] / 1024:.0f} -> {w['last_kib'] / 1024:.0f} MiB "
                       f"({w['growth_percent']:+.1f}%)" for w in m["workers"].values())
    rows.append((f"Worker memory over {m['studies']} studies",
                 f"flat (< {m['growth_limit_percent']:g}% growth after warm-up)", growth,
                 _ok(m["met"])))
    if "web" in s:
        rows += web_targets(s["web"])
    if "shadow" in s:
        rows += shadow_targets(s["shadow"])
    if "streaming" in s:
        rows += streaming_targets(s["streaming"])
    return rows


def streaming_targets(st: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """The streaming section's rows: each goal with streaming on and off."""
    age, goals = st["stable_age"], st["goals"]
    rows = []
    for name in ("on", "off"):
        m = st[name]
        pos, met = m["positive"], m["met"]
        label = f"Streaming {name}:"
        sources = sorted({r["flag_source"] for r in pos["records"]})
        rows += [
            (f"{label} positive head CT ({pos['slices']} slices at "
             f"{st['pace_images_per_second']:g} images/s, bleed in slices {pos['bleed'][0]}-"
             f"{pos['bleed'][1]}), critical flag after the first slice over the threshold "
             "is stored", f"<= {goals['flag_after_first_over_threshold']:g} s",
             f"{pos['flag_after_first_over_threshold']:.2f} s "
             f"({pos['flag_after_last_slice']:+.2f} s from the last slice; "
             f"slowest of {pos['studies']}; raised by the {', '.join(sources)})",
             _ok(met["positive"])),
            (f"{label} TTN p95, negative head CT ({m['negative']['slices']} slices at "
             f"{st['pace_images_per_second']:g} images/s)",
             f"<= {goals['negative_ttn_p95']:.1f} s (stable age {age} s + "
             f"{goals['negative_ttn_p95'] - age:.1f} s)", _stats_text(m["negative"]["summary"]),
             _ok(met["negative"])),
            (f"{label} TTN p95, radiograph", f"<= {goals['radiograph_ttn_p95']:.1f} s",
             _stats_text(m["radiograph"]["summary"]), _ok(met["radiograph"])),
        ]
        if m["ingest"] is not None:
            rows.append((f"{label} ingest with service / alone", f">= {goals['ingest_ratio']:g}",
                         f"{m['ingest_ratio']:.2f} (pairs "
                         + ", ".join(f"{r:.2f}" for r in m["ingest"]["round_ratios"]) + ")",
                         _ok(met["ingest"])))
        if m["efficiency"] is not None:
            e = m["efficiency"]
            rows.append((f"{label} efficiency (pipeline / limit, one round)",
                         f">= {goals['efficiency_ratio']:g}",
                         f"{m['efficiency_ratio']:.2f} ({e['pipeline_studies_per_second']:.2f}"
                         f" vs {e['limit_studies_per_second']:.2f} studies/s; SR build "
                         f"{e['mean_parts']['sr_build'] * 1000:.0f} ms a study)",
                         _ok(met["efficiency"])))
    return rows


def _stats_text(st: dict[str, Any]) -> str:
    return f"p50 {st['p50']:.2f} s, p95 {st['p95']:.2f} s, max {st['max']:.2f} s (n {st['n']})"


def shadow_targets(sh: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """The shadow section's row: the active version's TTN without and with a shadow."""
    without, with_shadow = sh["without"], sh["with"]
    srs = without["one_sr_each"] and with_shadow["one_sr_each"]
    return [(f"Active TTN p95 without / with a shadow version, head CT ({sh['slices']} "
             f"slices, one every {sh['interval_seconds']:g} s)", "n/a (measured)",
             f"{without['ttn']['p95']:.2f} s / {with_shadow['ttn']['p95']:.2f} s "
             f"({sh['p95_ratio']:.2f}x); {with_shadow['shadow_analyses']} shadow analyses "
             f"of {with_shadow['studies']} studies; "
             + ("one SR per study" if srs else "**not one SR per study**"),
             "n/a" if srs else "**not met**")]


def web_targets(w: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """The web section's rows of the targets table."""
    first, live = w["first_page"], w["live_change"]
    fs, ls = first["summary"], live["summary"]
    target = f"< {w['target_seconds']:g} s"
    off = live["off_page"]
    off_text = ("" if off["ok"] is None else
                f"; a change after the first page: counts in {off['counts_seconds']:.2f} s, "
                + ("rows kept" if off["ok"] else "**page broken**"))
    return [
        (f"Worklist page, first {first['rows']} rows and counts, {w['studies']} studies "
         "(Chromium)", target + " (p95)",
         f"p50 {fs['p50']:.2f} s, p95 {fs['p95']:.2f} s, max {fs['max']:.2f} s over "
         f"{fs['n']} loads; cold (first) {first['cold']['seconds']:.2f} s",
         _ok(w["first_page_met"])),
        (f"Worklist page, live change shown ({live['changes']} changes, "
         f"{live['interval_seconds']:g} s apart)", target + " (p95)",
         f"p50 {ls['p50']:.2f} s, p95 {ls['p95']:.2f} s, max {ls['max']:.2f} s" + off_text,
         _ok(w["live_change_met"])),
    ]


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    s = results["sections"]
    lines = [
        "# Benchmark summary" + (" (smoke run: counts too small to mean anything)"
                                 if results["smoke"] else ""),
        "",
        f"{results['started_at'][:19]} UTC; {m['nproc']} cores ({m['cpu_model']}), "
        f"{m['ram_gib']} GiB RAM, Debian {m['debian']}, Python {m['python']}, "
        f"Orthanc {m.get('orthanc', '?')}, Redis {m.get('redis', '?')}, "
        f"onnxruntime {m['onnxruntime']}; commit {m['git_commit']}"
        + (" (triage/ modified)" if m["git_dirty"] else "") + ".",
        "",
        "| what | target | measured | |",
        "|---|---|---|---|",
        *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in targets(results)),
        "",
        "## Time-to-notification, median of each part (s)",
        "",
        "| series | n | " + " | ".join(TTN_PARTS) + " | total p50 |",
        "|---|---|" + "---|" * len(TTN_PARTS) + "---|",
    ]
    rows = [("radiograph", s["ttn"]["radiograph"]["summary"]),
            ("head CT", s["ttn"]["head_ct"]["summary"]),
            ("STAT alone", s["urgent_backlog"]["alone"]["summary"])]
    for name, st in rows:
        lines.append(f"| {name} | {st['ttn']['n']} | "
                     + " | ".join(f"{st[p]['p50']:.3f}" for p in TTN_PARTS)
                     + f" | {st['ttn']['p50']:.3f} |")
    rec = s["urgent_backlog"]["under_backlog"]
    lines.append("| STAT under backlog | 1 | " + " | ".join(f"{rec[p]:.3f}" for p in TTN_PARTS)
                 + f" | {rec['ttn']:.3f} |")
    e = s["efficiency"]
    lines += ["", "## Efficiency", "",
              f"{e['studies']} radiographs, {e['processes']} workers, model {e['model']}. "
              f"Pipeline {e['pipeline']['studies_per_second']:.2f} studies/s; limit "
              f"(fetch + decode + inference only) {e['limit']['studies_per_second']:.2f} "
              "studies/s. Mean seconds per study in the pipeline: "
              + ", ".join(f"{k} {v:.3f}" for k, v in e["pipeline"]["mean_parts"].items())
              + f"; in the limit loop: {e['limit']['mean_seconds_per_study']:.3f}.", "",
              "CPU seconds per study while the pipeline ran, by process: "
              + ", ".join(f"{k} {v:.3f}" for k, v in
                          e["pipeline"]["cpu_seconds_per_study"].items()) + ".", ""]
    if "web" in s:
        lines += web_markdown(s["web"])
    if "shadow" in s:
        lines += shadow_markdown(s["shadow"])
    if "streaming" in s:
        lines += streaming_markdown(s["streaming"])
    return "\n".join(lines) + "\n"


def streaming_markdown(st: dict[str, Any]) -> list[str]:
    """The streaming section's table: the time-to-notification parts of each mode."""
    lines = ["## Streaming", "",
             f"Head CTs sent one C-STORE at a time at {st['pace_images_per_second']:g} "
             "images/s, with TRIAGE_STREAMING off, then on. Median of each part (s):", "",
             "| streaming | series | n | " + " | ".join(TTN_PARTS) + " | total p50 |",
             "|---|---|---|" + "---|" * len(TTN_PARTS) + "---|"]
    for name in ("off", "on"):
        m = st[name]
        positives = [r["analysed_after_last_slice"] for r in m["positive"]["records"]]
        series = [("negative head CT", m["negative"]["parts"] | {"ttn": m["negative"]["summary"]}),
                  ("radiograph", m["radiograph"]["parts"])]
        for label, parts in series:
            lines.append(f"| {name} | {label} | {parts['ttn']['n']} | "
                         + " | ".join(f"{parts[p]['p50']:.3f}" for p in TTN_PARTS)
                         + f" | {parts['ttn']['p50']:.3f} |")
        for record in positives:
            lines.append(f"| {name} | positive head CT (to analysed) | 1 | "
                         + " | ".join(f"{record[p]:.3f}" for p in TTN_PARTS)
                         + f" | {record['ttn']:.3f} |")
    return [*lines, ""]


def shadow_markdown(sh: dict[str, Any]) -> list[str]:
    """The shadow section's table: each phase's active TTN, shadow analyses and SRs."""
    lines = ["## Shadow trials", "",
             f"{sh['model']} {sh['active_version']} active; {sh['trial_version']} (threshold "
             f"{sh['trial_threshold']:g}) retired, then in shadow. {sh['studies']} head CTs "
             f"of {sh['slices']} slices per phase, one every {sh['interval_seconds']:g} s.", "",
             "| trial version | active TTN p50 | p95 | max | shadow analyses | shadow queue "
             "drained after the last active result | one SR per study |",
             "|---|---|---|---|---|---|---|"]
    for name in ("without", "with"):
        ph = sh[name]
        st = ph["ttn"]
        drain = (f"{ph['shadow_drain_seconds']:.1f} s" if ph["shadow_drained"]
                 else "**not drained**")
        lines.append(f"| {ph['trial_state']} | {st['p50']:.2f} s | {st['p95']:.2f} s | "
                     f"{st['max']:.2f} s | {ph['shadow_analyses']} of {ph['studies']} | "
                     f"{drain} | {'yes' if ph['one_sr_each'] else '**no**'} |")
    return [*lines, ""]


def web_markdown(w: dict[str, Any]) -> list[str]:
    """The web section's paragraph: where a first page's time goes, by the page's clock."""
    first = w["first_page"]
    nav = first["navigation"]

    def p50(name: str) -> str:
        value = nav[name]["p50"]
        return "n/a" if value != value else f"{value:.3f}"  # NaN: not reported

    return ["## Worklist page in the browser", "",
            f"{w['browser']}, viewport {w['viewport']['width']}x{w['viewport']['height']}; "
            f"{w['studies']} studies on the worklist, {first['rows']} rows on the first page "
            f"({first['html_bytes'] / 1024:.0f} KiB of HTML). Median seconds from the start of "
            f"the navigation, by the page's clock: response end {p50('response_end')}, "
            f"rows and counts in the page {first['in_page']['p50']:.3f}, first contentful "
            f"paint {p50('first_contentful_paint')}, DOMContentLoaded end "
            f"{p50('dom_content_loaded')}, load end {p50('load')}. A live change is "
            f"timed from just before the Redis write to the row showing it "
            f"({w['live_change']['change']}); drawn in the next frame: p50 "
            f"{w['live_change']['painted']['p50']:.3f} s.", ""]


def _plot_ttn(results: dict[str, Any], path: Path) -> None:
    s = results["sections"]
    series = {"radiograph": s["ttn"]["radiograph"]["summary"],
              "head CT": s["ttn"]["head_ct"]["summary"],
              "STAT alone": s["urgent_backlog"]["alone"]["summary"]}
    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(series)
    left = [0.0] * len(names)
    for part in TTN_PARTS:
        values = [max(0.0, series[n][part]["p50"]) for n in names]
        ax.barh(names, values, left=left, label=part)
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax.set_xlabel("seconds (median of each part)")
    ax.set_title("Time-to-notification breakdown")
    ax.legend(fontsize=8, ncol=4, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_memory(results: dict[str, Any], path: Path) -> None:
    m = results["sections"]["memory"]
    fig, ax = plt.subplots(figsize=(8, 4))
    for pid in m["workers"]:
        xs = [s["analysed"] for s in m["samples"]]
        ys = [s["rss_kib"][pid] / 1024 for s in m["samples"]]
        ax.plot(xs, ys, marker=".", label=f"worker {pid}")
    ax.set_xlabel("studies analysed (both workers)")
    ax.set_ylabel("VmRSS (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_title("Worker resident memory")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_api(results: dict[str, Any], path: Path) -> None:
    a = results["sections"]["api"]
    fig, ax = plt.subplots(figsize=(8, 4))
    names = ["closed_loop", "paced", "under_change"]
    for stat in ("p50", "p99"):
        ax.bar([f"{n}\n{stat}" for n in names], [a[n]["latency_ms"][stat] for n in names])
    ax.axhline(50, color="red", linestyle="--", label="target p99")
    ax.set_ylabel("ms")
    ax.set_title(f"Worklist latency, {a['clients']} clients, {a['indexed']} studies")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_ratios(results: dict[str, Any], path: Path) -> None:
    s = results["sections"]
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = ["efficiency", "ingest", "STAT backlog/alone"]
    values = [s["efficiency"]["ratio"], s["ingest"]["ratio"], s["urgent_backlog"]["ratio"]]
    limits = [0.9, 0.9, 2.0]
    ax.bar(labels, values)
    ax.scatter(labels, limits, color="red", marker="_", s=2000, label="target")
    ax.set_title("Ratios against targets")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(results: dict[str, Any], folder: Path) -> None:
    (folder / "summary.md").write_text(markdown(results))
    _plot_ttn(results, folder / "ttn.png")
    _plot_memory(results, folder / "memory.png")
    _plot_api(results, folder / "api.png")
    _plot_ratios(results, folder / "ratios.png")
