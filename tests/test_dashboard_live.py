"""The dashboard's API against a real server process: range answers, the live websocket's batching
(bounded messages, never one per flow) and a slow client that never slows ingest."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from websockets.sync.client import connect

from tests.dashboard_scenario import EXPECTED_EDGES, POLICY_YAML, batch_body, legacy_flows, scenario_flows

S = 1_000_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from flowscope.platform import Platform

    db = tmp_path_factory.mktemp("dash") / "flows.db"
    with Platform(db_url=f"sqlite:///{db}", port=free_port(), log_level="warning") as plat:
        url = plat.url
        r = httpx.post(url + "/api/v1/policies", content=POLICY_YAML, headers={"content-type": "application/yaml"})
        assert r.status_code == 200, r.text
        now = time.time_ns()
        assert post(url, scenario_flows(now - 120 * S, 100, S // 2)) == 1000
        assert post(url, legacy_flows(now - 26 * 3600 * S, 30)) == 30
        yield url


def post(url: str, flows) -> int:
    r = httpx.post(url + "/api/v1/flows", content=batch_body(flows), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["accepted"]


def test_range_map_and_time_travel(server):
    m = httpx.get(server + "/api/v1/dashboard/map", params={"since": "10m"}).json()
    edges = {(e["source"], e["target"]) for e in m["edges"]}
    assert set(EXPECTED_EDGES) <= edges and ("shop/legacy", "data/db") not in edges
    assert m["mode"] == "range" and not m["truncated"]
    # yesterday: only the legacy workload talked to the database
    y = httpx.get(server + "/api/v1/dashboard/map", params={"since": "27h", "until": "25h"}).json()
    assert {(e["source"], e["target"]) for e in y["edges"]} == {("shop/legacy", "data/db")}
    assert y["edges"][0]["flows"] == 30 and y["edges"][0]["ports"] == [["TCP/5432", 30]]
    # the filter bar narrows the map (flowscope observe flags)
    f = httpx.get(server + "/api/v1/dashboard/map", params={"since": "10m", "q": "--to-namespace data"}).json()
    assert {e["target"] for e in f["edges"]} == {"data/db", "data/redis"}
    bad = httpx.get(server + "/api/v1/dashboard/map", params={"q": "--to-pod"})
    assert bad.status_code == 400 and "requires an argument" in bad.json()["detail"]


def test_flows_drops_policies_status(server):
    r = httpx.get(server + "/api/v1/dashboard/flows", params={"q": "--verdict DROPPED", "limit": 7})
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert len(lines) == 7 and all(x["flow"]["verdict"] == "DROPPED" for x in lines)
    dl = httpx.get(server + "/api/v1/dashboard/flows", params={"since": "27h", "until": "25h", "download": "true"})
    assert "attachment" in dl.headers["content-disposition"] and len(dl.text.splitlines()) == 30
    d = httpx.get(server + "/api/v1/dashboard/drops", params={"since": "10m"}).json()
    assert d["drops"] == 100 and sum(d["by_reason"]["POLICY_DENIED"]) == 100
    assert sum(d["by_policy"]["data/data-allow"]) == 100 and d["audits"] == 100
    assert d["recent"][0]["flow"]["verdict"] == "DROPPED"
    p = {x["ref"]: x for x in httpx.get(server + "/api/v1/dashboard/policies", params={"since": "10m"}).json()["items"]}
    assert p["data/data-allow"]["stored"] and p["data/data-allow"]["dropped"] == 100
    assert p["data/data-allow"]["forwarded"] == 200 and p["data/data-allow"]["policy"]["kind"] == "CiliumNetworkPolicy"
    assert p["shop/api-audit"]["stored"] is False and p["shop/api-audit"]["audit"] == 100
    lost = {"node_name": "node-9", "flows": [], "lost_events": [
        {"source": "PERF_EVENT_RING_BUFFER", "num_events_lost": "7", "cpu": 1},
        {"source": "OBSERVER_EVENTS_QUEUE", "num_events_lost": "3"}]}
    assert httpx.post(server + "/api/v1/flows", json=lost).status_code == 200
    time.sleep(1.1)  # the status numbers are refreshed at most once a second
    st = httpx.get(server + "/api/v1/dashboard/status").json()
    assert st["stored_flows"] >= 1030 and st["storage_bytes"] > 0
    assert st["lost_events"]["PERF_EVENT_RING_BUFFER"] >= 7 and st["lost_events"]["OBSERVER_EVENTS_QUEUE"] >= 3
    assert st["agents"]["connected"] >= 2 and {"node-1", "node-9"} <= {n["name"] for n in st["agents"]["nodes"]}


def test_live_stream_is_batched_and_counts_every_flow(server):
    with connect(server.replace("http", "ws") + "/api/v1/dashboard/live?q=--namespace%20shop",
                 max_size=64 * 2**20) as ws:
        snap = json.loads(ws.recv(timeout=10))
        assert snap["type"] == "snapshot"
        assert {(e["source"], e["target"]) for e in snap["map"]["edges"]} >= {("shop/frontend", "shop/api")}
        base = snap["map"]["flows_total"]
        t0 = time.monotonic()
        sent = 0
        for i in range(20):  # 20 ingest batches in quick succession
            sent += post(server, scenario_flows(time.time_ns(), 10, 1000))
        got, msgs, deadline = None, 0, time.monotonic() + 15
        while time.monotonic() < deadline:
            m = json.loads(ws.recv(timeout=10))
            msgs += 1
            assert m["type"] in ("delta", "idle") and len(m["flows"]) <= 40
            got = m["map"].get("flows_total", got)
            if got is not None and got - base >= sent:
                break
        elapsed = time.monotonic() - t0
        # every flow of the shop namespace is counted on the map, in few messages (tick 0.5 s)
        assert got - base == sent == 2000
        assert msgs <= elapsed / 0.5 + 2, (msgs, elapsed)


def test_slow_client_never_slows_ingest_and_skips_are_counted(server):
    url = server.replace("http", "ws") + "/api/v1/dashboard/live?q=--verdict%20DROPPED"
    with connect(url, max_size=64 * 2**20) as slow:
        json.loads(slow.recv(timeout=10))  # the snapshot; then this client stops reading for a while
        accepted = sum(post(server, scenario_flows(time.time_ns(), 100, 10**6)) for _ in range(10))
        assert accepted == 10_000
        time.sleep(1.5)
        st = httpx.get(server + "/api/v1/dashboard/status").json()
        assert st["server_lost"].get("dashboard queue", 0) == 0  # the worker kept up; nothing queued per client
        msgs = []
        end = time.monotonic() + 3
        while time.monotonic() < end:
            try:
                msgs.append(json.loads(slow.recv(timeout=1)))
            except TimeoutError:
                break
        assert msgs and all(m["type"] in ("delta", "idle") for m in msgs)
        last = msgs[-1]
        # the client saw every dropped flow counted on the map, but only a bounded sample of rows
        dropped = sum(e["classes"].get("dropped", 0) for m in msgs for e in m["map"]["edges"]
                      if e["id"] == "shop/batch->data/db")
        assert dropped > 0
        assert sum(len(m["flows"]) for m in msgs) < 1000
        assert last["client"]["skipped_rows"] > 0
