"""IP address management: the built-in host-local-style allocator, or delegation to an IPAM plugin.

``ipam.type`` absent or ``flowscope-ipam`` selects the built-in allocator (:mod:`cni.ipam_config` +
:mod:`cni.ipam_store`); any other name is an IPAM plugin run from ``CNI_PATH`` (e.g. ``host-local``).
Both give the same :class:`IPAMResult`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from cni import errors as E
from cni.config import NetConf
from cni.delegate import exec_plugin, find_plugin, supported_versions
from cni.errors import CNIError
from cni.ipam_config import IPAMConfig, parse_ipam_config, pick
from cni.ipam_store import IPStore
from cni.versions import normalize_result


@dataclass(frozen=True)
class Address:
    ip: str          # plain address
    prefixlen: int   # of the subnet the IPAM took it from
    gateway: str = ""

    @property
    def version(self) -> int:
        return 6 if ":" in self.ip else 4


@dataclass
class IPAMResult:
    addresses: list[Address] = field(default_factory=list)
    routes: list[dict] = field(default_factory=list)
    dns: dict = field(default_factory=dict)


class BuiltinIPAM:
    def __init__(self, conf: NetConf, state_dir: Path):
        self.cfg: IPAMConfig = parse_ipam_config(conf.ipam)
        data_dir = Path(self.cfg.data_dir) if self.cfg.data_dir else Path(state_dir) / "ipam"
        self.store = IPStore(data_dir, conf.name)
        self.network = conf.name

    def add(self, container_id: str, ifname: str, requested: list[str], env: Mapping[str, str]) -> IPAMResult:
        cfg = self.cfg
        wanted = [ipaddress.ip_address(a) for a in requested]
        for ip in wanted:
            if cfg.range_set_index(ip) is None:
                raise CNIError(E.IPAM_FAILURE, f"requested IP address {ip} is not in any range of network "
                               f"{self.network}", "ranges: " + "; ".join(str(rs) for rs in cfg.range_sets))
        got: list[Address] = []
        with self.store.locked() as st:
            existing = st.owned_by(container_id, ifname)
            if existing:
                raise CNIError(E.IPAM_FAILURE, f"{container_id}/{ifname} already has addresses in network "
                               f"{self.network}", f"{', '.join(map(str, existing))}; call DEL first")
            taken = st.taken()
            reserved_now = []
            try:
                for idx, rs in enumerate(cfg.range_sets):
                    mine = [ip for ip in wanted if rs.contains(ip)]
                    if mine:
                        ip = mine[0]
                        if ip in taken or cfg.excluded(ip) or not st.reserve(ip, container_id, ifname, None):
                            raise CNIError(E.IPAM_FAILURE, f"requested IP address {ip} is not available",
                                           f"it is reserved or in use in network {self.network}")
                    else:
                        ip = pick(rs, st.last_reserved(idx), lambda a: a in taken or cfg.excluded(a))
                        while ip is not None and not st.reserve(ip, container_id, ifname, idx):
                            taken.add(ip)  # appeared since listing (not possible under the lock, but be safe)
                            ip = pick(rs, ip, lambda a: a in taken or cfg.excluded(a))
                        if ip is None:
                            raise CNIError(E.IPAM_EXHAUSTED, "no IP addresses available in range set",
                                           f"network {self.network}, range set {rs}: all addresses are in use")
                    reserved_now.append(ip)
                    r = rs.range_of(ip)
                    got.append(Address(str(ip), r.subnet.prefixlen, str(r.gateway) if r.gateway else ""))
            except BaseException:
                for ip in reserved_now:
                    st.release(ip)
                raise
        return IPAMResult(got, [dict(r) for r in cfg.routes], {})

    def delete(self, container_id: str, ifname: str, env: Mapping[str, str]) -> list[str]:
        with self.store.locked() as st:
            return [str(ip) for ip in st.release_by_id(container_id, ifname)]

    def check(self, container_id: str, ifname: str, ips: list[str], env: Mapping[str, str]) -> None:
        with self.store.locked() as st:
            have = {str(ip) for ip in st.owned_by(container_id, ifname)}
        if have != set(ips):
            raise CNIError(E.CHECK_FAILED, "IPAM reservations do not match prevResult",
                           f"reserved {sorted(have)}, prevResult has {sorted(ips)}")

    def gc(self, valid: set[tuple[str, str]], env: Mapping[str, str],
           protected: Callable[[str, str], bool] = lambda c, i: False) -> list[str]:
        """Release reservations of attachments that are neither valid nor ``protected`` (an ADD in flight:
        it records its attachment before reserving, and this check runs under the IPAM lock)."""
        released = []
        with self.store.locked() as st:
            for ip, cid, ifn in st.all():
                if (cid, ifn) not in valid and not protected(cid, ifn) and st.release(ip):
                    released.append(f"{ip} ({cid}/{ifn})")
        return released

    def ready(self, env: Mapping[str, str]) -> None:
        with self.store.locked() as st:
            taken = st.taken()
            for idx, rs in enumerate(self.cfg.range_sets):
                if pick(rs, st.last_reserved(idx), lambda a: a in taken or self.cfg.excluded(a)) is None:
                    raise CNIError(E.NOT_AVAILABLE, "no IP addresses available",
                                   f"network {self.network}: range set {rs} is exhausted")


class DelegatedIPAM:
    """Runs the IPAM plugin named in ``ipam.type`` with the caller's environment, as libcni does."""

    def __init__(self, conf: NetConf, cni_path: list[str]):
        self.conf = conf
        self.plugin = find_plugin(conf.ipam_type, cni_path)

    def _conf(self) -> dict:
        raw = dict(self.conf.raw)
        raw.pop("prevResult", None)
        return raw

    @staticmethod
    def _env(env: Mapping[str, str], container_id: str, ifname: str) -> dict:
        e = dict(env)
        e["CNI_CONTAINERID"] = container_id
        e["CNI_IFNAME"] = ifname
        return e

    def add(self, container_id: str, ifname: str, requested: list[str], env: Mapping[str, str]) -> IPAMResult:
        out = exec_plugin(self.plugin, "ADD", self._env(env, container_id, ifname), self._conf())
        try:
            res = normalize_result(out)
        except ValueError as e:
            raise CNIError(E.DECODE_FAILURE, f"{self.conf.ipam_type} returned an invalid result", str(e)) from None
        addrs = []
        for ip in res["ips"]:
            try:
                itf = ipaddress.ip_interface(ip["address"])
            except ValueError:
                raise CNIError(E.DECODE_FAILURE, f"{self.conf.ipam_type} returned an invalid address",
                               repr(ip["address"])) from None
            addrs.append(Address(str(itf.ip), itf.network.prefixlen, ip.get("gateway") or ""))
        if not addrs:
            raise CNIError(E.IPAM_FAILURE, f"{self.conf.ipam_type} returned no addresses", "")
        return IPAMResult(addrs, [dict(r) for r in res["routes"]], res.get("dns") or {})

    def delete(self, container_id: str, ifname: str, env: Mapping[str, str]) -> list[str]:
        exec_plugin(self.plugin, "DEL", self._env(env, container_id, ifname), self._conf())
        return []

    def check(self, container_id: str, ifname: str, ips: list[str], env: Mapping[str, str]) -> None:
        conf = self._conf()
        if self.conf.prev_result is not None:
            conf["prevResult"] = self.conf.prev_result
        exec_plugin(self.plugin, "CHECK", self._env(env, container_id, ifname), conf)

    def _speaks_11(self, env: Mapping[str, str]) -> bool:
        return "1.1.0" in supported_versions(self.plugin, env)

    def gc(self, valid: set[tuple[str, str]], env: Mapping[str, str],
           protected: Callable[[str, str], bool] = lambda c, i: False) -> list[str]:
        """Stale attachments are DELeted one by one by the caller; here the plugin's own GC, if it has one."""
        if self._speaks_11(env):
            conf = self._conf()
            conf["cni.dev/valid-attachments"] = [{"containerID": c, "ifname": i} for c, i in sorted(valid)]
            exec_plugin(self.plugin, "GC", env, conf)
        return []

    def ready(self, env: Mapping[str, str]) -> None:
        if self._speaks_11(env):
            exec_plugin(self.plugin, "STATUS", env, self._conf())


def ipam_for(conf: NetConf, state_dir: Path, cni_path: list[str]) -> BuiltinIPAM | DelegatedIPAM:
    if conf.builtin_ipam:
        return BuiltinIPAM(conf, state_dir)
    return DelegatedIPAM(conf, cni_path)
