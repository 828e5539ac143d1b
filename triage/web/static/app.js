// The pages' own script: live worklist (server-sent events), keyboard, idle lock, theme,
// desktop alerts for critical studies, admin charts. No patient data is ever written to
// localStorage, sessionStorage or any other browser storage.
"use strict";

(function () {
  const body = document.body;
  const csrf = body.dataset.csrf || "";
  const EVENTS = ["queued", "updated", "status", "priority", "analysed", "claim", "read",
                  "feedback", "delivery", "rebuilt", "preliminary", "arriving", "order"];

  // htmx remembers the page's path (which names a study) in sessionStorage for its history
  // support, which these pages do not use: nothing of it is kept.
  function forget() {
    try { sessionStorage.removeItem("htmx-current-path-for-history"); } catch (e) { /* none */ }
  }
  forget();
  document.addEventListener("htmx:afterSettle", forget);

  function post(url, fields) {
    return fetch(url, {method: "POST", credentials: "same-origin",
                       headers: {"X-CSRF-Token": csrf, "HX-Request": "true"},
                       body: fields ? new URLSearchParams(fields) : undefined});
  }

  function announce(text) {
    const live = document.getElementById("live-state") || document.getElementById("announce");
    if (live) live.textContent = text;
  }

  function signIn(reason) {
    const next = location.pathname + location.search;
    location.assign("/login?reason=" + reason + "&next=" + encodeURIComponent(next));
  }

  // -- theme ------------------------------------------------------------------------------
  const themeButton = document.getElementById("theme-toggle");
  if (themeButton) {
    themeButton.addEventListener("click", () => {
      const next = document.documentElement.dataset.theme === "dark" ? "light" : "dark";
      document.documentElement.dataset.theme = next;
      document.cookie = "triage_theme=" + next + "; path=/; max-age=31536000; SameSite=Lax";
      const other = next === "dark" ? "light" : "dark";
      themeButton.textContent = other[0].toUpperCase() + other.slice(1) + " theme";
      themeButton.setAttribute("aria-label", "Switch to " + other + " theme");
    });
  }

  // -- idle lock --------------------------------------------------------------------------
  let events = null;
  const lockMinutes = Number(body.dataset.lockMinutes || 0);
  let lastInput = Date.now();
  let locked = false;

  function lock(here = true) {
    if (locked) return;
    locked = true;
    if (events) events.close();
    if (here) {
      post("/session/lock").catch(() => {});
      if (tabs) tabs.postMessage("lock");
    }
    // Patient data leaves the page, not only the screen.
    const main = document.getElementById("main");
    if (main) main.replaceChildren();
    const screen = document.getElementById("lock-screen");
    if (screen) {
      screen.hidden = false;
      const unlock = document.getElementById("unlock");
      unlock.href = "/login?reason=locked&next=" +
        encodeURIComponent(location.pathname + location.search);
      unlock.focus();
    }
    document.title = "Locked · Triage";
  }

  // The session is shared by the browser's tabs: so are activity and the lock (a message
  // carries a time or "lock", nothing else).
  const tabs = "BroadcastChannel" in window ? new BroadcastChannel("triage-activity") : null;
  let lastShared = 0;
  if (tabs) {
    tabs.onmessage = (e) => {
      if (e.data === "lock") lock(false);
      else if (typeof e.data === "number") lastInput = Math.max(lastInput, e.data);
    };
  }

  if (lockMinutes > 0) {
    for (const kind of ["keydown", "mousedown", "mousemove", "wheel", "touchstart"]) {
      document.addEventListener(kind, () => {
        lastInput = Date.now();
        if (tabs && lastInput - lastShared > 5000) { lastShared = lastInput; tabs.postMessage(lastInput); }
      }, {passive: true});
    }
    setInterval(() => {
      if (Date.now() - lastInput > lockMinutes * 60000) lock();
    }, 5000);
    const lockNow = document.getElementById("lock-now");
    if (lockNow) lockNow.addEventListener("click", () => lock());
  }

  // A page restored from the back-forward cache shows the server's current state again.
  window.addEventListener("pageshow", (e) => { if (e.persisted) location.reload(); });

  // -- waiting times ----------------------------------------------------------------------
  function waited(since) {
    const s = Math.max(0, Math.floor((Date.now() - Date.parse(since)) / 1000));
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min";
    if (s < 48 * 3600) {
      return Math.floor(s / 3600) + " h " + String(Math.floor(s % 3600 / 60)).padStart(2, "0") +
        " min";
    }
    return Math.floor(s / 86400) + " d";
  }
  setInterval(() => {
    for (const el of document.querySelectorAll(".since[data-since]")) {
      el.textContent = waited(el.dataset.since);
    }
  }, 10000);

  // -- live events ------------------------------------------------------------------------
  function connect(onChange, onReset) {
    let broken = false;
    let retry = 1000;
    function checkSession() {
      return fetch("/ui/session", {credentials: "same-origin",
                                   headers: {"X-Triage-Background": "1"}})
        .then((r) => {
          if (r.status === 401) { if (events) events.close(); signIn("expired"); return false; }
          return r.ok;
        })
        .catch(() => false);
    }
    function open() {
      if (locked) return;
      events = new EventSource("/api/v1/worklist/events");
      events.addEventListener("open", () => {
        announce("Live: changes appear as they happen.");
        retry = 1000;
        // After a dropped connection the server replays what was missed (Last-Event-ID);
        // fetching again as well covers anything older than what it keeps.
        if (broken) onReset();
        broken = false;
      });
      events.addEventListener("error", () => {
        broken = true;
        announce("Connection lost: reconnecting…");
        // The browser retries by itself, except after an HTTP error (a proxy's 502 while
        // the API restarts): then this page opens a new stream, a little later each time.
        if (events.readyState === EventSource.CLOSED) {
          const wait = retry;
          retry = Math.min(retry * 2, 30000);
          setTimeout(() => checkSession().then(() => { if (!locked) open(); }), wait);
        } else {
          checkSession();
        }
      });
      events.addEventListener("ended", () => { events.close(); checkSession(); });
      events.addEventListener("reset", onReset);
      for (const kind of EVENTS) {
        events.addEventListener(kind, (e) => onChange(JSON.parse(e.data)));
      }
    }
    open();
  }

  // -- the worklist -----------------------------------------------------------------------
  const worklist = document.getElementById("worklist");
  if (worklist) setUpWorklist(worklist);

  function setUpWorklist(root) {
    const rowsUrl = root.dataset.rowsUrl;
    const unacknowledged = new Set();
    const known = new Map();  // row id -> priority it had when last seen
    let notify = false;
    let timer = null;
    let running = false;
    let again = false;

    function rows() { return Array.from(document.querySelectorAll("#rows tr.row")); }

    for (const row of rows()) known.set(row.id, row.dataset.priority);

    function mark(row) {
      const flagged = unacknowledged.has(row.id);
      row.classList.toggle("alert-new", flagged);
      const flag = row.querySelector(".new-flag");
      if (flag) {
        flag.hidden = !flagged;
        flag.textContent = flagged ? "New critical: press A to acknowledge" : "New";
      }
    }

    function alertFor(row) {
      unacknowledged.add(row.id);
      mark(row);
      if (notify && "Notification" in window && Notification.permission === "granted") {
        // No patient data in a notification: it may show on a shared screen.
        const n = new Notification("Critical study on the worklist",
                                   {body: "Open the worklist to see it.", tag: row.id});
        n.onclick = () => { window.focus(); row.focus(); };
      }
    }

    async function refresh() {
      if (locked) return;
      if (running) { again = true; return; }
      running = true;
      try {
        const response = await fetch(rowsUrl, {credentials: "same-origin",
                                               headers: {"X-Triage-Background": "1"}});
        if (response.status === 401) { signIn("expired"); return; }
        if (!response.ok) return;
        const doc = new DOMParser().parseFromString(await response.text(), "text/html");
        if (!locked) apply(doc);
      } finally {
        running = false;
        if (again) { again = false; refresh(); }
      }
    }

    function apply(doc) {
      const tbody = document.getElementById("rows");
      const active = document.activeElement;
      const focusRow = active && active.closest ? active.closest("#rows tr.row") : null;
      const focusId = focusRow ? focusRow.id : null;
      const focusLink = focusRow !== null && active !== focusRow;
      const current = new Map(Array.from(tbody.children).map((r) => [r.id, r]));
      // Unchanged rows stay as they are (focus, selection); changed ones are replaced.
      const wanted = Array.from(doc.querySelectorAll("#rows > tr")).map((fresh) => {
        const old = fresh.id ? current.get(fresh.id) : null;
        return old && old.dataset.version === fresh.dataset.version ? old
          : document.importNode(fresh, true);
      });
      const keep = new Set(wanted);
      for (const child of Array.from(tbody.children)) if (!keep.has(child)) child.remove();
      let cursor = tbody.firstElementChild;
      for (const node of wanted) {
        if (node === cursor) { cursor = cursor.nextElementSibling; continue; }
        tbody.insertBefore(node, cursor);
      }
      for (const row of rows()) {
        const before = known.get(row.id);
        if (row.dataset.priority === "critical" && before !== "critical") alertFor(row);
        known.set(row.id, row.dataset.priority);
        mark(row);
        row.tabIndex = -1;
      }
      for (const id of ["counts-holder", "pager"]) {
        const mine = document.getElementById(id);
        const theirs = doc.getElementById(id);
        if (mine && theirs && mine.innerHTML !== theirs.innerHTML) mine.innerHTML = theirs.innerHTML;
      }
      const again = focusId ? document.getElementById(focusId) : null;
      const roving = again || rows()[0];
      if (roving) roving.tabIndex = 0;
      if (again && !tbody.contains(document.activeElement)) {
        (focusLink ? again.querySelector("a.open") : again).focus();
      }
    }

    function schedule() {
      clearTimeout(timer);
      timer = setTimeout(refresh, 30);
    }

    connect(schedule, schedule);

    // Desktop alerts: opt-in, and browsers allow them only over HTTPS or on localhost.
    const toggle = document.getElementById("notify-toggle");
    if (!("Notification" in window) || !window.isSecureContext) {
      toggle.disabled = true;
      toggle.textContent = "Desktop alerts need HTTPS";
    }
    toggle.addEventListener("click", async () => {
      if (!notify && Notification.permission !== "granted") {
        await Notification.requestPermission();
      }
      notify = !notify && Notification.permission === "granted";
      toggle.setAttribute("aria-pressed", String(notify));
      toggle.textContent = "Desktop alerts for critical studies: " + (notify ? "on" : "off");
    });

    // -- keyboard -------------------------------------------------------------------------
    function focused() {
      const el = document.activeElement;
      return el && el.closest ? el.closest("#rows tr.row") : null;
    }

    function move(step) {
      const all = rows();
      if (!all.length) return;
      const at = all.indexOf(focused());
      const next = all[Math.min(all.length - 1, Math.max(0, at < 0 ? 0 : at + step))];
      for (const r of all) r.tabIndex = -1;
      next.tabIndex = 0;
      next.focus();
      next.scrollIntoView({block: "nearest"});
    }

    function acknowledge(row) {
      if (row && unacknowledged.delete(row.id)) {
        mark(row);
        announce("Acknowledged.");
      }
    }

    async function act(action, label) {
      const row = focused();
      if (!row) return;
      acknowledge(row);
      const url = "/ui/studies/" + encodeURIComponent(row.dataset.uid) + "/" + action;
      // A study whose images are still arriving is marked read only once the reader confirms.
      function question(n) {
        return "Images are still arriving for this study (" + n + " received so far). " +
          "Mark it read anyway?";
      }
      const arriving = action === "read" ? Number(row.dataset.arriving || 0) : 0;
      if (arriving > 0 && !window.confirm(question(arriving))) {
        announce("Not marked read.");
        return;
      }
      let response = await post(url, arriving > 0 ? {confirm: "yes"} : null);
      if (response.status === 401) { signIn("expired"); return; }
      let doc = new DOMParser().parseFromString(await response.text(), "text/html");
      // The row was shown complete but images have started arriving since: ask now.
      const ask = response.status === 409 ? doc.querySelector("[data-confirm-read]") : null;
      if (ask) {
        if (!window.confirm(question(ask.dataset.confirmRead))) {
          announce("Not marked read.");
          refresh();
          return;
        }
        response = await post(url, {confirm: "yes"});
        if (response.status === 401) { signIn("expired"); return; }
        doc = new DOMParser().parseFromString(await response.text(), "text/html");
      }
      const message = doc.querySelector(".error, .message");
      announce((message ? message.textContent : label).trim());
      refresh();
    }

    document.addEventListener("keydown", (e) => {
      if (e.ctrlKey || e.metaKey || e.altKey || locked) return;
      const target = e.target;
      if (target.closest && target.closest("input, select, textarea, dialog[open]")) return;
      const row = focused();
      switch (e.key) {
        case "j": case "ArrowDown": move(1); break;
        case "k": case "ArrowUp": move(-1); break;
        case "Enter": case "o":
          if (!row) return;
          if (e.key === "Enter" && target.tagName === "A") return;  // the link opens itself
          acknowledge(row);
          location.assign(row.querySelector("a.open").href);
          break;
        case "c": act("claim", "Claimed."); break;
        case "r": act("release", "Released."); break;
        case "m": act("read", "Marked read."); break;
        case "a": acknowledge(row); break;
        case "/": document.querySelector(".filters select, .filters input").focus(); break;
        case "?": document.getElementById("help").showModal(); break;
        default: return;
      }
      e.preventDefault();
    });
    document.getElementById("help-open").addEventListener(
      "click", () => document.getElementById("help").showModal());
    // The keyboard's place in the list survives a dialog: a live update while the help is
    // open may replace the row that had focus, and closing the dialog would then leave
    // focus nowhere; it goes back to the same study's row.
    let lastRowId = null;
    document.addEventListener("focusin", (e) => {
      const row = e.target.closest ? e.target.closest("#rows tr.row") : null;
      if (row) lastRowId = row.id;
    });
    document.getElementById("help").addEventListener("close", () => {
      if (focused()) return;
      const row = lastRowId ? document.getElementById(lastRowId) : null;
      if (row) { row.tabIndex = 0; row.focus(); }
    });
    document.getElementById("rows").addEventListener("click", (e) => {
      const row = e.target.closest("tr.row");
      if (!row) return;
      acknowledge(row);
      if (e.target.tagName !== "A") { for (const r of rows()) r.tabIndex = -1; row.tabIndex = 0; row.focus(); }
    });
    const first = rows()[0];
    if (first) first.tabIndex = 0;
  }

  // -- the study page ---------------------------------------------------------------------
  const study = document.querySelector(".study-page");
  if (study) {
    const uid = study.dataset.uid;
    const notice = document.createElement("p");
    notice.className = "message card";
    notice.setAttribute("role", "status");
    notice.hidden = true;
    study.prepend(notice);
    function changed(text) {
      notice.hidden = false;
      notice.replaceChildren(text + " ");
      const reload = document.createElement("a");
      reload.href = location.pathname;
      reload.textContent = "Show the latest";
      notice.append(reload);
    }
    connect((data) => {
      if (data.study_instance_uid !== uid) return;
      changed("This study changed (" + data.status + ", " + data.priority + ").");
    }, () => changed("The live connection was interrupted; this study may have changed."));
  }

  // -- admin charts -----------------------------------------------------------------------
  const charts = document.getElementById("charts");
  if (charts && window.uPlot) setUpCharts(charts);

  function setUpCharts(root) {
    const select = document.getElementById("chart-window");
    const colours = ["#4e9af1", "#e8a317", "#d64541", "#2ca58d", "#9b59b6", "#7f8c8d"];

    function plot(holder, title, times, series, unit, range) {
      holder.replaceChildren();
      const width = Math.max(280, holder.clientWidth || 480);
      const opts = {
        title: title, width: width, height: 220,
        // The whole period, however few samples there are.
        scales: {x: {time: true, range: () => range}},
        series: [{}].concat(series.map((s, i) => ({label: s.label, stroke: colours[i % 6],
                                                   width: 2, spanGaps: false}))),
        axes: [{stroke: "currentColor"}, {stroke: "currentColor", label: unit}],
      };
      new window.uPlot(opts, [times].concat(series.map((s) => s.values)), holder);
    }

    async function load() {
      const response = await fetch("/api/v1/admin/charts?window=" + select.value,
                                   {credentials: "same-origin",
                                    headers: {"X-Triage-Background": "1"}});
      if (!response.ok) return;
      const data = await response.json();
      const ttn = [];
      for (const [model, v] of Object.entries(data.ttn)) {
        ttn.push({label: model + " p50", values: v.p50});
        ttn.push({label: model + " p95", values: v.p95});
      }
      const range = [data.buckets[0],
                     data.buckets[data.buckets.length - 1] + data.bucket_seconds];
      plot(document.getElementById("chart-ttn"), "Time to notification", data.buckets, ttn, "s",
           range);
      plot(document.getElementById("chart-studies"), "Studies by outcome", data.buckets,
           Object.entries(data.studies).map(([k, v]) => ({label: k, values: v})), "studies",
           range);
      plot(document.getElementById("chart-queue"), "Queue depth", data.queue_depth.times,
           [{label: "waiting jobs", values: data.queue_depth.depth}], "jobs", range);
    }

    select.addEventListener("change", load);
    load();
    setInterval(load, 60000);
  }
})();
