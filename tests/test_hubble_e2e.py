"""Real flows through the Hubble API: namespaces -> tc probe -> agent -> `flowscope server` -> gRPC client.

What the Hubble API answers equals what `flowscope observe -o json` prints for the same query; follow
streams live flows; the endpoints registered on the node show up as agent events.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import grpc
import pytest
from google.protobuf import json_format

from api.hubble.pb import flow_pb2 as fpb
from api.hubble.pb import observer_pb2 as opb
from api.hubble.pb import observer_pb2_grpc as opb_grpc
from flowscope.endpoints import EndpointRecord, EndpointStore

pytestmark = pytest.mark.root
FLOWSCOPE = [sys.executable, "-m", "flowscope.cli"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout=20.0, every=0.3):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(every)
    return pred()


def test_hubble_api_serves_real_flows(lab, tmp_path, monkeypatch):
    from flowscope.platform import Platform
    from probe.agent import Agent, AgentConfig

    state = tmp_path / "state"
    monkeypatch.setenv("FLOWSCOPE_STATE_DIR", str(state))  # the server reads the registry for agent events
    client, srv = lab.add("web"), lab.add("api")
    reg = EndpointStore(state)
    for e, app in ((client, "web"), (srv, "api")):
        reg.put(EndpointRecord(container_id=f"c-{app}", host_ifname=e.host_if, host_ifindex=e.ifindex,
                               ips=[e.ipv4, e.ipv6], namespace="shop", pod_name=f"{app}-1", labels={"app": app},
                               endpoint_id=e.ifindex, created_ns=time.time_ns()))
    gport = free_port()
    with Platform(db_url=f"sqlite:///{tmp_path}/flows.db", port=free_port(), log_level="warning",
                  server_args=["--hubble-listen", f"127.0.0.1:{gport}"]) as plat:
        agent = Agent(AgentConfig(server=plat.url, state_dir=str(state), node_name="hubble-e2e", flush_interval=0.1,
                                  l7=False))
        agent.start()
        t = threading.Thread(target=agent.run, daemon=True)
        t.start()
        http = lab.spawn(srv, [sys.executable, "-m", "http.server", "8080", "--bind", "0.0.0.0"])
        channel = grpc.insecure_channel(f"127.0.0.1:{gport}")
        stub = opb_grpc.ObserverStub(channel)
        got: list = []
        call = stub.GetFlows(opb.GetFlowsRequest(follow=True, whitelist=[fpb.FlowFilter(protocol=["icmp"])]),
                             timeout=90)

        def follow():
            try:
                for r in call:
                    got.append(r)
            except grpc.RpcError:
                pass

        ft = threading.Thread(target=follow, daemon=True)
        ft.start()
        try:
            assert wait_for(lambda: client.exec(["curl", "-s", "-o", "/dev/null", f"http://{srv.ipv4}:8080/"],
                                                check=False).returncode == 0)
            client.exec(["ping", "-c", "2", "-i", "0.3", srv.ipv4])
            assert wait_for(lambda: any(r.HasField("flow") and r.flow.l4.HasField("ICMPv4") for r in got)), \
                "follow got no live ICMP flow"

            def grpc_flows():
                req = opb.GetFlowsRequest(number=100, whitelist=[fpb.FlowFilter(source_pod=["shop/web"],
                                                                                destination_port=["8080"])])
                return [json.loads(json_format.MessageToJson(r, preserving_proto_field_name=True))
                        for r in stub.GetFlows(req, timeout=30) if r.HasField("flow")]

            assert wait_for(lambda: len(grpc_flows()) >= 3), "no TCP flows reached the Hubble API"
            time.sleep(1.0)  # let the agent ship what it has, then compare one settled snapshot
            agent.stop()
            t.join(15)
            via_grpc = grpc_flows()
            r = subprocess.run(FLOWSCOPE + ["observe", "--server", plat.url, "--from-pod", "shop/web", "--to-port",
                                            "8080", "--last", "100", "-o", "json"], capture_output=True, text=True,
                               timeout=30)
            assert r.returncode == 0, r.stderr
            via_observe = [json.loads(line) for line in r.stdout.splitlines() if line]
            assert via_grpc == via_observe and via_grpc
            f = via_grpc[0]["flow"]
            assert f["source"]["pod_name"] == "web-1" and f["destination"]["pod_name"] == "api-1"
            assert f["node_name"] == "hubble-e2e" and f["l4"]["TCP"]["destination_port"] == 8080

            nodes = stub.GetNodes(opb.GetNodesRequest(), timeout=10).nodes
            assert [n.name for n in nodes] == ["hubble-e2e"] and nodes[0].num_flows > 0
            events = list(stub.GetAgentEvents(opb.GetAgentEventsRequest(), timeout=10))
            pods = {e.agent_event.endpoint_update.pod_name for e in events
                    if e.agent_event.type == fpb.ENDPOINT_CREATED}
            assert pods == {"web-1", "api-1"}
        finally:
            call.cancel()
            ft.join(10)
            channel.close()
            agent.stop()
            t.join(15)
            http.terminate()
        assert not t.is_alive()
