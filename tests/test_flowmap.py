"""The agent's reads and deletes of the kernel flow map (batched syscalls) against the real map: entries
made by the tc program from crafted packets (BPF_PROG_TEST_RUN)."""

from __future__ import annotations

import pytest

from bench.bpf_cost import tcp_packet
from bench.bpf_cost import test_run as prog_test_run
from probe import events as ev

pytestmark = pytest.mark.root


@pytest.fixture
def dp():
    from probe.datapath import Datapath

    d = Datapath(flow_entries=4096)
    try:
        yield d
    finally:
        d.close()


def _fill(dp, n: int) -> None:
    for i in range(n):
        prog_test_run(dp.fn_ingress.fd, tcp_packet("10.9.0.1", "10.9.0.2", 10000 + i, 80, 0x02), 1)


def test_snapshot_reads_every_entry_as_bcc_does(dp):
    _fill(dp, 1500)
    snap = dp.snapshot_flows()
    assert len(snap) == 1500 and all(len(k) == ev.KEY.size and len(v) == ev.VAL.size for k, v in snap)
    assert dict(snap) == {bytes(k): bytes(v) for k, v in dp.flows.items()}


def test_delete_skips_keys_already_gone(dp):
    _fill(dp, 10)
    keys = sorted(k for k, _v in dp.snapshot_flows())
    gone = ev.KEY.pack(b"\x0a\x09\x00\x01" + b"\0" * 12, b"\x0a\x09\x00\x02" + b"\0" * 12, 9999, 80, 1, 4, 6,
                       ev.DIR_EGRESS, 0)
    assert dp.delete_flows([keys[0], gone, keys[1], gone, keys[2]]) == 3
    assert sorted(k for k, _v in dp.snapshot_flows()) == keys[3:]
    assert dp.delete_flows([]) == 0 and dp.delete_flows(keys[3:]) == 7 and dp.snapshot_flows() == []
