"""The flow schema renders Hubble's JSON byte for byte."""

from __future__ import annotations

import msgspec
import orjson
import pytest

from flowscope import schema

# Lines as Hubble's own JSON printer writes them (shared/reference/flow-schema.md, Hubble's printer tests).
HUBBLE_LINES = [
    b'{"flow":{"time":"1970-01-01T00:20:34.567800Z","verdict":"DROPPED","IP":{"source":"1.1.1.1","destination":"2.2.2.2"},'
    b'"l4":{"TCP":{"source_port":31793,"destination_port":8080}},"source":{"identity":4},"destination":{"identity":12345},'
    b'"Type":"L3_L4","node_name":"k8s1","event_type":{"type":1,"sub_type":133},"is_reply":false,"Summary":"TCP Flags: SYN"},'
    b'"node_name":"k8s1","time":"1970-01-01T00:20:34.567800Z"}',
    b'{"flow":{"time":"2026-11-27T06:00:00.123456789Z","uuid":"a3e1b2c4-0000-4000-8000-000000000001","verdict":"FORWARDED",'
    b'"IP":{"source":"10.0.0.1","destination":"10.0.0.2","ipVersion":"IPv4"},"l4":{"TCP":{"source_port":40000,'
    b'"destination_port":80,"flags":{"PSH":true,"ACK":true}}},"source":{"ID":12,"identity":1234,"namespace":"default",'
    b'"labels":["k8s:app=frontend"],"pod_name":"frontend-7c9"},"destination":{"ID":13,"identity":5678,"namespace":"default",'
    b'"labels":["k8s:app=api"],"pod_name":"api-5d4"},"Type":"L7","node_name":"k8s1","l7":{"type":"RESPONSE",'
    b'"latency_ns":"1200000","http":{"code":200,"method":"GET","url":"http://api/users","protocol":"HTTP/1.1",'
    b'"headers":[{"key":"grpc-status","value":"0"}]}},"event_type":{"type":129},"traffic_direction":"INGRESS",'
    b'"is_reply":true,"interface":{"index":7,"name":"lxc1"}},"node_name":"k8s1","time":"2026-11-27T06:00:00.123456789Z"}',
    b'{"flow":{"time":"2026-11-27T06:00:01Z","verdict":"DROPPED","IP":{"source":"fd00::1","destination":"fd00::2",'
    b'"ipVersion":"IPv6"},"l4":{"ICMPv6":{"type":128}},"Type":"L3_L4","event_type":{"type":1,"sub_type":133},'
    b'"traffic_direction":"EGRESS","drop_reason_desc":"POLICY_DENIED","egress_denied_by":[{"name":"deny-all",'
    b'"namespace":"default","revision":"3","kind":"CiliumNetworkPolicy"}]},"time":"2026-11-27T06:00:01Z"}',
]


@pytest.mark.parametrize("line", HUBBLE_LINES)
def test_hubble_lines_round_trip_byte_for_byte(line):
    env = orjson.loads(line)
    flow = schema.load_flow(orjson.dumps(env["flow"]))
    assert schema.flow_to_json(flow) == orjson.dumps(env["flow"])
    assert schema.flow_envelope_json(flow) == line


def test_zero_values_are_omitted_and_wrappers_kept():
    f = schema.Flow(verdict=schema.Verdict.FORWARDED, is_reply=False,
                    l4=schema.Layer4(ICMPv4=schema.ICMPv4(type=0, code=0)),
                    source=schema.Endpoint(identity=0, labels=[]))
    assert schema.flow_to_json(f) == b'{"verdict":"FORWARDED","l4":{"ICMPv4":{}},"source":{},"is_reply":false}'


def test_uint64_as_strings_and_timestamps_normalised():
    f = schema.load_flow({"time": "2026-11-27T07:00:00.5+01:00", "l7": {"latency_ns": 1200000},
                          "flowscope": {"egress_bytes": 12, "flow_start": 1_795_759_200_000_000_001}})
    d = schema.dump_flow(f)
    assert d["time"] == "2026-11-27T06:00:00.500Z"
    assert d["l7"] == {"latency_ns": "1200000"}
    assert d["flowscope"] == {"egress_bytes": "12", "flow_start": "2026-11-27T06:00:00.000000001Z"}
    assert f.time_ns == 1_795_759_200_500_000_000


@pytest.mark.parametrize("ns,text", [
    (0, "1970-01-01T00:00:00Z"),
    (1_000_000, "1970-01-01T00:00:00.001Z"),
    (1_000, "1970-01-01T00:00:00.000001Z"),
    (1, "1970-01-01T00:00:00.000000001Z"),
])
def test_timestamp_precision_rules(ns, text):
    assert schema.format_timestamp(ns) == text
    assert schema.parse_timestamp(text) == ns


@pytest.mark.parametrize("bad,needle", [
    (b'{"verdict":"NOPE"}', "$.verdict"),
    (b'{"l4":{"TCP":{"source_port":70000}}}', "$.l4.TCP.source_port"),
    (b'{"bogus":1}', "bogus"),
    (b'{"time":"yesterday"}', "RFC 3339"),
    (b'{"l4":{"TCP":{},"UDP":{}}}', "oneof"),
    (b'{"l7":{"latency_ns":"-1"}}', "unsigned"),
    (b'{"source":{"labels":"app=x"}}', "$.source.labels"),
])
def test_bad_input_gets_a_clear_error(bad, needle):
    with pytest.raises((msgspec.ValidationError, msgspec.DecodeError)) as exc:
        schema.load_flow(bad)
    assert needle in str(exc.value)


def test_enums_carry_proto_numbers():
    assert schema.DropReason.POLICY_DENIED.number == 133
    assert schema.DropReason.POLICY_DENY.number == 181
    assert schema.DropReason(155).value == "CT_MAP_INSERTION_FAILED"
    assert schema.Verdict(4) is schema.Verdict.AUDIT
    assert schema.TraceObservationPoint.TO_ENDPOINT.number == 101


def test_lost_event_envelope():
    env = schema.lost_envelope("PERF_EVENT_RING_BUFFER", 12, cpu=0, node_name="n1", time_ns=0)
    assert orjson.dumps(env) == (b'{"lost_events":{"source":"PERF_EVENT_RING_BUFFER","num_events_lost":"12","cpu":0},'
                                 b'"node_name":"n1","time":"1970-01-01T00:00:00Z"}')
    ev = schema.LostEvent(source=schema.LostEventSource.OBSERVER_EVENTS_QUEUE, num_events_lost=5, cpu=0)
    assert schema.encode(ev) == b'{"source":"OBSERVER_EVENTS_QUEUE","num_events_lost":"5","cpu":0}'


def test_endpoint_store_version_sees_every_change(tmp_path):
    from flowscope.endpoints import EndpointRecord, EndpointStore

    store = EndpointStore(tmp_path)
    last = store.version()
    for i in range(20):  # many changes within one timestamp tick must all be visible
        store.put(EndpointRecord(container_id=f"c{i % 3}", ips=[f"10.0.0.{i}"]))
        v = store.version()
        assert v != last
        last = v
    store.delete("c1", "eth0")
    assert store.version() != last
