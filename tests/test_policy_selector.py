"""Label selectors: source prefixes, operators, Cilium's namespacing, the indexed selector cache."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer.selector import (Label, LabelSelector, Labels, SelectorCache, namespaced_peer, namespaced_subject,
                               parse_label)

WEB_PROD = Labels(["k8s:app=web", "k8s:tier=front", "k8s:io.kubernetes.pod.namespace=prod"])
WEB_DEV = Labels(["k8s:app=web", "k8s:io.kubernetes.pod.namespace=dev"])
CONTAINER_APP = Labels(["container:app=web", "k8s:io.kubernetes.pod.namespace=prod"])
HOST = Labels(["reserved:host"])
WORLD = Labels(["reserved:world"])


def sel(match_labels=None, exprs=()):
    return LabelSelector.from_k8s(match_labels or {}, [dict(key=k, operator=o, values=v) for k, o, v in exprs])


@pytest.mark.parametrize("text,label", [
    ("k8s:app=web", Label("k8s", "app", "web")),
    ("app=web", Label("k8s", "app", "web")),
    ("reserved:host", Label("reserved", "host", "")),
    ("k8s:a=b:c", Label("k8s", "a", "b:c")),
    ("a=b:c", Label("k8s", "a", "b:c")),
    ("cidr:10.0.0.0/8", Label("cidr", "10.0.0.0/8", "")),
])
def test_parse_label(text, label):
    assert parse_label(text) == label


def test_label_str_round_trip():
    for text in ("k8s:app=web", "reserved:host", "cidr:10.0.0.0/8"):
        assert str(parse_label(text)) == text


@pytest.mark.parametrize("selector,labels,expected", [
    ({"app": "web"}, WEB_PROD, True),             # no source: any source
    ({"any:app": "web"}, CONTAINER_APP, True),    # any: explicit
    ({"app": "web"}, CONTAINER_APP, True),
    ({"k8s:app": "web"}, WEB_PROD, True),         # k8s source only
    ({"k8s:app": "web"}, CONTAINER_APP, False),
    ({"container:app": "web"}, CONTAINER_APP, True),
    ({"app": "db"}, WEB_PROD, False),
    ({"app": "web", "tier": "front"}, WEB_PROD, True),   # AND
    ({"app": "web", "tier": "front"}, WEB_DEV, False),
    ({}, WEB_PROD, True),                          # {} selects all
    ({}, WORLD, True),
    ({"reserved:host": ""}, HOST, True),
    ({"reserved:host": ""}, WEB_PROD, False),
    ({"k8s:io.kubernetes.pod.namespace": "prod"}, WEB_PROD, True),
])
def test_match_labels(selector, labels, expected):
    assert sel(selector).matches(labels) is expected


@pytest.mark.parametrize("expr,labels,expected", [
    (("app", "In", ["web", "api"]), WEB_PROD, True),
    (("app", "In", ["api"]), WEB_PROD, False),
    (("app", "NotIn", ["api"]), WEB_PROD, True),
    (("app", "NotIn", ["web"]), WEB_PROD, False),
    (("app", "NotIn", ["web"]), HOST, True),        # absent key satisfies NotIn (Kubernetes)
    (("tier", "Exists", []), WEB_PROD, True),
    (("tier", "Exists", []), WEB_DEV, False),
    (("tier", "DoesNotExist", []), WEB_DEV, True),
    (("tier", "DoesNotExist", []), WEB_PROD, False),
    (("k8s:app", "Exists", []), CONTAINER_APP, False),
    (("app", "Exists", []), CONTAINER_APP, True),
])
def test_match_expressions(expr, labels, expected):
    assert sel({}, [expr]).matches(labels) is expected


def test_namespaced_subject_and_peer():
    web = sel({"app": "web"})
    # A namespaced policy selects its own namespace only.
    assert namespaced_subject(web, "prod").matches(WEB_PROD)
    assert not namespaced_subject(web, "prod").matches(WEB_DEV)
    assert namespaced_subject(sel({}), "prod").matches(WEB_PROD)
    assert not namespaced_subject(sel({}), "prod").matches(WORLD)
    # Cluster-wide: unchanged.
    assert namespaced_subject(web, "") == web
    # Peer selectors: same namespace unless the namespace label is named (with or without source).
    assert not namespaced_peer(web, "prod").matches(WEB_DEV)
    for key in ("k8s:io.kubernetes.pod.namespace", "io.kubernetes.pod.namespace", "any:io.kubernetes.pod.namespace"):
        cross = sel({"app": "web", key: "dev"})
        assert namespaced_peer(cross, "prod") == cross
        assert namespaced_peer(cross, "prod").matches(WEB_DEV)
    any_ns = sel({"app": "web"}, [("k8s:io.kubernetes.pod.namespace", "Exists", [])])
    assert namespaced_peer(any_ns, "prod").matches(WEB_DEV) and namespaced_peer(any_ns, "prod").matches(WEB_PROD)
    # {} in a namespaced policy = every endpoint of that namespace, not the world.
    assert not namespaced_peer(sel({}), "prod").matches(WORLD)
    assert namespaced_peer(sel({}), "prod").matches(WEB_PROD)


def test_selectors_are_hashable_values():
    a = sel({"app": "web"}, [("tier", "In", ["b", "a"])])
    b = sel({"any:app": "web"}, [("tier", "In", ["a", "b"])])
    assert a == b and hash(a) == hash(b)
    assert str(a) == "{any:app=web, any:tier In (a,b)}"


_keys = st.sampled_from(["app", "k8s:app", "tier", "k8s:io.kubernetes.pod.namespace", "container:app"])
_vals = st.sampled_from(["a", "b", "c"])
_label_sets = st.lists(st.tuples(st.sampled_from(["k8s", "container"]), st.sampled_from(["app", "tier", "io.kubernetes.pod.namespace"]),
                                 _vals), max_size=4).map(lambda ls: Labels([Label(*l) for l in ls]))
_exprs = st.lists(st.one_of(
    st.tuples(_keys, st.sampled_from(["In", "NotIn"]), st.lists(_vals, min_size=1, max_size=2)),
    st.tuples(_keys, st.sampled_from(["Exists", "DoesNotExist"]), st.just([]))), max_size=2)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_keys, _vals, max_size=2), _exprs, st.lists(_label_sets, min_size=1, max_size=8))
def test_selector_cache_equals_brute_force(match_labels, exprs, label_sets):
    s = sel(match_labels, exprs)
    ids = {256 + i: ls for i, ls in enumerate(label_sets)}
    cache = SelectorCache(ids)
    assert cache.select(s) == frozenset(i for i, ls in ids.items() if s.matches(ls))
    assert cache.select(s) is cache.select(s)
