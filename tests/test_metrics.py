"""Prometheus ``/metrics``: Hubble's metric names and labels, counters equal to the flows generated, label
cardinality bounded. The integration test goes through a real server process and parses the scrape with
prometheus_client's own parser."""

from __future__ import annotations

import time
from collections import Counter

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.metrics import FlowMetrics
from flowscope import schema

NOW = time.time_ns()


def base(i: int, **kw) -> dict:
    f = {"time": schema.format_timestamp(NOW + i), "verdict": "FORWARDED",
         "IP": {"source": "10.0.0.1", "destination": "10.0.0.2", "ipVersion": "IPv4"},
         "l4": {"TCP": {"source_port": 40000, "destination_port": 8080, "flags": {"SYN": True}}},
         "source": {"namespace": "a", "pod_name": "c-0"}, "destination": {"namespace": "b", "pod_name": "s-0"},
         "Type": "L3_L4", "traffic_direction": "EGRESS", "is_reply": False,
         "trace_observation_point": "FROM_ENDPOINT", "event_type": {"type": 4, "sub_type": 3}}
    f.update(kw)
    return f


def l7(i: int, typ: str, direction: str = "EGRESS", latency_ms: float = 0, **proto) -> dict:
    return base(i, Type="L7", traffic_direction=direction, is_reply=typ == "RESPONSE", event_type={"type": 129},
                l7={"type": typ, "latency_ns": str(int(latency_ms * 1e6)), **proto})


# What the generator makes, and so what the metrics must say.
N_SYN, N_SYNACK, N_DROP, N_PV_FWD, N_FIN6, N_RST6 = 40, 40, 15, 7, 5, 3
N_HTTP_REQ, N_HTTP_200, N_HTTP_503 = 12, 10, 2
N_KAFKA_OK, N_KAFKA_ERR, N_DNS_Q, N_DNS_R = 4, 2, 6, 6


def generate() -> list[dict]:
    out: list[dict] = []
    i = 0

    def add(f: dict) -> None:
        nonlocal i
        out.append(f)
        i += 1
    for _ in range(N_SYN):
        add(base(i, l4={"TCP": {"source_port": 40000 + i, "destination_port": 8080 if i % 2 else 443,
                                "flags": {"SYN": True}}}))
    for _ in range(N_SYNACK):
        add(base(i, is_reply=True, trace_observation_point="TO_ENDPOINT",
                 l4={"TCP": {"source_port": 8080, "destination_port": 40000 + i, "flags": {"SYN": True, "ACK": True}}}))
    for _ in range(N_DROP):  # a policy drop gives two records: the verdict and the drop
        add(base(i, verdict="DROPPED", drop_reason_desc="POLICY_DENIED", event_type={"type": 5, "sub_type": 0}))
        add(base(i, verdict="DROPPED", drop_reason_desc="POLICY_DENIED", event_type={"type": 1, "sub_type": 133}))
    for _ in range(N_PV_FWD):
        add(base(i, traffic_direction="INGRESS", policy_match_type=2, event_type={"type": 5, "sub_type": 0},
                 l4={"UDP": {"source_port": 5000, "destination_port": 53}}))
    ip6 = {"source": "fd00::1", "destination": "fd00::2", "ipVersion": "IPv6"}
    for _ in range(N_FIN6):
        add(base(i, IP=ip6, l4={"TCP": {"source_port": 1, "destination_port": 80, "flags": {"FIN": True, "ACK": True}}}))
    for _ in range(N_RST6):
        add(base(i, IP=ip6, is_reply=True, l4={"TCP": {"source_port": 80, "destination_port": 1, "flags": {"RST": True}}}))
    http = {"method": "GET", "url": "http://b/x", "protocol": "HTTP/1.1"}
    for _ in range(N_HTTP_REQ):
        add(l7(i, "REQUEST", http=http))
    for _ in range(N_HTTP_200):
        add(l7(i, "RESPONSE", latency_ms=20, http={**http, "code": 200}))
    for _ in range(N_HTTP_503):
        add(l7(i, "RESPONSE", latency_ms=700, http={**http, "code": 503}))
    for _ in range(N_KAFKA_OK):
        add(l7(i, "RESPONSE", "INGRESS", latency_ms=3, kafka={"error_code": 0, "api_key": "produce", "topic": "orders"}))
    for _ in range(N_KAFKA_ERR):
        add(l7(i, "RESPONSE", "INGRESS", latency_ms=3, kafka={"error_code": 3, "api_key": "produce", "topic": "orders"}))
    for _ in range(N_DNS_Q):
        add(l7(i, "REQUEST", dns={"query": "api.b.svc.", "qtypes": ["A"]}))
    for _ in range(N_DNS_R):
        add(l7(i, "RESPONSE", latency_ms=1, dns={"query": "api.b.svc.", "qtypes": ["A"], "rcode": 0, "ips": ["10.0.0.2"]}))
    return out


LOST = [("OBSERVER_EVENTS_QUEUE", 5), ("PERF_EVENT_RING_BUFFER", 3)]


def samples(text: str) -> dict[str, dict[tuple, float]]:
    """name -> {sorted label items: value} for every sample of the scrape."""
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def check(m: dict[str, dict[tuple, float]], copies: int = 1) -> None:
    def v(name: str, **labels) -> float:
        return m.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    c = copies
    n_l7 = N_HTTP_REQ + N_HTTP_200 + N_HTTP_503 + N_KAFKA_OK + N_KAFKA_ERR + N_DNS_Q + N_DNS_R
    total = N_SYN + N_SYNACK + 2 * N_DROP + N_PV_FWD + N_FIN6 + N_RST6 + n_l7
    assert sum(m["hubble_flows_processed_total"].values()) == c * total
    assert v("hubble_flows_processed_total", type="Trace", subtype="from-endpoint", verdict="FORWARDED") == \
        c * (N_SYN + N_FIN6 + N_RST6)
    assert v("hubble_flows_processed_total", type="Trace", subtype="to-endpoint", verdict="FORWARDED") == c * N_SYNACK
    assert v("hubble_flows_processed_total", type="Drop", subtype="", verdict="DROPPED") == c * N_DROP
    assert v("hubble_flows_processed_total", type="PolicyVerdict", subtype="", verdict="DROPPED") == c * N_DROP
    assert v("hubble_flows_processed_total", type="L7", subtype="HTTP", verdict="FORWARDED") == \
        c * (N_HTTP_REQ + N_HTTP_200 + N_HTTP_503)
    assert m["hubble_drop_total"] == {(("protocol", "TCP"), ("reason", "POLICY_DENIED")): c * N_DROP}
    assert v("hubble_tcp_flags_total", flag="SYN", family="IPv4") == c * (N_SYN + 2 * N_DROP + n_l7)  # L7 on SYN TCP
    assert v("hubble_tcp_flags_total", flag="SYN-ACK", family="IPv4") == c * N_SYNACK
    assert v("hubble_tcp_flags_total", flag="FIN", family="IPv6") == c * N_FIN6
    assert v("hubble_tcp_flags_total", flag="RST", family="IPv6") == c * N_RST6
    assert m["hubble_http_requests_total"] == {
        (("method", "GET"), ("protocol", "HTTP/1.1"), ("reporter", "client")): c * N_HTTP_REQ}
    assert v("hubble_http_responses_total", method="GET", protocol="HTTP/1.1", status="503", reporter="client") == \
        c * N_HTTP_503
    assert v("hubble_http_request_duration_seconds_count", method="GET", reporter="client") == \
        c * (N_HTTP_200 + N_HTTP_503)
    assert v("hubble_http_request_duration_seconds_bucket", method="GET", reporter="client", le="0.025") == \
        c * N_HTTP_200
    assert v("hubble_http_request_duration_seconds_sum", method="GET", reporter="client") == \
        pytest.approx(c * (N_HTTP_200 * 0.02 + N_HTTP_503 * 0.7))
    assert v("hubble_kafka_requests_total", topic="orders", api_key="produce", error_code="3", reporter="server") == \
        c * N_KAFKA_ERR
    assert v("hubble_kafka_request_duration_seconds_count", topic="orders", api_key="produce", reporter="server") == \
        c * (N_KAFKA_OK + N_KAFKA_ERR)
    assert m["hubble_dns_queries_total"] == {(("ips_returned", "false"), ("qtypes", "A"), ("rcode", "")): c * N_DNS_Q}
    assert m["hubble_dns_responses_total"] == {(("ips_returned", "true"), ("qtypes", "A"), ("rcode", "0")): c * N_DNS_R}
    assert m["hubble_policy_verdicts_total"] == {
        (("action", "dropped"), ("direction", "egress"), ("match", "none")): c * N_DROP,
        (("action", "forwarded"), ("direction", "ingress"), ("match", "l3-l4")): c * N_PV_FWD}
    ports = Counter()
    for i in range(N_SYN):
        ports[("TCP", "8080" if i % 2 else "443")] += 1
    ports[("TCP", "80")] += N_FIN6
    ports[("UDP", "53")] += N_PV_FWD
    assert {(dict(k)["protocol"], dict(k)["port"]): x for k, x in m["hubble_port_distribution_total"].items()} == \
        {k: c * x for k, x in ports.items()}
    for source, n in LOST:
        assert v("hubble_lost_events_total", source=source) == c * n


def test_flow_metrics_count_what_was_generated():
    fm = FlowMetrics()
    fm.observe_flows([schema.load_flow(f) for f in generate()], LOST)
    from prometheus_client import CollectorRegistry, generate_latest

    from api.metrics import ServerCollector

    reg = CollectorRegistry()
    reg.register(ServerCollector(fm))
    check(samples(generate_latest(reg).decode()))


def test_label_cardinality_is_bounded():
    fm = FlowMetrics(max_series=50)
    flows = [schema.load_flow(base(i, l4={"TCP": {"source_port": 1, "destination_port": 1000 + i}})) for i in range(500)]
    fm.observe_flows(flows)
    fams = {f.name: f for f in fm.families()}
    ports = fams["hubble_port_distribution"].samples
    assert len(ports) == 51  # 50 distinct + "other"
    assert sum(s.value for s in ports) == 500
    other = next(s for s in ports if s.labels["port"] == "other")
    assert other.value == 450 and other.labels["protocol"] == "other"
    assert fams["flowscope_metrics_overflow"].samples[0].value == 450


def test_metrics_endpoint_of_a_real_server(tmp_path):
    from alerts_helpers import Server

    flows = generate()
    with Server(tmp_path / "m.db") as s:
        for copy in range(2):
            body = {"node_name": "n1", "flows": flows, "lost_events": [
                {"source": src, "num_events_lost": str(n)} for src, n in LOST]}
            r = httpx.post(s.url + "/api/v1/flows", json=body, timeout=30)
            assert r.status_code == 200 and r.json()["accepted"] == len(flows)

        def scrape() -> dict:
            r = httpx.get(s.url + "/metrics", timeout=30)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
            return samples(r.text)
        s.wait(lambda: scrape()["flowscope_ingest_flows_total"][()] == 2 * len(flows), what="batches counted")
        m = scrape()
        check(m, copies=2)
        assert m["flowscope_storage_flows"][()] == 2 * len(flows)
        assert m["flowscope_storage_bytes"][()] > 0
        assert m["flowscope_ingest_batches_total"][()] == 2
        assert () in m["flowscope_ingest_queue_batches"] and () in m["flowscope_stream_subscribers"]
        assert m["flowscope_alert_rules"][()] == 0 and m["flowscope_alerts_firing"][()] == 0
