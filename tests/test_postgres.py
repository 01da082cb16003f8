"""PostgreSQL as a first-class backend, against a real server from Debian started by the fixture: the same
Alembic migrations, COPY ingest, idempotent batch ids, the same query answers as SQLite, retention."""

from __future__ import annotations

import secrets
import time

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from api import db, migrate
from api.db import make_engine
from api.retention import Retention, RetentionPolicy
from api.samples import sample_flows
from api.store import FlowStore, prepare_batch
from flowscope.query import query_from_params
from reliability_env import postgres_cluster


@pytest.fixture(scope="module")
def cluster():
    with postgres_cluster() as c:
        yield c


@pytest.fixture
def pg_engine(cluster):
    url = cluster.create_database("t" + secrets.token_hex(4))
    engine = make_engine(url)
    migrate.upgrade(engine)
    yield engine
    engine.dispose()


def test_migrations_run_and_match_the_models(pg_engine):
    assert migrate.current_revision(pg_engine) == migrate.head_revision()
    with pg_engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), db.Base.metadata)
        indexes = {r[0] for r in conn.exec_driver_sql("SELECT indexname FROM pg_indexes WHERE tablename = 'flows'")}
    assert diff == []
    assert {"ix_flows_time_ns", "ix_flows_src_ns_time", "ix_flows_dst_ns_time", "ix_flows_verdict_time"} <= indexes
    migrate.upgrade(pg_engine)  # idempotent


def test_time_range_queries_use_the_time_index(pg_engine):
    store = FlowStore(pg_engine)
    now = time.time_ns()
    for i in range(10):
        store.insert_prepared([prepare_batch(sample_flows(2000, seed=i, start_ns=now + i * 2_000_000_000, step_ns=1_000_000),
                                             node_name="n")])
    with pg_engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE flows")
        plan = "\n".join(r[0] for r in conn.exec_driver_sql(
            f"EXPLAIN SELECT id FROM flows WHERE time_ns >= {now + 5_000_000_000} AND time_ns < {now + 5_100_000_000}"
            " ORDER BY time_ns, id LIMIT 100"))
    assert "ix_flows_time_ns" in plan, plan


def _batches(node: str, n_batches: int, size: int, start: int, seed: int = 0):
    return [prepare_batch(sample_flows(size, seed=seed + i, start_ns=start + i * size * 1000, step_ns=1000,
                                       node_name=node), node_name=node, batch_id=f"{node}/boot/{i}")
            for i in range(n_batches)]


def test_copy_ingest_ids_and_idempotent_batch_ids(pg_engine):
    store = FlowStore(pg_engine)
    start = time.time_ns()
    first = _batches("n1", 3, 500, start)
    assert store.insert_prepared(first) == 1500
    assert [b.first_id for b in first] == [1, 501, 1001] and not any(b.duplicate for b in first)
    again = _batches("n1", 4, 500, start)  # three retried, one new; one transaction
    assert store.insert_prepared(again) == 500
    assert [b.duplicate for b in again] == [True, True, True, False]
    assert [b.first_id for b in again] == [1, 501, 1001, 1501]
    assert list(again[0].live_items()) == [] and len(list(again[3].live_items())) == 500
    same_twice = _batches("n2", 1, 10, start) + _batches("n2", 1, 10, start)  # one id twice in one transaction
    assert store.insert_prepared(same_twice) == 10 and [b.duplicate for b in same_twice] == [False, True]
    with pg_engine.connect() as conn:
        n, distinct = conn.exec_driver_sql("SELECT count(*), count(DISTINCT node_name || uuid) FROM flows").one()
        applied = conn.exec_driver_sql("SELECT count(*) FROM ingest_batches").scalar()
    assert n == distinct == 2010 and applied == 5
    assert store.applied_batches(["n1/boot/3", "nope"]) == {"n1/boot/3": (1501, 500)}


def test_same_answers_as_sqlite(pg_engine, tmp_path):
    """The query layer gives byte-identical answers on both backends for the same data."""
    lite = make_engine(f"sqlite:///{tmp_path}/same.db")
    migrate.upgrade(lite)
    start = time.time_ns() - 10**12
    stores = [FlowStore(pg_engine), FlowStore(lite)]
    for node in ("node-a", "node-b", "node-c"):
        for st in stores:
            st.insert_prepared(_batches(node, 2, 400, start, seed=hash(node) % 1000))
    queries = [[], [("node_name", "node-b")], [("node_name", "node-a"), ("node_name", "node-c")],
               [("verdict", "DROPPED")], [("protocol", "tcp"), ("not_node_name", "node-a")],
               [("source_pod", "shop/")], [("last", "50")], [("first", "7"), ("node_name", "node-c")]]
    for params in queries:
        q = query_from_params(params + ([] if any(k in ("last", "first") for k, _ in params) else [("last", "100000")]))
        rq = q.resolve(time.time_ns())
        got = [list(st.query(rq)) for st in stores]
        assert got[0] == got[1], params
        assert got[0], params
    by_node = {n: sum(1 for _ in stores[0].query(query_from_params([("node_name", n), ("last", "100000")])
                                                   .resolve(time.time_ns())))
               for n in ("node-a", "node-b", "node-c")}
    assert by_node == {"node-a": 800, "node-b": 800, "node-c": 800}
    assert [n["name"] for n in stores[0].nodes()] == ["node-a", "node-b", "node-c"]
    lite.dispose()


def test_retention_by_age_and_size(pg_engine):
    store = FlowStore(pg_engine)
    now = time.time_ns()
    old = now - 10 * 86400 * 10**9
    store.insert_prepared([prepare_batch(sample_flows(3000, seed=1, start_ns=old, step_ns=1000), node_name="n")])
    store.insert_prepared([prepare_batch(sample_flows(2000, seed=2, start_ns=now - 10**9, step_ns=1000), node_name="n")])
    r = Retention(pg_engine, RetentionPolicy(max_age_s=7 * 86400, max_bytes=0, chunk_rows=700, pause_s=0)).run_once()
    assert r.deleted_by_age == 3000 and r.transactions >= 5
    with pg_engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*), min(time_ns) >= %d FROM flows" % (now - 10**9 - 1)).one() == (2000, True)
        conn.exec_driver_sql("ANALYZE flows")
        conn.commit()
    ret = Retention(pg_engine, RetentionPolicy(max_age_s=0, max_bytes=1, chunk_rows=500, pause_s=0))
    used = ret.used_bytes()
    assert used and used > 100_000
    r = ret.run_once()
    assert r.deleted_by_size == 1999  # everything but the newest flow
    with pg_engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM flows").scalar() == 1


def test_one_retention_pass_at_a_time_across_processes(pg_engine):
    """Two servers on one database: the second pass skips while the first holds the advisory lock."""
    from api.retention import RETENTION_LOCK_KEY

    ret = Retention(pg_engine, RetentionPolicy(max_age_s=86400, max_bytes=0))
    with pg_engine.connect() as other:
        assert other.exec_driver_sql(f"SELECT pg_try_advisory_lock({RETENTION_LOCK_KEY})").scalar()
        assert ret.run_once().skipped
        other.exec_driver_sql(f"SELECT pg_advisory_unlock({RETENTION_LOCK_KEY})")
    assert not ret.run_once().skipped
