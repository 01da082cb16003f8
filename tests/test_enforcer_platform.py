"""Policies through the whole platform, nothing replaced: ``flowscope policy apply`` -> the server
(``flowscope server`` process, SQL) -> the agent's policy sync (long poll) -> BPF maps -> real traffic
-> flows shipped by the real shipper -> ``flowscope observe --verdict DROPPED``.

The policies are the demo's (``enforcer.examples.DEMO_POLICIES``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from enforcer.examples import DEMO_POLICIES
from flowscope.endpoints import EndpointRecord, EndpointStore

from enforcer_server import free_port

pytestmark = pytest.mark.root
FLOWSCOPE = [sys.executable, "-m", "flowscope.cli"]
TRAFFIC = str(Path(__file__).with_name("enforcer_traffic.py"))


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(FLOWSCOPE + list(args), capture_output=True, text=True, timeout=timeout)


def wait_for(pred, timeout=20.0, every=0.3):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(every)
    return pred()


@pytest.fixture
def platform(tmp_path):
    from flowscope.platform import Platform

    with Platform(db_url=f"sqlite:///{tmp_path}/flows.db", port=free_port(), log_level="warning") as plat:
        yield plat


def test_demo_policies_enforced_and_every_drop_observed(platform, lab, tmp_path):
    from enforcer.sync import build_policy_sync
    from probe import events as ev
    from probe.agent import Agent, AgentConfig

    state = tmp_path / "state"
    store = EndpointStore(state)
    pods = {}
    for name in ("frontend", "api", "db", "batch"):
        ep = pods[name] = lab.add(name)
        store.put(EndpointRecord(container_id=f"demo-{name}", host_ifname=ep.host_if, host_ifindex=ep.ifindex,
                                 ips=[ep.ipv4, ep.ipv6], namespace="demo", pod_name=f"{name}-1",
                                 labels={"app": name}))
    for name, tcp, udp in (("api", "8080", ""), ("db", "5432,9999", "53")):
        p = lab.spawn(pods[name], [sys.executable, TRAFFIC, "serve", tcp, udp], stdout=subprocess.PIPE)
        assert p.stdout.readline().strip() == b"ready"

    cfg = AgentConfig(server=platform.url, state_dir=str(state), node_name="policy-node", flush_interval=0.1,
                      drain_ms=20, l7=False)
    sync = build_policy_sync(cfg)
    agent = Agent(cfg, sources=[sync])
    agent.start()
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    try:
        f = tmp_path / "demo.yaml"
        f.write_text(DEMO_POLICIES)
        r = cli("policy", "apply", "-f", str(f), "--server", platform.url)
        assert r.returncode == 0, r.stderr
        revision = max(int(x) for x in re.findall(r"revision (\d+)", r.stdout))
        assert sync.wait_applied(revision, timeout=15), sync.status()
        assert sync.status()["source"] == "server"
        listed = cli("policy", "list", "--server", platform.url)
        assert listed.returncode == 0 and "deny-batch-to-db" in listed.stdout

        def probe(src, *targets, timeout=0.5):
            out = pods[src].exec([sys.executable, TRAFFIC, "probe", "--timeout", str(timeout), *targets]).stdout
            return {k: v["ok"] for k, v in json.loads(out).items()}

        api, db = pods["api"].ipv4, pods["db"].ipv4
        assert probe("frontend", f"tcp:{api}:8080", f"tcp:[{pods['api'].ipv6}]:8080") == {
            f"tcp:{api}:8080": True, f"tcp:[{pods['api'].ipv6}]:8080": True}
        assert probe("api", f"tcp:{db}:5432", f"udp:{db}:53", f"tcp:{db}:9999") == {
            f"tcp:{db}:5432": True, f"udp:{db}:53": True, f"tcp:{db}:9999": False}
        assert probe("batch", f"tcp:{api}:8080") == {f"tcp:{api}:8080": False}
        drops_before = sum(agent.dp.read_stats()[ev.STAT_POLICY_DROP])
        n = 12
        pods["batch"].exec([sys.executable, "-c", "import socket\n"
                            f"for _ in range({n}):\n"
                            "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                            f"    s.sendto(b'q', ('{db}', 53)); s.close()"])
        assert sum(agent.dp.read_stats()[ev.STAT_POLICY_DROP]) - drops_before == n

        def dropped():
            r = cli("observe", "--server", platform.url, "--verdict", "DROPPED", "--last", "1000", "-o", "json")
            if r.returncode != 0:
                return None
            envs = [json.loads(line)["flow"] for line in r.stdout.splitlines() if line.strip()]
            udp = [x for x in envs if x["event_type"]["type"] == 1 and "UDP" in x["l4"]]
            return envs if len(udp) >= n else None

        flows = wait_for(dropped)
        assert flows, "the drops did not reach observe"
    finally:
        agent.stop()
        t.join(15)
    assert not t.is_alive()

    assert all(x["verdict"] == "DROPPED" for x in flows)
    # every dropped packet is there (one drop event each), naming the deciding policy
    udp_drops = [x for x in flows if x["event_type"]["type"] == 1 and "UDP" in x["l4"]]
    assert len(udp_drops) == n
    for x in udp_drops:
        assert x["event_type"]["sub_type"] == 181 and x["drop_reason_desc"] == "POLICY_DENY"
        assert x["source"]["pod_name"] == "batch-1" and x["destination"]["pod_name"] == "db-1"
        assert x["traffic_direction"] == "INGRESS"
        assert [(p["name"], p["namespace"], p["kind"]) for p in x["ingress_denied_by"]] == [
            ("deny-batch-to-db", "demo", "CiliumNetworkPolicy")]
        assert int(x["ingress_denied_by"][0]["revision"]) >= 1
    # the default-deny drops name the policy that put the endpoint under policy
    to_api = [x for x in flows if x["destination"].get("pod_name") == "api-1" and x["event_type"]["type"] == 1]
    assert to_api and all(x["drop_reason_desc"] == "POLICY_DENIED" for x in to_api)
    assert all([p["name"] for p in x["ingress_denied_by"]] == ["api-from-frontend"] for x in to_api)
    # each drop comes with its policy verdict record, as in Hubble
    assert len([x for x in flows if x["event_type"]["type"] == 5 and "UDP" in x["l4"]]) == n
    # and the compact output names the policy
    r = cli("observe", "--server", platform.url, "--verdict", "DROPPED", "--from-pod", "demo/batch",
            "--print-policy-names", "--last", "50")
    assert r.returncode == 0 and "DENIED BY deny-batch-to-db (CiliumNetworkPolicy)" in r.stdout
    assert "Policy denied by denylist DROPPED" in r.stdout  # the drop event's own line (Hubble's wording)
