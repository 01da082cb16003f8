"""Retention (api/retention.py) on real SQLite files: by age, by size, in small transactions; in the
background of a real server process; durations and sizes parsed with clear errors."""

from __future__ import annotations

import time

import httpx
import pytest

from api import migrate
from api.db import make_engine
from api.retention import Retention, RetentionPolicy, parse_duration, parse_size
from api.samples import sample_flows
from api.store import FlowStore, prepare_batch
from flowscope import schema
from reliability_env import ServerProcess, wait_for

DAY_NS = 86400 * 10**9


@pytest.fixture
def store(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path}/r.db")
    migrate.upgrade(engine)
    yield FlowStore(engine)
    engine.dispose()


def count(store: FlowStore, sql: str = "SELECT count(*) FROM flows") -> int:
    with store.engine.connect() as conn:
        return conn.exec_driver_sql(sql).scalar()


def test_parse_durations_and_sizes():
    assert parse_duration("7d") == 7 * 86400 and parse_duration("1h30m") == 5400 and parse_duration("90") == 90
    assert parse_duration("0") == 0 and parse_duration("250ms") == 0.25 and parse_duration("2w") == 14 * 86400
    assert parse_size("10GiB") == 10 << 30 and parse_size("500MB") == 500_000_000 and parse_size("0") == 0
    assert parse_size("1.5k") == 1500 and parse_size("64 MiB") == 64 << 20
    for bad in ("", "7 days", "-1", "1d2", "h"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)
    for bad in ("lots", "10XB", "-5"):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)


def test_by_age_in_small_transactions_keeping_the_newest(store):
    now = time.time_ns()
    old = prepare_batch(sample_flows(5000, seed=1, start_ns=now - 9 * DAY_NS, step_ns=10**6), node_name="n",
                        batch_id="n/a/1", now_ns=now - 9 * DAY_NS)
    old.lost_rows = [(now - 9 * DAY_NS, "n", "PERF_EVENT_RING_BUFFER", 3, 0)]
    new = prepare_batch(sample_flows(1000, seed=2, start_ns=now - 10**9, step_ns=10**5), node_name="n",
                        batch_id="n/a/2")
    store.insert_prepared([old])
    store.insert_prepared([new])
    assert store.num_flows() == 6000
    r = Retention(store.engine, RetentionPolicy(max_age_s=7 * 86400, max_bytes=0, chunk_rows=800, pause_s=0),
                  on_deleted=store.note_deleted).run_once()
    assert r.deleted_by_age == 5000 and r.transactions >= 7 and r.deleted_lost_events == 1
    assert r.deleted_batch_ids == 1  # the old batch id (older than max age) is forgotten too
    assert count(store) == 1000 and store.num_flows() == 1000
    assert count(store, "SELECT count(*) FROM ingest_batches") == 1
    # an idle server whose every flow is old keeps the newest one: ids never go back
    later = Retention(store.engine, RetentionPolicy(max_age_s=1, max_bytes=0, pause_s=0))
    assert later.run_once(now_ns=now + 30 * DAY_NS).deleted_by_age == 999
    assert count(store) == 1 and store.last_id() == store.db_last_id() == 6000


def test_by_size_down_to_the_low_watermark(store):
    now = time.time_ns()
    for i in range(10):
        store.insert_prepared([prepare_batch(sample_flows(2000, seed=i, start_ns=now + i * 10**9), node_name="n")])
    ret = Retention(store.engine, RetentionPolicy(max_age_s=0, max_bytes=0, pause_s=0))
    used = ret.used_bytes()
    assert used > 5_000_000
    limit = used // 2
    ret.policy.max_bytes = limit
    r = ret.run_once()
    assert r.used_bytes_before == used and r.deleted_by_size > 8000
    assert r.used_bytes_after <= limit  # freed pages are reused by new flows
    with store.engine.connect() as conn:
        oldest = conn.exec_driver_sql("SELECT min(time_ns) FROM flows").scalar()
    assert oldest >= now + 4 * 10**9  # the oldest went first
    assert ret.run_once().deleted_by_size == 0  # below the limit now: nothing more


def test_disabled_policy_does_nothing(store):
    store.insert_prepared([prepare_batch(sample_flows(10, start_ns=1), node_name="n")])
    ret = Retention(store.engine, RetentionPolicy(max_age_s=0, max_bytes=0))
    assert not ret.policy.enabled and ret.run_once().deleted == 0 and count(store) == 10
    ret.start()  # no thread for a disabled policy
    assert ret._thread is None


def test_background_retention_in_the_server(tmp_path):
    code = "retention=__import__('api.retention', fromlist=['x']).RetentionPolicy(max_age_s=3600, interval_s=1)"
    with ServerProcess(f"sqlite:///{tmp_path}/bg.db", settings_code=code) as srv:
        now = time.time_ns()
        for node, start in (("old", now - 2 * 3600 * 10**9), ("new", now - 10**9)):
            body = schema.encode({"node_name": node, "flows": sample_flows(300, start_ns=start, node_name=node)})
            assert httpx.post(srv.url + "/api/v1/flows", content=body, timeout=30).status_code == 200

        def old_gone() -> bool:
            r = httpx.get(srv.url + "/api/v1/flows?node_name=old&first=1000", timeout=30)
            return r.text.strip() == ""

        wait_for(old_gone, timeout=30, what="retention to delete the old flows")
        st = httpx.get(srv.url + "/api/v1/status", timeout=30).json()
        assert st["retention"]["deleted_flows"] == 300 and st["retention"]["max_age_s"] == 3600
        assert st["num_flows"] == 300
        r = httpx.get(srv.url + "/api/v1/flows?node_name=new&first=1000", timeout=30)
        assert len(r.text.splitlines()) == 300
