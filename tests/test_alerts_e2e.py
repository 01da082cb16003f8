"""Real policy drops between namespaces -> agent (tc probe + policy sync, exporting to a file) -> server
(alerts, /metrics) -> one signed webhook on a real loopback receiver, then a resolve when the traffic stops.

Nothing is replaced: ``flowscope policy apply`` to the server process, the agent's long-poll policy sync,
BPF maps, real UDP datagrams from one namespace to another, the real shipper.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from alerts_helpers import Receiver, Server
from api.alerts.payload import verify
from flowscope.endpoints import EndpointRecord, EndpointStore
from flowscope.export import ExportConfig

pytestmark = pytest.mark.root
TRAFFIC = str(Path(__file__).with_name("enforcer_traffic.py"))
SECRET = "e2e-secret"
N = 30

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: pay-from-checkout, namespace: pay}
spec:
  endpointSelector: {matchLabels: {app: ledger}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: checkout}}]
"""

RULE = """\
name: shop-to-pay-drops
filter: {{verdict: [DROPPED], from_namespace: [shop], to_namespace: [pay]}}
condition: {{count_over: 5, window: 2s}}
severity: critical
group_by: [source_namespace, destination_namespace]
webhook: {{url: "{url}", secret: "{secret}", max_backoff: 1s}}
"""


def test_a_policy_drop_burst_fires_one_signed_webhook_then_resolves(lab, tmp_path):
    from probe.agent import AgentConfig, build_agent

    state = tmp_path / "state"
    store = EndpointStore(state)
    pods = {}
    for name, ns in (("web", "shop"), ("ledger", "pay")):
        ep = pods[name] = lab.add(name)
        store.put(EndpointRecord(container_id=f"c-{name}", host_ifname=ep.host_if, host_ifindex=ep.ifindex,
                                 ips=[ep.ipv4, ep.ipv6], namespace=ns, pod_name=f"{name}-1", labels={"app": name}))
    p = lab.spawn(pods["ledger"], [sys.executable, TRAFFIC, "serve", "8080", "53"], stdout=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"ready"
    export_path = tmp_path / "agent-export" / "flows.json"

    with Receiver() as rec, Server(tmp_path / "flows.db") as srv:
        r = srv.apply(RULE.format(url=rec.url, secret=SECRET))
        assert r.status_code == 200, r.text
        cfg = AgentConfig(server=srv.url, state_dir=str(state), node_name="e2e-node", flush_interval=0.1, drain_ms=20,
                          l7=False, cni_service=False, export=ExportConfig(path=str(export_path)))
        agent = build_agent(cfg)
        sync = next(s for s in agent.sources if type(s).__name__ == "PolicySync")
        agent.start()
        t = threading.Thread(target=agent.run, daemon=True)
        t.start()
        try:
            pol = tmp_path / "policy.yaml"
            pol.write_text(POLICY)
            out = subprocess.run([sys.executable, "-m", "flowscope.cli", "policy", "apply", "-f", str(pol),
                                  "--server", srv.url], capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            revision = max(int(x) for x in re.findall(r"revision (\d+)", out.stdout))
            assert sync.wait_applied(revision, timeout=15), sync.status()

            ledger = pods["ledger"].ipv4
            pods["web"].exec([sys.executable, "-c", "import socket\n"
                              f"for _ in range({N}):\n"
                              "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                              f"    s.sendto(b'q', ('{ledger}', 53)); s.close()"])
            got = rec.wait_for(lambda reqs: [q["json"]["state"] for q in reqs] == ["firing", "resolved"], timeout=60)
        finally:
            agent.stop()
            t.join(15)
        assert not t.is_alive()

        firing, resolved = got
        for q in got:
            assert verify(SECRET, q["body"], q["headers"]["X-Flowscope-Signature"])
            assert q["json"]["group"]["labels"] == {"source_namespace": "shop", "destination_namespace": "pay"}
        f = firing["json"]
        assert f["rule"] == "shop-to-pay-drops" and f["severity"] == "critical"
        assert f["window"]["flows"] > 5
        for s in f["sample_flows"]:
            assert s["verdict"] == "DROPPED" and s["source"]["pod_name"] == "web-1"
            assert s["destination"]["pod_name"] == "ledger-1"
        assert resolved["json"]["started_at"] == f["started_at"]
        assert rec.states() == ["firing", "resolved"]  # one alert for the whole burst

        # every dropped datagram is one drop record: the server's store, /metrics and the agent's export agree
        stored = [json.loads(line)["flow"] for line in httpx.get(
            srv.url + "/api/v1/flows", params={"verdict": "DROPPED", "last": 10000}, timeout=30).text.splitlines()]
        udp_drops = [x for x in stored if x["event_type"]["type"] == 1 and "UDP" in x["l4"]]
        assert len(udp_drops) == N
        from prometheus_client.parser import text_string_to_metric_families

        metrics = {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in text_string_to_metric_families(
            httpx.get(srv.url + "/metrics", timeout=30).text) for s in fam.samples}
        assert metrics[("hubble_drop_total", (("protocol", "UDP"), ("reason", "POLICY_DENIED")))] == N
        assert metrics[("hubble_policy_verdicts_total", (("action", "dropped"), ("direction", "ingress"),
                                                          ("match", "none")))] == N
        exported = [json.loads(x)["flow"] for x in export_path.read_text().splitlines() if '"flow"' in x]
        assert sorted(x["uuid"] for x in exported if x["verdict"] == "DROPPED") == sorted(x["uuid"] for x in stored)
        obs = subprocess.run([sys.executable, "-m", "flowscope.cli", "observe", "--input-file", str(export_path),
                              "--verdict", "DROPPED", "--from-namespace", "shop", "--type", "drop", "-o", "json"],
                             capture_output=True, text=True, timeout=60)
        assert obs.returncode == 0 and len(obs.stdout.splitlines()) == N, obs.stderr
