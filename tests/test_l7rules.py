"""L7 policy rules (enforcer.l7rules): Cilium's semantics for rules.http and rules.kafka. Pure."""

from __future__ import annotations

import pytest

from enforcer.l7rules import (HttpRequest, KafkaRequest, L7Policy, Peer, http_rule_matches, kafka_api_name,
                              kafka_rule_matches)
from enforcer.policy import HTTPRule, KafkaRule, load_policies

CLIENT = ("k8s:app=client", "k8s:io.kubernetes.pod.namespace=shop")
SERVER = ("k8s:app=api", "k8s:io.kubernetes.pod.namespace=shop")
CLIENT_PEER = Peer("10.0.0.2", 1001, CLIENT)


def rule(**kw) -> HTTPRule:
    return HTTPRule.model_validate(kw)


def req(method="GET", path="/", host="api", headers=()) -> HttpRequest:
    return HttpRequest(method, path, host, tuple(headers))


@pytest.mark.parametrize("r,request_,ok", [
    (dict(method="GET"), req(), True),
    (dict(method="GET"), req("POST"), False),
    (dict(method="GET|HEAD"), req("HEAD"), True),
    (dict(method="GE"), req("GET"), False),                          # anchored: no partial match
    (dict(path="/public/.*"), req(path="/public/a/b"), True),
    (dict(path="/public"), req(path="/public/x"), False),
    (dict(path="/public"), req(path="/public?x=1"), False),          # the target includes the query
    (dict(path="/v[0-9]+/users"), req(path="/v2/users"), True),
    (dict(host="api\\.shop\\.svc"), req(host="api.shop.svc"), True),
    (dict(host="api"), req(host="api.evil"), False),
    (dict(headers=["X-Token: abc"]), req(headers=[("x-token", "abc")]), True),
    (dict(headers=["X-Token: abc"]), req(headers=[("x-token", "abcd")]), False),
    (dict(headers=["X-Token"]), req(headers=[("x-token", "anything")]), True),
    (dict(headers=["X-Token"]), req(), False),
    (dict(headerMatches=[{"name": "X-Env", "value": "prod"}]), req(headers=[("x-env", "prod")]), True),
    (dict(headerMatches=[{"name": "X-Env", "value": "prod"}]), req(headers=[("x-env", "dev")]), False),
    (dict(headerMatches=[{"name": "X-Env", "value": "prod", "mismatch": "LOG"}]), req(), True),
    (dict(method="GET", path="/a"), req("GET", "/b"), False),        # all fields must match
    (dict(), req("DELETE", "/anything"), True),                      # an empty rule allows all
])
def test_http_rule_semantics(r, request_, ok):
    assert http_rule_matches(rule(**r), request_) is ok


@pytest.mark.parametrize("r,request_,ok", [
    (dict(role="produce"), KafkaRequest("produce", 9, topics=("orders",)), True),
    (dict(role="produce"), KafkaRequest("fetch", 12, topics=("orders",)), False),
    (dict(role="produce"), KafkaRequest("metadata", 12), True),
    (dict(role="consume"), KafkaRequest("fetch", 12, topics=("orders",)), True),
    (dict(role="consume"), KafkaRequest("joingroup", 5), True),
    (dict(role="consume"), KafkaRequest("produce", 9), False),
    (dict(apiKey="produce", topic="orders"), KafkaRequest("produce", 9, topics=("orders",)), True),
    (dict(apiKey="produce", topic="orders"), KafkaRequest("produce", 9, topics=("orders", "other")), False),
    (dict(role="consume", topic="orders"), KafkaRequest("findcoordinator", 2), True),  # no topic: not checked
    (dict(apiKey="produce", apiVersion="9"), KafkaRequest("produce", 7), False),
    (dict(apiKey="produce", apiVersion="9"), KafkaRequest("produce", 9), True),
    (dict(clientID="billing"), KafkaRequest("produce", 9, client_id="billing"), True),
    (dict(clientID="billing"), KafkaRequest("produce", 9, client_id="rogue"), False),
])
def test_kafka_rule_semantics(r, request_, ok):
    assert kafka_rule_matches(KafkaRule.model_validate(r), request_) is ok


def test_kafka_api_names_are_cilium_names():
    assert kafka_api_name(0) == "produce" and kafka_api_name(2) == "offsets" and kafka_api_name(11) == "joingroup"
    assert kafka_api_name(18) == "apiversions" and kafka_api_name(999) == "" and kafka_api_name(-1) == ""


POLICIES = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api-read, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules:
        http: [{method: GET, path: "/items.*"}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api-admin, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - toPorts:
    - ports: [{port: "8080"}]
      rules:
        http: [{method: POST, path: "/admin", headers: ["X-Admin: yes"]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: other-ns, namespace: elsewhere}
spec:
  endpointSelector: {}
  ingress:
  - toPorts:
    - ports: [{port: "8080"}]
      rules:
        http: [{method: ".*"}]
"""


def test_rules_for_selects_subject_peer_port_and_direction():
    pol = L7Policy(load_policies(POLICIES))
    rs = pol.rules_for(SERVER, CLIENT_PEER, "ingress", 8080)
    assert rs is not None and {s.policy.name for s in rs.sources} == {"api-read", "api-admin"}
    # the namespaced policy in another namespace never selects shop's endpoints
    assert "other-ns" not in {s.policy.name for s in rs.sources}
    # no rules on another port, in the other direction, or for another subject
    assert pol.rules_for(SERVER, CLIENT_PEER, "ingress", 9090) is None
    assert pol.rules_for(SERVER, CLIENT_PEER, "egress", 8080) is None
    assert pol.rules_for(CLIENT, Peer("10.0.0.3", 1002, SERVER), "ingress", 8080) is None
    # a peer that fromEndpoints does not match only gets the L4-only (any peer) policy
    world = pol.rules_for(SERVER, Peer("203.0.113.9"), "ingress", 8080)
    assert world is not None and {s.policy.name for s in world.sources} == {"api-admin"}
    with pytest.raises(ValueError):
        pol.rules_for(SERVER, CLIENT_PEER, "sideways", 8080)


def test_verdicts_name_policies_and_match_type():
    pol = L7Policy(load_policies(POLICIES))
    rs = pol.rules_for(SERVER, CLIENT_PEER, "ingress", 8080)
    ok = rs.check_http(req("GET", "/items/7"))
    assert ok.allowed and [p.name for p in ok.policies] == ["api-read"] and ok.match_type == 2  # L3+L4
    admin = rs.check_http(req("POST", "/admin", headers=[("x-admin", "yes")]))
    assert admin.allowed and [p.name for p in admin.policies] == ["api-admin"] and admin.match_type == 3  # L4 only
    bad = rs.check_http(req("DELETE", "/items/7"))
    assert bad.denied and sorted(p.name for p in bad.policies) == ["api-admin", "api-read"]
    assert bad.policies[0].namespace == "shop" and "k8s:io.cilium.k8s.policy.namespace=shop" in bad.policies[0].labels
    # an HTTP port rule does not allow Kafka requests on that port
    assert rs.check_kafka(KafkaRequest("produce", 9)).denied


def test_l4_rule_without_l7_rules_is_a_wildcard():
    text = POLICIES + """
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api-open, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "8080"}]}]
"""
    rs = L7Policy(load_policies(text)).rules_for(SERVER, CLIENT_PEER, "ingress", 8080)
    v = rs.check_http(req("DELETE", "/anything"))
    assert v.allowed and [p.name for p in v.policies] == ["api-open"]


def test_no_l7_rules_means_no_l7_verdict_and_audit_flag():
    l4only = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l4, namespace: shop}
spec:
  endpointSelector: {}
  egress: [{toPorts: [{ports: [{port: "80"}]}]}]
"""
    pol = L7Policy(load_policies(l4only))
    assert not pol.has_l7 and pol.rules_for(CLIENT, Peer("1.2.3.4"), "egress", 80) is None
    audit = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: kafka-audit, namespace: shop, annotations: {flowscope.io/audit-mode: "true"}}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toCIDR: [192.0.2.0/24]
    toPorts:
    - ports: [{port: "9092", protocol: TCP}]
      rules: {kafka: [{role: produce, topic: orders}]}
"""
    pol = L7Policy(load_policies(audit))
    rs = pol.rules_for(CLIENT, Peer("192.0.2.7"), "egress", 9092)
    v = rs.check_kafka(KafkaRequest("produce", 9, topics=("payments",)))
    assert v.denied and v.audit_only and v.match_type == 2
    assert rs.check_kafka(KafkaRequest("produce", 9, topics=("orders",))).allowed
    # CIDR rules do not select cluster endpoints
    assert pol.rules_for(CLIENT, Peer("192.0.2.8", 1005, SERVER), "egress", 9092) is None
    assert pol.rules_for(CLIENT, Peer("198.51.100.1"), "egress", 9092) is None


def test_entities_and_cluster_wide_policies():
    text = """
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: from-world}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEntities: [world]
    toPorts: [{ports: [{port: "80"}], rules: {http: [{method: GET}]}}]
  - fromEntities: [cluster]
    toPorts: [{ports: [{port: "80"}], rules: {http: [{method: "GET|POST"}]}}]
"""
    pol = L7Policy(load_policies(text))
    world = pol.rules_for(SERVER, Peer("203.0.113.1"), "ingress", 80)
    assert world.check_http(req("GET")).allowed and world.check_http(req("POST")).denied
    cluster = pol.rules_for(SERVER, CLIENT_PEER, "ingress", 80)
    assert cluster.check_http(req("POST")).allowed
    assert world.check_http(req("POST")).policies[0].namespace == ""
