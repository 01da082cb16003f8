"""The mmap ring-buffer reader against a real BPF ring buffer in the kernel: a program run with
BPF_PROG_TEST_RUN writes numbered records of several sizes (and discards some) into a one-page ring, so
the positions wrap around the ring many times."""

from __future__ import annotations

import struct

import pytest

from bench.bpf_cost import test_run as prog_test_run

pytestmark = pytest.mark.root

PROGRAM = b"""
#include <uapi/linux/bpf.h>
BPF_RINGBUF_OUTPUT(ring, 1);
BPF_ARRAY(seq, u32, 1);
struct small { u32 v[4]; };
struct big { u32 v[12]; };

int emit(struct __sk_buff *skb) {
    int zero = 0;
    u32 *n = seq.lookup(&zero);
    if (!n)
        return 0;
    u32 i = *n;  /* one CPU runs the test: no atomics needed */
    *n = i + 1;
    if (i % 7 == 3) {               /* reserved, then given up: the reader must skip it */
        struct small *r = ring.ringbuf_reserve(sizeof(struct small));
        if (r) {
            r->v[0] = i;
            ring.ringbuf_discard(r, 0);
        }
        return 0;
    }
    struct big b = {};
    b.v[0] = i;
    b.v[11] = 0xabcdef;
    u32 k = i % 4;
    if (k == 0)
        ring.ringbuf_output(&b, 4, 0);
    else if (k == 1)
        ring.ringbuf_output(&b, 12, 0);
    else if (k == 2)
        ring.ringbuf_output(&b, 20, 0);
    else
        ring.ringbuf_output(&b, 48, 0);
    return 0;
}
"""
SIZES = {0: 4, 1: 12, 2: 20, 3: 48}
PACKET = bytes(64)


@pytest.fixture
def ring():
    from bcc import BPF

    from probe.ringbuf import RingReader

    b = BPF(text=PROGRAM)
    try:
        fn = b.load_func(b"emit", BPF.SCHED_CLS)
        table = b[b"ring"]
        with RingReader(table.map_fd, table.max_entries) as reader:
            yield reader, fn.fd
    finally:
        b.cleanup()


def expected(first: int, last: int) -> list[tuple[int, int]]:
    return [(i, SIZES[i % 4]) for i in range(first, last) if i % 7 != 3]


def test_every_record_in_order_across_many_wraps(ring):
    reader, fd = ring
    assert reader.size == 4096
    got = []
    for _ in range(300):
        prog_test_run(fd, PACKET, 25)  # fits: at most 25 * 56 bytes between two reads
        for rec in reader.read():
            got.append((struct.unpack_from("<I", rec)[0], len(rec)))
            if len(rec) == 48:
                assert struct.unpack_from("<I", rec, 44)[0] == 0xABCDEF
    assert got == expected(0, 300 * 25)  # 7,500 runs: the 4 KiB ring wrapped ~100 times
    assert reader.records == len(got) and reader.pending_bytes() == 0 and reader.read() == []


def test_a_full_ring_loses_the_newest_and_the_reader_carries_on(ring):
    reader, fd = ring
    prog_test_run(fd, PACKET, 500)  # far more than one page holds: the later outputs fail
    first = [struct.unpack_from("<I", r)[0] for r in reader.read()]
    want = [i for i, _n in expected(0, 500)]
    # what fitted: everything up to the first record that did not, then only records small enough for
    # the space left; in order, nothing invented
    assert 40 < len(first) < 400 and first == sorted(first) and set(first) <= set(want)
    assert first[:40] == want[:40]
    prog_test_run(fd, PACKET, 10)
    then = [struct.unpack_from("<I", r)[0] for r in reader.read()]
    assert then == [i for i, _n in expected(500, 510)]


def test_limit_leaves_the_rest_for_the_next_read(ring):
    reader, fd = ring
    prog_test_run(fd, PACKET, 20)
    a = reader.read(limit=5)
    b = reader.read()
    assert len(a) == 5 and [struct.unpack_from("<I", r)[0] for r in a + b] == [i for i, _n in expected(0, 20)]


def test_bad_size_is_refused():
    from probe.ringbuf import RingReader

    with pytest.raises(ValueError):
        RingReader(-1, 3000)
