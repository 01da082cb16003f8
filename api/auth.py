"""Authentication, roles and per-token rate limits for the Flowscope API.

**Tokens.** ``fst_`` + 32 random bytes (base64url). Only the SHA-256 of a token is stored (table
``api_tokens``); a token is shown once, when it is created (``flowscope token create`` or
``POST /api/v1/tokens``). Each token has a name and one role:

=========  =====================================================================================
``agent``  ingest (``POST /api/v1/flows``) and reading network policies (``GET /api/v1/policies``)
``viewer`` every read: queries, the live stream (websocket), status, nodes, the dashboard, ``/metrics``
``admin``  everything: also policies, alerts and tokens (any other POST/PUT/PATCH/DELETE)
=========  =====================================================================================

``/healthz`` and the login page are open. Everything else, including routes other modules add later,
is covered by :class:`AuthMiddleware` (an ASGI middleware, so the websocket and static files too); the
rule for a request is :func:`allowed_roles` (by method and path, default-deny to admin for anything that
is not a read).

**When.** Authentication is required whenever the server listens beyond loopback (``api.server.serve``
decides from ``--host``), and on loopback with ``flowscope server --auth``. Without it every request acts
as an anonymous admin, as before.

**How a client authenticates.** ``Authorization: Bearer <token>`` (agents, CLI, scripts); a browser logs
in at ``/login`` (or opens any page with ``?token=<token>`` once) and gets an HttpOnly, SameSite=Strict
cookie; the websocket accepts the header, the cookie or ``?token=``. A token in a query string is removed
from the request before anything logs it; tokens never appear in logs or flows. Cookie-authenticated
writes and websockets must come from the server's own origin.

**Rate limits.** A token bucket per token: ``rate`` requests/s with bursts of ``2 × rate`` (defaults per
role in :data:`DEFAULT_RATES`; ``--rate-limit`` on the server overrides them; a token's own
``rate_limit`` overrides both). Over the limit: ``429`` with ``Retry-After``. Limits are per server
process.

**Revocation** takes effect within ``refresh_s`` (5 s) in every server process (each keeps the active
tokens in memory and reloads them), immediately in the process that revoked it.

For other modules (dashboard, alerts, gRPC):

* ``Depends(require_role("viewer"))`` in a route returns the :class:`Principal` (403 otherwise);
  :func:`current_principal` reads it from a request or websocket;
* :func:`allow` declares extra access rules (e.g. a POST that only reads);
* ``app.state.auth.authenticate(token)`` checks a token outside HTTP (e.g. gRPC metadata).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import html
import ipaddress
import logging
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, Literal, Optional

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy import Engine, select, update
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection

from flowscope import schema

from .db import api_tokens_table

log = logging.getLogger("flowscope.auth")

AGENT, VIEWER, ADMIN = "agent", "viewer", "admin"
ROLES: tuple[str, ...] = (AGENT, VIEWER, ADMIN)
TOKEN_PREFIX = "fst_"
COOKIE_NAME = "flowscope_token"
COOKIE_MAX_AGE_S = 12 * 3600
STATE_KEY = "flowscope_principal"
DEFAULT_RATES: dict[str, float] = {AGENT: 100.0, VIEWER: 50.0, ADMIN: 50.0}  # requests/s per token

_TOKEN_LEN = len(TOKEN_PREFIX) + 43  # 32 bytes in unpadded base64url
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


# --------------------------------------------------------------------------------------------
# Tokens and principals (pure)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Principal:
    """Who a request acts as."""

    token_id: Optional[int]  # None: anonymous (authentication off)
    name: str
    role: str
    rate_limit: Optional[float] = None  # requests/s for this token (None: the role's)

    def to_json(self) -> dict[str, Any]:
        return {"token_id": self.token_id, "name": self.name, "role": self.role}


ANONYMOUS = Principal(None, "anonymous", ADMIN)


def new_token() -> str:
    """A fresh secret token (256 random bits)."""
    return TOKEN_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def hash_token(token: str) -> str:
    """What is stored: the SHA-256 of the token (hex). Tokens are random, so no salt or KDF is needed."""
    return hashlib.sha256(token.encode()).hexdigest()


def well_formed(token: str) -> bool:
    return len(token) == _TOKEN_LEN and token.startswith(TOKEN_PREFIX) and set(token[4:]) <= _TOKEN_CHARS


def bearer_token(header: str) -> Optional[str]:
    """The token of an ``Authorization: Bearer <token>`` header value (None otherwise)."""
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    value = value.strip()
    return value or None


def is_loopback_host(host: str) -> bool:
    """Whether listening on ``host`` keeps the server reachable from this machine only."""
    if host in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable from elsewhere


# --------------------------------------------------------------------------------------------
# Who may do what (pure)
# --------------------------------------------------------------------------------------------

_ANY = frozenset(ROLES)
_READERS = frozenset({VIEWER, ADMIN})
_ADMINS = frozenset({ADMIN})
_INGEST = frozenset({AGENT, ADMIN})

PUBLIC_PATHS = frozenset({"/healthz", "/login", "/logout"})
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Extra rules (path prefix, methods, roles), first match wins; see allow().
_rules: list[tuple[str, frozenset[str], frozenset[str]]] = [
    ("/api/v1/whoami", _READ_METHODS, _ANY),
    ("/api/v1/tokens", frozenset({"*"}), _ADMINS),
    ("/api/v1/flows/query", frozenset({"POST"}), _READERS),  # a query with a JSON body
    ("/api/v1/policies", _READ_METHODS, _ANY),  # agents enforce the policies they read
]


def allow(path_prefix: str, roles: Iterable[str], methods: Iterable[str] = ("GET", "HEAD")) -> None:
    """Declare who may call ``methods`` on ``path_prefix`` (and below it), e.g. a POST that only reads:
    ``allow("/api/v1/map/query", ["viewer"], ["POST"])``. Admin is always allowed. Checked after the
    built-in rules and before the defaults (reads: viewer; other methods: admin); the first match wins."""
    rs = frozenset(roles) | _ADMINS
    unknown = rs - _ANY
    if unknown:
        raise ValueError(f"unknown roles {sorted(unknown)}; roles are {', '.join(ROLES)}")
    _rules.append((path_prefix.rstrip("/") or "/", frozenset(m.upper() for m in methods), rs))


def allowed_roles(method: str, path: str, *, websocket: bool = False) -> Optional[frozenset[str]]:
    """The roles that may make this request, or None when it is open to anyone."""
    if len(path) > 1:
        path = path.rstrip("/") or "/"
    if path in PUBLIC_PATHS:
        return None
    method = "GET" if websocket else method.upper()
    for prefix, methods, roles in _rules:
        if (path == prefix or path.startswith(prefix + "/")) and ("*" in methods or method in methods):
            return roles
    if method == "POST" and path == "/api/v1/flows":
        return _INGEST
    if method in _READ_METHODS:
        return _READERS
    return _ADMINS


# --------------------------------------------------------------------------------------------
# Rate limits (pure)
# --------------------------------------------------------------------------------------------


class RateLimiter:
    """Token buckets by key: ``rate`` per second, bursts up to ``2 × rate`` (at least 10)."""

    def __init__(self) -> None:
        self._buckets: dict[Any, list[float]] = {}
        self._lock = threading.Lock()

    def allow(self, key: Any, rate: float, now: Optional[float] = None) -> tuple[bool, float]:
        """(allowed, seconds until the next request would be allowed)."""
        if rate <= 0:
            return True, 0.0
        now = time.monotonic() if now is None else now
        burst = max(10.0, 2 * rate)
        with self._lock:
            b = self._buckets.get(key)
            if b is None:
                if len(self._buckets) > 100_000:
                    self._buckets.clear()
                b = self._buckets[key] = [burst, now]
            tokens = min(burst, b[0] + (now - b[1]) * rate)
            b[1] = now
            if tokens >= 1.0:
                b[0] = tokens - 1.0
                return True, 0.0
            b[0] = tokens
            return False, (1.0 - tokens) / rate


# --------------------------------------------------------------------------------------------
# The token table
# --------------------------------------------------------------------------------------------


class TokenError(ValueError):
    """A token operation that cannot be done; ``status`` is the HTTP status for the API."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class TokenInfo:
    id: int
    name: str
    role: str
    created_ns: int
    last_used_ns: Optional[int]
    revoked_ns: Optional[int]
    rate_limit: Optional[float]

    def to_json(self) -> dict[str, Any]:
        fmt = schema.format_timestamp
        return {"id": self.id, "name": self.name, "role": self.role, "created": fmt(self.created_ns),
                "last_used": fmt(self.last_used_ns) if self.last_used_ns else None,
                "revoked": fmt(self.revoked_ns) if self.revoked_ns else None, "rate_limit": self.rate_limit}


def _check_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > 128 or any(not c.isprintable() for c in name):
        raise TokenError("a token name is 1-128 printable characters")
    return name


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise TokenError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    return role


class TokenStore:
    """Tokens in the ``api_tokens`` table (hashes only)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @staticmethod
    def _info(r: Any) -> TokenInfo:
        return TokenInfo(r.id, r.name, r.role, r.created_ns, r.last_used_ns, r.revoked_ns, r.rate_limit)

    def create(self, name: str, role: str, rate_limit: Optional[float] = None) -> tuple[TokenInfo, str]:
        """A new token: its record and the secret (shown once, never stored)."""
        name, role = _check_name(name), _check_role(role)
        if rate_limit is not None and not (0 <= rate_limit <= 1e6):
            raise TokenError("rate_limit is requests per second, 0 (unlimited) to 1000000")
        t = api_tokens_table.c
        token = new_token()
        now = time.time_ns()
        with self.engine.connect() as conn:
            conn.execution_options(sqlite_immediate=True)
            with conn.begin():
                taken = conn.execute(select(t.id).where(t.name == name, t.revoked_ns.is_(None))).first()
                if taken is not None:
                    raise TokenError(f"an active token named {name!r} exists (id {taken.id}); revoke it or "
                                     "choose another name", 409)
                new_id = conn.execute(api_tokens_table.insert().values(
                    name=name, role=role, token_hash=hash_token(token), rate_limit=rate_limit,
                    created_ns=now)).inserted_primary_key[0]
        return TokenInfo(int(new_id), name, role, now, None, None, rate_limit), token

    def list(self, include_revoked: bool = False) -> list[TokenInfo]:
        t = api_tokens_table.c
        stmt = select(api_tokens_table).order_by(t.id)
        if not include_revoked:
            stmt = stmt.where(t.revoked_ns.is_(None))
        with self.engine.connect() as conn:
            return [self._info(r) for r in conn.execute(stmt)]

    def revoke(self, ref: "int | str") -> TokenInfo:
        """Revoke the active token with this id (a number) or name."""
        t = api_tokens_table.c
        with self.engine.connect() as conn:
            conn.execution_options(sqlite_immediate=True)
            with conn.begin():
                stmt = select(api_tokens_table).where(t.revoked_ns.is_(None))
                if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
                    rows = conn.execute(stmt.where(t.id == int(ref))).all()
                else:
                    rows = conn.execute(stmt.where(t.name == ref)).all()
                if not rows:
                    raise TokenError(f"no active token {ref!r}", 404)
                r = rows[0]
                now = time.time_ns()
                conn.execute(update(api_tokens_table).where(t.id == r.id).values(revoked_ns=now))
        return TokenInfo(r.id, r.name, r.role, r.created_ns, r.last_used_ns, now, r.rate_limit)

    def active(self) -> dict[str, Principal]:
        """token hash -> principal, for every token not revoked."""
        t = api_tokens_table.c
        with self.engine.connect() as conn:
            rows = conn.execute(select(t.id, t.name, t.role, t.token_hash, t.rate_limit)
                                .where(t.revoked_ns.is_(None))).all()
        return {r.token_hash: Principal(r.id, r.name, r.role, r.rate_limit) for r in rows}

    def touch(self, used: dict[int, int]) -> None:
        """Record when tokens were last used (token id -> ns)."""
        if not used:
            return
        t = api_tokens_table.c
        with self.engine.connect() as conn:
            conn.execution_options(sqlite_immediate=True)
            with conn.begin():
                for token_id, ns in used.items():
                    conn.execute(update(api_tokens_table).where(t.id == token_id).values(last_used_ns=ns))


# --------------------------------------------------------------------------------------------
# The authenticator: the active tokens in memory
# --------------------------------------------------------------------------------------------


class Authenticator:
    """Checks tokens against an in-memory copy of the active ones, reloaded every ``refresh_s`` (and, at
    most every ``miss_refresh_s``, when an unknown well-formed token shows up: one created a moment ago by
    another process)."""

    def __init__(self, store: TokenStore, *, required: bool, rate_limit: Optional[float] = None,
                 refresh_s: float = 5.0, miss_refresh_s: float = 0.25, touch_every_s: float = 60.0) -> None:
        self.store = store
        self.required = required
        self.rate_limit = rate_limit  # overrides DEFAULT_RATES when not None (0 = unlimited)
        self.refresh_s = refresh_s
        self.miss_refresh_s = miss_refresh_s
        self.touch_every_s = touch_every_s
        self.limiter = RateLimiter()
        self.refused = 0
        self.limited = 0
        # hash prefix -> [(full hash, principal)]: found by prefix, then compared in constant time
        self._by_hash: Optional[dict[str, list[tuple[str, Principal]]]] = None
        self._loaded_at = -1e9
        self._used: dict[int, int] = {}
        self._touched_at = time.monotonic()
        self._lock = threading.Lock()

    # ---- cache ----

    def stale(self, now: Optional[float] = None) -> bool:
        now = time.monotonic() if now is None else now
        return self._by_hash is None or now - self._loaded_at >= self.refresh_s

    def may_refresh_for_miss(self) -> bool:
        return time.monotonic() - self._loaded_at >= self.miss_refresh_s

    def refresh(self) -> None:
        """Reload the active tokens (blocking: call from a thread in async code)."""
        try:
            loaded = self.store.active()
        except Exception as e:  # noqa: BLE001 - keep serving with what we have
            log.warning("reloading API tokens failed (%s); keeping the previous set", type(e).__name__)
            if self._by_hash is None:
                raise
            return
        index: dict[str, list[tuple[str, Principal]]] = {}
        for h, p in loaded.items():
            index.setdefault(h[:16], []).append((h, p))
        with self._lock:
            self._by_hash = index
            self._loaded_at = time.monotonic()

    def invalidate(self) -> None:
        with self._lock:
            self._loaded_at = -1e9

    def cached(self, token: str) -> Optional[Principal]:
        index = self._by_hash
        if not well_formed(token) or index is None:
            return None
        h = hash_token(token)
        for stored, p in index.get(h[:16], ()):
            if hmac.compare_digest(stored, h):
                return p
        return None

    def authenticate(self, token: str) -> Optional[Principal]:
        """The principal of ``token`` (None: unknown or revoked). Blocking; for non-HTTP callers."""
        if self.stale():
            self.refresh()
        p = self.cached(token)
        if p is None and well_formed(token) and self.may_refresh_for_miss():
            self.refresh()
            p = self.cached(token)
        return p

    async def authenticate_async(self, token: str) -> Optional[Principal]:
        if self.stale():
            await run_in_threadpool(self.refresh)
        p = self.cached(token)
        if p is None and well_formed(token) and self.may_refresh_for_miss():
            await run_in_threadpool(self.refresh)
            p = self.cached(token)
        return p

    # ---- usage ----

    def rate_for(self, p: Principal) -> float:
        if p.rate_limit is not None:
            return p.rate_limit
        if self.rate_limit is not None:
            return self.rate_limit
        return DEFAULT_RATES.get(p.role, 50.0)

    def note_used(self, p: Principal) -> bool:
        """Remember the use; True when it is time to write the last-use times (see :meth:`flush_used`)."""
        if p.token_id is None:
            return False
        self._used[p.token_id] = time.time_ns()
        return time.monotonic() - self._touched_at >= self.touch_every_s

    def flush_used(self) -> None:
        with self._lock:
            used, self._used = self._used, {}
            self._touched_at = time.monotonic()
        try:
            self.store.touch(used)
        except Exception as e:  # noqa: BLE001 - bookkeeping only
            log.warning("recording token use failed: %s", type(e).__name__)


def current_principal(conn: HTTPConnection) -> Optional[Principal]:
    """The principal the middleware attached to this request or websocket."""
    state = conn.scope.get("state") or {}
    return state.get(STATE_KEY)


def require_role(*roles: str) -> Callable[[HTTPConnection], Principal]:
    """A FastAPI dependency: the request's :class:`Principal` if its role is one of ``roles`` (admin is
    always allowed), else 401/403. ``Depends(require_role("viewer"))``."""
    allowed = frozenset(roles) | _ADMINS
    unknown = allowed - _ANY
    if unknown:
        raise ValueError(f"unknown roles {sorted(unknown)}")

    def dependency(conn: HTTPConnection) -> Principal:
        p = current_principal(conn)
        if p is None:
            raise HTTPException(401, "authentication required", headers={"WWW-Authenticate": "Bearer"})
        if p.role not in allowed:
            raise HTTPException(403, f"the {p.role} role may not do this")
        return p

    return dependency


# --------------------------------------------------------------------------------------------
# The middleware
# --------------------------------------------------------------------------------------------

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def _header(scope: Scope, name: bytes) -> str:
    for k, v in scope.get("headers") or ():
        if k == name:
            return v.decode("latin-1")
    return ""


def _cookie(scope: Scope, name: str) -> Optional[str]:
    for part in _header(scope, b"cookie").split(";"):
        k, _, v = part.strip().partition("=")
        if k == name and v:
            return v
    return None


def _take_query_token(scope: Scope) -> Optional[str]:
    """The ``token`` query parameter, removed from the request (so nothing downstream logs it)."""
    raw = scope.get("query_string") or b""
    if b"token=" not in raw:
        return None
    pairs = urllib.parse.parse_qsl(raw.decode("latin-1"), keep_blank_values=True)
    token = next((v for k, v in pairs if k == "token"), None)
    if token is None:
        return None
    scope["query_string"] = urllib.parse.urlencode([(k, v) for k, v in pairs if k != "token"]).encode("latin-1")
    return token or None


def _wants_html(scope: Scope) -> bool:
    return scope.get("method") == "GET" and "text/html" in _header(scope, b"accept")


def safe_next(target: str) -> str:
    """A same-site path to go to after login (never another site)."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target or any(ord(c) < 32 for c in target):
        return "/"
    return target


def _cookie_header(token: str, secure: bool, max_age: int = COOKIE_MAX_AGE_S) -> tuple[bytes, bytes]:
    value = f"{COOKIE_NAME}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}"
    return b"set-cookie", (value + ("; Secure" if secure else "")).encode("latin-1")


def _same_origin(scope: Scope) -> bool:
    origin = _header(scope, b"origin")
    if not origin:
        return scope["type"] == "http"  # browsers send Origin on cross-site writes and on every websocket
    host = _header(scope, b"host")
    parsed = urllib.parse.urlsplit(origin)
    return bool(host) and parsed.netloc == host


SMALL_BODY_PATHS = ("/login", "/logout", "/api/v1/tokens", "/api/v1/whoami")
SMALL_BODY_BYTES = 64 * 1024


def body_limit(path: str, default: int) -> int:
    """The largest request body a path may declare (Content-Length); routes enforce their own limits on
    what they read, this stops an oversized declared body before anything reads it."""
    if any(path == p or path.startswith(p + "/") for p in SMALL_BODY_PATHS):
        return SMALL_BODY_BYTES
    return default


class AuthMiddleware:
    """Authenticates every HTTP request and websocket, applies :func:`allowed_roles` and the rate limit,
    and attaches the :class:`Principal` (``scope["state"]["flowscope_principal"]``). Also answers 400 for
    an invalid and 413 for an oversized declared Content-Length, before any route reads the body."""

    def __init__(self, app: Any, auth: Authenticator, max_body_bytes: int = 64 << 20) -> None:
        self.app = app
        self.auth = auth
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        ws = kind == "websocket"
        auth = self.auth
        if not ws and (length := _header(scope, b"content-length")):
            limit = body_limit(scope["path"], self.max_body_bytes)
            if not length.isdigit():
                await self._deny(scope, receive, send, 400, f"invalid Content-Length {length[:40]!r}")
                return
            if int(length) > limit:
                await self._deny(scope, receive, send, 413,
                                 f"request body of {int(length)} bytes exceeds the limit of {limit} bytes")
                return
        token: Optional[str] = None
        source = ""
        header = _header(scope, b"authorization")
        query_token = _take_query_token(scope)
        if header:
            token, source = bearer_token(header), "header"
        elif (c := _cookie(scope, COOKIE_NAME)) is not None:
            token, source = c, "cookie"
        elif query_token is not None:
            token, source = query_token, "query"
        state = scope.setdefault("state", {})
        if not auth.required:
            state[STATE_KEY] = ANONYMOUS
            await self.app(scope, receive, send)
            return
        principal: Optional[Principal] = None
        if token:
            try:
                principal = await auth.authenticate_async(token)
            except Exception:  # noqa: BLE001 - the token table is unreachable and nothing is cached
                await self._deny(scope, receive, send, 503, "the token store is unavailable; retry")
                return
        if principal is not None:
            state[STATE_KEY] = principal
        method = scope.get("method", "GET")
        roles = allowed_roles(method, scope["path"], websocket=ws)
        if roles is None:
            await self.app(scope, receive, send)
            return
        if principal is None:
            auth.refused += 1
            if not ws and _wants_html(scope):
                await self._redirect_to_login(scope, send)
                return
            reason = "invalid or revoked token" if token else (
                "authentication required: send 'Authorization: Bearer <token>' (flowscope token create)")
            await self._deny(scope, receive, send, 401, reason)
            return
        if principal.role not in roles:
            auth.refused += 1
            await self._deny(scope, receive, send, 403,
                             f"the {principal.role} role may not {'open' if ws else method} {scope['path']}")
            return
        if source == "cookie" and (ws or method not in _READ_METHODS) and not _same_origin(scope):
            auth.refused += 1
            await self._deny(scope, receive, send, 403, "cross-origin request with a session cookie")
            return
        ok, wait = auth.limiter.allow(principal.token_id, auth.rate_for(principal))
        if not ok:
            auth.limited += 1
            await self._deny(scope, receive, send, 429,
                             f"rate limit of {auth.rate_for(principal):g} requests/s exceeded for token "
                             f"{principal.name!r}", retry_after=wait)
            return
        if auth.note_used(principal):
            asyncio.get_running_loop().run_in_executor(None, auth.flush_used)
        if source == "query" and not ws and _wants_html(scope):
            # A browser opened a link with ?token=: keep it in a cookie and drop it from the address bar.
            qs = scope.get("query_string") or b""
            location = scope.get("root_path", "") + scope["path"] + (("?" + qs.decode("latin-1")) if qs else "")
            await _respond(send, 303, b"", [(b"location", location.encode("latin-1")),
                                            _cookie_header(token or "", scope.get("scheme") == "https")],
                           content_type=b"text/plain")
            return
        await self.app(scope, receive, send)

    async def _redirect_to_login(self, scope: Scope, send: Send) -> None:
        qs = scope.get("query_string") or b""
        target = scope["path"] + (("?" + qs.decode("latin-1")) if qs else "")
        location = "/login?" + urllib.parse.urlencode({"next": target})
        await _respond(send, 303, b"", [(b"location", location.encode("latin-1"))], content_type=b"text/plain")

    async def _deny(self, scope: Scope, receive: Receive, send: Send, status: int, detail: str,
                    retry_after: float = 0.0) -> None:
        body = schema.encode({"detail": detail})
        headers: list[tuple[bytes, bytes]] = []
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        if status in (429, 503):
            headers.append((b"retry-after", str(max(1, int(retry_after + 0.999))).encode()))
        if scope["type"] == "http":
            await _respond(send, status, body, headers)
            return
        msg = await receive()  # websocket.connect
        if msg.get("type") != "websocket.connect":
            return
        if "websocket.http.response" in (scope.get("extensions") or {}):
            await send({"type": "websocket.http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())] + headers})
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1008, "reason": detail[:120]})


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]],
                   content_type: bytes = b"application/json") -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())] + headers})
    await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------------------------
# Routes: login page, token management, whoami
# --------------------------------------------------------------------------------------------

_LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Flowscope: sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font: 15px system-ui, sans-serif; background: #f4f5f7; display: flex; justify-content: center;
       align-items: center; min-height: 90vh; margin: 0; color: #1d2330; }}
form {{ background: #fff; padding: 2em 2.2em; border-radius: 8px; box-shadow: 0 1px 4px #0002; width: 24em; }}
h1 {{ font-size: 1.25em; margin: 0 0 1em; }}
input[type=password] {{ width: 100%; box-sizing: border-box; padding: .55em; font: 14px monospace; margin: .3em 0 1em; }}
button {{ padding: .55em 1.4em; font-size: 1em; }}
.err {{ color: #b00020; margin: 0 0 1em; }} small {{ color: #5b6170; display: block; margin-top: 1.2em; }}
</style></head>
<body><form method="post" action="/login">
<h1>Flowscope</h1>{error}
<label for="token">API token</label>
<input id="token" name="token" type="password" autocomplete="current-password" autofocus required>
<input type="hidden" name="next" value="{next}">
<button type="submit">Sign in</button>
<small>Create a token with <code>flowscope token create --role viewer --name NAME</code>.</small>
</form></body></html>
"""


def _login_page(next_path: str, error: str = "", status: int = 200) -> HTMLResponse:
    err = f'<p class="err">{html.escape(error)}</p>' if error else ""
    return HTMLResponse(_LOGIN_PAGE.format(error=err, next=html.escape(safe_next(next_path), quote=True)),
                        status_code=status, headers={"cache-control": "no-store"})


class TokenCreate(BaseModel):
    name: str = Field(min_length=1, max_length=128, description="What the token is for (unique among active tokens)")
    role: Literal["agent", "viewer", "admin"]
    rate_limit: Optional[float] = Field(default=None, ge=0, le=1e6,
                                        description="Requests/s for this token (default: the role's)")


class TokenOut(BaseModel):
    id: int
    name: str
    role: str
    created: str
    last_used: Optional[str] = None
    revoked: Optional[str] = None
    rate_limit: Optional[float] = None


class TokenCreated(TokenOut):
    token: str = Field(description="The secret: shown only in this answer")


class TokenList(BaseModel):
    tokens: list[TokenOut]


class WhoAmI(BaseModel):
    name: str
    role: str
    token_id: Optional[int] = None
    auth_required: bool


def create_auth_router(auth: Authenticator) -> APIRouter:
    router = APIRouter()
    admin = Depends(require_role(ADMIN))

    @router.get("/login", include_in_schema=False)
    async def login_page(request: Request, next: str = "/") -> Response:  # noqa: A002 - the query parameter
        if not auth.required:
            return RedirectResponse(safe_next(next), status_code=303)
        return _login_page(next)

    @router.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > 4096:
                return _login_page("/", "request too large", 413)
        form = urllib.parse.parse_qs(raw.decode("utf-8", "replace"))
        token = (form.get("token") or [""])[0].strip()
        target = safe_next((form.get("next") or ["/"])[0])
        if not auth.required:
            return RedirectResponse(target, status_code=303)
        p = await auth.authenticate_async(token) if token else None
        if p is None:
            auth.refused += 1
            return _login_page(target, "That token is not valid (or was revoked).", 401)
        if p.role == AGENT:
            return _login_page(target, "Agent tokens can only send flows; use a viewer or admin token.", 403)
        resp = RedirectResponse(target, status_code=303)
        k, v = _cookie_header(token, request.url.scheme == "https")
        resp.raw_headers.append((k, v))
        return resp

    @router.post("/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        resp = RedirectResponse("/login", status_code=303)
        k, v = _cookie_header("", request.url.scheme == "https", max_age=0)
        resp.raw_headers.append((k, v))
        return resp

    @router.get("/api/v1/whoami", tags=["auth"], summary="The caller's token name and role", response_model=WhoAmI)
    async def whoami(request: Request) -> Any:
        p = current_principal(request) or ANONYMOUS
        return WhoAmI(name=p.name, role=p.role, token_id=p.token_id, auth_required=auth.required)

    @router.get("/api/v1/tokens", tags=["auth"], summary="List API tokens (admin)", response_model=TokenList,
                dependencies=[admin])
    async def list_tokens(include_revoked: bool = False) -> Any:
        infos = await run_in_threadpool(auth.store.list, include_revoked)
        return {"tokens": [i.to_json() for i in infos]}

    @router.post("/api/v1/tokens", tags=["auth"], summary="Create an API token (admin); the secret is shown once",
                 status_code=201, response_model=TokenCreated, dependencies=[admin],
                 responses={409: {"description": "An active token has this name"}})
    async def create_token(body: TokenCreate) -> Any:
        try:
            info, token = await run_in_threadpool(auth.store.create, body.name, body.role, body.rate_limit)
        except TokenError as e:
            return JSONResponse({"detail": str(e)}, status_code=e.status)
        auth.invalidate()
        return {**info.to_json(), "token": token}

    @router.delete("/api/v1/tokens/{token_id}", tags=["auth"], summary="Revoke an API token (admin)",
                   response_model=TokenOut, dependencies=[admin], responses={404: {"description": "No such token"}})
    async def revoke_token(token_id: int) -> Any:
        try:
            info = await run_in_threadpool(auth.store.revoke, token_id)
        except TokenError as e:
            return JSONResponse({"detail": str(e)}, status_code=e.status)
        auth.invalidate()
        return info.to_json()

    return router


# --------------------------------------------------------------------------------------------
# Wiring
# --------------------------------------------------------------------------------------------


def install_auth(app: FastAPI, engine: Engine, *, required: bool, rate_limit: Optional[float] = None) -> Authenticator:
    """Add the middleware, the login/token routes and the OpenAPI security scheme to ``app``; the
    :class:`Authenticator` is ``app.state.auth``."""
    auth = Authenticator(TokenStore(engine), required=required, rate_limit=rate_limit)
    app.state.auth = auth
    settings = getattr(app.state, "settings", None)
    ceiling = max(64 << 20, int(getattr(settings, "max_body_bytes", 0)) + (1 << 20))
    app.add_middleware(AuthMiddleware, auth=auth, max_body_bytes=ceiling)
    app.include_router(create_auth_router(auth))
    base_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        doc = base_openapi()
        comps = doc.setdefault("components", {})
        comps.setdefault("securitySchemes", {}).update({
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "An API token (flowscope token create); required when the server "
                                      "listens beyond loopback or runs with --auth"},
            "cookie": {"type": "apiKey", "in": "cookie", "name": COOKIE_NAME,
                       "description": "Set by /login for browsers"},
        })
        doc["security"] = [{"bearer": []}, {"cookie": []}]
        for path, ops in doc.get("paths", {}).items():
            if allowed_roles("GET", path) is None:
                for op in ops.values():
                    if isinstance(op, dict):
                        op["security"] = []
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
    return auth


def log_startup_hint(auth: Authenticator, where: str) -> None:
    """Say whether authentication is on, and how to get a token when none exists."""
    if not auth.required:
        log.info("authentication is off (listening on loopback only); use --auth to require tokens")
        return
    try:
        n = len(auth.store.list())
    except Exception:  # noqa: BLE001
        return
    if n == 0:
        log.warning("authentication is required and no API token exists yet: create one with "
                    "`flowscope token create --role admin --name NAME --db %s`", where)
    else:
        log.info("authentication is required (%d active API tokens)", n)
