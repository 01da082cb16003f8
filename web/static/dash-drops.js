// Drops and policies: drops by reason and by deciding policy over time (stacked bars, SVG), the
// policies with the verdicts they decided, their specs, and the recent drops. A policy is one click
// from any drop (FS.emit("show-policy", ref)).
(function () {
  "use strict";
  const FS = window.FS;
  const PALETTE = ["#dc2626", "#ea580c", "#d97706", "#9333ea", "#db2777", "#0891b2", "#4f46e5", "#65a30d", "#78716c", "#0f766e"];
  const info = document.getElementById("drops-info");
  const polBody = document.querySelector("#policies-table tbody");
  const polInfo = document.getElementById("policies-info");
  const detail = document.getElementById("policy-detail");
  const dropsBody = document.querySelector("#drops-table tbody");
  let policies = [];
  let wanted = null; // a policy to open once loaded
  let timer = null;
  let loading = false;

  function chart(el, series, data) {
    const names = Object.keys(series);
    if (!names.length) { el.innerHTML = '<div class="empty">No drops in this range.</div>'; return; }
    const n = data.buckets, W = 600, H = 150, padL = 34, padB = 16;
    const totals = new Array(n).fill(0);
    names.forEach((k) => series[k].forEach((v, i) => (totals[i] += v)));
    const max = Math.max(1, ...totals);
    const bw = (W - padL) / n;
    let svg = '<svg viewBox="0 0 ' + W + " " + (H + padB) + '" preserveAspectRatio="none" role="img">';
    for (const frac of [0, 0.5, 1]) {
      const y = H - frac * (H - 8);
      svg += '<line x1="' + padL + '" x2="' + W + '" y1="' + y + '" y2="' + y + '" stroke="#e2e6ec" stroke-width="1"/>' +
        '<text x="' + (padL - 4) + '" y="' + (y + 3) + '" font-size="9" text-anchor="end" fill="#64708a">' + FS.fmtNum(Math.round(max * frac)) + "</text>";
    }
    const base = new Array(n).fill(0);
    names.slice(0, PALETTE.length).forEach((k, si) => {
      series[k].forEach((v, i) => {
        if (!v) return;
        const h = (v / max) * (H - 8), y = H - base[i] - h;
        base[i] += h;
        const t = Number(data.since_ns) + i * Number(data.bucket_ns);
        svg += '<rect x="' + (padL + i * bw + 0.5) + '" y="' + y + '" width="' + Math.max(1, bw - 1) + '" height="' + h + '" fill="' + PALETTE[si] +
          '"><title>' + FS.esc(k) + ": " + v + " at " + FS.esc(FS.fmtNs(t)) + "</title></rect>";
      });
    });
    svg += '<text x="' + padL + '" y="' + (H + 12) + '" font-size="9" fill="#64708a">' + FS.esc(FS.fmtNs(data.since_ns)) + "</text>" +
      '<text x="' + W + '" y="' + (H + 12) + '" font-size="9" text-anchor="end" fill="#64708a">' + FS.esc(FS.fmtNs(data.until_ns)) + "</text></svg>";
    const legend = names.slice(0, PALETTE.length).map((k, i) => {
      const total = series[k].reduce((a, b) => a + b, 0);
      const isPolicy = el.id === "chart-policy" && !k.startsWith("(");
      const name = isPolicy ? '<a href="#" class="policy-link" data-policy="' + FS.esc(k) + '">' + FS.esc(k) + "</a>" : FS.esc(k);
      return '<span><span class="sw" style="background:' + PALETTE[i] + '"></span>' + name + " <b>" + FS.fmtNum(total) + "</b></span>";
    }).join("");
    el.innerHTML = svg + '<div class="legend-row">' + legend + "</div>";
  }

  function renderPolicies() {
    polBody.textContent = "";
    const frag = document.createDocumentFragment();
    for (const p of policies) {
      const tr = document.createElement("tr");
      tr.dataset.ref = p.ref;
      tr.innerHTML = '<td><a href="#" class="policy-link" data-policy="' + FS.esc(p.ref) + '">' + FS.esc(p.ref) + "</a>" +
        (p.stored === false ? ' <span class="muted" title="Named by flows but not in the policy store">(not stored)</span>' : "") + "</td><td>" +
        FS.esc(p.kind || "") + '</td><td class="num">' + FS.esc(p.revision || "") + '</td><td class="num c-forwarded">' + FS.fmtNum(p.forwarded) +
        '</td><td class="num c-dropped">' + FS.fmtNum(p.dropped) + '</td><td class="num c-audit">' + FS.fmtNum(p.audit) + "</td><td>" +
        FS.esc(p.last_ns ? FS.ago(p.last_ns) : "–") + "</td>";
      frag.appendChild(tr);
    }
    polBody.appendChild(frag);
    polInfo.textContent = policies.length ? "(" + policies.length + ")" : "— none stored or named by flows in this range";
  }

  function showPolicy(ref, loaded) {
    const p = policies.find((x) => x.ref === ref);
    polBody.querySelectorAll("tr.highlight").forEach((r) => r.classList.remove("highlight"));
    const tr = [...polBody.rows].find((r) => r.dataset.ref === ref);
    if (tr) { tr.classList.add("highlight"); tr.scrollIntoView({ block: "nearest" }); }
    detail.hidden = false;
    detail.dataset.ref = ref;
    if (!p) {
      detail.innerHTML = "<h4>" + FS.esc(ref) + '</h4><div class="muted">' + (loaded
        ? "No policy of this name is stored, and no flow in this range names it."
        : "Loading…") + "</div>";
      return;
    }
    const spec = p.policy ? '<pre class="json">' + FS.jsonHtml(p.policy) + "</pre>"
      : '<div class="muted">This policy is named by flows but is not in the policy store (deleted, or applied elsewhere).</div>';
    detail.innerHTML = "<h4>" + FS.esc(p.ref) + ' <span class="muted">' + FS.esc(p.kind || "") + (p.revision ? " · revision " + FS.esc(p.revision) : "") +
      (p.updated ? " · updated " + FS.esc(p.updated) : "") + "</span></h4>" +
      '<div style="margin-bottom:8px"><span class="c-forwarded">' + FS.fmtNum(p.forwarded) + '</span> forwarded · <span class="c-dropped">' +
      FS.fmtNum(p.dropped) + '</span> dropped · <span class="c-audit">' + FS.fmtNum(p.audit) + "</span> audit in this range</div>" + spec;
  }

  async function load() {
    if (loading) return;
    loading = true;
    const s = FS.state;
    const qs = Object.assign({ q: s.q }, s.mode === "range" ? { since: s.since, until: s.until } : { since: "15m" });
    try {
      const [drops, pols] = await Promise.all([FS.apiJson("/api/v1/dashboard/drops", Object.assign({ buckets: 60 }, qs)),
        FS.apiJson("/api/v1/dashboard/policies", qs)]);
      policies = pols.items;
      info.textContent = FS.fmtNum(drops.drops) + " drops, " + FS.fmtNum(drops.audits) + " audited flows " +
        (s.mode === "range" ? "in the range" : "in the last 15 minutes (refreshes every 10 s)") +
        (s.q ? " · matching the filter" : "") + (drops.truncated || pols.truncated ? " · partial: range too large" : "");
      chart(document.getElementById("chart-reason"), drops.by_reason, drops);
      chart(document.getElementById("chart-policy"), drops.by_policy, drops);
      renderPolicies();
      dropsBody.textContent = "";
      const frag = document.createDocumentFragment();
      for (const env of drops.recent) {
        const f = env.flow, ip = f.IP || {}, l4 = FS.l4(f);
        const tr = document.createElement("tr");
        const denied = FS.policyRefs(f, "denied");
        tr.innerHTML = "<td>" + FS.esc(FS.fmtTime(env.time)) + "</td><td>" + FS.esc(FS.endpointName(f.source, ip.source, f.source_names)) + "</td><td>" +
          FS.esc(FS.endpointName(f.destination, ip.destination, f.destination_names)) + "</td><td>" + FS.esc(l4.dport ? l4.proto + "/" + l4.dport : l4.proto) +
          "</td><td>" + FS.esc(f.drop_reason_desc || "") + "</td><td>" +
          denied.map((d) => '<a href="#" class="policy-link" data-policy="' + FS.esc(d.ref) + '">' + FS.esc(d.ref) + "</a>").join(", ") + "</td>";
        frag.appendChild(tr);
      }
      dropsBody.appendChild(frag);
      document.getElementById("view-drops").dataset.loaded = String(Date.now());
      if (wanted) { const w = wanted; wanted = null; showPolicy(w, true); }
      else if (!detail.hidden && detail.dataset.ref) showPolicy(detail.dataset.ref, true);
    } catch (e) {
      info.textContent = "error: " + e.message;
    } finally {
      loading = false;
    }
  }

  document.getElementById("view-drops").addEventListener("click", (ev) => {
    const a = ev.target.closest("[data-policy]");
    if (a) { ev.preventDefault(); showPolicy(a.dataset.policy); return; }
    const tr = ev.target.closest("#policies-table tbody tr");
    if (tr) showPolicy(tr.dataset.ref);
  });

  FS.on("show-policy", (ref) => {
    wanted = ref;
    if (FS.state.view !== "drops") FS.emit("view", "drops"); // loads, then opens the policy
    else if (policies.some((p) => p.ref === ref)) { wanted = null; showPolicy(ref); }
    else load();
    showPolicy(ref);
  });
  FS.on("view", (v) => {
    clearInterval(timer);
    if (v !== "drops") return;
    load();
    timer = setInterval(() => { if (FS.state.mode === "live" && FS.state.view === "drops") load(); }, 10000);
  });
  FS.on("reload", () => { if (FS.state.view === "drops") load(); });
})();
