"""What alerts, /metrics counting and the file export add to ingest, per flow (no timing asserts anywhere).

``.venv/bin/python -m bench.alerts_overhead [--flows N] [--reps R]``

Per committed batch the server runs, in the writer thread, ``FlowMetrics.observe_batches``, the alert
rules' ``offer`` (filter + window) and, when enabled, ``FlowExporter.write_batches``. This measures each
on a realistic mix of flows (already decoded and prepared: the work that ingest does anyway is the
baseline, ``prepare_batch``), interleaved, and prints ns per flow and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from api.alerts.engine import RuleEvaluator
from api.alerts.rules import load_rules
from api.metrics import FlowMetrics
from api.store import prepare_batch
from bench.common import interleave, machine_facts, summary
from flowscope import schema
from flowscope.export import ExportConfig, FlowExporter

RULES = """
name: drops
filter: {verdict: [DROPPED]}
condition: {count_over: 100, window: 1m}
group_by: [source_namespace, destination_namespace]
---
name: api-5xx
filter: {to_label: ["app=api"], protocol: [http]}
condition: {ratio_over: 0.05, of: {http_status: ["5+"]}, window: 5m}
---
name: latency
filter: {protocol: [http]}
condition: {p95_latency_ms_over: 250, window: 5m}
---
name: edges
condition: {new_edge: true}
---
name: world-443
filter: {to_label: ["reserved:world"], to_port: ["443"]}
condition: {count_over: 0}
"""


def flows(n: int) -> list[schema.Flow]:
    now = time.time_ns()
    out = []
    for i in range(n):
        d = {"time": schema.format_timestamp(now + i * 1000), "verdict": "DROPPED" if i % 10 == 0 else "FORWARDED",
             "IP": {"source": f"10.0.{i % 50}.1", "destination": "10.1.0.2", "ipVersion": "IPv4"},
             "l4": {"TCP": {"source_port": 30000 + i % 20000, "destination_port": 8080, "flags": {"SYN": True}}},
             "source": {"namespace": f"ns{i % 8}", "pod_name": f"web-{i % 20}", "labels": [f"k8s:app=web{i % 20}"]},
             "destination": {"namespace": "shop", "pod_name": "api-1", "labels": ["k8s:app=api"]},
             "Type": "L3_L4", "node_name": "n1", "traffic_direction": "EGRESS", "is_reply": i % 2 == 1,
             "event_type": {"type": 4}}
        if i % 5 == 0:
            d["Type"] = "L7"
            d["l7"] = {"type": "RESPONSE", "latency_ns": str(1_000_000 * (i % 300)),
                       "http": {"code": 503 if i % 50 == 0 else 200, "method": "GET", "url": "http://api/x",
                                "protocol": "HTTP/1.1"}}
        out.append(schema.load_flow(d))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flows", type=int, default=50_000)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    fl = flows(args.flows)
    batch_size = 1000
    rules = load_rules(RULES)
    tmp = tempfile.mkdtemp()
    exporter = FlowExporter(ExportConfig(path=os.path.join(tmp, "flows.json"), max_size_mb=64, max_backups=1))

    def batches() -> list:
        out = []
        for k in range(0, len(fl), batch_size):
            b = prepare_batch(list(fl[k:k + batch_size]), node_name="n1")
            b.first_id = k + 1
            out.append(b)
        return out

    prepared = batches()

    def per_flow(fn) -> float:
        t0 = time.perf_counter_ns()
        fn()
        return (time.perf_counter_ns() - t0) / len(fl)

    def baseline() -> float:
        return per_flow(batches)

    def metrics() -> float:
        m = FlowMetrics()
        return per_flow(lambda: m.observe_batches(prepared))

    def alerts() -> float:
        evs = [RuleEvaluator(r) for r in rules]
        now = time.time_ns()

        def run() -> None:
            for b in prepared:
                for it in b.live_items():
                    for ev in evs:
                        ev.offer(it.flow, it.time_ns, now, it.body)
            for ev in evs:
                ev.evaluate(now)
        return per_flow(run)

    def export() -> float:
        return per_flow(lambda: exporter.write_batches(prepared))

    res = interleave(args.reps, {"prepare_batch (baseline)": baseline, "metrics": metrics,
                                 f"alerts ({len(rules)} rules)": alerts, "export": export})
    base = summary(res["prepare_batch (baseline)"])["median"]
    print(f"machine: {machine_facts()}")
    print(f"{args.flows} flows, batches of {batch_size}, {args.reps} interleaved repetitions; ns per flow (median)")
    for name, vals in res.items():
        med = summary(vals)["median"]
        print(f"  {name:28s} {med:8.0f} ns/flow   {med / base:5.2f}x of prepare_batch   "
              f"(~{1e9 / med:,.0f} flows/s on one core)")
    exporter.close()


if __name__ == "__main__":
    main()
