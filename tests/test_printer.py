"""Output formats, checked against the expected strings of Hubble's own printer tests
(hubble/pkg/printer/printer_test.go) plus Flowscope's L7 and reserved-identity cases."""

from __future__ import annotations

import copy
import io
import json

import pytest

from flowscope import schema
from flowscope.printer import (
    Printer,
    PrinterError,
    decode_envelope,
    flow_summary,
    flow_type,
    format_time,
    hostnames,
    load_flow_lenient,
    render_table,
)

# Hubble's test flow `f`
HUBBLE_F = {
    "time": "1970-01-01T00:20:34.567800Z", "verdict": "DROPPED",
    "IP": {"source": "1.1.1.1", "destination": "2.2.2.2"},
    "l4": {"TCP": {"source_port": 31793, "destination_port": 8080}},
    "source": {"identity": 4}, "destination": {"identity": 12345},
    "Type": "L3_L4", "node_name": "k8s1", "event_type": {"type": 1, "sub_type": 133},
    "is_reply": False, "Summary": "TCP Flags: SYN",
}
HUBBLE_LINE = ('{"flow":{"time":"1970-01-01T00:20:34.567800Z","verdict":"DROPPED","IP":{"source":"1.1.1.1",'
               '"destination":"2.2.2.2"},"l4":{"TCP":{"source_port":31793,"destination_port":8080}},"source":'
               '{"identity":4},"destination":{"identity":12345},"Type":"L3_L4","node_name":"k8s1","event_type":'
               '{"type":1,"sub_type":133},"is_reply":false,"Summary":"TCP Flags: SYN"}}')


def variant(**changes):
    f = copy.deepcopy(HUBBLE_F)
    for k, v in changes.items():
        if v is None:
            f.pop(k, None)
        else:
            f[k] = v
    return f


REPLY = variant(is_reply=True)
UNKNOWN_DIR = variant(is_reply=None)
POLICY_DENIED = variant(event_type={"type": 5}, is_reply=None, traffic_direction="EGRESS",
                        egress_denied_by=[{"name": "my-policy", "namespace": "my-policy-namespace",
                                           "kind": "CiliumNetworkPolicy"}])
POLICY_ALLOWED = variant(event_type={"type": 5}, verdict="FORWARDED", is_reply=None, traffic_direction="INGRESS",
                         policy_match_type=1,
                         ingress_allowed_by=[{"name": "my-policy", "namespace": "my-policy-namespace",
                                              "kind": "CiliumNetworkPolicy"},
                                             {"name": "my-policy-2", "kind": "CiliumClusterwideNetworkPolicy"}])
POLICY_AUDITED = variant(event_type={"type": 5}, verdict="AUDIT", is_reply=None, traffic_direction="EGRESS",
                         egress_denied_by=[{"name": "my-policy", "namespace": "my-policy-namespace",
                                            "kind": "CiliumNetworkPolicy"}])


def render(output: str, *flows, **opts) -> str:
    buf = io.StringIO()
    p = Printer(output, out=buf, **opts)
    for f in flows:
        if isinstance(f, str):
            p.write(decode_envelope(f), raw=f)
        elif "lost_events" in f:
            p.write(f)
        else:
            p.write({"flow": f})
    p.close()
    return buf.getvalue()


# Expected strings copied from Hubble's TestPrinter_WriteProtoFlow
HUBBLE_CASES = [
    ("tabular", "table", HUBBLE_F, {},
     "TIMESTAMP             SOURCE          DESTINATION    TYPE            VERDICT   SUMMARY\n"
     "Jan  1 00:20:34.567   1.1.1.1:31793   2.2.2.2:8080   Policy denied   DROPPED   TCP Flags: SYN"),
    ("tabular-with-node", "table", HUBBLE_F, {"node_name": True},
     "TIMESTAMP             NODE   SOURCE          DESTINATION    TYPE            VERDICT   SUMMARY\n"
     "Jan  1 00:20:34.567   k8s1   1.1.1.1:31793   2.2.2.2:8080   Policy denied   DROPPED   TCP Flags: SYN"),
    ("compact", "compact", HUBBLE_F, {},
     "Jan  1 00:20:34.567: 1.1.1.1:31793 (health) -> 2.2.2.2:8080 (ID:12345) Policy denied DROPPED (TCP Flags: SYN)"),
    ("compact-with-node", "compact", HUBBLE_F, {"node_name": True},
     "Jan  1 00:20:34.567 [k8s1]: 1.1.1.1:31793 (health) -> 2.2.2.2:8080 (ID:12345) Policy denied DROPPED "
     "(TCP Flags: SYN)"),
    ("compact-reply", "compact", REPLY, {"node_name": True},
     "Jan  1 00:20:34.567 [k8s1]: 2.2.2.2:8080 (ID:12345) <- 1.1.1.1:31793 (health) Policy denied DROPPED "
     "(TCP Flags: SYN)"),
    ("compact-policy-verdict-denied", "compact", POLICY_DENIED, {"node_name": True},
     "Jan  1 00:20:34.567 [k8s1]: 1.1.1.1:31793 (health) <> 2.2.2.2:8080 (ID:12345) policy-verdict:none EGRESS "
     "DENIED (TCP Flags: SYN)"),
    ("compact-policy-verdict-denied-with-policy-name", "compact", POLICY_DENIED,
     {"node_name": True, "policy_names": True},
     "Jan  1 00:20:34.567 [k8s1]: 1.1.1.1:31793 (health) <> 2.2.2.2:8080 (ID:12345) policy-verdict:none EGRESS "
     "DENIED BY my-policy (CiliumNetworkPolicy) (TCP Flags: SYN)"),
    ("compact-policy-verdict-allowed-with-policy-name", "compact", POLICY_ALLOWED,
     {"node_name": True, "policy_names": True},
     "Jan  1 00:20:34.567 [k8s1]: 1.1.1.1:31793 (health) <> 2.2.2.2:8080 (ID:12345) policy-verdict:L3-Only "
     "INGRESS ALLOWED BY my-policy (CiliumNetworkPolicy), my-policy-2 (CiliumClusterwideNetworkPolicy) "
     "(TCP Flags: SYN)"),
    ("compact-policy-verdict-audited-with-policy-name", "compact", POLICY_AUDITED,
     {"node_name": True, "policy_names": True},
     "Jan  1 00:20:34.567 [k8s1]: 1.1.1.1:31793 (health) <> 2.2.2.2:8080 (ID:12345) policy-verdict:none EGRESS "
     "AUDITED BY my-policy (CiliumNetworkPolicy) (TCP Flags: SYN)"),
    ("compact-direction-unknown", "compact", UNKNOWN_DIR, {"node_name": True},
     "Jan  1 00:20:34.567 [k8s1]: 1.1.1.1:31793 (health) <> 2.2.2.2:8080 (ID:12345) Policy denied DROPPED "
     "(TCP Flags: SYN)"),
    ("dict", "dict", HUBBLE_F, {},
     "  TIMESTAMP: Jan  1 00:20:34.567\n     SOURCE: 1.1.1.1:31793\nDESTINATION: 2.2.2.2:8080\n"
     "       TYPE: Policy denied\n    VERDICT: DROPPED\n    SUMMARY: TCP Flags: SYN"),
    ("dict-with-node", "dict", HUBBLE_F, {"node_name": True},
     "  TIMESTAMP: Jan  1 00:20:34.567\n       NODE: k8s1\n     SOURCE: 1.1.1.1:31793\nDESTINATION: 2.2.2.2:8080\n"
     "       TYPE: Policy denied\n    VERDICT: DROPPED\n    SUMMARY: TCP Flags: SYN"),
    ("dict-with-policy-name", "dict", POLICY_DENIED, {"policy_names": True},
     "  TIMESTAMP: Jan  1 00:20:34.567\n     SOURCE: 1.1.1.1:31793\nDESTINATION: 2.2.2.2:8080\n"
     "       TYPE: policy-verdict:none EGRESS\n    VERDICT: DENIED BY my-policy (CiliumNetworkPolicy)\n"
     "    SUMMARY: TCP Flags: SYN"),
]


@pytest.mark.parametrize("output,f,opts,expected", [c[1:] for c in HUBBLE_CASES], ids=[c[0] for c in HUBBLE_CASES])
def test_hubble_reference_outputs(output, f, opts, expected):
    # Hubble's tests print without IP translation; the reference flow has no pod names anyway
    assert render(output, f, **opts) == expected + "\n"


def test_jsonpb_echoes_the_line_exactly():
    assert render("jsonpb", HUBBLE_LINE) == HUBBLE_LINE + "\n"
    assert render("json", " " + HUBBLE_LINE + "\r\n") == HUBBLE_LINE + "\n"
    # without the raw text (websocket frames), the envelope is re-encoded compactly, keys in order
    out = render("json", HUBBLE_F)
    assert out == "{" + '"flow":' + json.dumps(HUBBLE_F, separators=(",", ":")) + "}\n"


LOST = {"lost_events": {"source": "HUBBLE_RING_BUFFER", "num_events_lost": "1", "cpu": 5},
        "time": "1970-01-01T00:20:34.567800Z"}
LOST_NODE = dict(LOST, node_name="node-name")
LOST_TS = {"lost_events": {"source": "HUBBLE_RING_BUFFER", "num_events_lost": "1", "cpu": 5,
                           "first": "1970-01-01T00:20:30.567800Z", "last": "1970-01-01T00:20:38.567800Z"},
           "time": "1970-01-01T00:20:34.567800Z"}

# Hubble's TestPrinter_WriteLostEventsResponse
LOST_CASES = [
    ("tabular", "table", LOST, {},
     "TIMESTAMP             SOURCE               DESTINATION   TYPE          VERDICT   SUMMARY\n"
     "Jan  1 00:20:34.567   HUBBLE_RING_BUFFER   -             EVENTS LOST   -         CPU(5) - 1"),
    ("compact", "compact", LOST, {}, "Jan  1 00:20:34.567 EVENTS LOST: HUBBLE_RING_BUFFER CPU(5) 1"),
    ("dict", "dict", LOST, {},
     "  TIMESTAMP: Jan  1 00:20:34.567\n     SOURCE: HUBBLE_RING_BUFFER\n       TYPE: EVENTS LOST\n"
     "    VERDICT: -\n    SUMMARY: CPU(5) - 1"),
    ("tabular with node", "table", LOST_NODE, {"node_name": True},
     "TIMESTAMP             NODE        SOURCE               DESTINATION   TYPE          VERDICT   SUMMARY\n"
     "Jan  1 00:20:34.567   node-name   HUBBLE_RING_BUFFER   -             EVENTS LOST   -         CPU(5) - 1"),
    ("compact with node", "compact", LOST_NODE, {"node_name": True},
     "Jan  1 00:20:34.567 EVENTS LOST: HUBBLE_RING_BUFFER CPU(5) 1"),
    ("dict with node", "dict", LOST_NODE, {"node_name": True},
     "  TIMESTAMP: Jan  1 00:20:34.567\n       NODE: node-name\n     SOURCE: HUBBLE_RING_BUFFER\n"
     "       TYPE: EVENTS LOST\n    VERDICT: -\n    SUMMARY: CPU(5) - 1"),
    ("tabular with timestamps", "table", LOST_TS, {},
     "TIMESTAMP             SOURCE               DESTINATION   TYPE          VERDICT   SUMMARY\n"
     "Jan  1 00:20:34.567   HUBBLE_RING_BUFFER   -             EVENTS LOST   -         CPU(5) - 1 "
     "(first: Jan  1 00:20:30.567, last: Jan  1 00:20:38.567)"),
    ("compact with timestamps", "compact", LOST_TS, {},
     "Jan  1 00:20:34.567 EVENTS LOST: HUBBLE_RING_BUFFER CPU(5) 1 (first: Jan  1 00:20:30.567, "
     "last: Jan  1 00:20:38.567)"),
    ("dict with timestamps", "dict", LOST_TS, {},
     "  TIMESTAMP: Jan  1 00:20:34.567\n     SOURCE: HUBBLE_RING_BUFFER\n       TYPE: EVENTS LOST\n"
     "    VERDICT: -\n    SUMMARY: CPU(5) - 1 (first: Jan  1 00:20:30.567, last: Jan  1 00:20:38.567)"),
]


@pytest.mark.parametrize("output,env,opts,expected", [c[1:] for c in LOST_CASES], ids=[c[0] for c in LOST_CASES])
def test_hubble_lost_events(output, env, opts, expected):
    assert render(output, env, **opts) == expected + "\n"


def test_lost_events_jsonpb_and_defaults():
    line = '{"lost_events":{"source":"HUBBLE_RING_BUFFER","num_events_lost":"1","cpu":5},"node_name":"node-name",' \
           '"time":"1970-01-01T00:20:34.567800Z"}'
    assert render("jsonpb", line) == line + "\n"
    lost = schema.lost_envelope("PERF_EVENT_RING_BUFFER", 12, time_ns=1_732_687_801_123_000_000)
    assert render("compact", lost) == "Nov 27 06:10:01.123 EVENTS LOST: PERF_EVENT_RING_BUFFER CPU(0) 12\n"


@pytest.mark.parametrize("f,src,dst", [
    ({}, "", ""),
    ({"IP": {"source": "1.1.1.1", "destination": "2.2.2.2"}}, "1.1.1.1", "2.2.2.2"),
    ({"IP": {"source": "1.1.1.1", "destination": "2.2.2.2"},
      "source": {"namespace": "srcns", "pod_name": "srcpod"},
      "destination": {"namespace": "dstns", "pod_name": "dstpod"}}, "srcns/srcpod", "dstns/dstpod"),
    ({"IP": {"source": "1.1.1.1", "destination": "2.2.2.2"},
      "l4": {"TCP": {"source_port": 55555, "destination_port": 80}}}, "1.1.1.1:55555", "2.2.2.2:80"),
    ({"IP": {"source": "1.1.1.1", "destination": "2.2.2.2"},
      "l4": {"UDP": {"source_port": 55555, "destination_port": 53}}}, "1.1.1.1:55555", "2.2.2.2:53"),
    ({"IP": {"source": "1.1.1.1", "destination": "2.2.2.2"},
      "l4": {"SCTP": {"source_port": 55555, "destination_port": 5060}}}, "1.1.1.1:55555", "2.2.2.2:5060"),
    ({"IP": {"source": "1.1.1.1", "destination": "2.2.2.2"},
      "l4": {"TCP": {"source_port": 55555, "destination_port": 80}},
      "source_service": {"name": "xwing", "namespace": "default"},
      "destination_service": {"name": "tiefighter", "namespace": "deathstar"}},
     "default/xwing:55555", "deathstar/tiefighter:80"),
    ({"IP": {"source": "1.1.1.1", "destination": "2.2.2.2"},
      "l4": {"TCP": {"source_port": 54321, "destination_port": 65432}},
      "source_names": ["a"], "destination_names": ["b"]}, "a:54321", "b:65432"),
    ({"ethernet": {"source": "00:01:02:03:04:05", "destination": "06:07:08:09:0a:0b"}},
     "00:01:02:03:04:05", "06:07:08:09:0a:0b"),
    ({"IP": {"source": "fd00::1", "destination": "fd00::2"},
      "l4": {"TCP": {"source_port": 1, "destination_port": 443}}}, "[fd00::1]:1", "[fd00::2]:443"),
    ({"IP": {"source": "1.1.1.1", "destination": "2.2.2.2"}, "l4": {"ICMPv4": {"type": 8}}}, "1.1.1.1", "2.2.2.2"),
])
def test_hostnames(f, src, dst):
    assert hostnames(schema.load_flow(f)) == (src, dst)


def test_hostnames_numeric():
    f = schema.load_flow({"IP": {"source": "1.1.1.1", "destination": "2.2.2.2"},
                          "l4": {"TCP": {"source_port": 80, "destination_port": 0}},
                          "source": {"namespace": "default", "pod_name": "pod"}})
    assert hostnames(f, translate=False) == ("1.1.1.1:80", "2.2.2.2")


@pytest.mark.parametrize("value,layout,expected", [
    ("1970-01-01T00:00:00Z", "StampMilli", "Jan  1 00:00:00.000"),
    (1530984600_123000000, "StampMilli", "Jul  7 17:30:00.123"),
    ("2024-11-27T06:10:01.123999Z", "StampMilli", "Nov 27 06:10:01.123"),
    ("", "StampMilli", "N/A"),
    (None, "StampMilli", "N/A"),
    ("garbage", "StampMilli", "N/A"),
    ("2024-11-27T06:10:01.120Z", "RFC3339", "2024-11-27T06:10:01Z"),
    ("2024-11-27T06:10:01.120Z", "RFC3339Milli", "2024-11-27T06:10:01.12Z"),
    ("2024-11-27T06:10:01.000001Z", "RFC3339Micro", "2024-11-27T06:10:01.000001Z"),
    ("2024-11-27T06:10:01.000000001Z", "RFC3339Nano", "2024-11-27T06:10:01.000000001Z"),
])
def test_format_time(value, layout, expected):
    assert format_time(value, layout) == expected


# Hubble's Test_getFlowType
@pytest.mark.parametrize("f,expected", [
    ({"l7": {"type": "REQUEST"}, "event_type": {"type": 129}}, "l7-request"),
    ({"l7": {"type": "RESPONSE", "http": {}}, "event_type": {"type": 129}}, "http-response"),
    ({"l7": {"type": "REQUEST", "dns": {"observation_source": "proxy"}}, "event_type": {"type": 129}},
     "dns-request proxy"),
    ({"l7": {"type": "REQUEST", "kafka": {"topic": "t"}}}, "kafka-request"),
    ({"event_type": {"type": 4, "sub_type": 2}}, "to-host"),
    ({"event_type": {"type": 4, "sub_type": 0}}, "to-endpoint"),
    ({"verdict": "FORWARDED", "event_type": {"type": 5}, "policy_match_type": 2, "traffic_direction": "INGRESS"},
     "policy-verdict:L3-L4 INGRESS"),
    ({"verdict": "DROPPED", "event_type": {"type": 5}, "traffic_direction": "INGRESS"}, "policy-verdict:none INGRESS"),
    ({"event_type": {"type": 4, "sub_type": 123}}, "123"),
    ({"event_type": {"type": 1, "sub_type": 181}}, "Policy denied by denylist"),
    ({}, "UNKNOWN"),
    # Flowscope flows without event_type
    ({"verdict": "DROPPED", "drop_reason_desc": "CT_MAP_INSERTION_FAILED"}, "CT: Map insertion failed"),
    ({"trace_observation_point": "TO_ENDPOINT"}, "to-endpoint"),
])
def test_flow_type(f, expected):
    assert flow_type(schema.load_flow(f)) == expected


@pytest.mark.parametrize("f,expected", [
    ({"Summary": "given"}, "given"),
    ({"l4": {"TCP": {"flags": {"SYN": True, "ACK": True, "FIN": True}}}}, "TCP Flags: SYN, ACK, FIN"),
    ({"l4": {"TCP": {"source_port": 1}}}, "TCP"),
    ({"l4": {"UDP": {"source_port": 1}}}, "UDP"),
    ({"l4": {"ICMPv4": {"type": 8}}}, "ICMPv4 EchoRequest"),
    ({"l4": {"ICMPv4": {"type": 3, "code": 3}}}, "ICMPv4 DestinationUnreachable(Port)"),
    ({"l4": {"ICMPv6": {"type": 129}}}, "ICMPv6 EchoReply"),
    ({"l7": {"type": "REQUEST", "http": {"method": "GET", "url": "http://api/users", "protocol": "HTTP/1.1"}}},
     "HTTP/1.1 GET http://api/users"),
    ({"l7": {"type": "RESPONSE", "latency_ns": "2500000",
             "http": {"code": 200, "method": "GET", "url": "http://api/users", "protocol": "HTTP/1.1"}}},
     "HTTP/1.1 200 2ms (GET http://api/users)"),
    ({"l7": {"type": "REQUEST", "dns": {"query": "example.com.", "qtypes": ["A", "AAAA"]}}},
     "DNS Query example.com. A,AAAA"),
    ({"l7": {"type": "RESPONSE", "dns": {"query": "example.com.", "qtypes": ["A"], "ips": ["1.2.3.4", "5.6.7.8"],
                                          "ttl": 300, "observation_source": "proxy"}}},
     'DNS Answer "1.2.3.4,5.6.7.8" TTL: 300 (Proxy example.com. A)'),
    ({"l7": {"type": "RESPONSE", "dns": {"query": "nope.", "qtypes": ["A"], "rcode": 3}}},
     "DNS Answer RCode: Non-Existent Domain TTL: 0 (Query nope. A)"),
    ({"l7": {"type": "REQUEST", "kafka": {"api_key": "produce", "correlation_id": 7, "topic": "orders"}}},
     "Kafka request produce correlation id 7 topic 'orders'"),
    ({"l7": {"type": "RESPONSE", "kafka": {"api_key": "fetch", "correlation_id": 7, "topic": "orders",
                                            "error_code": 3}}},
     "Kafka response fetch correlation id 7 topic 'orders' return code 3"),
])
def test_flow_summary(f, expected):
    assert flow_summary(schema.load_flow(f)) == expected


POD_FLOW = {
    "time": "2024-11-27T06:10:01.123Z", "verdict": "FORWARDED",
    "IP": {"source": "10.0.0.1", "destination": "10.0.0.2", "ipVersion": "IPv4"},
    "l4": {"TCP": {"source_port": 53410, "destination_port": 80, "flags": {"SYN": True}}},
    "source": {"identity": 1234, "namespace": "default", "pod_name": "frontend-7c9"},
    "destination": {"identity": 5678, "namespace": "default", "pod_name": "api-5d4"},
    "event_type": {"type": 4, "sub_type": 0}, "is_reply": False,
}


def test_compact_brief_examples():
    assert render("compact", POD_FLOW) == (
        "Nov 27 06:10:01.123: default/frontend-7c9:53410 (ID:1234) -> default/api-5d4:80 (ID:5678) "
        "to-endpoint FORWARDED (TCP Flags: SYN)\n")
    req = dict(POD_FLOW, l7={"type": "REQUEST", "http": {"method": "GET", "url": "http://api/users",
                                                           "protocol": "HTTP/1.1"}}, event_type={"type": 129})
    assert render("compact", req).endswith(" http-request FORWARDED (HTTP/1.1 GET http://api/users)\n")
    resp = dict(POD_FLOW, is_reply=True, l7={"type": "RESPONSE", "latency_ns": "2000000",
                                             "http": {"code": 200, "method": "GET", "url": "http://api/users",
                                                      "protocol": "HTTP/1.1"}}, event_type={"type": 129})
    assert render("compact", resp) == (
        "Nov 27 06:10:01.123: default/api-5d4:80 (ID:5678) <- default/frontend-7c9:53410 (ID:1234) "
        "http-response FORWARDED (HTTP/1.1 200 2ms (GET http://api/users))\n")


def test_reserved_identities_and_world():
    world = dict(POD_FLOW, destination={"identity": 2, "labels": ["reserved:world"]},
                 IP={"source": "10.0.0.1", "destination": "93.184.216.34"})
    assert "-> 93.184.216.34:80 (world) " in render("compact", world)
    host = dict(POD_FLOW, source={"labels": ["reserved:host"]})  # identity not numbered by the agent
    assert render("compact", host).startswith("Nov 27 06:10:01.123: 10.0.0.1:53410 (host) -> ")
    none = dict(POD_FLOW, source=None)
    assert " (unknown) -> " in render("compact", {k: v for k, v in none.items() if v is not None})


def test_table_aligns_many_rows_and_buffers_until_close():
    buf = io.StringIO()
    p = Printer("table", out=buf)
    p.write({"flow": POD_FLOW})
    p.write({"flow": HUBBLE_F})
    assert buf.getvalue() == ""  # like Go's tabwriter: written on close
    p.close()
    lines = buf.getvalue().splitlines()
    assert lines[0].split() == ["TIMESTAMP", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"]
    cols = [lines[0].index(h) for h in ("SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY")]
    for line in lines[1:]:
        for c in cols:
            assert line[c - 1] == " " and line[c] != " "
    assert render_table([["a", "bb", "c"], ["ccc", "d", "e"]]) == "a     bb   c\nccc   d    e\n"


def test_dict_separator_between_records():
    out = render("dict", HUBBLE_F, LOST, HUBBLE_F)
    assert out.count("------------\n") == 2 and not out.startswith("---")


def test_color_only_when_asked_and_never_in_table():
    plain = render("compact", POD_FLOW)
    colored = render("compact", POD_FLOW, color=True)
    assert "\x1b[" not in plain
    assert "\x1b[32mFORWARDED\x1b[0m" in colored and "\x1b[35m(ID:1234)\x1b[0m" in colored
    assert "\x1b[36mdefault/frontend-7c9:\x1b[33m53410\x1b[0m\x1b[0m" in colored
    assert "\x1b[31mDROPPED" in render("dict", HUBBLE_F, color=True)
    assert "\x1b[" not in render("table", HUBBLE_F, color=True)


def test_terminal_escapes_are_neutralised():
    evil = dict(POD_FLOW, source={"namespace": "x", "pod_name": "a\x1b[2Jb\rc\nd"}, Summary="s\x1b]0;t\x07")
    out = render("compact", evil)
    assert "\x1b" not in out and out.count("\n") == 1
    assert "a^[[2Jb\\rc\\nd" in out


def test_decode_envelope_and_lenient_flows():
    assert decode_envelope(HUBBLE_LINE)["flow"]["node_name"] == "k8s1"
    bare = json.dumps(HUBBLE_F)
    assert decode_envelope(bare) == {"flow": HUBBLE_F}
    for bad, msg in (("[1]", "JSON object"), ("{", "not JSON"), ('{"x": 1}', "not a flow envelope")):
        with pytest.raises(PrinterError, match=msg):
            decode_envelope(bad)
    # fields from newer Hubble versions are dropped, not fatal
    newer = dict(HUBBLE_F, drop_reason=133, trace_context={"parent": {"trace_id": "x"}},
                 source={"identity": 4, "cluster_name": "c", "new_field": True}, l4={"TCP": {"source_port": 1, "x": 2}})
    f = load_flow_lenient(newer)
    assert f.source.identity == 4 and f.l4.TCP.source_port == 1 and f.verdict is schema.Verdict.DROPPED
    with pytest.raises(schema.SchemaError):
        load_flow_lenient(dict(HUBBLE_F, verdict=["not", "an", "enum"]))


def test_invalid_printer_options():
    with pytest.raises(ValueError, match="output format"):
        Printer("yaml")
    with pytest.raises(ValueError, match="time format"):
        Printer("compact", time_format="Kitchen")
