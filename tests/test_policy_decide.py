"""Policy semantics, table-driven: every case is checked twice, through the compiled maps with the
kernel's lookups (``decide``) and straight from the policies (``evaluate``); a property test then checks
that the two agree on random policies and packets."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enforcer.compiler import EndpointInfo, MatchType, compile_policies
from enforcer.decide import Decision, decide, decide_connection, evaluate
from enforcer.identity import endpoint_labels
from enforcer.policy import load_policies
from flowscope import schema

HOST_IP = "10.0.0.1"


def ep(identity, ns, app, ip, local=True):
    return EndpointInfo(identity=identity, labels=endpoint_labels(ns, {"app": app}), ips=(ip,), name=f"{ns}/{app}", local=local)


FE, API, DB, DEV_FE, DEV_API = 300, 301, 302, 303, 304
ENDPOINTS = [
    ep(FE, "prod", "frontend", "10.0.1.1"),
    ep(API, "prod", "api", "10.0.1.2"),
    ep(DB, "prod", "db", "10.0.1.3"),
    ep(DEV_FE, "dev", "frontend", "10.0.2.1"),
    ep(DEV_API, "dev", "api", "10.0.2.2"),
]
IP = {FE: "10.0.1.1", API: "10.0.1.2", DB: "10.0.1.3", DEV_FE: "10.0.2.1", DEV_API: "10.0.2.2", "host": HOST_IP}

F, D, A = schema.Verdict.FORWARDED, schema.Verdict.DROPPED, schema.Verdict.AUDIT
DENIED, DENY = schema.DropReason.POLICY_DENIED, schema.DropReason.POLICY_DENY


def cnp(name, spec, ns="prod", kind="CiliumNetworkPolicy", annotations=None):
    meta = {"name": name}
    if kind == "CiliumNetworkPolicy":
        meta["namespace"] = ns
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": "cilium.io/v2", "kind": kind, "metadata": meta, "spec": spec}


def sel(**labels):
    return {"matchLabels": labels}


def tcp(*ports, proto="TCP"):
    return [{"ports": [{"port": str(p), "protocol": proto} for p in ports]}]


ALLOW_FE_TO_API = cnp("api-allow", {"endpointSelector": sel(app="api"),
                                    "ingress": [{"fromEndpoints": [sel(app="frontend")], "toPorts": tcp(8080)}]})


@dataclass
class Case:
    name: str
    policies: list
    ep: int
    direction: str
    peer: object  # identity key of IP or an address
    proto: str
    dport: int
    verdict: object
    reason: object = None  # drop reason
    by: Optional[str] = None  # deciding policy ref
    match: MatchType = MatchType.NONE
    reply: bool = False
    global_audit: bool = False


CASES = [
    # No policy: everything passes.
    Case("no policy", [], API, "ingress", DEV_FE, "TCP", 22, F),
    # Allow list.
    Case("allow-list allowed", [ALLOW_FE_TO_API], API, "ingress", FE, "TCP", 8080, F, by="prod/api-allow", match=MatchType.L3_L4),
    Case("allow-list other namespace dropped", [ALLOW_FE_TO_API], API, "ingress", DEV_FE, "TCP", 8080, D, DENIED),
    Case("allow-list other port dropped", [ALLOW_FE_TO_API], API, "ingress", FE, "TCP", 8081, D, DENIED),
    Case("allow-list other protocol dropped", [ALLOW_FE_TO_API], API, "ingress", FE, "UDP", 8080, D, DENIED),
    Case("allow-list other peer dropped", [ALLOW_FE_TO_API], API, "ingress", DB, "TCP", 8080, D, DENIED),
    Case("allow-list world dropped", [ALLOW_FE_TO_API], API, "ingress", "8.8.8.8", "TCP", 8080, D, DENIED),
    Case("policy in prod does not touch dev", [ALLOW_FE_TO_API], DEV_API, "ingress", DB, "TCP", 1, F),
    Case("ingress policy leaves egress open", [ALLOW_FE_TO_API], API, "egress", "8.8.8.8", "TCP", 443, F),
    Case("reply of allowed connection", [ALLOW_FE_TO_API], API, "ingress", DB, "TCP", 40000, F, reply=True),
    # Namespaces.
    Case("peer selector naming the namespace", [cnp("x", {"endpointSelector": sel(app="api"), "ingress": [
        {"fromEndpoints": [sel(app="frontend", **{"k8s:io.kubernetes.pod.namespace": "dev"})]}]})],
         API, "ingress", DEV_FE, "TCP", 1, F, by="prod/x", match=MatchType.L3_ONLY),
    Case("...and no longer the own namespace", [cnp("x", {"endpointSelector": sel(app="api"), "ingress": [
        {"fromEndpoints": [sel(app="frontend", **{"k8s:io.kubernetes.pod.namespace": "dev"})]}]})],
         API, "ingress", FE, "TCP", 1, D, DENIED),
    Case("{} peer = own namespace", [cnp("x", {"endpointSelector": sel(app="api"), "ingress": [{"fromEndpoints": [{}]}]})],
         API, "ingress", DB, "TCP", 5, F, by="prod/x", match=MatchType.L3_ONLY),
    Case("{} peer excludes other namespaces", [cnp("x", {"endpointSelector": sel(app="api"), "ingress": [{"fromEndpoints": [{}]}]})],
         API, "ingress", DEV_FE, "TCP", 5, D, DENIED),
    Case("{} peer excludes world", [cnp("x", {"endpointSelector": sel(app="api"), "ingress": [{"fromEndpoints": [{}]}]})],
         API, "ingress", "1.1.1.1", "TCP", 5, D, DENIED),
    Case("cluster-wide subject in every namespace", [cnp("cw", {"endpointSelector": sel(app="api"), "ingress": [
        {"fromEndpoints": [sel(app="frontend")]}]}, kind="CiliumClusterwideNetworkPolicy")],
         DEV_API, "ingress", FE, "TCP", 5, F, by="cw", match=MatchType.L3_ONLY),
    Case("cluster-wide peer selector spans namespaces", [cnp("cw", {"endpointSelector": sel(app="api"), "ingress": [
        {"fromEndpoints": [sel(app="frontend")]}]}, kind="CiliumClusterwideNetworkPolicy")],
         API, "ingress", DEV_FE, "TCP", 5, F, by="cw", match=MatchType.L3_ONLY),
    Case("matchExpressions NotIn", [cnp("x", {"endpointSelector": sel(app="api"), "ingress": [
        {"fromEndpoints": [{"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["db"]}]}]}]})],
         API, "ingress", DB, "TCP", 5, D, DENIED),
    # Deny wins.
    Case("deny beats allow in the same policy", [cnp("x", {"endpointSelector": sel(app="api"),
                                                           "ingress": [{"fromEntities": ["all"]}],
                                                           "ingressDeny": [{"fromEndpoints": [sel(app="frontend")], "toPorts": tcp(22)}]})],
         API, "ingress", FE, "TCP", 22, D, DENY, by="prod/x", match=MatchType.L3_L4),
    Case("...other ports still allowed", [cnp("x", {"endpointSelector": sel(app="api"),
                                                    "ingress": [{"fromEntities": ["all"]}],
                                                    "ingressDeny": [{"fromEndpoints": [sel(app="frontend")], "toPorts": tcp(22)}]})],
         API, "ingress", FE, "TCP", 80, F, by="prod/x", match=MatchType.ALL),
    Case("broad deny beats narrow allow of another policy", [ALLOW_FE_TO_API, cnp("deny-8080", {
        "endpointSelector": sel(app="api"), "ingressDeny": [{"toPorts": tcp(8000, 8080)}]})],
         API, "ingress", FE, "TCP", 8080, D, DENY, by="prod/deny-8080", match=MatchType.L4_ONLY),
    Case("L3-only deny beats L3+L4 allow", [ALLOW_FE_TO_API, cnp("deny-fe", {
        "endpointSelector": sel(app="api"), "ingressDeny": [{"fromEndpoints": [sel(app="frontend")]}]})],
         API, "ingress", FE, "TCP", 8080, D, DENY, by="prod/deny-fe", match=MatchType.L3_ONLY),
    Case("deny without default deny", [cnp("x", {"endpointSelector": sel(app="api"), "enableDefaultDeny": {"ingress": False},
                                                 "ingressDeny": [{"fromEntities": ["world"]}]})],
         API, "ingress", "8.8.8.8", "UDP", 53, D, DENY, by="prod/x", match=MatchType.L3_ONLY),
    Case("...the rest passes", [cnp("x", {"endpointSelector": sel(app="api"), "enableDefaultDeny": {"ingress": False},
                                          "ingressDeny": [{"fromEntities": ["world"]}]})],
         API, "ingress", FE, "UDP", 53, F),
    Case("deny-only policy enables default deny", [cnp("x", {"endpointSelector": sel(app="api"),
                                                             "ingressDeny": [{"fromEntities": ["world"]}]})],
         API, "ingress", FE, "UDP", 53, D, DENIED),
    Case("empty rule denies all", [cnp("x", {"endpointSelector": sel(app="api"), "ingress": [{}]})],
         API, "ingress", FE, "TCP", 80, D, DENIED),
    # CIDR and except.
    *[Case(f"CIDR except {peer}", [cnp("cidr", {"endpointSelector": sel(app="api"), "egress": [
        {"toCIDRSet": [{"cidr": "192.0.2.0/24", "except": ["192.0.2.128/25"]}]}, {"toCIDR": ["10.0.0.0/8"]}]})],
           API, "egress", peer, "TCP", 443, v, r, "prod/cidr" if v == F else None, MatchType.L3_ONLY if v == F else MatchType.NONE)
      for peer, v, r in [("192.0.2.10", F, None), ("192.0.2.200", D, DENIED), ("8.8.8.8", D, DENIED),
                         ("10.9.9.9", F, None), (DB, D, DENIED), ("host", D, DENIED)]],
    Case("0.0.0.0/0 is world", [cnp("all", {"endpointSelector": sel(app="api"), "egress": [{"toCIDR": ["0.0.0.0/0"]}]})],
         API, "egress", "2001:db8::1", "TCP", 443, F, by="prod/all", match=MatchType.L3_ONLY),
    # Entities.
    *[Case(f"entity {ent} -> {peer}", [cnp("ent", {"endpointSelector": sel(app="api"), "egress": [{"toEntities": [ent]}]})],
           API, "egress", peer, "TCP", 80, v, None if v == F else DENIED, "prod/ent" if v == F else None,
           (MatchType.ALL if ent == "all" else MatchType.L3_ONLY) if v == F else MatchType.NONE)
      for ent, peer, v in [("world", "8.8.8.8", F), ("world", "2001:db8::1", F), ("world", DB, D), ("world", "host", D),
                           ("host", "host", F), ("host", "8.8.8.8", D), ("cluster", DEV_FE, F), ("cluster", "host", F),
                           ("cluster", "8.8.8.8", D), ("all", "8.8.8.8", F), ("all", DB, F)]],
    # Port ranges, UDP, ICMP, SCTP.
    *[Case(f"port range {port}", [cnp("range", {"endpointSelector": sel(app="api"), "ingress": [
        {"toPorts": [{"ports": [{"port": "8000", "endPort": 8080, "protocol": "TCP"}]}]}]})],
           API, "ingress", "8.8.8.8", "TCP", port, v, None if v == F else DENIED, "prod/range" if v == F else None,
           MatchType.L4_ONLY if v == F else MatchType.NONE)
      for port, v in [(7999, D), (8000, F), (8031, F), (8064, F), (8080, F), (8081, D)]],
    Case("UDP allowed", [cnp("dns", {"endpointSelector": sel(app="api"), "egress": [{"toEntities": ["world"], "toPorts": tcp(53, proto="UDP")}]})],
         API, "egress", "8.8.8.8", "UDP", 53, F, by="prod/dns", match=MatchType.L3_L4),
    Case("...TCP to the same port dropped", [cnp("dns", {"endpointSelector": sel(app="api"), "egress": [{"toEntities": ["world"], "toPorts": tcp(53, proto="UDP")}]})],
         API, "egress", "8.8.8.8", "TCP", 53, D, DENIED),
    Case("ANY covers SCTP", [cnp("any", {"endpointSelector": sel(app="api"), "ingress": [{"toPorts": [{"ports": [{"port": "9"}]}]}]})],
         API, "ingress", FE, "SCTP", 9, F, by="prod/any", match=MatchType.L4_ONLY),
    Case("ANY does not cover ICMP", [cnp("any", {"endpointSelector": sel(app="api"), "ingress": [{"toPorts": [{"ports": [{"port": "0"}]}]}]})],
         API, "ingress", FE, "ICMP", 8, D, DENIED),
    Case("ICMP echo allowed", [cnp("ping", {"endpointSelector": sel(app="api"), "ingress": [
        {"fromEndpoints": [sel(app="frontend")], "icmps": [{"fields": [{"type": "EchoRequest"}]}]}]})],
         API, "ingress", FE, "ICMP", 8, F, by="prod/ping", match=MatchType.L3_L4),
    Case("ICMP timestamp dropped", [cnp("ping", {"endpointSelector": sel(app="api"), "ingress": [
        {"fromEndpoints": [sel(app="frontend")], "icmps": [{"fields": [{"type": "EchoRequest"}]}]}]})],
         API, "ingress", FE, "ICMP", 13, D, DENIED),
    Case("ICMPv6 echo needs an IPv6 rule", [cnp("ping", {"endpointSelector": sel(app="api"), "ingress": [
        {"fromEndpoints": [sel(app="frontend")], "icmps": [{"fields": [{"type": "EchoRequest"}]}]}]})],
         API, "ingress", FE, "ICMPv6", 128, D, DENIED),
    # Both directions.
    Case("egress allowed", [cnp("fe-out", {"endpointSelector": sel(app="frontend"), "egress": [{"toEndpoints": [sel(app="api")], "toPorts": tcp(8080)}]})],
         FE, "egress", API, "TCP", 8080, F, by="prod/fe-out", match=MatchType.L3_L4),
    Case("egress to other peer dropped", [cnp("fe-out", {"endpointSelector": sel(app="frontend"), "egress": [{"toEndpoints": [sel(app="api")], "toPorts": tcp(8080)}]})],
         FE, "egress", DB, "TCP", 8080, D, DENIED),
    Case("egress policy leaves ingress open", [cnp("fe-out", {"endpointSelector": sel(app="frontend"), "egress": [{"toEndpoints": [sel(app="api")]}]})],
         FE, "ingress", "8.8.8.8", "TCP", 80, F),
    Case("egress reply passes", [cnp("fe-out", {"endpointSelector": sel(app="frontend"), "egress": [{}]})],
         FE, "egress", API, "TCP", 40000, F, reply=True),
    # Attribution.
    Case("most specific level decides", [cnp("a-l4", {"endpointSelector": sel(app="api"), "ingress": [{"toPorts": tcp(8080)}]}),
                                         cnp("b-l3l4", {"endpointSelector": sel(app="api"), "ingress": [{"fromEndpoints": [sel(app="frontend")], "toPorts": tcp(8080)}]})],
         API, "ingress", FE, "TCP", 8080, F, by="prod/b-l3l4", match=MatchType.L3_L4),
    Case("lowest policy id on a level", [cnp("b", {"endpointSelector": sel(app="api"), "ingress": [{"toPorts": tcp(80)}]}),
                                         cnp("a", {"endpointSelector": sel(app="api"), "ingress": [{"toPorts": tcp(80)}]})],
         API, "ingress", FE, "TCP", 80, F, by="prod/a", match=MatchType.L4_ONLY),
    # Audit.
    Case("audit policy alone: would-drop is AUDIT", [cnp("aud", {"endpointSelector": sel(app="api"), "auditMode": True,
                                                                  "ingress": [{"fromEndpoints": [sel(app="frontend")]}]})],
         API, "ingress", DB, "TCP", 80, A, DENIED),
    Case("audit policy alone: allowed is FORWARDED", [cnp("aud", {"endpointSelector": sel(app="api"), "auditMode": True,
                                                                   "ingress": [{"fromEndpoints": [sel(app="frontend")]}]})],
         API, "ingress", FE, "TCP", 80, F, by="prod/aud", match=MatchType.L3_ONLY),
    Case("audit annotation", [cnp("aud", {"endpointSelector": sel(app="api"), "ingress": [{}]},
                                  annotations={"flowscope.io/audit-mode": "true"})],
         API, "ingress", DB, "TCP", 80, A, DENIED),
    Case("audit allow cannot weaken an enforcing policy", [ALLOW_FE_TO_API, cnp("aud", {
        "endpointSelector": sel(app="api"), "auditMode": True, "ingress": [{"fromEndpoints": [sel(app="db")]}]})],
         API, "ingress", DB, "TCP", 8080, D, DENIED),
    Case("audit deny reports, traffic passes", [cnp("allow-all", {"endpointSelector": sel(app="api"), "ingress": [{"fromEntities": ["all"]}]}),
                                                cnp("aud", {"endpointSelector": sel(app="api"), "auditMode": True,
                                                            "ingressDeny": [{"fromEndpoints": [sel(app="frontend")], "toPorts": tcp(80)}]})],
         API, "ingress", FE, "TCP", 80, A, DENY, by="prod/aud", match=MatchType.L3_L4),
    Case("enforcing deny beats audit deny", [cnp("a-aud", {"endpointSelector": sel(app="api"), "auditMode": True,
                                                           "ingressDeny": [{"fromEndpoints": [sel(app="frontend")], "toPorts": tcp(80)}]}),
                                             cnp("b-deny", {"endpointSelector": sel(app="api"), "ingressDeny": [{"fromEntities": ["all"]}]})],
         API, "ingress", FE, "TCP", 80, D, DENY, by="prod/b-deny", match=MatchType.ALL),
    Case("global audit: default-deny drop becomes AUDIT", [ALLOW_FE_TO_API], API, "ingress", DEV_FE, "TCP", 8080, A, DENIED, global_audit=True),
    Case("global audit: deny becomes AUDIT", [cnp("x", {"endpointSelector": sel(app="api"), "ingressDeny": [{"fromEntities": ["all"]}]})],
         API, "ingress", FE, "TCP", 1, A, DENY, by="prod/x", match=MatchType.ALL, global_audit=True),
    Case("global audit: allowed stays FORWARDED", [ALLOW_FE_TO_API], API, "ingress", FE, "TCP", 8080, F, by="prod/api-allow",
         match=MatchType.L3_L4, global_audit=True),
]


def _ip(peer) -> str:
    return IP.get(peer, peer) if not isinstance(peer, str) or peer == "host" else peer


def _same(kernel: Decision, reference: Decision) -> bool:
    """Equal decisions. The reference knows no CIDR identities: an outside peer is world (2) there."""
    if reference.peer_identity == 2:
        kernel = dataclasses.replace(kernel, peer_identity=2)
    return kernel == reference


def _summary(dec: Decision):
    refs = dec.allowed_by + dec.denied_by
    return dec.verdict, dec.drop_reason, refs[0].ref if refs else None, dec.match_type


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_semantics(case: Case):
    policies = load_policies(json.dumps(case.policies)) if case.policies else []
    compiled = compile_policies(policies, ENDPOINTS, host_ips=[HOST_IP], global_audit=case.global_audit)
    peer_ip = _ip(case.peer)
    expected = (case.verdict, case.reason, case.by, case.match)
    kernel = decide(compiled, case.ep, case.direction, peer_ip, case.proto, case.dport, is_reply=case.reply)
    reference = evaluate(policies, ENDPOINTS, case.ep, case.direction, peer_ip, case.proto, case.dport,
                         is_reply=case.reply, host_ips=[HOST_IP], global_audit=case.global_audit)
    assert _summary(kernel) == expected, kernel.reason
    assert _summary(reference) == expected, reference.reason
    assert _same(kernel, reference)


def test_decision_flow_fields_build_a_valid_flow():
    policies = load_policies(json.dumps([ALLOW_FE_TO_API]))
    compiled = compile_policies([p.with_revision(3) for p in policies], ENDPOINTS, host_ips=[HOST_IP])
    dropped = decide(compiled, API, "ingress", IP[DEV_FE], "tcp", 8080)
    flow = schema.Flow(time=1, **dropped.flow_fields())
    assert flow.verdict == D and flow.drop_reason_desc == DENIED and flow.policy_match_type == 0
    allowed = decide(compiled, API, "ingress", IP[FE], 6, 8080)
    flow = schema.Flow(time=1, **allowed.flow_fields())
    assert flow.ingress_allowed_by[0].name == "api-allow" and flow.ingress_allowed_by[0].revision == "3"
    assert flow.ingress_allowed_by[0].namespace == "prod" and flow.policy_match_type == 2
    assert "k8s:io.cilium.k8s.policy.name=api-allow" in flow.ingress_allowed_by[0].labels
    line = schema.flow_to_json(flow)
    assert b'"ingress_allowed_by"' in line


def test_decide_connection_checks_both_ends():
    policies = load_policies(json.dumps([ALLOW_FE_TO_API, cnp("fe-out", {"endpointSelector": sel(app="frontend"), "egress": [{"toEndpoints": [sel(app="db")]}]})]))
    compiled = compile_policies(policies, ENDPOINTS, host_ips=[HOST_IP])
    out, inn = decide_connection(compiled, IP[FE], IP[API], "tcp", 8080)
    assert out.verdict == D and inn.verdict == F
    out, inn = decide_connection(compiled, "8.8.8.8", IP[API], "tcp", 8080)
    assert out is None and inn.verdict == D


@pytest.mark.parametrize("args,message", [
    (("sideways", "1.1.1.1", "tcp", 1), "'sideways' is not a direction"),
    (("ingress", "1.1.1.1", "quic", 1), "'quic' is not a protocol"),
    (("ingress", "1.1.1.1", 0, 1), "a packet has a concrete protocol"),
    (("ingress", "1.1.1.1", "tcp", 70000), "70000 is not a port"),
    (("ingress", "1.1.1.300", "tcp", 1), "does not appear to be an IPv4 or IPv6 address"),
])
def test_decide_rejects_bad_arguments(args, message):
    compiled = compile_policies([], ENDPOINTS)
    with pytest.raises(ValueError, match=message):
        decide(compiled, API, *args)


# ---------------------------------------------------------------------------------------------
# Property: compiled maps + kernel lookups == the policies' meaning, on random inputs
# ---------------------------------------------------------------------------------------------

_selectors = st.sampled_from([
    {}, sel(app="frontend"), sel(app="api"), sel(app="db"),
    {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["db"]}]},
    sel(app="frontend", **{"k8s:io.kubernetes.pod.namespace": "dev"}),
    {"matchExpressions": [{"key": "io.kubernetes.pod.namespace", "operator": "Exists"}]},
])
_cidrs = st.sampled_from(["192.0.2.0/24", "192.0.2.0/25", "10.0.0.0/8", "8.8.8.8/32", "0.0.0.0/0", "2001:db8::/32", "10.0.1.3/32"])
_cidr_sets = st.sampled_from([{"cidr": "192.0.2.0/24", "except": ["192.0.2.128/25"]},
                              {"cidr": "0.0.0.0/0", "except": ["8.8.0.0/16"]},
                              {"cidr": "10.0.0.0/8", "except": ["10.0.1.0/24", "10.9.0.0/16"]}])
_ports = st.sampled_from([{"port": "80", "protocol": "TCP"}, {"port": "53", "protocol": "UDP"}, {"port": "8000", "endPort": 8080},
                          {"port": "0", "protocol": "TCP"}, {"port": "443"}, {"port": "8", "protocol": "ICMP"},
                          {"port": "1000", "endPort": 9000, "protocol": "TCP"}])


@st.composite
def _rules(draw, prefix):
    rule = {}
    if draw(st.booleans()):
        rule[f"{prefix}Endpoints"] = draw(st.lists(_selectors, min_size=1, max_size=2))
    if draw(st.integers(0, 3)) == 0:
        rule[f"{prefix}CIDR"] = draw(st.lists(_cidrs, min_size=1, max_size=2))
    if draw(st.integers(0, 3)) == 0:
        rule[f"{prefix}CIDRSet"] = [draw(_cidr_sets)]
    if draw(st.integers(0, 2)) == 0:
        rule[f"{prefix}Entities"] = draw(st.lists(st.sampled_from(["world", "host", "all", "cluster"]), min_size=1, max_size=2))
    if draw(st.booleans()):
        rule["toPorts"] = [{"ports": draw(st.lists(_ports, min_size=1, max_size=2))}]
    if draw(st.integers(0, 4)) == 0:
        rule["icmps"] = [{"fields": [{"type": draw(st.sampled_from([8, 0, "EchoRequest"]))}]}]
    return rule


@st.composite
def _policy(draw, i):
    spec = {"endpointSelector": draw(_selectors)}
    for key, prefix in (("ingress", "from"), ("egress", "to"), ("ingressDeny", "from"), ("egressDeny", "to")):
        if draw(st.integers(0, 2)) == 0 if key.endswith("Deny") else draw(st.booleans()):
            spec[key] = draw(st.lists(_rules(prefix), min_size=1, max_size=3))
    if draw(st.integers(0, 3)) == 0:
        spec["auditMode"] = True
    if draw(st.integers(0, 5)) == 0:
        spec["enableDefaultDeny"] = {"ingress": draw(st.booleans()), "egress": draw(st.booleans())}
    kind = draw(st.sampled_from(["CiliumNetworkPolicy", "CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"]))
    return cnp(f"p{i}", spec, ns=draw(st.sampled_from(["prod", "dev"])), kind=kind)


_PEERS = list(IP.values()) + ["192.0.2.10", "192.0.2.200", "8.8.8.8", "8.8.4.4", "10.9.9.9", "10.0.1.77", "1.1.1.1", "2001:db8::1", "2001:db9::1"]


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.integers(1, 4).flatmap(lambda n: st.tuples(*[_policy(i) for i in range(n)])),
       st.lists(st.tuples(st.sampled_from([FE, API, DB, DEV_FE, DEV_API]), st.sampled_from(["ingress", "egress"]),
                          st.sampled_from(_PEERS), st.sampled_from(["TCP", "UDP", "ICMP", "SCTP"]),
                          st.sampled_from([80, 53, 443, 8000, 8080, 8081, 8, 0, 999, 1000, 9000])),
                min_size=1, max_size=12),
       st.booleans())
def test_compiled_decision_equals_reference(docs, packets, global_audit):
    policies = load_policies(json.dumps(list(docs)))
    compiled = compile_policies(policies, ENDPOINTS, host_ips=[HOST_IP], global_audit=global_audit)
    for ep_id, direction, peer, proto, port in packets:
        kernel = decide(compiled, ep_id, direction, peer, proto, port)
        reference = evaluate(policies, ENDPOINTS, ep_id, direction, peer, proto, port, host_ips=[HOST_IP],
                             global_audit=global_audit)
        assert _same(kernel, reference), (ep_id, direction, peer, proto, port, kernel.reason, reference.reason)
