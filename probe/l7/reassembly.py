"""TCP stream reassembly, one instance per connection direction.

Segments may arrive out of order, duplicated, retransmitted or overlapping; bytes come out in
order. A gap that does not fill within ``max_gap_bytes``/``max_gap_segments``/``gap_timeout_ns``
is skipped: the lost bytes are counted and a :class:`Gap` tells the parser to resynchronise.
"""

from __future__ import annotations

from typing import NamedTuple

from probe.l7.config import L7Config

FIN = 0x01
SYN = 0x02
RST = 0x04
_MOD = 1 << 32
_HALF = 1 << 31


class Data(NamedTuple):
    """In-order bytes, stamped with the time of the segment that carried their start."""

    data: bytes
    ts_ns: int


class Gap(NamedTuple):
    """``lost`` bytes never arrived; the stream continues after them."""

    lost: int
    ts_ns: int


Delivery = Data | Gap


class ReassemblyBudget:
    """Global cap on out-of-order bytes held by all reassemblers sharing it."""

    __slots__ = ("max_bytes", "used", "refusals")

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self.refusals = 0

    def reserve(self, n: int) -> bool:
        if self.used + n > self.max_bytes:
            self.refusals += 1
            return False
        self.used += n
        return True

    def release(self, n: int) -> None:
        self.used = max(0, self.used - n)


def _rel(seq: int, base: int) -> int:
    """Signed distance from ``base`` to ``seq`` in 32-bit sequence space."""
    d = (seq - base) % _MOD
    return d - _MOD if d >= _HALF else d


class StreamReassembler:
    """Orders one direction's TCP payload; see the module docstring."""

    __slots__ = (
        "_cfg", "_budget", "next_seq", "_pending", "_pending_bytes", "_fin_seq", "closed", "reset",
        "bytes_delivered", "bytes_lost_gaps", "segments_out_of_order", "retransmissions",
        "overflow_drops", "gaps_skipped", "late_segments", "bytes_truncated",
    )

    def __init__(self, config: L7Config | None = None, budget: ReassemblyBudget | None = None) -> None:
        self._cfg = config or L7Config()
        self._budget = budget
        self.next_seq: int | None = None
        #: seq -> (payload, ts_ns) of segments beyond a hole.
        self._pending: dict[int, tuple[bytes, int]] = {}
        self._pending_bytes = 0
        self._fin_seq: int | None = None
        self.closed = False
        self.reset = False
        self.bytes_delivered = 0
        self.bytes_lost_gaps = 0
        self.segments_out_of_order = 0
        self.retransmissions = 0
        self.overflow_drops = 0
        self.gaps_skipped = 0
        self.late_segments = 0
        self.bytes_truncated = 0

    @property
    def buffered(self) -> int:
        return self._pending_bytes

    def stats(self) -> dict[str, int]:
        return {
            "bytes_delivered": self.bytes_delivered,
            "bytes_lost_gaps": self.bytes_lost_gaps,
            "segments_out_of_order": self.segments_out_of_order,
            "retransmissions": self.retransmissions,
            "overflow_drops": self.overflow_drops,
            "gaps_skipped": self.gaps_skipped,
            "late_segments": self.late_segments,
            "bytes_truncated": self.bytes_truncated,
        }

    def feed(self, seq: int, payload: bytes, flags: int, ts_ns: int, wire_len: int | None = None) -> list[Delivery]:
        """Add one segment; return what became deliverable, in order.

        ``wire_len`` is the segment's payload length on the wire when the capture kept only the first
        ``len(payload)`` bytes (snap length): the missing tail is delivered as a :class:`Gap` at once
        when the segment is in order (an out-of-order truncated segment leaves an ordinary hole).
        """
        out: list[Delivery] = []
        if self.closed:
            if payload:
                self.late_segments += 1
            return out
        seq %= _MOD
        if flags & SYN:
            if self.next_seq is None:
                self.next_seq = (seq + 1) % _MOD
            seq = (seq + 1) % _MOD
        elif self.next_seq is None:
            self.next_seq = seq
        if flags & RST:
            self.reset = True
            self._close()
            return out
        n = len(payload)
        wire = wire_len if wire_len is not None and wire_len > n else n
        if flags & FIN:
            self._fin_seq = (seq + wire) % _MOD
        if n:
            rel = _rel(seq, self.next_seq)
            if rel <= 0:
                if rel + n <= 0:
                    self.retransmissions += 1
                else:
                    if rel < 0:
                        self.retransmissions += 1
                        payload = payload[-rel:]
                    self._deliver(payload, ts_ns, out)
                if wire > n and rel + wire > 0:
                    # The captured prefix ends before the segment does: skip the tail now.
                    lost = min(wire - n, rel + wire)
                    self.bytes_truncated += lost
                    self.bytes_lost_gaps += lost
                    out.append(Gap(lost, ts_ns))
                    self.next_seq = (self.next_seq + lost) % _MOD  # type: ignore[operator]
                if self._pending:
                    self._drain(out)
            else:
                self._hold(seq, payload, ts_ns, out)
        self._check_fin()
        return out

    def flush(self, ts_ns: int) -> list[Delivery]:
        """Give up on every hole: deliver all held bytes after counted gaps."""
        out: list[Delivery] = []
        while self._pending:
            self._skip_gap(ts_ns, out)
        self._check_fin()
        return out

    # -- internals ------------------------------------------------------------------------------
    def _deliver(self, payload: bytes, ts_ns: int, out: list[Delivery]) -> None:
        self.next_seq = (self.next_seq + len(payload)) % _MOD  # type: ignore[operator]
        self.bytes_delivered += len(payload)
        out.append(Data(payload, ts_ns))

    def _hold(self, seq: int, payload: bytes, ts_ns: int, out: list[Delivery]) -> None:
        self.segments_out_of_order += 1
        old = self._pending.get(seq)
        if old is not None:
            self.retransmissions += 1
            if len(old[0]) >= len(payload):
                return
            self._unreserve(len(old[0]))
        if self._budget is not None and not self._budget.reserve(len(payload)):
            # Out of global memory: stop waiting for holes on this stream, deliver what we have.
            self.overflow_drops += 1
            self._pending[seq] = (payload, ts_ns)
            self._pending_bytes += len(payload)
            self._budget.used += len(payload)
            while self._pending:
                self._skip_gap(ts_ns, out)
            return
        self._pending[seq] = (payload, ts_ns)
        self._pending_bytes += len(payload)
        cfg = self._cfg
        while self._pending and (
            self._pending_bytes > cfg.max_gap_bytes
            or len(self._pending) > cfg.max_gap_segments
            or (cfg.gap_timeout_ns and ts_ns - min(t for _, t in self._pending.values()) > cfg.gap_timeout_ns)
        ):
            self._skip_gap(ts_ns, out)

    def _unreserve(self, n: int) -> None:
        self._pending_bytes -= n
        if self._budget is not None:
            self._budget.release(n)

    def _drain(self, out: list[Delivery]) -> None:
        pending = self._pending
        while pending:
            best = None
            best_rel = 1
            for s in pending:
                r = _rel(s, self.next_seq)  # type: ignore[arg-type]
                if r < best_rel:
                    best, best_rel = s, r
            if best is None:
                return
            payload, ts = pending.pop(best)
            self._unreserve(len(payload))
            if best_rel + len(payload) <= 0:
                self.retransmissions += 1
                continue
            self._deliver(payload[-best_rel:] if best_rel else payload, ts, out)

    def _skip_gap(self, ts_ns: int, out: list[Delivery]) -> None:
        first = min(self._pending, key=lambda s: _rel(s, self.next_seq))  # type: ignore[arg-type]
        lost = _rel(first, self.next_seq)  # type: ignore[arg-type]
        if lost > 0:
            self.bytes_lost_gaps += lost
            self.gaps_skipped += 1
            out.append(Gap(lost, ts_ns))
            self.next_seq = first
        self._drain(out)

    def _check_fin(self) -> None:
        if self._fin_seq is not None and self.next_seq == self._fin_seq and not self._pending:
            self._close()

    def _close(self) -> None:
        self.closed = True
        for payload, _ in self._pending.values():
            self._unreserve(len(payload))
        self._pending.clear()
