"""Policies in SQL, with revisions (no web framework in here; ``api/policies.py`` serves it).

Tables (SQLAlchemy 2.0 models on ``api.db.Base``; created by the Alembic revision ``0002_policies``):

``policies``
    the current set: one row per (namespace, name) (namespace ``""`` for a cluster-wide policy) with the
    canonical JSON document (``Policy.to_json``), its content hash, kind, and the revision of its last
    change.
``policy_revisions``
    the history: one row per change (``apply`` with the document, ``delete`` without), keyed by the
    revision number. The store's revision is the highest one there; it only grows (deletions too are
    revisions), so agents can ask "anything newer than N?" cheaply.

Applying a document whose canonical content is unchanged is a no-op (no new revision), like
``kubectl apply``. Every write runs in one transaction (``BEGIN IMMEDIATE`` on SQLite): a batch of
policies is applied completely or not at all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import orjson
from sqlalchemy import BigInteger, Engine, Index, String, Text, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from api.db import Base

from .policy import Policy, policy_from_object

ACTION_APPLY = "apply"
ACTION_DELETE = "delete"


class PolicyRow(Base):
    """The current version of one policy."""

    __tablename__ = "policies"

    namespace: Mapped[str] = mapped_column(String(63), primary_key=True)  # "" for cluster-wide
    name: Mapped[str] = mapped_column(String(253), primary_key=True)
    kind: Mapped[str] = mapped_column(String(64), nullable=False)
    revision: Mapped[int] = mapped_column(BigInteger, nullable=False)
    content_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    body: Mapped[str] = mapped_column(Text, nullable=False)  # canonical JSON (Policy.to_json)
    created_ns: Mapped[int] = mapped_column(BigInteger, nullable=False)
    updated_ns: Mapped[int] = mapped_column(BigInteger, nullable=False)


class PolicyRevisionRow(Base):
    """One change to the policy set."""

    __tablename__ = "policy_revisions"

    revision: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    namespace: Mapped[str] = mapped_column(String(63), nullable=False)
    name: Mapped[str] = mapped_column(String(253), nullable=False)
    action: Mapped[str] = mapped_column(String(8), nullable=False)  # apply | delete
    content_hash: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    body: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    time_ns: Mapped[int] = mapped_column(BigInteger, nullable=False)

    __table_args__ = (Index("ix_policy_revisions_ns_name", "namespace", "name", "revision"),)


policies_table = PolicyRow.__table__
policy_revisions_table = PolicyRevisionRow.__table__


@dataclass(frozen=True)
class StoredPolicy:
    namespace: str
    name: str
    kind: str
    revision: int
    content_hash: str
    body: str            # canonical JSON
    created_ns: int
    updated_ns: int

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    @property
    def document(self) -> dict:
        return orjson.loads(self.body)

    def policy(self) -> Policy:
        """The validated policy, carrying its revision."""
        return policy_from_object(self.document).with_revision(self.revision)

    def to_json(self) -> dict[str, Any]:
        """The REST representation."""
        return {"namespace": self.namespace, "name": self.name, "kind": self.kind, "revision": self.revision,
                "content_hash": self.content_hash, "created": _rfc3339(self.created_ns),
                "updated": _rfc3339(self.updated_ns), "policy": self.document}


@dataclass(frozen=True)
class ApplyOutcome:
    namespace: str
    name: str
    kind: str
    revision: int
    action: str  # created | configured | unchanged

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    def to_json(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "name": self.name, "kind": self.kind, "revision": self.revision,
                "action": self.action}


def _rfc3339(ns: int) -> str:
    from flowscope.schema import format_timestamp

    return format_timestamp(ns)


def _stored(row: Any) -> StoredPolicy:
    return StoredPolicy(row.namespace, row.name, row.kind, int(row.revision), row.content_hash, row.body,
                        int(row.created_ns), int(row.updated_ns))


_COLUMNS = (policies_table.c.namespace, policies_table.c.name, policies_table.c.kind, policies_table.c.revision,
            policies_table.c.content_hash, policies_table.c.body, policies_table.c.created_ns,
            policies_table.c.updated_ns)


class PolicyStore:
    """The policy set in a database (any SQLAlchemy engine; migrated by ``api.migrate``)."""

    def __init__(self, engine: Engine, *, clock=time.time_ns, retries: int = 5):
        self.engine = engine
        self._clock = clock
        self._retries = retries

    # -- reading ----------------------------------------------------------------------------

    def revision(self) -> int:
        with self.engine.connect() as conn:
            return self._revision(conn)

    @staticmethod
    def _revision(conn: Any) -> int:
        return int(conn.execute(select(func.coalesce(func.max(policy_revisions_table.c.revision), 0))).scalar_one())

    def list(self, namespace: Optional[str] = None) -> tuple[int, list[StoredPolicy]]:
        """``(revision, policies)`` read in one transaction (the list is exactly that revision's set),
        ordered by namespace and name; ``namespace`` narrows to one namespace (``""``: cluster-wide)."""
        q = select(*_COLUMNS).order_by(policies_table.c.namespace, policies_table.c.name)
        if namespace is not None:
            q = q.where(policies_table.c.namespace == namespace)
        with self.engine.connect() as conn, conn.begin():
            rev = self._revision(conn)
            rows = [_stored(r) for r in conn.execute(q)]
        return rev, rows

    def get(self, namespace: str, name: str) -> Optional[StoredPolicy]:
        q = select(*_COLUMNS).where(policies_table.c.namespace == namespace, policies_table.c.name == name)
        with self.engine.connect() as conn:
            row = conn.execute(q).first()
        return _stored(row) if row is not None else None

    def history(self, namespace: str, name: str) -> list[dict[str, Any]]:
        t = policy_revisions_table
        q = (select(t.c.revision, t.c.action, t.c.content_hash, t.c.time_ns)
             .where(t.c.namespace == namespace, t.c.name == name).order_by(t.c.revision))
        with self.engine.connect() as conn:
            return [{"revision": int(r.revision), "action": r.action, "content_hash": r.content_hash,
                     "time": _rfc3339(int(r.time_ns))} for r in conn.execute(q)]

    # -- writing ----------------------------------------------------------------------------

    def apply(self, policies: Iterable[Policy]) -> tuple[int, list[ApplyOutcome]]:
        """Create or update ``policies`` in one transaction. Returns the store's revision afterwards and
        one outcome per policy (``created``, ``configured`` or ``unchanged``)."""
        items = list(policies)
        return self._write(lambda conn: self._apply(conn, items))

    def delete(self, namespace: str, name: str) -> Optional[tuple[int, StoredPolicy]]:
        """Remove one policy; ``(new revision, what was deleted)`` or None when there was no such policy."""
        return self._write(lambda conn: self._delete(conn, namespace, name))

    def _write(self, fn):
        last: Optional[Exception] = None
        for _ in range(self._retries):
            try:
                with self.engine.connect() as conn:
                    conn.execution_options(sqlite_immediate=True)
                    with conn.begin():
                        return fn(conn)
            except IntegrityError as e:  # two writers took the same revision (not on SQLite): retry
                last = e
                time.sleep(0.01)
        raise RuntimeError(f"could not store the policy change after {self._retries} attempts: {last}")

    def _apply(self, conn: Any, items: list[Policy]) -> tuple[int, list[ApplyOutcome]]:
        rev = self._revision(conn)
        now = self._clock()
        out = []
        t = policies_table
        for p in items:
            body = p.to_json().decode()
            h = p.content_hash
            row = conn.execute(select(t.c.revision, t.c.content_hash, t.c.kind)
                               .where(t.c.namespace == p.namespace, t.c.name == p.name)).first()
            if row is not None and row.content_hash == h:
                out.append(ApplyOutcome(p.namespace, p.name, row.kind, int(row.revision), "unchanged"))
                continue
            rev += 1
            conn.execute(insert(policy_revisions_table).values(
                revision=rev, namespace=p.namespace, name=p.name, action=ACTION_APPLY, content_hash=h, body=body,
                time_ns=now))
            if row is None:
                conn.execute(insert(t).values(namespace=p.namespace, name=p.name, kind=p.kind, revision=rev,
                                              content_hash=h, body=body, created_ns=now, updated_ns=now))
                out.append(ApplyOutcome(p.namespace, p.name, p.kind, rev, "created"))
            else:
                conn.execute(update(t).where(t.c.namespace == p.namespace, t.c.name == p.name)
                             .values(kind=p.kind, revision=rev, content_hash=h, body=body, updated_ns=now))
                out.append(ApplyOutcome(p.namespace, p.name, p.kind, rev, "configured"))
        return rev, out

    def _delete(self, conn: Any, namespace: str, name: str) -> Optional[tuple[int, StoredPolicy]]:
        t = policies_table
        row = conn.execute(select(*_COLUMNS).where(t.c.namespace == namespace, t.c.name == name)).first()
        if row is None:
            return None
        rev = self._revision(conn) + 1
        conn.execute(insert(policy_revisions_table).values(
            revision=rev, namespace=namespace, name=name, action=ACTION_DELETE, content_hash="", body=None,
            time_ns=self._clock()))
        conn.execute(delete(t).where(t.c.namespace == namespace, t.c.name == name))
        return rev, _stored(row)

