"""L7 events and their conversion to Hubble's ``flow.Layer7`` JSON (proto field names).

Proto3 JSON rules apply: zero/empty fields are omitted, enums are names, uint64 are strings.
Python-only attributes (timestamps, stream ids, gRPC service, Kafka client id...) stay off the dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

REQUEST = "REQUEST"
RESPONSE = "RESPONSE"


@dataclass(slots=True)
class HttpRecord:
    """Hubble ``flow.HTTP`` plus parse details (HTTP/1.x, HTTP/2 and gRPC)."""

    code: int = 0
    method: str = ""
    url: str = ""
    protocol: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    # Python-only details.
    host: str = ""
    path: str = ""
    is_grpc: bool = False
    grpc_service: str = ""
    grpc_method: str = ""
    grpc_status: int | None = None
    grpc_message: str = ""
    truncated: bool = False

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.code:
            d["code"] = self.code
        if self.method:
            d["method"] = self.method
        if self.url:
            d["url"] = self.url
        if self.protocol:
            d["protocol"] = self.protocol
        if self.headers:
            d["headers"] = [{"key": k, "value": v} for k, v in self.headers]
        return d


@dataclass(slots=True)
class KafkaRecord:
    """Hubble ``flow.Kafka`` plus the numeric api key, client id and all topics seen."""

    api_key: str = ""
    api_version: int = 0
    correlation_id: int = 0
    topic: str = ""
    error_code: int = 0
    # Python-only details.
    api_key_id: int = -1
    client_id: str = ""
    topics: list[str] = field(default_factory=list)
    topic_id: str = ""
    error_known: bool = False

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.error_code:
            d["error_code"] = self.error_code
        if self.api_version:
            d["api_version"] = self.api_version
        if self.api_key:
            d["api_key"] = self.api_key
        if self.correlation_id:
            d["correlation_id"] = self.correlation_id
        if self.topic:
            d["topic"] = self.topic
        return d


@dataclass(slots=True)
class DnsRecord:
    """Hubble ``flow.DNS``."""

    query: str = ""
    ips: list[str] = field(default_factory=list)
    ttl: int = 0
    cnames: list[str] = field(default_factory=list)
    observation_source: str = "flowscope"
    rcode: int = 0
    qtypes: list[str] = field(default_factory=list)
    rrtypes: list[str] = field(default_factory=list)
    # Python-only details.
    id: int = 0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.query:
            d["query"] = self.query
        if self.ips:
            d["ips"] = list(self.ips)
        if self.ttl:
            d["ttl"] = self.ttl
        if self.cnames:
            d["cnames"] = list(self.cnames)
        if self.observation_source:
            d["observation_source"] = self.observation_source
        if self.rcode:
            d["rcode"] = self.rcode
        if self.qtypes:
            d["qtypes"] = list(self.qtypes)
        if self.rrtypes:
            d["rrtypes"] = list(self.rrtypes)
        return d


@dataclass(slots=True)
class L7Event:
    """One L7 message: a request or a response, with exactly one of http/kafka/dns set."""

    type: str
    timestamp_ns: int
    protocol: str
    http: HttpRecord | None = None
    kafka: KafkaRecord | None = None
    dns: DnsRecord | None = None
    latency_ns: int = 0
    #: HTTP/2 stream id, Kafka correlation id, DNS id; ``None`` for HTTP/1.
    stream_id: int | None = None

    @property
    def is_reply(self) -> bool:
        return self.type == RESPONSE

    @property
    def direction(self) -> str:
        return "response" if self.type == RESPONSE else "request"

    def to_dict(self) -> dict[str, Any]:
        """Hubble ``Layer7`` JSON (``hubble observe -o json`` field names)."""
        d: dict[str, Any] = {"type": self.type}
        if self.latency_ns > 0:
            d["latency_ns"] = str(self.latency_ns)
        if self.dns is not None:
            d["dns"] = self.dns.to_dict()
        elif self.http is not None:
            d["http"] = self.http.to_dict()
        elif self.kafka is not None:
            d["kafka"] = self.kafka.to_dict()
        return d
