"""TCP connection churn generator: connect, send a byte, read the reply, close; for N seconds.

Run inside a namespace: ``python -m bench.connrate client HOST PORT SECONDS`` prints connections/s;
``python -m bench.connrate server PORT`` answers each connection with one byte and closes.
"""

from __future__ import annotations

import socket
import sys
import time


def server(port: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(4096)
    while True:
        c, _ = s.accept()
        try:
            c.recv(1)
            c.sendall(b"k")
        except OSError:
            pass
        c.close()


def client(host: str, port: int, seconds: float) -> None:
    n = 0
    end = time.monotonic() + seconds
    start = time.monotonic()
    while time.monotonic() < end:
        c = socket.create_connection((host, port), timeout=2)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        c.sendall(b"x")
        c.recv(1)
        c.close()
        n += 1
    print(f"{n / (time.monotonic() - start):.1f} {n}")


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server(int(sys.argv[2]))
    else:
        client(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
