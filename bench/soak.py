"""Soak: the server under a steady flow rate for minutes with a live client open; memory of every process
(start and end RSS) and every error.

    .venv/bin/python -m bench.soak run [--minutes 10] [--rate 5000] [--db URL]

Processes, all real:

* the server: ``flowscope server`` (uvicorn, the writer process, retention with its defaults), on SQLite in
  a temporary directory unless ``--db`` names another database;
* a generator: ``python -m bench.soak gen``, the agent's real :class:`probe.shipper.Shipper` with its
  on-disk spool, fed ``--rate`` generated flows per second (unique uuids) in batches of 1000, between
  the pods of a cluster-like population (``--pods-per-app 8`` for 9 apps in 4 namespaces, every pod
  replaced by a new one every 2 minutes, as a rolling deploy would);
* a live client: ``python -m bench.soak ws``, what an open dashboard holds: the live map websocket
  (``/api/v1/dashboard/live``) and the flow stream (``/api/v1/flows/stream``), plus the status endpoints
  polled every 5 s.

RSS is sampled every 10 s; "start" is the first sample after a warm-up (10 % of the run, at most 60 s),
"end" the last one; the table shows both and the change. Errors: HTTP failures and losses counted by the
generator, server log lines at ERROR or with a traceback, websocket disconnects, flows dropped for the
live client. At the end the stored flow count is compared with what was generated.

``retention``: ingest latency through the real writer process, alone and while a retention pass deletes
``--old-rows`` old flows: ``python -m bench.soak retention [--old-rows 200000] [--db URL]``.

``gen`` alone (used by the reliability tests): ``python -m bench.soak gen --server URL --node N --rate R
--seconds S [--spool-dir D]``; after generating it waits until the shipper has delivered everything
(``--drain-timeout``), then prints a JSON report as its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import httpx

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# gen: the real shipper at a fixed rate
# --------------------------------------------------------------------------------------------


def generate(server: str, node: str, rate: float, seconds: float, spool_dir: Optional[str], token: Optional[str],
             drain_timeout: float, batch_size: int, seed: int, spool_max_bytes: int = 1 << 30,
             max_queue: int = 200_000, pods_per_app: int = 0, rollout_s: float = 120.0) -> dict[str, Any]:
    """``pods_per_app`` > 0: a cluster-like pod population instead of a new pod name per flow: each app
    has that many pods, all replaced by new ones (new names) every ``rollout_s`` (a rolling deploy)."""
    from api.samples import sample_flow
    from probe.shipper import Shipper

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    shipper = Shipper(server, node, batch_size=batch_size, flush_interval=0.2, token=token, timeout=5.0,
                      spool_dir=spool_dir, max_backoff=2.0, spool_max_bytes=spool_max_bytes, max_queue=max_queue)
    shipper.start()
    rng = random.Random(seed)
    produced = 0
    max_backlog = 0
    peak_at = cleared_at = 0.0  # wall-clock times: the backlog's peak, and when it was empty again after it
    t0 = time.monotonic()
    next_sample = t0

    max_pending = 0

    def sample() -> None:
        nonlocal max_backlog, peak_at, cleared_at, max_pending
        max_pending = max(max_pending, shipper.pending())
        b = shipper.backlog_bytes()
        if b > max_backlog:
            max_backlog, peak_at, cleared_at = b, time.time(), 0.0
        elif b == 0 and max_backlog and not cleared_at:
            cleared_at = time.time()

    while not stop.is_set():
        elapsed = time.monotonic() - t0
        if elapsed >= seconds:
            break
        due = int(rate * elapsed) - produced
        if due > 0:
            now = time.time_ns()
            flows = []
            generation = int(elapsed // rollout_s) if pods_per_app else 0
            for i in range(produced, produced + due):
                f = sample_flow(rng, now, node)
                f.uuid = f"{node}:{seed}:{i}"
                if pods_per_app:
                    for ep in (f.source, f.destination):
                        if ep is not None and ep.pod_name:
                            app = ep.pod_name.rsplit("-", 1)[0]
                            ep.pod_name = f"{app}-g{generation}-{rng.randrange(pods_per_app)}"
                flows.append(f)
            shipper.put(flows)
            produced += due
        if time.monotonic() >= next_sample:
            sample()
            next_sample += 0.5
        stop.wait(0.01)
    gen_s = time.monotonic() - t0
    deadline = time.monotonic() + drain_timeout
    while not shipper.idle() and time.monotonic() < deadline and not stop.is_set():
        sample()
        time.sleep(0.1)
    sample()
    drained = shipper.idle()
    drain_s = time.monotonic() - t0 - gen_s
    shipper.close(deadline_s=5.0)
    st = shipper.stats
    return {"node": node, "generated": produced, "generate_seconds": round(gen_s, 2), "drained": drained,
            "drain_seconds": round(drain_s, 2), "shipped": st.shipped, "batches": st.batches,
            "failures": st.failures, "spooled_batches": st.spooled_batches, "duplicates": st.duplicates,
            "rejected": st.rejected, "lost_queue_full": st.lost_queue_full, "lost_by_source": st.lost_by_source,
            "slow_spills": st.slow_spills, "max_flows_in_memory": max_pending,
            "max_backlog_bytes": max_backlog, "backlog_peak_time": peak_at, "backlog_cleared_time": cleared_at,
            "last_error": st.last_error, "boot_id": shipper.boot_id}


# --------------------------------------------------------------------------------------------
# ws: a live client
# --------------------------------------------------------------------------------------------


def live_client(base: str, ws_base: str, seconds: float, token: Optional[str]) -> dict[str, Any]:
    from websockets.sync.client import connect

    headers = {"authorization": f"Bearer {token}"} if token else {}
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    out = {"frames": 0, "flows": 0, "lost_events": 0, "dropped_for_client": 0, "disconnects": 0, "errors": [],
           "polls": 0, "poll_errors": 0, "dashboard_messages": 0}

    def dashboard_live() -> None:
        """The dashboard page's live map websocket (what an open dashboard holds)."""
        while not stop.is_set() and time.monotonic() < end:
            try:
                with connect(ws_base + "/api/v1/dashboard/live", additional_headers=headers, max_size=None,
                             open_timeout=10) as ws:
                    while not stop.is_set() and time.monotonic() < end:
                        try:
                            ws.recv(timeout=1.0)
                        except TimeoutError:
                            continue
                        out["dashboard_messages"] += 1
            except Exception as e:  # noqa: BLE001
                if stop.is_set() or time.monotonic() >= end or "404" in str(e):
                    return  # this server has no dashboard
                out["disconnects"] += 1
                out["errors"].append(f"dashboard websocket: {type(e).__name__}: {e}"[:200])
                time.sleep(1)

    def poll() -> None:
        paths = ["/api/v1/status", "/api/v1/dashboard/status"]
        with httpx.Client(base_url=base, headers=headers, timeout=30) as c:
            while not stop.wait(5.0):
                for p in list(paths):
                    try:
                        r = c.get(p)
                    except httpx.HTTPError as e:
                        out["poll_errors"] += 1
                        out["errors"].append(f"GET {p}: {type(e).__name__}")
                        continue
                    if r.status_code == 404:
                        paths.remove(p)  # this server has no such page
                    elif r.status_code >= 400:
                        out["poll_errors"] += 1
                        out["errors"].append(f"GET {p}: {r.status_code}")
                    out["polls"] += 1

    end = time.monotonic() + seconds
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    dash = threading.Thread(target=dashboard_live, daemon=True)
    dash.start()
    while not stop.is_set() and time.monotonic() < end:
        try:
            with connect(ws_base + "/api/v1/flows/stream?last=0", additional_headers=headers,
                         max_size=None, open_timeout=10) as ws:
                while not stop.is_set() and time.monotonic() < end:
                    try:
                        frame = ws.recv(timeout=1.0)
                    except TimeoutError:
                        continue
                    items = json.loads(frame)
                    out["frames"] += 1
                    for it in items:
                        if "flow" in it:
                            out["flows"] += 1
                        elif "lost_events" in it:
                            out["lost_events"] += 1
                            if it["lost_events"].get("source") == "HUBBLE_RING_BUFFER":  # dropped for this client
                                out["dropped_for_client"] += int(it["lost_events"].get("num_events_lost", 0))
        except Exception as e:  # noqa: BLE001 - counted and reported
            if stop.is_set() or time.monotonic() >= end:
                break
            out["disconnects"] += 1
            out["errors"].append(f"websocket: {type(e).__name__}: {e}"[:200])
            time.sleep(1)
    stop.set()
    poller.join(10)
    dash.join(10)
    out["errors"] = out["errors"][:20]
    return out


# --------------------------------------------------------------------------------------------
# run: the soak
# --------------------------------------------------------------------------------------------


def rss_kib(pid: int) -> Optional[int]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(minutes: float, rate: float, db: Optional[str], keep: bool, pods_per_app: int = 8) -> int:
    from bench.common import cpu_pressure, machine_facts, write_json

    tmp = tempfile.mkdtemp(prefix="flowscope-soak-")
    db_url = db or f"sqlite:///{tmp}/soak.db"
    port = _free_port()
    base, ws_base = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}"
    seconds = minutes * 60
    warmup = min(60.0, seconds * 0.1)
    server_log = os.path.join(tmp, "server.log")
    procs: dict[str, subprocess.Popen] = {}
    print(f"soak: {minutes:g} min at {rate:,.0f} flows/s, database {db_url}, work dir {tmp}", flush=True)
    try:
        with open(server_log, "wb") as logf:
            procs["server"] = subprocess.Popen(
                [sys.executable, "-m", "flowscope.cli", "server", "--db", db_url, "--port", str(port),
                 "--log-level", "warning"], cwd=ROOT, stdout=logf, stderr=logf, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if procs["server"].poll() is not None or time.monotonic() > deadline:
                print(Path(server_log).read_text()[-3000:])
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        procs["live client"] = subprocess.Popen(
            [sys.executable, "-m", "bench.soak", "ws", "--base", base, "--seconds", str(seconds + 600)],
            cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True)
        procs["generator"] = subprocess.Popen(
            [sys.executable, "-m", "bench.soak", "gen", "--server", base, "--node", "soak-node", "--rate", str(rate),
             "--seconds", str(seconds), "--spool-dir", os.path.join(tmp, "spool"), "--drain-timeout", "120",
             "--pods-per-app", str(pods_per_app), "--rollout", "120"],
            cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True)
        t0 = time.monotonic()
        samples: list[dict[str, Any]] = []
        while procs["generator"].poll() is None:
            pids = {name: p.pid for name, p in procs.items()}
            for i, child in enumerate(children(procs["server"].pid)):
                pids[f"writer process{'' if i == 0 else f' {i}'}"] = child
            samples.append({"t": round(time.monotonic() - t0, 1), "cpu_pressure": cpu_pressure(),
                            "rss_kib": {name: rss_kib(pid) for name, pid in pids.items()}})
            if len(samples) % 6 == 0:
                last = samples[-1]
                print(f"  t={last['t']:>6.0f}s  " + "  ".join(f"{k} {v / 1024:.0f} MiB" for k, v in
                                                             last["rss_kib"].items() if v), flush=True)
            time.sleep(10 if seconds > 120 else 2)
        gen_out = procs["generator"].communicate()[0]
        gen = json.loads([ln for ln in gen_out.splitlines() if ln.startswith("{")][-1])
        time.sleep(2)  # the last frames reach the client
        status = httpx.get(base + "/api/v1/status", timeout=30).json()
        procs["live client"].send_signal(signal.SIGTERM)
        live = json.loads([ln for ln in procs["live client"].communicate(timeout=60)[0].splitlines()
                           if ln.startswith("{")][-1])
    finally:
        for name, p in procs.items():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait(20)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    os.killpg(p.pid, signal.SIGKILL)
    log_text = Path(server_log).read_text(errors="replace")
    server_errors = [ln for ln in log_text.splitlines() if " ERROR " in ln or "Traceback" in ln or ln.startswith("ERROR")]
    start = next((s for s in samples if s["t"] >= warmup), samples[0])
    end = samples[-1]
    print(f"\nsoak: {gen['generated']:,} flows in {gen['generate_seconds']:.0f} s "
          f"({gen['generated'] / max(1e-9, gen['generate_seconds']):,.0f}/s); server stored {status['num_flows']:,}")
    print(f"{'process':<18}{'start RSS':>12}{'end RSS':>12}{'change':>10}{'max':>10}")
    rss_table = {}
    for name in end["rss_kib"]:
        a, b = start["rss_kib"].get(name), end["rss_kib"].get(name)
        mx = max((s["rss_kib"].get(name) or 0) for s in samples)
        if a is None or b is None:
            continue
        rss_table[name] = {"start_mib": round(a / 1024, 1), "end_mib": round(b / 1024, 1),
                           "max_mib": round(mx / 1024, 1)}
        print(f"{name:<18}{a / 1024:>9.1f} MiB{b / 1024:>9.1f} MiB{(b - a) / 1024:>+7.1f} MiB{mx / 1024:>7.1f} MiB")
    lost = sum(gen["lost_by_source"].values())  # what the agent reported as LostEvents (queue drops included)
    errors = {"generator_failures": gen["failures"], "generator_lost": lost, "generator_rejected": gen["rejected"],
              "server_error_lines": len(server_errors), "ws_disconnects": live["disconnects"],
              "ws_dropped_for_client": live["dropped_for_client"], "poll_errors": live["poll_errors"],
              "stored_minus_generated": status["num_flows"] - gen["generated"]}
    print("errors: " + ", ".join(f"{k} {v}" for k, v in errors.items()))
    pressures = [s["cpu_pressure"] for s in samples if s["cpu_pressure"] >= 0]
    if pressures:
        print(f"CPU pressure (some, avg10) during the run: median {sorted(pressures)[len(pressures) // 2]:.0f} %, "
              f"max {max(pressures):.0f} % (other work on the machine)")
    print(f"generator: {gen['spooled_batches']} batches went through the spool (server behind: "
          f"{gen['slow_spills']} times), peak backlog {gen['max_backlog_bytes'] / 2**20:.0f} MiB, "
          f"at most {gen['max_flows_in_memory']:,} flows in memory, drained {gen['drain_seconds']:.0f} s after the end")
    print(f"live client: {live['frames']:,} frames, {live['flows']:,} flows; dashboard live map "
          f"{live['dashboard_messages']:,} messages; {live['polls']} status polls")
    for ln in server_errors[:10]:
        print("  server: " + ln[:200])
    path = write_json("soak", {"machine": machine_facts(), "minutes": minutes, "rate": rate, "db": db_url.split("?")[0],
                               "generator": gen, "live": live, "rss": rss_table, "samples": samples,
                               "errors": errors, "server_errors": server_errors[:50], "status": status})
    print(f"results: {path}")
    if not keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    clean = all(v == 0 for v in errors.values())
    return 0 if clean else 1


# --------------------------------------------------------------------------------------------
# retention: does a retention pass hold up ingest?
# --------------------------------------------------------------------------------------------


def retention_bench(old_rows: int, seconds: float, db: Optional[str]) -> int:
    """Ingest 1000-flow batches through the real writer process (``api.writer.WriterProcess``), first
    alone, then while a retention pass deletes ``old_rows`` old flows in its default chunks; print the
    ingest transaction latencies (p50, p99, max) of both phases and the pass's longest transaction."""
    import statistics

    from api import migrate
    from api.db import make_engine
    from api.retention import Retention, RetentionPolicy
    from api.samples import sample_flows
    from api.store import FlowStore, prepare_batch
    from api.writer import WriterProcess
    from bench.common import machine_facts, write_json

    tmp = tempfile.mkdtemp(prefix="flowscope-retention-")
    url = db or f"sqlite:///{tmp}/r.db"
    engine = make_engine(url)
    migrate.upgrade(engine)
    store = FlowStore(engine)
    old = time.time_ns() - 30 * 86400 * 10**9
    for i in range(0, old_rows, 5000):
        store.insert_prepared([prepare_batch(sample_flows(5000, seed=i, start_ns=old + i * 1000, step_ns=1000),
                                             node_name="old")])
    bodies = [sample_flows(1000, seed=10_000 + i, start_ns=time.time_ns()) for i in range(20)]
    writer = WriterProcess(url)
    writer.start()

    def ingest(stop_at: float) -> list[float]:
        lat = []
        i = 0
        while time.monotonic() < stop_at:
            b = prepare_batch(bodies[i % len(bodies)], node_name="new")
            t = time.perf_counter()
            writer.write([b])
            lat.append(time.perf_counter() - t)
            i += 1
            time.sleep(0.02)  # ~40 batches/s: a busy node tier, not a saturated writer
        return lat

    def stats(lat: list[float]) -> dict[str, float]:
        q = sorted(lat)
        return {"n": len(q), "p50_ms": round(statistics.median(q) * 1000, 1),
                "p99_ms": round(q[int(len(q) * 0.99) - 1] * 1000, 1), "max_ms": round(q[-1] * 1000, 1)}

    alone = stats(ingest(time.monotonic() + seconds))
    report: dict[str, Any] = {}
    ret = Retention(engine, RetentionPolicy(max_age_s=7 * 86400, max_bytes=0))

    def run_pass() -> None:
        r = ret.run_once()
        report.update(deleted=r.deleted_by_age, transactions=r.transactions, seconds=round(r.seconds, 2),
                      longest_transaction_ms=round(r.longest_transaction_s * 1000, 1))

    th = threading.Thread(target=run_pass)
    th.start()
    during = stats(ingest(time.monotonic() + seconds))
    th.join()
    writer.stop()
    engine.dispose()
    print(f"retention pass: deleted {report['deleted']:,} flows in {report['transactions']} transactions, "
          f"{report['seconds']} s, longest transaction {report['longest_transaction_ms']} ms")
    print(f"ingest latency (1000-flow transactions) alone:           p50 {alone['p50_ms']} ms, p99 {alone['p99_ms']} ms, "
          f"max {alone['max_ms']} ms (n={alone['n']})")
    print(f"ingest latency during the retention pass (first {seconds:g} s): p50 {during['p50_ms']} ms, "
          f"p99 {during['p99_ms']} ms, max {during['max_ms']} ms (n={during['n']})")
    path = write_json("retention", {"machine": machine_facts(), "old_rows": old_rows, "db": url.split("?")[0],
                                    "pass": report, "ingest_alone": alone, "ingest_during": during})
    print(f"results: {path}")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="the soak")
    r.add_argument("--minutes", type=float, default=10.0)
    r.add_argument("--rate", type=float, default=5000.0, help="flows/s")
    r.add_argument("--db", default=None, help="SQLAlchemy URL (default: SQLite in a temporary directory)")
    r.add_argument("--keep", action="store_true", help="keep the work directory (database, logs)")
    r.add_argument("--pods-per-app", type=int, default=8,
                   help="pods per app, all replaced every 2 minutes (0: a new pod name for every flow)")
    g = sub.add_parser("gen", help="generate flows through the real shipper")
    g.add_argument("--server", required=True)
    g.add_argument("--node", required=True)
    g.add_argument("--rate", type=float, required=True)
    g.add_argument("--seconds", type=float, required=True)
    g.add_argument("--spool-dir", default=None)
    g.add_argument("--drain-timeout", type=float, default=120.0)
    g.add_argument("--batch-size", type=int, default=1000)
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--spool-max-bytes", type=int, default=1 << 30)
    g.add_argument("--max-queue", type=int, default=200_000, help="flows held in memory")
    g.add_argument("--pods-per-app", type=int, default=0, help="bounded pod population (0: a new pod per flow)")
    g.add_argument("--rollout", type=float, default=120.0, help="seconds between rolling replacements of all pods")
    rt = sub.add_parser("retention", help="ingest latency while retention deletes old flows")
    rt.add_argument("--old-rows", type=int, default=200_000)
    rt.add_argument("--seconds", type=float, default=10.0)
    rt.add_argument("--db", default=None)
    w = sub.add_parser("ws", help="a live client")
    w.add_argument("--base", required=True)
    w.add_argument("--seconds", type=float, required=True)
    a = ap.parse_args(argv)
    token = os.environ.get("FLOWSCOPE_TOKEN") or None
    if a.cmd == "gen":
        print(json.dumps(generate(a.server, a.node, a.rate, a.seconds, a.spool_dir, token, a.drain_timeout,
                                  a.batch_size, a.seed, a.spool_max_bytes, a.max_queue, a.pods_per_app, a.rollout)),
              flush=True)
        return 0
    if a.cmd == "retention":
        return retention_bench(a.old_rows, a.seconds, a.db)
    if a.cmd == "ws":
        print(json.dumps(live_client(a.base, "ws" + a.base[4:], a.seconds, token)), flush=True)
        return 0
    return run(a.minutes, a.rate, a.db, a.keep, a.pods_per_app)


if __name__ == "__main__":
    raise SystemExit(main())
