"""DNS messages over UDP (one per datagram) and TCP (2-byte length prefix).

Name decompression follows pointers only backwards, at most ``_MAX_HOPS`` times, and stops at
255 bytes, so compression loops and bombs end in a counted error, never a hang.
"""

from __future__ import annotations

import socket
import struct

from probe.l7.base import CLIENT, StreamParser
from probe.l7.config import L7Config
from probe.l7.records import REQUEST, RESPONSE, DnsRecord, L7Event

RRTYPES = {
    1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 13: "HINFO", 15: "MX", 16: "TXT", 28: "AAAA",
    33: "SRV", 35: "NAPTR", 39: "DNAME", 41: "OPT", 43: "DS", 46: "RRSIG", 47: "NSEC", 48: "DNSKEY",
    50: "NSEC3", 52: "TLSA", 64: "SVCB", 65: "HTTPS", 99: "SPF", 255: "ANY", 257: "CAA",
}
_MAX_HOPS = 32
_MAX_NAME = 255
_MAX_RECORDS = 256
_HDR = struct.Struct(">HHHHHH")
_RR = struct.Struct(">HHIH")


class DnsError(ValueError):
    """Malformed DNS message."""


class DnsLoopError(DnsError):
    """A compression pointer that does not point strictly backwards, or too many hops."""


def type_name(t: int) -> str:
    return RRTYPES.get(t) or f"TYPE{t}"


def read_name(msg: bytes, pos: int) -> tuple[str, int]:
    """Decode a (possibly compressed) name at ``pos``; returns (``"a.b."``, end of the name in place)."""
    labels: list[str] = []
    end = -1
    hops = 0
    total = 0
    n = len(msg)
    while True:
        if pos >= n:
            raise DnsError("name runs past the message")
        length = msg[pos]
        if length & 0xC0 == 0xC0:
            if pos + 1 >= n:
                raise DnsError("truncated pointer")
            target = ((length & 0x3F) << 8) | msg[pos + 1]
            if end < 0:
                end = pos + 2
            hops += 1
            if hops > _MAX_HOPS or target >= pos:
                raise DnsLoopError("compression loop")
            pos = target
            continue
        if length & 0xC0:
            raise DnsError("reserved label type")
        pos += 1
        if length == 0:
            break
        if pos + length > n:
            raise DnsError("label runs past the message")
        total += length + 1
        if total > _MAX_NAME:
            raise DnsError("name too long")
        raw = msg[pos:pos + length]
        label = raw.decode("ascii", "backslashreplace") if raw.isascii() else raw.decode("latin-1")
        labels.append(label.replace(".", "\\."))
        pos += length
    return ".".join(labels) + ".", (end if end >= 0 else pos)


class DnsMessage:
    """The parts of a DNS message that Hubble reports."""

    __slots__ = ("id", "is_response", "rcode", "query", "qtypes", "ips", "cnames", "rrtypes", "ttl")

    def __init__(self) -> None:
        self.id = 0
        self.is_response = False
        self.rcode = 0
        self.query = ""
        self.qtypes: list[str] = []
        self.ips: list[str] = []
        self.cnames: list[str] = []
        self.rrtypes: list[str] = []
        self.ttl = 0

    def record(self) -> DnsRecord:
        return DnsRecord(
            query=self.query, ips=self.ips, ttl=self.ttl, cnames=self.cnames, rcode=self.rcode,
            qtypes=self.qtypes, rrtypes=self.rrtypes, id=self.id,
        )


def parse_message(msg: bytes) -> DnsMessage:
    """Parse one DNS message; raises :class:`DnsError` (a ValueError) when malformed."""
    if len(msg) < 12:
        raise DnsError("short header")
    ident, flags, qd, an, _ns, _ar = _HDR.unpack_from(msg, 0)
    m = DnsMessage()
    m.id = ident
    m.is_response = bool(flags & 0x8000)
    m.rcode = flags & 0x000F
    if (flags >> 11) & 0xF not in (0, 1, 2, 4, 5, 6):
        raise DnsError("bad opcode")
    if qd > _MAX_RECORDS or an > _MAX_RECORDS:
        raise DnsError("too many records")
    pos = 12
    for i in range(qd):
        name, pos = read_name(msg, pos)
        if pos + 4 > len(msg):
            raise DnsError("truncated question")
        qtype = (msg[pos] << 8) | msg[pos + 1]
        pos += 4
        if i == 0:
            m.query = name
        m.qtypes.append(type_name(qtype))
    ttl = None
    for _ in range(an):
        _name, pos = read_name(msg, pos)
        if pos + 10 > len(msg):
            raise DnsError("truncated record")
        rtype, _cls, rttl, rdlen = _RR.unpack_from(msg, pos)
        pos += 10
        rdata_end = pos + rdlen
        if rdata_end > len(msg):
            raise DnsError("truncated rdata")
        if rtype == 1 and rdlen == 4:
            m.ips.append(socket.inet_ntop(socket.AF_INET, msg[pos:rdata_end]))
        elif rtype == 28 and rdlen == 16:
            m.ips.append(socket.inet_ntop(socket.AF_INET6, msg[pos:rdata_end]))
        elif rtype == 5:
            m.cnames.append(read_name(msg, pos)[0])
        if rtype != 41:
            m.rrtypes.append(type_name(rtype))
            ttl = rttl if ttl is None else min(ttl, rttl)
        pos = rdata_end
    m.ttl = ttl or 0
    return m


def looks_like_dns(msg: bytes) -> bool:
    """Whether a datagram parses as a plausible DNS message (used for detection on any port)."""
    if len(msg) < 17:
        return False
    qd = (msg[4] << 8) | msg[5]
    if qd != 1 or (msg[2] >> 3) & 0xF not in (0, 4, 5):
        return False
    try:
        m = parse_message(msg)
    except (ValueError, IndexError, struct.error, OSError):
        return False
    return bool(m.query)


class DnsParser(StreamParser):
    """DNS per flow: ``feed_datagram`` for UDP, ``feed`` (length-prefixed) for TCP.

    Queries are matched to responses by DNS id for latency.
    """

    protocol = "dns"

    def __init__(self, config: L7Config | None = None) -> None:
        super().__init__(config)
        self._bufs = {CLIENT: bytearray(), "server": bytearray()}
        self._pending: dict[tuple[int, str], int] = {}

    def buffered_bytes(self) -> int:
        return sum(len(b) for b in self._bufs.values())

    def feed_datagram(self, direction: str, payload: bytes, ts_ns: int) -> list[L7Event]:
        """One UDP datagram; never raises."""
        out: list[L7Event] = []
        try:
            self._message(payload, ts_ns, out)
        except DnsLoopError:
            self.stats["compression_loops"] += 1
            self.stats["parse_errors"] += 1
        except Exception:  # noqa: BLE001
            self.stats["parse_errors"] += 1
        return out

    def _message(self, payload: bytes, ts: int, out: list[L7Event]) -> None:
        m = parse_message(payload)
        rec = m.record()
        key = (m.id, m.query.lower())
        if m.is_response:
            req_ts = self._pending.pop(key, None)
            latency = ts - req_ts if req_ts is not None and ts >= req_ts else 0
            if req_ts is None:
                self.stats["unmatched_responses"] += 1
            out.append(L7Event(RESPONSE, ts, self.protocol, dns=rec, latency_ns=latency, stream_id=m.id))
            self.stats["responses"] += 1
        else:
            if len(self._pending) >= self.config.max_pending:
                self._pending.pop(next(iter(self._pending)))
                self.stats["pending_evicted"] += 1
            self._pending[key] = ts
            out.append(L7Event(REQUEST, ts, self.protocol, dns=rec, stream_id=m.id))
            self.stats["requests"] += 1

    def _feed(self, direction: str, data: bytes, ts_ns: int, out: list[L7Event]) -> None:
        buf = self._bufs[direction]
        buf += data
        pos = 0
        while len(buf) - pos >= 2:
            size = (buf[pos] << 8) | buf[pos + 1]
            if len(buf) - pos - 2 < size:
                break
            try:
                self._message(bytes(buf[pos + 2:pos + 2 + size]), ts_ns, out)
            except DnsLoopError:
                self.stats["compression_loops"] += 1
                self.stats["parse_errors"] += 1
            except (ValueError, IndexError, struct.error, OSError):
                self.stats["parse_errors"] += 1
            pos += 2 + size
        del buf[:pos]
        if len(buf) > self.config.max_buffer:
            self.stats["overflow_drops"] += 1
            buf.clear()

    def _resync(self, direction: str) -> None:
        self._bufs[direction].clear()
