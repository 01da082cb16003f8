"""LiveHub: filtering, history watermark, bounded queues with counted drops (pure logic, no server)."""

from __future__ import annotations

import asyncio
import threading

import msgspec

from api.live import LiveHub
from api.samples import sample_flows
from api.store import prepare_batch
from flowscope import schema

T0 = 1_732_000_000_000_000_000


def committed(flows, first_id, lost=()):
    batch = prepare_batch(flows, lost, node_name="n")
    batch.first_id = first_id
    return batch


def ids(envelopes):
    return [msgspec.json.decode(e)["flow"]["uuid"] for e in envelopes if b'"flow"' in e[:8]]


def test_history_watermark_filter_and_lost_events():
    async def main():
        hub = LiveHub()
        flows = sample_flows(20, seed=1, start_ns=T0)
        dropped = lambda f: f.verdict == schema.Verdict.DROPPED  # noqa: E731
        all_sub = hub.subscribe(None, max_queue=100, last_id=lambda: 10)
        drops_sub = hub.subscribe(dropped, max_queue=100, last_id=lambda: 0)
        lost = [schema.LostEvent(source=schema.LostEventSource.PERF_EVENT_RING_BUFFER, num_events_lost="3", cpu=1)]
        # ids 1..20: the first 10 were already history for all_sub (committed before it subscribed).
        hub.publish([committed(flows, 1, lost)])
        await asyncio.wait_for(all_sub.wait(), 1)
        items, dropped_n = all_sub.take()
        assert dropped_n == 0
        assert ids(items) == [f.uuid for f in flows[10:]]
        assert msgspec.json.decode(items[-1]) == {
            "lost_events": {"source": "PERF_EVENT_RING_BUFFER", "num_events_lost": "3", "cpu": 1}, "node_name": "n",
            "time": msgspec.json.decode(items[-1])["time"]}
        items, _ = drops_sub.take()
        assert ids(items) == [f.uuid for f in flows if dropped(f)]
        # Envelopes are Hubble's, built from the stored body.
        assert items[0] == schema.flow_envelope_json([f for f in flows if dropped(f)][0])
        drops_sub.close()
        assert hub.subscribers == 1
        hub.publish([committed(sample_flows(5, seed=2, start_ns=T0), 21)])
        assert drops_sub.take() == ([], 0)
        assert len(all_sub.take()[0]) == 5
    asyncio.run(main())


def test_overflow_drops_oldest_and_counts_once():
    async def main():
        hub = LiveHub()
        sub = hub.subscribe(None, max_queue=50, last_id=lambda: 0)
        flows = sample_flows(120, seed=3, start_ns=T0)
        next_id = 1
        for i in range(0, 120, 40):  # 120 flows into a queue of 50: 70 dropped, the newest 50 kept
            hub.publish([committed(flows[i:i + 40], next_id)])
            next_id += 40
        items, dropped = sub.take()
        assert dropped == 70 and ids(items) == [f.uuid for f in flows[70:]]
        assert hub.dropped == 70 and sub.dropped_total == 70
        assert sub.take() == ([], 0)  # the count is reported once
    asyncio.run(main())


def test_publish_from_another_thread_wakes_the_loop():
    async def main():
        hub = LiveHub()
        sub = hub.subscribe(None, max_queue=10, last_id=lambda: 0)
        t = threading.Thread(target=hub.publish, args=([committed(sample_flows(3, seed=4, start_ns=T0), 1)],))
        t.start()
        await asyncio.wait_for(sub.wait(), 2)
        t.join()
        assert len(sub.take()[0]) == 3
    asyncio.run(main())
