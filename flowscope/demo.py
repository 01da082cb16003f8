"""``flowscope demo``: the platform plus a small workload in network namespaces.

Pods (namespaces joined by veth, routed like the CNI does) are registered as endpoints with labels,
then clients call servers continuously so flows appear within seconds. Everything the demo makes
(namespaces, links, qdiscs, BPF programs, processes) is removed on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Optional

from flowscope.endpoints import EndpointRecord, EndpointStore
from flowscope.netlab import Lab, LabEndpoint

log = logging.getLogger("flowscope.demo")

POD_NAMESPACE = "demo"

# name -> labels; servers listen on the given port.
PODS = {
    "frontend": {"app": "frontend", "tier": "web"},
    "api": {"app": "api", "tier": "backend"},
    "db": {"app": "db", "tier": "data"},
    "batch": {"app": "batch", "tier": "jobs"},
}


def _register(store: EndpointStore, ep: LabEndpoint, name: str, labels: dict[str, str], n: int,
              suffix: str) -> None:
    ips = [ep.ipv4] + ([ep.ipv6] if ep.ipv6 else [])
    store.put(EndpointRecord(
        container_id=f"demo-{name}", ifname="eth0", netns=f"/var/run/netns/{ep.netns}",
        host_ifname=ep.host_if, host_ifindex=ep.ifindex, ips=ips, namespace=POD_NAMESPACE,
        pod_name=f"{name}-{suffix}", labels=labels, endpoint_id=100 + n,
        identity=0, mac=ep.mac, created_ns=time.time_ns(),
    ))


def _loop(cmd: str, every: float) -> str:
    return f"sh -c 'while true; do {cmd} >/dev/null 2>&1; sleep {every}; done'"


def start_workload(lab: Lab, store: EndpointStore) -> dict[str, LabEndpoint]:
    pods = {}
    for n, (name, labels) in enumerate(PODS.items(), start=1):
        ep = lab.add(name)
        _register(store, ep, name, labels, n, lab.tag)
        pods[name] = ep
    api, db, fe, batch = pods["api"], pods["db"], pods["frontend"], pods["batch"]
    py = sys.executable
    lab.spawn(api, f"{py} -m http.server 8080 --bind ::")
    lab.spawn(db, f"socat TCP6-LISTEN:5432,fork,reuseaddr SYSTEM:'echo ok'")
    lab.spawn(db, f"socat UDP6-RECVFROM:53,fork SYSTEM:'echo answer'")
    time.sleep(0.5)
    lab.spawn(fe, _loop(f"curl -s -m 2 http://{api.ipv4}:8080/", 0.5))
    lab.spawn(fe, _loop(f"curl -s -m 2 http://[{api.ipv6}]:8080/index.html", 2))
    lab.spawn(api, _loop(f"sh -c \"echo q | socat -T1 - TCP:{db.ipv4}:5432\"", 1))
    lab.spawn(api, _loop(f"sh -c \"echo lookup | socat -T1 - UDP:{db.ipv4}:53\"", 1.5))
    lab.spawn(batch, _loop(f"ping -c 1 -W 1 {db.ipv4}", 3))
    lab.spawn(batch, _loop(f"curl -s -m 1 http://{db.ipv4}:9999/", 4))  # nothing listens: RSTs
    return pods


def run_demo(db_url: Optional[str] = None, host: str = "127.0.0.1", port: int = 8080, duration: float = 0,
             log_level: str = "warning") -> int:
    from flowscope.platform import Platform
    from probe.agent import Agent, AgentConfig

    if os.geteuid() != 0:
        print("flowscope demo needs root (network namespaces, veth pairs and BPF programs)", file=sys.stderr)
        return 1
    state_dir = tempfile.mkdtemp(prefix="flowscope-demo-")
    store = EndpointStore(state_dir)
    agent = None
    try:
        with Platform(db_url=db_url, host=host, port=port, log_level=log_level) as plat, Lab() as lab:
            pods = start_workload(lab, store)
            cfg = AgentConfig(server=plat.url, state_dir=state_dir, node_name=os.uname().nodename)
            agent = Agent(cfg)
            agent.install_signal_handlers()
            agent.start()
            print(f"\nFlowscope demo is running: dashboard on {plat.url}\n"
                  f"  pods: " + ", ".join(f"{n} ({p.ipv4})" for n, p in pods.items()) + "\n"
                  f"  try:  .venv/bin/flowscope observe --server {plat.url} --last 20\n"
                  f"  Ctrl-C stops it and removes everything it created.\n", file=sys.stderr, flush=True)
            if duration:
                threading.Timer(duration, agent.stop).start()
            agent.run()
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
    return 0

