"""Test helpers for the alert tests: a real webhook receiver on loopback and a real server process."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Receiver:
    """An HTTP server on 127.0.0.1 recording every POST (path, headers, body). ``statuses`` are answered
    first, in order, then 200. ``stop()`` closes the port (connections are refused); ``start()`` opens it
    again on the same port."""

    def __init__(self, port: int = 0, statuses: Optional[list[int]] = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.requests: list[dict[str, Any]] = []
        self.statuses = list(statuses or [])
        self.answered: list[int] = []
        self._lock = threading.Lock()
        self._server: Optional[http.server.ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "Receiver":
        rec = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with rec._lock:
                    status = rec.statuses.pop(0) if rec.statuses else 200
                    rec.answered.append(status)
                    if status < 300:
                        rec.requests.append({"path": self.path, "headers": dict(self.headers.items()), "body": body,
                                             "json": json.loads(body)})
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def wait_for(self, pred: Callable[[list[dict[str, Any]]], bool], timeout: float = 30.0) -> list[dict[str, Any]]:
        end = time.monotonic() + timeout
        while True:
            with self._lock:
                got = list(self.requests)
            if pred(got):
                return got
            if time.monotonic() > end:
                raise AssertionError(f"receiver: condition not met in {timeout}s; got {[r['json'].get('state') for r in got]}")
            time.sleep(0.05)

    def states(self, rule: Optional[str] = None) -> list[str]:
        with self._lock:
            return [r["json"]["state"] for r in self.requests if rule is None or r["json"].get("rule") == rule]

    def __enter__(self) -> "Receiver":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class Server:
    """``api.server.serve`` (migrations, uvicorn, writer process) in a subprocess on a free loopback port."""

    def __init__(self, db_path: Path, port: int = 0, **settings: Any) -> None:
        self.db_url = f"sqlite:///{db_path}"
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.settings = {"alert_eval_interval_s": 0.2, **settings}
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "Server":
        code = (f"from flowscope.export import ExportConfig; from api.server import serve; "
                f"serve({self.db_url!r}, '127.0.0.1', {self.port}, 'warning', **{self.settings!r})")
        env = dict(os.environ, FLOWSCOPE_PUBLIC_URL=self.url)
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, start_new_session=True, env=env)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server did not start")
            time.sleep(0.1)

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- API shortcuts ----------------------------------------------------------------------------

    def post_flows(self, flows: list[dict[str, Any]], node: str = "node-1") -> int:
        r = httpx.post(self.url + "/api/v1/flows", json={"node_name": node, "flows": flows}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["accepted"]

    def apply(self, text: str) -> httpx.Response:
        return httpx.post(self.url + "/api/v1/alerts/rules", content=text.encode(), timeout=30)

    def get(self, path: str, **params: Any) -> Any:
        r = httpx.get(self.url + path, params=params, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, pred: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
        end = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > end:
                raise AssertionError(f"{what} not met within {timeout}s")
            time.sleep(0.05)


def drop_flow(src_ns: str, dst_ns: str, *, i: int = 0, verdict: str = "DROPPED", t_ns: Optional[int] = None,
              dst_port: int = 8080) -> dict[str, Any]:
    """A Hubble flow dict: a policy drop from src_ns/client to dst_ns/server, at ``t_ns`` (default now)."""
    from flowscope import schema

    f: dict[str, Any] = {
        "time": schema.format_timestamp(t_ns or time.time_ns()), "verdict": verdict,
        "IP": {"source": f"10.1.0.{1 + i % 200}", "destination": "10.2.0.1", "ipVersion": "IPv4"},
        "l4": {"TCP": {"source_port": 40000 + i, "destination_port": dst_port, "flags": {"SYN": True}}},
        "source": {"namespace": src_ns, "pod_name": "client-0", "labels": ["k8s:app=client"], "identity": 1001},
        "destination": {"namespace": dst_ns, "pod_name": "server-0", "labels": ["k8s:app=server"], "identity": 1002},
        "Type": "L3_L4", "traffic_direction": "EGRESS", "is_reply": False,
        "event_type": {"type": 1 if verdict == "DROPPED" else 4, "sub_type": 133 if verdict == "DROPPED" else 0},
    }
    if verdict == "DROPPED":
        f["drop_reason_desc"] = "POLICY_DENIED"
    return f
