"""``flowscope observe``: Hubble's ``observe`` command against a Flowscope server or a file.

Filter flags work as in ``hubble observe``: repeated values of one flag are alternatives (OR),
different flags must all match (AND); ``--not`` puts the next filter flag in the denylist;
``--ip/--pod/--label/--namespace/--port/--fqdn/--identity/--service/--workload`` mean "either
side", which becomes two allowlist filters (source side / destination side) sharing the other
flags. Flags are applied in command-line order (that is what makes ``--not`` work).

Sources:

* a server (``--server``, default ``$FLOWSCOPE_SERVER`` or ``http://127.0.0.1:8080``):
  ``POST /api/v1/flows/query`` with the FlowQuery JSON, answered with JSON lines (one
  GetFlowsResponse envelope per line, oldest first), printed as they arrive; with ``--follow``
  ``WS /api/v1/flows/stream?<params>``, whose text frames are JSON arrays of envelopes;
* ``--input-file FILE`` (``-`` = stdin): Hubble JSON lines (``hubble observe -o jsonpb`` or
  Flowscope exports) filtered locally; no server involved.

Exit status: 0 on success (also after Ctrl-C), 1 when the server fails or cannot be reached, 2 for
invalid flags. Errors are one line on stderr.
"""

from __future__ import annotations

import collections
import json
import os
import sys
from typing import Any, Callable, Iterable, Iterator, Optional, TextIO
from urllib.parse import urlencode, urlsplit, urlunsplit

import click
import msgspec

from flowscope import schema
from flowscope.filters import (
    FilterError,
    FilterSet,
    FlowFilter,
    RESERVED_IDENTITIES,
    parse_event_type,
    parse_http_header,
    parse_identity,
    parse_interface,
    parse_tcp_flags,
    parse_workload,
)
from flowscope.printer import (
    OUTPUT_FORMATS,
    TIME_FORMATS,
    Printer,
    PrinterError,
    decode_envelope,
    load_flow_lenient,
)
from flowscope.query import DEFAULT_LAST, FlowQuery, QueryError, query_to_json, query_to_params
from flowscope.timeparse import TimeParseError, parse_time

__all__ = ["observe_command", "build_filters", "build_query", "ObserveUsageError", "ObserveError",
           "DEFAULT_SERVER", "ALL_FLOWS"]

DEFAULT_SERVER = "http://127.0.0.1:8080"
ALL_FLOWS = 2**63 - 1
"""``--all``: as Hubble, the largest count (fits a signed 64-bit SQL LIMIT)."""


class ObserveUsageError(ValueError):
    """Invalid flags (exit status 2)."""


class ObserveError(RuntimeError):
    """The server failed or could not be reached (exit status 1)."""


# --------------------------------------------------------------------------------------------
# Filter flags -> FlowFilters (Hubble's filterTracker, pure)
# --------------------------------------------------------------------------------------------

# (flag, short, takes a value, help)
FILTER_FLAGS: list[tuple[str, Optional[str], bool, str]] = [
    ("not", None, False, "Reverse the next filter: put it in the denylist (e.g. --not --from-ip 2.2.2.2)"),
    ("uuid", None, True, "Show only the flow with this unique flow identifier"),
    ("node-name", None, True, 'Flows observed on nodes matching these names (e.g. "k8s*", "cluster/*.example.com")'),
    ("node-label", None, True, 'Flows observed on nodes matching this label selector (e.g. "key1=value1")'),
    ("protocol", None, True, "L4/L7 protocol: tcp, udp, sctp, icmp, icmpv4, icmpv6, http, dns, kafka"),
    ("tcp-flags", None, True, 'Flows with all of these TCP flags set (e.g. "syn", "syn,ack", "fin")'),
    ("type", "t", True, "Event type TYPE[:SUBTYPE]: trace, drop, l7, policy-verdict, capture, debug, "
                        "trace-sock or a number; e.g. trace:to-endpoint, 1:133"),
    ("verdict", None, True, "Verdict: FORWARDED, DROPPED, AUDIT, REDIRECTED, ERROR, TRACED, TRANSLATED"),
    ("drop-reason-desc", None, True, 'Drop reason (e.g. "POLICY_DENIED", "UNSUPPORTED_L3_PROTOCOL")'),
    ("http-status", None, True, 'HTTP status code or prefix (e.g. "404", "5+")'),
    ("http-method", None, True, 'HTTP method (e.g. "get", "post")'),
    ("http-path", None, True, 'Regular expression on the HTTP path (e.g. "/page/\\d+")'),
    ("http-url", None, True, 'Regular expression on the HTTP URL (e.g. "http://.*example\\.com/page/\\d+")'),
    ("http-header", None, True, 'HTTP header key:value (e.g. "foo:bar")'),
    ("from-fqdn", None, True, 'Flows from this fully qualified domain name (e.g. "*.example.com")'),
    ("fqdn", None, True, "Flows from or to this fully qualified domain name"),
    ("to-fqdn", None, True, "Flows to this fully qualified domain name"),
    ("from-ip", None, True, "Flows from this IP address or CIDR (e.g. 1.1.1.1, 1.1.1.0/24)"),
    ("ip", None, True, "Flows from or to this IP address or CIDR"),
    ("to-ip", None, True, "Flows to this IP address or CIDR"),
    ("ipv4", "4", False, "Only IPv4 flows"),
    ("ipv6", "6", False, "Only IPv6 flows"),
    ("ip-version", None, True, "IP version: v4, v6 or none"),
    ("from-pod", None, True, "Flows from this pod name prefix ([namespace/]<pod-name>; namespace default is 'default')"),
    ("pod", None, True, "Flows from or to this pod name prefix ([namespace/]<pod-name>)"),
    ("to-pod", None, True, "Flows to this pod name prefix ([namespace/]<pod-name>)"),
    ("from-namespace", None, True, "Flows from this namespace"),
    ("namespace", "n", True, "Flows from or to this namespace"),
    ("to-namespace", None, True, "Flows to this namespace"),
    ("from-all-namespaces", None, False, "Flows from any namespace"),
    ("all-namespaces", "A", False, "Flows from or to any namespace"),
    ("to-all-namespaces", None, False, "Flows to any namespace"),
    ("from-label", None, True, 'Flows from endpoints with these labels (e.g. "app=frontend", "reserved:world")'),
    ("label", "l", True, "Flows from or to endpoints with these labels"),
    ("to-label", None, True, "Flows to endpoints with these labels"),
    ("from-service", None, True, "Flows from this service name prefix ([namespace/]<svc-name>)"),
    ("service", None, True, "Flows from or to this service name prefix"),
    ("to-service", None, True, "Flows to this service name prefix"),
    ("from-port", None, True, "Flows with this source port"),
    ("port", None, True, "Flows with this port on either side"),
    ("to-port", None, True, "Flows with this destination port"),
    ("from-workload", None, True, "Flows from endpoints of this workload ([kind/]name)"),
    ("workload", None, True, "Flows from or to endpoints of this workload"),
    ("to-workload", None, True, "Flows to endpoints of this workload"),
    ("from-identity", None, True, f"Flows from this security identity (number or {', '.join(RESERVED_IDENTITIES)})"),
    ("identity", None, True, "Flows from or to this security identity"),
    ("to-identity", None, True, "Flows to this security identity"),
    ("traffic-direction", None, True, "Traffic direction: ingress or egress"),
    ("interface", None, True, "Flows observed at this interface (name, or index)"),
]
_FILTER_FLAG_NAMES = {f[0] for f in FILTER_FLAGS}

_CONFLICTS = [
    ["from-fqdn", "from-ip", "ip", "fqdn", "from-namespace", "namespace", "from-all-namespaces", "all-namespaces"],
    ["from-fqdn", "from-ip", "ip", "fqdn", "from-pod", "pod"],
    ["to-fqdn", "to-ip", "ip", "fqdn", "to-namespace", "namespace", "to-all-namespaces", "all-namespaces"],
    ["to-fqdn", "to-ip", "ip", "fqdn", "to-pod", "pod"],
    ["to-pod", "namespace", "all-namespaces"],
    ["from-pod", "namespace", "all-namespaces"],
    ["to-service", "namespace", "all-namespaces"],
    ["from-service", "namespace", "all-namespaces"],
    ["label", "from-label"], ["label", "to-label"],
    ["service", "from-service"], ["service", "to-service"],
    ["port", "to-port"], ["port", "from-port"],
    ["identity", "to-identity"], ["identity", "from-identity"],
    ["workload", "to-workload"], ["workload", "from-workload"],
]

_VERDICTS = [v.value for v in schema.Verdict if v is not schema.Verdict.VERDICT_UNKNOWN]


def _q(s: str) -> str:
    return json.dumps(s)


def _ns_of(name: str) -> str:
    parts = name.split("/")
    return parts[0] if len(parts) > 1 else ""


def _add_namespaces(values: list[str], namespaces: list[str]) -> list[str]:
    if not namespaces or not values:
        return values
    out = []
    for v in values:
        if "/" in v:
            out.append(v)
            continue
        out.extend(f"{ns}/{v}" for ns in namespaces)
    return out


class _Tracker:
    """One side of the request (allowlist or denylist): ``left`` (source-side) and ``right``
    (destination-side) filters, ``left OR right``; namespaces are applied when materialised."""

    def __init__(self) -> None:
        self.left: Optional[dict[str, list[Any]]] = None
        self.right: Optional[dict[str, list[Any]]] = None
        self.ns: list[str] = []
        self.src_ns: list[str] = []
        self.dst_ns: list[str] = []
        self.changed: list[str] = []

    def _side(self, which: str) -> dict[str, list[Any]]:
        cur = getattr(self, which)
        if cur is None:
            cur = {}
            setattr(self, which, cur)
        return cur

    def add(self, field: str, value: Any, side: str = "both") -> None:
        if side in ("both", "left"):
            self._side("left").setdefault(field, []).append(value)
        if side in ("both", "right"):
            self._side("right").setdefault(field, []).append(value)

    def check_conflicts(self) -> None:
        for group in _CONFLICTS:
            for flag in group:
                if flag in self.changed:
                    for other in group:
                        if other != flag and other in self.changed:
                            raise ObserveUsageError(f"filters --{flag} and --{other} cannot be combined")

    def check_namespace_conflicts(self, ff: Optional[dict[str, list[Any]]]) -> None:
        if ff is None:
            return
        checks = [(self.ns, "source_pod"), (self.ns, "source_service"), (self.ns, "destination_pod"),
                  (self.ns, "destination_service"), (self.src_ns, "source_pod"),
                  (self.src_ns, "source_service"), (self.dst_ns, "destination_pod"),
                  (self.dst_ns, "destination_service")]
        for namespaces, field in checks:
            for ns in namespaces:
                for name in ff.get(field, []):
                    nn = _ns_of(name)
                    if nn and nn != ns:
                        raise ObserveUsageError(f"namespace conflict: {_q(ns)} does not contain {_q(name)}")
        for pods_f, svcs_f in (("source_pod", "source_service"), ("destination_pod", "destination_service")):
            for pod in ff.get(pods_f, []):
                pod_ns = _ns_of(pod)
                if not pod_ns:
                    continue
                for svc in ff.get(svcs_f, []):
                    if _ns_of(svc) != pod_ns:
                        raise ObserveUsageError(f"namespace of service {_q(svc)} conflict with pod {_q(pod_ns)}")

    @staticmethod
    def _apply_ns(ff: dict[str, list[Any]], namespaces: list[str], side: str) -> None:
        pod_f, svc_f = f"{side}_pod", f"{side}_service"
        if not ff.get(pod_f) and not ff.get(svc_f):
            ff[pod_f] = [""]
        for f in (pod_f, svc_f):
            if ff.get(f):
                ff[f] = _add_namespaces(ff[f], namespaces)

    def flow_filters(self) -> list[FlowFilter]:
        if self.left is None and self.right is None and not (self.ns or self.src_ns or self.dst_ns):
            return []
        left = {k: list(v) for k, v in (self.left or {}).items()}
        right = {k: list(v) for k, v in (self.right or {}).items()}
        if self.dst_ns:
            self._apply_ns(left, self.dst_ns, "destination")
            self._apply_ns(right, self.dst_ns, "destination")
        if self.src_ns:
            self._apply_ns(left, self.src_ns, "source")
            self._apply_ns(right, self.src_ns, "source")
        if self.ns:
            self._apply_ns(left, self.ns, "source")
            self._apply_ns(right, self.ns, "destination")
        lf, rf = FlowFilter(**left), FlowFilter(**right)
        return [lf] if lf == rf else [lf, rf]


def _enum_name(enum_cls: Any, flag: str, value: str, allowed: Optional[list[str]] = None) -> str:
    try:
        member = enum_cls(value)
    except ValueError:
        member = None
    if member is None or (allowed is not None and member.value not in allowed):
        names = allowed or [m.value for m in enum_cls]
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise ObserveUsageError(f"invalid --{flag} value: {value} (expected one of {shown})")
    return member.value


_IP_VERSIONS = {"4": "IPv4", "v4": "IPv4", "ipv4": "IPv4", "ip4": "IPv4",
                "6": "IPv6", "v6": "IPv6", "ipv6": "IPv6", "ip6": "IPv6",
                "none": "IP_NOT_USED", "0": "IP_NOT_USED", "ip_not_used": "IP_NOT_USED"}

# "either side" flags: the value goes to source_<x> of the left filter and destination_<x> of the right
_EITHER = frozenset({"ip", "pod", "label", "port", "fqdn", "identity", "service", "workload"})
_ONE_SIDED = {"from-ip": ("source_ip", "ip"), "to-ip": ("destination_ip", "ip"),
              "from-pod": ("source_pod", "pod"), "to-pod": ("destination_pod", "pod"),
              "from-label": ("source_label", "label"), "to-label": ("destination_label", "label"),
              "from-port": ("source_port", "port"), "to-port": ("destination_port", "port"),
              "from-fqdn": ("source_fqdn", "fqdn"), "to-fqdn": ("destination_fqdn", "fqdn"),
              "from-identity": ("source_identity", "identity"), "to-identity": ("destination_identity", "identity"),
              "from-service": ("source_service", "service"), "to-service": ("destination_service", "service"),
              "from-workload": ("source_workload", "workload"), "to-workload": ("destination_workload", "workload")}


def _convert(kind: str, flag: str, value: str) -> Any:
    try:
        if kind == "identity":
            return parse_identity(value, f"--{flag}")
        if kind == "workload":
            return parse_workload(value)
    except FilterError:
        raise ObserveUsageError(
            f"invalid --{flag} value {value!r}: expected a security identity number or one of "
            f"{', '.join(RESERVED_IDENTITIES)}") from None
    return value


def _set(t: _Tracker, flag: str, value: Optional[str]) -> None:
    if flag not in t.changed:
        t.changed.append(flag)
    t.check_conflicts()
    v = value if value is not None else ""
    try:
        if flag in _EITHER:
            converted = _convert(flag, flag, v)
            t.add(f"source_{flag}", converted, "left")
            t.add(f"destination_{flag}", converted, "right")
        elif flag in _ONE_SIDED:
            field, kind = _ONE_SIDED[flag]
            t.add(field, _convert(kind, flag, v))
        elif flag == "uuid":
            t.add("uuid", v)
        elif flag == "node-name":
            t.add("node_name", v)
        elif flag == "node-label":
            t.add("node_labels", v)
        elif flag == "protocol":
            t.add("protocol", v)
        elif flag == "tcp-flags":
            t.add("tcp_flags", parse_tcp_flags(v, "--tcp-flags"))
        elif flag == "type":
            t.add("event_type", parse_event_type(v, "--type"))
        elif flag == "verdict":
            t.add("verdict", _enum_name(schema.Verdict, flag, v, _VERDICTS))
        elif flag == "drop-reason-desc":
            if not v:
                raise ObserveUsageError("empty --drop-reason-desc value")
            t.add("drop_reason_desc", _enum_name(schema.DropReason, flag, v))
        elif flag == "http-status":
            t.add("http_status_code", v)
        elif flag == "http-method":
            t.add("http_method", v)
        elif flag == "http-path":
            t.add("http_path", v)
        elif flag == "http-url":
            t.add("http_url", v)
        elif flag == "http-header":
            t.add("http_header", parse_http_header(v, "--http-header"))
        elif flag == "ipv4":
            t.add("ip_version", "IPv4")
        elif flag == "ipv6":
            t.add("ip_version", "IPv6")
        elif flag == "ip-version":
            if v.lower() not in _IP_VERSIONS:
                raise ObserveUsageError(f"invalid --ip-version value {v!r}: expected v4, v6 or none")
            t.add("ip_version", _IP_VERSIONS[v.lower()])
        elif flag == "namespace":
            t.ns.append(v)
        elif flag == "from-namespace":
            t.src_ns.append(v)
        elif flag == "to-namespace":
            t.dst_ns.append(v)
        elif flag == "all-namespaces":
            t.ns.append("")
        elif flag == "from-all-namespaces":
            t.src_ns.append("")
        elif flag == "to-all-namespaces":
            t.dst_ns.append("")
        elif flag == "traffic-direction":
            d = v.lower()
            if d not in ("ingress", "egress"):
                raise ObserveUsageError(f"{v}: invalid traffic direction, expected ingress or egress")
            t.add("traffic_direction", d.upper())
        elif flag == "interface":
            t.add("interface", parse_interface(v))
        else:  # pragma: no cover - the flag table and this switch are kept in sync
            raise ObserveUsageError(f"unknown filter flag --{flag}")
    except FilterError as e:
        raise ObserveUsageError(str(e)) from None
    t.check_namespace_conflicts(t.left)
    t.check_namespace_conflicts(t.right)


def build_filters(args: Iterable[tuple[str, Optional[str]]]) -> tuple[list[FlowFilter], list[FlowFilter]]:
    """(allowlist, denylist) from filter flags in command-line order, e.g.
    ``[("ip", "1.2.3.4"), ("not", None), ("verdict", "DROPPED")]``. Raises ObserveUsageError."""
    allow, deny = _Tracker(), _Tracker()
    deny_used = False
    blacklisting = False
    for flag, value in args:
        if flag not in _FILTER_FLAG_NAMES:
            raise ObserveUsageError(f"unknown filter flag --{flag}")
        if flag == "not":
            if blacklisting:
                raise ObserveUsageError("consecutive --not statements")
            blacklisting = True
            continue
        if blacklisting:
            blacklisting = False
            deny_used = True
            _set(deny, flag, value)
        else:
            _set(allow, flag, value)
    if blacklisting:
        raise ObserveUsageError("trailing --not found in the arguments")
    return allow.flow_filters(), (deny.flow_filters() if deny_used else [])


def filter_args_from_names(spec: Any) -> list[tuple[str, Optional[str]]]:
    """``build_filters`` arguments from a mapping of observe's filter names, as alert rules write them:
    ``{"verdict": ["DROPPED"], "to_label": ["app=api"], "ipv4": true, "not": {"protocol": "icmpv6"}}``
    (``_`` or ``-``; a list = alternatives; ``true`` for a flag without value; ``not`` = denylist).
    Raises ObserveUsageError naming the bad entry."""
    if not isinstance(spec, dict):
        raise ObserveUsageError(f"expected a mapping of filter names to values, got {type(spec).__name__}")
    out: list[tuple[str, Optional[str]]] = []
    for key, value in spec.items():
        flag = str(key).replace("_", "-")
        if flag == "not":
            for f, v in filter_args_from_names(value):
                out += [("not", None), (f, v)]
            continue
        if flag not in _FILTER_FLAG_NAMES:
            raise ObserveUsageError(f"unknown filter {key!r} (filters are observe's flags, e.g. verdict, "
                                    f"from_pod, to_label, to_port, http_status)")
        takes_value = next(t for f, _, t, _ in FILTER_FLAGS if f == flag)
        if not takes_value:
            if value is not True:
                raise ObserveUsageError(f"filter {key!r} takes no value: write {key}: true")
            out.append((flag, None))
            continue
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                raise ObserveUsageError(f"filter {key!r}: expected text or a number, got {v!r}")
            out.append((flag, str(v)))
    return out


def build_query(filter_args: Iterable[tuple[str, Optional[str]]], *, since: Optional[str] = None,
                until: Optional[str] = None, last: int = 0, first: int = 0, all_flows: bool = False,
                follow: bool = False, allowlist: Iterable[str] = (), denylist: Iterable[str] = (),
                offline: bool = False) -> FlowQuery:
    """The FlowQuery ``flowscope observe`` sends for these flags (Hubble's getFlowsRequest rules).
    With ``offline`` (``--input-file``) no default count applies: all matching lines are shown."""
    if first and last:
        raise ObserveUsageError("cannot set both --first and --last")
    if first and all_flows:
        raise ObserveUsageError("cannot set both --first and --all")
    if first and follow and not offline:
        raise ObserveUsageError("cannot set both --first and --follow")
    if last and all_flows:
        raise ObserveUsageError("cannot set both --last and --all")
    if until and follow and not offline:
        raise ObserveUsageError("--until cannot be combined with --follow")
    for name, value in (("since", since), ("until", until)):
        if value:
            try:
                parse_time(value)
            except TimeParseError as e:
                raise ObserveUsageError(f"--{name}: {e}") from None
    whitelist, blacklist = build_filters(filter_args)
    for flag, raws, target in (("allowlist", allowlist, whitelist), ("denylist", denylist, blacklist)):
        for raw in raws:
            try:
                target.append(msgspec.json.decode(raw.encode(), type=FlowFilter))
            except (msgspec.ValidationError, msgspec.DecodeError) as e:
                raise ObserveUsageError(f"invalid --{flag} flag {raw!r}: {e}") from None
    try:
        FilterSet(whitelist, blacklist)
    except FilterError as e:
        raise ObserveUsageError(f"invalid filter: {e}") from None
    number = first or last
    if all_flows:
        number = ALL_FLOWS
    elif not number and not since and not until and not first and not follow and not offline:
        number = DEFAULT_LAST
    return FlowQuery(whitelist=whitelist, blacklist=blacklist, since=since or None, until=until or None,
                     number=number, first=bool(first), follow=follow and not offline)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def _error_message(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()
    try:
        obj = json.loads(text)
    except ValueError:
        return text[:500] or "(empty response)"
    if isinstance(obj, dict):
        for key in ("detail", "error", "message"):
            if key in obj:
                detail = obj[key]
                if isinstance(detail, list):
                    parts = []
                    for d in detail:
                        if isinstance(d, dict):
                            loc = ".".join(str(x) for x in d.get("loc", []))
                            parts.append(f"{loc}: {d.get('msg', d)}" if loc else str(d.get("msg", d)))
                        else:
                            parts.append(str(d))
                    return "; ".join(parts)
                return str(detail)
    return text[:500]


def _server_error_in(obj: Any) -> Optional[str]:
    """An in-band error object from the server (``{"error": "..."}``), if this is one."""
    if isinstance(obj, dict) and "error" in obj and not any(
            k in obj for k in ("flow", "lost_events", "node_status")):
        err = obj["error"]
        if isinstance(err, dict):
            detail = err.get("detail") or err.get("message")
            if detail is not None:
                status = err.get("status")
                return f"{status}: {detail}" if status else str(detail)
        return err if isinstance(err, str) else json.dumps(err)
    return None


class _Sink:
    """Envelopes -> printer; bad lines are reported on stderr once each and skipped."""

    def __init__(self, printer: Printer, err: TextIO) -> None:
        self.printer = printer
        self.err = err
        self.skipped = 0

    def warn(self, msg: str) -> None:
        self.skipped += 1
        self.err.write(f"warning: {msg}\n")

    def line(self, raw: bytes) -> None:
        raw = raw.strip()
        if not raw:
            return
        try:
            obj = msgspec.json.decode(raw)
        except msgspec.DecodeError as e:
            self.warn(f"skipping a line that is not JSON: {e}")
            return
        self.obj(obj, raw)

    def obj(self, obj: Any, raw: Optional[bytes]) -> None:
        err = _server_error_in(obj)
        if err is not None:
            raise ObserveError(f"server error: {err}")
        try:
            env = decode_envelope(obj)
            self.printer.write(env, raw=raw)
        except (PrinterError, msgspec.ValidationError, ValueError) as e:
            self.warn(f"skipping an invalid envelope: {e}")


def _timeout(seconds: float) -> Any:
    import httpx

    return httpx.Timeout(connect=seconds, read=None, write=seconds, pool=seconds)


def run_query(server: str, query: FlowQuery, sink: _Sink, timeout: float) -> None:
    """POST the query and print the JSON lines as they arrive."""
    import httpx

    url = server.rstrip("/") + "/api/v1/flows/query"
    headers = {"content-type": "application/json", "accept": "application/x-ndjson", **auth_headers()}
    try:
        with httpx.Client(timeout=_timeout(timeout)) as client:
            with client.stream("POST", url, content=query_to_json(query), headers=headers) as resp:
                if resp.status_code >= 400:
                    body = resp.read()
                    raise ObserveError(f"server returned {resp.status_code}: {_error_message(body)}")
                buf = b""
                for chunk in resp.iter_bytes():
                    buf += chunk
                    if b"\n" not in chunk:
                        continue
                    lines = buf.split(b"\n")
                    buf = lines.pop()
                    for line in lines:
                        sink.line(line)
                    sink.printer.flush()
                if buf.strip():
                    sink.line(buf)
    except httpx.ConnectError as e:
        raise ObserveError(f"cannot connect to {server}: {_reason(e)}") from None
    except httpx.TimeoutException as e:
        raise ObserveError(f"timed out talking to {server}: {_reason(e)}") from None
    except httpx.HTTPError as e:
        raise ObserveError(f"request to {url} failed: {_reason(e)}") from None


def auth_headers() -> dict[str, str]:
    """``Authorization: Bearer $FLOWSCOPE_TOKEN`` when set (servers beyond loopback require a token)."""
    token = os.environ.get("FLOWSCOPE_TOKEN", "").strip()
    return {"authorization": f"Bearer {token}"} if token else {}


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    if not text and e.__cause__ is not None:
        text = str(e.__cause__)
    return text or type(e).__name__


def stream_url(server: str, query: FlowQuery) -> str:
    """``ws(s)://host/.../api/v1/flows/stream?<params>`` for a server URL."""
    parts = urlsplit(server.rstrip("/"))
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None:
        raise ObserveUsageError(f"invalid --server {server!r}: expected an http:// or https:// URL")
    path = parts.path + "/api/v1/flows/stream"
    return urlunsplit((scheme, parts.netloc, path, urlencode(query_to_params(query)), ""))


def run_follow(server: str, query: FlowQuery, sink: _Sink, timeout: float) -> None:
    """Stream from the websocket; every text frame is a JSON array of envelopes."""
    from websockets.exceptions import ConnectionClosedError, InvalidStatus, InvalidHandshake, InvalidURI
    from websockets.sync.client import connect

    url = stream_url(server, query)
    try:
        with connect(url, open_timeout=timeout, max_size=64 * 2**20, compression=None,
                     additional_headers=auth_headers()) as ws:
            for message in ws:
                data = message if isinstance(message, bytes) else message.encode()
                try:
                    obj = msgspec.json.decode(data)
                except msgspec.DecodeError as e:
                    sink.warn(f"skipping a frame that is not JSON: {e}")
                    continue
                if isinstance(obj, list):
                    for item in obj:
                        sink.obj(item, None)
                else:
                    sink.obj(obj, data)
                sink.printer.flush()
    except InvalidStatus as e:
        status = e.response.status_code
        raise ObserveError(f"server returned {status}: {_error_message(e.response.body or b'')}") from None
    except ConnectionClosedError as e:
        rcvd = e.rcvd
        detail = f" ({rcvd.code} {rcvd.reason})" if rcvd is not None and rcvd.reason else (
            f" ({rcvd.code})" if rcvd is not None else "")
        raise ObserveError(f"the server closed the stream{detail}") from None
    except (InvalidURI, InvalidHandshake) as e:
        raise ObserveError(f"cannot open {url}: {_reason(e)}") from None
    except TimeoutError:
        raise ObserveError(f"timed out connecting to {server}") from None
    except OSError as e:
        raise ObserveError(f"cannot connect to {server}: {e.strerror or _reason(e)}") from None


def _envelope_time_ns(env: dict[str, Any], flow: Optional[schema.Flow]) -> Optional[int]:
    t = env.get("time")
    if not t and flow is not None:
        t = flow.time
    if not t:
        return None
    try:
        return schema.parse_timestamp(t)
    except ValueError:
        return None


def run_input(stream: Iterable[bytes], query: FlowQuery, sink: _Sink) -> None:
    """Filter Hubble JSON lines locally: time range, filters, then first/last N."""
    try:
        resolved = query.resolve()
    except QueryError as e:
        raise ObserveUsageError(str(e)) from None
    match = resolved.filters.match
    number = query.number
    keep_last = number if (number and not query.first and number != ALL_FLOWS) else 0
    tail: collections.deque[tuple[dict[str, Any], bytes]] = collections.deque(maxlen=keep_last or None)
    printed = 0
    for lineno, raw in enumerate(stream, 1):
        raw = raw.strip()
        if not raw:
            continue
        try:
            env = decode_envelope(raw)
        except PrinterError as e:
            sink.warn(f"line {lineno}: {e}")
            continue
        flow = None
        if "flow" in env:
            try:
                flow = load_flow_lenient(env["flow"]) if isinstance(env["flow"], dict) else None
            except (msgspec.ValidationError, ValueError) as e:
                sink.warn(f"line {lineno}: invalid flow: {e}")
                continue
            if flow is None:
                sink.warn(f"line {lineno}: invalid flow: expected an object")
                continue
        elif "lost_events" not in env:
            continue
        t = _envelope_time_ns(env, flow)
        if t is not None and not resolved.in_range(t):
            continue
        if flow is not None:
            if not match(flow):
                continue
            env = dict(env, flow=flow)
        if keep_last:
            tail.append((env, raw))
            continue
        sink.printer.write(env, raw=raw)
        printed += 1
        if query.first and number and printed >= number:
            break
    for env, raw in tail:
        sink.printer.write(env, raw=raw)


# --------------------------------------------------------------------------------------------
# The click command
# --------------------------------------------------------------------------------------------

_ORDER_KEY = "flowscope.observe.filter_args"


def _dest(flag: str) -> str:
    return "filter_" + flag.replace("-", "_")


_DEST_TO_FLAG = {_dest(f[0]): f[0] for f in FILTER_FLAGS}


class _ObserveCommand(click.Command):
    """Records filter flags in command-line order (click groups values per option, which would
    lose where ``--not`` stood), and reports usage errors on one line."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            parser = self.make_parser(ctx)
            opts, _, order = parser.parse_args(args=list(args))
        except click.UsageError:
            return super().parse_args(ctx, args)  # reports the same error
        seen: dict[str, int] = collections.Counter()
        ordered: list[tuple[str, Optional[str]]] = []
        for param in order:
            flag = _DEST_TO_FLAG.get(param.name or "")
            if flag is None:
                continue
            index = seen[param.name]
            seen[param.name] += 1
            if param.count:  # type: ignore[attr-defined]
                ordered.append((flag, None))
            else:
                values = opts.get(param.name) or []
                ordered.append((flag, values[index] if index < len(values) else None))
        ctx.meta[_ORDER_KEY] = ordered
        return super().parse_args(ctx, args)

    def make_context(self, info_name: Optional[str], args: list[str], parent: Optional[click.Context] = None,
                     **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:
            e.ctx = None  # one line: "Error: ..."
            raise


def _filter_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for flag, short, takes_value, help_text in reversed(FILTER_FLAGS):
        decls = [f"--{flag}"] + ([f"-{short}"] if short else []) + [_dest(flag)]
        if takes_value:
            f = click.option(*decls, multiple=True, metavar="TEXT", help=help_text)(f)
        else:
            f = click.option(*decls, count=True, help=help_text)(f)
    return f


def _use_color(choice: str, out: TextIO) -> bool:
    if choice == "always":
        return True
    if choice == "never":
        return False
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False


def _fail(msg: str, code: int) -> None:
    click.echo(f"Error: {msg}", err=True)
    raise click.exceptions.Exit(code)


def _lines_of(path: str) -> Iterator[bytes]:
    if path == "-":
        yield from sys.stdin.buffer
        return
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise ObserveUsageError(f"cannot read --input-file {path}: {e.strerror}") from None
    with fh:
        yield from fh


@click.command("observe", cls=_ObserveCommand, context_settings={"help_option_names": ["-h", "--help"]},
               epilog="Filters: values of one flag are OR'd, different flags AND'd; --not negates the "
                      "next filter flag. Example: flowscope observe --namespace shop --not --verdict "
                      "FORWARDED --since 1h")
@click.option("--since", metavar="TIME", help="Flows since this time: relative (30s, 5m, 1h30m, 2d) or "
                                              "absolute (2024-11-27T06:00:00Z, 2024-11-27, unix seconds)")
@click.option("--until", metavar="TIME", help="Flows until this time (same formats as --since)")
@click.option("--last", type=click.IntRange(min=0), default=0, help=f"The newest N flows (default {DEFAULT_LAST})")
@click.option("--first", type=click.IntRange(min=0), default=0, help="The oldest N flows")
@click.option("--all", "all_flows", is_flag=True, help="All stored flows (use with filters)")
@click.option("--follow", "-f", is_flag=True, help="Keep streaming new flows")
@click.option("--output", "-o", type=click.Choice(OUTPUT_FORMATS), default="compact", show_default=True,
              help="Output format")
@click.option("--server", envvar="FLOWSCOPE_SERVER", default=DEFAULT_SERVER, show_default=True,
              help="Flowscope server URL (env FLOWSCOPE_SERVER)")
@click.option("--input-file", metavar="FILE", help="Read Hubble JSON lines from FILE ('-' = stdin) and filter "
                                                   "them locally instead of asking a server")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              help="Seconds to wait for the server to accept the connection")
@click.option("--color", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              help="Colorize compact and dict output")
@click.option("--print-node-name", is_flag=True, help="Show the node name of each flow")
@click.option("--numeric", is_flag=True, help="Show IP addresses instead of pod, service or DNS names")
@click.option("--time-format", type=click.Choice(TIME_FORMATS), default="StampMilli", show_default=True,
              help="Timestamp format")
@click.option("--print-policy-names", is_flag=True, help="Show the policies that allowed or denied a flow")
@click.option("--print-raw-filters", is_flag=True, help="Print the query that would be sent (JSON) and exit")
@click.option("--allowlist", multiple=True, metavar="JSON", help="An allowlist FlowFilter as JSON (repeatable)")
@click.option("--denylist", multiple=True, metavar="JSON", help="A denylist FlowFilter as JSON (repeatable)")
@_filter_options
@click.pass_context
def observe_command(ctx: click.Context, since: Optional[str], until: Optional[str], last: int, first: int,
                    all_flows: bool, follow: bool, output: str, server: str, input_file: Optional[str],
                    timeout: float, color: str, print_node_name: bool, numeric: bool, time_format: str,
                    print_policy_names: bool, print_raw_filters: bool, allowlist: tuple[str, ...],
                    denylist: tuple[str, ...], **_filters: Any) -> None:
    """Observe flows of a Flowscope server (or of a file of Hubble JSON lines), like hubble observe."""
    filter_args = ctx.meta.get(_ORDER_KEY, [])
    offline = input_file is not None
    try:
        if output == "table" and follow and not offline:
            raise ObserveUsageError("table output format is not compatible with follow mode")
        query = build_query(filter_args, since=since, until=until, last=last, first=first,
                            all_flows=all_flows, follow=follow, allowlist=allowlist, denylist=denylist,
                            offline=offline)
    except ObserveUsageError as e:
        _fail(str(e), 2)
        return
    if print_raw_filters:
        click.echo(query_to_json(query).decode())
        return

    out = sys.stdout
    printer = Printer(output, out=out, err=sys.stderr, color=_use_color(color, out),
                      node_name=print_node_name, ip_translation=not numeric,
                      policy_names=print_policy_names, time_format=time_format)
    sink = _Sink(printer, sys.stderr)
    try:
        if offline:
            run_input(_lines_of(input_file or "-"), query, sink)
        elif query.follow:
            run_follow(server, query, sink, timeout)
        else:
            run_query(server, query, sink, timeout)
        printer.close()
    except KeyboardInterrupt:
        _quiet_close(printer)
        raise click.exceptions.Exit(0)
    except BrokenPipeError:
        _silence_stdout()
        raise click.exceptions.Exit(0)
    except ObserveUsageError as e:
        _quiet_close(printer)
        _fail(str(e), 2)
    except ObserveError as e:
        _quiet_close(printer)
        _fail(str(e), 1)


def query_from_argv(argv: list[str]) -> FlowQuery:
    """The FlowQuery of ``flowscope observe ARGV``, parsed by the command itself (the dashboard's filter
    bar): ``["--to-pod", "default/api", "--verdict", "DROPPED", "--since", "1h"]``. Output and connection
    options are accepted and ignored. Pure; raises ObserveUsageError with the CLI's message."""
    if any(a in ("-h", "--help") for a in argv):
        raise ObserveUsageError("--help is not a filter")
    try:
        with observe_command.make_context("flowscope observe", list(argv)) as ctx:
            p = ctx.params
            return build_query(ctx.meta.get(_ORDER_KEY, []), since=p["since"], until=p["until"], last=p["last"],
                               first=p["first"], all_flows=p["all_flows"], follow=p["follow"],
                               allowlist=p["allowlist"], denylist=p["denylist"])
    except click.UsageError as e:
        raise ObserveUsageError(e.format_message()) from None


def _quiet_close(printer: Printer) -> None:
    try:
        printer.close()
    except (BrokenPipeError, OSError, ValueError):
        _silence_stdout()


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def main() -> None:  # pragma: no cover - `python -m flowscope.observe`
    observe_command(prog_name="flowscope observe")


if __name__ == "__main__":  # pragma: no cover
    main()
