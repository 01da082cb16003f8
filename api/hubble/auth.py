"""Token auth for the Hubble API: token files, the ``authorization`` header, a gRPC server interceptor.

Roles follow Flowscope's API roles: ``viewer`` and ``admin`` may read flows; ``agent`` tokens (ingest only)
are refused with PERMISSION_DENIED; a missing or unknown token gets UNAUTHENTICATED. The gRPC health
service is always open (load balancers and ``hubble status`` probe it). Tokens are compared by their
SHA-256 digest in constant time and never logged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

import grpc

from .config import Authorizer

ROLES = ("viewer", "admin", "agent")
READ_ROLES = frozenset({"viewer", "admin"})
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


class TokenFileError(ValueError):
    """A token file that cannot be used; the message names the file and line (never the token)."""


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def load_token_file(path: str | Path) -> dict[str, str]:
    """``{sha256 hex: role}`` from a token file (see :mod:`api.hubble.config`)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise TokenFileError(f"cannot read token file {p}: {e.strerror}") from None
    out: dict[str, str] = {}
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) == 1:
            role, tok = "viewer", parts[0]
        elif len(parts) == 2:
            role, tok = parts
        else:
            raise TokenFileError(f"{p}:{no}: expected '[ROLE ]TOKEN' or '[ROLE ]sha256:HEX'")
        if role not in ROLES:
            raise TokenFileError(f"{p}:{no}: unknown role {role!r}; roles: {', '.join(ROLES)}")
        if tok.startswith("sha256:"):
            hexd = tok[7:].lower()
            if len(hexd) != 64 or any(c not in "0123456789abcdef" for c in hexd):
                raise TokenFileError(f"{p}:{no}: sha256: must be followed by 64 hex digits")
            out[hexd] = role
        else:
            if len(tok) < 16:
                raise TokenFileError(f"{p}:{no}: token too short (at least 16 characters)")
            out[digest(tok)] = role
    if not out:
        raise TokenFileError(f"token file {p} holds no token")
    return out


def file_authorizer(path: str | Path) -> Authorizer:
    table = load_token_file(path)

    def authorize(token: str) -> Optional[str]:
        d = digest(token)
        role = None
        for known, r in table.items():  # constant time per entry, no early exit on a match
            if hmac.compare_digest(known, d):
                role = r
        return role

    return authorize


def token_from_metadata(metadata: Any) -> Optional[str]:
    """The token of an ``authorization`` header: ``Bearer T`` or ``Basic base64(user:T)``."""
    value = None
    for k, v in metadata or ():
        if k.lower() == "authorization":
            value = v if isinstance(v, str) else v.decode(errors="replace")
            break
    if not value:
        return None
    scheme, _, cred = value.strip().partition(" ")
    scheme = scheme.lower()
    cred = cred.strip()
    if scheme == "bearer" and cred:
        return cred
    if scheme == "basic" and cred:
        try:
            _user, sep, password = base64.b64decode(cred, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        return password if sep and password else None
    return None


def check(authorizer: Authorizer, method: str, metadata: Any) -> Optional[tuple[grpc.StatusCode, str]]:
    """None when the call may proceed, else the status to abort with."""
    if method.startswith(OPEN_PREFIXES):
        return None
    token = token_from_metadata(metadata)
    if token is None:
        return grpc.StatusCode.UNAUTHENTICATED, (
            "a token is required: send 'authorization: Bearer TOKEN' (or basic auth with the token as password)")
    role = authorizer(token)
    if role is None:
        return grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked token"
    if role not in READ_ROLES:
        return grpc.StatusCode.PERMISSION_DENIED, f"role {role!r} may not read flows (needs viewer or admin)"
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without a readable token before the handler runs."""

    def __init__(self, authorizer: Authorizer) -> None:
        self.authorizer = authorizer

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        verdict = check(self.authorizer, details.method, details.invocation_metadata)
        handler = await continuation(details)
        if verdict is None or handler is None:
            return handler
        code, message = verdict
        return _denying_handler(handler, code, message)


def _denying_handler(handler: Any, code: grpc.StatusCode, message: str) -> Any:
    async def deny_unary(_request: Any, context: Any) -> Any:
        await context.abort(code, message)

    async def deny_stream(_request: Any, context: Any) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(deny_unary, **kw)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kw)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(deny_unary, **kw)
    return grpc.stream_stream_rpc_method_handler(deny_stream, **kw)
