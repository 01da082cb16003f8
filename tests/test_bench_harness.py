"""The benchmark harness: summaries, goals and ratios, profile summaries, the results markdown (pure), and
one real quick run of ``python -m bench.run`` that must write both result files. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import (Figure, Goal, Profile, ScenarioResult, evaluate, load_verdict, paired_ratios, percentile,
                          ratio_of, render_markdown, render_table, summarize_collapsed, summary, to_json)

ROOT = Path(__file__).resolve().parent.parent


def test_summary_and_percentile():
    assert summary([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0, "n": 4}
    assert summary([]) == {"median": None, "min": None, "max": None, "n": 0}
    xs = list(range(1, 101))
    assert percentile(xs, 0.95) == pytest.approx(95.05)
    assert percentile([7.0], 0.95) == 7.0
    with pytest.raises(ValueError):
        percentile([], 0.5)


def test_goal_checks_and_texts():
    assert Goal(">=", 0.95, on="ratio").check(0.96) is True
    assert Goal(">=", 0.95, on="ratio").check(0.94) is False
    assert Goal("<=", 100).check(100) is True
    assert Goal("<=", 100).check(100.5) is False
    assert Goal("<=", 100).check(None) is None
    assert Goal("<=", 100).text("ns") == "<= 100 ns"
    assert Goal(">=", 0.97, on="ratio").text("Gbit/s") == "ratio >= 0.97"
    with pytest.raises(ValueError):
        Goal("<", 1)
    with pytest.raises(ValueError):
        Goal(">=", 1, on="mean")
    with pytest.raises(ValueError, match="needs baseline"):
        Figure("x", "ms", [1.0], goal=Goal(">=", 1, on="ratio"))


def test_ratio_is_of_medians_and_pairs_are_per_repetition():
    samples, base = [9.0, 10.0, 30.0], [10.0, 10.0, 10.0]
    assert ratio_of(samples, base) == 1.0
    assert paired_ratios(samples, base) == [0.9, 1.0, 3.0]
    assert paired_ratios([1.0], [1.0, 2.0]) == []  # not paired
    assert ratio_of([1.0], [0.0]) is None
    assert ratio_of([1.0], None) is None


def test_evaluate_ratio_goal_met_and_not_met():
    met = evaluate(Figure("tcp", "Gbit/s", [19.5, 19.8, 19.7], baseline=[20.0, 20.1, 19.9], baseline_name="none",
                          goal=Goal(">=", 0.97, on="ratio"), fix="never shown when met"))
    assert met["met"] is True and met["ratio"] == pytest.approx(19.7 / 20.0)
    assert met["fix"] == ""
    assert met["ratio_range"][0] == pytest.approx(19.5 / 20.0)
    unmet = evaluate(Figure("udp", "pkt/s", [500.0] * 5, baseline=[1000.0] * 5, goal=Goal(">=", 0.95, on="ratio"),
                            fix="cheaper program"))
    assert unmet["met"] is False and unmet["ratio"] == 0.5 and unmet["fix"] == "cheaper program"
    value = evaluate(Figure("drain", "ms", [120.0, 90.0, 95.0], baseline=[300.0] * 3, goal=Goal("<=", 100)))
    assert value["met"] is True  # the goal is on the median (95), not on the ratio
    info = evaluate(Figure("info", "x", [1.0]))
    assert info["met"] is None and info["goal"] == ""


def test_load_verdict_flags_other_load_only():
    quiet = load_verdict(2.0, 80.0, 0.05)  # our own load raises the pressure after: not noisy
    assert quiet["noisy"] is False and quiet["reasons"] == []
    busy = load_verdict(35.0, 40.0, 0.1)
    assert busy["noisy"] is True and "35%" in busy["reasons"][0]
    foreign = load_verdict(1.0, 1.0, 0.9)
    assert foreign["noisy"] is True and "0.90 cores" in foreign["reasons"][0]
    assert load_verdict(-1.0, -1.0, None)["noisy"] is False  # unknown is not noisy


def test_summarize_collapsed_stacks():
    text = "\n".join([
        "process 12:\"python agent\";run (probe/agent.py:100);_process_raw (probe/agent.py:150);build_raw (probe/events.py:10) 60",
        "process 12:\"python agent\";run (probe/agent.py:100);poll (probe/datapath.py:160) 30",
        "thread (0x7f);run (probe/agent.py:101);sweep (probe/agent.py:200) 10",
        "garbage line",
        "",
    ])
    n, top_self, top_total = summarize_collapsed(text)
    assert n == 100
    assert top_self[0] == ("build_raw (probe/events.py)", 60.0)
    assert dict(top_total)["run (probe/agent.py)"] == 100.0  # line numbers merged into one function
    assert dict(top_self)["sweep (probe/agent.py)"] == 10.0
    assert summarize_collapsed("") == (0, [], [])


def _results() -> list[ScenarioResult]:
    ok = ScenarioResult("map_drain", "Flow map drain", figures=[
        Figure("drain", "ms", [40.0, 42.0, 41.0, 39.0, 43.0], baseline=[300.0] * 5, baseline_name="key by key",
               goal=Goal("<=", 100), note="real map")])
    ok.load = load_verdict(1.0, 5.0, 0.01)
    bad = ScenarioResult("query", "Query", figures=[
        Figure("top talkers p95", "ms", [450.0, 470.0, 460.0, 455.0, 480.0], goal=Goal("<=", 200),
               fix="a covering index")],
        profiles=[Profile("server", path="profiles/q.txt", samples=500, top_self=[("scan (api/store.py)", 40.0)],
                          top_total=[("query (api/store.py)", 90.0), ("run (x.py)", 95.0)])])
    bad.load = load_verdict(25.0, 30.0, 0.6)
    failed = ScenarioResult("churn", "Churn", error="Traceback ...\nRuntimeError: no lab")
    return [ok, bad, failed]


def test_markdown_table_and_sections():
    res = _results()
    md = render_markdown(res, {"cpus": 2, "kernel": "6.18"}, mode="full", command="python -m bench.run")
    assert md.startswith("# Flowscope benchmarks")
    assert "Goals: 1 met, 1 not met" in md
    assert "| Flow map drain | drain | 41.0 ms | 39.0–43.0 (n=5) | 300 ms (key by key) | 0.137" in md
    assert "| <= 100 ms | met |" in md
    assert "**NOT MET** (noisy)" in md  # unmet, and the machine was busy
    assert "- **top talkers p95**: 460 ms (goal <= 200 ms). a covering index" in md
    assert "| scan (api/store.py) | 40.0 | query (api/store.py) | 90.0 |" in md
    assert "| run (x.py) | 95.0 |" in md  # the longer column is not cut
    assert "| Churn | (failed) |" in md and "RuntimeError: no lab" in md
    assert "noisy**: CPU pressure 25% before" in md
    # every table row has the header's number of cells
    table = [ln for ln in render_table(res).splitlines()]
    assert len({ln.count(" | ") for ln in table if not ln.startswith("|---")}) == 1


def test_json_has_evaluations_and_raw_samples():
    out = to_json(_results(), {"cpus": 2}, "quick")
    q = out["scenarios"]["query"]
    assert q["noisy"] is True
    assert q["figures"][0]["met"] is False and q["figures"][0]["samples"] == [450.0, 470.0, 460.0, 455.0, 480.0]
    assert out["scenarios"]["churn"]["error"].endswith("no lab")
    json.dumps(out)  # serialisable as is


@pytest.mark.root
def test_quick_run_writes_markdown_and_json(tmp_path):
    p = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--only", "map_drain", "--no-profile",
                        "--out-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    mds = list((tmp_path / "partial").glob("*-quick-map_drain.md"))
    jsons = list((tmp_path / "partial").glob("*-quick-map_drain.json"))
    assert len(mds) == 1 and len(jsons) == 1, list(tmp_path.rglob("*"))
    data = json.loads(jsons[0].read_text())
    fig = data["scenarios"]["map_drain"]["figures"][0]
    assert fig["value"]["n"] >= 2 and fig["value"]["median"] > 0 and fig["baseline"]["median"] > 0
    assert fig["goal"] == "<= 100 ms" and fig["met"] in (True, False)
    assert data["scenarios"]["map_drain"]["error"] == ""
    assert "pressure_before" in data["scenarios"]["map_drain"]["load"]
    md = mds[0].read_text()
    assert "| Flow map drain | drain " in md and "Machine:" in md
