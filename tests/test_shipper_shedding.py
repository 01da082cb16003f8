"""An overloaded agent sheds flag and update records first: once the memory queue is half full, only a
flow's new/close/expire/drop/L7 records are still queued; every shed record is counted as lost."""

from __future__ import annotations

from flowscope import schema
from probe.shipper import Shipper


def flow(event: str | None, i: int) -> schema.Flow:
    ext = schema.FlowscopeExtension(event=event) if event else None
    return schema.Flow(uuid=f"u{i}", node_name="n", flowscope=ext)


def queued(sh: Shipper) -> list[str]:
    return [f.uuid for f in sh._q]


def test_below_half_everything_is_queued():
    sh = Shipper("http://127.0.0.1:9", "n", max_queue=10)
    try:
        sh.put([flow(e, i) for i, e in enumerate(["new", "flags", "update", "close", None])])
        assert queued(sh) == ["u0", "u1", "u2", "u3", "u4"] and sh.stats.shed == 0
    finally:
        sh.client.close()


def test_over_half_flag_and_update_records_go_first_and_are_counted():
    sh = Shipper("http://127.0.0.1:9", "n", max_queue=10)
    try:
        sh.put([flow("new", i) for i in range(4)])
        sh.put([flow(e, 10 + i) for i, e in enumerate(["flags", "new", "update", "close", "expire", "drop", None])])
        assert queued(sh) == ["u0", "u1", "u2", "u3", "u11", "u13", "u14", "u15", "u16"]
        assert sh.stats.shed == 2 and sh.stats.lost_queue_full == 2 and sh.stats.queued == 9
        # then the queue is full: the rest is dropped whatever it is, and counted the same way
        sh.put([flow("new", 20), flow("new", 21), flow("flags", 22)])
        assert queued(sh)[-1] == "u20" and len(sh._q) == 10
        assert sh.stats.shed == 3 and sh.stats.lost_queue_full == 4
        assert sh._lost == [{"source": "OBSERVER_EVENTS_QUEUE", "num_events_lost": "4"}]
    finally:
        sh.client.close()
