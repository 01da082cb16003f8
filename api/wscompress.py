"""Which websocket connections negotiate permessage-deflate.

Deflate runs per connection (every client has its own compression context, so nothing can be shared)
and on the flow stream it cost more CPU than everything else the server does for a client: 43% of the
server's samples while streaming to 5 clients (bench.ws_fanout). Browsers and the ``websockets`` library
offer it on every connection, so the server decides, per request target:

* ``/api/v1/flows/stream``: only when the URL asks for it with ``compress=true`` (and the client offers
  it), for a client on a slow link that would rather spend the server's CPU than bandwidth;
* every other websocket (the dashboard's live view: a few messages per second): whenever offered.

``mode`` (``serve(ws_compression=...)``): ``"auto"`` (the above, default), ``"off"`` (never),
``"on"`` (whenever offered, uvicorn's own behaviour).
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional
from urllib.parse import parse_qsl

from flowscope.filters import FilterError, parse_bool
from flowscope.query import QueryError

log = logging.getLogger(__name__)

COMPRESS_PARAM = "compress"
STREAM_PATH = "/api/v1/flows/stream"
MODES = ("auto", "on", "off")


def stream_compression_requested(params: Iterable[tuple[str, str]]) -> bool:
    """The flow stream's ``compress`` URL parameter (false when absent). Raises QueryError."""
    values = [v for k, v in params if k == COMPRESS_PARAM]
    if len(values) > 1:
        raise QueryError(f"parameter {COMPRESS_PARAM!r} given more than once")
    if not values:
        return False
    try:
        return parse_bool(values[0], COMPRESS_PARAM)
    except FilterError as e:
        raise QueryError(str(e)) from None


def may_compress(target: str, mode: str = "auto") -> bool:
    """Whether a websocket handshake for the request target ``target`` (path and query) may negotiate
    permessage-deflate under ``mode``. A bad ``compress`` value means no (the route reports the error)."""
    if mode == "off":
        return False
    if mode == "on":
        return True
    path, _, query = target.partition("?")
    if not path.rstrip("/").endswith(STREAM_PATH):  # also behind a root path
        return True
    try:
        return stream_compression_requested(parse_qsl(query, keep_blank_values=True))
    except QueryError:
        return False


def uvicorn_ws_options(mode: str = "auto") -> dict[str, Any]:
    """``uvicorn.run`` keyword arguments (``ws``, ``ws_per_message_deflate``) that implement ``mode``."""
    if mode not in MODES:
        raise ValueError(f"ws_compression must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off":
        return {"ws_per_message_deflate": False}
    if mode == "on":
        return {"ws_per_message_deflate": True}
    cls = _auto_protocol()
    if cls is None:  # an uvicorn without the sans-I/O protocol: never compress rather than always
        log.warning("websocket compression is off: this uvicorn has no websockets-sansio protocol")
        return {"ws_per_message_deflate": False}
    return {"ws": cls, "ws_per_message_deflate": True}


_protocol: Optional[type] = None


def _auto_protocol() -> Optional[type]:
    global _protocol
    if _protocol is not None:
        return _protocol
    try:
        from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
    except ImportError:
        return None

    class FlowscopeWebSocketProtocol(WebSocketsSansIOProtocol):  # type: ignore[misc, valid-type]
        """uvicorn's websockets protocol that offers permessage-deflate only where :func:`may_compress`
        allows it (the extension is negotiated in the handshake, before the app sees the request)."""

        def handle_connect(self, event: Any) -> None:
            if not may_compress(event.path, "auto"):
                self.conn.available_extensions = []
            super().handle_connect(event)

    _protocol = FlowscopeWebSocketProtocol
    return _protocol
