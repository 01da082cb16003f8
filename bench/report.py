"""The benchmark harness's pure parts: figures, goals, their evaluation, and the results markdown.

A scenario (``bench/<name>.py``) returns a :class:`ScenarioResult`: figures, each with the samples of
its repetitions, optionally the samples of a baseline measured in the same run (interleaved), and a goal
on the median (``Goal("<=", 100)``) or on the ratio of medians to the baseline (``Goal(">=", 0.95,
on="ratio")``). :func:`evaluate` turns a figure into numbers and a verdict; :func:`render_markdown`
writes the results file. Nothing here touches the machine, so it is unit-tested directly.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

MIN_REPS = 5  # a full run measures every figure at least this often
NOISY_PRESSURE = 10.0  # /proc/pressure/cpu "some" (%) in a quiet window before a scenario above this: other load
NOISY_FOREIGN_CORES = 0.25  # other processes' average CPU use during a scenario above this: other load


def summary(values: list[float]) -> dict[str, Any]:
    """median, min, max and n of ``values`` (all None for no values)."""
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) with linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    k = (len(xs) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


@dataclass(frozen=True)
class Goal:
    """``op`` is ``>=`` or ``<=``; ``on`` is ``value`` (the figure's median) or ``ratio`` (median over the
    baseline's median)."""

    op: str
    threshold: float
    on: str = "value"

    def __post_init__(self) -> None:
        if self.op not in (">=", "<="):
            raise ValueError(f"goal operator must be >= or <=, not {self.op!r}")
        if self.on not in ("value", "ratio"):
            raise ValueError(f"a goal is on 'value' or 'ratio', not {self.on!r}")

    def check(self, x: Optional[float]) -> Optional[bool]:
        if x is None:
            return None
        return x >= self.threshold if self.op == ">=" else x <= self.threshold

    def text(self, unit: str = "") -> str:
        if self.on == "ratio":
            return f"ratio {self.op} {_num(self.threshold)}"
        return f"{self.op} {_num(self.threshold)}{' ' + unit if unit else ''}"


@dataclass
class Figure:
    """One measured quantity of a scenario: its repetitions and, optionally, the same-run baseline's."""

    name: str
    unit: str
    samples: list[float]
    baseline: Optional[list[float]] = None
    baseline_name: str = ""
    goal: Optional[Goal] = None
    note: str = ""  # one line shown under the table (how it was measured)
    fix: str = ""  # when the goal is not met: what would close it (shown in the scenario's section)

    def __post_init__(self) -> None:
        if self.goal is not None and self.goal.on == "ratio" and not self.baseline:
            raise ValueError(f"figure {self.name!r}: a ratio goal needs baseline samples")


def ratio_of(samples: list[float], baseline: Optional[list[float]]) -> Optional[float]:
    """Median of ``samples`` over the median of ``baseline`` (None without a usable baseline)."""
    if not samples or not baseline:
        return None
    b = statistics.median(baseline)
    if b == 0:
        return None
    return statistics.median(samples) / b


def paired_ratios(samples: list[float], baseline: Optional[list[float]]) -> list[float]:
    """Ratio of each repetition to the baseline of the same repetition (interleaved pairs)."""
    if not baseline or len(samples) != len(baseline):
        return []
    return [s / b for s, b in zip(samples, baseline) if b]


def evaluate(fig: Figure) -> dict[str, Any]:
    """Numbers and verdict of a figure: ``value`` summary, ``baseline`` summary, ``ratio`` (of medians),
    ``ratio_range`` (min/max of the per-repetition ratios), ``goal`` text and ``met`` (True/False, None
    when there is no goal or nothing was measured)."""
    val = summary(fig.samples)
    base = summary(fig.baseline) if fig.baseline else None
    ratio = ratio_of(fig.samples, fig.baseline)
    pairs = paired_ratios(fig.samples, fig.baseline)
    met = None
    if fig.goal is not None:
        met = fig.goal.check(ratio if fig.goal.on == "ratio" else val["median"])
    return {"name": fig.name, "unit": fig.unit, "value": val, "baseline": base, "baseline_name": fig.baseline_name,
            "ratio": ratio, "ratio_range": [min(pairs), max(pairs)] if pairs else None,
            "goal": fig.goal.text(fig.unit) if fig.goal else "", "met": met, "note": fig.note,
            "fix": fig.fix if met is False else ""}


@dataclass
class Profile:
    """Where the time goes in one process during a repetition (py-spy or cProfile), summarised."""

    title: str
    path: str = ""  # the raw profile file (collapsed stacks / pstats), relative to the results dir
    samples: int = 0
    top_self: list[tuple[str, float]] = field(default_factory=list)  # (function, % of samples)
    top_total: list[tuple[str, float]] = field(default_factory=list)
    note: str = ""


@dataclass
class ScenarioResult:
    name: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    profiles: list[Profile] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # raw numbers, kept in the JSON
    error: str = ""  # the scenario failed: why (its figures may be partial)
    seconds: float = 0.0
    load: dict[str, Any] = field(default_factory=dict)  # CPU pressure / other load (set by the runner)

    @property
    def noisy(self) -> bool:
        return bool(self.load.get("noisy"))

    def unmet(self) -> list[Figure]:
        return [f for f in self.figures if evaluate(f)["met"] is False]


def load_verdict(pressure_before: float, pressure_after: float, foreign_cores: Optional[float]) -> dict[str, Any]:
    """Was the machine busy with other work around a scenario? ``pressure_before`` is the CPU pressure
    ("some", %) measured while the runner sleeps just before it, ``pressure_after`` avg10 right after it
    (-1 unknown); ``foreign_cores`` the average CPU (in cores) used by processes outside the benchmark's
    process tree during it. The benchmark's own load raises the pressure after it, so only the pressure
    before it and the foreign CPU decide."""
    reasons = []
    if pressure_before > NOISY_PRESSURE:
        reasons.append(f"CPU pressure {pressure_before:.0f}% before")
    if foreign_cores is not None and foreign_cores > NOISY_FOREIGN_CORES:
        reasons.append(f"other processes used {foreign_cores:.2f} cores")
    return {"pressure_before": pressure_before, "pressure_after": pressure_after, "foreign_cores": foreign_cores,
            "noisy": bool(reasons), "reasons": reasons}


# --------------------------------------------------------------------------------------------
# Profiles (py-spy's raw collapsed stacks)
# --------------------------------------------------------------------------------------------


def _frame_name(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py)``; anything else is kept."""
    frame = frame.strip()
    if frame.endswith(")") and " (" in frame:
        func, loc = frame.rsplit(" (", 1)
        path = loc[:-1].rsplit(":", 1)[0]
        parts = path.replace("\\", "/").split("/")
        short = "/".join(parts[-2:]) if len(parts) > 1 and parts[-2] in (
            "probe", "api", "flowscope", "enforcer", "l7", "bench", "alerts", "hubble") else parts[-1]
        return f"{func} ({short})"
    return frame


def summarize_collapsed(text: str, top: int = 12) -> tuple[int, list[tuple[str, float]], list[tuple[str, float]]]:
    """Parse collapsed stacks (``frame;frame;...;leaf COUNT`` per line, as ``py-spy record --format raw``
    writes them): (total samples, top functions by self %, top functions by inclusive %). Thread-name
    root frames (``thread (...)``, ``process ...``) are not functions and are skipped."""
    self_c: dict[str, int] = {}
    total_c: dict[str, int] = {}
    n = 0
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        try:
            c = int(count)
        except ValueError:
            continue
        frames = [_frame_name(f) for f in stack.split(";") if f and not f.startswith(("thread (", "process "))]
        if not frames:
            continue
        n += c
        self_c[frames[-1]] = self_c.get(frames[-1], 0) + c
        for f in set(frames):
            total_c[f] = total_c.get(f, 0) + c
    if n == 0:
        return 0, [], []

    def ranked(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(k, 100.0 * v / n) for k, v in sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]

    return n, ranked(self_c), ranked(total_c)


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _num(x: Optional[float], unit: str = "") -> str:
    """Human formatting: 3 significant digits below 100, thousands separators above."""
    if x is None:
        return "–"
    ax = abs(x)
    if ax >= 100:
        s = f"{x:,.0f}"
    elif ax >= 10:
        s = f"{x:.1f}"
    elif ax >= 1:
        s = f"{x:.2f}"
    elif ax == 0:
        s = "0"
    else:
        s = f"{x:.3g}"
    return f"{s} {unit}".strip() if unit else s


def _verdict(met: Optional[bool]) -> str:
    return {True: "met", False: "**NOT MET**", None: "–"}[met]


def table_rows(results: list[ScenarioResult]) -> list[list[str]]:
    rows = []
    for r in results:
        if r.error and not r.figures:
            rows.append([r.title, "(failed)", "–", "–", "–", "–", "–", f"error: {r.error.splitlines()[0][:80]}"])
            continue
        for fig in r.figures:
            e = evaluate(fig)
            v, b = e["value"], e["baseline"]
            value = _num(v["median"], fig.unit)
            spread = f"{_num(v['min'])}–{_num(v['max'])} (n={v['n']})" if v["n"] else "–"
            base = f"{_num(b['median'], fig.unit)} ({fig.baseline_name})" if b else "–"
            ratio = _num(e["ratio"]) if e["ratio"] is not None else "–"
            if e["ratio_range"]:
                ratio += f" ({_num(e['ratio_range'][0])}–{_num(e['ratio_range'][1])})"
            met = _verdict(e["met"])
            if r.noisy:
                met += " (noisy)"
            rows.append([r.title, fig.name, value, spread, base, ratio, e["goal"] or "–", met])
    return rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in row] for row in rows]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in esc]
    return "\n".join(out)


TABLE_HEADER = ["Scenario", "Figure", "Median", "min–max (n)", "Baseline, same run", "Ratio (per-rep range)",
                "Goal", "Met"]


def render_table(results: list[ScenarioResult]) -> str:
    return _md_table(TABLE_HEADER, table_rows(results))


def render_markdown(results: list[ScenarioResult], machine: dict[str, Any], *, title: str = "Flowscope benchmarks",
                    mode: str = "full", command: str = "") -> str:
    """The results file: machine facts, the table, then one section per scenario (load, notes, unmet
    goals with what would close them, profiles)."""
    lines = [f"# {title}", ""]
    facts = ", ".join(f"{k} {v}" for k, v in machine.items() if k not in ("cpu_model",))
    if machine.get("cpu_model"):
        facts = f"{machine['cpu_model']}; " + facts
    lines.append(f"Machine: {facts}.")
    lines.append(f"Mode: {mode}{'; command: `' + command + '`' if command else ''}.")
    noisy = [r.title for r in results if r.noisy]
    met = sum(1 for r in results for f in r.figures if evaluate(f)["met"] is True)
    unmet = sum(1 for r in results for f in r.figures if evaluate(f)["met"] is False)
    lines.append(f"Goals: {met} met, {unmet} not met"
                 + (f"; scenarios that ran with other load on the machine (noisy): {', '.join(noisy)}" if noisy else "")
                 + ".")
    lines += ["", "Medians over interleaved repetitions; a ratio is the figure's median over the median of the "
                  "baseline measured in the same run (in parentheses: the range of the per-repetition ratios).", ""]
    lines.append(render_table(results))
    for r in results:
        lines += ["", f"## {r.title}", ""]
        ld = r.load
        if ld:
            fc = ld.get("foreign_cores")
            lines.append(f"Ran {r.seconds:.0f} s. CPU pressure before (3 s, runner idle) {ld.get('pressure_before', -1):.1f}%, avg10 after "
                         f"{ld.get('pressure_after', -1):.1f}%; other processes' CPU during it "
                         f"{'–' if fc is None else f'{fc:.2f} cores'}"
                         + (f" — **noisy**: {'; '.join(ld.get('reasons', []))}" if r.noisy else "") + ".")
        if r.error:
            lines += ["", f"**Error**: `{r.error.strip()[:2000]}`"]
        for fig in r.figures:
            if fig.note:
                lines.append(f"- {fig.name}: {fig.note}")
        for n in r.notes:
            lines.append(f"- {n}")
        unmet = [evaluate(f) for f in r.unmet()]
        if unmet:
            lines += ["", "Goals not met:", ""]
            for e in unmet:
                shown = _num(e["ratio"]) if e["goal"].startswith("ratio") else _num(e["value"]["median"], e["unit"])
                lines.append(f"- **{e['name']}**: {shown} (goal {e['goal']}). "
                             + (e["fix"] or "No remedy recorded."))
        for p in r.profiles:
            lines += ["", f"Profile — {p.title} ({p.samples:,} samples{', ' + p.path if p.path else ''})"
                      + (f": {p.note}" if p.note else ""), ""]
            if p.top_self:
                lines.append(_md_table(["function (self)", "% of samples", "function (inclusive)", "%"],
                                       [[a[0] if a else "", _num(a[1]) if a else "", b[0] if b else "",
                                         _num(b[1]) if b else ""]
                                        for a, b in _zip_longest(p.top_self, p.top_total)]))
    return "\n".join(lines) + "\n"


def _zip_longest(a: list, b: list) -> list[tuple]:
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else None, b[i] if i < len(b) else None) for i in range(n)]


def to_json(results: list[ScenarioResult], machine: dict[str, Any], mode: str) -> dict[str, Any]:
    """Everything in the markdown, machine-readable (the evaluated figures and the raw samples)."""
    out = {"machine": machine, "mode": mode, "scenarios": {}}
    for r in results:
        d = asdict(r)
        d["figures"] = [dict(evaluate(f), samples=f.samples, baseline_samples=f.baseline) for f in r.figures]
        d["noisy"] = r.noisy
        out["scenarios"][r.name] = d
    return out


def print_result(r: ScenarioResult) -> int:
    """What a scenario run alone prints (its table, notes and error); the exit status: 1 if it failed."""
    import sys

    print(render_table([r]))
    for n in r.notes:
        print("-", n)
    if r.error:
        print("error:", r.error, file=sys.stderr)
    return 1 if r.error else 0

