"""Ship flows from the agent to the server in batches, with retry, and account for every loss.

Flows go into a bounded in-memory queue; a thread sends them as ``POST /api/v1/flows`` batches
(by count or time, whichever comes first). When the server is slow or down the batch is retried
with exponential backoff and jitter while the queue keeps filling; when the queue is full, new
flows are dropped and counted, and the count is sent as a LostEvent (``OBSERVER_EVENTS_QUEUE``)
with the next batch that gets through. Nothing is lost silently.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import httpx
import msgspec

from flowscope import schema

log = logging.getLogger("flowscope.shipper")


@dataclass
class ShipperStats:
    queued: int = 0
    shipped: int = 0
    batches: int = 0
    failures: int = 0
    lost_queue_full: int = 0
    last_error: str = ""
    lost_by_source: dict[str, int] = field(default_factory=dict)


class Shipper:
    def __init__(self, server: str, node_name: str, batch_size: int = 1000, flush_interval: float = 0.2,
                 max_queue: int = 200_000, timeout: float = 10.0, token: Optional[str] = None):
        self.url = server.rstrip("/") + "/api/v1/flows"
        self.node_name = node_name
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_queue = max_queue
        headers = {"content-type": "application/json", "user-agent": "flowscope-agent"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        self.client = httpx.Client(timeout=timeout, headers=headers)
        self.stats = ShipperStats()
        self._q: collections.deque[schema.Flow] = collections.deque()
        self._lost: list[dict] = []        # LostEvents waiting to be sent
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._encoder = msgspec.json.Encoder()
        self._thread = threading.Thread(target=self._run, name="flowscope-shipper", daemon=True)

    # ---------------------------------------------------------------- producer side

    def start(self) -> None:
        self._thread.start()

    def put(self, flows: list[schema.Flow]) -> None:
        if not flows:
            return
        with self._lock:
            room = self.max_queue - len(self._q)
            if room >= len(flows):
                self._q.extend(flows)
                accepted = len(flows)
            else:
                accepted = max(room, 0)
                self._q.extend(flows[:accepted])
                dropped = len(flows) - accepted
                self.stats.lost_queue_full += dropped
                self._add_lost_locked(schema.LostEventSource.OBSERVER_EVENTS_QUEUE.value, dropped, None)
            self.stats.queued += accepted
            if len(self._q) >= self.batch_size:
                self._wake.set()

    def report_lost(self, source: str, n: int, cpu: Optional[int] = None) -> None:
        if n <= 0:
            return
        with self._lock:
            self._add_lost_locked(source, n, cpu)
        self._wake.set()

    def _add_lost_locked(self, source: str, n: int, cpu: Optional[int], count: bool = True) -> None:
        if count:
            self.stats.lost_by_source[source] = self.stats.lost_by_source.get(source, 0) + n
        for ev in self._lost:
            if ev["source"] == source and ev.get("cpu") == cpu:
                ev["num_events_lost"] = str(int(ev["num_events_lost"]) + n)
                return
        ev = {"source": source, "num_events_lost": str(n)}
        if cpu is not None:
            ev["cpu"] = cpu
        self._lost.append(ev)

    def pending(self) -> int:
        with self._lock:
            return len(self._q)

    # ---------------------------------------------------------------- sender thread

    def _take_batch(self) -> tuple[list[schema.Flow], list[dict]]:
        with self._lock:
            n = min(self.batch_size, len(self._q))
            batch = [self._q.popleft() for _ in range(n)]
            lost, self._lost = self._lost, []
        return batch, lost

    def _giveback(self, batch: list[schema.Flow], lost: list[dict]) -> None:
        with self._lock:
            self._q.extendleft(reversed(batch))
            for ev in lost:  # already counted when first reported
                self._add_lost_locked(ev["source"], int(ev["num_events_lost"]), ev.get("cpu"), count=False)

    def _send(self, batch: list[schema.Flow], lost: list[dict]) -> None:
        body = self._encoder.encode({"node_name": self.node_name, "flows": batch, "lost_events": lost})
        r = self.client.post(self.url, content=body)
        if r.status_code >= 300:
            detail = r.text[:300]
            if 400 <= r.status_code < 500 and r.status_code not in (408, 429):
                # The server rejected the content: retrying the same bytes cannot succeed. Count it.
                log.error("server rejected a batch of %d flows (%d): %s", len(batch), r.status_code, detail)
                self.report_lost(schema.LostEventSource.OBSERVER_EVENTS_QUEUE.value, len(batch))
                return
            raise httpx.HTTPStatusError(f"{r.status_code}: {detail}", request=r.request, response=r)
        self.stats.shipped += len(batch)
        self.stats.batches += 1

    def _run(self) -> None:
        backoff = 0.0
        while True:
            if backoff:
                self._stop.wait(backoff)
            else:
                self._wake.wait(self.flush_interval)
            self._wake.clear()
            stopping = self._stop.is_set()
            while True:
                batch, lost = self._take_batch()
                if not batch and not lost:
                    break
                try:
                    self._send(batch, lost)
                    backoff = 0.0
                except Exception as e:
                    self.stats.failures += 1
                    self.stats.last_error = str(e)
                    self._giveback(batch, lost)
                    backoff = min(5.0, max(0.2, backoff * 2)) * (0.8 + 0.4 * random.random())
                    if self.stats.failures % 10 == 1:
                        log.warning("shipping to %s failed (%s); retrying in %.1fs with %d flows queued",
                                    self.url, e, backoff, self.pending())
                    break
                if len(batch) < self.batch_size and not stopping:
                    break
            if stopping:
                return

    def close(self, deadline_s: float = 5.0) -> None:
        """Flush what is queued (until the deadline), then stop. What could not be sent is reported."""
        end = time.monotonic() + deadline_s
        while self.pending() and time.monotonic() < end and self._thread.is_alive():
            self._wake.set()
            time.sleep(0.05)
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=max(0.1, end - time.monotonic()) + 1)
        left = self.pending()
        if left:
            log.error("%d flows could not be delivered before shutdown", left)
            self.stats.lost_queue_full += left
        self.client.close()
