"""No acknowledged flow is lost, none is stored twice: idempotent batch ids over HTTP, ``kill -9`` of the
server (and its writer process) during ingest, ``kill -9`` of the writer process alone. Real server
processes on real SQLite files; the database is checked with SQLite's own integrity check."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest

from api.samples import sample_flows
from bench.soak import children
from flowscope import schema
from reliability_env import ServerProcess, wait_for

BATCH = 200


def batch_body(client: str, i: int) -> bytes:
    flows = sample_flows(BATCH, seed=i, start_ns=time.time_ns(), node_name=client)
    for j, f in enumerate(flows):
        f.uuid = f"{client}/{i}:{j}"
    return schema.encode({"node_name": client, "batch_id": f"{client}/boot/{i}", "flows": flows})


def stored(db: Path) -> tuple[list[str], str]:
    """(uuids of all stored flows, PRAGMA integrity_check) read with the sqlite3 module directly."""
    conn = sqlite3.connect(str(db))
    try:
        uuids = [r[0] for r in conn.execute("SELECT uuid FROM flows")]
        check = conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()
    return uuids, check


def test_a_retried_batch_id_is_stored_once(tmp_path):
    with ServerProcess(f"sqlite:///{tmp_path}/i.db") as srv:
        body = batch_body("n1", 1)
        first = httpx.post(srv.url + "/api/v1/flows", content=body, timeout=30).json()
        again = httpx.post(srv.url + "/api/v1/flows", content=body, timeout=30).json()
        assert first == {"accepted": BATCH} and again == {"accepted": BATCH, "duplicate": True}
        # the same id in concurrent requests (coalesced into one transaction or not): stored once
        other = batch_body("n1", 2)
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(
            httpx.post(srv.url + "/api/v1/flows", content=other, timeout=30).json())) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(a.get("duplicate", False) for a in answers) == [False] + [True] * 5
        # without a batch id every request is stored (older agents, scripts)
        plain = schema.encode({"node_name": "n2", "flows": sample_flows(5, start_ns=time.time_ns())})
        for _ in range(2):
            assert httpx.post(srv.url + "/api/v1/flows", content=plain, timeout=30).json() == {"accepted": 5}
        st = httpx.get(srv.url + "/api/v1/status", timeout=30).json()
        assert st["num_flows"] == 2 * BATCH + 10
    uuids, check = stored(tmp_path / "i.db")
    assert check == "ok" and len(uuids) == 2 * BATCH + 10


def _post_until_dead(url: str, client: str, acked: list[str], stop: threading.Event) -> None:
    i = 0
    with httpx.Client(timeout=10) as c:
        while not stop.is_set():
            try:
                r = c.post(url, content=batch_body(client, i))
            except httpx.HTTPError:
                return  # the server is gone
            if r.status_code == 200:
                acked.append(f"{client}/boot/{i}")
            i += 1


@pytest.mark.parametrize("victim", ["server", "writer"])
def test_kill_9_during_ingest_loses_no_acknowledged_batch(tmp_path, victim):
    """Four clients post batches with ids as fast as they can; the server process group (server and writer
    process), or only the writer process, gets SIGKILL. Every batch acknowledged before is in the database
    afterwards, the database passes PRAGMA integrity_check, and re-sending every batch (what agents do with
    unacknowledged ones) leaves each stored exactly once."""
    db = tmp_path / "k.db"
    srv = ServerProcess(f"sqlite:///{db}").start()
    try:
        url = srv.url + "/api/v1/flows"
        acked: dict[str, list[str]] = {f"c{k}": [] for k in range(4)}
        stop = threading.Event()
        threads = [threading.Thread(target=_post_until_dead, args=(url, c, a, stop)) for c, a in acked.items()]
        for t in threads:
            t.start()
        wait_for(lambda: sum(map(len, acked.values())) >= 40, timeout=60, what="40 acknowledged batches")
        if victim == "server":
            srv.kill9()
            for t in threads:
                t.join(30)
            uuids, check = stored(db)
            assert check == "ok"
            srv.start()
        else:
            writer_pid = children(srv.pid)[0]
            os.kill(writer_pid, signal.SIGKILL)
            time.sleep(1.0)  # clients keep posting through the crash; the server starts a new writer
            stop.set()
            for t in threads:
                t.join(30)
        n_acked = sum(map(len, acked.values()))
        uuids, check = stored(db)
        have = set(uuids)
        assert check == "ok" and len(uuids) == len(have)  # intact, and nothing twice
        for client, ids in acked.items():
            for bid in ids:
                i = int(bid.rsplit("/", 1)[1])
                assert {f"{client}/{i}:{j}" for j in range(BATCH)} <= have, f"acknowledged {bid} is missing"
        # agents re-send what they have no answer for: afterwards every batch is there exactly once
        sent = {c: max([int(b.rsplit("/", 1)[1]) for b in ids] + [-1]) + 3 for c, ids in acked.items()}
        dup = 0
        with httpx.Client(timeout=30) as c:
            for client, n in sent.items():
                for i in range(n):
                    r = c.post(url, content=batch_body(client, i))
                    assert r.status_code == 200, r.text
                    dup += bool(r.json().get("duplicate"))
        uuids, check = stored(db)
        assert check == "ok" and len(uuids) == len(set(uuids)) == sum(sent.values()) * BATCH
        assert dup >= n_acked
        print(f"\nkill -9 of the {victim}: {n_acked} batches acknowledged before, all present; "
              f"{dup} re-sent batches answered as duplicates; integrity_check ok")
    finally:
        srv.stop()
