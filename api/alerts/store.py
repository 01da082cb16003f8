"""Alerts in SQL: rules, alert state, seen edges, the outbox and the delivery log.

Tables (SQLAlchemy 2.0 models on ``api.db.Base``; created by the Alembic revision ``0003_alerts``):

``alert_rules``      one row per rule: its canonical document (JSON, secret included) and content hash.
``alert_groups``     the state of each alert group that has fired or is pending (so a firing alert stays
                     firing across a restart and is neither sent again nor forgotten).
``alert_edges``      the edges seen by ``new_edge`` rules, with when they were first seen.
``alert_outbox``     notifications to deliver, each with its body (fixed once built), the webhook it goes
                     to, its status (pending, delivered, failed) and when to try next. ``key`` is unique:
                     the same notification is never queued twice.
``alert_deliveries`` the log: one row per attempt (status code, error, duration).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import orjson
from sqlalchemy import (BigInteger, Boolean, Engine, Float, Index, Integer, LargeBinary, String, Text, delete, func,
                        insert, select, update)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from api.db import Base

_BigId = BigInteger().with_variant(Integer(), "sqlite")

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


class AlertRuleRow(Base):
    __tablename__ = "alert_rules"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    body: Mapped[str] = mapped_column(Text, nullable=False)
    content_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    created_ns: Mapped[int] = mapped_column(BigInteger, nullable=False)
    updated_ns: Mapped[int] = mapped_column(BigInteger, nullable=False)


class AlertGroupRow(Base):
    __tablename__ = "alert_groups"

    rule: Mapped[str] = mapped_column(String(128), primary_key=True)
    group_key: Mapped[str] = mapped_column(String(1024), primary_key=True)
    labels: Mapped[str] = mapped_column(Text, nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    since_ns: Mapped[int] = mapped_column(BigInteger, nullable=False)
    last_notified_ns: Mapped[int] = mapped_column(BigInteger, nullable=False)
    episode: Mapped[int] = mapped_column(Integer, nullable=False)
    repeat: Mapped[int] = mapped_column(Integer, nullable=False)
    value: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    updated_ns: Mapped[int] = mapped_column(BigInteger, nullable=False)


class AlertEdgeRow(Base):
    __tablename__ = "alert_edges"

    rule: Mapped[str] = mapped_column(String(128), primary_key=True)
    edge: Mapped[str] = mapped_column(String(1024), primary_key=True)
    first_seen_ns: Mapped[int] = mapped_column(BigInteger, nullable=False)


class AlertOutboxRow(Base):
    __tablename__ = "alert_outbox"

    id: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    rule: Mapped[str] = mapped_column(String(128), nullable=False)
    group_key: Mapped[str] = mapped_column(String(1024), nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    body: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    webhook: Mapped[str] = mapped_column(Text, nullable=False)
    created_ns: Mapped[int] = mapped_column(BigInteger, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    next_attempt_ns: Mapped[int] = mapped_column(BigInteger, nullable=False)
    last_error: Mapped[str] = mapped_column(Text, nullable=False, default="")
    done_ns: Mapped[Optional[int]] = mapped_column(BigInteger, nullable=True)

    __table_args__ = (Index("ix_alert_outbox_status_next", "status", "next_attempt_ns"),)


class AlertDeliveryRow(Base):
    __tablename__ = "alert_deliveries"

    id: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=True)
    outbox_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    rule: Mapped[str] = mapped_column(String(128), nullable=False)
    group_key: Mapped[str] = mapped_column(String(1024), nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    attempt: Mapped[int] = mapped_column(Integer, nullable=False)
    time_ns: Mapped[int] = mapped_column(BigInteger, nullable=False)
    url: Mapped[str] = mapped_column(Text, nullable=False)
    ok: Mapped[bool] = mapped_column(Boolean, nullable=False)
    status_code: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    error: Mapped[str] = mapped_column(Text, nullable=False, default="")
    duration_ms: Mapped[float] = mapped_column(Float, nullable=False)

    __table_args__ = (Index("ix_alert_deliveries_time", "time_ns"),
                      Index("ix_alert_deliveries_rule_time", "rule", "time_ns"))


rules_t = AlertRuleRow.__table__
groups_t = AlertGroupRow.__table__
edges_t = AlertEdgeRow.__table__
outbox_t = AlertOutboxRow.__table__
deliveries_t = AlertDeliveryRow.__table__


@dataclass
class OutboxItem:
    id: int
    key: str
    rule: str
    group_key: str
    state: str
    body: bytes
    webhook: dict[str, Any]
    attempts: int
    created_ns: int


def content_hash(doc: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()


class AlertStore:
    """All SQL of the alerts; every method is one short transaction."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _write(self):
        conn = self.engine.connect()
        conn.execution_options(sqlite_immediate=True)
        return conn

    # ---- rules ---------------------------------------------------------------------------

    def rules(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(rules_t.c.body).order_by(rules_t.c.name)).all()
        return [orjson.loads(r[0]) for r in rows]

    def put_rules(self, docs: Iterable[dict[str, Any]]) -> list[tuple[str, str]]:
        """Create or replace rules in one transaction; returns (name, created|configured|unchanged)."""
        now = time.time_ns()
        out = []
        with self._write() as conn, conn.begin():
            for doc in docs:
                h = content_hash(doc)
                row = conn.execute(select(rules_t.c.content_hash).where(rules_t.c.name == doc["name"])).first()
                if row is None:
                    conn.execute(insert(rules_t).values(name=doc["name"], body=orjson.dumps(doc).decode(),
                                                        content_hash=h, created_ns=now, updated_ns=now))
                    out.append((doc["name"], "created"))
                elif row[0] == h:
                    out.append((doc["name"], "unchanged"))
                else:
                    conn.execute(update(rules_t).where(rules_t.c.name == doc["name"]).values(
                        body=orjson.dumps(doc).decode(), content_hash=h, updated_ns=now))
                    out.append((doc["name"], "configured"))
        return out

    def delete_rule(self, name: str) -> bool:
        with self._write() as conn, conn.begin():
            n = conn.execute(delete(rules_t).where(rules_t.c.name == name)).rowcount
            conn.execute(delete(groups_t).where(groups_t.c.rule == name))
            conn.execute(delete(edges_t).where(edges_t.c.rule == name))
        return n > 0

    # ---- state ---------------------------------------------------------------------------

    def groups(self, rule: Optional[str] = None) -> list[dict[str, Any]]:
        stmt = select(groups_t)
        if rule is not None:
            stmt = stmt.where(groups_t.c.rule == rule)
        with self.engine.connect() as conn:
            rows = conn.execute(stmt.order_by(groups_t.c.rule, groups_t.c.group_key)).mappings().all()
        return [dict(r, labels=orjson.loads(r["labels"])) for r in rows]

    def edges(self, rule: str) -> list[tuple[str, int]]:
        with self.engine.connect() as conn:
            return [(e, t) for e, t in conn.execute(
                select(edges_t.c.edge, edges_t.c.first_seen_ns).where(edges_t.c.rule == rule))]

    def save_state(self, rule: str, upsert: list[dict[str, Any]], remove: list[str],
                   new_edges: list[tuple[str, int]], notes: list[dict[str, Any]], now_ns: Optional[int] = None) -> int:
        """One transaction: group states, new edges, and notifications queued for delivery (the outbox
        commits with the state change that caused it). Returns the number of notifications queued."""
        if not (upsert or remove or new_edges or notes):
            return 0
        now = time.time_ns() if now_ns is None else now_ns
        queued = 0
        with self._write() as conn, conn.begin():
            keys = [r["group_key"] for r in upsert] + remove
            if keys:
                conn.execute(delete(groups_t).where(groups_t.c.rule == rule, groups_t.c.group_key.in_(keys)))
            if upsert:
                conn.execute(insert(groups_t), [
                    {"rule": rule, "group_key": r["group_key"], "labels": orjson.dumps(r["labels"]).decode(),
                     "state": r["state"], "since_ns": r["since_ns"], "last_notified_ns": r["last_notified_ns"],
                     "episode": r["episode"], "repeat": r["repeat"], "value": r["value"], "updated_ns": now}
                    for r in upsert])
            if new_edges:
                known = {e for (e,) in conn.execute(select(edges_t.c.edge).where(
                    edges_t.c.rule == rule, edges_t.c.edge.in_([e for e, _ in new_edges])))}
                rows = [{"rule": rule, "edge": e, "first_seen_ns": t} for e, t in dict(new_edges).items()
                        if e not in known]
                if rows:
                    conn.execute(insert(edges_t), rows)
            for n in notes:
                exists = conn.execute(select(outbox_t.c.id).where(outbox_t.c.key == n["key"])).first()
                if exists is not None:
                    continue  # the same notification was queued before (e.g. replay after a crash)
                conn.execute(insert(outbox_t).values(
                    key=n["key"], rule=rule, group_key=n["group_key"], state=n["state"], body=n["body"],
                    webhook=orjson.dumps(n["webhook"]).decode(), created_ns=now, status=PENDING, attempts=0,
                    next_attempt_ns=now, last_error=""))
                queued += 1
        return queued

    # ---- outbox and log ------------------------------------------------------------------

    def due(self, now_ns: int, limit: int = 50) -> list[OutboxItem]:
        """Pending notifications whose time has come, oldest first; per rule and group only the oldest
        pending one (a resolve is never sent before its firing notification)."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(outbox_t).where(outbox_t.c.status == PENDING)
                                .order_by(outbox_t.c.id).limit(limit * 4)).mappings().all()
        out: list[OutboxItem] = []
        blocked: set[tuple[str, str]] = set()
        for r in rows:
            k = (r["rule"], r["group_key"])
            if k in blocked:
                continue
            blocked.add(k)
            if r["next_attempt_ns"] <= now_ns:
                out.append(OutboxItem(r["id"], r["key"], r["rule"], r["group_key"], r["state"], bytes(r["body"]),
                                      orjson.loads(r["webhook"]), r["attempts"], r["created_ns"]))
                if len(out) >= limit:
                    break
        return out

    def next_due_ns(self) -> Optional[int]:
        with self.engine.connect() as conn:
            return conn.execute(select(func.min(outbox_t.c.next_attempt_ns))
                                .where(outbox_t.c.status == PENDING)).scalar()

    def record_attempt(self, item: OutboxItem, *, ok: bool, status_code: Optional[int], error: str,
                       duration_ms: float, next_attempt_ns: Optional[int], give_up: bool,
                       now_ns: Optional[int] = None) -> None:
        now = time.time_ns() if now_ns is None else now_ns
        attempt_no = item.attempts + 1
        status = DELIVERED if ok else (FAILED if give_up else PENDING)
        with self._write() as conn, conn.begin():
            conn.execute(insert(deliveries_t).values(
                outbox_id=item.id, rule=item.rule, group_key=item.group_key, state=item.state, attempt=attempt_no,
                time_ns=now, url=item.webhook.get("url", ""), ok=ok, status_code=status_code, error=error,
                duration_ms=duration_ms))
            conn.execute(update(outbox_t).where(outbox_t.c.id == item.id).values(
                attempts=attempt_no, status=status, last_error=error,
                next_attempt_ns=next_attempt_ns if next_attempt_ns is not None else now,
                done_ns=now if status != PENDING else None))

    def outbox(self, status: Optional[str] = None, limit: int = 100) -> list[dict[str, Any]]:
        cols = [c for c in outbox_t.c if c.name not in ("body", "webhook")]
        stmt = select(*cols, outbox_t.c.webhook)
        if status:
            stmt = stmt.where(outbox_t.c.status == status)
        with self.engine.connect() as conn:
            rows = conn.execute(stmt.order_by(outbox_t.c.id.desc()).limit(limit)).mappings().all()
        out = []
        for r in rows:
            d = dict(r)
            d["url"] = orjson.loads(d.pop("webhook")).get("url", "")
            out.append(d)
        return out

    def outbox_counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return {s: n for s, n in conn.execute(select(outbox_t.c.status, func.count()).group_by(outbox_t.c.status))}

    def deliveries(self, rule: Optional[str] = None, limit: int = 100) -> list[dict[str, Any]]:
        stmt = select(deliveries_t)
        if rule:
            stmt = stmt.where(deliveries_t.c.rule == rule)
        with self.engine.connect() as conn:
            rows = conn.execute(stmt.order_by(deliveries_t.c.id.desc()).limit(limit)).mappings().all()
        return [dict(r) for r in rows]

    def delivery_counts(self) -> dict[bool, int]:
        with self.engine.connect() as conn:
            return {bool(ok): n for ok, n in conn.execute(
                select(deliveries_t.c.ok, func.count()).group_by(deliveries_t.c.ok))}

    def prune(self, keep_ns: int) -> None:
        """Forget finished outbox rows and log entries older than ``keep_ns``."""
        edge = time.time_ns() - keep_ns
        with self._write() as conn, conn.begin():
            conn.execute(delete(deliveries_t).where(deliveries_t.c.time_ns < edge))
            conn.execute(delete(outbox_t).where(outbox_t.c.status != PENDING, outbox_t.c.done_ns < edge))


__all__ = ["AlertStore", "OutboxItem", "PENDING", "DELIVERED", "FAILED", "content_hash", "IntegrityError"]
