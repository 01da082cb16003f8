"""Kafka primitive decoding over a bytes prefix (classic and flexible/compact encodings)."""

from __future__ import annotations

import struct

_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")


class Short(Exception):
    """The prefix ended before the field."""


class Reader:
    """Cursor over a message prefix; raises :class:`Short` past the end."""

    __slots__ = ("data", "pos", "flexible")

    def __init__(self, data: bytes, pos: int = 0, flexible: bool = False) -> None:
        self.data, self.pos, self.flexible = data, pos, flexible

    def _take(self, n: int) -> int:
        p = self.pos
        if p + n > len(self.data):
            raise Short
        self.pos = p + n
        return p

    def skip(self, n: int) -> None:
        self._take(n)

    def i16(self) -> int:
        return _I16.unpack_from(self.data, self._take(2))[0]

    def i32(self) -> int:
        return _I32.unpack_from(self.data, self._take(4))[0]

    def uvarint(self) -> int:
        value = shift = 0
        for _ in range(5):
            b = self.data[self._take(1)]
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7
        raise ValueError("varint too long")

    def string(self) -> str | None:
        """STRING/NULLABLE_STRING, or COMPACT_* when flexible."""
        n = self.uvarint() - 1 if self.flexible else self.i16()
        if n < 0:
            return None
        p = self._take(n)
        return self.data[p:p + n].decode("utf-8", "replace")

    def skip_string(self) -> None:
        n = self.uvarint() - 1 if self.flexible else self.i16()
        if n > 0:
            self._take(n)

    def array_len(self) -> int:
        """ARRAY length (-1 = null), or COMPACT_ARRAY when flexible."""
        return self.uvarint() - 1 if self.flexible else self.i32()

    def uuid_hex(self) -> str:
        p = self._take(16)
        return self.data[p:p + 16].hex()

    def tagged_fields(self) -> None:
        for _ in range(self.uvarint()):
            self.uvarint()
            self._take(self.uvarint())
