"""``flowscope policy`` against the real server (a subprocess on a free port)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

from enforcer.policy import load_policy
from flowscope.cli import main

from enforcer_server import PolicyServer, free_port

GOOD = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: db-in
  namespace: demo
spec:
  endpointSelector:
    matchLabels: {app: db}
  ingress:
  - fromEndpoints: [{matchLabels: {app: api}}]
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
"""

AUDITED = """
metadata:
  name: watch
  annotations: {flowscope.io/audit-mode: "true"}
spec:
  endpointSelector: {matchLabels: {app: batch}}
  egress: [{toEntities: [world]}]
"""

BAD = """
metadata: {name: db-in, namespace: demo}
spec:
  endpointSelector: {matchLabel: {app: db}}
  ingress:
  - toPorts: [{ports: [{port: 99999, protocol: SCTPX}]}]
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with PolicyServer(tmp_path_factory.mktemp("cli") / "f.db") as srv:
        yield srv


@pytest.fixture
def cli(server):
    runner = CliRunner()

    def run(*args: str, input: str | None = None):
        return runner.invoke(main, ["policy", *args, "--server", server.url], input=input)

    # every test starts from an empty policy set
    res = run("list", "-o", "json")
    for item in json.loads(res.stdout)["items"]:
        args = ["delete", item["name"]] + (["-n", item["namespace"]] if item["namespace"] else ["--cluster-wide"])
        assert run(*args).exit_code == 0
    return run


def test_apply_list_get_delete(cli, tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(GOOD)
    r = cli("apply", "-f", str(f))
    assert r.exit_code == 0, r.output
    assert r.output.startswith("ciliumnetworkpolicy demo/db-in created (revision ")
    assert "unchanged" in cli("apply", "-f", str(f)).output
    r = cli("apply", "-f", "-", "-n", "jobs", input=AUDITED)
    assert r.exit_code == 0 and "ciliumnetworkpolicy jobs/watch created" in r.output
    r = cli("list")
    lines = [l.split() for l in r.stdout.splitlines()]
    assert lines[0][:4] == ["NAMESPACE", "NAME", "KIND", "REVISION"]
    rows = {l[1]: l for l in lines[1:]}
    assert rows["db-in"][0] == "demo" and rows["watch"][0] == "jobs" and rows["watch"][4] == "yes"
    r = cli("list", "-n", "jobs")
    assert len(r.stdout.splitlines()) == 2 and "(1 policy, revision" in r.stderr
    r = cli("get", "db-in", "-n", "demo")
    assert r.exit_code == 0 and r.output.startswith("# revision ")
    got = load_policy(r.stdout)
    assert got.to_json() == load_policy(GOOD).to_json()  # the canonical document round-trips
    r = cli("get", "db-in", "-n", "demo", "-o", "json")
    assert '"name": "db-in"' in r.output
    r = cli("delete", "db-in", "watch", "-n", "demo")
    assert r.exit_code == 1
    assert "ciliumnetworkpolicy demo/db-in deleted" in r.output and "demo/watch" in r.output
    assert cli("delete", "watch", "-n", "jobs").exit_code == 0
    r = cli("get", "db-in", "-n", "demo")
    assert r.exit_code == 1 and "not found" in r.output


def test_invalid_policies_are_rejected_with_field_errors(cli, tmp_path):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(GOOD.replace("db-in", "other"))
    bad.write_text(BAD)
    r = cli("apply", "-f", str(good), "-f", str(bad))
    assert r.exit_code == 1
    out = r.output
    assert "nothing was applied" in out
    assert f"{bad}, policy demo/db-in: spec.endpointSelector.matchLabel: unknown field (did you mean 'matchLabels'?)" in out
    assert "spec.ingress[0].toPorts[0].ports[0].port: 99999 is not a port number or range (0-65535)" in out
    assert 'spec.ingress[0].toPorts[0].ports[0].protocol: "SCTPX" is not a protocol' in out
    assert "Traceback" not in out
    assert "(0 policies" in cli("list").output  # the valid file was not applied either
    r = cli("apply", "-f", str(tmp_path / "missing.yaml"))
    assert r.exit_code == 2 and "cannot read" in r.output


def test_dry_run_sends_nothing(cli, tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(GOOD + "---\n" + AUDITED)
    r = cli("apply", "--dry-run", "-f", str(f))
    assert r.exit_code == 0 and "2 policies valid" in r.output
    assert "(0 policies" in cli("list").output


def test_unreachable_server_is_one_clear_line():
    port = free_port()
    r = CliRunner().invoke(main, ["policy", "list", "--server", f"http://127.0.0.1:{port}"])
    assert r.exit_code == 1 and "cannot reach the Flowscope server" in r.output and "Traceback" not in r.output


def test_the_installed_command(server, tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(GOOD.replace("db-in", "via-subprocess"))
    cmd = [sys.executable, "-m", "flowscope.cli", "policy"]
    r = subprocess.run(cmd + ["apply", "-f", str(f), "--server", server.url], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "via-subprocess created" in r.stdout
    r = subprocess.run(cmd + ["get", "via-subprocess", "-n", "demo", "--server", server.url], capture_output=True,
                       text=True, timeout=60)
    assert yaml.safe_load(r.stdout.split("\n", 1)[1])["metadata"]["name"] == "via-subprocess"
    subprocess.run(cmd + ["delete", "via-subprocess", "-n", "demo", "--server", server.url], check=True,
                   capture_output=True, timeout=60)
