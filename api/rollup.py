"""Per-minute rollup of flows (issue 10): what the service map and top talkers need, without the flows.

One rollup row counts the flows of one minute (``bucket_ns``) that share a key:

    (source map node, source pod, destination map node, destination pod, "PROTO/port", verdict,
     drop reason, L7 protocol, L7 latency bucket, deciding policies)

and holds ``flows``, ``bytes``, L7 ``requests`` / ``responses`` / ``errors`` and the first/last flow time.
Map nodes and the client -> server direction are exactly the dashboard's (:mod:`api.dashboard_model`:
a reply counts on its request's edge, bytes are what a connection's running counters grew by). A side
table describes each map node and pod (kind, labels, identity, addresses, ``flowscope observe`` args),
written only when something about it is new.

Pure parts (no I/O): :class:`RollupBuilder` (flows -> rows, per batch, in the ingest path),
:func:`merge_rows`, :func:`build_map` and :func:`top_talkers` (grouped rows -> the answers).
SQL parts: :func:`write_rollup` (one upsert per distinct key, in the caller's transaction),
:func:`read_groups` / :func:`read_talkers` / :func:`read_endpoints`, and :func:`backfill`.
"""

from __future__ import annotations

import threading
from typing import Any, Iterable, Optional, Sequence

import orjson
from sqlalchemy import func, select

from flowscope import schema

from . import dashboard_model as dm
from .db import flow_rollup_endpoints_table, flow_rollup_table

BUCKET_NS = 60 * 1_000_000_000  # one rollup bucket: a minute

KEY_COLUMNS: tuple[str, ...] = ("bucket_ns", "src", "src_pod", "dst", "dst_pod", "port", "verdict",
                                "drop_reason", "l7", "latency", "policy")
VALUE_COLUMNS: tuple[str, ...] = ("src_ns", "dst_ns", "flows", "bytes", "requests", "responses", "errors",
                                  "first_ns", "last_ns")
ROLLUP_COLUMNS = KEY_COLUMNS + VALUE_COLUMNS
_NK = len(KEY_COLUMNS)
# value offsets inside a row (after the key)
_SRC_NS, _DST_NS, _FLOWS, _BYTES, _REQ, _RESP, _ERR, _FIRST, _LAST = range(_NK, _NK + len(VALUE_COLUMNS))

ENDPOINT_COLUMNS: tuple[str, ...] = ("key", "kind", "namespace", "name", "workload", "identity", "labels",
                                     "from_args", "to_args", "addrs", "nodes", "last_ns")
POD_PREFIX = "pod:"  # endpoint keys of pods (map nodes use their own keys: "ns/app", "world", ...)

_PROTO = {"TCP": "TCP", "UDP": "UDP", "ICMPv4": "ICMPv4", "ICMPv6": "ICMPv6", "SCTP": "SCTP"}


def bucket_of(time_ns: int) -> int:
    """Start of the minute holding ``time_ns``."""
    return time_ns - time_ns % BUCKET_NS


# --------------------------------------------------------------------------------------------
# Building rows from flows (pure)
# --------------------------------------------------------------------------------------------


class _EndpointInfo:
    __slots__ = ("desc", "addrs", "nodes", "last_ns")

    def __init__(self, desc: tuple[Any, ...]) -> None:
        self.desc = desc  # (kind, namespace, name, workload, identity, labels, from_args, to_args)
        self.addrs: list[str] = []
        self.nodes: list[str] = []
        self.last_ns = 0


class RollupBuilder:
    """Turns flows into rollup rows. Long-lived (one per ingest process): it remembers each connection's
    byte counters (so periodic updates are not counted twice) and which node/pod descriptions it has
    already handed out. :meth:`add_batch` is safe to call from several threads (one at a time)."""

    def __init__(self, max_endpoints: int = 50_000) -> None:
        self.bytes = dm.ByteCounter()
        self._refs: dict[tuple[Any, ...], dm.NodeRef] = {}
        self._eps: dict[str, _EndpointInfo] = {}
        self._max_eps = max_endpoints
        self._dirty: dict[str, _EndpointInfo] = {}
        self._lock = threading.Lock()

    def add_batch(self, flows: Iterable[tuple[schema.Flow, int]]) -> tuple[list[list[Any]], list[list[Any]]]:
        """(rollup rows, endpoint rows) of ``(flow, time_ns)`` pairs: one rollup row per distinct key,
        endpoint rows only for nodes/pods whose description (or address list) is new to this builder."""
        with self._lock:
            agg: dict[tuple[Any, ...], list[Any]] = {}
            for f, t in flows:
                self._add(agg, f, t)
            return [list(k) + v for k, v in agg.items()], self._take_endpoints()

    def _ref(self, ep: Optional[schema.Endpoint], ip: str) -> dm.NodeRef:
        if ep is not None:
            key: tuple[Any, ...] = (ep.namespace, ep.pod_name) if ep.pod_name else (
                ep.namespace, "", ep.identity, ip, ep.labels[0] if ep.labels else "")
        else:
            key = ("", "", 0, ip, "")
        ref = self._refs.get(key)
        if ref is None:
            if len(self._refs) > 100_000:
                self._refs.clear()
            ref = self._refs[key] = dm.node_ref(ep, ip)
        return ref

    def _note(self, key: str, desc: tuple[Any, ...], addr: str, node: str, time_ns: int) -> None:
        info = self._eps.get(key)
        if info is None:
            if len(self._eps) >= self._max_eps:
                self._eps.clear()
            info = self._eps[key] = _EndpointInfo(desc)
            self._dirty[key] = info
        elif info.desc != desc:
            info.desc = desc
            self._dirty[key] = info
        if addr and addr not in info.addrs and len(info.addrs) < dm.MAX_ADDRS:
            info.addrs.append(addr)
            self._dirty[key] = info
        if node and node not in info.nodes and len(info.nodes) < dm.MAX_ADDRS:
            info.nodes.append(node)
            self._dirty[key] = info
        if time_ns > info.last_ns:
            if time_ns - info.last_ns > BUCKET_NS:  # keep last_ns roughly fresh (retention reads it)
                self._dirty[key] = info
            info.last_ns = time_ns

    def _endpoint(self, ref: dm.NodeRef, ep: Optional[schema.Endpoint], ip: str, node_name: str,
                  time_ns: int) -> str:
        """Records the node (and pod) descriptions; returns the pod key ('' when not a pod)."""
        labels = tuple(ep.labels) if ep is not None else ()
        identity = ep.identity if ep is not None else 0
        pod = ep is not None and bool(ep.pod_name)
        self._note(ref.key, (ref.kind, ref.namespace, ref.name, "", identity, labels, tuple(ref.from_args),
                             tuple(ref.to_args)), "" if pod else ip, "", time_ns)
        if not pod:
            return ""
        assert ep is not None
        pkey = f"{ep.namespace}/{ep.pod_name}" if ep.namespace else ep.pod_name
        self._note(POD_PREFIX + pkey, ("pod", ep.namespace, ep.pod_name, ref.key, identity, labels, (), ()),
                   ip, node_name, time_ns)
        return pkey

    def _add(self, agg: dict[tuple[Any, ...], list[Any]], f: schema.Flow, t: int) -> None:
        ip = f.IP
        sip, dip = (ip.source, ip.destination) if ip is not None else ("", "")
        src_ep, dst_ep = f.source, f.destination
        proto, sport, dport = dm._ports(f.l4)
        if f.is_reply or (f.is_reply is None and dm.looks_like_reply(sport, dport)):
            src_ep, dst_ep, sip, dip, sport, dport = dst_ep, src_ep, dip, sip, dport, sport
        sref, dref = self._ref(src_ep, sip), self._ref(dst_ep, dip)
        node = f.node_name
        spod = self._endpoint(sref, src_ep, sip, node, t)
        dpod = self._endpoint(dref, dst_ep, dip, node, t)
        verdict = f.verdict._value_
        vclass = dm.VERDICT_CLASS.get(verdict, "forwarded")
        port = (f"{proto}/{dport}" if dport else proto) if proto else ""
        reason = ""
        policy = ""
        if vclass != "forwarded":
            if vclass == "dropped":
                r = f.drop_reason_desc._value_
                reason = "" if r == "DROP_REASON_UNKNOWN" else r
            if f.egress_denied_by or f.ingress_denied_by:
                policy = "\n".join(dm.policy_ref(p) for p in (*f.egress_denied_by, *f.ingress_denied_by))
        elif f.egress_allowed_by or f.ingress_allowed_by:
            policy = "\n".join(dm.policy_ref(p) for p in (*f.egress_allowed_by, *f.ingress_allowed_by))
        l7p = ""
        lat = 0
        req = resp = err = 0
        l7 = f.l7
        if l7 is not None:
            l7p = dm.l7_protocol(l7)
            typ = l7.type._value_
            if typ == "REQUEST":
                req = 1
            elif typ == "RESPONSE":
                resp = 1
                err = 1 if dm.l7_error(l7) else 0
                ns = dm._int(l7.latency_ns)
                if ns:
                    lat = dm._bucket(ns)
        nbytes = 0
        ext = f.flowscope
        if ext is not None:
            total = dm._int(ext.egress_bytes) + dm._int(ext.ingress_bytes)
            if total:
                nbytes = self.bytes.delta((proto, sip, sport, dip, dport), total)
        key = (t - t % BUCKET_NS, sref.key, spod, dref.key, dpod, port, verdict, reason, l7p, lat, policy)
        v = agg.get(key)
        if v is None:
            agg[key] = [sref.namespace, dref.namespace, 1, nbytes, req, resp, err, t, t]
        else:
            v[2] += 1
            v[3] += nbytes
            v[4] += req
            v[5] += resp
            v[6] += err
            if t < v[7]:
                v[7] = t
            if t > v[8]:
                v[8] = t

    def _take_endpoints(self) -> list[list[Any]]:
        out = []
        dirty, self._dirty = self._dirty, {}
        for key, info in dirty.items():
            if True:
                kind, ns, name, workload, identity, labels, from_args, to_args = info.desc
                out.append([key, kind, ns, name, workload, identity, orjson.dumps(labels).decode(),
                            orjson.dumps(from_args).decode(), orjson.dumps(to_args).decode(),
                            orjson.dumps(info.addrs).decode(), orjson.dumps(info.nodes).decode(), info.last_ns])
        return out


def merge_rows(*parts: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """Rollup rows of several batches with equal keys summed (one upsert per key per transaction)."""
    out: dict[tuple[Any, ...], list[Any]] = {}
    for rows in parts:
        for r in rows:
            k = tuple(r[:_NK])
            v = out.get(k)
            if v is None:
                out[k] = list(r)
            else:
                for i in (_FLOWS, _BYTES, _REQ, _RESP, _ERR):
                    v[i] += r[i]
                v[_FIRST] = min(v[_FIRST], r[_FIRST])
                v[_LAST] = max(v[_LAST], r[_LAST])
    return list(out.values())


def merge_endpoints(*parts: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """Endpoint rows with one row per key (the newest description wins)."""
    out: dict[str, list[Any]] = {}
    for rows in parts:
        for r in rows:
            prev = out.get(r[0])
            if prev is None or r[-1] >= prev[-1]:
                out[r[0]] = list(r)
    return list(out.values())


# --------------------------------------------------------------------------------------------
# Answers from grouped rows (pure)
# --------------------------------------------------------------------------------------------

# Columns of a grouped row (read_groups): the key without bucket_ns, then the summed values.
GROUP_KEY = KEY_COLUMNS[1:]
GROUP_COLUMNS = GROUP_KEY + VALUE_COLUMNS


def _loads(text: Any) -> Any:
    try:
        return orjson.loads(text) if text else []
    except orjson.JSONDecodeError:
        return []


def _node_from(key: str, desc: Optional[Sequence[Any]]) -> dm.Node:
    if desc is None:  # no description stored (e.g. deleted by retention): what the key tells
        ns, _, name = key.rpartition("/")
        ref = dm.NodeRef(key, "workload" if ns else key.split(":", 1)[0], ns, name or key, [], [])
        return dm.Node(ref)
    _, kind, ns, name, _w, identity, labels, from_args, to_args, addrs, _nodes, _last = desc
    n = dm.Node(dm.NodeRef(key, kind, ns, name, list(_loads(from_args)), list(_loads(to_args))))
    n.labels = list(_loads(labels))
    n.identity = int(identity or 0)
    for a in _loads(addrs):
        n.addrs[a] = 0
    return n


def build_map(groups: Iterable[Sequence[Any]], endpoints: dict[str, Sequence[Any]], since_ns: int,
              until_ns: int) -> dict[str, Any]:
    """The dashboard's range map (:meth:`MapAggregator.snapshot` shape) from grouped rollup rows
    (``GROUP_COLUMNS`` order) and endpoint descriptions (``key -> flow_rollup_endpoints row``).

    Differences from aggregating the flows themselves: an edge's ports are its 12 busiest (the rest are
    ``other_ports``), and a node's address list is the first addresses the ingest path saw."""
    edges: dict[tuple[str, str], dm.Edge] = {}
    nodes: dict[str, dm.Node] = {}
    pods: dict[str, dm.Pod] = {}
    total = 0
    first_all = last_all = 0

    def node(key: str) -> dm.Node:
        n = nodes.get(key)
        if n is None:
            n = nodes[key] = _node_from(key, endpoints.get(key))
        return n

    def pod(key: str, workload: str) -> dm.Pod:
        p = pods.get(key)
        if p is None:
            desc = endpoints.get(POD_PREFIX + key)
            if desc is not None:
                _, _k, ns, name, wl, identity, labels, _f, _t, addrs, nnames, _l = desc
            else:
                ns, _, name = key.rpartition("/")
                wl, identity, labels, addrs, nnames = workload, 0, "[]", "[]", "[]"
            p = pods[key] = dm.Pod.blank(key, ns, name, wl or workload)
            p.identity = int(identity or 0)
            p.labels = list(_loads(labels))
            p.ips = list(_loads(addrs))
            p.nodes = list(_loads(nnames))
        return p

    for g in groups:
        (src, spod, dst, dpod, port, verdict, reason, l7p, lat, policy,
         _sns, _dns, flows, nbytes, req, resp, err, first, last) = g
        flows, nbytes, first, last = int(flows), int(nbytes or 0), int(first), int(last)
        total += flows
        if not first_all or first < first_all:
            first_all = first
        if last > last_all:
            last_all = last
        vclass = dm.VERDICT_CLASS.get(verdict, "forwarded")
        dropped = vclass == "dropped"
        sn, dn = node(src), node(dst)
        sn.flows_out += flows
        dn.flows_in += flows
        if dropped:
            dn.drops += flows
        sn.last_ns = max(sn.last_ns, last)
        dn.last_ns = max(dn.last_ns, last)
        if spod:
            p = pod(spod, src)
            sn.pods.add(p.pod_name)
            p.flows_out += flows
            if dropped:
                p.drops_out += flows
            p.first_ns = min(p.first_ns, first) if p.first_ns else first
            p.last_ns = max(p.last_ns, last)
        if dpod:
            p = pod(dpod, dst)
            dn.pods.add(p.pod_name)
            p.flows_in += flows
            if dropped:
                p.drops_in += flows
            p.first_ns = min(p.first_ns, first) if p.first_ns else first
            p.last_ns = max(p.last_ns, last)
        e = edges.get((src, dst))
        if e is None:
            e = edges[(src, dst)] = dm.Edge((src, dst), False)
            e.first_ns = first
        e.flows += flows
        e.verdicts[verdict] = e.verdicts.get(verdict, 0) + flows
        e.bytes += nbytes
        e.first_ns = min(e.first_ns, first)
        e.last_ns = max(e.last_ns, last)
        if port:
            e.ports[port] = e.ports.get(port, 0) + flows
        if reason:
            e.drop_reasons[reason] = e.drop_reasons.get(reason, 0) + flows
        if policy:
            target = e.allowed_by if vclass == "forwarded" else e.denied_by
            for ref in policy.split("\n"):
                target[ref] = target.get(ref, 0) + flows
        if l7p:
            e.l7_protocols[l7p] = e.l7_protocols.get(l7p, 0) + flows
            e.requests += int(req or 0)
            e.responses += int(resp or 0)
            e.errors += int(err or 0)
            if lat:
                e.hist[int(lat)] = e.hist.get(int(lat), 0) + int(resp or 0)
    for e in edges.values():
        if len(e.ports) > dm.MAX_PORTS:
            top = sorted(e.ports.items(), key=lambda kv: -kv[1])
            e.ports = dict(top[:dm.MAX_PORTS])
            e.other_ports = sum(n for _, n in top[dm.MAX_PORTS:])
    span = max((until_ns - since_ns) / 1e9, 1e-9)
    return {"version": 1, "flows": total, "first_ns": first_all, "last_ns": last_all,
            "nodes": [n.to_json() for n in nodes.values()],
            "edges": [e.to_json(span) for e in edges.values()],
            "pods": [p.to_json() for p in pods.values()]}


TALKERS_BY = ("pod", "namespace")


def top_talkers(groups: Iterable[Sequence[Any]], limit: int) -> list[dict[str, Any]]:
    """Ranked ``{"source", "destination", "flows", "bytes", "drops", "first_ns", "last_ns"}`` from rows
    ``(source, destination, flows, bytes, drops, first_ns, last_ns)``: most flows first, then most bytes."""
    items = [{"source": s, "destination": d, "flows": int(f), "bytes": int(b or 0), "drops": int(dr or 0),
              "first_ns": int(fi), "last_ns": int(la)} for s, d, f, b, dr, fi, la in groups]
    items.sort(key=lambda it: (-it["flows"], -it["bytes"], it["source"], it["destination"]))
    return items[:limit]


def rollup_window(since_ns: int, until_ns: int) -> tuple[int, int]:
    """The whole minutes the rollup answers for a window: [minute of since, end of the minute of until)."""
    return bucket_of(since_ns), bucket_of(until_ns) + BUCKET_NS


# --------------------------------------------------------------------------------------------
# SQL
# --------------------------------------------------------------------------------------------

_upserts: dict[tuple[str, str], tuple[str, str]] = {}


def _upsert_sql(dialect: Any) -> tuple[str, str]:
    """(rollup upsert, endpoint upsert) as DBAPI SQL for this dialect (SQLite or PostgreSQL)."""
    name = dialect.name
    cached = _upserts.get((name, str(dialect.paramstyle)))
    if cached is not None:
        return cached
    if name not in ("sqlite", "postgresql"):
        raise NotImplementedError(f"the flow rollup needs SQLite or PostgreSQL (not {name})")
    mod = __import__(f"sqlalchemy.dialects.{name}", fromlist=["insert"])
    lo, hi = (func.min, func.max) if name == "sqlite" else (func.least, func.greatest)
    t = flow_rollup_table
    ins = mod.insert(t)
    x = ins.excluded
    rollup = ins.on_conflict_do_update(index_elements=[t.c[k] for k in KEY_COLUMNS], set_={
        **{c: t.c[c] + x[c] for c in ("flows", "bytes", "requests", "responses", "errors")},
        "first_ns": lo(t.c.first_ns, x.first_ns), "last_ns": hi(t.c.last_ns, x.last_ns)})
    te = flow_rollup_endpoints_table
    ins_e = mod.insert(te)
    xe = ins_e.excluded
    endpoint = ins_e.on_conflict_do_update(index_elements=[te.c.key], set_={
        **{c: xe[c] for c in ENDPOINT_COLUMNS[1:-1]}, "last_ns": hi(te.c.last_ns, xe.last_ns)})
    out = []
    for stmt, cols in ((rollup, ROLLUP_COLUMNS), (endpoint, ENDPOINT_COLUMNS)):
        compiled = stmt.values({c: None for c in cols}).compile(dialect=dialect)
        if dialect.positional:
            positions = list(compiled.positiontup or [])  # type: ignore[union-attr]
            if positions[:len(cols)] != list(cols):
                raise RuntimeError(f"unexpected parameter order {positions}")
        out.append(str(compiled))
    _upserts[(name, str(dialect.paramstyle))] = (out[0], out[1])
    return out[0], out[1]


def write_rollup(conn: Any, rows: Sequence[Sequence[Any]], endpoints: Sequence[Sequence[Any]] = ()) -> None:
    """Upsert rollup rows (counters added) and endpoint rows (description replaced) in the caller's
    transaction, with the DBAPI's executemany (one statement per distinct key)."""
    if not rows and not endpoints:
        return
    rollup_sql, endpoint_sql = _upsert_sql(conn.dialect)
    positional = bool(conn.dialect.positional)
    cur = conn.connection.cursor()
    try:
        for sql, cols, data in ((rollup_sql, ROLLUP_COLUMNS, rows), (endpoint_sql, ENDPOINT_COLUMNS, endpoints)):
            if data:
                cur.executemany(sql, data if positional else [dict(zip(cols, r)) for r in data])
    finally:
        cur.close()


def _window(since_ns: int, until_ns: int) -> Any:
    lo, hi = rollup_window(since_ns, until_ns)
    return (flow_rollup_table.c.bucket_ns >= lo) & (flow_rollup_table.c.bucket_ns < hi)


def read_groups(conn: Any, since_ns: int, until_ns: int) -> list[Any]:
    """Rollup rows of the window's minutes summed per key (``GROUP_COLUMNS``)."""
    t = flow_rollup_table.c
    keys = [t[k] for k in GROUP_KEY]
    stmt = (select(*keys, func.max(t.src_ns), func.max(t.dst_ns), func.sum(t.flows), func.sum(t.bytes),
                   func.sum(t.requests), func.sum(t.responses), func.sum(t.errors), func.min(t.first_ns),
                   func.max(t.last_ns))
            .where(_window(since_ns, until_ns)).group_by(*keys))
    return list(conn.execute(stmt))


def read_endpoints(conn: Any, keys: Iterable[str]) -> dict[str, Any]:
    te = flow_rollup_endpoints_table
    cols = [te.c[c] for c in ENDPOINT_COLUMNS]
    wanted = list(set(keys))
    out: dict[str, Any] = {}
    for i in range(0, len(wanted), 500):
        for r in conn.execute(select(*cols).where(te.c.key.in_(wanted[i:i + 500]))):
            out[r[0]] = tuple(r)
    return out


def endpoint_keys(groups: Iterable[Sequence[Any]]) -> set[str]:
    keys: set[str] = set()
    for g in groups:
        keys.add(g[0])
        keys.add(g[2])
        if g[1]:
            keys.add(POD_PREFIX + g[1])
        if g[3]:
            keys.add(POD_PREFIX + g[3])
    return keys


def read_talkers(conn: Any, since_ns: int, until_ns: int, by: str, limit: int) -> list[Any]:
    """``(source, destination, flows, bytes, drops, first_ns, last_ns)`` of the window's busiest pairs:
    ``by="pod"``: pods (a side that is not a pod: its map node, e.g. ``world``); ``"namespace"``:
    namespaces ('' for sides without one)."""
    t = flow_rollup_table.c
    if by == "pod":
        src = func.coalesce(func.nullif(t.src_pod, ""), t.src)
        dst = func.coalesce(func.nullif(t.dst_pod, ""), t.dst)
    elif by == "namespace":
        src, dst = t.src_ns, t.dst_ns
    else:
        raise ValueError(f"by must be one of {', '.join(TALKERS_BY)}")
    from sqlalchemy import case

    flows = func.sum(t.flows)
    drops = func.sum(case((t.verdict.in_(("DROPPED", "ERROR")), t.flows), else_=0))
    stmt = (select(src, dst, flows, func.sum(t.bytes), drops, func.min(t.first_ns), func.max(t.last_ns))
            .where(_window(since_ns, until_ns)).group_by(src, dst)
            .order_by(flows.desc(), func.sum(t.bytes).desc()).limit(limit))
    return list(conn.execute(stmt))


def backfill(conn: Any, *, chunk: int = 20_000, log: Any = None) -> int:
    """Fill the rollup from the stored flows (oldest id first, ``chunk`` flows per step, in the caller's
    transaction); returns the number of flows read. The flows' JSON is decoded (the map's node grouping
    needs workloads, labels and address classes that are not columns)."""
    import msgspec

    from .db import flows_table

    decode = msgspec.json.Decoder(schema.Flow).decode
    t = flows_table.c
    builder = RollupBuilder()
    last_id = 0
    n = 0
    while True:
        rows = conn.execute(select(t.id, t.time_ns, t.body).where(t.id > last_id).order_by(t.id).limit(chunk)).all()
        if not rows:
            break
        last_id = rows[-1][0]
        pairs = []
        for _id, time_ns, body in rows:
            try:
                pairs.append((decode(body), time_ns))
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue  # a body this version cannot read: not counted
        agg, eps = builder.add_batch(pairs)
        write_rollup(conn, agg, eps)
        n += len(rows)
        if log is not None and n % 1_000_000 < chunk:
            log(n)
    return n
