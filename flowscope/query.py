"""The flow query: which flows (filters) and which part of history (time range, count, follow).

One model, three spellings:

* JSON, the body of ``POST /api/v1/flows/query`` (:func:`query_from_json`), shaped like Hubble's
  ``GetFlowsRequest``: ``{"whitelist": [FlowFilter...], "blacklist": [...], "since": "5m",
  "until": "2024-11-27T06:00:00Z", "number": 100, "first": false, "follow": false}``
  (``allowlist``/``denylist`` are accepted as aliases);
* URL query parameters for ``GET /api/v1/flows`` and ``WS /api/v1/flows/stream``
  (:func:`query_from_params` / :func:`query_to_params`):

  - every FlowFilter field is a parameter of the same name; repeat it for alternatives (OR):
    ``?verdict=DROPPED&verdict=ERROR&destination_port=53``. Together they form one allowlist filter;
  - the same names prefixed ``not_`` form one denylist filter: ``?not_verdict=FORWARDED``;
  - structured fields as text: ``tcp_flags=SYN,ACK`` (all of them), ``event_type=1``, ``1:133``,
    ``trace:to-endpoint``, ``l7``; ``http_header=name:value``; ``source_workload=kind/name`` or
    ``name``; ``interface=eth0`` or ``3`` (index); ``reply=true``; identities as numbers or
    reserved names (``world``);
  - ``whitelist=<FlowFilter JSON>`` / ``blacklist=<FlowFilter JSON>`` (repeatable) add whole
    filters, for queries with several allowlist filters (``hubble observe --ip`` makes two);
  - ``since``, ``until``; ``last=N`` (newest N), ``first=N`` (oldest N), ``number=N``; ``follow``;
* the ``flowscope observe`` flags (see :mod:`flowscope.observe`).

:meth:`FlowQuery.resolve` applies Hubble's defaults: no since/until and no number -> the last 20
flows; since/until given and no number -> every flow in the range; ``follow`` without number or since
-> no history, only new flows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional, Union

import msgspec

from flowscope.filters import (
    FILTER_FIELDS,
    FilterError,
    FilterSet,
    FlowFilter,
    format_event_type,
    format_tcp_flags,
    parse_bool,
    parse_event_type,
    parse_http_header,
    parse_identity,
    parse_interface,
    parse_tcp_flags,
    parse_workload,
)
from flowscope.timeparse import TimeParseError, parse_time

__all__ = [
    "QueryError",
    "FlowQuery",
    "ResolvedQuery",
    "DEFAULT_LAST",
    "query_from_json",
    "query_from_params",
    "query_to_params",
    "query_to_json",
    "PARAM_NAMES",
]

DEFAULT_LAST = 20
"""Flows returned when a query names neither a count nor a time range (Hubble's default)."""


class QueryError(ValueError):
    """An invalid query; the message says what is wrong and what is accepted."""


TimeText = Optional[Union[str, int, float]]


class FlowQuery(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True, repr_omit_defaults=True):
    """A flow query as the client sends it; ``since``/``until`` are kept as given (RFC 3339,
    relative like ``5m``, or unix seconds) and resolved against a clock by :meth:`resolve`."""

    whitelist: list[FlowFilter] = []
    blacklist: list[FlowFilter] = []
    since: TimeText = None
    until: TimeText = None
    number: int = 0
    first: bool = False
    follow: bool = False

    def resolve(self, now_ns: Optional[int] = None) -> "ResolvedQuery":
        """Absolute times, the effective limit and the compiled filters. Raises QueryError."""
        if now_ns is None:
            now_ns = time.time_ns()
        if isinstance(self.number, bool) or not isinstance(self.number, int) or self.number < 0:
            raise QueryError(f"number must be a non-negative integer, got {self.number!r}")
        since_ns = _resolve_time("since", self.since, now_ns)
        until_ns = _resolve_time("until", self.until, now_ns)
        if since_ns is not None and until_ns is not None and since_ns > until_ns:
            raise QueryError(f"since ({self.since}) is after until ({self.until})")
        if self.first and self.follow:
            raise QueryError("first and follow cannot be combined (first reads the oldest flows)")
        if self.follow and until_ns is not None:
            raise QueryError("until cannot be combined with follow")
        if self.number > 0:
            limit: Optional[int] = self.number
        elif since_ns is not None or until_ns is not None:
            limit = None
        elif self.follow:
            limit = 0
        else:
            limit = DEFAULT_LAST
        try:
            filters = FilterSet(self.whitelist, self.blacklist)
        except FilterError as e:
            raise QueryError(f"invalid filter: {e}") from None
        return ResolvedQuery(since_ns=since_ns, until_ns=until_ns, limit=limit, first=self.first,
                             follow=self.follow, filters=filters)


def _resolve_time(name: str, value: TimeText, now_ns: int) -> Optional[int]:
    if value is None or value == "":
        return None
    try:
        return parse_time(value, now_ns)
    except TimeParseError as e:
        raise QueryError(f"{name}: {e}") from None


@dataclass(frozen=True)
class ResolvedQuery:
    """A query ready to run.

    * ``since_ns``/``until_ns``: inclusive bounds on the flow time, or None (open).
    * ``limit``: how many stored flows to return: None = all in the range, 0 = none (follow only),
      N = the newest N (``first`` false) or the oldest N (``first`` true). Results are always
      returned oldest first.
    * ``follow``: after the history, keep streaming new flows that match.
    * ``filters``: the compiled allowlist/denylist; ``filters.match(flow)``.
    """

    since_ns: Optional[int]
    until_ns: Optional[int]
    limit: Optional[int]
    first: bool
    follow: bool
    filters: FilterSet

    def in_range(self, time_ns: int) -> bool:
        return (self.since_ns is None or time_ns >= self.since_ns) and (
            self.until_ns is None or time_ns <= self.until_ns)


# --------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------

_QUERY_FIELDS = FlowQuery.__struct_fields__
_ALIASES = {"allowlist": "whitelist", "denylist": "blacklist"}
_json_encoder = msgspec.json.Encoder()


def _explain(e: msgspec.ValidationError) -> str:
    msg = str(e)
    if "unknown field" in msg:
        if "$.whitelist[" in msg or "$.blacklist[" in msg:
            return f"{msg}; valid filter fields: {', '.join(FILTER_FIELDS)}"
        return f"{msg}; valid query fields: {', '.join(_QUERY_FIELDS)}"
    return msg


def query_from_json(body: Union[bytes, str]) -> FlowQuery:
    """Parse and validate the JSON body of ``POST /api/v1/flows/query``. Raises QueryError."""
    if isinstance(body, str):
        body = body.encode()
    if not body.strip():
        obj: Any = {}
    else:
        try:
            obj = msgspec.json.decode(body)
        except msgspec.DecodeError as e:
            raise QueryError(f"invalid JSON body: {e}") from None
        except RecursionError:  # found by tests/test_reliability_badinput.py (issue 8)
            raise QueryError("invalid JSON body: nested too deeply") from None
    if not isinstance(obj, dict):
        raise QueryError(f"the query must be a JSON object, got {type(obj).__name__}")
    for alias, name in _ALIASES.items():
        if alias in obj:
            if name in obj:
                raise QueryError(f"give either {name} or {alias}, not both")
            obj[name] = obj.pop(alias)
    try:
        q = msgspec.convert(obj, FlowQuery)
    except msgspec.ValidationError as e:
        raise QueryError(f"invalid query: {_explain(e)}") from None
    validate(q)
    return q


def query_to_json(q: FlowQuery) -> bytes:
    return _json_encoder.encode(q)


def validate(q: FlowQuery, now_ns: Optional[int] = None) -> None:
    """Raise QueryError now for anything :meth:`FlowQuery.resolve` would reject."""
    q.resolve(now_ns)


# --------------------------------------------------------------------------------------------
# URL parameters
# --------------------------------------------------------------------------------------------

_CONTROL_PARAMS = ("since", "until", "last", "first", "number", "follow", "whitelist", "blacklist")
PARAM_NAMES: tuple[str, ...] = _CONTROL_PARAMS + FILTER_FIELDS + tuple(f"not_{f}" for f in FILTER_FIELDS)
"""Every accepted URL parameter name."""

_IDENTITY_FIELDS = {"source_identity", "destination_identity"}
_WORKLOAD_FIELDS = {"source_workload", "destination_workload"}


def _param_value(field: str, text: str, name: str) -> Any:
    if field in _IDENTITY_FIELDS:
        return parse_identity(text, name)
    if field in _WORKLOAD_FIELDS:
        return parse_workload(text)
    if field == "event_type":
        return parse_event_type(text, name)
    if field == "http_header":
        return parse_http_header(text, name)
    if field == "tcp_flags":
        return parse_tcp_flags(text, name)
    if field == "interface":
        return parse_interface(text)
    if field == "reply":
        return parse_bool(text, name)
    return text


def _parse_count(name: str, text: str) -> int:
    s = text.strip()
    if not s.isdigit():
        raise QueryError(f"{name}: expected a non-negative integer, got {text!r}")
    return int(s)


def _unknown_param(name: str) -> QueryError:
    return QueryError(
        f"unknown query parameter {name!r}; valid parameters: {', '.join(_CONTROL_PARAMS)}, and the "
        f"filter fields {', '.join(FILTER_FIELDS)} (each also with a not_ prefix for the denylist)")


def _filter_from_json_param(name: str, text: str) -> FlowFilter:
    try:
        return msgspec.json.decode(text.encode(), type=FlowFilter)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        msg = str(e)
        if "unknown field" in msg:
            msg += f"; valid filter fields: {', '.join(FILTER_FIELDS)}"
        raise QueryError(f"{name}: invalid FlowFilter JSON: {msg}") from None


def query_from_params(items: list[tuple[str, str]]) -> FlowQuery:
    """A FlowQuery from URL query parameters (see the module doc). Raises QueryError."""
    allow: dict[str, list[Any]] = {}
    deny: dict[str, list[Any]] = {}
    extra_allow: list[FlowFilter] = []
    extra_deny: list[FlowFilter] = []
    scalars: dict[str, Any] = {}
    count_from: Optional[str] = None

    def set_once(key: str, value: Any, name: str) -> None:
        if key in scalars:
            raise QueryError(f"parameter {name!r} given more than once")
        scalars[key] = value

    for name, value in items:
        value = "" if value is None else str(value)
        if name in ("since", "until"):
            set_once(name, value, name)
        elif name in ("last", "number"):
            if count_from is not None:
                raise QueryError(f"give only one of last, first, number (got {count_from} and {name})")
            count_from = name
            set_once("number", _parse_count(name, value), name)
        elif name == "first":
            s = value.strip()
            if s.isdigit():
                if count_from is not None:
                    raise QueryError(f"give only one of last, first, number (got {count_from} and first)")
                count_from = "first"
                set_once("number", int(s), name)
                scalars["first"] = True
            else:
                try:
                    scalars["first"] = parse_bool(s, "first")
                except FilterError:
                    raise QueryError(f"first: expected a count or true/false, got {value!r}") from None
        elif name == "follow":
            try:
                set_once("follow", parse_bool(value, "follow"), name)
            except FilterError as e:
                raise QueryError(str(e)) from None
        elif name == "whitelist":
            extra_allow.append(_filter_from_json_param(name, value))
        elif name == "blacklist":
            extra_deny.append(_filter_from_json_param(name, value))
        else:
            target = allow
            field = name
            if name.startswith("not_"):
                target, field = deny, name[4:]
            if field not in FILTER_FIELDS:
                raise _unknown_param(name)
            try:
                target.setdefault(field, []).append(_param_value(field, value, name))
            except FilterError as e:
                raise QueryError(str(e)) from None

    whitelist = ([FlowFilter(**allow)] if allow else []) + extra_allow
    blacklist = ([FlowFilter(**deny)] if deny else []) + extra_deny
    if scalars.get("first") and count_from == "last":
        raise QueryError("give only one of last and first")
    q = FlowQuery(whitelist=whitelist, blacklist=blacklist, since=scalars.get("since") or None,
                  until=scalars.get("until") or None, number=scalars.get("number", 0),
                  first=bool(scalars.get("first", False)), follow=bool(scalars.get("follow", False)))
    validate(q)
    return q


def _flat_values(field: str, values: list[Any]) -> Optional[list[str]]:
    """Text forms of a filter field's values, or None if some value has no lossless text form."""
    out = []
    for v in values:
        if field in _WORKLOAD_FIELDS:
            if v.kind or "/" in v.name:
                out.append(f"{v.kind}/{v.name}")
            elif v.name:
                out.append(v.name)
            else:
                return None
        elif field == "event_type":
            out.append(format_event_type(v))
        elif field == "http_header":
            if ":" in v.key:
                return None
            out.append(f"{v.key}:{v.value}")
        elif field == "tcp_flags":
            text = format_tcp_flags(v)
            if not text:
                return None
            out.append(text)
        elif field == "interface":
            if v.index and not v.name:
                out.append(str(v.index))
            elif v.name and not v.index and not v.name.isdigit():
                out.append(v.name)
            else:
                return None
        elif field == "reply":
            out.append("true" if v else "false")
        else:
            out.append(str(v))
    return out


def _flat_filter(ff: FlowFilter) -> Optional[list[tuple[str, str]]]:
    if ff.is_empty():
        return None
    out: list[tuple[str, str]] = []
    for field in FILTER_FIELDS:
        values = getattr(ff, field)
        if not values:
            continue
        texts = _flat_values(field, values)
        if texts is None:
            return None
        out.extend((field, t) for t in texts)
    return out


def query_to_params(q: FlowQuery) -> list[tuple[str, str]]:
    """URL parameters for a query (inverse of :func:`query_from_params`): a single allowlist or
    denylist filter is spelled as flat fields, anything else as ``whitelist=``/``blacklist=`` JSON."""
    params: list[tuple[str, str]] = []
    flat_allow = _flat_filter(q.whitelist[0]) if len(q.whitelist) == 1 else None
    if flat_allow is not None:
        params.extend(flat_allow)
    else:
        params.extend(("whitelist", _json_encoder.encode(f).decode()) for f in q.whitelist)
    flat_deny = _flat_filter(q.blacklist[0]) if len(q.blacklist) == 1 else None
    if flat_deny is not None:
        params.extend((f"not_{k}", v) for k, v in flat_deny)
    else:
        params.extend(("blacklist", _json_encoder.encode(f).decode()) for f in q.blacklist)
    if q.since not in (None, ""):
        params.append(("since", str(q.since)))
    if q.until not in (None, ""):
        params.append(("until", str(q.until)))
    if q.number:
        params.append(("first" if q.first else "last", str(q.number)))
    elif q.first:
        params.append(("first", "true"))
    if q.follow:
        params.append(("follow", "true"))
    return params
