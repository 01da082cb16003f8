"""The datapath plumbing of one attachment, over netlink (pyroute2), Cilium-style routed veth.

::

    [container netns]  <ifname>  10.x.y.z/32, fd00::z/128
                       route 169.254.1.1/32 dev <ifname> scope link
                       default via 169.254.1.1 (IPv6: default via fe80::1 dev <ifname>)
            | veth
    [host]  <prefix><hash>  169.254.1.1/32, fe80::1/64
            route 10.x.y.z/32 dev <prefix><hash>, fd00::z/128 dev <prefix><hash>

With ``linkLocalGateway: false`` the IPAM's gateway takes the place of 169.254.1.1 / fe80::1.
Host forwarding is switched on so pods reach each other through the host.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from cni import errors as E
from cni.errors import CNIError
from cni.ipam import Address

GATEWAY_V4 = "169.254.1.1"
GATEWAY_V6 = "fe80::1"
IFA_F_NODAD = 0x02
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_TABLE_MAIN = 254
AF_INET, AF_INET6 = 2, 10


def _netlink_error(what: str, e: Exception) -> CNIError:
    return CNIError(E.NETLINK_FAILURE, f"failed to {what}", str(e))


def link_index(ipr, name: str) -> Optional[int]:
    """Index of the link called ``name`` (a targeted RTM_GETLINK, not a dump of every link)."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        return ipr.link("get", ifname=name)[0]["index"]
    except NetlinkError as e:
        if e.code == 19:  # ENODEV
            return None
        raise


@dataclass
class Plumbed:
    host_ifname: str
    host_index: int
    host_mac: str
    cont_index: int
    cont_mac: str
    mtu: int
    gateways: dict[int, str] = field(default_factory=dict)   # IP version -> gateway used by the pod
    routes: list[dict] = field(default_factory=list)         # routes in the pod, result shape


def gateways_for(addrs: list[Address], link_local: bool) -> dict[int, str]:
    """The default gateway per IP version (pure)."""
    out: dict[int, str] = {}
    for a in addrs:
        if a.version in out:
            continue
        if link_local:
            out[a.version] = GATEWAY_V4 if a.version == 4 else GATEWAY_V6
        elif a.gateway:
            out[a.version] = a.gateway
        else:
            raise CNIError(E.INVALID_CONFIG, "invalid network configuration",
                           f"linkLocalGateway is false but the IPAM gave no gateway for {a.ip}")
    return out


def pod_routes(addrs: list[Address], gateways: dict[int, str], extra: list[dict]) -> list[dict]:
    """Routes to install in the pod, in result shape: defaults first, then the IPAM's (pure)."""
    routes = []
    have = set()
    for v in sorted(gateways):
        dst = "0.0.0.0/0" if v == 4 else "::/0"
        routes.append({"dst": dst, "gw": gateways[v]})
        have.add(dst)
    for r in extra:
        net = ipaddress.ip_network(r["dst"], strict=False)
        if str(net) in have or net.version not in gateways:
            continue
        routes.append({"dst": str(net), "gw": r.get("gw") or gateways[net.version]})
        have.add(str(net))
    return routes


def create(host, ns, ns_fd: int, host_ifname: str, ifname: str, mtu: int, mac: str) -> tuple[int, int]:
    """The veth pair, peer born inside the container namespace under its final name.

    Returns (host index, container index). CNIError(101) if either name is taken; nothing is left behind.
    """
    from pyroute2.netlink.exceptions import NetlinkError

    if link_index(ns, ifname) is not None:
        raise CNIError(E.INTERFACE_EXISTS, f"interface {ifname} already exists in the container",
                       "a previous ADD was not followed by DEL, or the runtime reused the interface name")
    if link_index(host, host_ifname) is not None:
        raise CNIError(E.INTERFACE_EXISTS, f"host interface {host_ifname} already exists",
                       "this container/interface is already attached (run DEL first)")
    peer = {"ifname": ifname, "net_ns_fd": ns_fd, "mtu": mtu}
    if mac:
        peer["address"] = mac
    try:
        host.link("add", ifname=host_ifname, kind="veth", mtu=mtu, peer=peer)
    except NetlinkError as e:
        if e.code == 17:
            raise CNIError(E.INTERFACE_EXISTS, "interface already exists",
                           f"{host_ifname} or {ifname} appeared concurrently") from None
        raise _netlink_error(f"create veth {host_ifname}", e) from None
    h = link_index(host, host_ifname)
    c = link_index(ns, ifname)
    if h is None or c is None:  # pragma: no cover - kernel created it a moment ago
        raise CNIError(E.NETLINK_FAILURE, "veth vanished after creation", f"{host_ifname}/{ifname}")
    return h, c


def _mac(ipr, index: int) -> str:
    return ipr.get_links(index)[0].get("IFLA_ADDRESS") or ""


def _link_scope(version: int) -> dict:
    """IPv4 on-link routes get scope link; IPv6 routes have no scopes."""
    return {"scope": RT_SCOPE_LINK} if version == 4 else {}


def configure(host, ns, host_index: int, cont_index: int, addrs: list[Address], gateways: dict[int, str],
              routes: list[dict]) -> None:
    """Addresses and routes on both sides; links up."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        ns.link("set", index=cont_index, state="up")
        host.link("set", index=host_index, state="up")
        for a in addrs:
            plen = 32 if a.version == 4 else 128
            flags = IFA_F_NODAD if a.version == 6 else 0
            ns.addr("add", index=cont_index, address=a.ip, prefixlen=plen, flags=flags)
        for v, gw in sorted(gateways.items()):
            gw_ip = ipaddress.ip_address(gw)
            if v == 4 or not gw_ip.is_link_local:
                plen = 32 if v == 4 else 128
                host.addr("add", index=host_index, address=gw, prefixlen=plen,
                          flags=IFA_F_NODAD if v == 6 else 0)
                ns.route("add", dst=f"{gw}/{plen}", oif=cont_index, **_link_scope(v))
            else:
                host.addr("add", index=host_index, address=gw, prefixlen=64, flags=IFA_F_NODAD)
        for r in routes:
            net = ipaddress.ip_network(r["dst"], strict=False)
            ns.route("add", dst=f"{net.network_address}/{net.prefixlen}", gateway=r["gw"], oif=cont_index)
        for a in addrs:
            plen = 32 if a.version == 4 else 128
            host.route("add", dst=f"{a.ip}/{plen}", oif=host_index, **_link_scope(a.version))
    except NetlinkError as e:
        raise _netlink_error("configure addresses and routes", e) from None


def plumb(host, ns, ns_fd: int, host_ifname: str, ifname: str, mtu: int, mac: str, addrs: list[Address],
          link_local_gateway: bool, extra_routes: list[dict]) -> Plumbed:
    gateways = gateways_for(addrs, link_local_gateway)
    routes = pod_routes(addrs, gateways, extra_routes)
    h, c = create(host, ns, ns_fd, host_ifname, ifname, mtu, mac)
    try:
        configure(host, ns, h, c, addrs, gateways, routes)
        return Plumbed(host_ifname, h, _mac(host, h), c, _mac(ns, c), mtu, gateways, routes)
    except BaseException:
        delete_link(host, host_ifname)
        raise


def delete_link(ipr, name: str) -> bool:
    """Remove a link by name (the veth peer goes with it); False if it was not there."""
    from pyroute2.netlink.exceptions import NetlinkError

    idx = link_index(ipr, name)
    if idx is None:
        return False
    try:
        ipr.link("del", index=idx)
    except NetlinkError as e:
        if e.code == 19:  # ENODEV: gone meanwhile
            return False
        raise _netlink_error(f"delete {name}", e) from None
    return True


def enable_forwarding(v6: bool) -> None:
    """net.ipv4.ip_forward=1 (and IPv6 forwarding): pods reach each other through the host."""
    keys = ["net/ipv4/ip_forward"] + (["net/ipv6/conf/all/forwarding"] if v6 else [])
    for k in keys:
        p = Path("/proc/sys") / k
        try:
            if p.read_text().strip() != "1":
                p.write_text("1")
        except OSError as e:
            raise CNIError(E.IO_FAILURE, f"cannot enable forwarding ({k.replace('/', '.')})", str(e)) from None


# ---- reading live state (CHECK) ---------------------------------------------------------------


@dataclass
class LinkState:
    index: int
    mac: str
    mtu: int
    up: bool
    addresses: set[str]            # "ip/prefixlen", link-local IPv6 excluded
    routes: set[tuple[str, str]]   # (dst cidr, gateway or "")


def read_link(ipr, name: str) -> Optional[LinkState]:
    idx = link_index(ipr, name)
    if idx is None:
        return None
    link = ipr.get_links(idx)[0]
    addrs = set()
    for m in ipr.get_addr(index=idx):
        a = m.get("IFA_ADDRESS")
        if a is None:
            continue
        ip = ipaddress.ip_address(a)
        if ip.version == 6 and ip.is_link_local:
            continue
        addrs.add(f"{ip}/{m['prefixlen']}")
    routes = set()
    for fam in (AF_INET, AF_INET6):
        for r in ipr.get_routes(family=fam, table=RT_TABLE_MAIN):
            if r.get("RTA_OIF") != idx:
                continue
            dst = r.get("RTA_DST")
            if dst is None:
                dst = "0.0.0.0" if fam == AF_INET else "::"
            net = ipaddress.ip_network(f"{dst}/{r['dst_len']}", strict=False)
            routes.add((str(net), r.get("RTA_GATEWAY") or ""))
    return LinkState(idx, link.get("IFLA_ADDRESS") or "", link.get("IFLA_MTU") or 0,
                     bool(link["flags"] & 1), addrs, routes)
