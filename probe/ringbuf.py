"""Read a BPF ring buffer (``BPF_MAP_TYPE_RINGBUF``) through its memory mapping, without a callback per
record.

bcc's reader calls back into Python through ctypes for every record (a few microseconds each: at tens
of thousands of events per second that is most of what the agent spends outside flow building). The
ring is shared memory, so it can be read directly, as libbpf's own consumer does:

* page 0 (read-write for us): ``consumer_pos``; page 1 (read-only): ``producer_pos``; then the data
  pages, mapped twice in a row so that a record that wraps around the end is contiguous;
* each record is an 8-byte header (``len`` with a BUSY bit while the producer writes it and a DISCARD
  bit when it gave it up, and a page offset) followed by ``len`` bytes, padded to 8;
* the consumer reads records from ``consumer_pos`` up to ``producer_pos``, stops at the first one still
  BUSY, and publishes its new ``consumer_pos`` (the space is then the producer's again).

Positions and headers are read with single aligned loads (ctypes on the mapped addresses): on x86-64
and arm64 a naturally aligned 8-byte load is atomic and, with the kernel's release stores, a header seen
committed means its data is complete. The data of the committed records is then copied out in one piece.
"""

from __future__ import annotations

import ctypes as ct
import mmap
import os

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HDR_SIZE = 8

_libc = ct.CDLL(None, use_errno=True)
_libc.mmap.restype = ct.c_void_p
_libc.mmap.argtypes = (ct.c_void_p, ct.c_size_t, ct.c_int, ct.c_int, ct.c_int, ct.c_long)
_libc.munmap.restype = ct.c_int
_libc.munmap.argtypes = (ct.c_void_p, ct.c_size_t)
_MAP_FAILED = ct.c_void_p(-1).value


class RingBufError(OSError):
    pass


def _map(fd: int, length: int, prot: int, offset: int) -> int:
    addr = _libc.mmap(None, length, prot, mmap.MAP_SHARED, fd, offset)
    if addr in (None, _MAP_FAILED):
        err = ct.get_errno()
        raise RingBufError(err, f"mmap of the ring buffer failed: {os.strerror(err)}")
    return addr


class RingReader:
    """The consumer side of one ring buffer map. ``size``: the map's ``max_entries`` (bytes, a power of
    two multiple of the page size). Not thread-safe: one reader per ring."""

    def __init__(self, map_fd: int, size: int):
        if size <= 0 or size & (size - 1):
            raise ValueError(f"ring buffer size must be a power of two, not {size}")
        self.size = size
        self._mask = size - 1
        self._page = mmap.PAGESIZE
        self._cons_addr = _map(map_fd, self._page, mmap.PROT_READ | mmap.PROT_WRITE, 0)
        try:
            self._prod_len = self._page + 2 * size
            self._prod_addr = _map(map_fd, self._prod_len, mmap.PROT_READ, self._page)
        except RingBufError:
            _libc.munmap(self._cons_addr, self._page)
            raise
        self._consumer = ct.c_uint64.from_address(self._cons_addr)
        self._producer = ct.c_uint64.from_address(self._prod_addr)
        self._data = self._prod_addr + self._page
        self.records = 0  # records handed out (discarded ones not counted)
        self._closed = False

    def pending_bytes(self) -> int:
        """Bytes between the consumer and the producer (including records still being written)."""
        return self._producer.value - self._consumer.value

    def read(self, limit: int = 0) -> list[bytes]:
        """Every committed record waiting (at most ``limit`` when > 0), oldest first; frees their space."""
        if self._closed:
            return []
        cons = self._consumer.value
        prod = self._producer.value
        if cons >= prod:
            return []
        data, mask = self._data, self._mask
        u32 = ct.c_uint32.from_address
        spans: list[tuple[int, int]] = []  # (offset from cons, length) of each record to hand out
        pos = cons
        while pos < prod:
            length = u32(data + (pos & mask)).value
            if length & BUSY_BIT:
                break
            n = length & ~(BUSY_BIT | DISCARD_BIT)
            if not length & DISCARD_BIT:
                spans.append((pos - cons + HDR_SIZE, n))
            pos += (n + HDR_SIZE + 7) & ~7
            if limit and len(spans) >= limit:
                break
        if pos == cons:
            return []
        # The committed records are complete and stay put until consumer_pos moves: copy them in one go
        # (the double mapping makes a wrapped record contiguous).
        chunk = ct.string_at(data + (cons & mask), pos - cons)
        out = [chunk[o:o + n] for o, n in spans]
        self._consumer.value = pos  # one aligned 8-byte store publishes the freed space
        self.records += len(out)
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _libc.munmap(self._prod_addr, self._prod_len)
        _libc.munmap(self._cons_addr, self._page)

    def __enter__(self) -> "RingReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
