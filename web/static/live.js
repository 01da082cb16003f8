// Flowscope live page: newest flows on top, from the WebSocket stream (frames are JSON arrays of envelopes).
(function () {
  "use strict";
  const MAX_ROWS = 500;
  const tbody = document.querySelector("#flows tbody");
  const statusEl = document.getElementById("status");
  const filterEl = document.getElementById("filter");
  const pauseBtn = document.getElementById("pause");
  let ws = null, paused = false, received = 0, lost = 0, retry = 0, timer = null;

  filterEl.value = new URLSearchParams(location.search).get("filter") || "";

  function setStatus(text, isError) {
    statusEl.textContent = text;
    statusEl.className = isError ? "error" : "";
  }

  function endpoint(ep, ip, port) {
    let name = ip || "";
    if (ep && ep.pod_name) name = (ep.namespace ? ep.namespace + "/" : "") + ep.pod_name;
    else if (ep && ep.identity && !name) name = "ID:" + ep.identity;
    return port ? name + ":" + port : name;
  }

  function l4Info(l4) {
    if (!l4) return { proto: "", sport: 0, dport: 0, flags: "" };
    for (const p of ["TCP", "UDP", "SCTP", "ICMPv4", "ICMPv6"]) {
      const v = l4[p];
      if (!v) continue;
      const flags = v.flags ? Object.keys(v.flags).filter((k) => v.flags[k]).join(",") : "";
      return { proto: p, sport: v.source_port || 0, dport: v.destination_port || 0, flags: flags };
    }
    return { proto: "", sport: 0, dport: 0, flags: "" };
  }

  function summary(f, l4) {
    const l7 = f.l7;
    if (l7 && l7.http) {
      const h = l7.http;
      return "http-" + (l7.type || "").toLowerCase() + " " + [h.protocol, h.method, h.url, h.code].filter(Boolean).join(" ");
    }
    if (l7 && l7.dns) return "dns-" + (l7.type || "").toLowerCase() + " " + (l7.dns.query || "");
    if (l7 && l7.kafka) return "kafka " + (l7.kafka.api_key || "") + " " + (l7.kafka.topic || "");
    if (f.Summary) return f.Summary;
    return l4.proto + (l4.flags ? " " + l4.flags : "");
  }

  function cell(tr, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.appendChild(td);
  }

  function flowRow(env) {
    const f = env.flow, ip = f.IP || {}, l4 = l4Info(f.l4);
    const tr = document.createElement("tr");
    tr.className = f.verdict || "";
    const t = env.time || f.time || "";
    cell(tr, t.replace("T", " ").replace("Z", ""));
    cell(tr, endpoint(f.source, ip.source, l4.sport));
    cell(tr, endpoint(f.destination, ip.destination, 0));
    cell(tr, l4.dport ? String(l4.dport) : "");
    cell(tr, summary(f, l4), "summary");
    let verdict = f.verdict || "";
    if (f.drop_reason_desc) verdict += " (" + f.drop_reason_desc + ")";
    cell(tr, verdict, "verdict");
    return tr;
  }

  function lostRow(env) {
    const ev = env.lost_events, tr = document.createElement("tr");
    tr.className = "lost";
    cell(tr, (env.time || "").replace("T", " ").replace("Z", ""));
    const td = document.createElement("td");
    td.colSpan = 5;
    td.textContent = "lost " + ev.num_events_lost + " events (" + ev.source + ")";
    tr.appendChild(td);
    return tr;
  }

  function onFrame(data) {
    let envs;
    try { envs = JSON.parse(data); } catch (e) { return; }
    if (!Array.isArray(envs)) {
      if (envs && envs.error) setStatus("error: " + envs.error.detail, true);
      return;
    }
    if (paused) return;
    const frag = document.createDocumentFragment();
    for (let i = envs.length - 1; i >= 0; i--) {
      const env = envs[i];
      if (env.flow) { received++; frag.appendChild(flowRow(env)); }
      else if (env.lost_events) { lost += Number(env.lost_events.num_events_lost) || 0; frag.appendChild(lostRow(env)); }
    }
    tbody.insertBefore(frag, tbody.firstChild);
    while (tbody.rows.length > MAX_ROWS) tbody.deleteRow(-1);
    setStatus("live · " + received + " flows" + (lost ? " · " + lost + " lost" : ""));
  }

  function connect() {
    if (ws) { ws.onclose = null; ws.close(); }
    clearTimeout(timer);
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const q = filterEl.value.trim().replace(/^\?/, "");
    const url = scheme + "//" + location.host + "/api/v1/flows/stream?" + (q ? q + "&" : "") + "last=50";
    ws = new WebSocket(url);
    ws.onopen = () => { retry = 0; setStatus("live · waiting for flows"); };
    ws.onmessage = (ev) => onFrame(ev.data);
    ws.onclose = (ev) => {
      if (ev.code === 1008) { setStatus("filter rejected: " + ev.reason, true); return; }
      retry = Math.min(retry + 1, 5);
      setStatus("disconnected; reconnecting in " + retry + "s", true);
      timer = setTimeout(connect, retry * 1000);
    };
  }

  document.getElementById("filter-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const params = new URLSearchParams(location.search);
    if (filterEl.value.trim()) params.set("filter", filterEl.value.trim()); else params.delete("filter");
    history.replaceState(null, "", "?" + params.toString());
    tbody.textContent = "";
    received = 0; lost = 0;
    connect();
  });
  pauseBtn.addEventListener("click", () => {
    paused = !paused;
    pauseBtn.textContent = paused ? "Resume" : "Pause";
  });
  document.getElementById("clear").addEventListener("click", () => { tbody.textContent = ""; });
  connect();
})();
