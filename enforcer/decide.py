"""Policy decisions in pure Python: the reference semantics and the oracle for the kernel.

:func:`decide` evaluates a :class:`~enforcer.compiler.CompiledPolicy` with exactly the lookups the
kernel makes (see ``enforcer.compiler``). :func:`evaluate` computes the same decision straight from the
policies, without compiling; the two must always agree (tested), which checks the compiler.

Semantics (Cilium's, plus per-policy audit)
-------------------------------------------
* Direction: ``INGRESS`` is traffic to the endpoint (peer = source address), ``EGRESS`` traffic from it
  (peer = destination address); ``dport`` is the destination port, or the ICMP type for ICMP/ICMPv6.
* Replies: a packet of an already allowed (or audited) connection passes without a policy lookup. In
  the kernel that is connection tracking: only the first packet of a connection is looked up, and its
  replies find the connection-tracking entry. Here it is the ``is_reply=True`` argument.
* An endpoint selected by an enforcing policy with rules in a direction is *default-deny* there:
  traffic no rule allows is ``DROPPED`` with ``POLICY_DENIED``.
* An explicit deny rule wins over every allow: ``DROPPED`` with ``POLICY_DENY`` (also when the
  direction is not default-deny, e.g. ``enableDefaultDeny: false``).
* Audit mode of a policy (``spec.auditMode`` or the ``flowscope.io/audit-mode`` annotation) never
  changes what is forwarded: its rules are evaluated as if enforced and what they *would* drop is
  reported as ``AUDIT`` (and forwarded); its allows never allow anything an enforcing policy drops.
* Global audit mode (``FLAG_AUDIT``): every would-be drop is ``AUDIT`` and passes.
* Identities: the peer's address is resolved through the ipcache (longest prefix). CIDR rules select
  addresses outside the cluster (not endpoints, not the host); ``world`` is everything outside the
  cluster, ``host`` the node, ``cluster`` the node and every endpoint, ``all`` everything.
  ``0.0.0.0/0`` and ``::/0`` both mean "world" (one world identity for both families).

The verdict, in order: an enforcing deny -> DROPPED/POLICY_DENY; default-deny from an enforcing policy
and no enforcing allow -> DROPPED/POLICY_DENIED; an audit-mode deny -> AUDIT/POLICY_DENY; default-deny
only from audit-mode policies and no allow at all -> AUDIT/POLICY_DENIED; else FORWARDED. DROPPED
becomes AUDIT in global audit mode. ``Decision.drop_reason`` is set for DROPPED and, as the reason it
would have been dropped, for AUDIT. The deciding rule is the first in the level order L3+L4, L4-only,
L3-only, all (as Cilium's lookups); between policies on one level, the lowest policy id.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

from flowscope import schema

from .compiler import (ANY, FLAG_AUDIT, CompiledPolicy, Direction, EndpointInfo, MatchType, PolicyEntry, PolicyRef,
                       Proto, assign_policy_ids, flag_audit_policy, flag_deny, flag_policy, match_type_of)
from .identity import IDENTITY_HOST, IDENTITY_WORLD, IPCache, LOCAL_IDENTITY_FLAG
from .policy import Policy, _PeerRule
from .selector import Labels, namespaced_peer, namespaced_subject

Verdict = schema.Verdict
DropReason = schema.DropReason
POLICY_DENIED = schema.DropReason.POLICY_DENIED  # type: ignore[attr-defined]
POLICY_DENY = schema.DropReason.POLICY_DENY  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Decision:
    verdict: schema.Verdict
    direction: Direction
    peer_identity: int
    match_type: MatchType = MatchType.NONE
    drop_reason: Optional[Any] = None  # schema.DropReason
    allowed_by: tuple[PolicyRef, ...] = ()
    denied_by: tuple[PolicyRef, ...] = ()
    reason: str = ""

    @property
    def forwarded(self) -> bool:
        """Does the packet pass (FORWARDED or AUDIT)?"""
        return self.verdict != Verdict.DROPPED

    def flow_fields(self) -> dict[str, Any]:
        """Keyword arguments for ``schema.Flow``: verdict, drop reason (DROPPED only), match type and
        the ``<direction>_allowed_by`` / ``<direction>_denied_by`` lists."""
        out: dict[str, Any] = {"verdict": self.verdict, "policy_match_type": int(self.match_type)}
        if self.verdict == Verdict.DROPPED and self.drop_reason is not None:
            out["drop_reason_desc"] = self.drop_reason
        d = self.direction.key
        if self.allowed_by:
            out[f"{d}_allowed_by"] = [r.to_flow() for r in self.allowed_by]
        if self.denied_by:
            out[f"{d}_denied_by"] = [r.to_flow() for r in self.denied_by]
        return out


# --------------------------------------------------------------------------------------------
# The verdict rules, shared by both evaluators
# --------------------------------------------------------------------------------------------


def _verdict(direction: Direction, peer: int, *, policy_on: bool, audit_on: bool, global_audit: bool,
             deny: Optional[tuple[PolicyRef, MatchType]], audit_deny: Optional[tuple[PolicyRef, MatchType]],
             allow: Optional[tuple[PolicyRef, MatchType]], audit_allow: Optional[tuple[PolicyRef, MatchType]]) -> Decision:
    def drop(reason: Any, why: str, by: Optional[tuple[PolicyRef, MatchType]], *, audit: bool) -> Decision:
        verdict = Verdict.AUDIT if audit else Verdict.DROPPED
        if audit:
            why = f"would be dropped: {why}"
        return Decision(verdict, direction, peer, by[1] if by else MatchType.NONE, reason,
                        denied_by=(by[0],) if by else (), reason=why)

    if deny is not None:
        return drop(POLICY_DENY, f"denied by {deny[0].ref}", deny, audit=global_audit)
    if policy_on and allow is None:
        return drop(POLICY_DENIED, "no policy allows it (default deny)", None, audit=global_audit)
    if audit_deny is not None:
        return drop(POLICY_DENY, f"denied by {audit_deny[0].ref} (audit mode)", audit_deny, audit=True)
    if audit_on and allow is None and audit_allow is None:
        return drop(POLICY_DENIED, "no policy allows it (default deny of an audit-mode policy)", None, audit=True)
    if policy_on or audit_on:
        by = allow or audit_allow
        if by is not None:
            return Decision(Verdict.FORWARDED, direction, peer, by[1], allowed_by=(by[0],), reason=f"allowed by {by[0].ref}")
    return Decision(Verdict.FORWARDED, direction, peer, reason="no policy selects the endpoint in this direction")


def _reply(direction: Direction, peer: int) -> Decision:
    return Decision(Verdict.FORWARDED, direction, peer, reason="reply of an allowed connection (connection tracking)")


def _proto_port(proto: Any, dport: int) -> tuple[int, int]:
    p = Proto.parse(proto)
    if p == ANY:
        raise ValueError("a packet has a concrete protocol, not 0/ANY")
    if isinstance(dport, bool) or not isinstance(dport, int) or not 0 <= dport <= 65535:
        raise ValueError(f"{dport!r} is not a port (0-65535)")
    return p, dport


# --------------------------------------------------------------------------------------------
# decide: the kernel's algorithm over compiled maps
# --------------------------------------------------------------------------------------------


class _Index:
    def __init__(self, compiled: CompiledPolicy):
        self.flags: dict[int, int] = {}
        for ep in compiled.endpoints:
            self.flags[ep.identity] = self.flags.get(ep.identity, 0) | ep.flags
        self.groups: dict[tuple[int, int, bool, int, int], tuple[dict[tuple[int, int], PolicyEntry], list[int]]] = {}
        for e in compiled.entries:
            g = self.groups.get(e.key[:5])
            if g is None:
                g = self.groups[e.key[:5]] = ({}, [])
            g[0][(e.port, e.prefix_len)] = e
        for table, plens in self.groups.values():
            plens.extend(sorted({plen for _, plen in table}, reverse=True))
        self.ipcache = IPCache((e.prefix, e.identity) for e in compiled.ipcache)
        self.refs = {p.id: p for p in compiled.policies}

    def lpm(self, ep: int, d: int, deny: bool, peer: int, proto: int, port: int) -> Optional[PolicyEntry]:
        g = self.groups.get((ep, d, deny, peer, proto))
        if g is None:
            return None
        table, plens = g
        for plen in plens:
            start = port & (0xFFFF << (16 - plen)) & 0xFFFF if plen else 0
            hit = table.get((start, plen))
            if hit is not None:
                return hit
        return None


def _index(compiled: CompiledPolicy) -> _Index:
    idx = compiled.__dict__.get("_decide_index")
    if idx is None:
        idx = compiled.__dict__["_decide_index"] = _Index(compiled)
    return idx


def decide(compiled: CompiledPolicy, endpoint_identity: int, direction: Any, peer_ip: str, proto: Any,
           dport: int = 0, *, is_reply: bool = False) -> Decision:
    """The verdict for a packet at a local endpoint, computed like the kernel does.

    ``direction``: ``"ingress"``/``"egress"`` (or ``Direction``/``TrafficDirection``); ``peer_ip``: the
    other side's address; ``proto``: number or name; ``dport``: destination port or ICMP type;
    ``is_reply``: the packet belongs to an established, allowed connection. An identity that is not a
    local endpoint has no policy (FORWARDED). Raises ValueError for malformed arguments.
    """
    d = Direction.parse(direction)
    p, port = _proto_port(proto, dport)
    idx = _index(compiled)
    peer = idx.ipcache.lookup(peer_ip)
    if is_reply:
        return _reply(d, peer)
    flags = idx.flags.get(endpoint_identity, 0)
    ep = endpoint_identity
    levels = ((peer, p, port), (ANY, p, port), (peer, ANY, 0), (ANY, ANY, 0))

    def walk(deny: bool) -> tuple[Optional[tuple[PolicyRef, MatchType]], Optional[tuple[PolicyRef, MatchType]]]:
        enforced = audited = None
        for lp, lproto, lport in levels:
            e = idx.lpm(ep, d, deny, lp, lproto, lport)
            if e is None:
                continue
            found = (idx.refs.get(e.policy_id) or PolicyRef(e.policy_id, f"policy-{e.policy_id}"), MatchType(e.match_type))
            if not e.audit:
                enforced = found
                break
            if audited is None:
                audited = found
        return enforced, audited

    deny = audit_deny = allow = audit_allow = None
    if flags & flag_deny(d):
        deny, audit_deny = walk(True)
    policy_on = bool(flags & flag_policy(d))
    audit_on = bool(flags & flag_audit_policy(d))
    if deny is None and (policy_on or audit_on):
        allow, audit_allow = walk(False)
    return _verdict(d, peer, policy_on=policy_on, audit_on=audit_on, global_audit=bool(flags & FLAG_AUDIT),
                    deny=deny, audit_deny=audit_deny, allow=allow, audit_allow=audit_allow)


def decide_connection(compiled: CompiledPolicy, src_ip: str, dst_ip: str, proto: Any, dport: int = 0) -> tuple[Optional[Decision], Optional[Decision]]:
    """Both ends of a new connection: (egress decision at the source endpoint, ingress decision at the
    destination endpoint); None for an end that is not a local endpoint."""
    idx = _index(compiled)
    src, dst = idx.ipcache.lookup(src_ip), idx.ipcache.lookup(dst_ip)
    out = decide(compiled, src, "egress", dst_ip, proto, dport) if src in idx.flags else None
    inn = decide(compiled, dst, "ingress", src_ip, proto, dport) if dst in idx.flags else None
    return out, inn


# --------------------------------------------------------------------------------------------
# evaluate: straight from the policies (the reference)
# --------------------------------------------------------------------------------------------

_LEVEL_ORDER = (MatchType.L3_L4, MatchType.L4_ONLY, MatchType.L3_ONLY, MatchType.ALL)


def _in_net(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, prefix: str) -> bool:
    net = ipaddress.ip_network(prefix)
    return net.prefixlen == 0 or (net.version == addr.version and addr in net)


def _peer_match(rule: _PeerRule, namespace: str, labels: Labels, identity: int,
                addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Optional[bool]:
    """None: the rule matches any peer; True/False: whether this peer is selected."""
    if not rule.has_l3:
        return None
    outside = identity == IDENTITY_WORLD or identity >= LOCAL_IDENTITY_FLAG
    matched = False
    for es in rule.endpoints:
        sel = namespaced_peer(es.selector, namespace)
        if sel.is_empty:
            return None
        matched = matched or sel.matches(labels)
    for ent in rule.entities:
        if ent == "all":
            return None
        if ent == "world":
            matched = matched or outside
        elif ent == "cluster":
            matched = matched or not outside
        else:
            matched = matched or identity == {"host": 1, "unmanaged": 3, "health": 4, "init": 5, "remote-node": 6,
                                              "kube-apiserver": 7, "ingress": 8}[ent]
    if outside:
        for c in rule.cidrs:
            matched = matched or _in_net(addr, c)
        for cs in rule.cidr_sets:
            matched = matched or (_in_net(addr, cs.cidr) and not any(_in_net(addr, e) for e in cs.except_))
    return matched


def evaluate(policies: Sequence[Policy], endpoints: Sequence[EndpointInfo], endpoint_identity: int, direction: Any,
             peer_ip: str, proto: Any, dport: int = 0, *, is_reply: bool = False, host_ips: Iterable[str] = (),
             global_audit: bool = False) -> Decision:
    """The decision straight from the policies (no compiled maps). Policy ids are those a fresh
    ``compile_policies`` assigns. Same arguments and result as :func:`decide`."""
    d = Direction.parse(direction)
    p, port = _proto_port(proto, dport)
    addr = ipaddress.ip_address(peer_ip)
    by_ip = {ipaddress.ip_address(ip): ep for ep in endpoints for ip in ep.ips}
    hosts = {ipaddress.ip_address(ip) for ip in host_ips}
    if addr in by_ip:
        peer, peer_labels = by_ip[addr].identity, Labels(by_ip[addr].labels)
    elif addr in hosts:
        peer, peer_labels = IDENTITY_HOST, Labels(["reserved:host"])
    else:
        peer, peer_labels = IDENTITY_WORLD, Labels(["reserved:world"])
    if is_reply:
        return _reply(d, peer)
    me = next((ep for ep in endpoints if ep.identity == endpoint_identity and ep.local), None)
    if me is None:
        return _verdict(d, peer, policy_on=False, audit_on=False, global_audit=global_audit,
                        deny=None, audit_deny=None, allow=None, audit_allow=None)
    my_labels = Labels(me.labels)
    ids = assign_policy_ids(policies)
    policy_on = audit_on = False
    # (deny, audit) -> list of (level index, policy id, ref, match type)
    found: dict[tuple[bool, bool], list[tuple[int, int, PolicyRef, MatchType]]] = {}
    for pol in policies:
        ref = PolicyRef(ids[pol.key], pol.name, pol.namespace, pol.revision, pol.kind)
        for spec in pol.specs:
            if not namespaced_subject(spec.endpointSelector.selector, pol.namespace).matches(my_labels):
                continue
            audit = pol.spec_audit(spec)
            if spec.default_deny(d.key):
                if audit:
                    audit_on = True
                else:
                    policy_on = True
            for deny in (True, False):
                for rule in spec.rules(d.key, deny):
                    if rule.is_empty:
                        continue
                    l3 = _peer_match(rule, pol.namespace, peer_labels, peer, addr)
                    if l3 is False:
                        continue
                    l4 = rule.l4()
                    if l4 is not None and not any(pr == p and lo <= port <= hi for pr, lo, hi in l4):
                        continue
                    mt = match_type_of(ANY if l3 is None else peer, ANY if l4 is None else p)
                    found.setdefault((deny, audit), []).append((_LEVEL_ORDER.index(mt), ref.id, ref, mt))

    def pick(key: tuple[bool, bool]) -> Optional[tuple[PolicyRef, MatchType]]:
        hits = found.get(key)
        if not hits:
            return None
        _, _, ref, mt = min(hits, key=lambda h: (h[0], h[1]))
        return ref, mt

    deny = pick((True, False))
    audit_deny = pick((True, True))
    allow = pick((False, False)) if deny is None else None
    audit_allow = pick((False, True)) if deny is None else None
    if not (policy_on or audit_on):
        allow = audit_allow = None
    # The kernel's deny walk stops at the first enforcing deny; an audit deny on an earlier level is
    # then irrelevant, as here (deny wins before audit_deny is looked at).
    return _verdict(d, peer, policy_on=policy_on, audit_on=audit_on, global_audit=global_audit,
                    deny=deny, audit_deny=audit_deny, allow=allow, audit_allow=audit_allow)
