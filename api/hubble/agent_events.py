"""Agent events for ``GetAgentEvents``: what changed in the control plane, as Hubble's ``flow.AgentEvent``.

Sources:

* ``AGENT_STARTED``: the server's start (one event).
* ``POLICY_UPDATED`` / ``POLICY_DELETED``: every revision in the ``policy_revisions`` table (persistent, so
  history with ``since``/``until`` reaches back to the first policy), with Cilium's policy labels
  (``k8s:io.cilium.k8s.policy.name=...``), the revision and the number of rules.
* ``ENDPOINT_CREATED`` / ``ENDPOINT_DELETED``: the node's endpoint registry (written by the CNI plugin,
  ``$FLOWSCOPE_STATE_DIR/endpoints``), watched by the server on its own node: endpoints present at start
  count as created at their registration time; later changes are seen within one poll interval.
  Deletions that happened while the server was down are not known. Endpoints of other nodes (whose
  registries this server cannot read) do not appear.

The pure part (:func:`policy_event`, :func:`endpoint_event`, :func:`diff_endpoints`) is I/O-free.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import orjson
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from flowscope.endpoints import EndpointRecord, EndpointStore

from .convert import timestamp
from .pb import flow_pb2 as fpb

log = logging.getLogger(__name__)

KIND_CNP = "CiliumNetworkPolicy"
KIND_CCNP = "CiliumClusterwideNetworkPolicy"
MAX_ENDPOINT_EVENTS = 16384  # endpoint events kept in memory (Hubble keeps agent events in a ring too)


@dataclass(frozen=True)
class AgentEventItem:
    time_ns: int
    seq: int  # tie-breaker: order of discovery
    node_name: str
    event: Any  # flow.AgentEvent

    def key(self) -> tuple[int, int]:
        return (self.time_ns, self.seq)


# --------------------------------------------------------------------------------------------
# Pure
# --------------------------------------------------------------------------------------------


def policy_labels(namespace: str, name: str, kind: str) -> list[str]:
    """Cilium's labels of a policy (``k8s:io.cilium.k8s.policy.*``)."""
    out = [f"k8s:io.cilium.k8s.policy.derived-from={kind}", f"k8s:io.cilium.k8s.policy.name={name}"]
    if namespace:
        out.append(f"k8s:io.cilium.k8s.policy.namespace={namespace}")
    return out


def rule_count(document: Optional[dict[str, Any]]) -> int:
    """Rules in a policy document: ``spec`` counts one, each ``specs`` entry one."""
    if not document:
        return 0
    n = 1 if document.get("spec") else 0
    specs = document.get("specs") or []
    return n + (len(specs) if isinstance(specs, list) else 0)


def policy_event(revision: int, namespace: str, name: str, action: str, body: Optional[str]) -> Any:
    """``POLICY_UPDATED`` (action ``apply``) or ``POLICY_DELETED`` (``delete``)."""
    doc: Optional[dict[str, Any]] = None
    if body:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            doc = None
    kind = (doc or {}).get("kind") or (KIND_CNP if namespace else KIND_CCNP)
    etype = fpb.POLICY_DELETED if action == "delete" else fpb.POLICY_UPDATED
    note = fpb.PolicyUpdateNotification(labels=policy_labels(namespace, name, kind), revision=revision,
                                        rule_count=rule_count(doc))
    return fpb.AgentEvent(type=etype, policy_update=note)


def endpoint_event(rec: EndpointRecord, created: bool) -> Any:
    note = fpb.EndpointUpdateNotification(id=rec.endpoint_id, labels=rec.hubble_labels(), pod_name=rec.pod_name,
                                          namespace=rec.namespace)
    return fpb.AgentEvent(type=fpb.ENDPOINT_CREATED if created else fpb.ENDPOINT_DELETED, endpoint_update=note)


def agent_started_event(started_ns: int) -> Any:
    return fpb.AgentEvent(type=fpb.AGENT_STARTED, agent_start=fpb.TimeNotification(time=timestamp(started_ns)))


def diff_endpoints(old: dict[str, EndpointRecord], new: dict[str, EndpointRecord]
                   ) -> tuple[list[EndpointRecord], list[EndpointRecord]]:
    """(created, deleted) between two registry snapshots keyed by attachment; a record replaced by a
    different one (e.g. re-added container) counts as deleted and created."""
    created = [r for k, r in new.items() if k not in old or old[k] != r]
    deleted = [r for k, r in old.items() if k not in new or new[k] != r]
    return created, deleted


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------

_POLICY_SQL = ("SELECT revision, namespace, name, action, body, time_ns FROM policy_revisions "
               "WHERE revision > :after AND time_ns >= :since AND time_ns <= :until ORDER BY revision")


class AgentEvents:
    """Agent events of this server: policy history from SQL, endpoint changes from the registry."""

    def __init__(self, engine: Engine, *, node_name: str, started_ns: int,
                 state_dir: Optional[str | Path] = None) -> None:
        self.engine = engine
        self.node_name = node_name
        self.started_ns = started_ns
        self._registry = EndpointStore(state_dir)
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._endpoints: Optional[dict[str, EndpointRecord]] = None
        self._version: Optional[tuple[int, int]] = None
        self._endpoint_events: deque[AgentEventItem] = deque(maxlen=MAX_ENDPOINT_EVENTS)
        self._started = AgentEventItem(started_ns, 0, node_name, agent_started_event(started_ns))
        self._policy_table_warned = False

    # ---- endpoints -------------------------------------------------------------------------

    def refresh_endpoints(self, now_ns: Optional[int] = None) -> list[AgentEventItem]:
        """Read the registry when it changed; returns the new endpoint events."""
        with self._lock:
            version = self._registry.version()
            if self._endpoints is not None and version == self._version:
                return []
            now = time.time_ns() if now_ns is None else now_ns
            snap = {r.key: r for r in self._registry.list()}
            first = self._endpoints is None
            created, deleted = diff_endpoints(self._endpoints or {}, snap)
            self._endpoints, self._version = snap, version
            out = []
            for r in deleted:
                out.append(AgentEventItem(now, next(self._seq), r.node_name or self.node_name, endpoint_event(r, False)))
            for r in sorted(created, key=lambda r: r.created_ns):
                t = r.created_ns if (first or r.created_ns > now - 60 * 1_000_000_000) and r.created_ns else now
                out.append(AgentEventItem(t, next(self._seq), r.node_name or self.node_name, endpoint_event(r, True)))
            self._endpoint_events.extend(out)
            return out

    def max_endpoint_seq(self) -> int:
        """The newest endpoint event's sequence number (after reading the registry)."""
        self.refresh_endpoints()
        with self._lock:
            return max((it.seq for it in self._endpoint_events), default=0)

    def endpoint_events_after(self, seq: int) -> list[AgentEventItem]:
        """Endpoint events with a sequence number above ``seq`` (after reading the registry). Followers
        use this, not refresh_endpoints()'s return value: the background watcher and other followers
        refresh too, and whoever sees a change first would otherwise take its events from the rest."""
        self.refresh_endpoints()
        with self._lock:
            return [it for it in self._endpoint_events if it.seq > seq]

    # ---- policies --------------------------------------------------------------------------

    def policy_events(self, *, after_revision: int = 0, since_ns: Optional[int] = None,
                      until_ns: Optional[int] = None) -> list[tuple[int, AgentEventItem]]:
        """``(revision, item)`` of policy revisions above ``after_revision`` within the time range."""
        params = {"after": after_revision, "since": since_ns if since_ns is not None else -(1 << 62),
                  "until": until_ns if until_ns is not None else (1 << 62)}
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(text(_POLICY_SQL), params).all()
        except DBAPIError as e:  # no policy table (policies not migrated on this database)
            if not self._policy_table_warned:
                self._policy_table_warned = True
                log.warning("agent events: policy history unavailable (%s)", type(e.orig).__name__)
            return []
        return [(int(r.revision), AgentEventItem(int(r.time_ns), 0, self.node_name,
                                                  policy_event(int(r.revision), r.namespace, r.name, r.action, r.body)))
                for r in rows]

    def last_policy_revision(self) -> int:
        try:
            with self.engine.connect() as conn:
                return int(conn.execute(text("SELECT coalesce(max(revision), 0) FROM policy_revisions")).scalar() or 0)
        except DBAPIError:
            return 0

    # ---- all -------------------------------------------------------------------------------

    def history(self, since_ns: Optional[int] = None, until_ns: Optional[int] = None) -> list[AgentEventItem]:
        """Every known event in the time range, oldest first."""
        self.refresh_endpoints()

        def inside(t: int) -> bool:
            return (since_ns is None or t >= since_ns) and (until_ns is None or t <= until_ns)

        items = [it for _, it in self.policy_events(since_ns=since_ns, until_ns=until_ns)]
        with self._lock:
            items += [it for it in self._endpoint_events if inside(it.time_ns)]
        if inside(self._started.time_ns):
            items.append(self._started)
        items.sort(key=AgentEventItem.key)
        return items
