"""A tiny network lab: network namespaces joined to the host by veth pairs, routed like a CNI does.

Used by the demo, the tests and the benchmarks. Every namespace and link it makes carries a
per-lab prefix and is removed by :meth:`Lab.close` (also on exceptions, and by
:func:`cleanup_stale` for labs whose process died).

Topology of one endpoint (Cilium-like, routed, no bridge)::

    [netns <ns>]  eth0 10.x.y.z/32, default via 169.254.1.1      (fd00:x::z/128, default via fe80::1)
         |  veth
    [host]  <prefix><n>  169.254.1.1/32, fe80::1/64, route 10.x.y.z/32 -> <prefix><n>
"""

from __future__ import annotations

import ipaddress
import os
import random
import secrets
import shlex
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

GATEWAY_V4 = "169.254.1.1"
GATEWAY_V6 = "fe80::1"
LAB_PREFIX = "fsl"  # every lab's links and namespaces start with this


class LabError(RuntimeError):
    pass


def run(cmd: Sequence[str] | str, check: bool = True, ns: Optional[str] = None,
        capture: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    args = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    if ns:
        args = ["ip", "netns", "exec", ns] + args
    p = subprocess.run(args, capture_output=capture, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise LabError(f"{' '.join(args)} failed ({p.returncode}): {(p.stderr or '').strip()}")
    return p


def _sysctl_set(path: str, value: str) -> None:
    p = Path("/proc/sys") / path.replace(".", "/")
    try:
        if p.read_text().strip() != value:
            p.write_text(value)
    except OSError:
        pass


def enable_forwarding() -> None:
    """Routing between endpoints needs forwarding on the host (as with every routed CNI)."""
    _sysctl_set("net.ipv4.ip_forward", "1")
    _sysctl_set("net.ipv6.conf.all.forwarding", "1")


@dataclass
class LabEndpoint:
    name: str          # short name given by the caller, e.g. "client"
    netns: str         # namespace name (ip netns)
    host_if: str       # host-side veth
    ifindex: int       # host-side ifindex
    ipv4: str
    ipv6: Optional[str]
    mac: str = ""

    def exec(self, cmd: Sequence[str] | str, check: bool = True, timeout: float = 60,
             capture: bool = True) -> subprocess.CompletedProcess:
        return run(cmd, check=check, ns=self.netns, timeout=timeout, capture=capture)

    def popen(self, cmd: Sequence[str] | str, **kw) -> subprocess.Popen:
        args = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
        kw.setdefault("start_new_session", True)
        return subprocess.Popen(["ip", "netns", "exec", self.netns] + args, **kw)


@dataclass
class Lab:
    """A set of endpoints. Use as a context manager."""

    ipv6: bool = True
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    endpoints: list[LabEndpoint] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)
    subnet: int = field(default_factory=lambda: random.randint(64, 250))

    @property
    def prefix(self) -> str:
        return f"{LAB_PREFIX}{self.tag}"

    def __enter__(self) -> "Lab":
        if os.geteuid() != 0:
            raise LabError("the network lab needs root (network namespaces and veth pairs)")
        enable_forwarding()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(self, name: str) -> LabEndpoint:
        n = len(self.endpoints) + 1
        ns = f"{self.prefix}-{name}"
        host_if = f"{self.prefix}h{n}"
        peer = f"{self.prefix}p{n}"
        ipv4 = f"10.{self.subnet}.{int(self.tag[:2], 16) % 250}.{n + 1}"
        ipv6 = str(ipaddress.ip_address(f"fd00:{self.subnet:x}:{self.tag}::{n + 1:x}")) if self.ipv6 else None
        run(["ip", "netns", "add", ns])
        ep = LabEndpoint(name, ns, host_if, 0, ipv4, ipv6)
        self.endpoints.append(ep)
        run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", peer])
        run(["ip", "link", "set", peer, "netns", ns])
        run(["ip", "link", "set", peer, "name", "eth0"], ns=ns)
        run(["ip", "link", "set", "lo", "up"], ns=ns)
        run(["ip", "link", "set", "eth0", "up"], ns=ns)
        run(["ip", "addr", "add", f"{ipv4}/32", "dev", "eth0"], ns=ns)
        run(["ip", "route", "add", GATEWAY_V4, "dev", "eth0", "scope", "link"], ns=ns)
        run(["ip", "route", "add", "default", "via", GATEWAY_V4, "dev", "eth0"], ns=ns)
        run(["ip", "link", "set", host_if, "up"])
        run(["ip", "addr", "add", f"{GATEWAY_V4}/32", "dev", host_if])
        run(["ip", "route", "add", f"{ipv4}/32", "dev", host_if])
        if ipv6:
            run(["ip", "-6", "addr", "add", f"{ipv6}/128", "dev", "eth0", "nodad"], ns=ns)
            run(["ip", "-6", "addr", "add", f"{GATEWAY_V6}/64", "dev", host_if, "nodad"])
            run(["ip", "-6", "route", "add", "default", "via", GATEWAY_V6, "dev", "eth0"], ns=ns)
            run(["ip", "-6", "route", "add", f"{ipv6}/128", "dev", host_if])
        ep.ifindex = int(Path(f"/sys/class/net/{host_if}/ifindex").read_text())
        ep.mac = run(["cat", "/sys/class/net/eth0/address"], ns=ns).stdout.strip()
        return ep

    def spawn(self, ep: LabEndpoint, cmd: Sequence[str] | str, **kw) -> subprocess.Popen:
        """Start a long-running process in an endpoint; it is killed by close()."""
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        p = ep.popen(cmd, **kw)
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            _kill_group(p)
        self.procs.clear()
        for ep in self.endpoints:
            run(["ip", "link", "del", ep.host_if], check=False)
            kill_netns_pids(ep.netns)
            run(["ip", "netns", "del", ep.netns], check=False)
        self.endpoints.clear()


def _kill_group(p: subprocess.Popen) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            p.terminate()
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                p.kill()
            p.wait(timeout=5)


def kill_netns_pids(ns: str) -> None:
    p = run(["ip", "netns", "pids", ns], check=False)
    for pid in (p.stdout or "").split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def cleanup_stale(prefix: str = LAB_PREFIX) -> int:
    """Remove namespaces and links left by labs whose process died. Returns how many."""
    removed = 0
    for line in run(["ip", "netns", "list"], check=False).stdout.splitlines():
        ns = line.split()[0] if line.split() else ""
        if ns.startswith(prefix):
            kill_netns_pids(ns)
            run(["ip", "netns", "del", ns], check=False)
            removed += 1
    for name in os.listdir("/sys/class/net"):
        if name.startswith(prefix):
            run(["ip", "link", "del", name], check=False)
            removed += 1
    return removed
