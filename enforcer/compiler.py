"""Compile policies and endpoints into the kernel's view, as plain data (no I/O).

Input: validated policies (``enforcer.policy``), the endpoints with their labels, IPs and identities
(:class:`EndpointInfo`; ``local`` ones get enforcement), the node's own addresses, the global audit
flag. Output: :class:`CompiledPolicy`, which the datapath loads into BPF maps and ``enforcer.decide``
evaluates in Python with exactly the kernel's lookups.

The kernel's view
-----------------
``endpoints``
    per local endpoint: identity, ifindex, IPs and flags (``FLAG_*``): ingress/egress under policy
    (default deny from an enforcing policy), under audit-only policy (default deny only from audit-mode
    policies), has deny entries, endpoint audit mode (global audit).
``ipcache``
    prefix -> identity for an LPM trie: endpoint addresses (/32, /128), the node's addresses (host, 1),
    every prefix named by a policy (``cidr``, ``except``) with its CIDR identity, and ``0.0.0.0/0`` and
    ``::/0`` -> world (2) so every lookup hits. Endpoint and host addresses win over an equal CIDR
    prefix (CIDR rules do not select cluster endpoints or the host, as in Cilium).
``entries``
    :class:`PolicyEntry`: key ``(endpoint identity, direction, deny, peer identity, protocol, port,
    port prefix length)``, value ``(audit, policy id, match type)``. ``peer`` 0 is "any peer",
    ``proto`` 0 "any protocol" (then port 0/0).
``policies``
    policy id -> (name, namespace, revision, kind) for the flows' ``*_allowed_by`` / ``*_denied_by``.

Lookups per *new* connection (replies and established flows are passed by connection tracking)
------------------------------------------------------------------------------------------------
Four levels, in Cilium's order::

    A  (peer, proto, port)      L3+L4    LPM on the port: also (peer, proto, any port)
    B  (any,  proto, port)      L4-only  LPM on the port
    C  (peer, any)              L3-only
    D  (any,  any)              allow-all / deny-all

Deny and allow entries are separate (``deny`` is part of the key), which keeps the compiled size linear
in the rules (no cross product between levels is ever needed):

1. if the endpoint has deny entries in this direction, walk the deny levels A..D, stopping at the
   first enforcing deny (an audit-mode deny is remembered and the walk goes on);
2. if the direction is under policy, walk the allow levels A..D, stopping at the first enforcing allow
   (an audit-mode allow is remembered).

So at most 8 LPM lookups, usually 1-4. ``enforcer.decide`` turns the result into a verdict.

A key layout for the BPF LPM trie (``prefixlen`` = 96 fixed bits + ``prefix_len``)::

    struct policy_key {
        __u32  prefixlen;
        __u32  endpoint;   /* local endpoint identity */
        __u8   direction;  /* 0 ingress, 1 egress */
        __u8   deny;       /* 1: deny table */
        __u8   proto;      /* 0: any protocol (then port prefix 0) */
        __u8   pad;
        __u32  peer;       /* 0: any peer */
        __be16 port;       /* big-endian, so the prefix bits are the port's high bits */
    };
    struct policy_value { __u32 policy_id; __u8 audit; __u8 match_type; };

Port ranges: LPM blocks
-----------------------
The port is the last 16 bits of the LPM key, so ``port`` + ``prefix_len`` (0..16) is an aligned block
of ports; ``prefix_len`` 0 is every port. A range ``lo-hi`` is cut into the fewest aligned blocks (at
most 30 = 2*16-2; 1 for a single port or any port). Within one ``(endpoint, direction, deny, peer,
proto)`` group the rules' ranges are first split into disjoint intervals, each carrying the best rule
(enforcing before audit, then lowest policy id), adjacent equal intervals merged, then cut into
blocks: blocks never overlap, so the LPM lookup returns the one block that holds the port.

Size bound: entries <= sum over rules of (selected local identities) x (peer identities, or 1 for any)
x (port alternatives) x 30; in practice one entry per (subject, peer, port). ``max_entries`` caps it
(:class:`CompileError`) so a map is never half loaded. 1,000 rules: see ``bench/policy_compile.py``.

Identity numbers stay stable across compiles when ``previous`` is given (policy ids and CIDR
identities are reused), so a policy change rewrites only the map entries that really changed;
``revision`` increases only when the compiled content (``digest``) changes.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import ipaddress
from enum import IntEnum
from typing import Any, Iterable, Mapping, Optional, Sequence

import msgspec

from flowscope import schema

from .identity import (FIRST_LOCAL_IDENTITY, IDENTITY_HOST, IDENTITY_WORLD, LOCAL_IDENTITY_FLAG, MAX_LOCAL_IDENTITY,
                       RESERVED_IDENTITIES, canonical_labels, cidr_labels, endpoint_labels)
from .policy import KIND_CNP, Policy, PolicySpec, _PeerRule
from .selector import Labels, SelectorCache, namespaced_peer, namespaced_subject

ANY = 0
DEFAULT_MAX_ENTRIES = 1 << 18


class Direction(IntEnum):
    INGRESS = 0
    EGRESS = 1

    @property
    def key(self) -> str:
        return "ingress" if self is Direction.INGRESS else "egress"

    @classmethod
    def parse(cls, value: Any) -> "Direction":
        if isinstance(value, Direction):
            return value
        if isinstance(value, schema.TrafficDirection):
            value = value.value
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
            return cls(value)
        raise ValueError(f"{value!r} is not a direction (ingress, egress)")


class Proto(IntEnum):
    ANY = 0
    ICMP = 1
    TCP = 6
    UDP = 17
    ICMPV6 = 58
    SCTP = 132

    @classmethod
    def parse(cls, value: Any) -> int:
        """A protocol number from a number or a name (``tcp``, ``ICMPv6``)."""
        if isinstance(value, int) and not isinstance(value, bool):
            if 0 <= value <= 255:
                return int(value)
        elif isinstance(value, str):
            if value.isdigit() and int(value) <= 255:
                return int(value)
            try:
                return int(cls[value.upper()])
            except KeyError:
                pass
        raise ValueError(f"{value!r} is not a protocol (tcp, udp, icmp, icmpv6, sctp or 0-255)")


class MatchType(IntEnum):
    """Hubble's ``policy_match_type``."""

    NONE = 0
    L3_ONLY = 1
    L3_L4 = 2
    L4_ONLY = 3
    ALL = 4


def match_type_of(peer: int, proto: int) -> MatchType:
    if peer != ANY:
        return MatchType.L3_L4 if proto != ANY else MatchType.L3_ONLY
    return MatchType.L4_ONLY if proto != ANY else MatchType.ALL


# Endpoint flags (one byte in the kernel's endpoint map).
FLAG_INGRESS_POLICY = 1 << 0
FLAG_EGRESS_POLICY = 1 << 1
FLAG_INGRESS_AUDIT_POLICY = 1 << 2
FLAG_EGRESS_AUDIT_POLICY = 1 << 3
FLAG_INGRESS_DENY = 1 << 4
FLAG_EGRESS_DENY = 1 << 5
FLAG_AUDIT = 1 << 6


def flag_policy(d: Direction) -> int:
    return FLAG_INGRESS_POLICY if d == Direction.INGRESS else FLAG_EGRESS_POLICY


def flag_audit_policy(d: Direction) -> int:
    return FLAG_INGRESS_AUDIT_POLICY if d == Direction.INGRESS else FLAG_EGRESS_AUDIT_POLICY


def flag_deny(d: Direction) -> int:
    return FLAG_INGRESS_DENY if d == Direction.INGRESS else FLAG_EGRESS_DENY


class CompileError(ValueError):
    """Inconsistent input (two label sets for one identity, one address on two identities, ...) or a
    result beyond ``max_entries``."""


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class EndpointInfo(msgspec.Struct, frozen=True, kw_only=True):
    """An endpoint as the compiler needs it. ``labels`` are the identity's labels (canonical strings,
    see ``enforcer.identity.endpoint_labels``); ``local`` endpoints are enforced on this node."""

    identity: int
    labels: tuple[str, ...]
    ips: tuple[str, ...] = ()
    name: str = ""
    ifindex: int = 0
    local: bool = True

    @classmethod
    def from_record(cls, rec: Any, identity: Optional[int] = None, *, local: bool = True) -> "EndpointInfo":
        """From ``flowscope.endpoints.EndpointRecord`` (identity from the record unless given)."""
        ips = tuple(str(ipaddress.ip_interface(a).ip) for a in rec.ips)
        name = f"{rec.namespace}/{rec.pod_name}" if rec.pod_name else rec.container_id
        return cls(identity=identity if identity is not None else rec.identity,
                   labels=endpoint_labels(rec.namespace, rec.labels), ips=ips, name=name,
                   ifindex=rec.host_ifindex, local=local)


class EndpointEntry(msgspec.Struct, frozen=True):
    identity: int
    flags: int
    ips: tuple[str, ...] = ()
    name: str = ""
    ifindex: int = 0


class IPCacheEntry(msgspec.Struct, frozen=True, array_like=True):
    prefix: str
    identity: int


class PolicyEntry(msgspec.Struct, frozen=True, array_like=True):
    endpoint: int
    direction: int
    deny: bool
    peer: int
    proto: int
    port: int
    prefix_len: int
    audit: bool
    policy_id: int
    match_type: int

    @property
    def key(self) -> tuple[int, int, bool, int, int, int, int]:
        return (self.endpoint, self.direction, self.deny, self.peer, self.proto, self.port, self.prefix_len)

    @property
    def port_range(self) -> tuple[int, int]:
        size = 1 << (16 - self.prefix_len)
        return self.port, self.port + size - 1


class PolicyRef(msgspec.Struct, frozen=True):
    id: int
    name: str
    namespace: str = ""
    revision: int = 0
    kind: str = KIND_CNP

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    def to_flow(self) -> schema.Policy:
        """As Hubble reports it in ``*_allowed_by`` / ``*_denied_by``."""
        labels = [f"k8s:io.cilium.k8s.policy.derived-from={self.kind}", f"k8s:io.cilium.k8s.policy.name={self.name}"]
        if self.namespace:
            labels.append(f"k8s:io.cilium.k8s.policy.namespace={self.namespace}")
        return schema.Policy(name=self.name, namespace=self.namespace, labels=sorted(labels),
                             revision=self.revision, kind=self.kind)


class CompiledPolicy(msgspec.Struct, dict=True):
    """Everything the kernel needs, plus what flows need to name identities and policies."""

    revision: int
    digest: str
    global_audit: bool
    endpoints: tuple[EndpointEntry, ...]
    ipcache: tuple[IPCacheEntry, ...]
    entries: tuple[PolicyEntry, ...]
    policies: tuple[PolicyRef, ...]
    identities: dict[int, tuple[str, ...]]
    cidr_identities: dict[str, int]

    def policy(self, policy_id: int) -> Optional[PolicyRef]:
        refs = self.__dict__.get("_refs")
        if refs is None:
            refs = self.__dict__["_refs"] = {p.id: p for p in self.policies}
        return refs.get(policy_id)

    def stats(self) -> dict[str, int]:
        return {
            "endpoints": len(self.endpoints),
            "ipcache": len(self.ipcache),
            "entries": len(self.entries),
            "deny_entries": sum(1 for e in self.entries if e.deny),
            "policies": len(self.policies),
            "identities": len(self.identities),
        }

    def to_json(self) -> bytes:
        return msgspec.json.encode(self)

    @classmethod
    def from_json(cls, data: bytes | str) -> "CompiledPolicy":
        return msgspec.json.decode(data, type=cls)


# --------------------------------------------------------------------------------------------
# Helpers shared with enforcer.decide
# --------------------------------------------------------------------------------------------


def assign_policy_ids(policies: Sequence[Policy], previous: Optional[CompiledPolicy] = None) -> dict[tuple[str, str], int]:
    """Policy ids: kept from ``previous`` for the same (namespace, name), new ones after the highest,
    in (namespace, name) order. Ids start at 1 (0 is "no policy")."""
    old = {(p.namespace, p.name): p.id for p in previous.policies} if previous else {}
    out: dict[tuple[str, str], int] = {}
    used = set()
    for p in policies:
        if p.key in old:
            out[p.key] = old[p.key]
            used.add(old[p.key])
    nxt = max(list(old.values()) + [0]) + 1
    for key in sorted({p.key for p in policies} - set(out)):
        while nxt in used:
            nxt += 1
        out[key] = nxt
        used.add(nxt)
        nxt += 1
    return out


def required_cidrs(policies: Iterable[Policy]) -> set[str]:
    """Every prefix the policies name (cidr and except), normalised, without the /0 ones (those are
    the world identity). Allocate their identities with ``IdentityAllocator.allocate_cidr``."""
    out = set()
    for p in policies:
        for spec in p.specs:
            for d in ("ingress", "egress"):
                for deny in (False, True):
                    for rule in spec.rules(d, deny):
                        out.update(rule.cidrs)
                        for cs in rule.cidr_sets:
                            out.add(cs.cidr)
                            out.update(cs.except_)
    return {c for c in out if not c.endswith("/0")}


def port_blocks(lo: int, hi: int) -> list[tuple[int, int]]:
    """The fewest aligned ``(start, prefix_len)`` blocks covering ``lo..hi`` in a 16-bit space."""
    out = []
    while lo <= hi:
        size = (lo & -lo) if lo else 1 << 16
        while size > hi - lo + 1:
            size >>= 1
        out.append((lo, 17 - size.bit_length()))
        lo += size
    return out


def best_intervals(items: list[tuple[int, int, Any]]) -> list[tuple[int, int, Any]]:
    """Split overlapping ``(lo, hi, rank)`` ranges into disjoint intervals carrying the lowest rank
    that covers them; adjacent intervals with the same rank are merged."""
    if len(items) == 1:
        return items
    items = sorted(items, key=lambda t: t[0])
    points = sorted({t[0] for t in items} | {t[1] + 1 for t in items})
    heap: list[tuple[Any, int]] = []
    out: list[tuple[int, int, Any]] = []
    j = 0
    for i in range(len(points) - 1):
        a, b = points[i], points[i + 1] - 1
        while j < len(items) and items[j][0] <= a:
            heapq.heappush(heap, (items[j][2], items[j][1]))
            j += 1
        while heap and heap[0][1] < a:
            heapq.heappop(heap)
        if not heap:
            continue
        rank = heap[0][0]
        if out and out[-1][2] == rank and out[-1][1] == a - 1:
            out[-1] = (out[-1][0], b, rank)
        else:
            out.append((a, b, rank))
    return out


# --------------------------------------------------------------------------------------------
# The peer universe: every identity an address can map to
# --------------------------------------------------------------------------------------------


class _Universe:
    def __init__(self, identities: dict[int, tuple[str, ...]], cidr_ids: dict[str, int]):
        self.labels = {i: Labels(ls) for i, ls in identities.items()}
        self.selectors = SelectorCache(self.labels)
        self.cidr_ids = cidr_ids
        # Sorted (version, network, prefixlen, identity) for subnet range queries.
        nets = []
        for prefix, ident in cidr_ids.items():
            n = ipaddress.ip_network(prefix)
            nets.append((n.version, int(n.network_address), n.prefixlen, ident))
        nets.sort()
        self._nets = nets
        self._cidr_all = frozenset(cidr_ids.values())
        self._cidr_cache: dict[tuple[str, tuple[str, ...]], frozenset[int]] = {}
        self.cluster = frozenset(i for i in identities if i != IDENTITY_WORLD and not i >= LOCAL_IDENTITY_FLAG) | {1, 3, 4, 5, 6, 7, 8}
        self.world = frozenset({IDENTITY_WORLD}) | self._cidr_all

    def _subnets(self, prefix: str) -> set[int]:
        n = ipaddress.ip_network(prefix)
        if n.prefixlen == 0:
            return set(self._cidr_all) | {IDENTITY_WORLD}
        lo, hi = int(n.network_address), int(n.broadcast_address)
        start = bisect.bisect_left(self._nets, (n.version, lo, -1, -1))
        out = set()
        nets = self._nets
        for k in range(start, len(nets)):
            version, net, plen, ident = nets[k]
            if version != n.version or net > hi:
                break
            if plen >= n.prefixlen:
                out.add(ident)
        return out

    def cidr(self, prefix: str, excepts: Sequence[str] = ()) -> frozenset[int]:
        key = (prefix, tuple(excepts))
        hit = self._cidr_cache.get(key)
        if hit is None:
            sel = self._subnets(prefix)
            for e in excepts:
                if ipaddress.ip_network(e).prefixlen == 0:
                    sel.clear()
                else:
                    sel -= self._subnets(e)
            hit = self._cidr_cache[key] = frozenset(sel)
        return hit

    def entity(self, name: str) -> frozenset[int]:
        if name == "world":
            return self.world
        if name == "cluster":
            return self.cluster
        return frozenset({{"host": 1, "unmanaged": 3, "health": 4, "init": 5, "remote-node": 6,
                           "kube-apiserver": 7, "ingress": 8}[name]})


_ANY_PEER = frozenset({ANY})


def _peers(rule: _PeerRule, namespace: str, u: _Universe) -> Optional[frozenset[int]]:
    """The peer identities of a rule: ``{ANY}`` for any peer, None for an empty rule."""
    if not rule.has_l3:
        return _ANY_PEER if rule.l4() is not None else None
    out: set[int] = set()
    for es in rule.endpoints:
        sel = namespaced_peer(es.selector, namespace)
        if sel.is_empty:
            return _ANY_PEER
        out |= u.selectors.select(sel)
    for c in rule.cidrs:
        out |= u.cidr(c)
    for cs in rule.cidr_sets:
        out |= u.cidr(cs.cidr, cs.except_)
    for ent in rule.entities:
        if ent == "all":
            return _ANY_PEER
        out |= u.entity(ent)
    return frozenset(out)


_ANY_L4 = ((ANY, 0, 65535),)


# --------------------------------------------------------------------------------------------
# Compile
# --------------------------------------------------------------------------------------------


def compile_policies(
    policies: Sequence[Policy],
    endpoints: Sequence[EndpointInfo],
    *,
    host_ips: Iterable[str] = (),
    global_audit: bool = False,
    cidr_identities: Optional[Mapping[str, int]] = None,
    previous: Optional[CompiledPolicy] = None,
    max_entries: int = DEFAULT_MAX_ENTRIES,
) -> CompiledPolicy:
    """The kernel's view of ``policies`` for ``endpoints`` (see the module docstring).

    ``cidr_identities`` maps prefixes to identities allocated elsewhere (``IdentityAllocator``);
    prefixes missing there reuse ``previous`` or get fresh local identities. Raises
    :class:`CompileError` for inconsistent input or more than ``max_entries`` entries.
    """
    keys = [p.key for p in policies]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise CompileError(f"policy {'/'.join(x for x in dup if x)} is given twice")
    policy_ids = assign_policy_ids(policies, previous)

    # Identities and their labels.
    identities: dict[int, tuple[str, ...]] = {IDENTITY_HOST: RESERVED_IDENTITIES[IDENTITY_HOST],
                                              IDENTITY_WORLD: RESERVED_IDENTITIES[IDENTITY_WORLD]}
    for ep in endpoints:
        if ep.identity <= 0 or ep.identity >= LOCAL_IDENTITY_FLAG:
            raise CompileError(f"endpoint {ep.name or ep.ips}: identity {ep.identity} is not an endpoint identity")
        labels = canonical_labels(ep.labels)
        if identities.setdefault(ep.identity, labels) != labels:
            raise CompileError(f"identity {ep.identity} is given two label sets: "
                               f"{list(identities[ep.identity])} and {list(labels)}")

    # CIDR identities: given > previous > fresh.
    wanted = sorted(required_cidrs(policies))
    given = {str(ipaddress.ip_network(k, strict=False)): v for k, v in (cidr_identities or {}).items()}
    prev = previous.cidr_identities if previous else {}
    cidr_ids: dict[str, int] = {}
    for prefix in wanted:
        if prefix in given:
            cidr_ids[prefix] = given[prefix]
        elif prefix in prev:
            cidr_ids[prefix] = prev[prefix]
    taken = set(cidr_ids.values()) | set(given.values()) | set(prev.values())
    nxt = max([i for i in taken if i >= FIRST_LOCAL_IDENTITY] + [FIRST_LOCAL_IDENTITY - 1]) + 1
    for prefix in wanted:
        if prefix not in cidr_ids:
            while nxt in taken:
                nxt += 1
            if nxt > MAX_LOCAL_IDENTITY:
                raise CompileError("no CIDR identity left")
            cidr_ids[prefix] = nxt
            taken.add(nxt)
    for prefix, ident in cidr_ids.items():
        if ident < LOCAL_IDENTITY_FLAG or identities.get(ident, cidr_labels(prefix)) != cidr_labels(prefix):
            raise CompileError(f"CIDR identity {ident} for {prefix} clashes with another identity")
        identities[ident] = cidr_labels(prefix)

    # IP cache.
    ipcache: dict[str, int] = {"0.0.0.0/0": IDENTITY_WORLD, "::/0": IDENTITY_WORLD}
    owners: dict[str, str] = {}

    def claim(ip: str, ident: int, who: str) -> None:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            raise CompileError(f"{who}: {ip!r} is not an IP address") from None
        prefix = f"{addr}/{addr.max_prefixlen}"
        if prefix in ipcache and ipcache[prefix] != ident:
            raise CompileError(f"address {addr} belongs to both {owners[prefix]} and {who}")
        ipcache[prefix] = ident
        owners[prefix] = who

    for ip in host_ips:
        claim(ip, IDENTITY_HOST, "the host")
    for ep in endpoints:
        for ip in ep.ips:
            claim(ip, ep.identity, f"endpoint {ep.name or ep.identity}")
    for prefix, ident in cidr_ids.items():
        ipcache.setdefault(prefix, ident)  # endpoint/host addresses win over an equal prefix

    universe = _Universe(identities, cidr_ids)
    local_ids = sorted({ep.identity for ep in endpoints if ep.local})
    local_labels = {i: universe.labels[i] for i in local_ids}

    # Resolve rules into atoms grouped by (endpoint, direction, deny, peer, proto).
    groups: dict[tuple[int, int, bool, int, int], list[tuple[int, int, tuple[bool, int]]]] = {}
    flags: dict[int, int] = {i: (FLAG_AUDIT if global_audit else 0) for i in local_ids}
    for policy in policies:
        pid = policy_ids[policy.key]
        ns = policy.namespace
        for spec in policy.specs:
            subject = namespaced_subject(spec.endpointSelector.selector, ns)
            subjects = [i for i in local_ids if subject.matches(local_labels[i])]
            if not subjects:
                continue
            audit = policy.spec_audit(spec)
            rank = (audit, pid)
            for d in Direction:
                if spec.default_deny(d.key):
                    bit = flag_audit_policy(d) if audit else flag_policy(d)
                    for i in subjects:
                        flags[i] |= bit
                for deny in (True, False):
                    for rule in spec.rules(d.key, deny):
                        peers = _peers(rule, ns, universe)
                        if not peers:
                            continue
                        l4 = rule.l4() or _ANY_L4
                        for peer in peers:
                            for proto, lo, hi in l4:
                                item = (lo, hi, rank)
                                for ep_id in subjects:
                                    groups.setdefault((ep_id, int(d), deny, peer, proto), []).append(item)

    # Materialise: disjoint best intervals -> aligned port blocks.
    entries: list[PolicyEntry] = []
    for (ep_id, d, deny, peer, proto), items in groups.items():
        mt = int(match_type_of(peer, proto))
        if deny:
            flags[ep_id] |= flag_deny(Direction(d))
        for lo, hi, (audit, pid) in best_intervals(items):
            for port, plen in port_blocks(lo, hi):
                entries.append(PolicyEntry(ep_id, d, deny, peer, proto, port, plen, audit, pid, mt))
        if len(entries) > max_entries:
            raise CompileError(f"the policies need more than {max_entries} policy map entries")
    entries.sort(key=lambda e: e.key)

    ep_entries = tuple(sorted(
        (EndpointEntry(ep.identity, flags[ep.identity], tuple(ep.ips), ep.name, ep.ifindex) for ep in endpoints if ep.local),
        key=lambda e: (e.identity, e.name, e.ifindex, e.ips)))
    ipc = tuple(IPCacheEntry(p, i) for p, i in sorted(
        ipcache.items(), key=lambda kv: (":" in kv[0], ipaddress.ip_network(kv[0]).network_address.packed,
                                          ipaddress.ip_network(kv[0]).prefixlen)))
    refs = tuple(sorted((PolicyRef(policy_ids[p.key], p.name, p.namespace, p.revision, p.kind) for p in policies),
                        key=lambda r: r.id))
    digest = hashlib.sha256(msgspec.json.encode([global_audit, ep_entries, ipc, entries, refs])).hexdigest()
    if previous is None:
        revision = 1
    else:
        revision = previous.revision + (1 if previous.digest != digest else 0)
    return CompiledPolicy(
        revision=revision, digest=digest, global_audit=global_audit, endpoints=ep_entries, ipcache=ipc,
        entries=tuple(entries), policies=refs, identities=dict(sorted(identities.items())),
        cidr_identities=dict(sorted(cidr_ids.items())),
    )


def spec_subjects(policy: Policy, spec: PolicySpec, labels: Labels) -> bool:
    """Does ``spec`` of ``policy`` select an endpoint with ``labels`` (namespacing included)?"""
    return namespaced_subject(spec.endpointSelector.selector, policy.namespace).matches(labels)
