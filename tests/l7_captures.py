"""Test helpers for the L7 parsers: pcap → Conversation, and DeepFlow ``.result`` line parsing.

Captures are read in place from ``shared/captures`` beside the checkout (or ``$FLOWSCOPE_CAPTURES``), never copied.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from probe.l7.config import L7Config
from probe.l7.conversation import Conversation
from probe.l7.records import L7Event

def _find_captures() -> Path:
    """``$FLOWSCOPE_CAPTURES``, else ``shared/captures`` beside the checkout (where CI lays it), else the
    workplace's ``/work/shared/captures``."""
    if os.environ.get("FLOWSCOPE_CAPTURES"):
        return Path(os.environ["FLOWSCOPE_CAPTURES"])
    beside = Path(__file__).resolve().parents[2] / "shared" / "captures"
    return beside if beside.is_dir() else Path("/work/shared/captures")


CAPTURES = _find_captures()


@dataclass
class Segment:
    ts_ns: int
    src: tuple[str, int]
    dst: tuple[str, int]
    seq: int
    flags: int
    payload: bytes


def read_tcp_segments(path: Path) -> list[Segment]:
    """All TCP segments of a pcap/pcapng (Ethernet, Linux cooked v1/v2 or raw IP link types)."""
    import dpkt

    segs: list[Segment] = []
    with open(path, "rb") as f:
        try:
            reader: Any = dpkt.pcap.Reader(f)
        except ValueError:
            f.seek(0)
            reader = dpkt.pcapng.Reader(f)
        link = reader.datalink()
        for ts, buf in reader:
            if link == dpkt.pcap.DLT_EN10MB:
                ip = dpkt.ethernet.Ethernet(buf).data
            elif link == 113:
                ip = dpkt.sll.SLL(buf).data
            elif link == 276:
                ip = dpkt.sll2.SLL2(buf).data
            else:
                ip = dpkt.ip.IP(buf)
            if not isinstance(ip, (dpkt.ip.IP, dpkt.ip6.IP6)) or not isinstance(ip.data, dpkt.tcp.TCP):
                continue
            fam = socket.AF_INET if isinstance(ip, dpkt.ip.IP) else socket.AF_INET6
            tcp = ip.data
            segs.append(Segment(
                int(Decimal(ts) * 1_000_000_000),
                (socket.inet_ntop(fam, ip.src), tcp.sport),
                (socket.inet_ntop(fam, ip.dst), tcp.dport),
                tcp.seq, tcp.flags, bytes(tcp.data),
            ))
    return segs


@dataclass
class Replay:
    conversation: Conversation
    events: list[L7Event]


def replay(path: Path, config: L7Config | None = None, close: bool = True) -> list[Replay]:
    """Feed a capture through one Conversation per TCP connection; client = SYN sender or first talker."""
    convs: dict[frozenset, Replay] = {}
    for s in read_tcp_segments(path):
        key = frozenset((s.src, s.dst))
        rp = convs.get(key)
        if rp is None:
            syn_ack = s.flags & 0x12 == 0x12
            client, server = (s.dst, s.src) if syn_ack else (s.src, s.dst)
            rp = convs[key] = Replay(Conversation(client, server, config), [])
        direction = "client" if s.src == rp.conversation.client else "server"
        rp.events.extend(rp.conversation.feed(direction, s.seq, s.payload, s.flags, s.ts_ns))
    if close:
        for rp in convs.values():
            rp.events.extend(rp.conversation.close(0))
    return list(convs.values())


def all_events(path: Path, config: L7Config | None = None) -> list[L7Event]:
    return [e for rp in replay(path, config) for e in rp.events]


# -- DeepFlow .result lines (Rust Debug format) ---------------------------------------------------
_TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<num>-?\d+)|(?P<ident>[A-Za-z_][A-Za-z0-9_]*)|(?P<p>[{}()\[\],:]))')


class _DebugParser:
    def __init__(self, text: str) -> None:
        self.toks = [(m.lastgroup, m.group(m.lastgroup)) for m in _TOKEN.finditer(text)]
        self.i = 0

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> tuple[str, str]:
        t = self.toks[self.i]
        self.i += 1
        return t

    def value(self) -> Any:
        kind, text = self.take()
        if kind == "str":
            return bytes(text[1:-1], "utf-8").decode("unicode_escape")
        if kind == "num":
            return int(text)
        if kind == "p" and text == "[":
            return self._seq("]")
        if kind == "ident":
            nxt = self.peek()
            if text == "None":
                return None
            if nxt == ("p", "{"):
                self.take()
                return self._fields()
            if nxt == ("p", "("):
                self.take()
                items = self._seq(")")
                return items[0] if text == "Some" and len(items) == 1 else items
            return text
        raise ValueError(f"unexpected {text!r}")

    def _seq(self, close: str) -> list[Any]:
        items: list[Any] = []
        while self.peek() != ("p", close):
            items.append(self.value())
            if self.peek() == ("p", ","):
                self.take()
        self.take()
        return items

    def _fields(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        while self.peek() != ("p", "}"):
            _, name = self.take()
            self.take()  # ':'
            d[name] = self.value()
            if self.peek() == ("p", ","):
                self.take()
        self.take()
        return d


def parse_result_line(line: str) -> dict[str, Any] | None:
    """``KafkaInfo { a: 1, ... } is_kafka: true`` → ``{"_type": "KafkaInfo", "a": 1, ...}``; None if no info."""
    line = line.strip()
    m = re.match(r"(\w+Info) \{", line)
    if not m:
        return None
    p = _DebugParser(line[m.end() - 1:])
    p.take()
    fields = p._fields()
    fields["_type"] = m.group(1)
    return fields


def read_results(path: Path) -> list[dict[str, Any]]:
    return [r for r in (parse_result_line(x) for x in path.read_text().splitlines()) if r is not None]


def snake(name: str) -> str:
    """DeepFlow's CamelCase api key → Hubble's snake_case name."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
