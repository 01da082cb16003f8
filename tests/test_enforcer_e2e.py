"""Policy enforcement in the real kernel, with real traffic between network namespaces.

One lab for the module: endpoints ``client``, ``server`` and ``other`` (registered, namespace ``t``) and
two unregistered namespaces ``world1``/``world2`` (their addresses are "world"). The agent runs its real
loop with the tc program and :class:`enforcer.sync.PolicySync` (policies handed over directly; the
server path is tested in test_enforcer_platform.py). For every (policy set x connection) the kernel's
behaviour (does the connection work, what do the flows say) is compared with ``enforcer.decide``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import pytest

from enforcer.compiler import CompiledPolicy
from enforcer.decide import Decision, decide, decide_connection
from enforcer.policy import load_policies
from flowscope import schema
from flowscope.endpoints import EndpointRecord, EndpointStore
from flowscope.netlab import Lab, LabEndpoint

pytestmark = pytest.mark.root

TRAFFIC = str(Path(__file__).with_name("enforcer_traffic.py"))
TCP_PORTS = "8080,8081,8082,8085,8086,9000"
UDP_PORTS = "5353,5354"
NS = "t"
DROPPED, AUDIT, FORWARDED = schema.Verdict.DROPPED, schema.Verdict.AUDIT, schema.Verdict.FORWARDED


class Sink:
    """Stands where the shipper stands; the agent thread appends, tests read."""

    def __init__(self) -> None:
        self.flows: list[schema.Flow] = []
        self.lost: list = []
        self.lock = threading.Lock()
        self.stats = None

    def start(self) -> None:
        pass

    def put(self, flows) -> None:
        with self.lock:
            self.flows.extend(flows)

    def report_lost(self, source, n, cpu=None) -> None:
        self.lost.append((source, n, cpu))

    def close(self, deadline_s: float = 0) -> None:
        pass

    def take(self) -> list[schema.Flow]:
        with self.lock:
            out, self.flows = self.flows, []
        return out


class Env:
    def __init__(self, lab: Lab, tmp: Path):
        self.lab = lab
        self.tmp = tmp
        self.eps: dict[str, LabEndpoint] = {}
        store = EndpointStore(tmp)
        for name in ("client", "server", "other"):
            ep = self.eps[name] = lab.add(name)
            store.put(EndpointRecord(container_id=f"c-{name}", host_ifname=ep.host_if, host_ifindex=ep.ifindex,
                                     ips=[ep.ipv4, ep.ipv6], namespace=NS, pod_name=f"{name}-0",
                                     labels={"app": name}))
        for name in ("world1", "world2"):
            self.eps[name] = lab.add(name)
        for name in ("server", "client", "world1", "world2"):
            p = lab.spawn(self.eps[name], [sys.executable, TRAFFIC, "serve", TCP_PORTS, UDP_PORTS],
                          stdout=subprocess.PIPE)
            assert p.stdout.readline().strip() == b"ready"
        self.sink = Sink()
        self.start_agent()
        self.revision = 0

    def start_agent(self) -> None:
        from enforcer.sync import PolicySync, SyncConfig
        from probe.agent import Agent, AgentConfig

        self.sync = PolicySync(SyncConfig(state_dir=str(self.tmp)), client=None, fetch=False)
        self.agent = Agent(AgentConfig(state_dir=str(self.tmp), node_name="node-e", drain_ms=20, l7=False),
                           shipper=self.sink, sources=[self.sync])
        self.agent.start()
        self.thread = threading.Thread(target=self.agent.run, daemon=True)
        self.thread.start()

    def stop_agent(self) -> None:
        self.agent.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()

    # -- policies ---------------------------------------------------------------------------

    def apply(self, text: str, *, global_audit: bool = False) -> CompiledPolicy:
        self.revision += 1
        policies = [p.with_revision(self.revision) for p in load_policies(text, default_namespace=NS)] if text else []
        self.sync.cfg.global_audit = global_audit
        self.sync.use_policies(policies, self.revision)
        assert self.sync.wait_applied(self.revision, timeout=10), self.sync.status()
        assert self.sync.status()["last_error"] == ""
        return self.sync.compiled

    # -- traffic ----------------------------------------------------------------------------

    def ip(self, name: str, v6: bool = False) -> str:
        ep = self.eps[name]
        return ep.ipv6 if v6 else ep.ipv4

    def probe(self, src: Optional[str], *targets: str, timeout: float = 0.8) -> dict:
        cmd = [sys.executable, TRAFFIC, "probe", "--timeout", str(timeout), *targets]
        if src is None:  # from the host
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
        else:
            out = self.eps[src].exec(cmd, timeout=30).stdout
        return json.loads(out)

    def records(self, pred, *, want: int = 1, timeout: float = 3.0) -> list[schema.Flow]:
        """Flows (since the last take) matching ``pred``; waits until ``want`` arrived."""
        got: list[schema.Flow] = []
        end = time.monotonic() + timeout
        while True:
            got.extend(self.sink.take())
            hits = [f for f in got if pred(f)]
            if len(hits) >= want or time.monotonic() > end:
                with self.sink.lock:
                    self.sink.flows[:0] = got
                return hits
            time.sleep(0.05)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with Lab() as lab:
        e = Env(lab, tmp_path_factory.mktemp("enf"))
        try:
            yield e
        finally:
            e.stop_agent()


@pytest.fixture
def fresh(env):
    env.apply("")
    env.sink.take()
    yield env
    env.sync.cfg.global_audit = False


# --------------------------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------------------------

PROTO = {"tcp": "tcp", "udp": "udp", "icmp": None}


def _target(t: str) -> tuple[str, str, int]:
    proto, rest = t.split(":", 1)
    if proto == "icmp":
        return proto, rest, 0
    ip, port = rest.rsplit(":", 1)
    return proto, ip.strip("[]"), int(port)


def _matches(f: schema.Flow, proto: str, src: str, dst: str, port: int, sport: int) -> bool:
    if f.IP is None or f.IP.source != src or f.IP.destination != dst or f.l4 is None:
        return False
    if proto == "tcp":
        return f.l4.TCP is not None and f.l4.TCP.destination_port == port and f.l4.TCP.source_port == sport
    if proto == "udp":
        return f.l4.UDP is not None and f.l4.UDP.destination_port == port and f.l4.UDP.source_port == sport
    icmp = f.l4.ICMPv6 if ":" in src else f.l4.ICMPv4
    return icmp is not None and icmp.type == (128 if ":" in src else 8)


def _names(policies: list[schema.Policy]) -> list[str]:
    return sorted(p.name for p in policies)


def check_record(rec: schema.Flow, d: Decision, *, default_deny: Optional[list[str]] = None) -> None:
    """One flow record of a new connection against the oracle's decision."""
    side = d.direction.key
    assert rec.verdict == d.verdict, (rec, d)
    assert rec.policy_match_type == int(d.match_type), (rec, d)
    if d.verdict == DROPPED:
        assert rec.drop_reason_desc == d.drop_reason
    assert _names(getattr(rec, f"{side}_allowed_by")) == sorted(r.name for r in d.allowed_by)
    denied = _names(getattr(rec, f"{side}_denied_by"))
    if d.denied_by:
        assert denied == sorted(r.name for r in d.denied_by)
        assert getattr(rec, f"{side}_denied_by")[0] == d.denied_by[0].to_flow()  # name, namespace, revision, kind
    elif d.verdict != FORWARDED:
        # POLICY_DENIED has no deciding rule: Flowscope names the policies behind the default deny.
        assert denied and (default_deny is None or denied == sorted(default_deny)), rec
    else:
        assert denied == []
    if d.allowed_by or d.verdict != FORWARDED:
        assert rec.event_type.type in (schema.EVENT_POLICY_VERDICT, schema.EVENT_DROP), rec


def check(env: Env, compiled: CompiledPolicy, src: str, *targets: str, v6: bool = False,
          default_deny: Optional[list[str]] = None) -> dict[str, bool]:
    """Run ``targets`` from endpoint ``src``; kernel == oracle for the connection and for its flows."""
    env.sink.take()
    res = env.probe(src, *targets)
    src_ip = env.ip(src, v6)
    out: dict[str, bool] = {}
    by_ip = {ep.ipv4: ep for ep in env.eps.values()} | {ep.ipv6: ep for ep in env.eps.values()}
    for t in targets:
        proto, ip, port = _target(t)
        dport = port if proto != "icmp" else (128 if ":" in ip else 8)
        pname = proto if proto != "icmp" else ("icmpv6" if ":" in ip else "icmp")
        egress, ingress = decide_connection(compiled, src_ip, ip, pname, dport)
        expect_ok = (egress is None or egress.forwarded) and (ingress is None or ingress.forwarded)
        assert res[t]["ok"] == expect_ok, f"{src} -> {t}: kernel {res[t]['ok']}, decide {egress} / {ingress}"
        out[t] = res[t]["ok"]
        sport = res[t].get("sport", 0)
        sides = [(egress, env.eps[src].ifindex)]
        if ingress is not None and (egress is None or egress.forwarded):
            sides.append((ingress, by_ip[ip].ifindex))
        for d, ifindex in sides:
            if d is None:
                continue
            def pred(f, ifindex=ifindex):
                return (f.interface.index == ifindex and _matches(f, proto, src_ip, ip, port, sport)
                        and f.flowscope.event in ("new", "drop"))
            want = 2 if d.verdict == DROPPED else 1
            recs = env.records(pred, want=want)
            assert recs, f"no flow record for {src} -> {t} on ifindex {ifindex}"
            if d.verdict == DROPPED:
                types = sorted(r.event_type.type for r in recs[:2])
                assert types == [schema.EVENT_DROP, schema.EVENT_POLICY_VERDICT], recs
                drop = next(r for r in recs if r.event_type.type == schema.EVENT_DROP)
                assert drop.event_type.sub_type == d.drop_reason.number
            for r in recs[:want]:
                check_record(r, d, default_deny=default_deny)
    return out


# --------------------------------------------------------------------------------------------
# Policy sets
# --------------------------------------------------------------------------------------------

ALLOW_LIST = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: server-allow}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}, {port: "5353", protocol: UDP}]}]
"""


def policy_drops(env: Env) -> int:
    from probe import events as ev

    return sum(env.agent.dp.read_stats()[ev.STAT_POLICY_DROP])


def test_no_policy_enforces_nothing(fresh):
    env = fresh
    before = policy_drops(env)
    got = check(env, env.sync.compiled, "client", f"tcp:{env.ip('server')}:8081", f"udp:{env.ip('server')}:5354",
                f"icmp:{env.ip('server')}", f"tcp:{env.ip('world1')}:8080")
    assert all(got.values())
    assert policy_drops(env) == before
    recs = env.records(lambda f: f.IP and f.IP.source == env.ip("client"), want=4)
    assert all(f.verdict == FORWARDED and f.event_type.type == schema.EVENT_TRACE and not f.policy_match_type
               for f in recs)


def test_allow_list_drops_the_rest(fresh):
    env = fresh
    c = env.apply(ALLOW_LIST)
    srv = env.ip("server")
    got = check(env, c, "client", f"tcp:{srv}:8080", f"udp:{srv}:5353", f"tcp:{srv}:8081", f"udp:{srv}:5354",
                f"icmp:{srv}", default_deny=["server-allow"])
    assert got == {f"tcp:{srv}:8080": True, f"udp:{srv}:5353": True, f"tcp:{srv}:8081": False,
                   f"udp:{srv}:5354": False, f"icmp:{srv}": False}
    # another endpoint is not in the allow list; the server's own egress is not under policy
    assert check(env, c, "other", f"tcp:{srv}:8080") == {f"tcp:{srv}:8080": False}
    assert all(check(env, c, "server", f"tcp:{env.ip('client')}:8080", f"udp:{env.ip('world1')}:5353").values())
    # the same over IPv6 (neighbour discovery keeps working under policy)
    srv6 = env.ip("server", v6=True)
    got = check(env, c, "client", f"tcp:[{srv6}]:8080", f"tcp:[{srv6}]:8081", f"icmp:{srv6}", v6=True)
    assert got == {f"tcp:[{srv6}]:8080": True, f"tcp:[{srv6}]:8081": False, f"icmp:{srv6}": False}


DENY_BEATS_ALLOW = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: server-open}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEntities: [all]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: no-client-8081}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "8081", protocol: TCP}]}]
"""


def test_explicit_deny_beats_allow(fresh):
    env = fresh
    c = env.apply(DENY_BEATS_ALLOW)
    srv = env.ip("server")
    got = check(env, c, "client", f"tcp:{srv}:8080", f"tcp:{srv}:8081", f"udp:{srv}:5354", f"icmp:{srv}")
    assert got == {f"tcp:{srv}:8080": True, f"tcp:{srv}:8081": False, f"udp:{srv}:5354": True, f"icmp:{srv}": True}
    assert check(env, c, "other", f"tcp:{srv}:8081") == {f"tcp:{srv}:8081": True}  # the deny names the client


CIDR_AND_ENTITIES = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-egress}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toCIDRSet: [{cidr: "{NET}", except: ["{W2}/32"]}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
  - toEntities: [world]
    toPorts: [{ports: [{port: "5353", protocol: UDP}]}]
  - toEntities: [host]
"""


def test_cidr_except_and_entities(fresh):
    env = fresh
    w1, w2 = env.ip("world1"), env.ip("world2")
    net = w1.rsplit(".", 1)[0] + ".0/24"
    c = env.apply(CIDR_AND_ENTITIES.replace("{NET}", net).replace("{W2}", w2))
    srv = env.ip("server")
    got = check(env, c, "client", f"tcp:{w1}:8080", f"tcp:{w2}:8080", f"tcp:{srv}:8080", f"udp:{w2}:5353",
                f"udp:{srv}:5353", f"tcp:{w1}:8081", "icmp:169.254.1.1")
    # the CIDR selects world addresses in the /24 except world2; endpoints are never CIDR peers;
    # the world entity includes world2; the host entity is the node (its gateway address here)
    assert got == {f"tcp:{w1}:8080": True, f"tcp:{w2}:8080": False, f"tcp:{srv}:8080": False,
                   f"udp:{w2}:5353": True, f"udp:{srv}:5353": False, f"tcp:{w1}:8081": False,
                   "icmp:169.254.1.1": True}


PORT_RANGE_AND_ICMP = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: server-range}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "8080", endPort: 8085, protocol: TCP}]}]
  - fromEntities: [host]
    icmps: [{fields: [{type: EchoRequest}]}]
"""


def test_port_range_udp_icmp_and_host_entity(fresh):
    env = fresh
    c = env.apply(PORT_RANGE_AND_ICMP)
    srv = env.ip("server")
    got = check(env, c, "client", f"tcp:{srv}:8080", f"tcp:{srv}:8085", f"tcp:{srv}:8086", f"tcp:{srv}:9000",
                f"udp:{srv}:5353", f"icmp:{srv}")
    assert got == {f"tcp:{srv}:8080": True, f"tcp:{srv}:8085": True, f"tcp:{srv}:8086": False,
                   f"tcp:{srv}:9000": False, f"udp:{srv}:5353": False, f"icmp:{srv}": False}
    # ICMP from the host is allowed (entity host); the oracle decides from the address the host used
    env.sink.take()
    assert env.probe(None, f"icmp:{srv}")[f"icmp:{srv}"]["ok"] is True
    rec = env.records(lambda f: f.interface.index == env.eps["server"].ifindex and f.l4 and f.l4.ICMPv4
                      and f.l4.ICMPv4.type == 8 and f.IP.destination == srv)[0]
    d = decide(c, rec.destination.identity, "ingress", rec.IP.source, "icmp", 8)
    assert d.forwarded and d.peer_identity == 1
    check_record(rec, d)


EGRESS_ONLY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-out}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: server}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-in}
spec:
  endpointSelector: {matchLabels: {app: client}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: nobody}}]
"""


def test_both_directions_and_replies_of_allowed_connections(fresh):
    """The client may only open 8080 to the server and accepts nothing: its own connection works both
    ways (the replies pass by connection tracking), the server cannot connect back, and a drop at the
    client's egress is reported there."""
    env = fresh
    c = env.apply(EGRESS_ONLY)
    srv, cli = env.ip("server"), env.ip("client")
    got = check(env, c, "client", f"tcp:{srv}:8080", f"tcp:{srv}:8081", f"udp:{srv}:5353",
                default_deny=["client-out"])
    assert got == {f"tcp:{srv}:8080": True, f"tcp:{srv}:8081": False, f"udp:{srv}:5353": False}
    got = check(env, c, "server", f"tcp:{cli}:8080", f"icmp:{cli}", default_deny=["client-in"])
    assert got == {f"tcp:{cli}:8080": False, f"icmp:{cli}": False}
    # the reply records of the allowed connection carry its verdict and policy, flagged as replies
    ok = check(env, c, "client", f"tcp:{srv}:8080")
    replies = env.records(lambda f: f.is_reply is True and f.interface.index == env.eps["client"].ifindex
                          and f.l4 and f.l4.TCP and f.l4.TCP.source_port == 8080)
    assert ok and replies
    assert replies[0].verdict == FORWARDED and _names(replies[0].egress_allowed_by) == ["client-out"]
    assert replies[0].event_type.type == schema.EVENT_TRACE


AUDIT_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: server-audit}
spec:
  endpointSelector: {matchLabels: {app: server}}
  auditMode: true
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
  ingressDeny:
  - toPorts: [{ports: [{port: "8082", protocol: TCP}]}]
"""


def test_audit_mode_per_policy_and_global(fresh):
    env = fresh
    c = env.apply(AUDIT_POLICY)
    srv = env.ip("server")
    got = check(env, c, "client", f"tcp:{srv}:8080", f"tcp:{srv}:8081", f"tcp:{srv}:8082")
    assert all(got.values())  # audit never blocks
    recs = env.records(lambda f: f.interface.index == env.eps["server"].ifindex and f.verdict == AUDIT, want=2)
    assert {f.l4.TCP.destination_port for f in recs} >= {8081, 8082}
    # global audit: an enforcing allow-list reports would-be drops as AUDIT and forwards them
    c = env.apply(ALLOW_LIST, global_audit=True)
    got = check(env, c, "client", f"tcp:{srv}:8080", f"tcp:{srv}:8081", f"udp:{srv}:5354")
    assert all(got.values())
    drops_before = policy_drops(env)
    c = env.apply(ALLOW_LIST)  # and back to enforcing
    assert check(env, c, "client", f"tcp:{srv}:8081") == {f"tcp:{srv}:8081": False}
    assert policy_drops(env) > drops_before


LIVE_V1 = ALLOW_LIST
LIVE_V2 = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: server-allow}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "8081", protocol: TCP}]}]
"""


def test_live_update_keeps_open_connections(fresh):
    env = fresh
    env.apply(LIVE_V1)
    srv = env.ip("server")
    hold = env.eps["client"].popen([sys.executable, TRAFFIC, "hold", srv, "8080"], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)
    env.lab.procs.append(hold)  # killed by the lab whatever happens
    try:
        assert hold.stdout.readline().startswith("connected")

        def ping() -> str:
            hold.stdin.write("ping\n")
            hold.stdin.flush()
            return hold.stdout.readline().strip()

        assert ping() == "ok"
        t0 = time.perf_counter()
        c = env.apply(LIVE_V2)  # 8080 is no longer allowed
        assert time.perf_counter() - t0 < 5
        assert ping() == "ok" and ping() == "ok"  # the established connection keeps working
        got = check(env, c, "client", f"tcp:{srv}:8080", f"tcp:{srv}:8081")
        assert got == {f"tcp:{srv}:8080": False, f"tcp:{srv}:8081": True}  # new connections follow the update
        assert ping() == "ok"
    finally:
        hold.stdin.close()
        hold.wait(5)


def test_every_dropped_packet_is_reported(fresh):
    env = fresh
    env.apply(ALLOW_LIST)
    srv = env.ip("server")
    before = policy_drops(env)
    n = 25
    res = env.probe("client", f"udp:{srv}:5354", timeout=0.2)
    assert not any(r["ok"] for r in res.values())
    env.eps["client"].exec([sys.executable, "-c", "import socket\n"
                            f"for _ in range({n}):\n"
                            "    s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                            f"    s.sendto(b'x', ('{srv}', 5354)); s.close()"])
    drops = env.records(lambda f: f.event_type is not None and f.event_type.type == schema.EVENT_DROP
                        and f.l4 and f.l4.UDP and f.l4.UDP.destination_port == 5354, want=n + 1)
    assert len(drops) == n + 1
    assert policy_drops(env) - before == n + 1
    assert all(_names(f.ingress_denied_by) == ["server-allow"] for f in drops)
    assert all(f.drop_reason_desc.value == "POLICY_DENIED" for f in drops)


def test_identities_are_stable_across_an_agent_restart(fresh):
    env = fresh
    env.apply(ALLOW_LIST)
    before = {e.name: e.identity for e in env.sync.compiled.endpoints}
    assert len(set(before.values())) == 3 and min(before.values()) >= 256
    env.stop_agent()
    env.start_agent()
    c = env.apply(ALLOW_LIST)
    after = {e.name: e.identity for e in c.endpoints}
    assert after == before
    srv = env.ip("server")
    got = check(env, c, "client", f"tcp:{srv}:8080", f"tcp:{srv}:8081")
    assert got == {f"tcp:{srv}:8080": True, f"tcp:{srv}:8081": False}
    rec = env.records(lambda f: f.IP and f.IP.source == env.ip("client") and f.source is not None)[0]
    assert rec.source.identity == before[f"{NS}/client-0"]
