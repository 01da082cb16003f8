"""``/api/v1/policies``: network policies (CiliumNetworkPolicy) stored with revisions.

* ``GET /api/v1/policies`` lists the current set: ``{"revision": N, "items": [...]}``, with ``ETag: "N"``.
  Agents poll cheaply: ``If-None-Match: "N"`` answers ``304`` while nothing changed, and ``?wait=S``
  holds the request until the set changes or ``S`` seconds pass (long poll; at most ``max_wait_s``, 4 s by
  default: shorter than the server's graceful shutdown, so a stopping server never cuts a poll).
  ``?since_revision=N`` answers ``{"revision": N, "changed": false, "items": []}`` while unchanged.
  ``?namespace=NS`` narrows the list (``_cluster`` for cluster-wide policies).
* ``POST /api/v1/policies``: apply one or more policies (YAML or JSON body: one document, several
  ``---`` documents, a list or ``{"items": [...]}``); ``?namespace=NS`` is the namespace of documents
  without one (default ``default``). All or nothing: ``{"revision", "results": [{namespace, name, kind,
  revision, action: created|configured|unchanged}]}``.
* ``GET|PUT|DELETE /api/v1/policies/{namespace}/{name}``: one policy (``_cluster`` as the namespace of a
  cluster-wide policy). PUT applies exactly one document, which must have this name and namespace.
  ``GET .../history`` lists its revisions.

Invalid policies get ``422`` with ``{"detail": "...", "errors": [{"path", "message", "where", "policy"}]}``
(every problem, each naming the field); unknown policies ``404``; all errors are JSON with ``detail``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Optional

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from enforcer.policy import PolicyError, PolicyValidationError, load_policies
from enforcer.store import PolicyStore

CLUSTER_NAMESPACE = "_cluster"  # path segment for cluster-wide policies (never a valid namespace)
MAX_BODY_BYTES = 16 << 20
MAX_WAIT_S = 4.0  # below uvicorn's timeout_graceful_shutdown (5 s in api.server.serve)
RECHECK_S = 1.0  # long polls re-read the revision this often (writes by other server processes)


def _error(status: int, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"detail": detail, **extra}, status_code=status)


def _invalid(e: PolicyValidationError) -> JSONResponse:
    errors = [{"path": x.path, "message": x.message, "where": x.where, "policy": x.policy} for x in e.errors]
    return _error(422, str(e), errors=errors)


def _etag(revision: int) -> str:
    return f'"{revision}"'


def _etag_matches(header: Optional[str], revision: int) -> bool:
    if not header:
        return False
    tags = [t.strip() for t in header.split(",")]
    return any(t == "*" or t.removeprefix("W/") == _etag(revision) for t in tags)


def _parse_etag(header: Optional[str]) -> Optional[int]:
    if not header:
        return None
    tag = header.split(",")[0].strip().removeprefix("W/").strip('"')
    return int(tag) if tag.isdigit() else None


def _namespace(segment: str) -> str:
    return "" if segment == CLUSTER_NAMESPACE else segment


class RevisionWatch:
    """Wakes long polls of this process when the policy set changes."""

    def __init__(self) -> None:
        self._event: Optional[asyncio.Event] = None

    def _current(self) -> asyncio.Event:
        if self._event is None:
            self._event = asyncio.Event()
        return self._event

    def notify(self) -> None:
        ev, self._event = self._event, None
        if ev is not None:
            ev.set()

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._current().wait(), timeout)
        except asyncio.TimeoutError:
            pass


async def _read_body(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ValueError(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_policy_router(store: PolicyStore, *, max_body_bytes: int = MAX_BODY_BYTES,
                         max_wait_s: float = MAX_WAIT_S) -> APIRouter:
    """The policy API over ``store``."""
    router = APIRouter(prefix="/api/v1/policies", tags=["policies"])
    watch = RevisionWatch()

    async def parse(request: Request, default_namespace: str) -> Any:
        try:
            body = await _read_body(request, max_body_bytes)
        except ValueError as e:
            return _error(413, str(e))
        if not body.strip():
            return _invalid(PolicyValidationError([PolicyError("", "the request body is empty: send a policy "
                                                                   "(YAML or JSON)")]))
        try:
            return await run_in_threadpool(load_policies, body, default_namespace=default_namespace)
        except PolicyValidationError as e:
            return _invalid(e)

    @router.get("", summary="List policies (with the current revision; supports ETag and long polling)")
    async def list_policies(request: Request, namespace: Optional[str] = None,
                            since_revision: Optional[int] = Query(None, ge=0),
                            wait: float = Query(0, ge=0, le=3600)) -> Response:
        ns = _namespace(namespace) if namespace is not None else None
        inm = request.headers.get("if-none-match")
        known = since_revision if since_revision is not None else _parse_etag(inm)
        rev = await run_in_threadpool(store.revision)
        if wait and known is not None and rev == known:
            deadline = time.monotonic() + min(wait, max_wait_s)
            while rev == known:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                await watch.wait(min(left, RECHECK_S))
                rev = await run_in_threadpool(store.revision)
        if _etag_matches(inm, rev):
            return Response(status_code=304, headers={"ETag": _etag(rev)})
        if since_revision is not None and since_revision == rev:
            return JSONResponse({"revision": rev, "changed": False, "items": []}, headers={"ETag": _etag(rev)})
        rev, items = await run_in_threadpool(store.list, ns)
        return JSONResponse({"revision": rev, "changed": True, "items": [p.to_json() for p in items]},
                            headers={"ETag": _etag(rev)})

    @router.post("", summary="Apply policies (YAML or JSON; all or nothing)")
    async def apply_policies(request: Request, namespace: str = "default") -> Response:
        parsed = await parse(request, namespace)
        if isinstance(parsed, Response):
            return parsed
        rev, outcomes = await run_in_threadpool(store.apply, parsed)
        watch.notify()
        return JSONResponse({"revision": rev, "results": [o.to_json() for o in outcomes]})

    @router.get("/{namespace}/{name}", summary="One policy")
    async def get_policy(namespace: str, name: str) -> Response:
        p = await run_in_threadpool(store.get, _namespace(namespace), name)
        if p is None:
            return _error(404, f"policy {namespace}/{name} not found")
        return JSONResponse(p.to_json(), headers={"ETag": _etag(p.revision)})

    @router.get("/{namespace}/{name}/history", summary="The revisions of one policy")
    async def policy_history(namespace: str, name: str) -> Response:
        hist = await run_in_threadpool(store.history, _namespace(namespace), name)
        if not hist:
            return _error(404, f"policy {namespace}/{name} has no history")
        return JSONResponse({"namespace": _namespace(namespace), "name": name, "revisions": hist})

    @router.put("/{namespace}/{name}", summary="Create or replace one policy")
    async def put_policy(request: Request, namespace: str, name: str) -> Response:
        ns = _namespace(namespace)
        parsed = await parse(request, ns or "default")
        if isinstance(parsed, Response):
            return parsed
        if len(parsed) != 1:
            return _invalid(PolicyValidationError([PolicyError("", f"expected one policy, found {len(parsed)}")]))
        p = parsed[0]
        if p.name != name:
            return _invalid(PolicyValidationError([PolicyError(
                "metadata.name", f"{p.name!r} does not match the name in the URL ({name!r})", policy=p.ref)]))
        if p.namespace != ns:
            where = "a cluster-wide policy" if not p.namespace else f"namespace {p.namespace!r}"
            want = f"the URL's {namespace!r}" + (" (cluster-wide)" if not ns else "")
            field = "kind" if (not p.namespace) != (not ns) else "metadata.namespace"
            return _invalid(PolicyValidationError([PolicyError(field, f"{where} does not match {want}", policy=p.ref)]))
        rev, outcomes = await run_in_threadpool(store.apply, [p])
        watch.notify()
        return JSONResponse({"revision": rev, "results": [o.to_json() for o in outcomes]})

    @router.delete("/{namespace}/{name}", summary="Delete one policy")
    async def delete_policy(namespace: str, name: str) -> Response:
        res = await run_in_threadpool(store.delete, _namespace(namespace), name)
        if res is None:
            return _error(404, f"policy {namespace}/{name} not found")
        rev, gone = res
        watch.notify()
        return JSONResponse({"revision": rev, "deleted": {"namespace": gone.namespace, "name": gone.name,
                                                          "kind": gone.kind, "revision": gone.revision}})

    return router

