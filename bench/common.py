"""Shared helpers for benchmarks: interleaved repetitions, medians, ratios, CPU pressure, sysctls."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable


def cpu_pressure() -> float:
    """avg10 of /proc/pressure/cpu 'some' (percent of time tasks waited for CPU), or -1."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return float(line.split("avg10=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return -1.0


def machine_facts() -> dict:
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "cpu_pressure_avg10": cpu_pressure(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def interleave(reps: int, variants: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Run every variant once per repetition, in alternating order, so drift hits all alike."""
    out: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for i in range(reps):
        order = names if i % 2 == 0 else list(reversed(names))
        for name in order:
            out[name].append(variants[name]())
    return out


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def print_table(title: str, rows: list[tuple[str, dict, str]], baseline: dict | None = None) -> None:
    print(f"\n{title}")
    for name, s, unit in rows:
        ratio = f"  ratio {s['median'] / baseline['median']:.3f}" if baseline and baseline["median"] else ""
        print(f"  {name:<28} median {s['median']:>14,.1f} {unit:<10} (min {s['min']:,.1f}, max {s['max']:,.1f},"
              f" n={s['n']}){ratio}")


@contextmanager
def sysctl(path: str, value: str):
    p = Path("/proc/sys") / path.replace(".", "/")
    old = p.read_text().strip()
    p.write_text(value)
    try:
        yield
    finally:
        p.write_text(old)


def write_json(name: str, data: dict) -> Path:
    out = Path(__file__).with_name("results")
    out.mkdir(exist_ok=True)
    path = out / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(data, indent=2))
    return path
