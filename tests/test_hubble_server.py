"""The Hubble gRPC API of a real `flowscope server` process, exercised by a client generated from the
project's own protos: every RPC and filter, against flows fed through the real ingest API; gRPC answers
equal the REST answers for the same flows (protojson vs REST JSON, parsed); history beyond Hubble's
4095-flow ring; follow with live flows and lost events; agent events; TLS and token auth; bind errors.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf import json_format
from google.protobuf.field_mask_pb2 import FieldMask
from grpc_health.v1 import health_pb2, health_pb2_grpc

from api.hubble import convert
from api.hubble.pb import flow_pb2 as fpb
from api.hubble.pb import observer_pb2 as opb
from api.hubble.pb import observer_pb2_grpc as opb_grpc
from api.samples import sample_flows
from flowscope import schema
from flowscope.endpoints import EndpointRecord, EndpointStore
from flowscope.filters import EventTypeFilter, FlowFilter

FLOWSCOPE = [sys.executable, "-m", "flowscope.cli"]
N_FLOWS = 6000  # more than Hubble's default ring of 4095
S = schema


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout=20.0, every=0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(every)
    return pred()


class Server:
    def __init__(self, tmp: Path, *hubble_args: str, env: dict | None = None, grpc_port: int | None = None):
        self.port = free_port()
        self.grpc_port = grpc_port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"server-{self.port}.log"
        args = FLOWSCOPE + ["server", "--db", f"sqlite:///{tmp}/flows-{self.port}.db", "--port", str(self.port),
                            "--log-level", "warning"]
        args += list(hubble_args) if hubble_args else ["--hubble-listen", f"127.0.0.1:{self.grpc_port}"]
        self.proc = subprocess.Popen(args, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, start_new_session=True)

    def wait_ready(self) -> "Server":
        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.log.read_text()}")
            try:
                return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False
        assert wait_for(up, 60), self.log.read_text()
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def ingest(self, flows, node_name="", lost=()) -> None:
        body = schema.encode({"node_name": node_name, "flows": flows, "lost_events": list(lost)})
        r = httpx.post(self.url + "/api/v1/flows", content=body, headers={"content-type": "application/json"},
                       timeout=60)
        assert r.status_code == 200, r.text

    def rest(self, query: dict) -> list[dict]:
        r = httpx.post(self.url + "/api/v1/flows/query", content=schema.encode(query), timeout=60)
        assert r.status_code == 200, r.text
        return [json.loads(line) for line in r.text.splitlines() if line]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hubble")
    state = tmp / "state"
    reg = EndpointStore(state)
    reg.put(EndpointRecord(container_id="c-web", pod_name="web-1", namespace="shop", labels={"app": "web"},
                           endpoint_id=11, created_ns=time.time_ns() - 3_600_000_000_000))
    srv = Server(tmp, env={"FLOWSCOPE_STATE_DIR": str(state)}).wait_ready()
    now = time.time_ns()
    start = now - N_FLOWS * 1_000_000_000  # one flow a second over the last 100 minutes
    flows = sample_flows(N_FLOWS, seed=5, start_ns=start, step_ns=1_000_000_000)
    try:
        for i in range(0, N_FLOWS, 1500):
            srv.ingest(flows[i:i + 1500], node_name="node-a")
        srv.ingest([], node_name="node-a",
                   lost=[S.LostEvent(source=S.LostEventSource.PERF_EVENT_RING_BUFFER, num_events_lost=7, cpu=1)])
        channel = grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}")
        yield {"srv": srv, "stub": opb_grpc.ObserverStub(channel), "channel": channel, "state": state,
               "registry": reg, "flows": flows, "start": start}
        channel.close()
    finally:
        srv.stop()


def ts(ns):
    from google.protobuf.timestamp_pb2 import Timestamp

    t = Timestamp()
    t.FromNanoseconds(ns)
    return t


def grpc_envelopes(stub, **req) -> list[dict]:
    return [json.loads(json_format.MessageToJson(r, preserving_proto_field_name=True))
            for r in stub.GetFlows(opb.GetFlowsRequest(**req), timeout=60)]


def flow_envelopes(envs):
    return [e for e in envs if "flow" in e]


# ---- every RPC -------------------------------------------------------------------------------


def test_status_nodes_namespaces(env):
    stub = env["stub"]
    st = stub.ServerStatus(opb.ServerStatusRequest(), timeout=10)
    assert st.num_flows == N_FLOWS and st.seen_flows == N_FLOWS and st.max_flows == 0
    assert st.uptime_ns > 0 and "flowscope" in st.version
    assert st.num_connected_nodes.value >= 2 and st.num_unavailable_nodes.value == 0
    assert 0.5 <= st.flows_rate <= 1.5  # one flow per second over the last minute
    nodes = {n.name: n for n in stub.GetNodes(opb.GetNodesRequest(), timeout=10).nodes}
    assert {"node-a", "node-b"} <= set(nodes)
    assert nodes["node-a"].num_flows + nodes["node-b"].num_flows == N_FLOWS
    assert all(nodes[n].state == 1 for n in ("node-a", "node-b"))  # NODE_CONNECTED
    assert nodes["node-a"].uptime_ns > 5000 * 1_000_000_000  # the age of its oldest stored flow
    names = [n.namespace for n in stub.GetNamespaces(opb.GetNamespacesRequest(), timeout=10).namespaces]
    assert names == sorted({"default", "kube-system", "shop", "payments", "monitoring"})


def test_health_service_names(env):
    h = health_pb2_grpc.HealthStub(env["channel"])
    for name in ("", "hubble.server.Observer"):
        assert h.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as e:
        h.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


FILTERS = [
    FlowFilter(),
    FlowFilter(verdict=["DROPPED"]),
    FlowFilter(drop_reason_desc=["POLICY_DENIED"]),
    FlowFilter(source_pod=["shop/"]),
    FlowFilter(destination_pod=["kube-system/coredns-"]),
    FlowFilter(source_ip=["10.0.2.0/24"], destination_port=["8080"]),
    FlowFilter(destination_ip=["10.0.1.114"]),
    FlowFilter(protocol=["http"], http_status_code=["5+"]),
    FlowFilter(http_method=["POST"], http_path=["^/api/"]),
    FlowFilter(http_url=["checkout"]),
    FlowFilter(http_header=[S.HTTPHeader(key="user-agent", value="curl/8.4")]),
    FlowFilter(protocol=["udp"], dns_query=["svc.cluster"]),
    FlowFilter(source_label=["app=api"]),
    FlowFilter(destination_label=["k8s:app in (db, redis)"]),
    FlowFilter(source_identity=[1201]),
    FlowFilter(destination_identity=[1106]),
    FlowFilter(source_workload=[S.Workload(name="cart", kind="Deployment")]),
    FlowFilter(destination_workload=[S.Workload(name="db")]),
    FlowFilter(traffic_direction=["INGRESS"], tcp_flags=[S.TCPFlags(SYN=True)]),
    FlowFilter(event_type=[EventTypeFilter(type=129)]),
    FlowFilter(event_type=[EventTypeFilter(type=1, match_sub_type=True, sub_type=133)]),
    FlowFilter(reply=[False], ip_version=["IPv4"], node_name=["node-b"]),
    FlowFilter(destination_port=["5432", "6379"]),
    FlowFilter(protocol=["icmp"]),
    FlowFilter(interface=[S.NetworkInterface(name="nope")]),  # matches nothing
]


@pytest.mark.parametrize("i", range(len(FILTERS)))
def test_getflows_equals_rest(env, i):
    """The same filter through gRPC and REST: the same envelopes, and the protojson equals the REST JSON."""
    srv, stub = env["srv"], env["stub"]
    ff = FILTERS[i]
    deny = [FlowFilter(protocol=["icmp"])] if i % 3 == 0 and i else []
    got = flow_envelopes(grpc_envelopes(stub, number=200, whitelist=[convert.filter_to_proto(ff)],
                                        blacklist=[convert.filter_to_proto(d) for d in deny]))
    want = srv.rest({"whitelist": [ff], "blacklist": deny, "number": 200})
    assert got == want
    if "nope" not in str(ff):
        assert got, f"filter {ff} matched nothing: the test data should cover it"


def test_several_allowlist_filters_are_ored(env):
    srv, stub = env["srv"], env["stub"]
    allow = [FlowFilter(source_pod=["payments/"]), FlowFilter(destination_pod=["payments/"])]
    got = flow_envelopes(grpc_envelopes(stub, number=300, whitelist=[convert.filter_to_proto(f) for f in allow]))
    assert got == srv.rest({"whitelist": allow, "number": 300}) and len(got) == 300


def test_history_beyond_hubbles_ring(env):
    srv, stub = env["srv"], env["stub"]
    now = time.time_ns()
    day = grpc_envelopes(stub, since=ts(now - 24 * 3600 * 1_000_000_000))
    flows = flow_envelopes(day)
    assert len(flows) == N_FLOWS > 4095
    assert flows == srv.rest({"since": "24h"})
    # the stored lost event is in the stream, in time order
    lost = [e for e in day if "lost_events" in e]
    assert lost and lost[0]["lost_events"] == {"source": "PERF_EVENT_RING_BUFFER", "num_events_lost": "7", "cpu": 1}
    # number = 0 without a time range: everything stored (Hubble: the whole ring)
    assert len(flow_envelopes(grpc_envelopes(stub))) == N_FLOWS
    # first / last / until
    first = flow_envelopes(grpc_envelopes(stub, number=10, first=True))
    assert first == srv.rest({"number": 10, "first": True})
    assert first[0]["flow"]["uuid"] == env["flows"][0].uuid
    last = flow_envelopes(grpc_envelopes(stub, number=10))
    assert [e["flow"]["uuid"] for e in last] == [f.uuid for f in env["flows"][-10:]]
    mid = env["start"] + 1000 * 1_000_000_000
    window = flow_envelopes(grpc_envelopes(stub, since=ts(mid), until=ts(mid + 99 * 1_000_000_000)))
    assert [e["flow"]["uuid"] for e in window] == [f.uuid for f in env["flows"][1000:1100]]


def test_field_mask(env):
    stub = env["stub"]
    mask = FieldMask(paths=["time", "verdict", "source.pod_name", "l4", "Summary"])
    envs = flow_envelopes(grpc_envelopes(stub, number=50, field_mask=mask))
    assert len(envs) == 50
    for e in envs:
        assert set(e["flow"]) <= {"time", "verdict", "source", "l4", "Summary"}
        assert set(e["flow"]["source"]) == {"pod_name"}
    with pytest.raises(grpc.RpcError) as err:
        grpc_envelopes(stub, number=1, field_mask=FieldMask(paths=["no_such_field"]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no_such_field" in err.value.details()


@pytest.mark.parametrize("req,msg", [
    (dict(whitelist=[fpb.FlowFilter(source_cluster_name=["c"])]), "source_cluster_name"),
    (dict(blacklist=[fpb.FlowFilter(source_ip=["10.0.0.999"])]), "source_ip"),
    (dict(first=True, follow=True), "first"),
    (dict(whitelist=[fpb.FlowFilter(source_label=["app in (a"])]), "source_label"),
])
def test_invalid_requests_are_invalid_argument(env, req, msg):
    with pytest.raises(grpc.RpcError) as e:
        list(env["stub"].GetFlows(opb.GetFlowsRequest(**req), timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and msg in e.value.details()


def test_debug_events_unimplemented(env):
    with pytest.raises(grpc.RpcError) as e:
        list(env["stub"].GetDebugEvents(opb.GetDebugEventsRequest(), timeout=10))
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


# ---- follow ----------------------------------------------------------------------------------


class Follower:
    def __init__(self, stub, req):
        self.call = stub.GetFlows(req, timeout=60)
        self.got: list = []
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        try:
            for r in self.call:
                self.got.append(r)
        except grpc.RpcError:
            pass

    def wait(self, pred, timeout=20):
        return wait_for(lambda: pred(self.got), timeout)

    def close(self):
        self.call.cancel()
        self.t.join(10)


def test_follow_streams_live_flows_and_lost_events(env):
    srv, stub = env["srv"], env["stub"]
    req = opb.GetFlowsRequest(follow=True, number=3, whitelist=[fpb.FlowFilter(node_name=["live-node"])])
    # history first: 3 flows of live-node stored before
    old = sample_flows(5, seed=77, start_ns=time.time_ns() - 10_000_000_000, node_name="live-node")
    srv.ingest(old)
    fol = Follower(stub, req)
    try:
        assert fol.wait(lambda g: len(g) >= 3)
        time.sleep(0.5)
        new = sample_flows(20, seed=78, start_ns=time.time_ns(), node_name="live-node")
        other = sample_flows(20, seed=79, start_ns=time.time_ns(), node_name="elsewhere")
        srv.ingest(new + other, node_name="live-node",
                   lost=[S.LostEvent(source=S.LostEventSource.OBSERVER_EVENTS_QUEUE, num_events_lost=3)])
        assert fol.wait(lambda g: sum(r.HasField("flow") for r in g) >= 23 and any(r.HasField("lost_events") for r in g))
        time.sleep(0.3)
    finally:
        fol.close()
    flows = [r for r in fol.got if r.HasField("flow")]
    assert [r.flow.uuid for r in flows] == [f.uuid for f in old[-3:] + new]  # no gap, no duplicate, filtered
    lost = [r.lost_events for r in fol.got if r.HasField("lost_events")]
    # the live loss exactly once (the history part may carry stored losses of its time span before it)
    assert [(x.source, x.num_events_lost) for x in lost].count((fpb.OBSERVER_EVENTS_QUEUE, 3)) == 1
    assert (lost[-1].source, lost[-1].num_events_lost) == (fpb.OBSERVER_EVENTS_QUEUE, 3)
    # protojson of a live flow == the REST JSON of the same flow
    rest = srv.rest({"whitelist": [{"uuid": [new[0].uuid]}], "number": 1})
    assert json.loads(json_format.MessageToJson(flows[3], preserving_proto_field_name=True)) == rest[0]


def test_follow_without_number_sends_only_new_flows(env):
    srv, stub = env["srv"], env["stub"]
    fol = Follower(stub, opb.GetFlowsRequest(follow=True, whitelist=[fpb.FlowFilter(node_name=["fresh-node"])]))
    try:
        srv.ingest(sample_flows(2, seed=80, start_ns=time.time_ns() - 5_000_000_000, node_name="fresh-node"))
        time.sleep(1.0)
        assert fol.got == [] or all(r.flow.node_name == "fresh-node" for r in fol.got)
        before = len(fol.got)
        srv.ingest(sample_flows(4, seed=81, start_ns=time.time_ns(), node_name="fresh-node"))
        assert fol.wait(lambda g: len(g) >= before + 4)
    finally:
        fol.close()


# ---- agent events ----------------------------------------------------------------------------


def agent_events(stub, **req):
    return list(stub.GetAgentEvents(opb.GetAgentEventsRequest(**req), timeout=20))


def test_agent_events(env):
    srv, stub, reg = env["srv"], env["stub"], env["registry"]
    hist = agent_events(stub)
    types = [r.agent_event.type for r in hist]
    assert fpb.AGENT_STARTED in types and fpb.ENDPOINT_CREATED in types
    created = next(r for r in hist if r.agent_event.type == fpb.ENDPOINT_CREATED)
    assert created.agent_event.endpoint_update.pod_name == "web-1" and created.agent_event.endpoint_update.id == 11
    assert [r.time.ToNanoseconds() for r in hist] == sorted(r.time.ToNanoseconds() for r in hist)

    policy = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
              "metadata": {"name": "allow-web", "namespace": "shop"},
              "spec": {"endpointSelector": {"matchLabels": {"app": "api"}},
                       "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "web"}}]}]}}
    r = httpx.post(srv.url + "/api/v1/policies", json=policy, timeout=10)
    assert r.status_code == 200, r.text
    upd = [e for e in agent_events(stub) if e.agent_event.type == fpb.POLICY_UPDATED]
    assert upd and "k8s:io.cilium.k8s.policy.name=allow-web" in upd[-1].agent_event.policy_update.labels
    assert upd[-1].agent_event.policy_update.rule_count == 1
    assert len(agent_events(stub, number=1)) == 1

    call = stub.GetAgentEvents(opb.GetAgentEventsRequest(follow=True), timeout=30)
    got: list = []

    def run():
        try:
            for x in call:
                got.append(x)
        except grpc.RpcError:
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        time.sleep(0.8)
        reg.put(EndpointRecord(container_id="c-api", pod_name="api-7", namespace="shop", endpoint_id=12,
                               created_ns=time.time_ns()))
        assert wait_for(lambda: any(x.agent_event.type == fpb.ENDPOINT_CREATED for x in got), 10)
        reg.delete("c-web", "eth0")
        r = httpx.delete(srv.url + "/api/v1/policies/shop/allow-web", timeout=10)
        assert r.status_code in (200, 204), r.text
        assert wait_for(lambda: {fpb.ENDPOINT_DELETED, fpb.POLICY_DELETED} <= {x.agent_event.type for x in got}, 10)
    finally:
        call.cancel()
        t.join(10)
    deleted = next(x for x in got if x.agent_event.type == fpb.ENDPOINT_DELETED)
    assert deleted.agent_event.endpoint_update.pod_name == "web-1"
    assert not any(x.agent_event.type == fpb.AGENT_STARTED for x in got)  # follow without number: only new


# ---- TLS and tokens --------------------------------------------------------------------------


def make_cert(tmp: Path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flowscope-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    (tmp / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "tls.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    return tmp / "tls.crt", tmp / "tls.key"


def test_tls_and_token_auth(tmp_path):
    crt, key = make_cert(tmp_path)
    viewer, agent_tok = "viewer-token-0123456789", "agent-token-0123456789"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"viewer {viewer}\nagent {agent_tok}\n")
    gport = free_port()
    srv = Server(tmp_path, "--hubble-listen", f"127.0.0.1:{gport}", "--hubble-tls-cert", str(crt),
                 "--hubble-tls-key", str(key), "--hubble-token-file", str(tokens)).wait_ready()
    try:
        srv.ingest(sample_flows(10, seed=3, start_ns=time.time_ns() - 1_000_000_000))
        creds = grpc.ssl_channel_credentials(root_certificates=crt.read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{gport}", creds) as ch:
            stub = opb_grpc.ObserverStub(ch)
            for md, code in ((None, grpc.StatusCode.UNAUTHENTICATED),
                             ((("authorization", "Bearer wrong-token-000000"),), grpc.StatusCode.UNAUTHENTICATED),
                             ((("authorization", f"Bearer {agent_tok}"),), grpc.StatusCode.PERMISSION_DENIED)):
                with pytest.raises(grpc.RpcError) as e:
                    stub.ServerStatus(opb.ServerStatusRequest(), metadata=md, timeout=10)
                assert e.value.code() == code
                with pytest.raises(grpc.RpcError) as e:
                    list(stub.GetFlows(opb.GetFlowsRequest(number=1), metadata=md, timeout=10))
                assert e.value.code() == code
            ok = (("authorization", f"Bearer {viewer}"),)
            assert stub.ServerStatus(opb.ServerStatusRequest(), metadata=ok, timeout=10).num_flows == 10
            import base64
            basic = (("authorization", "Basic " + base64.b64encode(f"hubble:{viewer}".encode()).decode()),)
            assert len(list(stub.GetFlows(opb.GetFlowsRequest(number=5), metadata=basic, timeout=10))) == 5
            # the health service stays open (hubble status, load balancers)
            hs = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="hubble.server.Observer"),
                                                      timeout=5)
            assert hs.status == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(f"127.0.0.1:{gport}") as plain:  # plain text to a TLS port fails
            with pytest.raises(grpc.RpcError) as e:
                opb_grpc.ObserverStub(plain).ServerStatus(opb.ServerStatusRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert viewer not in srv.log.read_text()
    finally:
        srv.stop()


# ---- configuration errors --------------------------------------------------------------------


def test_explicit_address_taken_is_one_clear_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run(FLOWSCOPE + ["server", "--db", f"sqlite:///{tmp_path}/x.db", "--port", str(free_port()),
                                        "--hubble-listen", f"127.0.0.1:{port}"], capture_output=True, text=True,
                           timeout=60)
    assert r.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port} for the Hubble API" in r.stderr and "Traceback" not in r.stderr
    for args, msg in ((["--hubble-listen", "nonsense"], "HOST:PORT"),
                      (["--hubble-token-file", str(tmp_path / "missing"), "--hubble-listen", f"127.0.0.1:{free_port()}"],
                       "cannot read token file")):
        r = subprocess.run(FLOWSCOPE + ["server", "--db", f"sqlite:///{tmp_path}/x.db", *args], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr


def test_default_address_taken_only_warns(tmp_path):
    """Another server on 4245 (a second Flowscope, a hubble port-forward): REST still runs, with a warning."""
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        holder.bind(("127.0.0.1", 4245))
        holder.listen()
    except OSError:
        holder.close()
        holder = None  # someone already holds it: the condition under test holds anyway
    srv = Server(tmp_path, "--log-level", "warning")
    try:
        srv.wait_ready()
        assert "running without it" in srv.log.read_text()
    finally:
        srv.stop()
        if holder is not None:
            holder.close()
