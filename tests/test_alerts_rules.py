"""Alert rules, the evaluator and the webhook bodies: pure logic, no I/O (a fake clock is passed in)."""

from __future__ import annotations

import random

import orjson
import pytest

from api.alerts import delivery, payload
from api.alerts.engine import FIRING, RESOLVED, RuleEvaluator, workload_of
from api.alerts.rules import RuleError, load_rules, parse_rule
from flowscope import schema

S = 1_000_000_000
T0 = 1_700_000_000 * S

RULE = """
name: api-drops
filter: {verdict: [DROPPED], to_label: ["app=api"]}
condition: {count_over: 10, window: 1m}
for: 0s
severity: warning
webhook: {url: "https://hooks.example.org/flowscope", secret: "s3cr3t", headers: {X-Team: net}}
"""


def flow(t_ns=T0, *, verdict="DROPPED", src_ns="a", src_app="client", dst_ns="b", dst_app="api", port=80,
         code=None, latency_ms=None, kafka_error=None, pod_suffix=""):
    d = {"time": schema.format_timestamp(t_ns), "verdict": verdict,
         "IP": {"source": "10.0.0.1", "destination": "10.0.0.2", "ipVersion": "IPv4"},
         "l4": {"TCP": {"source_port": 40000, "destination_port": port}},
         "source": {"namespace": src_ns, "pod_name": f"{src_app}-0{pod_suffix}", "labels": [f"k8s:app={src_app}"]},
         "destination": {"namespace": dst_ns, "pod_name": f"{dst_app}-0", "labels": [f"k8s:app={dst_app}"]},
         "Type": "L3_L4", "node_name": "n1"}
    if code is not None or latency_ms is not None:
        d["Type"] = "L7"
        d["l7"] = {"type": "RESPONSE", "latency_ns": str(int((latency_ms or 0) * 1e6)),
                   "http": {"code": code or 200, "method": "GET", "url": "http://api/x", "protocol": "HTTP/1.1"}}
    if kafka_error is not None:
        d["Type"] = "L7"
        d["l7"] = {"type": "RESPONSE", "kafka": {"error_code": kafka_error, "api_key": "produce", "topic": "t"}}
    return schema.load_flow(d)


# --------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------


def test_issue_example_parses_and_round_trips():
    [r] = load_rules(RULE)
    assert r.name == "api-drops" and r.condition.kind == "count" and r.condition.threshold == 10
    assert r.condition.window_ns == 60 * S and r.for_ns == 0
    assert r.webhook.secret == "s3cr3t" and dict(r.webhook.headers) == {"X-Team": "net"}
    doc = r.to_doc()
    assert parse_rule(doc) == r
    assert r.to_doc(redact=True)["webhook"]["secret"] == "<redacted>"
    fs = r.filterset()
    assert fs.match(flow()) and not fs.match(flow(verdict="FORWARDED")) and not fs.match(flow(dst_app="db"))


def test_every_condition_kind_parses():
    rules = load_rules("""
name: r1
condition: {ratio_over: 0.05, of: {http_status: ["5+"]}, window: 5m}
---
name: r2
condition: {p95_latency_ms_over: 250, window: 5m}
---
name: r3
condition: {new_edge: true}
---
rules:
- {name: r4, condition: {kafka_errors_over: 0, error_codes: [3]}}
- {name: r5, filter: {to_label: ["reserved:world"], to_port: [443]}, condition: {count_over: 0}}
""")
    assert [r.condition.kind for r in rules] == ["ratio", "quantile", "new_edge", "kafka_errors", "count"]
    assert rules[1].condition.quantile == 0.95
    for r in rules:
        assert parse_rule(r.to_doc()) == r


@pytest.mark.parametrize("text, message", [
    ("name: x\ncondition: {count_over: 10, window: 1m}\nfilter: {to_lable: [a=b]}\n", "unknown filter 'to_lable'"),
    ("name: x\ncondition: {count_over: 10, window: 1x}\n", "condition.window: invalid duration '1x'"),
    ("name: x\ncondition: {count_over: -1}\n", "condition.count_over: must be at least 0"),
    ("name: x\ncondition: {count_over: 1, ratio_over: 0.1}\n", "several conditions"),
    ("name: x\ncondition: {ratio_over: 0.1}\n", "condition.of: ratio_over needs"),
    ("name: x\ncondition: {ratio_over: 1.5, of: {verdict: [DROPPED]}}\n", "between 0 and 1"),
    ("name: x\ncondition: {count_over: 1}\nseverity: loud\n", "severity: 'loud' is not one of"),
    ("name: x\ncondition: {count_over: 1}\nwebhook: {url: 'ftp://h/x'}\n", "webhook.url: 'ftp://h/x' is not"),
    ("name: x\ncondition: {count_over: 1}\nwebhook: {url: 'http://h/', headers: {X-Flowscope-Signature: a}}\n",
     "cannot be overridden"),
    ("name: x\ncondition: {count_over: 1}\nfilter: {verdict: [DROPED]}\n", "invalid --verdict value: DROPED"),
    ("name: x\ncondition: {count_over: 1}\ngroup_by: [pod]\n", "group_by: unknown field 'pod'"),
    ("name: x\ncondition: {count_over: 1}\nfor: soon\n", "for: invalid duration"),
    ("name: x\ncondition: {count_over: 1}\nwindow: 1m\n", "unknown field 'window'"),
    ("name: 'bad name'\ncondition: {count_over: 1}\n", "name: required"),
    ("name: x\n", "condition: required"),
    ("name: x\ncondition: {count_over: 1\n", "not valid YAML/JSON at line"),
    ("- {name: x, condition: {count_over: 1}}\n- {name: x, condition: {count_over: 2}}\n", "appears twice"),
    ("", "no rule found"),
])
def test_malformed_rules_are_rejected_with_a_clear_message(text, message):
    with pytest.raises(RuleError) as e:
        load_rules(text)
    assert message in str(e.value)
    if "name: x" in text and "YAML" not in message:
        assert str(e.value).startswith("rule x:")


# --------------------------------------------------------------------------------------------
# The evaluator
# --------------------------------------------------------------------------------------------


def ev_for(text: str) -> RuleEvaluator:
    return RuleEvaluator(load_rules(text)[0])


def test_a_storm_fires_once_and_resolves_when_the_window_clears():
    ev = ev_for(RULE)
    for i in range(500):
        ev.offer(flow(T0 + i * 10_000_000), T0 + i * 10_000_000, T0 + 5 * S)
        ev.offer(flow(T0, verdict="FORWARDED"), T0, T0 + 5 * S)  # filtered out
    notes = []
    for t in range(5, 70):
        notes += ev.evaluate(T0 + t * S)
    assert [n.state for n in notes] == [FIRING, RESOLVED]
    firing, resolved = notes
    assert firing.value == 500 and firing.stats["flows"] == 500 and len(firing.samples) == 5
    assert resolved.ended_ns > firing.started_ns and resolved.key != firing.key
    assert ev.groups == {}  # nothing left once inactive and empty


def test_threshold_is_strictly_greater():
    ev = ev_for(RULE)
    for i in range(10):
        ev.offer(flow(T0), T0, T0)
    assert ev.evaluate(T0 + S) == []
    ev.offer(flow(T0), T0, T0)
    assert [n.state for n in ev.evaluate(T0 + S)] == [FIRING]


def test_for_keeps_the_alert_pending_first():
    ev = ev_for(RULE.replace("for: 0s", "for: 10s"))
    for t in range(0, 30):
        for _ in range(20):
            ev.offer(flow(T0 + t * S), T0 + t * S, T0 + t * S)
        notes = ev.evaluate(T0 + t * S)
        if t < 10:
            assert notes == [] and ev.groups[""].state == "pending"
        elif t == 10:
            assert [n.state for n in notes] == [FIRING]
        else:
            assert notes == []


def test_pending_that_clears_never_notifies():
    ev = ev_for(RULE.replace("for: 0s", "for: 2m"))
    for _ in range(20):
        ev.offer(flow(T0), T0, T0)
    assert ev.evaluate(T0) == [] and ev.groups[""].state == "pending"
    assert ev.evaluate(T0 + 2 * 60 * S) == [] and ev.groups == {}


def test_repeat_interval_resends_while_firing():
    ev = ev_for(RULE.replace("for: 0s", "repeat_interval: 10s"))
    notes = []
    for t in range(0, 35):
        for _ in range(20):
            ev.offer(flow(T0 + t * S), T0 + t * S, T0 + t * S)
        notes += ev.evaluate(T0 + t * S)
    assert [(n.state, n.repeat) for n in notes] == [(FIRING, 0), (FIRING, 1), (FIRING, 2), (FIRING, 3)]
    assert len({n.key for n in notes}) == 4


def test_group_by_makes_one_alert_per_group_and_is_bounded():
    ev = ev_for(RULE + "group_by: [source_namespace]\nmax_groups: 3\n")
    for ns in ("a", "b", "c", "d", "e"):
        for _ in range(11):
            ev.offer(flow(T0, src_ns=ns), T0, T0)
    notes = ev.evaluate(T0 + S)
    assert sorted(n.group for n in notes) == ["__overflow__", "source_namespace=a", "source_namespace=b",
                                              "source_namespace=c"]
    assert next(n for n in notes if n.group == "source_namespace=a").group_labels == {"source_namespace": "a"}


def test_ratio_of_http_5xx():
    ev = ev_for("name: r\ncondition: {ratio_over: 0.2, of: {http_status: ['5+']}, window: 1m, min_count: 10}\n"
                "filter: {protocol: [http]}\n")
    for i in range(8):
        ev.offer(flow(T0, verdict="FORWARDED", code=500), T0, T0)
    assert ev.evaluate(T0) == []  # 8 < min_count
    for i in range(32):
        ev.offer(flow(T0, verdict="FORWARDED", code=200), T0, T0)
    assert ev.evaluate(T0) == []  # 8/40 = 0.2, not over
    ev.offer(flow(T0, verdict="FORWARDED", code=503), T0, T0)
    [n] = ev.evaluate(T0)
    assert n.state == FIRING and n.value == pytest.approx(9 / 41) and n.stats["matching_of"] == 9


def test_p95_latency():
    ev = ev_for("name: l\ncondition: {p95_latency_ms_over: 250, window: 1m}\n")
    for ms in range(1, 101):
        ev.offer(flow(T0, verdict="FORWARDED", latency_ms=ms), T0, T0)
    assert ev.evaluate(T0) == [] and ev.groups[""].value == 95
    for _ in range(10):
        ev.offer(flow(T0, verdict="FORWARDED", latency_ms=900), T0, T0)
    [n] = ev.evaluate(T0)
    assert n.value == 900


def test_kafka_error_codes():
    ev = ev_for("name: k\ncondition: {kafka_errors_over: 0, error_codes: [3], window: 1m}\n")
    ev.offer(flow(T0, verdict="FORWARDED", kafka_error=0), T0, T0)
    ev.offer(flow(T0, verdict="FORWARDED", kafka_error=6), T0, T0)
    assert ev.evaluate(T0) == []
    ev.offer(flow(T0, verdict="FORWARDED", kafka_error=3), T0, T0)
    [n] = ev.evaluate(T0)
    assert n.stats["errors"] == 1


def test_new_edge_fires_once_per_edge_and_resolves():
    ev = ev_for("name: e\ncondition: {new_edge: true, window: 30s}\n")
    for i in range(50):  # pods of one workload: one edge
        ev.offer(flow(T0, verdict="FORWARDED", pod_suffix=str(i)), T0, T0)
    ev.offer(flow(T0, verdict="FORWARDED", dst_app="db"), T0, T0)
    notes = ev.evaluate(T0 + S)
    assert sorted(n.group for n in notes) == ["a/client -> b/api", "a/client -> b/db"]
    assert notes[0].group_labels.keys() == {"source", "destination"}
    ev.offer(flow(T0 + 2 * S, verdict="FORWARDED"), T0 + 2 * S, T0 + 2 * S)  # known edge: nothing new
    assert ev.evaluate(T0 + 2 * S) == []
    assert [n.state for n in ev.evaluate(T0 + 40 * S)] == [RESOLVED, RESOLVED]
    _, _, edges = ev.take_dirty()
    assert sorted(e for e, _ in edges) == ["a/client -> b/api", "a/client -> b/db"]


def test_restore_keeps_a_firing_alert_without_resending():
    ev = ev_for(RULE)
    for _ in range(20):
        ev.offer(flow(T0), T0, T0)
    [n] = ev.evaluate(T0)
    rows, _, _ = ev.take_dirty()
    ev2 = ev_for(RULE)  # a restart: state from SQL, window from the stored flows
    ev2.restore(rows, [], T0 + 5 * S)
    for _ in range(20):
        ev2.offer(flow(T0), T0, T0 + 5 * S)
    assert ev2.evaluate(T0 + 5 * S) == []
    [r] = ev2.evaluate(T0 + 90 * S)
    assert r.state == RESOLVED and r.started_ns == n.started_ns


def test_late_and_future_flows():
    ev = ev_for(RULE)
    for _ in range(20):
        ev.offer(flow(T0 - 120 * S), T0 - 120 * S, T0)  # older than the window: ignored
    assert ev.evaluate(T0) == []
    for _ in range(20):
        ev.offer(flow(T0 + 3600 * S), T0 + 3600 * S, T0)  # clock skew: counted as now
    assert [n.state for n in ev.evaluate(T0)] == [FIRING]


def test_workload_names():
    f = flow()
    assert workload_of(f.source, "10.0.0.1") == "a/client"
    world = schema.Endpoint(labels=["reserved:world"])
    assert workload_of(world, "1.1.1.1") == "world"
    assert workload_of(None, "1.1.1.1") == "1.1.1.1"


# --------------------------------------------------------------------------------------------
# Bodies, signature, backoff
# --------------------------------------------------------------------------------------------


def _firing():
    ev = ev_for(RULE + "labels: {team: net}\n")
    for _ in range(20):
        ev.offer(flow(T0), T0, T0)
    [n] = ev.evaluate(T0)
    return ev.rule, n


def test_flowscope_body_and_signature():
    rule, n = _firing()
    body = payload.build_body(rule, n, "http://dash:8080/")
    doc = orjson.loads(body)
    assert doc["rule"] == "api-drops" and doc["state"] == "firing" and doc["severity"] == "warning"
    assert doc["window"]["flows"] == 20 and doc["window"]["duration"] == "1m"
    assert doc["labels"] == {"alertname": "api-drops", "severity": "warning", "team": "net"}
    assert len(doc["sample_flows"]) == 5 and doc["sample_flows"][0]["verdict"] == "DROPPED"
    assert doc["links"]["dashboard"].startswith("http://dash:8080/")
    assert "verdict=DROPPED" in doc["links"]["flows"]
    sig = payload.sign("s3cr3t", body)
    assert sig.startswith("sha256=") and payload.verify("s3cr3t", body, sig)
    assert not payload.verify("other", body, sig) and not payload.verify("s3cr3t", body + b" ", sig)
    assert payload.build_body(rule, n, "http://dash:8080/") == body  # fixed bytes: retries are identical


def test_alertmanager_and_slack_bodies():
    rule, n = _firing()
    am = orjson.loads(payload.build_body(rule, n, "http://d", "alertmanager"))
    assert am["version"] == "4" and am["status"] == "firing" and am["alerts"][0]["labels"]["alertname"] == "api-drops"
    assert am["alerts"][0]["endsAt"] == "0001-01-01T00:00:00Z"
    api = orjson.loads(payload.build_body(rule, n, "http://d", "alertmanager-api"))
    assert isinstance(api, list) and "endsAt" not in api[0] and api[0]["startsAt"].endswith("Z")
    slack = orjson.loads(payload.build_body(rule, n, "http://d", "slack"))
    assert "api-drops FIRING" in slack["text"] and slack["attachments"][0]["color"] == "warning"


def test_backoff_is_exponential_capped_and_jittered():
    rng = random.Random(1)
    waits = [delivery.backoff_s(i, 60, rng) for i in range(1, 12)]
    for i, w in enumerate(waits, 1):
        full = min(60, 2 ** (i - 1))
        assert full / 2 <= w <= full
    assert len({round(w, 6) for w in waits}) == len(waits)


def test_request_headers():
    h = delivery.request_headers({"url": "http://x", "secret": "k", "headers": {"X-Team": "net"}}, b"{}", "id1", "firing")
    assert h["X-Flowscope-Signature"] == payload.sign("k", b"{}") and h["X-Team"] == "net"
    assert h["X-Flowscope-Delivery"] == "id1" and h["X-Flowscope-Event"] == "firing"
    assert "X-Flowscope-Signature" not in delivery.request_headers({"url": "http://x"}, b"{}", "i", "firing")
