"""Alert rules: the document, its validation, and its canonical form (pure, no I/O).

A rule is a flow filter (``observe``'s filter names), a condition over a sliding window, and what to do
when it holds::

    name: api-drops
    filter: {verdict: [DROPPED], to_label: ["app=api"]}
    condition: {count_over: 10, window: 1m}
    for: 0s
    severity: warning
    group_by: [source_namespace, destination_namespace]
    webhook: {url: "https://hooks.example.org/flowscope", secret: "s3cr3t", headers: {X-Team: net}}

Conditions (the value must be *greater than* the threshold):

* ``{count_over: N}`` — matching flows in the window;
* ``{ratio_over: X, of: FILTER}`` — the share of matching flows that also match ``of``
  (``min_count`` flows at least, default 1), e.g. HTTP 5xx ratio: ``of: {http_status: ["5+"]}``;
* ``{p95_latency_ms_over: Y}`` (also p50/p90/p99) — the quantile of the L7 latency of matching flows;
* ``{kafka_errors_over: N}`` — matching Kafka flows with a non-zero error code (``error_codes`` to pick);
* ``{new_edge: true}`` — the first flow ever seen between two workloads (one alert per new edge; it
  resolves when ``window`` has passed).

"Any flow to world on a port" is ``filter: {to_label: ["reserved:world"], to_port: [443]}`` with
``count_over: 0``. Every error is a :class:`RuleError` whose message names the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional
from urllib.parse import urlsplit

import yaml

from flowscope.filters import FilterError, FilterSet
from flowscope.observe import ObserveUsageError, build_filters, filter_args_from_names
from flowscope.timeparse import TimeParseError, format_duration, parse_duration

__all__ = ["RuleError", "Rule", "Condition", "Webhook", "parse_rule", "load_rules", "build_filter",
           "SEVERITIES", "FORMATS", "GROUP_FIELDS"]

_S = 1_000_000_000
SEVERITIES = ("info", "warning", "critical")
FORMATS = ("flowscope", "alertmanager", "alertmanager-api", "slack")
GROUP_FIELDS = ("source_namespace", "destination_namespace", "source_pod", "destination_pod",
                "source_workload", "destination_workload", "destination_port", "protocol", "verdict",
                "drop_reason", "node_name", "traffic_direction")
QUANTILES = {"p50": 0.5, "p90": 0.9, "p95": 0.95, "p99": 0.99}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_HEADER = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_RESERVED_HEADERS = {"x-flowscope-signature", "content-length", "host", "content-type"}
_RULE_KEYS = ("name", "description", "filter", "condition", "for", "severity", "labels", "annotations",
              "group_by", "max_groups", "repeat_interval", "send_resolved", "webhook", "enabled")
_WEBHOOK_KEYS = ("url", "secret", "headers", "timeout", "format", "max_backoff", "give_up_after")
REDACTED = "<redacted>"


class RuleError(ValueError):
    """An invalid rule; the message starts with the rule name (when known) and the field."""


@dataclass(frozen=True)
class Webhook:
    url: str
    secret: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    timeout_s: float = 5.0
    format: str = "flowscope"
    max_backoff_s: float = 300.0
    give_up_after_s: float = 86400.0


@dataclass(frozen=True)
class Condition:
    kind: str                      # count | ratio | quantile | kafka_errors | new_edge
    threshold: float
    window_ns: int
    of: Optional[dict[str, Any]] = None      # ratio: the numerator filter (observe names)
    quantile: float = 0.0                    # quantile: 0.5 .. 0.99
    quantile_name: str = ""                  # p95
    min_count: int = 1
    error_codes: tuple[int, ...] = ()        # kafka_errors: empty = any non-zero


@dataclass(frozen=True)
class Rule:
    name: str
    condition: Condition
    filter: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    for_ns: int = 0
    severity: str = "warning"
    labels: tuple[tuple[str, str], ...] = ()
    annotations: tuple[tuple[str, str], ...] = ()
    group_by: tuple[str, ...] = ()
    max_groups: int = 100
    repeat_ns: int = 0                       # 0: never repeat while firing
    send_resolved: bool = True
    webhook: Optional[Webhook] = None
    enabled: bool = True

    def filterset(self) -> FilterSet:
        return build_filter(self.filter, "filter")

    def of_filterset(self) -> Optional[FilterSet]:
        return build_filter(self.condition.of, "condition.of") if self.condition.of is not None else None

    def to_doc(self, *, redact: bool = False) -> dict[str, Any]:
        """The canonical document (defaults filled, durations as text); ``parse_rule`` accepts it."""
        c = self.condition
        cond: dict[str, Any]
        if c.kind == "count":
            cond = {"count_over": _num(c.threshold)}
        elif c.kind == "ratio":
            cond = {"ratio_over": c.threshold, "of": c.of, "min_count": c.min_count}
        elif c.kind == "quantile":
            cond = {f"{c.quantile_name}_latency_ms_over": _num(c.threshold), "min_count": c.min_count}
        elif c.kind == "kafka_errors":
            cond = {"kafka_errors_over": _num(c.threshold)}
            if c.error_codes:
                cond["error_codes"] = list(c.error_codes)
        else:
            cond = {"new_edge": True}
        cond["window"] = format_duration(c.window_ns)
        doc: dict[str, Any] = {"name": self.name}
        if self.description:
            doc["description"] = self.description
        doc.update({"filter": self.filter, "condition": cond, "for": format_duration(self.for_ns),
                    "severity": self.severity, "labels": dict(self.labels)})
        if self.annotations:
            doc["annotations"] = dict(self.annotations)
        doc.update({"group_by": list(self.group_by), "max_groups": self.max_groups,
                    "repeat_interval": format_duration(self.repeat_ns), "send_resolved": self.send_resolved,
                    "enabled": self.enabled})
        if self.webhook is not None:
            w = self.webhook
            secret = (REDACTED if w.secret else "") if redact else w.secret
            doc["webhook"] = {"url": w.url, "secret": secret, "headers": dict(w.headers),
                              "timeout": format_duration(int(w.timeout_s * _S)), "format": w.format,
                              "max_backoff": format_duration(int(w.max_backoff_s * _S)),
                              "give_up_after": format_duration(int(w.give_up_after_s * _S))}
        return doc


def _num(x: float) -> Any:
    return int(x) if float(x).is_integer() else x


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def build_filter(spec: Any, where: str) -> FilterSet:
    """The FilterSet for a mapping of observe's filter names. Raises RuleError."""
    if spec is None:
        spec = {}
    try:
        allow, deny = build_filters(filter_args_from_names(spec))
        return FilterSet(allow, deny)
    except (ObserveUsageError, FilterError) as e:
        raise RuleError(f"{where}: {e}") from None


def _duration(value: Any, where: str, *, allow_zero: bool = True) -> int:
    if isinstance(value, bool):
        raise RuleError(f"{where}: expected a duration like 30s, 5m, 1h, got {value!r}")
    if isinstance(value, (int, float)):
        ns = int(value * _S)  # a bare number means seconds
    else:
        try:
            ns = parse_duration(value)
        except TimeParseError as e:
            raise RuleError(f"{where}: {e}") from None
    if ns < 0 or (ns == 0 and not allow_zero):
        raise RuleError(f"{where}: must be {'positive' if not allow_zero else 'zero or more'}, got {value!r}")
    return ns


def _number(value: Any, where: str, *, minimum: float = 0.0, maximum: Optional[float] = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RuleError(f"{where}: expected a number, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        rng = f"between {minimum:g} and {maximum:g}" if maximum is not None else f"at least {minimum:g}"
        raise RuleError(f"{where}: must be {rng}, got {value!r}")
    return float(value)


def _str_map(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise RuleError(f"{where}: expected a mapping of names to text")
    out = []
    for k, v in value.items():
        if not isinstance(k, str) or not k or isinstance(v, (dict, list)) or v is None:
            raise RuleError(f"{where}.{k}: expected text")
        out.append((k, str(v) if not isinstance(v, bool) else str(v).lower()))
    return tuple(out)


def _check_keys(obj: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for k in obj:
        if k not in allowed:
            raise RuleError(f"{where}unknown field {k!r} (allowed: {', '.join(allowed)})")


def _condition(obj: Any) -> Condition:
    if not isinstance(obj, dict) or not obj:
        raise RuleError("condition: expected a mapping such as {count_over: 10, window: 1m}, "
                        "{ratio_over: 0.05, of: {http_status: [\"5+\"]}}, {p95_latency_ms_over: 250}, "
                        "{kafka_errors_over: 0} or {new_edge: true}")
    kinds = [k for k in obj if k in ("count_over", "ratio_over", "kafka_errors_over", "new_edge")
             or (k.endswith("_latency_ms_over") and k.split("_", 1)[0] in QUANTILES)]
    if len(kinds) != 1:
        what = "several conditions: " + ", ".join(kinds) if kinds else "no condition"
        raise RuleError(f"condition: {what}; give exactly one of count_over, ratio_over, "
                        f"p50/p90/p95/p99_latency_ms_over, kafka_errors_over, new_edge")
    kind = kinds[0]
    allowed = {kind, "window"}
    window = _duration(obj.get("window", "1m"), "condition.window", allow_zero=False)
    min_count = 1
    if kind == "count_over":
        cond = Condition("count", _number(obj[kind], "condition.count_over"), window)
    elif kind == "ratio_over":
        allowed |= {"of", "min_count"}
        if "of" not in obj:
            raise RuleError("condition.of: ratio_over needs the filter of the numerator, "
                            "e.g. of: {http_status: [\"5+\"]}")
        build_filter(obj["of"], "condition.of")
        min_count = int(_number(obj.get("min_count", 1), "condition.min_count", minimum=1))
        cond = Condition("ratio", _number(obj[kind], "condition.ratio_over", maximum=1.0), window,
                         of=obj["of"], min_count=min_count)
    elif kind == "kafka_errors_over":
        allowed |= {"error_codes"}
        codes = obj.get("error_codes", [])
        if not isinstance(codes, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in codes):
            raise RuleError("condition.error_codes: expected a list of Kafka error code numbers")
        cond = Condition("kafka_errors", _number(obj[kind], "condition.kafka_errors_over"), window,
                         error_codes=tuple(codes))
    elif kind == "new_edge":
        if obj[kind] is not True:
            raise RuleError("condition.new_edge: write new_edge: true")
        cond = Condition("new_edge", 0.0, window)
    else:
        allowed |= {"min_count"}
        qname = kind.split("_", 1)[0]
        min_count = int(_number(obj.get("min_count", 1), "condition.min_count", minimum=1))
        cond = Condition("quantile", _number(obj[kind], f"condition.{kind}"), window, quantile=QUANTILES[qname],
                         quantile_name=qname, min_count=min_count)
    extra = [k for k in obj if k not in allowed]
    if extra:
        raise RuleError(f"condition: unknown field {extra[0]!r} for {kind} (allowed: {', '.join(sorted(allowed))})")
    return cond


def _webhook(obj: Any) -> Webhook:
    if isinstance(obj, str):
        obj = {"url": obj}
    if not isinstance(obj, dict):
        raise RuleError("webhook: expected a mapping with at least url")
    _check_keys(obj, _WEBHOOK_KEYS, "webhook: ")
    url = obj.get("url")
    if not isinstance(url, str) or not url:
        raise RuleError("webhook.url: required (http:// or https:// URL)")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RuleError(f"webhook.url: {url!r} is not an http:// or https:// URL with a host")
    secret = obj.get("secret", "")
    if not isinstance(secret, str):
        raise RuleError("webhook.secret: expected text")
    if secret == REDACTED:
        raise RuleError("webhook.secret: give the real secret (the API shows it redacted)")
    headers = _str_map(obj.get("headers"), "webhook.headers")
    for k, v in headers:
        if not _HEADER.match(k):
            raise RuleError(f"webhook.headers: {k!r} is not a valid header name")
        if k.lower() in _RESERVED_HEADERS:
            raise RuleError(f"webhook.headers: {k} is set by Flowscope and cannot be overridden")
        if "\n" in v or "\r" in v:
            raise RuleError(f"webhook.headers.{k}: line breaks are not allowed")
    fmt = obj.get("format", "flowscope")
    if fmt not in FORMATS:
        raise RuleError(f"webhook.format: {fmt!r} is not one of {', '.join(FORMATS)}")
    timeout = _duration(obj.get("timeout", "5s"), "webhook.timeout", allow_zero=False) / _S
    max_backoff = _duration(obj.get("max_backoff", "5m"), "webhook.max_backoff", allow_zero=False) / _S
    give_up = _duration(obj.get("give_up_after", "24h"), "webhook.give_up_after", allow_zero=False) / _S
    return Webhook(url=url, secret=secret, headers=headers, timeout_s=timeout, format=fmt,
                   max_backoff_s=max_backoff, give_up_after_s=give_up)


def parse_rule(obj: Any) -> Rule:
    """Validate one rule document (a dict from YAML or JSON). Raises RuleError with a clear message."""
    if not isinstance(obj, dict):
        raise RuleError(f"a rule must be a mapping (name, filter, condition, ...), got {type(obj).__name__}")
    name = obj.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise RuleError(f"name: required, 1-128 characters of letters, digits, '.', '_', '-' (got {name!r})")
    try:
        return _parse(obj, name)
    except RuleError as e:
        raise RuleError(f"rule {name}: {e}") from None


def _parse(obj: dict[str, Any], name: str) -> Rule:
    _check_keys(obj, _RULE_KEYS, "")
    if "condition" not in obj:
        raise RuleError("condition: required, e.g. {count_over: 10, window: 1m}")
    filt = obj.get("filter") or {}
    build_filter(filt, "filter")
    cond = _condition(obj["condition"])
    severity = obj.get("severity", "warning")
    if severity not in SEVERITIES:
        raise RuleError(f"severity: {severity!r} is not one of {', '.join(SEVERITIES)}")
    group_by = obj.get("group_by") or []
    if isinstance(group_by, str):
        group_by = [group_by]
    if not isinstance(group_by, list):
        raise RuleError("group_by: expected a list of field names")
    for g in group_by:
        if g not in GROUP_FIELDS:
            raise RuleError(f"group_by: unknown field {g!r} (allowed: {', '.join(GROUP_FIELDS)})")
    if cond.kind == "new_edge" and group_by:
        raise RuleError("group_by: a new_edge rule groups by edge; remove group_by")
    desc = obj.get("description", "")
    if not isinstance(desc, str):
        raise RuleError("description: expected text")
    for key in ("send_resolved", "enabled"):
        if not isinstance(obj.get(key, True), bool):
            raise RuleError(f"{key}: expected true or false")
    webhook = _webhook(obj["webhook"]) if obj.get("webhook") is not None else None
    return Rule(
        name=name, condition=cond, filter=filt, description=desc,
        for_ns=_duration(obj.get("for", 0), "for"),
        severity=severity, labels=_str_map(obj.get("labels"), "labels"),
        annotations=_str_map(obj.get("annotations"), "annotations"),
        group_by=tuple(group_by),
        max_groups=int(_number(obj.get("max_groups", 100), "max_groups", minimum=1, maximum=10_000)),
        repeat_ns=_duration(obj.get("repeat_interval", 0), "repeat_interval"),
        send_resolved=obj.get("send_resolved", True), webhook=webhook, enabled=obj.get("enabled", True))


def load_rules(text: str | bytes) -> list[Rule]:
    """Rules from YAML or JSON text: one document, several ``---`` documents, a list, or
    ``{rules: [...]}``. Names must be unique. Raises RuleError."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise RuleError(f"not valid YAML/JSON{where}: {problem}") from None
    except RecursionError:  # found by tests/test_reliability_badinput.py (issue 8)
        raise RuleError("not valid rules: nested too deeply") from None
    items: list[Any] = []
    for d in docs:
        if isinstance(d, dict) and set(d) == {"rules"}:
            d = d["rules"]
        items.extend(d if isinstance(d, list) else [d])
    if not items:
        raise RuleError("no rule found (expected a mapping with name, filter, condition)")
    rules = [parse_rule(it) for it in items]
    seen: set[str] = set()
    for r in rules:
        if r.name in seen:
            raise RuleError(f"rule {r.name}: the name appears twice")
        seen.add(r.name)
    return rules
