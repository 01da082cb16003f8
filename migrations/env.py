"""Alembic environment for Flowscope.

Used two ways:
* programmatically by :func:`api.migrate.upgrade`, which passes an open connection in
  ``config.attributes["connection"]`` (works from any working directory and from an installed package);
* from the command line: ``alembic -c migrations/alembic.ini -x url=<SQLAlchemy URL> upgrade head``.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context

from api.db import Base, make_engine, resolve_url

config = context.config
target_metadata = Base.metadata

if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    return context.get_x_argument(as_dictionary=True).get("url") or resolve_url(config.get_main_option("sqlalchemy.url"))


def _configure(**kwargs) -> None:
    context.configure(target_metadata=target_metadata, compare_type=True, **kwargs)


def run_migrations_offline() -> None:
    url = _url()
    _configure(url=url, literal_binds=True, render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as conn:
            conn.execution_options(sqlite_immediate=True)
            _configure(connection=conn, render_as_batch=conn.dialect.name == "sqlite")
            with context.begin_transaction():
                context.run_migrations()
            conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
