// Service map: cytoscape.js (from npm, served by the API) with namespaces as compound nodes, edges per
// verdict class (forwarded / dropped / audit), L7 stats on edge labels; incremental updates, throttled layout.
(function () {
  "use strict";
  const FS = window.FS;
  const COLORS = { forwarded: "#16a34a", dropped: "#dc2626", audit: "#d97706" };
  const CLASSES = ["forwarded", "dropped", "audit"];
  if (window.cytoscapeFcose && window.cytoscape) window.cytoscape.use(window.cytoscapeFcose);
  const hasFcose = !!window.cytoscapeFcose;

  const container = document.getElementById("cy");
  const panel = document.getElementById("map-panel");
  const nsSelect = document.getElementById("ns-select");
  const info = document.getElementById("map-info");
  const labelsBox = document.getElementById("map-labels");

  const cy = (FS.cy = window.cytoscape({
    container: container,
    minZoom: 0.05,
    maxZoom: 4,
    textureOnViewport: true,
    hideEdgesOnViewport: false,
    style: [
      { selector: "node", style: {
        "background-color": "#ffffff", "border-width": 2, "border-color": "#3b82f6", width: 30, height: 30,
        label: "data(label)", "font-size": 11, "font-family": "system-ui, DejaVu Sans, sans-serif", color: "#1b2330",
        "text-valign": "bottom", "text-margin-y": 5, "text-background-color": "#ffffff", "text-background-opacity": 0.8,
        "text-background-padding": 1, "min-zoomed-font-size": 6 } },
      { selector: "node.workload, node.pod", style: { "background-color": "#eff6ff", "border-color": "#3b82f6" } },
      { selector: "node.has-drops", style: { "border-color": "#dc2626", "border-width": 3 } },
      { selector: "node.world", style: { shape: "ellipse", width: 42, height: 42, "background-color": "#e0f2fe", "border-color": "#0284c7",
        "font-weight": 600 } },
      { selector: "node.host", style: { shape: "round-rectangle", width: 40, height: 30, "background-color": "#f1f5f9", "border-color": "#475569",
        "font-weight": 600 } },
      { selector: "node.ip, node.reserved, node.unknown, node.multicast", style: { shape: "diamond", "background-color": "#f8fafc", "border-color": "#94a3b8" } },
      { selector: "node.namespace", style: {
        shape: "round-rectangle", "background-color": "#f1f5f9", "background-opacity": 0.55, "border-width": 1, "border-style": "dashed",
        "border-color": "#94a3b8", label: "data(label)", "text-valign": "top", "text-halign": "center", "text-margin-y": -4,
        "font-size": 12, "font-weight": 600, color: "#475569", padding: 16, "text-background-opacity": 0 } },
      { selector: "node:selected", style: { "border-color": "#7c3aed", "border-width": 4 } },
      { selector: "node.faded", style: { opacity: 0.35 } },
      { selector: "edge", style: {
        width: "mapData(w, 0, 1, 1.2, 7)", "curve-style": "bezier", "target-arrow-shape": "triangle", "arrow-scale": 0.9,
        "line-color": COLORS.forwarded, "target-arrow-color": COLORS.forwarded, opacity: 0.85,
        label: "data(label)", "font-size": 9, "font-family": "DejaVu Sans Mono, monospace", color: "#334155",
        "text-rotation": "autorotate", "text-background-color": "#ffffff", "text-background-opacity": 0.9,
        "text-background-padding": 1, "min-zoomed-font-size": 7 } },
      { selector: "edge.dropped", style: { "line-color": COLORS.dropped, "target-arrow-color": COLORS.dropped, "line-style": "dashed",
        "target-arrow-shape": "tee", color: "#b91c1c" } },
      { selector: "edge.audit", style: { "line-color": COLORS.audit, "target-arrow-color": COLORS.audit, "line-style": "dashed", color: "#b45309" } },
      { selector: "edge.nolabel", style: { label: "" } },
      { selector: "edge.hover, edge:selected", style: { label: "data(label)", "z-index": 10, opacity: 1 } },
      { selector: "edge:selected", style: { "overlay-color": "#7c3aed", "overlay-opacity": 0.18, "overlay-padding": 4 } },
      { selector: ".hidden", style: { display: "none" } },
    ],
  }));

  // ---- element data from model records -----------------------------------------------------------
  function nodeLabel(n) {
    if (n.kind === "world" || n.kind === "host") return n.name;
    const pods = n.num_pods > 1 ? " ×" + n.num_pods : "";
    return n.name + pods;
  }
  function edgeLabel(e, cls) {
    if (cls === "dropped") {
      const reason = Object.keys(e.drop_reasons || {})[0];
      return FS.fmtNum(e.classes.dropped) + " dropped" + (reason ? " · " + reason : "");
    }
    if (cls === "audit") return FS.fmtNum(e.classes.audit) + " audit";
    if (e.l7) {
      const l = e.l7;
      const err = l.recent_error_rate != null ? l.recent_error_rate : l.error_rate;
      return FS.fmtNum(l.request_rate) + " rps · " + FS.fmtPct(err) + " err" + (l.p95_ms != null ? " · p95 " + FS.fmtMs(l.p95_ms) : "");
    }
    const ports = (e.ports || []).slice(0, 2).map((p) => p[0]).join(", ");
    return ports + ((e.ports || []).length > 2 ? " …" : "");
  }
  const weight = (n) => Math.min(1, Math.log10(1 + n) / 4);

  // what is drawn for a record, to skip no-op updates
  const drawn = new Map();
  function nodeData(n) {
    const parent = n.namespace ? "ns:" + n.namespace : undefined;
    return { data: { id: n.id, label: nodeLabel(n), parent: parent, kind: n.kind, ns: n.namespace || "" },
      classes: n.kind + (n.drops ? " has-drops" : "") };
  }
  function ensureNamespace(ns) {
    if (!ns) return;
    const id = "ns:" + ns;
    if (cy.getElementById(id).empty()) cy.add({ group: "nodes", data: { id: id, label: ns, ns: ns, isNs: true }, classes: "namespace" });
  }
  let needLayout = false;
  let selectedEdge = null;
  let addedSinceLayout = 0;
  function upsertNode(n) {
    const d = nodeData(n);
    const key = d.data.label + "|" + d.classes + "|" + (d.data.parent || "");
    if (drawn.get(n.id) === key) return;
    drawn.set(n.id, key);
    ensureNamespace(n.namespace);
    const el = cy.getElementById(n.id);
    if (el.empty()) {
      const pos = placeNear(n);
      cy.add({ group: "nodes", data: d.data, classes: d.classes, position: pos });
      needLayout = true;
      addedSinceLayout++;
    } else {
      if ((el.data("parent") || undefined) !== d.data.parent) { el.move({ parent: d.data.parent || null }); }
      el.data("label", d.data.label);
      el.classes(d.classes);
    }
  }
  function placeNear(n) {
    // a new node starts next to a node of its namespace (the layout then settles it)
    const sib = n.namespace ? cy.nodes('[ns = "' + n.namespace.replace(/"/g, '\\"') + '"]').not(".namespace") : cy.collection();
    const base = sib.nonempty() ? sib[0].position() : { x: 0, y: 0 };
    return { x: base.x + (Math.random() - 0.5) * 120, y: base.y + (Math.random() - 0.5) * 120 };
  }
  function upsertEdge(e) {
    if (cy.getElementById(e.source).empty() || cy.getElementById(e.target).empty()) return; // node evicted
    for (const cls of CLASSES) {
      const id = e.id + "|" + cls;
      const count = (e.classes || {})[cls] || 0;
      const el = cy.getElementById(id);
      if (!count) { if (el.nonempty()) { el.remove(); drawn.delete(id); } continue; }
      // with labels hidden (big maps), label text changes are not drawn: fewer style updates per tick
      const label = labelsOn || selectedEdge === e.id ? edgeLabel(e, cls) : "";
      const w = Math.round(weight(count) * 20) / 20;
      const cl = cls + (e.l7 ? " l7" : "") + (labelsOn ? "" : " nolabel");
      const key = label + "|" + w + "|" + cl;
      if (drawn.get(id) === key) continue;
      drawn.set(id, key);
      if (el.empty()) {
        cy.add({ group: "edges", data: { id: id, source: e.source, target: e.target, cls: cls, label: label || edgeLabel(e, cls), w: w, edge: e.id }, classes: cl });
      } else {
        if (label) el.data({ label: label, w: w }); else el.data("w", w);
        el.classes(cl);
      }
    }
  }
  function removeRecord(kind, id) {
    if (kind === "edge") {
      for (const cls of CLASSES) { cy.getElementById(id + "|" + cls).remove(); drawn.delete(id + "|" + cls); }
    } else if (kind === "node") {
      cy.getElementById(id).remove(); drawn.delete(id);
    }
  }
  function pruneNamespaces() {
    cy.nodes(".namespace").forEach((ns) => { if (ns.children().empty()) ns.remove(); });
  }

  // ---- layout (throttled; never on every update) -------------------------------------------------
  let layoutTimer = null, lastLayout = 0, running = null;
  function runLayout(fit, randomize) {
    if (running) { running.stop(); running = null; }
    const visible = cy.elements().not(".hidden");
    const n = visible.nodes().length;
    if (!n) return;
    // big maps get fcose's fast spectral "draft" layout (tens of ms); small ones the refined one
    const big = n + visible.edges().length / 4 > 120;
    const opts = hasFcose
      ? { name: "fcose", quality: big ? "draft" : "default", randomize: big || !!randomize, animate: false, fit: fit,
        padding: 30, nodeSeparation: 90, idealEdgeLength: () => 110, nodeRepulsion: () => 9000, packComponents: true,
        numIter: 2500, tile: true, nodeDimensionsIncludeLabels: true }
      : { name: "cose", animate: false, fit: fit, padding: 30, randomize: !!randomize };
    running = visible.layout(opts);
    running.run();
    running = null;
    if (fit && cy.zoom() > 1.3) { cy.zoom(1.3); cy.center(visible); } // a small map stays readable, not giant
    lastLayout = Date.now();
    needLayout = false;
    addedSinceLayout = 0;
  }
  function scheduleLayout(fit) {
    if (layoutTimer) return;
    // a big map is not laid out again for every new node (new nodes start next to their namespace);
    // only when it grew by a fifth, or on "Re-layout"
    const n = cy.nodes().length;
    if (n > 60 && addedSinceLayout < n / 5) return;
    const wait = Math.max(0, 2500 - (Date.now() - lastLayout));
    // keep everything in view unless the user moved the viewport themselves
    layoutTimer = setTimeout(() => { layoutTimer = null; if (isVisible()) runLayout(fit || !userMoved, false); else needLayout = true; }, wait);
  }
  const isVisible = () => !document.getElementById("view-map").hidden;
  let userMoved = false;
  ["wheel", "mousedown", "touchstart"].forEach((ev) => container.addEventListener(ev, () => { userMoved = true; }, { passive: true }));

  // ---- namespace filter ------------------------------------------------------------------------
  function refreshNamespaces() {
    const names = new Set();
    FS.model.nodes.forEach((n) => { if (n.namespace) names.add(n.namespace); });
    const want = [...names].sort();
    const have = [...nsSelect.options].slice(1).map((o) => o.value);
    if (FS.state.ns && !names.has(FS.state.ns)) want.push(FS.state.ns);
    if (want.join("\n") === have.join("\n")) return;
    const cur = FS.state.ns;
    nsSelect.length = 1;
    for (const ns of want) nsSelect.add(new Option(ns, ns));
    nsSelect.value = cur;
  }
  function applyNamespace() {
    const ns = FS.state.ns;
    cy.batch(() => {
      cy.elements().removeClass("hidden faded");
      if (!ns) return;
      const inNs = cy.nodes().filter((n) => !n.data("isNs") && n.data("ns") === ns);
      const edges = inNs.connectedEdges();
      const peers = edges.connectedNodes().not(inNs);
      const keep = inNs.union(edges).union(peers);
      const shown = keep.union(keep.nodes().parents());
      cy.elements().not(shown).addClass("hidden");
      peers.addClass("faded");
    });
  }
  nsSelect.addEventListener("change", () => {
    FS.state.ns = nsSelect.value;
    FS.saveUrl();
    applyNamespace();
    runLayout(true, false);
  });

  // ---- model events ----------------------------------------------------------------------------
  function renderInfo() {
    const m = FS.model;
    const drops = [...m.edges.values()].reduce((a, e) => a + ((e.classes || {}).dropped || 0), 0);
    info.textContent = m.nodes.size + " nodes · " + m.edges.size + " edges · " + FS.fmtNum(m.flows) + " flows" +
      (drops ? " · " + FS.fmtNum(drops) + " dropped" : "") +
      (FS.state.mode === "live" ? " · rates over the last " + m.window_s + " s" : "");
  }
  let pending = null;
  function flush() {
    const p = pending;
    pending = null;
    if (!p) return;
    cy.batch(() => {
      if (p.reset) {
        cy.elements().remove();
        drawn.clear();
        FS.model.nodes.forEach(upsertNode);
        FS.model.edges.forEach(upsertEdge);
      } else {
        for (const [kind, id] of p.removed) removeRecord(kind, id);
        p.nodes.forEach((id) => { const n = FS.model.nodes.get(id); if (n) upsertNode(n); });
        p.edges.forEach((id) => { const e = FS.model.edges.get(id); if (e) upsertEdge(e); });
        if (p.removed.length) pruneNamespaces();
      }
    });
    refreshNamespaces();
    if (FS.state.ns) applyNamespace();
    updateLabels();
    if (p.reset) { if (isVisible()) runLayout(true, true); else needLayout = true; updateLabels(); }
    else if (needLayout) scheduleLayout(false);
    renderInfo();
    refreshPanel();
    container.dataset.version = String((Number(container.dataset.version) || 0) + 1);
  }
  function queue(changed, reset) {
    if (!pending) { pending = { reset: false, nodes: new Set(), edges: new Set(), removed: [] }; requestAnimationFrame(flush); }
    if (reset) { pending.reset = true; pending.nodes.clear(); pending.edges.clear(); pending.removed = []; return; }
    if (pending.reset) return;
    changed.nodes.forEach((n) => pending.nodes.add(n.id));
    changed.edges.forEach((e) => pending.edges.add(e.id));
    pending.removed.push(...changed.removed);
  }
  FS.on("model-reset", (c) => queue(c, true));
  FS.on("model-delta", (c) => queue(c, false));
  FS.on("view", (v) => {
    if (v === "map") {
      cy.resize();
      const n = cy.nodes().length;
      if (needLayout && (lastLayout === 0 || n <= 60 || addedSinceLayout >= n / 5)) runLayout(!userMoved, lastLayout === 0);
    }
  });
  document.getElementById("map-fit").addEventListener("click", () => { userMoved = false; cy.fit(cy.elements().not(".hidden"), 30); });
  document.getElementById("map-layout").addEventListener("click", () => runLayout(true, true));
  // edge labels: on when asked for and readable (few edges on screen, or zoomed in); hover shows one
  let labelsOn = true;
  function updateLabels() {
    const on = labelsBox.checked && (cy.edges(":visible").length <= 80 || cy.zoom() >= 1.6);
    if (on === labelsOn) return;
    labelsOn = on;
    cy.batch(() => cy.edges().toggleClass("nolabel", !on));
    drawn.clear();
  }
  labelsBox.addEventListener("change", updateLabels);
  let zoomTimer = null;
  cy.on("zoom", () => { if (!zoomTimer) zoomTimer = setTimeout(() => { zoomTimer = null; updateLabels(); }, 150); });
  cy.on("mouseover", "edge", (ev) => {
    const t = ev.target, e = FS.model.edges.get(t.data("edge"));
    if (e) t.data("label", edgeLabel(e, t.data("cls")));
    t.addClass("hover");
  });
  cy.on("mouseout", "edge", (ev) => ev.target.removeClass("hover"));

  // ---- details panel ---------------------------------------------------------------------------
  let selected = null; // {kind: "node"|"edge", id}
  cy.on("tap", "node", (ev) => {
    const n = ev.target;
    if (n.data("isNs")) { FS.state.ns = n.data("ns"); nsSelect.value = FS.state.ns; FS.saveUrl(); applyNamespace(); runLayout(true, false); return; }
    selected = { kind: "node", id: n.id() };
    refreshPanel();
  });
  cy.on("tap", "edge", (ev) => { selected = { kind: "edge", id: ev.target.data("edge") }; selectedEdge = selected.id; refreshPanel(); });
  cy.on("tap", (ev) => { if (ev.target === cy) { selected = null; selectedEdge = null; refreshPanel(); } });

  function kv(rows) {
    return '<div class="kv">' + rows.filter(Boolean).map(([k, v]) => "<div>" + FS.esc(k) + "</div><div>" + v + "</div>").join("") + "</div>";
  }
  function verdictBar(c) {
    const f = c.forwarded || 0, d = c.dropped || 0, a = c.audit || 0, t = f + d + a || 1;
    return '<div class="bar3"><span class="f" style="width:' + (100 * f / t) + '%"></span><span class="d" style="width:' + (100 * d / t) +
      '%"></span><span class="a" style="width:' + (100 * a / t) + '%"></span></div>' +
      '<span class="c-forwarded">' + FS.fmtNum(f) + '</span> forwarded · <span class="c-dropped">' + FS.fmtNum(d) +
      '</span> dropped · <span class="c-audit">' + FS.fmtNum(a) + "</span> audit";
  }
  function policyLinks(obj) {
    const keys = Object.keys(obj || {});
    if (!keys.length) return "";
    return keys.map((k) => '<a href="#" class="policy-link" data-policy="' + FS.esc(k) + '">' + FS.esc(k) + "</a> (" + FS.fmtNum(obj[k]) + ")").join("<br>");
  }
  function button(label, args, title) {
    return '<button data-filter="' + FS.esc(FS.argsText(args)) + '" title="' + FS.esc(title || "") + '">' + FS.esc(label) + "</button>";
  }
  function refreshPanel() {
    if (!selected) {
      panel.querySelector(".panel-empty") || (panel.innerHTML = '<div class="panel-empty">Click a workload or an edge for details.</div>');
      if (panel.dataset.sel) { panel.innerHTML = '<div class="panel-empty">Click a workload or an edge for details.</div>'; panel.dataset.sel = ""; }
      return;
    }
    panel.dataset.sel = selected.kind + ":" + selected.id;
    const m = FS.model;
    if (selected.kind === "node") {
      const n = m.nodes.get(selected.id);
      if (!n) { panel.innerHTML = '<div class="panel-empty">This node is gone from the map.</div>'; return; }
      const labels = (n.labels || []).filter((l) => !l.includes("io.kubernetes.pod.namespace"));
      panel.innerHTML = '<div class="panel-head"><h2>' + FS.esc(n.name) + '</h2></div><div class="muted">' + FS.esc(n.kind) +
        (n.namespace ? " in namespace <b>" + FS.esc(n.namespace) + "</b>" : "") + "</div>" +
        "<h4>Traffic</h4>" + kv([["Flows out", FS.fmtNum(n.flows_out)], ["Flows in", FS.fmtNum(n.flows_in)],
          ["Drops to it", n.drops ? '<span class="c-dropped">' + FS.fmtNum(n.drops) + "</span>" : "0"],
          n.identity ? ["Identity", String(n.identity)] : null, ["Last seen", FS.esc(FS.ago(n.last_ns))]]) +
        (n.pods && n.pods.length ? "<h4>Pods (" + n.num_pods + ")</h4><div class=chips>" + n.pods.map((p) => '<span class="chip">' + FS.esc(p) + "</span>").join("") + "</div>" : "") +
        (labels.length ? "<h4>Labels</h4><div class=chips>" + labels.map((l) => '<span class="chip">' + FS.esc(l) + "</span>").join("") + "</div>" : "") +
        (n.addrs && n.addrs.length ? "<h4>Addresses</h4><div class=chips>" + n.addrs.map((a) => '<span class="chip">' + FS.esc(a) + "</span>").join("") + "</div>" : "") +
        '<div class="actions">' + button("Flows from here", n.from_args) + button("Flows to here", n.to_args) +
        (n.namespace ? '<button data-ns="' + FS.esc(n.namespace) + '">Only this namespace</button>' : "") + "</div>";
    } else {
      const e = m.edges.get(selected.id);
      if (!e) { panel.innerHTML = '<div class="panel-empty">This edge is gone from the map.</div>'; return; }
      const s = m.nodes.get(e.source) || { name: e.source, from_args: [] }, t = m.nodes.get(e.target) || { name: e.target, to_args: [] };
      const l = e.l7;
      panel.innerHTML = '<div class="panel-head"><h2>' + FS.esc(s.name) + " → " + FS.esc(t.name) + "</h2></div>" +
        '<div class="muted">' + FS.esc(e.source) + " → " + FS.esc(e.target) + "</div>" +
        "<h4>Verdicts</h4>" + verdictBar(e.classes || {}) +
        "<h4>Traffic</h4>" + kv([["Flows", FS.fmtNum(e.flows)], ["Rate", FS.fmtNum(e.flow_rate) + " flows/s"], ["Bytes", FS.fmtBytes(e.bytes)],
          ["Ports", (e.ports || []).map((p) => '<span class="chip">' + FS.esc(p[0]) + " ×" + FS.fmtNum(p[1]) + "</span>").join(" ") + (e.other_ports ? " +" + e.other_ports : "")],
          ["First / last", FS.esc(FS.fmtNs(e.first_ns) + " / " + FS.ago(e.last_ns))]]) +
        (l ? "<h4>L7 (" + FS.esc(Object.keys(l.protocols).join(", ")) + ")</h4>" + kv([["Requests", FS.fmtNum(l.requests)],
          ["Request rate", FS.fmtNum(l.request_rate) + " /s"], ["Error rate", FS.fmtPct(l.recent_error_rate != null ? l.recent_error_rate : l.error_rate) + ' <span class="muted">(' + FS.fmtNum(l.errors) + " errors in total)</span>"],
          ["Latency p50", FS.fmtMs(l.p50_ms)], ["Latency p95", FS.fmtMs(l.p95_ms)]]) : "") +
        (Object.keys(e.drop_reasons || {}).length ? "<h4>Drop reasons</h4>" + Object.entries(e.drop_reasons).map(([r, n]) => FS.esc(r) + " (" + FS.fmtNum(n) + ")").join("<br>") : "") +
        (Object.keys(e.denied_by || {}).length ? "<h4>Denied by</h4>" + policyLinks(e.denied_by) : "") +
        (Object.keys(e.allowed_by || {}).length ? "<h4>Allowed by</h4>" + policyLinks(e.allowed_by) : "") +
        '<div class="actions">' + button("Show these flows", (s.from_args || []).concat(t.to_args || [])) +
        ((e.classes || {}).dropped ? button("Show drops", (s.from_args || []).concat(t.to_args || [], ["--verdict", "DROPPED"])) : "") + "</div>";
    }
  }
  panel.addEventListener("click", (ev) => {
    const b = ev.target.closest("[data-filter],[data-ns],[data-policy]");
    if (!b) return;
    ev.preventDefault();
    if (b.dataset.policy) { FS.emit("show-policy", b.dataset.policy); return; }
    if (b.dataset.ns) { FS.state.ns = b.dataset.ns; nsSelect.value = b.dataset.ns; FS.saveUrl(); applyNamespace(); runLayout(true, false); return; }
    FS.setFilter(b.dataset.filter, "flows");
  });
  FS.on("reload", () => { selected = null; userMoved = false; refreshPanel(); });
})();
