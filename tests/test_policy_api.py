"""``/api/v1/policies`` on the real app (``api.app.create_app``) over real SQLite files."""

from __future__ import annotations

import threading
import time

import pytest
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api import migrate
from api.app import Settings, create_app
from api.db import make_engine
from api.policies import create_policy_router
from enforcer.store import PolicyStore

BASE = "/api/v1/policies"

TWO = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api-in, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: no-telnet}
spec:
  endpointSelector: {}
  ingressDeny:
  - toPorts: [{ports: [{port: "23"}]}]
"""


@pytest.fixture
def app_factory(tmp_path):
    clients = []

    def make() -> TestClient:
        app = create_app(Settings(db_url=f"sqlite:///{tmp_path}/f.db", writer_process=False))
        c = TestClient(app)
        c.__enter__()
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def api(app_factory):
    return app_factory()


def apply(api, text, **params):
    return api.post(BASE, content=text, params=params, headers={"content-type": "application/yaml"})


def test_apply_list_get_with_revisions(api):
    r = apply(api, TWO)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["revision"] == 2
    assert [(x["namespace"], x["name"], x["kind"], x["action"], x["revision"]) for x in body["results"]] == [
        ("shop", "api-in", "CiliumNetworkPolicy", "created", 1),
        ("", "no-telnet", "CiliumClusterwideNetworkPolicy", "created", 2)]
    lst = api.get(BASE)
    assert lst.status_code == 200 and lst.headers["etag"] == '"2"'
    data = lst.json()
    assert data["revision"] == 2 and [i["name"] for i in data["items"]] == ["no-telnet", "api-in"]
    item = api.get(f"{BASE}/shop/api-in").json()
    assert item["revision"] == 1 and item["policy"]["metadata"] == {"name": "api-in", "namespace": "shop"}
    assert item["policy"]["spec"]["ingress"][0]["toPorts"][0]["ports"][0] == {"port": "8080", "protocol": "TCP"}
    assert api.get(f"{BASE}/_cluster/no-telnet").json()["kind"] == "CiliumClusterwideNetworkPolicy"
    assert [i["name"] for i in api.get(BASE, params={"namespace": "shop"}).json()["items"]] == ["api-in"]
    # the same content again changes nothing; a real change is a new revision
    again = apply(api, TWO).json()
    assert again["revision"] == 2 and {x["action"] for x in again["results"]} == {"unchanged"}
    changed = apply(api, TWO.replace('"8080"', '"8443"')).json()
    assert changed["revision"] == 3
    assert [x["action"] for x in changed["results"]] == ["configured", "unchanged"]
    assert api.get(f"{BASE}/shop/api-in").json()["revision"] == 3


def test_json_bodies_and_default_namespace(api):
    doc = {"metadata": {"name": "j"}, "spec": {"endpointSelector": {"matchLabels": {"app": "x"}},
                                                "egress": [{"toEntities": ["world"]}]}}
    r = api.post(BASE, json=[doc], params={"namespace": "team-a"})
    assert r.status_code == 200 and r.json()["results"][0]["namespace"] == "team-a"
    r = api.post(BASE, json={"items": [dict(doc, metadata={"name": "k"})]})
    assert r.json()["results"][0]["namespace"] == "default"


def test_etag_since_revision_and_long_poll(api):
    apply(api, TWO)
    r = api.get(BASE, headers={"if-none-match": '"2"'})
    assert r.status_code == 304 and r.headers["etag"] == '"2"' and r.content == b""
    assert api.get(BASE, headers={"if-none-match": '"1"'}).status_code == 200
    r = api.get(BASE, params={"since_revision": 2})
    assert r.status_code == 200 and r.json() == {"revision": 2, "changed": False, "items": []}
    assert api.get(BASE, params={"since_revision": 1}).json()["changed"] is True
    # a long poll ends when the set changes
    got = {}

    def poll():
        got["r"] = api.get(BASE, params={"wait": 3}, headers={"if-none-match": '"2"'})

    t = threading.Thread(target=poll)
    t.start()
    time.sleep(0.3)
    assert t.is_alive()  # held while nothing changes
    apply(api, TWO.replace("no-telnet", "no-ftp"))
    t.join(10)
    assert not t.is_alive() and got["r"].status_code == 200 and got["r"].json()["revision"] == 3
    # and times out with 304 when nothing changes
    r = api.get(BASE, params={"wait": 0.3}, headers={"if-none-match": '"3"'})
    assert r.status_code == 304


def test_invalid_policies_get_field_level_errors_and_nothing_is_stored(api):
    bad = TWO + """---
metadata: {name: broken, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingres: []
  egress:
  - toPorts: [{ports: [{port: "80x"}]}]
    toCIDR: [10.0.0.300/8]
"""
    r = apply(api, bad)
    assert r.status_code == 422
    errors = r.json()["errors"]
    paths = {e["path"]: e["message"] for e in errors}
    assert paths["spec.ingres"] == "unknown field (did you mean 'ingress'?)"
    assert paths["spec.egress[0].toPorts[0].ports[0].port"] == '"80x" is not a port number or range'
    assert "is not a CIDR" in paths["spec.egress[0].toCIDR[0]"]
    assert all(e["where"] == "document 3" and e["policy"] == "shop/broken" for e in errors)
    assert "invalid policy (3 errors)" in r.json()["detail"]
    assert api.get(BASE).json() == {"revision": 0, "changed": True, "items": []}  # all or nothing
    r = apply(api, "spec: [unclosed")
    assert r.status_code == 422 and "invalid YAML" in r.json()["errors"][0]["message"]
    assert "at line 2, column 1" in r.json()["errors"][0]["message"]
    r = apply(api, "")
    assert r.status_code == 422 and "empty" in r.json()["detail"]
    r = apply(api, TWO + "---\n" + TWO.split("---")[0])
    assert r.status_code == 422 and "already defined" in r.json()["detail"]


def test_put_and_delete_one(api):
    one = TWO.split("---")[0]
    r = api.put(f"{BASE}/shop/api-in", content=one)
    assert r.status_code == 200 and r.json()["results"][0]["action"] == "created"
    r = api.put(f"{BASE}/shop/other-name", content=one)
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "metadata.name"
    r = api.put(f"{BASE}/prod/api-in", content=one)
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "metadata.namespace"
    r = api.put(f"{BASE}/_cluster/api-in", content=one)
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "kind"
    r = api.put(f"{BASE}/shop/api-in", content=TWO)
    assert r.status_code == 422 and "expected one policy, found 2" in r.json()["detail"]
    # a namespace-less document PUT to a namespace lands there
    r = api.put(f"{BASE}/team-b/x", content="metadata: {name: x}\nspec: {endpointSelector: {}, ingress: [{}]}")
    assert r.status_code == 200 and r.json()["results"][0]["namespace"] == "team-b"
    r = api.delete(f"{BASE}/shop/api-in")
    assert r.status_code == 200 and r.json()["deleted"]["name"] == "api-in"
    rev = r.json()["revision"]
    assert api.get(BASE).json()["revision"] == rev
    assert api.delete(f"{BASE}/shop/api-in").status_code == 404
    assert api.get(f"{BASE}/shop/api-in").status_code == 404
    hist = api.get(f"{BASE}/shop/api-in/history").json()["revisions"]
    assert [h["action"] for h in hist] == ["apply", "delete"] and hist[-1]["revision"] == rev
    assert api.get(f"{BASE}/shop/nothing/history").status_code == 404


def test_policies_and_revision_survive_a_restart(app_factory, tmp_path):
    first = app_factory()
    apply(first, TWO)
    first.delete(f"{BASE}/_cluster/no-telnet")
    second = app_factory()
    data = second.get(BASE).json()
    assert data["revision"] == 3 and [i["name"] for i in data["items"]] == ["api-in"]
    assert apply(second, TWO).json()["revision"] == 4  # revisions keep growing, never reused
    assert "/api/v1/policies" in second.get("/openapi.json").json()["paths"]


def test_router_on_its_own_app_limits_the_body(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path}/p.db")
    migrate.upgrade(engine)
    app = FastAPI()
    app.include_router(create_policy_router(PolicyStore(engine), max_body_bytes=200))
    with TestClient(app) as c:
        r = c.post(BASE, content=TWO)
        assert r.status_code == 413 and "limit" in r.json()["detail"]
        small = yaml.safe_dump({"metadata": {"name": "s"}, "spec": {"endpointSelector": {}, "ingress": [{}]}})
        assert c.post(BASE, content=small).status_code == 200
    engine.dispose()
