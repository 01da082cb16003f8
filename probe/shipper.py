"""Ship flows from the agent to the server in batches, in order, with retry, and account for every loss.

Flows go into a bounded in-memory queue; a thread cuts them into ``POST /api/v1/flows`` batches (by count
or time, whichever comes first). Every batch carries a batch id, ``<node>/<boot id>/<sequence>``, and the
server stores a batch id once (it records applied ids in the same transaction as the flows and answers
only after the commit), so a batch can be sent again whenever its answer is uncertain.

While the server answers, batches go straight from memory. When a send fails (server down, 5xx, 429,
timeout, or a refused token — the data is kept, not dropped), that batch and then everything queued
after it go to the on-disk :class:`probe.spool.Spool` (when one is configured) and are delivered oldest
first, with exponential backoff and jitter between attempts, before anything new is sent. When the
server is only slow and more than ``spill_after`` flows (10 batches) pile up in memory, full batches go
to the spool as well, so the agent's memory stays small either way. So flows reach
the server in the order they were produced, also across an agent restart (the spool survives it).

Loss happens only when there is no room left: the spool refuses a batch when full, the flows then wait in
memory, and when the memory queue is full too, new flows are dropped and counted; the count is sent as a
LostEvent (``OBSERVER_EVENTS_QUEUE``) with the next batch. Shedding starts with what matters least: once
the memory queue is half full, records of a TCP flag first seen and periodic updates of long flows are
dropped (and counted) while a flow's new, close, expire, drop and L7 records are still queued, so an
overloaded node keeps reporting every connection as long as it can. A batch the server rejects as invalid (4xx
other than 401/403/408/429) cannot succeed by retrying and is counted the same way. Nothing is lost
silently. Without a spool the shipper keeps one failed batch plus the memory queue.
"""

from __future__ import annotations

import collections
import email.utils
import hashlib
import logging
import os
import random
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import httpx
import msgspec

from flowscope import schema
from probe.spool import Spool, SpoolError

log = logging.getLogger("flowscope.shipper")

DEFAULT_SPOOL_ROOT = "/var/lib/flowscope/spool"
DEFAULT_SPOOL_BYTES = 1 << 30
_LOST_QUEUE = schema.LostEventSource.OBSERVER_EVENTS_QUEUE.value
SHEDDABLE_EVENTS = frozenset({"flags", "update"})  # the records an overloaded agent drops first


def _keeps(flow: schema.Flow) -> bool:
    ext = flow.flowscope
    return ext is None or ext.event not in SHEDDABLE_EVENTS


@dataclass
class ShipperStats:
    queued: int = 0
    shipped: int = 0
    batches: int = 0
    failures: int = 0
    lost_queue_full: int = 0
    last_error: str = ""
    lost_by_source: dict[str, int] = field(default_factory=dict)
    spooled_batches: int = 0  # batches written to the spool (server slow or down)
    duplicates: int = 0  # batches the server had already stored (an earlier answer was lost)
    rejected: int = 0  # batches the server refused as invalid (their flows are counted as lost)
    slow_spills: int = 0  # times the memory queue went to the spool because the server was slow
    shed: int = 0  # flag and update records dropped first when the memory queue was over half full


class _Counted(msgspec.Struct):
    flows: list[msgspec.Raw] = []


_count_decoder = msgspec.json.Decoder(_Counted)
_answer_decoder = msgspec.json.Decoder(dict[str, Any])


def _flows_in(body: bytes) -> int:
    try:
        return len(_count_decoder.decode(body).flows)
    except msgspec.DecodeError:
        return 0


def default_spool_dir(server: str, node_name: str, root: str = DEFAULT_SPOOL_ROOT) -> str:
    """``<root>/<hash of server URL and node name>``: an agent restarted with the same server and node name
    finds its spool; one pointed at another server does not deliver this one's batches there."""
    key = hashlib.sha256(f"{server.rstrip('/')}\n{node_name}".encode()).hexdigest()[:16]
    return os.path.join(root, key)


def _retry_after(r: httpx.Response) -> float:
    value = r.headers.get("retry-after", "")
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError):
            return 0.0
        return max(0.0, when - time.time())


class _Retry(Exception):
    def __init__(self, message: str, delay: float = 0.0) -> None:
        super().__init__(message)
        self.delay = delay


class Shipper:
    """``put(flows)`` from the agent loop; a thread delivers. ``spool_dir``: where batches wait when the
    server is slow or down (None: memory only)."""

    def __init__(self, server: str, node_name: str, batch_size: int = 1000, flush_interval: float = 0.2,
                 max_queue: int = 200_000, timeout: float = 10.0, token: Optional[str] = None, *,
                 spool_dir: Optional[str] = None, spool_max_bytes: int = DEFAULT_SPOOL_BYTES,
                 spool_fsync: str = "interval", spool: Optional[Spool] = None, boot_id: Optional[str] = None,
                 max_backoff: float = 5.0, spill_after: Optional[int] = None):
        self.url = server.rstrip("/") + "/api/v1/flows"
        self.node_name = node_name
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_queue = max_queue
        self.timeout = timeout
        self.max_backoff = max_backoff
        # A slow server: once this many flows wait in memory, full batches go to the spool too.
        self.spill_after = spill_after if spill_after is not None else 10 * batch_size
        self.spill_batch_size = 5 * batch_size
        self.boot_id = boot_id or secrets.token_hex(6)
        self._seq = 0
        headers = {"content-type": "application/json", "user-agent": "flowscope-agent"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        self.client = httpx.Client(timeout=timeout, headers=headers)
        self.stats = ShipperStats()
        self.spool = spool
        if spool is None and spool_dir:
            try:
                self.spool = Spool(spool_dir, max_bytes=spool_max_bytes, fsync=spool_fsync)
            except (SpoolError, OSError) as e:
                log.warning("no on-disk spool (%s): batches wait in memory only while the server is down", e)
        self._q: collections.deque[schema.Flow] = collections.deque()
        self._lost: list[dict] = []        # LostEvents waiting to be sent
        self._held: Optional[bytes] = None  # without a spool: the one failed batch being retried
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._encoder = msgspec.json.Encoder()
        self._thread = threading.Thread(target=self._run, name="flowscope-shipper", daemon=True)
        self._closed = False

    # ---------------------------------------------------------------- producer side

    def start(self) -> None:
        self._thread.start()

    def put(self, flows: list[schema.Flow]) -> None:
        if not flows:
            return
        with self._lock:
            if len(self._q) + len(flows) > self.max_queue // 2:
                kept = [f for f in flows if _keeps(f)]
                shed = len(flows) - len(kept)
                if shed:
                    self.stats.shed += shed
                    self.stats.lost_queue_full += shed
                    self._add_lost_locked(_LOST_QUEUE, shed, None)
                    flows = kept
            room = self.max_queue - len(self._q)
            if room >= len(flows):
                self._q.extend(flows)
                accepted = len(flows)
            else:
                accepted = max(room, 0)
                self._q.extend(flows[:accepted])
                dropped = len(flows) - accepted
                self.stats.lost_queue_full += dropped
                self._add_lost_locked(_LOST_QUEUE, dropped, None)
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
        """Flows waiting in memory."""
        with self._lock:
            return len(self._q)

    def backlog_bytes(self) -> int:
        """Bytes of encoded batches waiting for the server (spool and the held batch)."""
        held = len(self._held) if self._held is not None else 0
        return held + (self.spool.pending_bytes if self.spool is not None else 0)

    def idle(self) -> bool:
        """Nothing waits anywhere: memory queue, lost events, held batch, spool."""
        with self._lock:
            if self._q or self._lost:
                return False
        return self.backlog_bytes() == 0

    # ---------------------------------------------------------------- batches

    def _take_locked(self, size: int = 0) -> tuple[list[schema.Flow], list[dict]]:
        n = min(size or self.batch_size, len(self._q))
        batch = [self._q.popleft() for _ in range(n)]
        lost, self._lost = self._lost, []
        return batch, lost

    def _giveback_locked(self, batch: list[schema.Flow], lost: list[dict]) -> None:
        self._q.extendleft(reversed(batch))
        for ev in lost:  # already counted when first reported
            self._add_lost_locked(ev["source"], int(ev["num_events_lost"]), ev.get("cpu"), count=False)

    def _encode(self, batch: list[schema.Flow], lost: list[dict]) -> bytes:
        self._seq += 1
        return self._encoder.encode({"node_name": self.node_name,
                                     "batch_id": f"{self.node_name}/{self.boot_id}/{self._seq}",
                                     "flows": batch, "lost_events": lost})

    def _next_body(self) -> tuple[Optional[bytes], int]:
        """The next batch from memory, encoded, and its number of flows (None when nothing waits). When
        flows pile up (the server answers more slowly than they come), batches grow to
        ``spill_batch_size``: the per-request round trip is paid once for more flows."""
        with self._lock:
            if not self._q and not self._lost:
                return None, 0
            backlog = len(self._q) >= 2 * self.batch_size
            batch, lost = self._take_locked(self.spill_batch_size if backlog else 0)
        return self._encode(batch, lost), len(batch)

    def _spill(self, partial: bool) -> None:
        """Move what is in memory to the spool, in order, while it has room: full batches, and with
        ``partial`` the rest too."""
        assert self.spool is not None
        size = self.spill_batch_size  # larger batches: a backlog drains in fewer round trips
        while True:
            with self._lock:
                if len(self._q) < self.batch_size and not (partial and (self._q or self._lost)):
                    return
                batch, lost = self._take_locked(size)
            seq = self._seq
            body = self._encode(batch, lost)
            if not self.spool.append(body):
                self._seq = seq  # never sent: the id is free again
                with self._lock:
                    self._giveback_locked(batch, lost)
                if len(batch) > self.batch_size:
                    size = self.batch_size  # a nearly full spool may still take a normal batch
                    continue
                return
            self.stats.spooled_batches += 1

    def _backlog_head(self) -> Optional[bytes]:
        if self._held is not None:
            return self._held
        return self.spool.peek() if self.spool is not None else None

    def _backlog_pop(self) -> None:
        if self._held is not None:
            self._held = None
        elif self.spool is not None:
            self.spool.pop()

    def _keep(self, body: bytes) -> None:
        """A batch that failed: it goes first into the backlog."""
        if self.spool is not None and not self.spool and self.spool.append(body):
            self.stats.spooled_batches += 1
            return
        if self.spool is not None and self.spool:  # cannot happen: a failed direct send means an empty spool
            log.error("spool not empty while sending directly; holding the batch in memory")
        self._held = body

    # ---------------------------------------------------------------- sending

    def _post(self, body: bytes) -> None:
        """Deliver one batch; raises :class:`_Retry` when it must be sent again later."""
        try:
            r = self.client.post(self.url, content=body)
        except httpx.HTTPError as e:
            raise _Retry(f"{type(e).__name__}: {e}") from None
        if r.status_code < 300:
            try:
                answer = _answer_decoder.decode(r.content)
            except msgspec.DecodeError:
                answer = {}
            accepted = answer.get("accepted")
            self.stats.shipped += accepted if isinstance(accepted, int) else _flows_in(body)
            self.stats.batches += 1
            if answer.get("duplicate"):
                self.stats.duplicates += 1
            return
        detail = r.text[:300]
        if r.status_code in (401, 403):
            # Keep the data: the operator fixes the token, then everything is delivered.
            raise _Retry(f"the server refused the agent's token ({r.status_code}): {detail}", 5.0)
        if r.status_code in (408, 429) or r.status_code >= 500:
            raise _Retry(f"{r.status_code}: {detail}", _retry_after(r))
        # The server rejected the content: the same bytes can never succeed. Count the flows as lost.
        n = _flows_in(body)
        log.error("server rejected a batch of %d flows (%d): %s", n, r.status_code, detail)
        self.stats.rejected += 1
        self.report_lost(_LOST_QUEUE, n)

    def _drain_backlog(self) -> None:
        """Deliver the backlog oldest first, moving full batches from memory behind it (a partial batch
        waits in memory and goes directly once the backlog is delivered)."""
        while True:
            if self.spool is not None:
                self._spill(partial=False)
            body = self._backlog_head()
            if body is None:
                return
            self._post(body)
            self._backlog_pop()

    def _cycle(self, final: bool) -> None:
        """One round: the backlog first, then memory (full batches; partial ones too when due)."""
        if self._backlog_head() is not None:
            self._drain_backlog()
        while True:  # called on the flush timer, on a full batch, or when stopping
            if self.spool is not None and not final and self.pending() > self.spill_after:
                self._spill(partial=False)  # the server is slow: memory stays small, the disk takes the rest
                self.stats.slow_spills += 1
                return
            body, n = self._next_body()
            if body is None:
                return
            try:
                self._post(body)
            except _Retry:
                self._keep(body)
                if self.spool is not None:
                    self._spill(partial=True)
                raise
            if n < self.batch_size and not final:
                return

    def _run(self) -> None:
        backoff = 0.0
        while True:
            if backoff:
                self._stop.wait(backoff)
            else:
                self._wake.wait(self.flush_interval)
            self._wake.clear()
            stopping = self._stop.is_set()
            try:
                self._cycle(final=stopping)
                backoff = 0.0
            except _Retry as e:
                self.stats.failures += 1
                self.stats.last_error = str(e)
                backoff = min(self.max_backoff, max(0.2, backoff * 2)) * (0.8 + 0.4 * random.random())
                backoff = min(30.0, max(backoff, e.delay))
                if self.stats.failures % 10 == 1:
                    log.warning("shipping to %s failed (%s); retrying in %.1fs with %d flows in memory and %d "
                                "bytes waiting", self.url, e, backoff, self.pending(), self.backlog_bytes())
                if stopping:
                    return
            except Exception as e:  # noqa: BLE001 - a bug or a disk error must not kill the sender
                self.stats.failures += 1
                self.stats.last_error = f"{type(e).__name__}: {e}"
                log.exception("shipper round failed")
                backoff = 1.0
                if stopping:
                    return
            if self.spool is not None:
                self.spool.sync(force=False)
            if stopping:
                return

    def close(self, deadline_s: float = 5.0) -> None:
        """Deliver what waits (until the deadline), then stop. What is left goes to the spool, where the
        next agent on this node delivers it; without a spool it is counted as lost."""
        if self._closed:
            return
        self._closed = True
        end = time.monotonic() + deadline_s
        while not self.idle() and time.monotonic() < end and self._thread.is_alive():
            self._wake.set()
            time.sleep(0.05)
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=max(0.1, end - time.monotonic()) + self.timeout + 1)
        if self.spool is not None:
            if not self._thread.is_alive():
                self._spill(partial=True)
            left = self.pending()
            if left:
                log.error("%d flows could not be delivered or spooled before shutdown (spool full)", left)
                self.stats.lost_queue_full += left
            if self.spool:
                log.warning("%d bytes of batches stay in the spool %s for the next agent",
                            self.spool.pending_bytes, self.spool.directory)
            self.spool.close()
        else:
            left = self.pending() + (_flows_in(self._held) if self._held is not None else 0)
            if left:
                log.error("%d flows could not be delivered before shutdown", left)
                self.stats.lost_queue_full += left
        self.client.close()
