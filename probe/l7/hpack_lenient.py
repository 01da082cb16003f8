"""Best-effort HPACK decoding once the real dynamic table is unknown (mid-stream start, loss).

Entries inserted since sync was lost are known and sit at the newest indices; references to
older (unknown) entries are skipped and counted instead of failing the whole block. Once the
known entries fill the table so that no unknown entry can still fit, the table is complete again.
Strings and integers are decoded with the ``hpack`` library's own primitives.
"""

from __future__ import annotations

from collections import deque

from hpack.hpack import decode_huffman, decode_integer
from hpack.table import HeaderTable

_STATIC = HeaderTable.STATIC_TABLE
_NSTATIC = len(_STATIC)
_ENTRY_OVERHEAD = 32


class LenientDecoder:
    """Decode header blocks against a partially known dynamic table."""

    __slots__ = ("entries", "size", "maxsize", "cap", "complete", "unknown_refs")

    def __init__(self, entries: tuple[tuple[bytes, bytes], ...] = (), maxsize: int = 4096,
                 complete: bool = False, cap: int = 64 * 1024) -> None:
        self.entries: deque[tuple[bytes | None, bytes]] = deque(entries)
        self.size = sum(len(n) + len(v) + _ENTRY_OVERHEAD for n, v in entries)
        self.maxsize = maxsize
        self.cap = cap
        self.complete = complete
        self.unknown_refs = 0

    def _get(self, index: int) -> tuple[bytes | None, bytes | None]:
        if 0 < index <= _NSTATIC:
            return _STATIC[index - 1]
        j = index - _NSTATIC - 1
        if 0 <= j < len(self.entries):
            return self.entries[j]
        self.unknown_refs += 1
        return None, None

    def _add(self, name: bytes | None, value: bytes) -> None:
        size = len(name or b"") + len(value) + _ENTRY_OVERHEAD
        if size > self.maxsize:
            self.entries.clear()
            self.size = 0
            self.complete = True
            return
        self.entries.appendleft((name, value))
        self.size += size
        self._shrink()

    def _shrink(self) -> None:
        limit = min(self.maxsize, self.cap)
        while self.size > limit and self.entries:
            n, v = self.entries.pop()
            self.size -= len(n or b"") + len(v) + _ENTRY_OVERHEAD
        if self.maxsize - self.size < _ENTRY_OVERHEAD and self.maxsize <= self.cap:
            self.complete = True  # no room left for any entry we never saw

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """Known headers of ``block`` in order; stops quietly at a malformed representation."""
        out: list[tuple[bytes, bytes]] = []
        data = memoryview(block)
        i, n = 0, len(block)
        try:
            while i < n:
                b = block[i]
                if b & 0x80:
                    idx, used = decode_integer(data[i:], 7)
                    i += used
                    name, value = self._get(idx)
                    if name is not None and value is not None:
                        out.append((name, value))
                    continue
                if b & 0x40:
                    prefix, index_it = 6, True
                elif b & 0x20:
                    size, used = decode_integer(data[i:], 5)
                    i += used
                    self.maxsize = size
                    if size == 0:
                        self.entries.clear()
                        self.size = 0
                        self.complete = True
                    self._shrink()
                    continue
                else:
                    prefix, index_it = 4, False
                idx, used = decode_integer(data[i:], prefix)
                i += used
                if idx:
                    name = self._get(idx)[0]
                else:
                    name, i = self._string(block, data, i)
                value, i = self._string(block, data, i)
                if index_it:
                    self._add(name, value)
                if name is not None:
                    out.append((name, value))
        except Exception:  # noqa: BLE001 - truncated or bad huffman: keep what was decoded
            self.complete = False
            raise _Partial(out) from None
        return out

    @staticmethod
    def _string(block: bytes, data: memoryview, i: int) -> tuple[bytes, int]:
        huff = block[i] & 0x80
        length, used = decode_integer(data[i:], 7)
        i += used
        raw = block[i:i + length]
        if len(raw) != length:
            raise ValueError("truncated string")
        return (decode_huffman(raw) if huff else raw), i + length


class _Partial(Exception):
    """Raised with the headers decoded before a malformed representation."""

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        super().__init__("partial header block")
        self.headers = headers


PartialBlock = _Partial
