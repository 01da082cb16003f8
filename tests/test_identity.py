"""Identities: numbering, stability across allocator instances and processes, GC, the IP cache."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from enforcer.identity import (FIRST_LOCAL_IDENTITY, IdentityAllocator, IdentityError, IdentityStoreError, IPCache,
                               canonical_labels, cidr_label, cidr_labels, endpoint_labels)
from flowscope.endpoints import EndpointRecord


def test_reserved_identities(tmp_path):
    alloc = IdentityAllocator(tmp_path / "ids.json")
    assert alloc.allocate(["reserved:host"]) == 1
    assert alloc.allocate(["reserved:world"]) == 2
    assert alloc.labels_for(1) == ("reserved:host",)
    assert alloc.labels_for(6) == ("reserved:remote-node",)
    assert not (tmp_path / "ids.json").exists()  # nothing to persist for reserved ones
    with pytest.raises(IdentityError, match="reserved labels cannot be combined"):
        alloc.allocate(["reserved:host", "k8s:app=x"])
    with pytest.raises(IdentityError, match="at least one label"):
        alloc.allocate([])


def test_same_labels_same_identity_in_any_form(tmp_path):
    alloc = IdentityAllocator(tmp_path / "ids.json")
    a = alloc.allocate({"app": "web", "k8s:io.kubernetes.pod.namespace": "prod"})
    assert a == 256
    assert alloc.allocate(["k8s:io.kubernetes.pod.namespace=prod", "app=web"]) == a
    assert alloc.allocate(endpoint_labels("prod", {"app": "web"})) == a
    b = alloc.allocate(endpoint_labels("dev", {"app": "web"}))
    assert b == 257
    assert alloc.labels_for(a) == ("k8s:app=web", "k8s:io.kubernetes.pod.namespace=prod")
    assert alloc.lookup(endpoint_labels("x", {})) is None
    assert alloc.labels_for(9999) is None


def test_endpoint_labels_match_the_registry():
    rec = EndpointRecord(container_id="c", namespace="prod", labels={"app": "web", "tier": "a"})
    assert endpoint_labels(rec.namespace, rec.labels) == tuple(rec.hubble_labels())


def test_cidr_identities_are_node_local(tmp_path):
    alloc = IdentityAllocator(tmp_path / "ids.json")
    c = alloc.allocate_cidr("10.1.2.3/8")
    assert c == FIRST_LOCAL_IDENTITY
    assert alloc.labels_for(c) == ("cidr:10.0.0.0/8", "reserved:world")
    assert alloc.allocate_cidr("10.0.0.0/8") == c
    assert cidr_label("2001:db8::/32") == "cidr:2001-db8--/32"
    assert alloc.allocate_cidr("2001:db8::/32") == c + 1
    assert alloc.allocate(endpoint_labels("prod", {"app": "x"})) == 256  # separate scopes
    with pytest.raises(IdentityError, match="CIDR labels cannot be mixed"):
        alloc.allocate(list(cidr_labels("10.0.0.0/8")) + ["k8s:app=x"])


def test_stable_across_a_recreated_allocator(tmp_path):
    path = tmp_path / "state" / "ids.json"
    first = IdentityAllocator(path)
    ids = first.allocate_many([endpoint_labels("ns", {"app": f"a{i}"}) for i in range(20)] + [cidr_labels("10.0.0.0/8")])
    again = IdentityAllocator(path)
    assert again.allocate_many([endpoint_labels("ns", {"app": f"a{i}"}) for i in reversed(range(20))]) == list(reversed(ids[:20]))
    assert again.allocate_cidr("10.0.0.0/8") == ids[20]
    assert again.allocate(endpoint_labels("ns", {"app": "new"})) == max(ids[:20]) + 1
    assert again.identities() == {**first.identities(), max(ids[:20]) + 1: endpoint_labels("ns", {"app": "new"})}


def test_stable_across_concurrent_processes(tmp_path):
    path = tmp_path / "ids.json"
    script = textwrap.dedent("""
        import json, random, sys
        from enforcer.identity import IdentityAllocator, endpoint_labels
        seed, path = int(sys.argv[1]), sys.argv[2]
        sets = [endpoint_labels("ns", {"app": f"a{i}"}) for i in range(40)]
        random.Random(seed).shuffle(sets)
        alloc = IdentityAllocator(path)
        out = {}
        for labels in sets:  # one allocation at a time: maximum interleaving with the others
            out[",".join(labels)] = alloc.allocate(labels)
        print(json.dumps(out))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(seed), str(path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for seed in range(4)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    assert all(r == results[0] for r in results)
    numbers = list(results[0].values())
    assert len(set(numbers)) == 40 and min(numbers) == 256 and max(numbers) == 295
    persisted = IdentityAllocator(path).identities()
    assert {",".join(v): k for k, v in persisted.items()} == results[0]


def test_other_processes_allocations_are_seen(tmp_path):
    path = tmp_path / "ids.json"
    a, b = IdentityAllocator(path), IdentityAllocator(path)
    x = a.allocate(endpoint_labels("ns", {"app": "x"}))
    assert b.labels_for(x) == endpoint_labels("ns", {"app": "x"})  # reloads on a miss
    y = b.allocate(endpoint_labels("ns", {"app": "y"}))
    assert y == x + 1
    assert a.allocate(endpoint_labels("ns", {"app": "y"})) == y


def test_corrupt_file_is_reported_and_left_alone(tmp_path):
    path = tmp_path / "ids.json"
    path.write_text("{not json")
    with pytest.raises(IdentityStoreError, match="corrupt identity file"):
        IdentityAllocator(path)
    assert path.read_text() == "{not json"
    path.write_text(json.dumps({"version": 1, "identities": [{"id": 256, "labels": ["k8s:b=1", "k8s:a=1"]}]}))
    with pytest.raises(IdentityStoreError, match="inconsistent record for identity 256"):
        IdentityAllocator(path)


def test_file_is_written_atomically_and_readable(tmp_path):
    path = tmp_path / "ids.json"
    IdentityAllocator(path).allocate(endpoint_labels("ns", {"app": "x"}))
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["identities"][0]["id"] == 256
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_gc_forgets_idle_identities_and_does_not_reuse_numbers(tmp_path):
    now = [1000.0]
    alloc = IdentityAllocator(tmp_path / "ids.json", clock=lambda: now[0])
    x = alloc.allocate(endpoint_labels("ns", {"app": "x"}))
    y = alloc.allocate(endpoint_labels("ns", {"app": "y"}))
    now[0] = 1100.0
    assert alloc.gc(in_use=[y], max_idle_s=300) == []          # x idle for 100 s only
    now[0] = 1500.0
    assert alloc.gc(in_use=[y], max_idle_s=300) == [x]          # y stays: in use
    assert alloc.labels_for(x) is None and alloc.labels_for(y) is not None
    z = alloc.allocate(endpoint_labels("ns", {"app": "z"}))
    assert z == y + 1                                           # freed numbers are not reused at once
    assert IdentityAllocator(tmp_path / "ids.json").labels_for(x) is None


def test_canonical_labels_rejects_a_bare_string():
    with pytest.raises(TypeError):
        canonical_labels("k8s:app=x")


# ---------------------------------------------------------------------------------------------
# IPCache
# ---------------------------------------------------------------------------------------------


def test_ipcache_longest_prefix_match():
    c = IPCache({"10.0.0.0/8": 100, "10.1.0.0/16": 101, "10.1.2.3/32": 300, "2001:db8::/32": 102,
                 "2001:db8::1/128": 301, "0.0.0.0/0": 2})
    assert c.lookup("10.9.9.9") == 100
    assert c.lookup("10.1.9.9") == 101
    assert c.lookup("10.1.2.3") == 300
    assert c.lookup("11.0.0.1") == 2
    assert c.lookup("2001:db8::1") == 301
    assert c.lookup("2001:db8::2") == 102
    assert c.lookup("2001:db9::1") == 2   # default: world
    assert c.lookup_entry("10.1.9.9") == ("10.1.0.0/16", 101)
    assert c.lookup_entry("2001:db8::2") == ("2001:db8::/32", 102)
    assert c.lookup_entry("2001:db9::1") == (None, 2)
    assert len(c) == 6 and "10.1.0.0/16" in c


def test_ipcache_update_and_delete():
    c = IPCache()
    c.upsert("10.0.0.5/8", 100)           # host bits are ignored
    assert "10.0.0.0/8" in c and c.lookup("10.2.3.4") == 100
    c.upsert("10.0.0.0/8", 200)
    assert c.lookup("10.2.3.4") == 200
    assert c.delete("10.0.0.0/8") and not c.delete("10.0.0.0/8")
    assert c.lookup("10.2.3.4") == 2 and len(c) == 0
    c.upsert("192.168.1.1", 7)            # a bare address is a host prefix
    assert c.entries() == [("192.168.1.1/32", 7)]
    with pytest.raises(ValueError):
        c.lookup("not-an-ip")
