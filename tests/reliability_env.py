"""Real processes for the reliability, security and PostgreSQL tests (not a test module).

* :class:`PostgresCluster`: a private PostgreSQL cluster from Debian's binaries (``initdb`` + ``pg_ctl``)
  in a temporary directory, listening only on a unix socket there; run as the ``postgres`` user when the
  tests run as root (PostgreSQL refuses to run as root), stopped and removed afterwards.
* :class:`ServerProcess`: ``api.server.serve`` in its own process group on a fixed port, so it can be
  killed with SIGKILL (with its writer process) and started again on the same address.
* :func:`generator`: ``python -m bench.soak gen``: the real ``probe.shipper.Shipper`` with its on-disk
  spool, fed generated flows at a fixed rate.
"""

from __future__ import annotations

import atexit
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import httpx

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float = 30.0, every: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------


def pg_bindir() -> Optional[str]:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return os.path.dirname(found[-1]) if found else None


class PostgresCluster:
    """A throwaway cluster: ``start()``, ``url(db)``, ``create_database(db)``, ``stop()``."""

    def __init__(self) -> None:
        bindir = pg_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (Debian package postgresql; make setup installs it)")
        self.bindir = bindir
        self.dir = tempfile.mkdtemp(prefix="flowscope-pg-")
        self.data = os.path.join(self.dir, "data")
        self.port = free_port()  # only names the socket file; nothing listens on TCP
        self.as_postgres = os.geteuid() == 0
        self.proc_log = os.path.join(self.dir, "postgres.log")
        self._started = False
        atexit.register(self.stop)

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = list(args)
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--"] + cmd
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.dir)

    def start(self) -> "PostgresCluster":
        if self.as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")
        os.chmod(self.dir, 0o755)
        r = self._run(f"{self.bindir}/initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                      "--no-locale", "--no-sync")
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed: {r.stderr or r.stdout}")
        opts = (f"-k {self.dir} -p {self.port} -c listen_addresses='' -c fsync=off -c synchronous_commit=off "
                f"-c full_page_writes=off -c max_connections=100 -c shared_buffers=64MB")
        r = self._run(f"{self.bindir}/pg_ctl", "-D", self.data, "-o", opts, "-l", self.proc_log, "-w", "-t", "60",
                      "start")
        if r.returncode != 0:
            log = Path(self.proc_log).read_text() if os.path.exists(self.proc_log) else ""
            raise RuntimeError(f"pg_ctl start failed: {r.stderr or r.stdout}\n{log[-2000:]}")
        self._started = True
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@/{database}?host={self.dir}&port={self.port}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(host=self.dir, port=self.port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self._started:
            self._started = False
            self._run(f"{self.bindir}/pg_ctl", "-D", self.data, "-m", "immediate", "-w", "-t", "30", "stop")
        if os.path.isdir(self.dir):
            shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# The API server as a process
# --------------------------------------------------------------------------------------------


class ServerProcess:
    """``serve(db_url, '127.0.0.1', port, ...)`` in a new session. ``settings_code`` is Python source for
    extra keyword arguments of ``serve`` (e.g. ``"auth_required=True, rate_limit=0"``)."""

    def __init__(self, db_url: str, *, port: Optional[int] = None, settings_code: str = "",
                 log_path: Optional[str] = None, host: str = "127.0.0.1", log_level: str = "warning") -> None:
        self.db_url = db_url
        self.host = host
        self.log_level = log_level
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.settings_code = settings_code
        self.log_path = log_path
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 60.0) -> "ServerProcess":
        code = (f"import logging; logging.basicConfig(level=logging.{self.log_level.upper()}); "
                f"from api.server import serve; serve({self.db_url!r}, {self.host!r}, {self.port}, {self.log_level!r}"
                + (f", {self.settings_code}" if self.settings_code else "") + ")")
        out = open(self.log_path, "ab") if self.log_path else None
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, start_new_session=True,
                                         stdout=out, stderr=out)
        finally:
            if out is not None:
                out.close()
        deadline = time.monotonic() + timeout
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

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill9(self) -> None:
        """SIGKILL the server and its writer process (the whole process group) at once."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._reap_group()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._reap_group()

    def _reap_group(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # a writer process left behind
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# Flow generators (the real shipper and spool)
# --------------------------------------------------------------------------------------------


@contextmanager
def postgres_cluster() -> Iterator["PostgresCluster"]:
    """A started throwaway cluster for a test module, stopped afterwards. Without PostgreSQL installed the
    tests skip, except under CI=true, where that is a failure (make setup installs it)."""
    import pytest

    if pg_bindir() is None:
        if IN_CI:
            pytest.fail("PostgreSQL is not installed (make setup installs the Debian package postgresql)")
        pytest.skip("PostgreSQL is not installed")
    c = PostgresCluster().start()
    try:
        yield c
    finally:
        c.stop()


def generator(server: str, node: str, *, rate: float, seconds: float, spool_dir: Optional[str],
              token: Optional[str] = None, drain_timeout: float = 180.0, batch_size: int = 1000,
              seed: int = 1, spool_max_bytes: Optional[int] = None, max_queue: Optional[int] = None) -> subprocess.Popen:
    """``python -m bench.soak gen``: its last stdout line is a JSON report (see bench.soak.generate)."""
    args = [sys.executable, "-m", "bench.soak", "gen", "--server", server, "--node", node, "--rate", str(rate),
            "--seconds", str(seconds), "--drain-timeout", str(drain_timeout), "--batch-size", str(batch_size),
            "--seed", str(seed)]
    if spool_dir is not None:
        args += ["--spool-dir", spool_dir]
    if spool_max_bytes is not None:
        args += ["--spool-max-bytes", str(spool_max_bytes)]
    if max_queue is not None:
        args += ["--max-queue", str(max_queue)]
    env = dict(os.environ)
    if token:
        env["FLOWSCOPE_TOKEN"] = token
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)


def generator_report(p: subprocess.Popen, timeout: float) -> dict[str, Any]:
    out, _ = p.communicate(timeout=timeout)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert p.returncode == 0 and lines, f"generator failed (exit {p.returncode}): {out[-2000:]}"
    return json.loads(lines[-1])


def kill_group(p: subprocess.Popen) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(10)
