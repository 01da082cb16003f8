// Flow table: Hubble UI's columns, newest first, live with pause/resume (bounded), click for the JSON,
// export of the rows shown as Hubble JSON lines.
(function () {
  "use strict";
  const FS = window.FS;
  const MAX_ROWS = 1000;
  const tbody = document.querySelector("#flows-table tbody");
  const info = document.getElementById("flows-info");
  const pauseBtn = document.getElementById("flows-pause");
  const panel = document.getElementById("flow-panel");
  const jsonEl = document.getElementById("flow-json");
  const policyEl = document.getElementById("flow-policy");
  const exportAll = document.getElementById("flows-export-all");

  let rows = []; // envelopes in the table, newest first
  let held = []; // arrived while paused (bounded)
  let heldDropped = 0;
  let paused = false;
  let matched = 0, shown = 0;

  function verdictCell(f) {
    const v = f.verdict || "VERDICT_UNKNOWN";
    return '<span class="pill ' + FS.verdictClass(v) + '">' + FS.esc(v) + "</span>";
  }
  function dropCell(f) {
    const parts = [];
    if (f.drop_reason_desc && f.drop_reason_desc !== "DROP_REASON_UNKNOWN") parts.push(FS.esc(f.drop_reason_desc));
    const denied = FS.policyRefs(f, "denied");
    if (denied.length && FS.verdictClass(f.verdict) !== "forwarded") {
      parts.push(denied.map((d) => '<a href="#" class="policy-link" data-policy="' + FS.esc(d.ref) + '" title="Open the policy that decided this">' +
        FS.esc(d.ref) + "</a>").join(", "));
    }
    return parts.join(" · ");
  }
  function rowHtml(env) {
    const f = env.flow, ip = f.IP || {}, l4 = FS.l4(f);
    const port = l4.dport ? l4.proto + "/" + l4.dport : l4.proto;
    return '<td title="' + FS.esc(env.time || f.time) + '">' + FS.esc(FS.fmtTime(env.time || f.time)) + "</td><td>" + FS.esc(FS.endpointName(f.source, ip.source, f.source_names)) +
      "</td><td>" + FS.esc(FS.endpointName(f.destination, ip.destination, f.destination_names)) + "</td><td>" + FS.esc(port) +
      '</td><td title="' + FS.esc(FS.l7Summary(f)) + '">' + FS.esc(FS.l7Summary(f)) + "</td><td>" + verdictCell(f) + "</td><td>" + dropCell(f) +
      "</td><td>" + FS.esc(env.node_name || f.node_name || "") + "</td>";
  }
  function makeRow(env, fresh) {
    const tr = document.createElement("tr");
    tr.innerHTML = rowHtml(env);
    tr._env = env;
    if (fresh) tr.className = "fresh";
    return tr;
  }
  function render(all) {
    const frag = document.createDocumentFragment();
    for (const env of rows) frag.appendChild(makeRow(env, false));
    tbody.textContent = "";
    tbody.appendChild(frag);
    updateInfo();
  }
  function prepend(envs) {
    // envs: oldest first (as the server sends them)
    const frag = document.createDocumentFragment();
    for (let i = envs.length - 1; i >= 0; i--) if (envs[i].flow) frag.appendChild(makeRow(envs[i], true));
    tbody.insertBefore(frag, tbody.firstChild);
    const add = envs.filter((e) => e.flow).reverse();
    rows = add.concat(rows);
    if (rows.length > MAX_ROWS) rows.length = MAX_ROWS;
    while (tbody.rows.length > MAX_ROWS) tbody.deleteRow(-1);
    updateInfo();
  }
  function updateInfo() {
    const live = FS.state.mode === "live";
    let t = rows.length + " flows shown" + (rows.length >= MAX_ROWS ? " (newest " + MAX_ROWS + ")" : "");
    if (live) t += " · " + FS.fmtNum(matched) + " matched since connect" + (matched > shown ? " (the table gets a sample at high rates; the map counts all)" : "");
    if (paused) t += " · paused, " + held.length + (heldDropped ? "+" + heldDropped : "") + " new";
    info.textContent = t;
    tbody.parentElement.dataset.count = String(rows.length);
  }

  FS.on("rows-reset", (envs) => {
    held = []; heldDropped = 0; matched = 0; shown = 0;
    rows = envs.filter((e) => e.flow);
    if (FS.state.mode === "live") rows.reverse(); // the snapshot's rows are oldest first
    if (rows.length > MAX_ROWS) rows.length = MAX_ROWS;
    render();
    closePanel();
  });
  FS.on("rows", (envs) => {
    if (paused) {
      held.push(...envs);
      if (held.length > MAX_ROWS) { heldDropped += held.length - MAX_ROWS; held.splice(0, held.length - MAX_ROWS); }
      updateInfo();
      return;
    }
    prepend(envs);
  });
  FS.on("live-tick", (t) => { matched += t.matched || 0; shown += t.shown || 0; updateInfo(); });
  FS.on("reload", (s) => {
    exportAll.hidden = s.mode !== "range";
    pauseBtn.disabled = s.mode !== "live";
  });

  pauseBtn.addEventListener("click", () => {
    paused = !paused;
    pauseBtn.textContent = paused ? "Resume" : "Pause";
    pauseBtn.classList.toggle("primary", paused);
    if (!paused && held.length) { const h = held; held = []; heldDropped = 0; prepend(h); }
    updateInfo();
  });

  // click: the flow's full JSON, and the deciding policy one click away
  tbody.addEventListener("click", (ev) => {
    const link = ev.target.closest("[data-policy]");
    if (link) { ev.preventDefault(); FS.emit("show-policy", link.dataset.policy); return; }
    const tr = ev.target.closest("tr");
    if (!tr || !tr._env) return;
    tbody.querySelectorAll("tr.selected").forEach((r) => r.classList.remove("selected"));
    tr.classList.add("selected");
    showFlow(tr._env);
  });
  function showFlow(env) {
    const f = env.flow;
    const denied = FS.policyRefs(f, "denied"), allowed = FS.policyRefs(f, "allowed");
    let html = "";
    if (denied.length) {
      html = "<b>" + FS.esc(f.verdict) + "</b>" + (f.drop_reason_desc ? " (" + FS.esc(f.drop_reason_desc) + ")" : "") + " by " +
        denied.map((d) => '<a href="#" class="policy-link" data-policy="' + FS.esc(d.ref) + '">' + FS.esc(d.ref) + "</a> (" + d.side + ")").join(", ");
    } else if (allowed.length) {
      html = "Allowed by " + allowed.map((d) => '<a href="#" class="policy-link" data-policy="' + FS.esc(d.ref) + '">' + FS.esc(d.ref) + "</a> (" + d.side + ")").join(", ");
    }
    policyEl.innerHTML = html;
    policyEl.className = denied.length ? "" : "allowed";
    jsonEl.innerHTML = FS.jsonHtml(env);
    panel.hidden = false;
  }
  function closePanel() { panel.hidden = true; }
  policyEl.addEventListener("click", (ev) => {
    const link = ev.target.closest("[data-policy]");
    if (link) { ev.preventDefault(); FS.emit("show-policy", link.dataset.policy); }
  });
  panel.querySelector("[data-close]").addEventListener("click", closePanel);

  // export: the rows shown, as `hubble observe -o json` lines (oldest first); no network involved
  document.getElementById("flows-export").addEventListener("click", () => {
    const lines = rows.slice().reverse().map((e) => JSON.stringify(e)).join("\n") + (rows.length ? "\n" : "");
    const blob = new Blob([lines], { type: "application/x-ndjson" });
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = "flowscope-flows-" + new Date().toISOString().replace(/[:.]/g, "-") + ".jsonl";
    document.body.appendChild(a);
    a.click();
    setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
  });
  exportAll.addEventListener("click", (ev) => {
    const s = FS.state;
    const u = new URL("/api/v1/dashboard/flows", location.origin);
    u.searchParams.set("q", s.q);
    if (s.since) u.searchParams.set("since", s.since);
    if (s.until) u.searchParams.set("until", s.until);
    u.searchParams.set("limit", "100000");
    u.searchParams.set("download", "true");
    exportAll.href = u.toString();
  });
  FS.flowRows = () => rows;
})();
