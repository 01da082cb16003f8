"""Traffic for the enforcement tests, run inside lab namespaces (``python tests/enforcer_traffic.py ...``).

``serve TCP_PORTS UDP_PORTS``
    Echo server on every address (IPv4 and IPv6): TCP connections echo what they receive until closed,
    UDP datagrams are answered with their content. Prints ``ready`` when listening.
``probe [--timeout S] TARGET...``
    Tries every target at once and prints one JSON object: ``{target: {"ok": bool, "sport": n}}``.
    Targets: ``tcp:IP:PORT`` (connect, send, read the echo), ``udp:IP:PORT`` (a datagram and its
    answer), ``icmp:IP`` (one echo request and its reply; IPv4 or IPv6).
``hold IP PORT``
    Opens one TCP connection and keeps it: each line on stdin (``ping``) sends a byte and prints ``ok``
    or ``fail`` after reading the echo; EOF closes.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import struct
import sys
import threading
import time


def _family(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _split(target: str) -> tuple[str, str, int]:
    proto, rest = target.split(":", 1)
    if proto == "icmp":
        return proto, rest, 0
    ip, port = rest.rsplit(":", 1)
    return proto, ip.strip("[]"), int(port)


def serve(tcp_ports: list[int], udp_ports: list[int]) -> None:
    sel = selectors.DefaultSelector()
    for port in tcp_ports:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", port))
        s.listen(512)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, "accept")
    for port in udp_ports:
        u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        u.bind(("::", port))
        u.setblocking(False)
        sel.register(u, selectors.EVENT_READ, "udp")
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            if key.data == "accept":
                try:
                    c, _ = sock.accept()
                except OSError:
                    continue
                c.setblocking(False)
                sel.register(c, selectors.EVENT_READ, "conn")
            elif key.data == "udp":
                try:
                    data, addr = sock.recvfrom(65535)
                    sock.sendto(data, addr)
                except OSError:
                    pass
            else:
                try:
                    data = sock.recv(65535)
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(sock)
                    sock.close()
                    continue
                try:
                    sock.sendall(data)
                except OSError:
                    pass


def _icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def _icmp(ip: str, timeout: float) -> dict:
    v6 = ":" in ip
    proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    s = socket.socket(_family(ip), socket.SOCK_RAW, proto)
    ident = int.from_bytes(os.urandom(2), "big") or 1
    req_type, rep_type = (128, 129) if v6 else (8, 0)
    hdr = struct.pack("!BBHHH", req_type, 0, 0, ident, 1)
    payload = b"flowscope"
    if not v6:
        hdr = struct.pack("!BBHHH", req_type, 0, _icmp_checksum(hdr + payload), ident, 1)
    s.settimeout(timeout)
    try:
        s.sendto(hdr + payload, (ip, 0))
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            s.settimeout(max(0.01, end - time.monotonic()))
            data, _ = s.recvfrom(2048)
            off = 0 if v6 else (data[0] & 0x0F) * 4
            t, _c, _ck, rid, _seq = struct.unpack("!BBHHH", data[off:off + 8])
            if t == rep_type and rid == ident:
                return {"ok": True, "id": ident}
    except OSError:
        pass
    finally:
        s.close()
    return {"ok": False, "id": ident}


def _tcp(ip: str, port: int, timeout: float) -> dict:
    s = socket.socket(_family(ip), socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.bind(("::" if ":" in ip else "0.0.0.0", 0))
    sport = s.getsockname()[1]
    try:
        s.connect((ip, port))
        s.sendall(b"x")
        ok = s.recv(1) == b"x"
    except OSError:
        ok = False
    finally:
        s.close()
    return {"ok": ok, "sport": sport}


def _udp(ip: str, port: int, timeout: float) -> dict:
    s = socket.socket(_family(ip), socket.SOCK_DGRAM)
    s.settimeout(timeout)
    s.bind(("::" if ":" in ip else "0.0.0.0", 0))
    sport = s.getsockname()[1]
    try:
        s.sendto(b"u", (ip, port))
        data, _ = s.recvfrom(64)
        ok = data == b"u"
    except OSError:
        ok = False
    finally:
        s.close()
    return {"ok": ok, "sport": sport}


def probe(targets: list[str], timeout: float) -> dict:
    results: dict[str, dict] = {}

    def one(t: str) -> None:
        proto, ip, port = _split(t)
        if proto == "tcp":
            results[t] = _tcp(ip, port, timeout)
        elif proto == "udp":
            results[t] = _udp(ip, port, timeout)
        elif proto == "icmp":
            results[t] = _icmp(ip, timeout)
        else:
            raise SystemExit(f"unknown target {t}")

    threads = [threading.Thread(target=one, args=(t,)) for t in targets]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return results


def hold(ip: str, port: int) -> None:
    s = socket.create_connection((ip, port), timeout=2)
    print(f"connected {s.getsockname()[1]}", flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            s.sendall(b"p")
            ok = s.recv(1) == b"p"
        except OSError:
            ok = False
        print("ok" if ok else "fail", flush=True)
    s.close()


def main(argv: list[str]) -> None:
    cmd = argv[0]
    if cmd == "serve":
        tcp = [int(p) for p in argv[1].split(",") if p]
        udp = [int(p) for p in argv[2].split(",") if p] if len(argv) > 2 else []
        serve(tcp, udp)
    elif cmd == "probe":
        timeout = 0.5
        rest = argv[1:]
        if rest and rest[0] == "--timeout":
            timeout, rest = float(rest[1]), rest[2:]
        print(json.dumps(probe(rest, timeout)))
    elif cmd == "hold":
        hold(argv[1], int(argv[2]))
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main(sys.argv[1:])
