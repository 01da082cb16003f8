"""The query model: JSON and URL-parameter spellings, round trips, Hubble's defaults, time parsing."""

from __future__ import annotations

import pytest

from flowscope import schema
from flowscope.filters import EventTypeFilter, FlowFilter
from flowscope.query import (
    DEFAULT_LAST,
    PARAM_NAMES,
    FlowQuery,
    QueryError,
    query_from_json,
    query_from_params,
    query_to_json,
    query_to_params,
)
from flowscope.timeparse import TimeParseError, format_duration, parse_duration, parse_time

NOW = 1_732_687_801_000_000_000  # 2024-11-27T06:10:01Z
S = 1_000_000_000


# --------------------------------------------------------------------------------------------
# time parsing
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,ns", [
    ("0", 0), ("500ms", 500_000_000), ("30s", 30 * S), ("5m", 300 * S), ("1h30m", 5400 * S),
    ("1.5h", 5400 * S), ("24h", 86400 * S), ("2d", 172800 * S), ("1d2h", 93600 * S), ("250us", 250_000),
    ("10µs", 10_000), ("7ns", 7), (".5s", 500_000_000), ("1h0.5m", 3630 * S),
])
def test_parse_duration(text, ns):
    assert parse_duration(text) == ns


@pytest.mark.parametrize("text", ["", "5", "1.5", "m", "5 m", "-5m", "5x", "1h-30m", "five minutes"])
def test_parse_duration_rejects(text):
    with pytest.raises(TimeParseError) as ei:
        parse_duration(text)
    assert "duration" in str(ei.value)


def test_format_duration_round_trip():
    for ns in (0, 1, 999, 1_500_000, 90 * S, 93600 * S + 5):
        assert parse_duration(format_duration(ns)) == ns


@pytest.mark.parametrize("text,expected", [
    ("5m", NOW - 300 * S),
    ("1h30m", NOW - 5400 * S),
    ("2d", NOW - 172800 * S),
    ("500ms", NOW - 500_000_000),
    ("now", NOW),
    ("2024-11-27T06:10:01Z", NOW),
    ("2024-11-27T06:10:01.5Z", NOW + 500_000_000),
    ("2024-11-27T07:10:01+01:00", NOW),
    ("2024-11-27 06:10:01Z", NOW),
    ("2024-11-27T06:10:01", NOW),
    ("2024-11-27", NOW - (6 * 3600 + 10 * 60 + 1) * S),
    ("2024-11-27T06Z", NOW - 601 * S),
    ("2024-11-27T06:10Z", NOW - S),
    ("Wed, 27 Nov 2024 06:10:01 +0000", NOW),
    ("1732687801", NOW),
    ("1732687801.25", NOW + 250_000_000),
])
def test_parse_time(text, expected):
    assert parse_time(text, now_ns=NOW) == expected


def test_parse_time_numbers_and_default_clock():
    assert parse_time(1732687801, now_ns=NOW) == NOW
    assert parse_time(1732687801.5) == NOW + 500_000_000
    import time

    before = time.time_ns()
    got = parse_time("1m")
    assert before - 61 * S < got <= time.time_ns() - 60 * S


@pytest.mark.parametrize("text", ["yesterday", "", "2024-13-01", "2024-11-27T25:00:00Z", "5 minutes ago", "-1"])
def test_parse_time_rejects_with_clear_message(text):
    with pytest.raises(TimeParseError) as ei:
        parse_time(text, now_ns=NOW)
    assert repr(text) in str(ei.value) or text == ""


# --------------------------------------------------------------------------------------------
# resolve(): Hubble's defaults
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,since,until,limit", [
    ({}, None, None, DEFAULT_LAST),
    ({"number": 5}, None, None, 5),
    ({"since": "5m"}, NOW - 300 * S, None, None),
    ({"since": "5m", "number": 3}, NOW - 300 * S, None, 3),
    ({"until": "2024-11-27T06:00:00Z"}, None, NOW - 601 * S, None),
    ({"first": True}, None, None, DEFAULT_LAST),
    ({"first": True, "number": 7}, None, None, 7),
    ({"follow": True}, None, None, 0),
    ({"follow": True, "number": 10}, None, None, 10),
    ({"follow": True, "since": "1h"}, NOW - 3600 * S, None, None),
])
def test_resolve_defaults(kw, since, until, limit):
    r = FlowQuery(**kw).resolve(NOW)
    assert (r.since_ns, r.until_ns, r.limit) == (since, until, limit)
    assert r.first == kw.get("first", False) and r.follow == kw.get("follow", False)


@pytest.mark.parametrize("kw,msg", [
    ({"since": "1h", "until": "2h"}, "after until"),
    ({"first": True, "follow": True}, "first and follow"),
    ({"follow": True, "until": "1m"}, "until cannot be combined with follow"),
    ({"since": "soon"}, "since"),
    ({"number": -1}, "non-negative"),
    ({"whitelist": [FlowFilter(source_ip=["300.1.1.1"])]}, "source_ip"),
    ({"blacklist": [FlowFilter(verdict=["MAYBE"])]}, "MAYBE"),
])
def test_resolve_errors(kw, msg):
    with pytest.raises(QueryError, match=msg):
        FlowQuery(**kw).resolve(NOW)


def test_resolved_filters_and_range():
    r = FlowQuery(whitelist=[FlowFilter(verdict=["DROPPED"])], since="10s", until="now").resolve(NOW)
    dropped = schema.load_flow({"verdict": "DROPPED"})
    fwd = schema.load_flow({"verdict": "FORWARDED"})
    assert r.filters.match(dropped) and not r.filters.match(fwd)
    assert r.in_range(NOW) and r.in_range(NOW - 10 * S) and not r.in_range(NOW - 11 * S) and not r.in_range(NOW + 1)


# --------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------

def test_query_from_json_hubble_request():
    body = b'''{"whitelist":[{"source_pod":["default/"],"event_type":[{"type":1,"match_sub_type":true,"sub_type":133}]},
               {"destination_ip":["10.0.0.0/8"],"tcp_flags":[{"SYN":true}]}],
               "blacklist":[{"verdict":["FORWARDED"]}],"since":"2024-11-27T06:00:00Z","number":50,"first":true}'''
    q = query_from_json(body)
    assert q.whitelist[0].event_type == [EventTypeFilter(type=1, match_sub_type=True, sub_type=133)]
    assert q.whitelist[1].tcp_flags == [schema.TCPFlags(SYN=True)]
    assert q.blacklist == [FlowFilter(verdict=["FORWARDED"])]
    assert (q.since, q.number, q.first, q.follow) == ("2024-11-27T06:00:00Z", 50, True, False)
    assert query_from_json(query_to_json(q)) == q


def test_query_from_json_aliases_and_empty_body():
    assert query_from_json(b"") == FlowQuery()
    assert query_from_json(b"{}") == FlowQuery()
    q = query_from_json(b'{"allowlist":[{"verdict":["DROPPED"]}],"denylist":[{"protocol":["udp"]}]}')
    assert q.whitelist == [FlowFilter(verdict=["DROPPED"])] and q.blacklist == [FlowFilter(protocol=["udp"])]


@pytest.mark.parametrize("body,msg", [
    (b"{", "invalid JSON"),
    (b"[]", "JSON object"),
    (b'{"whitelist":[{"source_ipp":["1.1.1.1"]}]}', "source_ipp.*valid filter fields: uuid, source_ip"),
    (b'{"limit":5}', "limit.*valid query fields: whitelist"),
    (b'{"number":"5"}', "number"),
    (b'{"number":-5}', "non-negative"),
    (b'{"whitelist":[{"source_ip":["10.0.0.1/99"]}]}', "source_ip: invalid CIDR"),
    (b'{"whitelist":[{"http_path":["(x"]}]}', "http_path"),
    (b'{"since":"last tuesday"}', "since"),
    (b'{"whitelist":{"verdict":["DROPPED"]}}', "whitelist"),
    (b'{"whitelist":[],"allowlist":[]}', "either"),
])
def test_query_from_json_errors(body, msg):
    with pytest.raises(QueryError, match=msg):
        query_from_json(body)


# --------------------------------------------------------------------------------------------
# URL parameters
# --------------------------------------------------------------------------------------------

def test_query_from_params_all_forms():
    q = query_from_params([
        ("verdict", "DROPPED"), ("verdict", "ERROR"), ("source_pod", "default/front"),
        ("tcp_flags", "SYN,ACK"), ("tcp_flags", "fin"), ("event_type", "1"), ("event_type", "1:133"),
        ("event_type", "trace:to-endpoint"), ("event_type", "l7"), ("http_header", "x-env:prod:eu"),
        ("source_workload", "Deployment/front"), ("destination_workload", "api"), ("interface", "eth0"),
        ("interface", "3"), ("reply", "true"), ("source_identity", "world"), ("destination_identity", "1234"),
        ("not_verdict", "FORWARDED"), ("not_destination_port", "53"),
        ("since", "5m"), ("until", "1m"), ("last", "10"),
    ])
    w = q.whitelist[0]
    assert w.verdict == ["DROPPED", "ERROR"] and w.source_pod == ["default/front"]
    assert w.tcp_flags == [schema.TCPFlags(SYN=True, ACK=True), schema.TCPFlags(FIN=True)]
    assert w.event_type == [EventTypeFilter(type=1), EventTypeFilter(type=1, match_sub_type=True, sub_type=133),
                            EventTypeFilter(type=4, match_sub_type=True, sub_type=0), EventTypeFilter(type=129)]
    assert w.http_header == [schema.HTTPHeader(key="x-env", value="prod:eu")]
    assert w.source_workload == [schema.Workload(kind="Deployment", name="front")]
    assert w.destination_workload == [schema.Workload(name="api")]
    assert w.interface == [schema.NetworkInterface(name="eth0"), schema.NetworkInterface(index=3)]
    assert w.reply == [True] and w.source_identity == [2] and w.destination_identity == [1234]
    assert q.blacklist == [FlowFilter(verdict=["FORWARDED"], destination_port=["53"])]
    assert (q.since, q.until, q.number, q.first, q.follow) == ("5m", "1m", 10, False, False)


@pytest.mark.parametrize("items,expected", [
    ([], FlowQuery()),
    ([("first", "5")], FlowQuery(number=5, first=True)),
    ([("first", "true")], FlowQuery(first=True)),
    ([("number", "5"), ("first", "true")], FlowQuery(number=5, first=True)),
    ([("follow", "")], FlowQuery(follow=True)),
    ([("follow", "false")], FlowQuery()),
    ([("follow", "1"), ("last", "3")], FlowQuery(follow=True, number=3)),
    ([("whitelist", '{"source_ip":["1.2.3.4"]}'), ("whitelist", '{"destination_ip":["1.2.3.4"]}')],
     FlowQuery(whitelist=[FlowFilter(source_ip=["1.2.3.4"]), FlowFilter(destination_ip=["1.2.3.4"])])),
    ([("blacklist", '{"verdict":["DROPPED"]}'), ("blacklist", '{"protocol":["udp"]}')],
     FlowQuery(blacklist=[FlowFilter(verdict=["DROPPED"]), FlowFilter(protocol=["udp"])])),
])
def test_query_from_params_control(items, expected):
    assert query_from_params(items) == expected


@pytest.mark.parametrize("items,msg", [
    ([("verdicts", "DROPPED")], "unknown query parameter 'verdicts'.*source_ip.*not_ prefix"),
    ([("not_since", "5m")], "unknown query parameter 'not_since'"),
    ([("last", "x")], "last: expected a non-negative integer"),
    ([("last", "5"), ("first", "5")], "only one of last, first"),
    ([("since", "1m"), ("since", "2m")], "more than once"),
    ([("follow", "maybe")], "follow: invalid boolean"),
    ([("first", "soon")], "first: expected a count"),
    ([("tcp_flags", "SYN,BOGUS")], "tcp_flags: unknown TCP flag 'BOGUS'"),
    ([("not_tcp_flags", "BOGUS")], "not_tcp_flags: unknown TCP flag"),
    ([("event_type", "sideways")], "event_type: unknown event type 'sideways'"),
    ([("http_header", "novalue")], "http_header: invalid HTTP header 'novalue'"),
    ([("source_identity", "nobody")], "source_identity: invalid security identity 'nobody'"),
    ([("reply", "perhaps")], "reply: invalid boolean"),
    ([("source_ip", "1.2.3")], "source_ip: invalid IP address '1.2.3'"),
    ([("not_source_label", "a in (b")], "source_label"),
    ([("whitelist", '{"verdict":"DROPPED"}')], "whitelist: invalid FlowFilter JSON"),
    ([("whitelist", '{"nope":[]}')], "valid filter fields"),
    ([("http_method", "GET"), ("event_type", "trace")], "http_method: filtering by http method requires"),
    ([("until", "2d"), ("since", "1d")], "after until"),
])
def test_query_from_params_errors(items, msg):
    with pytest.raises(QueryError, match=msg):
        query_from_params(items)


ROUND_TRIPS = [
    FlowQuery(),
    FlowQuery(number=100),
    FlowQuery(number=5, first=True),
    FlowQuery(first=True),
    FlowQuery(follow=True, since="5m"),
    FlowQuery(since="2024-11-27T06:00:00Z", until="2024-11-27T07:00:00.5Z"),
    FlowQuery(whitelist=[FlowFilter(verdict=["DROPPED", "ERROR"], source_pod=["default/"], destination_port=["80"],
                                    source_label=["app in (a,b), !canary"], http_path=[r"^/v1/.*\?x=1"],
                                    tcp_flags=[schema.TCPFlags(SYN=True, ACK=True)],
                                    event_type=[EventTypeFilter(type=129), EventTypeFilter(type=1, match_sub_type=True,
                                                                                           sub_type=133)],
                                    http_header=[schema.HTTPHeader(key="a", value="b:c")],
                                    source_workload=[schema.Workload(kind="Deployment", name="x"),
                                                     schema.Workload(name="y"), schema.Workload(kind="", name="a/b")],
                                    interface=[schema.NetworkInterface(name="eth0"), schema.NetworkInterface(index=4)],
                                    reply=[False], source_identity=[2, 1234], node_name=["k8s*"],
                                    ip_version=["IPv4"], traffic_direction=["INGRESS"])],
              blacklist=[FlowFilter(protocol=["udp"], destination_ip=["10.0.0.0/8"])], number=7),
    # several allowlist filters (hubble observe --ip) and values without a flat text form
    FlowQuery(whitelist=[FlowFilter(source_ip=["1.2.3.4"]), FlowFilter(destination_ip=["1.2.3.4"])],
              blacklist=[FlowFilter(http_header=[schema.HTTPHeader(key="a:b", value="c")])]),
    FlowQuery(whitelist=[FlowFilter(interface=[schema.NetworkInterface(index=3, name="eth0")])]),
    FlowQuery(whitelist=[FlowFilter(interface=[schema.NetworkInterface(name="123")])]),
    FlowQuery(whitelist=[FlowFilter()]),
    FlowQuery(whitelist=[FlowFilter(tcp_flags=[schema.TCPFlags()])]),
]


@pytest.mark.parametrize("q", ROUND_TRIPS)
def test_params_round_trip(q):
    params = query_to_params(q)
    assert all(name in PARAM_NAMES for name, _ in params)
    assert query_from_params(params) == q
    # and through JSON
    assert query_from_json(query_to_json(q)) == q


def test_to_params_is_flat_when_possible():
    q = FlowQuery(whitelist=[FlowFilter(verdict=["DROPPED"], tcp_flags=[schema.TCPFlags(SYN=True)])],
                  blacklist=[FlowFilter(destination_port=["53"])], since="5m", number=3, follow=True)
    assert query_to_params(q) == [("verdict", "DROPPED"), ("tcp_flags", "SYN"), ("not_destination_port", "53"),
                                  ("since", "5m"), ("last", "3"), ("follow", "true")]
    two = FlowQuery(whitelist=[FlowFilter(source_ip=["1.2.3.4"]), FlowFilter(destination_ip=["1.2.3.4"])])
    assert [name for name, _ in query_to_params(two)] == ["whitelist", "whitelist"]
