"""Front door: one :class:`Conversation` per TCP connection, :class:`DnsConversation` per UDP flow.

Feed raw segments (``direction`` is ``"client"`` or ``"server"``); get :class:`L7Event` lists back.
A conversation reassembles each direction, detects the protocol from the first bytes, then
drives the matching parser. Nothing raises; everything notable is counted in :attr:`stats`.
"""

from __future__ import annotations

from collections import Counter

from probe.l7.base import CLIENT, SERVER, StreamParser
from probe.l7.config import L7Config
from probe.l7.detect import DNS, HTTP1, HTTP2, KAFKA, UNKNOWN, detect, detect_udp
from probe.l7.dns import DnsParser
from probe.l7.http1 import Http1Parser
from probe.l7.http2 import Http2Parser
from probe.l7.kafka import KafkaParser
from probe.l7.reassembly import Gap, ReassemblyBudget, StreamReassembler
from probe.l7.records import L7Event

Endpoint = tuple[str, int]
_PARSERS: dict[str, type[StreamParser]] = {HTTP1: Http1Parser, HTTP2: Http2Parser, KAFKA: KafkaParser, DNS: DnsParser}


def make_parser(protocol: str, config: L7Config | None = None) -> StreamParser | None:
    cls = _PARSERS.get(protocol)
    return cls(config) if cls is not None else None


class Conversation:
    """One TCP connection: reassembly + detection + parsing."""

    def __init__(self, client: Endpoint, server: Endpoint, config: L7Config | None = None,
                 budget: ReassemblyBudget | None = None, protocol: str | None = None) -> None:
        self.client = client
        self.server = server
        self.config = config or L7Config()
        self._reasm = {CLIENT: StreamReassembler(self.config, budget), SERVER: StreamReassembler(self.config, budget)}
        self.protocol: str | None = None
        self._parser: StreamParser | None = None
        self._sniffed: list[tuple[str, bytes, int]] = []
        self._sniff_len = {CLIENT: 0, SERVER: 0}
        self._counters: Counter[str] = Counter()
        self._retired: Counter[str] = Counter()
        self.closed = False
        if protocol is not None:
            self._start(protocol)

    # -- public ---------------------------------------------------------------------------------
    def feed(self, direction: str, seq: int, payload: bytes, flags: int, ts_ns: int,
             wire_len: int | None = None) -> list[L7Event]:
        """One TCP segment as captured; returns the L7 events it completed.

        ``wire_len``: the payload's length on the wire when the capture truncated it (snap length).
        """
        out: list[L7Event] = []
        if self.closed:
            self._counters["segments_after_close"] += 1
            return out
        try:
            if direction not in self._reasm:
                self._counters["bad_direction"] += 1
                return out
            self._counters["segments"] += 1
            for item in self._reasm[direction].feed(seq, payload, flags, ts_ns, wire_len):
                self._deliver(direction, item, out)
            c, s = self._reasm[CLIENT], self._reasm[SERVER]
            if c.reset or s.reset or (c.closed and s.closed):
                out.extend(self.close(ts_ns))
        except Exception:  # noqa: BLE001 - a bug here must not take the agent down
            self._counters["internal_errors"] += 1
        self._counters["events"] += len(out)
        return out

    def close(self, ts_ns: int | None = None) -> list[L7Event]:
        """End of connection (FIN/RST/idle): flush held bytes and unfinished messages."""
        out: list[L7Event] = []
        if self.closed:
            return out
        try:
            for direction, r in self._reasm.items():
                for item in r.flush(ts_ns or 0):
                    self._deliver(direction, item, out)
            if self._parser is None and self._sniffed:
                self._decide(final=True, out=out)
            if self._parser is not None:
                out.extend(self._parser.close(ts_ns or 0))
        except Exception:  # noqa: BLE001
            self._counters["internal_errors"] += 1
        self.closed = True
        return out

    @property
    def stats(self) -> dict[str, int]:
        """Aggregate counters: reassembly (both directions), detection, parser."""
        total: Counter[str] = Counter()
        for r in self._reasm.values():
            total.update(r.stats())
        total.update(self._retired)
        if self._parser is not None:
            total.update(self._parser.stats)
        total.update(self._counters)
        total["buffered_bytes"] = self.buffered_bytes()
        return dict(total)

    def buffered_bytes(self) -> int:
        held = sum(r.buffered for r in self._reasm.values()) + sum(self._sniff_len.values())
        return held + (self._parser.buffered_bytes() if self._parser is not None else 0)

    # -- internals ------------------------------------------------------------------------------
    def _start(self, protocol: str) -> None:
        self.protocol = protocol
        self._parser = make_parser(protocol, self.config)
        self._counters[f"protocol_{protocol}"] += 1

    def _deliver(self, direction: str, item: object, out: list[L7Event]) -> None:
        if isinstance(item, Gap):
            if self._parser is not None:
                out.extend(self._parser.gap(direction, item.lost, item.ts_ns))
            elif self.protocol is None:
                self._sniffed = [x for x in self._sniffed if x[0] != direction]
                self._sniff_len[direction] = 0
            return
        data, ts = item.data, item.ts_ns  # type: ignore[attr-defined]
        if self._parser is not None:
            out.extend(self._parser.feed(direction, data, ts))
            if self._parser.handoff is not None:
                self._take_handoff(out)
            return
        if self.protocol is not None:  # opaque (unknown, TLS, websocket...)
            self._counters["opaque_bytes"] += len(data)
            return
        self._sniffed.append((direction, data, ts))
        self._sniff_len[direction] += len(data)
        self._decide(final=False, out=out)

    def _decide(self, final: bool, out: list[L7Event]) -> None:
        client = b"".join(d for x, d, _ in self._sniffed if x == CLIENT)
        server = b"".join(d for x, d, _ in self._sniffed if x == SERVER)
        limit = self.config.detect_limit
        final = final or len(client) >= limit or len(server) >= limit
        proto = detect(client, server, self.server[1], final=final)
        if proto is None:
            return
        sniffed, self._sniffed = self._sniffed, []
        self._sniff_len = {CLIENT: 0, SERVER: 0}
        if proto not in _PARSERS:
            self.protocol = proto
            self._counters[f"protocol_{proto}"] += 1
            self._counters["opaque_bytes"] += len(client) + len(server)
            return
        self._start(proto)
        for direction, data, ts in sniffed:
            self._deliver(direction, _Data(data, ts), out)

    def _take_handoff(self, out: list[L7Event]) -> None:
        old = self._parser
        assert old is not None and old.handoff is not None
        handoff = old.handoff
        self._retired.update(old.stats)
        self.protocol = handoff.protocol
        self._parser = Http2Parser(self.config, upgraded=handoff.context)
        self._counters[f"protocol_{handoff.protocol}"] += 1
        for direction, data, ts in handoff.pending:
            if data:
                self._deliver(direction, _Data(data, ts), out)


class _Data:
    __slots__ = ("data", "ts_ns")

    def __init__(self, data: bytes, ts_ns: int) -> None:
        self.data, self.ts_ns = data, ts_ns


class DnsConversation:
    """One UDP flow (client endpoint ↔ server endpoint) carrying DNS on any port."""

    def __init__(self, client: Endpoint, server: Endpoint, config: L7Config | None = None) -> None:
        self.client = client
        self.server = server
        self._parser = DnsParser(config)
        self._counters: Counter[str] = Counter()

    def feed(self, direction: str, payload: bytes, ts_ns: int) -> list[L7Event]:
        """One datagram; non-DNS payloads are counted and ignored."""
        if detect_udp(payload) == UNKNOWN:
            self._counters["not_dns"] += 1
            return []
        out = self._parser.feed_datagram(direction, payload, ts_ns)
        self._counters["events"] += len(out)
        return out

    @property
    def stats(self) -> dict[str, int]:
        total: Counter[str] = Counter(self._parser.stats)
        total.update(self._counters)
        return dict(total)
