"""TCP reassembly: ordering, retransmissions, overlaps, bounded gaps, FIN/RST, budget, wraparound."""

from __future__ import annotations

from probe.l7.config import L7Config
from probe.l7.conversation import Conversation
from probe.l7.reassembly import FIN, RST, SYN, Data, Gap, ReassemblyBudget, StreamReassembler

PSH_ACK = 0x18


def data_of(items: list) -> bytes:
    return b"".join(i.data for i in items if isinstance(i, Data))


def test_in_order_after_syn() -> None:
    r = StreamReassembler()
    assert r.feed(1000, b"", SYN, 0) == []
    out = r.feed(1001, b"hello", PSH_ACK, 1) + r.feed(1006, b" world", PSH_ACK, 2)
    assert data_of(out) == b"hello world" and r.bytes_delivered == 11


def test_out_of_order_duplicates_and_overlaps() -> None:
    r = StreamReassembler()
    r.feed(0, b"", SYN, 0)
    assert r.feed(7, b"world", PSH_ACK, 1) == []          # ahead of a hole
    assert r.feed(7, b"world", PSH_ACK, 2) == []          # duplicate while held
    assert r.feed(5, b"o wo", PSH_ACK, 3) == []           # overlapping, still ahead
    out = r.feed(1, b"hel", PSH_ACK, 4)                   # fills the hole
    out += r.feed(2, b"ello", PSH_ACK, 5)                 # overlap with delivered + held data
    out += r.feed(1, b"hello", PSH_ACK, 6)                # pure retransmission
    assert data_of(out) == b"hello world"
    assert r.segments_out_of_order == 3 and r.retransmissions >= 3 and r.bytes_lost_gaps == 0
    assert r.buffered == 0


def test_gap_skipped_after_segment_bound() -> None:
    r = StreamReassembler(L7Config(max_gap_segments=3))
    r.feed(100, b"ab", PSH_ACK, 0)  # mid-stream start
    out = []
    for i in range(4):
        out += r.feed(112 + 2 * i, b"xy", PSH_ACK, i)
    gaps = [i for i in out if isinstance(i, Gap)]
    assert gaps == [Gap(10, 3)] and r.bytes_lost_gaps == 10 and data_of(out) == b"xy" * 4


def test_gap_skipped_after_byte_bound_and_timeout() -> None:
    r = StreamReassembler(L7Config(max_gap_bytes=100, gap_timeout_ns=0))
    r.feed(0, b"a", PSH_ACK, 0)
    assert r.feed(51, b"x" * 60, PSH_ACK, 1) == []
    out = r.feed(111, b"y" * 60, PSH_ACK, 2)
    assert out[0] == Gap(50, 2) and data_of(out) == b"x" * 60 + b"y" * 60
    r = StreamReassembler(L7Config(gap_timeout_ns=1_000))
    r.feed(0, b"a", PSH_ACK, 0)
    assert r.feed(5, b"b", PSH_ACK, 10) == []
    out = r.feed(6, b"c", PSH_ACK, 2_000)
    assert out[0] == Gap(4, 2_000) and data_of(out) == b"bc"


def test_fin_and_rst_close() -> None:
    r = StreamReassembler()
    r.feed(0, b"", SYN, 0)
    r.feed(4, b"", FIN, 1)  # FIN before the data it follows
    assert not r.closed
    r.feed(1, b"abc", PSH_ACK, 2)
    assert r.closed
    assert r.feed(4, b"late", PSH_ACK, 3) == [] and r.late_segments == 1
    r = StreamReassembler()
    r.feed(0, b"a", PSH_ACK, 0)
    r.feed(5, b"held", PSH_ACK, 1)
    r.feed(2, b"", RST, 2)
    assert r.closed and r.reset and r.buffered == 0


def test_sequence_wraparound() -> None:
    r = StreamReassembler()
    start = (1 << 32) - 3
    out = r.feed(start, b"abc", PSH_ACK, 0)
    assert r.feed(3, b"ghi", PSH_ACK, 1) == []  # after the wrap, ahead of a hole
    out += r.feed(0, b"def", PSH_ACK, 2)
    assert data_of(out) == b"abcdefghi"


def test_global_budget_forces_flush_and_is_released() -> None:
    budget = ReassemblyBudget(max_bytes=100)
    a, b = StreamReassembler(budget=budget), StreamReassembler(budget=budget)
    a.feed(0, b"x", PSH_ACK, 0)
    b.feed(0, b"x", PSH_ACK, 0)
    assert a.feed(10, b"1" * 80, PSH_ACK, 1) == [] and budget.used == 80
    out = b.feed(10, b"2" * 80, PSH_ACK, 2)  # no room: b stops waiting and delivers after a gap
    assert out[0] == Gap(9, 2) and b.overflow_drops == 1 and budget.refusals == 1
    a.flush(3)
    assert budget.used == 0


def test_conversation_gap_resyncs_http() -> None:
    conv = Conversation(("10.1.1.1", 50000), ("10.1.1.2", 31337), L7Config(max_gap_segments=2))
    conv.feed("client", 0, b"", SYN, 0)
    reqs = [f"GET /r{i} HTTP/1.1\r\nHost: h\r\n\r\n".encode() for i in range(5)]
    seq, ev = 1, []
    for i, req in enumerate(reqs):
        if i != 1:  # segment 1 is lost for good
            ev += conv.feed("client", seq, req, PSH_ACK, i)
        seq += len(req)
    assert [e.http.path for e in ev] == ["/r0", "/r2", "/r3", "/r4"]
    st = conv.stats
    assert st["gaps_skipped"] == 1 and st["bytes_lost_gaps"] == len(reqs[1]) and st["protocol_http1"] == 1
