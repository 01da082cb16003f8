"""The real server: ``api.server.serve`` (migrations, uvicorn, the writer process) in a subprocess on
127.0.0.1 with a free port; HTTP with httpx, the live stream with websocket clients."""

from __future__ import annotations

import base64
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import httpx
import msgspec
import pytest
from websockets.sync.client import connect as ws_connect

from api.samples import sample_flows
from flowscope import schema

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children_of(pid: int) -> list[int]:
    """Child processes of any thread of ``pid``."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


class Server:
    """``flowscope server`` as the CLI runs it (serve()), stopped with SIGTERM, children checked."""

    def __init__(self, db_url: str, **settings: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        code = (f"from api.server import serve; serve({db_url!r}, '127.0.0.1', {self.port}, 'warning', "
                f"**{settings!r})")
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
        self.children: list[int] = []
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server did not start")
            time.sleep(0.1)
        self.children = children_of(self.proc.pid)

    def post(self, obj: Any) -> httpx.Response:
        return httpx.post(self.url + "/api/v1/flows", content=schema.encode(obj), timeout=30)

    def status(self) -> dict:
        return httpx.get(self.url + "/api/v1/status", timeout=10).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.children:  # the writer process ends with the server
            for _ in range(100):
                if not Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.05)
            else:
                os.kill(pid, 9)
                raise AssertionError(f"child process {pid} outlived the server")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(f"sqlite:///{tmp_path_factory.mktemp('srv')}/flows.db")
    yield srv
    srv.stop()


def ndjson(url: str, **params: Any) -> list[bytes]:
    r = httpx.get(url + "/api/v1/flows", params=params, timeout=30)
    assert r.status_code == 200, r.text
    return r.content.splitlines()


def frames(ws, until, timeout: float = 20.0) -> list[list[dict]]:
    """Frames (each a JSON array of envelopes) until ``until(all envelopes so far)`` holds."""
    out: list[list[dict]] = []
    got: list[dict] = []
    deadline = time.monotonic() + timeout
    while not until(got):
        left = deadline - time.monotonic()
        assert left > 0, f"timed out after {len(got)} envelopes"
        msg = ws.recv(timeout=left)
        assert isinstance(msg, str)  # text frames
        frame = msgspec.json.decode(msg)
        assert isinstance(frame, list) and frame
        out.append(frame)
        got.extend(frame)
    return out


def test_writer_is_a_child_process(server):
    assert len(server.children) == 1
    cmd = Path(f"/proc/{server.children[0]}/cmdline").read_bytes().split(b"\0")
    assert b"api.writer" in cmd


def test_ingest_then_query_round_trip(server):
    base = time.time_ns() - 10**9
    flows = sample_flows(1500, seed=31, start_ns=base - 1500 * 1000, step_ns=1000, node_name="rt-node")
    assert server.post({"node_name": "rt-node", "flows": flows[:1000]}).json() == {"accepted": 1000}
    assert server.post(flows[1000:]).json() == {"accepted": 500}
    want = [schema.flow_envelope_json(f) for f in flows]
    lines = ndjson(server.url, node_name="rt-node", last=5000)
    assert lines == want  # byte-identical Hubble envelopes, oldest first
    q = {"whitelist": [{"node_name": ["rt-node"], "verdict": ["DROPPED"]}], "number": 5000}
    r = httpx.post(server.url + "/api/v1/flows/query", content=msgspec.json.encode(q), timeout=30)
    assert r.content.splitlines() == [w for w, f in zip(want, flows) if f.verdict == schema.Verdict.DROPPED]


def test_http_follow_streams_new_flows(server):
    got: list[bytes] = []
    ready = threading.Event()

    def follow() -> None:
        with httpx.stream("GET", server.url + "/api/v1/flows",
                          params={"follow": "true", "node_name": "follow-node", "verdict": "DROPPED"},
                          timeout=30) as r:
            ready.set()
            for line in r.iter_lines():
                got.append(line.encode())
                if len(got) >= len(want):
                    return

    flows = sample_flows(600, seed=32, start_ns=time.time_ns(), step_ns=1000, node_name="follow-node")
    want = [schema.flow_envelope_json(f) for f in flows if f.verdict == schema.Verdict.DROPPED]
    t = threading.Thread(target=follow, daemon=True)
    t.start()
    assert ready.wait(10)
    time.sleep(0.3)  # the subscription is registered right after the response starts
    for i in range(0, 600, 200):
        assert server.post(flows[i:i + 200]).status_code == 200
    t.join(20)
    assert got == want


def test_websocket_history_then_live_filtered_and_batched(server):
    node = "ws-node"
    start = time.time_ns()
    old = sample_flows(300, seed=33, start_ns=start, step_ns=1000, node_name=node)
    assert server.post(old).status_code == 200
    new = sample_flows(1000, seed=34, start_ns=start + 10**6, step_ns=1000, node_name=node)
    old_drops = [schema.flow_envelope_json(f) for f in old if f.verdict == schema.Verdict.DROPPED]
    new_drops = [schema.flow_envelope_json(f) for f in new if f.verdict == schema.Verdict.DROPPED]
    assert len(old_drops) >= 5 and len(new_drops) >= 20
    with ws_connect(f"{server.ws_url}/api/v1/flows/stream?node_name={node}&verdict=DROPPED&last=5") as ws:
        history = frames(ws, lambda got: len(got) >= 5)
        assert [schema.encode(e) for fr in history for e in fr] == old_drops[-5:]
        posts = 10
        for i in range(0, 1000, 1000 // posts):
            assert server.post(new[i:i + 100]).status_code == 200
        live = frames(ws, lambda got: len(got) >= len(new_drops))
    envs = [e for fr in live for e in fr]
    assert all(e["flow"]["verdict"] == "DROPPED" for e in envs)
    assert [schema.encode(e) for e in envs] == new_drops  # no gap, no duplicate, in order
    assert len(live) <= posts  # batched: never one frame per flow
    assert any(len(fr) > 1 for fr in live)


def assert_error_then_close(ws, detail_part: str) -> None:
    """The stream refused its parameters: one 400 error frame naming ``detail_part``, then close code 1008."""
    err = msgspec.json.decode(ws.recv(timeout=10))
    assert err["error"]["status"] == 400 and detail_part in err["error"]["detail"]
    with pytest.raises(Exception) as exc:
        ws.recv(timeout=10)
    assert getattr(exc.value, "rcvd", None) is not None and exc.value.rcvd.code == 1008


def test_websocket_bad_filter_is_reported(server):
    with ws_connect(f"{server.ws_url}/api/v1/flows/stream?verdict=PERHAPS") as ws:
        assert_error_then_close(ws, "PERHAPS")


class StuckClient:
    """A websocket client that completes the handshake and then does not read (a frozen browser tab),
    with a small receive buffer so the server's socket fills quickly."""

    def __init__(self, port: int, path: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                           ).encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.sock.recv(4096)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def frame(self, timeout: float) -> Optional[list]:
        self.sock.settimeout(timeout)
        try:
            b0, b1 = self._read(2)
        except (socket.timeout, TimeoutError):
            return None
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self._read(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._read(8))
        payload = self._read(n)
        assert b0 & 0x0F == 1, f"opcode {b0 & 0x0F}"  # text
        return msgspec.json.decode(payload)

    def close(self) -> None:
        self.sock.close()


def test_slow_client_drops_are_counted_and_ingest_is_not_slowed(tmp_path):
    srv = Server(f"sqlite:///{tmp_path}/flows.db", stream_queue_size=2000)
    stuck: Optional[StuckClient] = None
    try:
        node = "busy-node"
        path = f"/api/v1/flows/stream?node_name={node}"
        stuck = StuckClient(srv.port, path)
        fast_got: list[dict] = []
        with ws_connect(srv.ws_url + path, max_size=None) as fast:
            time.sleep(0.3)
            total, batch = 30_000, 1000
            t0 = time.time_ns()
            for i in range(0, total, batch):
                flows = sample_flows(batch, seed=40 + i, start_ns=t0 + i * 1000, step_ns=1000, node_name=node)
                r = srv.post(flows)  # the stuck client never read: ingest still completes
                assert r.status_code == 200 and r.json() == {"accepted": batch}
                while True:  # the fast client keeps up (paced ingest, ~10k flows/s)
                    try:
                        fast_got.extend(msgspec.json.decode(fast.recv(timeout=0.05)))
                    except TimeoutError:
                        break
            deadline = time.monotonic() + 20
            while sum(1 for e in fast_got if "flow" in e) < total and time.monotonic() < deadline:
                try:
                    fast_got.extend(msgspec.json.decode(fast.recv(timeout=1)))
                except TimeoutError:
                    pass
        assert sum(1 for e in fast_got if "flow" in e) == total
        assert not [e for e in fast_got if "lost_events" in e]  # a slow client costs others nothing

        st = srv.status()
        dropped = st["stream"]["dropped_flows"]
        assert dropped > 0, st["stream"]

        # The stuck client wakes up: every flow is either delivered or counted as lost, exactly.
        flows_seen = lost_seen = 0
        deadline = time.monotonic() + 30
        while flows_seen + lost_seen < total and time.monotonic() < deadline:
            fr = stuck.frame(timeout=2)
            if fr is None:
                continue
            for e in fr:
                if "flow" in e:
                    flows_seen += 1
                else:
                    assert e["lost_events"]["source"] == "HUBBLE_RING_BUFFER"
                    lost_seen += int(e["lost_events"]["num_events_lost"])
        assert lost_seen == dropped and flows_seen + lost_seen == total
    finally:
        if stuck is not None:
            stuck.close()
        srv.stop()


def test_restart_keeps_data_and_migrations_are_idempotent(tmp_path):
    url = f"sqlite:///{tmp_path}/flows.db"
    flows = sample_flows(50, seed=50, start_ns=time.time_ns(), step_ns=1000)
    srv = Server(url)
    try:
        assert srv.post({"node_name": "n1", "flows": flows}).status_code == 200
    finally:
        srv.stop()
    srv = Server(url)  # migrations run again at start: a no-op on an up-to-date database
    try:
        st = srv.status()
        assert st["num_flows"] == 50 and st["seen_flows"] == 0
        assert ndjson(srv.url, last=100) == [schema.flow_envelope_json(f) for f in flows]
        assert srv.post(flows[:10]).status_code == 200
        assert srv.status()["num_flows"] == 60
    finally:
        srv.stop()
