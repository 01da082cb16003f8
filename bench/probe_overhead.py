"""Probe overhead on a veth pair: throughput with and without the tc probe, interleaved, same run.

    sudo .venv/bin/python -m bench.probe_overhead [--reps 5] [--seconds 3]

Scenarios: TCP one stream (iperf3), 64-byte UDP packets/s (iperf3 -u -l 64), new TCP connections/s
(bench.connrate). The probe runs as in production: the agent's drain loop decodes every event into
flows (shipping is replaced by a counter, so the server's cost is not measured here). Also reported:
BPF run time per packet (kernel.bpf_stats_enabled, restored afterwards) and event accounting
(events submitted by the kernel = events received + events reported lost; anything else is unaccounted loss).
Goals (issue): TCP >= 0.97, UDP pps >= 0.95, conn/s >= 0.95 of no probe; no unaccounted loss.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time

from bench.common import interleave, machine_facts, print_table, summary, sysctl, write_json
from flowscope.netlab import Lab


class CountingSink:
    def __init__(self):
        self.flows = 0
        self.lost = 0
        self.stats = None

    def start(self):
        pass

    def put(self, flows):
        self.flows += len(flows)

    def report_lost(self, source, n, cpu=None):
        self.lost += n

    def close(self, deadline_s=0):
        pass


class ProbeRunner:
    """The agent (datapath + drain loop + flow building) in a background thread."""

    def __init__(self, ifaces):
        from probe.agent import Agent, AgentConfig

        self.sink = CountingSink()
        self.agent = Agent(AgentConfig(interfaces=ifaces, follow_endpoints=False, node_name="bench"),
                           shipper=self.sink)
        self.agent.start()
        self.ifaces = ifaces
        self.thread = None

    def attach(self):
        self.agent.cfg.interfaces = self.ifaces
        self.agent._refresh(force=True)
        self.agent.stop_event.clear()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        a = self.agent
        while not a.stop_event.is_set():
            a.dp.poll(a.cfg.drain_ms)
            a._process_raw()

    def detach(self):
        self.agent.stop_event.set()
        self.thread.join()
        self.agent.dp.poll(0)
        self.agent._process_raw()
        self.agent.cfg.interfaces = []
        self.agent._refresh(force=True)

    def close(self):
        self.agent.close()


def iperf_tcp(client, server_ip, seconds) -> float:
    out = client.exec(["iperf3", "-c", server_ip, "-t", str(seconds), "-J"], timeout=seconds + 30).stdout
    return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9


def iperf_udp(client, server_ip, seconds) -> float:
    out = client.exec(["iperf3", "-c", server_ip, "-u", "-b", "0", "-l", "64", "-t", str(seconds), "-J"],
                      timeout=seconds + 30).stdout
    s = json.loads(out)["end"]["sum"]
    return (s["packets"] - s["lost_packets"]) / s["seconds"]


def conn_rate(client, server_ip, seconds) -> float:
    out = client.exec([sys.executable, "-m", "bench.connrate", "client", server_ip, "7000", str(seconds)],
                      timeout=seconds + 30).stdout
    return float(out.split()[0])


def bpf_ns_per_run(seconds: float, client, server_ip) -> dict:
    with sysctl("kernel.bpf_stats_enabled", "1"):
        def read():
            out = subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True).stdout
            progs = [p for p in json.loads(out) if p.get("name", "").startswith("fs_")]
            return sum(p.get("run_time_ns", 0) for p in progs), sum(p.get("run_cnt", 0) for p in progs)

        t0, c0 = read()
        iperf_tcp(client, server_ip, seconds)
        t1, c1 = read()
    return {"ns_per_run": (t1 - t0) / max(1, c1 - c0), "runs": c1 - c0}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3)
    args = ap.parse_args()
    facts = machine_facts()
    results = {"machine": facts, "scenarios": {}}
    with Lab(ipv6=False) as lab:
        client, server = lab.add("client"), lab.add("server")
        lab.spawn(server, ["iperf3", "-s", "-p", "5201"])
        lab.spawn(server, [sys.executable, "-m", "bench.connrate", "server", "7000"])
        time.sleep(1)
        runner = ProbeRunner([client.host_if, server.host_if])
        try:
            for scen, fn, unit in (("tcp_1_stream", iperf_tcp, "Gbit/s"), ("udp_64b", iperf_udp, "pkt/s"),
                                   ("tcp_conn_rate", conn_rate, "conn/s")):
                def base():
                    return fn(client, server.ipv4, args.seconds)

                def probed():
                    runner.attach()
                    try:
                        return fn(client, server.ipv4, args.seconds)
                    finally:
                        runner.detach()

                r = interleave(args.reps, {"no probe": base, "probe": probed})
                b, p = summary(r["no probe"]), summary(r["probe"])
                print_table(f"{scen}", [("no probe", b, unit), ("probe", p, unit)], baseline=b)
                results["scenarios"][scen] = {"baseline": b, "probe": p, "ratio": p["median"] / b["median"],
                                              "unit": unit}
            runner.attach()
            try:
                cost = bpf_ns_per_run(args.seconds, client, server.ipv4)
            finally:
                runner.detach()
            print(f"\nBPF cost: {cost['ns_per_run']:.0f} ns per program run ({cost['runs']:,} runs; "
                  f"one run per packet per hook)")
            results["bpf_cost"] = cost
            from probe import events as ev

            stats = runner.agent.dp.read_stats()
            submitted = sum(stats[ev.STAT_EVENTS])
            failed = sum(stats[ev.STAT_RINGBUF_FAIL]) + sum(stats[ev.STAT_MAP_FAIL])
            received = runner.agent.stats.events
            print(f"events: kernel submitted {submitted:,}, agent received {received:,}, reported lost {failed:,};"
                  f" unaccounted {submitted - received:,}")
            results["events"] = {"submitted": submitted, "received": received, "reported_lost": failed,
                                 "unaccounted": submitted - received}
        finally:
            runner.close()
    print(f"\ncpu pressure avg10 at start: {facts['cpu_pressure_avg10']}%"
          + ("  (NOISY: other load on the machine)" if facts["cpu_pressure_avg10"] > 10 else ""))
    print("results:", write_json("probe_overhead", results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
