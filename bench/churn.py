"""Connection churn at the machine's maximum rate: connections/s with the whole of Flowscope on the node
(agent with L7 capture and policy sync, server, SQLite) vs nothing, and how many connections became flows.

    sudo .venv/bin/python -m bench.churn [--seconds 60] [--reps 5] [--quick]

Client and server namespaces registered as endpoints (pods ``bench/churn-client``, ``bench/churn-server``)
as the CNI plugin registers them; ``bench.connrate`` connects, sends a byte, reads the reply and closes
(RST), as fast as one client process can, for ``--seconds``. Repetitions alternate: nothing running, then
a fresh server (fresh database) and agent, the same load, the agent stopped (it drains and ships), and
the stored flows counted: a connection is present when its first packet (the client's SYN) is stored as
a ``new`` flow from the client pod to the server's port.

Goals (issue 10): >= 0.80 of the baseline connections/s; >= 99 % of connections present as flows.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.harness import AgentProcess, BenchOptions, ServerProcess, SpyRecorder, tree_cpu_seconds
from bench.report import Figure, Goal, ScenarioResult, print_result

PORT = 7000
NS = "bench"


def register(state_dir: Path, eps: list[tuple]) -> None:
    """Write endpoint records as the CNI plugin does: (lab endpoint, pod name, labels)."""
    from flowscope.endpoints import EndpointRecord, EndpointStore

    store = EndpointStore(str(state_dir))
    for ep, pod, labels in eps:
        store.put(EndpointRecord(container_id=f"bench-{pod}", host_ifname=ep.host_if, host_ifindex=ep.ifindex,
                                 ips=[ep.ipv4], namespace=NS, pod_name=pod, labels=labels, netns=ep.netns))


def conn_rate(client, server_ip: str, seconds: float) -> tuple[float, int]:
    out = client.exec([sys.executable, "-m", "bench.connrate", "client", server_ip, str(PORT), str(seconds)],
                      timeout=seconds + 60).stdout.split()
    return float(out[0]), int(out[1])


def count_connections(db: Path, client_ip: str) -> int:
    """Stored flows that are a connection's first packet seen where it left the client pod."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)
    try:
        return conn.execute(
            "SELECT count(*) FROM flows WHERE src_ip = ? AND dst_port = ? AND traffic_direction = 'EGRESS' "
            "AND flow_event = 'new' AND instr(body, '\"flags\":{\"SYN\":true}') > 0", (client_ip, PORT)).fetchone()[0]
    finally:
        conn.close()


def wait_stored(srv: ServerProcess, expected: int, timeout: float = 120) -> int:
    """Wait until the server has stored ``expected`` flows or stops growing; returns what it holds."""
    last, still = -1, 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            n = srv.status()["num_flows"]
        except httpx.HTTPError:
            n = last
        if n >= expected:
            return n
        still = still + 1 if n == last else 0
        if still >= 10:
            return n
        last = n
        time.sleep(0.5)
    return last


def bench(opts: BenchOptions) -> ScenarioResult:
    from flowscope.netlab import Lab

    reps = opts.pick_reps()
    seconds = opts.pick_seconds(60, 5)
    res = ScenarioResult("churn", "Connection churn")
    tmp = Path(tempfile.mkdtemp(prefix="flowscope-bench-churn-"))
    base, with_fs, present, details = [], [], [], []
    try:
        with Lab(ipv6=False) as lab:
            client, server = lab.add("client"), lab.add("server")
            lab.spawn(server, [sys.executable, "-m", "bench.connrate", "server", str(PORT)])
            state = tmp / "state"
            register(state, [(client, "churn-client", {"app": "churn-client"}),
                             (server, "churn-server", {"app": "churn-server"})])
            time.sleep(1)
            conn_rate(client, server.ipv4, 1)  # warm

            def baseline() -> None:
                base.append(conn_rate(client, server.ipv4, seconds)[0])

            def flowscope(profile: bool = False) -> None:
                run = len(with_fs) + (100 if profile else 0)
                db = tmp / f"churn-{run}.db"
                srv = ServerProcess(f"sqlite:///{db}", log_path=tmp / f"server-{run}.log")
                agent = None
                try:
                    agent = AgentProcess(srv.url, [], log_path=tmp / f"agent-{run}.log",
                                         extra=["--endpoints", "--state-dir", str(state)])
                    time.sleep(1.5)
                    a0, s0, t0 = tree_cpu_seconds(agent.pid), tree_cpu_seconds(srv.pid), time.monotonic()
                    spy = None
                    if profile:
                        spy = SpyRecorder(agent.pid, min(seconds, 15), opts.profiles() / "churn-agent.txt",
                                          "the agent during connection churn")
                    rate, made = conn_rate(client, server.ipv4, seconds)
                    dt = time.monotonic() - t0
                    a_cpu, s_cpu = tree_cpu_seconds(agent.pid) - a0, tree_cpu_seconds(srv.pid) - s0
                    if spy is not None:
                        res.profiles.append(spy.finish())
                        return
                    time.sleep(2)  # the last connections' records reach the agent's ring and queue
                    report = agent.stop()
                    agent = None
                    shipped = report.get("shipper", {}).get("shipped", 0)
                    stored = wait_stored(srv, shipped)
                    seen = count_connections(db, client.ipv4)
                    with_fs.append(rate)
                    present.append(100.0 * seen / made if made else 0.0)
                    k = report.get("kernel", {})
                    sh = report.get("shipper", {})
                    details.append({"rate": rate, "connections": made, "present": seen, "stored": stored,
                                    "shipped": shipped, "kernel": k, "agent": report.get("agent", {}),
                                    "lost_queue_full": sh.get("lost_queue_full", 0),
                                    "shed": sh.get("shed", 0),
                                    "lost_by_source": sh.get("lost_by_source", {}),
                                    "agent_cores": a_cpu / dt, "server_cores": s_cpu / dt})
                finally:
                    if agent is not None:
                        agent.stop()
                    srv.stop()
                    for p in tmp.glob(f"churn-{run}.db*"):
                        p.unlink()

            for i in range(reps):
                for fn in ((baseline, flowscope) if i % 2 == 0 else (flowscope, baseline)):
                    fn()
            res.figures.append(Figure("connections/s with Flowscope", "conn/s", with_fs, baseline=base,
                                      baseline_name="nothing", goal=Goal(">=", 0.80, on="ratio"),
                                      note=f"{seconds:g} s of churn per repetition, one client process",
                                      fix=FIX_RATE))
            res.figures.append(Figure("connections present as flows", "%", present, goal=Goal(">=", 99.0),
                                      note="client SYN stored as a `new` flow / connections made", fix=FIX_PRESENT))
            res.details["runs"] = details
            if details:
                d = details[len(details) // 2]
                res.notes.append(
                    f"A middle repetition: {d['connections']:,} connections, {d['present']:,} present; agent received "
                    f"{d['agent'].get('events', 0):,} kernel events (ring accepted {d['kernel'].get('accepted', 0):,}, "
                    f"failed submits {d['kernel'].get('ringbuf_fail', 0):,}, failed map inserts "
                    f"{d['kernel'].get('map_fail', 0):,}), shipped {d['shipped']:,} flow records, server stored "
                    f"{d['stored']:,}; agent queue drops {d['lost_queue_full']:,} (of which flag/update records shed first "
                    f"{d.get('shed', 0):,}); agent {d['agent_cores']:.2f} cores, "
                    f"server {d['server_cores']:.2f} cores.")
            if opts.profile and not opts.quick and res.unmet():
                flowscope(profile=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return res


FIX_RATE = ("at the machine's maximum rate the client, the server namespace's stack, the agent and the API "
            "server share 2 cores: every core-second the agent and the server take is taken from the connections. "
            "Each connection is ~14 kernel events (new/flags/close per direction at both veths; a reused client "
            "port is a new flow since this session's probe fix, before it most connections were folded into an "
            "old entry and never reported). Levers: fewer records per connection (--monitor-aggregation-flags "
            "syn,fin,rst), cheaper per-record work in the agent and at ingest (see the profile).")
FIX_PRESENT = ("~14 records per connection at ~10,000 connections/s is ~140,000 records/s, more than the agent "
               "(~60,000 events/s on its core share) and SQLite ingest through the API (~20-50,000 flows/s on "
               "its share) can carry next to the load itself. Nothing is hidden: failed ring submits, kernel "
               "shedding of flag/update events while the ring is full, and the agent's queue drops (flag/update "
               "records shed first) are all counted and stored as LostEvents (see the note). What would close "
               "it: one record per connection direction (merging both veths' observation points, or reporting "
               "only at close) so a connection costs 2-4 records instead of ~14.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=0)
    ap.add_argument("--reps", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    r = bench(BenchOptions(quick=args.quick, reps=args.reps, seconds=args.seconds, profile=False))
    return print_result(r)


if __name__ == "__main__":
    raise SystemExit(main())
