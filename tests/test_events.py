"""Decoding the probe's binary events into flows (pure: no kernel needed)."""

from __future__ import annotations

import socket

from flowscope import schema
from flowscope.endpoints import EndpointIndex, EndpointRecord
from probe import events as ev


def _key(src, dst, sport, dport, proto, dir_, ifindex=7, family=4):
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    s = socket.inet_pton(af, src).ljust(16, b"\0")
    d = socket.inet_pton(af, dst).ljust(16, b"\0")
    return ev.KEY.pack(s, d, sport, dport, ifindex, family, proto, dir_, 0)


def _event(key, typ, tcp_flags=0, reply=ev.REPLY_NO, pk=3, by=300, rpk=2, rby=200, ts=2_000, first=1_000):
    return ev.EVENT.pack(key, ts, first, pk, by, rpk, rby, 900, tcp_flags, tcp_flags, typ, reply, 0, 0, 60, 0)


def builder():
    idx = EndpointIndex([EndpointRecord(container_id="c1", ips=["10.0.0.1"], namespace="ns", pod_name="web-1",
                                        labels={"app": "web"}, identity=300, endpoint_id=5)],
                        host_ips=["10.0.0.254"])
    return ev.FlowBuilder("n1", idx, {7: "lxc7"}, clock_offset_ns=1_000_000_000_000_000_000,
                          uuid_source=lambda: "u-1")


def test_layouts_match_c_sizes():
    assert (ev.KEY.size, ev.VAL.size, ev.EVENT.size) == (44, 48, 120)


def test_syn_from_endpoint_is_egress_request():
    raw = _event(_key("10.0.0.1", "10.0.0.9", 40000, 80, ev.IPPROTO_TCP, ev.DIR_EGRESS), ev.EV_NEW, tcp_flags=0x02)
    f = builder().build(ev.decode_event(raw))
    d = schema.dump_flow(f)
    assert d["IP"] == {"source": "10.0.0.1", "destination": "10.0.0.9", "ipVersion": "IPv4"}
    assert d["l4"] == {"TCP": {"source_port": 40000, "destination_port": 80, "flags": {"SYN": True}}}
    assert d["traffic_direction"] == "EGRESS" and d["is_reply"] is False
    assert d["trace_observation_point"] == "FROM_ENDPOINT" and d["event_type"] == {"type": 4, "sub_type": 5}
    assert d["source"] == {"ID": 5, "identity": 300, "namespace": "ns", "pod_name": "web-1",
                           "labels": ["k8s:app=web", "k8s:io.kubernetes.pod.namespace=ns"]}
    assert d["destination"] == {"identity": 2, "labels": ["reserved:world"]}
    assert d["verdict"] == "FORWARDED" and d["Summary"] == "TCP Flags: SYN"
    assert d["flowscope"]["egress_packets"] == "3" and d["flowscope"]["ingress_bytes"] == "200"
    assert d["interface"] == {"index": 7, "name": "lxc7"}
    assert d["time"] == "2001-09-09T01:46:40.000002Z"


def test_reply_to_endpoint_keeps_connection_direction():
    # the reply of an egress connection arrives at the endpoint: still EGRESS (Cilium's rule), is_reply true
    raw = _event(_key("10.0.0.9", "10.0.0.1", 80, 40000, ev.IPPROTO_TCP, ev.DIR_INGRESS), ev.EV_NEW,
                 tcp_flags=0x12, reply=ev.REPLY_YES)
    f = builder().build(ev.decode_event(raw))
    assert f.is_reply is True and f.traffic_direction == schema.TrafficDirection.EGRESS
    assert f.flowscope.ingress_packets == "3" and f.flowscope.egress_packets == "2"


def test_unknown_reply_state_is_absent():
    raw = _event(_key("10.0.0.1", "10.0.0.254", 1, 2, ev.IPPROTO_TCP, ev.DIR_EGRESS), ev.EV_FLAGS,
                 tcp_flags=0x10, reply=ev.REPLY_UNKNOWN)
    d = schema.dump_flow(builder().build(ev.decode_event(raw)))
    assert "is_reply" not in d
    assert d["destination"] == {"identity": 1, "labels": ["reserved:host"]}


def test_ipv6_udp_and_expire_record():
    key = _key("fd00::1", "fd00::2", 5353, 53, ev.IPPROTO_UDP, ev.DIR_EGRESS, family=6)
    val = ev.VAL.pack(1_000, 5_000, 5_000, 10, 1000, 0, ev.REPLY_NO, 0, 0)
    rev = ev.VAL.pack(1_500, 5_000, 5_000, 9, 900, 0, ev.REPLY_YES, 0, 0)
    assert ev.reverse_key(ev.reverse_key(key)) == key
    f = builder().build(ev.expire_event(key, val, rev, now_mono_ns=9_000))
    assert f.flowscope.event == "expire" and f.l4.UDP.destination_port == 53
    assert (f.flowscope.egress_bytes, f.flowscope.ingress_bytes) == ("1000", "900")
    assert f.IP.ipVersion == schema.IPVersion.IPv6


def test_uuid_source_is_unique_and_uuid_shaped():
    import uuid

    src = ev.UuidSource()
    ids = {src() for _ in range(1000)}
    assert len(ids) == 1000
    uuid.UUID(next(iter(ids)))
