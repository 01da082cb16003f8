"""A plain HTTP server in a lab namespace for probe tests: ``python -m http.server``, up (answering the
client) when the block starts, stopped when it ends, pass or fail."""

from __future__ import annotations

import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def http_server(client, srv, port: int = 8080) -> Iterator[None]:
    p = srv.popen([sys.executable, "-m", "http.server", str(port), "--bind", "0.0.0.0"],
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            if client.exec(["curl", "-s", "-o", "/dev/null", f"http://{srv.ipv4}:{port}/"], check=False).returncode == 0:
                break
            time.sleep(0.1)
        yield
    finally:
        p.terminate()
        p.wait(5)
