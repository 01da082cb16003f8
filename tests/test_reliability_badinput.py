"""Bad input: oversized and malformed bodies on every route that takes one get a 4xx with a message (real
server process); the ingest decoder, the policy parser (over HTTP) and the CNI plugin's parsers (the
whole request pipeline the agent's CNI service runs) are fuzzed with hypothesis and answer garbage with
clear errors, never an internal error or a traceback."""

from __future__ import annotations

import copy
import json
import socket

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api import migrate
from api.app import Settings, create_app
from api.auth import TokenStore
from api.db import make_engine
from api.samples import sample_flows
from flowscope import schema
from fuzz_docs import mutated
from reliability_env import ServerProcess
from test_auth import app_routes

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    d = tmp_path_factory.mktemp("badinput")
    url = f"sqlite:///{d}/b.db"
    engine = make_engine(url)
    migrate.upgrade(engine)
    token = TokenStore(engine).create("admin", "admin")[1]
    engine.dispose()
    with ServerProcess(url, settings_code="auth_required=True, rate_limit=0") as srv:
        yield srv, {"authorization": f"Bearer {token}"}, d


def body_routes(tmp_path) -> list[tuple[str, str]]:
    app = create_app(Settings(db_url=f"sqlite:///{tmp_path}/enum.db", writer_process=False))
    out = [(m, p) for kind, p, m in app_routes(app) if kind == "http" and m in ("POST", "PUT", "PATCH")]
    assert ("POST", "/api/v1/flows") in out and len(out) >= 6
    return out


def test_oversized_bodies_are_413_on_every_route(live, tmp_path):
    srv, auth, _ = live
    big = b"[" + b"0," * (20 * MiB) + b"0]"  # 40 MiB: above every route's limit (ingest takes 32 MiB)

    def chunks():
        for i in range(0, len(big), MiB):
            yield big[i:i + MiB]

    with httpx.Client(base_url=srv.url, headers={**auth, "content-type": "application/json"}, timeout=60) as c:
        for method, path in body_routes(tmp_path):
            r = c.request(method, path, content=big)
            assert r.status_code == 413, (method, path, r.status_code, r.text[:200])
            assert r.json()["detail"]
            r = c.request(method, path, content=chunks())  # chunked: no Content-Length to check up front
            ignores_body = path == "/logout"
            assert r.status_code < 500 and (ignores_body or r.status_code >= 400), (
                method, path, "chunked", r.status_code, r.text[:200])
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:  # a client httpx refuses to be
            sock.sendall(b"POST /api/v1/flows HTTP/1.1\r\nHost: x\r\nContent-Length: 12abc\r\n\r\n[]")
            assert sock.recv(100).startswith(b"HTTP/1.1 400")
        assert c.get("/healthz").status_code == 200


MALFORMED = [
    b"", b"{", b"}", b"null", b"[1,2", b"\xff\xfe\x00garbage", b'{"flows": "nope"}', b'{"flows": [{"time": []}]}',
    b'{"flows": [], "batch_id": "' + b"x" * 500 + b'"}', b"[" * 100_000 + b"]" * 100_000,
    b'{"a": ' * 5000 + b"1" + b"}" * 5000, b'{"flows": [{"verdict": "MAYBE"}]}', b"1e999999", b'"\\ud800"',
    b"apiVersion: cilium.io/v2\nkind: [", b"\x00" * 1000, b'{"flows": [{"time": "2026-13-45T99:00:00Z"}]}',
    b'{"flows": [{"time": "2026-02-30T00:00:00.123Z"}]}', b'{"flows": [{"time": "yesterday"}]}',
]


def test_malformed_bodies_are_4xx_on_every_route(live, tmp_path):
    srv, auth, d = live
    before = httpx.get(srv.url + "/api/v1/status", headers=auth, timeout=30).json()["num_flows"]
    with httpx.Client(base_url=srv.url, headers=auth, timeout=60) as c:
        for method, path in body_routes(tmp_path):
            for ctype in ("application/json", "application/yaml", "text/plain", "application/x-www-form-urlencoded"):
                for body in MALFORMED:
                    r = c.request(method, path, content=body, headers={"content-type": ctype})
                    assert r.status_code < 500, (method, path, ctype, body[:60], r.status_code, r.text[:300])
                    if path.startswith("/api/") and r.status_code >= 400:
                        assert r.json()["detail"], (method, path)
    assert httpx.get(srv.url + "/api/v1/status", headers=auth, timeout=30).json()["num_flows"] == before
    log = "\n".join(p.read_text(errors="replace") for p in d.glob("*.log"))
    assert "Traceback" not in log


# ---- the ingest decoder, fuzzed in-process -----------------------------------------------------

_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) |
                     st.text(max_size=20), lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
                     max_leaves=20)
_VALID = json.loads(schema.encode({"node_name": "n", "batch_id": "n/b/1", "flows": sample_flows(2, node_name="n")}))


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


_ALL_PATHS = [p for p in _paths(_VALID) if p]


@pytest.fixture(scope="module")
def app_client(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzzapp")
    app = create_app(Settings(db_url=f"sqlite:///{d}/f.db", writer_process=False))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.sampled_from(_ALL_PATHS), _json), min_size=1, max_size=3), st.integers(0, 10**9))
def test_fuzz_ingest_mutated_batches(app_client, mutations, seq):
    doc = copy.deepcopy(_VALID)
    doc["batch_id"] = f"n/fuzz/{seq}"
    doc = mutated(doc, mutations)
    r = app_client.post("/api/v1/flows", content=json.dumps(doc).encode())
    assert r.status_code in (200, 400, 413, 422), (r.status_code, r.text[:300])
    if r.status_code != 200:
        assert r.json()["detail"]


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(st.binary(max_size=300), _json.map(lambda v: json.dumps(v).encode()),
                 st.text(max_size=300).map(str.encode)))
def test_fuzz_policy_api_with_garbage(app_client, body):
    for ctype in ("application/json", "application/yaml"):
        r = app_client.post("/api/v1/policies", content=body, headers={"content-type": ctype})
        assert r.status_code in (200, 201, 400, 409, 413, 415, 422), (r.status_code, r.text[:300])
        if r.status_code >= 400:
            assert r.json().get("detail") or r.json().get("errors")


# ---- the CNI plugin's parsers: the pipeline the agent's CNI service runs ------------------------

_NET = {"cniVersion": "1.0.0", "name": "fuzznet", "type": "flowscope-cni",
        "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.99.0.0/24"}]]}}
_NET_PATHS = [p for p in _paths(_NET) if p and "logFile" not in p]
_COMMANDS = st.sampled_from(["ADD", "DEL", "CHECK", "STATUS", "VERSION", "GC", "add", "", "FROB"])
_ENV = st.fixed_dictionaries({
    "CNI_COMMAND": _COMMANDS,
    "CNI_CONTAINERID": st.text(max_size=40),
    "CNI_NETNS": st.sampled_from(["/nonexistent/netns/fuzz", "", "relative", "/proc/0/ns/net"]),
    "CNI_IFNAME": st.text(max_size=20),
    "CNI_PATH": st.just("/nonexistent/cni/bin"),
}, optional={"CNI_ARGS": st.text(max_size=60)})


@pytest.fixture(scope="module")
def cni_state(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cnistate"))


def _cni_check(env: dict, stdin: bytes, state: str) -> None:
    from cni.commands import execute
    from cni.errors import INTERNAL

    env = dict(env, FLOWSCOPE_STATE_DIR=state)
    resp = execute(env, stdin, agent=True)
    if resp.status == 0:
        # the network namespace never exists: nothing can have been attached
        assert env["CNI_COMMAND"] not in ("ADD", "CHECK"), (env, resp.stdout[:300])
        return
    err = json.loads(resp.stdout)
    assert isinstance(err["code"], int) and err["msg"], err
    assert err["code"] != INTERNAL, f"the plugin failed internally on garbage: {err}"
    assert b"Traceback" not in resp.stdout + resp.stderr


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(_ENV, st.one_of(st.binary(max_size=200), _json.map(lambda v: json.dumps(v).encode())))
def test_fuzz_cni_requests_with_garbage(cni_state, env, stdin):
    _cni_check(env, stdin, cni_state)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(_ENV, st.lists(st.tuples(st.sampled_from(_NET_PATHS), _json), min_size=1, max_size=3))
def test_fuzz_cni_mutated_network_config(cni_state, env, mutations):
    conf = mutated(_NET, mutations)
    _cni_check(env, json.dumps(conf).encode(), cni_state)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_cni_service_wire_format(data):
    from cni.service import parse_request

    parsed = parse_request(data)
    assert parsed is None or (isinstance(parsed[0], dict) and isinstance(parsed[1], bytes))
