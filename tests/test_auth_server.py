"""Authentication on the real server (uvicorn in its own process, listening beyond loopback, so tokens are
required without any flag): every route and websocket of the app refused without a token, websockets
accepted with one, no token in logs or in the database's flows, revocation from another process."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from api.app import Settings, create_app
from api.auth import allowed_roles, new_token
from api.samples import sample_flows
from flowscope import schema
from reliability_env import ServerProcess, wait_for
from test_auth import app_routes

ROOT = Path(__file__).resolve().parent.parent


def token_cli(db: str, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "flowscope.cli", "token", *args, "--db", db], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("authsrv")
    db = f"sqlite:///{d}/auth.db"
    tokens = {role: token_cli(db, "create", "--role", role, "--name", f"{role}-t") for role in ("agent", "viewer", "admin")}
    log = d / "server.log"
    srv = ServerProcess(db, host="0.0.0.0", log_path=str(log), log_level="info")  # beyond loopback: auth on
    srv.start()
    try:
        yield srv, tokens, db, log, d
    finally:
        srv.stop()


def ws_status(url: str, headers: dict | None = None) -> int:
    try:
        with ws_connect(url, additional_headers=headers or {}, open_timeout=10) as ws:
            ws.close()
        return 101
    except InvalidStatus as e:
        return e.response.status_code


def test_every_route_and_websocket_refused_without_a_token(server, tmp_path):
    srv, tokens, _, _, _ = server
    routes = app_routes(create_app(Settings(db_url=f"sqlite:///{tmp_path}/enum.db", writer_process=False)))
    assert any(k == "ws" for k, _, _ in routes)
    checked = 0
    with httpx.Client(base_url=srv.url, timeout=30, headers={"accept": "application/json"}) as c:
        for kind, path, method in routes:
            if allowed_roles(method, path, websocket=kind == "ws") is None:
                continue
            for creds in ({}, {"authorization": "Bearer " + new_token()}, {"cookie": "flowscope_token=nope"}):
                if kind == "ws":
                    status = ws_status(srv.ws_url + path, creds)
                else:
                    status = c.request(method, path, content=b"{}" if method in ("POST", "PUT", "PATCH") else None,
                                       headers=creds).status_code
                assert status == 401, (kind, method, path, creds, status)
                checked += 1
        assert c.get("/healthz").status_code == 200
    assert checked >= 45


def test_websockets_open_with_header_cookie_or_query_token(server):
    srv, tokens, _, _, _ = server
    v = tokens["viewer"]
    stream = srv.ws_url + "/api/v1/flows/stream"
    assert ws_status(stream, {"authorization": f"Bearer {v}"}) == 101
    assert ws_status(stream, {"cookie": f"flowscope_token={v}", "origin": srv.url}) == 101
    assert ws_status(stream + f"?token={v}") == 101
    assert ws_status(stream, {"authorization": f"Bearer {tokens['agent']}"}) == 403
    assert ws_status(stream, {"cookie": f"flowscope_token={v}", "origin": "http://evil.example"}) == 403


def test_tokens_never_reach_logs_or_stored_flows(server):
    srv, tokens, db, log, d = server
    agent, viewer = tokens["agent"], tokens["viewer"]
    flows = sample_flows(20, start_ns=time.time_ns(), node_name="secret-node")
    r = httpx.post(srv.url + "/api/v1/flows", content=schema.encode({"node_name": "secret-node", "flows": flows}),
                   headers={"authorization": f"Bearer {agent}"}, timeout=30)
    assert r.json() == {"accepted": 20}
    r = httpx.get(srv.url + f"/api/v1/flows?last=5&token={viewer}", timeout=30)
    assert r.status_code == 200 and len(r.text.splitlines()) == 5
    httpx.get(srv.url + "/api/v1/status?token=" + new_token(), timeout=30)  # refused; must not be logged either
    assert ws_status(srv.ws_url + f"/api/v1/flows/stream?token={viewer}") == 101
    time.sleep(0.5)
    text = log.read_text()
    assert "GET /api/v1/flows?last=5" in text  # the access log is on...
    for t in tokens.values():
        assert t not in text  # ...and never shows a token
    assert "fst_" not in text
    raw = b"".join(p.read_bytes() for p in d.glob("auth.db*"))
    assert b"secret-node" in raw and not any(t.encode() in raw for t in tokens.values())


def test_revoked_in_another_process_stops_working_within_seconds(server):
    srv, _, db, _, _ = server
    t = token_cli(db, "create", "--role", "viewer", "--name", "short-lived")
    h = {"authorization": f"Bearer {t}"}
    assert httpx.get(srv.url + "/api/v1/nodes", headers=h, timeout=10).status_code == 200  # new: works at once
    token_cli(db, "revoke", "short-lived")
    started = time.monotonic()
    wait_for(lambda: httpx.get(srv.url + "/api/v1/nodes", headers=h, timeout=10).status_code == 401, timeout=15,
             what="the revoked token to be refused")
    assert time.monotonic() - started < 7


def test_serving_beyond_loopback_without_auth_is_refused(tmp_path):
    code = ("from api.server import serve; "
            f"serve('sqlite:///{tmp_path}/x.db', '0.0.0.0', 1, 'warning', auth_required=False)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "without authentication" in r.stderr


def test_agent_shipper_keeps_data_when_its_token_is_refused(server, tmp_path):
    """A wrong token is an operator error, not bad data: the agent keeps its batches and delivers them
    once it has a valid token (here: the spool handed to a shipper with the right token)."""
    from probe.shipper import Shipper

    srv, tokens, _, _, _ = server
    spool = tmp_path / "spool"
    sh = Shipper(srv.url, "tok-node", token=tokens["viewer"], spool_dir=str(spool), flush_interval=0.05, max_backoff=0.3)
    sh.start()
    sh.put(sample_flows(300, start_ns=time.time_ns(), node_name="tok-node"))
    wait_for(lambda: sh.stats.failures >= 1 and sh.backlog_bytes() > 0, timeout=20, what="a refused batch")
    sh.close(deadline_s=0.5)
    assert sh.stats.rejected == 0 and sh.stats.lost_queue_full == 0 and sh.stats.shipped == 0
    good = Shipper(srv.url, "tok-node", token=tokens["agent"], spool_dir=str(spool), flush_interval=0.05)
    good.start()
    wait_for(good.idle, timeout=30, what="the spool to drain")
    good.close()
    assert good.stats.shipped == 300
    r = httpx.get(srv.url + "/api/v1/flows?node_name=tok-node&first=1000",
                  headers={"authorization": f"Bearer {tokens['viewer']}"}, timeout=30)
    assert len(r.text.splitlines()) == 300
