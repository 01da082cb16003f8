"""REST for alerts, ``/metrics``, and the server-side flow export, mounted by :func:`install`.

* ``GET /api/v1/alerts/rules`` — the rules (secrets redacted); ``POST`` applies YAML or JSON (one rule,
  several ``---`` documents, a list or ``{rules: [...]}``; all or nothing); ``GET|PUT|DELETE
  /api/v1/alerts/rules/{name}``;
* ``POST /api/v1/alerts/rules/test`` — evaluate a rule (not stored) against the stored flows of its window;
* ``GET /api/v1/alerts/state`` — every alert group: state, since, window numbers;
* ``GET /api/v1/alerts/deliveries?rule=&limit=`` — the delivery log (every attempt) and the outbox;
* ``GET /metrics`` — Prometheus text format (:mod:`api.metrics`).

Invalid rules are a 400 whose ``detail`` names the rule and the field.
"""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Optional

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from .alerts.rules import RuleError, load_rules
from .alerts.service import AlertService
from .metrics import FlowMetrics, ServerCollector, fanout, make_registry, render

log = logging.getLogger(__name__)
MAX_RULES_BODY = 1024 * 1024
DEFAULT_PUBLIC_URL = "http://127.0.0.1:8080"


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


async def _body(request: Request) -> Optional[bytes]:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_RULES_BODY:
            return None
    return body


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    from flowscope.schema import format_timestamp

    out = {}
    for k, v in row.items():
        if k.endswith("_ns") and isinstance(v, int):
            out[k[:-3]] = format_timestamp(v) if v else None
        elif isinstance(v, bytes):
            continue
        else:
            out[k] = v
    return out


def create_alerts_router(alerts: AlertService) -> APIRouter:
    router = APIRouter(prefix="/api/v1/alerts", tags=["alerts"])

    @router.get("/rules", summary="Alert rules (webhook secrets redacted)")
    async def list_rules() -> dict[str, Any]:
        return {"rules": [r.to_doc(redact=True) for r in alerts.rules()]}

    @router.post("/rules", summary="Create or replace alert rules (YAML or JSON; all or nothing)",
                 responses={400: {"description": "Invalid rule: the message names the rule and the field"}})
    async def apply_rules(request: Request) -> Response:
        body = await _body(request)
        if body is None:
            return _error(413, f"rules body exceeds {MAX_RULES_BODY} bytes")
        try:
            applied = await run_in_threadpool(alerts.apply, body)
        except RuleError as e:
            return _error(400, str(e))
        return JSONResponse({"applied": applied})

    @router.post("/rules/test", summary="Evaluate a rule against the stored flows of its window (not stored)")
    async def test_rule(request: Request) -> Response:
        body = await _body(request)
        if body is None:
            return _error(413, f"rule body exceeds {MAX_RULES_BODY} bytes")
        try:
            rules = load_rules(body)
            if len(rules) != 1:
                return _error(400, f"give one rule to test, got {len(rules)}")
            result = await run_in_threadpool(alerts.test, rules[0].to_doc())
        except RuleError as e:
            return _error(400, str(e))
        return JSONResponse(result)

    @router.get("/rules/{name}", summary="One alert rule")
    async def get_rule(name: str) -> Response:
        r = alerts.get(name)
        if r is None:
            return _error(404, f"no alert rule named {name!r}")
        return JSONResponse(r.to_doc(redact=True))

    @router.put("/rules/{name}", summary="Create or replace one alert rule")
    async def put_rule(name: str, request: Request) -> Response:
        body = await _body(request)
        if body is None:
            return _error(413, f"rule body exceeds {MAX_RULES_BODY} bytes")
        try:
            rules = load_rules(body)
            if len(rules) != 1 or rules[0].name != name:
                return _error(400, f"the body must be one rule named {name!r}")
            applied = await run_in_threadpool(alerts.apply, [rules[0].to_doc()])
        except RuleError as e:
            return _error(400, str(e))
        return JSONResponse({"applied": applied})

    @router.delete("/rules/{name}", summary="Delete an alert rule (its firing alerts are resolved)")
    async def delete_rule(name: str) -> Response:
        if not await run_in_threadpool(alerts.delete, name):
            return _error(404, f"no alert rule named {name!r}")
        return JSONResponse({"deleted": name})

    @router.get("/state", summary="Alert groups: state (pending, firing, inactive), since, window numbers")
    async def state() -> dict[str, Any]:
        return {"alerts": await run_in_threadpool(alerts.state)}

    @router.get("/deliveries", summary="Webhook delivery log (every attempt, newest first) and the outbox")
    async def deliveries(rule: Optional[str] = None, limit: int = 100) -> Response:
        if limit < 1 or limit > 10_000:
            return _error(400, "limit must be between 1 and 10000")

        def read() -> dict[str, Any]:
            return {"deliveries": [_clean(d) for d in alerts.store.deliveries(rule, limit)],
                    "outbox": [_clean(o) for o in alerts.store.outbox(limit=limit)
                               if rule is None or o["rule"] == rule]}
        return Response(orjson.dumps(await run_in_threadpool(read)), media_type="application/json")

    return router


def install(app: FastAPI, *, settings: Any, engine: Any, store: Any, hub: Any, writer: Any) -> None:
    """Alerts, ``/metrics`` and the flow export on ``app``: each committed batch is also counted, evaluated
    and exported (after the live stream); the services start before the app's own lifespan and stop after
    it (so the flows the writer commits while stopping are still evaluated and exported)."""
    base_url = getattr(settings, "public_url", "") or os.environ.get("FLOWSCOPE_PUBLIC_URL") or DEFAULT_PUBLIC_URL
    alerts = AlertService(engine, store, base_url=base_url,
                          eval_interval_s=float(getattr(settings, "alert_eval_interval_s", 1.0)))
    exporter = None
    export_cfg = getattr(settings, "export", None)
    if export_cfg is not None:
        from flowscope.export import FlowExporter

        exporter = FlowExporter(export_cfg)
    metrics = FlowMetrics()
    writer.on_commit = fanout(writer.on_commit, metrics.observe_batches, alerts.ingest,
                              exporter.write_batches if exporter is not None else None)
    registry = make_registry(ServerCollector(metrics, store=store, writer=writer, hub=hub, alerts=alerts,
                                             exporter=exporter))
    app.state.alerts, app.state.metrics, app.state.exporter = alerts, metrics, exporter
    app.include_router(create_alerts_router(alerts))

    @app.get("/metrics", tags=["server"], summary="Prometheus metrics (Hubble's flow metrics and the server's)")
    async def prometheus_metrics() -> Response:
        return Response(await run_in_threadpool(render, registry), media_type=CONTENT_TYPE_LATEST)

    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[Any]:
        await run_in_threadpool(alerts.start)
        try:
            async with inner(a) as state:
                yield state
        finally:
            await run_in_threadpool(alerts.stop)
            if exporter is not None:
                exporter.close()

    app.router.lifespan_context = lifespan
