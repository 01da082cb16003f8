"""The alert service over a real SQLite file and a real loopback receiver, driven step by step with a
clock the test moves (no threads started, no sleeps)."""

from __future__ import annotations

import time

import httpx
import pytest

from alerts_helpers import Receiver, drop_flow
from api import migrate
from api.alerts.service import AlertService
from api.db import make_engine
from api.store import FlowStore, prepare_batch
from flowscope import schema

S = 1_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now = time.time_ns()

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def env(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path}/a.db")
    migrate.upgrade(engine)
    store = FlowStore(engine)
    clock = Clock()
    client = httpx.Client()
    with Receiver() as rec:
        yield engine, store, clock, client, rec
    client.close()
    engine.dispose()


def rule(url: str, extra: str = "") -> str:
    return (f"name: r\nfilter: {{verdict: [DROPPED]}}\ncondition: {{count_over: 3, window: 1m}}\n"
            f"webhook: {{url: '{url}', secret: k, give_up_after: 30s}}\n{extra}")


def ingest(svc: AlertService, store: FlowStore, clock: Clock, n: int) -> None:
    b = prepare_batch([schema.load_flow(drop_flow("a", "b", i=i, t_ns=clock.now)) for i in range(n)])
    store.insert_prepared([b])
    svc.ingest([b])


def test_disabling_a_firing_rule_resolves_it(env):
    engine, store, clock, client, rec = env
    svc = AlertService(engine, store, clock=clock, client=client)
    svc.apply(rule(rec.url))
    ingest(svc, store, clock, 10)
    assert svc.tick() == 1 and svc.deliver_due() == 1
    assert rec.states() == ["firing"]
    svc.apply(rule(rec.url, "enabled: false"))
    clock.now += S
    assert svc.tick() == 1 and svc.deliver_due() == 1
    assert rec.states() == ["firing", "resolved"]
    clock.now += S
    assert svc.tick() == 0 and svc.state() == [] and svc.store.groups("r") == []


def test_a_restarted_service_neither_resends_nor_forgets(env):
    engine, store, clock, client, rec = env
    svc = AlertService(engine, store, clock=clock, client=client)
    svc.apply(rule(rec.url))
    ingest(svc, store, clock, 10)
    assert svc.tick() == 1
    svc.deliver_due()
    # a new process: rules and states from SQL, the window from the stored flows
    clock.now += 10 * S
    svc2 = AlertService(engine, store, clock=clock, client=client)
    svc2.load()
    [g] = svc2.state()
    assert g["state"] == "firing" and g["stats"]["flows"] == 10
    assert svc2.tick() == 0  # already firing: nothing new
    clock.now += 61 * S
    assert svc2.tick() == 1 and svc2.deliver_due() == 1
    assert rec.states() == ["firing", "resolved"]


def test_the_same_notification_is_never_queued_twice(env):
    engine, store, clock, client, rec = env
    svc = AlertService(engine, store, clock=clock, client=client)
    svc.apply(rule(rec.url))
    ingest(svc, store, clock, 10)
    e = svc._entries["r"]
    notes = e.ev.evaluate(clock.now)
    built = svc._outbox_notes(e.rule, notes)
    assert svc.store.save_state("r", [], [], [], built) == 1
    assert svc.store.save_state("r", [], [], [], built) == 0  # e.g. replayed after a crash
    assert svc.store.outbox_counts() == {"pending": 1}


def test_a_receiver_that_never_comes_back_is_given_up(env):
    engine, store, clock, client, rec = env
    rec.stop()
    svc = AlertService(engine, store, clock=clock, client=client)
    svc.apply(rule(rec.url))
    ingest(svc, store, clock, 10)
    assert svc.tick() == 1
    assert svc.deliver_due() == 1  # refused
    assert svc.deliver_due() == 0  # not due yet: backoff
    clock.now += 31 * S
    assert svc.deliver_due() == 1
    assert svc.store.outbox_counts() == {"failed": 1}
    log = svc.store.deliveries("r")
    assert [d["ok"] for d in log] == [False, False] and all(d["error"] for d in log)
    assert svc.deliveries_failed == 2
