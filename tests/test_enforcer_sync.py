"""The agent's policy component without a kernel: identities, compiling, naming, the policy cache, and
fetching from the real server (a subprocess) with long polls. The kernel side is in
test_enforcer_e2e.py / test_enforcer_datapath.py."""

from __future__ import annotations

import http.server
import threading
import time

import orjson
import pytest

from enforcer.client import PolicyClient
from enforcer.compiler import EndpointInfo
from enforcer.identity import endpoint_labels
from enforcer.policy import load_policies
from enforcer.sync import (CACHE_FILE, IDENTITY_FILE, PolicyNamesTable, PolicySync, SyncConfig, default_deny_map,
                           endpoint_infos, parse_items)
from flowscope.endpoints import EndpointIndex, EndpointRecord

from enforcer_server import PolicyServer

POLICIES = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api-in, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api-watch, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: api}}
  auditMode: true
  egress:
  - toEntities: [world]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: other-ns, namespace: elsewhere}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress: [{}]
"""


def records():
    return [EndpointRecord(container_id="a", host_ifindex=11, ips=["10.1.0.1/32", "fd00::1"], namespace="shop",
                           pod_name="api-0", labels={"app": "api"}),
            EndpointRecord(container_id="b", host_ifindex=12, ips=["10.1.0.2"], namespace="shop", pod_name="web-0",
                           labels={"app": "web"}),
            EndpointRecord(container_id="c", host_ifindex=13, ips=["10.1.0.3"], namespace="shop", pod_name="web-1",
                           labels={"app": "web"})]


def items_of(policies, revision=1):
    return [{"namespace": p.namespace, "name": p.name, "revision": revision, "content_hash": p.content_hash,
             "policy": p.to_dict()} for p in policies]


def test_parse_items_validates_caches_and_skips_bad_ones():
    pols = load_policies(POLICIES)
    items = items_of(pols, 4) + [{"namespace": "x", "name": "bad", "revision": 5, "content_hash": "h",
                                  "policy": {"metadata": {"name": "bad"}, "spec": {"endpointSelector": 3}}},
                                 {"nonsense": True}]
    cache: dict = {}
    got, problems = parse_items(items, cache)
    assert [p.name for p in got] == ["api-in", "api-watch", "other-ns"] and all(p.revision == 4 for p in got)
    assert len(problems) == 2 and "spec.endpointSelector" in problems[0]
    again, _ = parse_items(items_of(pols[:1], 4), cache)
    assert again[0] is got[0] and len(cache) == 1  # reused, and forgotten ones are dropped


def test_endpoint_infos_resolve_address_conflicts_and_skip_unidentified():
    recs = records()
    stale = EndpointRecord(container_id="old", host_ifindex=99, ips=["10.1.0.2"], namespace="shop",
                           pod_name="web-old", labels={"app": "web"})
    for r, ident in zip(recs + [stale], (300, 301, 301, 301)):
        r.identity = ident
    nobody = EndpointRecord(container_id="z", ips=["10.9.9.9"], namespace="shop", labels={"app": "z"})
    index = EndpointIndex([stale] + recs + [nobody])  # the newer record owns 10.1.0.2
    infos = endpoint_infos([stale] + recs + [nobody], index)
    by_name = {i.name: i for i in infos}
    assert set(by_name) == {"shop/api-0", "shop/web-0", "shop/web-1", "shop/web-old"}
    assert by_name["shop/web-old"].ips == () and by_name["shop/web-0"].ips == ("10.1.0.2",)
    assert by_name["shop/api-0"].ips == ("10.1.0.1", "fd00::1") and by_name["shop/api-0"].ifindex == 11


def test_default_deny_names_enforcing_policies_else_audit_ones():
    pols = [p.with_revision(7) for p in load_policies(POLICIES)]
    eps = [EndpointInfo(identity=300, labels=endpoint_labels("shop", {"app": "api"}), ifindex=11),
           EndpointInfo(identity=301, labels=endpoint_labels("shop", {"app": "web"}), ifindex=12)]
    ids = {p.key: i for i, p in enumerate(pols, start=1)}
    dd = default_deny_map(pols, eps, ids)
    assert dd == {(300, "ingress"): ([1], []), (300, "egress"): ([], [2])}  # other-ns selects no shop endpoint
    from enforcer.compiler import PolicyRef

    refs = {i: PolicyRef(i, p.name, p.namespace, p.revision) for p, i in ((p, ids[p.key]) for p in pols)}
    names = PolicyNamesTable(refs, {11: 300, 12: 301}, dd)
    assert [p.name for p in names.default_deny(11, "ingress")] == ["api-in"]
    assert [p.name for p in names.default_deny(11, "egress")] == ["api-watch"]
    assert names.default_deny(12, "ingress") == [] and names.default_deny(404, "ingress") == []
    ref = names.policy(1)
    assert (ref.name, ref.namespace, ref.revision, ref.kind) == ("api-in", "shop", "7", "CiliumNetworkPolicy")
    assert "k8s:io.cilium.k8s.policy.name=api-in" in ref.labels


def _sync(tmp_path, **kw) -> PolicySync:
    return PolicySync(SyncConfig(state_dir=str(tmp_path), **kw), client=None, fetch=False)


def test_identities_are_allocated_stably_and_written_into_the_records(tmp_path):
    recs = records()
    s = _sync(tmp_path)
    s.start()
    try:
        s.set_index(EndpointIndex(recs))
        ids = [r.identity for r in recs]
        assert ids[0] >= 256 and ids[1] == ids[2] != ids[0]  # one identity per label set
        s.use_policies([p.with_revision(3) for p in load_policies(POLICIES)], 3)
        assert s.wait_applied(3)
        c = s.compiled
        assert {e.name: e.identity for e in c.endpoints} == {"shop/api-0": ids[0], "shop/web-0": ids[1],
                                                            "shop/web-1": ids[1]}
        st = s.status()
        assert st["server_revision"] == 3 and st["policies"] == 3 and st["entries"] == len(c.entries) > 0
        assert st["last_error"] == "" and st["source"] == "local"
    finally:
        s.close()
    # a restarted agent (a new component on the same state directory) finds the same numbers
    again = records()[::-1]
    s2 = _sync(tmp_path)
    s2.set_index(EndpointIndex(again))
    assert {r.container_id: r.identity for r in again} == {r.container_id: r.identity for r in recs}
    assert (tmp_path / IDENTITY_FILE).exists()


def test_policy_ids_are_not_reused_after_a_delete(tmp_path):
    s = _sync(tmp_path)
    s.start()
    try:
        s.set_index(EndpointIndex(records()))
        pols = load_policies(POLICIES)
        s.use_policies(pols, 1)
        assert s.wait_applied(1)
        first = {r.name: r.id for r in s.compiled.policies}
        s.use_policies([p for p in pols if p.name != "other-ns"], 2)  # the highest id goes away
        assert s.wait_applied(2)
        new = load_policies(POLICIES.replace("other-ns", "newcomer"))
        s.use_policies(new, 3)
        assert s.wait_applied(3)
        ids = {r.name: r.id for r in s.compiled.policies}
        assert ids["api-in"] == first["api-in"] and ids["newcomer"] not in first.values()
        # the deleted policy can still be named (flows of connections it allowed)
        assert s.builder is None and PolicyNamesTable(s._all_refs, {}, {}).policy(first["other-ns"]).name == "other-ns"
    finally:
        s.close()


def test_a_corrupt_identity_file_is_reported_not_fatal(tmp_path):
    (tmp_path / IDENTITY_FILE).write_text("{not json")
    s = _sync(tmp_path)
    recs = records()
    s.set_index(EndpointIndex(recs))
    assert all(r.identity == 0 for r in recs)
    assert "corrupt identity file" in s.status()["last_error"]
    assert (tmp_path / IDENTITY_FILE).read_text() == "{not json"  # never overwritten


def test_cached_policies_are_enforced_before_the_server_answers(tmp_path):
    pols = load_policies(POLICIES)
    (tmp_path / CACHE_FILE).write_bytes(orjson.dumps({"revision": 9, "items": items_of(pols, 9)}))
    s = _sync(tmp_path)
    s.start()
    try:
        s.set_index(EndpointIndex(records()))
        assert s.wait_applied(9)
        assert s.status()["source"] == "cache" and len(s.compiled.policies) == 3
    finally:
        s.close()


# --------------------------------------------------------------------------------------------
# Against the real server
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with PolicyServer(tmp_path_factory.mktemp("srv") / "f.db") as srv:
        yield srv


def test_fetches_with_long_polls_and_caches(server, tmp_path):
    client = PolicyClient(server.url)
    s = PolicySync(SyncConfig(server=server.url, state_dir=str(tmp_path), long_poll_s=5), client=client)
    s.start()
    try:
        s.set_index(EndpointIndex(records()))
        with PolicyClient(server.url) as admin:
            rev0 = admin.list().revision
            assert s.wait_applied(rev0, timeout=10)
            res = admin.apply(POLICIES.replace("8080", "8443"))
            rev = res["revision"]
            # the long poll returns when the set changes (latency: bench/policy_overhead.py)
            assert s.wait_applied(rev, timeout=10), s.status()
            assert s.status()["source"] == "server"
            assert {r.name for r in s.compiled.policies} >= {"api-in", "api-watch", "other-ns"}
            assert any(e.port == 8443 for e in s.compiled.entries)
            cached = orjson.loads((tmp_path / CACHE_FILE).read_bytes())
            assert cached["revision"] == rev and len(cached["items"]) >= 3
            admin.delete("shop", "api-watch")
            assert s.wait_applied(rev + 1, timeout=10)
            assert "api-watch" not in {r.name for r in s.compiled.policies}
    finally:
        s.close()


class _NoPolicyAPI(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(404)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"detail":"Not Found"}')

    def log_message(self, *a):
        pass


def test_a_server_without_the_policy_api_or_no_server_is_survived(tmp_path):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NoPolicyAPI)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    pols = load_policies(POLICIES)
    (tmp_path / CACHE_FILE).write_bytes(orjson.dumps({"revision": 2, "items": items_of(pols, 2)}))
    s = PolicySync(SyncConfig(server=url, state_dir=str(tmp_path), retry_max_s=0.2))
    s.start()
    try:
        s.set_index(EndpointIndex(records()))
        assert s.wait_applied(2)
        time.sleep(0.5)
        assert s.status()["server_revision"] == 2 and s.status()["source"] == "cache"  # cached set stays in force
        assert all(th.is_alive() for th in s._threads)
    finally:
        s.close()
        httpd.shutdown()
