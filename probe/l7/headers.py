"""Header export policy shared by HTTP/1 and HTTP/2: allowlist, redaction, caps."""

from __future__ import annotations

from probe.l7.config import REDACTED, L7Config


class HeaderPolicy:
    """Turns raw ``(name, value)`` byte pairs into the exported ``(key, value)`` string list."""

    __slots__ = ("allow", "redact", "max_headers", "max_value")

    def __init__(self, config: L7Config) -> None:
        allow = config.header_allowlist
        self.allow = None if allow is None else frozenset(h.lower().encode("latin-1") for h in allow)
        self.redact = frozenset(h.lower().encode("latin-1") for h in config.redact_headers)
        self.max_headers = config.max_headers
        self.max_value = config.max_header_value

    def export(self, fields: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
        """``fields`` have lower-case names; pseudo-headers (``:path``...) are never exported."""
        allow, redact, cap = self.allow, self.redact, self.max_value
        out: list[tuple[str, str]] = []
        for k, v in fields:
            if (allow is not None and k not in allow) or k[:1] == b":":
                continue
            if k in redact:
                out.append((k.decode("latin-1"), REDACTED))
            else:
                out.append((k.decode("latin-1"), v[:cap].decode("latin-1")))
            if len(out) >= self.max_headers:
                break
        return out
