"""Realistic synthetic flows in Hubble's shape, for tests, benchmarks and demos.

Deterministic for a given seed: a small cluster of namespaces and pods talking TCP, UDP/DNS, HTTP and
ICMP, with some policy drops, so stored rows, indexes and filters see the value spread of a real node.
"""

from __future__ import annotations

import random
from typing import Iterator

from flowscope import schema

_NAMESPACES = ("default", "kube-system", "shop", "payments", "monitoring")
_APPS = ("frontend", "api", "cart", "checkout", "db", "redis", "coredns", "prometheus", "worker")
_NODES = ("node-a", "node-b")
_HTTP = (("GET", "/api/users", 200), ("GET", "/api/cart/42", 200), ("POST", "/api/checkout", 201),
         ("GET", "/healthz", 200), ("GET", "/api/missing", 404), ("POST", "/api/pay", 503))


def _pod(rng: random.Random) -> tuple[str, str, str, int]:
    ns = rng.choice(_NAMESPACES)
    app = rng.choice(_APPS)
    pod = f"{app}-{rng.randrange(16**3):03x}{rng.randrange(16**4):04x}"
    ip = f"10.0.{_NAMESPACES.index(ns)}.{_APPS.index(app) * 16 + rng.randrange(16) + 2}"
    identity = 1000 + _NAMESPACES.index(ns) * 100 + _APPS.index(app)
    return ns, pod, ip, identity


def _endpoint(ns: str, pod: str, identity: int) -> schema.Endpoint:
    app = pod.rsplit("-", 1)[0]
    return schema.Endpoint(
        ID=identity % 4000 + 1, identity=identity, namespace=ns, pod_name=pod,
        labels=[f"k8s:app={app}", f"k8s:io.kubernetes.pod.namespace={ns}"],
        workloads=[schema.Workload(name=app, kind="Deployment")])


def sample_flow(rng: random.Random, time_ns: int, node_name: str | None = None) -> schema.Flow:
    """One plausible flow at ``time_ns``."""
    sns, spod, sip, sid = _pod(rng)
    dns_, dpod, dip, did = _pod(rng)
    node = node_name or rng.choice(_NODES)
    kind = rng.random()
    verdict = schema.Verdict.FORWARDED
    drop = schema.DropReason.DROP_REASON_UNKNOWN
    event = schema.CiliumEventType(type=schema.EVENT_TRACE, sub_type=0)
    l7 = None
    ftype = schema.FlowType.L3_L4
    sport = rng.randrange(32768, 60999)
    summary = ""
    if kind < 0.55:
        dport = rng.choice((80, 443, 5432, 6379, 8080))
        flags = rng.choice(({"SYN": True}, {"SYN": True, "ACK": True}, {"ACK": True}, {"FIN": True, "ACK": True}))
        l4 = schema.Layer4(TCP=schema.TCP(source_port=sport, destination_port=dport, flags=schema.TCPFlags(**flags)))
        summary = "TCP Flags: " + ", ".join(flags)
    elif kind < 0.75:
        l4 = schema.Layer4(UDP=schema.UDP(source_port=sport, destination_port=53))
        dns_, dpod, dip, did = "kube-system", "coredns-5d78c9869d-abcde", "10.0.1.114", 1106
        if rng.random() < 0.5:
            ftype = schema.FlowType.L7
            event = schema.CiliumEventType(type=schema.EVENT_L7)
            l7 = schema.Layer7(type=schema.L7FlowType.REQUEST, dns=schema.DNS(
                query=f"{rng.choice(_APPS)}.{rng.choice(_NAMESPACES)}.svc.cluster.local.", qtypes=["A"]))
        summary = "UDP"
    elif kind < 0.92:
        method, path, code = rng.choice(_HTTP)
        dport = 8080
        l4 = schema.Layer4(TCP=schema.TCP(source_port=sport, destination_port=dport))
        ftype = schema.FlowType.L7
        event = schema.CiliumEventType(type=schema.EVENT_L7)
        l7 = schema.Layer7(type=schema.L7FlowType.RESPONSE, latency_ns=str(rng.randrange(200_000, 90_000_000)),
                           http=schema.HTTP(code=code, method=method, url=f"http://{dpod}:{dport}{path}",
                                            protocol="HTTP/1.1",
                                            headers=[schema.HTTPHeader(key="user-agent", value="curl/8.4")]))
        summary = f"HTTP/1.1 {code} {method} http://{dpod}:{dport}{path}"
    else:
        l4 = schema.Layer4(ICMPv4=schema.ICMPv4(type=8))
        summary = "ICMPv4 EchoRequest"
    if rng.random() < 0.08:
        verdict = schema.Verdict.DROPPED
        drop = schema.DropReason.POLICY_DENIED
        event = schema.CiliumEventType(type=schema.EVENT_DROP, sub_type=133)
        ftype = schema.FlowType.L3_L4
        if l7 is not None:
            summary = "TCP" if l4.TCP is not None else "UDP"
        l7 = None
    direction = rng.choice((schema.TrafficDirection.EGRESS, schema.TrafficDirection.INGRESS))
    return schema.Flow(
        time=schema.format_timestamp(time_ns),
        uuid=f"{rng.getrandbits(32):08x}-{rng.getrandbits(16):04x}-4{rng.getrandbits(12):03x}-"
             f"a{rng.getrandbits(12):03x}-{rng.getrandbits(48):012x}",
        emitter=schema.Emitter(name="flowscope", version="0.1.0"),
        verdict=verdict,
        IP=schema.IP(source=sip, destination=dip, ipVersion=schema.IPVersion.IPv4),
        l4=l4,
        source=_endpoint(sns, spod, sid),
        destination=_endpoint(dns_, dpod, did),
        Type=ftype,
        node_name=node,
        l7=l7,
        event_type=event,
        traffic_direction=direction,
        trace_observation_point=schema.TraceObservationPoint.TO_ENDPOINT,
        drop_reason_desc=drop,
        is_reply=False,
        Summary=summary,
        flowscope=schema.FlowscopeExtension(event="new", egress_packets="1", egress_bytes=str(rng.randrange(60, 1500))),
    )


def sample_flows(n: int, *, seed: int = 1, start_ns: int = 1_700_000_000_000_000_000, step_ns: int = 1_000_000,
                 node_name: str | None = None) -> list[schema.Flow]:
    """``n`` flows, ``step_ns`` apart from ``start_ns`` (oldest first)."""
    rng = random.Random(seed)
    return [sample_flow(rng, start_ns + i * step_ns, node_name) for i in range(n)]


def iter_sample_flows(*, seed: int = 1, start_ns: int, step_ns: int = 1_000_000) -> Iterator[schema.Flow]:
    rng = random.Random(seed)
    i = 0
    while True:
        yield sample_flow(rng, start_ns + i * step_ns)
        i += 1
