"""The alerting service inside the server: fed by committed batches, evaluated by a ticker thread, delivered
by a delivery thread; everything that must survive a restart is in SQL (:mod:`.store`).

* ``ingest(batches)`` runs in the writer thread after each commit: each rule's filter and window (cheap,
  no I/O).
* The ticker evaluates every ``eval_interval_s``: state changes and the notifications they cause are
  committed in one transaction (the outbox), then the delivery thread is woken.
* The delivery thread sends due notifications (oldest first; per alert group in order), logs every
  attempt, and retries failures with exponential backoff and jitter until ``give_up_after``.
* At start (and when a rule changes) the rule's window is rebuilt from the stored flows of the last window,
  and its persisted alert states are restored: a restart neither re-sends a firing alert nor resolves it
  falsely.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import httpx
import msgspec
from sqlalchemy import select

from flowscope import schema

from . import delivery
from .engine import FIRING, Notification, RuleEvaluator
from .payload import build_body, notification_id
from .rules import Rule, RuleError, load_rules, parse_rule
from .store import AlertStore

log = logging.getLogger("flowscope.alerts")
_decode = msgspec.json.Decoder(schema.Flow).decode
LOG_RETENTION_NS = 7 * 86400 * 1_000_000_000


@dataclass
class _ReplayQuery:
    since_ns: Optional[int]
    until_ns: Optional[int]
    limit: Optional[int]
    first: bool
    filters: Any


class _Entry:
    __slots__ = ("rule", "ev", "upto_id")

    def __init__(self, rule: Rule, ev: RuleEvaluator, upto_id: int) -> None:
        self.rule = rule
        self.ev = ev
        self.upto_id = upto_id  # flows with ids up to this were counted by the replay


def _webhook_doc(rule: Rule) -> dict[str, Any]:
    w = rule.webhook
    assert w is not None
    return {"url": w.url, "secret": w.secret, "headers": dict(w.headers), "timeout_s": w.timeout_s,
            "max_backoff_s": w.max_backoff_s, "give_up_after_s": w.give_up_after_s, "format": w.format}


class AlertService:
    def __init__(self, engine: Any, flow_store: Any, *, base_url: str = "http://127.0.0.1:8080",
                 eval_interval_s: float = 1.0, clock: Callable[[], int] = time.time_ns,
                 client: Optional[httpx.Client] = None) -> None:
        self.store = AlertStore(engine)
        self.flows = flow_store
        self.base_url = base_url
        self.eval_interval_s = eval_interval_s
        self.clock = clock
        self._client = client
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._wake_delivery = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = False
        self.deliveries_ok = 0
        self.deliveries_failed = 0
        self.notifications = 0

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        self.load()
        if self._client is None:
            self._client = httpx.Client(follow_redirects=False)
        self._stop.clear()
        self._threads = [threading.Thread(target=self._tick_loop, name="flowscope-alerts-eval", daemon=True),
                         threading.Thread(target=self._delivery_loop, name="flowscope-alerts-send", daemon=True)]
        for t in self._threads:
            t.start()
        log.info("alerts: %d rule(s) loaded", len(self._entries))

    def load(self) -> None:
        """Install the stored rules with their persisted alert states (what ``start`` does first)."""
        now = self.clock()
        for doc in self.store.rules():
            try:
                rule = parse_rule(doc)
            except RuleError as e:  # stored by an older version with other rules: keep the server up
                log.error("stored alert rule ignored: %s", e)
                continue
            self._install(rule, now, restore=True)

    def stop(self) -> None:
        if not self._started:
            return
        self._stop.set()
        self._wake_delivery.set()
        for t in self._threads:
            t.join(10)
        self._threads = []
        self._started = False
        try:
            self.tick()  # what the last batches changed
        except Exception:  # noqa: BLE001 - shutting down; the state is as of the previous tick
            log.exception("final alert evaluation failed")
        if self._client is not None:
            self._client.close()
            self._client = None

    # ---- rules ---------------------------------------------------------------------------

    def _replay(self, ev: RuleEvaluator, now: int) -> int:
        """Count the stored flows of the rule's last window; returns the newest id counted."""
        since = now - ev.rule.condition.window_ns
        upto = self.flows.last_id()
        rq = _ReplayQuery(since, None, None, True, ev.filters)
        for r in self.flows.query_rows(rq, max_id=upto):
            ev.offer(_decode(r.body), r.time_ns, now, r.body)
        return upto

    def _catch_up(self, entry: _Entry, now: int) -> None:
        """Under the lock: flows committed between the replay and now (not offered to the new evaluator)."""
        from api.db import flows_table as t

        last = self.flows.last_id()
        if last <= entry.upto_id:
            return
        with self.flows.engine.connect() as conn:
            rows = conn.execute(select(t.c.time_ns, t.c.body).where(t.c.id > entry.upto_id, t.c.id <= last)
                                .order_by(t.c.id)).all()
        for time_ns, body in rows:
            body = bytes(body)
            entry.ev.offer(_decode(body), time_ns, now, body)
        entry.upto_id = last

    def _install(self, rule: Rule, now: int, *, restore: bool = False) -> None:
        """(Re)build a rule's evaluator: persisted states (at start) and seen edges first, then the stored
        flows of its window, then (under the lock) the flows committed meanwhile; on a change the previous
        version's alert states carry over."""
        ev = RuleEvaluator(rule)
        ev.restore(self.store.groups(rule.name) if restore else [], self.store.edges(rule.name), now)
        with self._lock:
            old = self._entries.get(rule.name)
            if old is not None:
                for key, first in old.ev.edges.items():
                    ev.edges.setdefault(key, first)
        ev.dirty.clear()
        ev.new_edges = []
        entry = _Entry(rule, ev, self._replay(ev, now))
        with self._lock:
            self._catch_up(entry, now)
            old = self._entries.get(rule.name)
            if old is not None and not restore:
                ev.adopt(old.ev)
            self._entries[rule.name] = entry

    def apply(self, text_or_docs: "str | bytes | list[dict[str, Any]]") -> list[dict[str, str]]:
        """Validate every rule first (nothing is applied if one is invalid), store them, (re)start their
        evaluation. Returns ``[{"name", "result": created|configured|unchanged}]``. Raises RuleError."""
        if isinstance(text_or_docs, (str, bytes)):
            rules = load_rules(text_or_docs)
        else:
            rules = [parse_rule(d) for d in text_or_docs]
            names = [r.name for r in rules]
            dup = {n for n in names if names.count(n) > 1}
            if dup:
                raise RuleError(f"rule {sorted(dup)[0]}: the name appears twice")
        results = self.store.put_rules([r.to_doc() for r in rules])
        now = self.clock()
        by_name = {r.name: r for r in rules}
        for name, result in results:
            if result != "unchanged" or name not in self._entries:
                self._install(by_name[name], now)
        return [{"name": n, "result": r} for n, r in results]

    def delete(self, name: str) -> bool:
        """Delete a rule; its firing alerts are sent as resolved."""
        with self._lock:
            entry = self._entries.pop(name, None)
            if entry is not None:
                notes = self._outbox_notes(entry.rule, entry.ev.resolve_all(self.clock()))
                self.store.save_state(name, [], [], [], notes, now_ns=self.clock())
        found = self.store.delete_rule(name)
        self._wake_delivery.set()
        return found or entry is not None

    def rules(self) -> list[Rule]:
        with self._lock:
            return [e.rule for e in sorted(self._entries.values(), key=lambda e: e.rule.name)]

    def get(self, name: str) -> Optional[Rule]:
        with self._lock:
            e = self._entries.get(name)
            return e.rule if e is not None else None

    # ---- input and evaluation ------------------------------------------------------------

    def ingest(self, batches: Sequence[Any]) -> None:
        """Committed batches (``api.store.PreparedBatch``), from the writer thread."""
        if not self._entries:
            return
        now = self.clock()
        with self._lock:
            entries = [e for e in self._entries.values() if e.rule.enabled]
            if not entries:
                return
            for b in batches:
                for it in b.live_items():
                    fid = it.id
                    for e in entries:
                        if fid > e.upto_id:
                            e.ev.offer(it.flow, it.time_ns, now, it.body)

    def _outbox_notes(self, rule: Rule, notes: Iterable[Notification]) -> list[dict[str, Any]]:
        out = []
        for n in notes:
            self.notifications += 1
            log.info("alert %s %s%s", rule.name, n.state, f" [{n.group}]" if n.group else "")
            if rule.webhook is None:
                continue
            out.append({"key": notification_id(n), "group_key": n.group, "state": n.state,
                        "body": build_body(rule, n, self.base_url), "webhook": _webhook_doc(rule)})
        return out

    def tick(self) -> int:
        """Evaluate every rule now; persist what changed and queue notifications. Returns how many."""
        now = self.clock()
        queued = 0
        with self._lock:
            for e in list(self._entries.values()):
                if not e.rule.enabled:  # disabled: what was firing is resolved once, then nothing
                    if not e.ev.groups:
                        continue
                    notes = e.ev.resolve_all(now)
                    e.ev.dirty.update(e.ev.groups)
                    e.ev.groups.clear()
                else:
                    notes = e.ev.evaluate(now)
                upsert, remove, edges = e.ev.take_dirty()
                queued += self.store.save_state(e.rule.name, upsert, remove, edges,
                                                self._outbox_notes(e.rule, notes), now_ns=now)
        if queued:
            self._wake_delivery.set()
        return queued

    def state(self) -> list[dict[str, Any]]:
        """Every alert group with its state and window numbers (live)."""
        with self._lock:
            out = []
            for e in sorted(self._entries.values(), key=lambda e: e.rule.name):
                for g in e.ev.status():
                    g["severity"] = e.rule.severity
                    g["since"] = schema.format_timestamp(g.pop("since_ns")) if g.get("since_ns") else None
                    out.append(g)
            return out

    def firing(self) -> int:
        with self._lock:
            return sum(1 for e in self._entries.values() for g in e.ev.groups.values() if g.state == FIRING)

    def test(self, doc: "dict[str, Any] | str | bytes") -> dict[str, Any]:
        """Evaluate a rule (not stored) against the stored flows of its last window: what would fire."""
        rule = load_rules(doc)[0] if isinstance(doc, (str, bytes)) else parse_rule(doc)
        now = self.clock()
        ev = RuleEvaluator(rule)
        matched = 0
        since = now - rule.condition.window_ns
        for r in self.flows.query_rows(_ReplayQuery(since, None, None, True, ev.filters), max_id=self.flows.last_id()):
            ev.offer(_decode(r.body), r.time_ns, now, r.body)
            matched += 1
        groups = []
        for g in ev.groups.values():
            g.window.prune(now)
            active, value, stats = ev.measure(g)
            groups.append({"group": g.key, "labels": g.labels, "would_fire": active, "value": value, "stats": stats,
                           "summary": None, "sample_flows": [msgspec.json.decode(s) for s in g.samples]})
        from .payload import describe

        for gd, g in zip(groups, ev.groups.values()):
            n = Notification(rule.name, g.key, g.labels, FIRING if gd["would_fire"] else "ok", gd["value"],
                             gd["stats"], now, 0, now, 0, 0, [])
            gd["summary"] = describe(rule, n)
        return {"rule": rule.name, "window": rule.to_doc()["condition"]["window"], "matched_flows": matched,
                "for": rule.to_doc()["for"], "would_fire": any(g["would_fire"] for g in groups), "groups": groups}

    # ---- threads -------------------------------------------------------------------------

    def _tick_loop(self) -> None:
        last_prune = 0.0
        while not self._stop.wait(self.eval_interval_s):
            try:
                self.tick()
                if time.monotonic() - last_prune > 3600:
                    last_prune = time.monotonic()
                    self.store.prune(LOG_RETENTION_NS)
            except Exception:  # noqa: BLE001 - keep evaluating; the database may come back
                log.exception("alert evaluation failed")

    def deliver_due(self) -> int:
        """Send what is due now (one pass). Returns the number of attempts made."""
        assert self._client is not None
        items = self.store.due(self.clock())
        for it in items:
            if self._stop.is_set() and self._threads:
                break
            a = delivery.attempt(self._client, it.webhook, it.body, it.key, it.state)
            now = self.clock()
            give_up = not a.ok and (now - it.created_ns) / 1e9 >= float(it.webhook.get("give_up_after_s", 86400))
            nxt = None if a.ok or give_up else now + int(
                delivery.backoff_s(it.attempts + 1, float(it.webhook.get("max_backoff_s", 300))) * 1e9)
            self.store.record_attempt(it, ok=a.ok, status_code=a.status_code, error=a.error,
                                      duration_ms=a.duration_ms, next_attempt_ns=nxt, give_up=give_up, now_ns=now)
            if a.ok:
                self.deliveries_ok += 1
            else:
                self.deliveries_failed += 1
                log.warning("alert delivery to %s failed (attempt %d): %s%s", it.webhook.get("url"),
                            it.attempts + 1, a.error, "; giving up" if give_up else "")
        return len(items)

    def _delivery_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.deliver_due()
                nxt = self.store.next_due_ns()
            except Exception:  # noqa: BLE001
                log.exception("alert delivery pass failed")
                nxt = None
            wait = 5.0 if nxt is None else max(0.05, min(5.0, (nxt - self.clock()) / 1e9))
            self._wake_delivery.wait(wait)
            self._wake_delivery.clear()
