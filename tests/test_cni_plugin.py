"""CNI plugin driven as runtimes drive it: the real ``flowscope-cni`` executable, CNI_* environment and
config on stdin, real network namespaces; through the node agent's service and standalone."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from cni.service import CNIService
from cni.testing import PluginRun, Sandbox, netns_exec, run_plugin
from cni.versions import SUPPORTED_VERSIONS
from flowscope.endpoints import EndpointStore

pytestmark = pytest.mark.root


@pytest.fixture
def sb(tmp_path):
    with Sandbox(tmp_path / "state") as s:
        yield s


@pytest.fixture
def service(sb):
    with CNIService(sb.state_dir) as svc:
        yield svc


@pytest.fixture(params=["service", "standalone"])
def path(request, sb):
    """Run the test once through the agent's service (fast path) and once standalone."""
    if request.param == "service":
        with CNIService(sb.state_dir):
            yield "service"
    else:
        yield "standalone"


def cni(sb: Sandbox, command: str, conf, cid: str = "", netns: str = "", ifname: str = "eth0", **kw) -> PluginRun:
    return run_plugin(command, conf, container_id=cid, netns=netns, ifname=ifname, env=sb.env(), **kw)


def with_prev(conf: dict, result: dict) -> dict:
    return dict(conf, prevResult=result)


def ping(ns_path: str, addr: str, v6: bool = False) -> bool:
    cmd = ["ping", "-6" if v6 else "-4", "-c", "1", "-W", "2", addr]
    return netns_exec(os.path.basename(ns_path), cmd).returncode == 0


def plain_ips(result: dict) -> list[str]:
    return [str(ipaddress.ip_interface(ip["address"]).ip) for ip in result["ips"]]


# ---- the life cycle -------------------------------------------------------------------------------


def test_add_ping_check_del_dual_stack(sb, path):
    conf = sb.conf(subnets=("10.201.0.0/24", "fd00:201::/64"), mtu=1400,
                   args={"cni": {"labels": {"app": "frontend"}}}, runtimeConfig={"labels": ["tier=web"]})
    a_ns, b_ns = sb.netns("a"), sb.netns("b")
    a = cni(sb, "ADD", conf, "ctr-a", a_ns, args="K8S_POD_NAMESPACE=shop;K8S_POD_NAME=front-1")
    b = cni(sb, "ADD", conf, "ctr-b", b_ns)
    assert a.status == 0 and b.status == 0, (a.stdout, a.stderr, b.stdout, b.stderr)
    assert f"path={path}" in a.stderr  # the request really took this path
    ra, rb = a.json, b.json
    assert ra["cniVersion"] == "1.1.0"
    host_if, cont_if = ra["interfaces"]
    assert "sandbox" not in host_if and cont_if == {"name": "eth0", "mac": cont_if["mac"], "mtu": 1400,
                                                    "sandbox": a_ns}
    assert [ip["address"] for ip in ra["ips"]] == ["10.201.0.2/32", "fd00:201::2/128"]
    assert [(ip["gateway"], ip["interface"]) for ip in ra["ips"]] == [("169.254.1.1", 1), ("fe80::1", 1)]
    assert {(r["dst"], r["gw"]) for r in ra["routes"]} == {("0.0.0.0/0", "169.254.1.1"), ("::/0", "fe80::1")}
    # pod to pod, both families, and pod to host
    b4, b6 = plain_ips(rb)
    assert ping(a_ns, b4) and ping(a_ns, b6, v6=True)
    assert ping(b_ns, plain_ips(ra)[0])
    assert ping(a_ns, "169.254.1.1") and ping(a_ns, "fe80::1%eth0", v6=True)
    mtu = netns_exec(os.path.basename(a_ns), ["cat", "/sys/class/net/eth0/mtu"]).stdout.strip()
    assert mtu == "1400"
    # the endpoint record the agent picks up
    rec = EndpointStore(sb.state_dir).get("ctr-a", "eth0")
    assert rec is not None
    assert (rec.namespace, rec.pod_name, rec.labels) == ("shop", "front-1", {"app": "frontend", "tier": "web"})
    assert rec.ips == plain_ips(ra) and rec.host_ifname == host_if["name"] and rec.mac == cont_if["mac"]
    assert rec.host_ifindex == int(open(f"/sys/class/net/{host_if['name']}/ifindex").read())
    assert rec.endpoint_id == rec.host_ifindex and rec.identity == 0 and rec.netns == a_ns
    assert EndpointStore(sb.state_dir).get("ctr-b", "eth0").pod_name == "pod-ctr-b"
    # CHECK passes on the live state, fails when the state drifts
    assert cni(sb, "CHECK", with_prev(conf, ra), "ctr-a", a_ns).status == 0
    netns_exec(os.path.basename(a_ns), ["ip", "addr", "del", "10.201.0.2/32", "dev", "eth0"], check=True)
    drift = cni(sb, "CHECK", with_prev(conf, ra), "ctr-a", a_ns)
    assert drift.error_code == 104 and "10.201.0.2/32" in drift.json["details"]
    # DEL, DEL again, DEL with the netns gone
    assert cni(sb, "DEL", conf, "ctr-a", a_ns).status == 0
    assert cni(sb, "DEL", conf, "ctr-a", a_ns).status == 0
    assert cni(sb, "DEL", conf, "ctr-a", "").status == 0  # CNI_NETNS empty
    sb.remove_netns(b_ns)
    assert not os.path.exists(b_ns)
    gone = cni(sb, "DEL", conf, "ctr-b", b_ns)
    assert gone.status == 0, gone.stdout
    assert sb.leaks() == {}
    # CHECK after DEL reports the missing container side
    assert cni(sb, "CHECK", with_prev(conf, ra), "ctr-a", a_ns).error_code == 104


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_every_spec_version(sb, service, version):
    conf = sb.conf(version=version, subnets=("10.202.0.0/24", "fd00:202::/64"))
    ns = sb.netns("v")
    add = cni(sb, "ADD", conf, "ctr-v", ns)
    assert add.status == 0, add.stdout
    r = add.json
    assert r["cniVersion"] == version
    legacy = version < "1.0.0"
    assert [ip.get("version") for ip in r["ips"]] == (["4", "6"] if legacy else [None, None])
    assert ("mtu" in r["interfaces"][1]) == (version == "1.1.0")
    assert ping(ns, "169.254.1.1") and ping(ns, "fe80::1%eth0", v6=True)
    check = cni(sb, "CHECK", with_prev(conf, r), "ctr-v", ns)
    if version in ("0.3.0", "0.3.1"):
        assert check.error_code == 1  # CHECK came with 0.4.0
    else:
        assert check.status == 0, check.stdout
    status = cni(sb, "STATUS", conf)
    assert (status.status, status.error_code) == ((0, None) if version == "1.1.0" else (1, 1))
    assert cni(sb, "DEL", with_prev(conf, r), "ctr-v", ns).status == 0
    assert sb.leaks() == {}


def test_ipv6_only_and_ipam_gateway_mode(sb, service):
    conf = sb.conf(subnets=("fd00:203::/64",))
    a_ns, b_ns = sb.netns("a"), sb.netns("b")
    ra = cni(sb, "ADD", conf, "six-a", a_ns).json
    rb = cni(sb, "ADD", conf, "six-b", b_ns).json
    assert [ip["address"] for ip in ra["ips"]] == ["fd00:203::2/128"]
    assert ping(a_ns, plain_ips(rb)[0], v6=True)
    gw_conf = sb.conf(name=f"gw{sb.tag}", subnets=("10.204.0.0/24",), linkLocalGateway=False)
    c_ns = sb.netns("c")
    rc = cni(sb, "ADD", gw_conf, "gw-c", c_ns).json
    assert rc["ips"][0]["gateway"] == "10.204.0.1" and rc["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.204.0.1"}]
    assert ping(c_ns, "10.204.0.1")
    assert cni(sb, "CHECK", with_prev(gw_conf, rc), "gw-c", c_ns).status == 0
    for cid, ns, c in (("six-a", a_ns, conf), ("six-b", b_ns, conf), ("gw-c", c_ns, gw_conf)):
        assert cni(sb, "DEL", c, cid, ns).status == 0
    assert sb.leaks() == {}


def test_delegated_ipam_host_local(sb, service, tmp_path):
    """ipam.type names a plugin in CNI_PATH: Debian's host-local (which speaks only up to 1.0.0)."""
    data_dir = tmp_path / "host-local"
    conf = sb.conf()
    conf["ipam"] = {"type": "host-local", "ranges": [[{"subnet": "10.205.0.0/24"}]], "dataDir": str(data_dir),
                    "routes": [{"dst": "10.96.0.0/12"}]}
    ns = sb.netns("d")
    add = cni(sb, "ADD", conf, "del-1", ns)
    assert add.status == 0, add.stdout
    r = add.json
    assert r["ips"][0]["address"] == "10.205.0.2/32"
    assert {"dst": "10.96.0.0/12", "gw": "169.254.1.1"} in r["routes"]
    assert (data_dir / conf["name"] / "10.205.0.2").exists()
    assert cni(sb, "CHECK", with_prev(conf, r), "del-1", ns).status == 0
    assert cni(sb, "DEL", conf, "del-1", ns).status == 0
    assert not (data_dir / conf["name"] / "10.205.0.2").exists()
    assert sb.leaks() == {}
    # an IPAM plugin that does not exist is a config error, and nothing is left
    conf["ipam"] = {"type": "no-such-ipam"}
    bad = cni(sb, "ADD", conf, "del-2", ns)
    assert bad.error_code == 7 and "no-such-ipam" in bad.json["msg"]
    assert sb.leaks() == {}


# ---- bad input: right code, nothing leaked ---------------------------------------------------------


def test_bad_input_codes_and_no_leaks(sb, path):
    ns = sb.netns("bad")
    good = sb.conf(subnets=("10.206.0.0/24", "fd00:206::/64"))
    cases = [
        ("malformed JSON", b'{"cniVersion": "1.0.0", "name": ', {}, 6),
        ("not an object", b"[1]", {}, 6),
        ("missing CNI_NETNS", good, {"drop": ("CNI_NETNS",)}, 4),
        ("missing CNI_CONTAINERID", good, {"drop": ("CNI_CONTAINERID",)}, 4),
        ("missing CNI_IFNAME", good, {"drop": ("CNI_IFNAME",)}, 4),
        ("missing CNI_PATH", good, {"drop": ("CNI_PATH",)}, 4),
        ("bad ifname", good, {"ifname": "this-is-too-long"}, 4),
        ("unknown version", dict(good, cniVersion="0.9.9"), {}, 1),
        ("no version", {k: v for k, v in good.items() if k != "cniVersion"}, {}, 1),
        ("bad mtu", dict(good, mtu="jumbo"), {}, 7),
        ("bad subnet", dict(good, ipam={"subnet": "10.206.0.0/99"}), {}, 7),
        ("no ranges", dict(good, ipam={}), {}, 7),
        ("bad labels", dict(good, runtimeConfig={"labels": "app=x"}), {}, 7),
        ("bad CNI_ARGS labels", good, {"args": "FLOWSCOPE_LABELS=novalue"}, 7),
        ("bad CNI_ARGS", good, {"args": "JUSTAWORD"}, 4),
        ("netns missing", good, {"netns": "/var/run/netns/fsct-none"}, 3),
        ("not a netns", good, {"netns": "/etc/hostname"}, 3),
    ]
    for what, conf, kw, code in cases:
        kw = dict(kw)
        netns = kw.pop("netns", ns)
        r = cni(sb, "ADD", conf, "bad-1", netns, **kw)
        assert r.status != 0 and r.error_code == code, (what, r.stdout, r.stderr)
        body = r.json
        assert set(body) == {"cniVersion", "code", "msg", "details"} and body["msg"], what
        assert "Traceback" not in r.stdout + r.stderr, what
        assert sb.leaks() == {}, what
    assert len(netns_exec(os.path.basename(ns), ["ip", "-o", "link"]).stdout.splitlines()) == 1  # only lo
    assert cni(sb, "ADD", good, "bad-1", ns).status == 0  # and the same container attaches fine afterwards


def test_exhausted_pool_and_existing_interface_leak_nothing(sb, path):
    conf = sb.conf(subnets=("10.207.0.0/30", "fd00:207::/64"))  # exactly one usable IPv4 address
    a_ns, b_ns = sb.netns("a"), sb.netns("b")
    assert cni(sb, "ADD", conf, "one", a_ns).status == 0
    before = sb.leaks()
    r = cni(sb, "ADD", conf, "two", b_ns)
    assert r.error_code == 100 and "no IP addresses available" in r.json["msg"]
    assert "10.207.0.1-10.207.0.2" in r.json["details"]  # the range (its .1 is the gateway)
    assert sb.leaks() == before  # the IPv6 address taken before the failure was given back
    assert "eth0" not in netns_exec(os.path.basename(b_ns), ["ip", "link"]).stdout
    # CNI_IFNAME already present in the container: 101, nothing of ours left
    netns_exec(os.path.basename(b_ns), ["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "other0"], check=True)
    big = sb.conf(name=f"big{sb.tag}", subnets=("10.208.0.0/24",))
    r = cni(sb, "ADD", big, "three", b_ns)
    assert r.error_code == 101 and "eth0 already exists" in r.json["msg"]
    assert sb.leaks() == before
    # the runtime's DEL after the failed ADD must not touch the interface that was there before
    assert cni(sb, "DEL", big, "three", b_ns).status == 0
    assert "eth0" in netns_exec(os.path.basename(b_ns), ["ip", "link"]).stdout
    # a second ADD of an attached container is refused (101) and leaves the first attachment intact
    again = cni(sb, "ADD", conf, "one", a_ns)
    assert again.error_code == 101
    assert sb.leaks() == before
    assert cni(sb, "DEL", conf, "one", a_ns).status == 0
    assert sb.leaks() == {}


# ---- concurrency ----------------------------------------------------------------------------------


def test_fifty_parallel_adds_get_distinct_addresses(sb, service):
    conf = sb.conf(subnets=("10.209.0.0/24",))
    nss = [sb.netns(f"p{i}") for i in range(50)]
    with ThreadPoolExecutor(max_workers=50) as ex:
        runs = list(ex.map(lambda i: cni(sb, "ADD", conf, f"par-{i}", nss[i]), range(50)))
    assert all(r.status == 0 for r in runs), [r.stdout for r in runs if r.status][:3]
    ips = [plain_ips(r.json)[0] for r in runs]
    assert len(set(ips)) == 50
    assert len(EndpointStore(sb.state_dir).list()) == 50 and len(sb.host_links()) == 50
    with ThreadPoolExecutor(max_workers=50) as ex:
        dels = list(ex.map(lambda i: cni(sb, "DEL", conf, f"par-{i}", nss[i]), range(50)))
    assert all(r.status == 0 for r in dels)
    assert sb.leaks() == {}


def test_fifty_parallel_standalone_processes(sb):
    """Without the service: plugin processes lock the same IPAM directory (16 here: each process pays the
    interpreter and pyroute2 start-up; the 50-way race runs through the service above and on the store alone
    in test_cni_units)."""
    conf = sb.conf(subnets=("10.210.0.0/24",))
    nss = [sb.netns(f"s{i}") for i in range(16)]
    with ThreadPoolExecutor(max_workers=16) as ex:
        runs = list(ex.map(lambda i: cni(sb, "ADD", conf, f"sa-{i}", nss[i]), range(16)))
    assert all(r.status == 0 and "path=standalone" in r.stderr for r in runs)
    assert len({plain_ips(r.json)[0] for r in runs}) == 16


def test_del_racing_add_leaves_consistent_state(sb, path):
    conf = sb.conf(subnets=("10.211.0.0/24",))
    ns = sb.netns("race")
    store = EndpointStore(sb.state_dir)
    outcomes = set()
    for round_ in range(6):
        cid = f"race-{round_}"
        barrier = threading.Barrier(2)

        def go(cmd):
            barrier.wait()
            return cni(sb, cmd, conf, cid, ns)

        with ThreadPoolExecutor(max_workers=2) as ex:
            add_f, del_f = ex.submit(go, "ADD"), ex.submit(go, "DEL")
            add, dele = add_f.result(), del_f.result()
        assert add.status == 0 and dele.status == 0, (add.stdout, dele.stdout)
        present = {
            "veth": bool(sb.host_links()),
            "endpoint": store.get(cid, "eth0") is not None,
            "reservation": bool(sb.leaks().get("reservations")),
            "attachment": bool(sb.leaks().get("attachments")),
            "eth0": "eth0" in netns_exec(os.path.basename(ns), ["ip", "link"]).stdout,
        }
        # all or nothing: DEL ran wholly before ADD (everything there) or wholly after (nothing)
        assert len(set(present.values())) == 1, present
        outcomes.add(present["veth"])
        assert cni(sb, "DEL", conf, cid, ns).status == 0
        assert sb.leaks() == {}
    assert outcomes  # at least one interleaving observed (which one is up to the scheduler)


# ---- STATUS, GC, the service -----------------------------------------------------------------------


def test_status_50_without_service_0_with(sb):
    conf = sb.conf()
    r = cni(sb, "STATUS", conf)
    assert r.error_code == 50 and "cni.sock" in r.json["details"]
    with CNIService(sb.state_dir) as svc:
        sock = svc.socket_path
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600 and stat.S_ISSOCK(os.stat(sock).st_mode)
        assert cni(sb, "STATUS", conf).status == 0
        # the agent's STATUS also says when ADD could not succeed: the pool is used up
        tiny = sb.conf(name=f"tiny{sb.tag}", subnets=("10.212.0.0/30",))
        assert cni(sb, "ADD", tiny, "only", sb.netns("t")).status == 0
        assert cni(sb, "STATUS", tiny).error_code == 50
        assert cni(sb, "DEL", tiny, "only", "").status == 0
    assert not sock.exists()
    assert cni(sb, "STATUS", conf).error_code == 50


def test_gc_releases_what_is_not_valid(sb, service):
    conf = sb.conf(subnets=("10.213.0.0/24", "fd00:213::/64"))
    keep_ns, drop_ns = sb.netns("keep"), sb.netns("drop")
    assert cni(sb, "ADD", conf, "keep", keep_ns).status == 0
    assert cni(sb, "ADD", conf, "drop", drop_ns).status == 0
    # an orphaned reservation (e.g. a plugin killed mid-ADD) is released too
    orphan = sb.state_dir / "ipam" / conf["name"] / "10.213.0.99"
    orphan.write_bytes(b"ghost\r\neth0")
    gc = dict(conf, **{"cni.dev/valid-attachments": [{"containerID": "keep", "ifname": "eth0"}]})
    r = cni(sb, "GC", gc)
    assert r.status == 0, r.stdout
    assert [e.container_id for e in EndpointStore(sb.state_dir).list()] == ["keep"]
    assert len(sb.host_links()) == 1 and not orphan.exists()
    assert "eth0" not in netns_exec(os.path.basename(drop_ns), ["ip", "link"]).stdout
    assert sorted(sb.leaks()["reservations"]) == sorted(f"{conf['name']}/{a}" for a in ("10.213.0.2", "fd00:213::2"))
    assert ping(keep_ns, "169.254.1.1")
    assert cni(sb, "GC", dict(conf)).error_code == 7  # no valid-attachments: refuse rather than wipe everything
    assert cni(sb, "GC", dict(gc, cniVersion="1.0.0")).error_code == 1


def test_service_rejects_other_users_and_garbage(sb, service):
    # An unprivileged user must be able to reach the socket file to prove the SO_PEERCRED check:
    # serve from a world-traversable directory and open the socket's mode for the duration.
    open_dir = tempfile.mkdtemp(prefix="fscni-perm-")
    os.chmod(open_dir, 0o755)
    try:
        with CNIService(open_dir) as svc:
            os.chmod(svc.socket_path, 0o666)
            code = ("import socket; s = socket.socket(socket.AF_UNIX); s.connect(%r); "
                    "s.sendall(b'FSCNI/1 0 2\\n{}'); s.shutdown(socket.SHUT_WR); "
                    "print(s.recv(65536).decode())" % str(svc.socket_path))
            p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
                                "-c", code], capture_output=True, text=True, timeout=10)
            assert p.returncode == 0, p.stderr
            assert '"code": 5' in p.stdout and "uid 65534" in p.stdout
    finally:
        shutil.rmtree(open_dir, ignore_errors=True)
    sock = str(service.socket_path)
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    s.shutdown(socket.SHUT_WR)
    reply = s.recv(65536)
    s.close()
    assert reply.startswith(b"FSCNI/1 1 ") and b'"code": 6' in reply
    assert cni(sb, "STATUS", sb.conf()).status == 0  # still serving


def test_client_when_the_agent_drops_the_connection(sb):
    """An agent that accepts and dies: ADD reports 11 (try again); DEL finishes standalone."""
    sb.state_dir.mkdir(parents=True, exist_ok=True)
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(sb.state_dir / "cni.sock"))
    srv.listen(8)
    srv.settimeout(0.1)
    stop = threading.Event()

    def drop():
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except socket.timeout:
                continue
            c.close()

    t = threading.Thread(target=drop, daemon=True)
    t.start()
    try:
        conf = sb.conf()
        ns = sb.netns("lost")
        add = cni(sb, "ADD", conf, "lost-1", ns)
        assert add.error_code == 11 and "lost the connection" in add.json["msg"]
        assert sb.leaks() == {}
        env = sb.env(FLOWSCOPE_CNI_MODE="standalone")
        assert run_plugin("ADD", conf, container_id="lost-1", netns=ns, env=env).status == 0
        dele = cni(sb, "DEL", conf, "lost-1", ns)
        assert dele.status == 0 and "path=standalone" in dele.stderr
        assert sb.leaks() == {}
    finally:
        stop.set()
        t.join(timeout=5)
        srv.close()


def test_log_file_from_config(sb, service, tmp_path):
    log = tmp_path / "logs" / "cni.log"
    conf = sb.conf(logFile=str(log), logLevel="debug")
    ns = sb.netns("log")
    assert cni(sb, "ADD", conf, "logged", ns).status == 0
    assert cni(sb, "ADD", dict(conf, mtu=1), "logged2", ns).error_code == 7
    text = log.read_text()
    assert "msg=attached" in text and "addresses allocated" in text and "level=error" in text
    assert cni(sb, "DEL", conf, "logged", ns).status == 0
