"""Run the whole platform on one node: the server in a child process, the agent in this one.

Two processes, because the agent's drain loop and the server's event loop would otherwise share
one GIL on a 2-core machine.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from typing import Optional, Sequence

import httpx

log = logging.getLogger("flowscope.platform")


class PlatformError(RuntimeError):
    pass


class Platform:
    def __init__(self, db_url: Optional[str] = None, host: str = "127.0.0.1", port: int = 8080,
                 log_level: str = "info", startup_timeout: float = 90.0, server_args: Sequence[str] = ()):
        self.db_url = db_url
        self.host = host
        self.port = port
        self.log_level = log_level
        self.startup_timeout = startup_timeout
        self.server_args = list(server_args)  # extra `flowscope server` options (e.g. --hubble-listen)
        self.proc: Optional[subprocess.Popen] = None
        self.agent = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    def __enter__(self) -> "Platform":
        self.start_server()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start_server(self) -> None:
        _probe_port_free(self.host, self.port)
        args = [sys.executable, "-m", "flowscope.cli", "server", "--host", self.host, "--port", str(self.port),
                "--log-level", self.log_level]
        if self.db_url:
            args += ["--db", self.db_url]
        args += self.server_args
        self.proc = subprocess.Popen(args, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PlatformError(f"the server exited during start-up (code {self.proc.returncode})")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.close()
        raise PlatformError(f"the server did not answer on {self.url} within {self.startup_timeout:.0f}s")

    def run_agent(self, cfg) -> None:
        """Run the agent in this process until SIGINT/SIGTERM (or agent.stop())."""
        from probe.agent import build_agent

        self.agent = build_agent(cfg)
        self.agent.install_signal_handlers()
        self.agent.start()
        self.agent.run()

    def close(self) -> None:
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=5)


def _probe_port_free(host: str, port: int) -> None:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise PlatformError(f"cannot listen on {host}:{port}: {e.strerror} (is another server running?)")
