"""Retention: delete old flows by age and by database size, in the background, in small chunks.

Defaults (``flowscope server`` flags):

====================================  ==========  ==================================================
``--retention-max-age``               ``7d``      flows (and lost-event records) older than this go
``--retention-max-size``              ``10GiB``   the oldest flows go while the flows use more than this
``--retention-interval``              ``60s``     how often a pass runs
====================================  ==========  ==================================================

``0`` turns a limit off. Applied batch ids (idempotent ingest) are kept as long as flows (at least a day),
so an agent's spool can still be deduplicated after a long outage.

A pass deletes at most ``chunk_rows`` (2000) flows per transaction, oldest first, and sleeps
``pause_s`` (50 ms) between transactions, so the writer never waits long for the database: each delete
transaction holds SQLite's write lock for a few milliseconds to some tens of milliseconds. The newest
flow is never deleted (row ids continue from it, and live streams rely on ids only growing).

Size is measured as the space the data occupies: on SQLite ``(page_count - freelist_count) × page_size``
(the file does not shrink; freed pages are reused by new flows); on PostgreSQL the total size of the
``flows`` table and its indexes scaled by its share of live tuples (space of deleted rows is reused after
autovacuum). When over the limit, a pass deletes the oldest flows down to 90 % of it (hysteresis), the
row count estimated from the average row size. With several server processes on one PostgreSQL, one of
them runs a pass at a time (an advisory lock).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from sqlalchemy import Engine, and_, delete, func, select

from .db import flows_table, ingest_batches_table, lost_events_table

log = logging.getLogger("flowscope.retention")

DAY_S = 86400.0
DEFAULT_MAX_AGE_S = 7 * DAY_S
DEFAULT_MAX_BYTES = 10 << 30
DEFAULT_INTERVAL_S = 60.0
MIN_BATCH_ID_AGE_S = DAY_S
RETENTION_LOCK_KEY = 0x464C5254  # pg_try_advisory_lock key ("FLRT")

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "ki": 1024, "kib": 1024, "m": 1000**2, "mb": 1000**2,
               "mi": 1024**2, "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gi": 1024**3, "gib": 1024**3,
               "t": 1000**4, "tb": 1000**4, "ti": 1024**4, "tib": 1024**4}


def parse_duration(text: str) -> float:
    """Seconds of ``7d``, ``12h``, ``1h30m``, ``90s``, ``0`` (off) or a plain number of seconds."""
    t = text.strip().lower()
    if not t:
        raise ValueError("empty duration")
    try:
        v = float(t)
    except ValueError:
        pos, total = 0, 0.0
        for m in _DURATION.finditer(t):
            if m.start() != pos:
                break
            total += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if pos != len(t) or pos == 0:
            raise ValueError(f"invalid duration {text!r}: use e.g. 7d, 12h, 30m, 90s or 0 (off)") from None
        return total
    if v < 0:
        raise ValueError(f"invalid duration {text!r}: negative")
    return v


def parse_size(text: str) -> int:
    """Bytes of ``10GiB``, ``500MB``, ``2g``, ``0`` (off) or a plain number of bytes."""
    m = _SIZE.match(text.strip())
    if not m:
        raise ValueError(f"invalid size {text!r}: use e.g. 10GiB, 500MB or 0 (off)")
    return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()])


@dataclass
class RetentionPolicy:
    max_age_s: float = DEFAULT_MAX_AGE_S  # 0: no age limit
    max_bytes: int = DEFAULT_MAX_BYTES  # 0: no size limit
    interval_s: float = DEFAULT_INTERVAL_S
    chunk_rows: int = 2000
    pause_s: float = 0.05
    low_watermark: float = 0.9  # a size pass goes down to this share of max_bytes

    @property
    def enabled(self) -> bool:
        return self.max_age_s > 0 or self.max_bytes > 0


@dataclass
class PassReport:
    deleted_by_age: int = 0
    deleted_by_size: int = 0
    deleted_lost_events: int = 0
    deleted_batch_ids: int = 0
    used_bytes_before: Optional[int] = None
    used_bytes_after: Optional[int] = None
    transactions: int = 0
    longest_transaction_s: float = 0.0
    seconds: float = 0.0
    skipped: bool = False  # another server process is running a pass

    @property
    def deleted(self) -> int:
        return self.deleted_by_age + self.deleted_by_size


@dataclass
class RetentionStats:
    passes: int = 0
    deleted_flows: int = 0
    last_pass: Optional[dict[str, Any]] = None
    errors: int = 0
    last_error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Retention:
    """Runs :meth:`run_once` every ``policy.interval_s`` in a daemon thread (``start``/``stop``).
    ``on_deleted(n)`` is told how many flows went (the store's flow count)."""

    def __init__(self, engine: Engine, policy: Optional[RetentionPolicy] = None,
                 on_deleted: Optional[Callable[[int], None]] = None) -> None:
        self.engine = engine
        self.policy = policy or RetentionPolicy()
        self.on_deleted = on_deleted
        self.stats = RetentionStats()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._pg = engine.dialect.name == "postgresql"

    # ---- measuring ----

    def used_bytes(self) -> Optional[int]:
        """Bytes the flows occupy (see the module doc); None when the backend cannot tell."""
        with self.engine.connect() as conn:
            if self.engine.dialect.name == "sqlite":
                pages = conn.exec_driver_sql("PRAGMA page_count").scalar() or 0
                free = conn.exec_driver_sql("PRAGMA freelist_count").scalar() or 0
                size = conn.exec_driver_sql("PRAGMA page_size").scalar() or 4096
                return (pages - free) * size
            if self._pg:
                total = conn.exec_driver_sql("SELECT pg_total_relation_size('flows')").scalar() or 0
                row = conn.exec_driver_sql(
                    "SELECT n_live_tup, n_dead_tup FROM pg_stat_user_tables WHERE relname = 'flows'").first()
                if row is None or not (row[0] or row[1]):
                    return int(total)
                live, dead = int(row[0] or 0), int(row[1] or 0)
                return int(total * live / max(1, live + dead))
        return None

    def _id_range(self) -> tuple[int, int]:
        t = flows_table.c
        with self.engine.connect() as conn:
            lo, hi = conn.execute(select(func.min(t.id), func.max(t.id))).one()
        return int(lo or 0), int(hi or 0)

    # ---- deleting ----

    def _delete_chunk(self, where: Any, limit: int, report: PassReport) -> int:
        """Delete up to ``limit`` of the oldest flows matching ``where``; one short transaction."""
        t = flows_table.c
        ids = select(t.id).where(where).order_by(t.time_ns, t.id).limit(limit)
        started = time.monotonic()
        with self.engine.connect() as conn:
            conn.execution_options(sqlite_immediate=True)
            with conn.begin():
                n = conn.execute(delete(flows_table).where(t.id.in_(ids.scalar_subquery()))).rowcount or 0
        took = time.monotonic() - started
        report.transactions += 1
        report.longest_transaction_s = max(report.longest_transaction_s, took)
        if n and self.on_deleted is not None:
            self.on_deleted(n)
        return n

    def _delete_older(self, table: Any, column: Any, cutoff_ns: int, report: PassReport) -> int:
        total = 0
        while not self._stop.is_set():
            pk = list(table.primary_key.columns)[0]
            ids = select(pk).where(column < cutoff_ns).limit(self.policy.chunk_rows)
            started = time.monotonic()
            with self.engine.connect() as conn:
                conn.execution_options(sqlite_immediate=True)
                with conn.begin():
                    n = conn.execute(delete(table).where(pk.in_(ids.scalar_subquery()))).rowcount or 0
            report.transactions += 1
            report.longest_transaction_s = max(report.longest_transaction_s, time.monotonic() - started)
            total += n
            if n < self.policy.chunk_rows:
                break
            self._stop.wait(self.policy.pause_s)
        return total

    def run_once(self, now_ns: Optional[int] = None) -> PassReport:
        """One pass: by age, then by size. Safe to call from any thread (one pass at a time per database
        on PostgreSQL)."""
        report = PassReport()
        started = time.monotonic()
        if not self.policy.enabled:
            return report
        if self._pg:
            with self.engine.connect() as lock_conn:
                got = lock_conn.exec_driver_sql(f"SELECT pg_try_advisory_lock({RETENTION_LOCK_KEY})").scalar()
                lock_conn.commit()
                if not got:
                    report.skipped = True
                    return report
                try:
                    self._pass(report, now_ns)
                finally:
                    lock_conn.exec_driver_sql(f"SELECT pg_advisory_unlock({RETENTION_LOCK_KEY})")
                    lock_conn.commit()
        else:
            self._pass(report, now_ns)
        report.seconds = time.monotonic() - started
        return report

    def _pass(self, report: PassReport, now_ns: Optional[int]) -> None:
        p = self.policy
        now = time.time_ns() if now_ns is None else now_ns
        t = flows_table.c
        _, newest_id = self._id_range()
        if newest_id == 0:
            return
        keep_newest = t.id < newest_id
        if p.max_age_s > 0:
            cutoff = now - int(p.max_age_s * 1e9)
            while not self._stop.is_set():
                n = self._delete_chunk(and_(t.time_ns < cutoff, keep_newest), p.chunk_rows, report)
                report.deleted_by_age += n
                if n < p.chunk_rows:
                    break
                self._stop.wait(p.pause_s)
            report.deleted_lost_events = self._delete_older(lost_events_table, lost_events_table.c.time_ns, cutoff,
                                                            report)
        batch_age = max(p.max_age_s if p.max_age_s > 0 else 7 * DAY_S, MIN_BATCH_ID_AGE_S)
        report.deleted_batch_ids = self._delete_older(ingest_batches_table, ingest_batches_table.c.received_ns,
                                                      now - int(batch_age * 1e9), report)
        if p.max_bytes > 0:
            used = self.used_bytes()
            report.used_bytes_before = used
            if used is not None and used > p.max_bytes:
                lo, hi = self._id_range()
                rows = max(1, hi - lo + 1)
                excess = used - int(p.max_bytes * p.low_watermark)
                to_delete = min(rows - 1, max(1, int(excess / (used / rows)) + 1))
                while to_delete > 0 and not self._stop.is_set():
                    n = self._delete_chunk(keep_newest, min(p.chunk_rows, to_delete), report)
                    report.deleted_by_size += n
                    to_delete -= n
                    if n == 0:
                        break
                    self._stop.wait(p.pause_s)
                report.used_bytes_after = self.used_bytes()

    # ---- the background thread ----

    def _run(self) -> None:
        while not self._stop.wait(self.policy.interval_s if self.stats.passes else min(5.0, self.policy.interval_s)):
            try:
                rep = self.run_once()
            except Exception as e:  # noqa: BLE001 - try again next interval
                self.stats.errors += 1
                self.stats.last_error = f"{type(e).__name__}: {e}"
                log.warning("retention pass failed: %s", self.stats.last_error)
                continue
            self.stats.passes += 1
            self.stats.deleted_flows += rep.deleted
            self.stats.last_pass = {
                "deleted_by_age": rep.deleted_by_age, "deleted_by_size": rep.deleted_by_size,
                "used_bytes_before": rep.used_bytes_before, "used_bytes_after": rep.used_bytes_after,
                "transactions": rep.transactions, "longest_transaction_ms": round(rep.longest_transaction_s * 1000, 1),
                "seconds": round(rep.seconds, 3), "skipped": rep.skipped}
            if rep.deleted:
                log.info("retention: deleted %d flows (%d by age, %d by size) in %d transactions, longest %.0f ms",
                         rep.deleted, rep.deleted_by_age, rep.deleted_by_size, rep.transactions,
                         rep.longest_transaction_s * 1000)

    def start(self) -> "Retention":
        if self.policy.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="flowscope-retention", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def status(self) -> dict[str, Any]:
        p = self.policy
        return {"max_age_s": p.max_age_s, "max_bytes": p.max_bytes, "interval_s": p.interval_s,
                "passes": self.stats.passes, "deleted_flows": self.stats.deleted_flows,
                "last_pass": self.stats.last_pass, "errors": self.stats.errors}
