"""HTTP/1.x request/response parser (keep-alive, pipelining, chunked, upgrades).

Bodies are skipped, never stored. Responses are matched FIFO to requests. After garbage the
direction resynchronises on the next request line (client) or status line (server).
``Upgrade: h2c`` + ``101`` hands the connection to the HTTP/2 parser via :class:`Handoff`.
"""

from __future__ import annotations

import re
from collections import deque

from probe.l7.base import CLIENT, SERVER, Handoff, StreamParser
from probe.l7.config import L7Config
from probe.l7.headers import HeaderPolicy
from probe.l7.records import REQUEST, RESPONSE, HttpRecord, L7Event

_REQ_LINE = re.compile(rb"([A-Z][A-Z0-9_-]{0,31}) ([^ \r\n]+) HTTP/(1\.[01])")
_STATUS_LINE = re.compile(rb"HTTP/(1\.[01]) ([1-9][0-9]{2})(?: [^\r\n]*)?")
_METHODS = (
    b"GET|HEAD|POST|PUT|DELETE|CONNECT|OPTIONS|TRACE|PATCH|PROPFIND|PROPPATCH|MKCOL|COPY|MOVE|"
    b"LOCK|UNLOCK|PURGE|REPORT|SEARCH|LINK|UNLINK|MKCALENDAR"
)
_RESYNC = {
    CLIENT: re.compile(rb"(?:" + _METHODS + rb") [/*a-zA-Z0-9]"),
    SERVER: re.compile(rb"HTTP/1\.[01] [1-9]"),
}
_RESYNC_KEEP = 16
_MAX_START_LINE = 16 * 1024

# Direction states.
HEAD, BODY_LEN, CHUNK_SIZE, CHUNK_DATA, CHUNK_CRLF, TRAILERS, BODY_EOF, RESYNC, PAUSED, OPAQUE = range(10)


class _Req:
    __slots__ = ("method", "url", "host", "path", "ts", "upgrade")

    def __init__(self, method: str, url: str, host: str, path: str, ts: int, upgrade: bytes) -> None:
        self.method, self.url, self.host, self.path, self.ts, self.upgrade = method, url, host, path, ts, upgrade


class _Dir:
    __slots__ = ("buf", "state", "remaining", "head_ts", "is_client")

    def __init__(self, is_client: bool) -> None:
        self.buf = bytearray()
        self.state = HEAD
        self.remaining = 0
        self.head_ts: int | None = None
        self.is_client = is_client


def _split_fields(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    fields: list[tuple[bytes, bytes]] = []
    for line in lines:
        k, sep, v = line.partition(b":")
        if sep and k and k[:1] not in b" \t":
            fields.append((k.strip().lower(), v.strip()))
        elif fields and line[:1] in (b" ", b"\t"):  # obsolete line folding
            name, value = fields[-1]
            fields[-1] = (name, value + b" " + line.strip())
    return fields


def build_url(target: str, host: str, scheme: str = "http") -> str:
    """Hubble-style URL from a request target and Host/:authority."""
    if target.startswith("/"):
        return f"{scheme}://{host}{target}" if host else target
    return target


class Http1Parser(StreamParser):
    """Per-connection HTTP/1.x parser; see the module docstring."""

    protocol = "http1"

    def __init__(self, config: L7Config | None = None) -> None:
        super().__init__(config)
        self._policy = HeaderPolicy(self.config)
        self._dirs = {CLIENT: _Dir(True), SERVER: _Dir(False)}
        self._pending: deque[_Req] = deque()

    def buffered_bytes(self) -> int:
        return len(self._dirs[CLIENT].buf) + len(self._dirs[SERVER].buf)

    # -- driving ------------------------------------------------------------------------------
    def _feed(self, direction: str, data: bytes, ts_ns: int, out: list[L7Event]) -> None:
        d = self._dirs[direction]
        if d.state == OPAQUE:
            self.stats["opaque_bytes"] += len(data)
            return
        self._run(d, direction, data, ts_ns, out)

    def _run(self, d: _Dir, direction: str, data: bytes, ts: int, out: list[L7Event]) -> None:
        if d.buf:
            if data:
                d.buf += data
            buf: bytes | bytearray = d.buf
        else:
            buf = data
        n = len(buf)
        pos = 0
        while pos < n:
            st = d.state
            if st == HEAD:
                if d.head_ts is None:
                    d.head_ts = ts
                end = buf.find(b"\r\n\r\n", pos)
                if end < 0:
                    if not self._plausible_partial(d, buf, pos, n):
                        self._garbage(d)
                        pos += 1
                        continue
                    break
                head = bytes(buf[pos:end])
                start = pos
                pos = end + 4
                if d.is_client:
                    ok = self._on_request(d, head, out)
                else:
                    pos = self._on_response(d, head, buf, pos, out)
                    ok = pos >= 0
                if not ok:
                    pos = start + 1  # garbage: look for a start line inside it
                    continue
                if self.handoff is not None:
                    d.buf = bytearray()
                    return
            elif st == BODY_LEN or st == CHUNK_DATA:
                take = min(d.remaining, n - pos)
                pos += take
                d.remaining -= take
                if d.remaining == 0:
                    if st == BODY_LEN:
                        self._message_done(d)
                    else:
                        d.state = CHUNK_CRLF
            elif st == CHUNK_SIZE:
                e = buf.find(b"\r\n", pos)
                if e < 0:
                    if n - pos > 1024:
                        self._bad(d, "chunk_errors")
                    break
                size_txt = bytes(buf[pos:e]).split(b";", 1)[0].strip()
                pos = e + 2
                try:
                    size = int(size_txt, 16)
                except ValueError:
                    self._bad(d, "chunk_errors")
                    continue
                if size < 0:
                    self._bad(d, "chunk_errors")
                elif size == 0:
                    d.state = TRAILERS
                else:
                    d.remaining = size
                    d.state = CHUNK_DATA
            elif st == CHUNK_CRLF:
                if n - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    self._bad(d, "chunk_errors")
                    continue
                pos += 2
                d.state = CHUNK_SIZE
            elif st == TRAILERS:
                if n - pos < 2:
                    break
                if buf[pos:pos + 2] == b"\r\n":
                    pos += 2
                    self._message_done(d)
                    continue
                e = buf.find(b"\r\n\r\n", pos)
                if e < 0:
                    if n - pos > self.config.max_buffer:
                        self._bad(d, "overflow_drops")
                    break
                pos = e + 4
                self._message_done(d)
            elif st == RESYNC:
                m = _RESYNC[CLIENT if d.is_client else SERVER].search(buf, pos)
                if m is None:
                    self.stats["resync_skipped_bytes"] += max(0, n - _RESYNC_KEEP - pos)
                    pos = max(pos, n - _RESYNC_KEEP)
                    break
                self.stats["resync_skipped_bytes"] += m.start() - pos
                self.stats["resyncs"] += 1
                pos = m.start()
                d.state = HEAD
                d.head_ts = None
            elif st == BODY_EOF or st == OPAQUE:
                pos = n
            else:  # PAUSED: hold bytes until the upgrade is answered
                break
        self._keep(d, buf, pos, n)

    def _keep(self, d: _Dir, buf: bytes | bytearray, pos: int, n: int) -> None:
        if buf is d.buf:
            if pos:
                del d.buf[:pos]
        elif pos < n:
            d.buf = bytearray(buf[pos:])
        if len(d.buf) > self.config.max_buffer:
            self.stats["overflow_drops"] += 1
            self.stats["overflow_bytes"] += len(d.buf)
            d.buf = bytearray()
            if d.state != PAUSED:
                d.state = RESYNC

    def _plausible_partial(self, d: _Dir, buf: bytes | bytearray, pos: int, n: int) -> bool:
        """Cheap early garbage check while a head is incomplete."""
        first = buf[pos:pos + 1]
        if d.is_client:
            if not (b"A" <= first <= b"Z"):
                return False
        elif buf[pos:pos + 5] != b"HTTP/"[: min(5, n - pos)]:
            return False
        e = buf.find(b"\r\n", pos, pos + _MAX_START_LINE)
        if e < 0:
            return n - pos <= _MAX_START_LINE
        rx = _REQ_LINE if d.is_client else _STATUS_LINE
        return rx.fullmatch(buf, pos, e) is not None

    # -- message heads --------------------------------------------------------------------------
    def _on_request(self, d: _Dir, head: bytes, out: list[L7Event], truncated: bool = False) -> bool:
        lines = head.split(b"\r\n")
        m = _REQ_LINE.fullmatch(lines[0])
        if m is None:
            self._garbage(d)
            return False
        fields = _split_fields(lines[1:])
        host = b""
        clen = b""
        chunked = False
        upgrade = b""
        for k, v in fields:
            if k == b"host":
                host = v
            elif k == b"content-length":
                clen = v
            elif k == b"transfer-encoding":
                chunked = v.lower().rstrip().endswith(b"chunked")
            elif k == b"upgrade":
                upgrade = v.lower()
        method = m.group(1).decode("latin-1")
        target = m.group(2).decode("latin-1")
        host_s = host.decode("latin-1")
        url = build_url(target, host_s)
        ts = d.head_ts if d.head_ts is not None else 0
        rec = HttpRecord(
            method=method, url=url, protocol="HTTP/" + m.group(3).decode(), headers=self._policy.export(fields),
            host=host_s, path=target, truncated=truncated,
        )
        out.append(L7Event(REQUEST, ts, self.protocol, http=rec))
        self.stats["requests"] += 1
        if len(self._pending) >= self.config.max_pending:
            self._pending.popleft()
            self.stats["pending_evicted"] += 1
        self._pending.append(_Req(method, url, host_s, target, ts, upgrade))
        d.head_ts = None
        if truncated:
            return True
        if chunked:
            d.state = CHUNK_SIZE
        elif clen:
            self._set_length(d, clen)
        else:
            d.state = HEAD
        if upgrade and d.state == HEAD and method != "CONNECT":
            d.state = PAUSED
        elif method == "CONNECT":
            d.state = PAUSED
        return True

    def _on_response(self, d: _Dir, head: bytes, buf: bytes | bytearray, pos: int,
                     out: list[L7Event], truncated: bool = False) -> int:
        lines = head.split(b"\r\n")
        m = _STATUS_LINE.fullmatch(lines[0])
        if m is None:
            self._garbage(d)
            return -1
        code = int(m.group(2))
        fields = _split_fields(lines[1:])
        client = self._dirs[CLIENT]
        if client.state == HEAD and client.buf and not truncated and not self._pending:
            self._flush_partial(client, out)  # answered, so it can't still be growing: it was cut short
        if 100 <= code < 200 and code != 101:
            self.stats["informational"] += 1
            d.head_ts = None
            d.state = HEAD
            return pos
        req = self._pending.popleft() if self._pending else None
        if req is None:
            self.stats["unmatched_responses"] += 1
        clen = b""
        chunked = False
        for k, v in fields:
            if k == b"content-length":
                clen = v
            elif k == b"transfer-encoding":
                chunked = v.lower().rstrip().endswith(b"chunked")
        ts = d.head_ts if d.head_ts is not None else 0
        rec = HttpRecord(
            code=code, protocol="HTTP/" + m.group(1).decode(), headers=self._policy.export(fields),
            truncated=truncated,
        )
        if req is not None:
            rec.method, rec.url, rec.host, rec.path = req.method, req.url, req.host, req.path
        latency = ts - req.ts if req is not None and ts >= req.ts else 0
        d.head_ts = None
        if truncated:
            out.append(L7Event(RESPONSE, ts, self.protocol, http=rec, latency_ns=latency))
            self.stats["responses"] += 1
            return pos
        if code == 101:
            self.stats["upgrades"] += 1
            if req is not None and b"h2c" in req.upgrade:
                # The answer to the upgraded request arrives as HTTP/2 stream 1.
                rest = bytes(buf[pos:])
                pending = [(CLIENT, bytes(client.buf), ts), (SERVER, rest, ts)]
                self.handoff = Handoff("http2", pending, req)
                client.buf = bytearray()
                client.state = d.state = OPAQUE
                return len(buf)
            out.append(L7Event(RESPONSE, ts, self.protocol, http=rec, latency_ns=latency))
            client.state = d.state = OPAQUE
            client.buf = bytearray()
            return len(buf)
        out.append(L7Event(RESPONSE, ts, self.protocol, http=rec, latency_ns=latency))
        self.stats["responses"] += 1
        if req is not None and req.method == "CONNECT" and 200 <= code < 300:
            client.state = d.state = OPAQUE
            client.buf = bytearray()
            return len(buf)
        if (req is not None and req.method == "HEAD") or code in (204, 304):
            d.state = HEAD
        elif chunked:
            d.state = CHUNK_SIZE
        elif clen:
            self._set_length(d, clen)
        else:
            d.state = BODY_EOF
        if client.state == PAUSED:
            client.state = HEAD
            self._run(client, CLIENT, b"", ts, out)
        return pos

    def _set_length(self, d: _Dir, clen: bytes) -> None:
        first = clen.split(b",", 1)[0].strip()
        if first.isdigit():
            n = int(first)
            d.remaining = n
            d.state = BODY_LEN if n else HEAD
        else:
            self.stats["bad_content_length"] += 1
            d.state = HEAD

    def _message_done(self, d: _Dir) -> None:
        d.state = HEAD
        d.head_ts = None

    # -- partial messages, errors ---------------------------------------------------------------
    def _flush_partial(self, d: _Dir, out: list[L7Event]) -> None:
        """Emit a head whose start line is complete but whose header block never ended."""
        buf = bytes(d.buf)
        cut = buf.rfind(b"\r\n")
        if cut < 0:
            return
        head = buf[:cut]
        rx = _REQ_LINE if d.is_client else _STATUS_LINE
        if rx.fullmatch(head.split(b"\r\n", 1)[0]) is None:
            return
        self.stats["truncated_messages"] += 1
        if d.is_client:
            self._on_request(d, head, out, truncated=True)
        else:
            self._on_response(d, head, head, len(head), out, truncated=True)
        d.buf = bytearray()
        d.state = RESYNC
        d.head_ts = None

    def _garbage(self, d: _Dir) -> None:
        self.stats["garbage_heads"] += 1
        self._to_resync(d)

    def _bad(self, d: _Dir, counter: str) -> None:
        self.stats[counter] += 1
        self._to_resync(d)

    def _to_resync(self, d: _Dir) -> None:
        d.state = RESYNC
        d.head_ts = None

    def _resync(self, direction: str) -> None:
        d = self._dirs[direction]
        d.buf = bytearray()
        if d.state != OPAQUE:
            self._to_resync(d)

    def _gap(self, direction: str, lost: int, ts_ns: int, out: list[L7Event]) -> None:
        d = self._dirs[direction]
        if d.state in (BODY_LEN, CHUNK_DATA) and not d.buf and lost <= d.remaining:
            d.remaining -= lost  # the hole fell inside a body we skip anyway
            self.stats["gaps_in_body"] += 1
            if d.remaining == 0:
                if d.state == BODY_LEN:
                    self._message_done(d)
                else:
                    d.state = CHUNK_CRLF
            return
        if d.state in (BODY_EOF, OPAQUE):
            return
        self._resync(direction)

    def _close(self, ts_ns: int, out: list[L7Event]) -> None:
        for direction in (CLIENT, SERVER):
            d = self._dirs[direction]
            if d.state == HEAD and d.buf:
                self._flush_partial(d, out)
