"""The dashboard's pure parts: map aggregation (nodes, edges, verdict classes, bytes, L7 stats, live
deltas), drops/policy counts, and the filter bar's `flowscope observe` parsing."""

from __future__ import annotations

import pytest

from api.dashboard import BadRequest, parse_filter, resolve_range, view_key, with_verdicts
from api.dashboard_model import (
    ByteCounter,
    DropsAggregator,
    MapAggregator,
    _bucket,
    l7_error,
    node_ref,
    quantile,
)
from flowscope import schema
from flowscope.observe import ObserveUsageError, query_from_argv
from tests.dashboard_scenario import EXPECTED_EDGES, legacy_flows, scenario_flows

T0 = 1_800_000_000_000_000_000


def agg_of(flows, **kw) -> MapAggregator:
    a = MapAggregator(**kw)
    a.add_many((f, f.time_ns) for f in flows)
    return a


def test_map_has_the_scenario_edges_with_their_verdict_classes():
    a = agg_of(scenario_flows(T0, 20))
    got = {}
    for e in a.snapshot()["edges"]:
        classes = [c for c, n in e["classes"].items() if n]
        assert len(classes) == 1, e
        got[(e["source"], e["target"])] = classes[0]
    assert got == EXPECTED_EDGES
    nodes = {n["id"]: n for n in a.snapshot()["nodes"]}
    assert nodes["world"]["kind"] == "world" and nodes["host"]["kind"] == "host"
    assert nodes["shop/frontend"]["namespace"] == "shop" and nodes["shop/frontend"]["num_pods"] == 2
    assert nodes["data/db"]["drops"] == 20


def test_replies_count_on_the_request_edge_and_l7_stats():
    a = agg_of(scenario_flows(T0, 40))
    e = a.edges[("shop/frontend", "shop/api")]
    assert ("shop/api", "shop/frontend") not in a.edges  # the HTTP responses are replies
    j = e.to_json(a.span_s())
    l7 = j["l7"]
    assert l7["requests"] == 40 and l7["errors"] == 2  # i % 20 == 0 -> 503
    assert l7["error_rate"] == pytest.approx(0.05)
    # latencies are 4..12 ms: p50 near the middle, p95 near the top (histogram resolution ~6 %)
    assert 6.5 <= l7["p50_ms"] <= 9.5 and 10.5 <= l7["p95_ms"] <= 13.5
    assert l7["request_rate"] == pytest.approx(40 / 39, rel=0.05)
    assert ("TCP/8080", 80) in [tuple(p) for p in j["ports"]]


def test_policies_on_edges():
    a = agg_of(scenario_flows(T0, 5))
    assert a.edges[("shop/batch", "data/db")].denied_by == {"data/data-allow": 5}
    assert a.edges[("shop/batch", "data/db")].drop_reasons == {"POLICY_DENIED": 5}
    assert a.edges[("shop/api", "data/db")].allowed_by == {"data/data-allow": 5}
    assert a.edges[("shop/batch", "shop/api")].denied_by == {"shop/api-audit": 5}


def test_byte_counter_counts_connection_growth_once():
    b = ByteCounter(max_entries=2)
    k = ("TCP", "a", 1, "b", 2)
    assert b.delta(k, 100) == 100
    assert b.delta(k, 100) == 0  # the other end of the same connection reports the same total
    assert b.delta(k, 250) == 150
    assert b.delta(k, 200) == 0  # an older total never subtracts
    b.delta(("x",), 1)
    b.delta(("y",), 1)  # evicts k (bounded)
    assert b.delta(k, 300) == 300


def test_histogram_quantiles():
    hist: dict[int, int] = {}
    for ms in range(1, 101):
        b = _bucket(ms * 1_000_000)
        hist[b] = hist.get(b, 0) + 1
    assert quantile(hist, 0.5) == pytest.approx(50e6, rel=0.07)
    assert quantile(hist, 0.95) == pytest.approx(95e6, rel=0.07)
    assert quantile({}, 0.5) is None


def test_node_identity_rules():
    w = node_ref(schema.Endpoint(namespace="ns", pod_name="web-1", labels=["k8s:app=web"]), "10.0.0.1")
    assert (w.key, w.kind, w.from_args) == ("ns/web", "workload", ["--from-namespace", "ns", "--from-label", "app=web"])
    wl = node_ref(schema.Endpoint(namespace="ns", pod_name="x-1", workloads=[schema.Workload(name="x", kind="Deployment")]), "")
    assert wl.key == "ns/x" and "--to-workload" in wl.to_args
    p = node_ref(schema.Endpoint(namespace="ns", pod_name="solo"), "")
    assert (p.key, p.kind, p.to_args) == ("ns/solo", "pod", ["--to-pod", "ns/solo"])
    assert node_ref(schema.Endpoint(identity=2, labels=["reserved:world"]), "1.1.1.1").key == "world"
    assert node_ref(schema.Endpoint(identity=1), "10.0.0.1").key == "host"
    assert node_ref(None, "8.8.8.8").key == "world"  # a public address nobody claimed
    assert node_ref(None, "10.9.9.9").key == "ip:10.9.9.9"
    assert node_ref(schema.Endpoint(identity=6), "").name == "remote-node"


def test_every_node_selector_is_valid_observe_syntax():
    a = agg_of(scenario_flows(T0, 2))
    for n in a.snapshot()["nodes"]:
        for args in (n["from_args"], n["to_args"]):
            q = query_from_argv(args)
            assert q.whitelist, n["id"]


def test_l7_errors():
    assert l7_error(schema.Layer7(http=schema.HTTP(code=503)))
    assert not l7_error(schema.Layer7(http=schema.HTTP(code=404)))
    assert l7_error(schema.Layer7(http=schema.HTTP(code=200, headers=[schema.HTTPHeader(key="grpc-status", value="5")])))
    assert l7_error(schema.Layer7(kafka=schema.Kafka(error_code=3)))
    assert l7_error(schema.Layer7(dns=schema.DNS(rcode=3)))


def test_live_deltas_and_versions():
    a = MapAggregator(windowed=True, window_s=10)
    a.add_many((f, f.time_ns) for f in scenario_flows(T0, 3))
    v = a.version
    changes, upto = a.changes_since(v)
    assert upto == v and not changes["edges"] and not changes["nodes"]
    a.add_many((f, f.time_ns) for f in legacy_flows(T0, 2))
    changes, upto = a.changes_since(v)
    assert upto == a.version
    assert [e["id"] for e in changes["edges"]] == ["shop/legacy->data/db"]
    assert {n["id"] for n in changes["nodes"]} == {"shop/legacy", "data/db"}
    assert [p["id"] for p in changes["pods"]] == ["shop/legacy-0", "data/db-0"]
    # the recent window moves: active edges are re-sent with their new rates
    v2 = a.version
    a.rotate()
    a.rotate()
    ids = {e["id"] for e in a.changes_since(v2)[0]["edges"]}
    assert "shop/legacy->data/db" in ids


def test_limits_evict_least_recent_and_report_removals():
    a = MapAggregator(max_edges=3)
    flows = scenario_flows(T0, 1)
    a.add_many((f, f.time_ns) for f in flows)
    assert len(a.edges) == 3
    changes, _ = a.changes_since(0)
    assert len(changes["removed"]) == len(EXPECTED_EDGES) - 3
    assert a.can_diff_from(0)


def test_changes_limit_advances_monotonically():
    a = agg_of(scenario_flows(T0, 1))
    first, upto = a.changes_since(0, limit=2)
    assert len(first["edges"]) == 2 and upto < a.version
    rest, upto2 = a.changes_since(upto, limit=100)
    ids = {e["id"] for e in first["edges"]} | {e["id"] for e in rest["edges"]}
    assert len(ids) == len(EXPECTED_EDGES) and upto2 == a.version


def test_drops_by_reason_and_policy_over_time():
    flows = scenario_flows(T0, 10)
    d = DropsAggregator(T0, T0 + 10 * 10**9, buckets=5)
    for f in flows:
        d.add(f, f.time_ns)
    j = d.to_json()
    assert j["drops"] == 10 and j["audits"] == 10
    assert j["by_reason"] == {"POLICY_DENIED": [2, 2, 2, 2, 2]}
    assert j["by_policy"] == {"data/data-allow": [2, 2, 2, 2, 2]}
    pol = {p["ref"]: p for p in j["policies"]}
    assert pol["data/data-allow"]["dropped"] == 10 and pol["data/data-allow"]["forwarded"] == 20
    assert pol["shop/api-audit"]["audit"] == 10


def test_filter_bar_means_what_the_cli_means():
    q = parse_filter("--to-pod default/api --verdict DROPPED")
    assert [(f.destination_pod, f.verdict) for f in q.whitelist] == [(["default/api"], ["DROPPED"])]
    assert parse_filter("flowscope observe --to-pod default/api --verdict DROPPED") == q
    assert parse_filter("hubble observe --not --protocol icmpv6").blacklist[0].protocol == ["icmpv6"]
    assert parse_filter("") == query_from_argv([])
    assert parse_filter("--since 1h").since == "1h"
    with pytest.raises(BadRequest, match="invalid --verdict value: NOPE"):
        parse_filter("--verdict NOPE")
    with pytest.raises(BadRequest, match="No such option"):
        parse_filter("--bogus 1")
    with pytest.raises(BadRequest, match="cannot split"):
        parse_filter("--to-pod 'unterminated")
    with pytest.raises(ObserveUsageError):
        query_from_argv(["--help"])
    assert view_key(parse_filter("--verdict DROPPED --since 1h")) == view_key(parse_filter("--verdict DROPPED"))


def test_ranges_and_verdict_narrowing():
    now = T0
    q = parse_filter("--verdict FORWARDED")
    assert with_verdicts(q, ["DROPPED"]) is None
    q2 = with_verdicts(parse_filter("--to-pod data/"), ["DROPPED", "AUDIT"])
    assert q2.whitelist[0].verdict == ["DROPPED", "AUDIT"] and q2.whitelist[0].destination_pod == ["data/"]
    assert resolve_range(parse_filter(""), "1h", None, "15m", now) == (now - 3600 * 10**9, now)
    assert resolve_range(parse_filter("--since 2h"), None, None, "15m", now)[0] == now - 7200 * 10**9
    with pytest.raises(BadRequest, match="after"):
        resolve_range(parse_filter(""), "1m", "1h", "15m", now)
    with pytest.raises(BadRequest, match="invalid time"):
        resolve_range(parse_filter(""), "yesterday-ish", None, "15m", now)


def test_multicast_and_unknown_direction_replies():
    from tests.dashboard_scenario import _ep, _flow, _tcp

    nd = _flow(T0, _ep("api-5d4"), schema.Endpoint(identity=2, labels=["reserved:world"]), "fe80::1", "ff02::2",
               schema.Layer4(ICMPv6=schema.ICMPv6(type=133)))
    # a reply seen mid-stream (is_reply unknown): db:5432 -> api:45000 belongs on api -> db
    mid = _flow(T0, _ep("db-0"), _ep("api-5d4"), "10.2.0.10", "10.1.0.20", _tcp(5432, 45000, ACK=True))
    a = agg_of([nd, mid])
    assert set(a.edges) == {("shop/api", "multicast"), ("shop/api", "data/db")}
    assert a.edges[("shop/api", "data/db")].ports == {"TCP/5432": 1}
    n = a.nodes["multicast"].to_json()
    assert n["kind"] == "multicast" and query_from_argv(n["to_args"]).whitelist
