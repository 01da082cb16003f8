"""HTTP/1.x parser: keep-alive, pipelining, chunked, bodiless responses, upgrades, redaction, resync."""

from __future__ import annotations

from probe.l7.config import L7Config
from probe.l7.conversation import Conversation
from probe.l7.http1 import Http1Parser
from probe.l7.records import REQUEST, RESPONSE


def feed_bytewise(p: Http1Parser, direction: str, data: bytes, ts: int) -> list:
    out = []
    for i in range(len(data)):
        out += p.feed(direction, data[i:i + 1], ts + i)
    return out


def test_keepalive_bytewise_with_bodies() -> None:
    p = Http1Parser()
    req1 = b"POST /users HTTP/1.1\r\nHost: api.default:8080\r\nContent-Length: 11\r\n\r\nhello world"
    resp1 = b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nabcde"
    req2 = b"GET /users/1 HTTP/1.1\r\nHost: api.default:8080\r\n\r\n"
    resp2 = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
    ev = feed_bytewise(p, "client", req1, 1_000)
    ev += feed_bytewise(p, "server", resp1, 5_000)
    ev += feed_bytewise(p, "client", req2, 10_000)
    ev += feed_bytewise(p, "server", resp2, 20_000)
    assert [e.type for e in ev] == [REQUEST, RESPONSE, REQUEST, RESPONSE]
    assert ev[0].to_dict() == {"type": "REQUEST", "http": {
        "method": "POST", "url": "http://api.default:8080/users", "protocol": "HTTP/1.1",
        "headers": [{"key": "host", "value": "api.default:8080"}, {"key": "content-length", "value": "11"}]}}
    assert ev[0].timestamp_ns == 1_000  # first byte of the message
    assert ev[1].to_dict()["http"]["code"] == 201 and ev[1].latency_ns == 4_000
    assert ev[1].to_dict()["latency_ns"] == "4000"
    assert ev[3].http.code == 404 and ev[3].http.url == "http://api.default:8080/users/1"
    assert ev[3].latency_ns == 10_000
    assert p.buffered_bytes() == 0 and p.stats.get("resyncs", 0) == 0


def test_pipelining_matches_fifo() -> None:
    p = Http1Parser()
    reqs = b"".join(f"GET /item/{i} HTTP/1.1\r\nHost: shop\r\n\r\n".encode() for i in range(3))
    ev = p.feed("client", reqs, 100)
    assert [e.http.path for e in ev] == ["/item/0", "/item/1", "/item/2"]
    resps = (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n"
             b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nyes")
    ev = p.feed("server", resps, 900)
    assert [(e.http.code, e.http.url) for e in ev] == [
        (200, "http://shop/item/0"), (500, "http://shop/item/1"), (200, "http://shop/item/2")]
    assert all(e.latency_ns == 800 for e in ev)


def test_chunked_with_extensions_and_trailers_bytewise() -> None:
    p = Http1Parser()
    p.feed("client", b"GET /stream HTTP/1.1\r\nHost: h\r\n\r\nGET /next HTTP/1.1\r\nHost: h\r\n\r\n", 0)
    body = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nExpires: never\r\n\r\n"
    resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n" + body
    ev = feed_bytewise(p, "server", resp + b"HTTP/1.1 204 No Content\r\n\r\n", 10)
    assert [(e.http.code, e.http.path) for e in ev] == [(200, "/stream"), (204, "/next")]
    assert p.buffered_bytes() == 0 and p.stats.get("chunk_errors", 0) == 0


def test_chunked_request_body() -> None:
    p = Http1Parser()
    ev = p.feed("client", b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
                          b"GET /after HTTP/1.1\r\nHost: h\r\n\r\n", 0)
    assert [e.http.path for e in ev] == ["/up", "/after"]


def test_head_204_304_have_no_body() -> None:
    p = Http1Parser()
    p.feed("client", b"HEAD /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n"
                     b"GET /c HTTP/1.1\r\nHost: h\r\n\r\nGET /d HTTP/1.1\r\nHost: h\r\n\r\n", 0)
    ev = p.feed("server", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
                          b"HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n"
                          b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n"
                          b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", 5)
    assert [(e.http.code, e.http.method, e.http.path) for e in ev] == [
        (200, "HEAD", "/a"), (204, "GET", "/b"), (304, "GET", "/c"), (200, "GET", "/d")]


def test_informational_100_continue_is_not_the_response() -> None:
    p = Http1Parser()
    p.feed("client", b"PUT /f HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n", 0)
    assert p.feed("server", b"HTTP/1.1 100 Continue\r\n\r\n", 1) == []
    p.feed("client", b"data", 2)
    (ev,) = p.feed("server", b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n", 3)
    assert ev.http.code == 201 and ev.http.method == "PUT" and p.stats["informational"] == 1


def test_http10_body_until_close() -> None:
    p = Http1Parser()
    p.feed("client", b"GET / HTTP/1.0\r\n\r\n", 0)
    (ev,) = p.feed("server", b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * 100_000, 1)
    assert ev.http.protocol == "HTTP/1.0" and ev.http.url == "/"
    assert p.feed("server", b"HTTP/1.1 200 OK\r\n\r\n", 2) == []  # still body
    assert p.buffered_bytes() == 0


def test_redaction_and_allowlist() -> None:
    p = Http1Parser()
    (ev,) = p.feed("client", b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer s3cret\r\nCookie: a=b\r\n"
                             b"Proxy-Authorization: Basic x\r\nX-Request-Id: 42\r\n\r\n", 0)
    hdrs = dict(ev.http.headers)
    assert hdrs["authorization"] == hdrs["cookie"] == hdrs["proxy-authorization"] == "HIDDEN"
    assert hdrs["x-request-id"] == "42"
    (ev,) = p.feed("server", b"HTTP/1.1 200 OK\r\nSet-Cookie: sid=1\r\nContent-Length: 0\r\n\r\n", 1)
    assert dict(ev.http.headers)["set-cookie"] == "HIDDEN"
    cfg = L7Config(header_allowlist=frozenset({"X-Request-Id", "authorization"}))
    p = Http1Parser(cfg)
    (ev,) = p.feed("client", b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: t\r\nX-Request-Id: 7\r\n\r\n", 0)
    assert ev.http.headers == [("authorization", "HIDDEN"), ("x-request-id", "7")]


def test_resync_after_garbage_on_both_sides() -> None:
    p = Http1Parser()
    ev = p.feed("client", b"\x16\x03\x01\x00\xffrandom-bytes\r\n\r\nGET /ok HTTP/1.1\r\nHost: h\r\n\r\n", 0)
    assert [e.http.path for e in ev] == ["/ok"]
    ev = p.feed("server", b"\x00\x01garbage HTTP/9 \r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 1)
    assert [(e.http.code, e.http.path) for e in ev] == [(200, "/ok")]
    assert p.stats["resyncs"] >= 2 and p.stats["garbage_heads"] >= 1


def test_gap_inside_body_keeps_sync_and_gap_in_head_resyncs() -> None:
    p = Http1Parser()
    p.feed("client", b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100, 0)
    p.gap("client", 500, 1)  # lost bytes fell inside the body
    ev = p.feed("client", b"y" * 400 + b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n", 2)
    assert [e.http.path for e in ev] == ["/b"] and p.stats["gaps_in_body"] == 1
    p.feed("client", b"GET /c HTTP/1.1\r\nHo", 3)
    p.gap("client", 10, 4)
    ev = p.feed("client", b"st: h\r\n\r\nGET /d HTTP/1.1\r\nHost: h\r\n\r\n", 5)
    assert [e.http.path for e in ev] == ["/d"]


def test_oversized_head_is_dropped_and_counted() -> None:
    p = Http1Parser(L7Config(max_buffer=1024))
    p.feed("client", b"GET / HTTP/1.1\r\nX: " + b"a" * 5000, 0)
    assert p.buffered_bytes() <= 1024 and p.stats["overflow_drops"] == 1
    (ev,) = p.feed("client", b"\r\n\r\nGET /next HTTP/1.1\r\nHost: h\r\n\r\n", 1)
    assert ev.http.path == "/next"


def test_truncated_request_flushed_when_answered_or_closed() -> None:
    p = Http1Parser()
    assert p.feed("client", b"GET /slow HTTP/1.1\r\nHost: h\r\nX-Partial: ab", 0) == []
    ev = p.feed("server", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 7)
    assert [(e.type, e.http.path, e.http.truncated) for e in ev] == [
        (REQUEST, "/slow", True), (RESPONSE, "/slow", False)]
    assert dict(ev[0].http.headers) == {"host": "h"}  # the cut header line is not reported
    p.feed("client", b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n", 8)
    assert p.feed("server", b"HTTP/1.1 503 Service Unavailable\r\nServer: env", 9) == []
    (ev,) = p.close(10)
    assert ev.http.code == 503 and ev.http.truncated and ev.http.path == "/x"


def test_absolute_form_and_missing_host() -> None:
    p = Http1Parser()
    ev = p.feed("client", b"GET http://proxy.example/p?q=1 HTTP/1.1\r\nHost: proxy.example\r\n\r\n"
                          b"OPTIONS * HTTP/1.1\r\n\r\nGET /nohost HTTP/1.0\r\n\r\n", 0)
    assert [e.http.url for e in ev] == ["http://proxy.example/p?q=1", "*", "/nohost"]


def _segments(conv: Conversation, direction: str, data: bytes, seq: int, ts: int) -> tuple[list, int]:
    out = conv.feed(direction, seq, data, 0x18, ts)
    return out, seq + len(data)


def test_websocket_upgrade_goes_opaque() -> None:
    conv = Conversation(("10.0.0.1", 40000), ("10.0.0.2", 8080))
    ev, c = _segments(conv, "client", b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", 1, 0)
    ev2, s = _segments(conv, "server", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello", 1, 5)
    ev3, _ = _segments(conv, "client", b"\x81\x85GET / HTTP/1.1\r\n\r\n", c, 9)
    assert [e.type for e in ev + ev2] == [REQUEST, RESPONSE] and ev2[0].http.code == 101
    assert ev3 == [] and conv.stats["upgrades"] == 1 and conv.stats["opaque_bytes"] > 0
