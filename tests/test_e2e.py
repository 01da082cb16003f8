"""The whole pipeline for real: namespaces → tc probe → agent → HTTP → server → SQLite → CLI.

No part is replaced: the server runs as its own process (`flowscope server`), the agent ships with its
real shipper, and the flows are read back with the real `flowscope observe` command.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from flowscope.endpoints import EndpointRecord, EndpointStore

pytestmark = pytest.mark.root
FLOWSCOPE = [sys.executable, "-m", "flowscope.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def platform(tmp_path):
    from flowscope.platform import Platform

    port = free_port()
    with Platform(db_url=f"sqlite:///{tmp_path}/flows.db", port=port, log_level="warning") as plat:
        yield plat


def observe(server: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(FLOWSCOPE + ["observe", "--server", server, *args], capture_output=True, text=True,
                          timeout=timeout)


def wait_for(pred, timeout=15.0, every=0.3):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(every)
    return pred()


def test_flows_from_namespaces_reach_observe(platform, lab, tmp_path):
    from probe.agent import Agent, AgentConfig

    client, srv = lab.add("web"), lab.add("api")
    store = EndpointStore(tmp_path / "state")
    for ep, app in ((client, "web"), (srv, "api")):
        store.put(EndpointRecord(container_id=f"c-{app}", host_ifname=ep.host_if, host_ifindex=ep.ifindex,
                                 ips=[ep.ipv4, ep.ipv6], namespace="shop", pod_name=f"{app}-1",
                                 labels={"app": app}, endpoint_id=ep.ifindex))
    agent = Agent(AgentConfig(server=platform.url, state_dir=str(tmp_path / "state"), node_name="e2e-node",
                              flush_interval=0.1))
    agent.start()
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    http = lab.spawn(srv, [sys.executable, "-m", "http.server", "8080", "--bind", "0.0.0.0"])
    try:
        assert wait_for(lambda: client.exec(["curl", "-s", "-o", "/dev/null", f"http://{srv.ipv4}:8080/"],
                                            check=False).returncode == 0)
        client.exec(["ping", "-c", "1", srv.ipv4])

        def have_flows():
            r = observe(platform.url, "--from-pod", "shop/web", "--to-port", "8080", "-o", "json", "--last", "100")
            return r if r.returncode == 0 and r.stdout.strip() else None

        r = wait_for(have_flows)
        assert r, "no flows reached the server"
    finally:
        agent.stop()
        t.join(timeout=15)
        http.terminate()
    assert not t.is_alive()

    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert lines and all(set(env) >= {"flow", "time"} for env in lines)
    f = lines[0]["flow"]
    assert f["source"]["pod_name"] == "web-1" and f["source"]["namespace"] == "shop"
    assert f["destination"]["pod_name"] == "api-1"
    assert f["l4"]["TCP"]["destination_port"] == 8080
    assert f["verdict"] == "FORWARDED" and f["Type"] == "L3_L4" and f["node_name"] == "e2e-node"
    assert lines[0]["node_name"] == "e2e-node" and lines[0]["time"] == f["time"]
    assert any(x["flow"]["l4"]["TCP"].get("flags", {}).get("SYN") for x in lines)

    # the same flows through the REST API, with Hubble's filter semantics (denylist)
    q = {"whitelist": [{"source_pod": ["shop/web"]}], "blacklist": [{"protocol": ["icmp"]}], "number": 1000}
    body = httpx.post(platform.url + "/api/v1/flows/query", json=q, timeout=10).text
    got = [json.loads(line)["flow"] for line in body.splitlines()]
    assert got and all("ICMPv4" not in g["l4"] for g in got)
    pings = observe(platform.url, "--from-pod", "shop/web", "--protocol", "icmp", "-o", "json", "--last", "10")
    assert pings.returncode == 0 and '"ICMPv4"' in pings.stdout

    # compact output, like hubble observe
    compact = observe(platform.url, "--to-pod", "shop/api", "--last", "5")
    assert compact.returncode == 0 and "shop/web-1" in compact.stdout and "FORWARDED" in compact.stdout


def test_observe_follow_sees_live_flows(platform, lab, tmp_path):
    from probe.agent import Agent, AgentConfig

    a, b = lab.add("a"), lab.add("b")
    agent = Agent(AgentConfig(server=platform.url, interfaces=[a.host_if, b.host_if], follow_endpoints=False,
                              state_dir=str(tmp_path), node_name="n", flush_interval=0.1))
    agent.start()
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    proc = subprocess.Popen(FLOWSCOPE + ["observe", "--server", platform.url, "--follow", "--protocol", "icmpv4",
                                         "-o", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        a.exec(["ping", "-c", "2", "-i", "0.3", b.ipv4])
        line = {}

        def read_line():
            out = proc.stdout.readline()
            line["v"] = out

        rt = threading.Thread(target=read_line, daemon=True)
        rt.start()
        rt.join(15)
        assert line.get("v"), "observe --follow printed nothing"
        env = json.loads(line["v"])
        assert "ICMPv4" in env["flow"]["l4"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        agent.stop()
        t.join(15)
    assert proc.returncode in (0, -signal.SIGINT, 130)


def test_demo_runs_and_cleans_up(tmp_path):
    """`flowscope demo` shows live flows within seconds and removes everything it made."""
    port = free_port()
    env = dict(os.environ)
    proc = subprocess.Popen(FLOWSCOPE + ["demo", "--port", str(port), "--db", f"sqlite:///{tmp_path}/demo.db"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def flows():
            try:
                r = httpx.get(url + "/api/v1/flows", params={"last": 50, "source_pod": "demo/frontend"}, timeout=3)
                return r.text.strip() if r.status_code == 200 else None
            except httpx.HTTPError:
                return None

        body = wait_for(flows, timeout=45)
        assert body, "the demo produced no flows from demo/frontend"
        first = json.loads(body.splitlines()[0])["flow"]
        assert "k8s:app=frontend" in first["source"]["labels"]
        page = httpx.get(url + "/", timeout=5)
        assert page.status_code == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "dashboard on http://127.0.0.1" in out
    # Only the demo's own objects count (other labs may exist on a shared machine): its pods' namespaces
    # and the CNI plugin's host veths.
    import re

    pods = "|".join(("frontend", "api", "db", "catalog", "kafka", "billing", "dns", "batch"))
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not re.search(rf"^fsl[0-9a-f]{{4}}-({pods})\b", left, re.M), left
    assert not [n.name for n in Path("/sys/class/net").iterdir() if n.name.startswith("fsc")]
