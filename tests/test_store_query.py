"""FlowStore on real SQLite files: batched ingest, Hubble query semantics, SQL pushdown vs FilterSet."""

from __future__ import annotations

import msgspec
import pytest

from api import db, migrate
from api.pushdown import narrow, narrowing_exact
from api.samples import sample_flows
from api.store import FlowStore, format_time, prepare_batch, time_ns_of
from flowscope import schema
from flowscope.filters import FilterSet, FlowFilter
from flowscope.query import FlowQuery

T0 = 1_732_000_000_123_456_789  # not on a second boundary: exercises the fraction formats
STEP = 1_000_000


@pytest.fixture
def store(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path}/flows.db")
    migrate.upgrade(engine)
    yield FlowStore(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def flows():
    return sample_flows(3000, seed=11, start_ns=T0, step_ns=STEP)


@pytest.fixture
def filled(store, flows):
    for i in range(0, len(flows), 500):
        # Copies: ingest may fill node_name/time, and the module's flows are shared.
        assert store.insert_batch([msgspec.structs.replace(f) for f in flows[i:i + 500]]) == 500
    return store


def resolve(**kw):
    return FlowQuery(**kw).resolve(now_ns=T0 + 10_000 * STEP)


def bodies(store, **kw):
    return [b for b, _, _ in store.query(resolve(**kw))]


def test_time_helpers():
    for ns in (0, T0, T0 - T0 % 1_000_000_000, 1_700_000_000_120_000_000, 1_700_000_000_000_001_000):
        assert format_time(ns) == schema.format_timestamp(ns)
        assert time_ns_of(schema.format_timestamp(ns)) == ns
    assert time_ns_of("2024-01-01T00:00:00+01:00") == schema.parse_timestamp("2024-01-01T00:00:00+01:00")


def test_rows_extracted_from_the_flow():
    f = schema.load_flow(
        b'{"time":"2024-11-27T06:10:01.5Z","verdict":"DROPPED","IP":{"source":"FD00:0::1","destination":"fd00::2",'
        b'"ipVersion":"IPv6"},"l4":{"UDP":{"source_port":5353,"destination_port":53}},'
        b'"source":{"identity":7,"namespace":"a","pod_name":"p-1"},"destination":{"identity":2},'
        b'"Type":"L7","node_name":"n1","l7":{"type":"REQUEST","dns":{"query":"x."}},'
        b'"traffic_direction":"EGRESS","drop_reason_desc":"POLICY_DENIED","is_reply":false,'
        b'"flowscope":{"event":"drop"}}')
    batch = prepare_batch([f], node_name="other")
    row = dict(zip(("id", "time_ns", "node_name", "verdict", "type", "traffic_direction", "is_reply", "ip_version",
                    "src_ip", "dst_ip", "src_port", "dst_port", "protocol", "l7_protocol", "l7_type",
                    "src_namespace", "src_pod", "dst_namespace", "dst_pod", "src_identity", "dst_identity",
                    "drop_reason", "http_code", "flow_event", "uuid", "body"), batch.rows[0]))
    assert row["time_ns"] == schema.parse_timestamp("2024-11-27T06:10:01.5Z")
    assert row["node_name"] == "n1"  # the flow's own node name wins over the batch's
    assert (row["verdict"], row["type"], row["traffic_direction"], row["is_reply"]) == ("DROPPED", "L7", "EGRESS", False)
    assert (row["ip_version"], row["src_ip"], row["dst_ip"]) == (6, "fd00::1", "fd00::2")  # canonical IPv6
    assert (row["protocol"], row["src_port"], row["dst_port"], row["l7_protocol"], row["l7_type"]) == (
        "udp", 5353, 53, "dns", "REQUEST")
    assert (row["src_namespace"], row["src_pod"], row["src_identity"], row["dst_identity"]) == ("a", "p-1", 7, 2)
    assert (row["drop_reason"], row["flow_event"], row["http_code"]) == ("POLICY_DENIED", "drop", None)
    assert row["body"] == schema.flow_to_json(f)
    assert batch.nodes == {"n1": "", "other": ""}


def test_missing_node_name_and_time_are_filled():
    f = schema.Flow(verdict=schema.Verdict.FORWARDED)
    batch = prepare_batch([f], node_name="node-x", now_ns=T0)
    assert f.node_name == "node-x" and f.time == schema.format_timestamp(T0)
    assert batch.rows[0][1] == T0
    assert schema.load_flow(batch.rows[0][-1]).node_name == "node-x"


def test_last_and_first(filled, flows):
    canon = [schema.flow_to_json(f) for f in flows]
    assert bodies(filled) == canon[-20:]  # Hubble's default: the last 20, oldest first
    assert bodies(filled, number=5) == canon[-5:]
    assert bodies(filled, number=5, first=True) == canon[:5]
    assert bodies(filled, number=5000) == canon
    assert bodies(filled, number=1000, first=True) == canon[:1000]  # several chunks


def test_since_until(filled, flows):
    canon = [schema.flow_to_json(f) for f in flows]
    since = schema.format_timestamp(T0 + 100 * STEP)
    until = schema.format_timestamp(T0 + 199 * STEP)
    assert bodies(filled, since=since, until=until) == canon[100:200]  # both bounds inclusive
    assert bodies(filled, since=since, until=until, number=10) == canon[190:200]
    assert bodies(filled, since=since, until=until, number=10, first=True) == canon[100:110]
    assert bodies(filled, since=schema.format_timestamp(T0 + 2990 * STEP)) == canon[2990:]
    assert bodies(filled, until=schema.format_timestamp(T0 - 1)) == []


def test_query_yields_envelope_parts(filled, flows):
    out = list(filled.query(resolve(number=3)))
    for (body, node, time_str), f in zip(out, flows[-3:]):
        assert body == schema.flow_to_json(f)
        assert node == f.node_name
        assert time_str == f.time
        assert schema.envelope_json(body, node, time_str) == schema.flow_envelope_json(f)


def test_max_id_cuts_history(filled):
    last = filled.last_id()
    assert last == 3000
    rows = list(filled.query_rows(resolve(number=10), max_id=last - 100))
    assert [r.id for r in rows] == list(range(last - 109, last - 99))


FILTERS = [
    {"verdict": ["DROPPED"]},
    {"verdict": ["FORWARDED"], "source_pod": ["shop/"]},
    {"source_pod": ["payments/api-"]},
    {"destination_pod": ["kube-system/coredns"]},
    {"source_pod": ["/cart"]},
    {"protocol": ["udp"]},
    {"protocol": ["icmp"]},
    {"protocol": ["http"]},
    {"protocol": ["tcp"], "destination_port": ["5432", "6379"]},
    {"destination_port": ["53"], "traffic_direction": ["INGRESS"]},
    {"http_status_code": ["5+"]},
    {"http_method": ["post"], "http_path": ["^/api/"]},
    {"dns_query": ["shop"]},
    {"source_ip": ["10.0.2.0/24"]},
    {"destination_ip": ["10.0.1.114"]},
    {"node_name": ["node-a"]},
    {"node_name": ["node-*"], "verdict": ["DROPPED"]},
    {"drop_reason_desc": ["POLICY_DENIED"]},
    {"source_identity": [1101, 1202]},
    {"source_label": ["k8s:app=frontend"]},
    {"tcp_flags": [{"SYN": True}]},
    {"reply": [False], "verdict": ["FORWARDED"]},
]


@pytest.mark.parametrize("flt", FILTERS, ids=[",".join(f) for f in FILTERS])
def test_sql_narrowing_agrees_with_filterset(filled, flows, flt):
    """Whatever SQL does (exact pushdown, partial narrowing, or none), the result equals FilterSet.match
    applied to every flow, for allowlists, denylists and both."""
    ff = msgspec.convert(flt, FlowFilter)
    other = FlowFilter(verdict=["DROPPED"])
    for wl, bl in (([ff], []), ([], [ff]), ([ff, other], []), ([ff], [other])):
        fs = FilterSet(wl, bl)
        want = [schema.flow_to_json(f) for f in flows if fs.match(f)]
        got = bodies(filled, whitelist=wl, blacklist=bl, number=10_000)
        assert got == want, (flt, wl, bl, len(got), len(want))
        if wl == [ff] and not bl:
            assert 0 < len(want) < len(flows), f"filter {flt} selects all or nothing: the test would prove little"


def test_or_of_indexed_filters_is_merged_from_per_index_scans(filled, flows):
    wl = [FlowFilter(source_pod=["payments/"]), FlowFilter(destination_pod=["payments/"]),
          FlowFilter(verdict=["DROPPED"])]
    nar = narrow(FilterSet(wl))
    assert nar.indexed and nar.exact and len(nar.alternatives) == 3
    assert not narrow(FilterSet([FlowFilter(source_pod=["/api"]), FlowFilter(verdict=["DROPPED"])])).indexed
    fs = FilterSet(wl)
    want = [schema.flow_to_json(f) for f in flows if fs.match(f)]
    assert bodies(filled, whitelist=wl, number=10_000) == want  # each row once, in time order
    assert bodies(filled, whitelist=wl, number=7) == want[-7:]
    assert bodies(filled, whitelist=wl, number=7, first=True) == want[:7]


def test_exact_pushdown_skips_python(filled):
    cond, exact = narrowing_exact(FilterSet([FlowFilter(verdict=["DROPPED"], source_pod=["shop/"])]))
    assert cond is not None and exact
    cond, exact = narrowing_exact(FilterSet([FlowFilter(verdict=["DROPPED"], http_status_code=["5+"])]))
    assert cond is not None and not exact  # status codes are checked in Python
    assert narrowing_exact(FilterSet([FlowFilter(verdict=["DROPPED"])], [FlowFilter(protocol=["udp"])]))[1] is False
    assert narrowing_exact(FilterSet()) == (None, True)


def test_ipv6_text_is_compared_canonically(store):
    f = schema.load_flow(b'{"time":"2024-01-01T00:00:00Z","IP":{"source":"FD00:0:0::1","destination":"fd00::2",'
                         b'"ipVersion":"IPv6"},"node_name":"n"}')
    store.insert_batch([f])
    got = bodies(store, whitelist=[FlowFilter(source_ip=["fd00::1"])], number=10)
    assert got == [schema.flow_to_json(f)]
    assert bodies(store, whitelist=[FlowFilter(source_ip=["fd00::3"])], number=10) == []


def test_sparse_matches_scan_back_in_chunks(store):
    """The newest 3 of 4 rare flows among thousands: found by scanning newest-first in growing chunks,
    returned oldest first."""
    flows = sample_flows(5000, seed=3, start_ns=T0, step_ns=STEP)
    rare = [flows[10], flows[20], flows[30], flows[4000]]
    for f in rare:
        f.source.labels.append("k8s:rare=yes")
    for i in range(0, 5000, 1000):
        store.insert_batch(flows[i:i + 1000])
    # A label selector cannot be pushed down: Python decides, row by row, chunk by chunk.
    wl = [FlowFilter(source_label=["rare=yes"])]
    assert narrowing_exact(FilterSet(wl)) == (None, False)
    assert bodies(store, whitelist=wl, number=3) == [schema.flow_to_json(f) for f in rare[1:]]
    assert bodies(store, whitelist=wl, number=3, first=True) == [schema.flow_to_json(f) for f in rare[:3]]


def test_lost_events_nodes_and_status(store, flows):
    lost = [schema.LostEvent(source=schema.LostEventSource.PERF_EVENT_RING_BUFFER, num_events_lost="7", cpu=1),
            schema.LostEvent(source=schema.LostEventSource.OBSERVER_EVENTS_QUEUE, num_events_lost=3)]
    batch = [msgspec.structs.replace(f) for f in flows[:100]]
    assert store.insert_batch(batch, lost, node_name="node-a", agent_version="1.2.3") == 100
    store.insert_batch([], [schema.LostEvent(source="PERF_EVENT_RING_BUFFER", num_events_lost="5")], node_name="node-a")
    store.record_lost("HUBBLE_RING_BUFFER", 2)
    st = store.status()
    assert st["num_flows"] == 100 and st["seen_flows"] == 100
    assert st["oldest_flow_time"] == flows[0].time and st["newest_flow_time"] == flows[99].time
    assert st["lost_events"] == {"PERF_EVENT_RING_BUFFER": 12, "OBSERVER_EVENTS_QUEUE": 3, "HUBBLE_RING_BUFFER": 2}
    assert st["db_size_bytes"] > 0
    nodes = {n["name"]: n for n in st["nodes"]}
    assert nodes["node-a"]["agent_version"] == "1.2.3"  # a batch without a version keeps the known one
    assert set(nodes) == {f.node_name for f in batch} | {"node-a"}
    # A new store on the same database counts what is there.
    again = FlowStore(store.engine)
    assert again.num_flows() == 100 and again.status()["seen_flows"] == 0


def test_a_batch_is_one_transaction(store, flows):
    """Batches coalesced into one insert get contiguous ids; a failing transaction stores nothing."""
    b1 = prepare_batch([msgspec.structs.replace(f) for f in flows[:10]])
    b2 = prepare_batch([msgspec.structs.replace(f) for f in flows[10:25]])
    assert store.insert_prepared([b1, b2]) == 25
    assert (b1.first_id, b2.first_id) == (1, 11)
    bad = prepare_batch([msgspec.structs.replace(f) for f in flows[25:30]])
    bad.rows[3][-1] = None  # body NOT NULL: the whole transaction must roll back
    with pytest.raises(Exception):
        store.insert_prepared([bad])
    assert store.num_flows() == 25
    assert len(bodies(store, number=100)) == 25
