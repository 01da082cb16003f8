"""L7 capture: a socket filter on each observed interface, a packet ring, per-connection parsers.

The agent's :class:`~probe.agent.FlowSource` for L7 visibility (HTTP/1.1, HTTP/2 + gRPC, Kafka, DNS).

Kernel side (``probe/bpf/l7filter.c``)
    One BPF socket filter, compiled once, attached to a packet socket bound to each observed interface.
    It passes to user space only TCP segments with payload (plus SYN/FIN/RST, headers only) and UDP
    datagrams on the L7 UDP ports, cut to ``snaplen`` bytes. Connections on other ports get
    ``detect_packets`` payload packets for protocol detection; when user space finds no protocol it
    parses there, it marks the connection SKIP in an LRU map the filter reads, and bulk traffic costs
    user space nothing from then on. Every decision is counted (:meth:`L7Capture.counters`).

Packet ring
    Each socket has a ``TPACKET_V3`` ring (``ring_blocks`` x ``ring_block_kib``) mapped into this
    process: no system call per packet, and kernel timestamps (wall clock) for the latencies. What
    the ring cannot hold is dropped by the kernel and read back from ``PACKET_STATISTICS``.

User space (pure, :class:`ConnTracker`)
    One :class:`~probe.l7.conversation.Conversation` per TCP connection and observation point
    (interface), keyed by the 5-tuple; the client is the SYN sender (else a guess from ports and the
    first bytes). Segments cut by the snap length are fed with their wire length, so the parsers skip
    the missing tail as a gap. Closed connections are dropped after FIN/RST, idle ones after a timeout;
    the number of connections and their buffered bytes are capped, and what the caps cost is counted
    as lost events (``OBSERVER_EVENTS_QUEUE``); ring overruns are ``PERF_EVENT_RING_BUFFER`` losses.

A connection between two observed endpoints is seen on both host-side interfaces and reported from
each endpoint's point of view (EGRESS at the client, INGRESS at the server), as Cilium does with L7
visibility on both pods; the same segment seen twice on one interface is dropped.
"""

from __future__ import annotations

import ctypes as ct
import logging
import mmap
import os
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from flowscope import schema
from flowscope.endpoints import EndpointIndex
from probe.l7.config import L7Config
from probe.l7.conversation import Conversation, DnsConversation
from probe.l7.detect import DNS, HTTP1, HTTP2, KAFKA, PORT_HINTS, sniff
from probe.l7.reassembly import ReassemblyBudget
from probe.l7flows import ConnContext, DnsCache, L7FlowFactory

log = logging.getLogger("flowscope.l7capture")

BPF_SOURCE = Path(__file__).with_name("bpf") / "l7filter.c"

#: Ports always under L7 visibility (TCP and UDP). 443 is not among them: TLS is opaque to a sniffer.
DEFAULT_L7_PORTS: tuple[int, ...] = (53, 80, 3000, 5000, 8000, 8080, 8081, 9092, 50051)
L7_PROTOCOLS = frozenset({HTTP1, HTTP2, KAFKA, DNS})

# Kernel constants (shared with l7filter.c).
STATE_UNDECIDED, STATE_L7, STATE_SKIP = 0, 1, 2
STAT_NAMES = ("pass_tcp", "pass_udp", "pass_bytes", "skip_conn_packets", "skip_conn_bytes", "skip_undecided",
              "no_payload", "other", "truncated", "conn_map_full")
IPPROTO_TCP, IPPROTO_UDP = 6, 17
TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10

# Packet socket / TPACKET_V3 constants (linux/if_packet.h).
SOL_PACKET = 263
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
TPACKET_V3 = 2
SO_ATTACH_BPF = 50
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
TP_STATUS_USER = 1
_FRAME_SIZE = 2048 + 128
_PKT_HDR = struct.Struct("<IIIIIIHH")        # tpacket3_hdr up to tp_net
_SLL_PKTTYPE = 48 + 10                       # sockaddr_ll.sll_pkttype after the aligned tpacket3_hdr
_BLOCK_HDR = struct.Struct("<III")           # block_status, num_pkts, offset_to_first_pkt (at offset 8)
_U32 = struct.Struct("<I")

_IP4 = struct.Struct("!BxHxxxxxBxx4s4s")     # ver/ihl, total length, protocol, src, dst
_IP6 = struct.Struct("!xxxxHBx16s16s")       # payload length, next header, src, dst
_TCP = struct.Struct("!HHIxxxxH")            # sport, dport, seq, data offset + flags
_UDP = struct.Struct("!HHH")                 # sport, dport, length


class L7CaptureError(RuntimeError):
    pass


def parse_ports(text: str | Iterable[int]) -> tuple[int, ...]:
    """``"80,8080, 9092"`` -> (80, 8080, 9092); raises ValueError with the offending item."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in items:
        s = str(item).strip()
        if not s:
            continue
        if not s.isdigit() or not 0 < int(s) < 65536:
            raise ValueError(f"{s!r} is not a port number (1-65535)")
        out.append(int(s))
    return tuple(sorted(set(out)))


@dataclass
class L7CaptureConfig:
    ports: tuple[int, ...] = DEFAULT_L7_PORTS
    snaplen: int = 2048
    detect_packets: int = 16
    conn_map_entries: int = 65536
    # The kernel hands a block over when it is full or ring_timeout_ms after its first packet, so with
    # sparse traffic the ring spans ring_blocks x ring_timeout_ms of time: many small blocks.
    ring_block_kib: int = 64
    ring_blocks: int = 32
    ring_timeout_ms: int = 20
    max_connections: int = 16384
    max_buffered_bytes: int = 64 << 20          # parsers + reassembly, all connections
    reassembly_budget_bytes: int = 16 << 20     # out-of-order bytes, all connections
    # CPU the capture may use on average, in cores (0 = no limit). Beyond it the packet rings fill and
    # the kernel drops packets (reported as lost events): under overload L7 visibility degrades, the
    # workload does not pay for it.
    cpu_budget: float = 0.25
    cpu_burst_s: float = 0.05
    tcp_idle_timeout_s: float = 120.0
    udp_idle_timeout_s: float = 30.0
    sweep_interval_s: float = 1.0
    # Parser limits; the parsers export every header unredacted, the flows apply the header policy.
    parser: L7Config = field(default_factory=lambda: L7Config(max_buffer=16 * 1024, header_allowlist=None,
                                                              redact_headers=frozenset()))
    redact_headers: Optional[frozenset[str]] = None   # None: the default (Authorization, Cookie, ...)
    header_allowlist: Optional[frozenset[str]] = None


# --------------------------------------------------------------------------------------------
# Pure: packets -> connections -> events -> flows
# --------------------------------------------------------------------------------------------


def decode_packet(buf, off: int, end: int):
    """An IP packet at ``buf[off:end]`` (captured, maybe truncated) ->
    ``(family, proto, src, dst, sport, dport, seq, flags, payload, wire_payload_len)`` or None.
    ``src``/``dst`` are packed addresses; ``payload`` is the captured part of the L4 payload."""
    if end - off < 20:
        return None
    v = buf[off] >> 4
    if v == 4:
        vihl, total, proto, src, dst = _IP4.unpack_from(buf, off)
        ihl = (vihl & 0x0F) * 4
        if ihl < 20 or (buf[off + 6] & 0x1F) or buf[off + 7]:
            return None
        l4 = off + ihl
        l4len = (total - ihl) if total else (end - l4)
        family = 4
    elif v == 6:
        if end - off < 40:
            return None
        plen, proto, src, dst = _IP6.unpack_from(buf, off)
        l4 = off + 40
        l4len = plen if plen else end - l4
        family = 6
    else:
        return None
    if proto == IPPROTO_TCP:
        if end - l4 < 20:
            return None
        sport, dport, seq, offflags = _TCP.unpack_from(buf, l4)
        doff = (offflags >> 12) * 4
        if doff < 20:
            return None
        start = l4 + doff
        wire = l4len - doff
        if wire < 0:
            wire = 0
        stop = min(end, start + wire)
        payload = bytes(buf[start:stop]) if stop > start else b""
        return family, proto, src, dst, sport, dport, seq, offflags & 0x1FF, payload, wire
    if proto == IPPROTO_UDP:
        if end - l4 < 8:
            return None
        sport, dport, ulen = _UDP.unpack_from(buf, l4)
        start = l4 + 8
        wire = max(0, min(ulen, l4len) - 8)
        stop = min(end, start + wire)
        payload = bytes(buf[start:stop]) if stop > start else b""
        return family, proto, src, dst, sport, dport, 0, 0, payload, wire
    return None


def kernel_conn_key(ifindex: int, family: int, a: bytes, pa: int, b: bytes, pb: int) -> bytes:
    """The filter's ``struct conn_key`` for a connection seen on ``ifindex`` (both ends ordered as the
    C code orders them)."""
    a16, b16 = a.ljust(16, b"\0"), b.ljust(16, b"\0")
    ra, rb = pa.to_bytes(2, "big"), pb.to_bytes(2, "big")
    wa, wb = struct.unpack("<4I", a16), struct.unpack("<4I", b16)
    swap = wa > wb if wa != wb else int.from_bytes(ra, "little") > int.from_bytes(rb, "little")
    if swap:
        a16, b16, ra, rb = b16, a16, rb, ra
    return a16 + b16 + ra + rb + struct.pack("<II", family, ifindex)


def _ntop(family: int, raw: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if family == 4 else socket.AF_INET6, raw)


class _Conn:
    __slots__ = ("conv", "ctx", "last_ns", "fixed_port", "kernel_state", "family", "client", "server",
                 "last_seg", "proto", "undecided")

    def __init__(self, conv, ctx: ConnContext, ts: int, fixed_port: bool, family: int, proto: int,
                 client: tuple[bytes, int], server: tuple[bytes, int]):
        self.conv = conv          # Conversation / DnsConversation; None once skipped
        self.ctx = ctx
        self.last_ns = ts
        self.fixed_port = fixed_port
        self.kernel_state = STATE_UNDECIDED
        self.family = family
        self.proto = proto
        self.client = client
        self.server = server
        self.last_seg = {"client": None, "server": None}
        self.undecided = 0        # payload packets seen while the protocol is unknown


class ConnTracker:
    """Captured packets -> L7 flows. Pure (the kernel map is reached through ``decide``)."""

    def __init__(self, factory: L7FlowFactory, cfg: Optional[L7CaptureConfig] = None,
                 decide: Optional[Callable[[bytes, Optional[int]], None]] = None):
        self.cfg = cfg or L7CaptureConfig()
        self.factory = factory
        self.decide = decide       # decide(kernel_key, STATE_* or None to forget)
        self.ports = frozenset(self.cfg.ports)
        self._hint_ports = self.ports | frozenset(PORT_HINTS)
        self.budget = ReassemblyBudget(self.cfg.reassembly_budget_bytes)
        self.conns: dict[tuple, _Conn] = {}
        self.counters: Counter[str] = Counter()
        self.parser_stats: Counter[str] = Counter()
        self.lost_events = 0       # user-space losses (connections not tracked or evicted)
        self.ifnames: dict[int, str] = {}
        self.out: list[schema.Flow] = []

    # -- packets ------------------------------------------------------------------------------
    def packet(self, ifindex: int, ts_ns: int, outgoing: bool, pkt) -> None:
        """One decoded packet (see :func:`decode_packet`) seen on ``ifindex``; flows go to ``out``."""
        family, proto, src, dst, sport, dport, seq, flags, payload, wire = pkt
        c = self.counters
        c["packets"] += 1
        key = (ifindex, proto, src, sport, dst, dport)
        conn = self.conns.get(key)
        if conn is not None:
            direction = "client"
        else:
            conn = self.conns.get((ifindex, proto, dst, dport, src, sport))
            direction = "server"
            if conn is None:
                conn = self._new(ifindex, ts_ns, outgoing, pkt)
                if conn is None:
                    return
                direction = "client" if conn.client == (src, sport) else "server"
        conn.last_ns = ts_ns
        conv = conn.conv
        if conv is None:  # skipped: only the end of the connection matters
            if flags & (TCP_FIN | TCP_RST):
                self._remove(conn, forget_kernel=True)
            else:
                c["packets_after_skip"] += 1
            return
        if proto == IPPROTO_UDP:
            events = conv.feed(direction, payload, ts_ns)
        else:
            seg = (seq, len(payload), flags)
            if seg == conn.last_seg[direction] and (payload or flags & (TCP_SYN | TCP_FIN | TCP_RST)):
                c["duplicates"] += 1
                return
            conn.last_seg[direction] = seg
            events = conv.feed(direction, seq, payload, flags, ts_ns, wire if wire > len(payload) else None)
        if events:
            self._emit(events, conn)
        if proto == IPPROTO_TCP:
            if conv.closed:
                self._remove(conn, forget_kernel=not conn.fixed_port)
            elif conn.kernel_state == STATE_UNDECIDED and not conn.fixed_port:
                if conv.protocol is None:
                    if payload:
                        conn.undecided += 1
                    if conn.undecided < max(2, self.cfg.detect_packets // 2):
                        return
                    # As many packets as the kernel passes for detection, and still nothing known.
                    c["undetected"] += 1
                if conv.protocol in L7_PROTOCOLS:
                    self._mark(conn, STATE_L7)
                    c["connections_l7"] += 1
                else:
                    self._mark(conn, STATE_SKIP)
                    c["connections_skipped"] += 1
                    c[f"skipped_{conv.protocol or 'undetected'}"] += 1
                    self._retire(conn)
                    conn.conv = None

    def _new(self, ifindex: int, ts: int, outgoing: bool, pkt) -> Optional[_Conn]:
        family, proto, src, dst, sport, dport, seq, flags, payload, wire = pkt
        c = self.counters
        if proto == IPPROTO_TCP:
            if flags & TCP_SYN:
                from_client = not (flags & TCP_ACK)
            elif flags & (TCP_FIN | TCP_RST) or not payload:
                return None  # the end (or an ACK) of a connection we do not track
            else:
                from_client = self._guess_from_client(sport, dport, payload)
                c["connections_midstream"] += 1
        else:
            if dport in self.ports and sport not in self.ports:
                from_client = True
            elif sport in self.ports and dport not in self.ports:
                from_client = False
            else:
                from_client = dport < sport
        if len(self.conns) >= self.cfg.max_connections:
            c["connections_untracked"] += 1
            self.lost_events += 1
            return None
        client, server = ((src, sport), (dst, dport)) if from_client else ((dst, dport), (src, sport))
        cip, sip = _ntop(family, client[0]), _ntop(family, server[0])
        ctx = ConnContext(ifindex, self.ifnames.get(ifindex, ""), family, proto, cip, client[1], sip, server[1],
                          client_behind_interface=(not outgoing) if from_client else outgoing)
        fixed = server[1] in self.ports
        if proto == IPPROTO_TCP:
            conv = Conversation((cip, client[1]), (sip, server[1]), self.cfg.parser, self.budget)
        else:
            conv = DnsConversation((cip, client[1]), (sip, server[1]), self.cfg.parser)
        conn = _Conn(conv, ctx, ts, fixed, family, proto, client, server)
        self.conns[(ifindex, proto, client[0], client[1], server[0], server[1])] = conn
        c["connections"] += 1
        return conn

    def _guess_from_client(self, sport: int, dport: int, payload: bytes) -> bool:
        hints = self._hint_ports
        if dport in hints and sport not in hints:
            return True
        if sport in hints and dport not in hints:
            return False
        as_client = sniff(payload, True)
        if as_client in (HTTP1, HTTP2, KAFKA):
            return True
        if sniff(payload, False) == HTTP1:
            return False
        return dport <= sport

    def _emit(self, events, conn: _Conn) -> None:
        build = self.factory.build
        ctx = conn.ctx
        out = self.out
        for ev in events:
            try:
                out.append(build(ev, ctx))
            except Exception as e:  # noqa: BLE001 - one bad record must not stop the capture
                self.counters["flow_errors"] += 1
                log.debug("building an L7 flow failed: %s", e)
        self.counters["l7_events"] += len(events)

    def _mark(self, conn: _Conn, state: Optional[int]) -> None:
        conn.kernel_state = state if state is not None else STATE_UNDECIDED
        if self.decide is not None and conn.proto == IPPROTO_TCP:
            self.decide(kernel_conn_key(conn.ctx.ifindex, conn.family, conn.client[0], conn.client[1], conn.server[0], conn.server[1]),
                        state)

    def _retire(self, conn: _Conn) -> None:
        if conn.conv is not None:
            self.parser_stats.update(conn.conv.stats)

    def _remove(self, conn: _Conn, forget_kernel: bool) -> None:
        ctx = conn.ctx
        self.conns.pop((ctx.ifindex, conn.proto, conn.client[0], conn.client[1], conn.server[0], conn.server[1]), None)
        self._retire(conn)
        conn.conv = None
        self.counters["connections_closed"] += 1
        if forget_kernel and conn.proto == IPPROTO_TCP:
            self._mark(conn, None)

    # -- housekeeping -------------------------------------------------------------------------
    def sweep(self, now_ns: int) -> None:
        """Expire idle connections (flushing what they hold) and enforce the memory cap."""
        tcp_idle = int(self.cfg.tcp_idle_timeout_s * 1e9)
        udp_idle = int(self.cfg.udp_idle_timeout_s * 1e9)
        total = 0
        sizes = []
        for conn in list(self.conns.values()):
            idle = now_ns - conn.last_ns
            if idle >= (tcp_idle if conn.proto == IPPROTO_TCP else udp_idle):
                self._close(conn, now_ns)
                self.counters["connections_expired"] += 1
                continue
            if conn.proto == IPPROTO_TCP and conn.conv is not None:
                b = conn.conv.buffered_bytes()
                if b:
                    total += b
                    sizes.append((b, conn))
        self.counters["buffered_bytes"] = total
        if total > self.cfg.max_buffered_bytes:
            sizes.sort(key=lambda x: x[0], reverse=True)
            for b, conn in sizes:
                if total <= self.cfg.max_buffered_bytes:
                    break
                self._remove(conn, forget_kernel=not conn.fixed_port)
                total -= b
                self.counters["connections_evicted_memory"] += 1
                self.lost_events += 1

    def _close(self, conn: _Conn, now_ns: int) -> None:
        conv = conn.conv
        if conv is not None and conn.proto == IPPROTO_TCP:
            events = conv.close(now_ns)
            if events:
                self._emit(events, conn)
        self._remove(conn, forget_kernel=not conn.fixed_port)

    def drop_interface(self, ifindex: int, now_ns: int) -> None:
        for conn in [c for c in self.conns.values() if c.ctx.ifindex == ifindex]:
            self._close(conn, now_ns)

    def close_all(self, now_ns: int) -> None:
        for conn in list(self.conns.values()):
            self._close(conn, now_ns)

    def take(self) -> list[schema.Flow]:
        out, self.out = self.out, []
        self.counters["flows"] += len(out)
        return out

    def stats(self) -> dict[str, int]:
        total: Counter[str] = Counter(self.parser_stats)
        for conn in self.conns.values():
            if conn.conv is not None:
                total.update(conn.conv.stats)
        total.update(self.counters)
        total["connections_open"] = len(self.conns)
        total["reassembly_budget_used"] = self.budget.used
        total["reassembly_budget_refusals"] = self.budget.refusals
        total["dns_cache_ips"] = len(self.factory.dns)
        return dict(total)


# --------------------------------------------------------------------------------------------
# I/O: the BPF socket filter and the packet rings
# --------------------------------------------------------------------------------------------


class L7Filter:
    """The compiled socket filter and its maps (one per capture, shared by every interface)."""

    def __init__(self, cfg: L7CaptureConfig):
        from probe.datapath import DatapathError, _import_bcc, ensure_kernel_fs

        if os.geteuid() != 0:
            raise L7CaptureError("L7 capture needs root (CAP_BPF and CAP_NET_RAW)")
        ensure_kernel_fs()
        try:
            BPF = _import_bcc()
        except DatapathError as e:
            raise L7CaptureError(str(e)) from e
        if not 64 <= cfg.snaplen <= 65535:
            raise L7CaptureError(f"snaplen {cfg.snaplen} is out of range (64-65535)")
        cflags = [f"-DSNAPLEN={int(cfg.snaplen)}", f"-DCONN_ENTRIES={int(cfg.conn_map_entries)}",
                  f"-DDETECT_PACKETS={int(cfg.detect_packets)}", "-Wno-unused-label"]
        try:
            self.bpf = BPF(src_file=str(BPF_SOURCE).encode(), cflags=cflags)
        except Exception as e:
            raise L7CaptureError(f"compiling {BPF_SOURCE.name} failed: {e}") from e
        self.fn = self.bpf.load_func(b"l7_filter", BPF.SOCKET_FILTER)
        self.conns = self.bpf[b"conns"]
        self.stats_map = self.bpf[b"stats"]
        self._tcp_ports = self.bpf[b"tcp_ports"]
        self._udp_ports = self.bpf[b"udp_ports"]
        self.set_ports(cfg.ports)

    def set_ports(self, ports: Iterable[int]) -> None:
        wanted = set(ports) | {53}
        for arr in (self._tcp_ports, self._udp_ports):
            for k, v in list(arr.items()):
                if v.value and k.value not in wanted:
                    arr[k] = ct.c_uint8(0)
            for p in wanted:
                arr[ct.c_int(p)] = ct.c_uint8(1)

    def set_state(self, key: bytes, state: Optional[int]) -> None:
        k = self.conns.Key.from_buffer_copy(key)
        try:
            if state is None:
                del self.conns[k]
            else:
                leaf = self.conns.Leaf()
                leaf.state, leaf.packets = state, 0
                self.conns[k] = leaf
        except KeyError:
            pass

    def read_stats(self) -> dict[str, int]:
        out = {}
        for i, name in enumerate(STAT_NAMES):
            out[name] = int(sum(int(v) for v in self.stats_map[ct.c_int(i)]))
        return out

    def close(self) -> None:
        try:
            self.bpf.cleanup()
        except Exception:
            pass


class PacketRing:
    """A packet socket bound to one interface with the filter attached and a TPACKET_V3 ring mapped."""

    def __init__(self, ifindex: int, ifname: str, prog_fd: int, block_kib: int = 64, blocks: int = 32,
                 timeout_ms: int = 20):
        self.ifindex, self.ifname = ifindex, ifname
        self.block_size = block_kib * 1024
        self.blocks = blocks
        if self.block_size % mmap.PAGESIZE or self.block_size < _FRAME_SIZE:
            raise L7CaptureError(f"ring block size {block_kib} KiB must be a multiple of the page size")
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: nothing arrives before bind
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_BPF, prog_fd)
            sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
            frames = (self.block_size // _FRAME_SIZE) * blocks
            req = struct.pack("7I", self.block_size, blocks, _FRAME_SIZE, frames, timeout_ms, 0, 0)
            sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
            self.mm = mmap.mmap(sock.fileno(), self.block_size * blocks, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE)
            sock.bind((ifname, ETH_P_ALL))
        except OSError as e:
            sock.close()
            raise L7CaptureError(f"packet socket on {ifname}: {e.strerror or e}") from e
        self.sock = sock
        self.block = 0
        self.drops = 0
        self.packets = 0

    def drain(self, on_packet: Callable[[int, int, bool, object, int, int], None],
              deadline: float = 0.0) -> int:
        """Hand every packet waiting in the ring to ``on_packet(ifindex, ts_ns, outgoing, buf, off, end)``
        (``buf[off:end]`` is the captured IP packet) and give the blocks back to the kernel. With a
        ``deadline`` (time.perf_counter), stop between blocks once it has passed."""
        mm, bs, ifindex = self.mm, self.block_size, self.ifindex
        hdr = _PKT_HDR.unpack_from
        n = 0
        for _ in range(self.blocks):
            if deadline and n and time.perf_counter() > deadline:
                break
            base = self.block * bs
            status, num, first = _BLOCK_HDR.unpack_from(mm, base + 8)
            if not status & TP_STATUS_USER:
                break
            p = base + first
            for _i in range(num):
                nxt, sec, nsec, snap, _len, _st, mac, net = hdr(mm, p)
                on_packet(ifindex, sec * 1_000_000_000 + nsec, mm[p + _SLL_PKTTYPE] == PACKET_OUTGOING,
                          mm, p + net, p + mac + snap)
                p += nxt
            n += num
            _U32.pack_into(mm, base + 8, 0)  # TP_STATUS_KERNEL: the block is the kernel's again
            self.block = (self.block + 1) % self.blocks
        self.packets += n
        return n

    def read_drops(self) -> int:
        """Packets the kernel dropped since the last call (the ring was full)."""
        try:
            raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 12)
        except OSError:
            return 0
        _packets, drops, _freeze = struct.unpack("<III", raw)
        self.drops += drops
        return drops

    def close(self) -> None:
        try:
            self.mm.close()
        except Exception:
            pass
        self.sock.close()


class L7Capture:
    """The agent's L7 :class:`~probe.agent.FlowSource`. See the module docstring."""

    name = "l7"

    def __init__(self, cfg: Optional[L7CaptureConfig] = None, node_name: str = "", emitter_version: str = "",
                 dns_cache: Optional[DnsCache] = None):
        from probe.l7.config import DEFAULT_REDACT

        self.cfg = cfg or L7CaptureConfig()
        self.filter = L7Filter(self.cfg)
        self.factory = L7FlowFactory(node_name or socket.gethostname(), dns=dns_cache,
                                     emitter_version=emitter_version,
                                     redact_headers=self.cfg.redact_headers if self.cfg.redact_headers is not None
                                     else DEFAULT_REDACT, header_allowlist=self.cfg.header_allowlist)
        self.tracker = ConnTracker(self.factory, self.cfg, decide=self.filter.set_state)
        self.rings: dict[int, PacketRing] = {}
        self._last_sweep = time.monotonic()
        self._cpu_tokens = 0.0
        self._cpu_last = time.perf_counter()
        self._kernel_drops_reported = 0
        self._detached_drops = 0
        self._user_lost_reported = 0
        self._closed = False

    @property
    def dns(self) -> DnsCache:
        return self.factory.dns

    # -- FlowSource ---------------------------------------------------------------------------
    def attach(self, ifindex: int, ifname: str) -> None:
        if ifindex in self.rings:
            return
        self.rings[ifindex] = PacketRing(ifindex, ifname, self.filter.fn.fd, self.cfg.ring_block_kib,
                                         self.cfg.ring_blocks, self.cfg.ring_timeout_ms)
        self.tracker.ifnames[ifindex] = ifname
        self.factory.ifnames[ifindex] = ifname
        log.info("L7 capture attached to %s (ifindex %d)", ifname, ifindex)

    def detach(self, ifindex: int) -> None:
        ring = self.rings.pop(ifindex, None)
        if ring is None:
            return
        self._drain_ring(ring)
        ring.read_drops()
        self._detached_drops += ring.drops
        ring.close()
        self.tracker.drop_interface(ifindex, time.time_ns())
        log.info("L7 capture detached from %s", ring.ifname)

    def set_index(self, index: EndpointIndex) -> None:
        if index is not self.factory.index:
            self.factory.index = index

    def set_policies(self, policies) -> None:
        """The policies whose L7 rules (``rules.http`` / ``rules.kafka``) requests are checked against."""
        from enforcer.l7rules import L7Policy

        self.factory.policy = L7Policy(list(policies or ()))

    def set_ports(self, ports: Iterable[int]) -> None:
        ports = parse_ports(ports)
        self.cfg.ports = ports
        self.filter.set_ports(ports)
        self.tracker.ports = frozenset(ports)
        self.tracker._hint_ports = frozenset(ports) | frozenset(PORT_HINTS)

    def poll(self) -> list[schema.Flow]:
        budget = self.cfg.cpu_budget
        if budget <= 0:
            for ring in list(self.rings.values()):
                self._drain_ring(ring)
        else:
            # Token bucket in seconds of CPU: refilled at `budget` per wall-clock second.
            t = time.perf_counter()
            self._cpu_tokens = min(self.cfg.cpu_burst_s, self._cpu_tokens + (t - self._cpu_last) * budget)
            self._cpu_last = t
            if self._cpu_tokens > 0:
                deadline = t + self._cpu_tokens
                for ring in list(self.rings.values()):
                    self._drain_ring(ring, deadline)
                spent = time.perf_counter() - t
                self._cpu_tokens -= spent
                self._cpu_last += spent  # no refill for the time spent working
            else:
                self.tracker.counters["cpu_budget_skips"] += 1
        now = time.monotonic()
        if now - self._last_sweep >= self.cfg.sweep_interval_s:
            self._last_sweep = now
            self.tracker.sweep(time.time_ns())
        return self.tracker.take()

    def _drain_ring(self, ring: PacketRing, deadline: float = 0.0) -> None:
        tracker = self.tracker
        handle = tracker.packet
        bad = 0

        def on_packet(ifindex, ts, outgoing, buf, off, end):
            nonlocal bad
            try:
                pkt = decode_packet(buf, off, end)
                if pkt is not None:
                    handle(ifindex, ts, outgoing, pkt)
                else:
                    bad += 1
            except Exception as e:  # noqa: BLE001 - a packet must never stop the agent
                tracker.counters["packet_errors"] += 1
                log.debug("L7 packet handling failed: %s", e)

        ring.drain(on_packet, deadline)
        if bad:
            tracker.counters["undecodable_packets"] += bad

    def lost(self) -> dict[str, int]:
        out: dict[str, int] = {}
        kernel = self._kernel_drops() - self._kernel_drops_reported
        if kernel:
            self._kernel_drops_reported += kernel
            out[schema.LostEventSource.PERF_EVENT_RING_BUFFER.value] = kernel
        user = self.tracker.lost_events - self._user_lost_reported
        if user:
            self._user_lost_reported = self.tracker.lost_events
            out[schema.LostEventSource.OBSERVER_EVENTS_QUEUE.value] = user
        return out

    def _kernel_drops(self) -> int:
        """Packets the rings could not take, since the start (cumulative)."""
        for r in self.rings.values():
            r.read_drops()
        return sum(r.drops for r in self.rings.values()) + self._detached_drops

    def counters(self) -> dict[str, int]:
        """Kernel filter counters (``kernel_*``), ring counters (``ring_*``) and user-space counters."""
        out = {f"kernel_{k}": v for k, v in self.filter.read_stats().items()}
        out["ring_drops"] = self._kernel_drops()
        out["ring_packets"] = sum(r.packets for r in self.rings.values())
        out.update(self.tracker.stats())
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for ring in self.rings.values():
            ring.close()
        self.rings.clear()
        self.filter.close()


def build_sources(agent_cfg) -> list:
    """The flow sources an agent configuration asks for (L7 capture unless ``l7`` is off)."""
    if not getattr(agent_cfg, "l7", True):
        return []
    ports = getattr(agent_cfg, "l7_ports", None)
    cfg = L7CaptureConfig(ports=parse_ports(ports) if ports is not None else DEFAULT_L7_PORTS,
                          cpu_budget=getattr(agent_cfg, "l7_cpu_budget", L7CaptureConfig.cpu_budget))
    try:
        from importlib.metadata import version

        ver = version("flowscope")
    except Exception:
        ver = ""
    try:
        return [L7Capture(cfg, node_name=agent_cfg.node_name, emitter_version=ver)]
    except L7CaptureError as e:
        log.warning("L7 visibility is off: %s", e)
        return []
