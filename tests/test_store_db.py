"""Schema, engine and migrations on real SQLite files."""

from __future__ import annotations

import os
import sqlite3

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from api import db, migrate


def test_migration_matches_models_and_is_idempotent(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path}/f.db")
    try:
        assert migrate.current_revision(engine) is None
        migrate.upgrade(engine)
        assert migrate.current_revision(engine) == migrate.head_revision()
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), db.Base.metadata)
        assert diff == [], f"models and migrations disagree: {diff}"
        # Restart: upgrading an up-to-date database changes nothing and keeps data.
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO nodes (name, last_seen_ns, agent_version) VALUES ('n', 1, 'v')"))
        migrate.upgrade(engine)
        migrate.upgrade(f"sqlite:///{tmp_path}/f.db")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM nodes")).scalar() == 1
    finally:
        engine.dispose()


def test_flows_table_has_few_deliberate_indexes(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path}/f.db")
    try:
        migrate.upgrade(engine)
        indexes = {ix["name"]: ix["column_names"] for ix in inspect(engine).get_indexes("flows")}
        assert indexes == {
            "ix_flows_time_ns": ["time_ns"],
            "ix_flows_src_ns_time": ["src_namespace", "time_ns"],
            "ix_flows_dst_ns_time": ["dst_namespace", "time_ns"],
            "ix_flows_verdict_time": ["verdict", "time_ns"],
        }
    finally:
        engine.dispose()


def test_sqlite_engine_pragmas_and_directory(tmp_path):
    path = tmp_path / "nested" / "dir" / "flows.db"
    engine = db.make_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA synchronous")).scalar() == 1  # NORMAL
            assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 10000
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert path.parent.is_dir()
        assert db.sqlite_path(engine) == str(path)
    finally:
        engine.dispose()


def test_default_url_is_relative_to_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLOWSCOPE_DB", raising=False)
    assert db.resolve_url(None) == "sqlite:///./var/flowscope.db"
    engine = db.make_engine(None)
    try:
        migrate.upgrade(engine)  # works from any working directory: the migrations are found by package
    finally:
        engine.dispose()
    assert (tmp_path / "var" / "flowscope.db").exists()
    with sqlite3.connect(tmp_path / "var" / "flowscope.db") as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"flows", "lost_events", "nodes", "alembic_version"} <= tables


def test_env_var_url(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWSCOPE_DB", f"sqlite:///{tmp_path}/env.db")
    assert db.resolve_url(None) == f"sqlite:///{tmp_path}/env.db"
    assert db.resolve_url("sqlite:///x.db") == "sqlite:///x.db"


def test_write_transactions_take_the_lock_at_begin(tmp_path):
    """sqlite_immediate=True begins with BEGIN IMMEDIATE: a second writer waits (busy) instead of failing
    half-way through its transaction."""
    engine = db.make_engine(f"sqlite:///{tmp_path}/f.db")
    try:
        migrate.upgrade(engine)
        with engine.connect() as conn:
            conn.execution_options(sqlite_immediate=True)
            with conn.begin():
                other = sqlite3.connect(f"{tmp_path}/f.db", timeout=0)
                try:
                    other.execute("BEGIN IMMEDIATE")
                except sqlite3.OperationalError as e:
                    assert "locked" in str(e)
                else:  # pragma: no cover - the lock was not held
                    raise AssertionError("the write lock was not taken at BEGIN")
                finally:
                    other.close()
    finally:
        engine.dispose()
    assert os.path.exists(f"{tmp_path}/f.db")
