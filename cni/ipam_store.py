"""The built-in IPAM's reservations on disk, in host-local's layout.

``<dataDir>/<network>/`` holds one file per reserved address (named by the address, content
``<container id>\\r\\n<ifname>``) created with ``O_CREAT|O_EXCL``, ``last_reserved_ip.<range set index>``
for round-robin, and ``lock``: every read-modify-write happens under an exclusive ``flock`` on it,
so concurrent plugin processes and service threads never hand out one address twice.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from cni.ipam_config import IPAddress

LINE_BREAK = "\r\n"
LAST_RESERVED = "last_reserved_ip."
LOCK_FILE = "lock"


def _parse_ip(name: str) -> Optional[IPAddress]:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


class IPStore:
    """Reservations of one network. Call the other methods only inside ``with store.locked():``."""

    def __init__(self, data_dir: Path | str, network: str):
        self.dir = Path(data_dir) / network
        self._held = False

    @contextmanager
    def locked(self) -> Iterator["IPStore"]:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._held = True
            try:
                yield self
            finally:
                self._held = False
        finally:
            os.close(fd)  # closing releases the flock

    def _check(self) -> None:
        if not self._held:
            raise RuntimeError("IPStore used without holding its lock")

    def reserve(self, ip: IPAddress, container_id: str, ifname: str, range_set: Optional[int]) -> bool:
        """Create the reservation file; False if the address is already reserved."""
        self._check()
        try:
            fd = os.open(self.dir / str(ip), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            return False
        try:
            os.write(fd, f"{container_id}{LINE_BREAK}{ifname}".encode())
        finally:
            os.close(fd)
        if range_set is not None:
            tmp = self.dir / f".{LAST_RESERVED}{range_set}.tmp"
            tmp.write_text(str(ip))
            os.replace(tmp, self.dir / f"{LAST_RESERVED}{range_set}")
        return True

    def last_reserved(self, range_set: int) -> Optional[IPAddress]:
        self._check()
        try:
            return _parse_ip((self.dir / f"{LAST_RESERVED}{range_set}").read_text().strip())
        except FileNotFoundError:
            return None

    def taken(self) -> set[IPAddress]:
        self._check()
        out = set()
        for name in os.listdir(self.dir):
            ip = _parse_ip(name)
            if ip is not None:
                out.add(ip)
        return out

    def all(self) -> list[tuple[IPAddress, str, str]]:
        """Every reservation: (address, container id, ifname)."""
        self._check()
        out = []
        for name in sorted(os.listdir(self.dir)):
            ip = _parse_ip(name)
            if ip is None:
                continue
            try:
                content = (self.dir / name).read_bytes().decode(errors="replace")
            except FileNotFoundError:
                continue
            cid, _, ifn = content.partition(LINE_BREAK)
            out.append((ip, cid.strip(), ifn.strip()))
        return out

    def owned_by(self, container_id: str, ifname: str) -> list[IPAddress]:
        return [ip for ip, cid, ifn in self.all() if cid == container_id and ifn == ifname]

    def release(self, ip: IPAddress) -> bool:
        self._check()
        try:
            os.unlink(self.dir / str(ip))
            return True
        except FileNotFoundError:
            return False

    def release_by_id(self, container_id: str, ifname: str) -> list[IPAddress]:
        released = []
        for ip in self.owned_by(container_id, ifname):
            if self.release(ip):
                released.append(ip)
        return released
