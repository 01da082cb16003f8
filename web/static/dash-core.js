// Flowscope dashboard core: state, the model (map nodes/edges/pods), the live websocket, range queries,
// formatting. Views subscribe with FS.on(event, fn). No framework; every DOM update is batched per frame.
(function () {
  "use strict";
  const FS = (window.FS = {});
  const handlers = {};
  FS.on = (ev, fn) => (handlers[ev] = handlers[ev] || []).push(fn);
  FS.emit = (ev, data) => (handlers[ev] || []).forEach((fn) => {
    try { fn(data); } catch (e) { console.error("handler for " + ev + " failed", e); }
  });

  // ---- state (mirrored in the URL so a view can be shared) --------------------------------------
  const params = new URLSearchParams(location.search);
  FS.state = {
    view: params.get("view") || "map",
    mode: params.get("since") ? "range" : "live",
    q: params.get("q") || "",
    since: params.get("since") || "",
    until: params.get("until") || "",
    ns: params.get("ns") || "",
  };
  FS.saveUrl = function () {
    const p = new URLSearchParams();
    const s = FS.state;
    if (s.view !== "map") p.set("view", s.view);
    if (s.q) p.set("q", s.q);
    if (s.mode === "range" && s.since) { p.set("since", s.since); if (s.until) p.set("until", s.until); }
    if (s.ns) p.set("ns", s.ns);
    const qs = p.toString();
    history.replaceState(null, "", qs ? "?" + qs : location.pathname);
  };

  // ---- the model -------------------------------------------------------------------------------
  FS.model = { nodes: new Map(), edges: new Map(), pods: new Map(), flows: 0, window_s: 20, range: null };
  function applyRecords(m, msg, reset) {
    const model = FS.model;
    if (reset) { model.nodes.clear(); model.edges.clear(); model.pods.clear(); }
    for (const n of m.nodes || []) model.nodes.set(n.id, n);
    for (const e of m.edges || []) model.edges.set(e.id, e);
    for (const p of m.pods || []) model.pods.set(p.id, p);
    const removed = m.removed || [];
    for (const [kind, id] of removed) {
      (kind === "edge" ? model.edges : kind === "node" ? model.nodes : model.pods).delete(id);
    }
    model.flows = m.flows_total != null ? m.flows_total : (m.flows || 0);
    if (msg && msg.window_s) model.window_s = msg.window_s;
    return { nodes: m.nodes || [], edges: m.edges || [], pods: m.pods || [], removed: removed };
  }

  // ---- formatting ------------------------------------------------------------------------------
  const pad = (n, w) => String(n).padStart(w || 2, "0");
  FS.fmtTime = function (iso) {
    if (!iso) return "";
    const d = new Date(iso);
    if (isNaN(d)) return iso;
    const frac = (iso.match(/\.(\d{1,3})/) || [, "000"])[1].padEnd(3, "0");
    const today = new Date().toDateString() === d.toDateString();
    const day = today ? "" : d.toLocaleDateString(undefined, { month: "short", day: "numeric" }) + " ";
    return day + pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds()) + "." + frac;
  };
  FS.fmtNs = function (ns) {
    if (!ns) return "";
    const d = new Date(Number(ns) / 1e6);
    return d.toLocaleDateString(undefined, { month: "short", day: "numeric" }) + " " +
      pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
  };
  FS.ago = function (ns) {
    if (!ns) return "";
    const s = Math.max(0, (Date.now() - Number(ns) / 1e6) / 1000);
    if (s < 60) return Math.round(s) + "s ago";
    if (s < 3600) return Math.round(s / 60) + "m ago";
    if (s < 86400) return Math.round(s / 3600) + "h ago";
    return Math.round(s / 86400) + "d ago";
  };
  FS.fmtNum = function (n) {
    n = Number(n) || 0;
    if (n >= 1e9) return (n / 1e9).toFixed(1) + "G";
    if (n >= 1e6) return (n / 1e6).toFixed(1) + "M";
    if (n >= 1e4) return (n / 1e3).toFixed(1) + "k";
    return String(Math.round(n * 10) / 10);
  };
  FS.fmtBytes = function (n) {
    n = Number(n) || 0;
    const u = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : n) + " " + u[i];
  };
  FS.fmtMs = (ms) => (ms == null ? "–" : ms < 1 ? ms.toFixed(2) + " ms" : ms < 100 ? ms.toFixed(1) + " ms" : Math.round(ms) + " ms");
  FS.fmtPct = (r) => (r == null ? "–" : r === 0 ? "0%" : (r * 100 < 10 ? (r * 100).toFixed(1) : Math.round(r * 100)) + "%");
  FS.esc = (s) => String(s == null ? "" : s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  FS.verdictClass = (v) => ({ FORWARDED: "forwarded", REDIRECTED: "forwarded", TRANSLATED: "forwarded", TRACED: "forwarded",
    DROPPED: "dropped", ERROR: "dropped", AUDIT: "audit" }[v] || "other");
  FS.quoteArg = (a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : "'" + String(a).replace(/'/g, "'\\''") + "'");
  FS.argsText = (args) => (args || []).map(FS.quoteArg).join(" ");

  // flow helpers (Hubble's JSON shape)
  FS.l4 = function (f) {
    const l4 = f.l4 || {};
    for (const p of ["TCP", "UDP", "SCTP"]) if (l4[p]) return { proto: p, sport: l4[p].source_port || 0, dport: l4[p].destination_port || 0, flags: l4[p].flags };
    if (l4.ICMPv4) return { proto: "ICMPv4", type: l4.ICMPv4.type };
    if (l4.ICMPv6) return { proto: "ICMPv6", type: l4.ICMPv6.type };
    return { proto: "" };
  };
  const RESERVED = { 1: "host", 2: "world", 3: "unmanaged", 4: "health", 5: "init", 6: "remote-node", 7: "kube-apiserver", 8: "ingress", 9: "world", 10: "world" };
  FS.endpointName = function (ep, ip, names) {
    ep = ep || {};
    if (ep.pod_name) return (ep.namespace ? ep.namespace + "/" : "") + ep.pod_name;
    if (names && names.length) return names[0];
    const r = RESERVED[ep.identity] || ((ep.labels || []).find((l) => l.startsWith("reserved:")) || "").slice(9);
    if (r) return ip ? ip + " (" + r + ")" : r;
    return ip || (ep.identity ? "ID:" + ep.identity : "");
  };
  FS.policyRefs = function (f, kind) {
    const out = [];
    for (const side of ["egress", "ingress"]) {
      for (const p of f[side + "_" + kind + "_by"] || []) out.push({ ref: p.namespace ? p.namespace + "/" + p.name : p.name, p: p, side: side });
    }
    return out;
  };
  FS.l7Summary = function (f) {
    const l7 = f.l7;
    if (l7) {
      const lat = Number(l7.latency_ns || 0);
      const latText = lat ? " " + FS.fmtMs(lat / 1e6) : "";
      if (l7.http) {
        const h = l7.http;
        const grpc = (h.headers || []).find((x) => x.key === "grpc-status");
        return (h.protocol || "HTTP") + " " + (h.method || "") + " " + (h.url || "") + (h.code ? " → " + h.code : "") +
          (grpc ? " grpc-status " + grpc.value : "") + latText;
      }
      if (l7.dns) {
        const d = l7.dns;
        return "DNS " + (l7.type === "RESPONSE" ? "answer " : "query ") + (d.query || "") + " " + (d.qtypes || []).join(",") +
          (d.ips && d.ips.length ? " → " + d.ips.join(",") : "") + (d.rcode ? " rcode " + d.rcode : "");
      }
      if (l7.kafka) {
        const k = l7.kafka;
        return "Kafka " + (k.api_key || "") + (k.topic ? " " + k.topic : "") + (k.error_code ? " error " + k.error_code : "") + latText;
      }
    }
    if (f.Summary) return f.Summary;
    const l4 = FS.l4(f);
    if (l4.flags) return l4.proto + " " + Object.keys(l4.flags).filter((k) => l4.flags[k]).join(",");
    return l4.proto;
  };

  // JSON rendering with light highlighting (escaped)
  FS.jsonHtml = function (obj) {
    const text = JSON.stringify(obj, null, 2);
    return FS.esc(text).replace(/(&quot;(?:[^&]|&(?!quot;))*?&quot;)(\s*:)?|\b(true|false|null)\b|(-?\d+(?:\.\d+)?)/g,
      (m, str, colon, bool, num) => {
        if (str) return colon ? '<span class="k">' + str + "</span>" + colon : '<span class="s">' + str + "</span>";
        if (bool) return '<span class="b">' + bool + "</span>";
        return '<span class="n">' + num + "</span>";
      });
  };

  // ---- HTTP --------------------------------------------------------------------------------------
  FS.api = async function (path, qs) {
    const u = new URL(path, location.origin);
    for (const [k, v] of Object.entries(qs || {})) if (v !== "" && v != null) u.searchParams.set(k, v);
    const r = await fetch(u);
    const text = await r.text();
    if (!r.ok) {
      let detail = text;
      try { detail = JSON.parse(text).detail || text; } catch (e) { /* not JSON */ }
      const err = new Error(detail);
      err.status = r.status;
      throw err;
    }
    return text;
  };
  FS.apiJson = async (path, qs) => JSON.parse(await FS.api(path, qs));
  FS.rangeParams = () => (FS.state.mode === "range" ? { since: FS.state.since, until: FS.state.until } : {});

  // ---- live connection -------------------------------------------------------------------------
  let ws = null, retry = 0, timer = null, generation = 0;
  FS.connected = false;
  FS.seenSeq = 0;
  function closeLive() {
    generation++;
    clearTimeout(timer);
    if (ws) { ws.onclose = null; ws.onmessage = null; try { ws.close(); } catch (e) { /* closed */ } ws = null; }
    FS.connected = false;
  }
  function openLive() {
    closeLive();
    const gen = generation;
    const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/api/v1/dashboard/live?q=" + encodeURIComponent(FS.state.q);
    FS.emit("conn", { state: "connecting" });
    ws = new WebSocket(url);
    ws.onopen = () => { retry = 0; };
    ws.onmessage = (ev) => {
      if (gen !== generation) return;
      let msg;
      try { msg = JSON.parse(ev.data); } catch (e) { return; }
      if (msg.type === "error") { FS.emit("filter-error", msg.detail); FS.emit("conn", { state: "error", text: "filter rejected" }); return; }
      FS.connected = true;
      const reset = msg.type === "snapshot";
      if (reset) FS.seenSeq = 0;
      const changed = applyRecords(msg.map || {}, msg, reset);
      FS.emit(reset ? "model-reset" : "model-delta", changed);
      // newest flows (the server sends a bounded sample; row_seqs lets us skip ones we already have)
      const seqs = msg.row_seqs || [];
      const rows = [];
      (msg.flows || []).forEach((env, i) => { const s = seqs[i] || 0; if (!s || s > FS.seenSeq) rows.push(env); });
      if (seqs.length) FS.seenSeq = Math.max(FS.seenSeq, seqs[seqs.length - 1]);
      if (reset) FS.emit("rows-reset", rows); else if (rows.length) FS.emit("rows", rows);
      FS.emit("live-tick", { matched: msg.matched, shown: rows.length, client: msg.client });
      if (msg.status) FS.emit("status", msg.status);
      FS.emit("conn", { state: "live" });
    };
    ws.onclose = (ev) => {
      if (gen !== generation) return;
      FS.connected = false;
      if (ev.code === 1008) return; // the filter was rejected: wait for a new one
      retry = Math.min(retry + 1, 5);
      FS.emit("conn", { state: "error", text: "disconnected, retrying in " + retry + "s" });
      timer = setTimeout(() => { if (gen === generation) openLive(); }, retry * 1000);
    };
  }

  async function loadRange() {
    closeLive();
    const s = FS.state;
    FS.emit("conn", { state: "loading" });
    const qs = { q: s.q, since: s.since, until: s.until };
    try {
      const [map, flows] = await Promise.all([FS.apiJson("/api/v1/dashboard/map", qs),
        FS.api("/api/v1/dashboard/flows", Object.assign({ limit: 1000 }, qs))]);
      FS.model.range = map;
      FS.emit("model-reset", applyRecords(map, null, true));
      const rows = flows.split("\n").filter(Boolean).map((l) => JSON.parse(l)).reverse();
      FS.emit("rows-reset", rows);
      FS.emit("conn", { state: "range", text: "range · " + FS.fmtNum(map.scanned) + " flows" + (map.truncated ? " (first " + FS.fmtNum(map.scanned) + " only)" : "") });
      FS.emit("filter-error", null);
      refreshStatus();
    } catch (e) {
      if (e.status === 400) FS.emit("filter-error", e.message);
      FS.emit("conn", { state: "error", text: e.message });
    }
  }

  async function refreshStatus() {
    try { FS.emit("status", await FS.apiJson("/api/v1/dashboard/status")); } catch (e) { /* shown by conn */ }
  }
  setInterval(() => { if (FS.state.mode === "range") refreshStatus(); }, 3000);

  // (re)load everything for the current state
  FS.reload = function () {
    FS.saveUrl();
    FS.model.range = null;
    FS.emit("reload", FS.state);
    if (FS.state.mode === "live") openLive(); else loadRange();
  };
  FS.setFilter = function (q, view) {
    FS.state.q = q;
    if (view) FS.state.view = view;
    FS.emit("filter-set", q);
    if (view) FS.emit("view", view);
    FS.reload();
  };
})();
