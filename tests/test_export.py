"""Flow export: Hubble JSON lines, size-based rotation, allow/deny filters, field mask; the server's export
round-trips through ``flowscope observe --input-file`` and is accepted by hubble-audit2policy (PyPI)."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import yaml

from flowscope import schema
from flowscope.export import ExportConfig, ExportError, FlowExporter, backup_name

NOW = time.time_ns()


def mk(i: int, *, verdict: str = "FORWARDED", src_ns: str = "shop", src_app: str = "frontend",
       dst_ns: str = "shop", dst_app: str = "api", port: int = 8080, t_ns: int = 0) -> schema.Flow:
    return schema.load_flow({
        "time": schema.format_timestamp(t_ns or NOW - 60 * 10**9 + i * 10**6), "verdict": verdict,
        "IP": {"source": "10.0.0.1", "destination": "10.0.0.2", "ipVersion": "IPv4"},
        "l4": {"TCP": {"source_port": 30000 + i % 30000, "destination_port": port}},
        "source": {"namespace": src_ns, "pod_name": f"{src_app}-1", "labels": [f"k8s:app={src_app}"], "identity": 101},
        "destination": {"namespace": dst_ns, "pod_name": f"{dst_app}-1", "labels": [f"k8s:app={dst_app}"],
                        "identity": 102},
        "Type": "L3_L4", "node_name": "node-a", "traffic_direction": "EGRESS", "is_reply": False,
        "uuid": f"u-{i}"})


def lines(path: Path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        return [orjson.loads(x) for x in fh.read().splitlines()]


def test_lines_are_hubble_envelopes(tmp_path):
    ex = FlowExporter(ExportConfig(path=str(tmp_path / "sub" / "flows.json")))
    flows = [mk(i) for i in range(3)]
    ex.write_flows(flows)
    ex.write_lost("OBSERVER_EVENTS_QUEUE", 7, node_name="node-a", time_ns=NOW)
    got = lines(tmp_path / "sub" / "flows.json")
    assert [g["flow"] for g in got[:3]] == [schema.dump_flow(f) for f in flows]
    assert got[0]["node_name"] == "node-a" and got[0]["time"] == flows[0].time
    assert got[3]["lost_events"] == {"source": "OBSERVER_EVENTS_QUEUE", "num_events_lost": "7"}
    assert ex.stats.flows == 3 and ex.stats.lost_events == 1
    ex.close()
    ex2 = FlowExporter(ExportConfig(path=str(tmp_path / "sub" / "flows.json")))  # appends
    ex2.write_flows([mk(9)])
    assert len(lines(tmp_path / "sub" / "flows.json")) == 5


@pytest.mark.parametrize("compress", [False, True])
def test_rotation_by_size_keeps_max_backups(tmp_path, compress):
    path = tmp_path / "flows.json"
    cfg = ExportConfig(path=str(path), max_size_mb=0.01, max_backups=3, compress=compress)
    ex = FlowExporter(cfg)
    n = 0
    for batch in range(40):
        ex.write_flows([mk(n + i) for i in range(10)])
        n += 10
    backups = ex.backups()
    assert len(backups) == 3 and ex.stats.rotations > 3
    assert all(p.endswith(".json.gz" if compress else ".json") for p in backups)
    limit = int(0.01 * 1024 * 1024)
    for p in [str(path)] + ([] if compress else backups):
        assert os.path.getsize(p) <= limit
    # the newest lines are all there, in order, with no gap: the rotated files hold the ones before
    kept = [g for p in backups for g in lines(Path(p))] + lines(path)
    uuids = [int(g["flow"]["uuid"][2:]) for g in kept]
    assert uuids == list(range(n - len(uuids), n))


def test_backup_names_are_lumberjack_style():
    assert backup_name("/x/flows.json", 1732687801.123) == "/x/flows-2024-11-27T06-10-01.123.json"


def test_allowlist_denylist_and_fieldmask(tmp_path):
    cfg = ExportConfig(path=str(tmp_path / "f.json"), allowlist=['{"verdict":["DROPPED"]}', '[{"destination_port":["53"]}]'],
                       denylist=['{"source_pod":["kube-system/"]}'], field_mask=["time", "verdict", "source.namespace"])
    ex = FlowExporter(cfg)
    ex.write_flows([mk(0, verdict="DROPPED"), mk(1), mk(2, port=53), mk(3, verdict="DROPPED", src_ns="kube-system")])
    got = lines(tmp_path / "f.json")
    assert [g["flow"] for g in got] == [
        {"time": mk(0).time, "verdict": "DROPPED", "source": {"namespace": "shop"}},
        {"time": mk(2).time, "verdict": "FORWARDED", "source": {"namespace": "shop"}}]
    assert ex.stats.flows == 2 and ex.stats.filtered == 2


@pytest.mark.parametrize("kw, msg", [
    ({"allowlist": ["{bad"]}, "--export-allowlist: not JSON"),
    ({"denylist": ['{"verdict":["NOPE"]}']}, "--export-denylist: invalid FlowFilter"),
    ({"allowlist": ['{"colour":["red"]}']}, "--export-allowlist: invalid FlowFilter"),
    ({"max_size_mb": 0}, "--export-file-max-size-mb: must be positive"),
    ({"field_mask": ["a..b"]}, "--export-fieldmask: invalid field path"),
])
def test_invalid_options(tmp_path, kw, msg):
    with pytest.raises(ExportError, match=msg.replace("[", r"\[")):
        FlowExporter(ExportConfig(path=str(tmp_path / "f.json"), **kw))


def test_cli_rejects_a_bad_filter_before_starting(tmp_path):
    p = subprocess.run([sys.executable, "-m", "flowscope.cli", "server", "--db", f"sqlite:///{tmp_path}/x.db",
                        "--port", "1", "--export-file-path", str(tmp_path / "f.json"), "--export-allowlist", "{bad"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--export-allowlist: not JSON" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "f.json").exists()


def test_write_errors_are_counted_not_raised(tmp_path):
    ex = FlowExporter(ExportConfig(path=str(tmp_path / "f.json")))
    ex._fh.close()  # the file descriptor is gone (e.g. the disk was unmounted)
    ex.write_flows([mk(0)])
    assert ex.stats.errors == 1 and ex.stats.last_error
    ex.write_flows([mk(1)])  # reopened on the next write
    assert [g["flow"]["uuid"] for g in lines(tmp_path / "f.json")] == ["u-1"]


# --------------------------------------------------------------------------------------------
# The server's export: round trip through observe, and hubble-audit2policy
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A real server (subprocess) exporting what it ingests; returns (export path, server URL, flows)."""
    from alerts_helpers import Server

    tmp = tmp_path_factory.mktemp("export")
    path = tmp / "export" / "flows.json"
    flows = []
    for i in range(60):
        flows.append(mk(i, verdict="AUDIT" if i % 3 == 0 else "FORWARDED", src_app="frontend", dst_app="api",
                        port=8080))
    for i in range(60, 80):
        flows.append(mk(i, verdict="DROPPED", src_ns="shop", src_app="frontend", dst_ns="db", dst_app="postgres",
                        port=5432))
    with Server(tmp / "f.db", export=ExportConfig(path=str(path), max_size_mb=1.0)) as s:
        for k in range(0, len(flows), 25):
            s.post_flows([schema.dump_flow(f) for f in flows[k:k + 25]], node="node-a")
        import httpx

        s.wait(lambda: path.exists() and len(path.read_bytes().splitlines()) == len(flows), what="export written")
        api = httpx.get(s.url + "/api/v1/flows", params={"verdict": "DROPPED", "last": 1000}, timeout=30).text
        yield path, api, flows


def test_export_round_trips_through_observe_input_file(exported):
    path, api_lines, flows = exported
    got = lines(path)
    assert [g["flow"] for g in got] == [schema.dump_flow(f) for f in flows]
    assert all(g["node_name"] == "node-a" and g["time"] == g["flow"]["time"] for g in got)
    p = subprocess.run([sys.executable, "-m", "flowscope.cli", "observe", "--input-file", str(path), "--verdict",
                        "DROPPED", "-o", "jsonpb"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == api_lines.splitlines()  # the same lines the server answers
    assert len(p.stdout.splitlines()) == 20
    p = subprocess.run([sys.executable, "-m", "flowscope.cli", "observe", "--input-file", "-", "--to-namespace", "db",
                        "--last", "3", "-o", "compact"], input=path.read_text(), capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 3 and "shop/frontend-1" in p.stdout
    assert "DROPPED" in p.stdout


def test_export_is_accepted_by_hubble_audit2policy(exported, tmp_path):
    path, _, _ = exported
    p = subprocess.run([str(Path(sys.executable).with_name("hubble-audit2policy")), str(path), "--no-enrich",
                        "--verdict", "AUDIT", "--dry-run"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    docs = [d for d in yaml.safe_load_all(p.stdout) if d]
    assert docs and all(d["kind"] == "CiliumNetworkPolicy" for d in docs)
    api = next(d for d in docs if d["metadata"]["namespace"] == "shop" and
               d["spec"]["endpointSelector"]["matchLabels"].get("app") == "api")
    ingress = api["spec"]["ingress"]
    assert any(r["fromEndpoints"][0]["matchLabels"].get("app") == "frontend" and
               r["toPorts"][0]["ports"][0] == {"port": "8080", "protocol": "TCP"} for r in ingress), ingress
    # the DROPPED flows to db/postgres are not AUDIT: no policy for them
    assert not any(d["metadata"]["namespace"] == "db" for d in docs)
