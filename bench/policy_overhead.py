"""Policy enforcement overhead on a veth pair, and how fast a policy change reaches the kernel.

    sudo .venv/bin/python -m bench.policy_overhead [--reps 5] [--seconds 3] [--policies 1000] [--udp]

Throughput, interleaved in one run (bench.common.interleave), three variants:
  * nothing   no tc program on the interfaces;
  * probe     the tc probe and the agent's drain loop (flows built, shipping replaced by a counter),
              no policy (the policy maps are empty);
  * enforce   the same plus 1,000 policies in the maps (998 generated ones over 300 synthetic endpoints,
              ~11k entries, and 2 that put both bench endpoints under policy and allow the bench traffic):
              every new connection is looked up (egress at the client, ingress at the server).
Workloads: TCP one stream (iperf3), new TCP connections/s (bench.connrate), optionally 64-byte UDP pps.
Also: BPF run time per program run (kernel.bpf_stats_enabled, restored afterwards) for probe vs enforce.

Update latency through the real path: ``POST /api/v1/policies`` on a real server (subprocess) -> the
agent's PolicySync (long poll) -> compile -> BPF maps; measured from the HTTP answer until the kernel's
LPM map answers with the new entry (polled every 2 ms): the initial load of 1,000 policies, a one-policy
change (median of several), and a change of all 1,000 at once.
Goals (issue 4): throughput ratio >= 0.95 vs nothing; policy update to kernel <= 1 s for 1,000 rules.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import interleave, machine_facts, print_table, summary, sysctl, write_json
from bench.policy_compile import make_endpoints, make_policies
from bench.probe_overhead import ProbeRunner, conn_rate, iperf_tcp, iperf_udp
from enforcer.compiler import EndpointInfo, compile_policies
from enforcer.identity import endpoint_labels
from enforcer.policy import load_policies
from flowscope.endpoints import EndpointRecord, EndpointStore
from flowscope.netlab import Lab

BENCH_NS = "bench"


def bench_policies(client_app: str = "bench-client", server_app: str = "bench-server", port_shift: int = 0) -> list[dict]:
    ports = [{"port": str(5201 + port_shift), "protocol": "TCP"}, {"port": str(7000 + port_shift), "protocol": "TCP"},
             {"port": str(5201 + port_shift), "protocol": "UDP"}]
    return [
        {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
         "metadata": {"name": "bench-server-in", "namespace": BENCH_NS},
         "spec": {"endpointSelector": {"matchLabels": {"app": server_app}},
                  "ingress": [{"fromEndpoints": [{"matchLabels": {"app": client_app}}], "toPorts": [{"ports": ports}]}]}},
        {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
         "metadata": {"name": "bench-client-out", "namespace": BENCH_NS},
         "spec": {"endpointSelector": {"matchLabels": {"app": client_app}},
                  "egress": [{"toEndpoints": [{"matchLabels": {"app": server_app}}], "toPorts": [{"ports": ports}]}]}},
    ]


def policy_docs(n: int, shift: int = 0) -> list[dict]:
    docs = make_policies(max(0, n - 2))
    if shift:
        for d in docs:
            for rule in d["spec"].get("ingress", []) + d["spec"].get("egress", []):
                for pr in rule.get("toPorts", []):
                    for p in pr["ports"]:
                        p["port"] = str((int(p["port"]) + shift) % 60000 + 1)
                        p.pop("endPort", None)
    return docs + bench_policies(port_shift=shift)


def bpf_cost(seconds: float, workload) -> dict:
    with sysctl("kernel.bpf_stats_enabled", "1"):
        def read():
            out = subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True).stdout
            progs = [p for p in json.loads(out) if p.get("name", "").startswith("fs_")]
            return sum(p.get("run_time_ns", 0) for p in progs), sum(p.get("run_cnt", 0) for p in progs)

        t0, c0 = read()
        workload()
        t1, c1 = read()
    return {"ns_per_run": (t1 - t0) / max(1, c1 - c0), "runs": c1 - c0}


# --------------------------------------------------------------------------------------------
# Throughput
# --------------------------------------------------------------------------------------------


def throughput(args, lab, client, server, results) -> None:
    from enforcer.datapath import PolicyMaps
    from enforcer.sync import PolicyNamesTable, default_deny_map

    synthetic = [EndpointInfo(identity=e.identity, labels=e.labels, ips=e.ips, name=e.name, ifindex=0)
                 for e in make_endpoints(300)]
    mine = [EndpointInfo(identity=60000, labels=endpoint_labels(BENCH_NS, {"app": "bench-client"}),
                         ips=(client.ipv4,), name="bench/client", ifindex=client.ifindex),
            EndpointInfo(identity=60001, labels=endpoint_labels(BENCH_NS, {"app": "bench-server"}),
                         ips=(server.ipv4,), name="bench/server", ifindex=server.ifindex)]
    t0 = time.perf_counter()
    policies = load_policies(json.dumps(policy_docs(args.policies)))
    compiled = compile_policies(policies, synthetic + mine, host_ips=["169.254.1.1"])
    print(f"{len(policies)} policies -> {len(compiled.entries)} policy entries, {len(compiled.ipcache)} ipcache "
          f"prefixes (validate+compile {time.perf_counter() - t0:.2f} s)")
    results["policy_set"] = {"policies": len(policies), **compiled.stats()}

    runner = ProbeRunner([client.host_if, server.host_if])
    maps = PolicyMaps.from_datapath(runner.agent.dp)
    ids = {(r.namespace, r.name): r.id for r in compiled.policies}
    names = PolicyNamesTable({r.id: r for r in compiled.policies}, {e.ifindex: e.identity for e in mine},
                             default_deny_map(policies, synthetic + mine, ids))
    loads = []
    try:
        def probe_only(fn):
            def run():
                runner.attach()
                try:
                    return fn()
                finally:
                    runner.detach()
            return run

        def enforced(fn):
            def run():
                r = maps.apply(compiled)
                loads.append(r.seconds)
                runner.agent.builder.policy_names = names
                runner.attach()
                try:
                    return fn()
                finally:
                    runner.detach()
                    maps.clear()
                    runner.agent.builder.policy_names = None
            return run

        scenarios = [("tcp_1_stream", iperf_tcp, "Gbit/s"), ("tcp_conn_rate", conn_rate, "conn/s")]
        if args.udp:
            scenarios.insert(1, ("udp_64b", iperf_udp, "pkt/s"))
        for scen, fn, unit in scenarios:
            def work(fn=fn):
                return fn(client, server.ipv4, args.seconds)

            before = sum(runner.agent.dp.read_stats()[5])
            r = interleave(args.reps, {"nothing": work, "probe": probe_only(work), "enforce": enforced(work)})
            dropped = sum(runner.agent.dp.read_stats()[5]) - before
            n, p, e = summary(r["nothing"]), summary(r["probe"]), summary(r["enforce"])
            print_table(scen, [("nothing", n, unit), ("probe", p, unit), (f"enforce ({args.policies} policies)", e, unit)],
                        baseline=n)
            print(f"  enforce vs probe: {e['median'] / p['median']:.3f}   policy drops during the runs: {dropped}")
            results["scenarios"][scen] = {"nothing": n, "probe": p, "enforce": e, "unit": unit,
                                          "probe_ratio": p["median"] / n["median"],
                                          "enforce_ratio": e["median"] / n["median"],
                                          "enforce_vs_probe": e["median"] / p["median"], "policy_drops": dropped}
        costs = {}
        for name, setup in (("probe", None), ("enforce", compiled)):
            for scen, fn in (("tcp_1_stream", iperf_tcp), ("tcp_conn_rate", conn_rate)):
                if setup is not None:
                    maps.apply(setup)
                runner.attach()
                try:
                    costs[f"{name}/{scen}"] = bpf_cost(args.seconds, lambda fn=fn: fn(client, server.ipv4, args.seconds))
                finally:
                    runner.detach()
                    if setup is not None:
                        maps.clear()
        print("\nBPF cost per program run (one run per packet per hook):")
        for k, v in costs.items():
            print(f"  {k:<28} {v['ns_per_run']:>7.0f} ns  ({v['runs']:,} runs)")
        results["bpf_cost"] = costs
        results["full_map_load_ms"] = summary([x * 1000 for x in loads])
        print(f"\nfull load of {len(compiled.entries):,} entries into the maps: median "
              f"{results['full_map_load_ms']['median']:.1f} ms")
    finally:
        runner.close()


# --------------------------------------------------------------------------------------------
# Update latency through the server
# --------------------------------------------------------------------------------------------


def update_latency(args, lab, client, server, results) -> None:
    from enforcer.client import PolicyClient
    from enforcer.datapath import PolicyMaps
    from enforcer.sync import PolicySync, SyncConfig
    from probe.agent import Agent, AgentConfig
    from bench.probe_overhead import CountingSink

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from enforcer_server import PolicyServer

    tmp = Path(tempfile.mkdtemp(prefix="policy-bench-"))
    store = EndpointStore(tmp / "state")
    for ep, app in ((client, "bench-client"), (server, "bench-server")):
        store.put(EndpointRecord(container_id=f"b-{app}", host_ifname=ep.host_if, host_ifindex=ep.ifindex,
                                 ips=[ep.ipv4], namespace=BENCH_NS, pod_name=f"{app}-0", labels={"app": app}))
    # 300 more endpoints (no interface here) that the generated policies select, as make_endpoints lays
    # them out: the compile then has the size of the throughput runs' policy set
    for i, e in enumerate(make_endpoints(300)):
        ns, app = e.name.split("/")[0], e.name.split("/")[1].rsplit("-", 1)[0]
        store.put(EndpointRecord(container_id=f"syn-{i}", ips=list(e.ips), namespace=ns, pod_name=f"{app}-{i}",
                                 labels={"app": app, "tier": "backend" if app in ("app0", "app1") else "web"}))
    with PolicyServer(tmp / "db.sqlite") as srv:
        sync = PolicySync(SyncConfig(server=srv.url, state_dir=str(tmp / "state"), long_poll_s=4))
        agent = Agent(AgentConfig(server=srv.url, state_dir=str(tmp / "state"), node_name="bench", l7=False),
                      shipper=CountingSink(), sources=[sync])
        agent.start()
        th = threading.Thread(target=agent.run, daemon=True)
        th.start()
        maps = PolicyMaps.from_datapath(agent.dp)
        admin = PolicyClient(srv.url, timeout=60)
        try:
            assert sync.wait_applied(0, timeout=30)
            ident = {e.name: e.identity for e in sync.compiled.endpoints}
            server_id, client_id = ident[f"{BENCH_NS}/bench-server-0"], ident[f"{BENCH_NS}/bench-client-0"]

            def wait_kernel(port: int, t0: float, timeout: float = 30) -> float:
                end = time.perf_counter() + timeout
                while time.perf_counter() < end:
                    if maps.lookup_policy(server_id, 0, False, client_id, 6, port) is not None:
                        return time.perf_counter() - t0
                    time.sleep(0.002)
                raise RuntimeError(f"port {port} never reached the kernel: {sync.status()}")

            def push(docs, port) -> tuple[float, float, dict]:
                """(seconds from the start of the POST until the kernel has it, seconds of the POST)."""
                body = json.dumps(docs).encode()
                t0 = time.perf_counter()
                res = admin.apply(body)
                http_s = time.perf_counter() - t0
                lat = wait_kernel(port, t0)
                sync.wait_applied(res["revision"], timeout=30)  # so that status() describes this update
                return lat, http_s, res

            lat, http_s, _ = push(policy_docs(args.policies), 5201)
            st = sync.status()
            print(f"\npolicy update -> kernel (POST /api/v1/policies on a real server -> agent long poll -> maps), "
                  f"{args.policies} policies over {st['endpoints']} endpoints:")
            print(f"  initial load: {lat * 1000:.0f} ms (the POST, validated and stored: {http_s * 1000:.0f} ms; "
                  f"agent compile {st['timings_ms']['compile']:.0f} ms, maps {st['timings_ms']['maps']:.1f} ms, "
                  f"{st['entries']:,} entries)")
            results["update"] = {"initial_load_s": lat, "initial_post_s": http_s, "initial_timings_ms": st["timings_ms"]}
            one = []
            for i in range(args.reps):
                docs = policy_docs(args.policies)
                docs[-2]["spec"]["ingress"][0]["toPorts"][0]["ports"].append({"port": str(20000 + i), "protocol": "TCP"})
                lat, _, _ = push([docs[-2]], 20000 + i)
                one.append(lat)
            st = sync.status()
            print(f"  one policy changed: median {statistics.median(one) * 1000:.0f} ms, max {max(one) * 1000:.0f} ms "
                  f"(n={len(one)}; last compile {st['timings_ms']['compile']:.0f} ms, maps {st['timings_ms']['maps']:.1f} ms, "
                  f"{sum(st['map_counts'].values())} map changes)")
            lat, http_s, _ = push(policy_docs(args.policies, shift=7), 5208)
            st = sync.status()
            print(f"  all {args.policies} changed: {lat * 1000:.0f} ms (POST {http_s * 1000:.0f} ms; "
                  f"compile {st['timings_ms']['compile']:.0f} ms, maps {st['timings_ms']['maps']:.1f} ms, "
                  f"{sum(st['map_counts'].values()):,} map changes)")
            worst = max([results["update"]["initial_load_s"], lat] + one)
            print(f"  goal <= 1 s: worst {worst:.3f} s -> {'met' if worst <= 1.0 else 'NOT met'}")
            results["update"].update({"one_change_s": summary(one), "all_changed_s": lat, "all_changed_post_s": http_s,
                                      "all_changed_timings_ms": st["timings_ms"], "worst_s": worst})
        finally:
            admin.close()
            agent.stop()
            th.join(15)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--policies", type=int, default=1000)
    ap.add_argument("--udp", action="store_true", help="also 64-byte UDP packets/s")
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()
    facts = machine_facts()
    results: dict = {"machine": facts, "args": vars(args), "scenarios": {}}
    with Lab(ipv6=False) as lab:
        client, server = lab.add("client"), lab.add("server")
        lab.spawn(server, ["iperf3", "-s", "-p", "5201"])
        lab.spawn(server, [sys.executable, "-m", "bench.connrate", "server", "7000"])
        time.sleep(1)
        if not args.skip_throughput:
            throughput(args, lab, client, server, results)
        update_latency(args, lab, client, server, results)
    print(f"\ncpu pressure avg10 at start: {facts['cpu_pressure_avg10']}%"
          + ("  (NOISY: other load on the machine)" if facts["cpu_pressure_avg10"] > 10 else ""))
    print("results:", write_json("policy_overhead", results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
