"""Dashboard live stream under load: flows/s delivered over websockets to N browsers, and what it costs.

    .venv/bin/python -m bench.ui_stream [--seconds 8] [--clients 5] [--endpoints 500] [--reps 2]

A real server (uvicorn + writer process, SQLite in a temporary directory) ingests pre-encoded batches
of flows among ``--endpoints`` pods (100 workloads in 10 namespaces, HTTP with latencies, DNS, drops
named by policies) posted as fast as it accepts them from ``--concurrency`` connections. Each phase
runs twice per repetition, interleaved: without dashboard clients, and with ``--clients`` websocket
clients on ``/api/v1/dashboard/live`` (in their own process, reading as fast as they can, like a
browser that keeps up).

Printed per phase (medians): ingest flows/s; flows delivered to the clients per second (the flows each
message accounts for on the map, summed over clients); messages/s per client (max over clients and
over any one second); bytes/s per client; server CPU (API process + writer process, in cores).
Goals (issue 6): >= 100,000 flows/s delivered to the 5 clients, <= 20 messages/s per client. Also printed:
ingest with clients / ingest without, the price of the live aggregation (it runs in the API process, once
per distinct filter, whatever the number of browsers) on a machine whose cores ingest already fills.

``--browser`` adds a phase with the real page open in Debian's Chromium (Playwright) while flows arrive
at a steady ``--browser-rate`` (default 10,000 flows/s) among the 500 endpoints: it prints the page's
frame rate and frame gaps (requestAnimationFrame), long tasks (PerformanceObserver), how long a tab
switch and a JavaScript round trip take, and the map's size: whether the page stays interactive.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from bench.common import cpu_pressure, interleave, machine_facts, print_table, summary, write_json
from bench.ingest import Server, _post_all
from flowscope import schema

GOAL_DELIVERED = 100_000
GOAL_MSGS = 20
CLK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------
# Workload: 500 endpoints
# --------------------------------------------------------------------------------------------


def make_flows(n: int, endpoints: int, seed: int = 11) -> list[schema.Flow]:
    rng = random.Random(seed)
    namespaces = [f"team-{i}" for i in range(10)]
    per_ns = max(1, endpoints // len(namespaces))
    workloads = [(ns, f"svc-{w}") for ns in namespaces for w in range(10)]
    deps = {w: rng.sample(workloads, 3) for w in workloads}
    pods: dict[tuple[str, str], list[schema.Endpoint]] = {}
    ident = 10_000
    for ns in namespaces:
        for k in range(per_ns):
            w = (ns, f"svc-{k % 10}")
            ident += 1
            pods.setdefault(w, []).append(schema.Endpoint(
                identity=10_000 + workloads.index(w), namespace=ns, pod_name=f"{w[1]}-{k:03d}",
                labels=[f"k8s:app={w[1]}", f"k8s:io.kubernetes.pod.namespace={ns}"]))
    world = schema.Endpoint(identity=2, labels=["reserved:world"])
    dns = schema.Endpoint(identity=102, namespace="kube-system", pod_name="coredns-0", labels=["k8s:app=coredns"])
    deny = schema.Policy(name="default-deny", namespace="team-3", kind="CiliumNetworkPolicy", revision="4")
    out = []
    t = time.time_ns()
    for i in range(n):
        w = rng.choice(workloads)
        src = rng.choice(pods[w])
        r = rng.random()
        sport = rng.randrange(32768, 60999)
        kw: dict = {}
        if r < 0.08:
            dst, dip = dns, "10.96.0.10"
            l4 = schema.Layer4(UDP=schema.UDP(source_port=sport, destination_port=53))
            kw = dict(Type=schema.FlowType.L7, l7=schema.Layer7(type=schema.L7FlowType.REQUEST,
                                                                  dns=schema.DNS(query="svc.cluster.local.")))
        elif r < 0.12:
            dst, dip = world, f"93.184.{rng.randrange(256)}.{rng.randrange(256)}"
            l4 = schema.Layer4(TCP=schema.TCP(source_port=sport, destination_port=443))
        else:
            dw = rng.choice(deps[w])
            dst = rng.choice(pods[dw])
            dip = f"10.{namespaces.index(dw[0])}.{int(dw[1][4:])}.{rng.randrange(2, 250)}"
            port = 8080
            l4 = schema.Layer4(TCP=schema.TCP(source_port=sport, destination_port=port))
            if r < 0.40:
                code = 503 if rng.random() < 0.02 else 200
                kw = dict(Type=schema.FlowType.L7, is_reply=False, l7=schema.Layer7(
                    type=schema.L7FlowType.RESPONSE, latency_ns=str(rng.randrange(300_000, 80_000_000)),
                    http=schema.HTTP(code=code, method="GET", url="http://svc/api", protocol="HTTP/1.1")))
            elif r < 0.45 and dw[0] == "team-3":
                kw = dict(verdict=schema.Verdict.DROPPED, drop_reason_desc=schema.DropReason.POLICY_DENIED,
                          ingress_denied_by=[deny])
        out.append(schema.Flow(
            time=schema.format_timestamp(t + i * 50_000), verdict=kw.pop("verdict", schema.Verdict.FORWARDED),
            IP=schema.IP(source=f"10.{namespaces.index(src.namespace)}.0.{rng.randrange(2, 250)}", destination=dip,
                         ipVersion=schema.IPVersion.IPv4),
            l4=l4, source=src, destination=dst, node_name="bench-node",
            flowscope=schema.FlowscopeExtension(event="new", egress_bytes=str(rng.randrange(60, 9000))), **kw))
    return out


# --------------------------------------------------------------------------------------------
# Clients (their own process)
# --------------------------------------------------------------------------------------------


def _clients_main(url: str, n: int, stop: "mp.synchronize.Event", ready: "mp.synchronize.Event",
                  results: "mp.Queue") -> None:  # pragma: no cover - child process
    from websockets.asyncio.client import connect

    async def one(i: int) -> dict:
        stats = {"messages": 0, "bytes": 0, "delivered": 0, "per_second": {}, "skipped_rows": 0}
        async with connect(url, max_size=256 * 2**20, compression=None) as ws:
            first = True
            while not stop.is_set():
                try:
                    msg = await asyncio.wait_for(ws.recv(), 0.5)
                except asyncio.TimeoutError:
                    continue
                if first:  # the snapshot
                    first = False
                    ready_count.append(i)
                    if len(ready_count) == n:
                        ready.set()
                    continue
                m = json.loads(msg)
                sec = int(time.monotonic())
                stats["per_second"][sec] = stats["per_second"].get(sec, 0) + 1
                stats["messages"] += 1
                stats["bytes"] += len(msg)
                stats["delivered"] += m.get("matched", 0)
                stats["skipped_rows"] = m.get("client", {}).get("skipped_rows", 0)
        stats["max_per_second"] = max(stats["per_second"].values(), default=0)
        del stats["per_second"]
        return stats

    ready_count: list[int] = []

    async def main() -> list[dict]:
        return await asyncio.gather(*(one(i) for i in range(n)))

    results.put(asyncio.run(main()))


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its children (the writer process)."""
    total = 0.0
    pids = [pid]
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    pids.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK
        except (OSError, IndexError, ValueError):
            pass
    return total


def run_phase(server: Server, bodies: list[bytes], per_body: int, seconds: float, clients: int,
              concurrency: int) -> dict:
    ctx = mp.get_context("spawn")
    proc = None
    if clients:
        stop, ready, results = ctx.Event(), ctx.Event(), ctx.Queue()
        ws_url = server.url.replace("http", "ws") + "/api/v1/dashboard/live"
        proc = ctx.Process(target=_clients_main, args=(ws_url, clients, stop, ready, results), daemon=True)
        proc.start()
        if not ready.wait(30):
            raise SystemExit("dashboard clients did not connect")
    cpu0, t0 = _cpu_seconds(server.proc.pid), time.perf_counter()
    accepted = 0
    while time.perf_counter() - t0 < seconds:
        accepted += asyncio.run(_post_all(server.url, bodies, concurrency))
    dt = time.perf_counter() - t0
    cpu = _cpu_seconds(server.proc.pid) - cpu0
    out = {"ingest": accepted / dt, "server_cores": cpu / dt, "seconds": dt, "accepted": accepted}
    if proc is not None:
        time.sleep(1.5)  # the last ticks
        stop.set()
        per_client = results.get(timeout=30)
        proc.join(10)
        out["delivered"] = sum(c["delivered"] for c in per_client) / dt
        out["delivered_share"] = sum(c["delivered"] for c in per_client) / (accepted * clients) if accepted else 0
        out["msgs_per_s"] = max(c["messages"] for c in per_client) / (dt + 1.5)
        out["max_msgs_in_1s"] = max(c["max_per_second"] for c in per_client)
        out["bytes_per_s_client"] = max(c["bytes"] for c in per_client) / (dt + 1.5)
        out["skipped_rows"] = sum(c["skipped_rows"] for c in per_client)
    return out


_PERF_JS = """() => { window.__perf = {frames: [], longtasks: []}; let last = performance.now();
  const tick = (t) => { window.__perf.frames.push(t - last); last = t; requestAnimationFrame(tick); };
  requestAnimationFrame(tick);
  new PerformanceObserver((l) => l.getEntries().forEach((e) => window.__perf.longtasks.push(e.duration)))
    .observe({entryTypes: ['longtask']}); }"""


async def _post_paced(url: str, bodies: list[bytes], per_body: int, rate: float, seconds: float) -> int:
    import httpx

    accepted, i = 0, 0
    interval = per_body / rate
    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=60, headers={"content-type": "application/json"}) as c:
        pending: set = set()
        while time.perf_counter() - start < seconds:
            due = start + i * interval
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            pending.add(asyncio.ensure_future(c.post("/api/v1/flows", content=bodies[i % len(bodies)])))
            i += 1
            done = {t for t in pending if t.done()}
            for t in done:
                accepted += t.result().json()["accepted"]
            pending -= done
        for r in await asyncio.gather(*pending):
            accepted += r.json()["accepted"]
    return accepted


def browser_phase(server: Server, bodies: list[bytes], per_body: int, rate: float, seconds: float) -> dict:
    """The dashboard open in Chromium while flows stream at ``rate``: is the page still interactive?"""
    import statistics

    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = b.new_page(viewport={"width": 1440, "height": 860})
            page.goto(server.url + "/")
            page.evaluate(_PERF_JS)
            result: dict = {}

            def load() -> None:
                result["accepted"] = asyncio.run(_post_paced(server.url, bodies, per_body, rate, seconds))

            import threading

            t = threading.Thread(target=load)
            t0 = time.perf_counter()
            t.start()
            rtts, switches = [], []
            views = ["flows", "map", "endpoints", "map"]
            k = 0
            while t.is_alive():
                a = time.perf_counter()
                page.evaluate("1")
                rtts.append((time.perf_counter() - a) * 1000)
                a = time.perf_counter()
                page.click(f"#tab-{views[k % len(views)]}")
                page.evaluate("new Promise(r => requestAnimationFrame(() => r(1)))")
                switches.append((time.perf_counter() - a) * 1000)
                k += 1
                time.sleep(0.5)
            t.join()
            dt = time.perf_counter() - t0
            perf = page.evaluate("window.__perf")
            frames = perf["frames"][5:] or [0.0]
            size = page.evaluate("[FS.cy.nodes().length, FS.cy.edges().length, FS.model.pods.size, "
                                 "document.querySelectorAll('#flows-table tbody tr').length]")
        finally:
            b.close()
    long = perf["longtasks"]
    q = lambda xs, f: sorted(xs)[min(len(xs) - 1, int(f * len(xs)))] if xs else 0.0  # noqa: E731
    return {"offered": rate, "ingest": result["accepted"] / dt, "fps": len(frames) / dt,
            "frame_gap_p95_ms": q(frames, 0.95), "frame_gap_max_ms": max(frames),
            "longtasks": len(long), "longtask_max_ms": max(long, default=0.0),
            "longtask_share": sum(long) / (dt * 1000), "rtt_p95_ms": q(rtts, 0.95),
            "tab_switch_p95_ms": q(switches, 0.95), "tab_switch_median_ms": statistics.median(switches or [0]),
            "map_nodes": size[0], "map_edges": size[1], "pods": size[2], "table_rows": size[3]}


def aggregation_cost(flows: list[schema.Flow], reps: int = 3) -> dict:
    """Microseconds per flow for one live view to take a flow (what the API process pays per distinct
    filter, whatever the number of browsers), measured in this process."""
    from api.dashboard import DashboardSettings, LiveView
    from api.store import prepare_batch
    from flowscope.query import FlowQuery

    batch = prepare_batch(flows)
    batch.first_id = 1
    times = []
    for _ in range(reps):
        view = LiveView("bench", FlowQuery(), DashboardSettings(), 0)
        t0 = time.perf_counter()
        items = list(batch.live_items())
        for i in range(0, len(items), 256):
            view.feed(items[i:i + 256])
        times.append((time.perf_counter() - t0) / len(flows) * 1e6)
    return summary(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--endpoints", type=int, default=500)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--browser", action="store_true", help="also measure the page in Chromium under load")
    ap.add_argument("--browser-rate", type=float, default=10_000.0)
    ap.add_argument("--browser-only", action="store_true", help="only the browser phase")
    args = ap.parse_args()
    if args.browser_only:
        args.browser, args.reps = True, 0

    flows = make_flows(20 * args.batch, args.endpoints)
    bodies = [schema.encode({"node_name": "bench-node", "flows": flows[i:i + args.batch]})
              for i in range(0, len(flows), args.batch)]
    print(f"workload: {len(flows):,} distinct flows among {args.endpoints} endpoints, {len(bodies)} bodies of "
          f"{args.batch}; CPU pressure avg10 {cpu_pressure():.1f}%")
    agg_cost = aggregation_cost(flows)
    print(f"live aggregation: {agg_cost['median']:.1f} us per flow per live view "
          f"(= {agg_cost['median'] * 10_000 / 1e6:.0%} of a core at 10,000 flows/s)")
    with tempfile.TemporaryDirectory() as d:
        server = Server(f"sqlite:///{d}/flows.db", writer_process=True)
        try:
            results: dict[str, list[dict]] = {"none": [], "clients": []}

            def phase(kind: str):
                def run() -> float:
                    r = run_phase(server, bodies, args.batch, args.seconds, args.clients if kind == "clients" else 0,
                                  args.concurrency)
                    results[kind].append(r)
                    return r["ingest"]
                return run

            interleave(args.reps, {"none": phase("none"), "clients": phase("clients")})
            browser = browser_phase(server, bodies, args.batch, args.browser_rate, args.seconds) if args.browser else None
        finally:
            server.stop()

    def med(kind: str, key: str) -> dict:
        return summary([r[key] for r in results[kind]])

    if args.browser_only:
        print(json.dumps(browser, indent=2))
        write_json("ui_stream_browser", {"machine": machine_facts(), "args": vars(args), "browser": browser,
                                         "aggregation_us_per_flow": agg_cost})
        return

    ing0, ing1 = med("none", "ingest"), med("clients", "ingest")
    print_table("Ingest (flows/s committed)", [("no dashboard clients", ing0, "flows/s"),
                                              (f"{args.clients} dashboard clients", ing1, "flows/s")], ing0)
    deliv, msgs, mx = med("clients", "delivered"), med("clients", "msgs_per_s"), med("clients", "max_msgs_in_1s")
    bps, cores0, cores1 = med("clients", "bytes_per_s_client"), med("none", "server_cores"), med("clients", "server_cores")
    share = med("clients", "delivered_share")
    print_table(f"Dashboard stream ({args.clients} clients)", [
        ("flows delivered (all clients)", deliv, "flows/s"),
        ("share of flows accounted", share, "ratio"),
        ("messages per client", msgs, "msgs/s"),
        ("most messages in 1 s", mx, "msgs"),
        ("bytes per client", bps, "B/s"),
        ("server CPU, no clients", cores0, "cores"),
        ("server CPU, with clients", cores1, "cores"),
    ])
    if browser is not None:
        print(f"\nThe page in Chromium with {browser['offered']:,.0f} flows/s offered (ingested {browser['ingest']:,.0f}/s), "
              f"map {browser['map_nodes']} nodes / {browser['map_edges']} edges, {browser['pods']} pods, "
              f"{browser['table_rows']} table rows:")
        print(f"  frames {browser['fps']:.0f}/s, frame gap p95 {browser['frame_gap_p95_ms']:.0f} ms (max "
              f"{browser['frame_gap_max_ms']:.0f} ms); long tasks {browser['longtasks']} (max {browser['longtask_max_ms']:.0f} ms, "
              f"{browser['longtask_share']:.1%} of the time); JS round trip p95 {browser['rtt_p95_ms']:.0f} ms; "
              f"tab switch median {browser['tab_switch_median_ms']:.0f} ms, p95 {browser['tab_switch_p95_ms']:.0f} ms")
    ratio = ing1["median"] / ing0["median"] if ing0["median"] else 0.0
    met = deliv["median"] >= GOAL_DELIVERED and mx["max"] <= GOAL_MSGS
    print(f"\nGoals: delivered >= {GOAL_DELIVERED:,}/s: {deliv['median']:,.0f}; <= {GOAL_MSGS} msgs/s per client: "
          f"max {mx['max']:.0f}  ->  {'MET' if met else 'NOT MET'}   (ingest with/without clients: {ratio:.2f}; "
          f"CPU pressure avg10 now {cpu_pressure():.0f}%)")
    path = write_json("ui_stream", {"machine": machine_facts(), "args": vars(args), "runs": results,
                                    "delivered": deliv, "msgs_per_s": msgs, "ingest_none": ing0, "ingest_clients": ing1,
                                    "ingest_ratio": ratio, "server_cores": {"none": cores0, "clients": cores1}, "browser": browser,
                                    "aggregation_us_per_flow": agg_cost,
                                    "goals": {"delivered": GOAL_DELIVERED, "msgs": GOAL_MSGS},
                                    "met": met})
    print(f"results: {path}")
    sys.exit(0)


if __name__ == "__main__":
    main()
