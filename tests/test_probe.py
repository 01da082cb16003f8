"""The tc probe in the real kernel, with real traffic between two network namespaces."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowscope import schema
from flowscope.endpoints import EndpointRecord, EndpointStore

pytestmark = pytest.mark.root


from lab_http import http_server  # noqa: E402
from sinks import ListSink  # noqa: E402


@pytest.fixture
def probe_env(lab, tmp_path):
    from probe.agent import Agent, AgentConfig

    client = lab.add("client")
    srv = lab.add("server")
    store = EndpointStore(tmp_path)
    for ep, app in ((client, "client"), (srv, "server")):
        store.put(EndpointRecord(container_id=f"c-{app}", host_ifname=ep.host_if, host_ifindex=ep.ifindex,
                                 ips=[ep.ipv4, ep.ipv6], namespace="test", pod_name=f"{app}-0",
                                 labels={"app": app}, endpoint_id=ep.ifindex, identity=1000 + ep.ifindex))
    sink = ListSink()
    cfg = AgentConfig(state_dir=str(tmp_path), node_name="node-t", update_interval=1.0, drain_ms=20)
    agent = Agent(cfg, shipper=sink)
    agent.start()
    try:
        yield agent, sink, client, srv
    finally:
        agent.close()
    # the interfaces are left as they were found: no clsact qdisc remains on them
    for ep in (client, srv):
        out = subprocess.run(["tc", "qdisc", "show", "dev", ep.host_if], capture_output=True, text=True).stdout
        assert "clsact" not in out


def pump(agent, seconds=0.5):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        agent.dp.poll(20)
        agent._process_raw()


def tcp_records(flows, sport=None, dport=None):
    out = []
    for f in flows:
        if f.l4 and f.l4.TCP and (dport is None or dport in (f.l4.TCP.destination_port, f.l4.TCP.source_port)):
            out.append(f)
    return out


def test_tcp_http_flow_records(probe_env):
    agent, sink, client, srv = probe_env
    with http_server(client, srv):
        sink.flows.clear()
        r = client.exec(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{local_port}", f"http://{srv.ipv4}:8080/"])
        code, cport = r.stdout.split()
        assert code == "200"
        cport = int(cport)
        pump(agent, 0.5)

    conn = [f for f in tcp_records(sink.flows, dport=8080) if cport in (f.l4.TCP.source_port, f.l4.TCP.destination_port)]
    assert conn, "no flow records for the curl connection"
    for f in conn:
        assert f.verdict == schema.Verdict.FORWARDED
        assert f.Type == schema.FlowType.L3_L4
        assert f.node_name == "node-t"
        assert {f.IP.source, f.IP.destination} == {client.ipv4, srv.ipv4}

    def one(iface, src, flags_pred):
        m = [f for f in conn if f.interface.name == iface and f.IP.source == src and flags_pred(f.l4.TCP.flags)]
        assert m, f"no record on {iface} from {src}"
        return m[0]

    syn_out = one(client.host_if, client.ipv4, lambda fl: fl.SYN and not fl.ACK)
    assert syn_out.traffic_direction == schema.TrafficDirection.EGRESS
    assert syn_out.trace_observation_point == schema.TraceObservationPoint.FROM_ENDPOINT
    assert syn_out.is_reply is False
    assert syn_out.l4.TCP.source_port == cport and syn_out.l4.TCP.destination_port == 8080
    assert syn_out.source.pod_name == "client-0" and "k8s:app=client" in syn_out.source.labels
    assert syn_out.destination.pod_name == "server-0" and syn_out.destination.namespace == "test"
    assert syn_out.flowscope.event == "new"

    syn_in = one(srv.host_if, client.ipv4, lambda fl: fl.SYN and not fl.ACK)
    assert syn_in.traffic_direction == schema.TrafficDirection.INGRESS
    assert syn_in.trace_observation_point == schema.TraceObservationPoint.TO_ENDPOINT
    assert syn_in.is_reply is False

    synack = one(srv.host_if, srv.ipv4, lambda fl: fl.SYN and fl.ACK)
    assert synack.is_reply is True
    # Cilium's rule: a reply belongs to the connection's direction (ingress to the server)
    assert synack.traffic_direction == schema.TrafficDirection.INGRESS
    assert synack.l4.TCP.source_port == 8080

    fin = [f for f in conn if f.l4.TCP.flags and f.l4.TCP.flags.FIN]
    assert fin and all(f.flowscope.event == "close" for f in fin)
    # the JSON of a probe flow is Hubble-shaped
    doc = schema.dump_flow(syn_out)
    assert doc["l4"]["TCP"]["flags"] == {"SYN": True}
    assert doc["traffic_direction"] == "EGRESS" and doc["is_reply"] is False


def test_icmp_udp_and_ipv6(probe_env):
    agent, sink, client, srv = probe_env
    client.exec(["ping", "-c", "2", "-i", "0.2", srv.ipv4])
    client.exec(["ping", "-c", "1", srv.ipv6])
    u = srv.popen(["socat", "UDP-RECVFROM:5353,fork", "SYSTEM:echo pong"], stdout=subprocess.DEVNULL,
                  stderr=subprocess.DEVNULL)
    t = srv.popen([sys.executable, "-m", "http.server", "8081", "--bind", "::"], stdout=subprocess.DEVNULL,
                  stderr=subprocess.DEVNULL)
    try:
        out = ""
        for _ in range(30):  # until the UDP responder is listening
            out = client.exec("sh -c 'echo ping | socat -T1 - UDP:%s:5353'" % srv.ipv4, check=False).stdout
            if "pong" in out:
                break
            time.sleep(0.1)
        assert "pong" in out
        for _ in range(30):
            if client.exec(["curl", "-s", "-o", "/dev/null", f"http://[{srv.ipv6}]:8081/"], check=False).returncode == 0:
                break
            time.sleep(0.1)
        pump(agent, 0.5)
    finally:
        for p in (u, t):
            p.terminate()
            p.wait(5)

    echo_req = [f for f in sink.flows if f.l4 and f.l4.ICMPv4 and f.l4.ICMPv4.type == 8]
    echo_rep = [f for f in sink.flows if f.l4 and f.l4.ICMPv4 and f.l4.ICMPv4.type == 0]
    assert echo_req and echo_rep
    assert all(f.is_reply is False for f in echo_req) and all(f.is_reply is True for f in echo_rep)
    assert echo_req[0].Summary == "ICMPv4 EchoRequest"

    v6echo = [f for f in sink.flows if f.l4 and f.l4.ICMPv6 and f.l4.ICMPv6.type == 128 and f.IP.destination == srv.ipv6]
    assert v6echo and v6echo[0].IP.ipVersion == schema.IPVersion.IPv6

    udp = [f for f in sink.flows if f.l4 and f.l4.UDP and 5353 in (f.l4.UDP.source_port, f.l4.UDP.destination_port)]
    req = [f for f in udp if f.l4.UDP.destination_port == 5353 and f.interface.name == client.host_if]
    rep = [f for f in udp if f.l4.UDP.source_port == 5353 and f.interface.name == client.host_if]
    assert req and req[0].is_reply is False and req[0].traffic_direction == schema.TrafficDirection.EGRESS
    assert rep and rep[0].is_reply is True and rep[0].traffic_direction == schema.TrafficDirection.EGRESS

    v6tcp = [f for f in tcp_records(sink.flows, dport=8081) if f.IP.source == client.ipv6]
    assert v6tcp and v6tcp[0].IP.ipVersion == schema.IPVersion.IPv6
    assert v6tcp[0].source.pod_name == "client-0"


def _iface_counters(name: str) -> dict[str, int]:
    base = Path(f"/sys/class/net/{name}/statistics")
    return {k: int((base / k).read_text()) for k in ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets")}


@pytest.mark.skipif(shutil.which("iperf3") is None, reason="iperf3 not installed (make setup installs it)")
def test_counters_match_interface_counters(probe_env):
    """For a known transfer, the flows' packet/byte counters equal the veth's own counters (within 1 %)."""
    agent, sink, client, srv = probe_env
    server = srv.popen(["iperf3", "-s", "-1", "-p", "5201"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    pump(agent, 0.1)
    before = _iface_counters(client.host_if)
    entries_before = {k: v for k, v in agent.dp.snapshot_flows()}
    client.exec(["iperf3", "-c", srv.ipv4, "-p", "5201", "-n", "40M"], timeout=60)
    server.wait(10)
    time.sleep(0.2)
    after = _iface_counters(client.host_if)
    from probe import events as ev

    sent_b = sent_p = recv_b = recv_p = 0
    for key, val in agent.dp.snapshot_flows():
        _s, _d, _sp, _dp, ifindex, _fam, _proto, dir_, _ = ev.KEY.unpack(key)
        if ifindex != client.ifindex:
            continue
        _f, _l, _r, pk, by, *_ = ev.VAL.unpack(val)
        if key in entries_before:
            _f0, _l0, _r0, pk0, by0, *_ = ev.VAL.unpack(entries_before[key])
            pk, by = pk - pk0, by - by0
        if dir_ == ev.DIR_EGRESS:
            sent_b, sent_p = sent_b + by, sent_p + pk
        else:
            recv_b, recv_p = recv_b + by, recv_p + pk
    # what the pod sent arrives at the host veth as rx; what it receives leaves the host veth as tx
    d_rx_b = after["rx_bytes"] - before["rx_bytes"]
    d_tx_b = after["tx_bytes"] - before["tx_bytes"]
    d_rx_p = after["rx_packets"] - before["rx_packets"]
    d_tx_p = after["tx_packets"] - before["tx_packets"]
    assert d_rx_b > 20_000_000  # iperf3 -n stops at 40 MiB written; what reaches the wire varies
    assert abs(sent_b - d_rx_b) <= 0.01 * d_rx_b, (sent_b, d_rx_b)
    assert abs(recv_b - d_tx_b) <= 0.01 * d_tx_b, (recv_b, d_tx_b)
    assert abs(sent_p - d_rx_p) <= 0.01 * d_rx_p + 2, (sent_p, d_rx_p)
    assert abs(recv_p - d_tx_p) <= 0.01 * d_tx_p + 2, (recv_p, d_tx_p)

    # the connection's final counters: in its close record, or in the final record the expiry sweep
    # gives an entry that saw packets after its last record
    agent.cfg.closed_timeout = 0
    pump(agent, 0.1)
    assert agent.sweep() > 0
    final = [f for f in sink.flows if f.flowscope.event in ("close", "expire") and f.l4 and f.l4.TCP
             and f.l4.TCP.destination_port == 5201 and f.interface.name == client.host_if
             and f.IP.source == client.ipv4]
    assert final
    big = max(final, key=lambda f: int(f.flowscope.egress_bytes))
    assert int(big.flowscope.egress_bytes) > 20_000_000


def _our_filters(dev: str, hook: str) -> int:
    out = subprocess.run(["tc", "filter", "show", "dev", dev, hook], capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines() if "name fs_" in line)


def test_no_loss_and_stale_filters_replaced(probe_env):
    """Kernel loss counters stay at zero for normal traffic; filters left by a killed agent are replaced
    (never duplicated) and can be cleaned up."""
    from probe import events as ev
    from probe.datapath import Datapath, find_stale_attachments, remove_stale_attachments

    agent, sink, client, srv = probe_env
    client.exec(["ping", "-c", "3", "-i", "0.2", srv.ipv4])
    pump(agent, 0.3)
    agent._account_kernel_loss()
    assert sink.lost == []
    stats = agent.dp.read_stats()
    assert sum(stats[ev.STAT_EVENTS]) > 0 and sum(stats[ev.STAT_RINGBUF_FAIL]) == 0
    # every event the kernel submitted reached the agent (over several drains)
    client.exec([sys.executable, "-c", "import socket\nfor _ in range(200):\n"
                 "    s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b'x', ('%s', 9)); s.close()"
                 % srv.ipv4])
    pump(agent, 0.3)
    assert agent.stats.events == sum(agent.dp.read_stats()[ev.STAT_EVENTS]) > 200
    assert _our_filters(client.host_if, "ingress") == 1 and _our_filters(client.host_if, "egress") == 1

    # a second agent attaching to the same interface replaces the filters
    other = Datapath()
    other.attach(client.ifindex, client.host_if)
    assert _our_filters(client.host_if, "ingress") == 1 and _our_filters(client.host_if, "egress") == 1
    # ... and if it dies without detaching, its filters are found and removed
    other.attached.clear()
    other.close()
    assert client.ifindex in find_stale_attachments()
    assert client.ifindex in remove_stale_attachments()
    assert _our_filters(client.host_if, "ingress") == 0 and _our_filters(client.host_if, "egress") == 0


def test_layouts_match_the_loaded_program_and_no_policy_means_no_verdicts(probe_env):
    """The decoders' layouts are the kernel's; an agent without policy keeps every flow FORWARDED with no
    policy fields, the flow entries carry no verdict, and nothing is dropped."""
    import ctypes as ct

    from probe import events as ev

    agent, sink, client, srv = probe_env
    assert (ct.sizeof(agent.dp.flows.Key), ct.sizeof(agent.dp.flows.Leaf)) == (ev.KEY.size, ev.VAL.size)
    client.exec(["ping", "-c", "2", "-i", "0.2", srv.ipv4])
    client.exec(["curl", "-s", "-m", "1", "-o", "/dev/null", f"http://{srv.ipv4}:9/"], check=False)  # RST
    pump(agent, 0.3)
    assert sink.flows
    for f in sink.flows:
        assert f.verdict == schema.Verdict.FORWARDED and f.event_type.type == schema.EVENT_TRACE
        assert f.policy_match_type == 0 and not f.ingress_allowed_by and not f.egress_denied_by
    for _key, val in agent.dp.snapshot_flows():
        verdict, match_type, pflags, policy_id, peer = ev.unpack_val(val)[9:14]
        assert (verdict, match_type, pflags, policy_id, peer) == (0, 0, 0, 0, 0)
    assert sum(agent.dp.read_stats()[ev.STAT_POLICY_DROP]) == 0


def test_monitor_aggregation_flags_limit_records(lab, tmp_path):
    """With syn,fin,rst only, ACK/PSH first sightings make no record; SYN, SYN-ACK and FIN still do."""
    from probe.agent import Agent, AgentConfig

    client, srv = lab.add("client"), lab.add("server")
    sink = ListSink()
    agent = Agent(AgentConfig(interfaces=[client.host_if], follow_endpoints=False, state_dir=str(tmp_path),
                              report_tcp_flags="syn,fin,rst", drain_ms=20), shipper=sink)
    agent.start()
    try:
        with http_server(client, srv):
            pump(agent, 0.3)
    finally:
        agent.close()
    events = {f.flowscope.event for f in tcp_records(sink.flows, dport=8080)}
    assert events and events <= {"new", "close"}, events
    assert "close" in events


REUSE_SERVER = """
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7100))
s.listen(16)
while True:
    c, _ = s.accept()
    c.recv(1)
    c.sendall(b"y")
    c.close()
"""

REUSE_CLIENT = """
import socket, struct, sys, time
for i in range(3):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST
    s.bind(("0.0.0.0", 40123))
    s.connect((sys.argv[1], 7100))
    s.sendall(b"x")
    s.recv(1)
    s.close()
    time.sleep(0.2)
print("ok")
"""


def test_reused_client_port_starts_a_new_flow_each_time(lab, tmp_path):
    """Three connections from the same client port, each closed with RST: the kernel entries of a closed
    connection are still in the map (the agent expires them seconds later), yet every connection is reported
    as its own ``new`` flow, counted from its SYN, at the client's and at the server's interface."""
    from probe.agent import Agent, AgentConfig

    client, srv = lab.add("client"), lab.add("server")
    sink = ListSink()
    agent = Agent(AgentConfig(interfaces=[client.host_if, srv.host_if], follow_endpoints=False,
                              state_dir=str(tmp_path), drain_ms=20), shipper=sink)
    agent.start()
    p = srv.popen([sys.executable, "-c", REUSE_SERVER], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            if srv.exec(["ss", "-ltn", "sport = :7100"], check=False).stdout.count("LISTEN"):
                break
            time.sleep(0.1)
        assert client.exec([sys.executable, "-c", REUSE_CLIENT, srv.ipv4]).stdout.strip() == "ok"
        pump(agent, 0.3)
    finally:
        p.terminate()
        p.wait(5)
        agent.close()
    syns = [f for f in tcp_records(sink.flows, dport=7100)
            if f.flowscope.event == "new" and f.l4.TCP.source_port == 40123 and f.l4.TCP.flags.SYN
            and not f.l4.TCP.flags.ACK]
    by_iface = {}
    for f in syns:
        by_iface.setdefault(f.interface.name, []).append(f)
    assert sorted(by_iface) == sorted([client.host_if, srv.host_if]), by_iface.keys()
    for name, recs in by_iface.items():
        assert len(recs) == 3, (name, len(recs))
        # each one counted from its own first packet
        assert all(r.flowscope.egress_packets == "1" or r.flowscope.ingress_packets == "1" for r in recs)
    replies = [f for f in tcp_records(sink.flows, dport=7100)
               if f.flowscope.event == "new" and f.l4.TCP.destination_port == 40123 and f.l4.TCP.flags.SYN
               and f.l4.TCP.flags.ACK]
    assert len(replies) == 6 and all(r.is_reply for r in replies)
