"""Protocol detection by content on any port, with port hints only as a fallback."""

from __future__ import annotations

import struct

import pytest

from probe.l7.conversation import Conversation
from probe.l7.detect import DNS, HTTP1, HTTP2, KAFKA, TLS, UNKNOWN, detect, detect_udp, sniff
from probe.l7.http2 import PREFACE

_MSG = struct.pack(">hhih", 18, 3, 1, 8) + b"consumer" + b"\x00\x05java\x043.7\x00"
KAFKA_REQ = struct.pack(">i", len(_MSG)) + _MSG


@pytest.mark.parametrize(("client", "server", "want"), [
    (b"GET /x HTTP/1.1\r\n", b"", HTTP1),
    (b"", b"HTTP/1.1 200 OK\r\n", HTTP1),
    (PREFACE, b"", HTTP2),
    (b"\x00\x00\x00\x04\x01\x00\x00\x00\x00", b"", HTTP2),  # SETTINGS ack, joined mid-stream
    (KAFKA_REQ, b"", KAFKA),
    (b"\x16\x03\x01\x02\x00\x01", b"", TLS),
    (b"body-bytes-then GET /next HTTP/1.1\r\nHost: a\r\n\r\n", b"", HTTP1),
])
def test_sniff_any_port(client: bytes, server: bytes, want: str) -> None:
    assert detect(client, server, server_port=40404) == want


def test_undecided_then_port_hint_then_unknown() -> None:
    assert sniff(b"GE", True) is None and detect(b"GE", b"", 1234) is None
    assert detect(b"\x00\x00", b"", 9092) is None
    assert detect(b"\xff" * 64, b"", 9092, final=True) == KAFKA
    assert detect(b"\xff" * 64, b"", 1234, final=True) == UNKNOWN


def test_udp_dns_any_port() -> None:
    q = struct.pack(">HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\x01a\x02io\x00\x00\x01\x00\x01"
    assert detect_udp(q) == DNS and detect_udp(b"\x00" * 30) == UNKNOWN


def test_conversation_detects_kafka_on_odd_port_and_tls_is_opaque() -> None:
    conv = Conversation(("10.0.0.1", 5000), ("10.0.0.2", 1111))
    (ev,) = conv.feed("client", 1, KAFKA_REQ[:10], 0x18, 0) + conv.feed("client", 11, KAFKA_REQ[10:], 0x18, 1)
    assert conv.protocol == KAFKA and ev.kafka.api_key == "api_versions" and ev.kafka.client_id == "consumer"
    tls = Conversation(("10.0.0.1", 5001), ("10.0.0.2", 443))
    assert tls.feed("client", 1, b"\x16\x03\x01\x00\x10" + b"\x00" * 16, 0x18, 0) == []
    assert tls.protocol == TLS and tls.stats["protocol_tls"] == 1 and tls.buffered_bytes() == 0


def test_conversation_gives_up_after_detect_limit() -> None:
    conv = Conversation(("10.0.0.1", 5000), ("10.0.0.2", 1111))
    seq = 1
    for _ in range(5):
        conv.feed("client", seq, b"\xff" * 1000, 0x18, 0)
        seq += 1000
    assert conv.protocol == UNKNOWN and conv.buffered_bytes() == 0 and conv.stats["opaque_bytes"] > 0
