"""L7 rules of CiliumNetworkPolicies (``toPorts[].rules.http`` / ``.kafka``) evaluated on parsed requests.

Pure: no I/O. The L7 capture asks :meth:`L7Policy.rules_for` once per connection (subject endpoint,
peer, direction, port) and then checks each request against the returned :class:`L7RuleSet`.

Cilium's semantics
    * Only *allow* rules carry L7 rules. The port rules that apply to a connection are those of the
      policies whose ``endpointSelector`` selects the observed endpoint, in the connection's direction,
      whose peer part (``fromEndpoints``/``toEndpoints``, CIDRs, entities; none = any peer) matches the
      peer and whose ``toPorts`` include the port (TCP or ANY).
    * If none of them has L7 rules, L7 policy says nothing (:meth:`rules_for` returns None).
    * If one of them has no L7 rules, it allows every request on the port (an L4 rule is an L7
      wildcard): every request is allowed.
    * Otherwise a request is allowed when at least one rule of one of them matches it.
    * HTTP: ``method``, ``path`` and ``host`` are regular expressions that must match the *whole*
      value (Envoy's anchored match; ``path`` is the request target including the query string,
      ``host`` the Host header / ``:authority``); ``headers`` entries are ``"Name"`` (present) or
      ``"Name: value"`` / ``"Name value"`` (exact value); ``headerMatches`` without ``mismatch``
      require the header (exact value when given); with a mismatch action they never deny.
    * Kafka: ``role: produce`` allows produce, metadata and apiversions; ``role: consume`` allows fetch,
      offsets, metadata, offsetcommit, offsetfetch, findcoordinator, joingroup, heartbeat, leavegroup,
      syncgroup and apiversions; ``apiKey``, ``apiVersion``, ``clientID`` are exact; ``topic`` must
      equal every topic the request names, and is ignored for requests that name none.

Enforcing L7 rules needs a proxy in the path; Flowscope only observes, so a request outside the
rules is reported with verdict AUDIT and the policies whose L7 rules it failed.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable, Optional, Sequence

from flowscope import schema

from .compiler import MatchType, PolicyRef, spec_subjects
from .identity import IDENTITY_WORLD, LOCAL_IDENTITY_FLAG
from .policy import KAFKA_API_KEYS, HTTPRule, KafkaRule, Policy, PortRule, _PeerRule
from .selector import Labels, namespaced_peer

INGRESS, EGRESS = "ingress", "egress"

#: Cilium's Kafka roles: the API keys each one allows.
KAFKA_ROLE_KEYS: dict[str, frozenset[str]] = {
    "produce": frozenset({"produce", "metadata", "apiversions"}),
    "consume": frozenset({"fetch", "offsets", "metadata", "offsetcommit", "offsetfetch", "findcoordinator",
                          "joingroup", "heartbeat", "leavegroup", "syncgroup", "apiversions"}),
}
_ENTITY_IDS = {"host": 1, "unmanaged": 3, "health": 4, "init": 5, "remote-node": 6, "kube-apiserver": 7, "ingress": 8}


def kafka_api_name(api_key_id: int) -> str:
    """Cilium's name of a Kafka API key number (``0`` -> ``produce``, ``2`` -> ``offsets``); "" if unknown."""
    return KAFKA_API_KEYS[api_key_id] if 0 <= api_key_id < len(KAFKA_API_KEYS) else ""


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """The other end of the connection: address, identity and labels (``k8s:app=web``, ``reserved:world``)."""

    ip: str
    identity: int = IDENTITY_WORLD
    labels: tuple[str, ...] = ()

    @classmethod
    def from_endpoint(cls, ip: str, ep: Optional[schema.Endpoint]) -> "Peer":
        if ep is None:
            return cls(ip)
        return cls(ip, int(ep.identity or 0), tuple(ep.labels))


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str
    host: str = ""
    #: ``(lower-case name, value)`` pairs, values as sent (not redacted).
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class KafkaRequest:
    api_key: str            # Cilium's name, see :func:`kafka_api_name`
    api_version: int = 0
    client_id: str = ""
    topics: tuple[str, ...] = ()


@dataclass(frozen=True)
class L7Verdict:
    """``allowed`` False: the request is outside the L7 rules; ``policies`` then are the policies whose
    rules it failed, else those that allowed it. ``match_type`` is Hubble's ``policy_match_type``."""

    allowed: bool
    policies: tuple[schema.Policy, ...]
    match_type: int
    audit_only: bool = False  # every policy involved is in audit mode

    @property
    def denied(self) -> bool:
        return not self.allowed


# --------------------------------------------------------------------------------------------
# Compiled rules
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=4096)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _full(pattern: Optional[str], value: str) -> bool:
    return pattern is None or _regex(pattern).fullmatch(value) is not None


def _split_header(text: str) -> tuple[str, Optional[str]]:
    """Cilium: ``"X-Key: v"`` / ``"X-Key v"`` -> name and exact value; ``"X-Key"`` -> presence only."""
    parts = text.strip().split(None, 1)
    if len(parts) == 2:
        return parts[0].rstrip(":").lower(), parts[1].strip()
    name, sep, value = text.partition(":")
    if sep and value.strip():
        return name.strip().lower(), value.strip()
    return name.strip().rstrip(":").lower(), None


def _has_header(headers: Sequence[tuple[str, str]], name: str, value: Optional[str]) -> bool:
    for k, v in headers:
        if k == name and (value is None or v == value):
            return True
    return False


def http_rule_matches(rule: HTTPRule, req: HttpRequest) -> bool:
    if not _full(rule.method, req.method) or not _full(rule.path, req.path) or not _full(rule.host, req.host):
        return False
    for h in rule.headers:
        name, value = _split_header(h)
        if not _has_header(req.headers, name, value):
            return False
    for hm in rule.headerMatches:
        if hm.mismatch is None and not _has_header(req.headers, hm.name.lower(), hm.value):
            return False
    return True


def kafka_rule_matches(rule: KafkaRule, req: KafkaRequest) -> bool:
    if rule.role is not None and req.api_key not in KAFKA_ROLE_KEYS[rule.role]:
        return False
    if rule.apiKey is not None and req.api_key != rule.apiKey:
        return False
    if rule.apiVersion is not None and str(req.api_version) != rule.apiVersion:
        return False
    if rule.clientID is not None and req.client_id != rule.clientID:
        return False
    if rule.topic is not None and req.topics and any(t != rule.topic for t in req.topics):
        return False
    return True


@dataclass
class _Source:
    policy: schema.Policy
    match_type: int
    audit: bool
    rules: PortRule


@dataclass
class L7RuleSet:
    """The port rules that apply to one connection (see the module docstring)."""

    sources: list[_Source] = field(default_factory=list)

    @property
    def wildcard(self) -> bool:
        return any(s.rules.rules is None or s.rules.rules.empty for s in self.sources)

    @property
    def kinds(self) -> set[str]:
        out = set()
        for s in self.sources:
            if s.rules.rules is not None:
                if s.rules.rules.http:
                    out.add("http")
                if s.rules.rules.kafka:
                    out.add("kafka")
        return out

    def check_http(self, req: HttpRequest) -> L7Verdict:
        return self._check(req, "http", http_rule_matches)

    def check_kafka(self, req: KafkaRequest) -> L7Verdict:
        return self._check(req, "kafka", kafka_rule_matches)

    def _check(self, req, kind: str, matches) -> L7Verdict:
        allow: list[_Source] = []
        involved: list[_Source] = []
        for s in self.sources:
            r = s.rules.rules
            if r is None or r.empty:
                allow.append(s)  # an L4-only rule: every request
                continue
            rules = r.http if kind == "http" else r.kafka
            involved.append(s)
            if any(matches(rule, req) for rule in rules):
                allow.append(s)
        if allow:
            return L7Verdict(True, _unique(s.policy for s in allow), max(s.match_type for s in allow),
                             all(s.audit for s in allow))
        return L7Verdict(False, _unique(s.policy for s in involved),
                         max((s.match_type for s in involved), default=int(MatchType.L4_ONLY)),
                         all(s.audit for s in involved))


def _unique(items: Iterable[schema.Policy]) -> tuple[schema.Policy, ...]:
    out: dict[tuple[str, str], schema.Policy] = {}
    for p in items:
        out.setdefault((p.namespace, p.name), p)
    return tuple(out.values())


def _port_matches(pr: PortRule, port: int) -> bool:
    for pp in pr.ports:
        if pp.protocol not in ("TCP", "ANY"):
            continue
        lo, hi = pp.port_range
        if lo <= port <= hi:
            return True
    return False


def _peer_matches(rule: _PeerRule, namespace: str, peer: Peer, peer_labels: Labels) -> bool:
    if not rule.has_l3:
        return True
    for es in rule.endpoints:
        sel = namespaced_peer(es.selector, namespace)
        if sel.is_empty or sel.matches(peer_labels):
            return True
    is_cidr_peer = peer.identity == IDENTITY_WORLD or peer.identity >= LOCAL_IDENTITY_FLAG or peer.identity == 0
    if is_cidr_peer and (rule.cidrs or rule.cidr_sets):
        try:
            addr = ipaddress.ip_address(peer.ip)
        except ValueError:
            addr = None
        if addr is not None:
            for c in rule.cidrs:
                if addr in ipaddress.ip_network(c):
                    return True
            for cs in rule.cidr_sets:
                if addr in ipaddress.ip_network(cs.cidr) and not any(addr in ipaddress.ip_network(e) for e in cs.except_):
                    return True
    for ent in rule.entities:
        if ent == "all":
            return True
        if ent == "world" and is_cidr_peer:
            return True
        if ent == "cluster" and not is_cidr_peer:
            return True
        if _ENTITY_IDS.get(ent) == peer.identity:
            return True
    return False


def _policy_ref(p: Policy) -> schema.Policy:
    return PolicyRef(0, p.name, p.namespace, p.revision, p.kind).to_flow()


class L7Policy:
    """All policies' L7 view; cheap to rebuild when the policies change."""

    def __init__(self, policies: Sequence[Policy] = ()):
        self.policies = list(policies)
        self._refs = {p.key: _policy_ref(p) for p in self.policies}
        self.has_l7 = any(
            pr.rules is not None and not pr.rules.empty
            for p in self.policies for spec in p.specs for d in (INGRESS, EGRESS)
            for rule in spec.rules(d, False) for pr in rule.toPorts)  # type: ignore[attr-defined]

    def rules_for(self, subject_labels: Iterable[str], peer: Peer, direction: str, port: int) -> Optional[L7RuleSet]:
        """The L7 rules for a TCP connection on ``port`` of the endpoint with ``subject_labels``, in
        ``direction`` (``"ingress"``: the peer connects to the endpoint; ``"egress"``: the endpoint
        connects to the peer). None when no L7 rule applies."""
        if not self.has_l7:
            return None
        direction = direction.lower()
        if direction not in (INGRESS, EGRESS):
            raise ValueError(f"{direction!r} is not a direction (ingress, egress)")
        subject = Labels(tuple(subject_labels))
        peer_labels = Labels(peer.labels)
        out = L7RuleSet()
        for p in self.policies:
            for spec in p.specs:
                if not spec_subjects(p, spec, subject):
                    continue
                audit = p.spec_audit(spec)
                for rule in spec.rules(direction, False):
                    if not rule.toPorts or not _peer_matches(rule, p.namespace, peer, peer_labels):  # type: ignore[attr-defined]
                        continue
                    mt = int(MatchType.L3_L4 if rule.has_l3 else MatchType.L4_ONLY)
                    for pr in rule.toPorts:  # type: ignore[attr-defined]
                        if _port_matches(pr, port):
                            out.sources.append(_Source(self._refs[p.key], mt, audit, pr))
        if not out.sources or not out.kinds:
            return None
        return out
