"""Built-in IPAM configuration and the allocation order, in host-local's format and semantics. Pure.

Config (the ``ipam`` object of the network config)::

    {"type": "flowscope-ipam",
     "ranges": [[{"subnet": "10.22.0.0/16", "rangeStart": "10.22.1.2", "rangeEnd": "10.22.1.254",
                  "gateway": "10.22.0.1"}],
                [{"subnet": "fd00:22::/64"}]],
     "subnet": "10.22.0.0/16",          # shorthand for one range set with one range
     "reserved": ["10.22.1.7", "10.22.1.16/29", "10.22.1.100-10.22.1.110"],
     "routes": [{"dst": "10.96.0.0/12"}],
     "dataDir": "/var/run/flowscope/ipam"}

Each range set yields one address per attachment (one IPv4 set + one IPv6 set = dual stack).
A range defaults to the subnet without its network address (and broadcast for IPv4); the gateway
defaults to the subnet's first address, and is never handed out. Allocation is round-robin: it starts
after the last address reserved in that range set and wraps around.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

from cni import errors as E
from cni.errors import CNIError

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def _bad(details: str) -> CNIError:
    return CNIError(E.INVALID_CONFIG, "invalid IPAM configuration", details)


@dataclass(frozen=True)
class Range:
    subnet: IPNetwork
    start: IPAddress
    end: IPAddress
    gateway: Optional[IPAddress]

    def contains(self, ip: IPAddress) -> bool:
        return ip.version == self.subnet.version and self.start <= ip <= self.end

    @property
    def size(self) -> int:
        return int(self.end) - int(self.start) + 1

    def __str__(self) -> str:
        return f"{self.start}-{self.end}"


@dataclass(frozen=True)
class RangeSet:
    ranges: tuple[Range, ...]

    @property
    def version(self) -> int:
        return self.ranges[0].subnet.version

    def contains(self, ip: IPAddress) -> bool:
        return any(r.contains(ip) for r in self.ranges)

    def range_of(self, ip: IPAddress) -> Optional[Range]:
        for r in self.ranges:
            if r.contains(ip):
                return r
        return None

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.ranges)


@dataclass(frozen=True)
class Reserved:
    """Addresses never handed out: an inclusive [first, last] interval."""

    first: IPAddress
    last: IPAddress

    def contains(self, ip: IPAddress) -> bool:
        return ip.version == self.first.version and self.first <= ip <= self.last


@dataclass(frozen=True)
class IPAMConfig:
    range_sets: tuple[RangeSet, ...]
    routes: tuple[dict, ...] = ()
    reserved: tuple[Reserved, ...] = ()
    data_dir: str = ""

    def excluded(self, ip: IPAddress) -> bool:
        """Gateways and reserved addresses are never allocated."""
        for rs in self.range_sets:
            for r in rs.ranges:
                if r.gateway == ip:
                    return True
        return any(x.contains(ip) for x in self.reserved)

    def range_set_index(self, ip: IPAddress) -> Optional[int]:
        for i, rs in enumerate(self.range_sets):
            if rs.contains(ip):
                return i
        return None


def _ip(v: object, what: str) -> IPAddress:
    if not isinstance(v, str):
        raise _bad(f"{what} must be a string")
    try:
        return ipaddress.ip_address(v)
    except ValueError:
        raise _bad(f"{what} {v!r} is not an IP address") from None


def _parse_range(obj: object, where: str) -> Range:
    if not isinstance(obj, dict):
        raise _bad(f"{where} must be an object")
    sub = obj.get("subnet")
    if not isinstance(sub, str):
        raise _bad(f"{where}: \"subnet\" is required")
    try:
        net = ipaddress.ip_network(sub, strict=False)
    except ValueError:
        raise _bad(f"{where}: subnet {sub!r} is not a CIDR") from None
    if net.num_addresses < 4:
        raise _bad(f"{where}: subnet {net} is too small (needs at least 4 addresses)")
    first_host = net.network_address + 1
    last_host = net.broadcast_address - 1 if net.version == 4 else net.broadcast_address
    start = _ip(obj["rangeStart"], f"{where}.rangeStart") if obj.get("rangeStart") else first_host
    end = _ip(obj["rangeEnd"], f"{where}.rangeEnd") if obj.get("rangeEnd") else last_host
    for name, a in (("rangeStart", start), ("rangeEnd", end)):
        if a.version != net.version or not first_host <= a <= last_host:
            raise _bad(f"{where}: {name} {a} is not a host address of {net}")
    if start > end:
        raise _bad(f"{where}: rangeStart {start} is after rangeEnd {end}")
    gw = _ip(obj["gateway"], f"{where}.gateway") if obj.get("gateway") else first_host
    if gw not in net:
        raise _bad(f"{where}: gateway {gw} is not in {net}")
    return Range(net, start, end, gw)


def _parse_reserved(v: object) -> Reserved:
    if not isinstance(v, str):
        raise _bad("reserved entries must be strings")
    try:
        if "-" in v:
            a, b = (ipaddress.ip_address(x.strip()) for x in v.split("-", 1))
            if a.version != b.version or a > b:
                raise ValueError
            return Reserved(a, b)
        if "/" in v:
            n = ipaddress.ip_network(v, strict=False)
            return Reserved(n.network_address, n.broadcast_address)
        a = ipaddress.ip_address(v)
        return Reserved(a, a)
    except ValueError:
        raise _bad(f"reserved entry {v!r} is not an IP, a CIDR or a first-last range") from None


def parse_ipam_config(ipam: dict) -> IPAMConfig:
    if not isinstance(ipam, dict):
        raise _bad('"ipam" must be an object')
    raw_sets = ipam.get("ranges")
    if raw_sets is None and ipam.get("subnet"):
        raw_sets = [[{k: ipam[k] for k in ("subnet", "rangeStart", "rangeEnd", "gateway") if k in ipam}]]
    if not raw_sets:
        raise _bad('built-in IPAM needs "ranges" (or "subnet")')
    if not isinstance(raw_sets, list) or not all(isinstance(s, list) and s for s in raw_sets):
        raise _bad('"ranges" must be a list of non-empty lists of ranges')
    sets = []
    for i, raw in enumerate(raw_sets):
        rs = RangeSet(tuple(_parse_range(r, f"ranges[{i}][{j}]") for j, r in enumerate(raw)))
        if len({r.subnet.version for r in rs.ranges}) != 1:
            raise _bad(f"ranges[{i}] mixes IPv4 and IPv6")
        sets.append(rs)
    all_ranges = [(i, r) for i, rs in enumerate(sets) for r in rs.ranges]
    for a in range(len(all_ranges)):
        for b in range(a + 1, len(all_ranges)):
            ra, rb = all_ranges[a][1], all_ranges[b][1]
            if ra.subnet.version == rb.subnet.version and ra.start <= rb.end and rb.start <= ra.end:
                raise _bad(f"ranges {ra} and {rb} overlap")
    routes = ipam.get("routes") or []
    if not isinstance(routes, list):
        raise _bad('"routes" must be a list')
    for r in routes:
        if not isinstance(r, dict) or not isinstance(r.get("dst"), str):
            raise _bad('each route needs a "dst"')
        try:
            ipaddress.ip_network(r["dst"], strict=False)
            if r.get("gw"):
                ipaddress.ip_address(r["gw"])
        except ValueError:
            raise _bad(f"route {r} has an invalid dst or gw") from None
    reserved = ipam.get("reserved") or []
    if not isinstance(reserved, list):
        raise _bad('"reserved" must be a list')
    data_dir = ipam.get("dataDir") or ""
    if not isinstance(data_dir, str):
        raise _bad('"dataDir" must be a path')
    return IPAMConfig(tuple(sets), tuple(dict(r) for r in routes),
                      tuple(_parse_reserved(v) for v in reserved), data_dir)


def candidates(rs: RangeSet, last: Optional[IPAddress]) -> Iterator[IPAddress]:
    """Every address of the range set once, starting after ``last`` (round-robin) and wrapping around."""
    ranges = rs.ranges
    ri, first = 0, ranges[0].start
    if last is not None:
        for i, r in enumerate(ranges):
            if r.contains(last):
                ri, first = (i, last + 1) if last < r.end else ((i + 1) % len(ranges), None)
                break
    if first is None:
        first = ranges[ri].start
    # from `first` to the end of its range, the other ranges in order, then the start of the first one
    cur = first
    while cur <= ranges[ri].end:
        yield cur
        cur += 1
    for k in range(1, len(ranges)):
        r = ranges[(ri + k) % len(ranges)]
        cur = r.start
        while cur <= r.end:
            yield cur
            cur += 1
    cur = ranges[ri].start
    while cur < first:
        yield cur
        cur += 1


def pick(rs: RangeSet, last: Optional[IPAddress], unavailable: Callable[[IPAddress], bool]) -> Optional[IPAddress]:
    """The next free address in round-robin order, or None when the range set is exhausted."""
    for ip in candidates(rs, last):
        if not unavailable(ip):
            return ip
    return None
