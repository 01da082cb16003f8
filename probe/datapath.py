"""The kernel side of the probe: load the tc program once (bcc), attach it to interfaces (pyroute2),
read its ring buffer, counters and flow map, and detach cleanly.

The program is compiled once per agent (1-2 s of clang) and the same two fds are attached to every
interface. Filters are installed with a fixed priority and the program names ``fs_ingress`` /
``fs_egress``, so a restarted agent can find and replace filters a killed one left behind.
"""

from __future__ import annotations

import ctypes as ct
import errno
import logging
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from probe import events as ev

log = logging.getLogger("flowscope.datapath")

BPF_SOURCE = Path(__file__).with_name("bpf") / "flow.c"
PARENT_INGRESS = "ffff:fff2"
PARENT_EGRESS = "ffff:fff3"
FILTER_PRIO = 0xC0DE & 0x7FFF  # our own priority on each hook; nothing else of ours uses it
PROG_NAMES = ("fs_ingress", "fs_egress")


class DatapathError(RuntimeError):
    pass


def parse_tcp_flag_mask(text: str) -> int:
    """``all`` or a comma list of TCP flag names (``syn,fin,rst``) -> bit mask (NS = bit 8)."""
    from flowscope.schema import TCP_FLAG_BITS

    text = text.strip().lower()
    if text in ("all", ""):
        return 0x1FF
    mask = 0
    for name in text.split(","):
        bit = TCP_FLAG_BITS.get(name.strip().upper())
        if bit is None:
            raise ValueError(f"unknown TCP flag {name.strip()!r} (use all or a list of: "
                             f"{', '.join(n.lower() for n in TCP_FLAG_BITS)})")
        mask |= bit
    return mask


def ensure_kernel_fs() -> None:
    """Mount bpffs and tracefs if absent (idempotent)."""
    for target, fstype in (("/sys/fs/bpf", "bpf"), ("/sys/kernel/tracing", "tracefs")):
        if os.path.ismount(target) or not os.path.isdir(target):
            continue
        subprocess.run(["mount", "-t", fstype, fstype, target], capture_output=True)


def _import_bcc():
    try:
        from bcc import BPF  # Debian's python3-bpfcc
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise DatapathError(
            "bcc is not importable: run `make setup` (installs python3-bpfcc and makes .venv with "
            "--system-site-packages)") from e
    return BPF


@dataclass
class Attachment:
    ifindex: int
    ifname: str
    created_clsact: bool


class Datapath:
    """The loaded tc program and its maps."""

    def __init__(self, update_interval_s: float = 5.0, flow_entries: int = 65536,
                 ringbuf_pages: int = 1024, report_flags: int = 0x1FF):
        if os.geteuid() != 0:
            raise DatapathError("loading BPF programs needs root (CAP_BPF and CAP_NET_ADMIN)")
        ensure_kernel_fs()
        BPF = _import_bcc()
        self._BPF = BPF
        cflags = [
            f"-DUPDATE_NS={int(update_interval_s * 1e9)}ULL",
            f"-DFLOW_ENTRIES={int(flow_entries)}",
            f"-DRINGBUF_PAGES={int(ringbuf_pages)}",
            f"-DREPORT_FLAGS={int(report_flags) & 0x1FF:#x}",
            "-Wno-unused-label",
        ]
        try:
            self.bpf = BPF(src_file=str(BPF_SOURCE).encode(), cflags=cflags)
        except Exception as e:
            raise DatapathError(f"compiling {BPF_SOURCE.name} failed: {e}. Kernel headers are expected at "
                                f"/lib/modules/{os.uname().release}/build (run `make setup`).") from e
        self.fn_ingress = self.bpf.load_func(b"fs_ingress", BPF.SCHED_CLS)
        self.fn_egress = self.bpf.load_func(b"fs_egress", BPF.SCHED_CLS)
        self.flows = self.bpf[b"flows"]
        self.stats = self.bpf[b"stats"]
        self.attached: dict[int, Attachment] = {}
        from pyroute2 import IPRoute

        self.ipr = IPRoute()
        self._ring_open = False
        self._ring = None  # probe.ringbuf.RingReader once open_events ran
        self._on_event: Callable[[bytes], None] = lambda _raw: None

    # ---------------------------------------------------------------- attach / detach

    def attach(self, ifindex: int, ifname: str = "") -> None:
        if ifindex in self.attached:
            return
        created = False
        try:
            self.ipr.tc("add", "clsact", ifindex)
            created = True
        except Exception as e:  # NetlinkError EEXIST: a clsact is already there (ours or another tool's)
            if getattr(e, "code", None) != errno.EEXIST:
                raise DatapathError(f"adding clsact to {ifname or ifindex}: {e}") from e
        if self._remove_our_filters(ifindex) and not created and not self._other_filters(ifindex):
            # A killed agent's clsact that held only its filters: adopt it, so that it goes on detach
            # and the interface ends as it was before the first agent (issue 8: restart leaves nothing).
            created = True
        try:
            for fn, parent in ((self.fn_ingress, PARENT_INGRESS), (self.fn_egress, PARENT_EGRESS)):
                self.ipr.tc("add-filter", "bpf", ifindex, ":1", fd=fn.fd, name=fn.name.decode(),
                            parent=parent, classid=1, direct_action=True, prio=FILTER_PRIO)
        except Exception as e:
            self._restore(ifindex, created)
            raise DatapathError(f"attaching the probe to {ifname or ifindex}: {e}") from e
        self.attached[ifindex] = Attachment(ifindex, ifname, created)
        log.info("probe attached to %s (ifindex %d)", ifname or "?", ifindex)

    def detach(self, ifindex: int) -> None:
        att = self.attached.pop(ifindex, None)
        if att is None:
            return
        self._restore(ifindex, att.created_clsact)
        log.info("probe detached from %s (ifindex %d)", att.ifname or "?", ifindex)

    def _restore(self, ifindex: int, created_clsact: bool) -> None:
        """Leave the interface as we found it: drop the clsact we created, or only our filters."""
        try:
            if created_clsact:
                self.ipr.tc("del", "clsact", ifindex)
            else:
                self._remove_our_filters(ifindex)
        except Exception as e:  # interface already gone: nothing to restore
            if getattr(e, "code", None) not in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
                log.warning("restoring ifindex %d: %s", ifindex, e)

    def _remove_our_filters(self, ifindex: int) -> bool:
        """Remove our filters from the interface; whether there were any."""
        removed = False
        for parent in (PARENT_INGRESS, PARENT_EGRESS):
            try:
                self.ipr.tc("del-filter", "bpf", ifindex, ":1", parent=parent, prio=FILTER_PRIO)
                removed = True
            except Exception:
                pass  # none of ours there
        return removed

    def _other_filters(self, ifindex: int) -> bool:
        """Whether the clsact hooks carry filters that are not ours (unknown: assume yes)."""
        try:
            return any(self.ipr.get_filters(ifindex, parent=p) for p in (0xFFFFFFF2, 0xFFFFFFF3))
        except Exception:
            return True

    def detach_all(self) -> None:
        for ifindex in list(self.attached):
            self.detach(ifindex)

    # ---------------------------------------------------------------- events and counters

    def open_events(self, on_event: Callable[[bytes], None]) -> None:
        """Hand every event to ``on_event`` on each :meth:`poll`. The ring is read through its memory
        mapping (:class:`probe.ringbuf.RingReader`: no callback from C per event); bcc's reader is the
        fallback where the mapping is refused."""
        self._on_event = on_event
        table = self.bpf[b"events"]
        try:
            from probe.ringbuf import RingReader

            self._ring = RingReader(table.map_fd, table.max_entries)
        except (OSError, ValueError) as e:
            log.warning("reading the ring buffer through bcc's callback (%s)", e)

            def _cb(_ctx, data, size):
                on_event(ct.string_at(data, size))
                return 0

            self._cb = _cb  # keep a reference: bcc holds only a C pointer
            table.open_ring_buffer(_cb)
        self._ring_open = True

    def poll(self, timeout_ms: int) -> None:
        """Sleep timeout_ms, then drain everything waiting. The kernel never wakes us (no per-event
        wakeup cost on the packet path), so this timer is the drain cadence."""
        ring = self._ring
        if ring is None:
            self.bpf.ring_buffer_poll(timeout_ms)
            self.bpf.ring_buffer_consume()
            return
        if timeout_ms > 0:
            time.sleep(timeout_ms / 1000)
        on_event = self._on_event
        for raw in ring.read():
            on_event(raw)

    def read_stats(self) -> list[list[int]]:
        """Per-CPU counters: result[stat_index][cpu]."""
        out = []
        for i in range(ev.STAT_MAX):
            vals = self.stats[ct.c_int(i)]
            out.append([int(v) for v in vals])
        return out

    # ---------------------------------------------------------------- the flow map

    def snapshot_flows(self) -> list[tuple[bytes, bytes]]:
        """All (key, value) entries as raw bytes, read with batched lookups (BPF_MAP_LOOKUP_BATCH into
        one buffer, sliced once: no ctypes object per entry)."""
        try:
            return self._lookup_batch()
        except OSError as e:  # older kernels: fall back to key-by-key
            log.debug("batched flow-map read failed (%s); reading key by key", e)
            return [(bytes(k), bytes(v)) for k, v in self.flows.items()]

    def _lookup_batch(self) -> list[tuple[bytes, bytes]]:
        from bcc.libbcc import lib

        ks, vs, cap = ev.KEY.size, ev.VAL.size, self.flows.max_entries
        keys = ct.create_string_buffer(cap * ks)
        vals = ct.create_string_buffer(cap * vs)
        batch, cnt = ct.c_uint32(0), ct.c_uint32(0)
        total = 0
        while total < cap:
            cnt.value = cap - total
            res = lib.bpf_lookup_batch(self.flows.map_fd, ct.byref(batch) if total else None, ct.byref(batch),
                                       ct.byref(keys, total * ks), ct.byref(vals, total * vs), ct.byref(cnt))
            err = ct.get_errno()
            total += cnt.value
            if res != 0:
                if err == errno.ENOENT:  # the whole map has been read
                    break
                raise OSError(err, f"BPF_MAP_LOOKUP_BATCH: {os.strerror(err)}")
            if cnt.value == 0:
                break
        kb, vb = keys.raw, vals.raw
        return [(kb[i * ks:(i + 1) * ks], vb[i * vs:(i + 1) * vs]) for i in range(total)]

    def delete_flows(self, keys: Iterable[bytes]) -> int:
        """Delete these entries (BPF_MAP_DELETE_BATCH); a key that is already gone (the LRU map evicted it)
        is skipped, not a reason to fall back to key-by-key deletion. Returns how many were deleted."""
        from bcc.libbcc import lib

        keys = list(keys)
        n, ks = len(keys), ev.KEY.size
        if not n:
            return 0
        buf = ct.create_string_buffer(b"".join(keys), n * ks)
        fd = self.flows.map_fd
        done = deleted = 0
        cnt = ct.c_uint32(0)
        while done < n:
            cnt.value = n - done
            res = lib.bpf_delete_batch(fd, ct.byref(buf, done * ks), ct.byref(cnt))
            err = ct.get_errno()
            deleted += cnt.value
            done += cnt.value
            if res == 0:
                break
            if err == errno.ENOENT:
                done += 1  # this key was gone already
                continue
            for k in keys[done:]:  # an older kernel without batch ops
                try:
                    del self.flows[self.flows.Key.from_buffer_copy(k)]
                    deleted += 1
                except KeyError:
                    pass
            break
        return deleted

    def close(self) -> None:
        self.detach_all()
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        try:
            self.ipr.close()
        except Exception:
            pass
        try:
            self.bpf.cleanup()
        except Exception:
            pass


def find_stale_attachments(ipr=None) -> list[int]:
    """ifindexes that carry a filter named like ours (left by an agent that was killed)."""
    from pyroute2 import IPRoute

    own = ipr is None
    ipr = ipr or IPRoute()
    found = []
    try:
        for link in ipr.get_links():
            idx = link["index"]
            for parent in (0xFFFFFFF2, 0xFFFFFFF3):
                try:
                    filters = ipr.get_filters(idx, parent=parent)
                except Exception:
                    continue
                for f in filters:
                    opts = f.get_attr("TCA_OPTIONS")
                    name = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
                    if name and any(str(name).startswith(p) for p in PROG_NAMES):
                        found.append(idx)
                        break
                if found and found[-1] == idx:
                    break
    finally:
        if own:
            ipr.close()
    return found


def remove_stale_attachments() -> list[int]:
    """Remove our filters from every interface (used at agent start and by `flowscope agent --cleanup`)."""
    from pyroute2 import IPRoute

    removed = []
    with IPRoute() as ipr:
        for idx in find_stale_attachments(ipr):
            for parent in (PARENT_INGRESS, PARENT_EGRESS):
                try:
                    ipr.tc("del-filter", "bpf", idx, ":1", parent=parent, prio=FILTER_PRIO)
                except Exception:
                    pass
            removed.append(idx)
    return removed


def interface_names() -> dict[int, str]:
    """ifindex -> name of this network namespace's interfaces. libc's if_nameindex (one netlink dump in
    C, ~25 us) rather than pyroute2 (~4 ms): the agent asks every second."""
    return dict(socket.if_nameindex())


def host_addresses(ipr=None) -> list[str]:
    from pyroute2 import IPRoute

    own = ipr is None
    ipr = ipr or IPRoute()
    try:
        return [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr() if a.get_attr("IFA_ADDRESS")]
    finally:
        if own:
            ipr.close()


def match_interfaces(patterns: Iterable[str], names: dict[int, str]) -> dict[int, str]:
    """Interfaces whose name matches any glob pattern."""
    import fnmatch

    pats = list(patterns)
    return {i: n for i, n in names.items() if any(fnmatch.fnmatchcase(n, p) for p in pats)}
