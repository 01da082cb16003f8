"""Policy language: parsing, validation errors with exact field paths, canonical form, fuzzing."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enforcer.policy import (AUDIT_ANNOTATION, KIND_CCNP, Policy, PolicyError, PolicyValidationError, load_policies,
                             load_policy)
from fuzz_docs import mutated

VALID = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: api
  namespace: prod
spec:
  endpointSelector:
    matchLabels: {app: api}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: frontend}
    toPorts:
    - ports:
      - {port: "8080", protocol: TCP}
      rules:
        http:
        - {method: GET, path: "/users/.*"}
  - fromCIDRSet:
    - {cidr: 192.0.2.0/24, except: [192.0.2.128/25]}
    icmps:
    - fields: [{type: EchoRequest}]
  egressDeny:
  - toEntities: [world]
    toPorts:
    - ports: [{port: "25", protocol: TCP}]
"""


def base() -> dict:
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "p", "namespace": "prod"},
        "spec": {"endpointSelector": {"matchLabels": {"app": "api"}},
                 "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "fe"}}],
                              "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}]},
    }


def errors_of(doc) -> list[tuple[str, str]]:
    with pytest.raises(PolicyValidationError) as ei:
        load_policies(doc)
    return [(e.path, e.message) for e in ei.value.errors]


def with_(path: str, value):
    """base() with one field replaced; path like 'spec.ingress.0.toPorts.0.ports.0.port'."""
    doc = base()
    node = doc
    parts = [int(p) if p.isdigit() else p for p in path.split(".")]
    for p in parts[:-1]:
        node = node[p]
    node[parts[-1]] = value
    return doc


P0 = "spec.ingress[0].toPorts[0].ports[0]"

# (description, document, expected (path, message) list)
CATALOGUE = [
    ("port with letters", with_("spec.ingress.0.toPorts.0.ports.0.port", "80x"),
     [(f"{P0}.port", '"80x" is not a port number or range')]),
    ("port out of range", with_("spec.ingress.0.toPorts.0.ports.0.port", 70000),
     [(f"{P0}.port", "70000 is not a port number or range (0-65535)")]),
    ("named port", with_("spec.ingress.0.toPorts.0.ports.0.port", "http"),
     [(f"{P0}.port", '"http" is not a port number or range (named ports are not supported)')]),
    ("boolean port", with_("spec.ingress.0.toPorts.0.ports.0.port", True),
     [(f"{P0}.port", "true is not a port number or range")]),
    ("endPort below port", with_("spec.ingress.0.toPorts.0.ports.0.endPort", 79),
     [(P0, "endPort 79 is lower than port 80")]),
    ("endPort out of range", with_("spec.ingress.0.toPorts.0.ports.0.endPort", 65536),
     [(f"{P0}.endPort", "65536 is not a port number (0-65535)")]),
    ("unknown protocol", with_("spec.ingress.0.toPorts.0.ports.0.protocol", "TCPP"),
     [(f"{P0}.protocol", '"TCPP" is not a protocol (TCP, UDP, SCTP, ICMP, ICMPv6, ANY)')]),
    ("ICMP type too big", with_("spec.ingress.0.toPorts.0.ports.0", {"port": "300", "protocol": "ICMP"}),
     [(P0, "ICMP type 300 is out of range (0-255)")]),
    ("empty ports", with_("spec.ingress.0.toPorts.0.ports", []),
     [("spec.ingress[0].toPorts[0].ports", "must not be empty")]),
    ("bad CIDR", with_("spec.ingress.0", {"fromCIDR": ["10.0.0.0/8", "10.0.0.300/8"]}),
     [("spec.ingress[0].fromCIDR[1]", '"10.0.0.300/8" is not a CIDR (address/prefix length)')]),
    ("except outside cidr", with_("spec.ingress.0", {"fromCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}]}),
     [("spec.ingress[0].fromCIDRSet[0]", "except[0] 11.0.0.0/16 is not inside cidr 10.0.0.0/8")]),
    ("unknown entity", with_("spec.ingress.0", {"fromEntities": ["wrld"]}),
     [("spec.ingress[0].fromEntities[0]", '"wrld" is not an entity (all, world, cluster, host, remote-node, health, '
                                          'init, kube-apiserver, unmanaged, ingress)')]),
    ("typo field", with_("spec.ingress.0", {"fromEndpoint": [{}]}),
     [("spec.ingress[0].fromEndpoint", "unknown field (did you mean 'fromEndpoints'?)")]),
    ("unsupported field", with_("spec.egress", [{"toFQDNs": [{"matchName": "x.com"}]}]),
     [("spec.egress[0].toFQDNs", "FQDN policies (toFQDNs) are not supported by Flowscope")]),
    ("ingress not a list", with_("spec.ingress", {"fromEntities": ["world"]}),
     [("spec.ingress", "expected a list, got an object")]),
    ("non-string label value", with_("spec.endpointSelector.matchLabels", {"version": 1.5}),
     [("spec.endpointSelector.matchLabels", 'value of "version" must be a string, got 1.5 (quote it in YAML)')]),
    ("bad label key", with_("spec.endpointSelector.matchLabels", {"a b": "x"}),
     [("spec.endpointSelector.matchLabels", '"a b" is not a valid label key')]),
    ("In without values", with_("spec.endpointSelector", {"matchExpressions": [{"key": "app", "operator": "In"}]}),
     [("spec.endpointSelector.matchExpressions[0]", "operator In needs at least one value")]),
    ("Exists with values", with_("spec.endpointSelector", {"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["x"]}]}),
     [("spec.endpointSelector.matchExpressions[0]", "operator Exists takes no values")]),
    ("bad operator", with_("spec.endpointSelector", {"matchExpressions": [{"key": "app", "operator": "Equals", "values": ["x"]}]}),
     [("spec.endpointSelector.matchExpressions[0].operator", '"Equals" is not a selector operator (In, NotIn, Exists, DoesNotExist)')]),
    ("missing endpointSelector", {"metadata": {"name": "p"}, "spec": {"ingress": [{}]}},
     [("spec.endpointSelector", "is required")]),
    ("no spec", {"metadata": {"name": "p"}},
     [("spec", "a policy needs spec or specs")]),
    ("bad name", with_("metadata.name", "Bad_Name"),
     [("metadata.name", "\"Bad_Name\" is not a valid name (lower-case letters, digits, '-' and '.', at most 253)")]),
    ("missing name", with_("metadata", {"namespace": "prod"}),
     [("metadata.name", "is required")]),
    ("bad kind", with_("kind", "NetworkPolicy"),
     [("kind", '"NetworkPolicy" is not a supported kind (CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy)')]),
    ("bad apiVersion", with_("apiVersion", "networking.k8s.io/v1"),
     [("apiVersion", '"networking.k8s.io/v1" is not a supported apiVersion (cilium.io/v2)')]),
    ("clusterwide with namespace", with_("kind", KIND_CCNP),
     [("metadata.namespace", "a CiliumClusterwideNetworkPolicy has no namespace")]),
    ("bad audit annotation", with_("metadata.annotations", {AUDIT_ANNOTATION: "yes"}),
     [("metadata.annotations", f'annotation {AUDIT_ANNOTATION} must be "true" or "false", got "yes"')]),
    ("auditMode not a bool", with_("spec.auditMode", "on"),
     [("spec.auditMode", 'expected true or false, got "on"')]),
    ("L7 in deny rule", with_("spec.ingressDeny", [{"toPorts": [{"ports": [{"port": "80"}], "rules": {"http": [{}]}}]}]),
     [("spec.ingressDeny[0].toPorts[0].rules", "L7 rules are not allowed in deny rules")]),
    ("http on UDP", with_("spec.ingress.0.toPorts.0", {"ports": [{"port": "53", "protocol": "UDP"}], "rules": {"http": [{}]}}),
     [("spec.ingress[0].toPorts[0]", "http rules need TCP, but ports[0] has protocol UDP")]),
    ("http on a range", with_("spec.ingress.0.toPorts.0", {"ports": [{"port": "80", "endPort": 90}], "rules": {"http": [{}]}}),
     [("spec.ingress[0].toPorts[0]", "http rules need a single port, but ports[0] is a range")]),
    ("bad path regex", with_("spec.ingress.0.toPorts.0.rules", {"http": [{"path": "/a(["}]}),
     [("spec.ingress[0].toPorts[0].rules.http[0].path",
       '"/a([" is not a valid regular expression: unterminated character set at position 3')]),
    ("bad header", with_("spec.ingress.0.toPorts.0.rules", {"http": [{"headers": ["Bad Header: x"]}]}),
     [("spec.ingress[0].toPorts[0].rules.http[0].headers[0]", '"Bad Header: x" is not a header ("Name" or "Name: value")')]),
    ("unknown kafka api key", with_("spec.ingress.0.toPorts.0.rules", {"kafka": [{"apiKey": "prodce"}]}),
     [("spec.ingress[0].toPorts[0].rules.kafka[0].apiKey", "\"prodce\" is not a known Kafka API key (did you mean 'produce'?)")]),
    ("kafka role and apiKey", with_("spec.ingress.0.toPorts.0.rules", {"kafka": [{"role": "produce", "apiKey": "fetch"}]}),
     [("spec.ingress[0].toPorts[0].rules.kafka[0]", "role and apiKey cannot both be set")]),
    ("bad kafka topic", with_("spec.ingress.0.toPorts.0.rules", {"kafka": [{"topic": "a/b"}]}),
     [("spec.ingress[0].toPorts[0].rules.kafka[0].topic", '"a/b" is not a valid Kafka topic (1-255 of a-z A-Z 0-9 . _ -)')]),
    ("http and kafka mixed", with_("spec.ingress.0.toPorts.0.rules", {"http": [{}], "kafka": [{}]}),
     [("spec.ingress[0].toPorts[0].rules", "http and kafka rules cannot be mixed in one port rule")]),
    ("bad ICMP name", with_("spec.ingress.0", {"icmps": [{"fields": [{"type": "Ping"}]}]}),
     [("spec.ingress[0].icmps[0].fields[0].type", '"Ping" is not an ICMP type (0-255 or a name such as EchoRequest)')]),
    ("ICMPv6 name for IPv4", with_("spec.ingress.0", {"icmps": [{"fields": [{"type": "PacketTooBig", "family": "IPv4"}]}]}),
     [("spec.ingress[0].icmps[0].fields[0]", '"PacketTooBig" is not an IPv4 ICMP type')]),
    ("label with dots in path", with_("metadata.labels", {"app.kubernetes.io/name": 3}),
     [("metadata.labels", 'value of "app.kubernetes.io/name" must be a string, got 3 (quote it in YAML)')]),
]


@pytest.mark.parametrize("doc,expected", [(c[1], c[2]) for c in CATALOGUE], ids=[c[0] for c in CATALOGUE])
def test_validation_catalogue(doc, expected):
    assert errors_of(doc) == expected


def test_brief_example_message_text():
    doc = with_("spec.ingress.0.toPorts.0.ports.0.port", "80x")
    with pytest.raises(PolicyValidationError) as ei:
        load_policies(doc)
    assert str(ei.value.errors[0]) == ('policy prod/p: spec.ingress[0].toPorts[0].ports[0].port: '
                                      '"80x" is not a port number or range')
    assert isinstance(ei.value, ValueError)


def test_all_errors_are_collected_not_just_the_first():
    doc = base()
    doc["metadata"]["name"] = "UPPER"
    doc["spec"]["ingress"][0]["toPorts"][0]["ports"] = [{"port": "80x"}, {"port": 1, "protocol": "XYZ"}]
    doc["spec"]["egress"] = [{"toCIDR": ["nope"]}, {"toEntities": ["moon"]}]
    paths = [p for p, _ in errors_of(doc)]
    assert sorted(paths) == sorted([
        "metadata.name",
        "spec.ingress[0].toPorts[0].ports[0].port",
        "spec.ingress[0].toPorts[0].ports[1].protocol",
        "spec.egress[0].toCIDR[0]",
        "spec.egress[1].toEntities[0]",
    ])


def test_errors_across_documents_name_the_document_and_policy():
    text = """
metadata: {name: a}
spec: {endpointSelector: {}}
---
metadata: {name: b, namespace: dev}
spec: {endpointSelector: {}, ingress: [{toPorts: [{ports: [{port: "x1"}]}]}]}
---
metadata: {name: a}
spec: {endpointSelector: {}}
"""
    with pytest.raises(PolicyValidationError) as ei:
        load_policies(text)
    errs = ei.value.errors
    assert [(e.where, e.policy, e.path) for e in errs] == [
        ("document 2", "dev/b", "spec.ingress[0].toPorts[0].ports[0].port"),
        ("document 3", "default/a", "metadata.name"),
    ]
    assert errs[1].message == "policy default/a is already defined in document 1"
    assert "document 2, policy dev/b: spec.ingress[0]" in str(ei.value)


def test_invalid_yaml_reports_line_and_column():
    # (wording comes from libyaml or PyYAML, whichever is installed; the position is ours)
    [(path, message)] = errors_of("metadata: {name: a\nspec: [")
    assert path == "" and message.startswith("invalid YAML: ") and message.endswith(" at line 2, column 5")


def test_duplicate_keys_are_errors_not_silently_dropped():
    text = "metadata: {name: a}\nspec:\n  endpointSelector: {}\n  ingress: [{}]\n  ingress: []\n"
    assert errors_of(text) == [("", 'invalid YAML: duplicate key "ingress" at line 5, column 3')]
    assert errors_of('{"metadata": {"name": "a", "name": "b"}, "spec": {"endpointSelector": {}}}') == [
        ("", 'invalid JSON: duplicate key "name"')]
    # YAML merge keys are not duplicates.
    merged = ("metadata: {name: a}\nspec:\n  endpointSelector: &sel {matchLabels: {app: a}}\n"
              "  egress:\n  - toEndpoints:\n    - <<: *sel\n      matchLabels: {app: b}\n")
    p = load_policy(merged)
    assert p.to_dict()["spec"]["egress"] == [{"toEndpoints": [{"matchLabels": {"app": "b"}}]}]


@pytest.mark.parametrize("data,message", [
    ("", "no policy found in the input"),
    (b"\xff\xfe", "input is not UTF-8 text (invalid start byte at byte 0)"),
    ("42", "expected an object, got a number"),
    ("a: &x [*x]", "the document refers to itself (recursive YAML anchor)"),
    ("[" * 100 + "]" * 100, "the document is nested too deeply (more than 64 levels)"),
])
def test_garbage_inputs(data, message):
    with pytest.raises(PolicyValidationError) as ei:
        load_policies(data)
    assert [e.message for e in ei.value.errors] == [message]


def test_accepts_one_document_list_multidoc_and_items():
    one = load_policies(VALID)
    assert [p.ref for p in one] == ["prod/api"]
    as_json = json.dumps(one[0].to_dict())
    assert load_policies(as_json) == one
    listed = load_policies(json.dumps([base(), {**base(), "metadata": {"name": "q"}}]))
    assert [p.ref for p in listed] == ["prod/p", "default/q"]
    items = load_policies({"apiVersion": "v1", "kind": "List", "items": [base()]})
    assert [p.ref for p in items] == ["prod/p"]
    multi = load_policies(VALID + "\n---\n" + json.dumps(base()))
    assert [p.ref for p in multi] == ["prod/api", "prod/p"]
    assert load_policy(VALID).ref == "prod/api"


def test_namespace_defaults_and_cluster_wide():
    doc = base()
    del doc["metadata"]["namespace"]
    assert load_policy(doc).namespace == "default"
    assert load_policy(doc, default_namespace="team").namespace == "team"
    doc["kind"] = KIND_CCNP
    p = load_policy(doc)
    assert p.namespace == "" and p.cluster_wide and p.ref == "p"


def test_kubectl_bookkeeping_is_ignored_but_typos_are_not():
    doc = base()
    doc["metadata"].update(uid="1234", resourceVersion="77", creationTimestamp="2024-01-01T00:00:00Z")
    doc["status"] = {"conditions": []}
    p = load_policy(doc)
    assert "uid" not in json.dumps(p.to_dict()) and "status" not in p.to_dict()
    doc["metadata"]["namspace"] = "x"
    assert errors_of(doc) == [("metadata.namspace", "unknown field (did you mean 'namespace'?)")]


def test_canonical_form_and_hash():
    p = load_policy(VALID)
    d = p.to_dict()
    assert d["spec"]["ingress"][1]["fromCIDRSet"] == [{"cidr": "192.0.2.0/24", "except": ["192.0.2.128/25"]}]
    assert d["spec"]["ingress"][1]["icmps"] == [{"fields": [{"type": 8}]}]  # name resolved, family default dropped
    # Same content written differently -> same canonical JSON and hash.
    other = base()
    other["spec"]["ingress"][0]["toPorts"][0]["ports"][0] = {"protocol": "tcp", "port": 80}
    other["spec"]["egress"] = []
    other["spec"]["auditMode"] = False
    other["metadata"] = {"namespace": "prod", "name": "p"}
    a, b = load_policy(base()), load_policy(other)
    assert a.to_json() == b.to_json() and a.content_hash == b.content_hash
    # Round trip through canonical JSON and YAML is a fixed point.
    assert load_policy(p.to_json()).to_json() == p.to_json()
    assert load_policy(p.to_yaml()).to_json() == p.to_json()
    assert p.to_yaml().startswith("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:")
    # Revision is not content.
    assert p.with_revision(7).content_hash == p.content_hash and p.with_revision(7) != p
    # A real change changes the hash.
    changed = base()
    changed["spec"]["ingress"][0]["toPorts"][0]["ports"][0]["port"] = "81"
    assert load_policy(changed).content_hash != a.content_hash


def test_port_range_shorthand_and_helpers():
    doc = with_("spec.ingress.0.toPorts.0.ports", [{"port": "8000-8080", "protocol": "UDP"}, {"port": 0}, {"port": "5", "endPort": 5}])
    p = load_policy(doc)
    ports = p.to_dict()["spec"]["ingress"][0]["toPorts"][0]["ports"]
    assert ports == [{"port": "8000", "endPort": 8080, "protocol": "UDP"}, {}, {"port": "5"}]
    rule = p.specs[0].ingress[0]
    assert rule.l4() == ((17, 8000, 8080), (6, 0, 65535), (17, 0, 65535), (132, 0, 65535), (6, 5, 5), (17, 5, 5), (132, 5, 5))


def test_audit_flags():
    doc = base()
    doc["spec"]["auditMode"] = True
    p = load_policy(doc)
    assert p.spec_audit(p.specs[0]) and p.audit and not p.annotation_audit
    doc = base()
    doc["metadata"]["annotations"] = {AUDIT_ANNOTATION: "true"}
    p = load_policy(doc)
    assert p.annotation_audit and p.spec_audit(p.specs[0])
    assert not load_policy(base()).audit


def test_specs_list_and_default_deny_flags():
    doc = base()
    spec = doc.pop("spec")
    doc["specs"] = [spec, {"endpointSelector": {}, "egressDeny": [{"toEntities": ["world"]}],
                           "enableDefaultDeny": {"egress": False}}]
    p = load_policy(doc)
    assert len(p.specs) == 2
    assert p.specs[0].default_deny("ingress") and not p.specs[0].default_deny("egress")
    assert not p.specs[1].default_deny("egress") and not p.specs[1].default_deny("ingress")


def test_error_str_forms():
    assert str(PolicyError("spec", "bad")) == "spec: bad"
    assert str(PolicyError("", "bad", "document 2")) == "document 2: bad"


# ---------------------------------------------------------------------------------------------
# Fuzz: garbage in -> PolicyValidationError or a valid Policy, never another exception
# ---------------------------------------------------------------------------------------------

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70), st.floats(allow_nan=True),
                     st.text(max_size=12), st.sampled_from(["80", "TCP", "world", "10.0.0.0/8", "In", "app", "",
                                                            "8000-8080", "EchoRequest", "IPv6", "cilium.io/v2"]))
_json = st.recursive(_scalars, lambda ch: st.one_of(st.lists(ch, max_size=4),
                                                      st.dictionaries(st.text(max_size=10), ch, max_size=4)),
                     max_leaves=30)


def _check(data):
    try:
        out = load_policies(data)
    except PolicyValidationError as e:
        assert e.errors and all(isinstance(x, PolicyError) for x in e.errors)
        str(e)
        return
    assert all(isinstance(p, Policy) for p in out)
    for p in out:  # whatever validates must serialise and reload to itself
        assert load_policy(p.to_json()).to_json() == p.to_json()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_json)
def test_fuzz_arbitrary_data(data):
    _check(data)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_arbitrary_text(text):
    _check(text)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(list("{}[]:,-&*!|>'\"#% \n\tabc01.") + ["!!binary ", "!!python/name:os.system ", "<<: "]),
                max_size=60).map("".join))
def test_fuzz_yaml_syntax(text):
    _check(text)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


_VALID_DOC = load_policy(VALID).to_dict()
_ALL_PATHS = [p for p in _paths(_VALID_DOC) if p]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_ALL_PATHS), _json), min_size=1, max_size=3))
def test_fuzz_mutated_valid_policy(mutations):
    doc = mutated(_VALID_DOC, mutations)
    _check(doc)
    _check(json.dumps(doc, default=str))
