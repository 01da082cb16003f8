"""Flow map drain: reading every entry of the probe's flow map, batched vs key by key, same run.

    sudo .venv/bin/python -m bench.map_drain [--entries 65536] [--reps 5] [--quick]

The real program is loaded (:class:`probe.datapath.Datapath`, the agent's map size), its ``flows`` LRU
hash is filled through bcc with ``--entries`` distinct flows (realistic keys and counters, written with
one batched update), then, interleaved: ``Datapath.snapshot_flows()`` (``bpf_map_lookup_batch``, what
the agent's sweep uses every 2 s) against bcc's key-by-key iteration (``get_next_key`` + lookup per
entry, the fallback in ``snapshot_flows``). Both produce the same list of (key, value) bytes; the run
checks that they saw the same entries.

Goals (issue 10): a full drain of 65,536 entries <= 100 ms and >= 3x faster than key by key.
"""

from __future__ import annotations

import argparse
import ctypes as ct
import random
import socket
import time

from bench.harness import BenchOptions, profile_call
from bench.report import Figure, Goal, ScenarioResult, print_result

GOAL_MS = 100.0
GOAL_SPEEDUP = 3.0


def fill(dp, n: int, seed: int = 1) -> int:
    """Write ``n`` distinct flows into ``dp.flows`` (one batched update); returns the entries present."""
    from probe import events as ev

    flows = dp.flows
    KeyT, LeafT = flows.Key, flows.Leaf
    if ct.sizeof(KeyT) != ev.KEY.size or ct.sizeof(LeafT) != ev.VAL.size:
        raise RuntimeError(f"flow map layout changed: key {ct.sizeof(KeyT)} / value {ct.sizeof(LeafT)} bytes, "
                           f"bench expects {ev.KEY.size} / {ev.VAL.size}")
    rng = random.Random(seed)
    keys = (KeyT * n)()
    vals = (LeafT * n)()
    now = time.monotonic_ns()
    for i in range(n):
        # client 10.<a>.<b>.<c>:port -> server 10.9.x.y:80/443/53, on one of 8 interfaces, both directions
        src = socket.inet_aton(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}") + b"\0" * 12
        dst = socket.inet_aton(f"10.9.{rng.randrange(256)}.{rng.randrange(1, 255)}") + b"\0" * 12
        proto = 6 if i % 4 else 17
        k = ev.KEY.pack(src, dst, 32768 + i % 28000, (80, 443, 53, 8080)[i % 4], 100 + i % 8, 2, proto, i % 2, 0)
        first = now - rng.randrange(1, 300) * 1_000_000_000
        v = ev.VAL.pack(first, first + rng.randrange(0, 10**9), first, rng.randrange(1, 10**4),
                        rng.randrange(64, 10**7), 0x12, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        ct.memmove(ct.byref(keys[i]), k, ev.KEY.size)
        ct.memmove(ct.byref(vals[i]), v, ev.VAL.size)
    try:
        flows.items_update_batch(keys, vals)
    except Exception:  # a kernel/bcc without batched updates: one by one (slow, only for the fill)
        for i in range(n):
            flows[keys[i]] = vals[i]
    return count_entries(dp)


def count_entries(dp) -> int:
    return sum(1 for _ in dp.flows.keys())


def drain_batched(dp) -> list[tuple[bytes, bytes]]:
    return dp.snapshot_flows()


def drain_key_by_key(dp) -> list[tuple[bytes, bytes]]:
    """Exactly the fallback branch of ``Datapath.snapshot_flows``."""
    return [(bytes(k), bytes(v)) for k, v in dp.flows.items()]


def bench(opts: BenchOptions, entries: int = 65536) -> ScenarioResult:
    from probe.datapath import Datapath

    reps = opts.pick_reps(full=7, quick=3)
    res = ScenarioResult("map_drain", "Flow map drain")
    dp = Datapath(flow_entries=65536)
    try:
        t0 = time.perf_counter()
        present = fill(dp, entries)
        res.details["fill_seconds"] = time.perf_counter() - t0
        res.details["entries_written"] = entries
        res.details["entries_present"] = present
        batched: list[float] = []
        kbk: list[float] = []
        seen: dict[str, int] = {}

        def timed(fn, out: list[float], label: str) -> None:
            t = time.perf_counter()
            got = fn(dp)
            out.append((time.perf_counter() - t) * 1000)
            seen[label] = len(got)

        drain_batched(dp)  # warm both paths once (bcc builds its ctypes helpers lazily)
        drain_key_by_key(dp)
        for i in range(reps):
            order = [(drain_batched, batched, "batched"), (drain_key_by_key, kbk, "key_by_key")]
            for fn, out, label in (order if i % 2 == 0 else order[::-1]):
                timed(fn, out, label)
        res.details["entries_read"] = seen
        if len(set(seen.values())) != 1 or seen.get("batched") != present:
            res.error = f"the two drains saw different entry counts: {seen} (map holds {present})"
        speedups = [k / b for b, k in zip(batched, kbk) if b > 0]
        res.figures = [
            Figure(f"drain {present:,} entries, batched (snapshot_flows)", "ms", batched, baseline=kbk,
                   baseline_name="key by key", goal=Goal("<=", GOAL_MS),
                   note=f"real `flows` LRU map of a loaded Datapath, {present:,} of {entries:,} written entries "
                        f"present; {reps} interleaved repetitions",
                   fix="bcc's items_lookup_batch builds a ctypes key/value array per call and Python then copies "
                       "each entry to bytes: read the batch buffers directly (one memoryview slice per entry) or "
                       "call BPF_MAP_LOOKUP_BATCH with larger batches through libbpf."),
            Figure("speed-up of batched over key by key", "x", speedups, goal=Goal(">=", GOAL_SPEEDUP),
                   note="per repetition: key-by-key time / batched time",
                   fix="see the batched drain: its per-entry Python copy dominates once the syscalls are batched"),
        ]
        if opts.profile and not opts.quick and res.unmet():
            res.profiles.append(profile_call(lambda: drain_batched(dp), opts.profiles() / "map_drain.pstats",
                                             "snapshot_flows() of the full map"))
    finally:
        dp.close()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=65536)
    ap.add_argument("--reps", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    r = bench(BenchOptions(quick=args.quick, reps=args.reps, profile=False), entries=args.entries)
    return print_result(r)


if __name__ == "__main__":
    raise SystemExit(main())
