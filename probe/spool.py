"""The agent's bounded on-disk spool: a FIFO of records (encoded ingest batches) that survives restarts.

When the server is slow or down, the shipper appends each batch here instead of holding it in memory,
and delivers the records oldest first once the server answers again; a record is removed (``pop``) only
after the server acknowledged it, and the server deduplicates by batch id, so a record sent twice (an
acknowledgement lost, a crash before the cursor was saved) is stored once.

On disk (one directory, used by one agent at a time: ``flock`` on ``LOCK``)::

    seg-0000000000000001.spool   records: [u32 length][u32 crc32][payload] ...
    seg-0000000000000002.spool   (segments roll over at ``segment_bytes``; a consumed one is deleted)
    cursor                       head position: [u64 segment][u64 offset][u32 crc32], replaced by rename

Bounds: ``append`` refuses a record (returns False) when the segments would exceed ``max_bytes``; the
caller keeps it in memory or counts it as lost — the spool never grows past its bound and never drops
what it already holds.

Durability (``fsync``):

* ``"interval"`` (default): appended data is written with ``write(2)`` at once, so it survives a crash or
  ``kill -9`` of the agent; it is fsynced at most every ``fsync_interval`` seconds, at segment roll-over
  and at close, so a power loss or kernel crash can lose at most the last ``fsync_interval`` (1 s) of
  spooled batches.
* ``"always"``: fsync after every append (no loss on power failure; one disk flush per batch).
* ``"never"``: leave it to the kernel's writeback (crash-safe, not power-loss-safe).

The cursor is saved at most every ``cursor_interval`` seconds and at close; after a crash the records
acknowledged since the last save are sent again and the server skips them as duplicates. A record
whose checksum fails (a torn write at the tail after a power loss) ends its segment: the rest of that
segment is skipped and counted in ``corrupt_bytes``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import struct
import threading
import time
import zlib
from typing import Optional

log = logging.getLogger("flowscope.spool")

_HEADER = struct.Struct("<II")  # payload length, crc32(payload)
_CURSOR = struct.Struct("<QQI")  # segment number, offset, crc32 of the first 16 bytes
_SEGMENT_RE = re.compile(r"^seg-(\d{16})\.spool$")
MAX_RECORD = 256 << 20  # a record longer than this is corruption, not data
FSYNC_POLICIES = ("interval", "always", "never")


class SpoolError(RuntimeError):
    """The spool directory cannot be used (locked by another agent, not writable, ...)."""


def _segment_name(n: int) -> str:
    return f"seg-{n:016d}.spool"


class Spool:
    """A bounded FIFO of byte records on disk. Thread-safe; meant for one producer/consumer thread."""

    def __init__(self, directory: str, *, max_bytes: int = 1 << 30, segment_bytes: int = 8 << 20,
                 fsync: str = "interval", fsync_interval: float = 1.0, cursor_interval: float = 0.5) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync policy must be one of {', '.join(FSYNC_POLICIES)}, not {fsync!r}")
        if max_bytes <= 0 or segment_bytes <= 0:
            raise ValueError("max_bytes and segment_bytes must be positive")
        self.directory = os.path.abspath(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = min(segment_bytes, max_bytes)
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self.cursor_interval = cursor_interval
        self.corrupt_bytes = 0
        self.appended = 0
        self.popped = 0
        self.refused = 0
        self._lock = threading.RLock()
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            self._lock_fd = os.open(os.path.join(self.directory, "LOCK"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise SpoolError(f"cannot use spool directory {self.directory}: {e.strerror}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise SpoolError(f"spool directory {self.directory} is in use by another agent") from None
        self._sizes: dict[int, int] = {}  # segment number -> bytes (all segments, oldest first)
        self._tail_fd: Optional[int] = None
        self._head_fd: Optional[int] = None
        self._head_seg = 0
        self._head_off = 0
        self._head_len = 0  # length of the record at the head once peeked (0: not peeked)
        self._head_payload: Optional[bytes] = None
        self._last_fsync = time.monotonic()
        self._last_cursor = 0.0
        self._cursor_dirty = False
        self._dirty = False  # appended since the last fsync
        self._closed = False
        self._open_existing()

    # ---------------------------------------------------------------- opening

    def _path(self, n: int) -> str:
        return os.path.join(self.directory, _segment_name(n))

    def _open_existing(self) -> None:
        for name in os.listdir(self.directory):
            m = _SEGMENT_RE.match(name)
            if m:
                self._sizes[int(m.group(1))] = os.path.getsize(os.path.join(self.directory, name))
        if not self._sizes:
            self._start_segment(1)
            self._head_seg, self._head_off = 1, 0
            self._write_cursor(sync=False)  # replace any cursor left from segments deleted by hand
            return
        segs = sorted(self._sizes)
        self._repair_tail(segs[-1])
        seg, off = self._read_cursor()
        if seg < segs[0] or seg not in self._sizes:
            seg, off = segs[0], 0  # the cursor's segment was consumed and deleted: start at the oldest
        off = min(off, self._sizes[seg])
        for n in segs:
            if n < seg:  # consumed, but the process died before deleting it
                self._unlink(n)
        self._head_seg, self._head_off = seg, off
        last = max(self._sizes)
        self._tail_fd = os.open(self._path(last), os.O_WRONLY | os.O_APPEND)
        if self._sizes[last] >= self.segment_bytes:
            self._roll()
        log.info("spool %s: %d bytes waiting in %d segment(s)", self.directory, self.pending_bytes, len(self._sizes))

    def _repair_tail(self, n: int) -> None:
        """Cut a torn record off the end of the newest segment (a crash in the middle of an append)."""
        path = self._path(n)
        good = 0
        with open(path, "rb") as f:
            data = f.read()
        while good + _HEADER.size <= len(data):
            length, crc = _HEADER.unpack_from(data, good)
            end = good + _HEADER.size + length
            if length > MAX_RECORD or end > len(data) or zlib.crc32(data[good + _HEADER.size:end]) != crc:
                break
            good = end
        if good != len(data):
            log.warning("spool %s: cutting %d bytes of a torn record off %s", self.directory, len(data) - good,
                        _segment_name(n))
            self.corrupt_bytes += len(data) - good
            with open(path, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())
            self._sizes[n] = good

    def _read_cursor(self) -> tuple[int, int]:
        try:
            with open(os.path.join(self.directory, "cursor"), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return 0, 0
        if len(raw) != _CURSOR.size:
            return 0, 0
        seg, off, crc = _CURSOR.unpack(raw)
        if zlib.crc32(raw[:16]) != crc:
            log.warning("spool %s: cursor file is corrupt; starting at the oldest segment", self.directory)
            return 0, 0
        return seg, off

    def _write_cursor(self, sync: bool) -> None:
        head = struct.pack("<QQ", self._head_seg, self._head_off)
        tmp = os.path.join(self.directory, "cursor.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, head + struct.pack("<I", zlib.crc32(head)))
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, os.path.join(self.directory, "cursor"))
        self._cursor_dirty = False
        self._last_cursor = time.monotonic()

    # ---------------------------------------------------------------- sizes

    @property
    def used_bytes(self) -> int:
        """Bytes of all segment files (what counts against ``max_bytes``)."""
        return sum(self._sizes.values())

    @property
    def pending_bytes(self) -> int:
        """Bytes of records not yet popped."""
        with self._lock:
            return self.used_bytes - self._head_off

    def __bool__(self) -> bool:
        return self.pending_bytes > 0

    def has_room(self, payload_len: int) -> bool:
        return self.used_bytes + _HEADER.size + payload_len <= self.max_bytes

    # ---------------------------------------------------------------- appending

    def _start_segment(self, n: int) -> None:
        self._tail_fd = os.open(self._path(n), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._sizes[n] = 0

    def _roll(self) -> None:
        assert self._tail_fd is not None
        if self.fsync != "never":
            os.fsync(self._tail_fd)
        os.close(self._tail_fd)
        self._start_segment(max(self._sizes) + 1)
        if self.fsync != "never":
            dfd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dfd)  # the new segment's directory entry
            finally:
                os.close(dfd)
        self._dirty = False
        self._last_fsync = time.monotonic()

    def append(self, payload: bytes) -> bool:
        """Add a record at the tail; False (nothing written) when it does not fit in ``max_bytes``."""
        if len(payload) > MAX_RECORD:
            raise ValueError(f"a spool record is limited to {MAX_RECORD} bytes")
        with self._lock:
            if self._closed:
                raise SpoolError("the spool is closed")
            if not self.has_room(len(payload)):
                self.refused += 1
                return False
            tail = max(self._sizes)
            if self._sizes[tail] and self._sizes[tail] + _HEADER.size + len(payload) > self.segment_bytes:
                self._roll()
                tail = max(self._sizes)
            rec = _HEADER.pack(len(payload), zlib.crc32(payload)) + payload
            assert self._tail_fd is not None
            view = memoryview(rec)
            while view:  # one write(2) for a regular file in practice; loop for the rare short write
                view = view[os.write(self._tail_fd, view):]
            self._sizes[tail] += len(rec)
            self.appended += 1
            self._dirty = True
            if self.fsync == "always":
                os.fsync(self._tail_fd)
                self._dirty = False
            else:
                self.sync(force=False)
            return True

    def sync(self, force: bool = True) -> None:
        """Apply the fsync policy now (``force``: fsync whatever is pending regardless of the interval)
        and save the cursor if it moved."""
        with self._lock:
            if self._closed:
                return
            now = time.monotonic()
            if self._dirty and self.fsync != "never" and self._tail_fd is not None and (
                    force or now - self._last_fsync >= self.fsync_interval):
                os.fsync(self._tail_fd)
                self._dirty = False
                self._last_fsync = now
            if self._cursor_dirty and (force or now - self._last_cursor >= self.cursor_interval):
                self._write_cursor(sync=force and self.fsync != "never")

    # ---------------------------------------------------------------- reading

    def peek(self) -> Optional[bytes]:
        """The oldest record not yet popped (the same one until :meth:`pop`), or None when empty."""
        with self._lock:
            if self._head_payload is not None:
                return self._head_payload
            while True:
                size = self._sizes.get(self._head_seg, 0)
                if self._head_off >= size:
                    if self._head_seg >= max(self._sizes):
                        return None  # everything consumed
                    self._advance_segment()
                    continue
                rec = self._read_record()
                if rec is None:  # corrupt: skip the rest of this segment
                    self.corrupt_bytes += size - self._head_off
                    log.error("spool %s: corrupt record in %s at offset %d; skipping %d bytes", self.directory,
                              _segment_name(self._head_seg), self._head_off, size - self._head_off)
                    self._head_off = size
                    self._cursor_dirty = True
                    continue
                self._head_payload = rec
                self._head_len = _HEADER.size + len(rec)
                return rec

    def _read_record(self) -> Optional[bytes]:
        if self._head_fd is None:
            self._head_fd = os.open(self._path(self._head_seg), os.O_RDONLY)
        head = os.pread(self._head_fd, _HEADER.size, self._head_off)
        if len(head) < _HEADER.size:
            return None
        length, crc = _HEADER.unpack(head)
        if length > MAX_RECORD:
            return None
        payload = os.pread(self._head_fd, length, self._head_off + _HEADER.size)
        if len(payload) != length or zlib.crc32(payload) != crc:
            return None
        return payload

    def _advance_segment(self) -> None:
        """The head segment is consumed: delete it and move to the next one."""
        old = self._head_seg
        if self._head_fd is not None:
            os.close(self._head_fd)
            self._head_fd = None
        nxt = min(n for n in self._sizes if n > old)
        self._head_seg, self._head_off = nxt, 0
        self._write_cursor(sync=False)  # before the unlink: never point at a deleted segment
        self._unlink(old)

    def _unlink(self, n: int) -> None:
        self._sizes.pop(n, None)
        try:
            os.unlink(self._path(n))
        except FileNotFoundError:
            pass

    def pop(self) -> None:
        """Remove the record returned by the last :meth:`peek` (after the server acknowledged it)."""
        with self._lock:
            if self._head_payload is None:
                raise RuntimeError("pop() without a peeked record")
            self._head_off += self._head_len
            self._head_payload = None
            self._head_len = 0
            self.popped += 1
            self._cursor_dirty = True
            if self._head_off >= self._sizes.get(self._head_seg, 0) and self._head_seg < max(self._sizes):
                self._advance_segment()
            elif self._head_off >= self._sizes.get(self._head_seg, 0) and self._head_seg == max(self._sizes) \
                    and self._head_off >= self.segment_bytes // 2:
                # Fully drained and the only segment is large: start a fresh one so the space is returned.
                self._roll()
                self._advance_segment()
            self.sync(force=False)

    # ---------------------------------------------------------------- closing

    def close(self) -> None:
        """Fsync, save the cursor, release the directory. An empty spool leaves only an empty segment."""
        with self._lock:
            if self._closed:
                return
            try:
                self.sync(force=True)
                if self._cursor_dirty:
                    self._write_cursor(sync=self.fsync != "never")
            finally:
                self._closed = True
                for fd in (self._tail_fd, self._head_fd):
                    if fd is not None:
                        os.close(fd)
                self._tail_fd = self._head_fd = None
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
