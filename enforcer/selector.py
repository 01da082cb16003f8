"""Kubernetes label selectors over Cilium-style labels, with Cilium's namespacing rules.

Labels
    A label is ``source:key=value`` (``k8s:app=web``, ``k8s:io.kubernetes.pod.namespace=default``,
    ``reserved:host``, ``cidr:10.0.0.0/8``). A label without ``=value`` has the empty value.

Selector keys
    A selector key without a source (``app``) or with the ``any`` source (``any:app``) matches labels
    of that key from every source; a key with a source (``k8s:app``) matches only labels from that
    source. ``{}`` (no requirements) selects everything.

Requirements
    ``matchLabels`` and ``matchExpressions`` are ANDed, as in Kubernetes. For one selector key the
    label set may hold several values (one per source); ``key=v`` and ``In`` hold when one of them is
    listed, ``NotIn`` when none is (so also when the key is absent), ``Exists`` when there is one,
    ``DoesNotExist`` when there is none.

Namespacing (Cilium's rule for CiliumNetworkPolicy)
    A namespaced policy selects only endpoints of its namespace (:func:`namespaced_subject`), and its
    peer endpoint selectors match in the same namespace unless they name the namespace label
    ``io.kubernetes.pod.namespace`` themselves, in matchLabels or matchExpressions, with or without a
    source (:func:`namespaced_peer`).

This module is pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, NamedTuple, Optional

NAMESPACE_KEY = "io.kubernetes.pod.namespace"
K8S_SOURCE = "k8s"
ANY_SOURCE = "any"
RESERVED_SOURCE = "reserved"
CIDR_SOURCE = "cidr"

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


class Label(NamedTuple):
    source: str
    key: str
    value: str = ""

    def __str__(self) -> str:
        text = f"{self.source}:{self.key}"
        return f"{text}={self.value}" if self.value != "" else text


def split_key(text: str, default_source: str) -> tuple[str, str]:
    """``"k8s:app"`` -> ``("k8s", "app")``; ``"app"`` -> ``(default_source, "app")``."""
    source, sep, key = text.partition(":")
    if not sep:
        return default_source, text
    return source or default_source, key


def parse_label(text: str, default_source: str = K8S_SOURCE) -> Label:
    """Parse ``source:key=value`` (source and ``=value`` optional). The source is split off at the
    first ``:`` that comes before any ``=``."""
    eq = text.find("=")
    colon = text.find(":")
    if colon != -1 and (eq == -1 or colon < eq):
        source, rest = text[:colon], text[colon + 1 :]
        source = source or default_source
    else:
        source, rest = default_source, text
    key, _, value = rest.partition("=")
    return Label(source, key, value)


def parse_labels(labels: Iterable[str | Label] | Mapping[str, str], default_source: str = K8S_SOURCE) -> frozenset[Label]:
    """Labels from ``["k8s:app=web", ...]``, ``Label`` tuples or a ``{key: value}`` mapping (keys may
    carry a source prefix; plain keys get ``default_source``)."""
    if isinstance(labels, Mapping):
        out = set()
        for k, v in labels.items():
            source, key = split_key(k, default_source)
            out.add(Label(source, key, v))
        return frozenset(out)
    return frozenset(l if isinstance(l, Label) else parse_label(l, default_source) for l in labels)


def format_labels(labels: Iterable[Label]) -> tuple[str, ...]:
    """Canonical text form: sorted, deduplicated ``source:key=value`` strings."""
    return tuple(sorted({str(l) for l in labels}))


class Labels:
    """A label set prepared for selector matching (values grouped by key)."""

    __slots__ = ("items", "_by_key")

    def __init__(self, labels: Iterable[str | Label] | Mapping[str, str] = ()):
        self.items: frozenset[Label] = labels.items if isinstance(labels, Labels) else parse_labels(labels)
        by_key: dict[str, list[tuple[str, str]]] = {}
        for l in self.items:
            by_key.setdefault(l.key, []).append((l.source, l.value))
        self._by_key = by_key

    def values(self, source: str, key: str) -> list[str]:
        pairs = self._by_key.get(key)
        if not pairs:
            return []
        if source == ANY_SOURCE:
            return [v for _, v in pairs]
        return [v for s, v in pairs if s == source]

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Labels) and other.items == self.items

    def __hash__(self) -> int:
        return hash(self.items)

    def __repr__(self) -> str:
        return f"Labels({list(format_labels(self.items))!r})"


@dataclass(frozen=True)
class Requirement:
    source: str
    key: str
    operator: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: Labels) -> bool:
        present = labels.values(self.source, self.key)
        op = self.operator
        if op == "In":
            return any(v in self.values for v in present)
        if op == "NotIn":
            return not any(v in self.values for v in present)
        if op == "Exists":
            return bool(present)
        if op == "DoesNotExist":
            return not present
        raise ValueError(f"unknown selector operator {op!r}")


@dataclass(frozen=True)
class LabelSelector:
    """An immutable, hashable label selector. Build with :meth:`from_k8s`."""

    match_labels: frozenset[tuple[str, str, str]] = frozenset()  # (source, key, value)
    match_expressions: tuple[Requirement, ...] = ()

    @classmethod
    def from_k8s(cls, match_labels: Optional[Mapping[str, str]] = None,
                 match_expressions: Iterable[Mapping] = ()) -> "LabelSelector":
        """From the Kubernetes shape; keys without a source match any source. Inputs are assumed
        validated (see ``enforcer.policy``)."""
        ml = frozenset((*split_key(k, ANY_SOURCE), v) for k, v in (match_labels or {}).items())
        exprs = []
        for e in match_expressions:
            source, key = split_key(e["key"], ANY_SOURCE)
            exprs.append(Requirement(source, key, e["operator"], frozenset(e.get("values") or ())))
        exprs.sort(key=lambda r: (r.source, r.key, r.operator, sorted(r.values)))
        return cls(ml, tuple(exprs))

    @property
    def is_empty(self) -> bool:
        return not self.match_labels and not self.match_expressions

    def matches(self, labels: Labels) -> bool:
        for source, key, value in self.match_labels:
            if value not in labels.values(source, key):
                return False
        for req in self.match_expressions:
            if not req.matches(labels):
                return False
        return True

    def names_namespace(self) -> bool:
        """True when the selector says something about the pod namespace label itself."""
        return any(k == NAMESPACE_KEY for _, k, _ in self.match_labels) or any(
            r.key == NAMESPACE_KEY for r in self.match_expressions)

    def with_label(self, source: str, key: str, value: str) -> "LabelSelector":
        return LabelSelector(self.match_labels | {(source, key, value)}, self.match_expressions)

    def __str__(self) -> str:
        parts = [f"{s}:{k}={v}" for s, k, v in sorted(self.match_labels)]
        for r in self.match_expressions:
            vals = ",".join(sorted(r.values))
            parts.append(f"{r.source}:{r.key} {r.operator}" + (f" ({vals})" if vals else ""))
        return "{" + ", ".join(parts) + "}"


def namespaced_subject(selector: LabelSelector, namespace: str) -> LabelSelector:
    """The subject selector of a policy in ``namespace`` ("" = cluster-wide: unchanged)."""
    if not namespace:
        return selector
    return selector.with_label(K8S_SOURCE, NAMESPACE_KEY, namespace)


def namespaced_peer(selector: LabelSelector, namespace: str) -> LabelSelector:
    """A peer selector of a policy in ``namespace``: restricted to that namespace unless it names the
    namespace label itself ("" = cluster-wide: unchanged)."""
    if not namespace or selector.names_namespace():
        return selector
    return selector.with_label(K8S_SOURCE, NAMESPACE_KEY, namespace)


class SelectorCache:
    """Which of a fixed set of identities a selector selects, fast.

    ``matchLabels`` requirements are answered from an inverted index (label -> identities); only the
    remaining candidates are checked one by one. Results are cached per selector.
    """

    def __init__(self, identities: Mapping[int, Labels]):
        self.identities = dict(identities)
        self._all = frozenset(self.identities)
        self._by_label: dict[tuple[str, str, str], set[int]] = {}
        for ident, labels in self.identities.items():
            for l in labels:
                self._by_label.setdefault((l.source, l.key, l.value), set()).add(ident)
                self._by_label.setdefault((ANY_SOURCE, l.key, l.value), set()).add(ident)
        self._cache: dict[LabelSelector, frozenset[int]] = {}

    def select(self, selector: LabelSelector) -> frozenset[int]:
        hit = self._cache.get(selector)
        if hit is not None:
            return hit
        if selector.is_empty:
            result = self._all
        else:
            candidates: Optional[set[int]] = None
            for req in sorted(selector.match_labels, key=lambda r: len(self._by_label.get(r, ()))):
                ids = self._by_label.get(req)
                if not ids:
                    candidates = set()
                    break
                candidates = set(ids) if candidates is None else candidates & ids
                if not candidates:
                    break
            pool = self._all if candidates is None else candidates
            if selector.match_expressions:
                result = frozenset(i for i in pool if all(r.matches(self.identities[i]) for r in selector.match_expressions))
            else:
                result = frozenset(pool)
        self._cache[selector] = result
        return result
