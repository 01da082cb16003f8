"""Live fan-out of committed flows to stream subscribers, without ever slowing ingest.

The writer thread calls :meth:`LiveHub.publish` after each commit. Every subscriber has its filter and a
bounded queue of ready-made envelope bytes; publishing filters, appends and, when the queue is full, drops
the oldest entries and counts them. A subscriber's sender task (in the event loop) takes everything queued
at most once per interval and sends it as one frame, with a ``lost_events`` envelope (source
``HUBBLE_RING_BUFFER``) for whatever was dropped since its previous frame.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from typing import Callable, Iterable, Optional, Sequence

from flowscope import schema

from .store import PreparedBatch, format_time

log = logging.getLogger(__name__)

Matcher = Optional[Callable[[schema.Flow], bool]]


def lost_envelope_bytes(source: str, num_lost: int, *, cpu: Optional[int] = None, node_name: str = "",
                        time_ns: Optional[int] = None) -> bytes:
    return schema.encode(schema.lost_envelope(source, num_lost, cpu, node_name, time_ns))


class Subscriber:
    """One stream client's queue. ``offer`` runs in the publishing thread, ``wait``/``take`` in the loop."""

    def __init__(self, hub: "LiveHub", match: Matcher, max_queue: int, min_id: int,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.hub = hub
        self.match = match
        self.max_queue = max_queue
        self.min_id = min_id  # flows with id <= min_id were (or will be) sent as history
        self._loop = loop
        self._q: deque[bytes] = deque()
        self._lock = threading.Lock()
        self._event = asyncio.Event()
        self._notified = False
        self._dropped = 0
        self.dropped_total = 0
        self.sent_total = 0
        self.closed = False

    def offer(self, envelopes: Sequence[bytes]) -> None:
        if not envelopes or self.closed:
            return
        with self._lock:
            q = self._q
            q.extend(envelopes)
            over = len(q) - self.max_queue
            if over > 0:
                for _ in range(over):
                    q.popleft()
                self._dropped += over
                self.dropped_total += over
                self.hub._count_drop(over)
            notify = not self._notified
            self._notified = True
        if notify:
            try:
                self._loop.call_soon_threadsafe(self._event.set)
            except RuntimeError:  # loop closed: the subscriber is gone
                self.closed = True

    async def wait(self) -> None:
        await self._event.wait()

    def take(self) -> tuple[list[bytes], int]:
        """Everything queued and the number dropped since the previous take."""
        with self._lock:
            items = list(self._q)
            self._q.clear()
            dropped, self._dropped = self._dropped, 0
            self._notified = False
            self._event.clear()
        self.sent_total += len(items)
        return items, dropped

    def close(self) -> None:
        self.closed = True
        self.hub.unsubscribe(self)


class LiveHub:
    """The set of subscribers; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: list[Subscriber] = []
        self._drops = 0
        self.published = 0
        self._taps: list[Callable[[list[PreparedBatch]], None]] = []

    def add_tap(self, fn: Callable[[list[PreparedBatch]], None]) -> None:
        """Also hand every committed batch list to ``fn`` (in the writer thread: ``fn`` must be quick and
        must not block, e.g. put the batches on a bounded queue; its exceptions are logged, never raised)."""
        self._taps.append(fn)

    def subscribe(self, match: Matcher, *, max_queue: int, last_id: Callable[[], int],
                  loop: Optional[asyncio.AbstractEventLoop] = None) -> Subscriber:
        """A new subscriber that receives flows with ids above the newest committed id at this moment
        (``last_id()``, read under the hub lock: no commit can be published between reading it and
        registering, so history up to ``sub.min_id`` plus live flows has no gap and no duplicate)."""
        loop = loop or asyncio.get_running_loop()
        with self._lock:
            sub = Subscriber(self, match, max_queue, last_id(), loop)
            self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    def _count_drop(self, n: int) -> None:
        self._drops += n  # only called from publish(), which holds the hub lock

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    @property
    def dropped(self) -> int:
        return self._drops

    def publish(self, batches: Iterable[PreparedBatch]) -> None:
        """Deliver committed batches: each subscriber gets the flows that match its filter (and whose ids
        it has not had as history) plus the batches' lost events, unfiltered."""
        if self._taps:
            batches = list(batches)
            for tap in self._taps:
                try:
                    tap(batches)
                except Exception:  # noqa: BLE001 - a tap never stops live delivery
                    log.exception("live tap failed")
        with self._lock:
            subs = [s for s in self._subs if not s.closed]
            if not subs:
                return
            batches = list(batches)
            items = [it for b in batches for it in b.live_items()]
            lost: list[bytes] = []
            for b in batches:
                for (t_ns, node, source, num, cpu) in b.lost_rows:
                    lost.append(lost_envelope_bytes(source, num, cpu=cpu, node_name=node, time_ns=t_ns))
            self.published += len(items)
            envelopes: dict[int, bytes] = {}

            def env(i: int) -> bytes:
                e = envelopes.get(i)
                if e is None:
                    it = items[i]
                    e = envelopes[i] = schema.envelope_json(it.body, it.node_name, format_time(it.time_ns))
                return e

            for sub in subs:
                match = sub.match
                min_id = sub.min_id
                out = [env(i) for i, it in enumerate(items)
                       if it.id > min_id and (match is None or match(it.flow))]
                if lost:
                    out.extend(lost)
                sub.offer(out)
