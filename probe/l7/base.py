"""Common plumbing for the stream parsers: directions, counters, the never-raise wrapper."""

from __future__ import annotations

from collections import Counter
from typing import Any

from probe.l7.config import L7Config
from probe.l7.records import L7Event

CLIENT = "client"
SERVER = "server"
DIRECTIONS = (CLIENT, SERVER)
DEFAULT_CONFIG = L7Config()


class Handoff:
    """Asks the owner to replace this parser (e.g. HTTP/1.1 ``Upgrade: h2c`` → HTTP/2)."""

    __slots__ = ("protocol", "pending", "context")

    def __init__(self, protocol: str, pending: list[tuple[str, bytes, int]], context: Any = None) -> None:
        self.protocol = protocol
        #: Bytes already received but not consumed, in arrival order: (direction, data, ts_ns).
        self.pending = pending
        self.context = context


class StreamParser:
    """Base of the per-connection parsers: bytes in, events out, exceptions never out.

    Subclasses implement ``_feed``/``_gap``/``_close``/``_resync``/``buffered_bytes``; any exception
    they raise is counted as ``parse_errors`` and the direction is resynchronised.
    """

    protocol = "unknown"

    def __init__(self, config: L7Config | None = None) -> None:
        self.config = config or DEFAULT_CONFIG
        self.stats: Counter[str] = Counter()
        self.handoff: Handoff | None = None

    def feed(self, direction: str, data: bytes, ts_ns: int) -> list[L7Event]:
        """Consume in-order bytes of one direction; return the completed events."""
        out: list[L7Event] = []
        if not data:
            return out
        try:
            self._feed(direction, data, ts_ns, out)
        except Exception:  # noqa: BLE001 - garbage must never escape a parser
            self._failed(direction)
        return out

    def gap(self, direction: str, lost: int, ts_ns: int) -> list[L7Event]:
        """Bytes were lost in ``direction``: drop partial state and resynchronise."""
        out: list[L7Event] = []
        self.stats["gaps"] += 1
        try:
            self._gap(direction, lost, ts_ns, out)
        except Exception:  # noqa: BLE001
            self._failed(direction)
        return out

    def close(self, ts_ns: int) -> list[L7Event]:
        """The connection ended: emit what can still be said about unfinished messages."""
        out: list[L7Event] = []
        try:
            self._close(ts_ns, out)
        except Exception:  # noqa: BLE001
            self.stats["parse_errors"] += 1
        return out

    def _failed(self, direction: str) -> None:
        self.stats["parse_errors"] += 1
        try:
            self._resync(direction)
        except Exception:  # noqa: BLE001 - a broken resync must not escape either
            self.stats["resync_failures"] += 1

    # -- subclass hooks -------------------------------------------------------------------------
    def _feed(self, direction: str, data: bytes, ts_ns: int, out: list[L7Event]) -> None:
        raise NotImplementedError

    def _gap(self, direction: str, lost: int, ts_ns: int, out: list[L7Event]) -> None:
        self._resync(direction)

    def _close(self, ts_ns: int, out: list[L7Event]) -> None:
        return None

    def _resync(self, direction: str) -> None:
        raise NotImplementedError

    def buffered_bytes(self) -> int:
        """Bytes currently held (all directions)."""
        return 0
