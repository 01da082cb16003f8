"""Hubble's Observer gRPC service over Flowscope's store: the stock ``hubble`` CLI and Hubble tooling work
against Flowscope, with the whole database as history (not a 4095-flow ring).

* ``GetFlows``: allowlist/denylist FlowFilters (the same :class:`flowscope.filters.FilterSet` as REST and
  the websocket), ``number``, ``first``, ``follow``, ``since``, ``until``, ``field_mask``. History comes
  from SQL (:meth:`api.store.FlowStore.query_rows`), oldest first, with the stored lost events of the
  covered time span; ``follow`` then streams live flows from the :class:`api.live.LiveHub` without gap or
  duplicate, and a client too slow for the stream gets a ``HUBBLE_RING_BUFFER`` LostEvent for what was
  dropped. Semantics as Hubble's server: ``number`` 0 means no limit (all of the time range, or all stored
  flows), except with ``follow`` and no ``since``, which means "new flows only".
* ``ServerStatus``, ``GetNodes`` (nodes that sent flows; connected = heard from within
  ``node_stale_after_s``), ``GetNamespaces`` (namespaces with flows in the last hour, as Hubble),
  ``GetAgentEvents`` (:mod:`api.hubble.agent_events`), ``GetDebugEvents`` (UNIMPLEMENTED: Flowscope has no
  datapath debug events).
* The standard gRPC health service, with ``""`` and ``hubble.server.Observer`` SERVING (``hubble status``
  checks the latter); NOT_SERVING while shutting down.
* TLS (optionally mTLS) and token auth (:mod:`api.hubble.auth`) when configured.

The server runs on the API server's asyncio loop (``grpc.aio``), next to uvicorn: :func:`start_hubble`
from the app's lifespan.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator, Optional

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from sqlalchemy import and_, func, select, text

from flowscope import schema
from flowscope.filters import FilterError, FilterSet
from flowscope.query import ResolvedQuery

from . import convert
from .agent_events import AgentEventItem, AgentEvents
from .auth import AuthInterceptor, TokenFileError, file_authorizer
from .config import HubbleConfig, is_loopback
from .pb import flow_pb2 as fpb
from .pb import observer_pb2 as opb
from .pb import observer_pb2_grpc as opb_grpc
from .pb import relay_pb2 as rpb

log = logging.getLogger(__name__)

OBSERVER_SERVICE_NAME = "hubble.server.Observer"
"""The health-check service name the hubble CLI's ``status`` asks for."""

_NS = 1_000_000_000
_HISTORY_CHUNK = 500  # responses built per trip to the worker thread
_LIVE_INLINE = 64  # live batches up to this many envelopes are converted on the loop, larger in a thread
_NODE_STATS_TTL_S = 10.0
_NAMESPACE_WINDOW_NS = 3600 * _NS  # Hubble lists namespaces with flows in the last hour
_RATE_WINDOW_NS = 60 * _NS
_MAX_LOST_ROWS = 100_000


class RequestError(ValueError):
    """An invalid request: answered with INVALID_ARGUMENT and this message."""


# --------------------------------------------------------------------------------------------
# Requests (pure)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlowsPlan:
    query: ResolvedQuery
    mask: Optional[Any]  # google.protobuf.FieldMask


def _opt_ts(req: Any, name: str) -> Optional[int]:
    return convert.timestamp_ns(getattr(req, name)) if req.HasField(name) else None


def _limit(number: int, follow: bool, since_ns: Optional[int], until_ns: Optional[int]) -> Optional[int]:
    """Hubble's server semantics of ``number`` (see the module doc). None = no limit."""
    if number >= 1 << 62:  # --all sends uint64 max
        return None
    if number > 0:
        return number
    if follow and since_ns is None:
        return 0
    return None


def _check_times(first: bool, follow: bool, since_ns: Optional[int], until_ns: Optional[int]) -> None:
    if first and follow:
        raise RequestError("first cannot be combined with follow")
    if follow and until_ns is not None:
        raise RequestError("until cannot be combined with follow")
    if since_ns is not None and until_ns is not None and since_ns > until_ns:
        raise RequestError("since is after until")


def plan_flows(req: Any) -> FlowsPlan:
    """The query of a ``GetFlowsRequest``. Raises RequestError."""
    since_ns, until_ns = _opt_ts(req, "since"), _opt_ts(req, "until")
    _check_times(req.first, req.follow, since_ns, until_ns)
    try:
        allow = convert.filters_from_proto(req.whitelist, "whitelist")
        deny = convert.filters_from_proto(req.blacklist, "blacklist")
        filters = FilterSet(allow, deny)
    except (convert.ConvertError, FilterError) as e:
        raise RequestError(f"invalid filter: {e}") from None
    mask = None
    if req.HasField("field_mask") and req.field_mask.paths:
        try:
            convert.validate_field_mask(req.field_mask)
        except convert.ConvertError as e:
            raise RequestError(str(e)) from None
        mask = req.field_mask
    q = ResolvedQuery(since_ns=since_ns, until_ns=until_ns,
                      limit=_limit(req.number, req.follow, since_ns, until_ns), first=req.first,
                      follow=req.follow, filters=filters)
    return FlowsPlan(q, mask)


def select_events(items: list[AgentEventItem], number: int, first: bool, follow: bool,
                  since_ns: Optional[int]) -> list[AgentEventItem]:
    """The history part of an events request: ``items`` are oldest first and already in the range."""
    limit = _limit(number, follow, since_ns, None)
    if limit is None:
        return items
    if limit == 0:
        return []
    return items[:limit] if first else items[-limit:]


# --------------------------------------------------------------------------------------------
# Lost events stored with the flows
# --------------------------------------------------------------------------------------------


def _stored_lost(engine: Any, since_ns: Optional[int], until_ns: Optional[int]) -> list[tuple[int, Any]]:
    from api.db import lost_events_table as t

    conds = []
    if since_ns is not None:
        conds.append(t.c.time_ns >= since_ns)
    if until_ns is not None:
        conds.append(t.c.time_ns <= until_ns)
    stmt = select(t.c.time_ns, t.c.node_name, t.c.source, t.c.num_lost, t.c.cpu)
    if conds:
        stmt = stmt.where(and_(*conds))
    stmt = stmt.order_by(t.c.time_ns, t.c.id).limit(_MAX_LOST_ROWS)
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    out = []
    for time_ns, node, source, num, cpu in rows:
        try:
            src = schema.LostEventSource(source).number
        except ValueError:
            src = 0
        ev = fpb.LostEvent(source=src, num_events_lost=int(num))
        if cpu is not None:
            ev.cpu.value = int(cpu)
        out.append((int(time_ns), convert.lost_response(ev, node or "", int(time_ns))))
    return out


def _history(store: Any, plan: FlowsPlan, max_id: int) -> Iterator[Any]:
    """Responses for the stored flows of ``plan`` (ids <= ``max_id``), with the stored lost events of the
    time span the flows cover (the whole range when there is no limit), oldest first."""
    q = plan.query
    mask = plan.mask
    rows = store.query_rows(q, max_id=max_id)
    if q.limit is not None:
        rows = list(rows)
        if not rows:
            return
        lo = rows[0].time_ns if not q.first else (q.since_ns if q.since_ns is not None else rows[0].time_ns)
        hi = rows[-1].time_ns if q.first else (q.until_ns if q.until_ns is not None else time.time_ns())
    else:
        lo, hi = q.since_ns, q.until_ns
    lost = _stored_lost(store.engine, lo, hi)
    li = 0
    respond = convert.stored_flow_response
    for r in rows:
        while li < len(lost) and lost[li][0] <= r.time_ns:
            yield lost[li][1]
            li += 1
        yield respond(r.body, r.node_name, r.time_ns, mask)
    if q.limit is None or not q.first:
        for _, resp in lost[li:]:
            yield resp


# --------------------------------------------------------------------------------------------
# The service
# --------------------------------------------------------------------------------------------


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def _chunks(gen: Iterator[Any]) -> AsyncIterator[list[Any]]:
    """Pull a blocking generator in chunks through a worker thread."""
    def take() -> list[Any]:
        return list(itertools.islice(gen, _HISTORY_CHUNK))

    while True:
        chunk = await _in_thread(take)
        if not chunk:
            return
        yield chunk


def _live_responses(items: list[bytes], mask: Any) -> list[Any]:
    out = []
    for env in items:
        r = convert.envelope_response(env, mask)
        if r is not None:
            out.append(r)
    return out


class ObserverService(opb_grpc.ObserverServicer):
    """``observer.Observer`` over a FlowStore and LiveHub."""

    def __init__(self, store: Any, hub: Any, config: HubbleConfig, *, version: str,
                 agent_events: AgentEvents) -> None:
        self.store = store
        self.hub = hub
        self.config = config
        self.version = version
        self.agent_events = agent_events
        self._node_stats: tuple[float, dict[str, tuple[int, int]]] = (0.0, {})

    # ---- GetFlows --------------------------------------------------------------------------

    async def GetFlows(self, request: Any, context: Any) -> AsyncIterator[Any]:
        try:
            plan = plan_flows(request)
        except RequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            return
        q = plan.query
        if not q.follow:
            max_id = await _in_thread(self.store.last_id)
            async for chunk in _chunks(_history(self.store, plan, max_id)):
                for resp in chunk:
                    yield resp
            return
        loop = asyncio.get_running_loop()
        match = None if q.filters.matches_all else q.filters.match
        sub = await _in_thread(lambda: self.hub.subscribe(match, max_queue=self.config.stream_queue_size,
                                                          last_id=self.store.last_id, loop=loop))
        try:
            if q.limit != 0:
                async for chunk in _chunks(_history(self.store, plan, sub.min_id)):
                    for resp in chunk:
                        yield resp
            while True:
                await sub.wait()
                items, dropped = sub.take()
                if dropped:
                    ev = fpb.LostEvent(source=fpb.HUBBLE_RING_BUFFER, num_events_lost=dropped)
                    yield convert.lost_response(ev, "", time.time_ns())
                if len(items) <= _LIVE_INLINE:
                    responses = _live_responses(items, plan.mask)
                else:
                    responses = await _in_thread(_live_responses, items, plan.mask)
                for resp in responses:
                    yield resp
        finally:
            sub.close()

    # ---- status, nodes, namespaces ---------------------------------------------------------

    def _node_table(self) -> dict[str, tuple[int, int]]:
        """``node -> (stored flows, oldest flow ns)``, cached for a few seconds (one GROUP BY scan)."""
        at, table = self._node_stats
        now = time.monotonic()
        if now - at < _NODE_STATS_TTL_S and at:
            return table
        from api.db import flows_table as t

        with self.store.engine.connect() as conn:
            rows = conn.execute(select(t.c.node_name, func.count(), func.min(t.c.time_ns)).group_by(t.c.node_name)).all()
        table = {name: (int(n), int(oldest)) for name, n, oldest in rows}
        self._node_stats = (now, table)
        return table

    def _nodes(self) -> list[dict[str, Any]]:
        return list(self.store.nodes())

    def _node_state(self, last_seen_ns: int, now_ns: int) -> int:
        fresh = now_ns - last_seen_ns <= self.config.node_stale_after_s * _NS
        return rpb.NODE_CONNECTED if fresh else rpb.NODE_UNAVAILABLE

    def _status(self) -> Any:
        now = time.time_ns()
        from api.db import flows_table as t

        with self.store.engine.connect() as conn:
            recent = conn.execute(select(func.count()).select_from(t).where(t.c.time_ns >= now - _RATE_WINDOW_NS)).scalar()
        st = self.store.status()
        nodes = st.get("nodes") or self._nodes()
        unavailable = [n["name"] for n in nodes if self._node_state(n["last_seen_ns"], now) != rpb.NODE_CONNECTED]
        resp = opb.ServerStatusResponse(
            num_flows=int(st.get("num_flows") or 0), max_flows=0, seen_flows=int(st.get("seen_flows") or 0),
            uptime_ns=max(0, now - self.store.started_ns), unavailable_nodes=unavailable,
            version=self.version, flows_rate=(recent or 0) / (_RATE_WINDOW_NS / _NS))
        resp.num_connected_nodes.value = len(nodes) - len(unavailable)
        resp.num_unavailable_nodes.value = len(unavailable)
        return resp

    async def ServerStatus(self, request: Any, context: Any) -> Any:
        return await _in_thread(self._status)

    def _get_nodes(self) -> Any:
        now = time.time_ns()
        stats = self._node_table()
        out = []
        for n in self._nodes():
            count, oldest = stats.get(n["name"], (0, 0))
            out.append(opb.Node(name=n["name"], version=n.get("agent_version") or "",
                                state=self._node_state(n["last_seen_ns"], now),
                                uptime_ns=max(0, now - oldest) if count else 0, num_flows=count, max_flows=0,
                                seen_flows=count))
        return opb.GetNodesResponse(nodes=out)

    async def GetNodes(self, request: Any, context: Any) -> Any:
        return await _in_thread(self._get_nodes)

    def _get_namespaces(self) -> Any:
        since = time.time_ns() - _NAMESPACE_WINDOW_NS
        names: set[str] = set()
        with self.store.engine.connect() as conn:
            for col in ("src_namespace", "dst_namespace"):
                # Distinct values by index skips (one lookup per namespace), then "any flow in the window".
                distinct = text(
                    f"WITH RECURSIVE ns(n) AS (SELECT min({col}) FROM flows WHERE {col} > '' "
                    f"UNION ALL SELECT (SELECT min({col}) FROM flows WHERE {col} > ns.n) FROM ns WHERE ns.n IS NOT NULL) "
                    f"SELECT n FROM ns WHERE n IS NOT NULL")
                for (ns,) in conn.execute(distinct):
                    if ns in names:
                        continue
                    recent = conn.execute(text(f"SELECT 1 FROM flows WHERE {col} = :ns AND time_ns >= :since LIMIT 1"),
                                          {"ns": ns, "since": since}).first()
                    if recent is not None:
                        names.add(ns)
        return opb.GetNamespacesResponse(namespaces=[opb.Namespace(namespace=n) for n in sorted(names)])

    async def GetNamespaces(self, request: Any, context: Any) -> Any:
        return await _in_thread(self._get_namespaces)

    # ---- agent and debug events ------------------------------------------------------------

    async def GetAgentEvents(self, request: Any, context: Any) -> AsyncIterator[Any]:
        since_ns, until_ns = _opt_ts(request, "since"), _opt_ts(request, "until")
        try:
            _check_times(request.first, request.follow, since_ns, until_ns)
        except RequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            return
        ae = self.agent_events
        last_rev = await _in_thread(ae.last_policy_revision) if request.follow else 0
        seq_before = await _in_thread(ae.max_endpoint_seq) if request.follow else 0
        items = await _in_thread(ae.history, since_ns, until_ns)
        for it in select_events(items, request.number, request.first, request.follow, since_ns):
            yield _agent_response(it)
        if not request.follow:
            return
        # Endpoint events carry increasing sequence numbers: everything up to the newest known when the
        # history was read is history (sent above, or outside the requested range); later ones are new.
        last_seq = max([seq_before] + [it.seq for it in items])
        while True:
            await asyncio.sleep(0.5)
            fresh = await _in_thread(ae.endpoint_events_after, last_seq)
            if fresh:
                last_seq = max(it.seq for it in fresh)
            policies = await _in_thread(lambda: ae.policy_events(after_revision=last_rev))
            if policies:
                last_rev = policies[-1][0]
            for it in sorted(fresh + [it for _, it in policies], key=AgentEventItem.key):
                yield _agent_response(it)

    async def GetDebugEvents(self, request: Any, context: Any) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            "Flowscope has no datapath debug events; use GetFlows and GetAgentEvents")
        yield  # pragma: no cover - makes this an async generator


def _agent_response(it: AgentEventItem) -> Any:
    return opb.GetAgentEventsResponse(agent_event=it.event, node_name=it.node_name, time=convert.timestamp(it.time_ns))


# --------------------------------------------------------------------------------------------
# The listener
# --------------------------------------------------------------------------------------------


class HubbleStartError(RuntimeError):
    """The Hubble listener could not start (address taken, bad TLS files, bad token file)."""


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise HubbleStartError(f"cannot read the Hubble API {what} {path}: {e.strerror}") from None


class HubbleServer:
    """The running gRPC server (Observer + health) on this process's asyncio loop."""

    def __init__(self, server: Any, health: Any, port: int, config: HubbleConfig, service: ObserverService) -> None:
        self.server = server
        self.health = health
        self.port = port
        self.config = config
        self.service = service
        self._poller: Optional[asyncio.Task[None]] = None

    async def stop(self, grace: float = 2.0) -> None:
        if self._poller is not None:
            self._poller.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def _poll_endpoints(ae: AgentEvents, every: float = 2.0) -> None:
    """Watch the endpoint registry so that endpoint events get their time even when nobody follows."""
    while True:
        try:
            await _in_thread(ae.refresh_endpoints)
        except Exception:  # noqa: BLE001 - the watcher must not die
            log.exception("endpoint registry watch failed")
        await asyncio.sleep(every)


async def start_hubble(store: Any, hub: Any, config: HubbleConfig, *, version: str) -> Optional[HubbleServer]:
    """Start the Observer service on ``config.address``. Returns None (after a warning) when the default
    address is taken; raises HubbleStartError for an explicit address that cannot be bound and for bad
    TLS or token files."""
    authorizer = config.authorizer
    if authorizer is None and config.token_file:
        try:
            authorizer = file_authorizer(config.token_file)
        except TokenFileError as e:
            raise HubbleStartError(str(e)) from None
    if authorizer is None and not is_loopback(config.host):
        log.warning("the Hubble API listens on %s without token auth: anyone who reaches it reads every flow "
                    "(give --hubble-token-file)", config.address)
    interceptors = [AuthInterceptor(authorizer)] if authorizer is not None else []
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.so_reuseport", 0),  # never share the port with another process
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ])
    node_name = config.node_name or socket.gethostname()
    agent_events = AgentEvents(store.engine, node_name=node_name, started_ns=store.started_ns,
                               state_dir=config.state_dir)
    service = ObserverService(store, hub, config, version=version, agent_events=agent_events)
    opb_grpc.add_ObserverServicer_to_server(service, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await health.set(OBSERVER_SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    try:
        if config.tls:
            creds = grpc.ssl_server_credentials(
                [(_read(config.tls_key, "TLS key"), _read(config.tls_cert, "TLS certificate"))],
                root_certificates=_read(config.tls_client_ca, "client CA") if config.tls_client_ca else None,
                require_client_auth=bool(config.tls_client_ca))
            port = server.add_secure_port(config.address, creds)
        else:
            port = server.add_insecure_port(config.address)
    except RuntimeError as e:  # grpc raises RuntimeError when it cannot bind
        port = 0
        cause = str(e)
    else:
        cause = "address in use or not available"
    if not port:
        msg = f"cannot listen on {config.address} for the Hubble API ({cause})"
        if config.explicit:
            raise HubbleStartError(msg + "; choose another --hubble-listen or '' to disable it")
        log.warning("%s; running without it (set --hubble-listen to use another address)", msg)
        return None
    await server.start()
    hs = HubbleServer(server, health, port, config, service)
    hs._poller = asyncio.get_running_loop().create_task(_poll_endpoints(agent_events))
    log.info("Hubble API (observer.Observer) on %s%s%s", config.address, " with TLS" if config.tls else "",
             ", token auth" if authorizer is not None else "")
    return hs


def preflight(config: Optional[HubbleConfig]) -> Optional[HubbleConfig]:
    """Check a config before the server starts, so that mistakes are one clear line and not a failed
    start-up: token and TLS files readable and valid, and an explicit address free to bind. A taken
    *default* address only warns (and disables the Hubble API). Raises HubbleStartError."""
    if config is None:
        return None
    if config.token_file and config.authorizer is None:
        try:
            config.authorizer = file_authorizer(config.token_file)
        except TokenFileError as e:
            raise HubbleStartError(str(e)) from None
    if config.tls:
        for path, what in ((config.tls_cert, "TLS certificate"), (config.tls_key, "TLS key"),
                           (config.tls_client_ca, "client CA")):
            if path:
                _read(path, what)
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((config.host, config.port))
        except OSError as e:
            msg = f"cannot listen on {config.address} for the Hubble API: {e.strerror}"
            if config.explicit:
                raise HubbleStartError(msg + " (choose another --hubble-listen, or '' to disable it)") from None
            log.warning("%s; running without it (is another Flowscope or a hubble port-forward on it?)", msg)
            return None
    return config
