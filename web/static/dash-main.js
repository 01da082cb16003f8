// Wiring: tabs, the filter bar (flowscope observe flags), live / time-range mode, the status bar.
(function () {
  "use strict";
  const FS = window.FS;
  const S = FS.state;
  const filterEl = document.getElementById("filter");
  const errEl = document.getElementById("filter-error");
  const fromEl = document.getElementById("range-from");
  const toEl = document.getElementById("range-to");
  const liveBtn = document.getElementById("mode-live");
  const rangeBtn = document.getElementById("range-apply");

  // ---- tabs --------------------------------------------------------------------------------------
  function showView(v) {
    S.view = v;
    document.querySelectorAll(".view").forEach((el) => (el.hidden = el.dataset.view !== v));
    document.querySelectorAll(".tabs button").forEach((b) => b.classList.toggle("active", b.dataset.view === v));
    FS.saveUrl();
  }
  FS.on("view", showView);
  document.querySelector(".tabs").addEventListener("click", (ev) => {
    const b = ev.target.closest("button[data-view]");
    if (b) FS.emit("view", b.dataset.view);
  });

  // ---- filter bar ----------------------------------------------------------------------------------
  filterEl.value = S.q;
  function showError(msg) {
    errEl.hidden = !msg;
    errEl.textContent = msg ? "✕ " + msg : "";
    filterEl.classList.toggle("invalid", !!msg);
  }
  FS.on("filter-error", showError);
  FS.on("filter-set", (q) => { filterEl.value = q; showError(null); });
  document.getElementById("filter-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const q = filterEl.value.trim();
    let parsed;
    try {
      parsed = (await FS.apiJson("/api/v1/dashboard/parse", { q: q })).query;
    } catch (e) {
      showError(e.message);
      return;
    }
    showError(null);
    if (parsed.since != null || parsed.until != null) { // --since/--until in the filter: a time range
      S.mode = "range";
      S.since = String(parsed.since || "1h");
      S.until = parsed.until != null ? String(parsed.until) : "";
      showRange();
    }
    S.q = q;
    FS.reload();
  });
  document.getElementById("filter-clear").addEventListener("click", () => { filterEl.value = ""; S.q = ""; showError(null); FS.reload(); });
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "/" && document.activeElement !== filterEl && !/INPUT|SELECT|TEXTAREA/.test(document.activeElement.tagName)) {
      ev.preventDefault();
      filterEl.focus();
      filterEl.select();
    }
  });

  // ---- live / range ------------------------------------------------------------------------------
  const toLocal = (d) => new Date(d.getTime() - d.getTimezoneOffset() * 60000).toISOString().slice(0, 19);
  function relNs(text) {
    const m = /^(\d+)([smhd])$/.exec(text || "");
    if (!m) return null;
    return Date.now() - Number(m[1]) * { s: 1e3, m: 6e4, h: 3.6e6, d: 8.64e7 }[m[2]];
  }
  function showRange() {
    const since = relNs(S.since) || (S.since ? Date.parse(S.since) : NaN);
    fromEl.value = isNaN(since) || since == null ? "" : toLocal(new Date(since));
    const until = relNs(S.until) || (S.until ? Date.parse(S.until) : NaN);
    toEl.value = isNaN(until) || until == null ? "" : toLocal(new Date(until));
    liveBtn.classList.toggle("active", S.mode === "live");
    rangeBtn.classList.toggle("active", S.mode === "range");
  }
  function setRange(since, until) {
    S.mode = "range";
    S.since = since;
    S.until = until || "";
    showRange();
    FS.reload();
  }
  liveBtn.addEventListener("click", () => { S.mode = "live"; S.since = ""; S.until = ""; showRange(); FS.reload(); });
  rangeBtn.addEventListener("click", () => {
    if (!fromEl.value) { fromEl.value = toLocal(new Date(Date.now() - 3600e3)); }
    setRange(new Date(fromEl.value).toISOString(), toEl.value ? new Date(toEl.value).toISOString() : "");
  });
  document.querySelector(".quick").addEventListener("click", (ev) => {
    const b = ev.target.closest("button[data-ago]");
    if (b) setRange(b.dataset.ago, "");
  });

  // ---- status bar ----------------------------------------------------------------------------------
  const conn = document.getElementById("st-conn");
  FS.on("conn", (c) => {
    conn.className = "st conn " + (c.state === "live" ? "live" : c.state === "range" ? "range" : c.state === "error" ? "error" : "");
    conn.textContent = c.text || { live: "live", connecting: "connecting…", loading: "loading…", range: "range" }[c.state] || c.state;
  });
  const SRC = { PERF_EVENT_RING_BUFFER: "kernel ring buffer", OBSERVER_EVENTS_QUEUE: "agent queue", HUBBLE_RING_BUFFER: "server buffer" };
  FS.on("status", (st) => {
    document.getElementById("st-rate").textContent = FS.fmtNum(st.flows_per_s);
    const lost = Object.assign({}, st.lost_events || {}, st.server_lost || {});
    const total = Object.values(lost).reduce((a, b) => a + Number(b || 0), 0);
    const lostEl = document.getElementById("st-lost");
    lostEl.innerHTML = total ? '<span class="warn">' + FS.fmtNum(total) + "</span> (" +
      Object.entries(lost).filter(([, n]) => n).map(([k, n]) => FS.esc(SRC[k] || k) + " " + FS.fmtNum(n)).join(" · ") + ")" : "0";
    lostEl.parentElement.title = "Events lost, by source:\n" + (Object.entries(lost).map(([k, n]) => (SRC[k] || k) + ": " + n).join("\n") || "none");
    const ag = st.agents || {};
    document.getElementById("st-agents").textContent = (ag.connected || 0) + " / " + (ag.known || 0);
    document.getElementById("st-agents").parentElement.title = (ag.nodes || []).map((n) => n.name + (n.connected ? " (connected)" : " (last seen " + n.last_seen + ")")).join("\n");
    document.getElementById("st-storage").textContent = (st.storage_bytes != null ? FS.fmtBytes(st.storage_bytes) + " · " : "") + FS.fmtNum(st.stored_flows) + " flows";
  });
  FS.on("live-tick", (t) => {
    const el = document.getElementById("st-view");
    el.textContent = t.client && t.client.skipped_rows ? "table sampled: " + FS.fmtNum(t.client.skipped_rows) + " rows skipped (map counts all)" : "";
  });

  // ---- start ---------------------------------------------------------------------------------------
  showRange();
  showView(S.view);
  FS.reload();
  FS.emit("view", S.view);
  if (S.ns) document.getElementById("ns-select").value = S.ns;
})();
