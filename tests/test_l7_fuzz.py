"""Property tests: random bytes and mutated real captures never raise and stay within memory caps."""

from __future__ import annotations

from functools import lru_cache

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l7_captures import CAPTURES, read_tcp_segments
from probe.l7.config import L7Config
from probe.l7.conversation import Conversation, DnsConversation
from probe.l7.dns import DnsParser, parse_message
from probe.l7.http1 import Http1Parser
from probe.l7.http2 import PREFACE, Http2Parser
from probe.l7.kafka import KafkaParser
from probe.l7.reassembly import Data, Gap, StreamReassembler

CFG = L7Config(max_buffer=2048, max_gap_bytes=4096, max_gap_segments=8, detect_limit=1024, kafka_peek=512)
PARSERS = [Http1Parser, Http2Parser, KafkaParser, DnsParser]
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

chunks = st.lists(st.tuples(st.sampled_from(["client", "server"]), st.binary(max_size=3000)), max_size=12)


@FUZZ
@given(parser=st.sampled_from(PARSERS), feed=chunks, gaps=st.lists(st.integers(0, 5000), max_size=3))
def test_random_bytes_never_raise_and_stay_bounded(parser: type, feed: list, gaps: list) -> None:
    p = parser(CFG)
    for i, (direction, data) in enumerate(feed):
        prefix = PREFACE if parser is Http2Parser and i == 0 and direction == "client" else b""
        p.feed(direction, prefix + data, i)
        if gaps and i % 4 == 3:
            p.gap(direction, gaps[i % len(gaps)], i)
        assert p.buffered_bytes() <= 2 * CFG.max_buffer
    p.close(99)


@FUZZ
@given(data=st.binary(max_size=600))
def test_dns_parse_random(data: bytes) -> None:
    try:
        parse_message(data)
    except ValueError:
        pass  # DnsError and friends: a counted parse error, never a hang or another exception
    DnsParser().feed_datagram("client", data, 0)
    DnsConversation(("a", 1), ("b", 2)).feed("server", data, 0)


@lru_cache(maxsize=1)
def capture_flows() -> list[list[tuple[str, int, bytes, int]]]:
    """Per capture connection: (direction, seq, payload, flags) in capture order."""
    flows = []
    for pcap in sorted(CAPTURES.glob("*/*.pcap")):
        conns: dict[frozenset, tuple[tuple, list]] = {}
        for s in read_tcp_segments(pcap):
            key = frozenset((s.src, s.dst))
            if key not in conns:
                conns[key] = ((s.dst if s.flags & 0x12 == 0x12 else s.src), [])
            client, segs = conns[key]
            segs.append(("client" if s.src == client else "server", s.seq, s.payload, s.flags))
        flows += [segs for _, segs in conns.values()]
    return flows


mutation = st.tuples(
    st.sampled_from(["flip", "truncate", "insert", "drop", "dup", "swap", "seq"]),
    st.integers(0, 1 << 16), st.integers(0, 255), st.binary(min_size=1, max_size=64),
)


@FUZZ
@given(index=st.integers(0, 1000), mutations=st.lists(mutation, max_size=8))
def test_mutated_captures_never_raise_and_stay_bounded(index: int, mutations: list) -> None:
    flows = capture_flows()
    segs = [list(s) for s in flows[index % len(flows)]]
    for op, pos, byte, blob in mutations:
        if not segs:
            break
        i = pos % len(segs)
        d, seq, payload, flags = segs[i]
        if op == "flip" and payload:
            j = pos % len(payload)
            segs[i][2] = payload[:j] + bytes([payload[j] ^ (byte or 1)]) + payload[j + 1:]
        elif op == "truncate":
            segs[i][2] = payload[: pos % (len(payload) + 1)]
        elif op == "insert":
            j = pos % (len(payload) + 1)
            segs[i][2] = payload[:j] + blob + payload[j:]
        elif op == "drop":
            segs.pop(i)
        elif op == "dup":
            segs.insert(i, list(segs[i]))
        elif op == "swap" and len(segs) > 1:
            k = (i + 1) % len(segs)
            segs[i], segs[k] = segs[k], segs[i]
        elif op == "seq":
            segs[i][1] = (seq + byte - 128) % (1 << 32)
    conv = Conversation(("10.0.0.1", 1000), ("10.0.0.2", 2000), CFG)
    bound = 2 * CFG.max_gap_bytes + 2 * CFG.max_buffer + 2 * (CFG.detect_limit + 70_000)
    for d, seq, payload, flags in segs:
        conv.feed(d, seq, bytes(payload), flags, 0)
        assert conv.buffered_bytes() <= bound
    conv.close(1)
    st_ = conv.stats
    assert st_.get("internal_errors", 0) == 0


@FUZZ
@given(data=st.binary(min_size=1, max_size=4000), cuts=st.lists(st.integers(1, 4000), max_size=30),
       order=st.randoms(use_true_random=False), dups=st.integers(0, 5))
def test_reassembly_reorders_any_permutation_exactly(data: bytes, cuts: list, order, dups: int) -> None:
    """Shuffled + duplicated segments of a stream come out as exactly the stream, with no gaps."""
    bounds = sorted({0, len(data), *[c % len(data) for c in cuts]})
    segs = [(1000 + a, data[a:b]) for a, b in zip(bounds, bounds[1:])]
    segs += [segs[i % len(segs)] for i in range(dups)]
    first = segs[0]
    rest = segs[1:]
    order.shuffle(rest)
    r = StreamReassembler(L7Config(max_gap_segments=10_000, max_gap_bytes=1 << 20, gap_timeout_ns=0))
    out = r.feed(first[0], first[1], 0x18, 0)
    for seq, payload in rest:
        out += r.feed(seq, payload, 0x18, 0)
        assert r.buffered <= len(data)
    assert not any(isinstance(x, Gap) for x in out)
    assert b"".join(x.data for x in out if isinstance(x, Data)) == data
    assert r.buffered == 0
