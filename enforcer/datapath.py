"""Load a :class:`~enforcer.compiler.CompiledPolicy` into the tc program's BPF maps, incrementally.

The maps are declared in ``probe/bpf/flow.c`` and loaded with the probe (one program per agent):

``policy_endpoints`` (hash)
    ``__u32 ifindex`` -> ``struct ep_info {__u32 identity; __u8 flags; __u8 pad[3]}``; ``flags`` are the
    compiler's ``FLAG_*`` (ingress/egress policy, audit-only policy, deny entries, global audit).
``policy_ipcache`` (LPM trie)
    ``struct ipc_key {__u32 prefixlen; __u8 family; __u8 pad[3]; __u32 addr[4]}`` -> ``__u32 identity``;
    ``prefixlen`` counts the family byte and its padding (32 bits) plus the address prefix.
``policy_map`` (LPM trie)
    ``struct policy_key`` (see ``enforcer/compiler.py``: endpoint, direction, deny, proto, peer, then the
    big-endian port whose high ``prefix_len`` bits are significant) -> ``struct policy_value
    {__u32 policy_id; __u8 audit; __u8 match_type; __u16 pad}``.

The policy-id table (names, namespaces, revisions) stays in user space: flows are named from it.

Writing is a diff by key against what was last written: only changed entries are touched, in an order
that never opens a gap (new policy entries and identities before the endpoint flags that make them
matter; flags cleared before the entries they needed are deleted). Batched syscalls
(``BPF_MAP_UPDATE_BATCH``/``DELETE_BATCH``) write thousands of entries in milliseconds. A policy set that
does not fit the maps is refused before anything is written, so a map is never half loaded.

:func:`kernel_state` and :func:`plan` are pure (no BPF) and unit-tested; :class:`PolicyMaps` does the
syscalls.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import logging
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from .compiler import CompiledPolicy

log = logging.getLogger("flowscope.enforcer.datapath")

MAP_ENDPOINTS = b"policy_endpoints"
MAP_IPCACHE = b"policy_ipcache"
MAP_POLICY = b"policy_map"
MAP_NAMES = (MAP_ENDPOINTS, MAP_IPCACHE, MAP_POLICY)

EP_KEY = struct.Struct("<I")                 # ifindex
EP_VAL = struct.Struct("<IB3x")              # identity, flags
IPC_KEY = struct.Struct("<IB3x16s")          # prefixlen, family, address (network order, zero padded)
IPC_VAL = struct.Struct("<I")                # identity
POLICY_KEY = struct.Struct("<IIBBBxI2s2x")   # prefixlen, endpoint, direction, deny, proto, peer, port (BE)
POLICY_VAL = struct.Struct("<IBBxx")         # policy id, audit, match type
POLICY_FIXED_BITS = 96
IPC_FIXED_BITS = 32
SIZES = {MAP_ENDPOINTS: (EP_KEY.size, EP_VAL.size), MAP_IPCACHE: (IPC_KEY.size, IPC_VAL.size),
         MAP_POLICY: (POLICY_KEY.size, POLICY_VAL.size)}


class PolicyMapError(RuntimeError):
    """The maps could not be written (the message says which map, how many entries and why)."""


# --------------------------------------------------------------------------------------------
# Pure: encoding and diffing
# --------------------------------------------------------------------------------------------


def encode_ipcache_key(prefix: str) -> bytes:
    net = ipaddress.ip_network(prefix, strict=False)
    return IPC_KEY.pack(IPC_FIXED_BITS + net.prefixlen, net.version, net.network_address.packed)


def encode_policy_key(endpoint: int, direction: int, deny: bool, peer: int, proto: int, port: int,
                      prefix_len: int) -> bytes:
    return POLICY_KEY.pack(POLICY_FIXED_BITS + prefix_len, endpoint, direction, 1 if deny else 0, proto, peer,
                           port.to_bytes(2, "big"))


def decode_policy_key(key: bytes) -> tuple[int, int, bool, int, int, int, int]:
    """``(endpoint, direction, deny, peer, proto, port, prefix_len)``, the compiler's ``PolicyEntry.key``."""
    plen, endpoint, direction, deny, proto, peer, port = POLICY_KEY.unpack(key)
    return endpoint, direction, bool(deny), peer, proto, int.from_bytes(port, "big"), plen - POLICY_FIXED_BITS


def decode_ipcache_key(key: bytes) -> str:
    plen, family, addr = IPC_KEY.unpack(key)
    cls = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    ip = cls(addr[:4] if family == 4 else addr)
    return f"{ip}/{plen - IPC_FIXED_BITS}"


@dataclass(frozen=True)
class KernelState:
    """The three maps as ``{key bytes: value bytes}``."""

    endpoints: dict[bytes, bytes] = field(default_factory=dict)
    ipcache: dict[bytes, bytes] = field(default_factory=dict)
    policy: dict[bytes, bytes] = field(default_factory=dict)

    def maps(self) -> dict[bytes, dict[bytes, bytes]]:
        return {MAP_ENDPOINTS: self.endpoints, MAP_IPCACHE: self.ipcache, MAP_POLICY: self.policy}

    def sizes(self) -> dict[str, int]:
        return {"endpoints": len(self.endpoints), "ipcache": len(self.ipcache), "policy": len(self.policy)}


def kernel_state(compiled: CompiledPolicy) -> KernelState:
    """What the maps must hold for ``compiled``. Endpoints without an ifindex (not attached on this node)
    get no endpoint entry; their identities' policy entries are still written (they cost nothing)."""
    endpoints: dict[bytes, bytes] = {}
    for ep in compiled.endpoints:
        if ep.ifindex <= 0:
            continue
        k = EP_KEY.pack(ep.ifindex)
        v = EP_VAL.pack(ep.identity, ep.flags & 0xFF)
        old = endpoints.get(k)
        if old is not None and old != v:
            log.warning("interface %d is claimed by two endpoints (%s); keeping the first", ep.ifindex, ep.name)
            continue
        endpoints[k] = v
    ipcache = {encode_ipcache_key(e.prefix): IPC_VAL.pack(e.identity) for e in compiled.ipcache}
    pk, pv = POLICY_KEY.pack, POLICY_VAL.pack
    policy = {
        pk(POLICY_FIXED_BITS + e.prefix_len, e.endpoint, e.direction, 1 if e.deny else 0, e.proto, e.peer,
           e.port.to_bytes(2, "big")): pv(e.policy_id, 1 if e.audit else 0, e.match_type)
        for e in compiled.entries
    }
    return KernelState(endpoints, ipcache, policy)


@dataclass
class MapDiff:
    upserts: dict[bytes, bytes] = field(default_factory=dict)
    deletes: list[bytes] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.upserts) + len(self.deletes)


@dataclass
class Plan:
    """What to write, per map. :meth:`steps` gives the hitless order."""

    diffs: dict[bytes, MapDiff]

    def steps(self) -> list[tuple[str, bytes, Any]]:
        d = self.diffs
        return [
            ("upsert", MAP_POLICY, d[MAP_POLICY].upserts),        # rules before anything can match them
            ("upsert", MAP_IPCACHE, d[MAP_IPCACHE].upserts),      # peers resolve to identities with rules
            ("upsert", MAP_ENDPOINTS, d[MAP_ENDPOINTS].upserts),  # flags switch enforcement on/over
            ("delete", MAP_ENDPOINTS, d[MAP_ENDPOINTS].deletes),  # endpoints gone
            ("delete", MAP_IPCACHE, d[MAP_IPCACHE].deletes),
            ("delete", MAP_POLICY, d[MAP_POLICY].deletes),        # rules nothing needs any more
        ]

    @property
    def empty(self) -> bool:
        return all(len(x) == 0 for x in self.diffs.values())

    def counts(self) -> dict[str, int]:
        out = {}
        labels = {MAP_ENDPOINTS: "endpoints", MAP_IPCACHE: "ipcache", MAP_POLICY: "policy"}
        for name, diff in self.diffs.items():
            label = labels[name]
            out[f"{label}_upserts"] = len(diff.upserts)
            out[f"{label}_deletes"] = len(diff.deletes)
        return out


def diff_map(old: dict[bytes, bytes], new: dict[bytes, bytes]) -> MapDiff:
    upserts = {k: v for k, v in new.items() if old.get(k) != v}
    deletes = [k for k in old if k not in new]
    return MapDiff(upserts, deletes)


def plan(old: KernelState, new: KernelState) -> Plan:
    om, nm = old.maps(), new.maps()
    return Plan({name: diff_map(om[name], nm[name]) for name in MAP_NAMES})


# --------------------------------------------------------------------------------------------
# I/O: the maps of a loaded program
# --------------------------------------------------------------------------------------------


@dataclass
class ApplyResult:
    revision: int
    seconds: float
    counts: dict[str, int]
    sizes: dict[str, int]

    @property
    def changed(self) -> int:
        return sum(self.counts.values())


def _lib():
    from bcc import libbcc  # Debian's python3-bpfcc

    return libbcc.lib


class PolicyMaps:
    """The enforcement maps of a loaded probe program, written incrementally.

    ``bpf`` is the bcc ``BPF`` object of ``probe/bpf/flow.c`` (``probe.datapath.Datapath.bpf``). The
    maps start empty when the program is loaded; :attr:`state` is what this object wrote since.
    Not thread-safe: one writer (the agent's policy sync) at a time.
    """

    def __init__(self, bpf: Any):
        self._lib = _lib()
        self._tables = {}
        for name in MAP_NAMES:
            try:
                table = bpf[name]
            except KeyError:
                raise PolicyMapError(f"the loaded program has no map {name.decode()} (an old flow.c?)") from None
            ksz, vsz = SIZES[name]
            if ct.sizeof(table.Key) != ksz or ct.sizeof(table.Leaf) != vsz:
                raise PolicyMapError(
                    f"map {name.decode()}: key/value sizes {ct.sizeof(table.Key)}/{ct.sizeof(table.Leaf)} in the "
                    f"kernel, {ksz}/{vsz} expected: flow.c and enforcer/datapath.py disagree")
            self._tables[name] = table
        self.capacity = {name: int(t.max_entries) for name, t in self._tables.items()}
        self.state = KernelState()
        self.revision = 0
        self.batch = True  # cleared if the kernel refuses batched updates for a map type

    @classmethod
    def from_datapath(cls, dp: Any) -> "PolicyMaps":
        return cls(dp.bpf)

    # -- writing ----------------------------------------------------------------------------

    def apply(self, compiled: CompiledPolicy) -> ApplyResult:
        """Make the maps hold ``compiled``, touching only what changed."""
        t0 = time.perf_counter()
        new = kernel_state(compiled)
        for name, entries in new.maps().items():
            if len(entries) > self.capacity[name]:
                raise PolicyMapError(f"map {name.decode()} holds at most {self.capacity[name]} entries; the policies "
                                     f"need {len(entries)} (nothing was changed)")
        p = plan(self.state, new)
        # On failure, self.state still says exactly what the kernel holds (kept by _upsert/_delete),
        # so the next apply() retries only what is missing.
        for op, name, data in p.steps():
            if op == "upsert":
                self._upsert(name, data)
            else:
                self._delete(name, data)
        self.revision = compiled.revision
        seconds = time.perf_counter() - t0
        return ApplyResult(compiled.revision, seconds, p.counts(), self.state.sizes())

    def clear(self) -> None:
        """Remove every entry this object wrote (no enforcement afterwards)."""
        p = plan(self.state, KernelState())
        for op, name, data in p.steps():
            if op == "delete":
                self._delete(name, data)
        self.revision = 0

    def _current(self, name: bytes) -> dict[bytes, bytes]:
        return self.state.maps()[name]

    def _upsert(self, name: bytes, items: dict[bytes, bytes]) -> None:
        if not items:
            return
        table = self._tables[name]
        ksz, vsz = SIZES[name]
        keys = b"".join(items)
        vals = b"".join(items.values())
        current = self._current(name)
        if self.batch:
            kb = ct.create_string_buffer(keys, len(keys))
            vb = ct.create_string_buffer(vals, len(vals))
            count = ct.c_uint32(len(items))
            rc = self._lib.bpf_update_batch(table.map_fd, kb, vb, ct.byref(count))
            if rc == 0:
                current.update(items)
                return
            err = ct.get_errno()
            done = min(count.value, len(items))
            for k in list(items)[:done]:  # the kernel reports how many it processed
                current[k] = items[k]
            if err not in (0, 22, 95, 524):  # EINVAL / EOPNOTSUPP / ENOTSUPP: fall back to one by one
                raise PolicyMapError(f"updating {name.decode()}: {os.strerror(err)} after {done} of {len(items)} entries")
            if done == 0:
                log.info("batched updates refused for %s (%s): writing entry by entry", name.decode(), os.strerror(err))
                self.batch = False
            items = {k: v for k, v in list(items.items())[done:]}
        fd = table.map_fd
        upd = self._lib.bpf_update_elem
        for k, v in items.items():
            if upd(fd, k, v, 0) != 0:
                err = ct.get_errno()
                raise PolicyMapError(f"updating {name.decode()}: {os.strerror(err)} ({len(current)} entries held)")
            current[k] = v

    def _delete(self, name: bytes, keys: list[bytes]) -> None:
        if not keys:
            return
        table = self._tables[name]
        current = self._current(name)
        if self.batch:
            blob = b"".join(keys)
            kb = ct.create_string_buffer(blob, len(blob))
            count = ct.c_uint32(len(keys))
            rc = self._lib.bpf_delete_batch(table.map_fd, kb, ct.byref(count))
            if rc == 0:
                for k in keys:
                    current.pop(k, None)
                return
            done = min(count.value, len(keys))
            for k in keys[:done]:
                current.pop(k, None)
            keys = keys[done:]
        fd = table.map_fd
        dele = self._lib.bpf_delete_elem
        for k in keys:
            if dele(fd, k) != 0 and ct.get_errno() != 2:  # ENOENT: already gone
                raise PolicyMapError(f"deleting from {name.decode()}: {os.strerror(ct.get_errno())}")
            current.pop(k, None)

    # -- reading (tests, debugging) ---------------------------------------------------------

    def read(self) -> KernelState:
        """The maps as the kernel holds them (a full dump; for tests and `policy status`)."""
        out = []
        for name in MAP_NAMES:
            table = self._tables[name]
            ksz, vsz = SIZES[name]
            entries = {}
            for k, v in table.items():
                entries[ct.string_at(ct.byref(k), ksz)] = ct.string_at(ct.byref(v), vsz)
            out.append(entries)
        return KernelState(*out)

    def lookup_policy(self, endpoint: int, direction: int, deny: bool, peer: int, proto: int,
                      port: int) -> Optional[tuple[int, bool, int]]:
        """The kernel's LPM answer for one full key: ``(policy id, audit, match type)`` or None."""
        key = ct.create_string_buffer(encode_policy_key(endpoint, direction, deny, peer, proto, port, 16),
                                      POLICY_KEY.size)
        val = ct.create_string_buffer(POLICY_VAL.size)
        if self._lib.bpf_lookup_elem(self._tables[MAP_POLICY].map_fd, key, val) != 0:
            return None
        pid, audit, mt = POLICY_VAL.unpack(val.raw)
        return pid, bool(audit), mt

    def lookup_identity(self, ip: str) -> Optional[int]:
        addr = ipaddress.ip_address(ip)
        key = ct.create_string_buffer(IPC_KEY.pack(IPC_FIXED_BITS + addr.max_prefixlen, addr.version, addr.packed),
                                      IPC_KEY.size)
        val = ct.create_string_buffer(IPC_VAL.size)
        if self._lib.bpf_lookup_elem(self._tables[MAP_IPCACHE].map_fd, key, val) != 0:
            return None
        return IPC_VAL.unpack(val.raw)[0]


def entries_of(state: KernelState) -> Iterable[tuple[tuple, tuple[int, bool, int]]]:
    """Decoded policy entries: ``(PolicyEntry.key, (policy id, audit, match type))``."""
    for k, v in state.policy.items():
        pid, audit, mt = POLICY_VAL.unpack(v)
        yield decode_policy_key(k), (pid, bool(audit), mt)
