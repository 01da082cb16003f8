"""The compiler's output: entries, ipcache, flags, stable numbering, bounds, determinism."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer.compiler import (ANY, FLAG_AUDIT, FLAG_EGRESS_AUDIT_POLICY, FLAG_EGRESS_DENY, FLAG_EGRESS_POLICY,
                               FLAG_INGRESS_POLICY, CompiledPolicy, CompileError, EndpointInfo,
                               MatchType, PolicyEntry, best_intervals, compile_policies, port_blocks, required_cidrs)
from enforcer.identity import FIRST_LOCAL_IDENTITY, endpoint_labels
from enforcer.policy import load_policies
from flowscope.endpoints import EndpointRecord


def ep(identity, ns, app, ip, local=True, ifindex=0):
    return EndpointInfo(identity=identity, labels=endpoint_labels(ns, {"app": app}), ips=(ip,),
                        name=f"{ns}/{app}", local=local, ifindex=ifindex)


ENDPOINTS = [ep(300, "prod", "frontend", "10.0.1.1", ifindex=11), ep(301, "prod", "api", "10.0.1.2", ifindex=12),
             ep(302, "prod", "db", "10.0.1.3", ifindex=13), ep(400, "prod", "remote", "10.0.9.9", local=False)]

POLICIES = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts: [{ports: [{port: "8000", endPort: 8080, protocol: TCP}]}]
  egressDeny:
  - toCIDRSet: [{cidr: 192.0.2.0/24, except: [192.0.2.128/25]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: db}}
  auditMode: true
  egress:
  - toEntities: [world]
"""


def test_exact_output_for_a_small_policy_set():
    c = compile_policies(load_policies(POLICIES), ENDPOINTS, host_ips=["10.0.0.1"])
    net, net_except = FIRST_LOCAL_IDENTITY, FIRST_LOCAL_IDENTITY + 1
    assert c.cidr_identities == {"192.0.2.0/24": net, "192.0.2.128/25": net_except}
    assert [(e.prefix, e.identity) for e in c.ipcache] == [
        ("0.0.0.0/0", 2), ("10.0.0.1/32", 1), ("10.0.1.1/32", 300), ("10.0.1.2/32", 301), ("10.0.1.3/32", 302),
        ("10.0.9.9/32", 400), ("192.0.2.0/24", net), ("192.0.2.128/25", net_except), ("::/0", 2)]
    assert [(e.identity, e.flags, e.ifindex) for e in c.endpoints] == [
        # a deny rule puts the direction under default deny too (Cilium)
        (300, 0, 11), (301, FLAG_INGRESS_POLICY | FLAG_EGRESS_POLICY | FLAG_EGRESS_DENY, 12), (302, FLAG_EGRESS_AUDIT_POLICY, 13)]
    assert [(p.id, p.ref) for p in c.policies] == [(1, "prod/api"), (2, "prod/db")]
    assert list(c.entries) == [
        # ingress allow frontend -> 8000-8080: blocks 8000/10 (8000-8063), 8064/12 (8064-8079), 8080/16
        PolicyEntry(301, 0, False, 300, 6, 8000, 10, False, 1, MatchType.L3_L4),
        PolicyEntry(301, 0, False, 300, 6, 8064, 12, False, 1, MatchType.L3_L4),
        PolicyEntry(301, 0, False, 300, 6, 8080, 16, False, 1, MatchType.L3_L4),
        # egress deny to 192.0.2.0/24 but not its except: only the /24's identity
        PolicyEntry(301, 1, True, net, ANY, 0, 0, False, 1, MatchType.L3_ONLY),
        # db (audit mode): egress to world = reserved world + every CIDR identity
        PolicyEntry(302, 1, False, 2, ANY, 0, 0, True, 2, MatchType.L3_ONLY),
        PolicyEntry(302, 1, False, net, ANY, 0, 0, True, 2, MatchType.L3_ONLY),
        PolicyEntry(302, 1, False, net_except, ANY, 0, 0, True, 2, MatchType.L3_ONLY),
    ]
    assert c.identities[net] == ("cidr:192.0.2.0/24", "reserved:world")
    assert c.identities[301] == ("k8s:app=api", "k8s:io.kubernetes.pod.namespace=prod")
    assert c.stats() == {"endpoints": 3, "ipcache": 9, "entries": 7, "deny_entries": 1, "policies": 2, "identities": 8}


def test_global_audit_flag_and_ranges():
    c = compile_policies(load_policies(POLICIES), ENDPOINTS, global_audit=True)
    assert all(e.flags & FLAG_AUDIT for e in c.endpoints) and c.global_audit
    assert c.entries[0].port_range == (8000, 8063) and c.entries[2].port_range == (8080, 8080)


def test_overlapping_rules_become_disjoint_blocks_with_the_best_rule():
    text = """
metadata: {name: a-wide, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress: [{toPorts: [{ports: [{port: "1", endPort: 65535, protocol: TCP}]}]}]
---
metadata: {name: b-narrow, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress: [{toPorts: [{ports: [{port: "80", protocol: TCP}]}]}]
---
metadata: {name: c-audit, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: api}}
  auditMode: true
  ingress: [{toPorts: [{ports: [{port: "0", protocol: TCP}]}]}]
"""
    c = compile_policies(load_policies(text), ENDPOINTS)
    tcp = [e for e in c.entries if e.proto == 6]
    covered = []
    for e in tcp:
        lo, hi = e.port_range
        covered.append((lo, hi, e.policy_id, e.audit))
    covered.sort()
    # Port 0 only by the audit policy, 1-65535 by a-wide (lowest id, enforcing), nothing by b-narrow.
    assert covered[0] == (0, 0, 3, True)
    assert all(pid == 1 and not audit for _, _, pid, audit in covered[1:])
    assert sum(hi - lo + 1 for lo, hi, _, _ in covered) == 65536
    assert all(covered[i][1] < covered[i + 1][0] for i in range(len(covered) - 1))  # disjoint


def test_ipcache_endpoint_wins_over_equal_cidr_and_conflicts_are_errors():
    text = """
metadata: {name: x, namespace: prod}
spec:
  endpointSelector: {}
  egress: [{toCIDR: [10.0.1.3/32, 0.0.0.0/0]}]
"""
    c = compile_policies(load_policies(text), ENDPOINTS)
    assert {e.prefix: e.identity for e in c.ipcache}["10.0.1.3/32"] == 302
    assert "0.0.0.0/0" not in c.cidr_identities  # /0 is the world identity
    with pytest.raises(CompileError, match="address 10.0.1.1 belongs to both"):
        compile_policies([], ENDPOINTS + [ep(500, "prod", "other", "10.0.1.1")])
    with pytest.raises(CompileError, match="identity 300 is given two label sets"):
        compile_policies([], ENDPOINTS + [ep(300, "dev", "frontend", "10.0.2.1")])
    with pytest.raises(CompileError, match="is not an IP address"):
        compile_policies([], [ep(300, "prod", "x", "10.0.0.300")])
    with pytest.raises(CompileError, match="not an endpoint identity"):
        compile_policies([], [ep(FIRST_LOCAL_IDENTITY, "prod", "x", "10.0.0.3")])
    p = load_policies(text)
    with pytest.raises(CompileError, match="given twice"):
        compile_policies(p + p, ENDPOINTS)


def test_max_entries_is_enforced():
    text = """
metadata: {name: x, namespace: prod}
spec:
  endpointSelector: {}
  ingress: [{toPorts: [{ports: [{port: "1", endPort: 65534, protocol: ANY}]}]}]
"""
    with pytest.raises(CompileError, match="more than 50 policy map entries"):
        compile_policies(load_policies(text), ENDPOINTS, max_entries=50)


def test_stable_numbers_and_revision_across_compiles():
    pols = load_policies(POLICIES)
    first = compile_policies(pols, ENDPOINTS)
    same = compile_policies(list(reversed(pols)), list(reversed(ENDPOINTS)), previous=first)
    assert same.digest == first.digest and same.revision == first.revision == 1
    # A new policy sorting before the others keeps the old ids; its CIDR gets a new identity.
    extra = load_policies("""
metadata: {name: aaa, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: frontend}}
  egress: [{toCIDR: [198.51.100.0/24]}]
""")
    second = compile_policies(extra + pols, ENDPOINTS, previous=same)
    assert {p.ref: p.id for p in second.policies} == {"prod/api": 1, "prod/db": 2, "prod/aaa": 3}
    assert second.cidr_identities["192.0.2.0/24"] == first.cidr_identities["192.0.2.0/24"]
    assert second.cidr_identities["198.51.100.0/24"] == FIRST_LOCAL_IDENTITY + 2
    assert second.revision == 2 and second.digest != first.digest
    # Without previous, numbering is by name: different ids, same meaning.
    fresh = compile_policies(extra + pols, ENDPOINTS)
    assert {p.ref: p.id for p in fresh.policies} == {"prod/aaa": 1, "prod/api": 2, "prod/db": 3}
    # Identities allocated elsewhere are used.
    given_ids = compile_policies(pols, ENDPOINTS, cidr_identities={"192.0.2.0/24": FIRST_LOCAL_IDENTITY + 40})
    assert given_ids.cidr_identities["192.0.2.0/24"] == FIRST_LOCAL_IDENTITY + 40


def test_revisions_of_policies_reach_the_policy_table():
    pols = [p.with_revision(i + 5) for i, p in enumerate(load_policies(POLICIES))]
    c = compile_policies(pols, ENDPOINTS)
    assert [(r.ref, r.revision) for r in c.policies] == [("prod/api", 5), ("prod/db", 6)]
    assert c.policy(1).to_flow().revision == "5" and c.policy(99) is None


def test_json_round_trip():
    c = compile_policies(load_policies(POLICIES), ENDPOINTS)
    back = CompiledPolicy.from_json(c.to_json())
    assert back == c and back.entries == c.entries
    assert json.loads(c.to_json())["entries"][0] == [301, 0, False, 300, 6, 8000, 10, False, 1, 2]


def test_endpoint_info_from_registry_record():
    rec = EndpointRecord(container_id="c1", namespace="prod", pod_name="api-1", labels={"app": "api"},
                         ips=["10.0.1.2/24"], host_ifindex=12, identity=301)
    info = EndpointInfo.from_record(rec)
    assert info == EndpointInfo(identity=301, labels=("k8s:app=api", "k8s:io.kubernetes.pod.namespace=prod"),
                                ips=("10.0.1.2",), name="prod/api-1", ifindex=12)


def test_required_cidrs():
    assert required_cidrs(load_policies(POLICIES)) == {"192.0.2.0/24", "192.0.2.128/25"}


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 65535).flatmap(lambda lo: st.tuples(st.just(lo), st.integers(lo, 65535))))
def test_port_blocks_cover_exactly(bounds):
    lo, hi = bounds
    blocks = port_blocks(lo, hi)
    assert 1 <= len(blocks) <= 30
    pos = lo
    for start, plen in blocks:
        size = 1 << (16 - plen)
        assert start == pos and start % size == 0  # contiguous and aligned
        pos += size
    assert pos == hi + 1


def test_port_blocks_examples():
    assert port_blocks(0, 65535) == [(0, 0)]
    assert port_blocks(80, 80) == [(80, 16)]
    assert port_blocks(1, 65534) .__len__() == 30


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40), st.integers(0, 5)), min_size=1, max_size=8))
def test_best_intervals_equals_brute_force(raw):
    items = [(min(a, b), max(a, b), r) for a, b, r in raw]
    out = best_intervals(items)
    expect = {p: min(r for lo, hi, r in items if lo <= p <= hi) for p in range(41) if any(lo <= p <= hi for lo, hi, _ in items)}
    got = {p: r for lo, hi, r in out for p in range(lo, hi + 1)}
    assert got == expect
    assert all(out[i][1] < out[i + 1][0] for i in range(len(out) - 1))
    assert all(not (out[i][1] + 1 == out[i + 1][0] and out[i][2] == out[i + 1][2]) for i in range(len(out) - 1))


def test_thousand_rules_stay_bounded():
    """1,000 rules over 100 endpoints compile into a bounded number of entries (time: bench/)."""
    rng = random.Random(7)
    endpoints = [ep(256 + i, f"ns{i % 5}", f"app{i}", f"10.1.{i // 250}.{i % 250 + 1}") for i in range(100)]
    docs = []
    for i in range(1000):
        ns = f"ns{i % 5}"
        peer = {"matchLabels": {"app": f"app{rng.randrange(100)}", "k8s:io.kubernetes.pod.namespace": f"ns{rng.randrange(5)}"}}
        lo = rng.randrange(1, 60000)
        port = {"port": str(lo), "protocol": "TCP"} if i % 3 else {"port": str(lo), "endPort": lo + rng.randrange(1, 2000), "protocol": "TCP"}
        rule = {"fromEndpoints": [peer], "toPorts": [{"ports": [port]}]} if i % 10 else {"fromCIDR": [f"198.{i % 256}.0.0/16"]}
        docs.append({"metadata": {"name": f"p{i}", "namespace": ns},
                     "spec": {"endpointSelector": {"matchLabels": {"app": f"app{rng.randrange(100)}"}},
                              "ingress" if i % 7 else "ingressDeny": [rule]}})
    c = compile_policies(load_policies(docs), endpoints)
    # Each rule selects at most one subject and one peer identity here: <= 30 blocks per rule.
    assert 0 < len(c.entries) <= 1000 * 30
    assert len(c.policies) == 1000
