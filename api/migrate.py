"""Apply the Alembic migrations in ``migrations/`` from code (at server start)."""

from __future__ import annotations

import logging
import os
from typing import Optional

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

import migrations

from .db import make_engine

MIGRATIONS_DIR = os.path.dirname(os.path.abspath(migrations.__file__))
logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # one INFO line per plugin otherwise


def alembic_config() -> Config:
    """An Alembic config pointing at the packaged ``migrations`` directory, independent of the cwd."""
    cfg = Config(os.path.join(MIGRATIONS_DIR, "alembic.ini"))
    cfg.set_main_option("script_location", MIGRATIONS_DIR)
    cfg.attributes["configure_logger"] = False
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> Optional[str]:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(target: "str | Engine | None" = None, revision: str = "head") -> None:
    """Bring the database at ``target`` (URL or engine; default URL when None) to ``revision``.

    Idempotent: a database already at head is left alone. On SQLite the whole upgrade runs in one
    ``BEGIN IMMEDIATE`` transaction, on PostgreSQL in one transaction under an advisory lock, so two
    servers starting at once cannot interleave DDL."""
    engine = target if isinstance(target, Engine) else make_engine(target)
    try:
        with engine.connect() as conn:
            conn.execution_options(sqlite_immediate=True)
            with conn.begin():
                if conn.dialect.name == "postgresql":  # servers starting at once take turns (issue 8)
                    conn.exec_driver_sql("SELECT pg_advisory_xact_lock(1179405133)")  # "FLMM"
                cfg = alembic_config()
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, revision)
    finally:
        if not isinstance(target, Engine):
            engine.dispose()
