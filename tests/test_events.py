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


def _event(key, typ, tcp_flags=0, reply=ev.REPLY_NO, pk=3, by=300, rpk=2, rby=200, ts=2_000, first=1_000,
           verdict=0, reason=0, match_type=0, pflags=0, policy_id=0, peer=0, icmp=(0, 0)):
    return ev.EVENT.pack(key, ts, first, pk, by, rpk, rby, 900, tcp_flags, tcp_flags, typ, reply, icmp[0], icmp[1], 60,
                         policy_id, peer, verdict, reason, match_type, pflags)


def builder():
    idx = EndpointIndex([EndpointRecord(container_id="c1", ips=["10.0.0.1"], namespace="ns", pod_name="web-1",
                                        labels={"app": "web"}, identity=300, endpoint_id=5)],
                        host_ips=["10.0.0.254"])
    return ev.FlowBuilder("n1", idx, {7: "lxc7"}, clock_offset_ns=1_000_000_000_000_000_000,
                          uuid_source=lambda: "u-1")


def test_layouts_match_c_sizes():
    assert (ev.KEY.size, ev.VAL.size, ev.EVENT.size) == (44, 64, 128)


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
    val = ev.VAL.pack(1_000, 5_000, 5_000, 10, 1000, 0, ev.REPLY_NO, 0, 0, 0, 0, 0, 0, 0, 8)
    rev = ev.VAL.pack(1_500, 5_000, 5_000, 9, 900, 0, ev.REPLY_YES, 0, 0, 0, 0, 0, 0, 0, 9)
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


# --------------------------------------------------------------------------------------------
# Policy verdicts (issue 4)
# --------------------------------------------------------------------------------------------


class Names:
    """A PolicyNames resolver: ids 7 (allow-web) and 9 (deny-db), default deny by `base` on ifindex 7."""

    def __init__(self):
        self.refs = {7: schema.Policy(name="allow-web", namespace="ns", revision="3", kind="CiliumNetworkPolicy"),
                     9: schema.Policy(name="deny-db", namespace="ns", revision="4", kind="CiliumNetworkPolicy"),
                     11: schema.Policy(name="base", namespace="ns", revision="1", kind="CiliumNetworkPolicy")}

    def policy(self, pid):
        return self.refs.get(pid)

    def default_deny(self, ifindex, direction):
        return [self.refs[11]] if (ifindex, direction) == (7, "ingress") else []


def policy_builder():
    b = builder()
    b.uuid = ev.UuidSource()
    b.policy_names = Names()
    return b


def test_drop_becomes_policy_verdict_then_drop_naming_the_deny_rule():
    key = _key("10.0.0.9", "10.0.0.1", 40000, 5432, ev.IPPROTO_TCP, ev.DIR_INGRESS)
    raw = _event(key, ev.EV_DROP, tcp_flags=0x02, pk=1, by=60, rpk=0, rby=0, verdict=ev.VERDICT_DROPPED,
                 reason=ev.DROP_POLICY_DENY, match_type=2, pflags=ev.PF_VERDICT | ev.PF_REASON_DENY,
                 policy_id=9, peer=2)
    e = ev.decode_event(raw)
    assert (e.verdict, e.drop_reason, e.policy_id, e.peer_identity, e.pkt_len) == (2, 181, 9, 2, 60)
    pv, drop = policy_builder().build_raw([raw])
    for f in (pv, drop):
        d = schema.dump_flow(f)
        assert d["verdict"] == "DROPPED" and d["drop_reason_desc"] == "POLICY_DENY"
        assert d["traffic_direction"] == "INGRESS" and d["policy_match_type"] == 2
        assert d["ingress_denied_by"] == [{"name": "deny-db", "namespace": "ns", "revision": "4",
                                           "kind": "CiliumNetworkPolicy"}]
        assert "egress_denied_by" not in d and "ingress_allowed_by" not in d
        assert d["flowscope"]["event"] == "drop" and d["flowscope"]["ingress_packets"] == "1"
    assert pv.event_type == schema.CiliumEventType(type=5, sub_type=0)
    assert drop.event_type == schema.CiliumEventType(type=1, sub_type=181)
    assert pv.uuid != drop.uuid


def test_default_deny_drop_names_the_policies_behind_it():
    raw = _event(_key("10.0.0.9", "10.0.0.1", 5000, 53, ev.IPPROTO_UDP, ev.DIR_INGRESS), ev.EV_DROP,
                 verdict=ev.VERDICT_DROPPED, reason=ev.DROP_POLICY_DENIED, pflags=ev.PF_VERDICT, peer=2)
    flows = policy_builder().build_raw([raw])
    assert [f.event_type.type for f in flows] == [5, 1]
    assert flows[1].event_type.sub_type == 133 and flows[1].drop_reason_desc.value == "POLICY_DENIED"
    assert [p.name for p in flows[1].ingress_denied_by] == ["base"] and flows[1].policy_match_type == 0
    # without a resolver the verdict and reason are still there, just no names
    plain = builder().build_raw([raw])
    assert plain[1].verdict == schema.Verdict.DROPPED and plain[1].ingress_denied_by == []


def test_allowed_new_flow_is_a_policy_verdict_and_later_records_are_traces():
    key = _key("10.0.0.1", "10.0.0.9", 40000, 80, ev.IPPROTO_TCP, ev.DIR_EGRESS)
    new = _event(key, ev.EV_NEW, tcp_flags=0x02, verdict=ev.VERDICT_FORWARDED, match_type=2, pflags=ev.PF_VERDICT,
                 policy_id=7)
    fin = _event(key, ev.EV_CLOSE, tcp_flags=0x11, verdict=ev.VERDICT_FORWARDED, match_type=2,
                 pflags=ev.PF_VERDICT, policy_id=7)
    a, b = policy_builder().build_raw([new, fin])
    assert a.event_type.type == 5 and b.event_type.type == 4
    for f in (a, b):
        assert f.verdict == schema.Verdict.FORWARDED and [p.name for p in f.egress_allowed_by] == ["allow-web"]
        assert f.drop_reason_desc.value == "DROP_REASON_UNKNOWN" and f.policy_match_type == 2


def test_reply_carries_the_connection_verdict_under_the_connection_direction():
    # the reply of an audited ingress connection leaves the endpoint: still INGRESS, still AUDIT
    raw = _event(_key("10.0.0.1", "10.0.0.9", 80, 40000, ev.IPPROTO_TCP, ev.DIR_EGRESS), ev.EV_NEW,
                 tcp_flags=0x12, reply=ev.REPLY_YES, verdict=ev.VERDICT_AUDIT, reason=ev.DROP_POLICY_DENIED,
                 pflags=ev.PF_CT_REPLY)
    b = policy_builder()
    b.ifnames = {7: "lxc7"}
    (f,) = b.build_raw([raw])
    assert f.is_reply is True and f.traffic_direction == schema.TrafficDirection.INGRESS
    assert f.verdict == schema.Verdict.AUDIT and f.event_type.type == 4  # a trace, not a new verdict
    assert "drop_reason_desc" not in schema.dump_flow(f)  # only DROPPED flows carry a drop reason
    assert [p.name for p in f.ingress_denied_by] == ["base"]


def test_expired_entry_keeps_its_policy_state():
    key = _key("10.0.0.1", "10.0.0.9", 40000, 8080, ev.IPPROTO_TCP, ev.DIR_EGRESS)
    val = ev.VAL.pack(1_000, 5_000, 5_000, 10, 1000, 0x1B, ev.REPLY_NO, 0, 0, ev.VERDICT_AUDIT, 2,
                      ev.PF_VERDICT | ev.PF_REASON_DENY, 9, 300, 10)
    e = ev.expire_event(key, val, None, now_mono_ns=9_000)
    assert (e.verdict, e.drop_reason, e.match_type, e.policy_id, e.peer_identity) == (4, 181, 2, 9, 300)
    f = policy_builder().build(e)
    assert f.verdict == schema.Verdict.AUDIT and f.flowscope.event == "expire"
    assert [p.name for p in f.egress_denied_by] == ["deny-db"] and f.event_type.type == 4


def test_tcp_closed_needs_rst_or_fin_both_ways():
    FIN, RST, ACK = ev.TCP_FIN, ev.TCP_RST, 0x10
    assert ev.tcp_closed(ACK | FIN, ACK | FIN)
    assert ev.tcp_closed(ACK, ACK | RST)             # reset by the peer (e.g. iperf3's data connection)
    assert ev.tcp_closed(ACK | RST, None)
    assert ev.tcp_closed(ACK | FIN, None)            # nothing left of the reverse direction
    assert not ev.tcp_closed(ACK | FIN, ACK)          # half-closed: the peer may still send
    assert not ev.tcp_closed(ACK, ACK | FIN)
    assert not ev.tcp_closed(ACK, None)


def test_link_local_addresses_belong_to_the_endpoint_of_their_interface():
    idx = EndpointIndex([EndpointRecord(container_id="c1", ips=["10.0.0.1"], host_ifindex=7, namespace="ns",
                                        pod_name="web-1", labels={"app": "web"})])
    b = ev.FlowBuilder("n1", idx, {7: "lxc7"}, clock_offset_ns=0, uuid_source=lambda: "u")
    nd = _key("fe80::1c", "ff02::1:ff00:1", 135, 0, ev.IPPROTO_ICMPV6, ev.DIR_EGRESS, family=6)
    f = b.build(ev.decode_event(_event(nd, ev.EV_NEW)))
    assert f.source.pod_name == "web-1"                    # the pod's own link-local address
    assert f.destination.labels == ["reserved:world"]      # multicast stays world
    dad = _key("::", "ff02::16", 143, 0, ev.IPPROTO_ICMPV6, ev.DIR_EGRESS, family=6)
    assert b.build(ev.decode_event(_event(dad, ev.EV_NEW))).source.pod_name == "web-1"
    other_if = ev.FlowBuilder("n1", idx, {}, clock_offset_ns=0, uuid_source=lambda: "u")
    k = _key("fe80::1c", "ff02::2", 133, 0, ev.IPPROTO_ICMPV6, ev.DIR_EGRESS, ifindex=9, family=6)
    assert other_if.build(ev.decode_event(_event(k, ev.EV_NEW))).source.labels == ["reserved:world"]


def test_an_entry_is_reported_in_full_when_no_packet_passed_since_its_last_event():
    quiet = ev.VAL.pack(1_000, 5_000, 5_000, 10, 1000, 0, ev.REPLY_NO, 0, 0, 0, 0, 0, 0, 0, 10)
    busy = ev.VAL.pack(1_000, 5_000, 5_000, 12, 1100, 0, ev.REPLY_NO, 0, 0, 0, 0, 0, 0, 0, 10)
    assert ev.reported_in_full(quiet) and not ev.reported_in_full(busy)
