"""L7 events -> Hubble flows (probe.l7flows) and the DNS name cache. Pure."""

from __future__ import annotations

from flowscope import schema
from flowscope.endpoints import EndpointIndex, EndpointRecord
from probe.l7.records import REQUEST, RESPONSE, DnsRecord, HttpRecord, KafkaRecord, L7Event
from probe.l7flows import ConnContext, DnsCache, L7FlowFactory, dns_summary, http_summary, kafka_summary

S = 1_000_000_000
T0 = 1_700_000_000 * S
FRONT = EndpointRecord(container_id="c1", host_ifname="lxc1", host_ifindex=11, ips=["10.0.0.2"], namespace="shop",
                       pod_name="front-0", labels={"app": "front"}, endpoint_id=11, identity=1001)
API = EndpointRecord(container_id="c2", host_ifname="lxc2", host_ifindex=12, ips=["10.0.0.3"], namespace="shop",
                     pod_name="api-0", labels={"app": "api"}, endpoint_id=12, identity=1002)
INDEX = EndpointIndex([FRONT, API], host_ips=["192.168.1.1"])


def ctx(ifindex=11, behind=None, proto=6, client=("10.0.0.2", 40000), server=("10.0.0.3", 8080)):
    return ConnContext(ifindex, {11: "lxc1", 12: "lxc2"}.get(ifindex, "eth9"), 4, proto, client[0], client[1],
                       server[0], server[1], client_behind_interface=behind)


def http_pair(path="/users", code=200, latency=2_500_000):
    req = L7Event(REQUEST, T0, "http1", http=HttpRecord(method="GET", url=f"http://api{path}", protocol="HTTP/1.1",
                                                        host="api", path=path,
                                                        headers=[("authorization", "Bearer x"), ("x-team", "blue")]))
    resp = L7Event(RESPONSE, T0 + latency, "http1", latency_ns=latency,
                   http=HttpRecord(code=code, method="GET", url=f"http://api{path}", protocol="HTTP/1.1", host="api",
                                   path=path, headers=[("content-type", "text/plain")]))
    return req, resp


def factory(**kw) -> L7FlowFactory:
    n = iter(range(1, 10**6))
    return L7FlowFactory("node-1", INDEX, uuid_source=lambda: f"u{next(n)}", **kw)


def test_http_request_and_response_at_the_client():
    f = factory()
    c = ctx(11)
    req, resp = http_pair()
    a, b = f.build(req, c), f.build(resp, c)
    assert a.Type == schema.FlowType.L7 and a.event_type == schema.CiliumEventType(type=129)
    assert a.verdict == schema.Verdict.FORWARDED and a.node_name == "node-1" and a.uuid == "u1"
    assert a.traffic_direction == schema.TrafficDirection.EGRESS and b.traffic_direction == schema.TrafficDirection.EGRESS
    assert a.is_reply is False and b.is_reply is True
    assert (a.IP.source, a.IP.destination, b.IP.source, b.IP.destination) == ("10.0.0.2", "10.0.0.3", "10.0.0.3", "10.0.0.2")
    assert (a.l4.TCP.source_port, a.l4.TCP.destination_port) == (40000, 8080)
    assert (b.l4.TCP.source_port, b.l4.TCP.destination_port) == (8080, 40000)
    assert a.source.pod_name == "front-0" and a.destination.pod_name == "api-0" and b.source.pod_name == "api-0"
    assert a.interface == schema.NetworkInterface(index=11, name="lxc1")
    assert a.Summary == "HTTP/1.1 GET http://api/users"
    assert b.Summary == "HTTP/1.1 200 2ms (GET http://api/users)"
    assert a.time_ns == T0 and b.time_ns == T0 + 2_500_000
    doc = schema.dump_flow(b)
    assert doc["l7"] == {"type": "RESPONSE", "latency_ns": "2500000",
                         "http": {"code": 200, "method": "GET", "url": "http://api/users", "protocol": "HTTP/1.1",
                                  "headers": [{"key": "content-type", "value": "text/plain"}]}}
    # secrets are redacted in the flow (the parser hands them over for policy checks)
    assert [(h.key, h.value) for h in a.l7.http.headers] == [("authorization", "HIDDEN"), ("x-team", "blue")]
    assert "latency_ns" not in schema.dump_flow(a)["l7"]
    assert schema.load_flow(schema.flow_to_json(b)) == b


def test_direction_from_registry_then_interface_side():
    f = factory()
    req, _ = http_pair()
    assert f.build(req, ctx(12)).traffic_direction == schema.TrafficDirection.INGRESS  # the server's veth
    # an interface without a registry record: the side the client's packets came from decides
    assert f.build(req, ctx(99, behind=True)).traffic_direction == schema.TrafficDirection.EGRESS
    assert f.build(req, ctx(99, behind=False)).traffic_direction == schema.TrafficDirection.INGRESS
    assert f.build(req, ctx(99)).traffic_direction == schema.TrafficDirection.TRAFFIC_DIRECTION_UNKNOWN
    # unknown addresses are world; the node's own are host
    w = f.build(req, ctx(99, behind=True, client=("192.168.1.1", 5000), server=("203.0.113.5", 80)))
    assert w.source.identity == 1 and w.destination.identity == 2 and w.destination.labels == ["reserved:world"]


def test_header_allowlist_and_grpc_status():
    f = factory(header_allowlist=frozenset({"x-team"}))
    req, _ = http_pair()
    assert [h.key for h in f.build(req, ctx()).l7.http.headers] == ["x-team"]
    grpc = L7Event(RESPONSE, T0, "grpc", latency_ns=5, http=HttpRecord(
        code=200, method="POST", url="http://api/shop.Catalog/Get", protocol="HTTP/2", is_grpc=True,
        grpc_status=5, grpc_message="no such item"))
    hs = [(h.key, h.value) for h in factory().build(grpc, ctx()).l7.http.headers]
    assert hs == [("grpc-status", "5"), ("grpc-message", "no such item")]


def test_kafka_and_dns_summaries_and_fields():
    f = factory()
    kreq = L7Event(REQUEST, T0, "kafka", kafka=KafkaRecord(api_key="produce", api_version=9, correlation_id=5,
                                                           topic="orders", api_key_id=0, topics=["orders"]))
    kresp = L7Event(RESPONSE, T0 + 10, "kafka", latency_ns=10, kafka=KafkaRecord(
        api_key="produce", api_version=9, correlation_id=5, topic="orders", error_code=3))
    c = ctx(12, server=("10.0.0.3", 9092))
    a, b = f.build(kreq, c), f.build(kresp, c)
    assert a.Summary == "Kafka request produce correlation id 5 topic 'orders'"
    assert b.Summary == "Kafka response produce correlation id 5 topic 'orders' return code 3"
    assert schema.dump_flow(b)["l7"]["kafka"] == {"error_code": 3, "api_version": 9, "api_key": "produce",
                                                  "correlation_id": 5, "topic": "orders"}
    q = L7Event(REQUEST, T0, "dns", dns=DnsRecord(query="example.org.", qtypes=["A"]))
    ans = L7Event(RESPONSE, T0 + 7, "dns", latency_ns=7, dns=DnsRecord(
        query="example.org.", ips=["93.184.216.34"], ttl=60, qtypes=["A"], rrtypes=["A"]))
    dc = ctx(11, proto=17, server=("10.0.0.3", 53))
    qa = f.build(q, dc)
    assert qa.Summary == "DNS Query example.org. A" and qa.l4.UDP.destination_port == 53
    assert f.build(ans, dc).Summary == 'DNS Answer "93.184.216.34" TTL: 60 (Query example.org. A)'
    nx = DnsRecord(query="nope.", rcode=3, qtypes=["AAAA"])
    assert dns_summary(nx, True) == "DNS Answer RCode: Non-Existent Domain TTL: 0 (Query nope. AAAA)"
    # the answer taught the factory's cache: a later flow to that address carries the name
    later = f.build(http_pair()[0], ctx(11, server=("93.184.216.34", 80)))
    assert later.destination_names == ["example.org"] and later.source_names == []


def test_summaries_use_whole_milliseconds():
    rec = HttpRecord(code=503, method="POST", url="http://a/b", protocol="HTTP/2")
    assert http_summary(rec, True, 1_999_999) == "HTTP/2 503 1ms (POST http://a/b)"
    assert http_summary(rec, False, 0) == "HTTP/2 POST http://a/b"
    assert kafka_summary(KafkaRecord(api_key="fetch", correlation_id=1), False) == \
        "Kafka request fetch correlation id 1 topic ''"


def test_dns_cache_ttl_cnames_bounds():
    cache = DnsCache(max_ips=2, max_names_per_ip=2, min_ttl_s=10)
    rec = DnsRecord(query="www.Example.org.", cnames=["edge.cdn.net."], ips=["192.0.2.1", "2001:db8::0001"], ttl=30)
    assert cache.learn(rec, T0) == 2
    assert cache.names("192.0.2.1", T0 + 1) == ["edge.cdn.net", "www.example.org"]
    assert cache.names("2001:db8::1", T0) == ["edge.cdn.net", "www.example.org"]  # canonical IPv6 text
    assert cache.names("192.0.2.1", T0 + 31 * S) == [] and len(cache) == 1  # expired and forgotten
    # a short TTL is raised to the minimum; failures and empty answers teach nothing
    assert cache.learn(DnsRecord(query="a.", ips=["192.0.2.9"], ttl=1), T0) == 1
    assert cache.names("192.0.2.9", T0 + 5 * S) == ["a"]
    assert cache.learn(DnsRecord(query="b.", ips=["192.0.2.9"], rcode=3), T0) == 0
    assert cache.learn(DnsRecord(query="b.", ips=["not-an-ip"]), T0) == 0
    # bounded: the least recently learned address goes first, and names per address are capped
    cache.learn(DnsRecord(query="c.", ips=["192.0.2.10"], ttl=60), T0)
    assert len(cache) == 2 and cache.evictions >= 1
    for i, n in enumerate(["x.", "y.", "z."]):
        cache.learn(DnsRecord(query=n, ips=["192.0.2.10"], ttl=60 + i), T0)
    assert len(cache.names("192.0.2.10", T0)) == 2


def test_policy_verdicts_on_requests_only():
    from enforcer.l7rules import L7Policy
    from enforcer.policy import load_policies

    pol = L7Policy(load_policies("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api-read, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: front}}]
    toPorts: [{ports: [{port: "8080"}], rules: {http: [{method: GET, path: "/users"}]}}]
"""))
    f = factory(policy=pol)
    ok_req, ok_resp = http_pair("/users")
    bad_req, bad_resp = http_pair("/admin", 403)
    at_server = ctx(12)
    a = f.build(ok_req, at_server)
    assert a.verdict == schema.Verdict.FORWARDED and [p.name for p in a.ingress_allowed_by] == ["api-read"]
    assert a.policy_match_type == 2
    d = f.build(bad_req, at_server)
    assert d.verdict == schema.Verdict.AUDIT and [p.name for p in d.ingress_denied_by] == ["api-read"]
    assert d.policy_match_type == 2 and not d.egress_denied_by and f.audited == 1
    assert f.build(bad_resp, at_server).verdict == schema.Verdict.FORWARDED
    # the client's side is not selected by the policy
    assert f.build(bad_req, ctx(11)).verdict == schema.Verdict.FORWARDED
    # policies can be replaced at any time; the connection's cached rules follow
    f.policy = None
    assert f.build(bad_req, at_server).verdict == schema.Verdict.FORWARDED
