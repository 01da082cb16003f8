"""PostgreSQL ingest: the store's COPY path against executemany of the same rows, same run.

    sudo .venv/bin/python -m bench.pg_copy [--flows 20000] [--reps 5]

A private PostgreSQL cluster (Debian's binaries, unix socket only, as the PostgreSQL tests start it;
fsync off) with two databases migrated by the project's migrations. Per repetition the same fresh,
realistic flows (prepared by ``api.store.prepare_batch``, 1,000 per transaction) go
* through ``FlowStore.write_batches`` (what the server's writer runs: advisory lock, ids, ``COPY ...
  FROM STDIN``, nodes upsert), and
* through psycopg's ``cursor.executemany`` of the store's own INSERT statement, one transaction per batch.
Goal (issue 10): COPY >= 5x executemany.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

from bench.common import interleave, summary

GOAL_RATIO = 5.0
FIX = ("psycopg 3's executemany already pipelines the INSERTs (one round trip per batch), so the gap COPY can "
       "open is the per-row work: the COPY path spends it in Python in copy.write_row (text-format "
       "adaptation of 26 columns per row). Binary COPY with set_types(), or writing preformatted rows, would "
       "take most of that out; the server-side insert cost is then the floor.")


def _cluster():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from reliability_env import PostgresCluster  # noqa: E402  (the PostgreSQL tests' private cluster)

    return PostgresCluster()


def measure(flows: int = 20_000, reps: int = 5, batch: int = 1000, profile_out: Optional[Path] = None) -> dict:
    """flows/s per repetition of both paths (``samples``), plus, when the goal is not met and
    ``profile_out`` is given, a cProfile of one more COPY-path repetition (``profile``)."""
    from api import migrate
    from api.db import make_engine
    from api.samples import sample_flows
    from api.store import FLOW_COLUMNS, FlowStore, prepare_batch
    from flowscope import schema

    cluster = _cluster().start()
    try:
        copy_url, em_url = cluster.create_database("bench_copy"), cluster.create_database("bench_em")
        engines = {}
        for url in (copy_url, em_url):
            migrate.upgrade(url)
            engines[url] = make_engine(url)
        store = FlowStore(engines[copy_url])
        em_engine = engines[em_url]
        template = sample_flows(flows, seed=11)
        clock = [time.time_ns() - 3600 * 10**9]

        def fresh() -> list:
            out = []
            for k in range(0, flows, batch):
                chunk = []
                for f in template[k:k + batch]:
                    f.time = schema.format_timestamp(clock[0])
                    clock[0] += 50_000
                    chunk.append(f)
                out.append(prepare_batch(chunk, node_name="bench-node"))
            return out

        def copy_path() -> float:
            batches = fresh()
            t0 = time.perf_counter()
            n = 0
            for b in batches:
                n += store.write_batches([b])[0]
            return n / (time.perf_counter() - t0)

        cols = ", ".join(FLOW_COLUMNS)
        sql = f"INSERT INTO flows ({cols}) VALUES ({', '.join(['%s'] * len(FLOW_COLUMNS))})"

        def executemany_path() -> float:
            batches = fresh()
            raw = em_engine.raw_connection()
            try:
                conn = raw.driver_connection
                t0 = time.perf_counter()
                n = 0
                for b in batches:
                    with conn.transaction():
                        cur = conn.cursor()
                        nxt = (cur.execute("SELECT coalesce(max(id), 0) FROM flows").fetchone()[0]) + 1
                        for r in b.rows:
                            r[0] = nxt
                            nxt += 1
                        cur.executemany(sql, b.rows)
                        n += len(b.rows)
                return n / (time.perf_counter() - t0)
            finally:
                raw.close()

        copy_path()  # warm both
        executemany_path()
        res = interleave(reps, {"copy": copy_path, "executemany": executemany_path})
        out: dict = {"samples": res, "flows": flows, "batch": batch, "server_version": _server_version(em_url),
                     "profile": None, "fix": FIX}
        ratio = summary(res["copy"])["median"] / summary(res["executemany"])["median"]
        if profile_out is not None and ratio < GOAL_RATIO:
            from bench.harness import profile_call

            out["profile"] = profile_call(copy_path, profile_out, "FlowStore.write_batches on PostgreSQL (COPY path)")
        for e in engines.values():
            e.dispose()
        return out
    finally:
        cluster.stop()


def _server_version(url: str) -> str:
    try:
        from sqlalchemy import create_engine, text

        e = create_engine(url)
        with e.connect() as c:
            v = c.execute(text("SHOW server_version")).scalar()
        e.dispose()
        return str(v)
    except Exception:  # noqa: BLE001 - informational
        return ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flows", type=int, default=20_000)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    r = measure(args.flows, args.reps)
    c, e = summary(r["samples"]["copy"]), summary(r["samples"]["executemany"])
    print(f"PostgreSQL {r['server_version']}: COPY path {c['median']:,.0f} flows/s (min {c['min']:,.0f}, max "
          f"{c['max']:,.0f}); executemany {e['median']:,.0f} flows/s; ratio {c['median'] / e['median']:.1f} "
          f"(goal >= {GOAL_RATIO})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
