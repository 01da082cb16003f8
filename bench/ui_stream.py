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
Goals: >= 100,000 flows/s delivered to the 5 clients, <= 20 messages/s per client, and ingest with
clients >= 0.8 x ingest without (the dashboard must not slow ingest much).
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
GOAL_RATIO = 0.8
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--endpoints", type=int, default=500)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()

    flows = make_flows(20 * args.batch, args.endpoints)
    bodies = [schema.encode({"node_name": "bench-node", "flows": flows[i:i + args.batch]})
              for i in range(0, len(flows), args.batch)]
    print(f"workload: {len(flows):,} distinct flows among {args.endpoints} endpoints, {len(bodies)} bodies of "
          f"{args.batch}; CPU pressure avg10 {cpu_pressure():.1f}%")
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
        finally:
            server.stop()

    def med(kind: str, key: str) -> dict:
        return summary([r[key] for r in results[kind]])

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
    ratio = ing1["median"] / ing0["median"] if ing0["median"] else 0.0
    met = deliv["median"] >= GOAL_DELIVERED and mx["max"] <= GOAL_MSGS and ratio >= GOAL_RATIO
    print(f"\nGoals: delivered >= {GOAL_DELIVERED:,}/s: {deliv['median']:,.0f}; <= {GOAL_MSGS} msgs/s per client: "
          f"max {mx['max']:.0f}; ingest ratio >= {GOAL_RATIO}: {ratio:.2f}  ->  {'MET' if met else 'NOT MET'}")
    path = write_json("ui_stream", {"machine": machine_facts(), "args": vars(args), "runs": results,
                                    "delivered": deliv, "msgs_per_s": msgs, "ingest_none": ing0, "ingest_clients": ing1,
                                    "ingest_ratio": ratio, "server_cores": {"none": cores0, "clients": cores1},
                                    "goals": {"delivered": GOAL_DELIVERED, "msgs": GOAL_MSGS, "ratio": GOAL_RATIO},
                                    "met": met})
    print(f"results: {path}")
    sys.exit(0)


if __name__ == "__main__":
    main()
