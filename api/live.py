"""Live fan-out of committed flows to stream subscribers, without ever slowing ingest.

The writer thread calls :meth:`LiveHub.publish` after each commit. Subscribers with the same filter
(the same ``key``) form a group: per publish, each group's filter runs once per flow, each flow's
envelope is built once for all groups, and every subscriber of the group queues a reference to the same
:class:`Segment` (the group's envelopes of this publish). A segment joins its envelopes once per
separator (``,`` for websocket frames, newline for NDJSON) and every subscriber sends those same bytes:
the per-client cost of a publish is a queue append, and of a frame a few concatenations and the send.

Every subscriber's queue is bounded (in envelopes): when it is full the oldest envelopes are dropped and
counted, and its sender reports them as one ``lost_events`` envelope (source ``HUBBLE_RING_BUFFER``) in
its next frame. A slow client only ever loses its own oldest flows; it never holds up the others.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import threading
from collections import deque
from typing import Any, Callable, Hashable, Iterable, Optional, Sequence

import msgspec

from flowscope import schema

from .store import PreparedBatch, format_time

log = logging.getLogger(__name__)

Matcher = Optional[Callable[[schema.Flow], bool]]

ALL = b""  # the group key of subscribers without a filter


def lost_envelope_bytes(source: str, num_lost: int, *, cpu: Optional[int] = None, node_name: str = "",
                        time_ns: Optional[int] = None) -> bytes:
    return schema.encode(schema.lost_envelope(source, num_lost, cpu, node_name, time_ns))


def filter_key(whitelist: Sequence[Any], blacklist: Sequence[Any]) -> bytes:
    """The group key of a filter: equal for equal allow/deny lists (subscribers that can share frames);
    :data:`ALL` when both are empty."""
    if not whitelist and not blacklist:
        return ALL
    return msgspec.json.encode([list(whitelist), list(blacklist)])


class Segment:
    """Envelopes shared by the subscribers of one group (immutable once built), joined lazily and at
    most once per separator."""

    __slots__ = ("envelopes", "_joined")

    def __init__(self, envelopes: list[bytes]) -> None:
        self.envelopes = envelopes
        self._joined: dict[bytes, bytes] = {}

    def __len__(self) -> int:
        return len(self.envelopes)

    def joined(self, sep: bytes) -> bytes:
        j = self._joined.get(sep)
        if j is None:  # two threads may both join: same bytes, harmless
            j = self._joined[sep] = sep.join(self.envelopes)
        return j

    def tail(self, skip: int) -> "Segment":
        return Segment(self.envelopes[skip:])


class Subscriber:
    """One stream client's queue. ``offer`` runs in the publishing thread, ``wait``/``take`` in the loop."""

    def __init__(self, hub: "LiveHub", match: Matcher, max_queue: int, min_id: int,
                 loop: asyncio.AbstractEventLoop, key: Hashable) -> None:
        self.hub = hub
        self.match = match
        self.key = key
        self.max_queue = max_queue
        self.min_id = min_id  # flows with id <= min_id were (or will be) sent as history
        self._loop = loop
        self._q: deque[Segment] = deque()
        self._n = 0  # envelopes queued
        self._lock = threading.Lock()
        self._event = asyncio.Event()
        self._notified = False
        self._dropped = 0
        self.dropped_total = 0
        self.sent_total = 0
        self.closed = False

    def offer(self, envelopes: Sequence[bytes]) -> None:
        """Queue envelopes (a list, or a :class:`Segment` to share it with other subscribers)."""
        if not envelopes or self.closed:
            return
        seg = envelopes if isinstance(envelopes, Segment) else Segment(list(envelopes))
        with self._lock:
            q = self._q
            q.append(seg)
            self._n += len(seg)
            over = self._n - self.max_queue
            if over > 0:
                self._drop_oldest(over)
            notify = not self._notified
            self._notified = True
        if notify:
            try:
                self._loop.call_soon_threadsafe(self._event.set)
            except RuntimeError:  # loop closed: the subscriber is gone
                self.closed = True

    def _drop_oldest(self, over: int) -> None:
        q = self._q
        self._n -= over
        self._dropped += over
        self.dropped_total += over
        self.hub._count_drop(over)
        while over:
            head = q[0]
            if len(head) <= over:
                q.popleft()
                over -= len(head)
            else:
                q[0] = head.tail(over)
                over = 0

    async def wait(self) -> None:
        await self._event.wait()

    def _take_segments(self) -> tuple[list[Segment], int, int]:
        with self._lock:
            segs = list(self._q)
            n = self._n
            self._q.clear()
            self._n = 0
            dropped, self._dropped = self._dropped, 0
            self._notified = False
            self._event.clear()
        self.sent_total += n
        return segs, n, dropped

    def take(self) -> tuple[list[bytes], int]:
        """Every envelope queued and the number dropped since the previous take."""
        segs, _, dropped = self._take_segments()
        if len(segs) == 1:
            return list(segs[0].envelopes), dropped
        items: list[bytes] = []
        for s in segs:
            items.extend(s.envelopes)
        return items, dropped

    def take_joined(self, sep: bytes) -> tuple[bytes, int, int]:
        """Everything queued as one ``sep``-joined byte string (the bytes shared with the group where
        possible): (data, envelopes in it, dropped since the previous take)."""
        segs, n, dropped = self._take_segments()
        if not segs:
            return b"", 0, dropped
        if len(segs) == 1:
            return segs[0].joined(sep), n, dropped
        return sep.join([s.joined(sep) for s in segs]), n, dropped

    def close(self) -> None:
        self.closed = True
        self.hub.unsubscribe(self)


class LiveHub:
    """The set of subscribers, grouped by filter; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._groups: dict[Hashable, list[Subscriber]] = {}
        self._n_subs = 0
        self._drops = 0
        self.published = 0
        self._taps: list[Callable[[list[PreparedBatch]], None]] = []

    def add_tap(self, fn: Callable[[list[PreparedBatch]], None]) -> None:
        """Also hand every committed batch list to ``fn`` (in the writer thread: ``fn`` must be quick and
        must not block, e.g. put the batches on a bounded queue; its exceptions are logged, never raised)."""
        self._taps.append(fn)

    def subscribe(self, match: Matcher, *, max_queue: int, last_id: Callable[[], int],
                  loop: Optional[asyncio.AbstractEventLoop] = None, key: Optional[Hashable] = None) -> Subscriber:
        """A new subscriber that receives flows with ids above the newest committed id at this moment
        (``last_id()``, read under the hub lock: no commit can be published between reading it and
        registering, so history up to ``sub.min_id`` plus live flows has no gap and no duplicate).

        ``key`` identifies the filter (:func:`filter_key`): subscribers with equal keys share the
        filtering and the encoded bytes, so equal keys must mean equal ``match`` results. Without a key,
        subscribers without a filter share one group and every other one gets its own."""
        loop = loop or asyncio.get_running_loop()
        with self._lock:
            if key is None:
                key = ALL if match is None else ("matcher", id(match))
            sub = Subscriber(self, match, max_queue, last_id(), loop, key)
            self._groups.setdefault(key, []).append(sub)
            self._n_subs += 1
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        with self._lock:
            group = self._groups.get(sub.key)
            if group is not None and sub in group:
                group.remove(sub)
                self._n_subs -= 1
                if not group:
                    del self._groups[sub.key]

    def _count_drop(self, n: int) -> None:
        self._drops += n  # only called from publish(), which holds the hub lock

    @property
    def subscribers(self) -> int:
        return self._n_subs

    @property
    def groups(self) -> int:
        """Distinct filters among the subscribers (the filtering and encoding done per publish)."""
        return len(self._groups)

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
            if not self._n_subs:
                return
            batches = list(batches)
            items = [it for b in batches for it in b.live_items()]
            lost: list[bytes] = []
            for b in batches:
                for (t_ns, node, source, num, cpu) in b.lost_rows:
                    lost.append(lost_envelope_bytes(source, num, cpu=cpu, node_name=node, time_ns=t_ns))
            self.published += len(items)
            all_envs: Optional[list[bytes]] = None  # every item's envelope, built at most once
            built: dict[int, bytes] = {}  # or only those some filter selected
            env = schema.envelope_json

            def envelope(i: int) -> bytes:
                e = built.get(i)
                if e is None:
                    it = items[i]
                    e = built[i] = env(it.body, it.node_name, format_time(it.time_ns))
                return e

            for group in self._groups.values():
                subs = [s for s in group if not s.closed]
                if not subs:
                    continue
                match = subs[0].match
                sel: Optional[list[int]]
                if match is None:
                    if all_envs is None:
                        all_envs = ([envelope(i) for i in range(len(items))] if built else
                                    [env(it.body, it.node_name, format_time(it.time_ns)) for it in items])
                    envs, sel = all_envs, None
                else:
                    sel = [i for i, it in enumerate(items) if match(it.flow)]
                    envs = [envelope(i) for i in sel]
                if not envs and not lost:
                    continue
                # one segment per group and publish: the group's flows, then the batches' lost events
                seg = Segment(envs + lost if lost else envs)
                for sub in subs:
                    part = self._after_history(seg, len(envs), items, sel, sub.min_id)
                    if part is not None:
                        sub.offer(part)

    @staticmethod
    def _after_history(seg: Segment, n_flows: int, items: list[Any], sel: Optional[list[int]],
                       min_id: int) -> Optional[Segment]:
        """``seg`` (``n_flows`` flow envelopes, then lost events) without the flows a subscriber had as
        history (ids <= ``min_id``): only a subscriber's first publish can hold any, so the common case
        is the shared segment itself."""
        if not n_flows or items[sel[0] if sel is not None else 0].id > min_id:
            return seg
        ids = [items[i].id for i in sel] if sel is not None else [it.id for it in items]
        cut = bisect.bisect_right(ids, min_id)  # ids ascend: batches are committed in order
        return seg.tail(cut) if cut < len(seg) else None
