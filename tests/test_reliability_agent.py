"""Agent restart with the real probe: ``flowscope agent`` (tc BPF program on lab veths) killed with SIGKILL
and started again. The new agent replaces the killed one's filters (never duplicates them), adopts the
clsact qdisc it left, flows continue, and when the new agent stops the interfaces carry nothing of
Flowscope's: no stale tc filter, no qdisc."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from reliability_env import ServerProcess, wait_for

ROOT = Path(__file__).resolve().parent.parent


def our_filters(dev: str) -> dict[str, list[str]]:
    """hook -> the BPF program ids of Flowscope's filters on it."""
    out = {}
    for hook in ("ingress", "egress"):
        text = subprocess.run(["tc", "filter", "show", "dev", dev, hook], capture_output=True, text=True).stdout
        out[hook] = re.findall(r" id (\d+) name fs_", text)
    return out


def has_clsact(dev: str) -> bool:
    return "clsact" in subprocess.run(["tc", "qdisc", "show", "dev", dev], capture_output=True, text=True).stdout


def start_agent(server: str, devs: list[str], spool: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "flowscope.cli", "agent", "--server", server, "--no-endpoints", "--no-l7",
            "--no-policy", "--node-name", "restart-node", "--spool-dir", str(spool), "--log-level", "warning",
            "--flush-interval", "0.1"]
    for d in devs:
        args += ["--interface", d]
    return subprocess.Popen(args, cwd=ROOT, start_new_session=True)


def flows_since(srv: ServerProcess, t_ns: int) -> int:
    r = httpx.get(srv.url + f"/api/v1/flows?node_name=restart-node&since={t_ns // 10**9}&first=100000", timeout=30)
    return len([x for x in r.text.splitlines() if x])


@pytest.mark.root
def test_agent_restart_replaces_kernel_state_and_flows_continue(lab, tmp_path):
    cli, srv_ep = lab.add("cli"), lab.add("srv")
    devs = [cli.host_if, srv_ep.host_if]
    lab.spawn(cli, ["ping", "-i", "0.2", srv_ep.ipv4])
    lab.spawn(srv_ep, [sys.executable, "-m", "http.server", "--bind", srv_ep.ipv4, "8080"])
    lab.spawn(cli, ["sh", "-c", f"while true; do curl -s -m 1 -o /dev/null http://{srv_ep.ipv4}:8080/; sleep 0.3; done"])
    agents: list[subprocess.Popen] = []
    with ServerProcess(f"sqlite:///{tmp_path}/agent.db") as srv:
        try:
            t0 = time.time_ns()
            agents.append(start_agent(srv.url, devs, tmp_path / "spool"))
            wait_for(lambda: flows_since(srv, t0) > 0, timeout=90, what="flows from the first agent")
            first = {d: our_filters(d) for d in devs}
            assert all(len(ids) == 1 for f in first.values() for ids in f.values()), first

            os.killpg(agents[0].pid, signal.SIGKILL)
            agents[0].wait(10)
            assert {d: our_filters(d) for d in devs} == first  # a killed agent leaves its filters behind

            time.sleep(1.1)
            t1 = time.time_ns()
            agents.append(start_agent(srv.url, devs, tmp_path / "spool"))
            wait_for(lambda: flows_since(srv, t1) > 0, timeout=90, what="flows after the restart")
            second = {d: our_filters(d) for d in devs}
            for d in devs:
                for hook in ("ingress", "egress"):
                    assert len(second[d][hook]) == 1, (d, hook, second)  # replaced, not duplicated
                    assert second[d][hook] != first[d][hook], "the new agent's program is attached"
            n1 = flows_since(srv, t1)
            time.sleep(2)
            assert flows_since(srv, t1) > n1  # and flows keep coming

            agents[1].send_signal(signal.SIGTERM)
            assert agents[1].wait(30) == 0
            for d in devs:
                assert our_filters(d) == {"ingress": [], "egress": []}, d
                assert not has_clsact(d), f"{d} keeps a clsact qdisc"
        finally:
            for a in agents:
                if a.poll() is None:
                    os.killpg(a.pid, signal.SIGKILL)
                    a.wait(10)
            subprocess.run([sys.executable, "-m", "flowscope.cli", "agent", "--cleanup"], cwd=ROOT,
                           capture_output=True, timeout=60)
