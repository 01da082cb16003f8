"""Times for ``since``/``until``: absolute (RFC 3339, dates, unix seconds) or relative to now.

Accepted by :func:`parse_time` (as ``hubble observe --since`` accepts, plus a few conveniences):

* a relative duration, meaning *now minus that*: ``30s``, ``5m``, ``1h30m``, ``1.5h``, ``500ms``,
  ``2d`` (Go's duration syntax: ``ns``, ``us``/``µs``, ``ms``, ``s``, ``m``, ``h``; plus ``d`` = 24h);
* ``now``;
* RFC 3339 with any fraction (``2024-11-27T06:10:01.123Z``, ``...+01:00``; a space instead of ``T``
  is fine), and Hubble's shorter forms ``2024-11-27``, ``2024-11-27T06Z``, ``2024-11-27T06:10Z``
  (zones optional: UTC), and RFC 1123Z (``Wed, 27 Nov 2024 06:10:01 +0000``);
* unix seconds, integer or fractional (``1732687801``, ``1732687801.5``).
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from typing import Optional, Union

from flowscope.schema import parse_timestamp

__all__ = ["TimeParseError", "parse_time", "parse_duration", "format_duration"]

_NS = 1_000_000_000


class TimeParseError(ValueError):
    """A time or duration that cannot be understood; the message says what is accepted."""


_UNITS = {
    "ns": 1, "us": 1_000, "µs": 1_000, "μs": 1_000, "ms": 1_000_000, "s": _NS, "m": 60 * _NS,
    "h": 3600 * _NS, "d": 86400 * _NS,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h|d)")
_DURATION_FULL = re.compile(r"(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|μs|ms|s|m|h|d))+\Z")


def parse_duration(text: str) -> int:
    """Nanoseconds in a duration like ``5m``, ``1h30m``, ``1.5h``, ``500ms``, ``2d`` or ``0``."""
    if not isinstance(text, str):
        raise TimeParseError(f"invalid duration {text!r}: expected text like 5m, 1h30m, 2d")
    s = text.strip()
    if s == "0":
        return 0
    if not s or not _DURATION_FULL.match(s):
        hint = " (missing unit?)" if s.replace(".", "", 1).isdigit() else ""
        raise TimeParseError(
            f"invalid duration {text!r}{hint}: expected a number with a unit (ns, us, ms, s, m, h, d) "
            f"such as 30s, 5m, 1h30m, 1.5h, 2d")
    total = 0
    for number, unit in _DURATION_PART.findall(s):
        whole, _, frac = number.partition(".")
        scale = _UNITS[unit]
        total += int(whole or "0") * scale
        if frac:
            total += int(frac) * scale // (10 ** len(frac))
    return total


def format_duration(ns: int) -> str:
    """Compact text for a duration (``1h30m``, ``250ms``); inverse-compatible with parse_duration."""
    if ns == 0:
        return "0s"
    out = []
    for unit, scale in (("d", 86400 * _NS), ("h", 3600 * _NS), ("m", 60 * _NS), ("s", _NS),
                        ("ms", 1_000_000), ("us", 1_000), ("ns", 1)):
        if ns >= scale:
            q, ns = divmod(ns, scale)
            out.append(f"{q}{unit}")
    return "".join(out)


_DATE_ONLY = re.compile(r"(\d{4})-(\d\d)-(\d\d)\Z")
_HOUR = re.compile(r"(\d{4}-\d\d-\d\d)[T ](\d\d)(Z|[+-]\d\d:\d\d)?\Z")
_MINUTE = re.compile(r"(\d{4}-\d\d-\d\d)[T ](\d\d):(\d\d)(Z|[+-]\d\d:\d\d)?\Z")
_UNIX = re.compile(r"\d+(?:\.\d+)?\Z")
_NO_ZONE = re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:\.\d+)?\Z")


def _zone(z: Optional[str]) -> str:
    return "+00:00" if not z or z == "Z" else z


def parse_time(value: Union[str, int, float, datetime], now_ns: Optional[int] = None) -> int:
    """Nanoseconds since the epoch for an absolute or relative time (see the module doc).

    ``now_ns`` is the reference for relative values (default: the current time)."""
    if isinstance(value, bool):
        raise TimeParseError(f"invalid time {value!r}")
    if isinstance(value, datetime):
        return parse_timestamp(value)
    if isinstance(value, (int, float)):
        if value < 0:
            raise TimeParseError(f"invalid time {value!r}: negative unix time")
        return int(round(value * _NS))
    if not isinstance(value, str):
        raise TimeParseError(f"invalid time {value!r}: expected text")
    s = value.strip()
    if not s:
        raise TimeParseError("invalid time '': empty")
    if now_ns is None:
        now_ns = time.time_ns()
    if s.lower() == "now":
        return now_ns
    if _DURATION_FULL.match(s):
        return now_ns - parse_duration(s)
    if _UNIX.match(s):
        whole, _, frac = s.partition(".")
        return int(whole) * _NS + (int(frac.ljust(9, "0")[:9]) if frac else 0)
    m = _DATE_ONLY.match(s)
    if m:
        try:
            dt = datetime(int(m[1]), int(m[2]), int(m[3]), tzinfo=timezone.utc)
        except ValueError as e:
            raise TimeParseError(f"invalid time {value!r}: {e}") from None
        return int(dt.timestamp()) * _NS
    m = _HOUR.match(s) or _MINUTE.match(s)
    if m:
        groups = m.groups()
        text = f"{groups[0]}T{groups[1]}:{groups[2] if len(groups) == 4 else '00'}:00{_zone(groups[-1])}"
        try:
            return int(datetime.fromisoformat(text).timestamp()) * _NS
        except ValueError as e:
            raise TimeParseError(f"invalid time {value!r}: {e}") from None
    if "," in s[:5]:
        try:
            dt = datetime.strptime(s, "%a, %d %b %Y %H:%M:%S %z")
            return int(dt.timestamp()) * _NS
        except ValueError:
            pass
    if _NO_ZONE.match(s):
        s += "Z"  # no zone given: UTC
    try:
        return parse_timestamp(s)
    except ValueError:
        pass
    raise TimeParseError(
        f"invalid time {value!r}: expected a relative duration (30s, 5m, 1h30m, 2d), 'now', "
        f"RFC 3339 (2024-11-27T06:10:01Z), a date (2024-11-27) or unix seconds")
