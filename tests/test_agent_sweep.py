"""When the agent reads its flow map: every sweep interval while TCP connections are closing (their
entries are due closed_timeout after the close), otherwise only every idle-scan interval."""

from __future__ import annotations

import threading
import time

import pytest

from flowscope.endpoints import EndpointIndex
from probe import events as ev
from lab_http import http_server
from sinks import ListSink


def _raw(typ: int) -> bytes:
    key = ev.KEY.pack(b"\x0a\0\0\x01" + b"\0" * 12, b"\x0a\0\0\x02" + b"\0" * 12, 40000, 80, 7, 4, 6, ev.DIR_EGRESS, 0)
    return ev.EVENT.pack(key, 10**9, 10**9, 1, 60, 0, 0, 0, 0x02 if typ == ev.EV_NEW else 0x04, 0x06, typ,
                         ev.REPLY_NO, 0, 0, 60, 0, 0, 0, 0, 0, 0)


def _agent(tmp_path, **cfg):
    from probe.agent import Agent, AgentConfig

    agent = Agent(AgentConfig(state_dir=str(tmp_path), follow_endpoints=False, **cfg), shipper=ListSink())
    agent._builder = ev.FlowBuilder("n", EndpointIndex(), {}, 0)
    return agent


def test_a_reported_close_makes_the_closed_flows_due(tmp_path):
    agent = _agent(tmp_path, closed_timeout=2.0, sweep_interval=2.0)
    agent._on_raw(_raw(ev.EV_NEW))
    agent._process_raw()
    assert agent._closed_scan_until == 0.0
    before = time.monotonic()
    agent._on_raw(_raw(ev.EV_NEW))
    agent._on_raw(_raw(ev.EV_CLOSE))
    agent._process_raw()
    # scans continue until the close is older than closed_timeout, plus one sweep to see it
    assert before + 4.0 <= agent._closed_scan_until <= time.monotonic() + 4.0
    assert [f.flowscope.event for f in agent.shipper.flows] == ["new", "new", "close"]


def test_idle_scan_interval_is_a_quarter_of_the_shortest_idle_timeout(tmp_path):
    assert _agent(tmp_path)._idle_scan_interval() == 15.0
    assert _agent(tmp_path, idle_timeout=20.0)._idle_scan_interval() == 5.0
    assert _agent(tmp_path, idle_timeout=1.0, sweep_interval=2.0)._idle_scan_interval() == 2.0


@pytest.mark.root
def test_closed_connection_expires_promptly_without_a_full_idle_scan(lab, tmp_path):
    """The idle scan is set far away (60 s): the connection's final records still come within a few
    sweep intervals after its close, because the close itself schedules the scans."""
    from probe.agent import Agent, AgentConfig

    client, srv = lab.add("client"), lab.add("server")
    sink = ListSink()
    agent = Agent(AgentConfig(interfaces=[client.host_if], follow_endpoints=False, state_dir=str(tmp_path),
                              drain_ms=20, sweep_interval=0.2, closed_timeout=0.3, idle_scan_interval=60.0,
                              idle_timeout=600.0, tcp_idle_timeout=600.0), shipper=sink)
    agent.start()
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    try:
        with http_server(client, srv):
            time.sleep(1.0)  # let the first scans of the connection's close pass
            sink.flows.clear()
            cport = int(client.exec(["curl", "-s", "-o", "/dev/null", "-w", "%{local_port}",
                                     f"http://{srv.ipv4}:8080/"]).stdout)

            def entries() -> list:
                return [k for k, _v in agent.dp.snapshot_flows() if cport in ev.KEY.unpack(k)[2:4]]

            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and entries():
                time.sleep(0.1)
            assert not entries(), "the closed connection's entries are still in the flow map"
            expired = [f for f in list(sink.flows) if f.flowscope.event == "expire" and f.l4 and f.l4.TCP
                       and cport in (f.l4.TCP.source_port, f.l4.TCP.destination_port)]
            # a final record for each direction that saw packets after its last event (at least the one
            # acknowledging the other side's FIN), carrying both directions' counters
            assert 1 <= len(expired) <= 2, [f.flowscope.event for f in sink.flows]
            assert all(int(f.flowscope.egress_packets) >= 4 and int(f.flowscope.ingress_packets) >= 4
                       for f in expired)
    finally:
        agent.stop()
        t.join(10)
