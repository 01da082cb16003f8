"""CNI plugin: pure logic (versions, env/config parsing, labels, IPAM order, wire format) and the
file-based IPAM store, the log and the installer. No root needed."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner

from cni import errors as E
from cni.commands import execute
from cni.config import (NetConf, decode_stdin, host_ifname, labels_from, parse_cni_args, parse_env,
                        parse_netconf, pod_identity, requested_ips, requested_mac)
from cni.errors import CNIError
from cni.install import build_conflist, cni_group
from cni.ipam import BuiltinIPAM
from cni.ipam_config import candidates, parse_ipam_config, pick
from cni.link import gateways_for, pod_routes
from cni.ipam import Address
from cni.log import RequestLog
from cni.plugin import decode_env, decode_response, encode_env, encode_request, encode_response
from cni.service import parse_request
from cni.versions import (SUPPORTED_VERSIONS, best_common_version, normalize_result, render_result,
                          version_info)

RESULT = {
    "interfaces": [{"name": "fsc1", "mac": "aa:bb:cc:dd:ee:01", "mtu": 1400},
                   {"name": "eth0", "mac": "aa:bb:cc:dd:ee:02", "mtu": 1400, "sandbox": "/var/run/netns/x"}],
    "ips": [{"address": "10.1.0.2/32", "gateway": "169.254.1.1", "interface": 1},
            {"address": "fd00::2/128", "gateway": "fe80::1", "interface": 1}],
    "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1", "mtu": 1400}],
    "dns": {"nameservers": ["10.1.0.10"]},
}

ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc", "CNI_NETNS": "/var/run/netns/x", "CNI_IFNAME": "eth0",
       "CNI_PATH": "/usr/lib/cni"}


def code_of(fn, *a, **kw) -> int:
    with pytest.raises(CNIError) as ei:
        fn(*a, **kw)
    return ei.value.code


# ---- versions -----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_result_rendered_in_each_version(version):
    out = render_result(RESULT, version)
    assert out["cniVersion"] == version
    legacy = version in ("0.3.0", "0.3.1", "0.4.0")
    assert [ip.get("version") for ip in out["ips"]] == (["4", "6"] if legacy else [None, None])
    assert ("mtu" in out["interfaces"][0]) == (version == "1.1.0")
    assert ("mtu" in out["routes"][0]) == (version == "1.1.0")
    assert out["interfaces"][1]["sandbox"] == "/var/run/netns/x"
    assert out["dns"] == {"nameservers": ["10.1.0.10"]}
    # and back: a prevResult of any version normalizes to the same addresses
    assert [ip["address"] for ip in normalize_result(out)["ips"]] == ["10.1.0.2/32", "fd00::2/128"]


def test_render_rejects_unknown_version_and_normalize_rejects_garbage():
    with pytest.raises(ValueError):
        render_result(RESULT, "0.2.0")
    for bad in ([], {"ip4": {}}, {"ips": [{"gateway": "x"}]}, {"ips": [{"address": "1.2.3.4/32", "interface": "0"}]}):
        with pytest.raises(ValueError):
            normalize_result(bad)


def test_version_info_and_negotiation():
    assert version_info() == {"cniVersion": "1.1.0", "supportedVersions": list(SUPPORTED_VERSIONS)}
    debian = ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0"]
    assert best_common_version("1.1.0", debian) == "1.0.0"
    assert best_common_version("0.4.0", debian) == "0.4.0"
    assert best_common_version("1.1.0", ["0.1.0"]) is None


# ---- environment and config ---------------------------------------------------------------------


def test_parse_env_required_per_verb():
    req = parse_env(dict(ENV, CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAME=web-1;FLOWSCOPE_LABELS=a=b,c=d"))
    assert (req.command, req.container_id, req.ifname, req.path) == ("ADD", "abc", "eth0", ["/usr/lib/cni"])
    assert req.args["K8S_POD_NAME"] == "web-1" and req.args["FLOWSCOPE_LABELS"] == "a=b,c=d"
    for missing in ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"):
        env = dict(ENV)
        del env[missing]
        with pytest.raises(CNIError) as ei:
            parse_env(env)
        assert ei.value.code == E.INVALID_ENV and missing in ei.value.msg
    # DEL does not need a netns (it may be gone)
    assert parse_env(dict(ENV, CNI_COMMAND="DEL", CNI_NETNS="")).netns == ""
    assert code_of(parse_env, dict(ENV, CNI_COMMAND="FROB")) == E.INVALID_ENV
    assert code_of(parse_env, {k: v for k, v in ENV.items() if k != "CNI_COMMAND"}) == E.INVALID_ENV
    assert code_of(parse_env, dict(ENV, CNI_IFNAME="a" * 16)) == E.INVALID_ENV
    assert code_of(parse_env, dict(ENV, CNI_IFNAME="et/h0")) == E.INVALID_ENV
    assert code_of(parse_env, dict(ENV, CNI_CONTAINERID="-bad id")) == E.INVALID_ENV
    assert code_of(parse_cni_args, "novalue") == E.INVALID_ENV


def test_decode_and_version_errors():
    assert code_of(decode_stdin, b"{not json") == E.DECODE_FAILURE
    assert code_of(decode_stdin, b"[1, 2]") == E.DECODE_FAILURE
    assert code_of(decode_stdin, b"\xff\xfe") == E.DECODE_FAILURE
    assert code_of(parse_netconf, {"cniVersion": "0.9.9", "name": "n"}, "ADD") == E.INCOMPATIBLE_VERSION
    assert code_of(parse_netconf, {"name": "n"}, "ADD") == E.INCOMPATIBLE_VERSION
    assert code_of(parse_netconf, {"cniVersion": "0.3.1", "name": "n", "prevResult": {}}, "CHECK") == 1
    assert code_of(parse_netconf, {"cniVersion": "1.0.0", "name": "n"}, "STATUS") == 1
    assert code_of(parse_netconf, {"cniVersion": "1.0.0", "name": "n"}, "GC") == 1


@pytest.mark.parametrize("bad", [
    {"name": ""},
    {"name": "bad name"},
    {"mtu": "big"},
    {"mtu": 10},
    {"mtu": True},
    {"ipam": "host-local"},
    {"ipam": {"type": "../../bin/sh"}},
    {"logLevel": "chatty"},
    {"hostIfPrefix": "Way-Too-Long"},
    {"linkLocalGateway": "yes"},
    {"args": {"cni": {"labels": ["novalue"]}}},
    {"runtimeConfig": {"labels": {"app": ["list"]}}},
    {"runtimeConfig": {"mac": "01:00:00:00:00:01"}},  # multicast
])
def test_invalid_config_is_code_7(bad):
    conf = {"cniVersion": "1.0.0", "name": "net", "type": "flowscope-cni", **bad}
    assert code_of(parse_netconf, conf, "ADD") == E.INVALID_CONFIG


def test_unsupported_field_is_code_2():
    with pytest.raises(CNIError) as ei:
        parse_netconf({"cniVersion": "1.0.0", "name": "net", "ipMasq": True}, "ADD")
    assert ei.value.code == E.UNSUPPORTED_FIELD and "ipMasq=true" in ei.value.details
    assert parse_netconf({"cniVersion": "1.0.0", "name": "net", "ipMasq": False}, "ADD").name == "net"


def test_prev_result_undecodable_is_code_6():
    conf = {"cniVersion": "1.0.0", "name": "net", "prevResult": {"ips": [{"gateway": "1.2.3.4"}]}}
    assert code_of(parse_netconf, conf, "CHECK") == E.DECODE_FAILURE


def test_labels_all_forms_and_precedence():
    conf = parse_netconf({"cniVersion": "1.1.0", "name": "n",
                          "args": {"cni": {"labels": [{"key": "app", "value": "web"}, {"key": "tier", "value": "a"}]}},
                          "runtimeConfig": {"labels": ["tier=b", "team=x"]}}, "ADD")
    assert labels_from(conf, {}) == {"app": "web", "tier": "b", "team": "x"}
    assert labels_from(conf, {"FLOWSCOPE_LABELS": "team=y,zone=1"}) == {"app": "web", "tier": "b", "team": "y",
                                                                     "zone": "1"}
    conf2 = parse_netconf({"cniVersion": "1.1.0", "name": "n", "args": {"cni": {"labels": {"app": "api", "n": 3}}}},
                          "ADD")
    assert labels_from(conf2, {}) == {"app": "api", "n": "3"}
    assert code_of(labels_from, conf2, {"FLOWSCOPE_LABELS": "oops"}) == E.INVALID_CONFIG


def test_pod_identity_mac_ips_and_host_ifname():
    assert pod_identity("0123456789abcdef", {}) == ("default", "pod-0123456789ab")
    assert pod_identity("x", {"K8S_POD_NAMESPACE": "shop", "K8S_POD_NAME": "cart-1"}) == ("shop", "cart-1")
    conf = NetConf("1.1.0", "n", "flowscope-cni", runtime_config={"ips": ["10.1.0.9/24", "fd00::9"]})
    assert requested_ips(conf, {}) == ["10.1.0.9", "fd00::9"]
    assert requested_ips(NetConf("1.1.0", "n", "t"), {"IP": "10.1.0.7"}) == ["10.1.0.7"]
    assert code_of(requested_ips, NetConf("1.1.0", "n", "t"), {"IP": "nope"}) == E.INVALID_CONFIG
    assert requested_mac(NetConf("1.1.0", "n", "t"), {"MAC": "02:AA:bb:cc:dd:ee"}) == "02:aa:bb:cc:dd:ee"
    names = {host_ifname("fsc", f"c{i}", "eth0") for i in range(1000)}
    assert len(names) == 1000 and all(len(n) == 15 and n.startswith("fsc") for n in names)
    assert host_ifname("fsc", "c1", "eth0") == host_ifname("fsc", "c1", "eth0") != host_ifname("fsc", "c1", "eth1")


def test_result_merged_behind_a_previous_plugin():
    from cni.commands import _merge_prev

    prev = {"interfaces": [{"name": "bond0"}], "ips": [{"address": "192.168.9.9/24", "interface": 0}],
            "routes": [{"dst": "192.168.0.0/16"}], "dns": {"domain": "a"}}
    ours = {"interfaces": RESULT["interfaces"], "ips": RESULT["ips"], "routes": RESULT["routes"],
            "dns": {"nameservers": ["x"]}}
    merged = _merge_prev(prev, ours)
    assert [i["name"] for i in merged["interfaces"]] == ["bond0", "fsc1", "eth0"]
    assert [ip["interface"] for ip in merged["ips"]] == [0, 2, 2]
    assert len(merged["routes"]) == 2 and merged["dns"] == {"domain": "a", "nameservers": ["x"]}
    assert _merge_prev(None, ours) is ours


# ---- built-in IPAM: config and order --------------------------------------------------------------


def test_ipam_config_defaults_and_errors():
    cfg = parse_ipam_config({"subnet": "10.5.0.0/24"})
    r = cfg.range_sets[0].ranges[0]
    assert (str(r.start), str(r.end), str(r.gateway)) == ("10.5.0.1", "10.5.0.254", "10.5.0.1")
    v6 = parse_ipam_config({"ranges": [[{"subnet": "fd00:5::/120", "rangeStart": "fd00:5::10"}]]})
    assert str(v6.range_sets[0].ranges[0].start) == "fd00:5::10"
    for bad in [{}, {"ranges": "x"}, {"ranges": [[]]}, {"subnet": "10.5.0.0/31"}, {"subnet": "nonsense"},
                {"ranges": [[{"subnet": "10.5.0.0/24"}, {"subnet": "fd00::/64"}]]},
                {"ranges": [[{"subnet": "10.5.0.0/24"}], [{"subnet": "10.5.0.128/25"}]]},
                {"subnet": "10.5.0.0/24", "rangeStart": "10.6.0.1"},
                {"subnet": "10.5.0.0/24", "rangeStart": "10.5.0.9", "rangeEnd": "10.5.0.3"},
                {"subnet": "10.5.0.0/24", "gateway": "10.9.9.9"},
                {"subnet": "10.5.0.0/24", "reserved": ["10.5.0.9-10.5.0.2"]},
                {"subnet": "10.5.0.0/24", "routes": [{"dst": "banana"}]}]:
        assert code_of(parse_ipam_config, bad) == E.INVALID_CONFIG, bad


def test_candidates_round_robin_across_ranges():
    cfg = parse_ipam_config({"ranges": [[{"subnet": "10.5.0.0/29"}, {"subnet": "10.6.0.0/30"}]]})
    rs = cfg.range_sets[0]
    order = [str(ip) for ip in candidates(rs, None)]
    assert order == ["10.5.0.1", "10.5.0.2", "10.5.0.3", "10.5.0.4", "10.5.0.5", "10.5.0.6", "10.6.0.1",
                     "10.6.0.2"]
    after = [str(ip) for ip in candidates(rs, ipaddress.ip_address("10.5.0.5"))]
    assert after == ["10.5.0.6", "10.6.0.1", "10.6.0.2", "10.5.0.1", "10.5.0.2", "10.5.0.3", "10.5.0.4",
                     "10.5.0.5"]
    wrap = [str(ip) for ip in candidates(rs, ipaddress.ip_address("10.6.0.2"))]
    assert wrap[0] == "10.5.0.1" and len(wrap) == 8
    # gateway and reserved addresses are skipped
    cfg2 = parse_ipam_config({"subnet": "10.5.0.0/28", "reserved": ["10.5.0.2", "10.5.0.4-10.5.0.5", "10.5.0.8/30"]})
    free = [str(ip) for ip in candidates(cfg2.range_sets[0], None) if not cfg2.excluded(ip)]
    assert free == ["10.5.0.3", "10.5.0.6", "10.5.0.7", "10.5.0.12", "10.5.0.13", "10.5.0.14"]
    assert pick(cfg2.range_sets[0], None, lambda ip: True) is None


def test_gateways_and_routes():
    addrs = [Address("10.1.0.2", 24, "10.1.0.1"), Address("fd00::2", 64, "fd00::1")]
    assert gateways_for(addrs, True) == {4: "169.254.1.1", 6: "fe80::1"}
    assert gateways_for(addrs, False) == {4: "10.1.0.1", 6: "fd00::1"}
    assert code_of(gateways_for, [Address("10.1.0.2", 24, "")], False) == E.INVALID_CONFIG
    routes = pod_routes(addrs, {4: "169.254.1.1", 6: "fe80::1"},
                        [{"dst": "0.0.0.0/0"}, {"dst": "10.96.0.0/12"}, {"dst": "192.168.0.0/16", "gw": "10.1.0.254"}])
    assert routes == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}, {"dst": "::/0", "gw": "fe80::1"},
                      {"dst": "10.96.0.0/12", "gw": "169.254.1.1"}, {"dst": "192.168.0.0/16", "gw": "10.1.0.254"}]


# ---- built-in IPAM: the store on disk -------------------------------------------------------------


def _ipam(tmp_path: Path, ipam: dict, name: str = "net") -> BuiltinIPAM:
    conf = parse_netconf({"cniVersion": "1.1.0", "name": name, "ipam": {**ipam, "dataDir": str(tmp_path)}}, "ADD")
    return BuiltinIPAM(conf, tmp_path)


def test_allocate_release_round_robin_and_host_local_layout(tmp_path):
    ipam = _ipam(tmp_path, {"ranges": [[{"subnet": "10.7.0.0/29"}], [{"subnet": "fd00:7::/120"}]]})
    a = ipam.add("c1", "eth0", [], {})
    assert [(x.ip, x.prefixlen, x.gateway) for x in a.addresses] == [("10.7.0.2", 29, "10.7.0.1"),
                                                                    ("fd00:7::2", 120, "fd00:7::1")]
    assert (tmp_path / "net" / "10.7.0.2").read_bytes() == b"c1\r\neth0"  # host-local's format
    assert (tmp_path / "net" / "last_reserved_ip.0").read_text() == "10.7.0.2"
    b = ipam.add("c2", "eth0", [], {})
    assert b.addresses[0].ip == "10.7.0.3"
    assert ipam.delete("c1", "eth0", {}) == ["10.7.0.2", "fd00:7::2"]
    c = ipam.add("c3", "eth0", [], {})
    assert c.addresses[0].ip == "10.7.0.4"  # round robin: not the address just freed
    assert code_of(ipam.add, "c3", "eth0", [], {}) == E.IPAM_FAILURE  # same attachment twice
    ipam.check("c3", "eth0", ["10.7.0.4", "fd00:7::4"], {})
    assert code_of(ipam.check, "c3", "eth0", ["10.7.0.9"], {}) == E.CHECK_FAILED
    assert ipam.delete("nobody", "eth0", {}) == []


def test_exhaustion_is_clear_and_leaks_nothing(tmp_path):
    ipam = _ipam(tmp_path, {"ranges": [[{"subnet": "10.8.0.0/29"}], [{"subnet": "fd00:8::/125"}]]})
    got = [ipam.add(f"c{i}", "eth0", [], {}).addresses[0].ip for i in range(5)]  # .2-.6 (.1 is the gateway)
    assert got == [f"10.8.0.{i}" for i in range(2, 7)]
    with pytest.raises(CNIError) as ei:
        ipam.add("c9", "eth0", [], {})
    assert ei.value.code == E.IPAM_EXHAUSTED and "10.8.0.1-10.8.0.6" in ei.value.details
    # the IPv6 address of the failed attempt is not left reserved
    assert not [n for n in os.listdir(tmp_path / "net") if (tmp_path / "net" / n).read_bytes().startswith(b"c9")]
    with pytest.raises(CNIError) as ei:
        ipam.ready({})
    assert ei.value.code == E.NOT_AVAILABLE


def test_requested_ip_and_gc(tmp_path):
    ipam = _ipam(tmp_path, {"subnet": "10.9.0.0/24", "reserved": ["10.9.0.50"]})
    assert ipam.add("c1", "eth0", ["10.9.0.77"], {}).addresses[0].ip == "10.9.0.77"
    assert code_of(ipam.add, "c2", "eth0", ["10.9.0.77"], {}) == E.IPAM_FAILURE   # taken
    assert code_of(ipam.add, "c2", "eth0", ["10.9.0.50"], {}) == E.IPAM_FAILURE   # reserved
    assert code_of(ipam.add, "c2", "eth0", ["10.10.0.5"], {}) == E.IPAM_FAILURE   # outside
    ipam.add("c2", "eth0", [], {})
    ipam.add("c3", "eth0", [], {})
    released = ipam.gc({("c1", "eth0")}, {}, protected=lambda c, i: c == "c3")
    assert [r.split()[0] for r in released] == ["10.9.0.2"]
    assert sorted(ip for ip, *_ in _store_all(ipam)) == ["10.9.0.3", "10.9.0.77"]


def _store_all(ipam: BuiltinIPAM):
    with ipam.store.locked() as st:
        return [(str(ip), c, i) for ip, c, i in st.all()]


def _allocate_one(args):
    data_dir, i = args
    ipam = _ipam(Path(data_dir), {"subnet": "10.11.0.0/24"})
    return ipam.add(f"c{i}", "eth0", [], {}).addresses[0].ip


def test_fifty_parallel_processes_get_distinct_addresses(tmp_path):
    with ProcessPoolExecutor(max_workers=10) as ex:
        ips = list(ex.map(_allocate_one, [(str(tmp_path), i) for i in range(50)]))
    assert len(set(ips)) == 50
    assert len([n for n in os.listdir(tmp_path / "net") if n.startswith("10.")]) == 50


# ---- execute(): errors never need root ------------------------------------------------------------


def test_execute_errors_are_spec_json():
    r = execute({k: v for k, v in ENV.items() if k != "CNI_NETNS"}, b'{"cniVersion": "0.4.0", "name": "n"}')
    out = json.loads(r.stdout)
    assert r.status != 0 and out == {"cniVersion": "0.4.0", "code": 4, "msg": out["msg"], "details": out["details"]}
    assert "CNI_NETNS" in out["msg"]
    r = execute(ENV, b"garbage")
    assert json.loads(r.stdout)["code"] == 6 and b"level=error" in r.stderr
    r = execute(dict(ENV, CNI_COMMAND="VERSION"), b"")
    assert r.status == 0 and json.loads(r.stdout) == version_info()


def test_status_without_agent_is_50(tmp_path):
    conf = json.dumps({"cniVersion": "1.1.0", "name": "n", "type": "flowscope-cni",
                       "ipam": {"subnet": "10.12.0.0/24"}}).encode()
    r = execute({"CNI_COMMAND": "STATUS", "CNI_PATH": "/usr/lib/cni", "FLOWSCOPE_STATE_DIR": str(tmp_path)}, conf)
    assert json.loads(r.stdout)["code"] == 50 and str(tmp_path / "cni.sock") in json.loads(r.stdout)["details"]
    r = execute({"CNI_COMMAND": "STATUS", "CNI_PATH": "/usr/lib/cni", "FLOWSCOPE_STATE_DIR": str(tmp_path)}, conf,
                agent=True)
    assert r.status == 0 and r.stdout == b""
    # the agent is up but cannot record attachments: 51 (existing containers are affected too)
    bad = json.dumps({"cniVersion": "1.1.0", "name": "n", "stateDir": "/proc/flowscope-nope",
                      "ipam": {"subnet": "10.12.0.0/24"}}).encode()
    r = execute({"CNI_COMMAND": "STATUS", "CNI_PATH": "/usr/lib/cni"}, bad, agent=True)
    assert json.loads(r.stdout)["code"] == 51


def test_log_levels_and_file(tmp_path):
    log = RequestLog("ADD", "0123456789abcdef0", "eth0")
    log.configure("warning", str(tmp_path / "sub" / "cni.log"))
    log.info("quiet")
    log.warning("loud", why="a b")
    text = log.render()
    assert "quiet" not in text and 'msg=loud why="a b"' in text and "container=0123456789ab " in text
    assert log.flush_file() is None
    assert (tmp_path / "sub" / "cni.log").read_text() == text
    log.configure("info", "/proc/nope/cni.log")
    assert "cannot write log file" in (log.flush_file() or "")


# ---- wire format ----------------------------------------------------------------------------------


def test_wire_format_round_trip_and_truncation():
    env = {b"CNI_COMMAND": b"ADD", b"WEIRD": b"a=b=c", b"EMPTY": b""}
    req = encode_request(encode_env(env), b'{"x": 1}\n\x00bin')
    parsed = parse_request(req)
    assert parsed == ({"CNI_COMMAND": "ADD", "WEIRD": "a=b=c", "EMPTY": ""}, b'{"x": 1}\n\x00bin')
    assert parse_request(req[:-1]) is None and parse_request(b"GET / HTTP/1.0\r\n\r\n") is None
    resp = encode_response(1, b'{"code": 7}\n', b"log line\n")
    assert decode_response(resp) == (1, b'{"code": 7}\n', b"log line\n")
    assert decode_response(resp[:-3]) is None and decode_response(b"") is None
    assert decode_env(b"A=1\x00junk\x00=x\x00B=") == {"A": "1", "B": ""}


# ---- install --------------------------------------------------------------------------------------


def test_build_conflist_validates():
    cl = build_conflist("net", ["10.1.0.0/16", "fd00:1::/64"], 1400, ["portmap", "custom"], "1.0.0")
    assert cl["cniVersion"] == "1.0.0" and [p["type"] for p in cl["plugins"]] == ["flowscope-cni", "portmap", "custom"]
    assert cl["plugins"][0]["ipam"]["ranges"] == [[{"subnet": "10.1.0.0/16"}], [{"subnet": "fd00:1::/64"}]]
    assert cl["plugins"][1]["capabilities"] == {"portMappings": True}
    assert code_of(build_conflist, "net", ["10.1.0.0/40"], 1400, [], "1.1.0") == E.INVALID_CONFIG
    assert code_of(build_conflist, "bad name", ["10.1.0.0/16"], 1400, [], "1.1.0") == E.INVALID_CONFIG


def test_install_writes_a_working_plugin_and_conflist(tmp_path):
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    r = CliRunner().invoke(cni_group, ["install", "--bin-dir", str(bin_dir), "--conf-dir", str(conf_dir),
                                       "--subnet", "10.30.0.0/24", "--chain", "portmap", "--chain", "tuning"])
    assert r.exit_code == 0, r.output
    conflist = json.loads((conf_dir / "10-flowscope.conflist").read_text())
    # Debian's portmap/tuning speak up to 1.0.0, so the whole list is negotiated down
    assert conflist["cniVersion"] == "1.0.0"
    assert [p["type"] for p in conflist["plugins"]] == ["flowscope-cni", "portmap", "tuning"]
    plugin = bin_dir / "flowscope-cni"
    assert os.access(plugin, os.X_OK) and plugin.read_text().startswith("#!")
    p = subprocess.run([str(plugin)], input=b"{}", env={"CNI_COMMAND": "VERSION"}, capture_output=True)
    assert p.returncode == 0 and json.loads(p.stdout) == version_info()
    # the standalone path works from the shim too (site initialised on demand): a decode error
    p = subprocess.run([str(plugin)], input=b"{", capture_output=True,
                       env={**ENV, "FLOWSCOPE_STATE_DIR": str(tmp_path / "state")})
    assert p.returncode == 1 and json.loads(p.stdout)["code"] == 6
    alone = CliRunner().invoke(cni_group, ["install", "--bin-dir", str(bin_dir), "--conf-dir", str(conf_dir),
                                           "--name", "solo", "--priority", "20"])
    assert alone.exit_code == 0 and json.loads((conf_dir / "20-solo.conflist").read_text())["cniVersion"] == "1.1.0"
    bad = CliRunner().invoke(cni_group, ["install", "--bin-dir", str(bin_dir), "--conf-dir", str(conf_dir),
                                         "--subnet", "300.1.0.0/16"])
    assert bad.exit_code != 0 and "not a CIDR" in bad.output and "Traceback" not in bad.output
    missing = CliRunner().invoke(cni_group, ["install", "--bin-dir", str(bin_dir), "--conf-dir", str(conf_dir),
                                             "--chain", "no-such-plugin"])
    assert missing.exit_code != 0 and "failed to find plugin" in missing.output
    un = CliRunner().invoke(cni_group, ["uninstall", "--bin-dir", str(bin_dir), "--conf-dir", str(conf_dir)])
    assert un.exit_code == 0 and not plugin.exists() and not (conf_dir / "10-flowscope.conflist").exists()
