"""Turn :func:`flowscope.filters.sql_pushdown` hints into a SQL condition on the ``flows`` table.

The condition only narrows: a row it rejects is a row ``FilterSet.match`` would reject. Hint keys this
schema has no column for are skipped (dropping an ANDed term only widens the set), and then the result
is not exact. When every allowlist entry is exact and fully translated, and there is no denylist, SQL
alone decides and the store skips decoding each row for ``match``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Optional

from sqlalchemy import and_, func, or_
from sqlalchemy.sql.elements import ColumnElement

from flowscope.filters import FilterSet, sql_pushdown

from .db import flows_table

_t = flows_table.c

_SIMPLE = {
    "uuid": _t.uuid,
    "verdict": _t.verdict,
    "traffic_direction": _t.traffic_direction,
    "source_port": _t.src_port,
    "destination_port": _t.dst_port,
    "source_identity": _t.src_identity,
    "destination_identity": _t.dst_identity,
}
_L4 = {"TCP": "tcp", "UDP": "udp", "SCTP": "sctp", "ICMPv4": "icmpv4", "ICMPv6": "icmpv6"}


def canonical_ip(text: str) -> str:
    """The address as stored in ``src_ip``/``dst_ip``: IPv6 compressed lower-case, IPv4 as given."""
    if ":" not in text:
        return text
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _pods(ns_col: Any, pod_col: Any, pairs: list[list[str]]) -> ColumnElement[bool]:
    alts = []
    for ns, prefix in pairs:
        parts = []
        if ns:
            parts.append(ns_col == ns)
        if prefix:
            parts.append(pod_col.like(_like_prefix(prefix), escape="\\"))
        if not parts:
            return _t.id.is_not(None)  # matches anything
        alts.append(and_(*parts))
    return or_(*alts)


def _term(key: str, values: list[Any]) -> Optional[ColumnElement[bool]]:
    """The SQL for one hint key, or None when this schema cannot express it."""
    col = _SIMPLE.get(key)
    if col is not None:
        return col.in_(values)
    if key == "drop_reason_desc":  # stored as '' for DROP_REASON_UNKNOWN
        return _t.drop_reason.in_(["" if v == "DROP_REASON_UNKNOWN" else v for v in values])
    if key == "source_ip":
        return _t.src_ip.in_([canonical_ip(v) for v in values])
    if key == "destination_ip":
        return _t.dst_ip.in_([canonical_ip(v) for v in values])
    if key == "source_pod":
        return _pods(_t.src_namespace, _t.src_pod, values)
    if key == "destination_pod":
        return _pods(_t.dst_namespace, _t.dst_pod, values)
    if key == "l4_protocol":
        return _t.protocol.in_([_L4[v] for v in values if v in _L4])
    if key == "node_name":
        return func.lower(_t.node_name).in_(values)
    return None


def _indexed(key: str, values: list[Any]) -> bool:
    """Whether a hint key restricts a column that leads one of the (column, time_ns) indexes."""
    if key in ("verdict", "drop_reason_desc"):
        return True
    if key in ("source_pod", "destination_pod"):
        return all(ns for ns, _ in values)
    return False


@dataclass(frozen=True)
class Narrowing:
    """SQL narrowing for a FilterSet.

    * ``alternatives``: one condition per allowlist filter (a row passes if it meets any), or None when
      SQL cannot narrow;
    * ``exact``: the alternatives alone decide ``FilterSet.match`` (no Python check needed);
    * ``indexed``: every alternative restricts an indexed column, so scanning each alternative on its own
      index and merging the streams by time beats one scan (which SQLite would answer with a union of
      the indexes plus a sort of every match).
    """

    alternatives: Optional[list[ColumnElement[bool]]]
    exact: bool
    indexed: bool = False

    @property
    def condition(self) -> Optional[ColumnElement[bool]]:
        if not self.alternatives:
            return None
        return self.alternatives[0] if len(self.alternatives) == 1 else or_(*self.alternatives)


def narrow(filterset: FilterSet) -> Narrowing:
    if filterset.matches_all:
        return Narrowing(None, True)
    hints = sql_pushdown(filterset)["allowlist"]
    if not hints:
        return Narrowing(None, False)
    alts = []
    exact = not filterset.blacklist
    indexed = True
    for entry in hints:
        terms = []
        entry_indexed = False
        for key, values in entry["conditions"].items():
            term = _term(key, values)
            if term is None:
                exact = False
            else:
                terms.append(term)
                entry_indexed = entry_indexed or _indexed(key, values)
        if not terms:
            return Narrowing(None, False)
        exact = exact and bool(entry["exact"])
        indexed = indexed and entry_indexed
        alts.append(and_(*terms))
    return Narrowing(alts, exact, indexed)


def narrowing_exact(filterset: FilterSet) -> tuple[Optional[ColumnElement[bool]], bool]:
    """``(condition or None, exact)``: ``exact`` means the condition alone decides ``filterset.match``."""
    n = narrow(filterset)
    return n.condition, n.exact
