"""``make bench``: every scenario of issue 10, the same-run baselines, the goals, one results table.

    sudo .venv/bin/python -m bench.run [--quick] [--only NAME[,NAME]] [--no-profile] [--out-dir DIR] [--list]

Each scenario is also runnable alone (``python -m bench.<module>``). The runner records, around every
scenario, the CPU pressure (/proc/pressure/cpu avg10 before and after) and the CPU used by processes
outside the benchmark (other engineers' tests on a shared machine), and flags the scenario as noisy when
the machine was busy with something else. Results: ``bench/results/<date>.md`` and ``.json`` for a full
run, ``bench/results/partial/<date>-<time>-<what>.md|json`` for ``--quick`` or ``--only`` runs (not
committed). When a goal is not met, the scenario profiles the process that spends the time in one extra,
unmeasured repetition (py-spy or cProfile) and the results say where the time goes and what would close
the gap. Exit status: 0 when every scenario ran (met or not: this is a benchmark, not a test), 1 when a
scenario failed to run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench.harness import (RESULTS_DIR, BenchOptions, ForeignLoad, SpyRecorder, cpu_pressure, machine_facts,
                           quiet_pressure)
from bench.report import Figure, Goal, ScenarioResult, load_verdict, render_markdown, render_table, to_json


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    fn: Callable[[BenchOptions], ScenarioResult]
    root: bool = True
    what: str = ""


# --------------------------------------------------------------------------------------------
# Adapters for the benchmarks that existed before the harness
# --------------------------------------------------------------------------------------------


def scenario_probe(opts: BenchOptions) -> ScenarioResult:
    from bench import probe_overhead as po

    reps, seconds = opts.pick_reps(), opts.pick_seconds(3, 1.5)
    r = po.run(reps, seconds, log=None)
    res = ScenarioResult("probe", "Probe on a veth pair", details={k: v for k, v in r.items() if k != "scenarios"})
    goals = {"tcp_1_stream": ("TCP, 1 stream (iperf3)", 0.97), "udp_64b": ("UDP, 64-byte packets/s (iperf3)", 0.95),
             "tcp_conn_rate": ("new TCP connections/s", 0.95)}
    fixes = {
        "tcp_1_stream": "the tc program runs per skb on both hooks of both veths; with GRO/GSO the stream is "
                        "~50-75k skbs/s, so the program cost is small: a shortfall here comes from the agent's "
                        "drain thread competing for the 2 cores (see the profile) or from noise.",
        "udp_64b": "every 64-byte packet runs the program on 4 hooks (both veths, ingress+egress): the per-packet "
                   "cost is the flow-map lookup + 2 atomics; cut it with a per-CPU flow map (no atomics) or by "
                   "attaching only at one observation point per pair.",
        "tcp_conn_rate": "each connection creates 4 flow entries and ~12 state-change events (new/flags/close per "
                         "direction and interface): fewer events per connection (--monitor-aggregation-flags "
                         "syn,fin,rst) and a cheaper decode in the agent (see its profile) are the levers.",
    }
    for key, (label, goal) in goals.items():
        sc = r["scenarios"][key]
        res.figures.append(Figure(label, sc["unit"], sc["samples"]["probe"], baseline=sc["samples"]["no probe"],
                                  baseline_name="no probe", goal=Goal(">=", goal, on="ratio"), fix=fixes[key],
                                  note=f"{seconds:g} s per repetition; the probe with the agent's drain loop and "
                                       f"flow building in-process (shipping replaced by a counter)"))
    ev = r["events"]
    res.figures.append(Figure("events unaccounted (kernel ring accepted − agent received)", "events",
                              [ev["unaccounted"]], goal=Goal("<=", 0),
                              note=f"over all repetitions: ring accepted {ev['submitted']:,}, agent received "
                                   f"{ev['received']:,}, reported lost (failed submits / map inserts) "
                                   f"{ev['reported_lost']:,}"))
    if opts.profile and not opts.quick and res.unmet():
        res.profiles.append(_profile_probe(opts, seconds))
    return res


def _profile_probe(opts: BenchOptions, seconds: float):
    """py-spy of this process (the in-process agent) during one probed connection-rate repetition."""
    from bench import probe_overhead as po

    with po.probe_lab() as (client, server, runner):
        runner.attach()
        try:
            spy = SpyRecorder(os.getpid(), max(2.0, seconds), opts.profiles() / "probe-agent.txt",
                              "the agent's drain loop (in the benchmark process) during new TCP connections/s")
            po.conn_rate(client, server.ipv4, max(2.0, seconds))
            return spy.finish()
        finally:
            runner.detach()


def scenario_bpf(opts: BenchOptions) -> ScenarioResult:
    from bench import bpf_cost, probe_overhead as po

    reps = opts.pick_reps()
    res = ScenarioResult("bpf_cost", "BPF cost per packet")
    traffic = po.bpf_in_traffic(reps, opts.pick_seconds(2, 1))
    labels = {"tcp_1_stream": "in traffic: TCP stream (established fast path)",
              "udp_64b": "in traffic: 64-byte UDP (one flow update per packet)",
              "tcp_conn_rate": "in traffic: new connections (state-change events)"}
    for key, label in labels.items():
        res.figures.append(Figure(label, "ns/run", traffic["ns_per_run"][key], goal=Goal("<=", 100),
                                  note=f"kernel.bpf_stats_enabled (restored afterwards): run_time_ns / run_cnt of "
                                       f"this run's two programs, {traffic['runs'][key]:,} runs",
                                  fix="in real traffic the program pays cache misses on the flow map and the skb, "
                                      "plus bpf_stats' own clock reads; a per-CPU map and fewer reverse-key lookups "
                                      "(only on events) would shave the rest."))
    tr = bpf_cost.measure(repeat=200_000 if opts.quick else 2_000_000, rounds=reps)
    runs = tr["runs"]
    net_est = [p - e for p, e in zip(runs["established/ingress"], runs["established/empty"])]
    net_new = [p - tr["median_ns"]["new/empty"] for p in runs["new/ingress"]]
    res.figures.append(Figure("BPF_PROG_TEST_RUN: established TCP, minus an empty program", "ns/run", net_est,
                              goal=Goal("<=", 100),
                              note=f"{tr['repeat']:,} runs per repetition on one hot packet; an empty SCHED_CLS "
                                   f"program costs {tr['median_ns']['established/empty']} ns per run in the same "
                                   f"loop (subtracted)"))
    res.figures.append(Figure("BPF_PROG_TEST_RUN: new flow (SYN, entry + ring-buffer event), minus empty", "ns/run",
                              net_new, note=f"one run per flow, {tr['new_flows']} flows; the slow path taken once "
                                            f"per flow direction and interface"))
    res.notes.append("Two views of the same cost: bpf_stats measures the programs in real traffic (cold caches, "
                     "the real mix of fast path and state changes, and the stats' own two clock reads per run); "
                     "BPF_PROG_TEST_RUN loops the program over one hot packet and, minus an empty program's "
                     "figure, isolates the instructions themselves. The first is what packets pay; the second "
                     "is the floor.")
    ev = traffic["events"]
    res.details = {"bpf_stats": traffic, "test_run": tr}
    res.notes.append(f"Event audit over this traffic: ring accepted {ev['submitted']:,}, agent received "
                     f"{ev['received']:,}, reported lost {ev['reported_lost']:,}, unaccounted {ev['unaccounted']:,}.")
    return res


def scenario_ingest(opts: BenchOptions) -> ScenarioResult:
    from bench import ingest, pg_copy

    reps = opts.pick_reps()
    flows = 10_000 if opts.quick else 60_000
    res = ScenarioResult("ingest", "Ingest through the API")
    r = ingest.measure(flows=flows, reps=reps, log=lambda m: None)
    note = f"{flows:,} flows per repetition in 1,000-flow POSTs over 4 connections, answered after commit"
    res.figures.append(Figure("HTTP API into SQLite", "flows/s", r["api"], baseline=r["raw"],
                              baseline_name="raw sqlite3 executemany", goal=Goal(">=", 50_000), note=note,
                              fix="see the server profile: decoding, row preparation and the writer process "
                                  "share 2 cores with the client."))
    res.figures.append(Figure("HTTP API / raw sqlite3 executemany", "flows/s", r["api"], baseline=r["raw"],
                              baseline_name="raw sqlite3 executemany", goal=Goal(">=", 0.4, on="ratio"),
                              fix="the raw baseline only inserts ready-made rows on one core; the API also "
                                  "decodes JSON, prepares rows and ships them to the writer process."))
    if opts.profile and not opts.quick and res.unmet():
        res.profiles.append(_profile_ingest(opts, flows))
    try:
        pg = pg_copy.measure(flows=5_000 if opts.quick else 20_000, reps=reps,
                             profile_out=(opts.profiles() / "pg_copy.pstats") if (opts.profile and not opts.quick) else None)
    except Exception as e:  # noqa: BLE001 - PostgreSQL missing or failing must not hide the SQLite figures
        res.notes.append(f"PostgreSQL COPY vs executemany not measured: {type(e).__name__}: {e}")
    else:
        s = pg["samples"]
        res.figures.append(Figure("PostgreSQL: store COPY path", "flows/s", s["copy"], baseline=s["executemany"],
                                  baseline_name="psycopg executemany", goal=Goal(">=", 5.0, on="ratio"),
                                  note=f"PostgreSQL {pg['server_version']} (private cluster, fsync off); "
                                       f"{pg['flows']:,} flows per repetition, 1,000 per transaction, "
                                       "FlowStore.write_batches vs executemany of the store's INSERT",
                                  fix=pg.get("fix", "")))
        if pg.get("profile") is not None and res.figures[-1] in res.unmet():
            res.profiles.append(pg["profile"])
    return res


def _profile_ingest(opts: BenchOptions, flows: int):
    import asyncio
    import tempfile

    from bench import ingest

    with tempfile.TemporaryDirectory(prefix="flowscope-bench-prof-") as tmp:
        srv = ingest.Server(f"sqlite:///{tmp}/api.db", writer_process=True)
        try:
            work = ingest.Workload(flows * 2, 1000)
            ingest.api_rate(srv.url, ingest.Workload(5000, 1000), 4)
            bodies, _ = work.batches()
            spy = SpyRecorder(srv.proc.pid, 3, opts.profiles() / "ingest-server.txt",
                              "the API server and its writer process during ingest", subprocesses=True)
            asyncio.run(ingest._post_all(srv.url, bodies, 4))
            return spy.finish()
        finally:
            srv.stop()


def scenario_ws(opts: BenchOptions) -> ScenarioResult:
    """The dashboard's live websocket (bench.ui_stream's phases: 5 clients on /api/v1/dashboard/live while
    flows are ingested as fast as the server takes them) and Hubble's flow stream (bench.ws_fanout)."""
    import tempfile

    from bench import ingest, ui_stream, ws_fanout
    from bench.common import interleave
    from flowscope import schema

    reps, seconds, clients = opts.pick_reps(), opts.pick_seconds(8, 3), 5
    res = ScenarioResult("ws_fanout", "Websocket fan-out")
    flows = ui_stream.make_flows(20 * 1000, 500)
    bodies = [schema.encode({"node_name": "bench-node", "flows": flows[i:i + 1000]}) for i in range(0, len(flows), 1000)]
    runs: dict[str, list[dict]] = {"none": [], "clients": []}
    with tempfile.TemporaryDirectory(prefix="flowscope-bench-ui-") as d:
        server = ingest.Server(f"sqlite:///{d}/flows.db", writer_process=True)
        try:
            def phase(kind: str) -> Callable[[], float]:
                def run() -> float:
                    r = ui_stream.run_phase(server, bodies, 1000, seconds, clients if kind == "clients" else 0, 4)
                    runs[kind].append(r)
                    return r["ingest"]
                return run

            interleave(reps, {"none": phase("none"), "clients": phase("clients")})
            deliv = [r["delivered"] for r in runs["clients"]]
            res.figures.append(Figure(f"dashboard live view: flows/s delivered to {clients} clients", "flows/s", deliv,
                                      goal=Goal(">=", 100_000),
                                      note="bench.ui_stream: /api/v1/dashboard/live, flows accounted in the map deltas "
                                           "the clients receive, summed over the clients; 500 endpoints",
                                      fix="see the server profile: the live aggregation runs once per distinct filter "
                                          "in the API process, sharing its core with ingest."))
            res.figures.append(Figure("dashboard live view: most messages to one client in 1 s (info)", "msgs",
                                      [r["max_msgs_in_1s"] for r in runs["clients"]],
                                      note="issue 6 allows <= 20"))
            res.figures.append(Figure("ingest with 5 dashboard clients (info)", "flows/s",
                                      [r["ingest"] for r in runs["clients"]], baseline=[r["ingest"] for r in runs["none"]],
                                      baseline_name="no clients"))
            if opts.profile and not opts.quick and res.unmet():
                spy = SpyRecorder(server.proc.pid, seconds, opts.profiles() / "ui_stream-server.txt",
                                  "the server with 5 dashboard clients", subprocesses=True)
                ui_stream.run_phase(server, bodies, 1000, seconds, clients, 4)
                res.profiles.append(spy.finish())
        finally:
            server.stop()
    res.details["ui_stream"] = runs
    hub = ws_fanout.bench(opts, clients=clients)
    for f in hub.figures:
        f.name = "Hubble flow stream: " + f.name
    res.figures += hub.figures
    res.profiles += hub.profiles
    res.details["flow_stream"] = hub.details
    return res


def _lazy(module: str) -> Callable[[BenchOptions], ScenarioResult]:
    def run(opts: BenchOptions) -> ScenarioResult:
        import importlib

        return importlib.import_module(f"bench.{module}").bench(opts)
    return run


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("probe", "Probe on a veth pair", scenario_probe,
             what="TCP 1 stream / 64-byte UDP pps / new connections/s, probe vs no probe"),
    Scenario("bpf_cost", "BPF cost per packet", scenario_bpf, what="bpf_stats in traffic; BPF_PROG_TEST_RUN"),
    Scenario("whole_stack", "Whole stack under iperf3", _lazy("whole_stack"),
             what="probe, enforcer (1,000 rules), L7, agent, server, SQLite, dashboard client vs nothing"),
    Scenario("churn", "Connection churn", _lazy("churn"), what="max-rate connections, with Flowscope vs without"),
    Scenario("map_drain", "Flow map drain", _lazy("map_drain"), what="65,536 entries, batched vs key by key"),
    Scenario("ingest", "Ingest through the API", scenario_ingest, root=False,
             what="HTTP API into SQLite vs raw executemany; PostgreSQL COPY vs executemany"),
    Scenario("query", "Query over 10 million flows", _lazy("query"), root=False,
             what="last 5 min of one pod, top talkers of the last hour"),
    Scenario("ws_fanout", "Websocket fan-out", scenario_ws, root=False,
             what="5 clients on the dashboard's live view and on Hubble's flow stream, under full ingest"),
    Scenario("agent_cpu", "Agent CPU at 1,000 new flows/s", _lazy("agent_cpu"), what="real agent, lab veths"),
)}


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def run_scenario(sc: Scenario, opts: BenchOptions, log=print) -> ScenarioResult:
    """Run one scenario with load accounting around it; a failure becomes ``error``, never an exception."""
    log(f"== {sc.name}: {sc.what or sc.title}", flush=True)
    if sc.root and os.geteuid() != 0:
        r = ScenarioResult(sc.name, sc.title, error="needs root (network namespaces, BPF): run with sudo")
        r.load = load_verdict(cpu_pressure(), cpu_pressure(), None)
        return r
    before = quiet_pressure(3.0)  # the others' load now (avg10 would still hold the previous scenario's own)
    foreign = ForeignLoad().start()
    t0 = time.monotonic()
    try:
        r = sc.fn(opts)
    except Exception:  # noqa: BLE001 - reported in the results, the other scenarios still run
        r = ScenarioResult(sc.name, sc.title, error=traceback.format_exc(limit=8))
    r.seconds = time.monotonic() - t0
    other = foreign.stop()
    r.title = r.title or sc.title
    r.load = dict(load_verdict(before, cpu_pressure(), other["foreign_cores"]),
                  kernel_thread_cores=other["kernel_thread_cores"], top_foreign=other["top_foreign"])
    if r.noisy and other["top_foreign"]:
        r.load["reasons"] = r.load["reasons"] + [f"busiest: {', '.join(other['top_foreign'])}"]
    state = "FAILED" if r.error else ("noisy" if r.noisy else "ok")
    log(f"   {state} in {r.seconds:.0f} s" + (f": {r.error.strip().splitlines()[-1]}" if r.error else ""), flush=True)
    return r


def output_paths(results_dir: Path, partial: bool, names: list[str], quick: bool) -> tuple[Path, Path]:
    day = time.strftime("%Y-%m-%d")
    if not partial:
        base = results_dir / day
    else:
        what = ("quick-" if quick else "") + ("-".join(names) if len(names) <= 3 else f"{len(names)}-scenarios")
        base = results_dir / "partial" / f"{day}-{time.strftime('%H%M%S')}-{what}"
    base.parent.mkdir(parents=True, exist_ok=True)
    return base.with_suffix(".md"), base.with_suffix(".json")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer and shorter repetitions: a smoke check")
    ap.add_argument("--only", default="", metavar="NAME[,NAME]", help="run only these scenarios")
    ap.add_argument("--no-profile", action="store_true", help="do not profile goals that are not met")
    ap.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="results directory (default bench/results)")
    ap.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = ap.parse_args(argv)
    if args.list:
        for s in SCENARIOS.values():
            print(f"{s.name:<12} {s.title}: {s.what}{'' if s.root else ' (no root needed)'}")
        return 0
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    partial = bool(args.only) or args.quick
    out_dir = args.out_dir
    md_path, json_path = output_paths(out_dir, partial, names, args.quick)
    opts = BenchOptions(quick=args.quick, profile=not args.no_profile, results_dir=out_dir,
                        profile_dir=out_dir / ("partial/profiles" if partial else f"profiles/{md_path.stem}"))
    os.chdir(Path(__file__).resolve().parent.parent)  # bench modules start servers relative to the repo
    machine = machine_facts()
    print(f"Flowscope benchmarks ({'quick' if args.quick else 'full'}): {', '.join(names)}", flush=True)
    results = [run_scenario(SCENARIOS[n], opts) for n in names]
    mode = "quick" if args.quick else "full"
    command = "python -m bench.run" + (" --quick" if args.quick else "") + (f" --only {args.only}" if args.only else "")
    md_path.write_text(render_markdown(results, machine, mode=mode, command=command))
    json_path.write_text(json.dumps(to_json(results, machine, mode), indent=1, default=str))
    print()
    print(render_table(results))
    print(f"\nresults: {md_path}\n         {json_path}")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
