"""Writing compiled policies into the BPF maps: pure encoding and diff plans, then the real maps (root):
what the kernel holds equals what the compiler produced, updates touch only what changed, and the
kernel's LPM answers equal the lookups ``enforcer.decide`` models."""

from __future__ import annotations

import json
import random

import pytest

from enforcer import datapath as edp
from enforcer.compiler import EndpointInfo, compile_policies
from enforcer.decide import _index
from enforcer.identity import IPCache, endpoint_labels
from enforcer.policy import load_policies


def small_policy_set(port: str = "8080"):
    eps = [EndpointInfo(identity=300, labels=endpoint_labels("t", {"app": "api"}), ips=("10.0.0.1", "fd00::1"),
                        name="t/api", ifindex=11),
           EndpointInfo(identity=301, labels=endpoint_labels("t", {"app": "web"}), ips=("10.0.0.2",),
                        name="t/web", ifindex=12),
           EndpointInfo(identity=302, labels=endpoint_labels("t", {"app": "job"}), ips=("10.0.0.3",),
                        name="t/job", ifindex=0)]
    pols = load_policies(f"""
metadata: {{name: api, namespace: t}}
spec:
  endpointSelector: {{matchLabels: {{app: api}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: web}}}}]
    toPorts: [{{ports: [{{port: "{port}", protocol: TCP}}, {{port: "9000", endPort: 9100}}]}}]
  egressDeny:
  - toCIDRSet: [{{cidr: 192.168.0.0/16, except: [192.168.1.0/24]}}]
""")
    return compile_policies(pols, eps, host_ips=["10.0.0.254"])


def test_keys_round_trip_and_port_is_big_endian():
    k = edp.encode_policy_key(300, 1, True, 2, 6, 0x1F40, 13)
    assert len(k) == edp.POLICY_KEY.size == 20
    assert int.from_bytes(k[:4], "little") == 96 + 13
    assert k[16:18] == b"\x1f\x40"  # the port's high bits come first: they are the LPM prefix
    assert edp.decode_policy_key(k) == (300, 1, True, 2, 6, 0x1F40, 13)
    for prefix in ("10.1.0.0/16", "0.0.0.0/0", "fd00::/64", "::/0", "10.0.0.1/32"):
        key = edp.encode_ipcache_key(prefix)
        assert len(key) == edp.IPC_KEY.size == 24
        assert edp.decode_ipcache_key(key) == prefix


def test_kernel_state_mirrors_the_compiled_policy():
    c = small_policy_set()
    st = edp.kernel_state(c)
    assert len(st.policy) == len(c.entries) and len(st.ipcache) == len(c.ipcache)
    # the endpoint without an interface on this node gets no endpoint entry
    assert sorted(edp.EP_KEY.unpack(k)[0] for k in st.endpoints) == [11, 12]
    ident, flags = edp.EP_VAL.unpack(st.endpoints[edp.EP_KEY.pack(11)])
    assert ident == 300 and flags == next(e.flags for e in c.endpoints if e.identity == 300) and flags
    decoded = dict(edp.entries_of(st))
    for e in c.entries:
        assert decoded[e.key] == (e.policy_id, e.audit, e.match_type)


def test_plan_touches_only_changes_in_a_hitless_order():
    a, b = small_policy_set("8080"), small_policy_set("8081")
    old, new = edp.kernel_state(a), edp.kernel_state(b)
    assert edp.plan(new, new).empty
    p = edp.plan(old, new)
    pol = p.diffs[edp.MAP_POLICY]
    assert len(pol.upserts) == 1 and len(pol.deletes) == 1
    assert edp.decode_policy_key(next(iter(pol.upserts)))[5] == 8081
    assert len(p.diffs[edp.MAP_ENDPOINTS]) == 0 and len(p.diffs[edp.MAP_IPCACHE]) == 0
    steps = [(op, name) for op, name, _ in p.steps()]
    assert steps[0] == ("upsert", edp.MAP_POLICY) and steps[-1] == ("delete", edp.MAP_POLICY)
    assert steps.index(("upsert", edp.MAP_ENDPOINTS)) < steps.index(("delete", edp.MAP_POLICY))
    assert p.counts()["policy_upserts"] == 1 and p.counts()["endpoints_deletes"] == 0
    # everything gone: endpoint flags are cleared before the rules they relied on
    gone = edp.plan(old, edp.KernelState())
    order = [(op, name) for op, name, data in gone.steps() if data]
    assert order == [("delete", edp.MAP_ENDPOINTS), ("delete", edp.MAP_IPCACHE), ("delete", edp.MAP_POLICY)]


# --------------------------------------------------------------------------------------------
# The real maps
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def maps():
    from probe.datapath import Datapath

    dp = Datapath()
    try:
        yield edp.PolicyMaps.from_datapath(dp)
    finally:
        dp.close()


def big_policy_set(n_policies: int = 300, n_endpoints: int = 80, seed: int = 1, previous=None):
    from bench.policy_compile import make_endpoints, make_policies

    eps = [EndpointInfo(identity=e.identity, labels=e.labels, ips=e.ips, name=e.name, ifindex=0)
           for e in make_endpoints(n_endpoints)]
    docs = make_policies(n_policies, seed=seed)
    return compile_policies(load_policies(json.dumps(docs)), eps, previous=previous), docs, eps


@pytest.mark.root
def test_maps_hold_exactly_the_compiled_policy_and_update_incrementally(maps):
    c1, docs, eps = big_policy_set()
    r1 = maps.apply(c1)
    assert maps.read() == edp.kernel_state(c1)
    assert r1.counts["policy_upserts"] == len(c1.entries) and r1.sizes["policy"] == len(c1.entries)
    # one policy changes: only its entries are rewritten
    docs[0]["spec"]["endpointSelector"] = {"matchLabels": {"app": "app9"}}
    c2 = compile_policies(load_policies(json.dumps(docs)), eps, previous=c1)
    changed = set(c1.entries) ^ set(c2.entries)
    r2 = maps.apply(c2)
    assert maps.read() == edp.kernel_state(c2)
    assert 0 < r2.counts["policy_upserts"] + r2.counts["policy_deletes"] <= len(changed)
    assert r2.counts["ipcache_upserts"] == r2.counts["ipcache_deletes"] == 0
    assert maps.apply(c2).changed == 0  # nothing to do the second time
    maps.clear()
    assert maps.read().sizes() == {"endpoints": 0, "ipcache": 0, "policy": 0}


@pytest.mark.root
def test_kernel_lpm_answers_equal_the_oracles_lookups(maps):
    c, _, _ = big_policy_set(seed=3)
    maps.apply(c)
    try:
        idx = _index(c)
        rng = random.Random(7)
        groups = sorted({e.key[:5] for e in c.entries})
        for _ in range(3000):
            ep, d, deny, peer, proto = rng.choice(groups)
            if rng.random() < 0.2:
                peer = rng.choice([0, 2, 256, 999])
            port = rng.choice([0, 53, 80, 443, 5432, 8080, rng.randrange(65536)])
            want = idx.lpm(ep, d, deny, peer, proto, port)
            got = maps.lookup_policy(ep, d, deny, peer, proto, port)
            assert got == ((want.policy_id, want.audit, want.match_type) if want else None), (ep, d, deny, peer, proto, port)
        cache = IPCache((e.prefix, e.identity) for e in c.ipcache)
        addrs = [ip for e in c.endpoints for ip in e.ips] + ["8.8.8.8", "1.2.3.4", "2001:db8::1"]
        addrs += [f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}"
                  for _ in range(300)]
        for ip in addrs:
            assert maps.lookup_identity(ip) == cache.lookup(ip), ip
    finally:
        maps.clear()


@pytest.mark.root
def test_a_policy_set_that_does_not_fit_is_refused_before_writing(maps):
    c = small_policy_set()
    maps.apply(c)
    before = maps.read()
    bigger, _, _ = big_policy_set(50, 20)
    saved = dict(maps.capacity)
    maps.capacity[edp.MAP_POLICY] = len(bigger.entries) - 1
    try:
        with pytest.raises(edp.PolicyMapError, match="at most"):
            maps.apply(bigger)
    finally:
        maps.capacity.update(saved)
    assert maps.read() == before
    maps.clear()
