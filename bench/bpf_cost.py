"""Per-run cost of the tc program, measured by the kernel itself (BPF_PROG_TEST_RUN).

    sudo .venv/bin/python -m bench.bpf_cost [--repeat 2000000]

The kernel runs the loaded program `repeat` times on a crafted packet and reports the mean time per
run, so the figure is the program's own cost, free of network-stack and scheduling noise. Scenarios:
an established TCP flow (the fast path every data packet takes) on each hook, and a new flow per run
(the slow path: flow entry creation and an event). An empty SCHED_CLS program measured the same way gives
what the test-run loop itself costs per run; ``measure()`` returns both and the difference.
"""

from __future__ import annotations

import argparse
import ctypes as ct
import os
import struct

BPF_PROG_TEST_RUN = 10
NR_BPF = 321  # x86_64


def _checksum(data: bytes) -> int:
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF


def tcp_packet(src: str, dst: str, sport: int, dport: int, flags: int = 0x10, payload: bytes = b"x" * 10) -> bytes:
    import socket

    eth = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00"
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, flags, 65535, 0, 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0, socket.inet_aton(src),
                     socket.inet_aton(dst))
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return eth + ip + tcp


def test_run(prog_fd: int, data: bytes, repeat: int) -> tuple[int, int]:
    """(return value, mean ns per run)."""
    libc = ct.CDLL(None, use_errno=True)
    buf = ct.create_string_buffer(data)
    out = ct.create_string_buffer(len(data) + 256)
    attr = ct.create_string_buffer(128)
    struct.pack_into("IIII", attr, 0, prog_fd, 0, len(data), len(out))
    struct.pack_into("QQ", attr, 16, ct.addressof(buf), ct.addressof(out))
    struct.pack_into("II", attr, 32, repeat, 0)
    r = libc.syscall(NR_BPF, BPF_PROG_TEST_RUN, attr, 80)
    if r != 0:
        raise OSError(ct.get_errno(), os.strerror(ct.get_errno()))
    retval, = struct.unpack_from("I", attr, 4)
    duration, = struct.unpack_from("I", attr, 36)
    return retval, duration


EMPTY_PROGRAM = b"int fs_bench_empty(struct __sk_buff *skb) { return 0; }"


def measure(repeat: int = 2_000_000, rounds: int = 5, new_flows: int = 200) -> dict:
    """Median ns per run of each hook on an established TCP packet, of one new flow (SYN, with its
    event), and of an empty SCHED_CLS program measured the same ways: its figure is what
    BPF_PROG_TEST_RUN itself costs per run, so ``program - empty`` is the program's own cost."""
    from bcc import BPF

    from probe.datapath import Datapath

    dp = Datapath()
    empty_bpf = BPF(text=EMPTY_PROGRAM)
    try:
        empty = empty_bpf.load_func(b"fs_bench_empty", BPF.SCHED_CLS)
        est = tcp_packet("10.9.0.1", "10.9.0.2", 40000, 80)
        test_run(dp.fn_ingress.fd, est, 1)  # create the flow entry
        out: dict = {"repeat": repeat, "rounds": rounds, "new_flows": new_flows, "runs": {}}
        for name, fd in (("ingress", dp.fn_ingress.fd), ("egress", dp.fn_egress.fd), ("empty", empty.fd)):
            test_run(fd, est, 1)
            out["runs"][f"established/{name}"] = sorted(test_run(fd, est, repeat)[1] for _ in range(rounds))
        # slow path: a new flow per run needs a new packet per run: one run each over distinct source ports
        for name, fd in (("ingress", dp.fn_ingress.fd), ("empty", empty.fd)):
            out["runs"][f"new/{name}"] = sorted(
                test_run(fd, tcp_packet("10.9.0.3", "10.9.0.2", port, 80, 0x02), 1)[1]
                for port in range(41000, 41000 + new_flows))
    finally:
        empty_bpf.cleanup()
        dp.close()
    med = {k: v[len(v) // 2] for k, v in out["runs"].items()}
    out["median_ns"] = med
    out["net_ns"] = {"established/ingress": med["established/ingress"] - med["established/empty"],
                     "established/egress": med["established/egress"] - med["established/empty"],
                     "new/ingress": med["new/ingress"] - med["new/empty"]}
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2_000_000)
    args = ap.parse_args()
    r = measure(args.repeat)
    for key, label in (("established/ingress", "established TCP, ingress hook"),
                       ("established/egress", "established TCP, egress hook"),
                       ("established/empty", "established TCP, empty program"),
                       ("new/ingress", "new TCP flow (SYN), ingress hook"), ("new/empty", "new flow, empty program")):
        costs = r["runs"][key]
        what = (f"{args.repeat:,} runs x 5" if key.startswith("established")
                else f"{r['new_flows']} flows, one run each" + ("; includes the ring-buffer event" if key == "new/ingress" else ""))
        print(f"{label:<34} median {costs[len(costs) // 2]:>5} ns/run  (min {costs[0]}, max {costs[-1]}, {what})")
    print("net of the empty program: " + ", ".join(f"{k} {v} ns" for k, v in r["net_ns"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
