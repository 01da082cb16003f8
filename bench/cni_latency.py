#!/usr/bin/env python3
"""CNI ADD+DEL latency: flowscope-cni (node-agent service path and standalone) vs Debian's reference
``bridge`` + ``host-local``, measured in the same run on the same machine, interleaved round by round
so load drift hits every variant alike.

Each call is what a runtime pays: fork+exec of the plugin binary with CNI_* env and the config on
stdin, until it exits. Our plugin runs as ``flowscope cni install`` writes it (a ``python -sSE`` shim).

    sudo .venv/bin/python bench/cni_latency.py [--rounds 40] [--json]

Prints p50/p95 per variant for ADD, DEL and the ADD+DEL round trip, and each variant's p50 ratio to
the reference (goal: the service path within 2x).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cni.install import package_root, shim_text  # noqa: E402
from cni.service import CNIService  # noqa: E402

REF_DIR = "/usr/lib/cni"


def call(plugin: str, command: str, conf: dict, netns: str, cid: str, env: dict) -> float:
    e = dict(env, CNI_COMMAND=command, CNI_CONTAINERID=cid, CNI_NETNS=netns, CNI_IFNAME="eth0",
             CNI_PATH=REF_DIR)
    t0 = time.perf_counter()
    p = subprocess.run([plugin], input=json.dumps(conf).encode(), env=e, capture_output=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{os.path.basename(plugin)} {command} failed: {p.stdout.decode()} {p.stderr.decode()}")
    return dt * 1e3


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="also print the numbers as one JSON object")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces, veth pairs)")
    for p in ("bridge", "host-local"):
        if not os.access(f"{REF_DIR}/{p}", os.X_OK):
            raise SystemExit(f"{REF_DIR}/{p} missing: apt-get install containernetworking-plugins")

    tag = secrets.token_hex(2)
    work = Path(tempfile.mkdtemp(prefix="fscni-bench-"))
    ns_name = f"fscb-{tag}"
    netns = f"/var/run/netns/{ns_name}"
    bridge = f"fscbbr{tag}"
    plugin = work / "bin" / "flowscope-cni"
    plugin.parent.mkdir()
    plugin.write_text(shim_text(sys.executable, package_root()))
    plugin.chmod(0o755)
    state = work / "state"
    env = dict(os.environ, FLOWSCOPE_STATE_DIR=str(state))
    ours = {"cniVersion": "1.0.0", "name": f"fsb{tag}", "type": "flowscope-cni", "hostIfPrefix": f"fb{tag}",
            "ipam": {"type": "flowscope-ipam", "ranges": [[{"subnet": "10.219.0.0/24"}]]}}
    ref = {"cniVersion": "1.0.0", "name": f"brb{tag}", "type": "bridge", "bridge": bridge, "isGateway": True,
           "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.219.1.0/24"}]],
                    "dataDir": str(work / "host-local")}}
    variants = {
        "reference bridge+host-local": (f"{REF_DIR}/bridge", ref, env),
        "flowscope-cni via agent service": (str(plugin), ours, env),
        "flowscope-cni standalone": (str(plugin), ours, dict(env, FLOWSCOPE_CNI_MODE="standalone")),
    }
    samples: dict[str, dict[str, list[float]]] = {k: {"ADD": [], "DEL": [], "ADD+DEL": []} for k in variants}
    subprocess.run(["ip", "netns", "add", ns_name], check=True)
    svc = CNIService(state).start()
    try:
        for i in range(args.warmup + args.rounds):
            for name, (exe, conf, e) in variants.items():
                cid = f"bench-{i}"
                a = call(exe, "ADD", conf, netns, cid, e)
                d = call(exe, "DEL", conf, netns, cid, e)
                if i >= args.warmup:
                    samples[name]["ADD"].append(a)
                    samples[name]["DEL"].append(d)
                    samples[name]["ADD+DEL"].append(a + d)
    finally:
        svc.stop()
        subprocess.run(["ip", "netns", "del", ns_name], capture_output=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)

    ref_name = "reference bridge+host-local"
    ref_p50 = statistics.median(samples[ref_name]["ADD+DEL"])
    print(f"CNI latency, {args.rounds} rounds (ms, wall time per plugin exec as a runtime sees it)")
    print(f"{'variant':34} {'ADD p50':>8} {'ADD p95':>8} {'DEL p50':>8} {'DEL p95':>8} "
          f"{'A+D p50':>8} {'A+D p95':>8} {'ratio':>7}")
    report = {}
    for name, s in samples.items():
        row = {f"{verb.lower()}_p{q}": round(pct(s[verb], q / 100), 2) for verb in s for q in (50, 95)}
        row["ratio_p50_vs_reference"] = round(statistics.median(s["ADD+DEL"]) / ref_p50, 2)
        report[name] = row
        print(f"{name:34} {row['add_p50']:8.1f} {row['add_p95']:8.1f} {row['del_p50']:8.1f} {row['del_p95']:8.1f} "
              f"{row['add+del_p50']:8.1f} {row['add+del_p95']:8.1f} {row['ratio_p50_vs_reference']:6.2f}x")
    svc_ratio = report["flowscope-cni via agent service"]["ratio_p50_vs_reference"]
    print(f"\nservice path ADD+DEL p50 = {svc_ratio:.2f}x the reference plugins "
          f"(goal <= 2x: {'met' if svc_ratio <= 2 else 'NOT met'}); standalone = "
          f"{report['flowscope-cni standalone']['ratio_p50_vs_reference']:.2f}x")
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
