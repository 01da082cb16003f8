"""Agent CPU at 1,000 new flows/s: a real agent on lab veths, its CPU from /proc while a generator opens
1,000 new UDP flows per second (a DNS-like request and reply each, from a new source port).

    sudo .venv/bin/python -m bench.agent_cpu [--rate 1000] [--seconds 20] [--reps 5] [--quick]

The agent (``bench.agent_proc``: what ``flowscope agent`` runs, with L7 capture and policy sync on)
observes both host-side veths of a client and a server namespace and ships to a real server (SQLite).
Windows alternate, same run: idle (no traffic: the agent's fixed cost, the baseline) and loaded
(``--rate`` new flows/s). Agent CPU = utime+stime of its process over the window. Goal (issue 10):
<= 2 % of one core at 1,000 new flows/s.
"""

from __future__ import annotations

import argparse
import collections
import socket
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import AgentProcess, BenchOptions, ServerProcess, SpyRecorder, cpu_seconds
from bench.report import Figure, Goal, ScenarioResult, print_result

GOAL_PCT = 2.0
PORT = 5353


def sink(port: int) -> None:
    """Answer every datagram with a small reply (the server side of a DNS-like exchange)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    while True:
        data, addr = s.recvfrom(2048)
        s.sendto(b"r" * 48, addr)


def generate(host: str, port: int, rate: float, seconds: float, hold: float = 0.2) -> None:
    """``rate`` new flows/s for ``seconds``: each a new socket (a new source port) sending one request; the
    socket stays open ``hold`` seconds to take the reply, then closes. Prints ``flows seconds``."""
    ring: collections.deque = collections.deque()
    n = 0
    t0 = time.monotonic()
    end = t0 + seconds
    while True:
        now = time.monotonic()
        if now >= end:
            break
        due = int((now - t0) * rate) - n
        for _ in range(max(0, due)):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setblocking(False)
            s.sendto(b"q" * 40, (host, port))
            ring.append((now, s))
            n += 1
        while ring and now - ring[0][0] >= hold:
            _, s = ring.popleft()
            try:
                s.recv(2048)
            except OSError:
                pass
            s.close()
        time.sleep(0.002)
    time.sleep(hold)
    for _, s in ring:
        s.close()
    print(f"{n} {time.monotonic() - t0:.3f}")


def bench(opts: BenchOptions, rate: float = 1000.0) -> ScenarioResult:
    from flowscope.netlab import Lab

    reps = opts.pick_reps()
    seconds = opts.pick_seconds(20, 5)
    idle_s = 5.0 if opts.quick else 10.0
    res = ScenarioResult("agent_cpu", "Agent CPU at 1,000 new flows/s")
    tmp = Path(tempfile.mkdtemp(prefix="flowscope-bench-agentcpu-"))
    with Lab(ipv6=False) as lab:
        client, server = lab.add("client"), lab.add("server")
        lab.spawn(server, [sys.executable, "-m", "bench.agent_cpu", "sink", str(PORT)])
        srv = ServerProcess(f"sqlite:///{tmp}/flows.db", log_path=tmp / "server.log")
        agent = None
        try:
            agent = AgentProcess(srv.url, [client.host_if, server.host_if], log_path=tmp / "agent.log",
                                 extra=["--state-dir", str(tmp / "state")])
            time.sleep(2)
            client.exec([sys.executable, "-m", "bench.agent_cpu", "gen", server.ipv4, str(PORT), str(rate), "1"],
                        timeout=30)  # warm: first flows shipped, caches filled
            time.sleep(2)
            idle, loaded, achieved, srv_loaded = [], [], [], []
            for i in range(reps):
                for kind in (("idle", "load") if i % 2 == 0 else ("load", "idle")):
                    a0, s0, t0 = cpu_seconds(agent.pid), _tree(srv.pid), time.monotonic()
                    if kind == "idle":
                        time.sleep(idle_s)
                    else:
                        out = client.exec([sys.executable, "-m", "bench.agent_cpu", "gen", server.ipv4, str(PORT),
                                           str(rate), str(seconds)], timeout=seconds + 60).stdout.split()
                        achieved.append(int(out[0]) / float(out[1]))
                    dt = time.monotonic() - t0
                    pct = 100 * (cpu_seconds(agent.pid) - a0) / dt
                    (idle if kind == "idle" else loaded).append(pct)
                    if kind == "load":
                        srv_loaded.append(100 * (_tree(srv.pid) - s0) / dt)
            res.figures.append(Figure(f"agent CPU at {rate:,.0f} new flows/s", "% of a core", loaded, baseline=idle,
                                      baseline_name="same agent, idle", goal=Goal("<=", GOAL_PCT),
                                      note=f"{seconds:g} s loaded windows vs {idle_s:g} s idle windows, alternating; "
                                           f"generator achieved {min(achieved):,.0f}–{max(achieved):,.0f} flows/s "
                                           f"(UDP request+reply from a new port each: 4 flow records per flow "
                                           f"across the two observed veths)",
                                      fix=FIX))
            res.figures.append(Figure("server CPU meanwhile (info)", "% of a core", srv_loaded,
                                      note="flowscope server + writer process, storing what the agent ships"))
            if opts.profile and not opts.quick and res.unmet():
                spy = SpyRecorder(agent.pid, 10, opts.profiles() / "agent_cpu-agent.txt",
                                  f"the agent at {rate:,.0f} new flows/s")
                client.exec([sys.executable, "-m", "bench.agent_cpu", "gen", server.ipv4, str(PORT), str(rate), "11"],
                            timeout=80)
                res.profiles.append(spy.finish())
        finally:
            report = agent.stop() if agent is not None else {}
            res.details["agent_report"] = report
            try:
                res.details["server_status"] = {k: v for k, v in srv.status().items() if k in ("num_flows", "lost_events")}
            except Exception as e:  # noqa: BLE001 - informational
                res.details["server_status"] = str(e)
            srv.stop()
    if report:
        res.notes.append(f"Agent exit report: {report.get('agent', {}).get('events', 0):,} kernel events received, "
                         f"{report.get('agent', {}).get('flows', 0):,} flow records, "
                         f"{report.get('shipper', {}).get('shipped', 0):,} shipped; server stored "
                         f"{res.details['server_status'].get('num_flows', '?') if isinstance(res.details['server_status'], dict) else '?'}.")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return res


FIX = ("each new UDP flow is 4 kernel events (request and reply at both veths); per event the agent reads "
       "the ring (mmap, no callback), unpacks it and copies a per-address template record (~4-5 us on a quiet "
       "core), and the shipper thread encodes and posts it (~1-2 us). The idle cost (interface refresh via "
       "if_nameindex, loss counters, 15 s map scans) is ~0.3-0.5 %. What would close the rest: skip the Flow "
       "objects on the shipping path (render each event's JSON from a per-flow byte template: ~2 us instead "
       "of ~6 us build+encode), or report one record per flow direction instead of one per interface.")


def _tree(pid: int) -> float:
    from bench.harness import tree_cpu_seconds

    return tree_cpu_seconds(pid)


def main(argv: list[str] | None = None) -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "sink":
        sink(int(sys.argv[2]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "gen":
        generate(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--seconds", type=float, default=0)
    ap.add_argument("--reps", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    r = bench(BenchOptions(quick=args.quick, reps=args.reps, seconds=args.seconds, profile=False), rate=args.rate)
    return print_result(r)


if __name__ == "__main__":
    raise SystemExit(main())
