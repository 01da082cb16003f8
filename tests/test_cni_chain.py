"""Chaining: flowscope-cni followed by Debian's reference ``portmap`` and ``tuning`` in one conflist,
driven like libcni (each plugin gets the previous result as prevResult; DEL in reverse order)."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request

import pytest

from cni.install import build_conflist, shim_text, package_root
from cni.runtime import CNIRuntime, ConfList, PluginError, RuntimeConf
from cni.service import CNIService
from cni.testing import REFERENCE_PLUGINS, Sandbox, netns_exec

pytestmark = pytest.mark.root


@pytest.fixture
def sb(tmp_path):
    with Sandbox(tmp_path / "state") as s:
        yield s


@pytest.fixture
def bin_dir(tmp_path):
    """The plugin as `flowscope cni install` writes it."""
    d = tmp_path / "bin"
    d.mkdir()
    p = d / "flowscope-cni"
    import sys

    p.write_text(shim_text(sys.executable, package_root()))
    p.chmod(0o755)
    return d


def nat_rules_for(container_id: str) -> list[str]:
    out = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if container_id in line]


def wait_http(url: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0"])
def test_portmap_and_tuning_chained_after_flowscope(sb, bin_dir, version, tmp_path):
    cl_obj = build_conflist(f"chain{sb.tag}", ["10.216.0.0/24"], 1500, ["portmap", "tuning"], version)
    cl_obj["plugins"][0]["hostIfPrefix"] = sb.if_prefix
    cl_obj["plugins"][2]["sysctl"] = {"net.core.somaxconn": "321"}
    cl = ConfList.from_obj(cl_obj)
    rt = CNIRuntime([str(bin_dir), REFERENCE_PLUGINS], env=sb.env())
    ns = sb.netns("web")
    host_port = 20000 + int(sb.tag, 16) % 20000
    cid = f"chain-{sb.tag}-{version.replace('.', '')}"
    conf = RuntimeConf(cid, ns, args=[("IgnoreUnknown", "1"), ("K8S_POD_NAME", "web-1")],
                       capability_args={"portMappings": [{"hostPort": host_port, "containerPort": 8080,
                                                          "protocol": "tcp"}]})
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "index.html").write_text("served from the pod\n")
    with CNIService(sb.state_dir):
        result = rt.add(cl, conf)
        try:
            # the final result still describes our interfaces (portmap and tuning pass it through)
            assert result["cniVersion"] == version
            assert [i["name"] for i in result["interfaces"]][1] == "eth0"
            pod_ip = result["ips"][0]["address"].split("/")[0]
            # tuning applied its sysctl inside the pod
            name = os.path.basename(ns)
            assert netns_exec(name, ["sysctl", "-n", "net.core.somaxconn"]).stdout.strip() == "321"
            # portmap: the host port reaches the server in the pod (through the host veth we reported)
            assert nat_rules_for(cid)
            server = subprocess.Popen(["ip", "netns", "exec", name, "python3", "-m", "http.server", "8080",
                                       "--bind", "0.0.0.0", "--directory", str(tmp_path / "www")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                assert wait_http(f"http://{pod_ip}:8080/") == "served from the pod\n"
                assert wait_http(f"http://127.0.0.1:{host_port}/") == "served from the pod\n"
            finally:
                server.kill()
                server.wait(timeout=5)
            # CHECK with the cached result. Debian's portmap 1.1.1 cannot pass its own CHECK (it looks for IPv4
            # rules in ip6tables: containernetworking/plugins#819), so it is left out of the CHECK pass.
            rt.check(ConfList(cl.cni_version, cl.name, [p for p in cl.plugins if p["type"] != "portmap"]), conf)
        finally:
            rt.delete(cl, conf)
    assert nat_rules_for(cid) == []
    assert sb.leaks() == {}


def test_chain_failure_reports_the_failing_plugin(sb, bin_dir):
    """A 1.1.0 list with Debian's 1.0.0-only portmap (what `flowscope cni install` avoids by negotiating
    the version): our ADD succeeds, portmap refuses with code 1, and our DEL cleans up our part."""
    cl_obj = build_conflist(f"bad{sb.tag}", ["10.217.0.0/24"], 1500, ["portmap"], "1.1.0")
    cl_obj["plugins"][0]["hostIfPrefix"] = sb.if_prefix
    cl = ConfList.from_obj(cl_obj)
    rt = CNIRuntime([str(bin_dir), REFERENCE_PLUGINS], env=sb.env())
    ns = sb.netns("x")
    conf = RuntimeConf(f"bad-{sb.tag}", ns)
    with pytest.raises(PluginError) as ei:
        rt.add(cl, conf)
    assert ei.value.plugin == "portmap" and ei.value.code == 1
    assert sb.host_links()  # our part had been done
    with pytest.raises(PluginError) as ei:
        rt.delete(cl, conf)  # the runtime's DEL meets the same refusal from portmap ...
    assert ei.value.plugin == "portmap"
    rt.delete(ConfList(cl.cni_version, cl.name, cl.plugins[:1]), conf)  # ... ours succeeds
    assert sb.leaks() == {}
