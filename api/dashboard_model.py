"""The dashboard's aggregation of flows into a service map, endpoints, drops and policy counts. Pure.

Map nodes are workloads (a pod's workload, else its ``app`` label, else the pod) grouped by namespace,
plus the reserved ``world`` and ``host`` nodes (and plain IPs the agent could not attribute). An edge
joins the client side of a connection to its server side: a reply (``is_reply: true``) counts on the
edge of its request. Per edge: flow records by verdict, bytes, destination ports/protocols, drop
reasons, deciding policies and, for L7 records, requests, errors and a latency histogram (p50/p95).

Bytes come from the probe's running per-connection counters (``flowscope.*_bytes``): each record adds
what its connection's total grew by since the previous record of that connection (both ends of one
connection share its key), so periodic updates are not counted twice.

Everything here is plain data structures (no I/O, no clock): the server feeds flows in, asks for JSON
snapshots or for what changed since a version, and calls :meth:`MapAggregator.rotate` on its clock.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict, deque
from typing import Any, Iterable, Optional

from flowscope import schema

# --------------------------------------------------------------------------------------------
# Verdict classes and L7 errors
# --------------------------------------------------------------------------------------------

VERDICT_CLASS = {"FORWARDED": "forwarded", "REDIRECTED": "forwarded", "TRANSLATED": "forwarded",
                 "TRACED": "forwarded", "DROPPED": "dropped", "ERROR": "dropped", "AUDIT": "audit"}
"""How each verdict colours the map: forwarded (green), dropped (red), audit (amber)."""

_RESERVED_NODE = {1: "host", 2: "world", 9: "world", 10: "world"}
_RESERVED_NAMES = {3: "unmanaged", 4: "health", 5: "init", 6: "remote-node", 7: "kube-apiserver", 8: "ingress"}
_APP_LABELS = ("k8s:app=", "app=", "k8s:app.kubernetes.io/name=", "app.kubernetes.io/name=")
MAX_PORTS = 12  # distinct destination ports kept per edge (the rest are counted as "other")
MAX_ADDRS = 8  # addresses / names kept per world node and per pod


def l7_error(l7: schema.Layer7) -> bool:
    """Whether an L7 response is an error: HTTP 5xx, gRPC status != 0, Kafka error code != 0, DNS rcode != 0."""
    h = l7.http
    if h is not None:
        if h.code >= 500:
            return True
        for hd in h.headers:
            if hd.key == "grpc-status":
                return hd.value not in ("", "0")
        return False
    if l7.kafka is not None:
        return l7.kafka.error_code != 0
    if l7.dns is not None:
        return l7.dns.rcode != 0
    return False


def l7_protocol(l7: schema.Layer7) -> str:
    if l7.http is not None:
        if l7.http.protocol.startswith("HTTP/2") and any(h.key == "grpc-status" or (
                h.key == "content-type" and h.value.startswith("application/grpc")) for h in l7.http.headers):
            return "grpc"
        return "http"
    if l7.dns is not None:
        return "dns"
    if l7.kafka is not None:
        return "kafka"
    return "l7"


# --------------------------------------------------------------------------------------------
# Latency histogram (mergeable, ~6 % resolution)
# --------------------------------------------------------------------------------------------


def _bucket(ns: int) -> int:
    b = ns.bit_length()
    if b <= 4:
        return ns
    return (b << 3) | ((ns >> (b - 4)) & 7)


def _bucket_value(idx: int) -> float:
    if idx < 40:
        return float(idx)
    b, sub = idx >> 3, idx & 7
    lo = (8 | sub) << (b - 4)
    return lo + (1 << (b - 4)) / 2


def quantile(hist: dict[int, int], q: float) -> Optional[float]:
    """The ``q`` quantile (0..1) of a histogram of nanoseconds, or None when empty."""
    total = sum(hist.values())
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for idx in sorted(hist):
        seen += hist[idx]
        if seen >= rank:
            return _bucket_value(idx)
    return _bucket_value(max(hist))


# --------------------------------------------------------------------------------------------
# Node identity
# --------------------------------------------------------------------------------------------


def _ip_is_global(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_global
    except ValueError:
        return False


def _ip_is_multicast(ip: str) -> bool:
    if not ip:
        return False
    try:
        a = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return a.is_multicast or ip == "255.255.255.255"


_MULTICAST_ARGS = ["--ip", "ff00::/8", "--ip", "224.0.0.0/4", "--ip", "255.255.255.255"]
EPHEMERAL_PORTS = 32768  # Linux's ip_local_port_range starts here


def looks_like_reply(sport: int, dport: int) -> bool:
    """For a record whose ``is_reply`` is unknown: a service port talking to an ephemeral port."""
    return 0 < sport < EPHEMERAL_PORTS <= dport


class NodeRef:
    """What a map node is: ``key`` (unique), ``kind`` (workload, pod, world, host, reserved, ip),
    namespace, display name, and the ``flowscope observe`` flags that select its flows."""

    __slots__ = ("key", "kind", "namespace", "name", "from_args", "to_args")

    def __init__(self, key: str, kind: str, namespace: str, name: str, from_args: list[str], to_args: list[str]):
        self.key, self.kind, self.namespace, self.name = key, kind, namespace, name
        self.from_args, self.to_args = from_args, to_args


def _label_value(labels: list[str], prefixes: tuple[str, ...]) -> Optional[tuple[str, str]]:
    for prefix in prefixes:
        for lb in labels:
            if lb.startswith(prefix):
                return prefix.split(":", 1)[-1][:-1], lb[len(prefix):]
    return None


def node_ref(ep: Optional[schema.Endpoint], ip: str) -> NodeRef:
    """The map node of one side of a flow (its endpoint and address)."""
    if ep is not None and ep.pod_name:
        ns = ep.namespace
        if ep.workloads:
            w = ep.workloads[0]
            return NodeRef(f"{ns}/{w.name}", "workload", ns, w.name, ["--from-namespace", ns, "--from-workload", w.name],
                           ["--to-namespace", ns, "--to-workload", w.name]) if ns else NodeRef(
                f"/{w.name}", "workload", "", w.name, ["--from-workload", w.name], ["--to-workload", w.name])
        app = _label_value(ep.labels, _APP_LABELS)
        if app is not None:
            key, value = app
            sel = f"{key}={value}"
            from_args = (["--from-namespace", ns] if ns else []) + ["--from-label", sel]
            to_args = (["--to-namespace", ns] if ns else []) + ["--to-label", sel]
            return NodeRef(f"{ns}/{value}", "workload", ns, value, from_args, to_args)
        pod = f"{ns}/{ep.pod_name}" if ns else ep.pod_name
        return NodeRef(pod, "pod", ns, ep.pod_name, ["--from-pod", pod], ["--to-pod", pod])
    identity = ep.identity if ep is not None else 0
    labels = ep.labels if ep is not None else []
    if _ip_is_multicast(ip):  # neighbour discovery, mDNS, ...: not "the world"
        return NodeRef("multicast", "multicast", "", "multicast", [a.replace("--ip", "--from-ip") for a in _MULTICAST_ARGS],
                       [a.replace("--ip", "--to-ip") for a in _MULTICAST_ARGS])
    if identity in _RESERVED_NODE or "reserved:host" in labels or "reserved:world" in labels:
        name = _RESERVED_NODE.get(identity) or ("host" if "reserved:host" in labels else "world")
        return NodeRef(name, name, "", name, ["--from-identity", name], ["--to-identity", name])
    if identity in _RESERVED_NAMES:
        name = _RESERVED_NAMES[identity]
        return NodeRef(f"reserved:{name}", "reserved", "", name, ["--from-identity", name], ["--to-identity", name])
    if ep is not None and ep.namespace:
        ns = ep.namespace
        return NodeRef(f"{ns}/id:{identity}", "workload", ns, f"identity {identity}",
                       ["--from-namespace", ns, "--from-identity", str(identity)],
                       ["--to-namespace", ns, "--to-identity", str(identity)])
    if ip and _ip_is_global(ip):
        return NodeRef("world", "world", "", "world", ["--from-identity", "world"], ["--to-identity", "world"])
    if ip:
        return NodeRef(f"ip:{ip}", "ip", "", ip, ["--from-ip", ip], ["--to-ip", ip])
    return NodeRef("unknown", "unknown", "", "unknown", [], [])


def _ports(l4: Optional[schema.Layer4]) -> tuple[str, int, int]:
    """(protocol, source port, destination port) of a flow."""
    if l4 is None:
        return "", 0, 0
    if (t := l4.TCP) is not None:
        return "TCP", t.source_port, t.destination_port
    if (u := l4.UDP) is not None:
        return "UDP", u.source_port, u.destination_port
    if l4.ICMPv4 is not None:
        return "ICMPv4", 0, 0
    if l4.ICMPv6 is not None:
        return "ICMPv6", 0, 0
    if (s := l4.SCTP) is not None:
        return "SCTP", s.source_port, s.destination_port
    return "", 0, 0


_PORT_NAMES: dict[tuple[str, int], str] = {}


def _int(text: str) -> int:
    return int(text) if text.isdigit() else 0


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


class _Window:
    """Recent activity in two slots (current, previous) rotated on the server's clock, so rates and
    percentiles describe the last 1-2 rotation periods."""

    __slots__ = ("flows", "requests", "errors", "hist", "p_flows", "p_requests", "p_errors", "p_hist")

    def __init__(self) -> None:
        self.flows = self.requests = self.errors = 0
        self.p_flows = self.p_requests = self.p_errors = 0
        self.hist: dict[int, int] = {}
        self.p_hist: dict[int, int] = {}

    def rotate(self) -> bool:
        """Shift current into previous; True when the window was not empty (its numbers changed)."""
        active = bool(self.flows or self.p_flows)
        self.p_flows, self.p_requests, self.p_errors, self.p_hist = self.flows, self.requests, self.errors, self.hist
        self.flows = self.requests = self.errors = 0
        self.hist = {}
        return active


class Edge:
    __slots__ = ("key", "id", "source", "target", "flows", "verdicts", "bytes", "ports", "other_ports",
                 "drop_reasons", "denied_by", "allowed_by", "l7_protocols", "requests", "responses",
                 "errors", "hist", "first_ns", "last_ns", "version", "win")

    def __init__(self, key: tuple[str, str], windowed: bool) -> None:
        self.key = key
        self.id = f"{key[0]}->{key[1]}"
        self.source, self.target = key
        self.flows = 0
        self.verdicts: dict[str, int] = {}
        self.bytes = 0
        self.ports: dict[str, int] = {}
        self.other_ports = 0
        self.drop_reasons: dict[str, int] = {}
        self.denied_by: dict[str, int] = {}
        self.allowed_by: dict[str, int] = {}
        self.l7_protocols: dict[str, int] = {}
        self.requests = self.responses = self.errors = 0
        self.hist: dict[int, int] = {}
        self.first_ns = self.last_ns = 0
        self.version = 0
        self.win: Optional[_Window] = _Window() if windowed else None

    def to_json(self, span_s: float) -> dict[str, Any]:
        """The edge as the browser gets it; rates are per second over ``span_s`` (range mode) or over
        the recent window (live mode, ``span_s`` = the window's length)."""
        classes = {}
        for v, n in self.verdicts.items():
            c = VERDICT_CLASS.get(v, "forwarded")
            classes[c] = classes.get(c, 0) + n
        w = self.win
        if w is not None:
            flows_recent, req_recent, err_recent = w.flows + w.p_flows, w.requests + w.p_requests, w.errors + w.p_errors
            hist = dict(w.p_hist)
            for k, n in w.hist.items():
                hist[k] = hist.get(k, 0) + n
            if not hist:  # nothing recent: describe the whole session
                hist = self.hist
        else:
            flows_recent, req_recent, err_recent, hist = self.flows, self._requests(), self.errors, self.hist
        out: dict[str, Any] = {
            "id": self.id, "source": self.source, "target": self.target, "flows": self.flows,
            "verdicts": self.verdicts, "classes": classes, "bytes": self.bytes,
            "ports": sorted(self.ports.items(), key=lambda kv: -kv[1]), "other_ports": self.other_ports,
            "drop_reasons": self.drop_reasons, "denied_by": self.denied_by, "allowed_by": self.allowed_by,
            "first_ns": self.first_ns, "last_ns": self.last_ns,
            "flow_rate": round(flows_recent / span_s, 3) if span_s > 0 else 0.0,
        }
        if self.l7_protocols:
            req = self._requests()
            p50, p95 = quantile(hist, 0.5), quantile(hist, 0.95)
            out["l7"] = {
                "protocols": self.l7_protocols, "requests": req, "errors": self.errors,
                "error_rate": round(self.errors / self.responses, 4) if self.responses else 0.0,
                "recent_error_rate": round(err_recent / req_recent, 4) if req_recent else None,
                "request_rate": round(req_recent / span_s, 3) if span_s > 0 else 0.0,
                "p50_ms": round(p50 / 1e6, 3) if p50 is not None else None,
                "p95_ms": round(p95 / 1e6, 3) if p95 is not None else None,
            }
        return out

    def _requests(self) -> int:
        return self.responses or self.requests


class Node:
    __slots__ = ("ref", "flows_out", "flows_in", "drops", "pods", "addrs", "labels", "identity", "last_ns", "version")

    def __init__(self, ref: NodeRef) -> None:
        self.ref = ref
        self.flows_out = self.flows_in = self.drops = 0
        self.pods: set[str] = set()
        self.addrs: dict[str, int] = {}
        self.labels: list[str] = []
        self.identity = 0
        self.last_ns = 0
        self.version = 0

    def to_json(self) -> dict[str, Any]:
        r = self.ref
        return {"id": r.key, "kind": r.kind, "namespace": r.namespace, "name": r.name,
                "flows_out": self.flows_out, "flows_in": self.flows_in, "drops": self.drops,
                "pods": sorted(self.pods)[:50], "num_pods": len(self.pods),
                "addrs": [a for a, _ in sorted(self.addrs.items(), key=lambda kv: -kv[1])[:MAX_ADDRS]],
                "labels": self.labels, "identity": self.identity, "last_ns": self.last_ns,
                "from_args": r.from_args, "to_args": r.to_args}


class Pod:
    """One endpoint (pod) seen in flows."""

    __slots__ = ("key", "namespace", "pod_name", "workload", "identity", "labels", "ips", "nodes",
                 "flows_out", "flows_in", "drops_out", "drops_in", "first_ns", "last_ns", "version")

    def __init__(self, ep: schema.Endpoint, workload: str) -> None:
        self.key = f"{ep.namespace}/{ep.pod_name}" if ep.namespace else ep.pod_name
        self.namespace, self.pod_name, self.workload = ep.namespace, ep.pod_name, workload
        self.identity = ep.identity
        self.labels = list(ep.labels)
        self.ips: list[str] = []
        self.nodes: list[str] = []
        self.flows_out = self.flows_in = self.drops_out = self.drops_in = 0
        self.first_ns = self.last_ns = 0
        self.version = 0

    def to_json(self) -> dict[str, Any]:
        return {"id": self.key, "namespace": self.namespace, "pod_name": self.pod_name, "workload": self.workload,
                "identity": self.identity, "labels": self.labels, "ips": self.ips, "nodes": self.nodes,
                "flows_out": self.flows_out, "flows_in": self.flows_in, "drops_out": self.drops_out,
                "drops_in": self.drops_in, "first_ns": self.first_ns, "last_ns": self.last_ns,
                "pod_args": ["--pod", self.key]}


# --------------------------------------------------------------------------------------------
# The aggregator
# --------------------------------------------------------------------------------------------


class ByteCounter:
    """Per-connection running byte totals (bounded LRU): how much a record adds to its edge."""

    def __init__(self, max_entries: int = 200_000) -> None:
        self.max_entries = max_entries
        self._last: OrderedDict[tuple[Any, ...], int] = OrderedDict()

    def delta(self, key: tuple[Any, ...], total: int) -> int:
        last = self._last.get(key)
        if last is None:
            self._last[key] = total
            if len(self._last) > self.max_entries:
                self._last.popitem(last=False)
            return total
        self._last.move_to_end(key)
        if total > last:
            self._last[key] = total
            return total - last
        return 0


class MapAggregator:
    """Nodes, edges and pods of the flows added so far.

    ``windowed`` (live mode): rates and percentiles describe the recent window, which the owner moves
    with :meth:`rotate` every ``window_s / 2`` seconds. Every change bumps the record's ``version`` to
    the aggregator's current one; :meth:`changes_since` returns what changed after a version, in O(changes).
    At most ``max_edges`` edges / ``max_nodes`` nodes / ``max_pods`` pods are kept (least recently seen go
    first; their removal is reported)."""

    def __init__(self, *, windowed: bool = False, window_s: float = 20.0, max_edges: int = 20_000,
                 max_nodes: int = 5_000, max_pods: int = 20_000) -> None:
        self.windowed = windowed
        self.window_s = window_s
        self.max_edges, self.max_nodes, self.max_pods = max_edges, max_nodes, max_pods
        self.edges: OrderedDict[tuple[str, str], Edge] = OrderedDict()
        self.nodes: OrderedDict[str, Node] = OrderedDict()
        self.pods: OrderedDict[tuple[str, str], Pod] = OrderedDict()  # (namespace, pod name) -> Pod
        self.version = 1
        self.flows = 0  # flows added in total
        self.first_ns = 0
        self.last_ns = 0
        self.bytes = ByteCounter()
        self._refs: dict[tuple[Any, ...], NodeRef] = {}
        self._removed: deque[tuple[int, str, str]] = deque(maxlen=10_000)  # (version, kind, id)
        self._removed_floor = 0  # removals at or below this version are forgotten

    # ---- feeding ---------------------------------------------------------------------------

    def begin(self) -> int:
        """Start a new version (call once per batch of flows); returns it."""
        self.version += 1
        return self.version

    def _ref(self, ep: Optional[schema.Endpoint], ip: str) -> NodeRef:
        # a pod is its (namespace, name): its workload and labels do not change under it
        if ep is not None:
            pod = ep.pod_name
            key: tuple[Any, ...] = (ep.namespace, pod) if pod else (
                ep.namespace, "", ep.identity, ip, ep.labels[0] if ep.labels else "")
        else:
            key = ("", "", 0, ip, "")
        ref = self._refs.get(key)
        if ref is None:
            if len(self._refs) > 100_000:
                self._refs.clear()
            ref = self._refs[key] = node_ref(ep, ip)
        return ref

    def add(self, f: schema.Flow, time_ns: int) -> None:
        """Count one flow (call :meth:`begin` first for each batch)."""
        v = self.version
        ip = f.IP
        sip, dip = (ip.source, ip.destination) if ip is not None else ("", "")
        src_ep, dst_ep = f.source, f.destination
        proto, sport, dport = _ports(f.l4)
        if f.is_reply or (f.is_reply is None and looks_like_reply(sport, dport)):
            # count on the connection's direction: client -> server
            src_ep, dst_ep, sip, dip, sport, dport = dst_ep, src_ep, dip, sip, dport, sport
        sref, dref = self._ref(src_ep, sip), self._ref(dst_ep, dip)
        verdict = f.verdict._value_
        vclass = VERDICT_CLASS.get(verdict, "forwarded")
        dropped = vclass == "dropped"

        self.flows += 1
        if not self.first_ns or time_ns < self.first_ns:
            self.first_ns = time_ns
        if time_ns > self.last_ns:
            self.last_ns = time_ns

        # nodes
        sn = self._node(sref, src_ep, sip, v, time_ns)
        dn = self._node(dref, dst_ep, dip, v, time_ns)
        sn.flows_out += 1
        dn.flows_in += 1
        if dropped:
            dn.drops += 1
        if src_ep is not None and src_ep.pod_name:
            p = self._pod(src_ep, sref, sip, f.node_name, v, time_ns)
            p.flows_out += 1
            if dropped:
                p.drops_out += 1
        if dst_ep is not None and dst_ep.pod_name:
            p = self._pod(dst_ep, dref, dip, f.node_name, v, time_ns)
            p.flows_in += 1
            if dropped:
                p.drops_in += 1

        # the edge
        ekey = (sref.key, dref.key)
        e = self.edges.get(ekey)
        if e is None:
            e = self.edges[ekey] = Edge(ekey, self.windowed)
            e.first_ns = time_ns
            if len(self.edges) > self.max_edges:
                old = self.edges.popitem(last=False)[1]
                self._note_removed(v, "edge", old.id)
        else:
            self.edges.move_to_end(ekey)
        e.version = v
        e.flows += 1
        e.verdicts[verdict] = e.verdicts.get(verdict, 0) + 1
        if time_ns > e.last_ns:
            e.last_ns = time_ns
        if time_ns < e.first_ns:
            e.first_ns = time_ns
        if proto:
            port = _PORT_NAMES.get((proto, dport))
            if port is None:
                if len(_PORT_NAMES) > 200_000:
                    _PORT_NAMES.clear()
                port = _PORT_NAMES[(proto, dport)] = f"{proto}/{dport}" if dport else proto
            if port in e.ports or len(e.ports) < MAX_PORTS:
                e.ports[port] = e.ports.get(port, 0) + 1
            else:
                e.other_ports += 1
        ext = f.flowscope
        if ext is not None:
            total = _int(ext.egress_bytes) + _int(ext.ingress_bytes)
            if total:
                e.bytes += self.bytes.delta((proto, sip, sport, dip, dport), total)
        if dropped or vclass == "audit":
            reason = f.drop_reason_desc._value_
            if dropped and reason != "DROP_REASON_UNKNOWN":
                e.drop_reasons[reason] = e.drop_reasons.get(reason, 0) + 1
            for pol in (*f.egress_denied_by, *f.ingress_denied_by):
                ref = policy_ref(pol)
                e.denied_by[ref] = e.denied_by.get(ref, 0) + 1
        elif f.egress_allowed_by or f.ingress_allowed_by:
            for pol in (*f.egress_allowed_by, *f.ingress_allowed_by):
                ref = policy_ref(pol)
                e.allowed_by[ref] = e.allowed_by.get(ref, 0) + 1
        w = e.win
        if w is not None:
            w.flows += 1
        l7 = f.l7
        if l7 is not None:
            lp = l7_protocol(l7)
            e.l7_protocols[lp] = e.l7_protocols.get(lp, 0) + 1
            t = l7.type._value_
            if t == "REQUEST":
                e.requests += 1
                if w is not None and not e.responses:
                    w.requests += 1
            elif t == "RESPONSE":
                e.responses += 1
                err = l7_error(l7)
                if err:
                    e.errors += 1
                lat = _int(l7.latency_ns)
                if lat:
                    b = _bucket(lat)
                    e.hist[b] = e.hist.get(b, 0) + 1
                if w is not None:
                    w.requests += 1
                    if err:
                        w.errors += 1
                    if lat:
                        w.hist[b] = w.hist.get(b, 0) + 1

    def _note_removed(self, v: int, kind: str, rid: str) -> None:
        if len(self._removed) == self._removed.maxlen:
            self._removed_floor = self._removed[0][0]
        self._removed.append((v, kind, rid))

    def _node(self, ref: NodeRef, ep: Optional[schema.Endpoint], ip: str, v: int, time_ns: int) -> Node:
        n = self.nodes.get(ref.key)
        if n is None:
            n = self.nodes[ref.key] = Node(ref)
            if ep is not None:
                n.labels = list(ep.labels)
                n.identity = ep.identity
            if len(self.nodes) > self.max_nodes:
                old = self.nodes.popitem(last=False)[1]
                self._note_removed(v, "node", old.ref.key)
        elif n.version != v:
            self.nodes.move_to_end(ref.key)
        n.version = v
        if time_ns > n.last_ns:
            n.last_ns = time_ns
        if ep is not None and ep.pod_name:
            if len(n.pods) < 10_000:
                n.pods.add(ep.pod_name)
        elif ip and (ip in n.addrs or len(n.addrs) < 64):
            n.addrs[ip] = n.addrs.get(ip, 0) + 1
        return n

    def _pod(self, ep: schema.Endpoint, ref: NodeRef, ip: str, node_name: str, v: int, time_ns: int) -> Pod:
        key = (ep.namespace, ep.pod_name)
        p = self.pods.get(key)
        if p is None:
            p = self.pods[key] = Pod(ep, ref.key)
            p.first_ns = time_ns
            if len(self.pods) > self.max_pods:
                old = self.pods.popitem(last=False)[1]
                self._note_removed(v, "pod", old.key)
        elif p.version != v:
            self.pods.move_to_end(key)
        p.version = v
        if ip and ip not in p.ips and len(p.ips) < MAX_ADDRS:
            p.ips.append(ip)
        if node_name and node_name not in p.nodes and len(p.nodes) < MAX_ADDRS:
            p.nodes.append(node_name)
        if ep.identity and not p.identity:
            p.identity = ep.identity
        if time_ns > p.last_ns:
            p.last_ns = time_ns
        if time_ns < p.first_ns:
            p.first_ns = time_ns
        return p

    def add_many(self, flows: Iterable[tuple[schema.Flow, int]]) -> int:
        """``begin()`` then ``add`` each ``(flow, time_ns)``; returns how many were added."""
        self.begin()
        n = 0
        for f, t in flows:
            self.add(f, t)
            n += 1
        return n

    def rotate(self) -> None:
        """Move the recent window on (live mode); edges whose recent numbers changed get a new version."""
        v = self.begin()
        for e in list(self.edges.values()):
            if e.win is not None and e.win.rotate():
                e.version = v
                self.edges.move_to_end(e.key)

    # ---- reading ---------------------------------------------------------------------------

    def span_s(self, range_s: Optional[float] = None) -> float:
        if self.windowed:
            return self.window_s
        if range_s is not None:
            return max(range_s, 1e-9)
        return max((self.last_ns - self.first_ns) / 1e9, 1.0)

    def snapshot(self, range_s: Optional[float] = None) -> dict[str, Any]:
        """Everything: ``{"version", "nodes", "edges", "pods", "flows", "first_ns", "last_ns"}``."""
        span = self.span_s(range_s)
        return {"version": self.version, "flows": self.flows, "first_ns": self.first_ns, "last_ns": self.last_ns,
                "nodes": [n.to_json() for n in self.nodes.values()],
                "edges": [e.to_json(span) for e in self.edges.values()],
                "pods": [p.to_json() for p in self.pods.values()]}

    def can_diff_from(self, version: int) -> bool:
        """Whether :meth:`changes_since` can describe everything since ``version`` (its removals are
        still remembered); otherwise the caller needs a :meth:`snapshot`."""
        return version >= self._removed_floor

    def changes_since(self, version: int, *, limit: int = 5_000) -> tuple[dict[str, Any], int]:
        """Records changed after ``version`` (newest changes first, at most ``limit`` of each kind) and the
        version the caller is then at (lower than :attr:`version` when ``limit`` cut the list short)."""
        span = self.span_s()
        out: dict[str, Any] = {}
        upto = self.version
        for name, table in (("nodes", self.nodes), ("edges", self.edges), ("pods", self.pods)):
            items = []
            for rec in reversed(table.values()):
                if rec.version <= version:
                    break
                items.append(rec)
            if len(items) > limit:
                # send the oldest changes first so the caller's version can advance monotonically
                items = items[-limit:]
                upto = min(upto, items[0].version - 1)
            items.reverse()
            out[name] = [r.to_json(span) if name == "edges" else r.to_json() for r in items]
        out["removed"] = [[kind, rid] for (rv, kind, rid) in self._removed if rv > version]
        return out, upto


def policy_ref(p: schema.Policy) -> str:
    """``namespace/name`` of a policy named in a flow (just ``name`` for a cluster-wide one)."""
    return f"{p.namespace}/{p.name}" if p.namespace else p.name


# --------------------------------------------------------------------------------------------
# Drops and policies over time
# --------------------------------------------------------------------------------------------


class DropsAggregator:
    """Drops by reason and by deciding policy in fixed time buckets, plus per-policy verdict counts."""

    def __init__(self, since_ns: int, until_ns: int, buckets: int = 60) -> None:
        if until_ns <= since_ns:
            until_ns = since_ns + 1
        self.since_ns, self.until_ns = since_ns, until_ns
        self.n = max(1, buckets)
        self.step = max(1, -(-(until_ns - since_ns) // self.n))
        self.by_reason: dict[str, list[int]] = {}
        self.by_policy: dict[str, list[int]] = {}
        self.policies: dict[str, dict[str, Any]] = {}
        self.drops = 0
        self.audits = 0

    def _series(self, table: dict[str, list[int]], key: str) -> list[int]:
        s = table.get(key)
        if s is None:
            s = table[key] = [0] * self.n
        return s

    def _policy(self, p: schema.Policy, time_ns: int) -> dict[str, Any]:
        ref = policy_ref(p)
        rec = self.policies.get(ref)
        if rec is None:
            rec = self.policies[ref] = {"ref": ref, "namespace": p.namespace, "name": p.name, "kind": p.kind,
                                        "revision": p.revision, "forwarded": 0, "dropped": 0, "audit": 0,
                                        "last_ns": 0}
        if time_ns > rec["last_ns"]:
            rec["last_ns"] = time_ns
            rec["revision"] = p.revision or rec["revision"]
        return rec

    def add(self, f: schema.Flow, time_ns: int) -> None:
        verdict = f.verdict._value_
        vclass = VERDICT_CLASS.get(verdict, "forwarded")
        i = min(self.n - 1, max(0, (time_ns - self.since_ns) // self.step))
        if vclass == "dropped":
            self.drops += 1
            reason = f.drop_reason_desc._value_
            reason = "UNKNOWN" if reason == "DROP_REASON_UNKNOWN" else reason
            self._series(self.by_reason, reason)[i] += 1
            deciders = (*f.egress_denied_by, *f.ingress_denied_by)
            for p in deciders:
                self._policy(p, time_ns)["dropped"] += 1
                self._series(self.by_policy, policy_ref(p))[i] += 1
            if not deciders:
                self._series(self.by_policy, "(no policy named)")[i] += 1
        elif vclass == "audit":
            self.audits += 1
            for p in (*f.egress_denied_by, *f.ingress_denied_by):
                self._policy(p, time_ns)["audit"] += 1
        else:
            for p in (*f.egress_allowed_by, *f.ingress_allowed_by):
                self._policy(p, time_ns)["forwarded"] += 1

    def to_json(self) -> dict[str, Any]:
        return {"since_ns": self.since_ns, "until_ns": self.until_ns, "bucket_ns": self.step, "buckets": self.n,
                "drops": self.drops, "audits": self.audits,
                "by_reason": dict(sorted(self.by_reason.items(), key=lambda kv: -sum(kv[1]))),
                "by_policy": dict(sorted(self.by_policy.items(), key=lambda kv: -sum(kv[1]))),
                "policies": sorted(self.policies.values(), key=lambda r: -(r["dropped"] + r["audit"] + r["forwarded"]))}
