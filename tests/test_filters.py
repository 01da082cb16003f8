"""Hubble filter semantics, field by field (table-driven), plus FilterSet and SQL pushdown."""

from __future__ import annotations

import ipaddress

import msgspec
import pytest

from flowscope import schema
from flowscope.filters import (
    EventTypeFilter,
    FilterError,
    FilterSet,
    FlowFilter,
    compile_filter,
    parse_event_type,
    parse_identity,
    parse_tcp_flags,
    sql_pushdown,
)


def flow(**kw) -> schema.Flow:
    """A flow from Hubble-shaped JSON keys, with a TCP 10.0.0.1:40000 -> 10.0.0.2:80 default."""
    base = {
        "time": "2024-11-27T06:10:01.123Z",
        "verdict": "FORWARDED",
        "IP": {"source": "10.0.0.1", "destination": "10.0.0.2", "ipVersion": "IPv4"},
        "l4": {"TCP": {"source_port": 40000, "destination_port": 80}},
        "source": {"identity": 1234, "namespace": "default", "pod_name": "frontend-7c9",
                   "labels": ["k8s:app=frontend", "k8s:io.kubernetes.pod.namespace=default", "k8s:tier=web"]},
        "destination": {"identity": 5678, "namespace": "shop", "pod_name": "api-5d4",
                        "labels": ["k8s:app=api", "k8s:io.kubernetes.pod.namespace=shop", "k8s:version=2"]},
        "Type": "L3_L4",
        "node_name": "node-1",
        "event_type": {"type": 4, "sub_type": 0},
        "traffic_direction": "EGRESS",
        "is_reply": False,
    }
    base.update(kw)
    return schema.load_flow({k: v for k, v in base.items() if v is not None})


def matches(f: FlowFilter, fl: schema.Flow) -> bool:
    return compile_filter(f)(fl)


HTTP_REQ = {"type": "REQUEST", "http": {"method": "GET", "url": "http://api/users/42?x=1", "protocol": "HTTP/1.1",
                                        "headers": [{"key": "x-env", "value": "prod"}]}}
HTTP_RESP = {"type": "RESPONSE", "latency_ns": "2000000",
             "http": {"code": 404, "method": "GET", "url": "http://api/users/42", "protocol": "HTTP/1.1"}}
DNS_REQ = {"type": "REQUEST", "dns": {"query": "api.example.com.", "qtypes": ["A"]}}

# (id, filter kwargs, flow kwargs, expected)
CASES = [
    # IPs: exact, CIDR, OR within the field, v6, no IP at all
    ("src-ip exact", {"source_ip": ["10.0.0.1"]}, {}, True),
    ("src-ip other", {"source_ip": ["10.0.0.9"]}, {}, False),
    ("src-ip cidr", {"source_ip": ["10.0.0.0/24"]}, {}, True),
    ("src-ip cidr miss", {"source_ip": ["10.1.0.0/16"]}, {}, False),
    ("src-ip OR", {"source_ip": ["192.168.0.1", "10.0.0.0/8"]}, {}, True),
    ("dst-ip exact", {"destination_ip": ["10.0.0.2"]}, {}, True),
    ("dst-ip is not src", {"destination_ip": ["10.0.0.1"]}, {}, False),
    ("ip v6 cidr", {"source_ip": ["fd00::/64"]},
     {"IP": {"source": "fd00::1", "destination": "fd00::2", "ipVersion": "IPv6"}}, True),
    ("ip v6 non-canonical filter", {"source_ip": ["fd00:0::1"]},
     {"IP": {"source": "fd00::1", "destination": "fd00::2", "ipVersion": "IPv6"}}, True),
    ("ip v6 non-canonical flow", {"source_ip": ["fd00::1"]},
     {"IP": {"source": "fd00:0:0::1", "destination": "fd00::2", "ipVersion": "IPv6"}}, True),
    ("ip v4 cidr vs v6 flow", {"source_ip": ["10.0.0.0/8"]},
     {"IP": {"source": "fd00::1", "destination": "fd00::2", "ipVersion": "IPv6"}}, False),
    ("ip without IP", {"source_ip": ["10.0.0.1"]}, {"IP": None}, False),
    # pods: ns/prefix, ns/, bare prefix means namespace default, /prefix any namespace
    ("pod ns/prefix", {"source_pod": ["default/front"]}, {}, True),
    ("pod ns/", {"destination_pod": ["shop/"]}, {}, True),
    ("pod wrong ns", {"destination_pod": ["default/api"]}, {}, False),
    ("pod bare = default ns", {"source_pod": ["frontend"]}, {}, True),
    ("pod bare not other ns", {"destination_pod": ["api"]}, {}, False),
    ("pod any ns", {"destination_pod": ["/api"]}, {}, True),
    ("pod prefix miss", {"source_pod": ["default/backend"]}, {}, False),
    ("pod OR", {"destination_pod": ["default/x", "shop/api"]}, {}, True),
    ("pod no endpoint", {"source_pod": ["default/"]}, {"source": None}, False),
    # services
    ("service", {"destination_service": ["shop/api"]},
     {"destination_service": {"name": "api-svc", "namespace": "shop"}}, True),
    ("service miss", {"destination_service": ["shop/web"]},
     {"destination_service": {"name": "api-svc", "namespace": "shop"}}, False),
    # labels: every selector form, sources
    ("label k=v", {"source_label": ["app=frontend"]}, {}, True),
    ("label k==v", {"source_label": ["app==frontend"]}, {}, True),
    ("label k=v miss", {"source_label": ["app=api"]}, {}, False),
    ("label k8s: prefix", {"source_label": ["k8s:app=frontend"]}, {}, True),
    ("label other source", {"source_label": ["container:app=frontend"]}, {}, False),
    ("label k!=v", {"source_label": ["app!=api"]}, {}, True),
    ("label k!=v same", {"source_label": ["app!=frontend"]}, {}, False),
    ("label k!=v absent key", {"source_label": ["zone!=a"]}, {}, True),
    ("label in", {"destination_label": ["app in (web, api)"]}, {}, True),
    ("label in miss", {"destination_label": ["app in (web,db)"]}, {}, False),
    ("label notin", {"destination_label": ["app notin (web,db)"]}, {}, True),
    ("label notin hit", {"destination_label": ["app notin (api)"]}, {}, False),
    ("label exists", {"source_label": ["tier"]}, {}, True),
    ("label exists miss", {"source_label": ["zone"]}, {}, False),
    ("label !exists", {"source_label": ["!zone"]}, {}, True),
    ("label !exists hit", {"source_label": ["!tier"]}, {}, False),
    ("label comma = AND", {"source_label": ["app=frontend,tier=web"]}, {}, True),
    ("label comma AND miss", {"source_label": ["app=frontend,tier=db"]}, {}, False),
    ("label OR across selectors", {"source_label": ["app=x", "tier=web"]}, {}, True),
    ("label gt", {"destination_label": ["version>1"]}, {}, True),
    ("label lt", {"destination_label": ["version<2"]}, {}, False),
    ("label dotted key", {"destination_label": ["io.kubernetes.pod.namespace=shop"]}, {}, True),
    ("label reserved world", {"destination_label": ["reserved:world"]},
     {"destination": {"identity": 2, "labels": ["reserved:world"]}}, True),
    ("label reserved vs k8s", {"destination_label": ["reserved:world"]}, {}, False),
    ("label unspec source", {"source_label": ["app=x"]}, {"source": {"labels": ["app=x"]}}, True),
    ("label $host", {"source_label": ["reserved:host"]}, {"source": {"labels": ["$host"]}}, True),
    ("label no endpoint", {"source_label": ["!zone"]}, {"source": None}, False),
    ("node labels", {"node_labels": ["zone in (a,b)"]}, {"node_labels": ["k8s:zone=a"]}, True),
    # fqdn
    ("fqdn exact", {"destination_fqdn": ["api.example.com"]}, {"destination_names": ["api.example.com"]}, True),
    ("fqdn wildcard", {"destination_fqdn": ["*.example.com"]}, {"destination_names": ["a.b.example.com"]}, True),
    ("fqdn trailing dot + case", {"destination_fqdn": ["API.Example.COM."]},
     {"destination_names": ["api.example.com"]}, True),
    ("fqdn miss", {"destination_fqdn": ["*.example.org"]}, {"destination_names": ["api.example.com"]}, False),
    ("fqdn no names", {"source_fqdn": ["*"]}, {}, False),
    # identities
    ("identity", {"source_identity": [1234]}, {}, True),
    ("identity OR", {"destination_identity": [1, 5678]}, {}, True),
    ("identity miss", {"destination_identity": [1234]}, {}, False),
    # workloads
    ("workload name", {"source_workload": [{"name": "frontend"}]},
     {"source": {"workloads": [{"name": "frontend", "kind": "Deployment"}]}}, True),
    ("workload kind", {"source_workload": [{"kind": "Deployment"}]},
     {"source": {"workloads": [{"name": "frontend", "kind": "Deployment"}]}}, True),
    ("workload kind miss", {"source_workload": [{"kind": "DaemonSet", "name": "frontend"}]},
     {"source": {"workloads": [{"name": "frontend", "kind": "Deployment"}]}}, False),
    # enums
    ("verdict", {"verdict": ["FORWARDED"]}, {}, True),
    ("verdict lower-case name", {"verdict": ["forwarded"]}, {}, True),
    ("verdict OR", {"verdict": ["DROPPED", "FORWARDED"]}, {}, True),
    ("verdict miss", {"verdict": ["DROPPED"]}, {}, False),
    ("verdict number", {"verdict": [2]}, {"verdict": "DROPPED"}, True),
    ("drop reason", {"drop_reason_desc": ["POLICY_DENIED"]},
     {"verdict": "DROPPED", "drop_reason_desc": "POLICY_DENIED"}, True),
    ("drop reason needs DROPPED", {"drop_reason_desc": ["POLICY_DENIED"]},
     {"verdict": "FORWARDED", "drop_reason_desc": "POLICY_DENIED"}, False),
    ("direction", {"traffic_direction": ["EGRESS"]}, {}, True),
    ("direction miss", {"traffic_direction": ["INGRESS"]}, {}, False),
    ("ip version", {"ip_version": ["IPv4"]}, {}, True),
    ("ip version miss", {"ip_version": ["IPv6"]}, {}, False),
    ("ip version inferred", {"ip_version": ["IPv6"]}, {"IP": {"source": "fd00::1", "destination": "fd00::2"}}, True),
    ("ip version none", {"ip_version": ["IP_NOT_USED"]}, {"IP": None}, True),
    # event types
    ("event type", {"event_type": [{"type": 4}]}, {}, True),
    ("event type subtype", {"event_type": [{"type": 4, "match_sub_type": True, "sub_type": 0}]}, {}, True),
    ("event type subtype miss", {"event_type": [{"type": 4, "match_sub_type": True, "sub_type": 5}]}, {}, False),
    ("event type any type", {"event_type": [{"type": 0}]}, {}, True),
    ("event type missing", {"event_type": [{"type": 4}]}, {"event_type": None}, False),
    # protocols
    ("proto tcp", {"protocol": ["tcp"]}, {}, True),
    ("proto TCP upper", {"protocol": ["TCP"]}, {}, True),
    ("proto udp miss", {"protocol": ["udp"]}, {}, False),
    ("proto icmp = v4", {"protocol": ["icmp"]}, {"l4": {"ICMPv4": {"type": 8}}}, True),
    ("proto icmp = v6", {"protocol": ["icmp"]}, {"l4": {"ICMPv6": {"type": 128}}}, True),
    ("proto icmpv4 not v6", {"protocol": ["icmpv4"]}, {"l4": {"ICMPv6": {"type": 128}}}, False),
    ("proto sctp", {"protocol": ["sctp"]}, {"l4": {"SCTP": {"source_port": 1, "destination_port": 2}}}, True),
    ("proto http", {"protocol": ["http"]}, {"l7": HTTP_REQ, "Type": "L7"}, True),
    ("proto http on L3/L4", {"protocol": ["http"]}, {}, False),
    ("proto dns", {"protocol": ["dns"]}, {"l7": DNS_REQ}, True),
    ("proto OR", {"protocol": ["udp", "tcp"]}, {}, True),
    # ports
    ("src port", {"source_port": ["40000"]}, {}, True),
    ("dst port", {"destination_port": ["80"]}, {}, True),
    ("dst port int", {"destination_port": [80]}, {}, True),
    ("dst port miss", {"destination_port": ["443"]}, {}, False),
    ("udp port", {"destination_port": ["53"]}, {"l4": {"UDP": {"source_port": 5353, "destination_port": 53}}}, True),
    ("port on icmp", {"destination_port": ["0"]}, {"l4": {"ICMPv4": {"type": 8}}}, False),
    # reply
    ("reply false", {"reply": [False]}, {}, True),
    ("reply true miss", {"reply": [True]}, {}, False),
    ("reply unknown", {"reply": [False]}, {"is_reply": None}, False),
    ("reply unknown dropped = false", {"reply": [False]}, {"is_reply": None, "verdict": "DROPPED"}, True),
    # tcp flags
    ("tcp SYN", {"tcp_flags": [{"SYN": True}]}, {"l4": {"TCP": {"flags": {"SYN": True, "ACK": True}}}}, True),
    ("tcp SYN+ACK needs both", {"tcp_flags": [{"SYN": True, "ACK": True}]}, {"l4": {"TCP": {"flags": {"SYN": True}}}},
     False),
    ("tcp flags OR entries", {"tcp_flags": [{"FIN": True}, {"SYN": True}]}, {"l4": {"TCP": {"flags": {"SYN": True}}}},
     True),
    ("tcp flags absent", {"tcp_flags": [{"SYN": True}]}, {}, False),
    # node names
    ("node exact", {"node_name": ["node-1"]}, {}, True),
    ("node glob", {"node_name": ["node-*"]}, {}, True),
    ("node glob miss", {"node_name": ["k8s*"]}, {}, False),
    ("node cluster/node", {"node_name": ["default/node-1"]}, {}, True),
    ("node other cluster", {"node_name": ["prod/node-1"]}, {}, False),
    ("node cluster glob", {"node_name": ["prod-*/"]}, {"node_name": "prod-eu/worker"}, True),
    ("node empty", {"node_name": ["*"]}, {"node_name": None}, False),
    # http
    ("http status exact", {"http_status_code": ["404"]}, {"l7": HTTP_RESP}, True),
    ("http status 4+", {"http_status_code": ["4+"]}, {"l7": HTTP_RESP}, True),
    ("http status 40+", {"http_status_code": ["40+"]}, {"l7": HTTP_RESP}, True),
    ("http status 5+ miss", {"http_status_code": ["5+"]}, {"l7": HTTP_RESP}, False),
    ("http status on request", {"http_status_code": ["4+"]}, {"l7": HTTP_REQ}, False),
    ("http method ci", {"http_method": ["get"]}, {"l7": HTTP_REQ}, True),
    ("http method miss", {"http_method": ["POST"]}, {"l7": HTTP_REQ}, False),
    ("http path regex", {"http_path": [r"^/users/\d+$"]}, {"l7": HTTP_REQ}, True),
    ("http path excludes query", {"http_path": [r"x=1"]}, {"l7": HTTP_REQ}, False),
    ("http url regex", {"http_url": [r"api/users"]}, {"l7": HTTP_REQ}, True),
    ("http url miss", {"http_url": [r"^https://"]}, {"l7": HTTP_REQ}, False),
    ("http header", {"http_header": [{"key": "x-env", "value": "prod"}]}, {"l7": HTTP_REQ}, True),
    ("http header value miss", {"http_header": [{"key": "x-env", "value": "dev"}]}, {"l7": HTTP_REQ}, False),
    ("http fields on L3/L4", {"http_method": ["GET"]}, {}, False),
    ("http with l7 event type", {"http_method": ["GET"], "event_type": [{"type": 129}]},
     {"l7": HTTP_REQ, "event_type": {"type": 129}}, True),
    # dns
    ("dns query regex", {"dns_query": [r"example\.com"]}, {"l7": DNS_REQ}, True),
    ("dns query miss", {"dns_query": [r"^cilium"]}, {"l7": DNS_REQ}, False),
    # uuid, interface
    ("uuid", {"uuid": ["abc"]}, {"uuid": "abc"}, True),
    ("uuid miss", {"uuid": ["abc"]}, {"uuid": "abd"}, False),
    ("interface name", {"interface": [{"name": "veth1"}]}, {"interface": {"index": 7, "name": "veth1"}}, True),
    ("interface index", {"interface": [{"index": 7}]}, {"interface": {"index": 7, "name": "veth1"}}, True),
    ("interface both must match", {"interface": [{"index": 8, "name": "veth1"}]},
     {"interface": {"index": 7, "name": "veth1"}}, False),
    ("interface absent", {"interface": [{"name": "veth1"}]}, {}, False),
    # AND across fields
    ("AND all match", {"source_pod": ["default/"], "destination_port": ["80"], "verdict": ["FORWARDED"]}, {}, True),
    ("AND one fails", {"source_pod": ["default/"], "destination_port": ["80"], "verdict": ["DROPPED"]}, {}, False),
    ("empty filter matches all", {}, {}, True),
]


def ffilter(fkw: dict) -> FlowFilter:
    """A FlowFilter from its JSON form (nested objects for workloads, headers, flags...)."""
    return msgspec.convert(fkw, FlowFilter)


@pytest.mark.parametrize("fkw,flow_kw,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_filter_field(fkw, flow_kw, expected):
    assert matches(ffilter(fkw), flow(**flow_kw)) is expected


BAD = [
    ({"source_ip": ["10.0.0.300"]}, "source_ip", "10.0.0.300"),
    ({"destination_ip": ["10.0.0.0/33"]}, "destination_ip", "10.0.0.0/33"),
    ({"http_path": ["("]}, "http_path", "("),
    ({"dns_query": ["[a"]}, "dns_query", "[a"),
    ({"source_label": ["app in (a"]}, "source_label", "app in (a"),
    ({"source_label": ["app=a=b"]}, "source_label", "app=a=b"),
    ({"source_label": ["a b"]}, "source_label", "a b"),
    ({"source_label": ["app>x"]}, "source_label", "app>x"),
    ({"verdict": ["NOPE"]}, "verdict", "NOPE"),
    ({"traffic_direction": ["SIDEWAYS"]}, "traffic_direction", "SIDEWAYS"),
    ({"drop_reason_desc": ["NOT_A_REASON"]}, "drop_reason_desc", "NOT_A_REASON"),
    ({"ip_version": ["IPv5"]}, "ip_version", "IPv5"),
    ({"source_port": ["http"]}, "source_port", "http"),
    ({"destination_port": ["65536"]}, "destination_port", "65536"),
    ({"protocol": ["quic"]}, "protocol", "quic"),
    ({"http_status_code": ["600"]}, "http_status_code", "600"),
    ({"http_status_code": ["4xx"]}, "http_status_code", "4xx"),
    ({"source_pod": [""]}, "source_pod", ""),
    ({"source_pod": ["a/b/c"]}, "source_pod", "a/b/c"),
    ({"destination_fqdn": ["exa mple.com"]}, "destination_fqdn", "exa mple.com"),
    ({"node_name": ["a/b/c"]}, "node_name", "a/b/c"),
    ({"http_method": ["GET"], "event_type": [{"type": 4}]}, "http_method", "event type"),
]


@pytest.mark.parametrize("fkw,field,value", BAD, ids=[f"{b[1]}={b[2]}" for b in BAD])
def test_invalid_values_name_field_and_value(fkw, field, value):
    with pytest.raises(FilterError) as ei:
        compile_filter(ffilter(fkw))
    assert field in str(ei.value)
    assert value in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_filterset_allow_deny():
    fwd = flow()
    drop = flow(verdict="DROPPED", drop_reason_desc="POLICY_DENIED")
    dns = flow(l4={"UDP": {"source_port": 5353, "destination_port": 53}})
    everything = FilterSet()
    assert everything.matches_all and all(everything.match(x) for x in (fwd, drop, dns))
    # allowlist: OR of filters
    allow = FilterSet([FlowFilter(verdict=["DROPPED"]), FlowFilter(destination_port=["53"])])
    assert [allow.match(x) for x in (fwd, drop, dns)] == [False, True, True]
    # denylist only: everything but
    deny = FilterSet(blacklist=[FlowFilter(protocol=["udp"])])
    assert [deny.match(x) for x in (fwd, drop, dns)] == [True, True, False]
    # both: allowed and not denied
    both = FilterSet([FlowFilter(source_pod=["default/"])], [FlowFilter(verdict=["DROPPED"]), FlowFilter(protocol=["udp"])])
    assert [both.match(x) for x in (fwd, drop, dns)] == [True, False, False]
    assert both.match_many([fwd, drop, dns, fwd]) == [fwd, fwd]
    # an empty allowlist filter admits everything (then the denylist applies)
    assert FilterSet([FlowFilter(), FlowFilter(verdict=["DROPPED"])], [FlowFilter(protocol=["udp"])]).match_many(
        [fwd, drop, dns]) == [fwd, drop]


def test_filterset_accepts_dicts_and_reports_bad_ones():
    fs = FilterSet([{"verdict": ["DROPPED"]}], [{"destination_port": ["53"]}])
    assert fs.whitelist == [FlowFilter(verdict=["DROPPED"])]
    with pytest.raises(FilterError, match="source_ipx"):
        FilterSet([{"source_ipx": ["1.2.3.4"]}])
    with pytest.raises(FilterError, match="source_ip"):
        FilterSet([{"source_ip": ["1.2.3"]}])


def test_many_fields_and_ordering_do_not_change_results():
    ff = FlowFilter(source_label=["app=frontend"], destination_port=["80"], verdict=["FORWARDED"],
                    source_ip=["10.0.0.0/8"], node_name=["node-*"], protocol=["tcp"])
    m = compile_filter(ff)
    assert m(flow())
    for change in ({"verdict": "DROPPED"}, {"node_name": "other"}, {"IP": {"source": "11.0.0.1", "destination": "x"}},
                   {"l4": {"UDP": {"source_port": 1, "destination_port": 80}}}):
        assert not m(flow(**change)), change


def test_text_forms():
    assert parse_event_type("trace:to-endpoint") == EventTypeFilter(type=4, match_sub_type=True, sub_type=0)
    assert parse_event_type("1:133") == EventTypeFilter(type=1, match_sub_type=True, sub_type=133)
    assert parse_event_type("l7") == EventTypeFilter(type=129)
    assert parse_event_type("policy-verdict") == EventTypeFilter(type=5)
    with pytest.raises(FilterError, match="nosuch"):
        parse_event_type("nosuch")
    with pytest.raises(FilterError, match="to-nowhere"):
        parse_event_type("trace:to-nowhere")
    assert parse_tcp_flags("syn,ACK") == schema.TCPFlags(SYN=True, ACK=True)
    for bad in ("syn,", ",syn", "unknown"):
        with pytest.raises(FilterError):
            parse_tcp_flags(bad)
    assert parse_identity("world") == 2 and parse_identity("42") == 42
    with pytest.raises(FilterError, match="bad"):
        parse_identity("bad")


def test_sql_pushdown():
    fs = FilterSet([
        FlowFilter(verdict=["dropped"], source_ip=["10.0.0.1"], destination_port=["53", "5353"], protocol=["udp"],
                   source_pod=["shop/api", "web"]),
        FlowFilter(node_name=["Node-1"], traffic_direction=["ingress"], source_label=["app=x"]),
    ])
    hints = sql_pushdown(fs)["allowlist"]
    assert hints[0] == {"conditions": {"verdict": ["DROPPED"], "source_ip": ["10.0.0.1"],
                                       "destination_port": [53, 5353], "source_pod": [["shop", "api"], ["default", "web"]],
                                       "l4_protocol": ["UDP"]}, "exact": True}
    assert hints[1] == {"conditions": {"traffic_direction": ["INGRESS"], "node_name": ["default/node-1", "node-1"]},
                        "exact": False}
    # a filter with nothing pushable (or no allowlist) means a full scan
    assert sql_pushdown(FilterSet([FlowFilter(verdict=["DROPPED"]), FlowFilter(source_label=["a"])])) == {
        "allowlist": None}
    assert sql_pushdown(FilterSet(blacklist=[FlowFilter(verdict=["DROPPED"])])) == {"allowlist": None}
    # CIDRs and globs are not pushed as exact values
    cond = sql_pushdown(FilterSet([FlowFilter(source_ip=["10.0.0.0/8"], node_name=["k8s*"], verdict=["ERROR"])]))
    assert cond["allowlist"][0]["conditions"] == {"verdict": ["ERROR"]}


def test_pushdown_exactness_edge_cases():
    def exact(ff: FlowFilter) -> bool:
        return sql_pushdown(FilterSet([ff]))["allowlist"][0]["exact"]

    assert exact(FlowFilter(destination_port=["80"], source_identity=[2]))
    assert not exact(FlowFilter(destination_port=["0", "80"]))  # ICMP rows may store port 0
    assert not exact(FlowFilter(destination_port=["80"], source_identity=[0]))
    # "any namespace, any pod" needs an endpoint to exist: not expressible, not pushed
    hint = sql_pushdown(FilterSet([FlowFilter(source_pod=["/"], verdict=["DROPPED"])]))["allowlist"][0]
    assert hint == {"conditions": {"verdict": ["DROPPED"]}, "exact": False}


def test_pushdown_is_implied_by_the_filter():
    """Every pushed condition must hold for every flow the filter keeps (a superset, never a cut)."""
    import itertools

    flows = [flow(), flow(verdict="DROPPED", drop_reason_desc="POLICY_DENIED"),
             flow(node_name="default/node-1"), flow(l4={"UDP": {"source_port": 1, "destination_port": 53}}),
             flow(IP={"source": "fd00:0:0::1", "destination": "fd00::2"}), flow(traffic_direction="INGRESS")]
    filters = [FlowFilter(node_name=["node-1"]), FlowFilter(drop_reason_desc=["POLICY_DENIED"]),
               FlowFilter(destination_port=["53"], protocol=["udp"]), FlowFilter(source_ip=["fd00::1"]),
               FlowFilter(traffic_direction=["INGRESS"], verdict=["FORWARDED"])]

    def sql_like(cond: dict, f: schema.Flow) -> bool:
        checks = {
            "verdict": lambda v: f.verdict.value in v,
            "drop_reason_desc": lambda v: f.drop_reason_desc.value in v,
            "traffic_direction": lambda v: f.traffic_direction.value in v,
            "node_name": lambda v: f.node_name in v,
            # a store keeps addresses canonical
            "source_ip": lambda v: f.IP is not None and str(ipaddress.ip_address(f.IP.source)) in v,
            "destination_port": lambda v: f.l4 is not None and (f.l4.TCP or f.l4.UDP).destination_port in v,
            "l4_protocol": lambda v: f.l4 is not None and any(getattr(f.l4, p) is not None for p in v),
        }
        return all(checks[k](v) for k, v in cond.items())

    for ff, f in itertools.product(filters, flows):
        hint = sql_pushdown(FilterSet([ff]))["allowlist"][0]["conditions"]
        if compile_filter(ff)(f):
            assert sql_like(hint, f), (ff, f)
