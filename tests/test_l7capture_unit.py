"""The pure half of the L7 capture: packet decoding, kernel keys, the connection tracker. No BPF, no root."""

from __future__ import annotations

import socket
import struct

import dpkt
import pytest

from flowscope import schema
from flowscope.endpoints import EndpointIndex
from probe.l7capture import (STATE_L7, STATE_SKIP, ConnTracker, L7CaptureConfig, decode_packet, kernel_conn_key,
                             parse_ports)
from probe.l7flows import L7FlowFactory

S = 1_000_000_000
T0 = 1_700_000_000 * S
C_IP, S_IP = "10.1.0.2", "10.1.0.3"
SYN, FIN, RST, PSH, ACK = 0x02, 0x01, 0x04, 0x08, 0x10


def tcp_bytes(src, dst, sport, dport, seq, flags, payload=b"", v6=False) -> bytes:
    t = dpkt.tcp.TCP(sport=sport, dport=dport, seq=seq, ack=0, flags=flags, data=payload)
    t.off = 5
    if v6:
        ip = dpkt.ip6.IP6(src=socket.inet_pton(socket.AF_INET6, src), dst=socket.inet_pton(socket.AF_INET6, dst),
                          nxt=6, hlim=64, data=t, plen=len(bytes(t)))
    else:
        ip = dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton(dst), p=6, data=t)
        ip.len = 20 + len(bytes(t))
    return bytes(ip)


def udp_bytes(src, dst, sport, dport, payload) -> bytes:
    u = dpkt.udp.UDP(sport=sport, dport=dport, data=payload)
    u.ulen = 8 + len(payload)
    ip = dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton(dst), p=17, data=u)
    ip.len = 20 + len(bytes(u))
    return bytes(ip)


def test_decode_tcp_udp_ipv6_and_truncation():
    raw = tcp_bytes(C_IP, S_IP, 40000, 80, 1000, PSH | ACK, b"GET / HTTP/1.1\r\n\r\n")
    fam, proto, src, dst, sp, dp, seq, flags, payload, wire = decode_packet(raw, 0, len(raw))
    assert (fam, proto, socket.inet_ntoa(src), socket.inet_ntoa(dst), sp, dp, seq) == (4, 6, C_IP, S_IP, 40000, 80, 1000)
    assert flags == PSH | ACK and payload == b"GET / HTTP/1.1\r\n\r\n" and wire == len(payload)
    # the capture kept 50 bytes of a 3000-byte segment: the payload is cut, the wire length is known
    big = tcp_bytes(C_IP, S_IP, 40000, 80, 1000, ACK, b"x" * 3000)
    *_, payload, wire = decode_packet(big, 0, 50)
    assert payload == b"x" * 10 and wire == 3000
    # inside a larger buffer, at an offset (as in the ring)
    buf = b"\0" * 14 + raw + b"\0" * 6  # Ethernet header before, padding after
    assert decode_packet(buf, 14, 14 + len(raw))[8] == b"GET / HTTP/1.1\r\n\r\n"
    r6 = tcp_bytes("fd00::2", "fd00::3", 1, 2, 5, SYN, v6=True)
    d6 = decode_packet(r6, 0, len(r6))
    assert d6[0] == 6 and socket.inet_ntop(socket.AF_INET6, d6[2]) == "fd00::2" and d6[7] == SYN and d6[8] == b""
    u = udp_bytes(C_IP, S_IP, 5353, 53, b"q" * 20)
    du = decode_packet(u, 0, len(u))
    assert du[1] == 17 and (du[4], du[5]) == (5353, 53) and du[8] == b"q" * 20
    # fragments, other protocols, garbage and short input are not decoded
    frag = bytearray(raw)
    frag[6:8] = b"\x00\x10"
    assert decode_packet(bytes(frag), 0, len(frag)) is None
    icmp = bytes(dpkt.ip.IP(src=b"\1\1\1\1", dst=b"\2\2\2\2", p=1, data=b"\x08\0\0\0\0\0\0\0"))
    assert decode_packet(icmp, 0, len(icmp)) is None
    assert decode_packet(b"\x45" + b"\0" * 5, 0, 6) is None and decode_packet(b"\x99" * 60, 0, 60) is None


def test_kernel_key_is_the_same_for_both_directions():
    a, b = socket.inet_aton(C_IP), socket.inet_aton(S_IP)
    k1 = kernel_conn_key(7, 4, a, 40000, b, 80)
    assert k1 == kernel_conn_key(7, 4, b, 80, a, 40000)
    assert len(k1) == 44 and k1 != kernel_conn_key(8, 4, a, 40000, b, 80)
    assert struct.unpack_from("<II", k1, 36) == (4, 7)
    # equal addresses: the ports order the ends
    assert kernel_conn_key(1, 4, a, 1, a, 2) == kernel_conn_key(1, 4, a, 2, a, 1)


def test_parse_ports():
    assert parse_ports("80, 8080,80,9092") == (80, 8080, 9092)
    assert parse_ports([53]) == (53,)
    for bad in ("80,http", "0", "70000", "-1"):
        with pytest.raises(ValueError):
            parse_ports(bad)


class Harness:
    def __init__(self, **cfg):
        self.decisions: list[tuple[bytes, int | None]] = []
        self.factory = L7FlowFactory("node-1", EndpointIndex())
        self.t = ConnTracker(self.factory, L7CaptureConfig(**cfg), decide=lambda k, s: self.decisions.append((k, s)))
        self.t.ifnames[5] = "veth5"
        self.ts = T0

    def tcp(self, frm_client: bool, seq: int, flags: int, payload: bytes = b"", port=80, wire=None, outgoing=None,
            cport=40000):
        src, dst, sp, dp = (C_IP, S_IP, cport, port) if frm_client else (S_IP, C_IP, port, cport)
        raw = tcp_bytes(src, dst, sp, dp, seq, flags, payload if wire is None else payload + b"\0" * (wire - len(payload)))
        end = len(raw) - (0 if wire is None else wire - len(payload))
        self.ts += 1_000_000
        out = (not frm_client) if outgoing is None else outgoing
        self.t.packet(5, self.ts, out, decode_packet(raw, 0, end))
        return self.t.take()

    def states(self):
        return [s for _, s in self.decisions]


def http_exchange(h: Harness, port: int) -> list[schema.Flow]:
    flows = []
    flows += h.tcp(True, 100, SYN, port=port)
    flows += h.tcp(False, 500, SYN | ACK, port=port)
    flows += h.tcp(True, 101, PSH | ACK, b"GET /a HTTP/1.1\r\nHost: api\r\n\r\n", port=port)
    flows += h.tcp(False, 501, PSH | ACK, b"HTTP/1.1 204 No Content\r\n\r\n", port=port)
    return flows


def test_connection_lifecycle_and_kernel_decisions():
    h = Harness()
    flows = http_exchange(h, 7000)  # not a configured port: the kernel is told once it is L7
    assert [f.Summary for f in flows] == ["HTTP/1.1 GET http://api/a", "HTTP/1.1 204 1ms (GET http://api/a)"]
    assert flows[0].traffic_direction == schema.TrafficDirection.EGRESS  # client packets came in from the veth
    assert flows[1].l7.latency_ns == "1000000" and flows[0].interface.name == "veth5"
    assert h.states() == [STATE_L7]
    h.tcp(True, 131, FIN | ACK, port=7000)
    h.tcp(False, 528, FIN | ACK, port=7000)
    assert not h.t.conns and h.states() == [STATE_L7, None]  # closed: the kernel entry is forgotten
    st = h.t.stats()
    assert st["connections"] == 1 and st["connections_closed"] == 1 and st["requests"] == 1 and st["responses"] == 1
    # a configured port is always passed by the kernel: no decisions for it
    h2 = Harness()
    assert len(http_exchange(h2, 8080)) == 2 and h2.decisions == []


def test_unknown_protocol_is_skipped_in_the_kernel():
    h = Harness(detect_packets=8)
    h.tcp(True, 1, SYN, port=5201)
    h.tcp(False, 9, SYN | ACK, port=5201)
    seq = 2
    for _ in range(4):
        h.tcp(True, seq, ACK, b"\x17\x42" * 400, port=5201)
        seq += 800
    assert h.states() == [STATE_SKIP] and h.t.counters["connections_skipped"] == 1
    (conn,) = h.t.conns.values()
    assert conn.conv is None  # nothing is kept for it
    h.tcp(True, seq, ACK, b"zz", port=5201)
    assert h.t.counters["packets_after_skip"] == 1
    h.tcp(True, seq + 2, RST, port=5201)
    assert not h.t.conns and h.states() == [STATE_SKIP, None]
    # TLS is recognised (and skipped) at once
    h = Harness()
    h.tcp(True, 1, SYN, port=8443)
    h.tcp(True, 2, PSH | ACK, b"\x16\x03\x01\x00\x50" + b"\x01" * 80, port=8443)
    assert h.states() == [STATE_SKIP] and h.t.counters["skipped_tls"] == 1


def test_duplicates_truncation_and_pipelining():
    h = Harness()
    http_exchange(h, 80)
    body = b"POST /up HTTP/1.1\r\nHost: api\r\nContent-Length: 5000\r\n\r\n"
    h.tcp(True, 131, ACK, body, wire=len(body) + 5000)  # the capture kept only the head
    h.tcp(True, 131, ACK, body, wire=len(body) + 5000)  # seen twice (e.g. two taps): dropped
    nxt = 131 + len(body) + 5000
    flows = h.tcp(True, nxt, PSH | ACK, b"GET /b HTTP/1.1\r\nHost: api\r\n\r\nGET /c HTTP/1.1\r\nHost: api\r\n\r\n")
    flows += h.tcp(False, 528, PSH | ACK, b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
                                         b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 404 NF\r\n\r\n")
    reqs = [f.l7.http.url for f in flows if not f.is_reply]
    codes = [(f.l7.http.code, f.l7.http.url) for f in flows if f.is_reply]
    assert reqs == ["http://api/b", "http://api/c"]
    assert codes == [(201, "http://api/up"), (200, "http://api/b"), (404, "http://api/c")]
    st = h.t.stats()
    assert st["duplicates"] == 1 and st["bytes_truncated"] == 5000 and st.get("parse_errors", 0) == 0


def test_midstream_join_guesses_the_client():
    h = Harness()
    # the first packet seen is a response from port 80: the other side is the client
    flows = h.tcp(False, 900, PSH | ACK, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    flows += h.tcp(True, 50, PSH | ACK, b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
    flows += h.tcp(False, 900 + 38, PSH | ACK, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    (conn,) = h.t.conns.values()
    assert (conn.ctx.client_port, conn.ctx.server_port) == (40000, 80)
    assert [f.l7.http.url for f in flows if not f.is_reply] == ["http://h/x"]
    assert h.t.counters["connections_midstream"] == 1
    # on unknown ports, the first bytes decide: a request line comes from the client
    h = Harness()
    h.tcp(False, 1, PSH | ACK, b"GET /y HTTP/1.1\r\nHost: h\r\n\r\n", port=40001, cport=40002)
    (conn,) = h.t.conns.values()
    assert conn.ctx.client_port == 40001
    # ACKs, FINs and RSTs of unknown connections create nothing
    h = Harness()
    h.tcp(True, 1, ACK)
    h.tcp(True, 1, FIN | ACK)
    h.tcp(True, 1, RST)
    assert not h.t.conns


def test_limits_count_lost_events_and_idle_expiry():
    h = Harness(max_connections=1)
    h.tcp(True, 1, SYN)
    h.tcp(True, 1, SYN, cport=40001)
    assert len(h.t.conns) == 1 and h.t.lost_events == 1 and h.t.counters["connections_untracked"] == 1
    # memory cap: a connection holding a half request is evicted (and counted) when over the cap
    h = Harness(max_buffered_bytes=100)
    h.tcp(True, 1, SYN)
    h.tcp(True, 2, PSH | ACK, b"GET /" + b"a" * 500)  # no end of line yet: buffered by the parser
    h.t.sweep(h.ts)
    assert not h.t.conns and h.t.counters["connections_evicted_memory"] == 1 and h.t.lost_events == 1
    # idle expiry flushes what the connection holds (a request without its response)
    h = Harness(tcp_idle_timeout_s=10)
    h.tcp(True, 1, SYN)
    got = h.tcp(True, 2, PSH | ACK, b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n")
    assert [f.Summary for f in got] == ["HTTP/1.1 GET http://h/slow"]
    h.t.sweep(h.ts + 5 * S)
    assert len(h.t.conns) == 1
    h.t.sweep(h.ts + 11 * S)
    assert not h.t.conns and h.t.counters["connections_expired"] == 1


def dns_query(qid: int, name: str) -> bytes:
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", 1, 1)


def dns_answer(qid: int, name: str, ip: str, ttl: int) -> bytes:
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    rr = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, ttl, 4) + socket.inet_aton(ip)
    return struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0) + q + struct.pack("!HH", 1, 1) + rr


def test_udp_dns_and_name_learning():
    h = Harness()
    for raw, out in ((udp_bytes(C_IP, S_IP, 33333, 53, dns_query(7, "api.example.org")), False),
                     (udp_bytes(S_IP, C_IP, 53, 33333, dns_answer(7, "api.example.org", "192.0.2.80", 300)), True)):
        h.ts += 2_000_000
        h.t.packet(5, h.ts, out, decode_packet(raw, 0, len(raw)))
    q, a = h.t.take()
    assert q.Summary == "DNS Query api.example.org. A" and q.l4.UDP.destination_port == 53
    assert a.l7.dns.ips == ["192.0.2.80"] and a.l7.latency_ns == "2000000" and a.is_reply
    assert h.factory.dns.names("192.0.2.80", h.ts) == ["api.example.org"]
    # non-DNS datagrams on the port are counted and ignored
    junk = udp_bytes(C_IP, S_IP, 33333, 53, b"hello")
    h.t.packet(5, h.ts, False, decode_packet(junk, 0, len(junk)))
    assert h.t.take() == [] and h.t.stats()["not_dns"] == 1
