"""POST /api/v1/flows: validation, limits, what is stored, status and nodes (FastAPI TestClient, real SQLite)."""

from __future__ import annotations

import os
import signal
import time

import warnings

import msgspec
import pytest

with warnings.catch_warnings():  # starlette warns about its httpx-based client at import
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from api.samples import sample_flows
from api.server import build_app
from flowscope import schema

T0 = 1_732_000_000_000_000_000


@pytest.fixture
def client(tmp_path):
    app = build_app(f"sqlite:///{tmp_path}/flows.db", writer_process=False, max_body_bytes=200_000)
    with TestClient(app) as c:
        yield c


def post(client, obj):
    return client.post("/api/v1/flows", content=obj if isinstance(obj, bytes) else schema.encode(obj))


def ndjson(client, query=""):
    r = client.get("/api/v1/flows" + query)
    assert r.status_code == 200, r.text
    return r.content.splitlines()


def test_batch_object_and_bare_array(client):
    flows = sample_flows(30, seed=1, start_ns=T0)
    r = post(client, {"node_name": "node-a", "flows": flows[:20]})
    assert r.status_code == 200 and r.json() == {"accepted": 20}
    r = post(client, flows[20:])  # a bare JSON array of flows
    assert r.status_code == 200 and r.json() == {"accepted": 10}
    lines = ndjson(client, "?last=100")
    assert lines == [schema.flow_envelope_json(f) for f in flows]


@pytest.mark.parametrize("body,status,words", [
    (b"", 400, ["empty body"]),
    (b"{not json", 400, ["invalid JSON"]),
    (b'"flows"', 422, ["Expected `object | array`"]),
    (b'{"flows": {}}', 422, ["Expected `array`", "$.flows"]),
    (b'{"flows": [{"l4": {"TCP": {"source_port": "x"}}}]}', 422, ["$.flows[0].l4.TCP.source_port"]),
    (b'{"flows": [{}, {"verdict": "MAYBE"}]}', 422, ["$.flows[1].verdict", "Invalid enum value 'MAYBE'"]),
    (b'[{"time": "yesterday"}]', 422, ["$[0]", "invalid RFC 3339 timestamp"]),
    (b'{"flows": [{"l4": {"TCP": {}, "UDP": {}}}]}', 422, ["$.flows[0].l4", "oneof"]),
    (b'{"flows": [], "colour": 1}', 422, ["unknown field `colour`"]),
    (b'{"lost_events": [{"source": "NOPE", "num_events_lost": "1"}]}', 422, ["$.lost_events[0].source"]),
    (b'{"flows": [{"l4": {"UDP": {"destination_port": 70000}}}]}', 422, ["$.flows[0].l4.UDP.destination_port"]),
])
def test_bad_batches_are_rejected_with_the_path(client, body, status, words):
    r = post(client, body)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str)
    for w in words:
        assert w in detail, detail
    # Nothing of a rejected batch is stored.
    assert client.get("/api/v1/status").json()["num_flows"] == 0


def test_body_limit_413(client):
    flows = sample_flows(400, seed=2, start_ns=T0)  # ~400 KB of JSON, the limit here is 200 KB
    r = post(client, {"flows": flows})
    assert r.status_code == 413
    assert "exceeds the limit of 200000 bytes" in r.json()["detail"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        body = schema.encode({"flows": flows})
        for i in range(0, len(body), 65536):
            yield body[i:i + 65536]
    r = client.post("/api/v1/flows", content=chunks())
    assert r.status_code == 413
    assert client.get("/api/v1/status").json()["num_flows"] == 0


def test_large_bodies_are_decoded_in_a_thread(tmp_path):
    app = build_app(f"sqlite:///{tmp_path}/flows.db", writer_process=False, inline_decode_bytes=0)
    flows = sample_flows(50, seed=9, start_ns=T0)
    with TestClient(app) as c:
        assert post(c, {"flows": flows}).json() == {"accepted": 50}
        r = post(c, b'{"flows": [{"verdict": 7.5}]}')
        assert r.status_code == 422 and "$.flows[0].verdict" in r.json()["detail"]
        assert ndjson(c, "?last=100") == [schema.flow_envelope_json(f) for f in flows]


def test_node_name_and_time_filled_from_the_batch(client):
    r = post(client, {"node_name": "node-z", "agent_version": "9.9",
                      "flows": [{"verdict": "FORWARDED"}, {"verdict": "DROPPED", "node_name": "own"}]})
    assert r.status_code == 200
    env = [msgspec.json.decode(line) for line in ndjson(client)]
    assert [e["node_name"] for e in env] == ["node-z", "own"]
    assert env[0]["flow"]["node_name"] == "node-z" and env[0]["flow"]["time"] == env[0]["time"]
    assert abs(schema.parse_timestamp(env[0]["time"]) - time.time_ns()) < 60 * 10**9
    nodes = {n["name"]: n for n in client.get("/api/v1/nodes").json()["nodes"]}
    assert set(nodes) == {"node-z", "own"} and nodes["node-z"]["agent_version"] == "9.9"


def test_lost_events_and_status(client):
    flows = sample_flows(10, seed=3, start_ns=T0)
    r = post(client, {"node_name": "n", "flows": flows, "lost_events": [
        {"source": "PERF_EVENT_RING_BUFFER", "num_events_lost": "41", "cpu": 0},
        {"source": "OBSERVER_EVENTS_QUEUE", "num_events_lost": 1}]})
    assert r.status_code == 200
    st = client.get("/api/v1/status").json()
    assert st["num_flows"] == 10 and st["seen_flows"] == 10
    assert st["lost_events"] == {"PERF_EVENT_RING_BUFFER": 41, "OBSERVER_EVENTS_QUEUE": 1}
    assert st["oldest_flow_time"] == flows[0].time and st["newest_flow_time"] == flows[-1].time
    assert st["db_size_bytes"] > 0 and st["ingest"]["pending_batches"] == 0
    assert st["stream"] == {"subscribers": 0, "published_flows": 0, "dropped_flows": 0}


def test_storage_failure_is_503_not_500(client):
    from sqlalchemy import text

    store = client.app.state.store
    with store.engine.begin() as conn:
        conn.execute(text("ALTER TABLE flows RENAME TO flows_away"))
    try:
        r = post(client, sample_flows(3, seed=4, start_ns=T0))
        assert r.status_code == 503
        assert "storing the batch failed" in r.json()["detail"]
    finally:
        with store.engine.begin() as conn:
            conn.execute(text("ALTER TABLE flows_away RENAME TO flows"))
    assert post(client, sample_flows(3, seed=4, start_ns=T0)).status_code == 200  # and it recovers


def test_errors_are_json_detail(client):
    r = client.get("/api/v1/nope")
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
    r = client.put("/api/v1/flows")
    assert r.status_code == 405 and isinstance(r.json()["detail"], str)
    r = client.post("/api/v1/flows", content=b"[]", headers={"content-length": "abc"})
    assert r.status_code == 400


def test_healthz_docs_openapi_and_page(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/docs").status_code == 200
    doc = client.get("/openapi.json").json()
    comps = doc["components"]["schemas"]
    assert comps["Flow"]["properties"]["verdict"]["$ref"] == "#/components/schemas/Verdict"
    assert "POLICY_DENIED" in comps["DropReason"]["enum"]
    body = doc["paths"]["/api/v1/flows"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"$ref": "#/components/schemas/IngestBatch"} in body["oneOf"]
    assert comps["IngestBatch"]["properties"]["flows"]["items"] == {"$ref": "#/components/schemas/Flow"}
    get = doc["paths"]["/api/v1/flows"]["get"]
    assert "application/x-ndjson" in get["responses"]["200"]["content"]
    assert {"verdict", "source_pod", "since", "last"} <= {p["name"] for p in get["parameters"]}
    page = client.get("/")
    assert page.status_code == 200 and "/api/v1/flows/stream" not in page.text  # the URL is built in JS
    assert "dash-core.js" in page.text and "<table" in page.text and "//cdn" not in page.text
    js = client.get("/static/dash-core.js")
    assert js.status_code == 200 and "/api/v1/dashboard/live" in js.text


def test_writer_process_restarts_after_a_crash(tmp_path):
    app = build_app(f"sqlite:///{tmp_path}/flows.db", writer_process=True)
    with TestClient(app) as c:
        writer = app.state.writer
        assert post(c, sample_flows(5, seed=5, start_ns=T0)).status_code == 200
        first = writer.child_pid
        os.kill(first, signal.SIGKILL)
        r = post(c, sample_flows(5, seed=6, start_ns=T0 + 10**9))
        assert r.status_code == 200, r.text
        assert writer.child_pid not in (None, first)
        assert c.get("/api/v1/status").json()["num_flows"] == 10
        last = writer.child_pid
    # Shutting down the app ends the writer process.
    with pytest.raises(ProcessLookupError):
        for _ in range(50):
            os.kill(last, 0)
            time.sleep(0.1)
