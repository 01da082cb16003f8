"""HTTP/2 + gRPC parser, driven with traffic produced by the ``h2`` library and hand-made frames."""

from __future__ import annotations

import struct

import h2.config
import h2.connection
import hpack

from probe.l7.conversation import Conversation
from probe.l7.http2 import PREFACE, Http2Parser
from probe.l7.records import REQUEST, RESPONSE

GRPC_REQ = [(":method", "POST"), (":scheme", "http"), (":path", "/shop.Cart/GetCart"),
            (":authority", "cart:7070"), ("content-type", "application/grpc"), ("te", "trailers")]


class Pair:
    """A client and a server h2 connection; everything each sends is fed to an Http2Parser."""

    def __init__(self, parser: Http2Parser | None = None) -> None:
        self.c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.s = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        self.p = parser or Http2Parser()
        self.events: list = []
        self.ts = 0
        self.c.initiate_connection()
        self.s.initiate_connection()
        self.pump()

    def pump(self) -> None:
        for _ in range(4):
            cd, sd = self.c.data_to_send(), self.s.data_to_send()
            if not cd and not sd:
                return
            self.ts += 1000
            if cd:
                self.events += self.p.feed("client", cd, self.ts)
                self.s.receive_data(cd)
            if sd:
                self.events += self.p.feed("server", sd, self.ts)
                self.c.receive_data(sd)

    def take(self) -> list:
        ev, self.events = self.events, []
        return ev


def test_grpc_unary_with_trailers() -> None:
    t = Pair()
    t.c.send_headers(1, GRPC_REQ)
    t.c.send_data(1, b"\x00\x00\x00\x00\x02\x08\x01", end_stream=True)
    t.pump()
    t.s.send_headers(1, [(":status", "200"), ("content-type", "application/grpc")])
    t.s.send_data(1, b"\x00\x00\x00\x00\x00")
    t.s.send_headers(1, [("grpc-status", "0"), ("grpc-message", "")], end_stream=True)
    t.pump()
    req, resp = t.take()
    assert req.to_dict() == {"type": "REQUEST", "http": {
        "method": "POST", "url": "http://cart:7070/shop.Cart/GetCart", "protocol": "HTTP/2",
        "headers": [{"key": "content-type", "value": "application/grpc"}, {"key": "te", "value": "trailers"}]}}
    assert req.stream_id == 1 and req.protocol == "grpc" and not req.is_reply
    assert (req.http.grpc_service, req.http.grpc_method) == ("shop.Cart", "GetCart")
    d = resp.to_dict()
    assert d["http"]["code"] == 200 and {"key": "grpc-status", "value": "0"} in d["http"]["headers"]
    assert resp.http.grpc_status == 0 and resp.is_reply and resp.latency_ns > 0
    assert t.p.stats["prefaces"] == 1 and t.p.stats.get("hpack_errors", 0) == 0


def test_grpc_trailers_only_error() -> None:
    t = Pair()
    t.c.send_headers(1, GRPC_REQ, end_stream=True)
    t.pump()
    t.s.send_headers(1, [(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "14"),
                         ("grpc-message", "upstream%20unavailable")], end_stream=True)
    t.pump()
    _, resp = t.take()
    assert resp.http.grpc_status == 14 and resp.http.grpc_message == "upstream unavailable"
    hdrs = resp.to_dict()["http"]["headers"]
    assert {"key": "grpc-status", "value": "14"} in hdrs
    assert {"key": "grpc-message", "value": "upstream%20unavailable"} in hdrs


def test_grpc_server_streaming_emits_one_response_at_trailers() -> None:
    t = Pair()
    t.c.send_headers(1, GRPC_REQ, end_stream=True)
    t.pump()
    t.s.send_headers(1, [(":status", "200"), ("content-type", "application/grpc+proto")])
    t.pump()
    assert [e.type for e in t.take()] == [REQUEST]
    for _ in range(5):
        t.s.send_data(1, b"\x00\x00\x00\x00\x03abc")
        t.pump()
    assert t.take() == []
    t.s.send_headers(1, [("grpc-status", "5"), ("grpc-message", "not found")], end_stream=True)
    t.pump()
    (resp,) = t.take()
    assert resp.http.grpc_status == 5 and resp.http.code == 200 and resp.timestamp_ns < t.ts


def test_many_concurrent_streams_answered_out_of_order() -> None:
    t = Pair()
    sids = [t.c.get_next_available_stream_id() for _ in range(1)]
    sids = []
    for i in range(60):
        sid = t.c.get_next_available_stream_id()
        sids.append(sid)
        t.c.send_headers(sid, [(":method", "GET"), (":scheme", "https"), (":path", f"/obj/{i}"),
                               (":authority", "cdn.example"), ("x-n", str(i))], end_stream=True)
    t.pump()
    for sid in reversed(sids):
        t.s.send_headers(sid, [(":status", "200" if sid % 4 == 1 else "404"), ("content-length", "0")],
                         end_stream=True)
    t.pump()
    ev = t.take()
    reqs = {e.stream_id: e for e in ev if e.type == REQUEST}
    resps = [e for e in ev if e.type == RESPONSE]
    assert len(reqs) == len(resps) == 60
    for r in resps:
        i = sids.index(r.stream_id)
        assert r.http.url == f"https://cdn.example/obj/{i}" and r.http.code == (200 if r.stream_id % 4 == 1 else 404)
        assert r.protocol == "http2" and not r.http.is_grpc
    # Later requests reuse HPACK dynamic-table entries from earlier ones: still all decoded.
    assert t.p.stats.get("hpack_errors", 0) == 0


def _frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", sid) + payload


def test_hpack_block_across_continuation_frames_padding_priority() -> None:
    enc = hpack.Encoder()
    block = enc.encode([(":method", "GET"), (":scheme", "http"), (":path", "/split"), (":authority", "h2.test"),
                        ("x-long", "v" * 300)])
    p = Http2Parser()
    pad = 7
    first = bytes([pad]) + struct.pack(">IB", 0, 15) + block[:10] + b"\x00" * pad  # PADDED|PRIORITY
    stream = (PREFACE + _frame(4, 0, 0, b"") + _frame(1, 0x08 | 0x20, 1, first)
              + _frame(9, 0, 1, block[10:50]) + _frame(9, 0x4, 1, block[50:]))
    ev = []
    for i in range(0, len(stream), 13):  # also split across TCP segments
        ev += p.feed("client", stream[i:i + 13], i)
    (req,) = ev
    assert req.http.url == "http://h2.test/split" and dict(req.http.headers)["x-long"] == "v" * 300
    # The second request refers back to dynamic-table entries inserted by the first.
    block2 = enc.encode([(":method", "GET"), (":scheme", "http"), (":path", "/split"), (":authority", "h2.test"),
                         ("x-long", "v" * 300)])
    assert len(block2) < 10
    (req2,) = p.feed("client", _frame(1, 0x5, 3, block2), 999)
    assert req2.http.url == "http://h2.test/split" and req2.stream_id == 3


def test_interleaved_frame_inside_header_block_is_a_counted_desync() -> None:
    enc = hpack.Encoder()
    block = enc.encode([(":method", "GET"), (":path", "/x"), (":scheme", "http"), (":authority", "a")])
    p = Http2Parser()
    ev = p.feed("client", PREFACE + _frame(1, 0, 1, block[:3]) + _frame(8, 0, 0, b"\x00\x00\x01\x00")
                + _frame(9, 4, 1, block[3:]), 0)
    assert ev == [] and p.stats["header_block_errors"] == 1 and p.stats["continuation_errors"] == 1


def test_rst_stream_and_goaway() -> None:
    t = Pair()
    t.c.send_headers(1, GRPC_REQ)
    t.pump()
    t.s.send_headers(1, [(":status", "200"), ("content-type", "application/grpc")])
    t.s.reset_stream(1)
    t.s.close_connection()
    t.pump()
    ev = t.take()
    assert [e.type for e in ev] == [REQUEST, RESPONSE] and ev[1].http.truncated
    assert t.p.stats["rst_streams"] == 1 and t.p.stats["goaways"] == 1


def test_midstream_start_resyncs_on_frame_boundary() -> None:
    t = Pair(Http2Parser())
    raw_client: list[bytes] = []
    real_feed = t.p.feed

    def spy(direction: str, data: bytes, ts: int) -> list:
        if direction == "client":
            raw_client.append(data)
        return real_feed(direction, data, ts)

    t.p.feed = spy  # type: ignore[method-assign]
    for _ in range(3):
        sid = t.c.get_next_available_stream_id()
        t.c.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", "/a.B/C"),
                               (":authority", "svc"), ("content-type", "application/grpc")])
        t.c.send_data(sid, b"\x00\x00\x00\x00\x05hello", end_stream=True)
        t.pump()
    stream = b"".join(raw_client)
    start = stream.index(b"hello") - 3  # join inside the first request's DATA frame
    p = Http2Parser()
    ev = p.feed("client", stream[start:], 0)
    # Requests 2 and 3 are found again; their HPACK references to entries inserted by request 1
    # (never seen) are unknown, which is counted instead of failing.
    assert [e.stream_id for e in ev] == [3, 5]
    assert all(e.http.method == "POST" for e in ev)
    assert p.stats["resyncs"] >= 1 and p.stats["midstream_starts"] == 1


def test_gap_inside_data_keeps_hpack_in_sync() -> None:
    p = Http2Parser()
    enc = hpack.Encoder()
    hdr = enc.encode([(":method", "POST"), (":path", "/u"), (":scheme", "http"), (":authority", "x")])
    p.feed("client", PREFACE + _frame(1, 4, 1, hdr) + _frame(0, 1, 1, b"z" * 1000)[:500], 0)
    p.gap("client", 300, 1)
    ev = p.feed("client", b"z" * 209 + _frame(1, 5, 3, enc.encode([(":method", "POST"), (":path", "/u"),
                                                                     (":scheme", "http"), (":authority", "x")])), 2)
    assert [e.http.url for e in ev] == ["http://x/u"] and p.stats["gaps_in_data"] == 1
    assert p.stats.get("hpack_errors", 0) == 0


def test_h2c_upgrade_through_conversation() -> None:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    settings = client.initiate_upgrade_connection()
    conv = Conversation(("10.0.0.1", 51000), ("10.0.0.2", 7070))
    seq = {"client": 1000, "server": 5000}
    ev: list = []

    def send(direction: str, data: bytes, ts: int, h2_bytes: bytes | None = None) -> None:
        ev.extend(conv.feed(direction, seq[direction], data, 0x18, ts))
        seq[direction] += len(data)
        (server if direction == "client" else client).receive_data(data if h2_bytes is None else h2_bytes)

    send("client", b"GET /upgrade-me HTTP/1.1\r\nHost: up.example\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                   b"Upgrade: h2c\r\nHTTP2-Settings: " + settings + b"\r\n\r\n", 1_000, b"")
    server.initiate_upgrade_connection(settings)
    server.send_headers(1, [(":status", "200"), ("content-type", "text/plain")])
    server.send_data(1, b"upgraded!", end_stream=True)
    frames = server.data_to_send()
    send("server", b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
         + frames, 2_000, frames)
    send("client", client.data_to_send(), 3_000)  # preface + SETTINGS
    client.send_headers(3, [(":method", "GET"), (":scheme", "http"), (":path", "/second"),
                            (":authority", "up.example")], end_stream=True)
    send("client", client.data_to_send(), 4_000)
    server.send_headers(3, [(":status", "204")], end_stream=True)
    send("server", server.data_to_send(), 5_000)
    assert [(e.type, e.http.protocol, e.http.url, e.http.code) for e in ev] == [
        (REQUEST, "HTTP/1.1", "http://up.example/upgrade-me", 0),
        (RESPONSE, "HTTP/2", "http://up.example/upgrade-me", 200),
        (REQUEST, "HTTP/2", "http://up.example/second", 0),
        (RESPONSE, "HTTP/2", "http://up.example/second", 204),
    ]
    assert ev[1].latency_ns == 1_000 and ev[1].stream_id == 1
    st = conv.stats
    assert conv.protocol == "http2" and st["h2c_upgrades"] == 1 and st["upgrades"] == 1
    assert st.get("hpack_errors", 0) == 0 and st.get("midstream_starts", 0) == 0


def test_push_promise_response_carries_promised_request() -> None:
    t = Pair()
    t.c.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":path", "/index.html"),
                         (":authority", "site")], end_stream=True)
    t.pump()
    t.s.push_stream(1, 2, [(":method", "GET"), (":scheme", "https"), (":path", "/style.css"), (":authority", "site")])
    t.s.send_headers(1, [(":status", "200")], end_stream=True)
    t.s.send_headers(2, [(":status", "200"), ("content-type", "text/css")], end_stream=True)
    t.pump()
    ev = t.take()
    assert [(e.type, e.stream_id, e.http.url) for e in ev] == [
        (REQUEST, 1, "https://site/index.html"), (RESPONSE, 1, "https://site/index.html"),
        (RESPONSE, 2, "https://site/style.css")]
    assert t.p.stats["push_promises"] == 1
