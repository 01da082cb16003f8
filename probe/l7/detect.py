"""Protocol detection from the first bytes of a connection, on any port; ports are only hints."""

from __future__ import annotations

import re

from probe.l7.dns import looks_like_dns
from probe.l7.http2 import HEADERS, PREFACE, SETTINGS, plausible_frame
from probe.l7.kafka import plausible_request

HTTP1, HTTP2, KAFKA, DNS, TLS, UNKNOWN = "http1", "http2", "kafka", "dns", "tls", "unknown"

#: Well-known server ports → protocol, used only when sniffing is inconclusive.
PORT_HINTS: dict[int, str] = {
    80: HTTP1, 8000: HTTP1, 8008: HTTP1, 8080: HTTP1, 8081: HTTP1, 8888: HTTP1, 3000: HTTP1, 5000: HTTP1,
    9080: HTTP1, 15000: HTTP1, 443: TLS, 8443: TLS, 6443: TLS,
    9092: KAFKA, 9093: KAFKA, 9094: KAFKA, 19092: KAFKA, 29092: KAFKA,
    53: DNS, 5353: DNS, 5053: DNS,
    50051: HTTP2, 9090: HTTP2, 2379: HTTP2, 4317: HTTP2, 8079: HTTP2,
}

_METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
            b"PROPFIND", b"PROPPATCH", b"MKCOL", b"COPY", b"MOVE", b"LOCK", b"UNLOCK", b"PURGE", b"REPORT")
_REQ_START = tuple(m + b" " for m in _METHODS)
_REQ_ANYWHERE = re.compile(rb"(?:" + b"|".join(_METHODS) + rb") [^ \r\n]{1,8192} HTTP/1\.[01]\r\n")
_STATUS_ANYWHERE = re.compile(rb"HTTP/1\.[01] [1-5][0-9]{2}[ \r]")


def _is_prefix_of_any(data: bytes, options: tuple[bytes, ...]) -> bool:
    return any(o.startswith(data) for o in options)


def sniff_h2_frames(data: bytes) -> bool | None:
    """Whether ``data`` starts with a chain of plausible HTTP/2 frames (None: need more bytes)."""
    p = 0
    headers = 0
    while p + 9 <= len(data):
        length = plausible_frame(data, p)
        if length < 0:
            return False
        headers += 1
        first_type = data[p + 3] if headers == 1 else None
        p += 9 + length
        if headers >= 2 or p == len(data):
            return True
        if first_type is not None and p > len(data) and first_type in (HEADERS, SETTINGS) and len(data) >= 256:
            return True
    return None


def sniff(data: bytes, from_client: bool) -> str | None:
    """Protocol of a direction from its first bytes; ``None`` = undecided yet, ``UNKNOWN`` = none."""
    if not data:
        return None
    head = data[:24]
    if from_client:
        if head.startswith(PREFACE) or (len(head) < 24 and PREFACE.startswith(head)):
            return HTTP2 if len(head) >= 24 else None
        if head.startswith(_REQ_START):
            return HTTP1
        if len(head) < 10 and _is_prefix_of_any(head, _REQ_START):
            return None
    else:
        if head.startswith(b"HTTP/1."):
            return HTTP1
        if len(head) < 7 and b"HTTP/1.".startswith(head):
            return None
    if len(data) >= 3 and data[0] == 0x16 and data[1] == 0x03 and data[2] <= 0x04:
        return TLS
    h2 = sniff_h2_frames(data)
    if h2:
        return HTTP2
    if from_client:
        k = plausible_request(data)
        if k == 1:
            return KAFKA
        if k == -1 or h2 is None:
            return None
    if len(data) >= 2:
        size = (data[0] << 8) | data[1]
        if 17 <= size <= len(data) - 2 and looks_like_dns(data[2:2 + size]):
            return DNS
    rx = _REQ_ANYWHERE if from_client else _STATUS_ANYWHERE
    if rx.search(data):
        return HTTP1  # joined mid-stream: a message boundary shows up later
    return None if h2 is None else UNKNOWN


def detect(client: bytes, server: bytes, server_port: int | None = None, final: bool = False) -> str | None:
    """Protocol of a TCP connection from the bytes seen so far in each direction.

    Returns ``None`` while undecided; with ``final`` (no more bytes to wait for) falls back to the
    port hint, then :data:`UNKNOWN`.
    """
    c = sniff(client, True)
    if c is not None and c != UNKNOWN:
        return c
    s = sniff(server, False)
    if s is not None and s != UNKNOWN:
        return s
    hint = PORT_HINTS.get(server_port or -1)
    if final or (c == UNKNOWN and s in (UNKNOWN, None) and (server or client)):
        if hint is not None:
            return hint
        return UNKNOWN if final else None
    return None


def detect_udp(payload: bytes) -> str:
    """UDP datagrams: DNS on any port, else unknown."""
    return DNS if looks_like_dns(payload) else UNKNOWN
