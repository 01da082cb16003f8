"""DNS: queries/answers, compression (and its loops), TTL = min, rcode, TCP framing."""

from __future__ import annotations

import struct

import pytest

from probe.l7.conversation import DnsConversation
from probe.l7.dns import DnsError, DnsParser, looks_like_dns, parse_message, read_name


def header(ident: int, flags: int, qd: int, an: int) -> bytes:
    return struct.pack(">HHHHHH", ident, flags, qd, an, 0, 0)


QNAME = b"\x03api\x07example\x03org\x00"
QUERY = header(0xBEEF, 0x0100, 1, 0) + QNAME + b"\x00\x01\x00\x01"


def answer(name: bytes, rtype: int, ttl: int, rdata: bytes) -> bytes:
    return name + struct.pack(">HHIH", rtype, 1, ttl, len(rdata)) + rdata


def test_query_and_compressed_answers() -> None:
    # api.example.org CNAME lb.example.org (pointer into the question), then A and AAAA for it.
    cname = answer(b"\xc0\x0c", 5, 300, b"\x02lb\xc0\x10")
    lb_ptr = 12 + len(QNAME) + 4 + 12  # offset of "\x02lb" inside the CNAME rdata
    resp = header(0xBEEF, 0x8180, 1, 3) + QNAME + b"\x00\x01\x00\x01" + cname
    resp += answer(struct.pack(">H", 0xC000 | lb_ptr), 1, 60, bytes([10, 0, 0, 7]))
    resp += answer(struct.pack(">H", 0xC000 | lb_ptr), 28, 120, bytes(15) + b"\x01")
    conv = DnsConversation(("10.0.0.5", 40000), ("10.0.0.53", 5353))
    (q,) = conv.feed("client", QUERY, 1_000)
    (r,) = conv.feed("server", resp, 3_500)
    assert q.to_dict() == {"type": "REQUEST", "dns": {
        "query": "api.example.org.", "observation_source": "flowscope", "qtypes": ["A"]}}
    assert r.to_dict() == {"type": "RESPONSE", "latency_ns": "2500", "dns": {
        "query": "api.example.org.", "ips": ["10.0.0.7", "::1"], "ttl": 60, "cnames": ["lb.example.org."],
        "observation_source": "flowscope", "qtypes": ["A"], "rrtypes": ["CNAME", "A", "AAAA"]}}
    assert r.stream_id == 0xBEEF and r.is_reply and not q.is_reply


def test_nxdomain_rcode() -> None:
    p = DnsParser()
    (r,) = p.feed_datagram("server", header(1, 0x8183, 1, 0) + QNAME + b"\x00\x1c\x00\x01", 0)
    assert r.to_dict()["dns"]["rcode"] == 3 and r.dns.qtypes == ["AAAA"]


@pytest.mark.parametrize("name", [
    b"\xc0\x0c",                  # points at itself
    b"\x01a\xc0\x0c",             # label then pointer back to its own start
    b"\xc0\x0e\x00\x00\xc0\x0c",  # forward pointer into a pointer back: a 2-cycle
    b"\xc0\xff",                  # past the end
])
def test_compression_loops_are_errors_not_hangs(name: bytes) -> None:
    msg = header(7, 0x0100, 1, 0) + name + b"\x00\x01\x00\x01"
    with pytest.raises(DnsError):
        parse_message(msg)
    p = DnsParser()
    assert p.feed_datagram("client", msg, 0) == [] and p.stats["parse_errors"] == 1
    assert not looks_like_dns(msg)


def test_loop_counter_and_long_pointer_chain() -> None:
    p = DnsParser()
    p.feed_datagram("client", header(7, 0x0100, 1, 0) + b"\xc0\x0c\x00\x01\x00\x01", 0)
    assert p.stats["compression_loops"] == 1
    # A legal chain of 40 backward pointers exceeds the hop budget.
    msg = bytearray(header(1, 0x0100, 1, 0)) + b"\x01a\x00"
    prev = 12
    for _ in range(40):
        here = len(msg)
        msg += struct.pack(">H", 0xC000 | prev)
        prev = here
    with pytest.raises(DnsError):
        read_name(bytes(msg), prev)


def test_dns_over_tcp_length_prefixed_split() -> None:
    p = DnsParser()
    stream = struct.pack(">H", len(QUERY)) + QUERY
    stream += stream.replace(b"\xbe\xef", b"\xbe\xf0", 1)
    ev = []
    for i in range(len(stream)):
        ev += p.feed("client", stream[i:i + 1], i)
    assert [e.stream_id for e in ev] == [0xBEEF, 0xBEF0] and p.buffered_bytes() == 0


def test_udp_non_dns_is_ignored() -> None:
    conv = DnsConversation(("a", 1), ("b", 2))
    assert conv.feed("client", b"\x00" * 40, 0) == [] and conv.stats["not_dns"] == 1


def test_dns_over_tcp_through_conversation() -> None:
    from probe.l7.conversation import Conversation

    conv = Conversation(("10.0.0.5", 40001), ("10.0.0.53", 53))
    framed = struct.pack(">H", len(QUERY)) + QUERY
    (ev,) = conv.feed("client", 1, framed, 0x18, 0)
    assert conv.protocol == "dns" and ev.dns.query == "api.example.org."
