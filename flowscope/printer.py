"""Hubble's ``observe`` output formats for a stream of GetFlowsResponse envelopes.

An envelope is one JSON line of ``GET/POST /api/v1/flows...`` or of ``hubble observe -o jsonpb``:
``{"flow": {...}, "node_name": "...", "time": "..."}`` or ``{"lost_events": {...}, ...}``.

Formats (as ``hubble observe -o``), with Hubble's exact layout (see ``hubble/pkg/printer``):

* ``compact``: ``Nov 27 06:10:01.123: default/frontend-7c9:53410 (ID:1234) -> default/api-5d4:80
  (ID:5678) to-endpoint FORWARDED (TCP Flags: SYN)``; ``<-`` for replies (source and destination
  swapped back), ``<>`` when the direction is unknown; lost events as ``... EVENTS LOST:
  PERF_EVENT_RING_BUFFER CPU(0) 12``.
* ``dict``: ``KEY: value`` blocks separated by ``------------``.
* ``table``: aligned columns ``TIMESTAMP SOURCE DESTINATION TYPE VERDICT SUMMARY`` (Go tabwriter
  layout: column width = widest cell + 3), written when the printer is closed.
* ``json``/``jsonpb``: the envelope line as received (compact JSON).

Timestamps are UTC (``Jan  2 15:04:05.000``, Go's StampMilli), like Hubble. When a flow has no
``Summary``, one is derived the way Hubble's parser writes it (``TCP Flags: SYN, ACK``,
``HTTP/1.1 GET http://api/users``, ``DNS Query example.com. A``...). Terminal control characters in
flow fields are neutralised (ESC -> ``^[``, CR -> ``\\r``, LF -> ``\\n``).
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any, Optional, TextIO, Union

import msgspec

from flowscope import schema
from flowscope.schema import Flow, L7FlowType, TrafficDirection, Verdict

__all__ = [
    "OUTPUT_FORMATS",
    "Printer",
    "PrinterError",
    "decode_envelope",
    "load_flow_lenient",
    "flow_type",
    "flow_summary",
    "format_time",
    "hostnames",
    "identity_text",
    "TIME_FORMATS",
]

OUTPUT_FORMATS = ("compact", "dict", "json", "jsonpb", "table")
TIME_FORMATS = ("StampMilli", "RFC3339", "RFC3339Milli", "RFC3339Micro", "RFC3339Nano")
DICT_SEPARATOR = "------------"
_NS = 1_000_000_000


class PrinterError(ValueError):
    """A line that is not a GetFlowsResponse envelope."""


# --------------------------------------------------------------------------------------------
# Decoding (lenient: unknown fields from newer Hubble versions are dropped, as Hubble does)
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _struct_fields(cls: type) -> dict[str, Any]:
    """encode_name -> msgspec.inspect type of each field of a Struct class."""
    info = msgspec.inspect.type_info(cls)
    return {f.encode_name: f.type for f in info.fields}


def _prune(obj: Any, t: Any) -> Any:
    """Drop keys unknown to the schema from ``obj`` (decoded JSON) according to inspect type ``t``."""
    mi = msgspec.inspect
    if isinstance(t, mi.UnionType):
        for member in t.types:
            if isinstance(member, (mi.StructType, mi.ListType)):
                return _prune(obj, member)
        return obj
    if isinstance(t, mi.StructType) and isinstance(obj, dict):
        fields = _struct_fields(t.cls)
        return {k: _prune(v, fields[k]) for k, v in obj.items() if k in fields}
    if isinstance(t, mi.ListType) and isinstance(obj, list):
        return [_prune(v, t.item_type) for v in obj]
    return obj


_FLOW_TYPE = msgspec.inspect.type_info(Flow)
_LOST_TYPE = msgspec.inspect.type_info(schema.LostEvent)


def load_flow_lenient(obj: dict[str, Any]) -> Flow:
    """A Flow from decoded JSON; fields this schema does not know are ignored.
    Raises :data:`schema.SchemaError` for values of the wrong type."""
    try:
        return msgspec.convert(obj, Flow)
    except msgspec.ValidationError as e:
        if "unknown field" not in str(e):
            raise
    return msgspec.convert(_prune(obj, _FLOW_TYPE), Flow)


def _load_lost(obj: dict[str, Any]) -> schema.LostEvent:
    return msgspec.convert(_prune(obj, _LOST_TYPE), schema.LostEvent)


def decode_envelope(line: Union[bytes, str, dict[str, Any]]) -> dict[str, Any]:
    """Decode one JSON line into an envelope dict. A bare flow object (the legacy
    ``hubble observe -o json`` line) is wrapped as ``{"flow": ...}``. Raises PrinterError."""
    if isinstance(line, dict):
        obj: Any = line
    else:
        try:
            obj = msgspec.json.decode(line)
        except msgspec.DecodeError as e:
            raise PrinterError(f"not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise PrinterError(f"expected a JSON object, got {type(obj).__name__}")
    if not any(k in obj for k in ("flow", "lost_events", "node_status", "agent_event", "debug_event")):
        if any(k in obj for k in ("time", "verdict", "IP", "l4", "source", "destination", "Type")):
            return {"flow": obj}
        raise PrinterError("not a flow envelope (no flow, lost_events or node_status)")
    return obj


# --------------------------------------------------------------------------------------------
# Field formatting (pure)
# --------------------------------------------------------------------------------------------

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def format_time(value: Any, layout: str = "StampMilli") -> str:
    """A flow/envelope time (RFC 3339 text or ns) as Hubble prints it; ``N/A`` when missing."""
    if value in (None, ""):
        return "N/A"
    try:
        ns = schema.parse_timestamp(value)
    except ValueError:
        return "N/A"
    secs, frac = divmod(ns, _NS)
    try:
        dt = datetime.fromtimestamp(secs, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        return "N/A"
    if layout == "StampMilli":
        return f"{_MONTHS[dt.month - 1]} {dt.day:>2} {dt:%H:%M:%S}.{frac // 1_000_000:03d}"
    digits = {"RFC3339": 0, "RFC3339Milli": 3, "RFC3339Micro": 6, "RFC3339Nano": 9}.get(layout)
    if digits is None:
        raise ValueError(f"unknown time format {layout!r}; expected one of {', '.join(TIME_FORMATS)}")
    text = f"{dt:%Y-%m-%dT%H:%M:%S}"
    if digits:
        f = f"{frac:09d}"[:digits].rstrip("0")
        if f:
            text += "." + f
    return text + "Z"


_RESERVED_NAMES = {v: k for k, v in {
    "unknown": 0, "host": 1, "world": 2, "unmanaged": 3, "health": 4, "init": 5, "remote-node": 6,
    "kube-apiserver": 7, "ingress": 8, "world-ipv4": 9, "world-ipv6": 10}.items()}


def identity_text(ep: Optional[schema.Endpoint]) -> str:
    """``(ID:1234)``, or ``(world)``/``(host)``... for Cilium's reserved identities. An endpoint with
    identity 0 but a ``reserved:<name>`` label shows that name (Flowscope agents may not number
    identities)."""
    ident = ep.identity if ep is not None else 0
    if ident == 0 and ep is not None:
        for label in ep.labels:
            if label.startswith("reserved:"):
                return f"({label[9:].partition('=')[0]})"
    name = _RESERVED_NAMES.get(ident)
    if name is not None:
        return f"({name})"
    return f"(ID:{ident})"


def _ports(f: Flow) -> tuple[str, str]:
    l4 = f.l4
    if l4 is None:
        return "", ""
    p = l4.TCP or l4.UDP or l4.SCTP
    if p is None:
        return "", ""
    return str(p.source_port), str(p.destination_port)


def _join(ns: str, name: str) -> str:
    return f"{ns}/{name}" if ns else name


def _hostname(ip: str, port: str, ns: str, pod: str, svc: str, names: list[str], translate: bool,
              color: "_Colors") -> str:
    host = ip
    if translate:
        if pod:
            host = _join(ns, pod)
        elif svc:
            host = _join(ns, svc)
        elif names:
            host = ",".join(names)
    host = _esc(host)
    if port and port != "0":
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{color.port(port)}"
    return host


def hostnames(f: Flow, translate: bool = True, color: Optional["_Colors"] = None) -> tuple[str, str]:
    """Source and destination as Hubble shows them: ``ns/pod:port``, ``ns/svc:port``, DNS names,
    or the IP (``[v6]:port``); MAC addresses for non-IP flows."""
    c = color or _NO_COLOR
    if f.IP is None:
        if f.ethernet is not None:
            return c.host(_esc(f.ethernet.source)), c.host(_esc(f.ethernet.destination))
        return "", ""
    src_ns = src_pod = dst_ns = dst_pod = src_svc = dst_svc = ""
    if f.source is not None:
        src_ns, src_pod = f.source.namespace, f.source.pod_name
    if f.destination is not None:
        dst_ns, dst_pod = f.destination.namespace, f.destination.pod_name
    if f.source_service is not None:
        src_ns, src_svc = f.source_service.namespace, f.source_service.name
    if f.destination_service is not None:
        dst_ns, dst_svc = f.destination_service.namespace, f.destination_service.name
    sport, dport = _ports(f)
    src = _hostname(f.IP.source, sport, src_ns, src_pod, src_svc, f.source_names, translate, c)
    dst = _hostname(f.IP.destination, dport, dst_ns, dst_pod, dst_svc, f.destination_names, translate, c)
    return c.host(src), c.host(dst)


_DROP_TEXT = {
    0: "Success", 2: "Invalid packet", 3: "Interface", 4: "Interface Decrypted",
    5: "LB, sock cgroup: No backend slot entry found", 6: "LB, sock cgroup: No backend entry found",
    7: "LB, sock cgroup: Reverse entry update failed", 8: "LB, sock cgroup: Reverse entry stale",
    9: "Fragmented packet", 10: "Fragmented packet entry update failed",
    11: "Missed tail call to custom program", 12: "Interface Decrypting", 13: "Interface Encrypting",
    14: "LB: sock cgroup: Reverse entry delete succeeded", 15: "MTU error message",
    130: "Invalid source mac", 131: "Invalid destination mac", 132: "Invalid source ip",
    133: "Policy denied", 134: "Invalid packet", 135: "CT: Truncated or invalid header",
    136: "Fragmentation needed", 137: "CT: Unknown L4 protocol", 138: "CT: Can't create entry from packet",
    139: "Unsupported L3 protocol", 140: "Missed tail call", 141: "Error writing to packet",
    142: "Unknown L4 protocol", 143: "Unknown ICMPv4 code", 144: "Unknown ICMPv4 type",
    145: "Unknown ICMPv6 code", 146: "Unknown ICMPv6 type", 147: "Error retrieving tunnel key",
    148: "Error retrieving tunnel options", 149: "Invalid Geneve option", 150: "Unknown L3 target address",
    151: "Stale or unroutable IP", 152: "No matching local container found",
    153: "Error while correcting L3 checksum", 154: "Error while correcting L4 checksum",
    155: "CT: Map insertion failed", 156: "Invalid IPv6 extension header",
    157: "IP fragmentation not supported", 158: "Service backend not found",
    160: "No tunnel/encapsulation endpoint (datapath BUG!)", 161: "NAT 46/64 not enabled",
    162: "Reached EDT rate-limiting drop horizon", 163: "Unknown connection tracking state",
    164: "Local host is unreachable", 165: "No configuration available to perform policy decision",
    166: "Unsupported L2 protocol", 167: "No mapping for NAT masquerade",
    168: "Unsupported protocol for NAT masquerade", 169: "FIB lookup failed",
    170: "Encapsulation traffic is prohibited", 171: "Invalid identity", 172: "Unknown sender",
    173: "NAT not needed", 174: "Is a ClusterIP", 175: "First logical datagram fragment not found",
    176: "Forbidden ICMPv6 message", 177: "Denied by LB src range check", 178: "Socket lookup failed",
    179: "Socket assign failed", 180: "Proxy redirection not supported for protocol",
    181: "Policy denied by denylist", 182: "VLAN traffic disallowed by VLAN filter",
    183: "Incorrect VNI from VTEP", 184: "Failed to update or lookup TC buffer",
    185: "No SID was found for the IP address", 186: "SRv6 state was removed during tail call",
    187: "L3 translation from IPv4 to IPv6 failed (NAT46)", 188: "L3 translation from IPv6 to IPv4 failed (NAT64)",
    189: "Authentication required", 190: "No conntrack map found", 191: "No nat map found",
    192: "Invalid ClusterID", 193: "Unsupported packet protocol for DSR encapsulation",
    194: "No egress gateway found", 195: "Traffic is unencrypted", 196: "TTL exceeded",
    197: "No node ID found", 198: "Rate limited", 199: "IGMP handled", 200: "IGMP subscribed",
    201: "Multicast handled", 202: "Host datapath not ready", 203: "Endpoint policy program not available",
    204: "No Egress IP configured", 205: "Punt to proxy",
}
_TRACE_POINTS = {0: "to-endpoint", 1: "to-proxy", 2: "to-host", 3: "to-stack", 4: "to-overlay",
                 5: "from-endpoint", 6: "from-proxy", 7: "from-host", 8: "from-stack", 9: "from-overlay",
                 10: "from-network", 11: "to-network", 12: "from-crypto", 13: "to-crypto"}
_POLICY_MATCH = {0: "none", 1: "L3-Only", 2: "L3-L4", 3: "L4-Only", 4: "all", 5: "L3-Proto", 6: "Proto-Only"}


def _drop_text(reason: int) -> str:
    return _DROP_TEXT.get(reason, f"{reason}, 0")


def flow_type(f: Flow) -> str:
    """Hubble's TYPE column: ``http-request``, ``dns-response proxy``, ``to-endpoint``,
    ``Policy denied``, ``policy-verdict:L3-L4 INGRESS``... When a flow has no ``event_type``,
    the drop reason or the trace observation point is used, then ``UNKNOWN``."""
    l7 = f.l7
    if l7 is not None:
        kind = l7.type.value.lower()
        if l7.http is not None:
            proto = "http"
        elif l7.dns is not None:
            proto = "dns"
            if l7.dns.observation_source:
                kind += " " + l7.dns.observation_source
        elif l7.kafka is not None:
            proto = "kafka"
        else:
            proto = "l7"
        return f"{proto}-{kind}"
    et = f.event_type
    if et is None:
        if f.verdict is Verdict.DROPPED and f.drop_reason_desc.number:
            return _drop_text(f.drop_reason_desc.number)
        point = f.trace_observation_point
        if point.number:
            return point.value.lower().replace("_", "-")
        return "UNKNOWN"
    t = et.type
    if t == schema.EVENT_TRACE:
        return _TRACE_POINTS.get(et.sub_type & 0xFF, str(et.sub_type & 0xFF))
    if t == schema.EVENT_DROP:
        return _drop_text(et.sub_type & 0xFF)
    if t == schema.EVENT_POLICY_VERDICT:
        match = _POLICY_MATCH.get(f.policy_match_type, "unknown")
        return f"policy-verdict:{match} {f.traffic_direction.value}"
    if t == schema.EVENT_CAPTURE:
        return "DBG_CAPTURE_POINT_UNKNOWN"
    if t == 7:
        return "SOCK_XLATE_POINT_UNKNOWN"
    return "UNKNOWN"


def _policy_names(policies: list[schema.Policy]) -> str:
    named = [f"{p.name} ({p.kind})" for p in policies if p.kind and p.name]
    return (" BY " + ", ".join(named)) if named else ""


def verdict_text(f: Flow, color: Optional["_Colors"] = None, policy_names: bool = False) -> str:
    """Hubble's VERDICT column (``ALLOWED``/``DENIED``/``AUDITED`` for policy-verdict events)."""
    c = color or _NO_COLOR
    v = f.verdict
    msg = v.value
    is_pv = f.event_type is not None and f.event_type.type == schema.EVENT_POLICY_VERDICT
    egress = f.traffic_direction is TrafficDirection.EGRESS
    ingress = f.traffic_direction is TrafficDirection.INGRESS
    if v in (Verdict.FORWARDED, Verdict.REDIRECTED):
        if is_pv:
            msg = "ALLOWED"
            if policy_names:
                msg += _policy_names(f.egress_allowed_by if egress else f.ingress_allowed_by if ingress else [])
        return c.green(msg)
    if v in (Verdict.DROPPED, Verdict.ERROR):
        if is_pv:
            msg = "DENIED"
            if policy_names:
                msg += _policy_names(f.egress_denied_by if egress else f.ingress_denied_by if ingress else [])
        return c.red(msg)
    if v is Verdict.AUDIT:
        if is_pv:
            msg = "AUDITED"
            if policy_names:
                msg += _policy_names(f.egress_denied_by if egress else f.ingress_denied_by if ingress else [])
        return c.yellow(msg)
    if v in (Verdict.TRACED, Verdict.TRANSLATED):
        return c.yellow(msg)
    return msg


_ICMP4 = {
    0: ("EchoReply", {}), 4: ("SourceQuench", {}), 8: ("EchoRequest", {}), 9: ("RouterAdvertisement", {}),
    10: ("RouterSolicitation", {}), 13: ("TimestampRequest", {}), 14: ("TimestampReply", {}),
    15: ("InfoRequest", {}), 16: ("InfoReply", {}), 17: ("AddressMaskRequest", {}),
    18: ("AddressMaskReply", {}),
    3: ("DestinationUnreachable", {0: "Net", 1: "Host", 2: "Protocol", 3: "Port", 4: "FragmentationNeeded",
                                   5: "SourceRoutingFailed", 6: "NetUnknown", 7: "HostUnknown",
                                   8: "SourceIsolated", 9: "NetAdminProhibited", 10: "HostAdminProhibited",
                                   11: "NetTOS", 12: "HostTOS", 13: "CommAdminProhibited",
                                   14: "HostPrecedence", 15: "PrecedenceCutoff"}),
    5: ("Redirect", {0: "Net", 1: "Host", 2: "TOS+Net", 3: "TOS+Host"}),
    11: ("TimeExceeded", {0: "TTLExceeded", 1: "FragmentReassemblyTimeExceeded"}),
    12: ("ParameterProblem", {0: "PointerIndicatesError", 1: "MissingOption", 2: "BadLength"}),
}
_ICMP6 = {
    2: ("PacketTooBig", {}), 128: ("EchoRequest", {}), 129: ("EchoReply", {}),
    133: ("RouterSolicitation", {}), 134: ("RouterAdvertisement", {}), 135: ("NeighborSolicitation", {}),
    136: ("NeighborAdvertisement", {}), 137: ("Redirect", {}),
    1: ("DestinationUnreachable", {0: "NoRouteToDst", 1: "AdminProhibited", 2: "BeyondScopeOfSrc",
                                   3: "AddressUnreachable", 4: "PortUnreachable",
                                   5: "SrcAddressFailedPolicy", 6: "RejectRouteToDst"}),
    3: ("TimeExceeded", {0: "HopLimitExceeded", 1: "FragmentReassemblyTimeExceeded"}),
    4: ("ParameterProblem", {0: "ErroneousHeaderField", 1: "UnrecognizedNextHeader",
                             2: "UnrecognizedIPv6Option"}),
}


def _icmp_text(table: dict[int, tuple[str, dict[int, str]]], t: int, code: int) -> str:
    if t not in table:
        return f"{t}({code})"
    name, codes = table[t]
    if not codes:
        return name
    if code in codes:
        return f"{name}({codes[code]})"
    return f"{name}(Code: {code})"


_TCP_SUMMARY_ORDER = ("SYN", "ACK", "RST", "FIN", "PSH", "URG", "ECE", "CWR", "NS")
_RCODES = {0: "No Error", 1: "Format Error", 2: "Server Failure", 3: "Non-Existent Domain",
           4: "Not Implemented", 5: "Query Refused", 6: "Name Exists when it should not",
           7: "RR Set Exists when it should not", 8: "RR Set that should exist does not",
           9: "Server Not Authoritative for zone", 10: "Name not contained in zone"}


def _go_quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def flow_summary(f: Flow) -> str:
    """The flow's ``Summary``, or the one Hubble's parser would have written."""
    if f.Summary:
        return f.Summary
    l7 = f.l7
    if l7 is not None:
        if l7.http is not None:
            h = l7.http
            request = f"{h.method} {h.url}"
            if l7.type is L7FlowType.REQUEST:
                return f"{h.protocol} {request}"
            if l7.type is L7FlowType.RESPONSE:
                latency_ms = int(l7.latency_ns or 0) // 1_000_000
                return f"{h.protocol} {h.code} {latency_ms}ms ({request})"
            return ""
        if l7.dns is not None:
            d = l7.dns
            qtypes = ",".join(d.qtypes)
            if l7.type is L7FlowType.REQUEST:
                return f"DNS Query {d.query} {qtypes}"
            if l7.type is L7FlowType.RESPONSE:
                if d.rcode:
                    answer = f"RCode: {_RCODES.get(d.rcode, 'Unknown')}"
                else:
                    parts = []
                    if d.ips:
                        parts.append(_go_quote(",".join(d.ips)))
                    if d.cnames:
                        parts.append("CNAMEs: " + _go_quote(",".join(d.cnames)))
                    answer = " ".join(parts)
                source = "Proxy" if d.observation_source == "proxy" else "Query"
                return f"DNS Answer {answer} TTL: {d.ttl} ({source} {d.query} {qtypes})"
            return ""
        if l7.kafka is not None:
            k = l7.kafka
            if l7.type is L7FlowType.REQUEST:
                return f"Kafka request {k.api_key} correlation id {k.correlation_id} topic '{k.topic}'"
            return (f"Kafka response {k.api_key} correlation id {k.correlation_id} topic '{k.topic}' "
                    f"return code {k.error_code}")
        return ""
    l4 = f.l4
    if l4 is not None:
        if l4.TCP is not None:
            flags = l4.TCP.flags
            if flags is None:
                return "TCP"
            return "TCP Flags: " + ", ".join(n for n in _TCP_SUMMARY_ORDER if getattr(flags, n))
        if l4.UDP is not None:
            return "UDP"
        if l4.SCTP is not None:
            return "SCTP"
        if l4.ICMPv4 is not None:
            return "ICMPv4 " + _icmp_text(_ICMP4, l4.ICMPv4.type, l4.ICMPv4.code)
        if l4.ICMPv6 is not None:
            return "ICMPv6 " + _icmp_text(_ICMP6, l4.ICMPv6.type, l4.ICMPv6.code)
    if f.IP is not None:
        v = f.IP.ipVersion
        if v is not schema.IPVersion.IP_NOT_USED:
            return v.value
        return "IPv6" if ":" in (f.IP.source or f.IP.destination) else "IPv4"
    if f.ethernet is not None:
        return "Ethernet"
    return ""


# --------------------------------------------------------------------------------------------
# Colors and escaping
# --------------------------------------------------------------------------------------------

_ESC_TABLE = str.maketrans({"\x1b": "^[", "\r": "\\r", "\n": "\\n"})


def _esc(s: str) -> str:
    return s.translate(_ESC_TABLE) if s else s


class _Colors:
    """fatih/color's palette as Hubble uses it; identity functions when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def _wrap(self, code: int, s: str) -> str:
        return f"\x1b[{code}m{s}\x1b[0m" if self.enabled else s

    def red(self, s: str) -> str:
        return self._wrap(31, s)

    def green(self, s: str) -> str:
        return self._wrap(32, s)

    def yellow(self, s: str) -> str:
        return self._wrap(33, s)

    def magenta(self, s: str) -> str:
        return self._wrap(35, s)

    def cyan(self, s: str) -> str:
        return self._wrap(36, s)

    port = yellow
    host = cyan
    identity = magenta


_NO_COLOR = _Colors(False)


# --------------------------------------------------------------------------------------------
# The printer
# --------------------------------------------------------------------------------------------


class Printer:
    """Writes envelopes in one of :data:`OUTPUT_FORMATS`. Call :meth:`close` at the end (the table
    is written then)."""

    def __init__(self, output: str = "compact", out: Optional[TextIO] = None, err: Optional[TextIO] = None,
                 color: bool = False, node_name: bool = False, ip_translation: bool = True,
                 policy_names: bool = False, time_format: str = "StampMilli") -> None:
        if output not in OUTPUT_FORMATS:
            raise ValueError(f"invalid output format {output!r}; expected one of {', '.join(OUTPUT_FORMATS)}")
        if time_format not in TIME_FORMATS:
            raise ValueError(f"invalid time format {time_format!r}; expected one of {', '.join(TIME_FORMATS)}")
        self.output = output
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self.color = _Colors(color and output in ("compact", "dict"))
        self.node_name = node_name
        self.translate = ip_translation
        self.policy_names = policy_names
        self.time_format = time_format
        self.count = 0
        self._rows: list[list[str]] = []
        self._closed = False

    # -- entry points --------------------------------------------------------------------------

    def write(self, envelope: dict[str, Any], raw: Union[bytes, str, None] = None) -> None:
        """Print one envelope (``raw``: the JSON text it came from, echoed by the json formats)."""
        if self.output in ("json", "jsonpb"):
            if "flow" in envelope or "lost_events" in envelope:
                target = self.out
            elif "node_status" in envelope:
                target = self.err  # as Hubble: relay node status goes to stderr
            else:
                return
            if raw is None:
                text = msgspec.json.encode(envelope).decode()
            else:
                text = (raw.decode() if isinstance(raw, bytes) else raw).strip()
            target.write(text + "\n")
            self.count += 1
            return
        if "flow" in envelope:
            flow = envelope["flow"]
            if not isinstance(flow, Flow):
                flow = load_flow_lenient(flow)
            self.write_flow(flow)
        elif "lost_events" in envelope:
            self.write_lost(envelope)

    def write_flow(self, f: Flow) -> None:
        c = self.color
        ts = format_time(f.time, self.time_format)
        src, dst = hostnames(f, self.translate, c)
        ftype = _esc(flow_type(f))
        verdict = verdict_text(f, c, self.policy_names)
        summary = _esc(flow_summary(f))
        node = _esc(f.node_name)
        if self.output == "compact":
            src_id = c.identity(identity_text(f.source))
            dst_id = c.identity(identity_text(f.destination))
            arrow = "->"
            if f.is_reply is None:
                arrow = "<>"
            elif f.is_reply:
                src, dst, src_id, dst_id, arrow = dst, src, dst_id, src_id, "<-"
            node_part = f" [{node}]" if self.node_name else ""
            self.out.write(f"{ts}{node_part}: {src} {src_id} {arrow} {dst} {dst_id} {ftype} {verdict} ({summary})\n")
        elif self.output == "dict":
            lines = []
            if self.count:
                lines.append(DICT_SEPARATOR)
            lines.append(f"  TIMESTAMP: {ts}")
            if self.node_name:
                lines.append(f"       NODE: {node}")
            lines += [f"     SOURCE: {src}", f"DESTINATION: {dst}", f"       TYPE: {ftype}",
                      f"    VERDICT: {verdict}", f"    SUMMARY: {summary}"]
            self.out.write("\n".join(lines) + "\n")
        else:  # table
            row = [ts] + ([node] if self.node_name else []) + [src, dst, ftype, verdict, summary]
            self._rows.append(row)
        self.count += 1

    def write_lost(self, envelope: dict[str, Any]) -> None:
        raw = envelope.get("lost_events") or {}
        lost = _load_lost(raw) if isinstance(raw, dict) else schema.LostEvent()
        ts = format_time(envelope.get("time"), self.time_format)
        source = lost.source.value
        cpu = lost.cpu or 0
        extra = ""
        if isinstance(raw, dict) and raw.get("first") and raw.get("last"):
            extra = (f" (first: {format_time(raw['first'], self.time_format)}, "
                     f"last: {format_time(raw['last'], self.time_format)})")
        node = _esc(str(envelope.get("node_name") or "")) or "-"
        if self.output == "compact":
            self.out.write(f"{ts} EVENTS LOST: {source} CPU({cpu}) {lost.num_events_lost}{extra}\n")
        elif self.output == "dict":
            lines = []
            if self.count:
                lines.append(DICT_SEPARATOR)
            lines.append(f"  TIMESTAMP: {ts}")
            if self.node_name:
                lines.append(f"       NODE: {node}")
            lines += [f"     SOURCE: {source}", "       TYPE: EVENTS LOST", "    VERDICT: -",
                      f"    SUMMARY: CPU({cpu}) - {lost.num_events_lost}{extra}"]
            self.out.write("\n".join(lines) + "\n")
        else:
            row = [ts] + ([node] if self.node_name else []) + [
                source, "-", "EVENTS LOST", "-", f"CPU({cpu}) - {lost.num_events_lost}{extra}"]
            self._rows.append(row)
        self.count += 1

    def flush(self) -> None:
        self.out.flush()

    def close(self) -> None:
        """Write the table (table format) and flush."""
        if self._closed:
            return
        self._closed = True
        if self.output == "table" and self._rows:
            header = ["TIMESTAMP"] + (["NODE"] if self.node_name else []) + [
                "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"]
            self.out.write(render_table([header] + self._rows))
            self._rows = []
        self.out.flush()


def render_table(rows: list[list[str]], padding: int = 3, minwidth: int = 2) -> str:
    """Go ``text/tabwriter`` layout (minwidth 2, padding 3, spaces): every column but the last is
    padded to its widest cell plus ``padding``."""
    if not rows:
        return ""
    ncols = max(len(r) for r in rows)
    widths = [0] * ncols
    for r in rows:
        for i, cell in enumerate(r[:-1]):
            widths[i] = max(widths[i], len(cell))
    out = []
    for r in rows:
        parts = []
        for i, cell in enumerate(r):
            if i < len(r) - 1:
                parts.append(cell.ljust(max(widths[i] + padding, minwidth)))
            else:
                parts.append(cell)
        out.append("".join(parts))
    return "\n".join(out) + "\n"
