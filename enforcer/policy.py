"""CiliumNetworkPolicy, the useful core: parse YAML/JSON, validate with precise errors, normalise.

Input
    :func:`load_policies` takes text (YAML or JSON; one document, several ``---`` documents, a list,
    or a ``{"items": [...]}`` list object) or already-parsed data, and returns :class:`Policy` objects
    or raises :class:`PolicyValidationError` carrying *all* problems found, each with the field path
    and the reason, e.g. ``spec.ingress[0].toPorts[0].ports[0].port: "80x" is not a port number or
    range``. Nothing else escapes for bad input.

Accepted (as Cilium's ``cilium.io/v2`` CRDs)
    ``kind`` CiliumNetworkPolicy (namespaced; the namespace defaults to ``default``) or
    CiliumClusterwideNetworkPolicy; ``metadata{name, namespace, labels, annotations}``;
    ``spec`` and/or ``specs[]`` with ``endpointSelector{matchLabels, matchExpressions}``,
    ``ingress[]``, ``egress[]``, ``ingressDeny[]``, ``egressDeny[]``, ``enableDefaultDeny{ingress,
    egress}``, ``description``. Rules: ``fromEndpoints/toEndpoints`` (label selectors),
    ``fromCIDR/toCIDR``, ``fromCIDRSet/toCIDRSet{cidr, except}``, ``fromEntities/toEntities``
    (:data:`ENTITIES`), ``toPorts[{ports[{port, endPort, protocol}], rules{http[], kafka[]}}]``
    (L7 rules validated and kept; deny rules cannot carry them), ``icmps[{fields[{type, family}]}]``.

Flowscope extension
    Audit mode per policy: ``spec.auditMode: true`` (per spec) or the annotation
    ``flowscope.io/audit-mode: "true"`` (whole policy). Audit-mode rules never change what is
    forwarded; they report what they would drop (see ``enforcer.decide``).

Semantics notes (Cilium's): an empty list is the same as an absent one; a rule with ``toPorts`` or
``icmps`` but no peer fields applies to every peer (L4-only); a rule with peers but no ports applies to
every protocol and port (L3-only); an empty rule ``{}`` allows nothing but still puts the endpoint under
policy in that direction; deny rules put it under policy too (``enableDefaultDeny: {ingress: false}``
keeps a policy from doing so). ``{}`` as a peer selector means every endpoint of the policy's
namespace, or every identity (world included) in a cluster-wide policy. ``port: 0`` (or absent) means every port; protocol ``ANY`` means TCP, UDP and
SCTP; for ICMP/ICMPv6 the "port" is the ICMP type.

Output
    :meth:`Policy.to_dict` / :meth:`Policy.to_json` give the canonical form (normalised CIDRs, ports,
    protocols; defaults dropped; keys sorted), stable across load/dump round trips;
    :attr:`Policy.content_hash` is its SHA-256 (the revision is not part of it).
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import json
import re
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Annotated, Any, Iterable, Iterator, Optional

import orjson
import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .selector import OPERATORS, LabelSelector

API_VERSION = "cilium.io/v2"
KIND_CNP = "CiliumNetworkPolicy"
KIND_CCNP = "CiliumClusterwideNetworkPolicy"
KINDS = (KIND_CNP, KIND_CCNP)
AUDIT_ANNOTATION = "flowscope.io/audit-mode"

ENTITIES = ("all", "world", "cluster", "host", "remote-node", "health", "init", "kube-apiserver", "unmanaged", "ingress")

PROTO_ICMP, PROTO_TCP, PROTO_UDP, PROTO_ICMPV6, PROTO_SCTP = 1, 6, 17, 58, 132
PROTOCOLS: dict[str, tuple[int, ...]] = {
    "TCP": (PROTO_TCP,), "UDP": (PROTO_UDP,), "SCTP": (PROTO_SCTP,), "ICMP": (PROTO_ICMP,),
    "ICMPv6": (PROTO_ICMPV6,), "ANY": (PROTO_TCP, PROTO_UDP, PROTO_SCTP),
}
_PROTO_NAMES = {k.upper(): k for k in PROTOCOLS}

ICMPV4_TYPES = {
    "EchoReply": 0, "DestinationUnreachable": 3, "Redirect": 5, "Echo": 8, "EchoRequest": 8,
    "RouterAdvertisement": 9, "RouterSelection": 10, "TimeExceeded": 11, "ParameterProblem": 12,
    "Timestamp": 13, "TimestampReply": 14, "Photuris": 40, "ExtendedEchoRequest": 42, "ExtendedEchoReply": 43,
}
ICMPV6_TYPES = {
    "DestinationUnreachable": 1, "PacketTooBig": 2, "TimeExceeded": 3, "ParameterProblem": 4,
    "EchoRequest": 128, "EchoReply": 129, "MulticastListenerQuery": 130, "MulticastListenerReport": 131,
    "MulticastListenerDone": 132, "RouterSolicitation": 133, "RouterAdvertisement": 134,
    "NeighborSolicitation": 135, "NeighborAdvertisement": 136, "RedirectMessage": 137,
    "RouterRenumbering": 138, "ICMPNodeInformationQuery": 139, "ICMPNodeInformationResponse": 140,
    "InverseNeighborDiscoverySolicitation": 141, "InverseNeighborDiscoveryAdvertisement": 142,
    "HomeAgentAddressDiscoveryRequest": 144, "HomeAgentAddressDiscoveryReply": 145,
    "MobilePrefixSolicitation": 146, "MobilePrefixAdvertisement": 147, "DuplicateAddressRequestCodeSuffix": 157,
    "DuplicateAddressConfirmationCodeSuffix": 158, "ExtendedEchoRequest": 160, "ExtendedEchoReply": 161,
}

KAFKA_API_KEYS = (
    "produce", "fetch", "offsets", "metadata", "leaderandisr", "stopreplica", "updatemetadata",
    "controlledshutdown", "offsetcommit", "offsetfetch", "findcoordinator", "joingroup", "heartbeat",
    "leavegroup", "syncgroup", "describegroups", "listgroups", "saslhandshake", "apiversions",
    "createtopics", "deletetopics", "deleterecords", "initproducerid", "offsetforleaderepoch",
    "addpartitionstotxn", "addoffsetstotxn", "endtxn", "writetxnmarkers", "txnoffsetcommit",
    "describeacls", "createacls", "deleteacls", "describeconfigs", "alterconfigs",
)
KAFKA_ROLES = ("produce", "consume")

# Cilium fields Flowscope knows but does not implement: a clear "not supported" beats "unknown field".
UNSUPPORTED_FIELDS = {
    "nodeSelector": "host policies (nodeSelector)", "fromRequires": "fromRequires", "toRequires": "toRequires",
    "fromGroups": "cloud groups", "toGroups": "cloud groups", "toFQDNs": "FQDN policies (toFQDNs)",
    "toServices": "service selectors (toServices)", "fromNodes": "node selectors", "toNodes": "node selectors",
    "authentication": "mutual authentication", "terminatingTLS": "TLS interception",
    "originatingTLS": "TLS interception", "serverNames": "TLS SNI rules", "listener": "Envoy listeners",
    "cidrGroupRef": "CIDR groups", "cidrGroupSelector": "CIDR groups", "dns": "DNS rules",
    "l7proto": "generic L7 parsers", "l7": "generic L7 parsers", "labels": "rule labels",
}
# Kubernetes bookkeeping in metadata, accepted and dropped (``kubectl get -o yaml`` output).
_IGNORED_METADATA = {
    "uid", "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp",
    "deletionGracePeriodSeconds", "managedFields", "ownerReferences", "finalizers", "selfLink", "generateName",
}
MAX_INPUT_BYTES = 16 << 20
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~5x faster
MAX_DEPTH = 64
MAX_NODES = 500_000


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyError:
    """One problem: ``path`` inside the policy document (``spec.ingress[0].fromCIDR[1]``), the reason,
    where the document was in the input (``document 2``, ``items[3]``; empty for a lone document) and
    the policy (``namespace/name``) when known."""

    path: str
    message: str
    where: str = ""
    policy: str = ""

    def __str__(self) -> str:
        head = ", ".join(x for x in (self.where, f"policy {self.policy}" if self.policy else "") if x)
        body = f"{self.path}: {self.message}" if self.path else self.message
        return f"{head}: {body}" if head else body


class PolicyValidationError(ValueError):
    """Every problem found in the input, in document order."""

    def __init__(self, errors: Iterable[PolicyError]):
        self.errors: list[PolicyError] = list(errors)
        n = len(self.errors)
        lines = "\n".join(f"  {e}" for e in self.errors)
        super().__init__(f"invalid policy ({n} error{'s' if n != 1 else ''}):\n{lines}")


def _fail(reason: str) -> None:
    raise PydanticCustomError("policy", "{reason}", {"reason": reason})


def _show(value: Any, limit: int = 60) -> str:
    """A value as it would look in JSON, shortened."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        text = repr(value)
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    else:
        return _kind(value)
    return text if len(text) <= limit else text[: limit - 4] + "...\""


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int):
        return "a number"
    if isinstance(value, float):
        return "a number"
    return f"a {type(value).__name__}"


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def format_path(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and _IDENT.match(part):
            out += ("." if out else "") + part
        else:
            out += f"[{json.dumps(str(part))}]"
    return out


# --------------------------------------------------------------------------------------------
# Scalar validators
# --------------------------------------------------------------------------------------------

_LABEL_NAME = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_DNS_SUBDOMAIN = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*"
_LABEL_KEY = re.compile(rf"^(?:[A-Za-z0-9_-]+:)?(?:{_DNS_SUBDOMAIN}/)?{_LABEL_NAME}\Z")
_LABEL_VALUE = re.compile(r"^(?:(?:[A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?\Z")
_DNS_LABEL = re.compile(r"^[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?\Z")
_NAME = re.compile(rf"^{_DNS_SUBDOMAIN}\Z")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_KAFKA_TOPIC = re.compile(r"^[a-zA-Z0-9._-]{1,255}\Z")
_KAFKA_CLIENT = re.compile(r"^[a-zA-Z0-9._-]{0,255}\Z")
_PORT_TEXT = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?\Z")


def _label_key_problem(key: Any) -> Optional[str]:
    if not isinstance(key, str):
        return f"label key {_show(key)} must be a string"
    if len(key) > 317 or not _LABEL_KEY.match(key):
        return f"{_show(key)} is not a valid label key"
    return None


def _label_value_problem(key: str, value: Any) -> Optional[str]:
    if not isinstance(value, str):
        return f"value of {_show(key)} must be a string, got {_show(value)} (quote it in YAML)"
    if len(value) > 63 or not _LABEL_VALUE.match(value):
        return f"{_show(value)} (for {_show(key)}) is not a valid label value"
    return None


def _string_map(value: Any, labels: bool) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        _fail(f"expected an object, got {_kind(value)}")
    problems = []
    for k, v in value.items():
        if labels:
            p = _label_key_problem(k) or _label_value_problem(k, v)
        elif not isinstance(k, str):
            p = f"key {_show(k)} must be a string"
        elif not isinstance(v, str):
            p = f"value of {_show(k)} must be a string, got {_show(v)} (quote it in YAML)"
        else:
            p = None
        if p:
            problems.append(p)
    if problems:
        _fail("; ".join(problems))
    return dict(value)


def _as_cidr(value: Any) -> str:
    if not isinstance(value, str):
        _fail(f"expected a CIDR string such as \"10.0.0.0/8\", got {_show(value)}")
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        _fail(f"{_show(value)} is not a CIDR (address/prefix length)")
    raise AssertionError  # pragma: no cover


def _as_entity(value: Any) -> str:
    if not isinstance(value, str) or value not in ENTITIES:
        _fail(f"{_show(value)} is not an entity ({', '.join(ENTITIES)})")
    return value


def _as_regex(value: Any) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str):
        _fail(f"expected a regular expression string, got {_show(value)}")
    try:
        re.compile(value)
    except (re.error, RecursionError, OverflowError, ValueError) as e:
        _fail(f"{_show(value)} is not a valid regular expression: {e}")
    return value


def _as_header(value: Any) -> str:
    if not isinstance(value, str):
        _fail(f"expected a header string such as \"X-Token: abc\", got {_show(value)}")
    name = value.split(":", 1)[0].strip()
    if not _HEADER_NAME.match(name):
        _fail(f"{_show(value)} is not a header (\"Name\" or \"Name: value\")")
    return value


def _as_port(value: Any) -> str:
    """Canonical port text: ``"0"`` (any), ``"80"``."""
    if value is None:
        return "0"
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        _fail(f"{_show(value)} is not a port number or range")
    if isinstance(value, int):
        if 0 <= value <= 65535:
            return str(value)
        _fail(f"{value} is not a port number or range (0-65535)")
    m = _PORT_TEXT.match(value)
    if not m:
        if re.match(r"^[a-z][a-z0-9-]*\Z", value):
            _fail(f"{_show(value)} is not a port number or range (named ports are not supported)")
        _fail(f"{_show(value)} is not a port number or range")
    if m.group(2) is not None:
        _fail(f"{_show(value)}: give a port range either as \"lo-hi\" or with endPort, not both")
    port = int(m.group(1))
    if port > 65535:
        _fail(f"{_show(value)} is not a port number or range (0-65535)")
    return str(port)


def _as_end_port(value: Any) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(f"{_show(value)} is not a port number")
    if not 0 <= value <= 65535:
        _fail(f"{value} is not a port number (0-65535)")
    return value


def _as_protocol(value: Any) -> str:
    if value is None:
        return "ANY"
    name = _PROTO_NAMES.get(value.upper()) if isinstance(value, str) else None
    if name is None:
        _fail(f"{_show(value)} is not a protocol ({', '.join(PROTOCOLS)})")
    return name  # type: ignore[return-value]


CIDR = Annotated[str, BeforeValidator(_as_cidr)]
Entity = Annotated[str, BeforeValidator(_as_entity)]
Header = Annotated[str, BeforeValidator(_as_header)]
Regex = Annotated[Optional[str], BeforeValidator(_as_regex)]

# --------------------------------------------------------------------------------------------
# Document models
# --------------------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_alias=True, validate_by_name=False,
                              serialize_by_alias=True, defer_build=False)


class SelectorRequirement(_Model):
    key: str
    operator: str
    values: list[str] = []

    @field_validator("key", mode="before")
    @classmethod
    def _key(cls, v: Any) -> Any:
        p = _label_key_problem(v)
        if p:
            _fail(p)
        return v

    @field_validator("operator", mode="before")
    @classmethod
    def _op(cls, v: Any) -> Any:
        if v not in OPERATORS:
            _fail(f"{_show(v)} is not a selector operator ({', '.join(OPERATORS)})")
        return v

    @field_validator("values")
    @classmethod
    def _values(cls, v: list[str]) -> list[str]:
        for i, item in enumerate(v):
            if len(item) > 63 or not _LABEL_VALUE.match(item):
                _fail(f"values[{i}] {_show(item)} is not a valid label value")
        return sorted(set(v))

    @model_validator(mode="after")
    def _check(self) -> "SelectorRequirement":
        if self.operator in ("In", "NotIn") and not self.values:
            _fail(f"operator {self.operator} needs at least one value")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            _fail(f"operator {self.operator} takes no values")
        return self


class EndpointSelector(_Model):
    matchLabels: dict[str, str] = {}
    matchExpressions: list[SelectorRequirement] = []

    @field_validator("matchLabels", mode="before")
    @classmethod
    def _labels(cls, v: Any) -> Any:
        return _string_map(v, labels=True)

    @cached_property
    def selector(self) -> LabelSelector:
        return LabelSelector.from_k8s(self.matchLabels, [e.model_dump() for e in self.matchExpressions])


class PortProtocol(_Model):
    port: Annotated[str, BeforeValidator(_as_port)] = "0"
    endPort: Annotated[Optional[int], BeforeValidator(_as_end_port)] = None
    protocol: Annotated[str, BeforeValidator(_as_protocol)] = "ANY"

    @model_validator(mode="before")
    @classmethod
    def _split_range(cls, data: Any) -> Any:
        # "8000-8080" is accepted as a shorthand for port 8000, endPort 8080.
        if isinstance(data, dict) and isinstance(data.get("port"), str) and data.get("endPort") is None:
            m = _PORT_TEXT.match(data["port"])
            if m and m.group(2) is not None:
                data = {**data, "port": m.group(1), "endPort": m.group(2)}
        return data

    @model_validator(mode="after")
    def _check(self) -> "PortProtocol":
        port = int(self.port)
        if self.endPort is not None:
            if port == 0:
                _fail("endPort needs a non-zero port")
            if self.endPort < port:
                _fail(f"endPort {self.endPort} is lower than port {port}")
            if self.endPort == port:
                object.__setattr__(self, "endPort", None)
        if self.protocol in ("ICMP", "ICMPv6") and self.port_range[1] > 255 and port != 0:
            _fail(f"ICMP type {self.port_range[1]} is out of range (0-255)")
        return self

    @property
    def port_range(self) -> tuple[int, int]:
        port = int(self.port)
        if port == 0:
            return 0, 65535
        return port, self.endPort if self.endPort is not None else port

    def l4(self) -> tuple[tuple[int, int, int], ...]:
        lo, hi = self.port_range
        return tuple((proto, lo, hi) for proto in PROTOCOLS[self.protocol])


class HTTPHeaderMatch(_Model):
    name: str
    value: Optional[str] = None
    mismatch: Optional[str] = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _HEADER_NAME.match(v):
            _fail(f"{_show(v)} is not a header name")
        return v

    @field_validator("mismatch")
    @classmethod
    def _mismatch(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and v not in ("LOG", "ADD", "DELETE", "REPLACE"):
            _fail(f"{_show(v)} is not a mismatch action (LOG, ADD, DELETE, REPLACE)")
        return v


class HTTPRule(_Model):
    method: Regex = None
    path: Regex = None
    host: Regex = None
    headers: list[Header] = []
    headerMatches: list[HTTPHeaderMatch] = []


class KafkaRule(_Model):
    role: Optional[str] = None
    apiKey: Optional[str] = None
    apiVersion: Optional[str] = None
    clientID: Optional[str] = None
    topic: Optional[str] = None

    @field_validator("role")
    @classmethod
    def _role(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and v.lower() not in KAFKA_ROLES:
            _fail(f"{_show(v)} is not a Kafka role (produce, consume)")
        return v.lower() if v is not None else None

    @field_validator("apiKey")
    @classmethod
    def _api_key(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and v.lower() not in KAFKA_API_KEYS:
            close = difflib.get_close_matches(v.lower(), KAFKA_API_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            _fail(f"{_show(v)} is not a known Kafka API key{hint}")
        return v.lower() if v is not None else None

    @field_validator("apiVersion", mode="before")
    @classmethod
    def _api_version(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            return str(v)
        if v is not None and not (isinstance(v, str) and v.isdigit()):
            _fail(f"{_show(v)} is not a Kafka API version (a number)")
        return v

    @field_validator("clientID")
    @classmethod
    def _client(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not _KAFKA_CLIENT.match(v):
            _fail(f"{_show(v)} is not a valid Kafka client ID")
        return v

    @field_validator("topic")
    @classmethod
    def _topic(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not _KAFKA_TOPIC.match(v):
            _fail(f"{_show(v)} is not a valid Kafka topic (1-255 of a-z A-Z 0-9 . _ -)")
        return v

    @model_validator(mode="after")
    def _check(self) -> "KafkaRule":
        if self.role is not None and self.apiKey is not None:
            _fail("role and apiKey cannot both be set")
        return self


class L7Rules(_Model):
    http: list[HTTPRule] = []
    kafka: list[KafkaRule] = []

    @model_validator(mode="after")
    def _check(self) -> "L7Rules":
        if self.http and self.kafka:
            _fail("http and kafka rules cannot be mixed in one port rule")
        return self

    @property
    def empty(self) -> bool:
        return not self.http and not self.kafka


def _check_ports(v: list) -> list:
    if not v:
        _fail("must not be empty")
    return v


class PortRule(_Model):
    ports: list[PortProtocol]
    rules: Optional[L7Rules] = None

    @field_validator("ports")
    @classmethod
    def _nonempty(cls, v: list) -> list:
        return _check_ports(v)

    @model_validator(mode="after")
    def _check(self) -> "PortRule":
        if self.rules is not None and not self.rules.empty:
            kind = "http" if self.rules.http else "kafka"
            for i, p in enumerate(self.ports):
                if p.protocol not in ("TCP", "ANY"):
                    _fail(f"{kind} rules need TCP, but ports[{i}] has protocol {p.protocol}")
                if p.port == "0" or p.endPort is not None:
                    _fail(f"{kind} rules need a single port, but ports[{i}] is a range")
        return self


class PortDenyRule(_Model):
    ports: list[PortProtocol]
    rules: Any = None

    @field_validator("ports")
    @classmethod
    def _nonempty(cls, v: list) -> list:
        return _check_ports(v)

    @field_validator("rules", mode="before")
    @classmethod
    def _no_l7(cls, v: Any) -> Any:
        if v is not None:
            _fail("L7 rules are not allowed in deny rules")
        return v


class ICMPField(_Model):
    family: str = "IPv4"
    type: Any

    @field_validator("family", mode="before")
    @classmethod
    def _family(cls, v: Any) -> Any:
        if v is None:
            return "IPv4"
        if not isinstance(v, str) or v.lower() not in ("ipv4", "ipv6"):
            _fail(f"{_show(v)} is not an address family (IPv4, IPv6)")
        return "IPv4" if v.lower() == "ipv4" else "IPv6"

    @field_validator("type", mode="before")
    @classmethod
    def _type(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v)
        if isinstance(v, int) and not isinstance(v, bool):
            if not 0 <= v <= 255:
                _fail(f"ICMP type {v} is out of range (0-255)")
            return v
        if isinstance(v, str) and (v in ICMPV4_TYPES or v in ICMPV6_TYPES):
            return v
        _fail(f"{_show(v)} is not an ICMP type (0-255 or a name such as EchoRequest)")

    @model_validator(mode="after")
    def _resolve(self) -> "ICMPField":
        if isinstance(self.type, str):
            names = ICMPV4_TYPES if self.family == "IPv4" else ICMPV6_TYPES
            if self.type not in names:
                _fail(f"{_show(self.type)} is not an {self.family} ICMP type")
            object.__setattr__(self, "type", names[self.type])
        return self

    def l4(self) -> tuple[int, int, int]:
        return (PROTO_ICMP if self.family == "IPv4" else PROTO_ICMPV6, self.type, self.type)


class ICMPRule(_Model):
    fields: list[ICMPField]

    @field_validator("fields")
    @classmethod
    def _nonempty(cls, v: list) -> list:
        return _check_ports(v)


class CIDRRule(_Model):
    cidr: CIDR
    except_: list[CIDR] = Field(default=[], alias="except")

    @model_validator(mode="after")
    def _check(self) -> "CIDRRule":
        net = ipaddress.ip_network(self.cidr)
        for i, e in enumerate(self.except_):
            sub = ipaddress.ip_network(e)
            if sub.version != net.version or not sub.subnet_of(net):  # type: ignore[arg-type]
                _fail(f"except[{i}] {e} is not inside cidr {self.cidr}")
        return self


L4 = tuple[tuple[int, int, int], ...]


class _PeerRule(_Model):
    """Shared view of the four rule kinds (direction-neutral accessors)."""

    @property
    def endpoints(self) -> list[EndpointSelector]:
        raise NotImplementedError

    @property
    def cidrs(self) -> list[str]:
        raise NotImplementedError

    @property
    def cidr_sets(self) -> list[CIDRRule]:
        raise NotImplementedError

    @property
    def entities(self) -> list[str]:
        raise NotImplementedError

    @property
    def has_l3(self) -> bool:
        return bool(self.endpoints or self.cidrs or self.cidr_sets or self.entities)

    def l4(self) -> Optional[L4]:
        """``(protocol, lo, hi)`` alternatives, or None when the rule has no port constraint."""
        items: list[tuple[int, int, int]] = []
        for pr in self.toPorts:  # type: ignore[attr-defined]
            for p in pr.ports:
                items.extend(p.l4())
        for ir in self.icmps:  # type: ignore[attr-defined]
            items.extend(f.l4() for f in ir.fields)
        return tuple(dict.fromkeys(items)) if items else None

    @property
    def is_empty(self) -> bool:
        return not self.has_l3 and self.l4() is None


class IngressRule(_PeerRule):
    fromEndpoints: list[EndpointSelector] = []
    fromCIDR: list[CIDR] = []
    fromCIDRSet: list[CIDRRule] = []
    fromEntities: list[Entity] = []
    toPorts: list[PortRule] = []
    icmps: list[ICMPRule] = []

    endpoints = property(lambda self: self.fromEndpoints)
    cidrs = property(lambda self: self.fromCIDR)
    cidr_sets = property(lambda self: self.fromCIDRSet)
    entities = property(lambda self: self.fromEntities)


class IngressDenyRule(_PeerRule):
    fromEndpoints: list[EndpointSelector] = []
    fromCIDR: list[CIDR] = []
    fromCIDRSet: list[CIDRRule] = []
    fromEntities: list[Entity] = []
    toPorts: list[PortDenyRule] = []
    icmps: list[ICMPRule] = []

    endpoints = property(lambda self: self.fromEndpoints)
    cidrs = property(lambda self: self.fromCIDR)
    cidr_sets = property(lambda self: self.fromCIDRSet)
    entities = property(lambda self: self.fromEntities)


class EgressRule(_PeerRule):
    toEndpoints: list[EndpointSelector] = []
    toCIDR: list[CIDR] = []
    toCIDRSet: list[CIDRRule] = []
    toEntities: list[Entity] = []
    toPorts: list[PortRule] = []
    icmps: list[ICMPRule] = []

    endpoints = property(lambda self: self.toEndpoints)
    cidrs = property(lambda self: self.toCIDR)
    cidr_sets = property(lambda self: self.toCIDRSet)
    entities = property(lambda self: self.toEntities)


class EgressDenyRule(_PeerRule):
    toEndpoints: list[EndpointSelector] = []
    toCIDR: list[CIDR] = []
    toCIDRSet: list[CIDRRule] = []
    toEntities: list[Entity] = []
    toPorts: list[PortDenyRule] = []
    icmps: list[ICMPRule] = []

    endpoints = property(lambda self: self.toEndpoints)
    cidrs = property(lambda self: self.toCIDR)
    cidr_sets = property(lambda self: self.toCIDRSet)
    entities = property(lambda self: self.toEntities)


class DefaultDeny(_Model):
    ingress: Optional[StrictBool] = None
    egress: Optional[StrictBool] = None


class PolicySpec(_Model):
    endpointSelector: EndpointSelector
    ingress: list[IngressRule] = []
    ingressDeny: list[IngressDenyRule] = []
    egress: list[EgressRule] = []
    egressDeny: list[EgressDenyRule] = []
    enableDefaultDeny: Optional[DefaultDeny] = None
    auditMode: StrictBool = False
    description: str = ""

    def rules(self, direction: str, deny: bool) -> list[_PeerRule]:
        """``direction`` is ``"ingress"`` or ``"egress"``."""
        if direction == "ingress":
            return self.ingressDeny if deny else self.ingress  # type: ignore[return-value]
        return self.egressDeny if deny else self.egress  # type: ignore[return-value]

    def default_deny(self, direction: str) -> bool:
        """Does this spec put its endpoints under default-deny in ``direction``? Yes when it has rules
        (allow or deny) in that direction, unless ``enableDefaultDeny.<direction>`` is false."""
        if not self.rules(direction, False) and not self.rules(direction, True):
            return False
        flag = getattr(self.enableDefaultDeny, direction) if self.enableDefaultDeny else None
        return flag is not False


class Metadata(_Model):
    name: str
    namespace: Optional[str] = None
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}

    @model_validator(mode="before")
    @classmethod
    def _drop_bookkeeping(cls, data: Any) -> Any:
        if isinstance(data, dict) and _IGNORED_METADATA.intersection(data):
            data = {k: v for k, v in data.items() if k not in _IGNORED_METADATA}
        return data

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, v: Any) -> Any:
        if not isinstance(v, str) or not v or len(v) > 253 or not _NAME.match(v):
            _fail(f"{_show(v)} is not a valid name (lower-case letters, digits, '-' and '.', at most 253)")
        return v

    @field_validator("namespace", mode="before")
    @classmethod
    def _namespace(cls, v: Any) -> Any:
        if v is not None and (not isinstance(v, str) or not _DNS_LABEL.match(v)):
            _fail(f"{_show(v)} is not a valid namespace (lower-case letters, digits and '-', at most 63)")
        return v

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, v: Any) -> Any:
        return _string_map(v, labels=True)

    @field_validator("annotations", mode="before")
    @classmethod
    def _annotations(cls, v: Any) -> Any:
        v = _string_map(v, labels=False)
        audit = v.get(AUDIT_ANNOTATION)
        if audit is not None and audit.lower() not in ("true", "false"):
            _fail(f"annotation {AUDIT_ANNOTATION} must be \"true\" or \"false\", got {_show(audit)}")
        return v


class PolicyDocument(_Model):
    apiVersion: Optional[str] = None
    kind: Optional[str] = None
    metadata: Metadata
    spec: Optional[PolicySpec] = None
    specs: list[PolicySpec] = []
    status: Any = None

    @field_validator("apiVersion", mode="before")
    @classmethod
    def _api(cls, v: Any) -> Any:
        if v is not None and (not isinstance(v, str) or not v.startswith("cilium.io/")):
            _fail(f"{_show(v)} is not a supported apiVersion ({API_VERSION})")
        return v

    @field_validator("kind", mode="before")
    @classmethod
    def _kind(cls, v: Any) -> Any:
        if v is not None and v not in KINDS:
            _fail(f"{_show(v)} is not a supported kind ({', '.join(KINDS)})")
        return v


_MODELS = (PolicyDocument, Metadata, PolicySpec, IngressRule, EgressRule, PortRule, PortProtocol, EndpointSelector,
           SelectorRequirement, CIDRRule, ICMPRule, ICMPField, L7Rules, HTTPRule, KafkaRule, HTTPHeaderMatch, DefaultDeny)
_ALL_FIELDS = sorted({f.alias or name for m in _MODELS for name, f in m.model_fields.items()})


# --------------------------------------------------------------------------------------------
# Policy
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Policy:
    """A validated policy. ``namespace`` is "" for a cluster-wide policy. ``revision`` is set by the
    store (it is not part of the content or the content hash)."""

    document: PolicyDocument
    namespace: str
    revision: int = 0

    @property
    def name(self) -> str:
        return self.document.metadata.name

    @property
    def kind(self) -> str:
        return self.document.kind or KIND_CNP

    @property
    def cluster_wide(self) -> bool:
        return self.kind == KIND_CCNP

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name

    @property
    def ref(self) -> str:
        """``namespace/name`` or ``name`` for a cluster-wide policy."""
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.document.metadata.labels)

    @property
    def annotations(self) -> dict[str, str]:
        return dict(self.document.metadata.annotations)

    @cached_property
    def specs(self) -> tuple[PolicySpec, ...]:
        return ((self.document.spec,) if self.document.spec is not None else ()) + tuple(self.document.specs)

    @property
    def audit(self) -> bool:
        """Audit mode for the whole policy (annotation), or every spec in audit mode."""
        return self.annotation_audit or all(s.auditMode for s in self.specs)

    @property
    def annotation_audit(self) -> bool:
        return self.document.metadata.annotations.get(AUDIT_ANNOTATION, "").lower() == "true"

    def spec_audit(self, spec: PolicySpec) -> bool:
        return self.annotation_audit or spec.auditMode

    @cached_property
    def _canonical(self) -> dict:
        d = self.document.model_dump(mode="json", by_alias=True, exclude_defaults=True, exclude_none=True)
        d.pop("status", None)
        meta: dict[str, Any] = {"name": self.name}
        if self.namespace:
            meta["namespace"] = self.namespace
        if self.document.metadata.labels:
            meta["labels"] = dict(self.document.metadata.labels)
        if self.document.metadata.annotations:
            meta["annotations"] = dict(self.document.metadata.annotations)
        d.pop("apiVersion", None)
        d.pop("kind", None)
        d.pop("metadata", None)
        return {"apiVersion": API_VERSION, "kind": self.kind, "metadata": meta, **d}

    def to_dict(self) -> dict:
        """The canonical document (a fresh copy)."""
        return orjson.loads(self.to_json())

    def to_json(self) -> bytes:
        """Canonical JSON: sorted keys, no whitespace, defaults dropped, values normalised."""
        return self._canonical_json

    @cached_property
    def _canonical_json(self) -> bytes:
        return orjson.dumps(self._canonical, option=orjson.OPT_SORT_KEYS)

    def to_yaml(self) -> str:
        """Canonical content as YAML (apiVersion, kind, metadata, then the spec)."""
        return yaml.safe_dump(orjson.loads(orjson.dumps(self._canonical)), sort_keys=False, default_flow_style=False)

    @cached_property
    def content_hash(self) -> str:
        return hashlib.sha256(self.to_json()).hexdigest()

    def with_revision(self, revision: int) -> "Policy":
        return replace(self, revision=revision)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Policy) and other.to_json() == self.to_json() and other.revision == self.revision

    def __hash__(self) -> int:
        return hash((self.to_json(), self.revision))

    def __repr__(self) -> str:
        return f"Policy({self.kind} {self.ref} rev={self.revision})"


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _convert(err: ValidationError) -> list[tuple[str, str]]:
    out = []
    for e in err.errors(include_url=False):
        loc, typ, inp = e["loc"], e["type"], e.get("input")
        path = format_path(loc)
        if typ == "extra_forbidden":
            key = str(loc[-1]) if loc else ""
            if key in UNSUPPORTED_FIELDS:
                msg = f"{UNSUPPORTED_FIELDS[key]} are not supported by Flowscope"
            else:
                close = difflib.get_close_matches(key, _ALL_FIELDS, n=1, cutoff=0.75)
                msg = "unknown field" + (f" (did you mean {close[0]!r}?)" if close else "")
        elif typ == "missing":
            msg = "is required"
        elif typ in ("model_type", "model_attributes_type", "dict_type"):
            msg = f"expected an object, got {_kind(inp)}"
        elif typ in ("list_type", "tuple_type"):
            msg = f"expected a list, got {_kind(inp)}"
        elif typ in ("string_type", "string_sub_type"):
            msg = f"expected a string, got {_kind(inp)}"
        elif typ in ("bool_type", "bool_parsing"):
            msg = f"expected true or false, got {_show(inp)}"
        elif typ.startswith("int_"):
            msg = f"expected an integer, got {_show(inp)}"
        else:
            msg = e["msg"]
        out.append((path, msg))
    return out


def _check_shape(obj: Any) -> Optional[str]:
    """Reject input no policy can be: nested too deeply, cyclic (YAML anchors), or huge."""
    nodes = 0
    on_path: set[int] = set()
    # Iterative DFS with exit markers, so the current path is known (cycle detection).
    work: list[tuple[Any, int, bool]] = [(obj, 0, False)]
    while work:
        node, depth, leaving = work.pop()
        if leaving:
            on_path.discard(id(node))
            continue
        if not isinstance(node, (dict, list)):
            continue
        nodes += 1
        if nodes > MAX_NODES:
            return f"the document is too large (more than {MAX_NODES} objects and lists)"
        if depth > MAX_DEPTH:
            return f"the document is nested too deeply (more than {MAX_DEPTH} levels)"
        if id(node) in on_path:
            return "the document refers to itself (recursive YAML anchor)"
        on_path.add(id(node))
        work.append((node, depth, True))
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, (dict, list)):
                work.append((child, depth + 1, False))
    return None


def _documents(data: Any) -> list[tuple[str, Any]]:
    """Split the input into (where, object) pairs."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) > MAX_INPUT_BYTES:
            raise PolicyValidationError([PolicyError("", f"input is larger than {MAX_INPUT_BYTES} bytes")])
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise PolicyValidationError([PolicyError("", f"input is not UTF-8 text ({e.reason} at byte {e.start})")]) from None
    if isinstance(data, str):
        if len(data) > MAX_INPUT_BYTES:
            raise PolicyValidationError([PolicyError("", f"input is larger than {MAX_INPUT_BYTES} bytes")])
        docs = _parse_text(data)
        multi = len(docs) > 1
        out = []
        for i, doc in enumerate(docs):
            out.extend(_flatten(doc, f"document {i + 1}" if multi else ""))
        return out
    return list(_flatten(data, ""))


class _StrictYAMLLoader(_YAML_LOADER):  # type: ignore[misc, valid-type]
    """Safe loader that rejects duplicate mapping keys (PyYAML silently keeps the last one, which would
    drop e.g. a whole ``ingress:`` section without a word)."""

    def construct_mapping(self, node, deep=False):  # type: ignore[no-untyped-def]
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:
                    continue  # unhashable: the base class reports it
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {_show(key)}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


_StrictYAMLLoader.add_constructor("tag:yaml.org,2002:map", _StrictYAMLLoader.construct_yaml_map)


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _parse_text(text: str) -> list[Any]:
    stripped = text.lstrip("\ufeff \t\r\n")
    if stripped[:1] in ("{", "["):
        try:
            return [json.loads(stripped, object_pairs_hook=_no_duplicates)]
        except _DuplicateKey as e:
            raise PolicyValidationError([PolicyError("", f"invalid JSON: duplicate key {_show(e.args[0])}")]) from None
        except RecursionError:
            raise PolicyValidationError([PolicyError("", "invalid JSON: nested too deeply")]) from None
        except ValueError:
            pass  # maybe YAML flow style; let the YAML parser report problems with a position
    try:
        docs = [d for d in yaml.load_all(text, Loader=_StrictYAMLLoader) if d is not None]
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = e.problem or e.context or "syntax error"
        raise PolicyValidationError([PolicyError("", f"invalid YAML: {problem}{where}")]) from None
    except (yaml.YAMLError, RecursionError, ValueError, TypeError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PolicyValidationError([PolicyError("", f"invalid YAML: {reason}")]) from None
    if not docs:
        raise PolicyValidationError([PolicyError("", "no policy found in the input")])
    return docs


def _flatten(obj: Any, where: str) -> Iterator[tuple[str, Any]]:
    def at(suffix: str) -> str:
        return f"{where}, {suffix}" if where else suffix

    if isinstance(obj, list):
        for i, item in enumerate(obj):
            yield at(f"items[{i}]"), item
    elif isinstance(obj, dict) and "items" in obj and "spec" not in obj and "specs" not in obj:
        items = obj["items"]
        if not isinstance(items, list):
            yield where, {"__items_error__": items}
        else:
            for i, item in enumerate(items):
                yield at(f"items[{i}]"), item
    else:
        yield where, obj


def policy_from_object(obj: Any, *, default_namespace: str = "default", where: str = "") -> Policy:
    """Validate one already-parsed policy document."""
    ref = ""
    if isinstance(obj, dict):
        meta = obj.get("metadata")
        if isinstance(meta, dict) and isinstance(meta.get("name"), str):
            ns = meta.get("namespace") if isinstance(meta.get("namespace"), str) else None
            if obj.get("kind") == KIND_CCNP:
                ref = meta["name"]
            else:
                ref = f"{ns or default_namespace}/{meta['name']}"

    def error(path: str, msg: str) -> PolicyError:
        return PolicyError(path, msg, where, ref)

    if isinstance(obj, dict) and "__items_error__" in obj:
        raise PolicyValidationError([error("items", f"expected a list, got {_kind(obj['__items_error__'])}")])
    shape = _check_shape(obj)
    if shape:
        raise PolicyValidationError([error("", shape)])
    errors: list[PolicyError] = []
    if isinstance(obj, dict):
        if obj.get("spec") is None and not obj.get("specs"):
            errors.append(error("spec", "a policy needs spec or specs"))
        meta = obj.get("metadata")
        if obj.get("kind") == KIND_CCNP and isinstance(meta, dict) and meta.get("namespace"):
            errors.append(error("metadata.namespace", f"a {KIND_CCNP} has no namespace"))
    doc: Optional[PolicyDocument] = None
    try:
        doc = PolicyDocument.model_validate(obj)
    except ValidationError as e:
        errors[:0] = [error(p, m) for p, m in _convert(e)]
    except RecursionError:
        errors.append(error("", "the document is nested too deeply"))
    if errors or doc is None:
        raise PolicyValidationError(errors)
    namespace = "" if (doc.kind == KIND_CCNP) else (doc.metadata.namespace or default_namespace)
    return Policy(doc, namespace)


def load_policies(data: Any, *, default_namespace: str = "default") -> list[Policy]:
    """Policies from YAML/JSON text (or bytes, or parsed data). Raises :class:`PolicyValidationError`
    with every problem found; a policy defined twice in the input is an error."""
    errors: list[PolicyError] = []
    policies: list[Policy] = []
    seen: dict[tuple[str, str], str] = {}
    for where, obj in _documents(data):
        try:
            p = policy_from_object(obj, default_namespace=default_namespace, where=where)
        except PolicyValidationError as e:
            errors.extend(e.errors)
            continue
        if p.key in seen:
            first = seen[p.key] or "the input"
            errors.append(PolicyError("metadata.name", f"policy {p.ref} is already defined in {first}", where, p.ref))
            continue
        seen[p.key] = where
        policies.append(p)
    if errors:
        raise PolicyValidationError(errors)
    return policies


def load_policy(data: Any, *, default_namespace: str = "default") -> Policy:
    """Exactly one policy."""
    policies = load_policies(data, default_namespace=default_namespace)
    if len(policies) != 1:
        raise PolicyValidationError([PolicyError("", f"expected one policy, found {len(policies)}")])
    return policies[0]


def dump_policies(policies: Iterable[Policy]) -> str:
    """Several policies as multi-document YAML (canonical content)."""
    return "---\n".join(p.to_yaml() for p in policies)
