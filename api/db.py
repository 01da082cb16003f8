"""Database schema (SQLAlchemy 2.0 typed ORM models) and the engine factory.

The tables are written by :mod:`api.store` with Core/DBAPI ``executemany`` (never ORM objects: too slow
for ingest); the ORM models exist so that the schema is declared once, typed, and compared against the
Alembic migrations by a test.

``flows`` keeps each flow's canonical Hubble JSON in ``body`` (exactly :func:`schema.flow_to_json`), so
queries return byte-identical JSON without re-encoding, plus a few extracted columns that SQL can narrow
on. Secondary indexes are few on purpose: every index costs ingest throughput (see
/work/shared/reference/performance.md), and each one here serves a common query with a time range.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from sqlalchemy import BigInteger, Boolean, Engine, Float, Index, Integer, LargeBinary, SmallInteger, String, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

DEFAULT_DB_URL = "sqlite:///./var/flowscope.db"

# SQLite rowid alias on SQLite, BIGINT elsewhere.
_BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class FlowRow(Base):
    """One Hubble flow. Empty string / NULL means "not set in the flow"."""

    __tablename__ = "flows"

    id: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=True)
    time_ns: Mapped[int] = mapped_column(BigInteger, nullable=False)
    node_name: Mapped[str] = mapped_column(String(253), nullable=False, default="")
    verdict: Mapped[str] = mapped_column(String(24), nullable=False, default="")
    type: Mapped[str] = mapped_column(String(16), nullable=False, default="")
    traffic_direction: Mapped[str] = mapped_column(String(32), nullable=False, default="")
    is_reply: Mapped[Optional[bool]] = mapped_column(Boolean, nullable=True)
    ip_version: Mapped[int] = mapped_column(SmallInteger, nullable=False, default=0)  # 0, 4 or 6
    src_ip: Mapped[str] = mapped_column(String(45), nullable=False, default="")
    dst_ip: Mapped[str] = mapped_column(String(45), nullable=False, default="")
    src_port: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    dst_port: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    # L4 protocol: tcp, udp, icmpv4, icmpv6, sctp ("" when absent).
    protocol: Mapped[str] = mapped_column(String(8), nullable=False, default="")
    # L7 protocol: http, dns, kafka ("" when absent).
    l7_protocol: Mapped[str] = mapped_column(String(8), nullable=False, default="")
    # L7 flow type: REQUEST, RESPONSE, SAMPLE ("" when absent).
    l7_type: Mapped[str] = mapped_column(String(16), nullable=False, default="")
    src_namespace: Mapped[str] = mapped_column(String(253), nullable=False, default="")
    src_pod: Mapped[str] = mapped_column(String(253), nullable=False, default="")
    dst_namespace: Mapped[str] = mapped_column(String(253), nullable=False, default="")
    dst_pod: Mapped[str] = mapped_column(String(253), nullable=False, default="")
    src_identity: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    dst_identity: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    drop_reason: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    http_code: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    # Flowscope's datapath event (flowscope.event): new, flags, close, update, expire, drop.
    flow_event: Mapped[str] = mapped_column(String(16), nullable=False, default="")
    uuid: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    body: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)

    # Every index leads with a low-cardinality column and ends with time_ns, so inserts land at the end
    # of a handful of ranges (nearly append-only): an index led by pod names takes random inserts, dirties
    # a new page per row once it outgrows the cache, and cut sustained ingest by 2-3x in measurements.
    # A pod filter reads its namespace's range newest-first and checks the pod name on the row.
    __table_args__ = (
        Index("ix_flows_time_ns", "time_ns"),
        Index("ix_flows_src_ns_time", "src_namespace", "time_ns"),
        Index("ix_flows_dst_ns_time", "dst_namespace", "time_ns"),
        Index("ix_flows_verdict_time", "verdict", "time_ns"),
    )


class LostEventRow(Base):
    """Loss reported by an agent (kernel buffer, agent queue) or counted by the server."""

    __tablename__ = "lost_events"

    id: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=True)
    time_ns: Mapped[int] = mapped_column(BigInteger, nullable=False)
    node_name: Mapped[str] = mapped_column(String(253), nullable=False, default="")
    source: Mapped[str] = mapped_column(String(32), nullable=False)
    num_lost: Mapped[int] = mapped_column(BigInteger, nullable=False)
    cpu: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)

    __table_args__ = (Index("ix_lost_events_time_ns", "time_ns"),)


class NodeRow(Base):
    """A node that sent flows: when it was last heard of and which agent version it runs."""

    __tablename__ = "nodes"

    name: Mapped[str] = mapped_column(String(253), primary_key=True)
    last_seen_ns: Mapped[int] = mapped_column(BigInteger, nullable=False)
    agent_version: Mapped[str] = mapped_column(String(64), nullable=False, default="")


class IngestBatchRow(Base):
    """An applied ingest batch (idempotent ingest, issue 8): recorded in the same transaction as its flows,
    so a retried batch id is answered from here instead of being stored twice."""

    __tablename__ = "ingest_batches"

    batch_id: Mapped[str] = mapped_column(String(400), primary_key=True)  # node/boot-id/sequence
    node_name: Mapped[str] = mapped_column(String(253), nullable=False, default="")
    first_id: Mapped[int] = mapped_column(BigInteger, nullable=False)  # id of its first flow (0: none)
    flows: Mapped[int] = mapped_column(Integer, nullable=False)
    received_ns: Mapped[int] = mapped_column(BigInteger, nullable=False)

    __table_args__ = (Index("ix_ingest_batches_received_ns", "received_ns"),)


class ApiTokenRow(Base):
    """An API token (api.auth): only the SHA-256 of the secret is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), nullable=False)
    role: Mapped[str] = mapped_column(String(16), nullable=False)  # agent, viewer, admin
    token_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    rate_limit: Mapped[Optional[float]] = mapped_column(Float, nullable=True)  # requests/s; NULL: role default
    created_ns: Mapped[int] = mapped_column(BigInteger, nullable=False)
    last_used_ns: Mapped[Optional[int]] = mapped_column(BigInteger, nullable=True)
    revoked_ns: Mapped[Optional[int]] = mapped_column(BigInteger, nullable=True)


flows_table = FlowRow.__table__
ingest_batches_table = IngestBatchRow.__table__
api_tokens_table = ApiTokenRow.__table__
lost_events_table = LostEventRow.__table__
nodes_table = NodeRow.__table__


SQLITE_PRAGMAS: tuple[str, ...] = (
    "journal_mode=WAL",  # readers never block the writer, and commits append to the WAL
    "synchronous=NORMAL",  # no fsync per commit (durable at checkpoints; never corrupt)
    "busy_timeout=10000",
    "foreign_keys=ON",
    # Checkpoint (copy the WAL into the database, with an fsync) every ~40 MiB instead of every 4 MiB:
    # at ~1.5 MiB of WAL per 1000 flows the default fsynced every third batch.
    "wal_autocheckpoint=10000",
    "journal_size_limit=67108864",  # truncate the WAL back to 64 MiB after a checkpoint
)
"""Pragmas applied to every SQLite connection (the ingest benchmark applies them to its baseline too)."""


def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    # Let SQLAlchemy, not the sqlite3 module, decide where transactions begin (see _sqlite_begin):
    # the driver's implicit BEGIN skips SELECT and DDL, which breaks read-then-write transactions.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    try:
        for pragma in SQLITE_PRAGMAS:
            cur.execute(f"PRAGMA {pragma}")
    finally:
        cur.close()


def _sqlite_begin(conn: Any) -> None:
    # ``conn.execution_options(sqlite_immediate=True)`` takes the write lock at BEGIN: a writer then
    # never fails half-way with SQLITE_BUSY_SNAPSHOT after having read.
    immediate = conn.get_execution_options().get("sqlite_immediate", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def resolve_url(url: Optional[str]) -> str:
    """The URL to use: ``url``, else ``$FLOWSCOPE_DB``, else the default SQLite file."""
    return url or os.environ.get("FLOWSCOPE_DB") or DEFAULT_DB_URL


def make_engine(url: Optional[str] = None, **kwargs: Any) -> Engine:
    """An engine for any SQLAlchemy URL (default ``sqlite:///./var/flowscope.db``).

    For a SQLite file the parent directory is created, and each connection gets WAL, synchronous=NORMAL,
    a busy timeout and foreign keys; transactions are begun by SQLAlchemy (``BEGIN``, or
    ``BEGIN IMMEDIATE`` on a connection with the ``sqlite_immediate=True`` execution option).
    Connections may be used from worker threads."""
    url_obj = make_url(resolve_url(url))
    if url_obj.get_backend_name() == "sqlite":
        database = url_obj.database
        if database and database != ":memory:" and not database.startswith("file:"):
            parent = os.path.dirname(os.path.abspath(database))
            os.makedirs(parent, exist_ok=True)
        connect_args = dict(kwargs.pop("connect_args", {}))
        connect_args.setdefault("check_same_thread", False)
        engine = create_engine(url_obj, connect_args=connect_args, **kwargs)
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(url_obj, pool_pre_ping=True, **kwargs)


def sqlite_path(engine: Engine) -> Optional[str]:
    """The database file of a SQLite engine (None for other backends or in-memory databases)."""
    if engine.dialect.name != "sqlite":
        return None
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return os.path.abspath(database)


# Tables declared on this Base in other modules, imported here so that Base.metadata (migrations, the
# schema test) always holds every table.
from enforcer import store as _policy_tables  # noqa: E402,F401  (policies, policy_revisions)
from api.alerts import store as _alert_tables  # noqa: E402,F401  (alert_* tables, issue 7)
