"""The Flowscope HTTP API (FastAPI): ingest, queries, live stream, status, and the minimal live page.

* ``POST /api/v1/flows``: a batch of flows (``{"flows": [...], "lost_events": [...], "node_name": ...}``
  or a bare array), decoded with msgspec in a worker thread, written by the single writer thread;
  answered ``{"accepted": n}`` after the commit, then published to live subscribers.
* ``GET /api/v1/flows`` (URL parameters) and ``POST /api/v1/flows/query`` (JSON FlowQuery): NDJSON, one
  Hubble envelope per line, oldest first, streamed; with ``follow`` the stream continues with new flows.
* ``WS /api/v1/flows/stream``: optional history, then live flows; each text frame is a JSON array of
  envelopes, at most one frame per ``stream_interval_s`` per client.
* ``GET /api/v1/status``, ``GET /api/v1/nodes``, ``GET /healthz``, ``/docs``, and ``GET /``.

Errors are JSON ``{"detail": "..."}``; bad input is a 4xx with a message, never a 500.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator, Optional

import msgspec
from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import text
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.websockets import WebSocketDisconnect, WebSocketState

import web
from flowscope import schema
from flowscope.filters import FILTER_FIELDS, FilterError
from flowscope.query import FlowQuery, QueryError, ResolvedQuery, query_from_json, query_from_params

from . import migrate
from .db import make_engine
from .ingest import IngestBatch, IngestError, decode_ingest
from .live import LiveHub, Subscriber, filter_key, lost_envelope_bytes
from .store import FlowStore, format_time
from .writer import BatchWriter, WriterClosed, default_process_writer
from .wscompress import COMPRESS_PARAM, stream_compression_requested

log = logging.getLogger(__name__)

API_VERSION = "0.1.0"
WEB_DIR = os.path.dirname(os.path.abspath(web.__file__))
NDJSON = "application/x-ndjson"
_MiB = 1024 * 1024


@dataclass
class Settings:
    """Server settings; the defaults are production values."""

    db_url: Optional[str] = None
    max_body_bytes: int = 32 * _MiB  # ingest bodies above this get 413
    max_query_body_bytes: int = 1 * _MiB
    stream_queue_size: int = 10_000  # envelopes queued per live client before the oldest are dropped
    stream_interval_s: float = 0.1  # at most one frame per client per interval
    history_frame_size: int = 1000  # envelopes per history frame / NDJSON chunk
    max_inflight_batches: int = 8  # ingest batches decoded or waiting for commit at once
    inline_decode_bytes: int = 4 * _MiB  # larger ingest bodies are decoded in a thread
    # Flows per transaction when the writer coalesces queued batches. Small enough that batches stay
    # queued for the writer while the next requests are decoded (a pipeline, not stop-and-go), large
    # enough that many small agent batches share one commit.
    writer_max_rows: int = 2000
    migrate: bool = True  # apply Alembic migrations when the app is created
    writer_process: Optional[bool] = None  # insert in a child process (None: yes, unless in-memory/1 CPU)
    # Alerts, /metrics, flow export (issue 7, api/alerts_routes.py): dashboard links in alerts (default
    # $FLOWSCOPE_PUBLIC_URL or http://127.0.0.1:8080), evaluation period, flowscope.export.ExportConfig.
    public_url: str = ""
    alert_eval_interval_s: float = 1.0
    export: Optional[Any] = None
    hubble: Optional[Any] = None  # api.hubble.config.HubbleConfig: serve Hubble's gRPC API too (None: no)
    # Reliability and security (issue 8, api/auth.py, api/retention.py): API tokens required (serve() turns
    # this on beyond loopback), requests/s per token (None: per-role defaults, 0: unlimited), retention
    # (an api.retention.RetentionPolicy; None: no retention; `flowscope server` passes its defaults).
    auth_required: bool = False
    rate_limit: Optional[float] = None
    retention: Optional[Any] = None


# --------------------------------------------------------------------------------------------
# OpenAPI documentation types (the wire formats; only used for the schema)
# --------------------------------------------------------------------------------------------


class FlowEnvelope(msgspec.Struct):
    """One NDJSON line / stream frame element: Hubble's GetFlowsResponse with a flow."""

    flow: schema.Flow
    node_name: str = ""
    time: str = ""


class LostEventsEnvelope(msgspec.Struct):
    """Hubble's GetFlowsResponse with a LostEvent (sent unfiltered, also for a slow stream client)."""

    lost_events: schema.LostEvent
    node_name: str = ""
    time: str = ""


class IngestResult(msgspec.Struct, omit_defaults=True):
    accepted: int
    duplicate: bool = False  # this batch id was stored before (a retry): nothing new was stored


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


_ERROR = {"content": {"application/json": {"schema": {"type": "object", "properties": {"detail": {"type": "string"}}}}}}
_ENVELOPES = {"oneOf": [_ref("FlowEnvelope"), _ref("LostEventsEnvelope")]}
_QUERY_PARAMS = [
    {"name": "since", "in": "query", "schema": {"type": "string"},
     "description": "RFC 3339 time or a duration ago (5m, 1h30m)."},
    {"name": "until", "in": "query", "schema": {"type": "string"}, "description": "Like since."},
    {"name": "last", "in": "query", "schema": {"type": "integer", "minimum": 0},
     "description": "The newest N flows (default 20 without since/until)."},
    {"name": "first", "in": "query", "schema": {"type": "integer", "minimum": 0}, "description": "The oldest N flows."},
    {"name": "follow", "in": "query", "schema": {"type": "boolean"}, "description": "Keep streaming new flows."},
] + [
    {"name": f, "in": "query", "style": "form", "explode": True,
     "schema": {"type": "array", "items": {"type": "string"}},
     "description": f"Hubble FlowFilter field {f} (repeat for OR); not_{f} puts it in the denylist."}
    for f in FILTER_FIELDS
]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _error(status: int, detail: str) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def _read_limited(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise StarletteHTTPException(400, f"invalid Content-Length {length!r}")
        if int(length) > limit:
            raise StarletteHTTPException(
                413, f"request body of {int(length)} bytes exceeds the limit of {limit} bytes; send smaller batches")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise StarletteHTTPException(
                413, f"request body exceeds the limit of {limit} bytes; send smaller batches")
        chunks.append(chunk)
    return b"".join(chunks)


def _frame(envelopes: list[bytes]) -> str:
    return (b"[" + b",".join(envelopes) + b"]").decode()


def _history_chunks(store: FlowStore, rq: ResolvedQuery, size: int, max_id: Optional[int] = None) -> Iterator[list[bytes]]:
    """Envelopes of the stored flows selected by ``rq``, oldest first, ``size`` at a time."""
    env = schema.envelope_json
    buf: list[bytes] = []
    for r in store.query_rows(rq, max_id=max_id):
        buf.append(env(r.body, r.node_name, format_time(r.time_ns)))
        if len(buf) >= size:
            yield buf
            buf = []
    if buf:
        yield buf


def _take_live(sub: Subscriber, sep: bytes) -> bytes:
    """Everything queued for ``sub`` joined by ``sep`` (the bytes shared with subscribers of the same
    filter), after a ``lost_events`` envelope for what was dropped since the previous take; b"" if none."""
    data, _, dropped = sub.take_joined(sep)
    if dropped:
        lost = lost_envelope_bytes("HUBBLE_RING_BUFFER", dropped, time_ns=time.time_ns())
        data = lost + sep + data if data else lost
    return data


def _resolve(q: FlowQuery) -> ResolvedQuery:
    try:
        return q.resolve(time.time_ns())
    except FilterError as e:  # resolve wraps these, but be safe
        raise QueryError(str(e)) from None


# --------------------------------------------------------------------------------------------
# The application
# --------------------------------------------------------------------------------------------


def create_app(settings: Optional[Settings] = None) -> FastAPI:
    """The API over the database at ``settings.db_url`` (migrated first unless ``settings.migrate`` is
    false). The writer (thread, and process unless ``writer_process`` is false) starts with the app's
    lifespan, or on the first ingest; it stops, after writing what is queued, when the lifespan ends."""
    settings = settings or Settings()
    engine = make_engine(settings.db_url)
    if settings.migrate:
        migrate.upgrade(engine)
    store = FlowStore(engine)
    hub = LiveHub()
    use_process = settings.writer_process
    if use_process is None:
        use_process = default_process_writer(str(engine.url))
    writer = BatchWriter(store, on_commit=hub.publish, process=use_process, max_rows=settings.writer_max_rows)
    inflight = asyncio.Semaphore(settings.max_inflight_batches)
    # Bodies up to inline_decode_bytes are decoded on the event loop (~5 ms per 1000 flows): a decoding
    # thread would hold the GIL while the loop needs it for every chunk of the next body (each wait up to
    # the 5 ms switch interval), which measured slower. Larger bodies go to one decoding thread so the
    # loop never stalls for long.
    decoder_pool = ThreadPoolExecutor(1, thread_name_prefix="flowscope-decode")
    from .retention import Retention  # background deletion by age and size (issue 8)

    retention = Retention(engine, settings.retention, store.note_deleted) if settings.retention else None
    templates = Jinja2Templates(directory=os.path.join(WEB_DIR, "templates"))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(writer.start)
        if retention is not None:
            retention.start()
        hubble = None
        try:
            if settings.hubble is not None:  # Hubble's gRPC API on this loop (issue 9)
                from .hubble.server import start_hubble

                hubble = await start_hubble(store, hub, settings.hubble, version=f"{API_VERSION} (flowscope)")
            _app.state.hubble = hubble
            yield
        finally:
            if hubble is not None:
                await hubble.stop()
            if retention is not None:
                await run_in_threadpool(retention.stop)
            await run_in_threadpool(writer.close)
            decoder_pool.shutdown(wait=False)
            engine.dispose()

    app = FastAPI(
        title="Flowscope", version=API_VERSION, lifespan=lifespan,
        description="Network flows in Hubble's schema: ingest, query (NDJSON), live stream (WebSocket).")
    app.state.settings = settings
    app.state.store = store
    app.state.hub = hub
    app.state.writer = writer
    app.mount("/static", StaticFiles(directory=os.path.join(WEB_DIR, "static")), name="static")
    from enforcer.store import PolicyStore  # network policies (issue 4): /api/v1/policies

    from .policies import create_policy_router

    app.include_router(create_policy_router(PolicyStore(engine)))
    from .dashboard import mount as mount_dashboard  # the web dashboard's API (issue 6)

    mount_dashboard(app)
    from .alerts_routes import install as install_alerts  # alerts, /metrics, flow export (issue 7)

    install_alerts(app, settings=settings, engine=engine, store=store, hub=hub, writer=writer)

    # ---- errors: always {"detail": "..."} ------------------------------------------------------

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> Response:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()))
            parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg", "invalid")))
        return _error(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(QueryError)
    async def _query_error(_request: Request, exc: QueryError) -> Response:
        return _error(400, str(exc))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return _error(500, f"internal error: {type(exc).__name__}")

    # ---- ingest --------------------------------------------------------------------------------

    @app.post(
        "/api/v1/flows", tags=["flows"], summary="Ingest a batch of flows",
        responses={200: {"content": {"application/json": {"schema": _ref("IngestResult")}}},
                   400: {"description": "Not JSON", **_ERROR}, 413: {"description": "Body too large", **_ERROR},
                   422: {"description": "Not a valid batch (the message names the JSON path)", **_ERROR},
                   503: {"description": "Storage unavailable; retry", **_ERROR}},
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
            "oneOf": [_ref("IngestBatch"), {"type": "array", "items": _ref("Flow")}]}}}}})
    async def ingest_flows(request: Request) -> Response:
        body = await _read_limited(request, settings.max_body_bytes)
        async with inflight:
            try:
                if len(body) <= settings.inline_decode_bytes:
                    batch = decode_ingest(body)
                else:
                    batch = await asyncio.get_running_loop().run_in_executor(decoder_pool, decode_ingest, body)
            except IngestError as e:
                return _error(e.status, e.message)
            try:
                fut = writer.submit(batch)
            except WriterClosed as e:
                return _error(503, str(e))
            try:
                n = await asyncio.wrap_future(fut)
            except Exception as e:  # noqa: BLE001 - the database failed: the agent keeps and retries
                return _error(503, f"storing the batch failed: {type(e).__name__}: {e}")
        dup = b',"duplicate":true' if batch.duplicate else b""  # a retried batch id: stored once, earlier
        return Response(b'{"accepted":%d%s}' % (n, dup), media_type="application/json")

    # ---- queries -------------------------------------------------------------------------------

    def _ndjson(rq: ResolvedQuery) -> StreamingResponse:
        if not rq.follow:
            def lines() -> Iterator[bytes]:
                for chunk in _history_chunks(store, rq, settings.history_frame_size):
                    yield b"\n".join(chunk) + b"\n"
            return StreamingResponse(lines(), media_type=NDJSON)

        async def follow_lines() -> AsyncIterator[bytes]:
            sub = await _subscribe(rq)
            try:
                if rq.limit != 0:
                    async for chunk in iterate_in_threadpool(
                            _history_chunks(store, rq, settings.history_frame_size, sub.min_id)):
                        yield b"\n".join(chunk) + b"\n"
                while True:
                    await sub.wait()
                    data = _take_live(sub, b"\n")
                    if data:
                        yield data + b"\n"
            finally:
                sub.close()
        return StreamingResponse(follow_lines(), media_type=NDJSON)

    async def _subscribe(rq: ResolvedQuery) -> Subscriber:
        match = None if rq.filters.matches_all else rq.filters.match
        loop = asyncio.get_running_loop()
        key = filter_key(rq.filters.whitelist, rq.filters.blacklist)  # equal filters share their frames
        return await run_in_threadpool(hub.subscribe, match, max_queue=settings.stream_queue_size,
                                       last_id=store.last_id, loop=loop, key=key)

    @app.get(
        "/api/v1/flows", tags=["flows"], summary="Query stored flows (NDJSON)",
        responses={200: {"content": {NDJSON: {"schema": _ENVELOPES}},
                         "description": "One envelope per line, oldest first"},
                   400: {"description": "Invalid filter or time", **_ERROR}},
        openapi_extra={"parameters": _QUERY_PARAMS})
    async def get_flows(request: Request) -> Response:
        q = query_from_params(list(request.query_params.multi_items()))
        return _ndjson(_resolve(q))

    @app.post(
        "/api/v1/flows/query", tags=["flows"], summary="Query stored flows with a JSON FlowQuery (NDJSON)",
        responses={200: {"content": {NDJSON: {"schema": _ENVELOPES}},
                         "description": "One envelope per line, oldest first"},
                   400: {"description": "Invalid query", **_ERROR}},
        openapi_extra={"requestBody": {"required": False,
                                       "content": {"application/json": {"schema": _ref("FlowQuery")}}}})
    async def post_query(request: Request) -> Response:
        body = await _read_limited(request, settings.max_query_body_bytes)
        q = query_from_json(body)
        return _ndjson(_resolve(q))

    # ---- live stream ---------------------------------------------------------------------------

    @app.websocket("/api/v1/flows/stream")
    async def stream(ws: WebSocket) -> None:
        try:
            params = ws.query_params.multi_items()
            stream_compression_requested(params)  # ``compress``: the handshake's (api.wscompress)
            q = query_from_params([(k, v) for k, v in params if k != COMPRESS_PARAM])
            rq = _resolve(msgspec.structs.replace(q, follow=True))
        except QueryError as e:
            await ws.accept()
            await ws.send_text(schema.encode({"error": {"status": 400, "detail": str(e)}}).decode())
            await ws.close(code=1008, reason=str(e).encode()[:120].decode(errors="ignore"))
            return
        await ws.accept()
        sub = await _subscribe(rq)
        loop = asyncio.get_running_loop()
        interval = settings.stream_interval_s

        async def send_all() -> None:
            if rq.limit != 0:
                async for chunk in iterate_in_threadpool(
                        _history_chunks(store, rq, settings.history_frame_size, sub.min_id)):
                    await ws.send_text(_frame(chunk))
            next_at = 0.0
            while True:
                await sub.wait()
                delay = next_at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                data = _take_live(sub, b",")
                if data:
                    await ws.send_text(b"".join((b"[", data, b"]")).decode())
                next_at = loop.time() + interval

        async def until_closed() -> None:
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    return

        tasks = [asyncio.create_task(send_all()), asyncio.create_task(until_closed())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                exc = t.exception()
                if exc is not None and not isinstance(exc, (WebSocketDisconnect, OSError, RuntimeError)):
                    log.warning("stream ended with %s: %s", type(exc).__name__, exc)
        finally:
            sub.close()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if ws.application_state == WebSocketState.CONNECTED and ws.client_state == WebSocketState.CONNECTED:
                try:
                    await ws.close()
                except Exception:  # noqa: BLE001 - already gone
                    pass

    # ---- status --------------------------------------------------------------------------------

    @app.get("/api/v1/status", tags=["server"], summary="Store and stream counters")
    async def status() -> dict[str, Any]:
        st = await run_in_threadpool(store.status)
        st["stream"] = {"subscribers": hub.subscribers, "published_flows": hub.published,
                        "dropped_flows": hub.dropped}
        st["ingest"] = {"pending_batches": writer.pending, "transactions": writer.transactions,
                        "writer": "process" if use_process else "thread"}
        st["version"] = API_VERSION
        if retention is not None:
            st["retention"] = retention.status()
        return st

    @app.get("/api/v1/nodes", tags=["server"], summary="Nodes that sent flows")
    async def nodes() -> dict[str, Any]:
        return {"nodes": await run_in_threadpool(store.nodes)}

    @app.get("/healthz", tags=["server"], summary="Liveness and database reachability")
    async def healthz() -> Response:
        def ping() -> None:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        try:
            await run_in_threadpool(ping)
        except Exception as e:  # noqa: BLE001
            return _error(503, f"database unreachable: {type(e).__name__}")
        return JSONResponse({"status": "ok"})

    # ---- the live page -------------------------------------------------------------------------

    @app.get("/", include_in_schema=False, response_class=HTMLResponse)
    async def index(request: Request) -> Response:
        return templates.TemplateResponse(request, "index.html", {"version": API_VERSION})

    # ---- OpenAPI: the flow schema in components ------------------------------------------------

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        _, components = msgspec.json.schema_components(
            [IngestBatch, IngestResult, FlowEnvelope, LostEventsEnvelope, FlowQuery, schema.Flow],
            ref_template="#/components/schemas/{name}")
        doc.setdefault("components", {}).setdefault("schemas", {}).update(components)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
    from .auth import install_auth  # tokens, roles, rate limits on every route (issue 8)

    install_auth(app, engine, required=settings.auth_required, rate_limit=settings.rate_limit)
    return app
