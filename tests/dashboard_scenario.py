"""A small, known microservice topology as Hubble flows, for the dashboard's tests and screenshots.

Every edge is known in advance (``EXPECTED_EDGES``): forwarded HTTP with latencies and some 503s,
TCP to a database allowed by a policy, DNS to coredns, egress to the world, host health checks, a
denied path (dropped by ``data/data-allow``) and an audited one (``shop/api-audit``).
"""

from __future__ import annotations

from flowscope import schema

POLICY_YAML = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: data-allow, namespace: data}
spec:
  endpointSelector: {matchLabels: {tier: data}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: api, k8s:io.kubernetes.pod.namespace: shop}}]
    toPorts: [{ports: [{port: "5432", protocol: TCP}, {port: "6379", protocol: TCP}]}]
"""

_PODS = {
    # name: (namespace, app, ip, identity, tier)
    "frontend-7c9": ("shop", "frontend", "10.1.0.10", 20010, "web"),
    "frontend-d41": ("shop", "frontend", "10.1.0.11", 20010, "web"),
    "api-5d4": ("shop", "api", "10.1.0.20", 20020, "backend"),
    "api-8f1": ("shop", "api", "10.1.0.21", 20020, "backend"),
    "batch-0": ("shop", "batch", "10.1.0.30", 20030, "jobs"),
    "db-0": ("data", "db", "10.2.0.10", 30010, "data"),
    "redis-0": ("data", "redis", "10.2.0.20", 30020, "data"),
    "coredns-1": ("kube-system", "coredns", "10.3.0.10", 102, "infra"),
}
WORLD_IP = "93.184.216.34"
HOST_IP = "10.1.0.1"

EXPECTED_EDGES = {
    ("shop/frontend", "shop/api"): "forwarded",
    ("shop/api", "data/db"): "forwarded",
    ("shop/api", "data/redis"): "forwarded",
    ("shop/frontend", "kube-system/coredns"): "forwarded",
    ("shop/api", "kube-system/coredns"): "forwarded",
    ("shop/frontend", "world"): "forwarded",
    ("host", "shop/api"): "forwarded",
    ("shop/batch", "data/db"): "dropped",
    ("shop/batch", "shop/api"): "audit",
}


def _ep(pod: str) -> schema.Endpoint:
    ns, app, _ip, ident, tier = _PODS[pod]
    return schema.Endpoint(ID=ident % 1000, identity=ident, namespace=ns, pod_name=pod,
                           labels=[f"k8s:app={app}", f"k8s:io.kubernetes.pod.namespace={ns}", f"k8s:tier={tier}"])


def _ip(pod: str) -> str:
    return _PODS[pod][2]


_WORLD = schema.Endpoint(identity=2, labels=["reserved:world"])
_HOST = schema.Endpoint(identity=1, labels=["reserved:host"])
_POL_DATA = schema.Policy(name="data-allow", namespace="data", kind="CiliumNetworkPolicy", revision="1",
                          labels=["k8s:io.cilium.k8s.policy.name=data-allow"])
_POL_AUDIT = schema.Policy(name="api-audit", namespace="shop", kind="CiliumNetworkPolicy", revision="3")


def _flow(t_ns: int, src: schema.Endpoint, dst: schema.Endpoint, sip: str, dip: str, l4: schema.Layer4, *,
          verdict: schema.Verdict = schema.Verdict.FORWARDED, node: str = "node-1", **kw) -> schema.Flow:
    return schema.Flow(time=schema.format_timestamp(t_ns), verdict=verdict,
                       IP=schema.IP(source=sip, destination=dip, ipVersion=schema.IPVersion.IPv4), l4=l4,
                       source=src, destination=dst, node_name=node,
                       Type=kw.pop("Type", schema.FlowType.L3_L4), **kw)


def _tcp(sport: int, dport: int, **flags: bool) -> schema.Layer4:
    return schema.Layer4(TCP=schema.TCP(source_port=sport, destination_port=dport, flags=schema.TCPFlags(**flags)))


def _udp(sport: int, dport: int) -> schema.Layer4:
    return schema.Layer4(UDP=schema.UDP(source_port=sport, destination_port=dport))


def round_flows(t_ns: int, i: int, *, node: str = "node-1") -> list[schema.Flow]:
    """One round of the topology's traffic at ``t_ns`` (``i`` varies ports, latencies and errors)."""
    out: list[schema.Flow] = []
    fe = "frontend-7c9" if i % 2 else "frontend-d41"
    api = "api-5d4" if i % 3 else "api-8f1"
    sport = 40000 + i % 20000
    ms = 1_000_000
    # frontend -> api: HTTP request and response (the response is a reply, api -> frontend)
    code = 503 if i % 20 == 0 else 200
    http = schema.HTTP(code=code, method="GET", url=f"http://api.shop:8080/api/items/{i % 7}", protocol="HTTP/1.1")
    out.append(_flow(t_ns, _ep(fe), _ep(api), _ip(fe), _ip(api), _tcp(sport, 8080), node=node, Type=schema.FlowType.L7,
                     l7=schema.Layer7(type=schema.L7FlowType.REQUEST, http=schema.HTTP(
                         method="GET", url=http.url, protocol="HTTP/1.1")), is_reply=False,
                     traffic_direction=schema.TrafficDirection.INGRESS))
    out.append(_flow(t_ns + 3 * ms, _ep(api), _ep(fe), _ip(api), _ip(fe), _tcp(8080, sport), node=node,
                     Type=schema.FlowType.L7, is_reply=True, traffic_direction=schema.TrafficDirection.INGRESS,
                     l7=schema.Layer7(type=schema.L7FlowType.RESPONSE, latency_ns=str((4 + i % 9) * ms), http=http)))
    # api -> db and api -> redis (allowed by the data policy), with byte counters
    for dst, port in (("db-0", 5432), ("redis-0", 6379)):
        out.append(_flow(t_ns + 4 * ms, _ep(api), _ep(dst), _ip(api), _ip(dst), _tcp(sport + 1, port, SYN=True), node=node,
                         is_reply=False, traffic_direction=schema.TrafficDirection.INGRESS,
                         ingress_allowed_by=[_POL_DATA], policy_match_type=2,
                         flowscope=schema.FlowscopeExtension(event="new", egress_bytes="74", ingress_bytes="0")))
    # DNS
    for src in (fe, api):
        out.append(_flow(t_ns + 1 * ms, _ep(src), _ep("coredns-1"), _ip(src), _ip("coredns-1"), _udp(sport + 2, 53),
                         node=node, Type=schema.FlowType.L7, is_reply=False,
                         l7=schema.Layer7(type=schema.L7FlowType.REQUEST, dns=schema.DNS(
                             query="api.shop.svc.cluster.local.", qtypes=["A"]))))
    # frontend -> world, host -> api health checks
    out.append(_flow(t_ns + 2 * ms, _ep(fe), _WORLD, _ip(fe), WORLD_IP, _tcp(sport + 3, 443, SYN=True), node=node,
                     is_reply=False, traffic_direction=schema.TrafficDirection.EGRESS))
    out.append(_flow(t_ns + 2 * ms, _HOST, _ep(api), HOST_IP, _ip(api), _tcp(sport + 4, 8080, SYN=True), node=node,
                     is_reply=False, traffic_direction=schema.TrafficDirection.INGRESS))
    # batch -> db: denied; batch -> api: audited
    out.append(_flow(t_ns + 5 * ms, _ep("batch-0"), _ep("db-0"), _ip("batch-0"), _ip("db-0"), _tcp(sport + 5, 5432, SYN=True),
                     node=node, verdict=schema.Verdict.DROPPED, drop_reason_desc=schema.DropReason.POLICY_DENIED,
                     event_type=schema.CiliumEventType(type=1, sub_type=133), ingress_denied_by=[_POL_DATA],
                     traffic_direction=schema.TrafficDirection.INGRESS, Summary="TCP Flags: SYN"))
    out.append(_flow(t_ns + 6 * ms, _ep("batch-0"), _ep(api), _ip("batch-0"), _ip(api), _tcp(sport + 6, 8080, SYN=True),
                     node=node, verdict=schema.Verdict.AUDIT, ingress_denied_by=[_POL_AUDIT],
                     traffic_direction=schema.TrafficDirection.INGRESS))
    return out


def scenario_flows(start_ns: int, rounds: int, step_ns: int = 1_000_000_000, *, node: str = "node-1") -> list[schema.Flow]:
    flows: list[schema.Flow] = []
    for i in range(rounds):
        flows.extend(round_flows(start_ns + i * step_ns, i, node=node))
    return flows


def legacy_flows(start_ns: int, rounds: int, step_ns: int = 1_000_000_000) -> list[schema.Flow]:
    """Traffic of a workload that existed only in the past: shop/legacy -> data/db."""
    ep = schema.Endpoint(identity=20099, namespace="shop", pod_name="legacy-0",
                         labels=["k8s:app=legacy", "k8s:io.kubernetes.pod.namespace=shop"])
    return [_flow(start_ns + i * step_ns, ep, _ep("db-0"), "10.1.0.99", _ip("db-0"), _tcp(50000 + i, 5432, SYN=True),
                  is_reply=False) for i in range(rounds)]


def batch_body(flows: list[schema.Flow], node: str = "node-1") -> bytes:
    return b'{"node_name":"' + node.encode() + b'","flows":[' + b",".join(schema.flow_to_json(f) for f in flows) + b"]}"


def kafka_flows(start_ns: int, rounds: int, step_ns: int = 10_000_000) -> list[schema.Flow]:
    """A new dependency appearing live: shop/api -> data/kafka (TCP 9092)."""
    ep = schema.Endpoint(identity=30030, namespace="data", pod_name="kafka-0",
                         labels=["k8s:app=kafka", "k8s:io.kubernetes.pod.namespace=data"])
    return [_flow(start_ns + i * step_ns, _ep("api-5d4"), ep, _ip("api-5d4"), "10.2.0.30", _tcp(51000 + i, 9092, SYN=True),
                  is_reply=False) for i in range(rounds)]
