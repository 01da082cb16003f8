"""Kafka parser: header v0–v2 (flexible, tagged fields), topics per api/version, matching, errors."""

from __future__ import annotations

import struct
import uuid

from probe.l7.config import L7Config
from probe.l7.kafka import KafkaParser
from probe.l7.kafka_schema import APIS, is_flexible, request_header_version, response_header_version
from probe.l7.records import REQUEST, RESPONSE


def uvarint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def s16(x: str | None) -> bytes:
    return struct.pack(">h", -1) if x is None else struct.pack(">h", len(x)) + x.encode()


def cstr(x: str | None) -> bytes:
    return b"\x00" if x is None else uvarint(len(x) + 1) + x.encode()


def string(x: str | None, flex: bool) -> bytes:
    return cstr(x) if flex else s16(x)


def arr(n: int, flex: bool) -> bytes:
    return uvarint(n + 1) if flex else struct.pack(">i", n)


TAGS = uvarint(2) + uvarint(0) + uvarint(3) + b"abc" + uvarint(7) + uvarint(1) + b"z"  # two tagged fields


def request(key: int, ver: int, corr: int, body: bytes, client: str | None = "cli", tags: bytes = TAGS) -> bytes:
    hv = request_header_version(key, ver)
    hdr = struct.pack(">hhi", key, ver, corr)
    if hv >= 1:
        hdr += s16(client)  # the header's client_id is never compact
    if hv == 2:
        hdr += tags
    msg = hdr + body
    return struct.pack(">i", len(msg)) + msg


def response(key: int, ver: int, corr: int, body: bytes) -> bytes:
    msg = struct.pack(">i", corr) + (TAGS if response_header_version(key, ver) == 1 else b"") + body
    return struct.pack(">i", len(msg)) + msg


def produce_body(ver: int, topic: str, records: bytes = b"R" * 50) -> bytes:
    f = is_flexible(0, ver)
    b = string("txn-1", f) if ver >= 3 else b""
    b += struct.pack(">hi", -1, 30000) + arr(1, f)
    b += uuid.UUID(int=0xABCDEF).bytes if ver >= 13 else string(topic, f)
    b += arr(1, f) + struct.pack(">i", 0) + (uvarint(len(records) + 1) if f else struct.pack(">i", len(records)))
    return b + records


def fetch_body(ver: int, topic: str | None) -> bytes:
    f = is_flexible(1, ver)
    b = struct.pack(">i", -1) if ver <= 14 else b""
    b += struct.pack(">ii", 500, 1) + (struct.pack(">i", 52428800) if ver >= 3 else b"")
    b += b"\x00" if ver >= 4 else b""
    b += struct.pack(">ii", 0, -1) if ver >= 7 else b""
    if topic is None:
        return b + arr(0, f)
    b += arr(1, f) + (uuid.UUID(int=0x1234).bytes if ver >= 13 else string(topic, f))
    return b + arr(1, f) + struct.pack(">iq", 0, 42)


def test_flexible_header_v2_with_tagged_fields_produce_v9() -> None:
    p = KafkaParser()
    (ev,) = p.feed("client", request(0, 9, 7, produce_body(9, "orders")), 100)
    assert ev.to_dict() == {"type": "REQUEST", "kafka": {
        "api_version": 9, "api_key": "produce", "correlation_id": 7, "topic": "orders"}}
    assert ev.kafka.client_id == "cli" and ev.stream_id == 7 and not ev.is_reply
    # Response: header v1 (tagged fields), responses[0].partitions[0].error_code = 6 (NOT_LEADER)
    body = arr(1, True) + cstr("orders") + arr(1, True) + struct.pack(">ihq", 0, 6, -1)
    (resp,) = p.feed("server", response(0, 9, 7, body), 1100)
    assert resp.to_dict() == {"type": "RESPONSE", "latency_ns": "1000", "kafka": {
        "error_code": 6, "api_version": 9, "api_key": "produce", "correlation_id": 7, "topic": "orders"}}


def test_produce_topics_v0_to_v13() -> None:
    for ver in range(0, 14):
        p = KafkaParser()
        (ev,) = p.feed("client", request(0, ver, ver, produce_body(ver, f"t-{ver}")), 0)
        if ver >= 13:  # topic ids, not names
            assert ev.kafka.topic == "" and ev.kafka.topic_id == uuid.UUID(int=0xABCDEF).hex
        else:
            assert ev.kafka.topic == f"t-{ver}", ver


def test_fetch_topics_v0_to_v17() -> None:
    for ver in range(0, 18):
        p = KafkaParser()
        (ev,) = p.feed("client", request(1, ver, 100 + ver, fetch_body(ver, f"f-{ver}")), 0)
        assert ev.kafka.api_key == "fetch" and ev.kafka.correlation_id == 100 + ver
        if ver >= 13:
            assert ev.kafka.topic == "" and ev.kafka.topic_id == uuid.UUID(int=0x1234).hex
        else:
            assert ev.kafka.topic == f"f-{ver}", ver


def test_metadata_topics_all_versions() -> None:
    for ver in range(0, 13):
        f = is_flexible(3, ver)
        body = arr(2, f)
        for name in ("a", "b"):
            body += (uuid.UUID(int=0).bytes if ver >= 10 else b"") + string(name, f) + (b"\x00" if f else b"")
        body += b"\x01" if ver >= 4 else b""
        p = KafkaParser()
        (ev,) = p.feed("client", request(3, ver, 1, body), 0)
        assert ev.kafka.topic == "a" and ev.kafka.topics == ["a", "b"], ver
    (ev,) = KafkaParser().feed("client", request(3, 1, 1, struct.pack(">i", -1)), 0)  # null = all topics
    assert ev.kafka.topic == ""


def test_metadata_response_first_topic_error() -> None:
    p = KafkaParser()
    p.feed("client", request(3, 9, 5, arr(1, True) + cstr("gone") + b"\x00\x01\x00\x00"), 0)
    broker = struct.pack(">i", 1) + cstr("kafka-0") + struct.pack(">i", 9092) + cstr(None) + b"\x00"
    body = struct.pack(">i", 0) + arr(1, True) + broker + cstr("cluster") + struct.pack(">i", 1)
    body += arr(1, True) + struct.pack(">h", 3) + cstr("gone")
    (resp,) = p.feed("server", response(3, 9, 5, body), 1)
    assert resp.kafka.error_code == 3 and resp.kafka.topic == "gone"


def test_responses_matched_by_correlation_id_out_of_order() -> None:
    p = KafkaParser()
    reqs = request(12, 4, 1, cstr("grp") + struct.pack(">i", 3) + cstr("m") + cstr(None) + b"\x00")
    reqs += request(18, 3, 2, cstr("java") + cstr("3.7") + b"\x00")
    reqs += request(11, 2, 3, s16("grp") + b"\x00" * 20)
    assert [e.kafka.api_key for e in p.feed("client", reqs, 10)] == ["heartbeat", "api_versions", "join_group"]
    # api_versions responses keep header v0 even for flexible versions: no tagged-field byte.
    api = struct.pack(">i", 2) + struct.pack(">h", 35) + b"\x01"
    resps = response(11, 2, 3, struct.pack(">ih", 0, 25)) + struct.pack(">i", len(api)) + api
    resps += response(12, 4, 1, struct.pack(">ih", 0, 27) + b"\x00")
    ev = p.feed("server", resps, 50)
    assert [(e.stream_id, e.kafka.api_key, e.kafka.error_code) for e in ev] == [
        (3, "join_group", 25), (2, "api_versions", 35), (1, "heartbeat", 27)]
    assert all(e.type == RESPONSE and e.latency_ns == 40 for e in ev)


def test_bytewise_and_large_message_skipped_unbuffered() -> None:
    cfg = L7Config(max_buffer=8192)
    p = KafkaParser(cfg)
    big = request(0, 7, 9, produce_body(7, "bulk", b"\xee" * 1_000_000))
    small = request(1, 11, 10, fetch_body(11, "after"))
    ev = []
    peak = 0
    for i in range(0, len(big), 1460):
        ev += p.feed("client", big[i:i + 1460], i)
        peak = max(peak, p.buffered_bytes())
    for i in range(len(small)):
        ev += p.feed("client", small[i:i + 1], 0)
    assert [(e.kafka.topic, e.stream_id) for e in ev] == [("bulk", 9), ("after", 10)]
    assert peak <= cfg.max_buffer and p.buffered_bytes() == 0


def test_resync_after_garbage_and_gap() -> None:
    p = KafkaParser()
    ev = p.feed("client", b"\x7f\xff\xff\xff\x00\x00junk" + request(3, 1, 77, arr(0, False)), 0)
    assert [e.stream_id for e in ev] == [77] and p.stats["resyncs"] == 1
    p.feed("client", request(0, 3, 78, produce_body(3, "x"))[:20], 1)
    p.gap("client", 40, 2)
    ev = p.feed("client", b"\x01" * 33 + request(0, 3, 79, produce_body(3, "y")), 3)
    assert [e.kafka.topic for e in ev] == ["y"]
    # A response whose request was lost is counted, not mis-attributed.
    assert p.feed("server", response(0, 3, 78, b""), 4) == [] and p.stats["unmatched_responses"] == 1


def test_schema_tables() -> None:
    names = {v[0] for v in APIS.values()}
    for n in ("produce", "fetch", "list_offsets", "metadata", "offset_commit", "offset_fetch", "find_coordinator",
              "join_group", "heartbeat", "leave_group", "sync_group", "api_versions", "init_producer_id"):
        assert n in names
    assert not is_flexible(0, 8) and is_flexible(0, 9) and not is_flexible(17, 1)
    assert request_header_version(7, 0) == 0 and request_header_version(18, 3) == 2
    assert response_header_version(18, 3) == 0 and response_header_version(1, 12) == 1


def test_request_event_fields() -> None:
    (ev,) = KafkaParser().feed("client", request(10, 0, 0, s16("g")), 5)
    assert ev.type == REQUEST and ev.to_dict() == {"type": "REQUEST", "kafka": {"api_key": "find_coordinator"}}
