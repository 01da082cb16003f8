"""The real Flowscope server (``api.server.serve``: migrations, uvicorn, writer process) in a subprocess
on a free loopback port, for the policy tests: the same launcher the alert tests use."""

from __future__ import annotations

from alerts_helpers import Server as PolicyServer, free_port  # noqa: F401 - re-exported for the policy tests

__all__ = ["PolicyServer", "free_port"]
