"""Policy core speed: validate and compile 1,000 rules, recompile after a change, decide in Python.

Run: ``.venv/bin/python -m bench.policy_compile [--policies 1000] [--endpoints 300] [--reps 5]``.
Prints medians (interleaved repetitions), the map sizes and the ratio to the 1 s update goal of
issue 4 (policy update to kernel <= 1 s for 1,000 rules; compile is the CPU part of that path).
``make_endpoints`` / ``make_policies`` are reusable by other benchmarks (e.g. policy_overhead).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

if __package__ in (None, ""):  # allow `python bench/policy_compile.py`
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

import yaml

from bench.common import interleave, machine_facts, print_table, summary, write_json
from enforcer.compiler import EndpointInfo, compile_policies
from enforcer.decide import decide
from enforcer.identity import endpoint_labels
from enforcer.policy import load_policies

NAMESPACES = 10
APPS_PER_NS = 10


def make_endpoints(n: int) -> list[EndpointInfo]:
    """``n`` local endpoints over 10 namespaces x 10 apps (replicas share an identity)."""
    out, ids = [], {}
    for i in range(n):
        ns, app = f"ns{i % NAMESPACES}", f"app{(i // NAMESPACES) % APPS_PER_NS}"
        labels = endpoint_labels(ns, {"app": app, "tier": "backend" if app in ("app0", "app1") else "web"})
        ident = ids.setdefault(labels, 256 + len(ids))
        out.append(EndpointInfo(identity=ident, labels=labels, ips=(f"10.{i // 65000}.{(i // 250) % 256}.{i % 250 + 1}",),
                                name=f"{ns}/{app}-{i}", ifindex=100 + i))
    return out


def make_policies(n: int, seed: int = 1) -> list[dict]:
    """``n`` CiliumNetworkPolicy documents with a realistic mix of rule kinds."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        ns = f"ns{rng.randrange(NAMESPACES)}"
        app = lambda: f"app{rng.randrange(APPS_PER_NS)}"  # noqa: E731
        port = rng.choice([80, 443, 8080, 5432, 6379, 9090, 3000 + rng.randrange(1000)])
        kind = rng.random()
        spec: dict = {"endpointSelector": {"matchLabels": {"app": app()}}}
        if kind < 0.50:
            spec["ingress"] = [{"fromEndpoints": [{"matchLabels": {"app": app()}}],
                                "toPorts": [{"ports": [{"port": str(port), "protocol": "TCP"}]}]}]
        elif kind < 0.65:
            lo = rng.randrange(1024, 60000)
            spec["ingress"] = [{"fromEndpoints": [{"matchLabels": {"app": app()}}],
                                "toPorts": [{"ports": [{"port": str(lo), "endPort": lo + rng.randrange(10, 3000), "protocol": "TCP"}]}]}]
        elif kind < 0.75:
            spec["ingress"] = [{"fromEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": f"ns{rng.randrange(NAMESPACES)}"},
                                                   "matchExpressions": [{"key": "app", "operator": "In", "values": [app(), app()]}]}],
                                "toPorts": [{"ports": [{"port": str(port), "protocol": "TCP"}]}]}]
        elif kind < 0.85:
            a, b = rng.randrange(1, 224), rng.randrange(256)
            spec["egress"] = [{"toCIDRSet": [{"cidr": f"{a}.{b}.0.0/16", "except": [f"{a}.{b}.{rng.randrange(256)}.0/24"]}],
                               "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]}]
        elif kind < 0.90:
            spec["egress"] = [{"toEntities": ["world"], "toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}]}]}]
        elif kind < 0.95:
            spec["ingressDeny"] = [{"fromEndpoints": [{"matchLabels": {"app": app()}}]}]
            spec["enableDefaultDeny"] = {"ingress": False}
        else:
            spec["ingress"] = [{"toPorts": [{"ports": [{"port": str(port), "protocol": "ANY"}]}]}]
        docs.append({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                     "metadata": {"name": f"policy-{i}", "namespace": ns}, "spec": spec})
    return docs


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", type=int, default=1000)
    ap.add_argument("--endpoints", type=int, default=300)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--decisions", type=int, default=20000)
    args = ap.parse_args(argv)

    endpoints = make_endpoints(args.endpoints)
    docs = make_policies(args.policies)
    yaml_text = yaml.safe_dump_all(docs, sort_keys=False)
    json_text = json.dumps(docs)
    policies = load_policies(json_text)
    first = compile_policies(policies, endpoints)
    changed_docs = make_policies(args.policies)
    changed_docs[0]["spec"]["endpointSelector"] = {"matchLabels": {"app": "app9"}}
    changed = load_policies(json.dumps(changed_docs))

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1000

    ms = interleave(args.reps, {
        "validate (YAML text)": lambda: timed(lambda: load_policies(yaml_text)),
        "validate (JSON text)": lambda: timed(lambda: load_policies(json_text)),
        "compile (fresh)": lambda: timed(lambda: compile_policies(policies, endpoints)),
        "recompile (1 changed)": lambda: timed(lambda: compile_policies(changed, endpoints, previous=first)),
    })

    rng = random.Random(2)
    local_ids = sorted({e.identity for e in endpoints})
    peers = [e.ips[0] for e in endpoints] + ["8.8.8.8", "1.2.3.4", "52.1.2.3"]
    packets = [(rng.choice(local_ids), rng.choice(("ingress", "egress")), rng.choice(peers),
                rng.choice(("tcp", "udp")), rng.choice((80, 443, 8080, 53, 5432, 30000))) for _ in range(args.decisions)]
    decide(first, *packets[0])  # build the lookup index once
    t0 = time.perf_counter()
    verdicts: dict[str, int] = {}
    for pkt in packets:
        v = decide(first, *pkt).verdict.value
        verdicts[v] = verdicts.get(v, 0) + 1
    decide_s = time.perf_counter() - t0

    second = compile_policies(changed, endpoints, previous=first)
    old, new = set(first.entries), set(second.entries)
    stats = first.stats()
    rows = [(name, summary(vals), "ms") for name, vals in ms.items()]
    print(f"Policy core: {args.policies} policies, {args.endpoints} endpoints "
          f"({len(local_ids)} identities), {args.reps} interleaved reps")
    print_table("Time per run", rows)
    comp = summary(ms["compile (fresh)"])["median"]
    recomp = summary(ms["recompile (1 changed)"])["median"]
    valid = summary(ms["validate (JSON text)"])["median"]
    print(f"\n  map sizes: {stats['entries']} policy entries ({stats['deny_entries']} deny), "
          f"{stats['ipcache']} ipcache prefixes, {stats['endpoints']} endpoints, {stats['identities']} identities")
    print(f"  entries per policy: {stats['entries'] / max(1, args.policies):.1f}")
    print(f"  one policy changed: {len(old - new)} entries removed, {len(new - old)} added, "
          f"revision {first.revision} -> {second.revision}")
    print(f"  validate+compile vs the 1 s update goal: {(valid + recomp) / 1000:.3f} of the budget")
    print(f"  decide (Python oracle): {args.decisions / decide_s:,.0f} decisions/s  verdicts {verdicts}")
    result = {"machine": machine_facts(), "args": vars(args), "ms": {k: summary(v) for k, v in ms.items()},
              "stats": stats, "changed_entries": {"removed": len(old - new), "added": len(new - old)},
              "decisions_per_s": args.decisions / decide_s, "compile_ms": comp, "recompile_ms": recomp}
    path = write_json("policy_compile", result)
    print(f"\n  results: {path}")
    return result


if __name__ == "__main__":
    main()
