"""HTTP client of ``/api/v1/policies`` (used by ``flowscope policy`` and the agent's policy sync)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import httpx

CLUSTER_NAMESPACE = "_cluster"


class PolicyAPIError(RuntimeError):
    """The server refused a request or could not be reached. ``errors`` holds field-level validation
    errors (``[{path, message, where, policy}]``) for a 422."""

    def __init__(self, message: str, status: int = 0, errors: Optional[list[dict]] = None):
        super().__init__(message)
        self.status = status
        self.errors = errors or []


@dataclass
class PolicySnapshot:
    """The server's policy set at one revision: ``items`` as the REST list returns them."""

    revision: int
    items: list[dict] = field(default_factory=list)
    etag: str = ""


def _segment(namespace: str) -> str:
    return namespace if namespace else CLUSTER_NAMESPACE


class PolicyClient:
    def __init__(self, server: str, token: Optional[str] = None, timeout: float = 10.0):
        self.base = server.rstrip("/")
        headers = {"user-agent": "flowscope-policy"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        self._client = httpx.Client(timeout=timeout, headers=headers)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- transport --------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        url = self.base + path
        try:
            return self._client.request(method, url, **kw)
        except httpx.TimeoutException:
            raise PolicyAPIError(f"{self.base}: no answer in time") from None
        except httpx.HTTPError as e:
            raise PolicyAPIError(f"cannot reach the Flowscope server at {self.base}: {e}") from None

    @staticmethod
    def _check(r: httpx.Response, what: str) -> Any:
        if r.status_code < 300:
            return r.json() if r.content else None
        try:
            body = r.json()
        except ValueError:
            body = {}
        detail = body.get("detail") if isinstance(body, dict) else None
        errors = body.get("errors") if isinstance(body, dict) else None
        if r.status_code == 404 and detail is None:
            detail = "not found (does this server have the policy API?)"
        raise PolicyAPIError(f"{what}: {detail or r.text[:300] or r.reason_phrase}", r.status_code, errors)

    # -- API --------------------------------------------------------------------------------

    def apply(self, text: str | bytes, namespace: str = "default") -> dict:
        body = text.encode() if isinstance(text, str) else text
        r = self._request("POST", "/api/v1/policies", params={"namespace": namespace}, content=body,
                          headers={"content-type": "application/yaml" if not body.lstrip()[:1] in (b"{", b"[") else "application/json"})
        return self._check(r, "apply")

    def list(self, namespace: Optional[str] = None) -> PolicySnapshot:
        params = {"namespace": _segment(namespace)} if namespace is not None else {}
        r = self._request("GET", "/api/v1/policies", params=params)
        data = self._check(r, "list")
        return PolicySnapshot(int(data["revision"]), list(data["items"]), r.headers.get("etag", ""))

    def get(self, namespace: str, name: str) -> dict:
        return self._check(self._request("GET", f"/api/v1/policies/{_segment(namespace)}/{name}"),
                           f"get {namespace + '/' if namespace else ''}{name}")

    def delete(self, namespace: str, name: str) -> dict:
        return self._check(self._request("DELETE", f"/api/v1/policies/{_segment(namespace)}/{name}"),
                           f"delete {namespace + '/' if namespace else ''}{name}")

    def poll(self, etag: str = "", wait: float = 0.0) -> Optional[PolicySnapshot]:
        """The whole set if it changed since ``etag`` (else None). ``wait`` > 0 long-polls: the server
        answers as soon as the set changes, or after ``wait`` seconds."""
        headers = {"if-none-match": etag} if etag else {}
        params = {"wait": f"{wait:g}"} if wait and etag else {}
        timeout = httpx.Timeout(10.0, read=wait + 10.0)
        r = self._request("GET", "/api/v1/policies", headers=headers, params=params, timeout=timeout)
        if r.status_code == 304:
            return None
        data = self._check(r, "list")
        return PolicySnapshot(int(data["revision"]), list(data["items"]), r.headers.get("etag", ""))
