"""Security identities: a number per distinct label set, and the IP -> identity cache.

Numbering (as Cilium):

* reserved identities ``1`` host, ``2`` world, ``3`` unmanaged, ``4`` health, ``5`` init,
  ``6`` remote-node, ``7`` kube-apiserver, ``8`` ingress (``0`` is "unknown");
* workload identities from ``256`` up to ``65535`` (cluster scope, 16 bits);
* CIDR identities (label sets with a ``cidr:`` label) are node-local: ``1<<24`` + n, as Cilium's
  local identities.

:class:`IdentityAllocator` keeps the mapping in one JSON file, written atomically (temp file + fsync +
rename) under an exclusive ``flock`` on ``<file>.lock``, so several processes (CNI invocations, the
agent) agree on the numbers and a restart finds the same numbers again. A corrupt file is reported and
never overwritten. Lookups of known label sets need no I/O.

:class:`IPCache` answers "which identity has this address" by longest-prefix match, in pure Python;
the compiler emits the same prefixes for the kernel's LPM trie.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Optional

import orjson

from flowscope.endpoints import FIRST_USER_IDENTITY, IDENTITY_HOST, IDENTITY_WORLD, LABEL_SOURCE, NAMESPACE_LABEL

from .selector import CIDR_SOURCE, RESERVED_SOURCE, Label, format_labels, parse_labels

IDENTITY_UNKNOWN = 0
RESERVED_IDENTITIES: dict[int, tuple[str, ...]] = {
    1: ("reserved:host",),
    2: ("reserved:world",),
    3: ("reserved:unmanaged",),
    4: ("reserved:health",),
    5: ("reserved:init",),
    6: ("reserved:remote-node",),
    7: ("reserved:kube-apiserver",),
    8: ("reserved:ingress",),
}
_RESERVED_BY_LABELS = {v: k for k, v in RESERVED_IDENTITIES.items()}
MAX_USER_IDENTITY = 65535
LOCAL_IDENTITY_FLAG = 1 << 24
FIRST_LOCAL_IDENTITY = LOCAL_IDENTITY_FLAG + 1
MAX_LOCAL_IDENTITY = (1 << 25) - 1
FILE_VERSION = 1

LabelsLike = Iterable[str | Label] | Mapping[str, str]


class IdentityError(Exception):
    """Bad input to the allocator (e.g. reserved labels mixed with others)."""


class IdentityStoreError(IdentityError):
    """The identity file cannot be read or written; the message says which file and why."""


class IdentityExhaustedError(IdentityError):
    """No free number left in a scope."""


def is_reserved(identity: int) -> bool:
    return 0 < identity < FIRST_USER_IDENTITY


def is_local(identity: int) -> bool:
    """Node-local (CIDR) identity."""
    return identity >= LOCAL_IDENTITY_FLAG


def canonical_labels(labels: LabelsLike) -> tuple[str, ...]:
    """Sorted ``source:key=value`` strings; plain ``key=value`` get the ``k8s`` source."""
    if isinstance(labels, (str, bytes)):
        raise TypeError("labels must be a list or mapping, not a string")
    return format_labels(parse_labels(labels))


def endpoint_labels(namespace: str, labels: Mapping[str, str]) -> tuple[str, ...]:
    """An endpoint's identity labels: its pod labels under ``k8s:`` plus the namespace label (the same
    strings Hubble prints, see ``EndpointRecord.hubble_labels``)."""
    out = {f"{LABEL_SOURCE}:{k}={v}" for k, v in labels.items()}
    if namespace:
        out.add(f"{LABEL_SOURCE}:{NAMESPACE_LABEL}={namespace}")
    return canonical_labels(out)


def normalize_prefix(prefix: str) -> str:
    """``"10.1.2.3/8"`` -> ``"10.0.0.0/8"``; a bare address becomes a host prefix. Raises ValueError."""
    return str(ipaddress.ip_network(prefix, strict=False))


def cidr_label(prefix: str) -> str:
    """Cilium's label for a prefix; ``:`` in IPv6 prefixes becomes ``-`` (``cidr:2001-db8--/32``)."""
    return f"{CIDR_SOURCE}:{normalize_prefix(prefix).replace(':', '-')}"


def cidr_labels(prefix: str) -> tuple[str, ...]:
    """Labels of the CIDR identity of ``prefix``: its ``cidr:`` label and ``reserved:world``."""
    return canonical_labels([cidr_label(prefix), "reserved:world"])


def _scope(labels: tuple[str, ...]) -> str:
    """'reserved', 'local' (CIDR) or 'user'; raises IdentityError for impossible mixes."""
    if labels in _RESERVED_BY_LABELS:
        return "reserved"
    sources = {l.split(":", 1)[0] for l in labels}
    if CIDR_SOURCE in sources:
        if sources - {CIDR_SOURCE, RESERVED_SOURCE} or any(
                l.startswith("reserved:") and l != "reserved:world" for l in labels):
            raise IdentityError(f"CIDR labels cannot be mixed with other labels: {list(labels)}")
        return "local"
    if RESERVED_SOURCE in sources:
        raise IdentityError(f"reserved labels cannot be combined with other labels: {list(labels)}")
    if not labels:
        raise IdentityError("an identity needs at least one label")
    return "user"


class IdentityAllocator:
    """Numeric identities for label sets, persisted in ``path`` (JSON) and shared between processes.

    ``allocate`` returns the same number for the same label set (in any order, ``app=x`` and
    ``k8s:app=x`` being the same label) in this process, in other processes and after restarts.
    Numbers freed by :meth:`gc` are reused only after the counter wraps.
    """

    def __init__(self, path: str | os.PathLike, *, clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._clock = clock
        self._mutex = threading.RLock()
        self._by_labels: dict[tuple[str, ...], int] = {}
        self._by_id: dict[int, tuple[str, ...]] = {}
        self._last_used: dict[int, float] = {}
        self._next_user = FIRST_USER_IDENTITY
        self._next_local = FIRST_LOCAL_IDENTITY
        self._stamp: Optional[tuple[int, int, int]] = None
        with self._mutex:
            self._reload()

    # -- public API -------------------------------------------------------------------------

    def allocate(self, labels: LabelsLike) -> int:
        return self.allocate_many([labels])[0]

    def allocate_many(self, label_sets: Iterable[LabelsLike]) -> list[int]:
        """Identities for several label sets with at most one locked write."""
        wanted = [canonical_labels(ls) for ls in label_sets]
        out: list[Optional[int]] = []
        missing = False
        with self._mutex:
            for labels in wanted:
                ident = self._known(labels)
                out.append(ident)
                missing |= ident is None
            if not missing:
                return out  # type: ignore[return-value]
            with self._file_lock():
                self._reload()
                now = self._clock()
                dirty = False
                for i, labels in enumerate(wanted):
                    if out[i] is not None:
                        continue
                    ident = self._known(labels)
                    if ident is None:
                        ident = self._assign(labels, now)
                        dirty = True
                    out[i] = ident
                if dirty:
                    self._write()
        return out  # type: ignore[return-value]

    def allocate_cidr(self, prefix: str) -> int:
        """The node-local identity of a CIDR prefix."""
        return self.allocate(cidr_labels(prefix))

    def lookup(self, labels: LabelsLike) -> Optional[int]:
        """The identity of a label set if it has one (no allocation)."""
        with self._mutex:
            return self._known(canonical_labels(labels))

    def labels_for(self, identity: int) -> Optional[tuple[str, ...]]:
        if identity in RESERVED_IDENTITIES:
            return RESERVED_IDENTITIES[identity]
        with self._mutex:
            hit = self._by_id.get(identity)
            if hit is None and self._changed_on_disk():
                self._reload()
                hit = self._by_id.get(identity)
            return hit

    def identities(self) -> dict[int, tuple[str, ...]]:
        """All allocated (non-reserved) identities."""
        with self._mutex:
            return dict(self._by_id)

    def refresh(self) -> None:
        """Pick up allocations made by other processes."""
        with self._mutex:
            if self._changed_on_disk():
                self._reload()

    def gc(self, in_use: Iterable[int], max_idle_s: float) -> list[int]:
        """Forget identities not in ``in_use`` whose last use is older than ``max_idle_s`` seconds;
        identities in ``in_use`` are marked used now. Returns the removed identities."""
        keep = set(in_use)
        with self._mutex, self._file_lock():
            self._reload()
            now = self._clock()
            removed = []
            for ident in list(self._by_id):
                if ident in keep:
                    self._last_used[ident] = now
                elif now - self._last_used.get(ident, 0.0) > max_idle_s:
                    removed.append(ident)
                    labels = self._by_id.pop(ident)
                    self._by_labels.pop(labels, None)
                    self._last_used.pop(ident, None)
            self._write()
            return sorted(removed)

    # -- internals --------------------------------------------------------------------------

    def _known(self, labels: tuple[str, ...]) -> Optional[int]:
        if _scope(labels) == "reserved":
            return _RESERVED_BY_LABELS[labels]
        return self._by_labels.get(labels)

    def _assign(self, labels: tuple[str, ...], now: float) -> int:
        if _scope(labels) == "local":
            ident = self._next_free(self._next_local, FIRST_LOCAL_IDENTITY, MAX_LOCAL_IDENTITY, "CIDR")
            self._next_local = ident + 1
        else:
            ident = self._next_free(self._next_user, FIRST_USER_IDENTITY, MAX_USER_IDENTITY, "workload")
            self._next_user = ident + 1
        self._by_id[ident] = labels
        self._by_labels[labels] = ident
        self._last_used[ident] = now
        return ident

    def _next_free(self, start: int, lo: int, hi: int, what: str) -> int:
        cand = start if lo <= start <= hi else lo
        for _ in range(hi - lo + 1):
            if cand not in self._by_id:
                return cand
            cand = cand + 1 if cand < hi else lo
        raise IdentityExhaustedError(f"no free {what} identity left ({lo}-{hi})")

    @contextmanager
    def _file_lock(self) -> Iterator[None]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise IdentityStoreError(f"{self._lock_path}: cannot open lock file: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _file_stamp(self) -> Optional[tuple[int, int, int]]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _changed_on_disk(self) -> bool:
        return self._file_stamp() != self._stamp

    def _reload(self) -> None:
        stamp = self._file_stamp()
        if stamp is not None and stamp == self._stamp:
            return
        if stamp is None:
            data: dict = {}
        else:
            try:
                data = orjson.loads(self.path.read_bytes())
            except FileNotFoundError:
                data = {}
            except orjson.JSONDecodeError as e:
                raise IdentityStoreError(f"{self.path}: corrupt identity file ({e}); not touching it") from None
            except OSError as e:
                raise IdentityStoreError(f"{self.path}: cannot read identity file: {e.strerror}") from None
        by_id, by_labels, last_used = {}, {}, {}
        try:
            if data and data.get("version") != FILE_VERSION:
                raise ValueError(f"unsupported version {data.get('version')!r}")
            for rec in data.get("identities", []):
                ident, labels = int(rec["id"]), tuple(rec["labels"])
                if labels != canonical_labels(labels) or ident in by_id or labels in by_labels:
                    raise ValueError(f"inconsistent record for identity {ident}")
                by_id[ident], by_labels[labels] = labels, ident
                last_used[ident] = float(rec.get("last_used", 0.0))
            next_user = int(data.get("next_user", FIRST_USER_IDENTITY))
            next_local = int(data.get("next_local", FIRST_LOCAL_IDENTITY))
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise IdentityStoreError(f"{self.path}: corrupt identity file ({e}); not touching it") from None
        self._by_id, self._by_labels, self._last_used = by_id, by_labels, last_used
        self._next_user, self._next_local = next_user, next_local
        self._stamp = stamp

    def _write(self) -> None:
        data = {
            "version": FILE_VERSION,
            "next_user": self._next_user,
            "next_local": self._next_local,
            "identities": [
                {"id": i, "labels": list(self._by_id[i]), "last_used": self._last_used.get(i, 0.0)}
                for i in sorted(self._by_id)
            ],
        }
        blob = orjson.dumps(data, option=orjson.OPT_INDENT_2)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(blob)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
                raise
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            raise IdentityStoreError(f"{self.path}: cannot write identity file: {e.strerror}") from None
        self._stamp = self._file_stamp()


class IPCache:
    """IP address -> identity by longest-prefix match (IPv4 and IPv6); unknown addresses are
    ``default`` (world)."""

    def __init__(self, entries: Iterable[tuple[str, int]] | Mapping[str, int] = (), default: int = IDENTITY_WORLD):
        self.default = default
        self._tables: dict[int, dict[int, dict[int, int]]] = {4: {}, 6: {}}
        self._lens: dict[int, list[int]] = {4: [], 6: []}
        items = entries.items() if isinstance(entries, Mapping) else entries
        for prefix, ident in items:
            self.upsert(prefix, ident)

    @staticmethod
    def _net(prefix: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_network(prefix, strict=False)

    def upsert(self, prefix: str, identity: int) -> None:
        net = self._net(prefix)
        table = self._tables[net.version]
        if net.prefixlen not in table:
            table[net.prefixlen] = {}
            self._lens[net.version] = sorted(table, reverse=True)
        table[net.prefixlen][int(net.network_address)] = identity

    def delete(self, prefix: str) -> bool:
        net = self._net(prefix)
        table = self._tables[net.version]
        bucket = table.get(net.prefixlen)
        if not bucket or bucket.pop(int(net.network_address), None) is None:
            return False
        if not bucket:
            del table[net.prefixlen]
            self._lens[net.version] = sorted(table, reverse=True)
        return True

    def lookup_entry(self, ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[Optional[str], int]:
        """``(matching prefix or None, identity)``. Raises ValueError for a malformed address."""
        addr = ip if isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)) else ipaddress.ip_address(ip)
        value, bits = int(addr), addr.max_prefixlen
        table = self._tables[addr.version]
        for plen in self._lens[addr.version]:
            net = value & (((1 << plen) - 1) << (bits - plen)) if plen else 0
            hit = table[plen].get(net)
            if hit is not None:
                cls = ipaddress.IPv4Address if addr.version == 4 else ipaddress.IPv6Address
                return f"{cls(net)}/{plen}", hit
        return None, self.default

    def lookup(self, ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
        return self.lookup_entry(ip)[1]

    def entries(self) -> list[tuple[str, int]]:
        out = []
        for version, table in self._tables.items():
            cls = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
            for plen, bucket in table.items():
                for net, ident in bucket.items():
                    out.append((str(cls((net, plen))), ident))
        return sorted(out, key=lambda e: (":" in e[0], ipaddress.ip_network(e[0])))

    def __len__(self) -> int:
        return sum(len(b) for t in self._tables.values() for b in t.values())

    def __contains__(self, prefix: str) -> bool:
        net = self._net(prefix)
        return int(net.network_address) in self._tables[net.version].get(net.prefixlen, {})
