"""Many nodes, one server tier: three agents (the real shipper and spool, distinct node names) ship to two
API server processes on one PostgreSQL; one API process is killed with SIGKILL mid-run and restarted.
Queries through either process, per node and across nodes, return exactly the flows that were sent."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from reliability_env import ServerProcess, generator, generator_report, kill_group, postgres_cluster

ROOT = Path(__file__).resolve().parent.parent
RATE = 800  # flows/s per agent
SECONDS = 8.0


@pytest.fixture(scope="module")
def cluster():
    with postgres_cluster() as c:
        yield c


def lines(server: ServerProcess, query: str) -> list[dict]:
    r = httpx.get(f"{server.url}/api/v1/flows?{query}", timeout=120)
    assert r.status_code == 200, r.text
    return [json.loads(x) for x in r.text.splitlines() if x]


def test_three_agents_two_api_processes_one_postgres(cluster, tmp_path):
    url = cluster.create_database("scale" + secrets.token_hex(3))
    servers = [ServerProcess(url, log_path=str(tmp_path / f"api{i}.log")) for i in (1, 2)]
    starters = [threading.Thread(target=s.start) for s in servers]  # both migrate at once
    for t in starters:
        t.start()
    for t in starters:
        t.join()
    assert all(s.proc is not None and s.proc.poll() is None for s in servers)
    s1, s2 = servers
    gens = {}
    try:
        for node, srv in (("node-1", s1), ("node-2", s2), ("node-3", s2)):
            gens[node] = generator(srv.url, node, rate=RATE, seconds=SECONDS, spool_dir=str(tmp_path / node),
                                   drain_timeout=90, seed=int(node[-1]))
        time.sleep(3)
        s2.kill9()  # an API process dies with its writer; node-2 and node-3 spool meanwhile
        time.sleep(2.5)
        s2.start()
        reports = {node: generator_report(p, timeout=180) for node, p in gens.items()}
    finally:
        for p in gens.values():
            kill_group(p)
    try:
        for node, rep in reports.items():
            assert rep["drained"] and rep["lost_queue_full"] == 0 and not rep["lost_by_source"], rep
            assert rep["generated"] >= RATE * SECONDS * 0.95, rep
        assert reports["node-2"]["spooled_batches"] > 0 or reports["node-3"]["spooled_batches"] > 0
        total = sum(r["generated"] for r in reports.values())
        for srv in (s1, s2):
            everything = lines(srv, "first=1000000")
            assert len(everything) == total
            assert len({e["flow"]["uuid"] for e in everything}) == total  # exactly once
            for node, rep in reports.items():
                mine = lines(srv, f"node_name={node}&first=1000000")
                assert {e["flow"]["uuid"] for e in mine} == {f"{node}:{node[-1]}:{i}" for i in range(rep["generated"])}
                assert {e["node_name"] for e in mine} == {node}
            two = lines(srv, "node_name=node-1&node_name=node-3&first=1000000")
            assert len(two) == reports["node-1"]["generated"] + reports["node-3"]["generated"]
            not_one = lines(srv, "not_node_name=node-1&first=1000000")
            assert len(not_one) == total - reports["node-1"]["generated"]
            nodes = httpx.get(srv.url + "/api/v1/nodes", timeout=30).json()["nodes"]
            assert [n["name"] for n in nodes] == ["node-1", "node-2", "node-3"]
        # the CLI through the other process, with Hubble's --node-name
        r = subprocess.run([sys.executable, "-m", "flowscope.cli", "observe", "--server", s2.url, "--node-name",
                            "node-3", "--all", "-o", "json"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "FLOWSCOPE_SERVER": s2.url})
        assert r.returncode == 0, r.stderr
        out = [json.loads(x) for x in r.stdout.splitlines() if x.strip()]
        assert len(out) == reports["node-3"]["generated"] and {o["node_name"] for o in out} == {"node-3"}
        # the two writers took turns: every batch's flows have contiguous ids, all of its own node, and the
        # applied batch ids account for every flow
        from sqlalchemy import create_engine

        engine = create_engine(url)
        with engine.connect() as conn:
            applied, flows_in_batches = conn.exec_driver_sql(
                "SELECT count(*), sum(flows) FROM ingest_batches").one()
            misplaced = conn.exec_driver_sql(
                "SELECT count(*) FROM ingest_batches b JOIN flows f ON f.id BETWEEN b.first_id "
                "AND b.first_id + b.flows - 1 WHERE f.node_name <> b.node_name").scalar()
        engine.dispose()
        assert flows_in_batches == total and misplaced == 0
        assert applied == sum(r["batches"] for r in reports.values()) - sum(r["duplicates"] for r in reports.values())
    finally:
        for s in servers:
            s.stop()
