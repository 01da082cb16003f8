"""A real container runtime puts containers on a Flowscope network: Debian's Podman 4 with its CNI
backend (runc), a project-local containers.conf/storage.conf, and a busybox image made with
``podman import``. The plugin is the one ``flowscope cni install`` writes.

Machine specifics handled here: crun refuses this host's hybrid cgroup layout (hugetlb is the only v2
controller) so the runtime is runc; the sandbox lacks CAP_SYS_RESOURCE, so container ulimits are kept
at or below the current hard limits. Podman 4.3's libcni cannot read 1.1.0 results, so the conflist is
installed with ``--cni-version 1.0.0``. Podman does not pass container labels to CNI plugins (it sets
K8S_POD_NAME to the container name and forwards CNI_ARGS from its environment), so labels travel in
CNI_ARGS ``FLOWSCOPE_LABELS``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import threading
import time

import pytest
from click.testing import CliRunner

from cni.install import cni_group
from cni.service import CNIService
from cni.testing import Sandbox
from flowscope.endpoints import EndpointStore

pytestmark = pytest.mark.root

BUSYBOX = "/bin/busybox"


def _limit(kind: int, want: int) -> str:
    soft, hard = resource.getrlimit(kind)
    n = want if hard == resource.RLIM_INFINITY else min(want, hard)
    return f"{n}:{n}"


class Podman:
    def __init__(self, root, sb: Sandbox):
        self.root = root
        self.sb = sb
        self.network = f"fspod{sb.tag}"
        self.image = f"localhost/fsbusybox:{sb.tag}"
        bin_dir, net_dir = root / "bin", root / "net.d"
        for d in ("bin", "net.d", "storage", "run", "tmp", "rootfs/bin", "rootfs/www"):
            (root / d).mkdir(parents=True, exist_ok=True)
        r = CliRunner().invoke(cni_group, ["install", "--bin-dir", str(bin_dir), "--conf-dir", str(net_dir),
                                           "--name", self.network, "--subnet", "10.218.0.0/24",
                                           "--cni-version", "1.0.0", "--state-dir", str(sb.state_dir)])
        assert r.exit_code == 0, r.output
        conflist = net_dir / f"10-{self.network}.conflist"
        obj = json.loads(conflist.read_text())
        obj["plugins"][0]["hostIfPrefix"] = sb.if_prefix  # so the sandbox can see what is left behind
        conflist.write_text(json.dumps(obj))
        (root / "containers.conf").write_text(f"""
[containers]
default_ulimits = ["nofile={_limit(resource.RLIMIT_NOFILE, 1024)}", "nproc={_limit(resource.RLIMIT_NPROC, 4096)}"]
[network]
network_backend = "cni"
cni_plugin_dirs = ["{bin_dir}", "/usr/lib/cni"]
network_config_dir = "{net_dir}"
default_network = "{self.network}"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "none"
tmp_dir = "{root / 'tmp'}"
""")
        (root / "storage.conf").write_text(f"""
[storage]
driver = "vfs"
graphroot = "{root / 'storage'}"
runroot = "{root / 'run'}"
""")
        self.env = dict(os.environ, CONTAINERS_CONF=str(root / "containers.conf"),
                        CONTAINERS_STORAGE_CONF=str(root / "storage.conf"))
        self.env.pop("FLOWSCOPE_STATE_DIR", None)  # the conflist's stateDir must be what counts

    def __call__(self, *args: str, env: dict | None = None, check: bool = True, timeout: float = 60):
        p = subprocess.run(["podman", *args], capture_output=True, text=True, env=env or self.env, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
        return p

    def make_image(self) -> None:
        rootfs = self.root / "rootfs"
        shutil.copy(BUSYBOX, rootfs / "bin" / "busybox")
        for tool in ("sh", "wget", "httpd", "ping", "sleep", "ip", "cat"):
            (rootfs / "bin" / tool).symlink_to("busybox")
        (rootfs / "www" / "index.html").write_text("hello from the api pod\n")
        tar = subprocess.run(["tar", "-C", str(rootfs), "-c", "."], capture_output=True, check=True).stdout
        p = subprocess.run(["podman", "import", "-q", "-", self.image], input=tar, capture_output=True,
                           env=self.env, timeout=60)
        assert p.returncode == 0, p.stderr.decode()

    def run(self, name: str, labels: dict[str, str], namespace: str, *cmd: str) -> str:
        cni_args = f"K8S_POD_NAMESPACE={namespace};FLOWSCOPE_LABELS=" + ",".join(f"{k}={v}" for k, v in labels.items())
        label_flags = [x for k, v in labels.items() for x in ("--label", f"{k}={v}")]
        p = self("run", "-d", "--name", name, *label_flags, "--network", self.network, self.image, *cmd,
                 env=dict(self.env, CNI_ARGS=cni_args))
        return p.stdout.strip()

    def cleanup(self) -> None:
        self("rm", "-f", "-t", "0", "--all", check=False)
        self("rmi", "-f", "--all", check=False)
        self("system", "reset", "-f", check=False, timeout=120)


@pytest.fixture
def podman(tmp_path):
    if shutil.which("podman") is None or shutil.which("runc") is None or not os.path.exists(BUSYBOX):
        pytest.skip("podman, runc and busybox-static are needed (scripts/setup.sh installs them)")
    with Sandbox(tmp_path / "state") as sb:
        pm = Podman(tmp_path / "podman", sb)
        try:
            pm.make_image()
            yield pm
        finally:
            pm.cleanup()


@pytest.mark.parametrize("with_agent", [True, False], ids=["agent", "no-agent"])
def test_podman_containers_on_a_flowscope_network(podman, with_agent):
    sb = podman.sb
    svc = CNIService(sb.state_dir).start() if with_agent else None
    try:
        api_id = podman.run("api", {"app": "api"}, "shop", "httpd", "-f", "-p", "8080", "-h", "/www")
        web_id = podman.run("web", {"app": "frontend", "tier": "web"}, "shop", "sleep", "300")
        store = EndpointStore(sb.state_dir)
        api, web = store.get(api_id, "eth0"), store.get(web_id, "eth0")
        assert api is not None and web is not None, os.listdir(sb.state_dir / "endpoints")
        assert (web.pod_name, web.namespace, web.labels) == ("web", "shop", {"app": "frontend", "tier": "web"})
        assert (api.pod_name, api.labels) == ("api", {"app": "api"})
        assert web.netns.startswith("/run/netns/") and web.host_ifname in sb.host_links()
        inspect = json.loads(podman("inspect", "web").stdout)[0]
        assert inspect["NetworkSettings"]["Networks"][podman.network]["IPAddress"] == web.ips[0]
        # the container reaches the server in the other pod, and the gateway on the host
        deadline = time.monotonic() + 10
        while True:
            # (no wget -T: Debian's busybox 1.35 wget crashes on it)
            got = podman("exec", "web", "wget", "-qO-", f"http://{api.ips[0]}:8080/", check=False, timeout=30)
            if got.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert got.stdout == "hello from the api pod\n", (got.returncode, got.stderr)
        assert podman("exec", "web", "ping", "-c", "1", "-W", "2", "169.254.1.1", check=False).returncode == 0
        # removing the containers DELs them: records, veths and addresses are gone
        podman("rm", "-f", "-t", "0", "web", "api")
        assert store.list() == []
        assert sb.leaks() == {}
    finally:
        if svc is not None:
            svc.stop()


class _Sink:
    """Stands where the agent's shipper stands and keeps the flows."""

    def __init__(self):
        self.flows: list = []
        self.lock = threading.Lock()
        self.stats = None

    def start(self):
        pass

    def put(self, flows):
        with self.lock:
            self.flows.extend(flows)

    def report_lost(self, source, n, cpu=None):
        pass

    def close(self, deadline_s: float = 0):
        pass


def _probe_attached(ifname: str) -> bool:
    out = subprocess.run(["tc", "filter", "show", "dev", ifname, "ingress"], capture_output=True, text=True).stdout
    return "bpf" in out


def test_podman_traffic_observed_with_pod_names_and_labels(podman):
    """The issue's end-to-end path: Podman -> flowscope-cni -> endpoint record -> the node agent attaches
    the probe to the host veth -> the container's flows carry its pod name, namespace and labels."""
    from probe.agent import Agent, AgentConfig

    sb = podman.sb
    sink = _Sink()
    agent = Agent(AgentConfig(state_dir=str(sb.state_dir), node_name="node-cni", update_interval=1.0,
                              drain_ms=20, l7=False), shipper=sink)
    runner = threading.Thread(target=agent.run, name="agent", daemon=True)
    agent.start()
    runner.start()
    try:
        api_id = podman.run("api", {"app": "api"}, "shop", "httpd", "-f", "-p", "8080", "-h", "/www")
        web_id = podman.run("web", {"app": "frontend"}, "shop", "sleep", "300")
        store = EndpointStore(sb.state_dir)
        api, web = store.get(api_id, "eth0"), store.get(web_id, "eth0")
        deadline = time.monotonic() + 15  # the agent looks for new endpoints every second
        while not (_probe_attached(api.host_ifname) and _probe_attached(web.host_ifname)):
            assert time.monotonic() < deadline, "the agent did not attach to the containers' host veths"
            time.sleep(0.2)
        got = podman("exec", "web", "wget", "-qO-", f"http://{api.ips[0]}:8080/", check=False, timeout=30)
        assert got.stdout == "hello from the api pod\n", (got.returncode, got.stderr)

        def conn_flows():
            with sink.lock:
                return [f for f in sink.flows if f.l4 and f.l4.TCP and 8080 in (f.l4.TCP.source_port,
                                                                                f.l4.TCP.destination_port)]

        deadline = time.monotonic() + 10
        while not any(f.source.pod_name == "web" for f in conn_flows()):
            assert time.monotonic() < deadline, f"no flow from the web container: {len(sink.flows)} flows"
            time.sleep(0.1)
        out = next(f for f in conn_flows() if f.source.pod_name == "web")
        assert out.IP.source == web.ips[0] and out.IP.destination == api.ips[0]
        assert out.source.namespace == "shop" and "k8s:app=frontend" in out.source.labels
        assert "k8s:io.kubernetes.pod.namespace=shop" in out.source.labels
        assert out.destination.pod_name == "api" and "k8s:app=api" in out.destination.labels
        assert out.source.ID == web.endpoint_id
    finally:
        agent.stop()
        runner.join(timeout=20)
        podman("rm", "-f", "-t", "0", "--all", check=False)
    assert not runner.is_alive()
    assert sb.leaks() == {}
