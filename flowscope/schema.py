"""The flow record: Hubble's ``flow.Flow`` as JSON, defined once for probe, api and web.

JSON in and out follows Hubble's protojson rendering:

* proto field names (``IP``, ``l4``, ``TCP``, ``source_port``, ``Type``, ``is_reply``) in the order the
  fields are declared in ``flow.proto``;
* enums as their names (numbers are accepted on input);
* proto3 zero values (0, "", false, [], the zero enum) and absent messages omitted; wrapper types
  (``is_reply``, ``LostEvent.cpu``) are kept when set, even to false/0;
* 64-bit integers (``latency_ns``, ``num_events_lost``, Flowscope's counters) as strings;
* timestamps as RFC 3339 with 0, 3, 6 or 9 fractional digits, UTC (``Z``).

Fields that Hubble does not have are Flowscope's own and live under ``flowscope`` (per-direction
counters and the flow's start/end, so a stored flow answers "how much" as well as "who").

Serialise with :func:`flow_to_json` / :func:`dump_flow`; never with ``model_dump`` defaults.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Annotated, Any, Optional, Union

import re

import msgspec
from msgspec import Meta

# --------------------------------------------------------------------------------------------
# Scalars: timestamps and 64-bit integers
# --------------------------------------------------------------------------------------------

_NS = 1_000_000_000


_ts_base_cache: dict[int, str] = {}


def format_timestamp(ns: int) -> str:
    """Render nanoseconds since the epoch the way protojson renders a Timestamp."""
    secs, nanos = divmod(int(ns), _NS)
    base = _ts_base_cache.get(secs)
    if base is None:
        if len(_ts_base_cache) > 4096:
            _ts_base_cache.clear()
        base = _ts_base_cache[secs] = datetime.fromtimestamp(secs, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    if nanos == 0:
        return base + "Z"
    if nanos % 1_000_000 == 0:
        return f"{base}.{nanos // 1_000_000:03d}Z"
    if nanos % 1_000 == 0:
        return f"{base}.{nanos // 1_000:06d}Z"
    return f"{base}.{nanos:09d}Z"


_epoch_cache: dict[str, int] = {}


def parse_timestamp(value: Any) -> int:
    """Nanoseconds since the epoch from an RFC 3339 string (any number of fractional digits),
    an int (ns) or a datetime. Raises ValueError with a clear message otherwise.

    Canonical text (``YYYY-MM-DDTHH:MM:SS[.fff|.ffffff|.fffffffff]Z``, what the schema writes) takes a
    fast path with the seconds part cached: queries parse one timestamp per stored row."""
    if value.__class__ is str and len(value) >= 20 and value[-1] == "Z" and value[10] == "T":
        secs = _epoch_cache.get(value[:19])
        if secs is not None:
            if len(value) == 20:
                return secs * _NS
            frac = value[20:-1]
            if value[19] == "." and frac.isdigit() and len(frac) in (3, 6, 9):
                return secs * _NS + int(frac.ljust(9, "0"))
    if isinstance(value, bool):
        raise ValueError("timestamp must be an RFC 3339 string or integer nanoseconds")
    if isinstance(value, int):
        return value
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return int(value.timestamp()) * _NS + value.microsecond * 1000
    if isinstance(value, dict):  # {"seconds": .., "nanos": ..} as some encoders write it
        return int(value.get("seconds", 0)) * _NS + int(value.get("nanos", 0))
    if not isinstance(value, str):
        raise ValueError("timestamp must be an RFC 3339 string or integer nanoseconds")
    text = value.strip()
    if text.isdigit():
        return int(text)
    try:
        date_part, sep, rest = text.partition("T")
        if not sep:
            date_part, sep, rest = text.partition(" ")
        if not sep:
            raise ValueError
        # Split off the zone: Z, +hh:mm or -hh:mm.
        if rest.endswith(("Z", "z")):
            clock, offset = rest[:-1], "+00:00"
        else:
            idx = max(rest.rfind("+"), rest.rfind("-"))
            if idx <= 0:
                raise ValueError
            clock, offset = rest[:idx], rest[idx:]
        frac_ns = 0
        if "." in clock:
            clock, frac = clock.split(".", 1)
            if not frac.isdigit() or len(frac) > 9:
                raise ValueError
            frac_ns = int(frac.ljust(9, "0"))
        dt = datetime.fromisoformat(f"{date_part}T{clock}{offset}")
    except ValueError:
        raise ValueError(f"invalid RFC 3339 timestamp: {value!r}") from None
    secs = int(dt.timestamp())
    if offset == "+00:00" and rest.endswith(("Z", "z")) and len(text) >= 20:
        if len(_epoch_cache) > 100_000:
            _epoch_cache.clear()
        _epoch_cache[text[:19]] = secs
    return secs * _NS + frac_ns


_CANONICAL_TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{3}|\.\d{6}|\.\d{9})?Z\Z")


def normalize_timestamp(value: Any) -> str:
    """Canonical protojson text for a timestamp given as RFC 3339 text or integer nanoseconds."""
    if isinstance(value, str) and _CANONICAL_TS.match(value):
        return value
    return format_timestamp(parse_timestamp(value))


def normalize_uint64(value: Any) -> str:
    """protojson's text for a uint64 given as int or decimal text."""
    if isinstance(value, str):
        if value.isdigit():
            out = str(int(value)) if value[:1] == "0" and len(value) > 1 else value
            return "0" if out == "0" else out  # the literal: omit_defaults compares strings by identity
        raise ValueError(f"not an unsigned integer: {value!r}")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value >= 1 << 64:
        raise ValueError(f"not an unsigned 64-bit integer: {value!r}")
    return "0" if value == 0 else str(value)


UInt32 = Annotated[int, Meta(ge=0, le=0xFFFFFFFF)]
Int32 = Annotated[int, Meta(ge=-0x80000000, le=0x7FFFFFFF)]
UInt64 = Union[str, int]
"""A uint64: decimal text in JSON (protojson's rule); ints are accepted and normalised to text."""
TimestampText = Union[str, int]
"""RFC 3339 text in JSON; integer nanoseconds are accepted and normalised to text."""


# --------------------------------------------------------------------------------------------
# Enums: names in JSON, numbers accepted on input
# --------------------------------------------------------------------------------------------


class ProtoEnum(str, enum.Enum):
    """A proto enum whose JSON form is its name. ``number`` gives the proto number."""

    number: int

    def __new__(cls, name: str, number: int) -> "ProtoEnum":
        obj = str.__new__(cls, name)
        obj._value_ = name
        obj.number = number
        return obj

    @classmethod
    def _missing_(cls, value: object) -> Optional["ProtoEnum"]:
        if isinstance(value, int) and not isinstance(value, bool):
            for member in cls:
                if member.number == value:
                    return member
        if isinstance(value, str):
            upper = value.upper()
            for member in cls:
                if member.value.upper() == upper:
                    return member
            if value.lstrip("-").isdigit():
                return cls._missing_(int(value))
        return None

    @classmethod
    def from_number(cls, number: int) -> "ProtoEnum":
        return cls(number)

    def __str__(self) -> str:  # pragma: no cover - convenience
        return self.value


class Verdict(ProtoEnum):
    VERDICT_UNKNOWN = ("VERDICT_UNKNOWN", 0)
    FORWARDED = ("FORWARDED", 1)
    DROPPED = ("DROPPED", 2)
    ERROR = ("ERROR", 3)
    AUDIT = ("AUDIT", 4)
    REDIRECTED = ("REDIRECTED", 5)
    TRACED = ("TRACED", 6)
    TRANSLATED = ("TRANSLATED", 7)


class FlowType(ProtoEnum):
    UNKNOWN_TYPE = ("UNKNOWN_TYPE", 0)
    L3_L4 = ("L3_L4", 1)
    L7 = ("L7", 2)
    SOCK = ("SOCK", 3)


class TrafficDirection(ProtoEnum):
    TRAFFIC_DIRECTION_UNKNOWN = ("TRAFFIC_DIRECTION_UNKNOWN", 0)
    INGRESS = ("INGRESS", 1)
    EGRESS = ("EGRESS", 2)


class IPVersion(ProtoEnum):
    IP_NOT_USED = ("IP_NOT_USED", 0)
    IPv4 = ("IPv4", 1)
    IPv6 = ("IPv6", 2)


class L7FlowType(ProtoEnum):
    UNKNOWN_L7_TYPE = ("UNKNOWN_L7_TYPE", 0)
    REQUEST = ("REQUEST", 1)
    RESPONSE = ("RESPONSE", 2)
    SAMPLE = ("SAMPLE", 3)


class TraceObservationPoint(ProtoEnum):
    UNKNOWN_POINT = ("UNKNOWN_POINT", 0)
    TO_PROXY = ("TO_PROXY", 1)
    TO_HOST = ("TO_HOST", 2)
    TO_STACK = ("TO_STACK", 3)
    TO_OVERLAY = ("TO_OVERLAY", 4)
    TO_ENDPOINT = ("TO_ENDPOINT", 101)
    FROM_ENDPOINT = ("FROM_ENDPOINT", 5)
    FROM_PROXY = ("FROM_PROXY", 6)
    FROM_HOST = ("FROM_HOST", 7)
    FROM_STACK = ("FROM_STACK", 8)
    FROM_OVERLAY = ("FROM_OVERLAY", 9)
    FROM_NETWORK = ("FROM_NETWORK", 10)
    TO_NETWORK = ("TO_NETWORK", 11)


class LostEventSource(ProtoEnum):
    UNKNOWN_LOST_EVENT_SOURCE = ("UNKNOWN_LOST_EVENT_SOURCE", 0)
    PERF_EVENT_RING_BUFFER = ("PERF_EVENT_RING_BUFFER", 1)
    OBSERVER_EVENTS_QUEUE = ("OBSERVER_EVENTS_QUEUE", 2)
    HUBBLE_RING_BUFFER = ("HUBBLE_RING_BUFFER", 3)


_DROP_REASONS = {
    "DROP_REASON_UNKNOWN": 0, "INVALID_SOURCE_MAC": 130, "INVALID_DESTINATION_MAC": 131,
    "INVALID_SOURCE_IP": 132, "POLICY_DENIED": 133, "INVALID_PACKET_DROPPED": 134,
    "CT_TRUNCATED_OR_INVALID_HEADER": 135, "CT_MISSING_TCP_ACK_FLAG": 136, "CT_UNKNOWN_L4_PROTOCOL": 137,
    "CT_CANNOT_CREATE_ENTRY_FROM_PACKET": 138, "UNSUPPORTED_L3_PROTOCOL": 139, "MISSED_TAIL_CALL": 140,
    "ERROR_WRITING_TO_PACKET": 141, "UNKNOWN_L4_PROTOCOL": 142, "UNKNOWN_ICMPV4_CODE": 143,
    "UNKNOWN_ICMPV4_TYPE": 144, "UNKNOWN_ICMPV6_CODE": 145, "UNKNOWN_ICMPV6_TYPE": 146,
    "ERROR_RETRIEVING_TUNNEL_KEY": 147, "ERROR_RETRIEVING_TUNNEL_OPTIONS": 148, "INVALID_GENEVE_OPTION": 149,
    "UNKNOWN_L3_TARGET_ADDRESS": 150, "STALE_OR_UNROUTABLE_IP": 151, "NO_MATCHING_LOCAL_CONTAINER_FOUND": 152,
    "ERROR_WHILE_CORRECTING_L3_CHECKSUM": 153, "ERROR_WHILE_CORRECTING_L4_CHECKSUM": 154,
    "CT_MAP_INSERTION_FAILED": 155, "INVALID_IPV6_EXTENSION_HEADER": 156, "IP_FRAGMENTATION_NOT_SUPPORTED": 157,
    "SERVICE_BACKEND_NOT_FOUND": 158, "NO_TUNNEL_OR_ENCAPSULATION_ENDPOINT": 160,
    "FAILED_TO_INSERT_INTO_PROXYMAP": 161, "REACHED_EDT_RATE_LIMITING_DROP_HORIZON": 162,
    "UNKNOWN_CONNECTION_TRACKING_STATE": 163, "LOCAL_HOST_IS_UNREACHABLE": 164,
    "NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION": 165, "UNSUPPORTED_L2_PROTOCOL": 166,
    "NO_MAPPING_FOR_NAT_MASQUERADE": 167, "UNSUPPORTED_PROTOCOL_FOR_NAT_MASQUERADE": 168,
    "FIB_LOOKUP_FAILED": 169, "ENCAPSULATION_TRAFFIC_IS_PROHIBITED": 170, "INVALID_IDENTITY": 171,
    "UNKNOWN_SENDER": 172, "NAT_NOT_NEEDED": 173, "IS_A_CLUSTERIP": 174,
    "FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND": 175, "FORBIDDEN_ICMPV6_MESSAGE": 176,
    "DENIED_BY_LB_SRC_RANGE_CHECK": 177, "SOCKET_LOOKUP_FAILED": 178, "SOCKET_ASSIGN_FAILED": 179,
    "PROXY_REDIRECTION_NOT_SUPPORTED_FOR_PROTOCOL": 180, "POLICY_DENY": 181, "VLAN_FILTERED": 182,
    "INVALID_VNI": 183, "INVALID_TC_BUFFER": 184, "NO_SID": 185, "MISSING_SRV6_STATE": 186,
    "NAT46": 187, "NAT64": 188, "AUTH_REQUIRED": 189, "CT_NO_MAP_FOUND": 190, "SNAT_NO_MAP_FOUND": 191,
    "INVALID_CLUSTER_ID": 192, "UNSUPPORTED_PROTOCOL_FOR_DSR_ENCAP": 193, "NO_EGRESS_GATEWAY": 194,
    "TTL_EXCEEDED": 196, "NO_NODE_ID": 197, "DROP_HOST_NOT_READY": 202, "DROP_EP_NOT_READY": 203,
}
DropReason = ProtoEnum("DropReason", {k: (k, v) for k, v in _DROP_REASONS.items()})  # type: ignore[misc]
"""Hubble's DropReason enum (``DropReason.POLICY_DENIED.number == 133``)."""

# Cilium monitor message types, used in ``event_type.type``.
EVENT_DROP = 1
EVENT_DEBUG = 2
EVENT_CAPTURE = 3
EVENT_TRACE = 4
EVENT_POLICY_VERDICT = 5
EVENT_L7 = 129

# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------


class Message(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True, gc=False):
    """Base of every message: proto3 zero values are omitted on output; unknown fields are errors."""


class Ethernet(Message):
    source: str = ""
    destination: str = ""


class IP(Message):
    source: str = ""
    destination: str = ""
    ipVersion: IPVersion = IPVersion.IP_NOT_USED
    encrypted: bool = False


class TCPFlags(Message):
    FIN: bool = False
    SYN: bool = False
    RST: bool = False
    PSH: bool = False
    ACK: bool = False
    URG: bool = False
    ECE: bool = False
    CWR: bool = False
    NS: bool = False


Port = Annotated[int, Meta(ge=0, le=65535)]


class TCP(Message):
    source_port: Port = 0
    destination_port: Port = 0
    flags: Optional[TCPFlags] = None


class UDP(Message):
    source_port: Port = 0
    destination_port: Port = 0


class SCTP(Message):
    source_port: Port = 0
    destination_port: Port = 0


class ICMPv4(Message):
    type: UInt32 = 0
    code: UInt32 = 0


class ICMPv6(Message):
    type: UInt32 = 0
    code: UInt32 = 0


# Aliases: some fields are named like their message type, which would shadow it in the class body.
_TCP, _UDP, _ICMPv4, _ICMPv6, _SCTP, _IP = TCP, UDP, ICMPv4, ICMPv6, SCTP, IP


class Layer4(Message):
    """A oneof: at most one protocol is set."""

    TCP: Optional[_TCP] = None
    UDP: Optional[_UDP] = None
    ICMPv4: Optional[_ICMPv4] = None
    ICMPv6: Optional[_ICMPv6] = None
    SCTP: Optional[_SCTP] = None

    def __post_init__(self) -> None:
        n = (self.TCP is not None) + (self.UDP is not None) + (self.ICMPv4 is not None) + (
            self.ICMPv6 is not None) + (self.SCTP is not None)
        if n > 1:
            raise ValueError("l4 is a oneof: set only one of TCP, UDP, ICMPv4, ICMPv6, SCTP")


class Workload(Message):
    name: str = ""
    kind: str = ""


class Endpoint(Message):
    ID: UInt32 = 0
    identity: UInt32 = 0
    cluster_name: str = ""
    namespace: str = ""
    labels: list[str] = []
    pod_name: str = ""
    workloads: list[Workload] = []


class Service(Message):
    name: str = ""
    namespace: str = ""


class HTTPHeader(Message):
    key: str = ""
    value: str = ""


class HTTP(Message):
    code: UInt32 = 0
    method: str = ""
    url: str = ""
    protocol: str = ""
    headers: list[HTTPHeader] = []


class Kafka(Message):
    error_code: Int32 = 0
    api_version: Int32 = 0
    api_key: str = ""
    correlation_id: Int32 = 0
    topic: str = ""


class DNS(Message):
    query: str = ""
    ips: list[str] = []
    ttl: UInt32 = 0
    cnames: list[str] = []
    observation_source: str = ""
    rcode: UInt32 = 0
    qtypes: list[str] = []
    rrtypes: list[str] = []


class Layer7(Message):
    type: L7FlowType = L7FlowType.UNKNOWN_L7_TYPE
    latency_ns: UInt64 = "0"
    dns: Optional[DNS] = None
    http: Optional[HTTP] = None
    kafka: Optional[Kafka] = None

    def __post_init__(self) -> None:
        if self.latency_ns.__class__ is not str or not self.latency_ns.isdigit() or self.latency_ns == "0":
            self.latency_ns = normalize_uint64(self.latency_ns)


class CiliumEventType(Message):
    type: Int32 = 0
    sub_type: Int32 = 0


class NetworkInterface(Message):
    index: UInt32 = 0
    name: str = ""


class Emitter(Message):
    name: str = ""
    version: str = ""


class Policy(Message):
    name: str = ""
    namespace: str = ""
    labels: list[str] = []
    revision: UInt64 = "0"
    kind: str = ""

    def __post_init__(self) -> None:
        self.revision = normalize_uint64(self.revision)


class Aggregate(Message):
    ingress_flow_count: UInt32 = 0
    egress_flow_count: UInt32 = 0
    unknown_direction_flow_count: UInt32 = 0


class FlowscopeExtension(Message):
    """Flowscope's own fields (not in Hubble), from the endpoint's point of view.

    ``event`` names the datapath state change that produced the record: ``new``, ``flags`` (a TCP flag
    seen for the first time in this direction), ``close`` (FIN/RST), ``update`` (periodic, long flows),
    ``expire`` (idle or closed flow removed; final counters), ``drop``.
    ``egress_*`` counts what the endpoint sent on this connection, ``ingress_*`` what it received.
    """

    event: str = ""
    egress_packets: UInt64 = "0"
    egress_bytes: UInt64 = "0"
    ingress_packets: UInt64 = "0"
    ingress_bytes: UInt64 = "0"
    flow_start: TimestampText = ""
    flow_end: TimestampText = ""

    def __post_init__(self) -> None:
        for name in ("egress_packets", "egress_bytes", "ingress_packets", "ingress_bytes"):
            v = getattr(self, name)
            if v.__class__ is not str or not v.isdigit() or v == "0":
                setattr(self, name, normalize_uint64(v))
        if self.flow_start != "":
            self.flow_start = normalize_timestamp(self.flow_start)
        if self.flow_end != "":
            self.flow_end = normalize_timestamp(self.flow_end)


class Flow(Message):
    """Hubble's ``flow.Flow``; fields declared in flow.proto's order (that is the JSON key order)."""

    time: TimestampText = ""
    uuid: str = ""
    emitter: Optional[Emitter] = None
    verdict: Verdict = Verdict.VERDICT_UNKNOWN
    ethernet: Optional[Ethernet] = None
    IP: Optional[_IP] = None
    l4: Optional[Layer4] = None
    source: Optional[Endpoint] = None
    destination: Optional[Endpoint] = None
    Type: FlowType = FlowType.UNKNOWN_TYPE
    node_name: str = ""
    node_labels: list[str] = []
    source_names: list[str] = []
    destination_names: list[str] = []
    l7: Optional[Layer7] = None
    event_type: Optional[CiliumEventType] = None
    source_service: Optional[Service] = None
    destination_service: Optional[Service] = None
    traffic_direction: TrafficDirection = TrafficDirection.TRAFFIC_DIRECTION_UNKNOWN
    policy_match_type: UInt32 = 0
    trace_observation_point: TraceObservationPoint = TraceObservationPoint.UNKNOWN_POINT
    drop_reason_desc: DropReason = DropReason.DROP_REASON_UNKNOWN  # type: ignore[valid-type]
    is_reply: Optional[bool] = None
    interface: Optional[NetworkInterface] = None
    Summary: str = ""
    egress_allowed_by: list[Policy] = []
    ingress_allowed_by: list[Policy] = []
    egress_denied_by: list[Policy] = []
    ingress_denied_by: list[Policy] = []
    aggregate: Optional[Aggregate] = None
    flowscope: Optional[FlowscopeExtension] = None

    def __post_init__(self) -> None:
        t = self.time
        if t.__class__ is not str or (t and not _CANONICAL_TS.match(t)):
            self.time = normalize_timestamp(t)

    @property
    def time_ns(self) -> int:
        """The flow's time as nanoseconds since the epoch (0 when unset)."""
        return parse_timestamp(self.time) if self.time else 0


class LostEvent(Message):
    source: LostEventSource = LostEventSource.UNKNOWN_LOST_EVENT_SOURCE
    num_events_lost: UInt64 = "0"
    cpu: Optional[Int32] = None

    def __post_init__(self) -> None:
        self.num_events_lost = normalize_uint64(self.num_events_lost)


# --------------------------------------------------------------------------------------------
# (De)serialisation
# --------------------------------------------------------------------------------------------

_encoder = msgspec.json.Encoder()
_flow_decoder = msgspec.json.Decoder(Flow)
_flows_decoder = msgspec.json.Decoder(list[Flow])
SchemaError = msgspec.ValidationError
"""Raised for input that does not fit the schema; its message names the offending path."""


def flow_to_json(flow: Flow) -> bytes:
    """The flow as compact Hubble JSON bytes."""
    return _encoder.encode(flow)


def flows_to_json_list(flows: list[Flow]) -> list[bytes]:
    return [_encoder.encode(f) for f in flows]


def dump_flow(flow: Flow) -> dict[str, Any]:
    """The flow as a JSON-ready dict in Hubble's shape (zero values omitted)."""
    return msgspec.to_builtins(flow)


def load_flow(data: bytes | str | dict[str, Any]) -> Flow:
    """Parse and validate one flow (JSON text or dict). Raises :data:`SchemaError` (or
    ``msgspec.DecodeError`` for text that is not JSON)."""
    if isinstance(data, dict):
        return msgspec.convert(data, Flow)
    return _flow_decoder.decode(data)


def load_flows(data: bytes | str) -> list[Flow]:
    """Parse and validate a JSON array of flows."""
    return _flows_decoder.decode(data)


def encode(obj: Any) -> bytes:
    """Compact JSON for any schema object or builtin structure."""
    return _encoder.encode(obj)


def envelope_json(flow_json: bytes, node_name: str, time_str: str) -> bytes:
    """Hubble's GetFlowsResponse envelope ``{"flow", "node_name", "time"}`` around flow JSON that is
    already encoded (the stored form), without re-serialising it."""
    out = b'{"flow":' + flow_json
    if node_name:
        out += b',"node_name":' + _encoder.encode(node_name)
    if time_str:
        out += b',"time":"' + time_str.encode() + b'"'
    return out + b"}"


def flow_envelope_json(flow: Flow) -> bytes:
    return envelope_json(_encoder.encode(flow), flow.node_name, flow.time)


def lost_envelope(source: str | LostEventSource, num_lost: int, cpu: Optional[int] = None,
                  node_name: str = "", time_ns: Optional[int] = None) -> dict[str, Any]:
    """Hubble's envelope for a LostEvent: ``{"lost_events": {...}, "node_name", "time"}``."""
    ev: dict[str, Any] = {"source": LostEventSource(source).value, "num_events_lost": str(int(num_lost))}
    if cpu is not None:
        ev["cpu"] = cpu
    env: dict[str, Any] = {"lost_events": ev}
    if node_name:
        env["node_name"] = node_name
    if time_ns is not None:
        env["time"] = format_timestamp(time_ns)
    return env


def json_schema() -> dict[str, Any]:
    """JSON Schema of a Flow (for the OpenAPI document)."""
    return msgspec.json.schema(Flow)


TCP_FLAG_NAMES = ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR", "NS")
TCP_FLAG_BITS = {"FIN": 0x01, "SYN": 0x02, "RST": 0x04, "PSH": 0x08, "ACK": 0x10, "URG": 0x20,
                 "ECE": 0x40, "CWR": 0x80, "NS": 0x100}


def tcp_flags_dict(bits: int) -> dict[str, bool]:
    """TCP flag bits (as in the TCP header, NS as bit 8) to Hubble's TCPFlags JSON dict."""
    return {name: True for name in TCP_FLAG_NAMES if bits & TCP_FLAG_BITS[name]}
