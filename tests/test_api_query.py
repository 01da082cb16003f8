"""GET /api/v1/flows and POST /api/v1/flows/query: Hubble semantics, NDJSON envelopes, 400s (TestClient)."""

from __future__ import annotations

import time
import warnings

import msgspec
import pytest

from api.samples import sample_flows
from api.server import build_app
from flowscope import schema

with warnings.catch_warnings():  # starlette warns about its httpx-based client at import
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

N = 400
STEP = 500_000_000  # 0.5 s apart: the newest flow is ~now, the oldest ~200 s ago


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("query")
    app = build_app(f"sqlite:///{tmp}/flows.db", writer_process=False)
    start = time.time_ns() - N * STEP
    flows = sample_flows(N, seed=21, start_ns=start, step_ns=STEP)
    with TestClient(app) as c:
        for i in range(0, N, 100):
            r = c.post("/api/v1/flows", content=schema.encode({"node_name": "n", "flows": flows[i:i + 100]}))
            assert r.status_code == 200
        yield c, flows


def envelopes(flows):
    return [schema.flow_envelope_json(f) for f in flows]


def get(client, query):
    r = client.get("/api/v1/flows" + query)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-ndjson"
    return r.content.splitlines()


def post(client, q):
    r = client.post("/api/v1/flows/query", content=q if isinstance(q, bytes) else msgspec.json.encode(q))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-ndjson"
    return r.content.splitlines()


def test_lines_are_hubble_envelopes(setup):
    client, flows = setup
    lines = get(client, "?last=3")
    assert lines == envelopes(flows[-3:])  # byte for byte
    env = msgspec.json.decode(lines[0])
    assert set(env) == {"flow", "node_name", "time"} and env["time"] == flows[-3].time


def test_counts_and_time_range(setup):
    client, flows = setup
    assert get(client, "") == envelopes(flows[-20:])  # Hubble's default
    assert get(client, "?last=7") == envelopes(flows[-7:])
    assert get(client, "?number=7") == envelopes(flows[-7:])
    assert get(client, "?first=7") == envelopes(flows[:7])
    since, until = flows[100].time, flows[149].time
    assert get(client, f"?since={since}&until={until}") == envelopes(flows[100:150])
    assert get(client, f"?since={since}&until={until}&first=5") == envelopes(flows[100:105])
    # Relative times are resolved against now: the last ~50 s hold the last ~100 flows.
    recent = get(client, "?since=50s")
    assert 80 <= len(recent) <= 110 and recent == envelopes(flows[-len(recent):])
    assert get(client, "?until=1970-01-02T00:00:00Z") == []


def test_filters_in_params(setup):
    client, flows = setup
    dropped = [f for f in flows if f.verdict == schema.Verdict.DROPPED]
    assert dropped
    assert get(client, "?verdict=DROPPED&last=1000") == envelopes(dropped)
    assert get(client, "?not_verdict=DROPPED&last=1000") == envelopes([f for f in flows if f not in dropped])
    dns = [f for f in flows if f.l4 and f.l4.UDP and f.l4.UDP.destination_port == 53 and f.source.namespace == "shop"]
    assert dns
    assert get(client, "?protocol=udp&destination_port=53&source_pod=shop/&last=1000") == envelopes(dns)
    # Two allowlist filters (OR), as `hubble observe --pod` makes: whitelist= JSON parameters.
    wl = '&'.join(f"whitelist={msgspec.json.encode(x).decode()}" for x in (
        {"source_pod": ["payments/"]}, {"destination_pod": ["payments/"]}))
    both = [f for f in flows if "payments" in (f.source.namespace, f.destination.namespace)]
    assert get(client, f"?{wl}&last=1000") == envelopes(both)


def test_post_query(setup):
    client, flows = setup
    q = {"whitelist": [{"verdict": ["FORWARDED"], "protocol": ["http"]}], "blacklist": [{"http_status_code": ["2+"]}],
         "number": 1000}
    want = [f for f in flows if f.verdict == schema.Verdict.FORWARDED and f.l7 and f.l7.http and f.l7.http.code >= 300]
    assert want
    assert post(client, q) == envelopes(want)
    assert post(client, {"number": 4, "first": True}) == envelopes(flows[:4])
    assert post(client, b"") == envelopes(flows[-20:])  # an empty body is the default query
    assert post(client, {"allowlist": [{"verdict": ["DROPPED"]}], "number": 2}) == envelopes(
        [f for f in flows if f.verdict == schema.Verdict.DROPPED][-2:])


@pytest.mark.parametrize("query,words", [
    ("?colour=red", ["unknown query parameter 'colour'"]),
    ("?verdict=SOMETIMES", ["verdict", "SOMETIMES"]),
    ("?since=yesterdayish", ["since"]),
    ("?last=-1", ["last"]),
    ("?last=5&first=5", ["only one of"]),
    ("?since=1m&until=2m", ["after until"]),
    ("?first=3&follow=true", ["first and follow"]),
    ("?source_ip=10.0.0.300", ["source_ip"]),
    ("?http_path=(unclosed", ["http_path"]),
    ("?whitelist={bad json", ["whitelist"]),
])
def test_bad_queries_get_400_with_a_message(setup, query, words):
    client, _ = setup
    r = client.get("/api/v1/flows" + query)
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    for w in words:
        assert w in detail, detail


@pytest.mark.parametrize("body,words", [
    (b"{", ["invalid JSON"]),
    (b"[]", ["JSON object"]),
    (b'{"number": "many"}', ["number"]),
    (b'{"whitelist": [{"verdikt": ["DROPPED"]}]}', ["verdikt", "valid filter fields"]),
    (b'{"since": "soon"}', ["since"]),
])
def test_bad_query_bodies_get_400(setup, body, words):
    client, _ = setup
    r = client.post("/api/v1/flows/query", content=body)
    assert r.status_code == 400, r.text
    for w in words:
        assert w in r.json()["detail"]
