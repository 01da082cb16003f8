"""API tokens, roles and rate limits (api/auth.py, flowscope token ...).

Pure rules and buckets; the token table on real SQLite; the app in-process (TestClient) for the full
role matrix over every route the app has (enumerated, so routes other modules add are covered); the
real CLI in a subprocess."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

from api.app import Settings, create_app
from api.auth import (ADMIN, AGENT, VIEWER, RateLimiter, TokenError, TokenStore, allowed_roles, bearer_token,
                      hash_token, is_loopback_host, new_token, safe_next, well_formed)
from api.db import make_engine
from api import migrate
from api.samples import sample_flows
from flowscope import schema

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# Pure parts
# --------------------------------------------------------------------------------------------


def test_tokens_are_random_well_formed_and_hashed():
    a, b = new_token(), new_token()
    assert a != b and well_formed(a) and well_formed(b) and a.startswith("fst_") and len(a) == 47
    assert hash_token(a) == hash_token(a) != hash_token(b) and len(hash_token(a)) == 64 and a not in hash_token(a)
    assert not well_formed("fst_short") and not well_formed(a[:-1] + "!") and not well_formed("x" * 47)


def test_bearer_header_parsing():
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer   abc  ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token("Bearer") is None and bearer_token("") is None


@pytest.mark.parametrize("host,loop", [("127.0.0.1", True), ("::1", True), ("localhost", True), ("127.3.4.5", True),
                                       ("0.0.0.0", False), ("::", False), ("10.0.0.1", False), ("example.org", False),
                                       ("", False)])
def test_loopback_hosts(host, loop):
    assert is_loopback_host(host) is loop


@pytest.mark.parametrize("method,path,ws,want", [
    ("GET", "/healthz", False, None),
    ("GET", "/login", False, None),
    ("POST", "/login", False, None),
    ("POST", "/api/v1/flows", False, {AGENT, ADMIN}),
    ("POST", "/api/v1/flows/", False, {AGENT, ADMIN}),
    ("GET", "/api/v1/flows", False, {VIEWER, ADMIN}),
    ("POST", "/api/v1/flows/query", False, {VIEWER, ADMIN}),
    ("GET", "/api/v1/flows/stream", True, {VIEWER, ADMIN}),
    ("GET", "/metrics", False, {VIEWER, ADMIN}),
    ("GET", "/", False, {VIEWER, ADMIN}),
    ("GET", "/static/app.js", False, {VIEWER, ADMIN}),
    ("GET", "/api/v1/policies", False, {AGENT, VIEWER, ADMIN}),
    ("GET", "/api/v1/policies/default/web", False, {AGENT, VIEWER, ADMIN}),
    ("POST", "/api/v1/policies", False, {ADMIN}),
    ("DELETE", "/api/v1/policies/default/web", False, {ADMIN}),
    ("GET", "/api/v1/tokens", False, {ADMIN}),
    ("GET", "/api/v1/whoami", False, {AGENT, VIEWER, ADMIN}),
    ("PUT", "/api/v1/alerts/rules/x", False, {ADMIN}),
    ("PATCH", "/anything/new", False, {ADMIN}),
    ("GET", "/anything/new", False, {VIEWER, ADMIN}),
])
def test_access_rules(method, path, ws, want):
    got = allowed_roles(method, path, websocket=ws)
    assert (got if got is None else set(got)) == want


def test_rate_limiter_buckets():
    rl = RateLimiter()
    t = 1000.0
    ok = [rl.allow("k", 5.0, now=t)[0] for _ in range(12)]
    assert ok == [True] * 10 + [False, False]  # burst max(10, 2*rate)
    allowed, wait = rl.allow("k", 5.0, now=t)
    assert not allowed and 0 < wait <= 0.2 + 1e-9
    assert rl.allow("k", 5.0, now=t + 0.2)[0]  # one token back after 1/rate seconds
    assert rl.allow("other", 5.0, now=t)[0]  # per key
    assert all(rl.allow("free", 0, now=t)[0] for _ in range(1000))  # 0 = unlimited


def test_login_redirect_targets_stay_on_site():
    assert safe_next("/flows?x=1") == "/flows?x=1"
    for bad in ("https://evil.example/", "//evil.example/x", "/\\evil", "javascript:alert(1)", "", "/a\nb"):
        assert safe_next(bad) == "/"


# --------------------------------------------------------------------------------------------
# The token table
# --------------------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path}/t.db")
    migrate.upgrade(engine)
    yield TokenStore(engine)
    engine.dispose()


def test_token_store_create_list_revoke(store, tmp_path):
    info, token = store.create("node-1", AGENT)
    assert info.id == 1 and info.role == AGENT and well_formed(token)
    assert store.active() == {hash_token(token): store.active()[hash_token(token)]}
    with pytest.raises(TokenError, match="exists") as e:
        store.create("node-1", VIEWER)
    assert e.value.status == 409
    with pytest.raises(TokenError, match="unknown role"):
        store.create("x", "root")
    with pytest.raises(TokenError, match="printable"):
        store.create("bad\nname", VIEWER)
    store.create("alice", VIEWER, rate_limit=3)
    assert [i.name for i in store.list()] == ["node-1", "alice"]
    assert store.revoke("node-1").revoked_ns
    assert [i.name for i in store.list()] == ["alice"]
    assert [i.name for i in store.list(include_revoked=True)] == ["node-1", "alice"]
    with pytest.raises(TokenError) as e:
        store.revoke("node-1")
    assert e.value.status == 404
    store.create("node-1", AGENT)  # the name is free again
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("t.db*"))  # the database and its WAL
    assert token.encode() not in raw and hash_token(token).encode() in raw  # only the hash is stored


# --------------------------------------------------------------------------------------------
# Every route, every role (in-process)
# --------------------------------------------------------------------------------------------


def walk_routes(routes, prefix=""):
    """(kind, path, methods) of every route, also inside included routers and mounts."""
    for r in routes:
        kind = type(r).__name__
        if kind == "_IncludedRouter":
            yield from walk_routes(r.original_router.routes, prefix + r.include_context.prefix)
        elif kind == "Mount":
            yield "mount", prefix + r.path + "/x.js", ["GET"]
        elif kind in ("APIWebSocketRoute", "WebSocketRoute"):
            yield "ws", prefix + r.path, ["GET"]
        else:
            yield "http", prefix + r.path, sorted(set(getattr(r, "methods", None) or ["GET"]) - {"HEAD"})


def concrete(path: str) -> str:
    return re.sub(r"\{token_id[^}]*\}", "1", re.sub(r"\{[^}]+\}", "x", path))


def app_routes(app) -> list[tuple[str, str, str]]:
    out = []
    for kind, path, methods in walk_routes(app.routes):
        for m in methods:
            out.append((kind, concrete(path), m))
    return sorted(set(out))


@pytest.fixture
def secured(tmp_path):
    db = f"sqlite:///{tmp_path}/a.db"
    app = create_app(Settings(db_url=db, writer_process=False, auth_required=True, rate_limit=0))
    st = TokenStore(make_engine(db))
    tokens = {role: st.create(f"{role}-1", role)[1] for role in (AGENT, VIEWER, ADMIN)}
    with TestClient(app) as c:
        yield app, c, tokens, st


def _call(c: TestClient, kind: str, path: str, method: str, headers: dict) -> int:
    """The HTTP status (websockets: 101 when accepted, the denial status otherwise)."""
    if kind == "ws":
        try:
            with c.websocket_connect(path, headers=headers) as ws:
                ws.close()
            return 101
        except WebSocketDenialResponse as e:
            return e.status_code
        except WebSocketDisconnect as e:
            return 1000 + e.code  # closed before accept
    body = b"{}" if method in ("POST", "PUT", "PATCH") else None
    return c.request(method, path, content=body, headers={"accept": "application/json", **headers}).status_code


def test_every_route_refuses_requests_without_a_valid_token(secured):
    app, c, tokens, _ = secured
    routes = app_routes(app)
    kinds = {k for k, _, _ in routes}
    assert {"http", "ws", "mount"} <= kinds and len(routes) >= 15
    refused, open_ = [], []
    for kind, path, method in routes:
        for headers in ({}, {"authorization": "Bearer " + new_token()}, {"authorization": "Bearer garbage"},
                        {"cookie": "flowscope_token=" + new_token()}):
            status = _call(c, kind, path, method, headers)
            if allowed_roles(method, path, websocket=kind == "ws") is None:
                open_.append((path, status))
                continue
            assert status == 401, (kind, method, path, headers, status)
            refused.append(path)
    assert {p for p, _ in open_} <= {"/healthz", "/login", "/logout"}
    assert "/api/v1/flows/stream" in refused and "/metrics" in refused and "/" in refused


def test_roles_get_exactly_what_the_rules_allow(secured):
    app, c, tokens, _ = secured
    for kind, path, method in app_routes(app):
        roles = allowed_roles(method, path, websocket=kind == "ws")
        if roles is None:
            continue
        for role, token in tokens.items():
            if kind == "ws" and role in roles:
                continue  # accepted websockets: against the real server in test_auth_server.py
            status = _call(c, kind, path, method, {"authorization": f"Bearer {token}"})
            if role in roles:
                assert status not in (401, 403, 1008 + 1000), (role, kind, method, path, status)
            else:
                assert status == 403, (role, kind, method, path, status)


def test_agent_can_ingest_and_viewer_can_read_but_not_write(secured):
    _, c, tokens, _ = secured
    body = schema.encode({"node_name": "n1", "flows": sample_flows(5, node_name="n1")})
    assert c.post("/api/v1/flows", content=body, headers={"authorization": f"Bearer {tokens[AGENT]}"}).json() == \
        {"accepted": 5}
    r = c.post("/api/v1/flows", content=body, headers={"authorization": f"Bearer {tokens[VIEWER]}"})
    assert r.status_code == 403 and "viewer" in r.json()["detail"]
    r = c.get("/api/v1/flows?first=10", headers={"authorization": f"Bearer {tokens[VIEWER]}"})
    assert r.status_code == 200 and len(r.text.splitlines()) == 5
    assert c.get("/api/v1/flows", headers={"authorization": f"Bearer {tokens[AGENT]}"}).status_code == 403
    who = c.get("/api/v1/whoami", headers={"authorization": f"Bearer {tokens[AGENT]}"}).json()
    assert who == {"name": "agent-1", "role": "agent", "token_id": 1, "auth_required": True}


def test_browser_token_link_becomes_a_cookie_and_login_page_works(secured):
    _, c, tokens, _ = secured
    html = {"accept": "text/html"}
    r = c.get("/", headers=html, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login?next=%2F"
    assert "API token" in c.get("/login").text
    r = c.get(f"/api/v1/status?x=1&token={tokens[VIEWER]}", headers=html, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/api/v1/status?x=1"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and tokens[VIEWER] in cookie
    c.cookies.clear()
    r = c.get("/api/v1/status", headers={"cookie": f"flowscope_token={tokens[VIEWER]}"})
    assert r.status_code == 200 and "num_flows" in r.json()
    # a write with a cookie from another origin is refused (admin cookie, cross-site form)
    r = c.post("/api/v1/tokens", json={"name": "x", "role": "viewer"},
               headers={"cookie": f"flowscope_token={tokens[ADMIN]}", "origin": "https://evil.example"})
    assert r.status_code == 403 and "cross-origin" in r.json()["detail"]
    # the login form
    r = c.post("/login", content=f"token={tokens[VIEWER]}&next=/api/v1/status",
               headers={"content-type": "application/x-www-form-urlencoded"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/api/v1/status" and "flowscope_token=" in r.headers["set-cookie"]
    c.cookies.clear()
    r = c.post("/login", content="token=fst_wrong&next=https://evil.example/",
               headers={"content-type": "application/x-www-form-urlencoded"}, follow_redirects=False)
    assert r.status_code == 401 and "not valid" in r.text and "evil" not in r.text
    r = c.post("/login", content=f"token={tokens[AGENT]}", headers={"content-type": "application/x-www-form-urlencoded"},
               follow_redirects=False)
    assert r.status_code == 403
    r = c.post("/logout", follow_redirects=False)
    assert r.status_code == 303 and "Max-Age=0" in r.headers["set-cookie"]


def test_websocket_refuses_a_cross_origin_cookie(secured):
    _, c, tokens, _ = secured
    # a cookie from another origin cannot open the stream (cross-site websocket hijacking)
    with pytest.raises(WebSocketDenialResponse) as e:
        with c.websocket_connect("/api/v1/flows/stream", headers={"cookie": f"flowscope_token={tokens[VIEWER]}",
                                                                  "origin": "https://evil.example"}):
            pass
    assert e.value.status_code == 403


def test_tokens_api_create_use_revoke(secured):
    _, c, tokens, _ = secured
    admin = {"authorization": f"Bearer {tokens[ADMIN]}"}
    r = c.post("/api/v1/tokens", json={"name": "node-9", "role": "agent"}, headers=admin)
    assert r.status_code == 201
    new = r.json()
    assert well_formed(new["token"]) and new["role"] == "agent"
    listed = c.get("/api/v1/tokens", headers=admin).json()["tokens"]
    assert "node-9" in [t["name"] for t in listed] and all("token" not in t for t in listed)
    assert new["token"] not in c.get("/api/v1/tokens", headers=admin).text
    mine = {"authorization": f"Bearer {new['token']}"}
    assert c.get("/api/v1/whoami", headers=mine).json()["name"] == "node-9"
    assert c.post("/api/v1/tokens", json={"name": "node-9", "role": "agent"}, headers=admin).status_code == 409
    assert c.post("/api/v1/tokens", json={"name": "x", "role": "root"}, headers=admin).status_code == 422
    assert c.delete(f"/api/v1/tokens/{new['id']}", headers=admin).json()["revoked"]
    assert c.get("/api/v1/whoami", headers=mine).status_code == 401  # at once in this process
    assert c.delete("/api/v1/tokens/999", headers=admin).status_code == 404


def test_rate_limit_per_token(tmp_path):
    db = f"sqlite:///{tmp_path}/r.db"
    app = create_app(Settings(db_url=db, writer_process=False, auth_required=True))
    st = TokenStore(make_engine(db))
    slow = st.create("slow", VIEWER, rate_limit=2)[1]
    other = st.create("other", VIEWER)[1]
    with TestClient(app) as c:
        codes = [c.get("/api/v1/nodes", headers={"authorization": f"Bearer {slow}"}).status_code for _ in range(14)]
        assert codes[:10] == [200] * 10 and set(codes[10:]) == {429}
        r = c.get("/api/v1/nodes", headers={"authorization": f"Bearer {slow}"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and "slow" in r.json()["detail"]
        assert c.get("/api/v1/nodes", headers={"authorization": f"Bearer {other}"}).status_code == 200
        assert c.get("/healthz").status_code == 200


def test_without_auth_everything_is_open_as_before(tmp_path):
    app = create_app(Settings(db_url=f"sqlite:///{tmp_path}/o.db", writer_process=False))
    with TestClient(app) as c:
        assert c.get("/api/v1/status").status_code == 200
        assert c.get("/api/v1/whoami").json() == {"name": "anonymous", "role": "admin", "token_id": None,
                                                  "auth_required": False}
        assert c.get("/login?next=/x", follow_redirects=False).headers["location"] == "/x"


def test_openapi_declares_the_schemes(secured):
    _, c, tokens, _ = secured
    doc = c.get("/openapi.json", headers={"authorization": f"Bearer {tokens[VIEWER]}"}).json()
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "cookie"}
    assert doc["paths"]["/healthz"]["get"]["security"] == []


# --------------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------------


def flowscope(*args: str, db: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flowscope.cli", "token", *args, "--db", db], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_token_cli(tmp_path):
    db = f"sqlite:///{tmp_path}/cli.db"
    r = flowscope("create", "--role", "admin", "--name", "ops", db=db)
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert well_formed(token) and "shown only now" in r.stderr and token not in r.stderr
    r = flowscope("create", "--role", "agent", "--name", "node-1", "--rate-limit", "500", db=db)
    assert r.returncode == 0
    listed = flowscope("list", db=db)
    assert listed.returncode == 0 and "ops" in listed.stdout and "node-1" in listed.stdout and "500" in listed.stdout
    assert token not in listed.stdout and "fst_" not in listed.stdout
    dup = flowscope("create", "--role", "viewer", "--name", "ops", db=db)
    assert dup.returncode == 1 and "exists" in dup.stderr and "Traceback" not in dup.stderr
    bad = flowscope("create", "--role", "root", "--name", "x", db=db)
    assert bad.returncode == 2 and "root" in bad.stderr
    assert flowscope("revoke", "ops", db=db).returncode == 0
    gone = flowscope("revoke", "ops", db=db)
    assert gone.returncode == 1 and "no active token" in gone.stderr
    js = flowscope("list", "--all", "-o", "json", db=db)
    assert '"revoked": "' in js.stdout and token not in js.stdout
