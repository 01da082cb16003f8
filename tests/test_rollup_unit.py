"""The flow rollup's pure logic (api.rollup): rows from flows, merging, the map and top talkers from rows."""

from __future__ import annotations

import msgspec
import pytest

from api import rollup
from api.dashboard_model import MapAggregator
from api.samples import sample_flows
from flowscope import schema

MIN = rollup.BUCKET_NS
T0 = 1_732_000_000 * 1_000_000_000 - (1_732_000_000 * 1_000_000_000) % MIN  # on a minute boundary
COL = {c: i for i, c in enumerate(rollup.ROLLUP_COLUMNS)}


def flow(t: int, *, src="a/web-1", dst="b/db-1", sport=40000, dport=5432, reply=False, verdict="FORWARDED",
         total_bytes=0, **extra) -> schema.Flow:
    sns, spod = src.split("/")
    dns, dpod = dst.split("/")
    doc = {"time": schema.format_timestamp(t), "verdict": verdict, "is_reply": reply,
           "IP": {"source": "10.0.0.1", "destination": "10.0.0.2", "ipVersion": "IPv4"},
           "l4": {"TCP": {"source_port": sport, "destination_port": dport}},
           "source": {"namespace": sns, "pod_name": spod, "identity": 100, "labels": [f"k8s:app={spod[:-2]}"]},
           "destination": {"namespace": dns, "pod_name": dpod, "identity": 200, "labels": [f"k8s:app={dpod[:-2]}"]}}
    if total_bytes:
        doc["flowscope"] = {"event": "update", "egress_bytes": str(total_bytes)}
    doc.update(extra)
    return msgspec.convert(doc, schema.Flow)


def rows_of(flows, builder=None):
    b = builder or rollup.RollupBuilder()
    rows, eps = b.add_batch((f, f.time_ns) for f in flows)
    return rows, eps


def test_one_row_per_key_with_counters_and_minute_buckets():
    flows = [flow(T0 + 1), flow(T0 + 2), flow(T0 + MIN + 5), flow(T0 + 3, dport=80)]
    rows, _ = rows_of(flows)
    assert len(rows) == 3
    by = {(r[COL["bucket_ns"]], r[COL["port"]]): r for r in rows}
    r = by[(T0, "TCP/5432")]
    assert (r[COL["src"]], r[COL["src_pod"]], r[COL["dst"]], r[COL["dst_pod"]]) == ("a/web", "a/web-1", "b/db", "b/db-1")
    assert (r[COL["flows"]], r[COL["first_ns"]], r[COL["last_ns"]]) == (2, T0 + 1, T0 + 2)
    assert (r[COL["src_ns"]], r[COL["dst_ns"]]) == ("a", "b")
    assert by[(T0 + MIN, "TCP/5432")][COL["flows"]] == 1
    assert by[(T0, "TCP/80")][COL["flows"]] == 1


def test_a_reply_counts_on_its_requests_edge_and_bytes_are_counter_deltas():
    b = rollup.RollupBuilder()
    req = flow(T0 + 1, total_bytes=100)
    rep = flow(T0 + 2, src="b/db-1", dst="a/web-1", sport=5432, dport=40000, reply=True, total_bytes=300)
    rep.IP = schema.IP(source="10.0.0.2", destination="10.0.0.1", ipVersion=schema.IPVersion.IPv4)
    rows, _ = rows_of([req, rep], b)
    assert len(rows) == 1 and rows[0][COL["flows"]] == 2
    assert rows[0][COL["src"]] == "a/web" and rows[0][COL["port"]] == "TCP/5432"
    assert rows[0][COL["bytes"]] == 300  # both ends share the connection's running total: 100, then 300
    again, _ = rows_of([flow(T0 + 3, total_bytes=350)], b)  # the next batch: +50 on the same connection
    assert again[0][COL["bytes"]] == 50


def test_drops_policies_and_l7_go_into_the_key():
    drop = flow(T0 + 1, verdict="DROPPED", drop_reason_desc="POLICY_DENIED",
                egress_denied_by=[{"name": "deny-db", "namespace": "a"}])
    ok = flow(T0 + 2, ingress_allowed_by=[{"name": "allow-web", "namespace": "b"}])
    resp = flow(T0 + 3, l7={"type": "RESPONSE", "latency_ns": "2000000", "http": {"code": 503, "method": "GET"}})
    rows, _ = rows_of([drop, ok, resp])
    keys = {(r[COL["verdict"]], r[COL["drop_reason"]], r[COL["policy"]], r[COL["l7"]]): r for r in rows}
    assert ("DROPPED", "POLICY_DENIED", "a/deny-db", "") in keys
    assert ("FORWARDED", "", "b/allow-web", "") in keys
    r = keys[("FORWARDED", "", "", "http")]
    assert (r[COL["responses"]], r[COL["errors"]], r[COL["requests"]]) == (1, 1, 0)
    assert r[COL["latency"]] > 0


def test_endpoint_descriptions_only_when_new():
    b = rollup.RollupBuilder()
    _, eps = rows_of([flow(T0 + 1)], b)
    keys = {e[0] for e in eps}
    assert keys == {"a/web", "b/db", "pod:a/web-1", "pod:b/db-1"}
    pod = next(e for e in eps if e[0] == "pod:a/web-1")
    assert pod[1] == "pod" and pod[4] == "a/web" and pod[9] == '["10.0.0.1"]'
    _, eps2 = rows_of([flow(T0 + 2)], b)
    assert eps2 == []
    _, eps3 = rows_of([flow(T0 + 3, src="a/web-2")], b)
    assert {e[0] for e in eps3} == {"pod:a/web-2"}


def test_merge_rows_sums_equal_keys():
    a, _ = rows_of([flow(T0 + 5), flow(T0 + 9)])
    b, _ = rows_of([flow(T0 + 1)])
    c, _ = rows_of([flow(T0 + 2, dport=80)])
    merged = rollup.merge_rows(a, b, c)
    assert len(merged) == 2
    m = next(r for r in merged if r[COL["port"]] == "TCP/5432")
    assert (m[COL["flows"]], m[COL["first_ns"]], m[COL["last_ns"]]) == (3, T0 + 1, T0 + 9)


def group(rows):
    """What read_groups does in SQL: sum over buckets per key."""
    out: dict = {}
    for r in rows:
        k = tuple(r[1:len(rollup.KEY_COLUMNS)])
        v = out.get(k)
        vals = list(r[len(rollup.KEY_COLUMNS):])
        if v is None:
            out[k] = vals
        else:
            for i in range(2, 7):
                v[i] += vals[i]
            v[7], v[8] = min(v[7], vals[7]), max(v[8], vals[8])
    return [k + tuple(v) for k, v in out.items()]


def test_map_from_rows_matches_the_dashboards_aggregation_of_the_flows():
    flows = sample_flows(2000, seed=5, start_ns=T0, step_ns=50_000_000)  # 100 s: two buckets
    rows, eps = rows_of(flows)
    endpoints = {e[0]: tuple(e) for e in eps}
    since, until = T0, T0 + 2 * MIN
    got = rollup.build_map(group(rows), endpoints, since, until)
    agg = MapAggregator()
    agg.add_many((f, f.time_ns) for f in flows)
    want = agg.snapshot((until - since) / 1e9)
    assert got["flows"] == want["flows"] == 2000
    assert (got["first_ns"], got["last_ns"]) == (want["first_ns"], want["last_ns"])

    def edges(m):
        return {e["id"]: e for e in m["edges"]}

    ge, we = edges(got), edges(want)
    assert ge.keys() == we.keys()
    for k, w in we.items():
        g = ge[k]
        for field in ("flows", "verdicts", "classes", "bytes", "drop_reasons", "denied_by", "allowed_by",
                      "first_ns", "last_ns", "flow_rate", "other_ports", "l7"):
            assert g.get(field) == w.get(field), (k, field)
        assert sorted(map(tuple, g["ports"])) == sorted(map(tuple, w["ports"]))
    gn, wn = {n["id"]: n for n in got["nodes"]}, {n["id"]: n for n in want["nodes"]}
    assert gn.keys() == wn.keys()
    for k, w in wn.items():
        for field in ("kind", "namespace", "name", "flows_out", "flows_in", "drops", "pods", "num_pods", "labels",
                      "identity", "last_ns", "from_args", "to_args"):
            assert gn[k][field] == w[field], (k, field)
    gp, wp = {p["id"]: p for p in got["pods"]}, {p["id"]: p for p in want["pods"]}
    assert gp == wp


def test_map_ports_keep_the_busiest_twelve():
    flows = [flow(T0 + i, dport=1000 + i % 14) for i in range(14)] + [flow(T0 + 100 + i, dport=1000) for i in range(5)]
    rows, eps = rows_of(flows)
    m = rollup.build_map(group(rows), {e[0]: tuple(e) for e in eps}, T0, T0 + MIN)
    e = m["edges"][0]
    assert tuple(e["ports"][0]) == ("TCP/1000", 6)
    assert len(e["ports"]) == 12 and e["other_ports"] == 2


def test_top_talkers_ranking_and_limit():
    rows = [("a", "b", 5, 10, 0, 1, 2), ("c", "d", 9, 1, 1, 1, 2), ("e", "f", 5, 99, 0, 1, 2)]
    got = rollup.top_talkers(rows, 2)
    assert [(g["source"], g["flows"], g["bytes"]) for g in got] == [("c", 9, 1), ("e", 5, 99)]


@pytest.mark.parametrize("since,until,lo,hi", [
    (T0, T0 + MIN, T0, T0 + 2 * MIN),
    (T0 + 5, T0 + MIN - 1, T0, T0 + MIN),
    (T0 + MIN + 1, T0 + 3 * MIN + 7, T0 + MIN, T0 + 4 * MIN),
])
def test_rollup_window_covers_whole_minutes(since, until, lo, hi):
    assert rollup.rollup_window(since, until) == (lo, hi)
