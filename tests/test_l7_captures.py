"""Real captures (DeepFlow's test pcaps) through Conversation, compared with DeepFlow's own results."""

from __future__ import annotations

from pathlib import Path

import pytest

from l7_captures import CAPTURES, all_events, read_results, replay, snake
from probe.l7.records import REQUEST, RESPONSE

pytestmark = pytest.mark.skipif(not CAPTURES.is_dir(), reason="captures folder missing")

HTTP_PCAPS = sorted((CAPTURES / "http").glob("*.pcap"))
KAFKA_PCAPS = sorted((CAPTURES / "kafka").glob("*.pcap"))
# A second DeepFlow result for grpc-server-stream.pcap, made with server streaming treated as unary.
HTTP_RESULTS = sorted((CAPTURES / "http").glob("*.result"))


def _pcap_for(result: Path) -> Path:
    if result.name == "grpc-server-stream-as-unary.result":
        return result.with_name("grpc-server-stream.pcap")
    return result.with_suffix(".pcap")


def test_every_capture_is_covered() -> None:
    assert len(HTTP_PCAPS) == 12 and len(KAFKA_PCAPS) == 11
    for pcap in HTTP_PCAPS + KAFKA_PCAPS:
        rps = replay(pcap)
        assert rps, pcap
        for rp in rps:
            st = rp.conversation.stats
            assert st.get("internal_errors", 0) == 0 and st.get("parse_errors", 0) == 0, (pcap.name, st)
            assert rp.conversation.protocol in ("http1", "http2", "kafka"), pcap.name


# -- HTTP/1.x and HTTP/2 ------------------------------------------------------------------------
def _expected_http(result: Path) -> tuple[list[dict], list[dict]]:
    rows = [r for r in read_results(result) if r["msg_type"] in ("Request", "Response", "Session")]
    reqs = [r for r in rows if r["msg_type"] == "Request"]
    resps = [r for r in rows if r["status_code"] is not None or r["grpc_status_code"] is not None]
    return reqs, resps


@pytest.mark.parametrize("result", HTTP_RESULTS, ids=lambda p: p.stem)
def test_http_capture_matches_deepflow(result: Path) -> None:
    events = all_events(_pcap_for(result))
    reqs, resps = _expected_http(result)
    got_reqs = [e for e in events if e.type == REQUEST]
    got_resps = [e for e in events if e.type == RESPONSE]
    assert len(got_reqs) == len(reqs)
    h2 = reqs[0]["version"] == "V2"
    for want, got in zip(reqs, got_reqs):
        http = got.http
        assert http is not None
        if h2:
            assert got.stream_id == want["stream_id"]
            assert http.protocol == "HTTP/2"
            assert http.is_grpc == (want["proto"] == "Grpc")
            if want["service_name"]:
                assert http.grpc_service == want["service_name"]
        else:
            assert got.stream_id is None and http.protocol == "HTTP/1.1"
        if want["method"] not in ("_RequestHeader", None):
            assert http.method == want["method"].upper()
        assert http.path == want["path"]  # "" where HPACK pointed into a table we never saw
        assert http.host == want["host"]
        assert got.is_reply is False and got.direction == "request"
    # Responses: DeepFlow may split one (headers / trailers) over several rows; merge per stream.
    if h2:
        merged: dict[int, dict] = {}
        for r in resps:
            m = merged.setdefault(r["stream_id"], {"status": None, "grpc": None})
            m["status"] = m["status"] or r["status_code"]
            m["grpc"] = r["grpc_status_code"] if r["grpc_status_code"] is not None else m["grpc"]
        by_stream = {e.stream_id: e for e in got_resps}
        assert set(by_stream) == set(merged)
        for sid, want in merged.items():
            got = by_stream[sid]
            assert got.http.code == want["status"]
            if result.stem != "grpc-server-stream-as-unary":  # that run ignored the trailers
                assert got.http.grpc_status == want["grpc"]
            if want["grpc"] is not None:
                assert {"key": "grpc-status", "value": str(want["grpc"])} in got.to_dict()["http"]["headers"]
            assert got.is_reply and got.latency_ns > 0
    else:
        assert len(got_resps) == len(resps)
        for want, got in zip(resps, got_resps):
            assert got.http.code == want["status_code"]
            assert got.http.protocol == {"V1_0": "HTTP/1.0", "V1_1": "HTTP/1.1"}[want["version"]]
            assert got.latency_ns > 0


def test_http_truncated_captures_are_flagged() -> None:
    """client-ip: request cut mid-headers; istio-tcp-frag: response is a bare status line."""
    ev = all_events(CAPTURES / "http/client-ip.pcap")
    assert ev[0].http.truncated and not ev[1].http.truncated
    assert ev[0].http.url == ("http://api-webizft1.intranet.local/biz-inquiry-bff/bff/v1/common/check/"
                              "polymerization?channel=webportal&terminalType=bff")
    ev = all_events(CAPTURES / "http/istio-tcp-frag.pcap")
    assert ev[1].to_dict()["http"] == {
        "code": 200, "method": "GET", "url": "http://productpage:9080/productpage", "protocol": "HTTP/1.0"}


@pytest.mark.parametrize("name", ["grpc-unknown", "http2-multi", "httpv2-stream-id"])
def test_http2_midstream_unknown_hpack_is_counted(name: str) -> None:
    (rp,) = replay(CAPTURES / f"http/{name}.pcap")
    st = rp.conversation.stats
    assert st["midstream_starts"] == 1
    assert st["hpack_errors"] >= 1 and st["hpack_unknown_refs"] >= 1


def test_grpc_server_stream_survives_missing_segments() -> None:
    """Three 17-byte server segments are absent from the capture: gaps are skipped and counted."""
    (rp,) = replay(CAPTURES / "http/grpc-server-stream.pcap")
    st = rp.conversation.stats
    assert st["gaps_skipped"] == 3 and st["bytes_lost_gaps"] == 51
    resp = [e for e in rp.events if e.is_reply][0]
    assert resp.http.grpc_status == 0 and resp.http.grpc_service == "timeseriesquery.TimeSeriesQueryService"
    assert resp.http.grpc_method == "ServerStreamQuery"


def test_sw8_chunked_keepalive() -> None:
    (rp,) = replay(CAPTURES / "http/sw8.pcap")
    assert [e.type for e in rp.events] == [REQUEST, RESPONSE] * 3
    assert rp.conversation.stats.get("resyncs", 0) == 0


# -- Kafka ----------------------------------------------------------------------------------------
KAFKA_RESULTS = sorted((CAPTURES / "kafka").glob("*.result"))
# DeepFlow does not decode OffsetCommit/Heartbeat responses (the "unsupported" in the capture's name)
# and reports -2; their bytes carry error_code 0 (first partition / top level), which we decode.
DEEPFLOW_UNDECODED = -2


@pytest.mark.parametrize("result", KAFKA_RESULTS, ids=lambda p: p.stem)
def test_kafka_capture_matches_deepflow(result: Path) -> None:
    events = all_events(result.with_suffix(".pcap"))
    rows = [r for r in read_results(result) if r["msg_type"] in ("Request", "Response")]
    assert len(events) == len(rows)
    index = {(e.type, e.stream_id): e for e in events}
    for want in rows:
        kind = REQUEST if want["msg_type"] == "Request" else RESPONSE
        got = index[(kind, want["correlation_id"])]
        k = got.kafka
        assert k is not None
        assert k.correlation_id == want["correlation_id"]
        assert k.api_key == snake(want["api_key"])
        assert k.api_version == want["api_version"]
        if kind == REQUEST:
            assert k.client_id == want["client_id"]
            assert k.topic == want["topic_name"]
            assert not got.is_reply
        else:
            req = index[(REQUEST, want["correlation_id"])]
            assert k.topic == req.kafka.topic  # responses carry the request's topic
            if want["status_code"] == DEEPFLOW_UNDECODED:
                assert k.error_known and k.error_code == 0
            else:
                assert k.error_known and k.error_code == want["status_code"]
            if want["rrt"]:  # DeepFlow's rrt is in microseconds (0 = it timed the pair out)
                assert abs(got.latency_ns - want["rrt"] * 1000) < 1000
            assert got.is_reply


def test_kafka_fetch_perf_capture() -> None:
    """01-fetch-v12-perf has no .result: same exchange as -unknown without the injected error."""
    req, resp = all_events(CAPTURES / "kafka/01-fetch-v12-perf.pcap")
    assert req.to_dict() == {"type": "REQUEST", "kafka": {"api_version": 12, "api_key": "fetch", "correlation_id": 20}}
    assert req.kafka.client_id == "consumer-console-consumer-84107-1"
    assert resp.kafka.error_known and "error_code" not in resp.to_dict()["kafka"]


def test_kafka_fetch_v13_topic_ids_are_not_names() -> None:
    """Fetch v13+ names topics by UUID: topic stays empty (here the incremental fetch lists none)."""
    events = all_events(CAPTURES / "kafka/mixed-with-unsupported.pcap")
    fetch = [e for e in events if e.kafka.api_key == "fetch"]
    assert len(fetch) == 2 and all(e.kafka.topic == "" for e in fetch)


def test_kafka_hubble_shape() -> None:
    req, resp = all_events(CAPTURES / "kafka/00-produce-v2.pcap")
    assert req.to_dict() == {
        "type": "REQUEST", "kafka": {"api_version": 2, "api_key": "produce", "correlation_id": 1, "topic": "topic2"}}
    assert resp.to_dict() == {
        "type": "RESPONSE", "latency_ns": str(resp.latency_ns),
        "kafka": {"api_version": 2, "api_key": "produce", "correlation_id": 1, "topic": "topic2"}}
    err = all_events(CAPTURES / "kafka/11-join-group-v7.pcap")[1]
    assert err.to_dict()["kafka"]["error_code"] == -1
