"""Property-based run of the server's OpenAPI schema (schemathesis): every operation, with generated valid
(positive) and invalid (negative) input, against the real server process (auth on, an admin token): no
answer is a 5xx.

The operations are those of the app's own schema, enumerated at collection, so operations other modules
add are covered too (one test per operation and mode). Token revocation is left out (it would revoke
the token the run uses)."""

from __future__ import annotations

import atexit
import shutil
import tempfile

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from api import migrate
from api.app import Settings, create_app
from api.auth import TokenStore
from api.db import make_engine
from reliability_env import ServerProcess

MAX_EXAMPLES = 20
SKIP = {"DELETE /api/v1/tokens/{token_id}"}


def _operations() -> list[str]:
    tmp = tempfile.mkdtemp(prefix="flowscope-schema-")
    atexit.register(shutil.rmtree, tmp, True)
    doc = create_app(Settings(db_url=f"sqlite:///{tmp}/c.db", writer_process=False)).openapi()
    ops = [f"{m.upper()} {p}" for p, item in doc["paths"].items() for m in item
           if m in ("get", "post", "put", "patch", "delete")]
    return sorted(o for o in ops if o not in SKIP)


@pytest.fixture(scope="module")
def live_api(tmp_path_factory):
    d = tmp_path_factory.mktemp("schemathesis")
    url = f"sqlite:///{d}/s.db"
    engine = make_engine(url)
    migrate.upgrade(engine)
    token = TokenStore(engine).create("fuzz", "admin")[1]
    engine.dispose()
    srv = ServerProcess(url, settings_code="auth_required=True, rate_limit=0").start()
    auth = {"authorization": f"Bearer {token}"}
    doc = httpx.get(srv.url + "/openapi.json", headers=auth, timeout=30).json()
    try:
        yield srv, auth, schemathesis.openapi.from_dict(doc)
    finally:
        srv.stop()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
@pytest.mark.parametrize("label", _operations())
def test_no_server_errors(live_api, label, mode):
    srv, auth, schema = live_api
    op = next(r.ok() for r in schema.get_all_operations() if r.ok().label == label)

    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def run(case):
        response = case.call(base_url=srv.url, headers=auth, timeout=30)
        assert response.status_code < 500, (
            f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:500]}\n"
            f"query={case.query!r} body={str(case.body)[:500]}")

    try:
        run()
    except Unsatisfiable:
        assert mode is GenerationMode.NEGATIVE  # an operation without parameters has no invalid input
