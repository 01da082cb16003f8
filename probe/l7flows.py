"""L7 events + connection context -> Hubble flows (``Type: L7``, ``event_type`` 129); DNS name learning.

Pure: no bcc, no sockets. :class:`L7FlowFactory` follows :class:`probe.events.FlowBuilder`'s conventions:
endpoints from :class:`~flowscope.endpoints.EndpointIndex`, ``node_name``, ``interface``, ``uuid``.

Direction (Cilium's rule): the direction of the *connection* from the observed endpoint's point of
view. The observed endpoint is the one behind the interface (its registry record, else the side whose
packets entered the host from the interface). A request from that endpoint is EGRESS, a request to it
INGRESS; the response has the same direction with ``is_reply`` true.

L7 policy: requests are checked with :mod:`enforcer.l7rules`; a request outside the rules gets verdict
AUDIT (Flowscope observes, it does not proxy) with the policies in ``*_denied_by`` and
``policy_match_type``; an allowed one names its policies in ``*_allowed_by``.

DNS: answers seen by the capture feed a :class:`DnsCache`; every later flow gets the names its
addresses are known by in ``source_names`` / ``destination_names`` (the tc probe's
:class:`~probe.events.FlowBuilder` can use the same cache).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional

from flowscope import schema
from flowscope.endpoints import EndpointIndex
from probe.l7.config import DEFAULT_REDACT, REDACTED
from probe.l7.records import REQUEST, DnsRecord, HttpRecord, KafkaRecord, L7Event

EVENT_ACCESS_LOG = 129  # Cilium's monitor type for L7 (proxy access log) records
IPPROTO_TCP, IPPROTO_UDP = 6, 17

_L7_EVENT_TYPE = schema.CiliumEventType(type=EVENT_ACCESS_LOG, sub_type=0)
_REQ, _RESP = schema.L7FlowType.REQUEST, schema.L7FlowType.RESPONSE
_EGRESS, _INGRESS = schema.TrafficDirection.EGRESS, schema.TrafficDirection.INGRESS
_UNKNOWN_DIR = schema.TrafficDirection.TRAFFIC_DIRECTION_UNKNOWN
_FORWARDED, _AUDIT = schema.Verdict.FORWARDED, schema.Verdict.AUDIT
_DNS_TYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA", 33: "SRV", 65: "HTTPS"}
_RCODES = {0: "No Error", 1: "Format Error", 2: "Server Failure", 3: "Non-Existent Domain", 4: "Not Implemented",
           5: "Query Refused"}


# --------------------------------------------------------------------------------------------
# DNS names
# --------------------------------------------------------------------------------------------


class DnsCache:
    """IP -> DNS names learned from DNS answers, with TTLs; bounded (least recently learned dropped).

    ``learn(record, now_ns)`` takes a response's :class:`~probe.l7.records.DnsRecord`;
    ``names(ip, now_ns)`` returns the unexpired names (sorted, without the trailing dot).
    """

    def __init__(self, max_ips: int = 65536, max_names_per_ip: int = 16, min_ttl_s: int = 60):
        self.max_ips = max_ips
        self.max_names = max_names_per_ip
        self.min_ttl_ns = min_ttl_s * 1_000_000_000
        self._by_ip: OrderedDict[str, dict[str, int]] = OrderedDict()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._by_ip)

    def learn(self, rec: DnsRecord, now_ns: int) -> int:
        """Remember the answer's addresses under the query name and its CNAMEs; returns how many IPs."""
        if rec.rcode != 0 or not rec.ips or not rec.query:
            return 0
        expiry = now_ns + max(rec.ttl * 1_000_000_000, self.min_ttl_ns)
        names = [n.rstrip(".").lower() for n in [rec.query, *rec.cnames] if n and n != "."]
        n = 0
        for raw in rec.ips:
            try:
                ip = str(ipaddress.ip_address(raw))
            except ValueError:
                continue
            entry = self._by_ip.get(ip)
            if entry is None:
                if len(self._by_ip) >= self.max_ips:
                    self._by_ip.popitem(last=False)
                    self.evictions += 1
                entry = self._by_ip[ip] = {}
            else:
                self._by_ip.move_to_end(ip)
            for name in names:
                entry[name] = max(entry.get(name, 0), expiry)
            if len(entry) > self.max_names:
                for old in sorted(entry, key=entry.__getitem__)[: len(entry) - self.max_names]:
                    del entry[old]
            n += 1
        return n

    def names(self, ip: str, now_ns: int) -> list[str]:
        entry = self._by_ip.get(ip)
        if not entry:
            return []
        live = [n for n, exp in entry.items() if exp > now_ns]
        if len(live) != len(entry):
            for n in [n for n, exp in entry.items() if exp <= now_ns]:
                del entry[n]
            if not entry:
                del self._by_ip[ip]
        return sorted(live)


# --------------------------------------------------------------------------------------------
# Summaries (Hubble's L7 wording)
# --------------------------------------------------------------------------------------------


def http_summary(rec: HttpRecord, is_reply: bool, latency_ns: int) -> str:
    url = rec.url or rec.path
    if not is_reply:
        return f"{rec.protocol} {rec.method} {url}"
    return f"{rec.protocol} {rec.code} {latency_ns // 1_000_000}ms ({rec.method} {url})"


def kafka_summary(rec: KafkaRecord, is_reply: bool) -> str:
    if not is_reply:
        return f"Kafka request {rec.api_key} correlation id {rec.correlation_id} topic '{rec.topic}'"
    return (f"Kafka response {rec.api_key} correlation id {rec.correlation_id} topic '{rec.topic}' "
            f"return code {rec.error_code}")


def dns_summary(rec: DnsRecord, is_reply: bool) -> str:
    qtypes = ",".join(rec.qtypes)
    if not is_reply:
        return f"DNS Query {rec.query} {qtypes}"
    if rec.rcode:
        answer = f"RCode: {_RCODES.get(rec.rcode, str(rec.rcode))}"
    else:
        answer = ",".join(f'"{x}"' for x in [*rec.ips, *rec.cnames])
    return f"DNS Answer {answer} TTL: {rec.ttl} (Query {rec.query} {qtypes})"


# --------------------------------------------------------------------------------------------
# Connection context and flows
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class ConnContext:
    """What the capture knows about one connection at one observation point (interface)."""

    ifindex: int
    ifname: str
    family: int                 # 4 or 6
    proto: int                  # IPPROTO_TCP / IPPROTO_UDP
    client_ip: str
    client_port: int
    server_ip: str
    server_port: int
    #: Whether the client's packets entered the host from this interface (i.e. the client is the
    #: endpoint behind it); used when the endpoint registry does not say. None: unknown.
    client_behind_interface: Optional[bool] = None
    # Caches owned by L7FlowFactory.
    _gen: int = -1
    _static: Optional[tuple] = None
    _pgen: int = -1
    _rules: object = None
    _extra: dict = field(default_factory=dict)


class L7FlowFactory:
    """Builds Hubble flows from L7 events. Replace ``index``/``policy`` at any time."""

    def __init__(self, node_name: str, index: Optional[EndpointIndex] = None, dns: Optional[DnsCache] = None,
                 uuid_source: Optional[Callable[[], str]] = None, emitter_version: str = "",
                 redact_headers: frozenset[str] = DEFAULT_REDACT, header_allowlist: Optional[frozenset[str]] = None,
                 policy=None):
        from probe.events import UuidSource

        self.node_name = node_name
        self._index = index or EndpointIndex()
        self.dns = dns if dns is not None else DnsCache()
        self.uuid = uuid_source or UuidSource()
        self._emitter = schema.Emitter(name="Flowscope", version=emitter_version) if emitter_version else None
        self.redact = frozenset(h.lower() for h in redact_headers)
        self.allow = None if header_allowlist is None else frozenset(h.lower() for h in header_allowlist)
        self._gen = 0
        self._pgen = 0
        self._policy = policy
        self.ifnames: dict[int, str] = {}
        self.audited = 0

    @property
    def index(self) -> EndpointIndex:
        return self._index

    @index.setter
    def index(self, value: EndpointIndex) -> None:
        self._index = value
        self._gen += 1
        self._pgen += 1

    @property
    def policy(self):
        return self._policy

    @policy.setter
    def policy(self, value) -> None:
        """An :class:`enforcer.l7rules.L7Policy` (or None)."""
        self._policy = value
        self._pgen += 1

    # -- per connection, cached ---------------------------------------------------------------
    def _static_parts(self, ctx: ConnContext) -> tuple:
        if ctx._gen == self._gen and ctx._static is not None:
            return ctx._static
        idx = self._index
        ipv = schema.IPVersion.IPv4 if ctx.family == 4 else schema.IPVersion.IPv6
        c_ep = idx.endpoint_for_ip(ctx.client_ip)
        s_ep = idx.endpoint_for_ip(ctx.server_ip)
        rec = idx.by_ifindex.get(ctx.ifindex)
        client_is_endpoint = ctx.client_behind_interface
        if rec is not None:
            ips = {str(ipaddress.ip_interface(a).ip) for a in rec.ips}
            if ctx.client_ip in ips:
                client_is_endpoint = True
            elif ctx.server_ip in ips:
                client_is_endpoint = False
        direction = _UNKNOWN_DIR if client_is_endpoint is None else (_EGRESS if client_is_endpoint else _INGRESS)
        if ctx.proto == IPPROTO_TCP:
            l4_req = schema.Layer4(TCP=schema.TCP(source_port=ctx.client_port, destination_port=ctx.server_port))
            l4_resp = schema.Layer4(TCP=schema.TCP(source_port=ctx.server_port, destination_port=ctx.client_port))
        else:
            l4_req = schema.Layer4(UDP=schema.UDP(source_port=ctx.client_port, destination_port=ctx.server_port))
            l4_resp = schema.Layer4(UDP=schema.UDP(source_port=ctx.server_port, destination_port=ctx.client_port))
        ip_req = schema.IP(source=ctx.client_ip, destination=ctx.server_ip, ipVersion=ipv)
        ip_resp = schema.IP(source=ctx.server_ip, destination=ctx.client_ip, ipVersion=ipv)
        iface = schema.NetworkInterface(index=ctx.ifindex, name=ctx.ifname or self.ifnames.get(ctx.ifindex, ""))
        st = (direction, client_is_endpoint, c_ep, s_ep, l4_req, l4_resp, ip_req, ip_resp, iface)
        ctx._static, ctx._gen = st, self._gen
        return st

    def _rules_for(self, ctx: ConnContext, client_is_endpoint: Optional[bool], c_ep, s_ep):
        if ctx._pgen == self._pgen:
            return ctx._rules
        rules = None
        pol = self._policy
        if pol is not None and client_is_endpoint is not None and ctx.proto == IPPROTO_TCP:
            from enforcer.l7rules import Peer

            if client_is_endpoint:
                subject, peer, direction = c_ep, Peer.from_endpoint(ctx.server_ip, s_ep), "egress"
            else:
                subject, peer, direction = s_ep, Peer.from_endpoint(ctx.client_ip, c_ep), "ingress"
            try:
                rules = pol.rules_for(subject.labels if subject else (), peer, direction, ctx.server_port)
            except Exception:  # noqa: BLE001 - a policy problem must not stop visibility
                rules = None
        ctx._rules, ctx._pgen = rules, self._pgen
        return rules

    # -- per event ----------------------------------------------------------------------------
    def build(self, ev: L7Event, ctx: ConnContext) -> schema.Flow:
        direction, client_is_endpoint, c_ep, s_ep, l4_req, l4_resp, ip_req, ip_resp, iface = self._static_parts(ctx)
        is_reply = ev.type != REQUEST
        ts = ev.timestamp_ns
        if is_reply and ev.latency_ns > 0:
            l7 = schema.Layer7(type=_RESP, latency_ns=str(ev.latency_ns))
        else:
            l7 = schema.Layer7(type=_RESP if is_reply else _REQ)
        summary = ""
        verdict = _FORWARDED
        policy_fields: dict = {}
        if ev.http is not None:
            rec = ev.http
            l7.http = schema.HTTP(code=rec.code, method=rec.method, url=rec.url, protocol=rec.protocol,
                                  headers=self._headers(rec))
            summary = http_summary(rec, is_reply, ev.latency_ns)
            if not is_reply:
                rules = self._rules_for(ctx, client_is_endpoint, c_ep, s_ep)
                if rules is not None:
                    from enforcer.l7rules import HttpRequest

                    v = rules.check_http(HttpRequest(rec.method, rec.path, rec.host, tuple(rec.headers)))
                    verdict, policy_fields = self._verdict(v, direction)
        elif ev.kafka is not None:
            rec = ev.kafka
            l7.kafka = schema.Kafka(error_code=rec.error_code, api_version=rec.api_version, api_key=rec.api_key,
                                    correlation_id=rec.correlation_id, topic=rec.topic)
            summary = kafka_summary(rec, is_reply)
            if not is_reply:
                rules = self._rules_for(ctx, client_is_endpoint, c_ep, s_ep)
                if rules is not None:
                    from enforcer.l7rules import KafkaRequest, kafka_api_name

                    topics = tuple(rec.topics) or ((rec.topic,) if rec.topic else ())
                    v = rules.check_kafka(KafkaRequest(kafka_api_name(rec.api_key_id), rec.api_version,
                                                       rec.client_id, topics))
                    verdict, policy_fields = self._verdict(v, direction)
        elif ev.dns is not None:
            rec = ev.dns
            if is_reply:
                self.dns.learn(rec, ts)
            l7.dns = schema.DNS(query=rec.query, ips=list(rec.ips), ttl=rec.ttl, cnames=list(rec.cnames),
                                observation_source=rec.observation_source, rcode=rec.rcode, qtypes=list(rec.qtypes),
                                rrtypes=list(rec.rrtypes))
            summary = dns_summary(rec, is_reply)
        if is_reply:
            src_ip, dst_ip, src_ep, dst_ep, ip, l4 = ctx.server_ip, ctx.client_ip, s_ep, c_ep, ip_resp, l4_resp
        else:
            src_ip, dst_ip, src_ep, dst_ep, ip, l4 = ctx.client_ip, ctx.server_ip, c_ep, s_ep, ip_req, l4_req
        dns = self.dns
        return schema.Flow(
            time=schema.format_timestamp(ts), uuid=self.uuid(), emitter=self._emitter, verdict=verdict, IP=ip, l4=l4,
            source=src_ep, destination=dst_ep, Type=schema.FlowType.L7, node_name=self.node_name,
            source_names=dns.names(src_ip, ts), destination_names=dns.names(dst_ip, ts), l7=l7,
            event_type=_L7_EVENT_TYPE, traffic_direction=direction, is_reply=is_reply, interface=iface,
            Summary=summary, **policy_fields,
        )

    def _verdict(self, v, direction) -> tuple[schema.Verdict, dict]:
        ingress = direction == _INGRESS
        fields: dict = {"policy_match_type": v.match_type}
        if v.allowed:
            fields["ingress_allowed_by" if ingress else "egress_allowed_by"] = list(v.policies)
            return _FORWARDED, fields
        self.audited += 1
        fields["ingress_denied_by" if ingress else "egress_denied_by"] = list(v.policies)
        return _AUDIT, fields

    def _headers(self, rec: HttpRecord) -> list[schema.HTTPHeader]:
        out = []
        allow, redact = self.allow, self.redact
        seen_grpc_status = False
        for k, v in rec.headers:
            if allow is not None and k not in allow:
                continue
            if k == "grpc-status":
                seen_grpc_status = True
            out.append(schema.HTTPHeader(key=k, value=REDACTED if k in redact else v))
        if rec.grpc_status is not None and not seen_grpc_status:
            out.append(schema.HTTPHeader(key="grpc-status", value=str(rec.grpc_status)))
            if rec.grpc_message:
                out.append(schema.HTTPHeader(key="grpc-message", value=rec.grpc_message))
        return out
