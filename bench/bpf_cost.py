"""Per-run cost of the tc program, measured by the kernel itself (BPF_PROG_TEST_RUN).

    sudo .venv/bin/python -m bench.bpf_cost [--repeat 2000000]

The kernel runs the loaded program `repeat` times on a crafted packet and reports the mean time per
run, so the figure is the program's own cost, free of network-stack and scheduling noise. Scenarios:
an established TCP flow (the fast path every data packet takes), the same with enforcement maps
loaded, and a new flow per run (the slow path: flow entry creation and an event).
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2_000_000)
    args = ap.parse_args()
    from probe.datapath import Datapath

    dp = Datapath()
    try:
        est = tcp_packet("10.9.0.1", "10.9.0.2", 40000, 80)
        test_run(dp.fn_ingress.fd, est, 1)  # create the flow entry
        rows = []
        for name, fn in (("ingress hook", dp.fn_ingress), ("egress hook", dp.fn_egress)):
            test_run(fn.fd, est, 1)
            costs = sorted(test_run(fn.fd, est, args.repeat)[1] for _ in range(5))
            rows.append((f"established TCP, {name}", costs))
        # slow path: a new flow each run would need a new packet per run; measure one creation
        # by averaging over distinct source ports.
        new_costs = []
        for port in range(41000, 41200):
            new_costs.append(test_run(dp.fn_ingress.fd, tcp_packet("10.9.0.3", "10.9.0.2", port, 80, 0x02), 1)[1])
        new_costs.sort()
        for name, costs in rows:
            print(f"{name:<34} median {costs[len(costs) // 2]:>5} ns/run  (min {costs[0]}, max {costs[-1]}, "
                  f"{args.repeat:,} runs x 5)")
        print(f"{'new TCP flow (SYN), ingress hook':<34} median {new_costs[len(new_costs) // 2]:>5} ns/run  "
              f"(min {new_costs[0]}, max {new_costs[-1]}, 200 flows; includes the ring-buffer event)")
    finally:
        dp.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
