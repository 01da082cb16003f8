"""HTTP/2 (prior knowledge, h2c upgrade, or joined mid-stream) and gRPC on top of it.

Frames are parsed here; header blocks are decoded with ``hpack`` (one decoder per direction).
When a direction's HPACK state becomes unknown (mid-stream start, lost bytes, decode failure)
it is counted and decoding continues best-effort with :class:`LenientDecoder`.
DATA payloads are skipped without buffering.
"""

from __future__ import annotations

import struct
from urllib.parse import unquote

import hpack

from probe.l7.base import CLIENT, SERVER, StreamParser
from probe.l7.config import L7Config
from probe.l7.headers import HeaderPolicy
from probe.l7.hpack_lenient import LenientDecoder, PartialBlock
from probe.l7.http1 import build_url
from probe.l7.records import REQUEST, RESPONSE, HttpRecord, L7Event

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
_MAX_FRAME = (1 << 24) - 1
_SCAN_LIMIT = 64 * 1024
_HDR = struct.Struct(">BHBBI")
_PROTO = "HTTP/2"


def plausible_frame(buf: bytes | bytearray, pos: int, strict: bool = True) -> int:
    """Length of the frame whose header is at ``pos`` if it looks valid, else -1."""
    hi, lo, ftype, flags, sid = _HDR.unpack_from(buf, pos)
    length = (hi << 16) | lo
    if strict and (sid & 0x80000000 or length > 1 << 20):
        return -1
    sid &= 0x7FFFFFFF
    if ftype in (DATA, HEADERS, CONTINUATION, PUSH_PROMISE):
        ok = sid != 0
    elif ftype == SETTINGS:
        ok = sid == 0 and length % 6 == 0 and (not flags & ACK or length == 0)
    elif ftype == PING:
        ok = sid == 0 and length == 8
    elif ftype == GOAWAY:
        ok = sid == 0 and length >= 8
    elif ftype == WINDOW_UPDATE:
        ok = length == 4
    elif ftype == RST_STREAM:
        ok = sid != 0 and length == 4
    elif ftype == PRIORITY:
        ok = sid != 0 and length == 5
    else:
        ok = not strict
    return length if ok else -1


def grpc_names(path: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` → ``("pkg.Service", "Method")``."""
    service, _, method = path.lstrip("/").rpartition("/")
    return (service, method) if service else ("", "")


class _Stream:
    __slots__ = (
        "sid", "method", "path", "authority", "scheme", "is_grpc", "req_ts", "status", "resp_ts",
        "resp_fields", "grpc_status", "grpc_message", "emitted", "server_done", "has_request",
    )

    def __init__(self, sid: int) -> None:
        self.sid = sid
        self.method = self.path = self.authority = self.scheme = ""
        self.is_grpc = False
        self.req_ts: int | None = None
        self.status = 0
        self.resp_ts = 0
        self.resp_fields: list[tuple[bytes, bytes]] | None = None
        self.grpc_status: int | None = None
        self.grpc_message = ""
        self.emitted = self.server_done = self.has_request = False


class _Dir:
    __slots__ = (
        "buf", "skip", "synced", "preface_checked", "decoder", "lenient", "hblock", "hb_sid", "hb_flags",
        "hb_promised", "max_table", "is_client", "scan_pos",
    )

    def __init__(self, is_client: bool) -> None:
        self.buf = bytearray()
        self.skip = 0
        self.synced = True
        self.preface_checked = not is_client
        self.decoder = hpack.Decoder()
        self.lenient: LenientDecoder | None = None
        self.hblock: bytearray | None = None
        self.hb_sid = 0
        self.hb_flags = 0
        self.hb_promised = 0
        self.max_table = 4096
        self.is_client = is_client


class Http2Parser(StreamParser):
    """Per-connection HTTP/2 + gRPC parser; see the module docstring.

    ``upgraded`` is the HTTP/1.1 request (``http1._Req``) that became stream 1 after ``h2c``.
    """

    protocol = "http2"

    def __init__(self, config: L7Config | None = None, upgraded: object | None = None) -> None:
        super().__init__(config)
        self._policy = HeaderPolicy(self.config)
        self._dirs = {CLIENT: _Dir(True), SERVER: _Dir(False)}
        # Server bytes are only trusted to start on a frame boundary after an h2c upgrade.
        self._dirs[SERVER].synced = upgraded is not None
        self._streams: dict[int, _Stream] = {}
        self._max_client_sid = 0
        self._midstream = upgraded is None
        if upgraded is not None:
            s = _Stream(1)
            s.method, s.path, s.authority = upgraded.method, upgraded.path, upgraded.host  # type: ignore[attr-defined]
            s.scheme, s.req_ts, s.has_request = "http", upgraded.ts, True  # type: ignore[attr-defined]
            self._streams[1] = s
            self._max_client_sid = 1
            self.stats["h2c_upgrades"] += 1

    def buffered_bytes(self) -> int:
        return sum(len(d.buf) + len(d.hblock or b"") for d in self._dirs.values())

    # -- framing ------------------------------------------------------------------------------
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
        cap = self.config.max_buffer
        while True:
            if d.skip:
                take = min(d.skip, n - pos)
                d.skip -= take
                pos += take
                if d.skip:
                    break
            if not d.preface_checked:
                avail = min(n - pos, len(PREFACE))
                if buf[pos:pos + avail] != PREFACE[:avail]:
                    d.preface_checked = True
                    self._mark_midstream(d)
                elif avail < len(PREFACE):
                    break
                else:
                    pos += len(PREFACE)
                    d.preface_checked = True
                    self._midstream = False
                    self.stats["prefaces"] += 1
                    continue
            if n - pos < 9:
                break
            if not d.synced:
                p, resume = self._scan(buf, pos, n)
                self.stats["resync_skipped_bytes"] += resume - pos
                pos = resume
                if p < 0:
                    break
                d.synced = True
                if pos:
                    self.stats["resyncs"] += 1
            length = plausible_frame(buf, pos, strict=False)
            if length < 0:
                self.stats["frame_errors"] += 1
                self._lose_sync(d)
                continue
            ftype = buf[pos + 3]
            flags = buf[pos + 4]
            sid = int.from_bytes(buf[pos + 5:pos + 9], "big") & 0x7FFFFFFF
            if ftype == DATA:
                pos += 9
                d.skip = length
                self.stats["data_frames"] += 1
                if d.hblock is not None:
                    self._broken_block(d)
                if flags & END_STREAM:
                    self._end_stream(d, sid, ts_ns, out)
                continue
            if length > cap - len(d.hblock or b""):
                self.stats["oversized_frames"] += 1
                pos += 9
                d.skip = length
                if ftype in (HEADERS, CONTINUATION, PUSH_PROMISE):
                    self._broken_block(d, force=True)
                continue
            if n - pos < 9 + length:
                break
            payload = bytes(buf[pos + 9:pos + 9 + length])
            pos += 9 + length
            self._frame(d, ftype, flags, sid, payload, ts_ns, out)
        if pos:
            del buf[:pos]
        if len(buf) + len(d.hblock or b"") > cap:
            self.stats["overflow_drops"] += 1
            d.buf = bytearray()
            self._lose_sync(d)

    def _scan(self, buf: bytearray, pos: int, n: int) -> tuple[int, int]:
        """(offset of a plausible frame chain or -1, where to resume)."""
        end = min(n - 9, pos + _SCAN_LIMIT)
        p = pos
        while p <= end:
            length = plausible_frame(buf, p)
            if length >= 0:
                nxt = p + 9 + length
                if nxt == n or (nxt + 9 <= n and plausible_frame(buf, nxt) >= 0):
                    return p, p
                if nxt > n:
                    if buf[p + 3] in (HEADERS, SETTINGS) and n - p >= 9 + min(length, 64):
                        return p, p
                    return -1, p  # might be a frame: wait for more bytes
            p += 1
        return -1, p

    def _frame(self, d: _Dir, ftype: int, flags: int, sid: int, payload: bytes, ts: int, out: list[L7Event]) -> None:
        if d.hblock is not None and ftype != CONTINUATION:
            self._broken_block(d)
        if ftype == HEADERS or ftype == PUSH_PROMISE:
            body = payload
            if flags & PADDED:
                pad = body[0] if body else 0
                body = body[1:len(body) - pad] if pad < len(body) else b""
            promised = 0
            if ftype == HEADERS and flags & PRIORITY_FLAG:
                body = body[5:]
            elif ftype == PUSH_PROMISE:
                promised = int.from_bytes(body[:4], "big") & 0x7FFFFFFF
                body = body[4:]
                self.stats["push_promises"] += 1
            d.hblock = bytearray(body)
            d.hb_sid, d.hb_flags, d.hb_promised = sid, flags | (0x100 if ftype == PUSH_PROMISE else 0), promised
            if flags & END_HEADERS:
                self._block_done(d, ts, out)
        elif ftype == CONTINUATION:
            if d.hblock is None or sid != d.hb_sid:
                self.stats["continuation_errors"] += 1
                self._hpack_lost(d)
                return
            d.hblock += payload
            if flags & END_HEADERS:
                self._block_done(d, ts, out)
        elif ftype == SETTINGS:
            if not flags & ACK:
                self._settings(d, payload)
        elif ftype == RST_STREAM:
            self.stats["rst_streams"] += 1
            s = self._streams.pop(sid, None)
            if s is not None and s.resp_fields is not None and not s.emitted:
                self._emit_response(s, ts, out, truncated=True)
        elif ftype == GOAWAY:
            self.stats["goaways"] += 1

    def _settings(self, d: _Dir, payload: bytes) -> None:
        # A peer's HEADER_TABLE_SIZE bounds the *other* direction's encoder.
        other = self._dirs[SERVER if d.is_client else CLIENT]
        for off in range(0, len(payload) - 5, 6):
            ident, value = struct.unpack_from(">HI", payload, off)
            if ident == 1:
                other.max_table = min(max(value, 4096), self.config.max_buffer)
                other.decoder.max_allowed_table_size = other.max_table

    # -- HPACK ----------------------------------------------------------------------------------
    def _decode(self, d: _Dir, block: bytes) -> tuple[list[tuple[bytes, bytes]], bool]:
        """Headers of a block and whether any were unknown."""
        if d.lenient is None:
            table = d.decoder.header_table
            snap = tuple(table.dynamic_entries)
            size = table.maxsize
            try:
                return [(bytes(k), bytes(v)) for k, v in d.decoder.decode(block, raw=True)], False
            except Exception:  # noqa: BLE001 - any hpack failure desynchronises this direction
                self.stats["hpack_errors"] += 1
                d.lenient = LenientDecoder(snap, maxsize=size, complete=False, cap=self.config.max_buffer)
        lz = d.lenient
        before = lz.unknown_refs
        try:
            fields = lz.decode(block)
            broken = False
        except PartialBlock as e:
            fields, broken = e.headers, True
            self.stats["hpack_errors"] += 1
        unknown = broken or lz.unknown_refs != before
        if unknown:
            self.stats["hpack_unknown_refs"] += lz.unknown_refs - before
        return fields, unknown

    def _hpack_lost(self, d: _Dir) -> None:
        if d.lenient is None or d.lenient.complete:
            self.stats["hpack_desyncs"] += 1
        d.lenient = LenientDecoder(maxsize=d.max_table, complete=False, cap=self.config.max_buffer)
        d.hblock = None

    def _broken_block(self, d: _Dir, force: bool = False) -> None:
        self.stats["header_block_errors"] += 1
        self._hpack_lost(d)

    def _mark_midstream(self, d: _Dir) -> None:
        self.stats["midstream_starts"] += 1
        d.synced = False  # joined at an unknown offset: find a frame boundary first

    def _lose_sync(self, d: _Dir) -> None:
        d.synced = False
        d.skip = 0
        self._hpack_lost(d)

    # -- streams --------------------------------------------------------------------------------
    def _stream(self, sid: int) -> _Stream:
        s = self._streams.get(sid)
        if s is None:
            if len(self._streams) >= self.config.max_pending:
                self._streams.pop(next(iter(self._streams)))
                self.stats["pending_evicted"] += 1
            s = self._streams[sid] = _Stream(sid)
        return s

    def _block_done(self, d: _Dir, ts: int, out: list[L7Event]) -> None:
        block = bytes(d.hblock or b"")
        d.hblock = None
        sid, flags, promised = d.hb_sid, d.hb_flags, d.hb_promised
        fields, unknown = self._decode(d, block)
        if flags & 0x100:
            s = self._stream(promised)
            self._request_fields(s, fields)
            s.req_ts, s.has_request = ts, True
            return
        if d.is_client:
            self._client_headers(sid, flags, fields, unknown, ts, out)
        else:
            self._server_headers(sid, flags, fields, unknown, ts, out)

    def _request_fields(self, s: _Stream, fields: list[tuple[bytes, bytes]]) -> bool:
        pseudo = False
        for k, v in fields:
            if k[:1] == b":":
                pseudo = True
                if k == b":method":
                    s.method = v.decode("latin-1")
                elif k == b":path":
                    s.path = v.decode("latin-1")
                elif k == b":authority":
                    s.authority = v.decode("latin-1")
                elif k == b":scheme":
                    s.scheme = v.decode("latin-1")
            elif k == b"content-type" and v.startswith(b"application/grpc"):
                s.is_grpc = True
            elif k == b"host" and not s.authority:
                s.authority = v.decode("latin-1")
        return pseudo

    def _record(self, s: _Stream, fields: list[tuple[bytes, bytes]], code: int = 0) -> HttpRecord:
        url = build_url(s.path, s.authority, s.scheme or "http") if s.path else (
            f"{s.scheme or 'http'}://{s.authority}" if s.authority else "")
        service, method = grpc_names(s.path) if s.is_grpc else ("", "")
        return HttpRecord(
            code=code, method=s.method, url=url, protocol=_PROTO, headers=self._policy.export(fields),
            host=s.authority, path=s.path, is_grpc=s.is_grpc, grpc_service=service, grpc_method=method,
        )

    def _client_headers(self, sid: int, flags: int, fields: list[tuple[bytes, bytes]], unknown: bool,
                        ts: int, out: list[L7Event]) -> None:
        s = self._streams.get(sid)
        if s is None and sid <= self._max_client_sid and not self._midstream:
            return  # trailers of a stream already answered
        if s is not None and s.has_request:
            return  # request trailers
        s = self._stream(sid)
        pseudo = self._request_fields(s, fields)
        if not (pseudo or unknown):
            return
        self._max_client_sid = max(self._max_client_sid, sid)
        s.has_request, s.req_ts = True, ts
        rec = self._record(s, fields)
        out.append(L7Event(REQUEST, ts, "grpc" if s.is_grpc else self.protocol, http=rec, stream_id=sid))
        self.stats["requests"] += 1

    def _server_headers(self, sid: int, flags: int, fields: list[tuple[bytes, bytes]], unknown: bool,
                        ts: int, out: list[L7Event]) -> None:
        s = self._streams.get(sid)
        status = 0
        for k, v in fields:
            if k == b":status":
                status = int(v) if v.isdigit() else 0
                break
        if s is None:
            if not status and not unknown:
                self.stats["orphan_trailers"] += 1
                return
            s = self._stream(sid)
        if s.resp_fields is None:
            if 100 <= status < 200:
                return  # informational
            s.status, s.resp_ts, s.resp_fields = status, ts, list(fields)
        else:
            s.resp_fields.extend(f for f in fields if f[0][:1] != b":")
        for k, v in fields:
            if k == b"grpc-status":
                s.grpc_status = int(v) if v.isdigit() else None
            elif k == b"grpc-message":
                s.grpc_message = unquote(v.decode("latin-1"))
            elif k == b"content-type" and v.startswith(b"application/grpc"):
                s.is_grpc = True
        if flags & END_STREAM:
            self._end_stream(self._dirs[SERVER], sid, ts, out)
        elif not s.is_grpc and not s.emitted:
            self._emit_response(s, ts, out)

    def _end_stream(self, d: _Dir, sid: int, ts: int, out: list[L7Event]) -> None:
        if d.is_client:
            return
        s = self._streams.get(sid)
        if s is None:
            return
        if s.resp_fields is not None and not s.emitted:
            self._emit_response(s, ts, out)
        self._streams.pop(sid, None)

    def _emit_response(self, s: _Stream, ts: int, out: list[L7Event], truncated: bool = False) -> None:
        s.emitted = True
        fields = s.resp_fields or []
        rec = self._record(s, fields, s.status)
        rec.truncated = truncated
        if s.is_grpc:
            rec.grpc_status, rec.grpc_message = s.grpc_status, s.grpc_message
            have = {k for k, _ in rec.headers}
            if s.grpc_status is not None and "grpc-status" not in have:
                rec.headers.append(("grpc-status", str(s.grpc_status)))
            if s.grpc_message and "grpc-message" not in have:
                rec.headers.append(("grpc-message", s.grpc_message))
        latency = s.resp_ts - s.req_ts if s.req_ts is not None and s.resp_ts >= s.req_ts else 0
        out.append(L7Event(RESPONSE, s.resp_ts or ts, "grpc" if s.is_grpc else self.protocol, http=rec,
                           latency_ns=latency, stream_id=s.sid))
        self.stats["responses"] += 1

    # -- loss and end ---------------------------------------------------------------------------
    def _resync(self, direction: str) -> None:
        d = self._dirs[direction]
        d.buf = bytearray()
        self._lose_sync(d)

    def _gap(self, direction: str, lost: int, ts_ns: int, out: list[L7Event]) -> None:
        d = self._dirs[direction]
        if d.synced and not d.buf and lost < d.skip:
            d.skip -= lost  # the hole fell inside a DATA payload: framing and HPACK survive
            self.stats["gaps_in_data"] += 1
            return
        self._resync(direction)

    def _close(self, ts_ns: int, out: list[L7Event]) -> None:
        for s in list(self._streams.values()):
            if s.resp_fields is not None and not s.emitted:
                self.stats["truncated_messages"] += 1
                self._emit_response(s, ts_ns, out, truncated=True)
        self._streams.clear()
