"""The dashboard's API: server-side aggregation for the web page (service map, flows, drops, policies,
endpoints, status) and its live WebSocket.

Routes (all under ``/api/v1/dashboard``; ``q`` is always a ``flowscope observe`` command line such as
``--to-pod default/api --verdict DROPPED``, parsed by the CLI's own parser):

* ``GET /parse?q=``: the FlowQuery that ``q`` means (or 400 with the CLI's message);
* ``GET /map?q=&since=&until=``: the service map of stored flows in a time range (nodes, edges with
  verdicts, bytes, ports, L7 request/error rates and p50/p95 latency, pods);
* ``GET /flows?q=&since=&until=&limit=&download=``: flows as Hubble JSON lines (newest ``limit``);
* ``GET /drops?q=&since=&until=&buckets=``: drops by reason and by deciding policy over time;
* ``GET /policies?q=&since=&until=``: stored policies with the verdicts they decided in the range;
* ``GET /status``: flows/s, lost events by source, connected agents, storage size;
* ``WS /live?q=``: a snapshot of the live map, then at most one message per ``tick_s`` with what
  changed (nodes, edges, pods), a bounded sample of the newest matching flows and the status numbers.

Live path: the writer hands committed batches to :meth:`DashboardHub.tap`, which only puts them on a
bounded queue (a full queue drops the batch for the dashboard and counts it: ingest never waits). One
worker thread feeds every live view (one per distinct filter, shared by all browsers using it). Each
view's ticker serialises one delta per tick for all its clients; a client still busy sending (a slow
browser) skips ticks and later gets one coalesced catch-up delta instead, so per-client memory is one
message and the rows it could not take are counted, never queued.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import shlex
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import msgspec
import orjson
from fastapi import APIRouter, Query, Request, WebSocket
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocketDisconnect

from flowscope import schema
from flowscope.filters import FlowFilter
from flowscope.observe import ObserveUsageError, query_from_argv
from flowscope.query import FlowQuery, QueryError, query_to_json
from flowscope.timeparse import TimeParseError, parse_time

from .dashboard_model import DropsAggregator, MapAggregator
from .live import LiveHub
from .store import FlowStore, PreparedBatch, format_time

log = logging.getLogger(__name__)

_flow_decoder = msgspec.json.Decoder(schema.Flow)
_NS = 1_000_000_000
IDLE_HEARTBEAT_S = 2.0  # with nothing new, a client still gets the status numbers this often


@dataclass
class DashboardSettings:
    tick_s: float = 0.5  # one live message per client per tick at most (2/s; the goal is <= 20/s)
    rows_per_tick: int = 40  # newest matching flows sent per tick (the rest are counted, not sent)
    row_ring: int = 400  # newest matching flows kept per live view for catch-up
    window_s: float = 20.0  # live rates/percentiles describe the last 10-20 s
    seed_since_s: float = 300.0  # a new live view starts from the stored flows of the last 5 minutes...
    seed_max_flows: int = 20_000  # ...at most this many (the newest)
    range_max_flows: int = 300_000  # flows scanned at most for one range answer (the answer says so)
    queue_batches: int = 512  # committed batch groups waiting for the worker before drops
    feed_chunk: int = 256  # flows aggregated between voluntary GIL releases (keeps the event loop responsive)
    max_changes: int = 5_000  # records per kind in one live message
    status_every_s: float = 1.0
    agent_fresh_s: float = 60.0  # an agent heard from within this is "connected"


class BadRequest(ValueError):
    """A bad dashboard request (400 with this message)."""


# --------------------------------------------------------------------------------------------
# Parsing (pure)
# --------------------------------------------------------------------------------------------


def parse_filter(text: str) -> FlowQuery:
    """The FlowQuery of a filter-bar line (``flowscope observe`` flags; a leading ``flowscope observe``
    or ``hubble observe`` is ignored). Raises BadRequest with the CLI's message."""
    try:
        argv = shlex.split(text or "")
    except ValueError as e:
        raise BadRequest(f"cannot split the filter: {e}") from None
    if len(argv) >= 2 and argv[0] in ("flowscope", "hubble") and argv[1] == "observe":
        argv = argv[2:]
    try:
        return query_from_argv(argv)
    except ObserveUsageError as e:
        raise BadRequest(str(e)) from None


def view_key(q: FlowQuery) -> str:
    """Live views are shared by every client whose filter means the same."""
    return query_to_json(FlowQuery(whitelist=q.whitelist, blacklist=q.blacklist)).decode()


def resolve_range(q: FlowQuery, since: Optional[str], until: Optional[str], default_since: str,
                  now_ns: int) -> tuple[int, int]:
    """(since_ns, until_ns): explicit parameters first, then the filter's --since/--until, then defaults."""
    s = since or (str(q.since) if q.since not in (None, "") else None) or default_since
    u = until or (str(q.until) if q.until not in (None, "") else None)
    try:
        since_ns = parse_time(s, now_ns)
        until_ns = parse_time(u, now_ns) if u else now_ns
    except TimeParseError as e:
        raise BadRequest(f"invalid time range: {e}") from None
    if since_ns > until_ns:
        raise BadRequest(f"since ({s}) is after until ({u or 'now'})")
    return since_ns, until_ns


def with_verdicts(q: FlowQuery, verdicts: list[str]) -> Optional[FlowQuery]:
    """``q`` narrowed to flows with one of ``verdicts`` (None when ``q`` excludes them all)."""
    wl = q.whitelist or [FlowFilter()]
    out = []
    for f in wl:
        allowed = [v for v in verdicts if not f.verdict or v in [str(x).upper() for x in f.verdict]]
        if allowed:
            out.append(msgspec.structs.replace(f, verdict=allowed))
    if not out:
        return None
    return FlowQuery(whitelist=out, blacklist=q.blacklist)


# --------------------------------------------------------------------------------------------
# Range answers (run in worker threads)
# --------------------------------------------------------------------------------------------


def _scan(store: FlowStore, q: FlowQuery, since_ns: int, until_ns: int) -> Iterator[tuple[schema.Flow, Any]]:
    """Stored flows matching ``q`` in the range, oldest first, streamed (decoded)."""
    rq = FlowQuery(whitelist=q.whitelist, blacklist=q.blacklist, since=since_ns / _NS,
                   until=until_ns / _NS).resolve()
    decode = _flow_decoder.decode
    for r in store.query_rows(rq):
        yield decode(r.body), r


def range_map(store: FlowStore, q: FlowQuery, since_ns: int, until_ns: int, max_flows: int) -> dict[str, Any]:
    agg = MapAggregator()
    agg.begin()
    n = 0
    last = since_ns
    for f, r in _scan(store, q, since_ns, until_ns):
        if n >= max_flows:
            break
        agg.add(f, r.time_ns)
        last = r.time_ns
        n += 1
    truncated = n >= max_flows
    out = agg.snapshot((until_ns - since_ns) / _NS)
    out.update(mode="range", since_ns=since_ns, until_ns=until_ns, scanned=n, truncated=truncated,
               scanned_until_ns=last if truncated else until_ns)
    return out


def range_drops(store: FlowStore, q: FlowQuery, since_ns: int, until_ns: int, buckets: int,
                max_flows: int) -> dict[str, Any]:
    agg = DropsAggregator(since_ns, until_ns, buckets)
    recent: deque[bytes] = deque(maxlen=50)
    n = 0
    dq = with_verdicts(q, ["DROPPED", "ERROR", "AUDIT"])
    if dq is not None:
        for f, r in _scan(store, dq, since_ns, until_ns):
            if n >= max_flows:
                break
            agg.add(f, r.time_ns)
            if f.verdict._value_ != "AUDIT":
                recent.append(schema.envelope_json(r.body, r.node_name, format_time(r.time_ns)))
            n += 1
    out = agg.to_json()
    out["scanned"] = n
    out["truncated"] = n >= max_flows
    out["recent"] = [orjson.loads(b) for b in reversed(recent)]
    return out


class _PolicyFields(msgspec.Struct):
    """The part of a flow the policy counts need (decoding only this is several times faster)."""

    verdict: schema.Verdict = schema.Verdict.VERDICT_UNKNOWN
    egress_allowed_by: list[schema.Policy] = []
    ingress_allowed_by: list[schema.Policy] = []
    egress_denied_by: list[schema.Policy] = []
    ingress_denied_by: list[schema.Policy] = []
    drop_reason_desc: schema.DropReason = schema.DropReason.DROP_REASON_UNKNOWN  # type: ignore[valid-type]


_policy_decoder = msgspec.json.Decoder(_PolicyFields)


def range_policies(store: FlowStore, policy_store: Any, q: FlowQuery, since_ns: int, until_ns: int,
                   max_flows: int) -> dict[str, Any]:
    """Stored policies (when the policy store is there) joined with the verdicts flows name them in."""
    agg = DropsAggregator(since_ns, until_ns, 1)
    rq = FlowQuery(whitelist=q.whitelist, blacklist=q.blacklist, since=since_ns / _NS,
                   until=until_ns / _NS).resolve()
    n = 0
    for r in store.query_rows(rq):
        if n >= max_flows:
            break
        n += 1
        body = r.body
        if b'_by":[' not in body:
            continue
        agg.add(_policy_decoder.decode(body), r.time_ns)  # type: ignore[arg-type]
    seen = {p["ref"]: p for p in agg.policies.values()}
    items: list[dict[str, Any]] = []
    revision = None
    if policy_store is not None:
        revision, stored = policy_store.list()
        for sp in stored:
            ref = sp.ref
            counts = seen.pop(ref, None) or {"forwarded": 0, "dropped": 0, "audit": 0, "last_ns": 0}
            items.append({"ref": ref, "namespace": sp.namespace, "name": sp.name, "kind": sp.kind,
                          "revision": sp.revision, "stored": True, "updated": format_time(sp.updated_ns),
                          "policy": sp.document, "forwarded": counts["forwarded"], "dropped": counts["dropped"],
                          "audit": counts["audit"], "last_ns": counts["last_ns"]})
    for rec in seen.values():  # named by flows but not (or no longer) stored
        items.append(dict(rec, stored=False, policy=None))
    items.sort(key=lambda p: (-(p["dropped"] + p["audit"]), p["ref"]))
    return {"since_ns": since_ns, "until_ns": until_ns, "revision": revision, "items": items, "scanned": n,
            "truncated": n >= max_flows}


# --------------------------------------------------------------------------------------------
# Live views
# --------------------------------------------------------------------------------------------


class _Client:
    __slots__ = ("version", "seq", "event", "pending", "skipped_rows", "messages", "bytes", "sent_at")

    def __init__(self, version: int, seq: int) -> None:
        self.version = version
        self.seq = seq
        self.event = asyncio.Event()
        # the newest tick message: (from_version, from_seq, to_version, to_seq, body, rows skipped)
        self.pending: Optional[tuple[int, int, int, int, bytes, int]] = None
        self.skipped_rows = 0
        self.messages = 0
        self.bytes = 0
        self.sent_at = 0.0


class LiveView:
    """One filter's live map and newest rows, shared by all clients with that filter."""

    def __init__(self, key: str, query: FlowQuery, settings: DashboardSettings, min_id: int) -> None:
        self.key = key
        self.query = FlowQuery(whitelist=query.whitelist, blacklist=query.blacklist)
        filters = self.query.resolve().filters
        self.match = None if filters.matches_all else filters.match
        self.settings = settings
        self.agg = MapAggregator(windowed=True, window_s=settings.window_s)
        self.lock = threading.Lock()
        # (seq, body, node_name, time_ns) of the newest matching flows; envelopes are built only for
        # the rows actually sent
        self.rows: deque[tuple[int, bytes, str, int]] = deque(maxlen=settings.row_ring)
        self.seq = 0
        self.min_id = min_id
        self.clients: set[_Client] = set()
        self.dropped = False  # no clients left: no longer fed
        self.ticker: Optional[asyncio.Task[None]] = None
        self.tick_version = 0
        self.tick_seq = 0

    # fed by the worker thread
    def feed(self, items: list[Any]) -> None:
        match, min_id = self.match, self.min_id
        with self.lock:
            agg = self.agg
            agg.begin()
            add = agg.add
            kept = []
            for it in items:
                if it.id <= min_id or (match is not None and not match(it.flow)):
                    continue
                add(it.flow, it.time_ns)
                kept.append(it)
            seq = self.seq
            room = self.rows.maxlen or 0
            for i, it in enumerate(kept[-room:], seq + max(0, len(kept) - room) + 1):
                self.rows.append((i, it.body, it.node_name, it.time_ns))
            self.seq = seq + len(kept)

    def seed_locked(self, store: FlowStore) -> None:
        """Start from the stored flows of the last ``seed_since_s`` (ids up to ``min_id``); the caller holds
        :attr:`lock`, so the worker feeds live flows only after this history."""
        s = self.settings
        now = time.time_ns()
        rq = msgspec.structs.replace(self.query, since=(now - int(s.seed_since_s * _NS)) / _NS,
                                     number=s.seed_max_flows).resolve(now)
        decode = _flow_decoder.decode
        self.agg.begin()
        for r in store.query_rows(rq, max_id=self.min_id):
            self.agg.add(decode(r.body), r.time_ns)
            self.seq += 1
            self.rows.append((self.seq, r.body, r.node_name, r.time_ns))
        self.tick_version, self.tick_seq = self.agg.version, self.seq

    # built in a worker thread for the event loop (the lock is held while the records are collected)
    def message(self, kind: str, from_version: int, from_seq: int, status: dict[str, Any]) -> tuple[bytes, int, int, int]:
        """A ``snapshot`` (everything) or ``delta`` message: (body, to_version, to_seq, rows skipped)."""
        n_rows = self.settings.rows_per_tick
        with self.lock:
            if kind == "delta" and not self.agg.can_diff_from(from_version):
                kind = "snapshot"
            if kind == "snapshot":
                body = self.agg.snapshot()
                to_version = self.agg.version
                n_rows = max(n_rows, 100)
            else:
                body, to_version = self.agg.changes_since(from_version, limit=self.settings.max_changes)
            new_rows = [r for r in self.rows if r[0] > from_seq] if self.rows and self.rows[-1][0] > from_seq else []
            to_seq = self.seq
            matched = to_seq - from_seq
            body["flows_total"] = self.agg.flows
            window_s = self.agg.window_s
        if kind == "delta" and matched == 0 and not (body["nodes"] or body["edges"] or body["pods"] or body["removed"]):
            kind = "idle"  # nothing new: clients send this only as a periodic status heartbeat
        shown = new_rows[-n_rows:]
        skipped = max(0, matched - len(shown)) if kind == "delta" else 0
        head = orjson.dumps({"type": kind, "version": to_version, "window_s": window_s, "matched": matched,
                             "shown": len(shown), "row_seqs": [r[0] for r in shown], "map": body,
                             "status": status})
        env = schema.envelope_json
        envs = b",".join(env(b, node, format_time(t)) for _, b, node, t in shown)
        return head[:-1] + b',"flows":[' + envs + b"]}", to_version, to_seq, skipped


class DashboardHub:
    """Live views, the worker feeding them, and the status numbers."""

    def __init__(self, store: FlowStore, hub: LiveHub, settings: Optional[DashboardSettings] = None,
                 writer: Any = None) -> None:
        self.store = store
        self.settings = settings or DashboardSettings()
        self.writer = writer
        self._q: "queue.Queue[list[PreparedBatch]]" = queue.Queue(maxsize=self.settings.queue_batches)
        self._lock = threading.Lock()
        self.views: dict[str, LiveView] = {}
        self.ingested = 0  # flows committed (seen by the tap)
        self.dropped_batches = 0  # batch groups the worker could not take (counted, not queued)
        self.dropped_flows = 0
        self.skipped_rows = 0  # rows of the live table not sent to a client (it got the newest instead)
        self.messages = 0
        self._rate: deque[tuple[float, int]] = deque(maxlen=64)
        self._status: dict[str, Any] = {}
        self._status_at = 0.0
        self._status_lock = threading.Lock()
        self._worker: Optional[threading.Thread] = None
        self._stop = False
        hub.add_tap(self.tap)

    # ---- the writer's side: never blocks ---------------------------------------------------

    def tap(self, batches: list[PreparedBatch]) -> None:
        n = sum(len(b) for b in batches)
        self.ingested += n
        if not self.views:
            return
        try:
            self._q.put_nowait(batches)
        except queue.Full:
            self.dropped_batches += 1
            self.dropped_flows += n

    def _run(self) -> None:
        while not self._stop:
            try:
                batches = self._q.get(timeout=0.5)
            except queue.Empty:
                continue
            items = [it for b in batches for it in b.live_items()]
            with self._lock:
                views = list(self.views.values())
            chunk = self.settings.feed_chunk
            for i in range(0, len(items), chunk):
                part = items[i:i + chunk]
                for v in views:
                    try:
                        v.feed(part)
                    except Exception:  # noqa: BLE001 - one bad view must not stop the others
                        log.exception("feeding a live dashboard view failed")
                # Let the event loop (HTTP ingest, websockets) take the interpreter lock now rather than
                # after the 5 ms switch interval: without this, every I/O wake-up of the loop could wait
                # that long behind aggregation (the convoy effect), which measurably slowed ingest.
                time.sleep(0)

    def _ensure_worker(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._run, name="flowscope-dashboard", daemon=True)
            self._worker.start()

    def close(self) -> None:
        self._stop = True
        with self._lock:
            views = list(self.views.values())
        for v in views:
            if v.ticker is not None:
                v.ticker.cancel()

    # ---- views -----------------------------------------------------------------------------

    def acquire(self, key: str, query: FlowQuery, client: "_Client") -> tuple[LiveView, bool]:
        """The view for ``key`` with ``client`` added (created and seeded from storage when new);
        (view, created). Blocking."""
        with self._lock:
            v = self.views.get(key)
            if v is not None:
                v.clients.add(client)
                return v, False
            v = LiveView(key, query, self.settings, self.store.last_id())
            v.clients.add(client)
            v.lock.acquire()  # the worker waits for the seed, so live flows come after history
            self.views[key] = v
        try:
            self._ensure_worker()
            v.seed_locked(self.store)
        except Exception:
            self.drop_view(v)
            raise
        finally:
            v.lock.release()
        return v, True

    def drop_view(self, v: LiveView) -> None:
        with self._lock:
            v.dropped = True
            if self.views.get(v.key) is v:
                del self.views[v.key]

    def release(self, v: LiveView, client: "_Client") -> None:
        """``client`` left; a view without clients is dropped at once (it is no longer fed: a page that
        comes back gets a new view, seeded from storage)."""
        with self._lock:
            v.clients.discard(client)
            if v.clients:
                return
            v.dropped = True
            if self.views.get(v.key) is v:
                del self.views[v.key]
        if v.ticker is not None:
            v.ticker.cancel()

    # ---- status ----------------------------------------------------------------------------

    def status(self, hub: Optional[LiveHub] = None) -> dict[str, Any]:
        """Status-bar numbers, refreshed at most every ``status_every_s`` (blocking: reads the database)."""
        now = time.monotonic()
        with self._status_lock:
            if self._status and now - self._status_at < self.settings.status_every_s:
                return self._status
            self._rate.append((now, self.ingested))
            old = next((s for s in self._rate if now - s[0] <= 10.0), self._rate[0])
            dt = now - old[0]
            rate = (self.ingested - old[1]) / dt if dt > 0 else 0.0
            st = self.store
            lost = st.lost_by_source()
            server_lost = {}
            if hub is not None and hub.dropped:
                server_lost["HUBBLE_RING_BUFFER (stream clients)"] = hub.dropped
            if self.dropped_flows:
                server_lost["dashboard queue"] = self.dropped_flows
            nodes = st.nodes()
            fresh = time.time_ns() - int(self.settings.agent_fresh_s * _NS)
            self._status = {
                "flows_per_s": round(rate, 1), "ingested": self.ingested, "stored_flows": st.num_flows(),
                "lost_events": lost, "server_lost": server_lost,
                "agents": {"connected": sum(1 for n in nodes if n["last_seen_ns"] >= fresh), "known": len(nodes),
                           "nodes": [{"name": n["name"], "last_seen": n["last_seen"],
                                      "agent_version": n["agent_version"],
                                      "connected": n["last_seen_ns"] >= fresh} for n in nodes[:50]]},
                "storage_bytes": st.db_size_bytes(), "live_views": len(self.views),
                "dashboard_clients": sum(len(v.clients) for v in list(self.views.values())),
                "skipped_rows": self.skipped_rows, "time_ns": time.time_ns(),
            }
            if self.writer is not None:
                self._status["pending_batches"] = self.writer.pending
            self._status_at = now
            return self._status

    # ---- per-view ticker (event loop) ------------------------------------------------------

    def start_ticker(self, v: LiveView, hub: LiveHub) -> None:
        if v.ticker is None or v.ticker.done():
            v.ticker = asyncio.get_running_loop().create_task(self._tick(v, hub))

    async def _tick(self, v: LiveView, hub: LiveHub) -> None:
        s = self.settings
        next_rotate = time.monotonic() + s.window_s / 2
        try:
            while True:
                await asyncio.sleep(s.tick_s)
                now = time.monotonic()
                if now >= next_rotate:
                    with v.lock:
                        v.agg.rotate()
                    next_rotate = now + s.window_s / 2
                if v.dropped:
                    return
                if not v.clients:
                    continue
                status = await run_in_threadpool(self.status, hub)
                from_v, from_seq = v.tick_version, v.tick_seq
                body, to_v, to_seq, skipped = await run_in_threadpool(v.message, "delta", from_v, from_seq, status)
                v.tick_version, v.tick_seq = to_v, to_seq
                for c in list(v.clients):
                    c.pending = (from_v, from_seq, to_v, to_seq, body, skipped)
                    c.event.set()
        except asyncio.CancelledError:
            pass


# --------------------------------------------------------------------------------------------
# The router
# --------------------------------------------------------------------------------------------


def _bad(e: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(e)}, status_code=400)


def create_dashboard_router(store: FlowStore, hub: LiveHub, *, writer: Any = None, policy_store: Any = None,
                            settings: Optional[DashboardSettings] = None) -> tuple[APIRouter, DashboardHub]:
    """The dashboard's routes and its live hub (already tapping ``hub``)."""
    dh = DashboardHub(store, hub, settings, writer)
    s = dh.settings
    router = APIRouter(prefix="/api/v1/dashboard", tags=["dashboard"])

    def query_of(q: str) -> FlowQuery:
        return parse_filter(q)

    @router.get("/parse", summary="What a filter-bar line (flowscope observe flags) means")
    async def parse(q: str = "") -> Response:
        try:
            fq = query_of(q)
        except BadRequest as e:
            return _bad(e)
        return Response(b'{"query":' + query_to_json(fq) + b"}", media_type="application/json")

    @router.get("/map", summary="Service map of stored flows in a time range")
    async def range_map_route(q: str = "", since: Optional[str] = None, until: Optional[str] = None) -> Response:
        try:
            fq = query_of(q)
            since_ns, until_ns = resolve_range(fq, since, until, "1h", time.time_ns())
            out = await run_in_threadpool(range_map, store, fq, since_ns, until_ns, s.range_max_flows)
        except (BadRequest, QueryError) as e:
            return _bad(e)
        return Response(orjson.dumps(out), media_type="application/json")

    @router.get("/flows", summary="Flows for the table or an export (Hubble JSON lines, oldest first)")
    async def flows(q: str = "", since: Optional[str] = None, until: Optional[str] = None,
                    limit: int = Query(500, ge=1, le=100_000), download: bool = False) -> Response:
        try:
            fq = query_of(q)
            now = time.time_ns()
            ranged = bool(since or until or fq.since or fq.until)
            if ranged:
                since_ns, until_ns = resolve_range(fq, since, until, "1h", now)
                rq = FlowQuery(whitelist=fq.whitelist, blacklist=fq.blacklist, since=since_ns / _NS,
                               until=until_ns / _NS, number=limit).resolve(now)
            else:
                rq = FlowQuery(whitelist=fq.whitelist, blacklist=fq.blacklist, number=limit).resolve(now)
        except (BadRequest, QueryError) as e:
            return _bad(e)

        def lines() -> Iterator[bytes]:
            buf: list[bytes] = []
            for r in store.query_rows(rq):
                buf.append(schema.envelope_json(r.body, r.node_name, format_time(r.time_ns)))
                if len(buf) >= 1000:
                    yield b"\n".join(buf) + b"\n"
                    buf = []
            if buf:
                yield b"\n".join(buf) + b"\n"

        headers = {}
        if download:
            headers["Content-Disposition"] = 'attachment; filename="flowscope-flows.jsonl"'
        return StreamingResponse(lines(), media_type="application/x-ndjson", headers=headers)

    @router.get("/drops", summary="Drops by reason and by deciding policy over time")
    async def drops(q: str = "", since: Optional[str] = None, until: Optional[str] = None,
                    buckets: int = Query(60, ge=1, le=1000)) -> Response:
        try:
            fq = query_of(q)
            since_ns, until_ns = resolve_range(fq, since, until, "1h", time.time_ns())
            out = await run_in_threadpool(range_drops, store, fq, since_ns, until_ns, buckets, s.range_max_flows)
        except (BadRequest, QueryError) as e:
            return _bad(e)
        return Response(orjson.dumps(out), media_type="application/json")

    @router.get("/policies", summary="Policies with the verdicts they decided in a time range")
    async def policies(q: str = "", since: Optional[str] = None, until: Optional[str] = None) -> Response:
        try:
            fq = query_of(q)
            since_ns, until_ns = resolve_range(fq, since, until, "1h", time.time_ns())
            out = await run_in_threadpool(range_policies, store, policy_store, fq, since_ns, until_ns,
                                          s.range_max_flows)
        except (BadRequest, QueryError) as e:
            return _bad(e)
        return Response(orjson.dumps(out), media_type="application/json")

    @router.get("/status", summary="Status-bar numbers")
    async def status() -> Response:
        return Response(orjson.dumps(await run_in_threadpool(dh.status, hub)), media_type="application/json")

    @router.websocket("/live")
    async def live(ws: WebSocket) -> None:
        await ws.accept()
        try:
            fq = query_of(ws.query_params.get("q", ""))
            FlowQuery(whitelist=fq.whitelist, blacklist=fq.blacklist).resolve()
        except (BadRequest, QueryError) as e:
            await ws.send_text(orjson.dumps({"type": "error", "detail": str(e)}).decode())
            await ws.close(code=1008, reason=str(e).encode()[:120].decode(errors="ignore"))
            return
        client = _Client(0, 0)
        view, _ = await run_in_threadpool(dh.acquire, view_key(fq), fq, client)
        dh.start_ticker(view, hub)

        async def send(body: bytes) -> None:
            c = client
            extra = b'{"client":{"skipped_rows":%d,"messages":%d},' % (c.skipped_rows, c.messages)
            await ws.send_text((extra + body[1:]).decode())
            c.messages += 1
            c.bytes += len(body)
            c.sent_at = time.monotonic()
            dh.messages += 1

        async def pump() -> None:
            status = await run_in_threadpool(dh.status, hub)
            body, client.version, client.seq, _ = await run_in_threadpool(view.message, "snapshot", 0, 0, status)
            await send(body)
            while True:
                await client.event.wait()
                client.event.clear()
                p, client.pending = client.pending, None
                if p is None:
                    continue
                from_v, from_seq, to_v, to_seq, body, skipped = p
                if to_v < client.version or to_seq < client.seq:
                    continue  # nothing newer than what this client has
                if from_v > client.version or from_seq > client.seq:
                    # this client missed ticks (a slow browser): one coalesced catch-up instead
                    status = await run_in_threadpool(dh.status, hub)
                    body, to_v, to_seq, skipped = await run_in_threadpool(
                        view.message, "delta", client.version, client.seq, status)
                # else: the shared tick message covers (a superset of) what this client needs; records
                # carry full state, and the browser ignores rows it already has (row_seqs)
                elif body.startswith(b'{"type":"idle"') and time.monotonic() - client.sent_at < IDLE_HEARTBEAT_S:
                    client.version, client.seq = to_v, to_seq
                    continue
                client.skipped_rows += skipped
                dh.skipped_rows += skipped
                client.version, client.seq = to_v, to_seq
                await send(body)

        async def until_closed() -> None:
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    return

        tasks = [asyncio.create_task(pump()), asyncio.create_task(until_closed())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                exc = t.exception()
                if exc is not None and not isinstance(exc, (WebSocketDisconnect, OSError, RuntimeError)):
                    log.warning("dashboard stream ended with %s: %s", type(exc).__name__, exc)
        finally:
            dh.release(view, client)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            try:
                await ws.close()
            except Exception:  # noqa: BLE001 - already gone
                pass

    return router, dh


def mount(app: Any, policy_store: Any = None) -> DashboardHub:
    """Add the dashboard's routes and its static libraries (``/vendor``: ``web/node_modules``) to ``app``
    (made by :func:`api.app.create_app`); ``policy_store`` defaults to an ``enforcer.store.PolicyStore``
    on the app's database when that is importable."""
    import os

    from fastapi.staticfiles import StaticFiles

    import web

    st = app.state
    if policy_store is None:
        try:
            from enforcer.store import PolicyStore

            policy_store = PolicyStore(st.store.engine)
        except Exception:  # noqa: BLE001 - the policy store is optional for the dashboard
            policy_store = None
    router, dh = create_dashboard_router(st.store, st.hub, writer=st.writer, policy_store=policy_store)
    app.include_router(router)
    modules = os.path.join(os.path.dirname(os.path.abspath(web.__file__)), "node_modules")
    if os.path.isdir(modules):
        app.mount("/vendor", StaticFiles(directory=modules), name="vendor")
    else:
        log.warning("%s is missing: run `make setup` (npm install in web/) for the dashboard's map", modules)
    st.dashboard = dh
    return dh
