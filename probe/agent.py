"""The node agent: attach the probe, turn kernel events into enriched flows, ship them.

One loop, three cadences:
  * every ``drain_ms`` (50 ms): drain the ring buffer, build flows, hand them to the shipper;
  * every second: follow interfaces (globs) and registered endpoints, attach/detach, read the
    kernel's loss counters and report increases as LostEvents;
  * every ``sweep_interval`` (2 s), when a TCP connection has closed since the last sweep (the kernel
    reported its FIN/RST), and otherwise every ``idle_scan_interval`` (15 s): read the flow map in
    batches, expire idle and closed flows (with a final record carrying their last counters when
    packets passed since their last record), delete them. Idle timeouts are a minute or more, so a
    quarter of the shortest one is precise enough for them, and a node whose flows are not closing
    does not pay for reading its whole map every 2 s.

On SIGINT/SIGTERM it drains, ships what it has, detaches every filter and clsact qdisc it added,
and exits, leaving the interfaces as it found them.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

from flowscope import schema
from flowscope.endpoints import EndpointIndex, EndpointRecord, EndpointStore
from probe import events as ev
from probe.datapath import Datapath, host_addresses, interface_names, match_interfaces
from probe.shipper import Shipper, default_spool_dir

log = logging.getLogger("flowscope.agent")


@dataclass
class AgentConfig:
    server: str = "http://127.0.0.1:8080"
    interfaces: list[str] = field(default_factory=list)   # names or globs
    follow_endpoints: bool = True                          # attach to every registered endpoint
    state_dir: Optional[str] = None
    node_name: str = field(default_factory=socket.gethostname)
    batch_size: int = 1000
    flush_interval: float = 0.2
    drain_ms: int = 50
    update_interval: float = 5.0
    report_tcp_flags: str = "all"                          # TCP flags whose first sighting makes an event
    sweep_interval: float = 2.0
    tcp_idle_timeout: float = 300.0
    idle_timeout: float = 60.0
    closed_timeout: float = 2.0
    idle_scan_interval: float = 15.0                       # full map scan for idle flows (see the module doc)
    flow_entries: int = 65536
    max_queue: int = 200_000
    token: Optional[str] = None
    spool_dir: Optional[str] = None                        # None: probe.shipper.default_spool_dir; '': none
    spool_max_bytes: int = 1 << 30                         # on-disk spool bound while the server is down
    l7: bool = True                                        # L7 capture (probe.l7capture), see run_agent
    l7_ports: Optional[list[int]] = None                   # None: probe.l7capture.DEFAULT_L7_PORTS
    l7_cpu_budget: float = 0.25                            # cores the L7 capture may use (0 = no limit)
    policy: bool = True                                    # network policy enforcement (enforcer.sync)
    policy_audit_mode: bool = False                        # global audit: report would-be drops, drop nothing
    cni_service: bool = True                               # serve the CNI plugin's fast path (cni.sock)
    export: Optional[object] = None                        # flowscope.export.ExportConfig: flows to a file


class FlowSource(Protocol):
    """Something besides the tc probe that watches the same interfaces and produces flows
    (e.g. L7 capture). The agent calls these from its loop; none of them may block."""

    def attach(self, ifindex: int, ifname: str) -> None: ...
    def detach(self, ifindex: int) -> None: ...
    def set_index(self, index: EndpointIndex) -> None: ...
    def poll(self) -> list[schema.Flow]: ...
    def lost(self) -> dict[str, int]: ...      # new losses since the last call, by LostEvent source
    def close(self) -> None: ...
    # Optional: ``bind(agent)`` is called once in start(), after the datapath is loaded and before the
    # first endpoint refresh, for sources that need the loaded BPF object (``agent.dp``), the flow
    # builder (``agent.builder``) or the other sources (``agent.sources``), e.g. enforcer.sync.


@dataclass
class AgentStats:
    events: int = 0
    flows: int = 0
    expired: int = 0            # flow-map entries removed by the sweep
    expired_quiet: int = 0      # ... of which without a final record (nothing new since their last event)
    kernel_lost: int = 0
    map_insert_failures: int = 0
    kernel_shed: int = 0        # flag/update events the kernel did not queue right after the ring was full


class Agent:
    def __init__(self, cfg: AgentConfig, shipper: Optional[Shipper] = None,
                 on_flows: Optional[Callable[[list[schema.Flow]], None]] = None,
                 sources: Optional[list[FlowSource]] = None):
        self.cfg = cfg
        self.sources: list[FlowSource] = list(sources or [])
        self.services: list = []  # things with start()/stop() that live as long as the agent
        self.store = EndpointStore(cfg.state_dir)
        self.shipper = shipper if shipper is not None else Shipper(
            cfg.server, cfg.node_name, batch_size=cfg.batch_size, flush_interval=cfg.flush_interval,
            max_queue=cfg.max_queue, token=cfg.token, spool_max_bytes=cfg.spool_max_bytes,
            spool_dir=default_spool_dir(cfg.server, cfg.node_name) if cfg.spool_dir is None else cfg.spool_dir)
        self.on_flows = on_flows
        self.stats = AgentStats()
        self.stop_event = threading.Event()
        self.dp: Optional[Datapath] = None
        self._raw: list[bytes] = []
        self._ep_version: tuple[int, int] = (-1, -1)
        self._endpoints: list[EndpointRecord] = []
        self._ifnames: dict[int, str] = {}
        self._lost_seen: list[list[int]] = []
        self._builder: Optional[ev.FlowBuilder] = None
        self._closed = False
        # Until then, sweeps scan every sweep_interval: a TCP close was reported, and the closed flows
        # are due for expiry closed_timeout later.
        self._closed_scan_until = 0.0

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        cfg = self.cfg
        from probe.datapath import parse_tcp_flag_mask

        self.dp = Datapath(update_interval_s=cfg.update_interval, flow_entries=cfg.flow_entries,
                           report_flags=parse_tcp_flag_mask(cfg.report_tcp_flags))
        self.dp.open_events(self._on_raw)
        self._lost_seen = self.dp.read_stats()
        self._builder = ev.FlowBuilder(cfg.node_name, EndpointIndex(), {},
                                       time.time_ns() - time.monotonic_ns(),
                                       emitter_version=_version())
        for src in self.sources:
            bind = getattr(src, "bind", None)
            if bind is not None:
                bind(self)
        self._refresh(force=True)
        self.shipper.start()
        for svc in self.services:
            svc.start()

    def run(self) -> None:
        """Run until stop() or a signal; always cleans up."""
        try:
            if self.dp is None:
                self.start()
            last_refresh = last_sweep = last_scan = time.monotonic()
            while not self.stop_event.is_set():
                self.dp.poll(self.cfg.drain_ms)
                self._process_raw()
                self._poll_sources()
                now = time.monotonic()
                if now - last_refresh >= 1.0:
                    last_refresh = now
                    self._refresh()
                    self._account_kernel_loss()
                if now - last_sweep >= self.cfg.sweep_interval:
                    last_sweep = now
                    if now <= self._closed_scan_until or now - last_scan >= self._idle_scan_interval():
                        last_scan = now
                        self.sweep()
        finally:
            self.close()

    def stop(self, *_args) -> None:
        self.stop_event.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGTERM, self.stop)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for svc in self.services:
            try:
                svc.stop()
            except Exception as e:
                log.warning("stopping %s: %s", type(svc).__name__, e)
        for src in self.sources:
            try:
                self._emit(src.poll())
                src.close()
            except Exception as e:  # a source's failure must not leave the probe attached
                log.warning("closing %s: %s", type(src).__name__, e)
        dp, self.dp = self.dp, None
        if dp is not None:
            try:
                dp.poll(0)
                self._process_raw()
                self._account_kernel_loss(dp)
            finally:
                dp.close()
        self.shipper.close()
        log.info("agent stopped: %s; shipper: %s", self.stats, self.shipper.stats)

    @property
    def builder(self) -> Optional[ev.FlowBuilder]:
        return self._builder

    # ---------------------------------------------------------------- events -> flows

    def _on_raw(self, raw: bytes) -> None:
        # Look the list up on every call: _process_raw swaps in a fresh one.
        self._raw.append(raw)

    def _idle_scan_interval(self) -> float:
        cfg = self.cfg
        return max(cfg.sweep_interval, min(cfg.idle_scan_interval, cfg.idle_timeout / 4, cfg.tcp_idle_timeout / 4))

    def _process_raw(self) -> None:
        raw, self._raw = self._raw, []
        if not raw:
            return
        t = ev.EVENT_TYPE_OFFSET
        for r in reversed(raw):
            if r[t] == ev.EV_CLOSE:
                self._closed_scan_until = time.monotonic() + self.cfg.closed_timeout + self.cfg.sweep_interval
                break
        flows = self._builder.build_raw(raw)  # a policy drop gives two records (verdict + drop)
        self.stats.events += len(raw)
        self._emit(flows)

    def _poll_sources(self) -> None:
        for src in self.sources:
            flows = src.poll()
            if flows:
                self._emit(flows)

    def _emit(self, flows: list[schema.Flow]) -> None:
        self.stats.flows += len(flows)
        self.shipper.put(flows)
        if self.on_flows is not None:
            self.on_flows(flows)

    def sweep(self) -> int:
        """Expire idle and closed flows: a final record for each that saw packets after its last event
        (the others' last record already has their final counters), then delete them from the map.

        Most entries are decided by their last-seen time alone (one 8-byte read); only TCP entries idle
        longer than ``closed_timeout`` look at their flags and the reverse direction's."""
        if self.dp is None:
            return 0
        cfg = self.cfg
        now = time.monotonic_ns()
        closed_ns = int(cfg.closed_timeout * 1e9)
        tcp_idle_ns = int(cfg.tcp_idle_timeout * 1e9)
        idle_ns = int(cfg.idle_timeout * 1e9)
        youngest = min(closed_ns, tcp_idle_ns, idle_ns)
        entries = dict(self.dp.snapshot_flows())
        last_of, flags_of = ev.VAL_LAST_NS.unpack_from, ev.VAL_FLAGS_SEEN.unpack_from
        expired: list[tuple[bytes, bytes, Optional[bytes]]] = []
        for key, val in entries.items():
            idle = now - last_of(val)[0]
            if idle < youngest:
                continue
            if key[41] == ev.IPPROTO_TCP:
                rev = entries.get(ev.reverse_key(key))
                if idle < tcp_idle_ns:
                    if idle < closed_ns:
                        continue
                    rev_fseen = flags_of(rev)[0] if rev is not None else None
                    if not ev.tcp_closed(flags_of(val)[0], rev_fseen):
                        continue
            else:
                if idle < idle_ns:
                    continue
                rev = entries.get(ev.reverse_key(key))
            expired.append((key, val, rev))
        if expired:
            build, expire_event, quiet = self._builder.build, ev.expire_event, ev.reported_in_full
            flows = [build(expire_event(k, v, r, now)) for k, v, r in expired if not quiet(v)]
            self.dp.delete_flows([k for k, _v, _r in expired])
            self.stats.expired += len(expired)
            self.stats.expired_quiet += len(expired) - len(flows)
            if flows:
                self._emit(flows)
        return len(expired)

    # ---------------------------------------------------------------- loss accounting

    def _account_kernel_loss(self, dp: Optional[Datapath] = None) -> None:
        dp = dp or self.dp
        if dp is None:
            return
        now = dp.read_stats()
        ring = schema.LostEventSource.PERF_EVENT_RING_BUFFER.value
        for stat in (ev.STAT_RINGBUF_FAIL, ev.STAT_MAP_FAIL, ev.STAT_SHED):
            for cpu, (before, after) in enumerate(zip(self._lost_seen[stat], now[stat])):
                if after > before:
                    self.shipper.report_lost(ring, after - before, cpu)
                    if stat == ev.STAT_RINGBUF_FAIL:
                        self.stats.kernel_lost += after - before
                    elif stat == ev.STAT_MAP_FAIL:
                        self.stats.map_insert_failures += after - before
                    else:
                        self.stats.kernel_shed += after - before
        self._lost_seen = now
        for src in self.sources:
            for source, n in src.lost().items():
                self.shipper.report_lost(source, n)

    # ---------------------------------------------------------------- interfaces and endpoints

    def _refresh(self, force: bool = False) -> None:
        version = self.store.version() if self.cfg.follow_endpoints else (0, 0)
        names = interface_names()
        if not force and version == self._ep_version and names == self._ifnames:
            return
        if version != self._ep_version:
            self._endpoints = self.store.list() if self.cfg.follow_endpoints else []
            self._ep_version = version
        self._ifnames = names
        wanted = match_interfaces(self.cfg.interfaces, names) if self.cfg.interfaces else {}
        for rec in self._endpoints:
            idx = rec.host_ifindex
            if idx in names and (not rec.host_ifname or names[idx] == rec.host_ifname):
                wanted[idx] = names[idx]
        dp = self.dp
        for idx in list(dp.attached):
            if idx not in wanted:
                if idx in names:
                    dp.detach(idx)
                else:
                    dp.attached.pop(idx, None)  # the link is gone, and its qdisc with it
                for src in self.sources:
                    src.detach(idx)
        for idx, name in wanted.items():
            if idx not in dp.attached:
                try:
                    dp.attach(idx, name)
                except Exception as e:
                    log.warning("cannot attach to %s: %s", name, e)
                    continue
                for src in self.sources:
                    try:
                        src.attach(idx, name)
                    except Exception as e:
                        log.warning("%s cannot attach to %s: %s", type(src).__name__, name, e)
        index = EndpointIndex(self._endpoints, host_addresses())
        self._builder.index = index
        self._builder.ifnames = names
        for src in self.sources:
            src.set_index(index)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("flowscope")
    except Exception:
        return ""


def build_agent(cfg: AgentConfig, shipper: Optional[Shipper] = None) -> "Agent":
    """An agent with everything its configuration asks for: L7 capture sources and, when it follows
    endpoints, the CNI plugin's fast-path service (started with the agent, stopped with it)."""
    from probe.l7capture import build_sources

    sources = build_sources(cfg)
    if cfg.policy:
        from enforcer.sync import build_policy_sync

        sources.append(build_policy_sync(cfg))
    agent = Agent(cfg, shipper=shipper, sources=sources)
    if cfg.export is not None:  # Hubble-style flow export to a file (issue 7)
        from flowscope.export import attach_to_agent

        attach_to_agent(agent, cfg.export)
    if cfg.follow_endpoints and cfg.cni_service:
        agent.services.append(_CNIServiceHandle(cfg.state_dir))
    return agent


class _CNIServiceHandle:
    """Starts `cni.service.CNIService` with the agent; a failure leaves the plugin on its standalone path."""

    def __init__(self, state_dir: Optional[str]):
        self.state_dir = state_dir
        self.service = None

    def start(self) -> None:
        try:
            from cni.service import CNIService

            self.service = CNIService(self.state_dir)
            self.service.start()
            log.info("CNI fast path listening on %s", self.service.socket_path)
        except Exception as e:  # another agent already serves it, or the state dir is unusable
            self.service = None
            log.warning("CNI fast path not started (the plugin works standalone): %s", e)

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()
            self.service = None


def run_agent(cfg: AgentConfig) -> int:
    agent = build_agent(cfg)
    agent.install_signal_handlers()
    agent.start()
    log.info("agent on node %s shipping to %s; attached to %s", cfg.node_name, cfg.server,
             ", ".join(a.ifname for a in agent.dp.attached.values()) or "nothing yet")
    agent.run()
    return 0
