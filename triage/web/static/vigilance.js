// The vigilance page: reads the /api/v1/admin/vigilance routes with the session cookie and
// shows the flag rate with its control limits, the figures per version, the subgroups, the
// open alerts, the shadow comparison and the version states. Every section stands alone: one
// the service cannot answer says so and the others still show.
"use strict";

(function () {
  const root = document.getElementById("vigilance");
  if (!root) return;
  const csrf = document.body.dataset.csrf || "";
  const BASE = "/api/v1/admin/vigilance/";
  const SVG = "http://www.w3.org/2000/svg";
  const query = {model: root.dataset.model, version: root.dataset.version,
                 start: root.dataset.start, end: root.dataset.end};
  const labelSelect = document.getElementById("v-label");

  // -- small helpers ----------------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined && value !== false) node.setAttribute(name, value);
    }
    for (const child of children.flat()) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
    return node;
  }

  function signIn(reason) {
    location.assign("/login?reason=" + reason + "&next=" +
                    encodeURIComponent(location.pathname + location.search));
  }

  function url(path, params) {
    const search = new URLSearchParams();
    for (const [name, value] of Object.entries(params || {})) {
      if (value !== "" && value !== null && value !== undefined) search.set(name, value);
    }
    const text = search.toString();
    return BASE + path + (text ? "?" + text : "");
  }

  // The answer of one route: {ok, status, data, detail}; never throws.
  async function call(path, params, options) {
    let response;
    try {
      response = await fetch(url(path, params), Object.assign({credentials: "same-origin"},
                                                              options || {}));
    } catch (e) {
      return {ok: false, status: 0, detail: "the service did not answer"};
    }
    if (response.status === 401) { signIn("expired"); return {ok: false, status: 401}; }
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    const detail = data && typeof data.detail === "string" ? data.detail : response.statusText;
    return {ok: response.ok, status: response.status, data: data, detail: detail};
  }

  function post(path, body) {
    return call(path, null, {method: "POST", body: JSON.stringify(body || {}),
                             headers: {"Content-Type": "application/json",
                                       "X-CSRF-Token": csrf}});
  }

  function body(id) { return document.querySelector("#" + id + " .v-body"); }

  function show(id, ...nodes) {
    const holder = body(id);
    holder.dataset.state = "shown";
    holder.replaceChildren(...nodes);
  }

  function unavailable(id, answer) {
    const holder = body(id);
    holder.dataset.state = "unavailable";
    const why = answer.status ? answer.detail + " (HTTP " + answer.status + ")" : answer.detail;
    holder.replaceChildren(el("p", {class: "unavailable"}, "Not available: " + why + "."));
  }

  function announce(text) { document.getElementById("v-status").textContent = text; }

  function percent(value) { return (value * 100).toFixed(1) + "%"; }

  // A proportion as "12.5% (95% CI 8.1–18.7%) 25/200", or its reason for being absent.
  function proportion(p, absent) {
    if (p === null || p === undefined) return absent || "—";
    if (typeof p === "number") return Number.isInteger(p) ? String(p) : p.toFixed(3);
    if (p.value === null || p.value === undefined) return "— (0/" + p.total + ")";
    return percent(p.value) + " (95% CI " + percent(p.low) + "–" + percent(p.high) + ") " +
      p.count + "/" + p.total;
  }

  function when(iso) {
    if (!iso) return "—";
    const t = new Date(iso);
    return isNaN(t) ? iso : t.toISOString().slice(0, 16).replace("T", " ") + " UTC";
  }

  function table(caption, headers, rows, extra) {
    return el("table", Object.assign({class: "v-table"}, extra || {}),
              caption ? el("caption", null, caption) : null,
              el("thead", null, el("tr", null, headers.map((h) => el("th", {scope: "col"}, h)))),
              el("tbody", null, rows));
  }

  function row(cells, attrs) {
    return el("tr", attrs, cells.map((c, i) => i === 0 ? el("th", {scope: "row"}, c)
                                                         : el("td", null, c)));
  }

  // -- version states ---------------------------------------------------------------------
  function versionsOf(models) {
    if (!models.ok || !models.data || !Array.isArray(models.data.models)) return null;
    const found = models.data.models.find((m) => m.model_id === query.model);
    return found ? found.versions : [];
  }

  function stateButton(version, action, text, state) {
    const button = el("button", {type: "button", class: action === "promote" ? "primary" : "secondary",
                                 "data-action": action + (state ? ":" + state : ""),
                                 "aria-label": text + " version " + version}, text);
    button.addEventListener("click", async () => {
      const path = "models/" + encodeURIComponent(query.model) + "/versions/" +
        encodeURIComponent(version) + "/" + action;
      button.disabled = true;
      const answer = await post(path, state ? {state: state} : {});
      const message = answer.ok ? "Version " + version + ": " + text.toLowerCase() + " done."
        : "Version " + version + " not changed: " + answer.detail + ".";
      announce(message);
      await load();
      const holder = body("v-states");
      holder.prepend(el("p", {class: answer.ok ? "message" : "error"}, message));
    });
    return button;
  }

  function renderStates(models, versions) {
    if (versions === null) { unavailable("v-states", models); return; }
    if (!versions.length) {
      show("v-states", el("p", {class: "muted"}, "No registered version of " + query.model + "."));
      return;
    }
    const rows = versions.map((v) => row([
      v.version, el("span", {class: "v-state v-state-" + v.state}, v.state), when(v.changed_at),
      v.changed_by || "—",
      el("span", {class: "v-actions"},
         v.state !== "active" ? stateButton(v.version, "promote", "Promote") : null,
         v.state !== "shadow" ? stateButton(v.version, "state", "To shadow", "shadow") : null,
         v.state !== "retired" ? stateButton(v.version, "state", "Retire", "retired") : null),
    ], {"data-version": v.version, "data-state": v.state}));
    show("v-states", table("Versions of " + query.model,
                           ["Version", "State", "Since", "By", "Actions"], rows));
  }

  // -- figures per version ----------------------------------------------------------------
  async function loadFigures(versions) {
    const wanted = versions && versions.length ? versions.map((v) => v.version)
      : [query.version];
    const period = {model: query.model, start: query.start, end: query.end};
    const answers = await Promise.all(wanted.map((v) => call("figures",
                                                             Object.assign({version: v}, period))));
    const failed = answers.find((a) => !a.ok);
    if (failed && answers.every((a) => !a.ok)) { unavailable("v-figures", failed); return []; }
    const rows = [];
    let labels = [];
    answers.forEach((answer, i) => {
      if (!answer.ok) return;
      if (!answer.data.length) {
        rows.push(el("tr", null, el("th", {scope: "row"}, wanted[i] || "active"),
                     el("td", {colspan: "10"}, "No study analysed as the active version in the period.")));
      }
      for (const f of answer.data) {
        const note = f.sensitivity_note ? "— (" + f.sensitivity_note + ")" : "—";
        rows.push(row([f.version, f.label, String(f.analysed), proportion(f.flagged),
                       proportion(f.coverage), proportion(f.report_coverage), proportion(f.ppv),
                       proportion(f.sensitivity, note), proportion(f.specificity),
                       proportion(f.npv, note), proportion(f.agreement)],
                      {"data-version": f.version, "data-label": f.label}));
        if (!query.version || f.version === query.version) labels.push(f.label);
      }
    });
    if (!labels.length) labels = answers.filter((a) => a.ok).flatMap((a) => a.data.map((f) => f.label));
    show("v-figures", table(null, ["Version", "Label", "Analysed", "Flagged",
                                   "Ground-truth coverage", "Report coverage", "PPV",
                                   "Sensitivity", "Specificity", "NPV", "Agreement"], rows));
    return Array.from(new Set(labels)).sort();
  }

  function fillLabels(labels) {
    const chosen = labelSelect.value || root.dataset.label;
    labelSelect.replaceChildren(...labels.map((l) => el("option", {value: l}, l)));
    if (!labels.length) labelSelect.append(el("option", {value: ""}, "no label"));
    if (labels.includes(chosen)) labelSelect.value = chosen;
  }

  // -- the flag rate and its CUSUM --------------------------------------------------------
  function lineChart(title, days, series, limits, format) {
    const width = 720, height = 180, left = 56, right = 12, top = 12, bottom = 26;
    const values = series.flatMap((s) => days.map(s.value)).concat(limits.map((l) => l.value))
      .filter((v) => v !== null && v !== undefined);
    let low = Math.min(0, ...values), high = Math.max(...values, 0);
    if (high === low) high = low + 1;
    high += (high - low) * 0.08;
    const x = (i) => left + (days.length < 2 ? 0 : i * (width - left - right) / (days.length - 1));
    const y = (v) => top + (high - v) * (height - top - bottom) / (high - low);
    const chart = svg("svg", {viewBox: "0 0 " + width + " " + height, class: "v-chart",
                              role: "img", "aria-label": title});
    chart.append(svg("line", {x1: left, x2: width - right, y1: y(low), y2: y(low), class: "axis"}));
    for (const tick of [low, (low + high) / 2, high]) {
      const label = svg("text", {x: left - 6, y: y(tick) + 4, class: "tick", "text-anchor": "end"});
      label.textContent = format(tick);
      chart.append(label);
    }
    [0, days.length - 1].forEach((i) => {
      if (i < 0 || !days[i]) return;
      const label = svg("text", {x: x(i), y: height - 6, class: "tick",
                                 "text-anchor": i === 0 ? "start" : "end"});
      label.textContent = days[i].date;
      chart.append(label);
    });
    for (const limit of limits) {
      if (limit.value === null || limit.value === undefined) continue;
      chart.append(svg("line", {x1: left, x2: width - right, y1: y(limit.value),
                                y2: y(limit.value), class: "limit " + limit.className}));
    }
    for (const s of series) {
      let path = "";
      days.forEach((d, i) => {
        const v = s.value(d);
        if (v === null || v === undefined) { path += " "; return; }
        path += (path.endsWith(" ") || !path ? " M" : " L") + x(i).toFixed(1) + " " + y(v).toFixed(1);
      });
      chart.append(svg("path", {d: path.trim() || "M0 0", class: "series " + s.className}));
      days.forEach((d, i) => {
        const v = s.value(d);
        if (v === null || v === undefined) return;
        chart.append(svg("circle", {cx: x(i), cy: y(v), r: d.alarm ? 5 : 2.5,
                                    class: "point " + s.className + (d.alarm ? " alarm" : "")}));
      });
    }
    return chart;
  }

  function legend(items) {
    return el("ul", {class: "v-legend"}, items.map(([className, text]) =>
      el("li", null, el("span", {class: "swatch " + className, "aria-hidden": "true"}), text)));
  }

  async function loadRate(label) {
    const answer = await call("flag-rate", {model: query.model, version: query.version,
                                            label: label, start: query.start, end: query.end});
    if (!answer.ok) { unavailable("v-rate", answer); return; }
    const data = answer.data;
    const days = data.days || [];
    const base = data.baseline;
    const alarms = days.filter((d) => d.alarm).map((d) => d.date);
    const summary = el("p", null, base
      ? "Baseline of " + (label || "the first label") + ": mean " + percent(base.mean) + " (σ " +
        percent(base.sigma) + "), learnt from " + String(base.period_start).slice(0, 10) +
        " to " + String(base.period_end).slice(0, 10) + "; CUSUM k = " + data.k + ", h = " +
        data.h + "."
      : "No baseline for this version and label yet: the CUSUM needs one.",
      " ", el("strong", {class: alarms.length ? "error" : "message"},
              alarms.length ? "Alarm on " + alarms.join(", ") + "." : "No alarm in the period."));
    const rateTitle = "Daily flag rate of " + (label || "the first label") + " from " + query.start +
      (base ? ", against the baseline mean " + percent(base.mean) : "") +
      (alarms.length ? "; alarms on " + alarms.join(", ") : "; no alarm");
    const rate = lineChart(rateTitle, days, [{value: (d) => d.rate, className: "rate"}],
                           base ? [{value: base.mean, className: "mean"}] : [], percent);
    const hasLow = days.some((d) => d.cusum_low !== null && d.cusum_low < 0);
    const cusum = lineChart("CUSUM statistics against the decision limit h = " + data.h,
                            days, [{value: (d) => d.cusum_high, className: "high"},
                                   {value: (d) => d.cusum_low, className: "low"}],
                            [{value: data.h, className: "h"}].concat(
                              hasLow ? [{value: -data.h, className: "h"}] : []),
                            (v) => v.toFixed(1));
    const rows = days.map((d) => row([d.date, String(d.analysed), String(d.flagged),
                                      d.rate === null ? "—" : percent(d.rate),
                                      d.cusum_high === null ? "—" : d.cusum_high.toFixed(2),
                                      d.cusum_low === null ? "—" : d.cusum_low.toFixed(2),
                                      d.alarm ? "ALARM" : ""],
                                     {"data-date": d.date, class: d.alarm ? "alarm" : null}));
    show("v-rate", summary,
         el("div", {class: "v-charts"},
            el("figure", null, rate, el("figcaption", null, "Flag rate per day"),
               legend([["rate", "daily flag rate"], ["mean", "baseline mean"]])),
            el("figure", null, cusum, el("figcaption", null, "CUSUM"),
               legend([["high", "CUSUM high"], ["low", "CUSUM low"], ["h", "decision limit h"]]))),
         el("details", null, el("summary", null, "Daily values"),
            table(null, ["Day", "Analysed", "Flagged", "Rate", "CUSUM high", "CUSUM low", "Alarm"],
                  rows)));
  }

  // -- subgroups --------------------------------------------------------------------------
  async function loadSubgroups() {
    const answer = await call("subgroups", query);
    if (!answer.ok) { unavailable("v-subgroups", answer); return; }
    if (!answer.data.length) {
      show("v-subgroups", el("p", {class: "muted"}, "No study analysed in the period."));
      return;
    }
    const suppressed = "suppressed (fewer than 5 studies)";
    const rows = answer.data.map((c) => row([
      c.dimension.replace(/_/g, " "), c.value, c.label,
      c.suppressed ? suppressed : String(c.analysed),
      c.suppressed ? "—" : proportion(c.flagged), c.suppressed ? "—" : proportion(c.coverage),
      c.suppressed ? "—" : proportion(c.ppv), c.suppressed ? "—" : proportion(c.specificity),
    ], {class: c.suppressed ? "suppressed" : null, "data-dimension": c.dimension,
        "data-value": c.value, "data-label": c.label}));
    show("v-subgroups", table(null, ["Subgroup", "Value", "Label", "Studies", "Flagged",
                                     "Ground-truth coverage", "PPV", "Specificity"], rows));
  }

  // -- alerts -----------------------------------------------------------------------------
  async function loadAlerts() {
    const answer = await call("alerts", {open: "true"});
    if (!answer.ok) { unavailable("v-alerts", answer); return; }
    const alerts = answer.data.alerts || [];
    if (!alerts.length) { show("v-alerts", el("p", {class: "message"}, "No open alert.")); return; }
    show("v-alerts", el("ul", {class: "v-alert-list"}, alerts.map((a) => {
      const noteId = "v-note-" + a.id;
      const note = el("input", {id: noteId, name: "note", maxlength: "2000",
                                placeholder: "what was checked or done"});
      const button = el("button", {type: "submit", class: "primary"}, "Acknowledge");
      const form = el("form", {class: "v-ack", "data-alert": String(a.id)},
                      el("label", {for: noteId}, "Note"), note, button);
      form.addEventListener("submit", async (e) => {
        e.preventDefault();
        button.disabled = true;
        const done = await post("alerts/" + encodeURIComponent(a.id) + "/acknowledge",
                                {note: note.value});
        const message = done.ok ? "Alert " + a.id + " acknowledged."
          : "Alert " + a.id + " not acknowledged: " + done.detail + ".";
        announce(message);
        await loadAlerts();
        body("v-alerts").prepend(el("p", {class: done.ok ? "message" : "error"}, message));
      });
      const subject = [a.model_id, a.version, a.label].filter((p) => p).join(" ");
      return el("li", {class: "v-alert", "data-alert": String(a.id), "data-kind": a.kind},
                el("p", null, el("strong", null, a.kind), subject ? " · " + subject : "",
                  " · raised " + when(a.raised_at)),
                a.summary ? el("p", null, a.summary) : null, form);
    })));
  }

  // -- shadow versions --------------------------------------------------------------------
  function agreementRows(result) {
    return result.labels.map((l) => row([
      l.label, String(l.paired), String(l.both_flagged), String(l.active_only),
      String(l.shadow_only), String(l.neither), proportion(l.agreement), proportion(l.kappa),
      l.mcnemar_p === null || l.mcnemar_p === undefined ? "—"
        : l.mcnemar_p.toPrecision(3) + (l.mcnemar_test ? " (" + l.mcnemar_test + ")" : ""),
    ], {"data-label": l.label}));
  }

  function truthDetails(result) {
    const items = [];
    for (const l of result.labels) {
      const truth = l.truth || {};
      const names = Array.from(new Set(Object.keys(truth.active || {}).concat(
        Object.keys(truth.shadow || {})))).filter((n) => {
        const v = (truth.active || {})[n] || (truth.shadow || {})[n];
        return v !== null && typeof v === "object" && "total" in v;
      });
      if (names.length) {
        items.push(table("Against the ground truth: " + l.label,
                         ["Figure", "Active " + result.active_version,
                          "Shadow " + result.shadow_version],
                         names.map((n) => row([n.replace(/_/g, " "),
                                               proportion((truth.active || {})[n]),
                                               proportion((truth.shadow || {})[n])]))));
      }
      if (l.discordant && l.discordant.length) {
        items.push(el("details", null,
          el("summary", null, l.discordant.length + " discordant studies (" + l.label + ")"),
          table(null, ["Study", "Active score", "Shadow score", "Active flag", "Shadow flag"],
                l.discordant.map((d) => row([d.study_uid, d.active_score.toFixed(3),
                                             d.shadow_score.toFixed(3),
                                             d.active_flagged ? "flagged" : "not flagged",
                                             d.shadow_flagged ? "flagged" : "not flagged"])))));
      }
    }
    return items;
  }

  async function loadShadow(models, versions) {
    if (versions === null) { unavailable("v-shadow", models); return; }
    const shadows = versions.filter((v) => v.state === "shadow").map((v) => v.version);
    if (!shadows.length) {
      show("v-shadow", el("p", {class: "muted"}, "No shadow version of " + query.model + "."));
      return;
    }
    const parts = [];
    for (const version of shadows) {
      const answer = await call("shadow", {model: query.model, version: version,
                                           start: query.start, end: query.end});
      if (!answer.ok) { unavailable("v-shadow", answer); return; }
      const r = answer.data;
      parts.push(el("div", {class: "v-shadow-version", "data-version": version},
        el("h3", null, "Shadow " + r.shadow_version + " against active " + r.active_version),
        r.labels.length ? table(null, ["Label", "Paired studies", "Both flagged", "Active only",
                                       "Shadow only", "Neither", "Agreement", "Kappa",
                                       "McNemar p"], agreementRows(r))
          : el("p", {class: "muted"}, "No study analysed by both versions in the period."),
        truthDetails(r)));
    }
    show("v-shadow", ...parts);
  }

  // -- everything -------------------------------------------------------------------------
  async function load() {
    if (!query.model) {
      for (const holder of document.querySelectorAll("#vigilance .v-body")) {
        holder.dataset.state = "unavailable";
        holder.replaceChildren(el("p", {class: "muted"}, "Name a model above."));
      }
      return;
    }
    const models = await call("models");
    const versions = versionsOf(models);
    renderStates(models, versions);
    const [labels] = await Promise.all([loadFigures(versions), loadSubgroups(), loadAlerts(),
                                        loadShadow(models, versions)]);
    fillLabels(labels);
    await loadRate(labelSelect.value);
    root.dataset.loaded = "true";
  }

  labelSelect.addEventListener("change", () => loadRate(labelSelect.value));
  load();
})();
