"""Tunables shared by the L7 parsers (memory caps, header policy)."""

from __future__ import annotations

from dataclasses import dataclass, field

#: Header values replaced by ``HIDDEN`` unless the caller opts out.
DEFAULT_REDACT: frozenset[str] = frozenset({"authorization", "cookie", "set-cookie", "proxy-authorization"})
REDACTED = "HIDDEN"


@dataclass(frozen=True, slots=True)
class L7Config:
    """Limits and header policy; one instance may be shared by many connections."""

    #: Max bytes a parser buffers per direction (partial heads, frames, header blocks).
    max_buffer: int = 64 * 1024
    #: Reassembly: max out-of-order bytes held per direction before a gap is skipped.
    max_gap_bytes: int = 64 * 1024
    #: Reassembly: max out-of-order segments held per direction before a gap is skipped.
    max_gap_segments: int = 64
    #: Reassembly: a gap older than this (by segment timestamps) is skipped; 0 disables.
    gap_timeout_ns: int = 2_000_000_000
    #: Outstanding requests remembered per connection (HTTP/1 FIFO, Kafka ids, HTTP/2 streams).
    max_pending: int = 1024
    #: Lower-cased header names to export; ``None`` exports every header (Hubble's default).
    header_allowlist: frozenset[str] | None = None
    #: Lower-cased header names whose values become ``HIDDEN``.
    redact_headers: frozenset[str] = field(default=DEFAULT_REDACT)
    #: Caps on exported headers per message and per value length.
    max_headers: int = 64
    max_header_value: int = 2048
    #: Bytes of a Kafka message looked at for header + topic; the rest is skipped unbuffered.
    kafka_peek: int = 4096
    #: Bytes of client data sniffed before a connection is declared unknown.
    detect_limit: int = 4096
