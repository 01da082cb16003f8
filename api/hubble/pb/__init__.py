"""Python code for Flowscope's Hubble protos, generated with grpcio-tools at build time (never committed).

``make setup`` (``python -m api.hubble.pb``) generates it; so does the first import when the sources
changed since (a stamp holds the hash of the ``.proto`` files and the tool versions). Generation writes
a temporary directory and renames it into place under a file lock, so concurrent processes never see
half a package. When the package directory is read-only the code goes to
``$XDG_CACHE_HOME/flowscope/hubble-pb/<hash>`` instead.

The generated modules import each other relatively (protoc writes ``from flow import flow_pb2``; that
is rewritten), so they live inside this package and never shadow top-level names::

    from api.hubble.pb import flow_pb2, observer_pb2, observer_pb2_grpc, relay_pb2, extension_pb2
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

PROTO_ROOT = Path(__file__).resolve().parent.parent / "proto"
PROTO_FILES = ("flowscope/v1/flow_extension.proto", "relay/relay.proto", "flow/flow.proto",
               "observer/observer.proto")
_OWN_TOP = tuple(sorted({p.split("/", 1)[0] for p in PROTO_FILES}))
_BUILD_NAME = "_build"


class ProtoBuildError(RuntimeError):
    """The protos could not be compiled (grpcio-tools missing, or protoc reported an error)."""


def source_hash() -> str:
    """Hash of the proto sources, of this generator and of the generator/runtime versions."""
    h = hashlib.sha256(Path(__file__).read_bytes())  # the generator itself (import rewriting)
    for rel in PROTO_FILES:
        h.update(rel.encode() + b"\0" + (PROTO_ROOT / rel).read_bytes() + b"\0")
    try:
        from importlib.metadata import version

        for dist in ("grpcio-tools", "protobuf", "grpcio"):
            h.update(f"{dist}={version(dist)}".encode())
    except Exception:  # noqa: BLE001 - metadata missing: the source hash alone decides
        pass
    return h.hexdigest()[:16]


_IMPORT = re.compile(r"^from (%s)((?:\.\w+)*) import " % "|".join(map(re.escape, _OWN_TOP)), re.M)


def _relativise(text: str, depth: int) -> str:
    """``from flow import flow_pb2`` -> ``from ..flow import flow_pb2``, also for ``from flow.flow_pb2
    import *`` (what ``import public`` makes); ``depth`` = package depth of
    the module below the build root)."""
    dots = "." * (depth + 1)

    def sub(m: re.Match[str]) -> str:
        return f"from {dots}{m.group(1)}{m.group(2)} import "

    return _IMPORT.sub(sub, text)


def generate(out_dir: Path) -> None:
    """Compile every proto into ``out_dir`` (created) as a package tree with relative imports."""
    try:
        from grpc_tools import protoc
    except ImportError as e:  # pragma: no cover - dependency missing
        raise ProtoBuildError(f"grpcio-tools is not installed ({e}); run make setup") from None
    import grpc_tools

    include = Path(grpc_tools.__file__).resolve().parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}", *PROTO_FILES]
    rc = protoc.main(args)
    if rc != 0:
        raise ProtoBuildError(f"protoc failed with code {rc} compiling {', '.join(PROTO_FILES)} from {PROTO_ROOT}")
    for path in sorted(out_dir.rglob("*.py")):
        rel = path.relative_to(out_dir)
        depth = len(rel.parts) - 1
        text = path.read_text()
        new = _relativise(text, depth)
        if new != text:
            path.write_text(new)
    for d in [out_dir, *(p for p in out_dir.rglob("*") if p.is_dir())]:
        init = d / "__init__.py"
        if not init.exists():
            init.write_text("")


def _writable(d: Path) -> bool:
    return os.access(d, os.W_OK)


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flowscope" / "hubble-pb"


def ensure_built(force: bool = False) -> Path:
    """The directory with up-to-date generated code (built now when missing or stale)."""
    want = source_hash()
    here = Path(__file__).resolve().parent
    target = here / _BUILD_NAME if _writable(here) else _cache_root() / want
    stamp = target / ".stamp"
    if not force and stamp.exists() and stamp.read_text().strip() == want:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and stamp.exists() and stamp.read_text().strip() == want:
            return target  # another process built it while we waited
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            generate(tmp)
            (tmp / ".stamp").write_text(want + "\n")
            for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
                d.chmod(0o755)  # mkdtemp makes 0700; a server running as another user must read it
            old = None
            if target.exists():
                old = target.parent / f".{target.name}-old-{os.getpid()}"
                os.rename(target, old)
            os.rename(tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


_build_dir = ensure_built()
# The generated subpackages (flow, observer, relay, flowscope) live in the build directory; this
# directory stays on the path for __main__.
__path__ = [str(_build_dir), str(Path(__file__).resolve().parent)]

extension_pb2: Any = importlib.import_module(__name__ + ".flowscope.v1.flow_extension_pb2")
relay_pb2: Any = importlib.import_module(__name__ + ".relay.relay_pb2")
flow_pb2: Any = importlib.import_module(__name__ + ".flow.flow_pb2")
observer_pb2: Any = importlib.import_module(__name__ + ".observer.observer_pb2")
observer_pb2_grpc: Any = importlib.import_module(__name__ + ".observer.observer_pb2_grpc")

__all__ = ["flow_pb2", "observer_pb2", "observer_pb2_grpc", "relay_pb2", "extension_pb2", "ensure_built",
           "generate", "ProtoBuildError", "PROTO_ROOT"]


def main(argv: list[str] | None = None) -> int:
    """``python -m api.hubble.pb [--force]``: (re)generate the code and say where it is."""
    args = sys.argv[1:] if argv is None else argv
    path = ensure_built(force="--force" in args)
    print(f"Hubble protos compiled into {path}")
    return 0
