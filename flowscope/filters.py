"""Hubble's flow filters: ``FlowFilter`` (the proto message, as JSON) and a compiler to fast predicates.

Semantics follow Cilium's ``pkg/hubble/filters``:

* A request carries an allowlist (``whitelist``) and a denylist (``blacklist``) of :class:`FlowFilter`.
  A flow passes when it matches at least one allowlist filter (an empty allowlist matches all) and
  no denylist filter (:class:`FilterSet`).
* Inside one filter every field that is set must match (AND); the values of one field are
  alternatives (OR). An empty filter matches every flow.
* Field by field:

  - ``source_ip``/``destination_ip``: exact addresses or CIDRs (``10.0.0.0/8``, ``fd00::/64``).
  - ``source_pod``/``destination_pod`` and ``*_service``: ``ns/prefix``, ``ns/`` (whole namespace),
    ``prefix`` (namespace ``default``, as Hubble does), ``/prefix`` (any namespace).
  - ``source_label``/``destination_label``/``node_labels``: Kubernetes label selectors (``k=v``,
    ``k==v``, ``k!=v``, ``k in (a,b)``, ``k notin (a)``, ``k``, ``!k``, ``k>1``, ``k<1``; comma = AND).
    A key without a source matches endpoint labels of any source (``app`` matches ``k8s:app=x``);
    ``k8s:app`` only matches labels of source ``k8s``.
  - ``source_fqdn``/``destination_fqdn``: patterns on ``source_names``/``destination_names``
    (``*`` matches any run of ``[-.0-9a-z]``; case-insensitive pattern, trailing dot ignored).
  - ``node_name``: such patterns on ``node_name``; ``cluster/node`` forms; a node name without a
    cluster is treated as ``default/<node>``.
  - ``protocol``: ``tcp``, ``udp``, ``sctp``, ``icmp`` (v4 or v6), ``icmpv4``, ``icmpv6`` on ``l4``;
    ``http``, ``dns``, ``kafka`` on the ``l7`` record (``vrrp``/``igmp`` are accepted, never seen).
  - ``source_port``/``destination_port``: decimal ports of TCP, UDP or SCTP.
  - ``http_status_code``: ``"404"`` or a prefix ``"4+"``/``"40+"``; ``http_method`` (case-insensitive);
    ``http_path`` (regex on the URL's path), ``http_url`` (regex on the URL), ``http_header``
    (exact key and value); ``dns_query`` (regex on the query). Regexes search (unanchored), like Go's.
  - ``tcp_flags``: a flow matches an entry when every flag set in the entry is set in the flow.
  - ``reply``: ``is_reply``; a dropped flow of unknown direction counts as ``is_reply=false``.
  - ``drop_reason_desc``: only dropped flows match.
  - ``ip_version``: ``IPv4``/``IPv6``/``IP_NOT_USED``; when a flow's ``ipVersion`` is unset it is
    inferred from its addresses (Flowscope leniency; Hubble always sets it).
  - ``event_type``: ``{type, match_sub_type, sub_type}``; type 0 matches any type.
  - ``interface``: ``{index, name}``; unset parts match anything.
  - HTTP fields require that ``event_type`` (when set) admits L7 events (type 129), as in Hubble.

Invalid values raise :class:`FilterError` naming the field and the value.

Lost events are not flows: callers pass them through unfiltered (Hubble always includes them).
"""

from __future__ import annotations

import ipaddress
import operator
import re
from typing import Any, Callable, Iterable, Optional, Union

import msgspec

from flowscope import schema
from flowscope.schema import (
    DropReason,
    Flow,
    HTTPHeader,
    IPVersion,
    NetworkInterface,
    TCPFlags,
    TrafficDirection,
    Verdict,
    Workload,
)

__all__ = [
    "FilterError",
    "EventTypeFilter",
    "FlowFilter",
    "FILTER_FIELDS",
    "FilterSet",
    "compile_filter",
    "sql_pushdown",
    "parse_event_type",
    "parse_tcp_flags",
    "parse_http_header",
    "parse_workload",
    "parse_interface",
    "parse_identity",
    "parse_bool",
    "format_event_type",
    "format_tcp_flags",
    "RESERVED_IDENTITIES",
    "EVENT_TYPE_NAMES",
    "TRACE_POINT_NAMES",
]


class FilterError(ValueError):
    """An invalid filter value; the message names the field and the value."""


# --------------------------------------------------------------------------------------------
# The FlowFilter message
# --------------------------------------------------------------------------------------------


class EventTypeFilter(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True, repr_omit_defaults=True):
    """Hubble's ``EventTypeFilter``: ``type`` 0 matches any type; ``sub_type`` counts only when
    ``match_sub_type`` is true."""

    type: int = 0
    match_sub_type: bool = False
    sub_type: int = 0


Text = Union[str, int]
"""Hubble keeps ports and enum names as strings; numbers are accepted too (protojson accepts enum
numbers), and are normalised when compiled."""


class FlowFilter(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True, repr_omit_defaults=True):
    """Hubble's ``flow.FlowFilter`` with its proto field names; every field is repeated."""

    uuid: list[str] = []
    source_ip: list[str] = []
    source_pod: list[str] = []
    source_fqdn: list[str] = []
    source_label: list[str] = []
    source_service: list[str] = []
    source_workload: list[Workload] = []
    source_identity: list[int] = []
    destination_ip: list[str] = []
    destination_pod: list[str] = []
    destination_fqdn: list[str] = []
    destination_label: list[str] = []
    destination_service: list[str] = []
    destination_workload: list[Workload] = []
    destination_identity: list[int] = []
    traffic_direction: list[Text] = []
    verdict: list[Text] = []
    drop_reason_desc: list[Text] = []
    event_type: list[EventTypeFilter] = []
    http_status_code: list[str] = []
    protocol: list[str] = []
    source_port: list[Text] = []
    destination_port: list[Text] = []
    reply: list[bool] = []
    dns_query: list[str] = []
    http_method: list[str] = []
    http_path: list[str] = []
    http_url: list[str] = []
    http_header: list[HTTPHeader] = []
    tcp_flags: list[TCPFlags] = []
    node_name: list[str] = []
    node_labels: list[str] = []
    ip_version: list[Text] = []
    interface: list[NetworkInterface] = []

    def is_empty(self) -> bool:
        return not any(getattr(self, name) for name in self.__struct_fields__)


FILTER_FIELDS: tuple[str, ...] = FlowFilter.__struct_fields__
"""All FlowFilter field names, in declaration order."""


# --------------------------------------------------------------------------------------------
# Reference data (Cilium monitor API)
# --------------------------------------------------------------------------------------------

RESERVED_IDENTITIES: dict[str, int] = {
    "unknown": 0, "host": 1, "world": 2, "unmanaged": 3, "health": 4, "init": 5, "remote-node": 6,
    "kube-apiserver": 7, "ingress": 8, "world-ipv4": 9, "world-ipv6": 10,
}
"""Cilium's reserved security identities (name -> number)."""

EVENT_TYPE_NAMES: dict[str, int] = {
    "drop": schema.EVENT_DROP, "debug": schema.EVENT_DEBUG, "capture": schema.EVENT_CAPTURE,
    "trace": schema.EVENT_TRACE, "policy-verdict": schema.EVENT_POLICY_VERDICT, "trace-sock": 7,
    "l7": schema.EVENT_L7, "agent": 130,
}
"""Cilium monitor message type names (``hubble observe --type``)."""

TRACE_POINT_NAMES: dict[int, str] = {
    0: "to-endpoint", 1: "to-proxy", 2: "to-host", 3: "to-stack", 4: "to-overlay", 5: "from-endpoint",
    6: "from-proxy", 7: "from-host", 8: "from-stack", 9: "from-overlay", 10: "from-network",
    11: "to-network", 12: "from-crypto", 13: "to-crypto",
}
"""Trace event sub-types (monitor observation points) and their names."""

AGENT_SUBTYPE_NAMES: dict[str, int] = {
    "unspecified": 0, "message": 1, "agent-started": 2, "endpoint-regenerate-success": 3,
    "endpoint-regenerate-failure": 4, "policy-updated": 5, "policy-deleted": 6, "endpoint-created": 7,
    "endpoint-deleted": 8, "ipcache-upserted": 9, "ipcache-deleted": 10,
}

_TCP_FLAG_BITS = schema.TCP_FLAG_BITS
_L4_PROTOCOLS = ("tcp", "udp", "sctp", "icmp", "icmpv4", "icmpv6", "vrrp", "igmp")
_L7_PROTOCOLS = ("http", "dns", "kafka")


# --------------------------------------------------------------------------------------------
# Text forms shared by the query parameters and the CLI
# --------------------------------------------------------------------------------------------


def parse_event_type(text: str, field: str = "event_type") -> EventTypeFilter:
    """``"4"``, ``"trace"``, ``"1:133"``, ``"trace:to-endpoint"``, ``"l7"`` ... -> EventTypeFilter."""
    type_part, sep, sub_part = str(text).strip().partition(":")
    if type_part in EVENT_TYPE_NAMES:
        etype = EVENT_TYPE_NAMES[type_part]
    elif type_part.isdigit():
        etype = int(type_part)
    else:
        raise FilterError(
            f"{field}: unknown event type {type_part!r}; expected a number or one of "
            f"{', '.join(EVENT_TYPE_NAMES)}")
    if not sep:
        return EventTypeFilter(type=etype)
    sub: Optional[int] = None
    if etype == schema.EVENT_TRACE:
        for number, name in TRACE_POINT_NAMES.items():
            if name == sub_part:
                sub = number
    elif etype == 130:
        sub = AGENT_SUBTYPE_NAMES.get(sub_part)
    if sub is None:
        if not sub_part.isdigit():
            hint = ""
            if etype == schema.EVENT_TRACE:
                hint = f"; trace sub-types: {', '.join(TRACE_POINT_NAMES.values())}"
            raise FilterError(f"{field}: unknown event sub-type {sub_part!r} in {text!r}{hint}")
        sub = int(sub_part)
    return EventTypeFilter(type=etype, match_sub_type=True, sub_type=sub)


def format_event_type(et: EventTypeFilter) -> str:
    """The numeric text form of an EventTypeFilter (inverse of :func:`parse_event_type`)."""
    return f"{et.type}:{et.sub_type}" if et.match_sub_type else str(et.type)


def parse_tcp_flags(text: str, field: str = "tcp_flags") -> TCPFlags:
    """``"SYN"``, ``"syn,ack"`` -> TCPFlags (all listed flags required)."""
    values: dict[str, bool] = {}
    for part in str(text).split(","):
        name = part.strip().upper()
        if name not in _TCP_FLAG_BITS:
            raise FilterError(
                f"{field}: unknown TCP flag {part.strip()!r} in {text!r}; expected "
                f"{', '.join(schema.TCP_FLAG_NAMES)}")
        values[name] = True
    return TCPFlags(**values)


def format_tcp_flags(flags: TCPFlags) -> str:
    return ",".join(n for n in schema.TCP_FLAG_NAMES if getattr(flags, n))


def parse_http_header(text: str, field: str = "http_header") -> HTTPHeader:
    key, sep, value = str(text).partition(":")
    if not sep:
        raise FilterError(f"{field}: invalid HTTP header {text!r}, expected name:value")
    return HTTPHeader(key=key, value=value)


def parse_workload(text: str) -> Workload:
    """``"kind/name"``, ``"kind/"`` or ``"name"`` (as ``hubble observe --workload``)."""
    kind, sep, name = str(text).partition("/")
    if not sep:
        return Workload(name=kind)
    return Workload(kind=kind, name=name)


def parse_interface(text: str) -> NetworkInterface:
    """``"eth0"`` (name) or ``"3"`` (index)."""
    text = str(text)
    if text.isdigit():
        return NetworkInterface(index=int(text))
    return NetworkInterface(name=text)


def parse_identity(text: Union[str, int], field: str = "identity") -> int:
    """A numeric security identity or a reserved name (``world``, ``host``, ``health``...)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        s = str(text).strip()
        if s in RESERVED_IDENTITIES:
            return RESERVED_IDENTITIES[s]
        if not s.isdigit():
            raise FilterError(
                f"{field}: invalid security identity {text!r}, expected a number or one of "
                f"{', '.join(RESERVED_IDENTITIES)}")
        value = int(s)
    if not 0 <= value <= 0xFFFFFFFF:
        raise FilterError(f"{field}: security identity {text!r} out of range")
    return value


_TRUE = {"true", "1", "yes", "on", "t", "y", ""}
_FALSE = {"false", "0", "no", "off", "f", "n"}


def parse_bool(text: Union[str, bool], field: str) -> bool:
    if isinstance(text, bool):
        return text
    s = str(text).strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise FilterError(f"{field}: invalid boolean {text!r}, expected true or false")


# --------------------------------------------------------------------------------------------
# Value compilers (each raises FilterError naming the field)
# --------------------------------------------------------------------------------------------

_MEMO_MAX = 65536


def _memo(fn: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """Memoise a pure ``value -> bool`` test (bounded). Flows repeat their addresses, label sets
    and node names a great deal, so matchers mostly become one dict lookup."""
    cache: dict[Any, bool] = {}
    get = cache.get

    def memoised(key: Any) -> bool:
        r = get(key)
        if r is None:
            r = fn(key)
            if len(cache) >= _MEMO_MAX:
                cache.clear()
            cache[key] = r
        return r

    return memoised


def _ip_int(text: str) -> Optional[tuple[int, int]]:
    """(version, integer) of an address text, or None."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    return ip.version, int(ip)


def _compile_ips(field: str, values: list[str]) -> Callable[[str], bool]:
    exact: set[str] = set()
    nets: list[tuple[int, int, int]] = []  # (version, network int, mask int)
    for v in values:
        text = str(v).strip()
        if "/" in text:
            try:
                net = ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise FilterError(f"{field}: invalid CIDR {v!r}") from None
            nets.append((net.version, int(net.network_address), int(net.netmask)))
        else:
            try:
                ip = ipaddress.ip_address(text)
            except ValueError:
                raise FilterError(f"{field}: invalid IP address {v!r}") from None
            exact.add(str(ip))
            exact.add(text)
    frozen = frozenset(exact)
    exact_ints = frozenset(_ip_int(x) for x in exact)

    def match(ip_text: str) -> bool:
        if ip_text in frozen:
            return True
        parsed = _ip_int(ip_text)
        if parsed is None:
            return False
        if parsed in exact_ints:  # the same address spelled differently (IPv6 zeros)
            return True
        version, value = parsed
        for nv, network, mask in nets:
            if nv == version and value & mask == network:
                return True
        return False

    return _memo(match)


def _parse_namespaced(field: str, value: str) -> tuple[str, str]:
    """Hubble's ``ParseNamespaceName``: ``ns/name``, ``ns/``, ``name`` (namespace "default"),
    ``/name`` (any namespace)."""
    text = str(value)
    if text == "":
        raise FilterError(f"{field}: invalid filter, name must not be empty")
    parts = text.split("/")
    if len(parts) > 2:
        raise FilterError(f"{field}: invalid filter {value!r}, must be [namespace/][<name-prefix>]")
    if len(parts) == 2:
        return parts[0], parts[1]
    return "default", parts[0]


def _compile_namespaced(field: str, values: list[str]) -> list[tuple[str, str]]:
    return [_parse_namespaced(field, v) for v in values]


_FQDN_CHAR = re.compile(r"[-0-9_a-z.*]")
_FQDN_ANY = r"(?:[-0-9_a-z]+(?:\.[-0-9_a-z]+)*)"


def _fqdn_pattern_regex(field: str, pattern: str) -> str:
    p = str(pattern).strip()
    if p.endswith("."):
        p = p[:-1]
    p = p.lower()
    if p == "":
        raise FilterError(f"{field}: empty pattern {pattern!r}")
    if p.endswith("."):
        raise FilterError(f"{field}: multiple trailing dots in pattern {pattern!r}")
    out = []
    for ch in p:
        if ch == ".":
            out.append(r"\.")
        elif ch == "*":
            out.append(r"[-.0-9a-z]*")
        elif _FQDN_CHAR.fullmatch(ch):
            out.append(ch)
        else:
            raise FilterError(f"{field}: invalid character {ch!r} in pattern {pattern!r}")
    return "".join(out)


def _compile_fqdn_patterns(field: str, patterns: list[str]) -> re.Pattern[str]:
    body = "|".join(_fqdn_pattern_regex(field, p) for p in patterns)
    return re.compile(r"\A(?:" + body + r")\Z")


def _compile_node_patterns(field: str, patterns: list[str]) -> re.Pattern[str]:
    alts = []
    for pattern in patterns:
        text = str(pattern)
        if text == "":
            raise FilterError(f"{field}: empty pattern")
        parts = text.split("/")
        if len(parts) > 2:
            raise FilterError(f"{field}: too many slashes in pattern {pattern!r}")
        cluster, node = ("", parts[0]) if len(parts) == 1 else (parts[0], parts[1])
        c = _fqdn_pattern_regex(field, cluster) if cluster else _FQDN_ANY
        n = _fqdn_pattern_regex(field, node) if node else _FQDN_ANY
        alts.append(c + "/" + n)
    return re.compile(r"\A(?:" + "|".join(alts) + r")\Z")


def _compile_regexes(field: str, patterns: list[str]) -> list[re.Pattern[str]]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(str(p)))
        except re.error as e:
            raise FilterError(f"{field}: invalid regular expression {p!r}: {e}") from None
    return out


def _compile_ports(field: str, values: list[Any]) -> frozenset[int]:
    ports = set()
    for v in values:
        text = str(v).strip()
        if isinstance(v, bool) or not text.isdigit() or int(text) > 65535:
            raise FilterError(f"{field}: invalid port {v!r}, expected 0-65535")
        ports.add(int(text))
    return frozenset(ports)


def _compile_enum(field: str, enum_cls: Any, values: list[Any]) -> frozenset[Any]:
    out = set()
    for v in values:
        member = None
        if not isinstance(v, bool):
            try:
                member = enum_cls(v)
            except ValueError:
                member = None
        if member is None:
            names = [m.value for m in enum_cls]
            shown = ", ".join(names) if len(names) <= 12 else ", ".join(names[:12]) + ", ..."
            raise FilterError(f"{field}: unknown value {v!r}; expected one of {shown}")
        out.add(member)
    return frozenset(out)


_HTTP_FULL = re.compile(r"[1-5][0-9]{2}\Z")
_HTTP_PREFIX = re.compile(r"[1-5][0-9]?\+\Z")


# --------------------------------------------------------------------------------------------
# Label selectors (Kubernetes syntax, Cilium label sources)
# --------------------------------------------------------------------------------------------

_SPECIAL = "=!(),<>"
_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]\Z")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
_NOT_FOUND = object()


def _lex_selector(text: str) -> list[str]:
    """Tokens of a selector: identifiers, and the operators = == != ! ( ) , < >."""
    tokens: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch in _SPECIAL:
            two = text[i:i + 2]
            if two in ("==", "!="):
                tokens.append(two)
                i += 2
            else:
                tokens.append(ch)
                i += 1
        else:
            j = i
            while j < n and not text[j].isspace() and text[j] not in _SPECIAL:
                j += 1
            tokens.append(text[i:j])
            i = j
    return tokens


def _validate_label_key(selector: str, source: str, key: str) -> None:
    # Hubble validates "<source>.<key>" as a Kubernetes qualified name.
    full = f"{source}.{key}"
    prefix, sep, name = full.rpartition("/")
    problems = []
    if not key:
        problems.append("empty key")
    if len(name) > 63 or not _LABEL_NAME.match(name):
        problems.append(f"invalid label key {key!r}")
    if sep and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        problems.append(f"invalid label key prefix in {key!r}")
    if problems:
        raise FilterError(f"invalid label selector {selector!r}: {problems[0]}")


def _validate_label_value(selector: str, value: str) -> None:
    if value and (len(value) > 63 or not _LABEL_NAME.match(value)):
        raise FilterError(f"invalid label selector {selector!r}: invalid label value {value!r}")


def _split_selector_key(key: str) -> tuple[str, str]:
    src, sep, rest = key.partition(":")
    if sep:
        return src, rest
    return "any", key


def _parse_selector(selector: str) -> list[tuple[str, str, str, Any]]:
    """Parse one selector into requirements ``(op, source, key, values)``; ops are
    ``in``, ``notin``, ``exists``, ``!exists``, ``gt``, ``lt``."""
    tokens = _lex_selector(str(selector))
    reqs: list[tuple[str, str, str, Any]] = []
    pos = 0

    def peek() -> Optional[str]:
        return tokens[pos] if pos < len(tokens) else None

    def fail(msg: str) -> FilterError:
        return FilterError(f"invalid label selector {selector!r}: {msg}")

    if not tokens:
        return reqs
    while True:
        negate = False
        tok = peek()
        if tok == "!":
            negate = True
            pos += 1
            tok = peek()
        if tok is None or tok in ("=", "==", "!=", "!", "(", ")", ",", "<", ">"):
            raise fail(f"found {tok or 'end of string'!r}, expected: identifier")
        pos += 1
        source, key = _split_selector_key(tok)
        _validate_label_key(selector, source, key)
        nxt = peek()
        if negate or nxt is None or nxt == ",":
            reqs.append(("!exists" if negate else "exists", source, key, None))
        else:
            op_tok = nxt
            pos += 1
            if op_tok in ("in", "notin"):
                if peek() != "(":
                    raise fail(f"found {peek() or 'end of string'!r}, expected: '('")
                pos += 1
                values: set[str] = set()
                expect_value = True
                while True:
                    t = peek()
                    if t is None:
                        raise fail("found end of string, expected: ')'")
                    pos += 1
                    if t == ")":
                        if expect_value:
                            values.add("")
                        break
                    if t == ",":
                        if expect_value:
                            values.add("")
                        expect_value = True
                        continue
                    if t in _SPECIAL or t in ("==", "!="):
                        raise fail(f"found {t!r}, expected: ',', ')' or identifier")
                    if not expect_value:
                        raise fail(f"found {t!r}, expected: ',' or ')'")
                    _validate_label_value(selector, t)
                    values.add(t)
                    expect_value = False
                reqs.append((op_tok, source, key, frozenset(values)))
            elif op_tok in ("=", "==", "!=", ">", "<"):
                t = peek()
                if t is None or t == ",":
                    value = ""
                elif t in _SPECIAL or t in ("==", "!="):
                    raise fail(f"found {t!r}, expected: identifier")
                else:
                    pos += 1
                    value = t
                    _validate_label_value(selector, value)
                if op_tok in (">", "<"):
                    try:
                        number = int(value)
                    except ValueError:
                        raise fail(f"for '{op_tok}' the value must be an integer, got {value!r}") from None
                    reqs.append(("gt" if op_tok == ">" else "lt", source, key, number))
                else:
                    reqs.append(("notin" if op_tok == "!=" else "in", source, key, frozenset((value,))))
            else:
                raise fail(f"found {op_tok!r}, expected: in, notin, =, ==, !=, >, <")
        t = peek()
        if t is None:
            break
        if t != ",":
            raise fail(f"found {t!r}, expected: ',' or end of string")
        pos += 1
        if peek() is None:
            raise fail("found end of string, expected: identifier")
    return reqs


def _parsed_labels(labels: tuple[str, ...]) -> dict[str, list[tuple[str, str]]]:
    """Endpoint labels ``["k8s:app=x", "reserved:world", "$host", "app=y"]`` as
    key -> [(source, value), ...]."""
    parsed: dict[str, list[tuple[str, str]]] = {}
    for label in labels:
        if label.startswith("$"):
            source, rest = "reserved", label[1:]
        else:
            colon = label.find(":")
            eq = label.find("=")
            if colon >= 0 and (eq < 0 or colon < eq):
                source, rest = label[:colon], label[colon + 1:]
            else:
                source, rest = "unspec", label
        k, _, v = rest.partition("=")
        parsed.setdefault(k, []).append((source, v))
    return parsed


def _lookup(parsed: dict[str, list[tuple[str, str]]], source: str, key: str) -> Any:
    entries = parsed.get(key)
    if not entries:
        return _NOT_FOUND
    if source == "any":
        return entries[0][1]
    for s, v in entries:
        if s == source:
            return v
    return _NOT_FOUND


def _compile_selector(selector: str) -> Callable[[dict[str, list[tuple[str, str]]]], bool]:
    reqs = _parse_selector(selector)

    def match(parsed: dict[str, list[tuple[str, str]]]) -> bool:
        for op, source, key, values in reqs:
            v = _lookup(parsed, source, key)
            if op == "in":
                if v is _NOT_FOUND or v not in values:
                    return False
            elif op == "notin":
                if v is not _NOT_FOUND and v in values:
                    return False
            elif op == "exists":
                if v is _NOT_FOUND:
                    return False
            elif op == "!exists":
                if v is not _NOT_FOUND:
                    return False
            else:  # gt / lt
                if v is _NOT_FOUND:
                    return False
                try:
                    n = int(v)
                except ValueError:
                    return False
                if (op == "gt" and not n > values) or (op == "lt" and not n < values):
                    return False
        return True

    return match


def _compile_selectors(field: str, selectors: list[str]) -> Callable[[list[str]], bool]:
    try:
        compiled = [_compile_selector(s) for s in selectors]
    except FilterError as e:
        raise FilterError(f"{field}: {e}") from None

    def match_tuple(labels: tuple[str, ...]) -> bool:
        parsed = _parsed_labels(labels)
        for sel in compiled:
            if sel(parsed):
                return True
        return False

    memo = _memo(match_tuple)
    return lambda labels: memo(tuple(labels))


# --------------------------------------------------------------------------------------------
# The compiler
# --------------------------------------------------------------------------------------------

Predicate = Callable[[Flow], bool]


def _always(_flow: Flow) -> bool:
    return True


def _endpoint_pred(side: str, test: Callable[[Any], bool]) -> Predicate:
    if side == "source":
        def pred(f: Flow) -> bool:
            ep = f.source
            return ep is not None and test(ep)
    else:
        def pred(f: Flow) -> bool:
            ep = f.destination
            return ep is not None and test(ep)
    return pred


def _ip_pred(side: str, match: Callable[[str], bool]) -> Predicate:
    if side == "source":
        def pred(f: Flow) -> bool:
            ip = f.IP
            return ip is not None and ip.source != "" and match(ip.source)
    else:
        def pred(f: Flow) -> bool:
            ip = f.IP
            return ip is not None and ip.destination != "" and match(ip.destination)
    return pred


def _port_pred(side: str, ports: frozenset[int]) -> Predicate:
    if side == "source":
        def pred(f: Flow) -> bool:
            l4 = f.l4
            if l4 is None:
                return False
            p = l4.TCP or l4.UDP or l4.SCTP
            return p is not None and p.source_port in ports
    else:
        def pred(f: Flow) -> bool:
            l4 = f.l4
            if l4 is None:
                return False
            p = l4.TCP or l4.UDP or l4.SCTP
            return p is not None and p.destination_port in ports
    return pred


def _namespaced_pred(field: str, names: list[tuple[str, str]], getter: Callable[[Flow], Any]) -> Predicate:
    def pred(f: Flow) -> bool:
        obj = getter(f)
        if obj is None:
            return False
        ns = obj.namespace
        name = obj.pod_name if field.endswith("_pod") else obj.name
        if not ns and not name:
            return False
        for fns, prefix in names:
            if (not prefix or name.startswith(prefix)) and (not fns or fns == ns):
                return True
        return False
    return pred


def _http_pred(test: Callable[[Any], bool]) -> Predicate:
    def pred(f: Flow) -> bool:
        l7 = f.l7
        if l7 is None:
            return False
        http = l7.http
        return http is not None and test(http)
    return pred


def _url_path(url: str) -> Optional[str]:
    """The path of a request URI as Go's ``url.ParseRequestURI`` sees it (None if invalid)."""
    if url.startswith("/"):
        path = url.split("?", 1)[0]
        return path
    m = re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", url)
    if not m:
        return None
    rest = url[m.end():]
    if rest.startswith("//"):
        rest = rest[2:]
        slash = rest.find("/")
        if slash < 0:
            return ""
        rest = rest[slash:]
    return rest.split("?", 1)[0].split("#", 1)[0]


def _flow_ip_version(f: Flow) -> IPVersion:
    ip = f.IP
    if ip is None:
        return IPVersion.IP_NOT_USED
    v = ip.ipVersion
    if v is not IPVersion.IP_NOT_USED:
        return v
    addr = ip.source or ip.destination
    if not addr:
        return IPVersion.IP_NOT_USED
    return IPVersion.IPv6 if ":" in addr else IPVersion.IPv4


def _http_compatible(ff: FlowFilter) -> bool:
    return not ff.event_type or any(t.type == schema.EVENT_L7 for t in ff.event_type)


def _compile_predicates(ff: FlowFilter) -> list[tuple[int, Predicate]]:
    """(cost, predicate) pairs for every set field; cheaper ones are evaluated first."""
    preds: list[tuple[int, Predicate]] = []
    add = preds.append

    if ff.uuid:
        uuids = frozenset(ff.uuid)
        add((0, lambda f: f.uuid in uuids))

    if ff.event_type:
        types = [(t.type, t.match_sub_type, t.sub_type) for t in ff.event_type]

        def event_type_pred(f: Flow) -> bool:
            et = f.event_type
            if et is None:
                return False
            for t, match_sub, sub in types:
                if t and et.type != t:
                    continue
                if match_sub and et.sub_type != sub:
                    continue
                return True
            return False
        add((1, event_type_pred))

    if ff.verdict:
        verdicts = _compile_enum("verdict", Verdict, ff.verdict)
        add((0, lambda f: f.verdict in verdicts))

    if ff.drop_reason_desc:
        reasons = _compile_enum("drop_reason_desc", DropReason, ff.drop_reason_desc)
        dropped = Verdict.DROPPED
        add((0, lambda f: f.verdict is dropped and f.drop_reason_desc in reasons))

    if ff.reply:
        replies = frozenset(bool(r) for r in ff.reply)
        dropped_v = Verdict.DROPPED

        def reply_pred(f: Flow) -> bool:
            r = f.is_reply
            if r is None:
                if f.verdict is not dropped_v:
                    return False
                r = False
            return r in replies
        add((0, reply_pred))

    if ff.traffic_direction:
        directions = _compile_enum("traffic_direction", TrafficDirection, ff.traffic_direction)
        add((0, lambda f: f.traffic_direction in directions))

    for side in ("source", "destination"):
        ids = getattr(ff, f"{side}_identity")
        if ids:
            for i in ids:
                if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i <= 0xFFFFFFFF:
                    raise FilterError(f"{side}_identity: invalid security identity {i!r}")
            idset = frozenset(ids)
            add((1, _endpoint_pred(side, lambda ep, s=idset: ep.identity in s)))

    if ff.protocol:
        l4_want: set[str] = set()
        l7_want: set[str] = set()
        for p in ff.protocol:
            name = str(p).lower()
            if name in _L4_PROTOCOLS:
                l4_want.add(name)
            elif name in _L7_PROTOCOLS:
                l7_want.add(name)
            else:
                raise FilterError(
                    f"protocol: unknown protocol {p!r}; expected one of "
                    f"{', '.join(_L4_PROTOCOLS + _L7_PROTOCOLS)}")
        want_tcp = "tcp" in l4_want
        want_udp = "udp" in l4_want
        want_sctp = "sctp" in l4_want
        want_icmp4 = bool(l4_want & {"icmp", "icmpv4"})
        want_icmp6 = bool(l4_want & {"icmp", "icmpv6"})
        want_http, want_dns, want_kafka = "http" in l7_want, "dns" in l7_want, "kafka" in l7_want

        def protocol_pred(f: Flow) -> bool:
            l4 = f.l4
            if l4 is not None:
                if (want_tcp and l4.TCP is not None) or (want_udp and l4.UDP is not None) or (
                        want_sctp and l4.SCTP is not None) or (want_icmp4 and l4.ICMPv4 is not None) or (
                        want_icmp6 and l4.ICMPv6 is not None):
                    return True
            l7 = f.l7
            if l7 is not None:
                if (want_http and l7.http is not None) or (want_dns and l7.dns is not None) or (
                        want_kafka and l7.kafka is not None):
                    return True
            return False
        add((1, protocol_pred))

    if ff.ip_version:
        versions = _compile_enum("ip_version", IPVersion, ff.ip_version)
        add((1, lambda f: _flow_ip_version(f) in versions))

    for side in ("source", "destination"):
        ports = getattr(ff, f"{side}_port")
        if ports:
            add((1, _port_pred(side, _compile_ports(f"{side}_port", ports))))

    for side in ("source", "destination"):
        ips = getattr(ff, f"{side}_ip")
        if ips:
            add((2, _ip_pred(side, _compile_ips(f"{side}_ip", ips))))

    for side in ("source", "destination"):
        pods = getattr(ff, f"{side}_pod")
        if pods:
            names = _compile_namespaced(f"{side}_pod", pods)
            getter = (lambda f: f.source) if side == "source" else (lambda f: f.destination)
            add((2, _namespaced_pred(f"{side}_pod", names, getter)))
        services = getattr(ff, f"{side}_service")
        if services:
            names = _compile_namespaced(f"{side}_service", services)
            getter = (lambda f: f.source_service) if side == "source" else (lambda f: f.destination_service)
            add((2, _namespaced_pred(f"{side}_service", names, getter)))

    for side in ("source", "destination"):
        workloads = getattr(ff, f"{side}_workload")
        if workloads:
            wl = [(w.name, w.kind) for w in workloads]

            def workload_test(ep: Any, wl: list[tuple[str, str]] = wl) -> bool:
                for w in ep.workloads:
                    for name, kind in wl:
                        if (not name or name == w.name) and (not kind or kind == w.kind):
                            return True
                return False
            add((2, _endpoint_pred(side, workload_test)))

    if ff.tcp_flags:
        getters = []
        for t in ff.tcp_flags:
            names = [n for n in _TCP_FLAG_BITS if getattr(t, n)]
            getters.append(operator.attrgetter(*names) if names else None)

        def tcp_flags_pred(f: Flow) -> bool:
            l4 = f.l4
            if l4 is None or l4.TCP is None or l4.TCP.flags is None:
                return False
            fl = l4.TCP.flags
            for g in getters:
                if g is None:
                    return True
                got = g(fl)
                if got is True or (got.__class__ is tuple and all(got)):
                    return True
            return False
        add((2, tcp_flags_pred))

    if ff.interface:
        ifaces = [(i.index, i.name) for i in ff.interface]

        def interface_pred(f: Flow) -> bool:
            iface = f.interface
            if iface is None:
                return False
            for idx, name in ifaces:
                if idx and idx != iface.index:
                    continue
                if name and name != iface.name:
                    continue
                return True
            return False
        add((1, interface_pred))

    if ff.node_name:
        node_re = _compile_node_patterns("node_name", ff.node_name).match

        def node_test(n: str) -> bool:
            if not n:
                return False
            if "/" not in n:
                n = "default/" + n
            return node_re(n) is not None
        node_memo = _memo(node_test)
        add((2, lambda f: node_memo(f.node_name)))

    for side in ("source", "destination"):
        fqdns = getattr(ff, f"{side}_fqdn")
        if fqdns:
            fqdn_re = _compile_fqdn_patterns(f"{side}_fqdn", fqdns).match
            fqdn_memo = _memo(lambda name, fqdn_re=fqdn_re: fqdn_re(name) is not None)
            attr = f"{side}_names"

            def fqdn_pred(f: Flow, attr: str = attr, fqdn_memo: Any = fqdn_memo) -> bool:
                for name in getattr(f, attr):
                    if fqdn_memo(name):
                        return True
                return False
            add((3, fqdn_pred))

    for side in ("source", "destination"):
        selectors = getattr(ff, f"{side}_label")
        if selectors:
            m = _compile_selectors(f"{side}_label", selectors)
            attr = side

            def label_pred(f: Flow, m: Any = m, attr: str = attr) -> bool:
                ep = getattr(f, attr)
                return ep is not None and m(ep.labels)
            add((4, label_pred))
    if ff.node_labels:
        m_node = _compile_selectors("node_labels", ff.node_labels)
        add((4, lambda f: m_node(f.node_labels)))

    if ff.dns_query:
        dns_res = [r.search for r in _compile_regexes("dns_query", ff.dns_query)]

        def dns_pred(f: Flow) -> bool:
            l7 = f.l7
            if l7 is None or l7.dns is None:
                return False
            q = l7.dns.query
            for s in dns_res:
                if s(q) is not None:
                    return True
            return False
        add((4, dns_pred))

    http_fields = ("http_status_code", "http_method", "http_path", "http_url", "http_header")
    for name in http_fields:
        if getattr(ff, name) and not _http_compatible(ff):
            label = {"http_status_code": "http status code", "http_method": "http method",
                     "http_path": "http path", "http_url": "http url", "http_header": "http headers"}[name]
            raise FilterError(f"{name}: filtering by {label} requires the event type filter "
                              f"to only match 'l7' events")

    if ff.http_status_code:
        full: set[str] = set()
        prefixes: list[str] = []
        for s in ff.http_status_code:
            text = str(s).strip()
            if _HTTP_FULL.match(text):
                full.add(text)
            elif _HTTP_PREFIX.match(text):
                prefixes.append(text[:-1])
            else:
                raise FilterError(f"http_status_code: invalid status code prefix {s!r}, "
                                  f"expected e.g. \"404\", \"4+\" or \"40+\"")
        ptuple = tuple(prefixes)

        def status_test(http: Any) -> bool:
            if not http.code:
                return False
            code = "%03d" % http.code
            return code in full or (bool(ptuple) and code.startswith(ptuple))
        add((2, _http_pred(status_test)))

    if ff.http_method:
        methods = frozenset(str(m).upper() for m in ff.http_method)
        add((2, _http_pred(lambda h: bool(h.method) and h.method.upper() in methods)))

    if ff.http_path:
        path_res = [r.search for r in _compile_regexes("http_path", ff.http_path)]

        def path_test(http: Any) -> bool:
            if not http.url:
                return False
            path = _url_path(http.url)
            if path is None:
                return False
            return any(s(path) is not None for s in path_res)
        add((4, _http_pred(path_test)))

    if ff.http_url:
        url_res = [r.search for r in _compile_regexes("http_url", ff.http_url)]
        add((4, _http_pred(lambda h: bool(h.url) and any(s(h.url) is not None for s in url_res))))

    if ff.http_header:
        wanted = frozenset((h.key, h.value) for h in ff.http_header)
        add((3, _http_pred(lambda h: any((x.key, x.value) in wanted for x in h.headers))))

    preds.sort(key=lambda cp: cp[0])
    return preds


def compile_filter(f: FlowFilter) -> Predicate:
    """A predicate ``flow -> bool`` for one FlowFilter (AND of its set fields).

    Raises :class:`FilterError` for invalid values. The returned function does no parsing: regexes,
    networks, selectors and enum sets are prepared once here."""
    if not isinstance(f, FlowFilter):
        raise TypeError(f"compile_filter expects a FlowFilter, got {type(f).__name__}")
    preds = [p for _, p in _compile_predicates(f)]
    if not preds:
        return _always
    if len(preds) == 1:
        return preds[0]
    if len(preds) == 2:
        a, b = preds
        return lambda flow: a(flow) and b(flow)
    if len(preds) == 3:
        a, b, c = preds
        return lambda flow: a(flow) and b(flow) and c(flow)
    ptuple = tuple(preds)

    def match_all(flow: Flow) -> bool:
        for p in ptuple:
            if not p(flow):
                return False
        return True
    return match_all


def _as_filter(obj: Any) -> FlowFilter:
    if isinstance(obj, FlowFilter):
        return obj
    if isinstance(obj, dict):
        try:
            return msgspec.convert(obj, FlowFilter)
        except msgspec.ValidationError as e:
            raise FilterError(f"invalid flow filter: {e}") from None
    raise FilterError(f"invalid flow filter: expected an object, got {type(obj).__name__}")


class FilterSet:
    """An allowlist and a denylist of FlowFilters, compiled.

    ``match(flow)`` is true when the flow matches any allowlist filter (an empty allowlist matches
    everything) and no denylist filter."""

    __slots__ = ("whitelist", "blacklist", "match", "_allow", "_deny")

    def __init__(self, whitelist: Iterable[Any] = (), blacklist: Iterable[Any] = ()) -> None:
        self.whitelist: list[FlowFilter] = [_as_filter(x) for x in whitelist]
        self.blacklist: list[FlowFilter] = [_as_filter(x) for x in blacklist]
        allow = tuple(compile_filter(x) for x in self.whitelist)
        deny = tuple(compile_filter(x) for x in self.blacklist)
        self._allow, self._deny = allow, deny
        self.match: Callable[[Flow], bool] = self._build(allow, deny)

    @staticmethod
    def _build(allow: tuple[Predicate, ...], deny: tuple[Predicate, ...]) -> Callable[[Flow], bool]:
        if any(p is _always for p in allow):
            allow = ()
        if not allow and not deny:
            return _always
        if len(allow) == 1 and not deny:
            return allow[0]
        if not allow and len(deny) == 1:
            d = deny[0]
            return lambda flow: not d(flow)
        if len(allow) == 1 and len(deny) == 1:
            a, d = allow[0], deny[0]
            return lambda flow: a(flow) and not d(flow)

        def match(flow: Flow) -> bool:
            if allow:
                for a in allow:
                    if a(flow):
                        break
                else:
                    return False
            for d in deny:
                if d(flow):
                    return False
            return True
        return match

    @property
    def matches_all(self) -> bool:
        """True when the set filters nothing out."""
        return self.match is _always

    def match_many(self, flows: Iterable[Flow]) -> list[Flow]:
        """The flows that pass, in order."""
        m = self.match
        if m is _always:
            return list(flows)
        return [f for f in flows if m(f)]

    def __repr__(self) -> str:
        return f"FilterSet(whitelist={self.whitelist!r}, blacklist={self.blacklist!r})"


# --------------------------------------------------------------------------------------------
# SQL pushdown hints
# --------------------------------------------------------------------------------------------

_L4_NAMES = {"tcp": ["TCP"], "udp": ["UDP"], "sctp": ["SCTP"], "icmp": ["ICMPv4", "ICMPv6"],
             "icmpv4": ["ICMPv4"], "icmpv6": ["ICMPv6"]}
_GLOB = re.compile(r"[*]")


def _pushdown_one(ff: FlowFilter) -> tuple[dict[str, list[Any]], bool]:
    cond: dict[str, list[Any]] = {}
    pushed: set[str] = set()
    if ff.uuid:
        cond["uuid"] = sorted(set(ff.uuid))
        pushed.add("uuid")
    if ff.verdict:
        cond["verdict"] = sorted(v.value for v in _compile_enum("verdict", Verdict, ff.verdict))
        pushed.add("verdict")
    if ff.drop_reason_desc:
        reasons = sorted(r.value for r in _compile_enum("drop_reason_desc", DropReason, ff.drop_reason_desc))
        cond["drop_reason_desc"] = reasons
        verdicts = set(cond.get("verdict", ["DROPPED"])) & {"DROPPED"}
        cond["verdict"] = sorted(verdicts)
        pushed.add("drop_reason_desc")
    if ff.traffic_direction:
        cond["traffic_direction"] = sorted(
            d.value for d in _compile_enum("traffic_direction", TrafficDirection, ff.traffic_direction))
        pushed.add("traffic_direction")
    if ff.event_type and all(t.type for t in ff.event_type):
        cond["event_type"] = [[t.type, t.sub_type if t.match_sub_type else None] for t in ff.event_type]
        pushed.add("event_type")
    for side in ("source", "destination"):
        ips = getattr(ff, f"{side}_ip")
        if ips and all("/" not in str(x) for x in ips):
            _compile_ips(f"{side}_ip", ips)
            cond[f"{side}_ip"] = sorted({str(ipaddress.ip_address(str(x).strip())) for x in ips})
            pushed.add(f"{side}_ip")
        ports = getattr(ff, f"{side}_port")
        if ports:
            port_set = _compile_ports(f"{side}_port", ports)
            cond[f"{side}_port"] = sorted(port_set)
            if 0 not in port_set:  # a stored 0 may mean "no port" (ICMP), which never matches
                pushed.add(f"{side}_port")
        ids = getattr(ff, f"{side}_identity")
        if ids:
            cond[f"{side}_identity"] = sorted(set(ids))
            if 0 not in ids:  # a stored 0 may mean "no endpoint", which never matches
                pushed.add(f"{side}_identity")
        pods = getattr(ff, f"{side}_pod")
        if pods:
            pairs = _compile_namespaced(f"{side}_pod", pods)
            if all(ns or prefix for ns, prefix in pairs):
                cond[f"{side}_pod"] = [list(p) for p in pairs]
                pushed.add(f"{side}_pod")
    if ff.protocol and all(str(p).lower() in _L4_NAMES for p in ff.protocol):
        names: set[str] = set()
        for p in ff.protocol:
            names.update(_L4_NAMES[str(p).lower()])
        cond["l4_protocol"] = sorted(names)
        pushed.add("protocol")
    if ff.node_name and all(not _GLOB.search(str(n)) and "/" not in str(n) for n in ff.node_name):
        _compile_node_patterns("node_name", ff.node_name)
        exact = set()
        for n in ff.node_name:
            low = str(n).strip().rstrip(".").lower()
            exact.update((low, "default/" + low))
        cond["node_name"] = sorted(exact)
        pushed.add("node_name")
    set_fields = {name for name in FILTER_FIELDS if getattr(ff, name)}
    return cond, set_fields <= pushed


def sql_pushdown(filterset: FilterSet) -> dict[str, Any]:
    """Conditions a store can evaluate in SQL to narrow its scan before ``filterset.match``.

    Returns ``{"allowlist": [{"conditions": {...}, "exact": bool}, ...] | None}``:

    * ``None`` when no narrowing is possible (empty allowlist, or some allowlist filter has no
      pushable field: SQL would have to return every row anyway).
    * Otherwise a row can only pass if it satisfies the ``conditions`` of at least one entry (OR
      across entries). Inside ``conditions`` keys are ANDed and each key lists alternatives (OR):

      - ``uuid``, ``verdict``, ``drop_reason_desc``, ``traffic_direction``: column equals one of
        the names (enum names as in the JSON; ``drop_reason_desc`` also sets ``verdict``);
      - ``source_ip``/``destination_ip``: exact canonical addresses (only when no CIDR was given);
      - ``source_port``/``destination_port``: integers (TCP/UDP/SCTP ports);
      - ``source_identity``/``destination_identity``: integers;
      - ``source_pod``/``destination_pod``: ``[namespace, pod_name_prefix]`` pairs; an empty
        namespace means any namespace, an empty prefix any pod. The prefix test is case-sensitive
        (``substr(pod_name, 1, length(prefix)) = prefix``; SQLite's ``LIKE`` is not, so with
        ``LIKE`` treat the entry as not exact). Never both empty (that filter is not pushed);
      - ``l4_protocol``: which ``l4`` member is set: ``TCP``, ``UDP``, ``SCTP``, ``ICMPv4``, ``ICMPv6``;
      - ``event_type``: ``[type, sub_type | None]`` pairs (``None``: any sub-type);
      - ``node_name``: exact node names (lower-case, with and without the ``default/`` cluster).

    Every condition is implied by the filter, so SQL narrowed this way never drops a flow the
    filter would keep; ``exact`` says the conditions capture the whole filter, assuming the store
    keeps these values as the flow JSON has them (IPs canonical, ports only for TCP/UDP/SCTP,
    identities only for present endpoints; a filter on port 0 or identity 0 is never exact).
    The denylist is not pushed down. The Python ``FilterSet.match`` stays the final judge.
    """
    if not filterset.whitelist:
        return {"allowlist": None}
    entries = []
    for ff in filterset.whitelist:
        cond, exact = _pushdown_one(ff)
        if not cond:
            return {"allowlist": None}
        entries.append({"conditions": cond, "exact": exact})
    return {"allowlist": entries}
