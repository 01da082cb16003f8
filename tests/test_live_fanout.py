"""Live fan-out (issue 10): subscribers with equal filters share one filtering pass and the same encoded
bytes, each filter gets exactly its flows, a slow subscriber only loses (and counts) its own oldest flows,
and permessage-deflate is negotiated only where it is wanted (the flow stream: on request).

Pure hub logic first (no server), then a real ``serve()`` subprocess with websocket clients."""

from __future__ import annotations

import asyncio
import time
from contextlib import ExitStack

import httpx
import msgspec
import pytest
from websockets.sync.client import connect as ws_connect

from api.live import ALL, LiveHub, Segment, filter_key
from api.samples import sample_flows
from api.wscompress import may_compress, stream_compression_requested, uvicorn_ws_options
from flowscope import schema
from flowscope.query import QueryError, query_from_params
from tests.test_api_live import committed, ids
from tests.test_api_server import Server, assert_error_then_close, frames

T0 = 1_732_000_000_000_000_000


def flt(*params):
    """(match, key) of URL filter parameters, as the stream route builds them."""
    fs = query_from_params(list(params)).resolve().filters
    return (None if fs.matches_all else fs.match), filter_key(fs.whitelist, fs.blacklist)


def sub(hub, params=(), *, max_queue=10_000, last_id=0):
    match, key = flt(*params)
    return hub.subscribe(match, max_queue=max_queue, last_id=lambda: last_id, key=key)


# ---- the hub (pure logic) --------------------------------------------------------------------


def test_filter_keys_are_equal_for_equal_filters_only():
    assert flt()[1] == ALL
    assert flt(("verdict", "DROPPED"))[1] == flt(("verdict", "DROPPED"))[1]
    assert flt(("verdict", "DROPPED"))[1] != flt(("verdict", "FORWARDED"))[1]
    assert flt(("verdict", "DROPPED"))[1] != flt(("not_verdict", "DROPPED"))[1]


def test_each_filter_gets_exactly_its_flows_and_equal_filters_share_bytes():
    async def main():
        hub = LiveHub()
        a1, a2 = sub(hub), sub(hub)
        d1, d2 = sub(hub, [("verdict", "DROPPED")]), sub(hub, [("verdict", "DROPPED")])
        f1 = sub(hub, [("verdict", "FORWARDED")])
        assert hub.subscribers == 5 and hub.groups == 3
        flows = sample_flows(300, seed=7, start_ns=T0)
        lost = [schema.LostEvent(source=schema.LostEventSource.PERF_EVENT_RING_BUFFER, num_events_lost="2")]
        hub.publish([committed(flows[:150], 1), committed(flows[150:], 151, lost)])
        drops = [f.uuid for f in flows if f.verdict == schema.Verdict.DROPPED]
        fwd = [f.uuid for f in flows if f.verdict == schema.Verdict.FORWARDED]
        assert 0 < len(drops) < len(fwd) < len(flows)  # three different selections

        data = {s: s.take_joined(b",") for s in (a1, a2, d1, d2, f1)}
        for s, want in ((a1, [f.uuid for f in flows]), (d1, drops), (f1, fwd)):
            body, n, dropped = data[s]
            envs = msgspec.json.decode(b"[" + body + b"]")
            assert [e["flow"]["uuid"] for e in envs if "flow" in e] == want
            assert envs[-1]["lost_events"]["num_events_lost"] == "2"  # lost events go to every filter
            assert n == len(envs) and dropped == 0
        # the same filter: the very same bytes object (joined once), not an equal copy per client
        assert data[a1][0] is data[a2][0] and data[d1][0] is data[d2][0]
        # Hubble envelopes of the stored form, in commit order
        assert data[d1][0].split(b',{"flow"')[0] == schema.flow_envelope_json(
            [f for f in flows if f.verdict == schema.Verdict.DROPPED][0])
    asyncio.run(main())


def test_new_subscriber_in_a_shared_group_skips_its_history():
    async def main():
        hub = LiveHub()
        old, new = sub(hub, last_id=0), sub(hub, last_id=130)  # ids <= 130 were history for `new`
        flows = sample_flows(200, seed=8, start_ns=T0)
        hub.publish([committed(flows[:100], 1), committed(flows[100:], 101)])
        assert ids(old.take()[0]) == [f.uuid for f in flows]
        assert ids(new.take()[0]) == [f.uuid for f in flows[130:]]
        late = sub(hub, last_id=200)  # nothing new for it yet
        hub.publish([committed(sample_flows(3, seed=9, start_ns=T0), 201)])
        assert len(late.take()[0]) == 3 and len(new.take()[0]) == 3
    asyncio.run(main())


def test_slow_subscriber_drops_its_oldest_without_touching_the_shared_bytes():
    async def main():
        hub = LiveHub()
        fast, slow = sub(hub), sub(hub, max_queue=50)
        flows = sample_flows(120, seed=10, start_ns=T0)
        got = []
        for i in range(0, 120, 40):  # the slow one never takes: 70 of 120 dropped, the newest 50 kept
            hub.publish([committed(flows[i:i + 40], i + 1)])
            got += ids(fast.take()[0])
        assert got == [f.uuid for f in flows]  # the fast one lost nothing
        body, n, dropped = slow.take_joined(b"\n")
        assert dropped == 70 and n == 50 and hub.dropped == 70 and slow.dropped_total == 70
        assert ids(body.split(b"\n")) == [f.uuid for f in flows[70:]]  # NDJSON separator
        assert slow.take_joined(b",") == (b"", 0, 0)  # reported once
        assert fast.dropped_total == 0
    asyncio.run(main())


def test_closed_subscribers_leave_their_group():
    async def main():
        hub = LiveHub()
        a, b = sub(hub, [("verdict", "DROPPED")]), sub(hub, [("verdict", "DROPPED")])
        a.close()
        assert hub.subscribers == 1 and hub.groups == 1
        b.close()
        assert hub.subscribers == 0 and hub.groups == 0
        hub.publish([committed(sample_flows(5, seed=11, start_ns=T0), 1)])
        assert a.take() == ([], 0) and b.take() == ([], 0)
    asyncio.run(main())


def test_segment_joins_once_per_separator():
    seg = Segment([b'{"a":1}', b'{"b":2}', b'{"c":3}'])
    assert seg.joined(b",") is seg.joined(b",") and seg.joined(b",") == b'{"a":1},{"b":2},{"c":3}'
    assert seg.joined(b"\n") == b'{"a":1}\n{"b":2}\n{"c":3}'
    assert seg.tail(2).envelopes == [b'{"c":3}'] and len(seg) == 3


# ---- compression policy (pure) ---------------------------------------------------------------


@pytest.mark.parametrize("target, mode, want", [
    ("/api/v1/flows/stream", "auto", False),
    ("/api/v1/flows/stream?verdict=DROPPED&last=0", "auto", False),
    ("/api/v1/flows/stream?compress=true", "auto", True),
    ("/base/api/v1/flows/stream?compress=1&verdict=DROPPED", "auto", True),
    ("/api/v1/flows/stream?compress=false", "auto", False),
    ("/api/v1/flows/stream?compress=perhaps", "auto", False),  # the route reports the error
    ("/api/v1/dashboard/live?q=", "auto", True),
    ("/api/v1/flows/stream?compress=true", "off", False),
    ("/api/v1/dashboard/live", "off", False),
    ("/api/v1/flows/stream", "on", True),
])
def test_may_compress(target, mode, want):
    assert may_compress(target, mode) is want


def test_compress_parameter_and_mode_errors_are_clear():
    assert stream_compression_requested([("verdict", "DROPPED")]) is False
    assert stream_compression_requested([("compress", "yes")]) is True
    with pytest.raises(QueryError, match="compress"):
        stream_compression_requested([("compress", "perhaps")])
    with pytest.raises(QueryError, match="more than once"):
        stream_compression_requested([("compress", "true"), ("compress", "false")])
    with pytest.raises(ValueError, match="auto, on, off"):
        uvicorn_ws_options("sometimes")
    assert uvicorn_ws_options("off") == {"ws_per_message_deflate": False}


# ---- a real server ---------------------------------------------------------------------------


def extensions(ws) -> list[str]:
    return [type(e).__name__ for e in ws.protocol.extensions]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(f"sqlite:///{tmp_path_factory.mktemp('fanout')}/flows.db")
    yield srv
    srv.stop()


def test_clients_with_different_filters_each_get_exactly_their_flows(server):
    node = "fanout-node"
    start = time.time_ns()
    flows = sample_flows(2000, seed=12, start_ns=start, step_ns=1000, node_name=node)
    want = {
        "all": [f.uuid for f in flows],
        "DROPPED": [f.uuid for f in flows if f.verdict == schema.Verdict.DROPPED],
        "FORWARDED": [f.uuid for f in flows if f.verdict == schema.Verdict.FORWARDED],
    }
    base = f"{server.ws_url}/api/v1/flows/stream?node_name={node}"
    urls = {"all": base, "DROPPED": base + "&verdict=DROPPED", "FORWARDED": base + "&verdict=FORWARDED"}
    with ExitStack() as stack:
        conns = {(k, i): stack.enter_context(ws_connect(u, max_size=None)) for k, u in urls.items() for i in range(2)}
        for i in range(0, 2000, 500):
            assert server.post(flows[i:i + 500]).status_code == 200
        for (k, _), ws in conns.items():
            got = frames(ws, lambda envs, k=k: sum("flow" in e for e in envs) >= len(want[k]))
            envs = [e for fr in got for e in fr]
            assert [e["flow"]["uuid"] for e in envs if "flow" in e] == want[k], k
            assert not [e for e in envs if "lost_events" in e]
            assert all(e["node_name"] == node and e["time"] for e in envs)


def test_flow_stream_compresses_only_on_request(server):
    path = f"{server.ws_url}/api/v1/flows/stream?node_name=zip-node"
    with ws_connect(path) as plain, ws_connect(path + "&compress=true") as zipped:  # both offer deflate
        assert extensions(plain) == [] and extensions(zipped) == ["PerMessageDeflate"]
        flows = sample_flows(300, seed=13, start_ns=time.time_ns(), node_name="zip-node")
        assert server.post(flows).status_code == 200
        for ws in (plain, zipped):  # the same frames either way
            got = frames(ws, lambda envs: len(envs) >= 300)
            assert [e["flow"]["uuid"] for fr in got for e in fr] == [f.uuid for f in flows]
    with ws_connect(path, compression=None) as none:
        assert extensions(none) == []
    # the dashboard's live view (a few messages per second, browsers) keeps compression
    with ws_connect(server.ws_url + "/api/v1/dashboard/live", max_size=None) as dash:
        assert extensions(dash) == ["PerMessageDeflate"]
        assert msgspec.json.decode(dash.recv(timeout=20))["type"] == "snapshot"


def test_bad_compress_value_is_reported(server):
    with ws_connect(f"{server.ws_url}/api/v1/flows/stream?compress=perhaps") as ws:
        assert_error_then_close(ws, "compress")
    # and not a filter parameter anywhere else
    r = httpx.get(server.url + "/api/v1/flows", params={"compress": "true"}, timeout=10)
    assert r.status_code == 400


def test_compression_off_server_wide(tmp_path):
    srv = Server(f"sqlite:///{tmp_path}/flows.db", ws_compression="off")
    try:
        with ws_connect(srv.ws_url + "/api/v1/flows/stream?compress=true") as ws:
            assert extensions(ws) == []
        with ws_connect(srv.ws_url + "/api/v1/dashboard/live") as ws:
            assert extensions(ws) == []
    finally:
        srv.stop()
