"""L7 parser throughput on one core, from synthetic but realistic traffic.

Run: ``python -m bench.l7_parsers [--quick]``. Prints HTTP/1.1 requests/s, gRPC calls/s and Kafka
requests/s, each for the bare parser and for the full Conversation path (reassembly + detection).
Every request is answered, so "requests/s" counts request+response pairs parsed.
"""

from __future__ import annotations

import argparse
import json
import struct
import time

import h2.config
import h2.connection

from probe.l7.conversation import Conversation
from probe.l7.http1 import Http1Parser
from probe.l7.http2 import Http2Parser
from probe.l7.kafka import KafkaParser

Stream = list[tuple[str, bytes]]


def http1_traffic(n: int) -> Stream:
    out: Stream = []
    body = json.dumps({"id": 1, "name": "widget", "tags": ["a", "b"], "price": 12.5}).encode() * 3
    for i in range(n):
        path = f"/api/v1/users/{i % 997}/orders?page={i % 7}"
        req = (f"GET {path} HTTP/1.1\r\nHost: api.default.svc.cluster.local:8080\r\n"
               "User-Agent: Go-http-client/1.1\r\nAccept: application/json\r\nAccept-Encoding: gzip\r\n"
               f"Traceparent: 00-4bf92f3577b34da6a3ce929d0e0e{i:04x}-00f067aa0ba902b7-01\r\n"
               "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.x\r\n\r\n").encode()
        resp = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Date: Mon, 04 Dec 2023 11:25:35 GMT\r\nServer: envoy\r\nX-Envoy-Upstream-Service-Time: 3\r\n\r\n"
                ).encode() + body
        out += [("client", req), ("server", resp)]
    return out


def grpc_traffic(n: int) -> Stream:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    s = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    out: Stream = []

    def pump() -> None:
        cd = c.data_to_send()
        if cd:
            out.append(("client", cd))
            s.receive_data(cd)
        sd = s.data_to_send()
        if sd:
            out.append(("server", sd))
            c.receive_data(sd)

    c.initiate_connection()
    s.initiate_connection()
    pump()
    msg = b"\x00" + struct.pack(">I", 60) + b"\x0a" * 60
    for i in range(n):
        sid = c.get_next_available_stream_id()
        c.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", "/hipstershop.CartService/GetCart"),
                             (":authority", "cartservice:7070"), ("content-type", "application/grpc"),
                             ("te", "trailers"), ("user-agent", "grpc-go/1.64.0"), ("grpc-timeout", "19986u"),
                             ("x-request-id", f"req-{i}")])
        c.send_data(sid, msg, end_stream=True)
        pump()
        s.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
        s.send_data(sid, msg)
        s.send_headers(sid, [("grpc-status", "0"), ("grpc-message", "")], end_stream=True)
        s.acknowledge_received_data(len(msg), sid)
        pump()
        if i % 100 == 0:
            c.increment_flow_control_window(1 << 20)
            s.increment_flow_control_window(1 << 20)
            pump()
    return out


def kafka_traffic(n: int) -> Stream:
    out: Stream = []
    records = b"\x00" * 61 + b"R" * 900
    for i in range(n):
        if i % 2 == 0:  # produce v9 (flexible)
            body = b"\x00" + struct.pack(">hi", 1, 30000) + b"\x02\x07orders\x02" + struct.pack(">i", i % 12)
            body += bytes([len(records) + 1 & 0x7F | 0x80, (len(records) + 1) >> 7]) + records + b"\x00\x00\x00"
            key, ver = 0, 9
            resp = b"\x00\x02\x07orders\x02" + struct.pack(">ihqqq", i % 12, 0, i, -1, 0) + b"\x01\x00\x00\x00"
            resp += struct.pack(">i", 0) + b"\x00"
        else:  # fetch v12 (flexible)
            body = struct.pack(">iiiibii", -1, 500, 1, 52428800, 0, 0, -1) + b"\x02\x07orders\x02"
            body += struct.pack(">iiqiqi", i % 12, 0, i, -1, 0, 1048576) + b"\x00\x00\x01\x01\x00"
            key, ver = 1, 12
            resp = struct.pack(">ihi", 0, 0, 0) + b"\x02\x07orders\x02" + struct.pack(">ihqqq", i % 12, 0, i, i, 0)
            resp += b"\x01\xff\xff\xff\xff" + bytes([len(records) + 1 & 0x7F | 0x80, (len(records) + 1) >> 7])
            resp += records + b"\x00\x00\x00"
        hdr = struct.pack(">hhi", key, ver, i) + struct.pack(">h", 21) + b"producer-orders-svc-1" + b"\x00"
        msg = hdr + body
        out.append(("client", struct.pack(">i", len(msg)) + msg))
        rmsg = struct.pack(">i", i) + b"\x00" + resp
        out.append(("server", struct.pack(">i", len(rmsg)) + rmsg))
    return out


def run_parser(parser_cls: type, stream: Stream) -> tuple[float, int]:
    p = parser_cls()
    t0 = time.perf_counter()
    n = 0
    ts = 0
    for direction, data in stream:
        ts += 1000
        n += len(p.feed(direction, data, ts))
    return time.perf_counter() - t0, n


def run_conversation(stream: Stream, port: int) -> tuple[float, int]:
    conv = Conversation(("10.0.0.1", 40000), ("10.0.0.2", port))
    seq = {"client": 1, "server": 1}
    t0 = time.perf_counter()
    n = 0
    ts = 0
    for direction, data in stream:
        ts += 1000
        n += len(conv.feed(direction, seq[direction], data, 0x18, ts))
        seq[direction] += len(data)
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller traffic (a smoke run)")
    args = ap.parse_args()
    scale = 1 if args.quick else 10
    cases = [
        ("HTTP/1.1 requests/s", Http1Parser, http1_traffic(2000 * scale), 8080),
        ("gRPC calls/s (HTTP/2)", Http2Parser, grpc_traffic(500 * scale), 7070),
        ("Kafka requests/s", KafkaParser, kafka_traffic(2000 * scale), 9092),
    ]
    print(f"{'workload':<24}{'parser only':>14}{'conversation':>15}   (one core, request+response pairs)")
    for name, cls, stream, port in cases:
        pairs = sum(1 for d, _ in stream if d == "client")
        best_p = min(run_parser(cls, stream)[0] for _ in range(3))
        elapsed, events = run_conversation(stream, port)
        best_c = min([elapsed] + [run_conversation(stream, port)[0] for _ in range(2)])
        if "gRPC" in name:
            pairs = events // 2
        print(f"{name:<24}{pairs / best_p:>14,.0f}{pairs / best_c:>15,.0f}   ({events} events)")


if __name__ == "__main__":
    main()
