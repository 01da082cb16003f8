"""Kafka wire protocol: length-prefixed requests/responses, header v0–v2, topics, error codes.

Only a prefix (``config.kafka_peek`` bytes) of each message is examined; the rest is skipped
without buffering. Responses carry no api_key, so it is remembered per correlation_id.
Fetch v13+ and Produce v13+ name topics by id: ``topic`` stays empty and the id (hex) is kept in
``KafkaRecord.topic_id``.
"""

from __future__ import annotations

import struct

from probe.l7.base import CLIENT, StreamParser
from probe.l7.config import L7Config
from probe.l7.kafka_schema import (
    APIS, TOP_LEVEL_ERROR, api_name, is_flexible, plausible_version, request_header_version,
    response_header_version,
)
from probe.l7.kafka_wire import Reader, Short
from probe.l7.records import REQUEST, RESPONSE, KafkaRecord, L7Event

MAX_MESSAGE = 256 * 1024 * 1024
_HDR = struct.Struct(">ihhi")
_SCAN_LIMIT = 64 * 1024
_MAX_TOPICS = 16


def plausible_request(buf: bytes | bytearray, pos: int = 0) -> int:
    """1 if a request header starts at ``pos``, 0 if it cannot, -1 if more bytes are needed."""
    if len(buf) - pos < 14:
        return -1 if len(buf) - pos < 14 else 0
    size, key, ver, _corr = _HDR.unpack_from(buf, pos)
    if size < 10 or size > MAX_MESSAGE or not plausible_version(key, ver):
        return 0
    if request_header_version(key, ver) == 0:
        return 1
    (clen,) = struct.unpack_from(">h", buf, pos + 12)
    if clen < -1 or clen > size - 10:
        return 0
    if clen > 0:
        cid = buf[pos + 14:pos + 14 + min(clen, 64)]
        if any(c < 0x20 or c > 0x7E for c in cid):
            return 0
    return 1


def _request_topics(r: Reader, key: int, ver: int, rec: KafkaRecord) -> None:
    if key == 0:  # produce
        if ver >= 3:
            r.skip_string()  # transactional_id
        r.skip(6)  # acks, timeout_ms
        if r.array_len() > 0:
            if ver >= 13:
                rec.topic_id = r.uuid_hex()
            else:
                rec.topics.append(r.string() or "")
    elif key == 1:  # fetch
        if ver <= 14:
            r.skip(4)  # replica_id
        r.skip(8 + (4 if ver >= 3 else 0) + (1 if ver >= 4 else 0) + (8 if ver >= 7 else 0))
        if r.array_len() > 0:
            if ver >= 13:
                rec.topic_id = r.uuid_hex()
            else:
                rec.topics.append(r.string() or "")
    elif key == 3:  # metadata
        n = r.array_len()
        for _ in range(min(max(n, 0), _MAX_TOPICS)):
            if ver >= 10:
                tid = r.uuid_hex()
                if not rec.topic_id and tid.strip("0"):
                    rec.topic_id = tid
            name = r.string()
            if name:
                rec.topics.append(name)
            if r.flexible:
                r.tagged_fields()


def _first_partition_error(r: Reader, topic_id: bool) -> int:
    """[topic name|id, [partition_index, error_code ...]] → first error code."""
    if r.array_len() <= 0:
        raise Short
    if topic_id:
        r.skip(16)
    else:
        r.skip_string()
    if r.array_len() <= 0:
        raise Short
    r.skip(4)
    return r.i16()


def _response_error(r: Reader, key: int, ver: int) -> int | None:
    top = TOP_LEVEL_ERROR.get(key)
    if key == 10 and ver >= 4:  # find_coordinator: coordinators[0].error_code
        r.skip(4)
        if r.array_len() <= 0:
            return None
        r.skip_string()
        r.skip(4)
        r.skip_string()
        r.skip(4)
        return r.i16()
    if top is not None and ver >= top[0]:
        if top[1] is not None and ver >= top[1]:
            r.skip(4)
        return r.i16()
    if key == 0:  # produce: responses[0].partitions[0].error_code
        return _first_partition_error(r, ver >= 13)
    if key == 1:  # fetch v0-6
        if ver >= 1:
            r.skip(4)
        return _first_partition_error(r, False)
    if key in (2, 8):  # list_offsets, offset_commit
        if (key == 2 and ver >= 2) or (key == 8 and ver >= 3):
            r.skip(4)
        return _first_partition_error(r, False)
    if key == 3:  # metadata: topics[0].error_code
        if ver >= 3:
            r.skip(4)
        for _ in range(max(r.array_len(), 0)):
            r.skip(4)
            r.skip_string()
            r.skip(4)
            if ver >= 1:
                r.skip_string()
            if r.flexible:
                r.tagged_fields()
        if ver >= 2:
            r.skip_string()  # cluster_id
        if ver >= 1:
            r.skip(4)  # controller_id
        if r.array_len() <= 0:
            return None
        return r.i16()
    return None


class _Pending:
    __slots__ = ("key", "ver", "ts", "topic", "topics", "topic_id", "client_id")

    def __init__(self, rec: KafkaRecord, ts: int) -> None:
        self.key, self.ver, self.ts = rec.api_key_id, rec.api_version, ts
        self.topic, self.topics, self.topic_id, self.client_id = rec.topic, rec.topics, rec.topic_id, rec.client_id


class _Dir:
    __slots__ = ("buf", "skip", "head_ts", "synced", "is_client")

    def __init__(self, is_client: bool) -> None:
        self.buf = bytearray()
        self.skip = 0
        self.head_ts: int | None = None
        self.synced = True
        self.is_client = is_client


class KafkaParser(StreamParser):
    """Per-connection Kafka parser; client = requests, server = responses."""

    protocol = "kafka"

    def __init__(self, config: L7Config | None = None) -> None:
        super().__init__(config)
        self._dirs = {CLIENT: _Dir(True), "server": _Dir(False)}
        self._pending: dict[int, _Pending] = {}

    def buffered_bytes(self) -> int:
        return sum(len(d.buf) for d in self._dirs.values())

    def _feed(self, direction: str, data: bytes, ts_ns: int, out: list[L7Event]) -> None:
        d = self._dirs[direction]
        if d.skip and not d.buf:
            take = min(d.skip, len(data))
            d.skip -= take
            data = data[take:]
            if not data:
                return
        d.buf += data
        buf = d.buf
        n = len(buf)
        pos = 0
        peek = min(self.config.kafka_peek, self.config.max_buffer - 4)
        while True:
            if d.skip:
                take = min(d.skip, n - pos)
                d.skip -= take
                pos += take
                if d.skip:
                    break
            if n - pos < 4:
                break
            if d.head_ts is None:
                d.head_ts = ts_ns
            if not d.synced:
                p = self._scan(d, buf, pos, n)
                if p < 0:
                    keep = max(pos, n - 16)
                    self.stats["resync_skipped_bytes"] += keep - pos
                    pos = keep
                    break
                self.stats["resync_skipped_bytes"] += p - pos
                self.stats["resyncs"] += 1
                pos = p
                d.synced = True
            (size,) = struct.unpack_from(">i", buf, pos)
            if size < (10 if d.is_client else 4) or size > MAX_MESSAGE:
                self.stats["bad_lengths"] += 1
                self._lose_sync(d)
                continue
            need = min(size, peek)
            if n - pos - 4 < need:
                break
            prefix = bytes(buf[pos + 4:pos + 4 + need])
            ok = self._request(prefix, size, d.head_ts, out) if d.is_client else self._response(prefix, d.head_ts, out)
            if not ok:
                self._lose_sync(d)
                pos += 1
                continue
            take = min(size, n - pos - 4)
            pos += 4 + take
            d.skip = size - take
            d.head_ts = None
        if pos:
            del buf[:pos]
        if len(buf) > self.config.max_buffer:
            self.stats["overflow_drops"] += 1
            d.buf = bytearray()
            self._lose_sync(d)

    def _scan(self, d: _Dir, buf: bytearray, pos: int, n: int) -> int:
        """Next plausible message start, or -1."""
        if d.is_client:
            end = min(n - 14, pos + _SCAN_LIMIT)
            for p in range(pos, end + 1):
                if plausible_request(buf, p) == 1:
                    return p
            return -1
        best = -1
        for corr in list(self._pending)[-64:]:
            i = buf.find(struct.pack(">i", corr), pos + 4)
            while i >= 0:
                (size,) = struct.unpack_from(">i", buf, i - 4)
                if 4 <= size <= MAX_MESSAGE:
                    if best < 0 or i - 4 < best:
                        best = i - 4
                    break
                i = buf.find(struct.pack(">i", corr), i + 1)
        return best

    def _lose_sync(self, d: _Dir) -> None:
        d.synced = False
        d.skip = 0
        d.head_ts = None

    # -- messages -------------------------------------------------------------------------------
    def _request(self, data: bytes, size: int, ts: int | None, out: list[L7Event]) -> bool:
        if plausible_request(struct.pack(">i", size) + data[:70]) != 1:
            self.stats["invalid_requests"] += 1
            return False
        key, ver, corr = struct.unpack_from(">hhi", data, 0)
        hv = request_header_version(key, ver)
        r = Reader(data, 8)
        rec = KafkaRecord(api_key=api_name(key), api_version=ver, correlation_id=corr, api_key_id=key)
        try:
            if hv >= 1:
                rec.client_id = r.string() or ""
            if hv == 2:
                r.tagged_fields()
            r.flexible = is_flexible(key, ver)
            _request_topics(r, key, ver, rec)
        except (Short, ValueError, UnicodeDecodeError):
            self.stats["partial_requests"] += 1
        rec.topic = rec.topics[0] if rec.topics else ""
        ts = ts or 0
        out.append(L7Event(REQUEST, ts, self.protocol, kafka=rec, stream_id=corr))
        self.stats["requests"] += 1
        if corr in self._pending:
            self.stats["duplicate_correlation_ids"] += 1
        elif len(self._pending) >= self.config.max_pending:
            self._pending.pop(next(iter(self._pending)))
            self.stats["pending_evicted"] += 1
        self._pending[corr] = _Pending(rec, ts)
        return True

    def _response(self, data: bytes, ts: int | None, out: list[L7Event]) -> bool:
        (corr,) = struct.unpack_from(">i", data, 0)
        req = self._pending.pop(corr, None)
        if req is None:
            self.stats["unmatched_responses"] += 1
            return True  # framing looked fine; we just never saw the request
        rec = KafkaRecord(
            api_key=api_name(req.key), api_version=req.ver, correlation_id=corr, topic=req.topic,
            api_key_id=req.key, client_id=req.client_id, topics=req.topics, topic_id=req.topic_id,
        )
        r = Reader(data, 4)
        try:
            if response_header_version(req.key, req.ver) == 1:
                r.tagged_fields()
            r.flexible = is_flexible(req.key, req.ver)
            err = _response_error(r, req.key, req.ver)
        except (Short, ValueError, UnicodeDecodeError):
            err = None
        if err is None:
            self.stats["error_code_unknown"] += 1
        else:
            rec.error_code, rec.error_known = err, True
        ts = ts or 0
        latency = ts - req.ts if ts >= req.ts else 0
        out.append(L7Event(RESPONSE, ts, self.protocol, kafka=rec, latency_ns=latency, stream_id=corr))
        self.stats["responses"] += 1
        return True

    def _resync(self, direction: str) -> None:
        d = self._dirs[direction]
        d.buf = bytearray()
        self._lose_sync(d)

    def _gap(self, direction: str, lost: int, ts_ns: int, out: list[L7Event]) -> None:
        d = self._dirs[direction]
        if d.synced and not d.buf and lost < d.skip:
            d.skip -= lost  # inside a message body we skip anyway
            self.stats["gaps_in_body"] += 1
            return
        self._resync(direction)


__all__ = ["APIS", "KafkaParser", "plausible_request"]
