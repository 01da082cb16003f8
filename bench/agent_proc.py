"""The real node agent in its own process, with an exit report for the benchmarks' loss audit.

    python -m bench.agent_proc --server URL --interface IF [--interface IF ...] [--state-dir D]
                               [--no-l7] [--no-policy] [--endpoints] [--spool-dir D] [--node-name N]

It runs exactly what ``flowscope agent`` runs (``probe.agent.build_agent`` with the CLI's defaults: L7
capture, policy sync, the shipper), so its CPU, read from /proc by the benchmark, is the agent's. On
SIGTERM it reads the kernel's event counters (before the datapath is closed), lets the agent drain,
ship and detach as usual, then prints one JSON line: the kernel's accepted events and failures, the
agent's received events and flows, the shipper's shipped flows and losses — the numbers of
"kernel submitted = agent received + reported lost" and "server stored = agent shipped".
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", required=True)
    ap.add_argument("--interface", action="append", default=[])
    ap.add_argument("--endpoints", action="store_true", help="follow the endpoint registry (--state-dir)")
    ap.add_argument("--state-dir", default=None)
    ap.add_argument("--node-name", default="bench-node")
    ap.add_argument("--no-l7", action="store_true")
    ap.add_argument("--no-policy", action="store_true")
    ap.add_argument("--spool-dir", default="")
    ap.add_argument("--log-level", default="warning")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from probe import events as ev
    from probe.agent import AgentConfig, build_agent

    cfg = AgentConfig(server=args.server, interfaces=list(args.interface), follow_endpoints=args.endpoints,
                      state_dir=args.state_dir, node_name=args.node_name, l7=not args.no_l7,
                      policy=not args.no_policy, cni_service=False, spool_dir=args.spool_dir)
    agent = build_agent(cfg)
    kernel: dict = {}

    def on_term(*_a) -> None:
        dp = agent.dp
        if dp is not None and not kernel:
            st = dp.read_stats()
            kernel.update(accepted=sum(st[ev.STAT_EVENTS]), ringbuf_fail=sum(st[ev.STAT_RINGBUF_FAIL]),
                          map_fail=sum(st[ev.STAT_MAP_FAIL]), policy_drops=sum(st[ev.STAT_POLICY_DROP]),
                          shed=sum(st[ev.STAT_SHED]))
        agent.stop()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    agent.start()
    ready = {"ready": True, "attached": sorted(a.ifname for a in agent.dp.attached.values()),
             "prog_ids": _prog_ids([agent.dp.fn_ingress.fd, agent.dp.fn_egress.fd])}
    print(json.dumps(ready), flush=True)
    agent.run()  # until SIGTERM; drains, ships, detaches
    s, sh = agent.stats, agent.shipper.stats
    report = {"kernel": kernel, "agent": {"events": s.events, "flows": s.flows, "expired": s.expired,
                                          "expired_quiet": s.expired_quiet,
                                          "kernel_lost": s.kernel_lost, "map_insert_failures": s.map_insert_failures},
              "shipper": {"queued": sh.queued, "shipped": sh.shipped, "batches": sh.batches, "failures": sh.failures,
                          "lost_queue_full": sh.lost_queue_full, "lost_by_source": dict(sh.lost_by_source),
                          "rejected": sh.rejected, "duplicates": sh.duplicates, "spooled_batches": sh.spooled_batches,
                          "shed": sh.shed},
              "threads": threading.active_count()}
    print(json.dumps(report), flush=True)
    return 0


def _prog_ids(fds: list[int]) -> list[int]:
    out = []
    for fd in fds:
        try:
            for line in open(f"/proc/self/fdinfo/{fd}"):
                if line.startswith("prog_id:"):
                    out.append(int(line.split()[1]))
        except OSError:
            pass
    return out


if __name__ == "__main__":
    sys.exit(main())
