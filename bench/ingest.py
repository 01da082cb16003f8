"""Ingest throughput: flows/s through the real HTTP API into SQLite vs raw ``sqlite3.executemany``.

    .venv/bin/python -m bench.ingest [--flows 60000] [--batch 1000] [--concurrency 4] [--reps 3]

* API: uvicorn serving :func:`api.server.serve` in a subprocess (migrations, WAL, the writer process);
  an httpx client posts pre-encoded batches of realistic flows (``api.samples``) from ``--concurrency``
  connections and counts a flow when the server has answered ``{"accepted": n}`` (after commit).
* Raw: the same rows (ids, extracted columns, canonical JSON bodies, built before timing) inserted with
  ``sqlite3.executemany``, one transaction per batch, into the same schema (made by the same migrations)
  with the same pragmas (``api.db.SQLITE_PRAGMAS``: WAL, synchronous=NORMAL, ...): the ceiling for this
  table and its indexes.

Repetitions alternate API and raw so machine drift hits both; medians are printed with the ratio.
Goals: API >= 50,000 flows/s sustained, API/raw >= 0.4. The API uses both cores (server, writer process,
client), raw uses one: on a shared machine, check the CPU pressure the script prints.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from api import migrate
from api.db import SQLITE_PRAGMAS
from api.samples import sample_flows
from api.store import FLOW_COLUMNS, prepare_batch
from bench.common import cpu_pressure, interleave, machine_facts, print_table, summary, write_json
from flowscope import schema

ROOT = Path(__file__).resolve().parent.parent
GOAL_RATE = 50_000
GOAL_RATIO = 0.4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Workload:
    """Realistic flows; every call of :meth:`batches` gives the next ``n`` flows in time (fresh, increasing
    timestamps, as a live node produces them), as request bodies and as ready-made raw rows."""

    def __init__(self, n_flows: int, batch: int) -> None:
        self.flows = sample_flows(n_flows, seed=7, start_ns=0)
        self.batch = batch
        self.next_ns = time.time_ns() - 3600 * 1_000_000_000
        self.step_ns = 50_000  # 20k flows/s of flow time

    def batches(self) -> tuple[list[bytes], list[list[tuple]]]:
        for f in self.flows:
            f.time = schema.format_timestamp(self.next_ns)
            self.next_ns += self.step_ns
        bodies, rows = [], []
        for i in range(0, len(self.flows), self.batch):
            chunk = self.flows[i:i + self.batch]
            bodies.append(schema.encode({"node_name": "bench-node", "flows": chunk}))
            rows.append([tuple(r[1:]) for r in prepare_batch(chunk).rows])
        return bodies, rows


class Server:
    def __init__(self, db_url: str, writer_process: bool) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        code = (f"from api.server import serve; serve({db_url!r}, '127.0.0.1', {self.port}, 'warning', "
                f"writer_process={writer_process!r})")
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise SystemExit("server did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def _post_all(url: str, bodies: list[bytes], concurrency: int) -> int:
    it = iter(bodies)
    accepted = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60,
                                 headers={"content-type": "application/json"}) as client:
        async def worker() -> None:
            nonlocal accepted
            for body in it:
                r = await client.post("/api/v1/flows", content=body)
                r.raise_for_status()
                accepted += r.json()["accepted"]
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return accepted


def api_rate(url: str, work: Workload, concurrency: int) -> float:
    bodies, rows = work.batches()
    expected = sum(map(len, rows))
    t0 = time.perf_counter()
    accepted = asyncio.run(_post_all(url, bodies, concurrency))
    dt = time.perf_counter() - t0
    assert accepted == expected, (accepted, expected)
    return accepted / dt


class Raw:
    def __init__(self, path: str) -> None:
        migrate.upgrade(f"sqlite:///{path}")
        self.conn = sqlite3.connect(path, isolation_level=None)
        for pragma in SQLITE_PRAGMAS:
            self.conn.execute(f"PRAGMA {pragma}")
        cols = FLOW_COLUMNS[1:]
        self.sql = f"INSERT INTO flows ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"

    def rate(self, work: Workload) -> float:
        _, batches = work.batches()
        n = 0
        t0 = time.perf_counter()
        for rows in batches:
            self.conn.execute("BEGIN")
            self.conn.executemany(self.sql, rows)
            self.conn.execute("COMMIT")
            n += len(rows)
        return n / (time.perf_counter() - t0)


def measure(flows: int = 60_000, batch: int = 1000, concurrency: int = 4, reps: int = 3,
            compare_thread: bool = False, log=print) -> dict[str, list[float]]:
    """flows/s per repetition: ``api`` (and ``api-thread``) through the HTTP API, ``raw`` executemany;
    interleaved, after one warm-up batch run each."""
    log(f"building {flows:,} realistic flows in batches of {batch} ...")
    work = Workload(flows, batch)
    log(f"  {len(schema.encode(work.flows)) / flows:.0f} bytes of JSON per flow")
    warm = Workload(batch * 5, batch)
    with tempfile.TemporaryDirectory(prefix="flowscope-bench-") as tmp:
        servers = {"api": Server(f"sqlite:///{tmp}/api.db", writer_process=True)}
        if compare_thread:
            servers["api-thread"] = Server(f"sqlite:///{tmp}/api-thread.db", writer_process=False)
        raw = Raw(f"{tmp}/raw.db")
        try:
            for srv in servers.values():
                api_rate(srv.url, warm, concurrency)
            raw.rate(warm)
            variants = {name: (lambda srv=srv: api_rate(srv.url, work, concurrency))
                        for name, srv in servers.items()}
            variants["raw"] = lambda: raw.rate(work)
            return interleave(reps, variants)
        finally:
            for srv in servers.values():
                srv.stop()
            raw.conn.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flows", type=int, default=60_000, help="flows per repetition")
    ap.add_argument("--batch", type=int, default=1000, help="flows per request")
    ap.add_argument("--concurrency", type=int, default=4, help="concurrent client connections")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--compare-thread", action="store_true",
                    help="also run a server whose writer is a thread instead of a process")
    args = ap.parse_args(argv)
    results = measure(args.flows, args.batch, args.concurrency, args.reps, args.compare_thread,
                      log=lambda m: print(m, flush=True))
    pressure = cpu_pressure()
    if pressure > 10:
        print(f"\nWARNING: CPU pressure avg10={pressure:.0f}%: other processes competed for the 2 cores; the API "
              f"(server + writer process + client) suffers more than the single-threaded raw baseline.")
    api_s, raw_s = summary(results["api"]), summary(results["raw"])
    rows = [("raw sqlite3.executemany", raw_s, "flows/s"),
            (f"HTTP API ({args.concurrency} conns)", api_s, "flows/s")]
    if "api-thread" in results:
        rows.append(("  same, writer thread", summary(results["api-thread"]), "flows/s"))
    print_table("SQLite ingest, flows/s", rows, baseline=raw_s)
    ratio = api_s["median"] / raw_s["median"]
    ok = api_s["median"] >= GOAL_RATE and ratio >= GOAL_RATIO
    print(f"\nAPI {api_s['median']:,.0f} flows/s (goal >= {GOAL_RATE:,}), ratio API/raw {ratio:.2f} "
          f"(goal >= {GOAL_RATIO}): {'MET' if ok else 'NOT MET'}")
    path = write_json("ingest", {"machine": machine_facts(), "args": vars(args), "api": api_s, "raw": raw_s,
                                 "ratio": ratio, "goals": {"rate": GOAL_RATE, "ratio": GOAL_RATIO}, "met": ok})
    print(f"results: {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
