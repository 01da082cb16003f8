"""L7 capture overhead: HTTP/1.1 load throughput with L7 capture on vs off, interleaved, same run.

    sudo .venv/bin/python -m bench.l7_overhead [--reps 5] [--seconds 3] [--connections 16]

A client and a server namespace (flowscope.netlab); nginx serves a small keep-alive response on port 80;
the load is wrk (Debian) or, without it, a Python keep-alive client. "on": the L7 capture (socket filter
+ packet rings + parsers + flow building, as in the agent) observes both host-side veths, drained every
50 ms by a background thread; "off": no capture attached. Printed: requests/s of each, the throughput
ratio (goal >= 0.90), L7 requests parsed per second (both observation points count), kernel ring
drops and user-space losses.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import interleave, machine_facts, print_table, summary, write_json
from flowscope.netlab import Lab

NGINX = """
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {tmp}/b; proxy_temp_path {tmp}/p; fastcgi_temp_path {tmp}/f;
    uwsgi_temp_path {tmp}/u; scgi_temp_path {tmp}/s;
    server {{ listen {ip}:80; location / {{ return 200 "hello flowscope\\n"; }} }}
}}
"""

PY_LOAD = """
import http.client, sys, threading, time
host, seconds, conns = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
counts = [0] * conns
def run(i):
    c = http.client.HTTPConnection(host, 80)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        c.request("GET", "/")
        c.getresponse().read()
        counts[i] += 1
ts = [threading.Thread(target=run, args=(i,)) for i in range(conns)]
[t.start() for t in ts]; [t.join() for t in ts]
print(sum(counts) / seconds)
"""


class Drainer:
    """The agent's L7 loop: poll the capture every 50 ms in a background thread."""

    def __init__(self, cap):
        self.cap = cap
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.flows = 0

    def _loop(self):
        while not self.stop.is_set():
            self.flows += len(self.cap.poll())
            self.stop.wait(0.05)
        self.flows += len(self.cap.poll())

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def load(client, ip: str, seconds: float, conns: int) -> float:
    wrk = shutil.which("wrk")
    if wrk:
        out = client.exec([wrk, "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", f"http://{ip}/"], timeout=seconds + 30).stdout
        m = re.search(r"Requests/sec:\s+([\d.]+)", out)
        if not m:
            raise RuntimeError(f"unexpected wrk output: {out}")
        return float(m.group(1))
    return float(client.exec([sys.executable, "-c", PY_LOAD, ip, str(seconds), str(conns)],
                             timeout=seconds + 30).stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--observe", choices=("both", "server"), default="both",
                    help="capture on both host veths (two observation points) or only the server's")
    args = ap.parse_args()
    from probe.l7capture import L7Capture, L7CaptureConfig

    tmp = Path(tempfile.mkdtemp(prefix="flowscope-l7bench-"))
    results: dict = {"machine": machine_facts(), "load": "wrk" if shutil.which("wrk") else "python",
                     "seconds": args.seconds, "connections": args.connections, "observe": args.observe}
    with Lab() as lab:
        client, server = lab.add("client"), lab.add("server")
        (tmp / "nginx.conf").write_text(NGINX.format(tmp=tmp, ip=server.ipv4))
        lab.spawn(server, ["nginx", "-c", str(tmp / "nginx.conf"), "-e", str(tmp / "error.log")])
        time.sleep(0.5)
        cap = L7Capture(L7CaptureConfig(), node_name="bench")
        observed = (client, server) if args.observe == "both" else (server,)
        parsed: list[float] = []
        lost: list[int] = []

        def off() -> float:
            return load(client, server.ipv4, args.seconds, args.connections)

        def on() -> float:
            for ep in observed:
                cap.attach(ep.ifindex, ep.host_if)
            before = cap.counters()
            t0 = time.monotonic()
            try:
                with Drainer(cap):
                    rps = load(client, server.ipv4, args.seconds, args.connections)
            finally:
                after = cap.counters()
                elapsed = time.monotonic() - t0
                for ep in observed:
                    cap.detach(ep.ifindex)
            parsed.append((after.get("requests", 0) - before.get("requests", 0)) / elapsed)
            lost.append(sum(cap.lost().values()))
            return rps

        load(client, server.ipv4, 1, args.connections)  # warm up
        runs = interleave(args.reps, {"off": off, "on": on})
        counters = cap.counters()
        cap.close()
    s_off, s_on = summary(runs["off"]), summary(runs["on"])
    print_table("HTTP/1.1 keep-alive load through two veths (requests/s)",
                [("L7 capture off", s_off, "req/s"), ("L7 capture on", s_on, "req/s")], baseline=s_off)
    ratio = s_on["median"] / s_off["median"] if s_off["median"] else 0.0
    pr = summary(parsed)
    print(f"\n  throughput ratio on/off: {ratio:.3f} (goal >= 0.90)")
    n_obs = 2 if args.observe == "both" else 1
    print(f"  L7 requests parsed: median {pr['median']:,.0f}/s ({n_obs} observation point(s); "
          f"{pr['median'] / n_obs:,.0f} distinct req/s)")
    print(f"  kernel ring drops: {counters.get('ring_drops', 0)}, lost events reported: {sum(lost)}, "
          f"user-space connections untracked/evicted: {counters.get('connections_untracked', 0)}"
          f"/{counters.get('connections_evicted_memory', 0)}")
    results.update({"off": runs["off"], "on": runs["on"], "ratio": ratio, "parsed_per_s": parsed, "lost": lost,
                    "counters": {k: v for k, v in counters.items() if v}})
    print("results:", write_json("l7_overhead", results))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
