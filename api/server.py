"""Run the server: migrations, then uvicorn. ``flowscope server`` and ``flowscope up`` call :func:`serve`."""

from __future__ import annotations

import gc
import logging
import os
from typing import Any, Optional

import uvicorn
from fastapi import FastAPI

from . import migrate
from .app import Settings, create_app
from .db import make_engine, resolve_url
from .wscompress import uvicorn_ws_options

log = logging.getLogger(__name__)


def tune_gc() -> None:
    """Ingest allocates ~15 container objects per flow and keeps each batch alive until its commit: with
    CPython's default thresholds the collector then spends more time than decoding. Move everything
    allocated at start-up out of the collector's way and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def build_app(db_url: Optional[str] = None, **settings: Any) -> FastAPI:
    """The app over ``db_url`` (default ``$FLOWSCOPE_DB`` or ``sqlite:///./var/flowscope.db``), migrated.
    Extra keyword arguments set :class:`api.app.Settings` fields."""
    return create_app(Settings(db_url=resolve_url(db_url), **settings))


def serve(db_url: Optional[str] = None, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info",
          ws_compression: Optional[str] = None, **settings: Any) -> None:
    """Apply migrations, then serve the API with uvicorn until interrupted.

    API tokens are required when ``host`` is not a loopback address (``auth_required=True`` requires them
    on loopback too; ``False`` beyond loopback is refused).

    ``ws_compression`` (default ``$FLOWSCOPE_WS_COMPRESSION`` or ``auto``): which websockets negotiate
    permessage-deflate, see :mod:`api.wscompress` (``auto``: all but the flow stream, which compresses
    only with ``?compress=true``; ``on``; ``off``)."""
    from .auth import is_loopback_host, log_startup_hint

    mode = (ws_compression or os.environ.get("FLOWSCOPE_WS_COMPRESSION") or "auto").strip().lower()
    try:
        ws_options = uvicorn_ws_options(mode)
    except ValueError as e:
        raise SystemExit(str(e)) from None

    auth = settings.pop("auth_required", None)
    if auth is None:
        auth = not is_loopback_host(host)
    elif not auth and not is_loopback_host(host):
        raise SystemExit(f"refusing to serve on {host} without authentication: API tokens are required "
                         "beyond loopback (flowscope token create)")
    url = resolve_url(db_url)
    engine = make_engine(url)
    try:
        migrate.upgrade(engine)
        log.info("database %s is at revision %s", engine.url.render_as_string(hide_password=True),
                 migrate.current_revision(engine))
    finally:
        engine.dispose()
    app = create_app(Settings(db_url=url, migrate=False, auth_required=auth, **settings))
    log_startup_hint(app.state.auth, engine.url.render_as_string(hide_password=True))
    tune_gc()
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                ws_ping_interval=20, ws_ping_timeout=20, **ws_options)
