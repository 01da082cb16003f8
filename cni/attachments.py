"""The plugin's own record of each attachment, per network, and the per-attachment lock.

``<state_dir>/cni/attachments/<network>/<key>.json`` is written *before* anything is allocated
(state ``adding``) and completed with the result (state ``ready``), so GC knows which network an
attachment belongs to and never frees resources of an ADD still in flight. Operations on one
(container, ifname) are serialized by a striped flock in ``<state_dir>/cni/locks/`` — a DEL racing an
ADD of the same attachment runs wholly before or wholly after it.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from flowscope.endpoints import attachment_key

LOCK_STRIPES = 64


@dataclass
class Attachment:
    network: str
    container_id: str
    ifname: str
    netns: str = ""
    host_ifname: str = ""
    ipam: str = ""            # "flowscope-ipam" or the delegated plugin's name
    state: str = "adding"     # adding | ready
    cni_version: str = ""
    result: dict = field(default_factory=dict)
    created_ns: int = 0


class AttachmentStore:
    def __init__(self, state_dir: Path | str):
        self.root = Path(state_dir) / "cni" / "attachments"

    def _path(self, network: str, container_id: str, ifname: str) -> Path:
        return self.root / network / f"{attachment_key(container_id, ifname)}.json"

    def put(self, att: Attachment) -> None:
        d = self.root / att.network
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(asdict(att), f, separators=(",", ":"))
            os.replace(tmp, self._path(att.network, att.container_id, att.ifname))
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def get(self, network: str, container_id: str, ifname: str) -> Optional[Attachment]:
        try:
            obj = json.loads(self._path(network, container_id, ifname).read_text())
            return Attachment(**obj)
        except (FileNotFoundError, ValueError, TypeError):
            return None

    def exists(self, network: str, container_id: str, ifname: str) -> bool:
        return self._path(network, container_id, ifname).exists()

    def delete(self, network: str, container_id: str, ifname: str) -> bool:
        try:
            self._path(network, container_id, ifname).unlink()
            return True
        except FileNotFoundError:
            return False

    def list(self, network: str) -> list[Attachment]:
        d = self.root / network
        try:
            names = sorted(os.listdir(d))
        except FileNotFoundError:
            return []
        out = []
        for n in names:
            if n.endswith(".json") and not n.startswith("."):
                try:
                    out.append(Attachment(**json.loads((d / n).read_text())))
                except (FileNotFoundError, ValueError, TypeError):
                    continue
        return out


@contextmanager
def attachment_lock(state_dir: Path | str, container_id: str, ifname: str) -> Iterator[None]:
    d = Path(state_dir) / "cni" / "locks"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    stripe = zlib.crc32(attachment_key(container_id, ifname).encode()) % LOCK_STRIPES
    fd = os.open(d / f"{stripe:02d}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
