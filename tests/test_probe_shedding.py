"""A full ring keeps its room for what matters most: right after a submit failed, the first sighting of
a TCP flag (and periodic updates) is counted as shed instead of queued, while new flows still are; a flow
whose events were not queued is not marked as reported, so the sweep's final record carries it.

The tc program runs on crafted packets with BPF_PROG_TEST_RUN against a one-page ring (30 events)."""

from __future__ import annotations

import pytest

from bench.bpf_cost import tcp_packet
from bench.bpf_cost import test_run as prog_test_run
from probe import events as ev

pytestmark = pytest.mark.root

SYN, ACK = 0x02, 0x10


def test_flag_events_are_shed_while_the_ring_is_full_and_new_flows_still_queue():
    from probe.datapath import Datapath

    dp = Datapath(ringbuf_pages=1)
    try:
        got: list[bytes] = []
        dp.open_events(got.append)
        fd = dp.fn_ingress.fd

        def send(sport: int, flags: int) -> None:
            prog_test_run(fd, tcp_packet("10.9.0.1", "10.9.0.2", sport, 80, flags), 1)

        for i in range(40):  # 40 new flows, room for 30 events
            send(20000 + i, SYN)
        stats = dp.read_stats()
        failed = sum(stats[ev.STAT_RINGBUF_FAIL])
        assert sum(stats[ev.STAT_EVENTS]) == 40 - failed and failed >= 5
        send(20000, ACK)  # first ACK of flow 0, microseconds after the failures: shed, not queued
        stats = dp.read_stats()
        assert sum(stats[ev.STAT_SHED]) == 1 and sum(stats[ev.STAT_RINGBUF_FAIL]) == failed

        dp.poll(0)
        assert len(got) == 40 - failed
        got.clear()
        send(30000, SYN)  # a new flow is never shed
        dp.poll(0)
        assert [(e.sport, e.type) for e in map(ev.decode_event, got)] == [(30000, ev.EV_NEW)]

        entries = dict(dp.snapshot_flows())
        by_port = {ev.KEY.unpack(k)[2]: v for k, v in entries.items()}
        assert ev.reported_in_full(by_port[20001])         # its NEW event was queued, nothing since
        assert not ev.reported_in_full(by_port[20000])     # its ACK was shed: a final record will say it
        assert not ev.reported_in_full(by_port[20039])     # its NEW event did not fit
        assert ev.VAL.unpack(by_port[20000])[5] & ACK       # the entry has the flag all the same
    finally:
        dp.close()
