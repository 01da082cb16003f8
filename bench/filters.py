"""How fast FilterSet.match runs over flows (it runs for every flow of every query and stream).

    .venv/bin/python bench/filters.py [--flows N]

Prints flows/s per filter set and the ratio to a bare loop (a predicate that returns True), so
the cost of each kind of filter is visible independently of the machine's speed.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flowscope import schema  # noqa: E402
from flowscope.filters import FilterSet, FlowFilter  # noqa: E402


def make_flows(n: int, seed: int = 1) -> list[schema.Flow]:
    rnd = random.Random(seed)
    pods = [("default", "frontend-7c9"), ("shop", "api-5d4"), ("shop", "db-0"), ("kube-system", "coredns-x")]
    flows = []
    for i in range(n):
        (sns, spod), (dns_, dpod) = rnd.sample(pods, 2)
        proto = rnd.random()
        obj: dict = {
            "time": schema.format_timestamp(1_700_000_000_000_000_000 + i * 1_000_000),
            "verdict": "DROPPED" if rnd.random() < 0.1 else "FORWARDED",
            "IP": {"source": f"10.0.{rnd.randrange(4)}.{rnd.randrange(1, 250)}",
                   "destination": f"10.0.{rnd.randrange(4)}.{rnd.randrange(1, 250)}", "ipVersion": "IPv4"},
            "source": {"identity": 1000 + rnd.randrange(50), "namespace": sns, "pod_name": spod,
                       "labels": [f"k8s:app={spod.split('-')[0]}", f"k8s:io.kubernetes.pod.namespace={sns}"]},
            "destination": {"identity": 1000 + rnd.randrange(50), "namespace": dns_, "pod_name": dpod,
                            "labels": [f"k8s:app={dpod.split('-')[0]}", f"k8s:io.kubernetes.pod.namespace={dns_}"]},
            "node_name": f"node-{rnd.randrange(3)}",
            "event_type": {"type": 4, "sub_type": 0},
            "traffic_direction": rnd.choice(["INGRESS", "EGRESS"]),
            "is_reply": rnd.random() < 0.5,
        }
        if proto < 0.6:
            obj["l4"] = {"TCP": {"source_port": rnd.randrange(30000, 60000), "destination_port": rnd.choice([80, 443, 5432]),
                                 "flags": {"SYN": True} if rnd.random() < 0.3 else {"ACK": True}}}
        elif proto < 0.9:
            obj["l4"] = {"UDP": {"source_port": rnd.randrange(30000, 60000), "destination_port": 53}}
        else:
            obj["l4"] = {"ICMPv4": {"type": 8}}
        if rnd.random() < 0.2:
            obj["l7"] = {"type": "REQUEST", "http": {"method": rnd.choice(["GET", "POST"]),
                                                     "url": f"http://api/users/{rnd.randrange(100)}", "protocol": "HTTP/1.1"}}
            obj["event_type"] = {"type": 129}
        flows.append(schema.load_flow(obj))
    return flows


CASES = {
    "no filter": FilterSet(),
    "verdict=DROPPED": FilterSet([FlowFilter(verdict=["DROPPED"])]),
    "--ip 10.0.1.0/24 (2 filters, CIDR)": FilterSet([FlowFilter(source_ip=["10.0.1.0/24"]),
                                                     FlowFilter(destination_ip=["10.0.1.0/24"])]),
    "--to-pod shop/api --to-port 80": FilterSet([FlowFilter(destination_pod=["shop/api"], destination_port=["80"])]),
    "label selector app in (api,db)": FilterSet([FlowFilter(source_label=["app in (api,db)"])]),
    "http_path regex": FilterSet([FlowFilter(http_path=[r"^/users/\d+$"])]),
    "node glob + fqdn-ish + tcp SYN": FilterSet([FlowFilter(node_name=["node-*"], tcp_flags=[schema.TCPFlags(SYN=True)])]),
    "denylist: not udp, not DROPPED": FilterSet(blacklist=[FlowFilter(protocol=["udp"]), FlowFilter(verdict=["DROPPED"])]),
    "6 fields AND": FilterSet([FlowFilter(verdict=["FORWARDED"], source_ip=["10.0.0.0/16"], protocol=["tcp"],
                                          destination_port=["80", "443"], traffic_direction=["EGRESS"],
                                          source_label=["app"])]),
}


def bench(match, flows, min_seconds: float = 0.3) -> tuple[float, int]:
    rounds = 0
    kept = 0
    start = time.perf_counter()
    while True:
        kept = 0
        for f in flows:
            if match(f):
                kept += 1
        rounds += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return rounds * len(flows) / elapsed, kept


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flows", type=int, default=20000)
    args = ap.parse_args()
    flows = make_flows(args.flows)
    base_rate, _ = bench(lambda f: True, flows)
    print(f"{len(flows)} flows; bare loop {base_rate / 1e6:.2f} M flows/s")
    print(f"{'filter':42} {'flows/s':>12} {'vs bare':>8} {'kept':>7}")
    for name, fs in CASES.items():
        rate, kept = bench(fs.match, flows)
        print(f"{name:42} {rate:12,.0f} {rate / base_rate:8.2f} {kept / len(flows):7.1%}")
    fs = CASES["6 fields AND"]
    start = time.perf_counter()
    fs.match_many(flows)
    print(f"match_many (6 fields AND): {len(flows) / (time.perf_counter() - start):,.0f} flows/s")
    bench_observe_input(flows)


def bench_observe_input(flows: list[schema.Flow]) -> None:
    """`flowscope observe --input-file`: JSON line -> envelope -> Flow -> filter -> printed line."""
    import io

    from flowscope.observe import _Sink, build_query, run_input
    from flowscope.printer import Printer

    lines = [schema.flow_envelope_json(f) + b"\n" for f in flows]
    print(f"\nobserve --input-file over {len(lines)} JSON lines:")
    for label, args, output in (("-o jsonpb, no filter", [], "jsonpb"), ("-o compact, no filter", [], "compact"),
                                ("-o compact, --verdict DROPPED", [("verdict", "DROPPED")], "compact"),
                                ("-o compact, --ip 10.0.1.0/24", [("ip", "10.0.1.0/24")], "compact")):
        query = build_query(args, offline=True)
        out = io.StringIO()
        start = time.perf_counter()
        run_input(iter(lines), query, _Sink(Printer(output, out=out), io.StringIO()))
        elapsed = time.perf_counter() - start
        print(f"  {label:36} {len(lines) / elapsed:12,.0f} lines/s  ({out.getvalue().count(chr(10)):,} printed)")


if __name__ == "__main__":
    main()
