"""One webhook attempt, and when to try again.

``attempt`` POSTs the stored body with the signature, the delivery id and the rule's headers, within the
rule's timeout; any answer outside 2xx (4xx included: a receiver that rejects is a failure worth seeing in
the log) and any transport error is a failure. ``backoff_s`` is exponential (1 s, 2 s, 4 s, ...) up to the
rule's ``max_backoff``, with jitter (uniform between half and the full delay) so receivers coming back are
not hit by every sender at the same instant.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, Optional

import httpx

from .payload import DELIVERY_HEADER, EVENT_HEADER, SIGNATURE_HEADER, sign

USER_AGENT = "flowscope-alerts/1"
BASE_BACKOFF_S = 1.0


@dataclass
class Attempt:
    ok: bool
    status_code: Optional[int]
    error: str
    duration_ms: float


def request_headers(webhook: dict[str, Any], body: bytes, delivery_id: str, event: str) -> dict[str, str]:
    """Headers of a delivery: content type, user agent, ids, the rule's own headers, the signature."""
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, DELIVERY_HEADER: delivery_id,
               EVENT_HEADER: event}
    headers.update(webhook.get("headers") or {})
    secret = webhook.get("secret") or ""
    if secret:
        headers[SIGNATURE_HEADER] = sign(secret, body)
    return headers


def attempt(client: httpx.Client, webhook: dict[str, Any], body: bytes, delivery_id: str, event: str) -> Attempt:
    """POST once. ``webhook`` is the stored form: url, secret, headers, timeout_s."""
    t0 = time.perf_counter()
    try:
        r = client.post(webhook["url"], content=body, headers=request_headers(webhook, body, delivery_id, event),
                        timeout=float(webhook.get("timeout_s") or 5.0))
    except httpx.TimeoutException:
        return Attempt(False, None, f"timed out after {webhook.get('timeout_s', 5.0):g}s",
                       (time.perf_counter() - t0) * 1000)
    except httpx.HTTPError as e:
        return Attempt(False, None, f"{type(e).__name__}: {e}"[:500], (time.perf_counter() - t0) * 1000)
    ms = (time.perf_counter() - t0) * 1000
    if 200 <= r.status_code < 300:
        return Attempt(True, r.status_code, "", ms)
    text = r.text[:200].strip().replace("\n", " ")
    return Attempt(False, r.status_code, f"HTTP {r.status_code}" + (f": {text}" if text else ""), ms)


def backoff_s(attempts: int, max_backoff_s: float, rng: Optional[random.Random] = None) -> float:
    """Seconds to wait after the ``attempts``-th failure (1-based)."""
    rng = rng or random
    delay = min(max_backoff_s, BASE_BACKOFF_S * (2 ** min(attempts - 1, 30)))
    return delay * (0.5 + 0.5 * rng.random())
