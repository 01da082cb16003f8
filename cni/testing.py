"""Test and benchmark support: run the real plugin executable as runtimes do, in throwaway namespaces,
and report anything an attachment left behind.

Everything made here carries a per-session prefix and is removed by :meth:`Sandbox.close`
(also when a test fails).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

NETNS_DIR = Path("/var/run/netns")
PLUGIN_EXE = str(Path(sys.executable).with_name("flowscope-cni"))  # the console script next to python
REFERENCE_PLUGINS = "/usr/lib/cni"


@dataclass
class PluginRun:
    status: int
    stdout: str
    stderr: str

    @property
    def json(self) -> dict:
        return json.loads(self.stdout)

    @property
    def error_code(self) -> Optional[int]:
        if self.status == 0 or not self.stdout.strip():
            return None
        try:
            return json.loads(self.stdout).get("code")
        except ValueError:
            return None


def run_plugin(command: str, conf: dict | bytes | str, *, container_id: str = "", netns: str = "",
               ifname: str = "eth0", args: str = "", env: Optional[Mapping[str, str]] = None,
               exe: str = PLUGIN_EXE, cni_path: str = REFERENCE_PLUGINS, drop: tuple[str, ...] = (),
               timeout: float = 60) -> PluginRun:
    """One invocation of the plugin executable with CNI_* set (``drop`` removes variables)."""
    e = dict(os.environ if env is None else env)
    e.update(CNI_COMMAND=command, CNI_CONTAINERID=container_id, CNI_NETNS=netns, CNI_IFNAME=ifname,
             CNI_ARGS=args, CNI_PATH=cni_path)
    for k in drop:
        e.pop(k, None)
    data = conf if isinstance(conf, bytes) else (conf.encode() if isinstance(conf, str) else json.dumps(conf).encode())
    p = subprocess.run([exe], input=data, env=e, capture_output=True, timeout=timeout)
    return PluginRun(p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"))


def netns_exec(ns: str, cmd: list[str], timeout: float = 20, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=timeout,
                          check=check)


@dataclass
class Sandbox:
    """Namespaces, a state dir and a host-interface prefix for one test."""

    state_dir: Path
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    namespaces: list[str] = field(default_factory=list)

    @property
    def if_prefix(self) -> str:
        return "ft" + self.tag  # hostIfPrefix: host veths of this sandbox start with it

    def netns(self, name: str) -> str:
        """Create a namespace; returns its path (what runtimes pass in CNI_NETNS)."""
        ns = f"fsct-{self.tag}-{name}"
        subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
        self.namespaces.append(ns)
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], capture_output=True)
        return str(NETNS_DIR / ns)

    def remove_netns(self, path: str) -> None:
        name = os.path.basename(path)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)

    def conf(self, version: str = "1.1.0", name: str = "", subnets: tuple[str, ...] = ("10.201.0.0/24",),
             **extra) -> dict:
        """A network config for flowscope-cni with the built-in IPAM on ``subnets``."""
        c = {"cniVersion": version, "name": name or f"fsnet{self.tag}", "type": "flowscope-cni",
             "hostIfPrefix": self.if_prefix,
             "ipam": {"type": "flowscope-ipam", "ranges": [[{"subnet": s}] for s in subnets]}}
        c.update(extra)
        return c

    def env(self, **extra: str) -> dict:
        e = dict(os.environ)
        e["FLOWSCOPE_STATE_DIR"] = str(self.state_dir)
        e.update(extra)
        return e

    def host_links(self) -> list[str]:
        return sorted(n for n in os.listdir("/sys/class/net") if n.startswith(self.if_prefix))

    def leaks(self, network: str = "") -> dict[str, list[str]]:
        """What is still allocated: host veths, IP reservations, endpoint and attachment records."""
        out: dict[str, list[str]] = {"veths": self.host_links(), "reservations": [], "endpoints": [],
                                     "attachments": []}
        ipam = self.state_dir / "ipam"
        if ipam.exists():
            for net in os.listdir(ipam):
                if network and net != network:
                    continue
                for n in os.listdir(ipam / net):
                    if n[0].isdigit() or ":" in n:
                        out["reservations"].append(f"{net}/{n}")
        ep = self.state_dir / "endpoints"
        if ep.exists():
            out["endpoints"] = sorted(n for n in os.listdir(ep) if n.endswith(".json"))
        at = self.state_dir / "cni" / "attachments"
        if at.exists():
            for net in os.listdir(at):
                out["attachments"] += [f"{net}/{n}" for n in os.listdir(at / net) if n.endswith(".json")]
        return {k: v for k, v in out.items() if v}

    def close(self) -> None:
        for ns in self.namespaces:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces.clear()
        for name in self.host_links():
            subprocess.run(["ip", "link", "del", name], capture_output=True)
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
