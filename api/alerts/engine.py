"""The alert evaluator: sliding windows per rule and group, and the alert state machine (pure).

Flows are *offered* (with the time they happened) and the evaluator is *evaluated* at a time; nothing
here reads a clock, a database or the network, so every behaviour is a unit test.

Windows are kept in buckets (1/50 of the window, at least 10 ms): memory per group is bounded whatever
the flow rate, and a flow counts until its bucket has left the window (granularity: one bucket).
Quantiles use up to 256 latency samples per bucket (reservoir sampling beyond that).

State per group, as Prometheus does it: ``inactive`` → condition holds → ``pending`` (for ``for``) →
``firing`` (one notification) → condition clears → resolved notification → ``inactive``. While firing,
``repeat_interval`` (if set) sends the firing notification again. A storm of matching flows is one
alert per group; groups per rule are capped (``max_groups``; the rest share one overflow group).
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from flowscope import schema
from flowscope.filters import FilterSet

from .rules import Rule

INACTIVE, PENDING, FIRING = "inactive", "pending", "firing"
RESOLVED = "resolved"
OVERFLOW = "__overflow__"
MAX_SAMPLES = 5
_BUCKETS = 50
_VALUES_PER_BUCKET = 256
MAX_EDGES = 100_000


@dataclass
class Notification:
    """One thing to tell the receiver. ``key`` identifies it for de-duplication (stable across restarts)."""

    rule: str
    group: str
    group_labels: dict[str, str]
    state: str                       # firing | resolved
    value: Optional[float]
    stats: dict[str, Any]
    started_ns: int
    ended_ns: int
    now_ns: int
    episode: int
    repeat: int
    samples: list[bytes]

    @property
    def key(self) -> str:
        return f"{self.rule}|{self.group}|{self.started_ns}|{self.state}|{self.repeat}"


class Window:
    """Counts (and latency samples) of the flows of one group in a sliding window."""

    __slots__ = ("window_ns", "width", "buckets", "count", "hits", "_rng")

    def __init__(self, window_ns: int) -> None:
        self.window_ns = window_ns
        self.width = max(window_ns // _BUCKETS, 10_000_000)
        self.buckets: deque[list[Any]] = deque()  # [start_ns, count, hits, values, seen_values]
        self.count = 0
        self.hits = 0
        self._rng = random.Random(window_ns)

    def add(self, t_ns: int, hit: bool = False, value: Optional[float] = None) -> None:
        start = t_ns - t_ns % self.width
        b = None
        bs = self.buckets
        if bs and bs[-1][0] == start:
            b = bs[-1]
        elif not bs or bs[-1][0] < start:
            b = [start, 0, 0, [], 0]
            bs.append(b)
        else:  # out of order: find or insert its bucket
            for i in range(len(bs) - 1, -1, -1):
                if bs[i][0] == start:
                    b = bs[i]
                    break
                if bs[i][0] < start:
                    b = [start, 0, 0, [], 0]
                    bs.insert(i + 1, b)
                    break
            if b is None:
                b = [start, 0, 0, [], 0]
                bs.appendleft(b)
        b[1] += 1
        self.count += 1
        if hit:
            b[2] += 1
            self.hits += 1
        if value is not None:
            b[4] += 1
            vals = b[3]
            if len(vals) < _VALUES_PER_BUCKET:
                vals.append(value)
            else:
                j = self._rng.randrange(b[4])
                if j < _VALUES_PER_BUCKET:
                    vals[j] = value

    def prune(self, now_ns: int) -> None:
        edge = now_ns - self.window_ns
        bs = self.buckets
        while bs and bs[0][0] + self.width <= edge:
            b = bs.popleft()
            self.count -= b[1]
            self.hits -= b[2]

    def values(self) -> list[float]:
        out: list[float] = []
        for b in self.buckets:
            out.extend(b[3])
        return out

    def empty(self) -> bool:
        return not self.buckets


@dataclass
class Group:
    key: str
    labels: dict[str, str]
    window: Window
    state: str = INACTIVE
    since_ns: int = 0                # pending since / firing since
    last_notified_ns: int = 0
    episode: int = 0
    repeat: int = 0
    value: Optional[float] = None
    samples: deque = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))


# --------------------------------------------------------------------------------------------
# Group keys and edges
# --------------------------------------------------------------------------------------------


def _app_label(ep: Optional[schema.Endpoint]) -> str:
    if ep is None:
        return ""
    for lab in ep.labels:
        for key in ("k8s:app=", "app=", "k8s:app.kubernetes.io/name=", "app.kubernetes.io/name="):
            if lab.startswith(key):
                return lab[len(key):]
    return ""


def workload_of(ep: Optional[schema.Endpoint], ip: str) -> str:
    """A stable name for the workload at one end of a flow: ``ns/workload`` (workload, app label or pod),
    a reserved entity (``world``, ``host``...) or the IP."""
    if ep is not None:
        name = ep.workloads[0].name if ep.workloads else (_app_label(ep) or ep.pod_name)
        if ep.namespace and name:
            return f"{ep.namespace}/{name}"
        for lab in ep.labels:
            if lab.startswith("reserved:"):
                return lab[len("reserved:"):].split("=", 1)[0]
        if name:
            return name
    return ip or "unknown"


def _field(flow: schema.Flow, name: str) -> str:
    src, dst = flow.source, flow.destination
    if name == "source_namespace":
        return src.namespace if src is not None else ""
    if name == "destination_namespace":
        return dst.namespace if dst is not None else ""
    if name == "source_pod":
        return f"{src.namespace}/{src.pod_name}" if src is not None and src.pod_name else ""
    if name == "destination_pod":
        return f"{dst.namespace}/{dst.pod_name}" if dst is not None and dst.pod_name else ""
    ip = flow.IP
    if name == "source_workload":
        return workload_of(src, ip.source if ip is not None else "")
    if name == "destination_workload":
        return workload_of(dst, ip.destination if ip is not None else "")
    l4 = flow.l4
    if name == "destination_port":
        if l4 is not None:
            for p in (l4.TCP, l4.UDP, l4.SCTP):
                if p is not None:
                    return str(p.destination_port)
        return ""
    if name == "protocol":
        if l4 is not None:
            for pname in ("TCP", "UDP", "SCTP", "ICMPv4", "ICMPv6"):
                if getattr(l4, pname) is not None:
                    return pname.lower()
        return ""
    if name == "verdict":
        return flow.verdict.value
    if name == "drop_reason":
        d = flow.drop_reason_desc.value
        return "" if d == "DROP_REASON_UNKNOWN" else d
    if name == "node_name":
        return flow.node_name
    if name == "traffic_direction":
        return flow.traffic_direction.value
    raise KeyError(name)  # pragma: no cover - rules are validated


def edge_of(flow: schema.Flow) -> tuple[str, str]:
    ip = flow.IP
    return (workload_of(flow.source, ip.source if ip is not None else ""),
            workload_of(flow.destination, ip.destination if ip is not None else ""))


def _latency_ms(flow: schema.Flow) -> Optional[float]:
    l7 = flow.l7
    if l7 is None:
        return None
    ns = int(l7.latency_ns)
    return ns / 1e6 if ns > 0 else None


def _quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    idx = max(0, min(len(s) - 1, int(-(-q * len(s) // 1)) - 1))  # nearest rank
    return s[idx]


# --------------------------------------------------------------------------------------------
# One rule
# --------------------------------------------------------------------------------------------


class RuleEvaluator:
    """The windows and alert states of one rule."""

    def __init__(self, rule: Rule, filters: Optional[FilterSet] = None, of: Optional[FilterSet] = None) -> None:
        self.rule = rule
        self.filters = filters if filters is not None else rule.filterset()
        self.match = None if self.filters.matches_all else self.filters.match
        self.of = of if of is not None else rule.of_filterset()
        self.groups: dict[str, Group] = {}
        self.edges: dict[str, int] = {}          # new_edge: edge key -> first seen (ns)
        self.new_edges: list[tuple[str, int]] = []  # not yet persisted
        self.dirty: set[str] = set()            # groups whose persisted state changed
        self.edges_capped = False

    # ---- input ---------------------------------------------------------------------------

    def _group(self, key: str, labels: dict[str, str]) -> Group:
        g = self.groups.get(key)
        if g is None:
            if len(self.groups) >= self.rule.max_groups and key != OVERFLOW:
                return self._group(OVERFLOW, {"group": "overflow"})
            g = self.groups[key] = Group(key, labels, Window(self.rule.condition.window_ns))
        return g

    def offer(self, flow: schema.Flow, t_ns: int, now_ns: int, body: Optional[bytes] = None) -> bool:
        """Count one flow (``t_ns``: when it happened; later than ``now_ns`` counts as now; older than the
        window is ignored). Returns whether it matched the rule."""
        match = self.match
        if match is not None and not match(flow):
            return False
        cond = self.rule.condition
        if t_ns > now_ns or t_ns <= 0:
            t_ns = now_ns
        if t_ns <= now_ns - cond.window_ns:
            return True
        kind = cond.kind
        if kind == "new_edge":
            src, dst = edge_of(flow)
            key = f"{src} -> {dst}"
            if key in self.edges:
                return True
            if len(self.edges) >= MAX_EDGES:
                self.edges_capped = True
                return True
            self.edges[key] = t_ns
            self.new_edges.append((key, t_ns))
            g = self._group(key, {"source": src, "destination": dst})
            g.window.add(t_ns)
        else:
            if self.rule.group_by:
                labels = {name: _field(flow, name) for name in self.rule.group_by}
                key = ",".join(f"{k}={v}" for k, v in labels.items())
            else:
                labels, key = {}, ""
            g = self._group(key, labels)
            if kind == "count":
                g.window.add(t_ns)
            elif kind == "ratio":
                g.window.add(t_ns, hit=self.of is not None and self.of.match(flow))
            elif kind == "quantile":
                lat = _latency_ms(flow)
                if lat is None:
                    return True
                g.window.add(t_ns, value=lat)
            else:  # kafka_errors
                k = flow.l7.kafka if flow.l7 is not None else None
                hit = k is not None and k.error_code != 0 and (
                    not cond.error_codes or k.error_code in cond.error_codes)
                g.window.add(t_ns, hit=hit)
        g.samples.append(body if body is not None else schema.flow_to_json(flow))
        return True

    # ---- evaluation ----------------------------------------------------------------------

    def measure(self, g: Group) -> tuple[bool, Optional[float], dict[str, Any]]:
        """(condition holds, value, window numbers) for a group's current window."""
        cond = self.rule.condition
        w = g.window
        stats: dict[str, Any] = {"flows": w.count}
        kind = cond.kind
        if kind in ("count", "new_edge"):
            value: Optional[float] = float(w.count)
        elif kind == "ratio":
            stats["matching_of"] = w.hits
            value = w.hits / w.count if w.count >= cond.min_count and w.count else None
        elif kind == "quantile":
            vals = w.values()
            stats["samples"] = len(vals)
            value = round(_quantile(vals, cond.quantile), 3) if len(vals) >= cond.min_count and vals else None
        else:
            stats["errors"] = w.hits
            value = float(w.hits)
        stats["value"] = value
        stats["threshold"] = cond.threshold
        return value is not None and value > cond.threshold, value, stats

    def evaluate(self, now_ns: int) -> list[Notification]:
        rule = self.rule
        out: list[Notification] = []
        for key in list(self.groups):
            g = self.groups[key]
            g.window.prune(now_ns)
            active, value, stats = self.measure(g)
            g.value = value
            if active:
                if g.state == INACTIVE:
                    g.state, g.since_ns = PENDING, now_ns
                    self.dirty.add(key)
                if g.state == PENDING and now_ns - g.since_ns >= rule.for_ns:
                    g.state = FIRING
                    g.episode += 1
                    g.repeat = 0
                    g.last_notified_ns = now_ns
                    self.dirty.add(key)
                    out.append(self._note(g, FIRING, value, stats, now_ns))
                elif (g.state == FIRING and rule.repeat_ns and g.last_notified_ns
                      and now_ns - g.last_notified_ns >= rule.repeat_ns):
                    g.repeat += 1
                    g.last_notified_ns = now_ns
                    self.dirty.add(key)
                    out.append(self._note(g, FIRING, value, stats, now_ns))
            else:
                if g.state == FIRING:
                    if rule.send_resolved:
                        out.append(self._note(g, RESOLVED, value, stats, now_ns))
                    g.state = INACTIVE
                    g.last_notified_ns = now_ns
                    self.dirty.add(key)
                elif g.state == PENDING:
                    g.state = INACTIVE
                    self.dirty.add(key)
                if g.state == INACTIVE and g.window.empty():
                    del self.groups[key]
                    self.dirty.add(key)
        return out

    def _note(self, g: Group, state: str, value: Optional[float], stats: dict[str, Any], now_ns: int) -> Notification:
        return Notification(rule=self.rule.name, group=g.key, group_labels=dict(g.labels), state=state,
                            value=value, stats=dict(stats), started_ns=g.since_ns,
                            ended_ns=now_ns if state == RESOLVED else 0, now_ns=now_ns, episode=g.episode,
                            repeat=g.repeat, samples=list(g.samples))

    def resolve_all(self, now_ns: int) -> list[Notification]:
        """Resolved notifications for every firing group (the rule is deleted or disabled)."""
        out = []
        for g in self.groups.values():
            if g.state == FIRING and self.rule.send_resolved:
                active, value, stats = self.measure(g)
                out.append(self._note(g, RESOLVED, value, stats, now_ns))
        return out

    # ---- persistence ---------------------------------------------------------------------

    def persisted(self, key: str) -> Optional[dict[str, Any]]:
        """The persisted form of a group (None: it is gone or inactive without history)."""
        g = self.groups.get(key)
        if g is None or (g.state == INACTIVE and g.episode == 0):
            return None
        return {"group_key": key, "labels": g.labels, "state": g.state, "since_ns": g.since_ns,
                "last_notified_ns": g.last_notified_ns, "episode": g.episode, "repeat": g.repeat,
                "value": g.value}

    def take_dirty(self) -> tuple[list[dict[str, Any]], list[str], list[tuple[str, int]]]:
        """(group rows to upsert, group keys to delete, new edges) since the previous call."""
        upsert, delete = [], []
        for key in self.dirty:
            row = self.persisted(key)
            if row is None:
                delete.append(key)
            else:
                upsert.append(row)
        self.dirty.clear()
        edges, self.new_edges = self.new_edges, []
        return upsert, delete, edges

    def restore(self, rows: Iterable[dict[str, Any]], edges: Iterable[tuple[str, int]], now_ns: int) -> None:
        """Load persisted group states and seen edges (edges first seen within the window count again)."""
        window = self.rule.condition.window_ns
        for key, first in edges:
            self.edges[key] = first
            if self.rule.condition.kind == "new_edge" and first > now_ns - window:
                src, _, dst = key.partition(" -> ")
                self._group(key, {"source": src, "destination": dst}).window.add(first)
        for r in rows:
            g = self._group(r["group_key"], dict(r.get("labels") or {}))
            g.state = r["state"]
            g.since_ns = r["since_ns"]
            g.last_notified_ns = r["last_notified_ns"]
            g.episode = r["episode"]
            g.repeat = r.get("repeat", 0)
            g.value = r.get("value")

    def adopt(self, old: "RuleEvaluator") -> None:
        """Carry the alert states (not the windows) of the previous version of this rule."""
        for key, og in old.groups.items():
            if og.state == INACTIVE and og.episode == 0:
                continue
            g = self._group(key, og.labels)
            g.state, g.since_ns, g.last_notified_ns = og.state, og.since_ns, og.last_notified_ns
            g.episode, g.repeat, g.value = og.episode, og.repeat, og.value
            self.dirty.add(key)
        if self.rule.condition.kind == "new_edge" and old.rule.condition.kind == "new_edge":
            self.edges.update(old.edges)
            self.new_edges.extend(old.new_edges)  # seen by the old version, not yet persisted

    def status(self) -> list[dict[str, Any]]:
        out = []
        for g in self.groups.values():
            _, value, stats = self.measure(g)
            out.append({"rule": self.rule.name, "group": g.key, "labels": g.labels, "state": g.state,
                        "since_ns": g.since_ns, "episode": g.episode, "value": value, "stats": stats})
        return out
