"""The dashboard in a real browser (Debian's Chromium driven by Playwright) against a real server.

The server is `flowscope server` in its own process, fed through its ingest API with a known topology
(tests/dashboard_scenario.py) and, in the root test, by the real probe watching real namespaces. The
page's map is checked through the cytoscape model (nodes, edges, verdict colours), the flow table
through its rows; every request the page makes must go to the server itself. Screenshots are saved in
tests/artifacts/ (look at them: they are how the page really looks).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.dashboard_scenario import (
    EXPECTED_EDGES,
    POLICY_YAML,
    batch_body,
    kafka_flows,
    legacy_flows,
    scenario_flows,
)

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).parent / "artifacts"
S = 1_000_000_000
COLOURS = {"forwarded": "rgb(22,163,74)", "dropped": "rgb(220,38,38)", "audit": "rgb(217,119,6)"}

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (make setup)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, flows) -> None:
    r = httpx.post(url + "/api/v1/flows", content=batch_body(flows), timeout=30)
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from flowscope.platform import Platform

    db = tmp_path_factory.mktemp("dashboard") / "flows.db"
    with Platform(db_url=f"sqlite:///{db}", port=free_port(), log_level="warning") as plat:
        r = httpx.post(plat.url + "/api/v1/policies", content=POLICY_YAML, headers={"content-type": "application/yaml"})
        assert r.status_code == 200, r.text
        now = time.time_ns()
        post(plat.url, scenario_flows(now - 90 * S, 60, S))
        post(plat.url, legacy_flows(now - 26 * 3600 * S, 40, 10 * S))  # "yesterday"
        yield plat.url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, server):
    """A fresh page (UTC clock) that records every request it makes; the test fails if one goes
    anywhere but the server."""
    ctx = browser.new_context(viewport={"width": 1440, "height": 860}, timezone_id="UTC")
    requests: list[str] = []
    errors: list[str] = []
    ctx.on("request", lambda r: requests.append(r.url))
    pg = ctx.new_page()
    pg.on("websocket", lambda ws: requests.append(ws.url))
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.set_default_timeout(45_000)  # a wait, not a speed check: CI machines may be busy
    try:
        yield pg
    finally:
        ctx.close()
    origin = urlsplit(server).netloc
    foreign = [u for u in requests if not u.startswith(("data:", "blob:")) and urlsplit(u).netloc != origin]
    assert requests and not foreign, f"requests to other hosts: {foreign}"
    assert not errors, f"JavaScript errors: {errors}"


def shot(pg, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / f"dashboard-{name}.png"))


def edge_state(pg, edge_id: str):
    return pg.evaluate("""(id) => { const e = FS.cy.getElementById(id);
        return e.empty() ? null : {cls: e.data('cls'), color: e.style('line-color'), label: e.data('label'),
                                   source: e.data('source'), target: e.data('target')}; }""", edge_id)


def wait_edge(pg, edge_id: str, timeout: float = 45_000) -> None:
    pg.wait_for_function("(id) => window.FS && FS.cy && FS.cy.getElementById(id).nonempty()", arg=edge_id, timeout=timeout)


def test_map_shows_the_topology_with_verdict_colours_and_updates_live(page, server):
    page.goto(server + "/")
    wait_edge(page, "shop/batch->data/db|dropped")
    nodes = set(page.evaluate("FS.cy.nodes().map(n => n.id())"))
    assert {"shop/frontend", "shop/api", "shop/batch", "data/db", "data/redis", "kube-system/coredns", "world",
            "host"} <= nodes
    assert {"ns:shop", "ns:data", "ns:kube-system"} <= nodes  # grouped by namespace, all namespaces at once
    assert page.evaluate("FS.cy.getElementById('shop/api').parent().id()") == "ns:shop"
    assert page.evaluate("FS.cy.getElementById('world').parent().length") == 0
    for (src, dst), cls in EXPECTED_EDGES.items():
        st = edge_state(page, f"{src}->{dst}|{cls}")
        assert st is not None, f"missing edge {src} -> {dst}"
        assert (st["cls"], st["color"], st["source"], st["target"]) == (cls, COLOURS[cls], src, dst)
        for other in set(COLOURS) - {cls}:
            assert edge_state(page, f"{src}->{dst}|{other}") is None
    # L7 stats on the HTTP edge: request rate, error rate, p95 latency
    label = edge_state(page, "shop/frontend->shop/api|forwarded")["label"]
    assert "rps" in label and "err" in label and "p95" in label and "ms" in label
    assert "p95" not in edge_state(page, "shop/api->kube-system/coredns|forwarded")["label"]  # DNS queries: no latency
    # the details panel of an edge
    page.evaluate("FS.cy.getElementById('shop/frontend->shop/api|forwarded').emit('tap')")
    panel = page.locator("#map-panel")
    assert "Latency p95" in panel.inner_text() and "Error rate" in panel.inner_text()
    # the status bar: flows/s, lost events, agents, storage
    page.wait_for_function("document.getElementById('st-storage').innerText.includes('flows')")
    assert page.locator("#st-agents").inner_text().startswith("1 / ")
    assert page.locator("#st-conn").inner_text() == "live"
    shot(page, "map")

    # a new dependency appears: it reaches the open page through the batched live stream
    messages_before = page.evaluate("Number(document.getElementById('cy').dataset.version)")
    post(server, kafka_flows(time.time_ns(), 50))
    wait_edge(page, "shop/api->data/kafka|forwarded")
    assert edge_state(page, "shop/api->data/kafka|forwarded")["color"] == COLOURS["forwarded"]
    updates = page.evaluate("Number(document.getElementById('cy').dataset.version)") - messages_before
    assert 1 <= updates <= 20  # 50 flows arrived as a few batched updates, never one per flow

    # the namespace filter narrows the map to a namespace and its peers
    page.select_option("#ns-select", "data")
    hidden = set(page.evaluate("FS.cy.nodes('.hidden').map(n => n.id())"))
    assert "shop/frontend" in hidden and "world" in hidden and "data/db" not in hidden and "shop/api" not in hidden
    shot(page, "map-namespace")


def test_filter_bar_narrows_the_table(page, server):
    page.goto(server + "/?view=flows")
    page.wait_for_function("document.querySelectorAll('#flows-table tbody tr').length >= 50")
    before = page.locator("#flows-table tbody tr").count()
    verdicts = set(page.locator("#flows-table tbody tr td:nth-child(6)").all_inner_texts())
    assert {"FORWARDED", "DROPPED", "AUDIT"} <= verdicts

    page.fill("#filter", "--to-pod data/ --verdict DROPPED")
    page.press("#filter", "Enter")
    page.wait_for_function("""() => { const rows = [...document.querySelectorAll('#flows-table tbody tr')];
        return FS.state.q.includes('DROPPED') && rows.length > 0
            && rows.every(r => r.cells[5].innerText === 'DROPPED'); }""")
    rows = page.locator("#flows-table tbody tr")
    assert 0 < rows.count() < before
    assert all(d.startswith("data/db-0") for d in page.locator("#flows-table tbody tr td:nth-child(3)").all_inner_texts())
    assert "data/data-allow" in rows.first.inner_text()
    assert "q=--to-pod" in page.url  # the filter is in the URL: the view can be shared
    shot(page, "flows-filtered")

    # click a flow: its full Hubble JSON
    rows.first.click()
    assert '"verdict": "DROPPED"' in page.locator("#flow-json").inner_text()

    # the CLI's own error message for a bad flag value
    page.fill("#filter", "--verdict NOPE")
    page.press("#filter", "Enter")
    err = page.locator("#filter-error")
    err.wait_for(state="visible")
    assert "invalid --verdict value: NOPE" in err.inner_text()

    # pause keeps the table still while flows keep arriving; resume shows them
    page.fill("#filter", "--from-pod shop/api --to-port 9092")
    page.press("#filter", "Enter")
    page.wait_for_function("FS.state.q.includes('9092') && FS.connected")
    page.click("#flows-pause")
    n0 = page.locator("#flows-table tbody tr").count()
    post(server, kafka_flows(time.time_ns(), 5))
    page.wait_for_function("document.getElementById('flows-info').innerText.includes('5 new')")
    assert page.locator("#flows-table tbody tr").count() == n0
    page.click("#flows-pause")
    assert page.locator("#flows-table tbody tr").count() == n0 + 5
    with page.expect_download() as dl:
        page.click("#flows-export")
    lines = Path(dl.value.path()).read_text().splitlines()
    assert len(lines) == n0 + 5 and all('"destination_port":9092' in x for x in lines)


def test_time_range_rebuilds_the_map_from_stored_flows(page, server):
    page.goto(server + "/")
    wait_edge(page, "shop/frontend->shop/api|forwarded")
    assert page.evaluate("FS.cy.getElementById('shop/legacy->data/db|forwarded').length") == 0  # not live
    now = time.time()
    fmt = lambda t: datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")  # noqa: E731
    page.fill("#range-from", fmt(now - 27 * 3600))
    page.fill("#range-to", fmt(now - 25 * 3600))
    page.click("#range-apply")
    wait_edge(page, "shop/legacy->data/db|forwarded")
    page.wait_for_function("FS.cy.edges().length === 1")
    assert page.evaluate("FS.state.mode") == "range"
    assert page.evaluate("FS.cy.getElementById('shop/frontend->shop/api|forwarded').length") == 0
    assert "since=" in page.url
    assert page.locator("#st-conn").inner_text().startswith("range")
    shot(page, "map-yesterday")
    page.click("#mode-live")
    wait_edge(page, "shop/frontend->shop/api|forwarded")
    assert page.evaluate("FS.cy.getElementById('shop/legacy->data/db|forwarded').length") == 0


def test_a_dropped_flow_links_to_its_policy(page, server):
    page.goto(server + "/?view=flows&q=--verdict+DROPPED")
    page.wait_for_selector("#flows-table tbody tr a.policy-link")
    link = page.locator("#flows-table tbody tr a.policy-link").first
    assert link.inner_text() == "data/data-allow"
    link.click()  # one click from the drop to the policy that decided it
    page.wait_for_selector("#view-drops:not([hidden])")
    detail = page.locator("#policy-detail")
    page.wait_for_function("document.getElementById('policy-detail').innerText.includes('endpointSelector')")
    text = detail.inner_text()
    assert "data/data-allow" in text and "CiliumNetworkPolicy" in text and "dropped" in text
    row = page.locator("#policies-table tbody tr.highlight")
    assert row.get_attribute("data-ref") == "data/data-allow"
    dropped = int(row.locator("td:nth-child(5)").inner_text())
    assert dropped >= 60
    # drops over time, by reason and by deciding policy
    assert "POLICY_DENIED" in page.locator("#chart-reason").inner_text()
    assert "data/data-allow" in page.locator("#chart-policy").inner_text()
    assert page.locator("#chart-reason svg rect").count() >= 1
    shot(page, "drops-policy")


def test_endpoints_view_lists_pods_and_opens_their_flows(page, server):
    page.goto(server + "/?view=endpoints")
    page.wait_for_selector("#ep-table tbody tr[data-pod='data/db-0']")
    row = page.locator("#ep-table tbody tr[data-pod='data/db-0']")
    text = row.inner_text()
    assert "k8s:app=db" in text and "10.2.0.10" in text and "node-1" in text and "30010" in text
    page.fill("#ep-search", "frontend")
    assert page.locator("#ep-table tbody tr").count() == 2
    shot(page, "endpoints")
    page.fill("#ep-search", "")
    page.locator("#ep-table tbody tr[data-pod='data/db-0']").click()
    page.wait_for_selector("#view-flows:not([hidden])")
    page.wait_for_function("""() => { const rows = [...document.querySelectorAll('#flows-table tbody tr')];
        return FS.state.q === '--pod data/db-0' && rows.length > 0
            && rows.every(r => (r.cells[1].innerText + r.cells[2].innerText).includes('data/db-0')); }""")


@pytest.mark.root
def test_map_of_real_traffic_seen_by_the_probe(page, server, lab, tmp_path):
    from flowscope.endpoints import EndpointRecord, EndpointStore
    from probe.agent import AgentConfig, build_agent

    web, api = lab.add("dweb"), lab.add("dapi")
    store = EndpointStore(tmp_path / "state")
    for ep, app in ((web, "web"), (api, "api")):
        store.put(EndpointRecord(container_id=f"c-{app}", host_ifname=ep.host_if, host_ifindex=ep.ifindex,
                                 ips=[ep.ipv4, ep.ipv6], namespace="lab", pod_name=f"{app}-1",
                                 labels={"app": app}, endpoint_id=ep.ifindex))
    agent = build_agent(AgentConfig(server=server, state_dir=str(tmp_path / "state"), node_name="probe-node",
                                    flush_interval=0.1, spool_dir="", policy=False, cni_service=False,
                                    l7=True, l7_ports=[8080]))
    started = threading.Event()

    def run() -> None:  # in its own thread: Playwright's sync API owns this thread's event loop
        agent.start()
        started.set()
        agent.run()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert started.wait(60), "the agent did not start"
    http = lab.spawn(api, [sys.executable, "-m", "http.server", "8080", "--bind", "0.0.0.0"])
    try:
        page.goto(server + "/?ns=lab")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if web.exec(["curl", "-s", "-o", "/dev/null", f"http://{api.ipv4}:8080/"], check=False).returncode == 0:
                break
            time.sleep(0.3)
        for _ in range(3):
            web.exec(["curl", "-s", "-o", "/dev/null", f"http://{api.ipv4}:8080/"], check=False)
        web.exec(["ping", "-c", "1", api.ipv4], check=False)
        wait_edge(page, "lab/web->lab/api|forwarded", timeout=20_000)
        st = edge_state(page, "lab/web->lab/api|forwarded")
        assert st["color"] == COLOURS["forwarded"]
        edge = page.evaluate("FS.model.edges.get('lab/web->lab/api')")
        ports = {p[0] for p in edge["ports"]}
        assert "TCP/8080" in ports and edge["bytes"] > 0
        page.wait_for_function("(FS.model.edges.get('lab/web->lab/api').l7 || {}).requests >= 1", timeout=15_000)
        shot(page, "map-probe")
    finally:
        agent.stop()
        t.join(timeout=15)
        http.terminate()
    assert not t.is_alive()
