"""``flowscope observe``: flags -> FlowQuery (Hubble's rules), --input-file end to end, and the client
against real HTTP and websocket servers on loopback (stdlib http.server, websockets)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest
from click.testing import CliRunner

from flowscope import schema
from flowscope.filters import EventTypeFilter, FlowFilter
from flowscope.observe import ALL_FLOWS, ObserveUsageError, build_filters, build_query, observe_command
from flowscope.query import FlowQuery, query_from_json, query_from_params

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(observe_command, list(args), input=input)


def raw_query(*args: str) -> dict:
    res = run("--print-raw-filters", *args)
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def filters(*args: str) -> tuple[list[FlowFilter], list[FlowFilter]]:
    q = query_from_json(run("--print-raw-filters", *args).output.encode())
    return q.whitelist, q.blacklist


# --------------------------------------------------------------------------------------------
# flags -> filters (expected values from Hubble's flows_filter_test.go)
# --------------------------------------------------------------------------------------------

FLAG_CASES = [
    ("dispatch", ["--from-ip", "1.2.3.4", "--from-ip", "5.6.7.8", "--not", "--to-ip", "5.5.5.5",
                  "--verdict", "DROPPED", "-t", "l7"],
     [FlowFilter(source_ip=["1.2.3.4", "5.6.7.8"], verdict=["DROPPED"], event_type=[EventTypeFilter(type=129)])],
     [FlowFilter(destination_ip=["5.5.5.5"])]),
    ("left/right", ["--ip", "1.2.3.4", "--ip", "5.6.7.8", "--verdict", "DROPPED", "--not", "--pod", "deathstar",
                    "--not", "--http-status", "200", "--http-method", "get", "--http-path", "/page/\\d+",
                    "--node-name", "k8s*"],
     [FlowFilter(source_ip=["1.2.3.4", "5.6.7.8"], verdict=["DROPPED"], http_method=["get"],
                 http_path=["/page/\\d+"], node_name=["k8s*"]),
      FlowFilter(destination_ip=["1.2.3.4", "5.6.7.8"], verdict=["DROPPED"], http_method=["get"],
                 http_path=["/page/\\d+"], node_name=["k8s*"])],
     [FlowFilter(source_pod=["deathstar"], http_status_code=["200"]),
      FlowFilter(destination_pod=["deathstar"], http_status_code=["200"])]),
    ("labels", ["--label", "k1=v1,k2=v2", "-l", "k3"],
     [FlowFilter(source_label=["k1=v1,k2=v2", "k3"]), FlowFilter(destination_label=["k1=v1,k2=v2", "k3"])], []),
    ("from-pod + to-workload", ["--from-pod", "cilium", "--to-workload", "app"],
     [FlowFilter(source_pod=["cilium"], destination_workload=[schema.Workload(name="app")])], []),
    ("pod + to-workload", ["--pod", "cilium", "--to-workload", "app"],
     [FlowFilter(source_pod=["cilium"], destination_workload=[schema.Workload(name="app")]),
      FlowFilter(destination_pod=["cilium"], destination_workload=[schema.Workload(name="app")])], []),
    ("identity", ["--identity", "1", "--identity", "2"],
     [FlowFilter(source_identity=[1, 2]), FlowFilter(destination_identity=[1, 2])], []),
    ("reserved identity", ["--from-identity", "world", "--to-identity", "host"],
     [FlowFilter(source_identity=[2], destination_identity=[1])], []),
    ("uuid", ["--uuid", "b9fab269-04ae-495c-9d12-b6c36d41de0d"],
     [FlowFilter(uuid=["b9fab269-04ae-495c-9d12-b6c36d41de0d"])], []),
    ("traffic direction mixed case", ["--traffic-direction", "INGRESS", "--traffic-direction", "EgrEss"],
     [FlowFilter(traffic_direction=["INGRESS", "EGRESS"])], []),
    ("namespace + port", ["--namespace", "cilium", "--port", "443"],
     [FlowFilter(source_pod=["cilium/"], source_port=["443"]),
      FlowFilter(destination_pod=["cilium/"], destination_port=["443"])], []),
    ("from-namespace + from-port", ["--from-namespace", "cilium", "--from-port", "443"],
     [FlowFilter(source_pod=["cilium/"], source_port=["443"])], []),
    ("to-namespace", ["--to-namespace", "cilium"], [FlowFilter(destination_pod=["cilium/"])], []),
    ("to-namespace + port", ["--to-namespace", "cilium", "--port", "443"],
     [FlowFilter(destination_pod=["cilium/"], source_port=["443"]),
      FlowFilter(destination_pod=["cilium/"], destination_port=["443"])], []),
    ("namespace + pod", ["--namespace", "cilium", "--pod", "foo-9c76d6c95-tf788"],
     [FlowFilter(source_pod=["cilium/foo-9c76d6c95-tf788"]), FlowFilter(destination_pod=["cilium/foo-9c76d6c95-tf788"])],
     []),
    ("namespaces + services", ["--namespace", "cilium", "--namespace", "kube-system", "--service", "foo",
                               "--service", "bar"],
     [FlowFilter(source_service=["cilium/foo", "kube-system/foo", "cilium/bar", "kube-system/bar"]),
      FlowFilter(destination_service=["cilium/foo", "kube-system/foo", "cilium/bar", "kube-system/bar"])], []),
    ("to-namespace + to-pod with ns", ["--to-namespace", "cilium", "--to-pod", "cilium/foo-9c76d6c95-tf788"],
     [FlowFilter(destination_pod=["cilium/foo-9c76d6c95-tf788"])], []),
    ("from-namespace to-pod", ["--from-namespace", "kube-system", "--to-pod", "cilium/foo-9c76d6c95-tf788"],
     [FlowFilter(source_pod=["kube-system/"], destination_pod=["cilium/foo-9c76d6c95-tf788"])], []),
    ("from-namespace + from-pod", ["--from-namespace", "kube-system", "--from-pod", "coredns"],
     [FlowFilter(source_pod=["kube-system/coredns"])], []),
    ("all namespaces", ["-A"], [FlowFilter(source_pod=["/"]), FlowFilter(destination_pod=["/"])], []),
    ("types", ["-t", "254", "-t", "255:127", "-t", "trace:to-endpoint", "-t", "trace:from-endpoint", "-t", "4:2",
               "-t", "drop", "-t", "policy-verdict"],
     [FlowFilter(event_type=[EventTypeFilter(type=254), EventTypeFilter(type=255, match_sub_type=True, sub_type=127),
                             EventTypeFilter(type=4, match_sub_type=True, sub_type=0),
                             EventTypeFilter(type=4, match_sub_type=True, sub_type=5),
                             EventTypeFilter(type=4, match_sub_type=True, sub_type=2),
                             EventTypeFilter(type=1), EventTypeFilter(type=5)])], []),
    ("tcp flags + not", ["--tcp-flags", "syn,ack", "--tcp-flags", "FIN", "--not", "--tcp-flags", "NS"],
     [FlowFilter(tcp_flags=[schema.TCPFlags(SYN=True, ACK=True), schema.TCPFlags(FIN=True)])],
     [FlowFilter(tcp_flags=[schema.TCPFlags(NS=True)])]),
    ("ip versions", ["-4", "--ip-version", "v6"], [FlowFilter(ip_version=["IPv4", "IPv6"])], []),
    ("one denylist for all --not", ["--not", "--verdict", "DROPPED", "--not", "--protocol", "udp", "--from-port", "1"],
     [FlowFilter(source_port=["1"])], [FlowFilter(verdict=["DROPPED"], protocol=["udp"])]),
    ("misc", ["--http-header", "x-env:prod", "--interface", "eth0", "--drop-reason-desc", "policy_denied",
              "--node-label", "zone=a", "--fqdn", "*.example.com", "--http-url", "^http://x", "--protocol", "TCP"],
     [FlowFilter(source_fqdn=["*.example.com"], drop_reason_desc=["POLICY_DENIED"], protocol=["TCP"],
                 http_url=["^http://x"], http_header=[schema.HTTPHeader(key="x-env", value="prod")],
                 node_labels=["zone=a"], interface=[schema.NetworkInterface(name="eth0")]),
      FlowFilter(destination_fqdn=["*.example.com"], drop_reason_desc=["POLICY_DENIED"], protocol=["TCP"],
                 http_url=["^http://x"], http_header=[schema.HTTPHeader(key="x-env", value="prod")],
                 node_labels=["zone=a"], interface=[schema.NetworkInterface(name="eth0")])], []),
]


@pytest.mark.parametrize("args,allow,deny", [c[1:] for c in FLAG_CASES], ids=[c[0] for c in FLAG_CASES])
def test_flags_to_filters(args, allow, deny):
    assert filters(*args) == (allow, deny)


def test_build_filters_is_pure_and_ordered():
    assert build_filters([("ip", "1.1.1.1"), ("not", None), ("verdict", "DROPPED"), ("verdict", "ERROR")]) == (
        [FlowFilter(source_ip=["1.1.1.1"], verdict=["ERROR"]), FlowFilter(destination_ip=["1.1.1.1"], verdict=["ERROR"])],
        [FlowFilter(verdict=["DROPPED"])])
    assert build_filters([]) == ([], [])


CONFLICTS = [("--port", "--to-port"), ("--port", "--from-port"), ("--identity", "--to-identity"),
             ("--workload", "--from-workload"), ("--fqdn", "--from-fqdn"), ("--ip", "--from-ip"),
             ("--label", "--to-label"), ("--service", "--from-service"), ("--pod", "--from-pod"),
             ("--namespace", "--from-namespace"), ("--ip", "--fqdn"), ("--from-ip", "--from-pod"),
             ("--to-ip", "--to-namespace"), ("--namespace", "--to-service"), ("--from-namespace", "--fqdn")]


@pytest.mark.parametrize("a,b", CONFLICTS, ids=[f"{a} {b}" for a, b in CONFLICTS])
def test_conflicting_flags(a, b):
    res = run("--print-raw-filters", a, "1", b, "2")
    assert res.exit_code == 2
    assert "cannot be combined" in res.output or "conflict" in res.output


@pytest.mark.parametrize("args,msg", [
    (["--from-ip", "1.2.3.4", "--not"], "trailing --not found in the arguments"),
    (["--not", "--not", "--verdict", "DROPPED"], "consecutive --not statements"),
    (["--from-ip", "1.2.3.4", "--from-fqdn", "doesnt.work"], "filters --from-fqdn and --from-ip cannot be combined"),
    (["--to-namespace", "kube-system", "--to-pod", "cilium/foo"],
     'namespace conflict: "kube-system" does not contain "cilium/foo"'),
    (["--from-service", "cilium/foo", "--from-pod", "kube-system/hubble"],
     'namespace of service "cilium/foo" conflict with pod "kube-system"'),
    (["--traffic-direction", "to the moon"], "to the moon: invalid traffic direction, expected ingress or egress"),
    (["--verdict", "MAYBE"], "invalid --verdict value: MAYBE"),
    (["-t", "some-invalid-type"], "unknown event type 'some-invalid-type'"),
    (["-t", "trace:some-invalid-sub-type"], "unknown event sub-type 'some-invalid-sub-type'"),
    (["--tcp-flags", "syn,"], "unknown TCP flag ''"),
    (["--identity", "bad"], "invalid --identity value 'bad'"),
    (["--from-ip", "1.2.3"], "source_ip: invalid IP address '1.2.3'"),
    (["--to-port", "http"], "destination_port: invalid port 'http'"),
    (["--protocol", "quic"], "unknown protocol 'quic'"),
    (["--from-label", "app in (x"], "invalid label selector"),
    (["--http-path", "("], "http_path: invalid regular expression"),
    (["--ip-version", "5"], "invalid --ip-version value '5'"),
    (["--http-header", "nocolon"], "invalid HTTP header 'nocolon'"),
    (["--first", "3", "--last", "3"], "cannot set both --first and --last"),
    (["--first", "3", "--all"], "cannot set both --first and --all"),
    (["--first", "3", "--follow"], "cannot set both --first and --follow"),
    (["--last", "3", "--all"], "cannot set both --last and --all"),
    (["--until", "1m", "--follow"], "--until cannot be combined with --follow"),
    (["--since", "last week"], "--since: invalid time 'last week'"),
    (["-o", "table", "--follow"], "table output format is not compatible with follow mode"),
    (["--allowlist", '{"sourceip": []}'], "invalid --allowlist flag"),
    (["--last", "-1"], "--last"),
    (["-o", "yaml"], "'yaml' is not one of"),
    (["--fro-ip", "1.2.3.4"], "No such option"),
])
def test_bad_flags_exit_2_with_one_line(args, msg):
    res = run(*args)
    assert res.exit_code == 2, res.output
    assert msg in res.output
    assert res.output.startswith("Error: ") and res.output.count("\n") == 1
    assert "Traceback" not in res.output


@pytest.mark.parametrize("args,expected", [
    ([], {"number": 20}),
    (["--last", "5"], {"number": 5}),
    (["--first", "3"], {"number": 3, "first": True}),
    (["--since", "5m"], {"since": "5m"}),
    (["--since", "5m", "--until", "1m", "--last", "7"], {"since": "5m", "until": "1m", "number": 7}),
    (["--until", "2024-11-27T06:00:00Z"], {"until": "2024-11-27T06:00:00Z"}),
    (["--all"], {"number": ALL_FLOWS}),
    (["-f"], {"follow": True}),
    (["--follow", "--last", "10"], {"follow": True, "number": 10}),
    (["--allowlist", '{"verdict":["DROPPED"]}', "--denylist", '{"protocol":["udp"]}'],
     {"whitelist": [{"verdict": ["DROPPED"]}], "blacklist": [{"protocol": ["udp"]}], "number": 20}),
])
def test_selector_flags_to_query(args, expected):
    assert raw_query(*args) == expected


def test_build_query_offline_has_no_default_count():
    assert build_query([], offline=True) == FlowQuery()
    assert build_query([], follow=True, until="1m", offline=True) == FlowQuery(until="1m")
    with pytest.raises(ObserveUsageError):
        build_query([], first=1, last=1, offline=True)


# --------------------------------------------------------------------------------------------
# --input-file: Hubble JSON lines filtered locally
# --------------------------------------------------------------------------------------------

def envelope(i: int, **kw) -> str:
    f = {
        "time": f"2024-11-27T06:10:{i:02d}.000Z", "verdict": "FORWARDED",
        "IP": {"source": "10.0.0.1", "destination": f"10.0.1.{i}", "ipVersion": "IPv4"},
        "l4": {"TCP": {"source_port": 40000 + i, "destination_port": 80, "flags": {"SYN": True}}},
        "source": {"identity": 1234, "namespace": "default", "pod_name": "frontend-7c9",
                   "labels": ["k8s:app=frontend"]},
        "destination": {"identity": 5678, "namespace": "shop", "pod_name": f"api-{i}", "labels": ["k8s:app=api"]},
        "node_name": "node-1", "event_type": {"type": 4, "sub_type": 0}, "is_reply": False,
    }
    f.update(kw)
    return json.dumps({"flow": f, "node_name": "node-1", "time": f["time"]}, separators=(",", ":"))


def flow_file(tmp_path: Path) -> tuple[Path, list[str]]:
    lines = [
        envelope(1),
        envelope(2, verdict="DROPPED", drop_reason_desc="POLICY_DENIED", event_type={"type": 1, "sub_type": 133},
                 is_reply=None),
        envelope(3, l4={"UDP": {"source_port": 5353, "destination_port": 53}},
                 destination={"identity": 99, "namespace": "kube-system", "pod_name": "coredns-1"}),
        "this is not json",
        '{"lost_events":{"source":"PERF_EVENT_RING_BUFFER","num_events_lost":"12","cpu":0},'
        '"time":"2024-11-27T06:10:04.000Z"}',
        envelope(5, verdict="FORWARDED", future_field={"x": 1}),  # from a newer Hubble: tolerated
        envelope(6, verdict=["bad"]),  # wrong type: reported, skipped
        "",
        envelope(7, IP={"source": "fd00::1", "destination": "fd00::7", "ipVersion": "IPv6"}),
    ]
    p = tmp_path / "flows.json"
    p.write_text("\n".join(lines) + "\n")
    return p, lines


def test_input_file_all_lines_and_warnings(tmp_path):
    p, lines = flow_file(tmp_path)
    res = run("--input-file", str(p), "-o", "jsonpb")
    assert res.exit_code == 0
    assert res.stdout.splitlines() == [lines[0], lines[1], lines[2], lines[4], lines[5], lines[8]]
    assert res.stderr.count("warning: line") == 2 and "line 4" in res.stderr and "line 7" in res.stderr


@pytest.mark.parametrize("args,expected_lines", [
    (["--verdict", "DROPPED"], [1, 4]),  # lost events always pass
    (["--not", "--verdict", "DROPPED"], [0, 2, 4, 5, 8]),
    (["--to-port", "53"], [2, 4]),
    (["--to-namespace", "shop"], [0, 1, 4, 5, 8]),
    (["--to-pod", "kube-system/core"], [2, 4]),
    (["--ip", "10.0.1.2"], [1, 4]),
    (["--ip", "fd00::/64"], [4, 8]),
    (["-6"], [4, 8]),
    (["--from-label", "app=frontend", "--to-label", "app!=api"], [2, 4]),
    (["--protocol", "udp", "--protocol", "tcp", "--not", "--to-ip", "10.0.1.0/30"], [4, 5, 8]),
    (["--tcp-flags", "SYN", "--verdict", "FORWARDED"], [0, 4, 5, 8]),
    (["--type", "drop:133"], [1, 4]),
    (["--drop-reason-desc", "POLICY_DENIED"], [1, 4]),
    (["--since", "2024-11-27T06:10:03Z", "--until", "2024-11-27T06:10:05Z"], [2, 4, 5]),
    (["--last", "2"], [5, 8]),
    (["--first", "2"], [0, 1]),
    (["--first", "2", "--verdict", "FORWARDED"], [0, 2]),
])
def test_input_file_filters(tmp_path, args, expected_lines):
    p, lines = flow_file(tmp_path)
    res = run("--input-file", str(p), "-o", "json", *args)
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == [lines[i] for i in expected_lines]


def test_input_file_from_stdin_compact_and_table(tmp_path):
    _, lines = flow_file(tmp_path)
    data = "\n".join(lines[:3]) + "\n"
    res = run("--input-file", "-", "--to-port", "80", input=data)
    assert res.exit_code == 0
    assert res.stdout == (
        "Nov 27 06:10:01.000: default/frontend-7c9:40001 (ID:1234) -> shop/api-1:80 (ID:5678) "
        "to-endpoint FORWARDED (TCP Flags: SYN)\n"
        "Nov 27 06:10:02.000: default/frontend-7c9:40002 (ID:1234) <> shop/api-2:80 (ID:5678) "
        "Policy denied DROPPED (TCP Flags: SYN)\n")
    res = run("--input-file", "-", "--numeric", "-o", "table", "--print-node-name", input=data)
    out = res.stdout.splitlines()
    assert out[0].split() == ["TIMESTAMP", "NODE", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"]
    assert "10.0.0.1:5353" in out[3] and "10.0.1.3:53" in out[3] and out[3].endswith("UDP")


def test_input_file_missing(tmp_path):
    res = run("--input-file", str(tmp_path / "nope.json"))
    assert res.exit_code == 2 and "cannot read --input-file" in res.output and res.output.count("\n") == 1


def _subprocess(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "flowscope.observe", *args], capture_output=True, text=True,
                          timeout=60, env=env, cwd=str(REPO), **kw)


def test_input_file_subprocess(tmp_path):
    p, lines = flow_file(tmp_path)
    res = _subprocess(["--input-file", str(p), "--to-namespace", "kube-system", "-o", "dict"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[:3] == ["  TIMESTAMP: Nov 27 06:10:03.000", "     SOURCE: default/frontend-7c9:5353",
                                           "DESTINATION: kube-system/coredns-1:53"]
    assert "EVENTS LOST" in res.stdout and res.stdout.count("------------") == 1
    # stdin, and a bad flag: one line, exit 2, no traceback
    res = _subprocess(["--input-file", "-", "-o", "jsonpb", "--last", "1"], input="\n".join(lines[:3]))
    assert res.returncode == 0 and res.stdout == lines[2] + "\n"
    res = _subprocess(["--input-file", str(p), "--to-port", "eighty"])
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().splitlines() == ["Error: invalid filter: destination_port: invalid port 'eighty', "
                                               "expected 0-65535"]


# --------------------------------------------------------------------------------------------
# Against a real HTTP server (POST /api/v1/flows/query -> JSON lines)
# --------------------------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, *args):  # keep test output clean
        pass

    def do_POST(self):
        srv = self.server
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        srv.requests.append((self.path, self.headers.get("content-type"), body))
        if srv.status >= 400:
            payload = json.dumps(srv.error_body).encode()
            self.send_response(srv.status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        self.send_response(200)
        self.send_header("content-type", "application/x-ndjson")
        self.end_headers()
        for i, line in enumerate(srv.lines):
            self.wfile.write(line.encode() + b"\n")
            self.wfile.flush()
            if i == 0 and srv.gate is not None:
                srv.gate.wait(20)


@contextmanager
def http_server(lines=(), status=200, error_body=None, gate=None):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.lines, srv.status, srv.error_body, srv.gate, srv.requests = list(lines), status, error_body, gate, []
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        if gate is not None:
            gate.set()
        srv.shutdown()
        srv.server_close()
        t.join(5)


def test_query_against_http_server(tmp_path):
    _, lines = flow_file(tmp_path)
    served = [lines[0], lines[1], lines[4]]
    with http_server(served) as (srv, url):
        res = run("--server", url, "--ip", "10.0.0.1", "--not", "--verdict", "ERROR", "--since", "1h", "-o", "jsonpb")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == served
    (path, ctype, body), = srv.requests
    assert path == "/api/v1/flows/query" and ctype == "application/json"
    q = query_from_json(body)
    assert q == FlowQuery(whitelist=[FlowFilter(source_ip=["10.0.0.1"]), FlowFilter(destination_ip=["10.0.0.1"])],
                          blacklist=[FlowFilter(verdict=["ERROR"])], since="1h")


def test_server_from_environment_and_compact_output(tmp_path):
    _, lines = flow_file(tmp_path)
    with http_server([lines[0], lines[4]]) as (srv, url):
        res = CliRunner(env={"FLOWSCOPE_SERVER": url + "/"}).invoke(observe_command, ["--last", "2"])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == [
        "Nov 27 06:10:01.000: default/frontend-7c9:40001 (ID:1234) -> shop/api-1:80 (ID:5678) to-endpoint "
        "FORWARDED (TCP Flags: SYN)",
        "Nov 27 06:10:04.000 EVENTS LOST: PERF_EVENT_RING_BUFFER CPU(0) 12"]
    assert query_from_json(srv.requests[0][2]) == FlowQuery(number=2)


def test_server_errors_are_one_line():
    with http_server(status=400, error_body={"detail": "invalid filter: source_ip: invalid CIDR '1/99'"}) as (_, url):
        res = run("--server", url)
    assert res.exit_code == 1
    assert res.output == "Error: server returned 400: invalid filter: source_ip: invalid CIDR '1/99'\n"
    with http_server(status=422, error_body={"detail": [{"loc": ["body", "number"], "msg": "bad"}]}) as (_, url):
        res = run("--server", url)
    assert res.exit_code == 1 and res.output == "Error: server returned 422: body.number: bad\n"
    with http_server(lines=['{"error": "store unavailable"}']) as (_, url):
        res = run("--server", url)
    assert res.exit_code == 1 and res.output == "Error: server error: store unavailable\n"


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_server():
    port = _closed_port()
    res = run("--server", f"http://127.0.0.1:{port}")
    assert res.exit_code == 1
    assert res.output.startswith(f"Error: cannot connect to http://127.0.0.1:{port}: ") and res.output.count("\n") == 1
    res = run("--server", f"http://127.0.0.1:{port}", "--follow")
    assert res.exit_code == 1
    assert res.output.startswith(f"Error: cannot connect to http://127.0.0.1:{port}") and res.output.count("\n") == 1


def test_output_streams_as_it_arrives(tmp_path):
    """The first line is printed while the server still holds the rest of the response."""
    _, lines = flow_file(tmp_path)
    gate = threading.Event()
    with http_server([lines[0], lines[1]], gate=gate) as (_, url):
        proc = subprocess.Popen([sys.executable, "-m", "flowscope.observe", "--server", url, "-o", "jsonpb"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO),
                                env=dict(os.environ, PYTHONPATH=str(REPO)))
        try:
            first = proc.stdout.readline()
            assert first == lines[0] + "\n"
            assert proc.poll() is None  # still waiting for the rest
            gate.set()
            rest, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert rest == lines[1] + "\n" and proc.returncode == 0, err


# --------------------------------------------------------------------------------------------
# --follow against a real websocket server
# --------------------------------------------------------------------------------------------

@contextmanager
def ws_server(frames, close_code=1000, close_reason="", reject=None, hold=False):
    from websockets.sync.server import serve

    state = {"paths": [], "release": threading.Event()}

    def process_request(conn, request):
        if reject is not None:
            return conn.respond(reject[0], reject[1])
        return None

    def handler(ws):
        state["paths"].append(ws.request.path)
        for frame in frames:
            ws.send(frame)
        if hold:
            state["release"].wait(30)
        ws.close(close_code, close_reason)

    server = serve(handler, "127.0.0.1", 0, process_request=process_request)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield state, f"http://127.0.0.1:{server.socket.getsockname()[1]}"
    finally:
        state["release"].set()
        server.shutdown()
        t.join(5)


def test_follow_over_websocket(tmp_path):
    _, lines = flow_file(tmp_path)
    frames = ["[" + ",".join(lines[0:2]) + "]", "[]", "[" + lines[4] + "]"]
    with ws_server(frames) as (state, url):
        res = run("--server", url, "-f", "--to-port", "80", "--not", "--verdict", "ERROR", "-o", "json")
    assert res.exit_code == 0, res.output
    assert [json.loads(x) for x in res.stdout.splitlines()] == [json.loads(x) for x in (lines[0], lines[1], lines[4])]
    path = urlsplit(state["paths"][0])
    assert path.path == "/api/v1/flows/stream"
    assert query_from_params(parse_qsl(path.query, keep_blank_values=True)) == FlowQuery(
        whitelist=[FlowFilter(destination_port=["80"])], blacklist=[FlowFilter(verdict=["ERROR"])], follow=True)


def test_follow_either_side_flags_use_json_filters(tmp_path):
    with ws_server([]) as (state, url):
        res = run("--server", url + "/base", "-f", "--ip", "10.0.0.1", "--last", "5")
    assert res.exit_code == 0, res.output
    path = urlsplit(state["paths"][0])
    assert path.path == "/base/api/v1/flows/stream"
    assert query_from_params(parse_qsl(path.query)) == FlowQuery(
        whitelist=[FlowFilter(source_ip=["10.0.0.1"]), FlowFilter(destination_ip=["10.0.0.1"])], number=5, follow=True)


def test_follow_errors():
    with ws_server([], reject=(400, "unknown query parameter 'verdicts'")) as (_, url):
        res = run("--server", url, "-f")
    assert res.exit_code == 1 and res.output == "Error: server returned 400: unknown query parameter 'verdicts'\n"
    with ws_server(['{"error": "too slow, dropped"}']) as (_, url):
        res = run("--server", url, "-f")
    assert res.exit_code == 1 and res.output == "Error: server error: too slow, dropped\n"
    frame = json.dumps({"error": {"status": 400, "detail": "first and follow cannot be combined"}})
    with ws_server([frame], close_code=1008, close_reason="first and follow cannot be combined") as (_, url):
        res = run("--server", url, "-f")
    assert res.exit_code == 1 and res.output == "Error: server error: 400: first and follow cannot be combined\n"
    with ws_server([], close_code=1011, close_reason="store failed") as (_, url):
        res = run("--server", url, "-f")
    assert res.exit_code == 1 and res.output == "Error: the server closed the stream (1011 store failed)\n"


def test_follow_ctrl_c_exits_zero_quietly(tmp_path):
    _, lines = flow_file(tmp_path)
    with ws_server(["[" + lines[0] + "]"], hold=True) as (_, url):
        proc = subprocess.Popen([sys.executable, "-m", "flowscope.observe", "--server", url, "--follow"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO),
                                env=dict(os.environ, PYTHONPATH=str(REPO)))
        try:
            first = proc.stdout.readline()
            assert "shop/api-1:80" in first
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0
    assert err == "" and out == ""
