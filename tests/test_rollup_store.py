"""The flow rollup on real SQLite files: maintained at ingest through the API (thread and process writer),
equal to aggregates over the stored flows, the map and /api/v1/top-talkers from it, retention, and the
migration's backfill of an existing database."""

from __future__ import annotations

import itertools
import sqlite3
import time
import warnings

import msgspec
import pytest

with warnings.catch_warnings():  # starlette warns about its httpx-based client at import
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from api import db, migrate, rollup
from api.auth import allowed_roles
from api.dashboard import range_map
from api.retention import Retention, RetentionPolicy
from api.samples import sample_flows
from api.server import build_app
from api.store import FLOW_COLUMNS, FlowStore, prepare_batch
from flowscope import schema
from flowscope.query import FlowQuery

MIN = rollup.BUCKET_NS
NOW = time.time_ns()
T0 = NOW - NOW % MIN - 40 * MIN  # 40 minutes ago, on a minute boundary
STEP = 600_000_000  # 0.6 s: 3000 flows span 30 minutes


_seeds = itertools.count(100)


def flows_(n=3000, seed=None, start=T0):
    # a fresh seed per call: the ingest path's byte counters are per process and remember connections
    return sample_flows(n, seed=next(_seeds) if seed is None else seed, start_ns=start, step_ns=STEP)


def post_all(client, flows, size=400, **extra):
    for i in range(0, len(flows), size):
        r = client.post("/api/v1/flows", content=schema.encode({"flows": flows[i:i + size], **extra}))
        assert r.status_code == 200, r.text


def sql(path, query, *args):
    conn = sqlite3.connect(path)
    try:
        return conn.execute(query, args).fetchall()
    finally:
        conn.close()


@pytest.fixture(autouse=True)
def fresh_rollup_builder(monkeypatch):
    """Each test's server process starts with no connection byte counters (as a new server does)."""
    import api.store

    monkeypatch.setattr(api.store, "ROLLUP", rollup.RollupBuilder())


@pytest.fixture(params=[False, True], ids=["thread-writer", "process-writer"])
def served(tmp_path, request):
    path = tmp_path / "flows.db"
    app = build_app(f"sqlite:///{path}", writer_process=request.param)
    with TestClient(app) as c:
        yield c, path, app


def test_rollup_equals_aggregates_over_the_stored_flows(served):
    client, path, _ = served
    post_all(client, flows_())
    # per minute: flows (sample flows are never replies, so the rollup's direction is the stored one)
    want = sql(path, f"SELECT time_ns - time_ns % {MIN}, count(*) FROM flows GROUP BY 1 ORDER BY 1")
    got = sql(path, "SELECT bucket_ns, sum(flows) FROM flow_rollup GROUP BY 1 ORDER BY 1")
    assert got == want and sum(n for _, n in got) == 3000
    # per pod pair and verdict
    want = sql(path, "SELECT src_namespace || '/' || src_pod, dst_namespace || '/' || dst_pod, verdict, count(*), "
                     "min(time_ns), max(time_ns) FROM flows GROUP BY 1, 2, 3 ORDER BY 1, 2, 3")
    got = sql(path, "SELECT src_pod, dst_pod, verdict, sum(flows), min(first_ns), max(last_ns) FROM flow_rollup "
                    "GROUP BY 1, 2, 3 ORDER BY 1, 2, 3")
    assert got == want
    # per destination port and L7 responses
    want = sql(path, "SELECT upper(protocol) || '/' || dst_port, count(*) FROM flows WHERE dst_port IS NOT NULL "
                     "GROUP BY 1 ORDER BY 1")
    got = sql(path, "SELECT port, sum(flows) FROM flow_rollup WHERE port LIKE '%/%' GROUP BY 1 ORDER BY 1")
    assert got == want
    assert sql(path, "SELECT count(*) FROM flows WHERE l7_type = 'RESPONSE'") == \
        sql(path, "SELECT sum(responses) FROM flow_rollup")
    # one row per key: nothing to merge
    assert sql(path, "SELECT count(*) FROM (SELECT 1 FROM flow_rollup GROUP BY bucket_ns, src, src_pod, dst, dst_pod, "
                     "port, verdict, drop_reason, l7, latency, policy HAVING count(*) > 1)") == [(0,)]


def test_a_retried_batch_is_not_counted_twice(served):
    client, path, _ = served
    flows = flows_(300)
    body = schema.encode({"flows": flows, "batch_id": "node-a/boot/1"})
    assert client.post("/api/v1/flows", content=body).json() == {"accepted": 300}
    assert client.post("/api/v1/flows", content=body).json() == {"accepted": 300, "duplicate": True}
    assert sql(path, "SELECT sum(flows) FROM flow_rollup") == [(300,)]


def test_map_from_the_rollup_equals_the_map_of_the_flows(served):
    client, _, app = served
    post_all(client, flows_())
    store = app.state.store
    since, until = T0, T0 + 30 * MIN - 1  # whole minutes: the rollup's window is the same
    q = FlowQuery()
    fast = range_map(store, q, since, until, 10**6)
    slow = range_map(store, q, since, until, 10**6, use_rollup=False)
    assert (fast["source"], slow["source"]) == ("rollup", "flows")
    assert fast["flows"] == slow["flows"] == fast["scanned"] == 3000
    assert not fast["truncated"] and fast["rollup_since_ns"] == since and fast["rollup_until_ns"] == until + 1
    assert set(fast) - {"rollup_since_ns", "rollup_until_ns"} == set(slow)
    fe, se = {e["id"]: e for e in fast["edges"]}, {e["id"]: e for e in slow["edges"]}
    assert fe.keys() == se.keys()
    for k, s in se.items():
        f = fe[k]
        for field in ("flows", "verdicts", "classes", "bytes", "drop_reasons", "first_ns", "last_ns", "flow_rate"):
            assert f[field] == s[field], (k, field)
        assert f.get("l7") == s.get("l7"), k
        assert sorted(map(tuple, f["ports"])) == sorted(map(tuple, s["ports"]))
    assert {n["id"]: (n["flows_in"], n["flows_out"], n["drops"], n["num_pods"]) for n in fast["nodes"]} == \
        {n["id"]: (n["flows_in"], n["flows_out"], n["drops"], n["num_pods"]) for n in slow["nodes"]}
    assert sorted(fast["pods"], key=lambda p: p["id"]) == sorted(slow["pods"], key=lambda p: p["id"])
    # the route: no filter and a long window -> the rollup; a filter -> the flows
    r = client.get("/api/v1/dashboard/map", params={"since": "1h"})
    assert r.status_code == 200 and r.json()["source"] == "rollup" and r.json()["flows"] == 3000
    r = client.get("/api/v1/dashboard/map", params={"since": "1h", "q": "--verdict DROPPED"})
    assert r.status_code == 200 and r.json()["source"] == "flows"
    assert r.json()["flows"] == sum(e["classes"].get("dropped", 0) for e in fast["edges"])


def test_top_talkers_endpoint(served):
    client, path, _ = served
    post_all(client, flows_())
    r = client.get("/api/v1/top-talkers", params={"since": "1h", "limit": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["by"] == "pod" and len(body["items"]) == 5
    want = sql(path, "SELECT src_namespace || '/' || src_pod, dst_namespace || '/' || dst_pod, count(*) AS n "
                     "FROM flows GROUP BY 1, 2 ORDER BY n DESC")
    assert [it["flows"] for it in body["items"]] == [n for _, _, n in want[:5]]
    top = body["items"][0]
    assert (top["source"], top["destination"], top["flows"]) in want
    r = client.get("/api/v1/top-talkers", params={"since": "1h", "by": "namespace", "limit": 100})
    want = sql(path, "SELECT src_namespace, dst_namespace, count(*), sum(verdict = 'DROPPED') FROM flows "
                     "GROUP BY 1, 2")
    assert sorted((i["source"], i["destination"], i["flows"], i["drops"]) for i in r.json()["items"]) == sorted(want)
    # a window before the flows: nothing
    r = client.get("/api/v1/top-talkers", params={"since": "3h", "until": "2h"})
    assert r.status_code == 200 and r.json()["items"] == []


@pytest.mark.parametrize("params,status,words", [
    ({"by": "node"}, 400, ["invalid by 'node'", "pod, namespace"]),
    ({"limit": 0}, 400, ["invalid limit 0"]),
    ({"limit": 5000}, 400, ["invalid limit 5000"]),
    ({"limit": "many"}, 422, ["limit"]),
    ({"since": "yesterday-ish"}, 400, ["invalid time range"]),
    ({"since": "1h", "until": "2h"}, 400, ["is after until"]),
])
def test_top_talkers_bad_input(tmp_path, params, status, words):
    app = build_app(f"sqlite:///{tmp_path}/flows.db", writer_process=False)
    with TestClient(app) as client:
        r = client.get("/api/v1/top-talkers", params=params)
    assert r.status_code == status, r.text
    for w in words:
        assert w in r.json()["detail"]


def test_top_talkers_is_a_read_for_viewers_and_admins():
    assert allowed_roles("GET", "/api/v1/top-talkers") == allowed_roles("GET", "/api/v1/flows")
    assert "agent" not in allowed_roles("GET", "/api/v1/top-talkers")


def test_retention_deletes_the_rollup_with_the_flows(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path}/flows.db")
    migrate.upgrade(engine)
    store = FlowStore(engine)
    old = sample_flows(600, seed=1, start_ns=NOW - 3 * 3600 * 10**9, step_ns=STEP)  # ~3 h ago, 6 minutes
    new = sample_flows(600, seed=2, start_ns=NOW - 30 * MIN, step_ns=STEP)
    for part in (old, new):
        store.insert_batch([msgspec.structs.replace(f) for f in part])
    path = str(tmp_path / "flows.db")
    assert sql(path, "SELECT sum(flows) FROM flow_rollup") == [(1200,)]
    rep = Retention(engine, RetentionPolicy(max_age_s=3600, max_bytes=0, pause_s=0)).run_once()
    assert rep.deleted_by_age == 600 and rep.deleted_rollup_rows > 0
    assert sql(path, "SELECT sum(flows), min(bucket_ns) >= ? FROM flow_rollup", NOW - 3600 * 10**9 - MIN) == [(600, 1)]
    assert sql(path, "SELECT count(*) FROM flow_rollup_endpoints WHERE last_ns < ?", NOW - 3600 * 10**9) == [(0,)]
    assert sql(path, "SELECT count(*) FROM flow_rollup_endpoints") != [(0,)]
    engine.dispose()


def test_migration_backfills_the_rollup_of_an_existing_database(tmp_path):
    url = f"sqlite:///{tmp_path}/flows.db"
    engine = db.make_engine(url)
    migrate.upgrade(engine, "0004_alerts")
    flows = flows_(2500)
    batch = prepare_batch([msgspec.structs.replace(f) for f in flows], rollup=None)  # as stored before 0005
    for i, r in enumerate(batch.rows, 1):
        r[0] = i
    with engine.begin() as conn:
        cur = conn.connection.cursor()
        cur.executemany(f"INSERT INTO flows ({', '.join(FLOW_COLUMNS)}) VALUES ({', '.join('?' * len(FLOW_COLUMNS))})",
                        batch.rows)
    migrate.upgrade(engine)
    assert migrate.current_revision(engine) == migrate.head_revision()
    want_rows, want_eps = rollup.RollupBuilder().add_batch((f, f.time_ns) for f in flows)
    path = str(tmp_path / "flows.db")
    cols = ", ".join(rollup.ROLLUP_COLUMNS)
    got = sql(path, f"SELECT {cols} FROM flow_rollup")
    assert sorted(got) == sorted(tuple(r) for r in want_rows)
    assert sql(path, "SELECT count(*) FROM flow_rollup_endpoints") == [(len(want_eps),)]
    engine.dispose()
