// Endpoints: the pods seen in flows (live: since the view started, plus the last 5 minutes; range: in
// the range) with labels, identity, IPs, node and flow counts; click for their flows.
(function () {
  "use strict";
  const FS = window.FS;
  const tbody = document.querySelector("#ep-table tbody");
  const search = document.getElementById("ep-search");
  const info = document.getElementById("ep-info");
  const MAX = 2000;
  let sortKey = "namespace", sortDir = 1, dirty = true, timer = null;

  function visible() { return FS.state.view === "endpoints"; }
  function render() {
    dirty = false;
    const needle = search.value.trim().toLowerCase();
    let pods = [...FS.model.pods.values()];
    if (needle) {
      pods = pods.filter((p) => (p.namespace + "/" + p.pod_name + " " + p.workload + " " + p.labels.join(" ") + " " + p.ips.join(" ") + " " +
        p.nodes.join(" ") + " " + p.identity).toLowerCase().includes(needle));
    }
    const key = sortKey;
    const val = (p) => (key === "drops" ? p.drops_in + p.drops_out : p[key]);
    pods.sort((a, b) => {
      const x = val(a), y = val(b);
      return (x < y ? -1 : x > y ? 1 : (a.namespace + a.pod_name).localeCompare(b.namespace + b.pod_name)) * sortDir;
    });
    const total = pods.length;
    pods = pods.slice(0, MAX);
    const frag = document.createDocumentFragment();
    for (const p of pods) {
      const tr = document.createElement("tr");
      tr.dataset.pod = p.id;
      const labels = p.labels.filter((l) => !l.includes("io.kubernetes.pod.namespace"));
      tr.innerHTML = "<td>" + FS.esc(p.namespace) + "</td><td><b>" + FS.esc(p.pod_name) + "</b></td><td>" + FS.esc(p.workload) + "</td><td title=\"" +
        FS.esc(labels.join("\n")) + '">' + labels.slice(0, 3).map((l) => '<span class="chip">' + FS.esc(l) + "</span>").join(" ") +
        (labels.length > 3 ? " +" + (labels.length - 3) : "") + '</td><td class="num">' + FS.esc(p.identity || "") + "</td><td>" +
        FS.esc(p.ips.join(", ")) + "</td><td>" + FS.esc(p.nodes.join(", ")) + '</td><td class="num">' + FS.fmtNum(p.flows_out) +
        '</td><td class="num">' + FS.fmtNum(p.flows_in) + '</td><td class="num' + (p.drops_in + p.drops_out ? " c-dropped" : "") + '">' +
        FS.fmtNum(p.drops_in + p.drops_out) + "</td><td>" + FS.esc(FS.ago(p.last_ns)) + '</td><td><button data-pod="' + FS.esc(p.id) + '">Flows</button></td>';
      frag.appendChild(tr);
    }
    tbody.textContent = "";
    tbody.appendChild(frag);
    info.textContent = total + " endpoints" + (total > MAX ? " (first " + MAX + " shown)" : "") +
      (FS.state.mode === "live" ? " seen since this live view started (and in the 5 minutes before)" : " seen in the range");
  }
  function schedule() {
    dirty = true;
    if (!visible() || timer) return;
    timer = setTimeout(() => { timer = null; if (dirty && visible()) render(); }, 1000);
  }
  FS.on("model-reset", () => { dirty = true; if (visible()) render(); });
  FS.on("model-delta", (c) => { if (c.pods.length || c.removed.length) schedule(); });
  FS.on("view", (v) => { if (v === "endpoints" && dirty) render(); });
  search.addEventListener("input", () => render());
  document.querySelector("#ep-table thead").addEventListener("click", (ev) => {
    const th = ev.target.closest("th[data-sort]");
    if (!th) return;
    if (sortKey === th.dataset.sort) sortDir = -sortDir; else { sortKey = th.dataset.sort; sortDir = th.classList.contains("num") || sortKey === "last_ns" ? -1 : 1; }
    render();
  });
  tbody.addEventListener("click", (ev) => {
    const tr = ev.target.closest("tr");
    if (!tr) return;
    FS.setFilter(FS.argsText(["--pod", tr.dataset.pod]), "flows");
  });
})();
