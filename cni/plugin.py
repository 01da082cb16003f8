"""``flowscope-cni``: the executable runtimes run. A thin client that starts fast.

It imports only os, sys and the C module ``_socket`` (not ``socket``, whose enum/selectors imports
cost ~4 ms, nor json): interpreter start-up is most of what the fast path costs.
When the node agent's CNI service answers on ``<state dir>/cni.sock`` it forwards the request
(environment + stdin) and relays the answer (stdout, stderr, exit status) — no netlink library to
load, the agent already has it. When nothing answers it runs the request itself (the standalone path,
importing pyroute2 on demand), so containers can be attached while the agent is down; only STATUS
then says "not available" (50).

``FLOWSCOPE_CNI_MODE=standalone`` skips the service (tests, benchmarks, debugging).

Wire format, one request per connection (the client shuts its write side after sending)::

    request:  b"FSCNI/1 <len env> <len stdin>\n" <env: NUL-separated KEY=VALUE> <stdin>
    response: b"FSCNI/1 <status> <len stdout> <len stderr>\n" <stdout> <stderr>
"""

from __future__ import annotations

import os
import sys

import _socket

SOCKET_NAME = "cni.sock"
DEFAULT_STATE_DIR = "/var/run/flowscope"
MAGIC = b"FSCNI/1"
CONNECT_TIMEOUT = 2.0
REPLY_TIMEOUT = 300.0
LOST = (-1, b"", b"")


def state_dir(env, stdin: bytes) -> str:
    """Config ``stateDir``, else $FLOWSCOPE_STATE_DIR, else /var/run/flowscope (as the service resolves it)."""
    if b'"stateDir"' in stdin:
        import json

        try:
            v = json.loads(stdin).get("stateDir")
            if isinstance(v, str) and v:
                return v
        except (ValueError, AttributeError, UnicodeDecodeError):
            pass
    return env.get("FLOWSCOPE_STATE_DIR") or DEFAULT_STATE_DIR


def encode_env(environb) -> bytes:
    return b"\0".join(k + b"=" + v for k, v in environb.items() if b"\0" not in k + v)


def decode_env(blob: bytes) -> dict[str, str]:
    out = {}
    for item in blob.split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep and k:
            out[k.decode(errors="surrogateescape")] = v.decode(errors="surrogateescape")
    return out


def encode_request(env_blob: bytes, stdin: bytes) -> bytes:
    return b"%s %d %d\n" % (MAGIC, len(env_blob), len(stdin)) + env_blob + stdin


def encode_response(status: int, stdout: bytes, stderr: bytes) -> bytes:
    return b"%s %d %d %d\n" % (MAGIC, status, len(stdout), len(stderr)) + stdout + stderr


def decode_response(data: bytes):
    """(status, stdout, stderr), or None when ``data`` is not one complete response."""
    head, sep, body = data.partition(b"\n")
    parts = head.split()
    if not sep or len(parts) != 4 or parts[0] != MAGIC:
        return None
    try:
        status, n_out, n_err = int(parts[1]), int(parts[2]), int(parts[3])
    except ValueError:
        return None
    if status < 0 or len(body) != n_out + n_err:
        return None
    return status, body[:n_out], body[n_out:]


def forward(path: str, environb, stdin: bytes):
    """(status, stdout, stderr) from the service; None if no service listens; LOST if it accepted the
    request but did not answer."""
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        s.settimeout(CONNECT_TIMEOUT)
        try:
            s.connect(path)
        except OSError:  # missing socket, refused, permission, timeout: no service
            return None
        s.settimeout(REPLY_TIMEOUT)
        try:
            s.sendall(encode_request(encode_env(environb), stdin))
            s.shutdown(_socket.SHUT_WR)
            chunks = []
            while True:
                b = s.recv(65536)
                if not b:
                    break
                chunks.append(b)
        except OSError:
            return LOST
        return decode_response(b"".join(chunks)) or LOST
    finally:
        s.close()


def standalone(env, stdin: bytes) -> dict:
    if sys.flags.no_site:  # the installed shim starts Python with -S; dependencies live in site-packages
        import site

        site.main()
    from cni.commands import execute

    r = execute(env, stdin, agent=False)
    return r.status, r.stdout, r.stderr


def error(code: int, msg: str, details: str, version: str = "1.1.0"):
    import json

    body = json.dumps({"cniVersion": version, "code": code, "msg": msg, "details": details})
    return 1, body.encode() + b"\n", f"flowscope-cni: {msg}: {details}\n".encode()


def run(env, environb, stdin: bytes):
    """(status, stdout bytes, stderr bytes) for one invocation."""
    cmd = env.get("CNI_COMMAND", "")
    if cmd == "VERSION":
        from cni.versions import CURRENT_VERSION, SUPPORTED_VERSIONS

        body = '{"cniVersion": "%s", "supportedVersions": [%s]}\n' % (
            CURRENT_VERSION, ", ".join(f'"{v}"' for v in SUPPORTED_VERSIONS))
        return 0, body.encode(), b""
    if env.get("FLOWSCOPE_CNI_MODE", "auto") != "standalone":
        path = os.path.join(state_dir(env, stdin), SOCKET_NAME)
        resp = forward(path, environb, stdin)
        if resp is LOST:
            if cmd in ("DEL", "GC"):  # idempotent: finish it here
                return standalone(env, stdin)
            return error(11, "lost the connection to the flowscope node agent",
                          f"{cmd} may be incomplete; the runtime should DEL and retry")
        if resp is not None:
            return resp
    return standalone(env, stdin)


def main() -> int:
    stdin = b""
    if sys.stdin is not None:
        try:
            stdin = sys.stdin.buffer.read()
        except (OSError, ValueError):
            stdin = b""
    try:
        status, out, err = run(os.environ, os.environb, stdin)
    except Exception as e:  # the client itself must never print a traceback instead of a CNI error
        status, out, err = error(199, "internal error", f"{type(e).__name__}: {e}")
    if err:
        sys.stderr.buffer.write(err)
        sys.stderr.flush()
    if out:
        sys.stdout.buffer.write(out)
        sys.stdout.flush()
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
