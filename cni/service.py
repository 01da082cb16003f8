"""The CNI service inside the node agent: runs plugin requests in-process (the fast path).

``CNIService(state_dir).start()`` serves ``<state_dir>/cni.sock`` (mode 0600) from a background
thread, one thread per request; only root (or the agent's own uid) may talk to it, checked with
SO_PEERCRED. Each request is executed by :func:`cni.commands.execute` exactly as the standalone
plugin would, with pyroute2 already loaded. ``stop()`` stops accepting, waits for requests in
flight and removes the socket.

The wire format is described in :mod:`cni.plugin`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import struct
import threading
from pathlib import Path
from typing import Optional

from cni.commands import execute
from cni.plugin import MAGIC, SOCKET_NAME, decode_env, encode_response
from flowscope.endpoints import default_state_dir

log = logging.getLogger("flowscope.cni.service")

MAX_REQUEST = 4 << 20  # 4 MiB of header + config is far beyond any real network config
REQUEST_TIMEOUT = 30.0  # for reading the request, not for executing it


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def _error(code: int, msg: str, details: str) -> bytes:
    body = json.dumps({"cniVersion": "1.1.0", "code": code, "msg": msg, "details": details})
    return encode_response(1, body.encode() + b"\n", f"flowscope-cni service: {msg}: {details}\n".encode())


def parse_request(data: bytes) -> Optional[tuple[dict[str, str], bytes]]:
    """(env, stdin) from one request, or None when it is not a complete request in the wire format."""
    head, sep, body = data.partition(b"\n")
    parts = head.split()
    if not sep or len(parts) != 3 or parts[0] != MAGIC:
        return None
    try:
        n_env, n_stdin = int(parts[1]), int(parts[2])
    except ValueError:
        return None
    if n_env < 0 or n_stdin < 0 or len(body) != n_env + n_stdin:
        return None
    return decode_env(body[:n_env]), body[n_env:]


class _Handler(socketserver.BaseRequestHandler):
    server: "_Server"

    def handle(self) -> None:
        sock: socket.socket = self.request
        try:
            uid = peer_uid(sock)
            # Read the (bounded) request before answering, also for a peer that will be refused: replying
            # and closing while it still sends would reset the connection before it reads the error.
            sock.settimeout(REQUEST_TIMEOUT)
            data = bytearray()
            while len(data) <= MAX_REQUEST:
                b = sock.recv(65536)
                if not b:
                    break
                data += b
            if uid not in (0, os.geteuid()):  # nothing of the request is parsed or executed
                sock.sendall(_error(5, "permission denied", f"uid {uid} may not use the CNI service"))
                return
            if len(data) > MAX_REQUEST:
                sock.sendall(_error(6, "request too large", f"more than {MAX_REQUEST} bytes"))
                return
            parsed = parse_request(bytes(data))
            if parsed is None:
                sock.sendall(_error(6, "malformed request", "not the flowscope-cni wire format, or truncated"))
                return
            env, stdin = parsed
            env["FLOWSCOPE_STATE_DIR"] = str(self.server.state_dir)
            resp = execute(env, stdin, agent=True)
            if resp.status != 0:
                log.info("CNI %s %s/%s failed: %s", env.get("CNI_COMMAND", "?"), env.get("CNI_CONTAINERID", "-"),
                         env.get("CNI_IFNAME", "-"), resp.stdout.decode(errors="replace").strip())
            sock.sendall(encode_response(resp.status, resp.stdout, resp.stderr))
        except OSError as e:  # the client went away
            log.warning("CNI request failed: %s", e)
        except Exception:  # keep serving; the client gets a CNI error
            log.exception("CNI request crashed")
            try:
                sock.sendall(_error(199, "internal error", "the CNI service failed; see the agent log"))
            except OSError:
                pass


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = False
    state_dir: Path


class CNIService:
    """Serve CNI requests for the plugin's fast path. Safe to start and stop repeatedly."""

    def __init__(self, state_dir: Optional[Path | str] = None):
        self.state_dir = Path(state_dir) if state_dir else default_state_dir()
        self.socket_path = self.state_dir / SOCKET_NAME
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def _clear_stale_socket(self) -> None:
        if not self.socket_path.exists() and not self.socket_path.is_symlink():
            return
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(self.socket_path))
        except OSError:
            self.socket_path.unlink(missing_ok=True)  # nobody listens: left by a dead agent
            return
        finally:
            probe.close()
        raise RuntimeError(f"another CNI service already listens on {self.socket_path}")

    def start(self) -> "CNIService":
        if self._server is not None:
            return self
        import pyroute2.iproute  # noqa: F401  (warm: the first request must not pay the import)

        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        self._clear_stale_socket()
        old = os.umask(0o177)
        try:
            server = _Server(str(self.socket_path), _Handler)
        finally:
            os.umask(old)
        os.chmod(self.socket_path, 0o600)
        server.state_dir = self.state_dir
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="flowscope-cni-service", daemon=True)
        self._thread.start()
        log.info("CNI service listening on %s", self.socket_path)
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()  # waits for requests in flight
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self.socket_path.unlink()
        except FileNotFoundError:
            pass
        log.info("CNI service stopped")

    def __enter__(self) -> "CNIService":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
