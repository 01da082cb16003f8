"""Alerts end to end through the real server process and a real HTTP receiver on loopback.

Flows are posted to the real ingest API (the root test test_alerts_e2e.py makes real policy drops between
namespaces). Windows are 2 s so resolves come quickly; nothing asserts on durations.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from api.alerts.payload import verify
from alerts_helpers import Receiver, Server, drop_flow, free_port

SECRET = "s3cr3t"


def rule(name: str, url: str, src: str, dst: str, *, window: str = "2s", extra: str = "") -> str:
    return f"""
name: {name}
filter: {{verdict: [DROPPED], from_namespace: [{src}], to_namespace: [{dst}]}}
condition: {{count_over: 5, window: {window}}}
for: 0s
severity: critical
labels: {{team: net}}
webhook: {{url: "{url}", secret: "{SECRET}", headers: {{X-Team: net}}, max_backoff: 1s, timeout: 2s}}
{extra}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with Server(tmp_path_factory.mktemp("alerts") / "f.db") as s:
        yield s


def storm(server: Server, src: str, dst: str, batches: int = 3, per_batch: int = 20) -> int:
    n = 0
    for b in range(batches):
        flows = [drop_flow(src, dst, i=b * per_batch + i) for i in range(per_batch)]
        flows.append(drop_flow(src, dst, verdict="FORWARDED"))  # not matched by the rule
        n += server.post_flows(flows) - 1
    return n


def test_a_burst_fires_once_signed_and_resolves(server):
    with Receiver() as rec:
        r = server.apply(rule("burst", rec.url, "a1", "b1"))
        assert r.status_code == 200 and r.json()["applied"] == [{"name": "burst", "result": "created"}]
        assert storm(server, "a1", "b1") == 60
        got = rec.wait_for(lambda reqs: [q["json"]["state"] for q in reqs] == ["firing", "resolved"])
        firing, resolved = got
        for q in got:
            assert q["path"] == "/hook"
            assert verify(SECRET, q["body"], q["headers"]["X-Flowscope-Signature"])
            assert q["headers"]["X-Team"] == "net"
            assert q["headers"]["X-Flowscope-Delivery"] == q["json"]["id"]
            assert q["json"]["rule"] == "burst" and q["json"]["severity"] == "critical"
        f = firing["json"]
        assert f["window"]["flows"] > 5 and f["window"]["threshold"] == 5
        assert f["labels"] == {"alertname": "burst", "severity": "critical", "team": "net"}
        assert f["sample_flows"] and all(s["verdict"] == "DROPPED" for s in f["sample_flows"])
        assert f["links"]["flows"].startswith(server.url + "/api/v1/flows?")
        assert resolved["json"]["ended_at"] and resolved["json"]["id"] != f["id"]
        # the log shows the two successful attempts; the state is inactive again
        log = server.get("/api/v1/alerts/deliveries", rule="burst")
        assert sorted((d["state"], d["ok"], d["status_code"]) for d in log["deliveries"]) == [
            ("firing", True, 200), ("resolved", True, 200)]
        assert not [a for a in server.get("/api/v1/alerts/state")["alerts"] if a["rule"] == "burst"]
        time.sleep(1.0)  # several evaluations later: still exactly one of each
        assert rec.states("burst") == ["firing", "resolved"]


def test_receiver_down_then_up_gets_the_alerts_later_without_duplicates(server):
    rec = Receiver(statuses=[503, 404])  # once up, it first fails with 5xx and 4xx
    r = server.apply(rule("later", rec.url, "a2", "b2"))
    assert r.status_code == 200
    storm(server, "a2", "b2")

    def failures() -> list:
        return [d for d in server.get("/api/v1/alerts/deliveries", rule="later")["deliveries"] if not d["ok"]]

    server.wait(lambda: len(failures()) >= 2, what="two failed attempts while the receiver is down")
    assert all(d["status_code"] is None and d["error"] for d in failures())  # connection refused
    rec.start()
    try:
        got = rec.wait_for(lambda reqs: [q["json"]["state"] for q in reqs] == ["firing", "resolved"], timeout=60)
        assert len({q["json"]["id"] for q in got}) == 2
        assert rec.answered[:2] == [503, 404]
        codes = [d["status_code"] for d in failures()]
        assert 503 in codes and 404 in codes
        log = server.get("/api/v1/alerts/deliveries", rule="later")["deliveries"]
        ok = [d for d in log if d["ok"]]
        assert sorted(d["state"] for d in ok) == ["firing", "resolved"]
        firing_attempts = sorted(d["attempt"] for d in log if d["state"] == "firing")
        assert firing_attempts == list(range(1, len(firing_attempts) + 1)) and len(firing_attempts) >= 4
        assert all(o["status"] == "delivered" for o in server.get("/api/v1/alerts/deliveries", rule="later")["outbox"])
        time.sleep(1.0)
        assert rec.states("later") == ["firing", "resolved"]
    finally:
        rec.stop()


def test_malformed_rules_are_rejected_with_a_clear_message(server, tmp_path):
    r = server.apply("name: bad\nfilter: {verdict: [DROPED]}\ncondition: {count_over: 5}\n")
    assert r.status_code == 400
    assert r.json()["detail"] == ("rule bad: filter: invalid --verdict value: DROPED (expected one of FORWARDED, "
                                  "DROPPED, ERROR, AUDIT, REDIRECTED, TRACED, TRANSLATED)")
    r = server.apply("name: ok1\ncondition: {count_over: 5}\n---\nname: bad2\ncondition: {count_over: 5, window: 5}\n"
                     "webhook: {url: 'not a url'}\n")
    assert r.status_code == 400 and r.json()["detail"].startswith("rule bad2: webhook.url:")
    names = [x["name"] for x in server.get("/api/v1/alerts/rules")["rules"]]
    assert "ok1" not in names and "bad" not in names  # all or nothing
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ncondition: {count_over: 5, window: 1x}\n")
    p = subprocess.run([sys.executable, "-m", "flowscope.cli", "alert", "--server", server.url, "apply", "-f", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p
    assert p.stderr.strip().startswith("Error: rule x: condition.window: invalid duration '1x'")
    assert "Traceback" not in p.stderr


def cli(server: Server, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flowscope.cli", "alert", "--server", server.url, *args],
                          capture_output=True, text=True, timeout=60, input=stdin)


def test_cli_apply_list_test_delete(server, tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text(rule("cli-rule", "http://127.0.0.1:9/unused", "a3", "b3", window="1m"))
    p = cli(server, "apply", "-f", str(f))
    assert p.returncode == 0 and p.stdout.strip() == "alert rule cli-rule created", p
    assert cli(server, "apply", "-f", "-", stdin=f.read_text()).stdout.strip() == "alert rule cli-rule unchanged"
    p = cli(server, "list")
    assert p.returncode == 0
    line = next(x for x in p.stdout.splitlines() if x.startswith("cli-rule"))
    assert "count_over=5" in line and "1m" in line and "critical" in line
    p = cli(server, "list", "-o", "json")
    assert '"secret": "<redacted>"' in p.stdout and SECRET not in p.stdout
    # test: nothing stored yet in these namespaces, then a burst
    t = tmp_path / "t.yaml"
    t.write_text(rule("probe", "http://127.0.0.1:9/unused", "a4", "b4", window="1m"))
    p = cli(server, "test", "-f", str(t))
    assert p.returncode == 0 and "0 matching flows in the last 1m" in p.stdout and "nothing would fire" in p.stdout
    server.post_flows([drop_flow("a4", "b4", i=i) for i in range(8)])
    p = cli(server, "test", "-f", str(t))
    assert p.returncode == 0, p
    assert "8 matching flows" in p.stdout and "WOULD FIRE: probe FIRING: 8 flows in 1m (threshold > 5)" in p.stdout
    assert p.stdout.count("DROPPED") >= 3  # sample flows, compact
    assert "probe" not in [x["name"] for x in server.get("/api/v1/alerts/rules")["rules"]]  # test stores nothing
    p = cli(server, "delete", "cli-rule")
    assert p.returncode == 0 and "deleted" in p.stdout
    p = cli(server, "delete", "cli-rule")
    assert p.returncode == 2 and "no alert rule named 'cli-rule'" in p.stderr
    p = subprocess.run([sys.executable, "-m", "flowscope.cli", "alert", "--server", f"http://127.0.0.1:{free_port()}",
                        "list"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stderr.startswith("Error: cannot reach") and "Traceback" not in p.stderr


def test_alert_state_survives_a_server_restart(tmp_path):
    db = tmp_path / "restart.db"
    port = free_port()
    with Receiver() as rec:
        with Server(db, port) as s:
            assert s.apply(rule("sticky", rec.url, "a5", "b5", window="1m")).status_code == 200
            storm(s, "a5", "b5")
            rec.wait_for(lambda reqs: len(reqs) >= 1)
        with Server(db, port) as s:  # a new process over the same database
            state = [a for a in s.get("/api/v1/alerts/state")["alerts"] if a["rule"] == "sticky"]
            assert [a["state"] for a in state] == ["firing"]
            assert state[0]["stats"]["flows"] == 60  # the window was rebuilt from the stored flows
            storm(s, "a5", "b5", batches=1)
            s.wait(lambda: [a["stats"]["flows"] for a in s.get("/api/v1/alerts/state")["alerts"]
                            if a["rule"] == "sticky"] == [80], what="new flows counted")
            time.sleep(1.0)  # several evaluations: the alert is already firing, nothing is sent again
            assert rec.states("sticky") == ["firing"]
            r = s.get("/api/v1/alerts/rules/sticky")
            assert r["webhook"]["secret"] == "<redacted>"
            import httpx

            assert httpx.delete(s.url + "/api/v1/alerts/rules/sticky", timeout=30).status_code == 200
            got = rec.wait_for(lambda reqs: len(reqs) >= 2)
            assert [q["json"]["state"] for q in got] == ["firing", "resolved"]
            assert got[0]["json"]["started_at"] == got[1]["json"]["started_at"]
