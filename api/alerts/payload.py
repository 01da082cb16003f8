"""Webhook bodies and their signature (pure).

Formats (``webhook.format``):

* ``flowscope`` (default): rule, severity, state, the window's numbers, up to 5 sample flows (Hubble JSON),
  links into the dashboard and the flows API;
* ``alertmanager``: the body Alertmanager sends to its webhook receivers (version 4), so tools written for
  Alertmanager receive Flowscope alerts unchanged;
* ``alertmanager-api``: the array ``POST /api/v2/alerts`` of an Alertmanager takes (Flowscope as an alert
  source; Alertmanager then routes, groups and silences);
* ``slack``: an incoming-webhook message (``text`` plus a coloured attachment).

The body is built once, when the alert changes state, and stored: every retry sends the same bytes, and
``id`` (also the ``X-Flowscope-Delivery`` header) lets a receiver drop a duplicate.
The signature is ``X-Flowscope-Signature: sha256=<hex HMAC-SHA256 of the body with the rule's secret>``.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, Optional
from urllib.parse import urlencode

import orjson

from flowscope import schema
from flowscope.timeparse import format_duration

from .engine import FIRING, Notification
from .rules import Rule

SIGNATURE_HEADER = "X-Flowscope-Signature"
DELIVERY_HEADER = "X-Flowscope-Delivery"
EVENT_HEADER = "X-Flowscope-Event"
_ZERO_TIME = "0001-01-01T00:00:00Z"
_COLORS = {"info": "#439FE0", "warning": "warning", "critical": "danger"}


def sign(secret: str, body: bytes) -> str:
    """The signature header value for ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: Optional[str]) -> bool:
    """Whether ``header`` is the right signature of ``body`` (constant-time comparison)."""
    return bool(header) and hmac.compare_digest(sign(secret, body), header or "")


def notification_id(n: Notification) -> str:
    return hashlib.sha256(n.key.encode()).hexdigest()[:32]


def describe(rule: Rule, n: Notification) -> str:
    """One line: what the window shows, against the condition."""
    c = rule.condition
    win = format_duration(c.window_ns)
    v = n.value
    if c.kind == "count":
        what = f"{int(v or 0)} flows in {win} (threshold > {c.threshold:g})"
    elif c.kind == "ratio":
        ratio = "n/a" if v is None else f"{v:.1%}"
        what = (f"{ratio} of {n.stats.get('flows', 0)} flows match {orjson.dumps(c.of).decode()} in {win} "
                f"(threshold > {c.threshold:.1%})")
    elif c.kind == "quantile":
        q = "n/a" if v is None else f"{v:g} ms"
        what = f"{c.quantile_name} latency {q} in {win} (threshold > {c.threshold:g} ms)"
    elif c.kind == "kafka_errors":
        what = f"{int(v or 0)} Kafka responses with an error code in {win} (threshold > {c.threshold:g})"
    else:
        what = f"new edge {n.group_labels.get('source', '?')} -> {n.group_labels.get('destination', '?')}"
    if n.group and c.kind != "new_edge":
        what += f" [{n.group}]"
    return f"{rule.name} {n.state.upper()}: {what}"


def _labels(rule: Rule, n: Notification) -> dict[str, str]:
    labels = {"alertname": rule.name, "severity": rule.severity}
    labels.update(dict(rule.labels))
    labels.update({k: v for k, v in n.group_labels.items() if v != ""})
    return labels


def links(rule: Rule, n: Notification, base_url: str) -> dict[str, str]:
    base = base_url.rstrip("/")
    since = schema.format_timestamp(max(0, n.now_ns - rule.condition.window_ns))
    params = [("since", since)]
    try:
        from flowscope.query import FlowQuery, query_to_params

        fs = rule.filterset()
        params += query_to_params(FlowQuery(whitelist=list(fs.whitelist), blacklist=list(fs.blacklist)))
    except Exception:  # noqa: BLE001 - a filter that has no URL form: the link still shows the window
        pass
    return {"dashboard": f"{base}/#alerts/{rule.name}",
            "flows": f"{base}/api/v1/flows?{urlencode(params)}"}


def flowscope_body(rule: Rule, n: Notification, base_url: str) -> dict[str, Any]:
    cond = rule.to_doc()["condition"]
    body: dict[str, Any] = {
        "version": "1",
        "id": notification_id(n),
        "rule": rule.name,
        "state": n.state,
        "severity": rule.severity,
        "summary": describe(rule, n),
        "description": rule.description,
        "labels": _labels(rule, n),
        "annotations": dict(rule.annotations),
        "group": {"key": n.group, "labels": n.group_labels},
        "condition": cond,
        "window": {"duration": cond["window"], **n.stats},
        "started_at": schema.format_timestamp(n.started_ns) if n.started_ns else None,
        "ended_at": schema.format_timestamp(n.ended_ns) if n.ended_ns else None,
        "evaluated_at": schema.format_timestamp(n.now_ns),
        "repeat": n.repeat,
        "sample_flows": [orjson.loads(s) for s in n.samples],
        "links": links(rule, n, base_url),
    }
    return body


def _am_alert(rule: Rule, n: Notification, base_url: str) -> dict[str, Any]:
    annotations = {"summary": describe(rule, n)}
    if rule.description:
        annotations["description"] = rule.description
    annotations.update(dict(rule.annotations))
    lk = links(rule, n, base_url)
    return {"status": n.state, "labels": _labels(rule, n), "annotations": annotations,
            "startsAt": schema.format_timestamp(n.started_ns or n.now_ns),
            "endsAt": schema.format_timestamp(n.ended_ns) if n.ended_ns else _ZERO_TIME,
            "generatorURL": lk["flows"], "fingerprint": hashlib.sha256(f"{rule.name}|{n.group}".encode()).hexdigest()[:16]}


def alertmanager_body(rule: Rule, n: Notification, base_url: str) -> dict[str, Any]:
    alert = _am_alert(rule, n, base_url)
    group_labels = {"alertname": rule.name, **{k: v for k, v in n.group_labels.items() if v != ""}}
    return {"version": "4", "groupKey": f"{{}}:{{alertname={rule.name!r}}}", "truncatedAlerts": 0,
            "status": n.state, "receiver": "flowscope", "groupLabels": group_labels,
            "commonLabels": alert["labels"], "commonAnnotations": alert["annotations"],
            "externalURL": base_url.rstrip("/"), "alerts": [alert]}


def alertmanager_api_body(rule: Rule, n: Notification, base_url: str) -> list[dict[str, Any]]:
    alert = _am_alert(rule, n, base_url)
    out = {k: alert[k] for k in ("labels", "annotations", "startsAt", "generatorURL")}
    if n.ended_ns:
        out["endsAt"] = alert["endsAt"]
    return [out]


def slack_body(rule: Rule, n: Notification, base_url: str) -> dict[str, Any]:
    lk = links(rule, n, base_url)
    firing = n.state == FIRING
    emoji = ":rotating_light:" if firing else ":white_check_mark:"
    fields = [{"title": "Severity", "value": rule.severity, "short": True},
              {"title": "State", "value": n.state, "short": True}]
    for k, v in n.group_labels.items():
        fields.append({"title": k, "value": v or "-", "short": True})
    return {"text": f"{emoji} {describe(rule, n)}",
            "attachments": [{"color": _COLORS.get(rule.severity, "warning") if firing else "good",
                             "title": rule.name, "title_link": lk["dashboard"],
                             "text": rule.description or describe(rule, n), "fields": fields,
                             "footer": "Flowscope", "ts": n.now_ns // 1_000_000_000}]}


def build_body(rule: Rule, n: Notification, base_url: str, fmt: Optional[str] = None) -> bytes:
    """The bytes to POST for this notification, in the rule's webhook format (or ``fmt``)."""
    fmt = fmt or (rule.webhook.format if rule.webhook is not None else "flowscope")
    if fmt == "alertmanager":
        obj: Any = alertmanager_body(rule, n, base_url)
    elif fmt == "alertmanager-api":
        obj = alertmanager_api_body(rule, n, base_url)
    elif fmt == "slack":
        obj = slack_body(rule, n, base_url)
    else:
        obj = flowscope_body(rule, n, base_url)
    return orjson.dumps(obj)
