"""Hubble protobuf <-> Flowscope schema: lossless both ways, and protojson equal to Flowscope's JSON.

Pure tests (no server): realistic flows from api.samples, hand-built flows with every kind of record
(L7 HTTP/gRPC/Kafka/DNS, policy drops with the deciding policies, audit, IPv6, aggregates, Flowscope's
counters), hypothesis-generated flows, lost events, filters, field masks, request planning, auth.
"""

from __future__ import annotations

import base64
import json

import grpc
import msgspec
import pytest
from google.protobuf import json_format
from google.protobuf.field_mask_pb2 import FieldMask
from hypothesis import given, settings
from hypothesis import strategies as st

from api.hubble import auth, convert
from api.hubble.agent_events import diff_endpoints, endpoint_event, policy_event, rule_count
from api.hubble.config import HubbleConfig, HubbleConfigError, parse_listen
from api.hubble.pb import flow_pb2 as fpb
from api.hubble.pb import observer_pb2 as opb
from api.hubble.server import RequestError, plan_flows, select_events
from api.samples import sample_flows
from flowscope import schema
from flowscope.endpoints import EndpointRecord
from flowscope.filters import FILTER_FIELDS, EventTypeFilter, FlowFilter

S = schema


def pol(name, ns="shop", rev="7", kind="CiliumNetworkPolicy"):
    return S.Policy(name=name, namespace=ns, labels=[f"k8s:io.cilium.k8s.policy.name={name}"], revision=rev, kind=kind)


def ep(ns, pod, ident, cluster=""):
    return S.Endpoint(ID=ident % 4000, identity=ident, cluster_name=cluster, namespace=ns, pod_name=pod,
                      labels=[f"k8s:app={pod.split('-')[0]}", f"k8s:io.kubernetes.pod.namespace={ns}"],
                      workloads=[S.Workload(name=pod.split("-")[0], kind="Deployment")])


T0 = "2025-03-01T10:00:00.123456789Z"

RICH = [
    # HTTP response with latency, headers, a reply, allowed by a policy
    S.Flow(time=T0, uuid="u-1", emitter=S.Emitter(name="flowscope", version="0.1.0"), verdict=S.Verdict.FORWARDED,
           ethernet=S.Ethernet(source="aa:bb:cc:dd:ee:01", destination="aa:bb:cc:dd:ee:02"),
           IP=S.IP(source="10.0.0.2", destination="10.0.0.3", ipVersion=S.IPVersion.IPv4),
           l4=S.Layer4(TCP=S.TCP(source_port=8080, destination_port=41000, flags=S.TCPFlags(PSH=True, ACK=True))),
           source=ep("shop", "api-1", 1234), destination=ep("shop", "web-1", 5678), Type=S.FlowType.L7,
           node_name="node-a", node_labels=["kubernetes.io/hostname=node-a"], source_names=["api.shop.svc"],
           l7=S.Layer7(type=S.L7FlowType.RESPONSE, latency_ns="1200000", http=S.HTTP(
               code=200, method="GET", url="http://api/users", protocol="HTTP/1.1",
               headers=[S.HTTPHeader(key="content-type", value="application/json")])),
           event_type=S.CiliumEventType(type=129), traffic_direction=S.TrafficDirection.INGRESS,
           trace_observation_point=S.TraceObservationPoint.TO_ENDPOINT, is_reply=True,
           interface=S.NetworkInterface(index=7, name="lxc12ab"), Summary="HTTP/1.1 200 GET http://api/users",
           ingress_allowed_by=[pol("allow-web")]),
    # gRPC over HTTP/2 with grpc-status among the headers
    S.Flow(time="2025-03-01T10:00:01Z", verdict=S.Verdict.FORWARDED,
           IP=S.IP(source="fd00::2", destination="fd00::3", ipVersion=S.IPVersion.IPv6),
           l4=S.Layer4(TCP=S.TCP(source_port=50000, destination_port=50051)), Type=S.FlowType.L7,
           l7=S.Layer7(type=S.L7FlowType.RESPONSE, latency_ns=345678, http=S.HTTP(
               code=200, method="POST", url="/shop.Cart/Add", protocol="HTTP/2",
               headers=[S.HTTPHeader(key="grpc-status", value="0")])),
           is_reply=False, traffic_direction=S.TrafficDirection.EGRESS),
    # Kafka produce
    S.Flow(time="2025-03-01T10:00:02.5Z", verdict=S.Verdict.FORWARDED, Type=S.FlowType.L7,
           l4=S.Layer4(TCP=S.TCP(source_port=40000, destination_port=9092)),
           l7=S.Layer7(type=S.L7FlowType.REQUEST, kafka=S.Kafka(api_version=9, api_key="produce", correlation_id=-3,
                                                                 topic="orders", error_code=0))),
    # DNS response with answers and rcode
    S.Flow(time="2025-03-01T10:00:03.000001Z", verdict=S.Verdict.FORWARDED, Type=S.FlowType.L7,
           l4=S.Layer4(UDP=S.UDP(source_port=53, destination_port=33333)),
           destination_names=["kube-dns.kube-system.svc"],
           l7=S.Layer7(type=S.L7FlowType.RESPONSE, dns=S.DNS(
               query="api.shop.svc.cluster.local.", ips=["10.0.0.3", "fd00::3"], ttl=30, cnames=["x.example."],
               observation_source="proxy", rcode=3, qtypes=["A", "AAAA"], rrtypes=["A"]))),
    # policy drop with the deciding deny policy, a cluster-wide policy without namespace
    S.Flow(time="2025-03-01T10:00:04Z", verdict=S.Verdict.DROPPED, drop_reason_desc=S.DropReason.POLICY_DENY,
           IP=S.IP(source="10.0.0.9", destination="10.0.0.3", ipVersion=S.IPVersion.IPv4, encrypted=True),
           l4=S.Layer4(TCP=S.TCP(source_port=1234, destination_port=5432, flags=S.TCPFlags(SYN=True))),
           source=ep("other", "intruder-1", 9999, cluster="c1"), destination=ep("shop", "db-0", 3333),
           Type=S.FlowType.L3_L4, event_type=S.CiliumEventType(type=1, sub_type=181),
           traffic_direction=S.TrafficDirection.INGRESS, policy_match_type=2, is_reply=False,
           ingress_denied_by=[pol("deny-db", rev=12), pol("baseline", ns="", rev="18446744073709551615",
                                                         kind="CiliumClusterwideNetworkPolicy")],
           egress_denied_by=[pol("x")], egress_allowed_by=[pol("y", rev=0)],
           source_service=S.Service(name="intruder", namespace="other"),
           destination_service=S.Service(name="db", namespace="shop")),
    # audit verdict, default-deny drop without a policy, ICMP, SCTP, aggregate, empty l4/messages
    S.Flow(time="2025-03-01T10:00:05Z", verdict=S.Verdict.AUDIT, l4=S.Layer4(ICMPv4=S.ICMPv4(type=8)),
           policy_match_type=4),
    S.Flow(time="2025-03-01T10:00:06Z", verdict=S.Verdict.DROPPED, drop_reason_desc=S.DropReason.POLICY_DENIED,
           l4=S.Layer4(ICMPv6=S.ICMPv6(type=128, code=0)), event_type=S.CiliumEventType(type=1, sub_type=133)),
    S.Flow(time="2025-03-01T10:00:07Z", l4=S.Layer4(SCTP=S.SCTP(source_port=1, destination_port=2)),
           aggregate=S.Aggregate(ingress_flow_count=3, egress_flow_count=4, unknown_direction_flow_count=1)),
    S.Flow(time="2025-03-01T10:00:08Z", l4=S.Layer4(TCP=S.TCP(flags=S.TCPFlags())), ethernet=S.Ethernet(),
           source=S.Endpoint(), l7=S.Layer7(), emitter=S.Emitter(), interface=S.NetworkInterface()),
    S.Flow(time="2025-03-01T10:00:08.5Z", l4=S.Layer4()),
    # Flowscope's own counters and flow span
    S.Flow(time="2025-03-01T10:00:09Z", verdict=S.Verdict.FORWARDED,
           flowscope=S.FlowscopeExtension(event="expire", egress_packets="10", egress_bytes="18446744073709551615",
                                          ingress_packets=3, ingress_bytes="0", flow_start="2025-03-01T09:59:00Z",
                                          flow_end="2025-03-01T10:00:08.5Z")),
    S.Flow(),  # nothing at all
]


def assert_lossless(f: schema.Flow) -> None:
    p = convert.flow_to_proto(f)
    # protojson of our message == Flowscope's JSON (parsed objects)
    assert json_format.MessageToDict(p, preserving_proto_field_name=True) == msgspec.to_builtins(f)
    assert json.loads(json_format.MessageToJson(p, preserving_proto_field_name=True)) == json.loads(schema.flow_to_json(f))
    # the wire bytes and back
    wire = fpb.Flow.FromString(p.SerializeToString())
    assert convert.flow_from_proto(wire) == f


@pytest.mark.parametrize("i", range(len(RICH)))
def test_rich_flows_round_trip(i):
    assert_lossless(RICH[i])


def test_sample_flows_round_trip():
    flows = sample_flows(1500, seed=9)
    assert {f.Type for f in flows} >= {S.FlowType.L7, S.FlowType.L3_L4}
    assert any(f.verdict is S.Verdict.DROPPED for f in flows)
    for f in flows:
        assert_lossless(f)


def test_extension_is_outside_hubbles_field_numbers():
    field = fpb.Flow.DESCRIPTOR.fields_by_name["flowscope"]
    assert field.number == 500000
    # a Hubble client compiled without it still parses the message (unknown field)
    p = convert.flow_to_proto(RICH[-2])
    stripped = fpb.Flow.FromString(p.SerializeToString())
    stripped.ClearField("flowscope")
    assert stripped.time == p.time and stripped.verdict == p.verdict


# Hubble's wire contract, from flow.proto / observer.proto (see /work/shared/reference/flow-schema.md).
CONTRACT = {
    fpb.Flow: {"time": 1, "uuid": 34, "emitter": 41, "verdict": 2, "drop_reason": 3, "ethernet": 4, "IP": 5, "l4": 6,
               "source": 8, "destination": 9, "Type": 10, "node_name": 11, "node_labels": 37, "source_names": 13,
               "destination_names": 14, "l7": 15, "reply": 16, "event_type": 19, "source_service": 20,
               "destination_service": 21, "traffic_direction": 22, "policy_match_type": 23,
               "trace_observation_point": 24, "drop_reason_desc": 25, "is_reply": 26, "interface": 28,
               "Summary": 100000, "extensions": 150000, "egress_allowed_by": 21001, "ingress_allowed_by": 21002,
               "egress_denied_by": 21004, "ingress_denied_by": 21005, "aggregate": 21007},
    fpb.Layer7: {"type": 1, "latency_ns": 2, "dns": 100, "http": 101, "kafka": 102},
    fpb.Endpoint: {"ID": 1, "identity": 2, "cluster_name": 7, "namespace": 3, "labels": 4, "pod_name": 5, "workloads": 6},
    opb.GetFlowsRequest: {"number": 1, "first": 9, "follow": 3, "blacklist": 5, "whitelist": 6, "since": 7,
                          "until": 8, "field_mask": 10},
    opb.GetFlowsResponse: {"flow": 1, "node_status": 2, "lost_events": 3, "node_name": 1000, "time": 1001},
    opb.ServerStatusResponse: {"num_flows": 1, "max_flows": 2, "seen_flows": 3, "uptime_ns": 4,
                               "num_connected_nodes": 5, "num_unavailable_nodes": 6, "version": 8, "flows_rate": 9},
}


def test_wire_contract_numbers_and_service_path():
    for msg, fields in CONTRACT.items():
        got = {name: msg.DESCRIPTOR.fields_by_name[name].number for name in fields}
        assert got == fields, msg.DESCRIPTOR.full_name
    assert fpb.DESCRIPTOR.package == "flow" and opb.DESCRIPTOR.package == "observer"
    svc = opb.DESCRIPTOR.services_by_name["Observer"]
    assert svc.full_name == "observer.Observer"
    assert set(svc.methods_by_name) == {"GetFlows", "GetAgentEvents", "GetDebugEvents", "GetNodes", "GetNamespaces",
                                        "ServerStatus"}
    for e in S.DropReason:  # every schema enum value exists with the same number in the proto
        assert fpb.DropReason.Value(e.value) == e.number
    for enum_cls, proto_enum in ((S.Verdict, fpb.Verdict), (S.TraceObservationPoint, fpb.TraceObservationPoint),
                                 (S.FlowType, fpb.FlowType), (S.LostEventSource, fpb.LostEventSource)):
        for e in enum_cls:
            assert proto_enum.Value(e.value) == e.number


# ---- hypothesis: arbitrary flows --------------------------------------------------------------

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
u32 = st.integers(0, 2**32 - 1)
i32 = st.integers(-2**31, 2**31 - 1)
u64 = st.integers(0, 2**64 - 1)
port = st.integers(0, 65535)
ts_ns = st.integers(0, 4_000_000_000 * 10**9)
opt = st.none().__or__


def enum(cls):
    return st.sampled_from(list(cls))


endpoints = st.builds(S.Endpoint, ID=u32, identity=u32, cluster_name=text, namespace=text, labels=st.lists(text, max_size=3),
                      pod_name=text, workloads=st.lists(st.builds(S.Workload, name=text, kind=text), max_size=2))
flags = st.builds(S.TCPFlags, **{n: st.booleans() for n in S.TCP_FLAG_NAMES})
l4s = st.one_of(
    st.builds(S.Layer4),
    st.builds(lambda a, b, f: S.Layer4(TCP=S.TCP(source_port=a, destination_port=b, flags=f)), port, port, opt(flags)),
    st.builds(lambda a, b: S.Layer4(UDP=S.UDP(source_port=a, destination_port=b)), port, port),
    st.builds(lambda a, b: S.Layer4(SCTP=S.SCTP(source_port=a, destination_port=b)), port, port),
    st.builds(lambda a, b: S.Layer4(ICMPv4=S.ICMPv4(type=a, code=b)), u32, u32),
    st.builds(lambda a, b: S.Layer4(ICMPv6=S.ICMPv6(type=a, code=b)), u32, u32))
l7s = st.one_of(
    st.builds(S.Layer7, type=enum(S.L7FlowType), latency_ns=u64),
    st.builds(lambda t, lat, h: S.Layer7(type=t, latency_ns=lat, http=h), enum(S.L7FlowType), u64,
              st.builds(S.HTTP, code=u32, method=text, url=text, protocol=text,
                        headers=st.lists(st.builds(S.HTTPHeader, key=text, value=text), max_size=2))),
    st.builds(lambda d: S.Layer7(dns=d), st.builds(S.DNS, query=text, ips=st.lists(text, max_size=2), ttl=u32,
                                                   cnames=st.lists(text, max_size=2), observation_source=text,
                                                   rcode=u32, qtypes=st.lists(text, max_size=2),
                                                   rrtypes=st.lists(text, max_size=2))),
    st.builds(lambda k: S.Layer7(kafka=k), st.builds(S.Kafka, error_code=i32, api_version=i32, api_key=text,
                                                     correlation_id=i32, topic=text)))
policies = st.lists(st.builds(S.Policy, name=text, namespace=text, labels=st.lists(text, max_size=2), revision=u64,
                              kind=text), max_size=2)
ts_text = ts_ns.map(S.format_timestamp)
flows = st.builds(
    S.Flow, time=st.one_of(st.just(""), ts_text), uuid=text, emitter=opt(st.builds(S.Emitter, name=text, version=text)),
    verdict=enum(S.Verdict), ethernet=opt(st.builds(S.Ethernet, source=text, destination=text)),
    IP=opt(st.builds(S.IP, source=text, destination=text, ipVersion=enum(S.IPVersion), encrypted=st.booleans())),
    l4=opt(l4s), source=opt(endpoints), destination=opt(endpoints), Type=enum(S.FlowType), node_name=text,
    node_labels=st.lists(text, max_size=2), source_names=st.lists(text, max_size=2),
    destination_names=st.lists(text, max_size=2), l7=opt(l7s),
    event_type=opt(st.builds(S.CiliumEventType, type=i32, sub_type=i32)),
    source_service=opt(st.builds(S.Service, name=text, namespace=text)),
    destination_service=opt(st.builds(S.Service, name=text, namespace=text)),
    traffic_direction=enum(S.TrafficDirection), policy_match_type=u32,
    trace_observation_point=enum(S.TraceObservationPoint), drop_reason_desc=enum(S.DropReason),
    is_reply=opt(st.booleans()), interface=opt(st.builds(S.NetworkInterface, index=u32, name=text)), Summary=text,
    egress_allowed_by=policies, ingress_allowed_by=policies, egress_denied_by=policies, ingress_denied_by=policies,
    aggregate=opt(st.builds(S.Aggregate, ingress_flow_count=u32, egress_flow_count=u32,
                            unknown_direction_flow_count=u32)),
    flowscope=opt(st.builds(S.FlowscopeExtension, event=text, egress_packets=u64, egress_bytes=u64, ingress_packets=u64,
                            ingress_bytes=u64, flow_start=st.one_of(st.just(""), ts_text),
                            flow_end=st.one_of(st.just(""), ts_text))))


@settings(max_examples=300, deadline=None)
@given(flows)
def test_any_flow_round_trips(f):
    f = schema.load_flow(schema.flow_to_json(f))  # the canonical form the store keeps
    assert_lossless(f)


@settings(max_examples=100, deadline=None)
@given(st.builds(S.LostEvent, source=enum(S.LostEventSource), num_events_lost=u64, cpu=opt(i32)))
def test_lost_events_round_trip(ev):
    p = convert.lost_to_proto(ev)
    assert json_format.MessageToDict(p, preserving_proto_field_name=True) == msgspec.to_builtins(ev)
    assert convert.lost_from_proto(fpb.LostEvent.FromString(p.SerializeToString())) == ev
    if ev.source is S.LostEventSource.UNKNOWN_LOST_EVENT_SOURCE or ev.num_events_lost == "0":
        return  # schema.lost_envelope always writes both fields; real losses have a source and a count
    env = convert.lost_response(p, "n1", 1_700_000_000_000_000_000)
    want = schema.lost_envelope(ev.source, int(ev.num_events_lost), ev.cpu, "n1", 1_700_000_000_000_000_000)
    assert json_format.MessageToDict(env, preserving_proto_field_name=True) == want


# ---- what the schema cannot hold is an error, never dropped -----------------------------------


def test_proto_fields_outside_the_schema_are_errors():
    p = fpb.Flow(trace_reason=fpb.ESTABLISHED)
    with pytest.raises(convert.ConvertError, match="trace_reason"):
        convert.flow_from_proto(p)
    with pytest.raises(convert.ConvertError, match="trace_observation_point"):
        convert.flow_from_proto(fpb.Flow(trace_observation_point=fpb.FROM_CRYPTO))
    with pytest.raises(convert.ConvertError, match="source_port"):
        convert.flow_from_proto(fpb.Flow(l4=fpb.Layer4(TCP=fpb.TCP(source_port=70000))))
    with pytest.raises(convert.ConvertError, match="VRRP"):
        convert.flow_from_proto(fpb.Flow(l4=fpb.Layer4(VRRP=fpb.VRRP(type=1))))


def test_deprecated_twins_accepted_only_when_consistent():
    ok = fpb.Flow(drop_reason=133, drop_reason_desc=fpb.POLICY_DENIED, reply=True)
    ok.is_reply.value = True
    f = convert.flow_from_proto(ok)
    assert f.drop_reason_desc is S.DropReason.POLICY_DENIED and f.is_reply is True
    with pytest.raises(convert.ConvertError, match="drop_reason"):
        convert.flow_from_proto(fpb.Flow(drop_reason=133, drop_reason_desc=fpb.POLICY_DENY))
    with pytest.raises(convert.ConvertError, match="reply"):
        convert.flow_from_proto(fpb.Flow(reply=True))


def test_envelope_and_stored_responses_match_rest_json():
    f = RICH[0]
    body = schema.flow_to_json(f)
    t = S.parse_timestamp(f.time)
    r1 = convert.stored_flow_response(body, "node-a", t)
    r2 = convert.envelope_response(schema.flow_envelope_json(f))
    rest = json.loads(schema.flow_envelope_json(f))
    for r in (r1, r2):
        assert json.loads(json_format.MessageToJson(r, preserving_proto_field_name=True)) == rest
    lost = convert.envelope_response(schema.encode(schema.lost_envelope("OBSERVER_EVENTS_QUEUE", 5, 1, "n", t)))
    assert lost.lost_events.num_events_lost == 5 and lost.lost_events.cpu.value == 1 and lost.node_name == "n"


# ---- filters ----------------------------------------------------------------------------------

FULL_FILTER = FlowFilter(
    uuid=["u-1"], source_ip=["10.0.0.0/8"], source_pod=["shop/api-"], source_fqdn=["*.shop.svc"],
    source_label=["app=api"], source_service=["shop/api"], source_workload=[S.Workload(name="api", kind="Deployment")],
    source_identity=[1234], destination_ip=["fd00::3"], destination_pod=["shop/"], destination_fqdn=["db.*"],
    destination_label=["k8s:app in (web, db)"], destination_service=["shop/db"],
    destination_workload=[S.Workload(name="db")], destination_identity=[5678], traffic_direction=["INGRESS"],
    verdict=["DROPPED", "AUDIT"], drop_reason_desc=["POLICY_DENY"], event_type=[EventTypeFilter(type=1, match_sub_type=True, sub_type=181)],
    http_status_code=["5+"], protocol=["tcp", "http"], source_port=["8080"], destination_port=["5432"], reply=[False],
    dns_query=["shop"], http_method=["GET"], http_path=["^/api"], http_url=["users"],
    http_header=[S.HTTPHeader(key="grpc-status", value="0")], tcp_flags=[S.TCPFlags(SYN=True)], node_name=["node-*"],
    node_labels=["zone=a"], ip_version=["IPv4"], interface=[S.NetworkInterface(name="lxc12ab")])


def test_every_filter_field_round_trips():
    assert all(getattr(FULL_FILTER, name) for name in FILTER_FIELDS), "the test filter must set every field"
    p = convert.filter_to_proto(FULL_FILTER)
    assert convert.filter_from_proto(fpb.FlowFilter.FromString(p.SerializeToString())) == FULL_FILTER
    # numbers for enums and ports are normalised the Hubble way
    p2 = convert.filter_to_proto(FlowFilter(verdict=[2], source_port=[53]))
    assert list(p2.verdict) == [fpb.DROPPED] and list(p2.source_port) == ["53"]


@pytest.mark.parametrize("field,value", [("source_cluster_name", ["c1"]), ("destination_cluster_name", ["c1"]),
                                         ("source_ip_xlated", ["1.1.1.1"]), ("trace_id", ["ab"]),
                                         ("ip_trace_id", [1]), ("encrypted", [True])])
def test_filters_flowscope_cannot_evaluate_are_refused(field, value):
    with pytest.raises(convert.ConvertError, match=field):
        convert.filter_from_proto(fpb.FlowFilter(**{field: value}))
    m = fpb.FlowFilter()
    m.experimental.cel_expression.append("true")
    with pytest.raises(convert.ConvertError, match="cel_expression"):
        convert.filter_from_proto(m)


def test_field_masks():
    convert.validate_field_mask(FieldMask(paths=["time", "source.pod_name", "l7", "ip_trace_id", "Summary"]))
    with pytest.raises(convert.ConvertError, match="nope"):
        convert.validate_field_mask(FieldMask(paths=["time", "nope"]))
    m = convert.masked(convert.flow_to_proto(RICH[0]), FieldMask(paths=["time", "source.pod_name", "verdict"]))
    d = json_format.MessageToDict(m, preserving_proto_field_name=True)
    assert d == {"time": RICH[0].time, "verdict": "FORWARDED", "source": {"pod_name": "api-1"}}


# ---- request planning (Hubble's server semantics) -------------------------------------------


def req(**kw):
    r = opb.GetFlowsRequest(**{k: v for k, v in kw.items() if k not in ("since", "until")})
    for k in ("since", "until"):
        if k in kw:
            getattr(r, k).FromNanoseconds(kw[k])
    return r


def test_plan_number_semantics():
    assert plan_flows(req(number=20)).query.limit == 20
    assert plan_flows(req()).query.limit is None  # everything (Hubble: the whole ring)
    assert plan_flows(req(number=2**64 - 1)).query.limit is None  # --all
    assert plan_flows(req(follow=True)).query.limit == 0  # only new flows
    assert plan_flows(req(follow=True, since=10)).query.limit is None
    p = plan_flows(req(first=True, number=5, since=10, until=20))
    assert (p.query.first, p.query.limit, p.query.since_ns, p.query.until_ns) == (True, 5, 10, 20)


@pytest.mark.parametrize("kw,msg", [(dict(first=True, follow=True), "first"), (dict(follow=True, until=5), "until"),
                                    (dict(since=10, until=5), "since is after until")])
def test_plan_rejects_contradictions(kw, msg):
    with pytest.raises(RequestError, match=msg):
        plan_flows(req(**kw))


def test_plan_filters_use_the_filter_engine():
    p = plan_flows(req(whitelist=[fpb.FlowFilter(verdict=[fpb.DROPPED])], blacklist=[fpb.FlowFilter(protocol=["icmp"])]))
    drop = S.Flow(verdict=S.Verdict.DROPPED, l4=S.Layer4(TCP=S.TCP()))
    assert p.query.filters.match(drop)
    assert not p.query.filters.match(S.Flow(verdict=S.Verdict.FORWARDED))
    assert not p.query.filters.match(S.Flow(verdict=S.Verdict.DROPPED, l4=S.Layer4(ICMPv4=S.ICMPv4())))
    with pytest.raises(RequestError, match="source_ip"):
        plan_flows(req(whitelist=[fpb.FlowFilter(source_ip=["not-an-ip"])]))
    with pytest.raises(RequestError, match="nope"):
        plan_flows(req(field_mask=FieldMask(paths=["nope"])))


def test_select_events():
    items = list(range(10))
    assert select_events(items, 3, False, False, None) == [7, 8, 9]
    assert select_events(items, 3, True, False, None) == [0, 1, 2]
    assert select_events(items, 0, False, False, None) == items
    assert select_events(items, 0, False, True, None) == []


# ---- agent events (pure) -------------------------------------------------------------------


def test_policy_events():
    body = json.dumps({"kind": "CiliumNetworkPolicy", "metadata": {"name": "p", "namespace": "shop"},
                       "specs": [{}, {}], "spec": {"endpointSelector": {}}})
    ev = policy_event(4, "shop", "p", "apply", body)
    assert ev.type == fpb.POLICY_UPDATED and ev.policy_update.revision == 4 and ev.policy_update.rule_count == 3
    assert "k8s:io.cilium.k8s.policy.name=p" in ev.policy_update.labels
    assert "k8s:io.cilium.k8s.policy.namespace=shop" in ev.policy_update.labels
    gone = policy_event(5, "", "cw", "delete", None)
    assert gone.type == fpb.POLICY_DELETED
    assert "k8s:io.cilium.k8s.policy.derived-from=CiliumClusterwideNetworkPolicy" in gone.policy_update.labels
    assert rule_count(None) == 0


def test_endpoint_diff_and_events():
    a = EndpointRecord(container_id="a", pod_name="web-1", namespace="shop", labels={"app": "web"}, endpoint_id=7)
    b = EndpointRecord(container_id="b", pod_name="api-1", namespace="shop", endpoint_id=8)
    b2 = EndpointRecord(container_id="b", pod_name="api-1", namespace="shop", endpoint_id=9)
    created, deleted = diff_endpoints({a.key: a, b.key: b}, {b.key: b2})
    assert created == [b2] and sorted(r.endpoint_id for r in deleted) == [7, 8]
    ev = endpoint_event(a, True)
    assert ev.type == fpb.ENDPOINT_CREATED and ev.endpoint_update.id == 7 and ev.endpoint_update.pod_name == "web-1"
    assert "k8s:app=web" in ev.endpoint_update.labels
    assert endpoint_event(a, False).type == fpb.ENDPOINT_DELETED


# ---- config and auth -------------------------------------------------------------------------


def test_listen_addresses():
    assert parse_listen("127.0.0.1:4245") == ("127.0.0.1", 4245)
    assert parse_listen("[::1]:4245") == ("::1", 4245)
    assert parse_listen(":4245") == ("0.0.0.0", 4245)
    for bad in ("4245", "host:port", "::1:4245", "1.2.3.4:99999", "[nope]:1"):
        with pytest.raises(HubbleConfigError):
            parse_listen(bad)
    with pytest.raises(HubbleConfigError, match="together"):
        HubbleConfig(tls_cert="c")
    assert HubbleConfig().cli_args() == []  # the default stays implicit for the child server
    assert HubbleConfig(listen="127.0.0.1:1", explicit=True, token_file="t").cli_args() == [
        "--hubble-listen", "127.0.0.1:1", "--hubble-token-file", "t"]


def test_token_file_and_checks(tmp_path):
    tok_viewer, tok_agent = "v" * 24, "a" * 24
    tok_admin = "admin-token-0123456789"
    f = tmp_path / "tokens"
    f.write_text(f"# comment\n{tok_viewer}\nagent {tok_agent}\nadmin sha256:{auth.digest(tok_admin)}\n")
    authz = auth.file_authorizer(f)
    assert (authz(tok_viewer), authz(tok_agent), authz(tok_admin), authz("x" * 24)) == ("viewer", "agent", "admin", None)
    m = "/observer.Observer/GetFlows"
    assert auth.check(authz, m, [("authorization", f"Bearer {tok_viewer}")]) is None
    basic = base64.b64encode(f"anyone:{tok_admin}".encode()).decode()
    assert auth.check(authz, m, [("authorization", f"Basic {basic}")]) is None
    assert auth.check(authz, m, [])[0] == grpc.StatusCode.UNAUTHENTICATED
    assert auth.check(authz, m, [("authorization", "Bearer nope")])[0] == grpc.StatusCode.UNAUTHENTICATED
    assert auth.check(authz, m, [("authorization", f"Bearer {tok_agent}")])[0] == grpc.StatusCode.PERMISSION_DENIED
    assert auth.check(authz, "/grpc.health.v1.Health/Check", []) is None
    for content, msg in (("bogus-role " + tok_viewer, "unknown role"), ("short", "too short"),
                         ("viewer sha256:zz", "64 hex"), ("# nothing\n", "no token"), ("a b c", "expected")):
        f.write_text(content)
        with pytest.raises(auth.TokenFileError, match=msg) as e:
            auth.load_token_file(f)
        assert tok_viewer not in str(e.value)
