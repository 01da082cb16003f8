"""The agent's policy component: policies from the server -> identities -> compile -> kernel maps.

:class:`PolicySync` plugs into ``probe.agent.Agent`` as a source (``sources=[...]``):

* ``bind(agent)`` (called once the probe's program is loaded) takes the program's policy maps
  (:class:`~enforcer.datapath.PolicyMaps`) and the agent's flow builder, and starts two threads;
* ``set_index(index)`` (every endpoint refresh) allocates a stable security identity per endpoint label
  set (:class:`~enforcer.identity.IdentityAllocator`, ``<state_dir>/identities.json``), writes it into the
  endpoint records the flows are enriched from, and schedules a recompile;
* the *fetch* thread long-polls ``GET /api/v1/policies`` (ETag + ``wait``: the server answers as soon as
  the set changes) and keeps the last set in ``<state_dir>/policy-cache.json``, so a restarted agent
  enforces its last known policies even while the server is unreachable;
* the *apply* thread compiles (``enforcer.compiler``, ids and CIDR identities kept stable) and writes
  only the changed map entries, then hands the flow builder the names of the policies (ids, revisions,
  and which policies put an endpoint under default deny) and gives L7 capture the policies' L7 rules.

Nothing here blocks the agent's loop: ``set_index`` only allocates identities (file I/O for new label
sets only) and wakes the apply thread. A compile error (conflicting addresses, too many entries) keeps
the previous maps in force and is logged and reported by :meth:`PolicySync.status`.

Until the first policy set is known (no cache, server not answered), nothing is enforced.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import msgspec
import orjson

from flowscope import schema
from flowscope.endpoints import EndpointIndex, EndpointRecord, default_state_dir

from .client import PolicyAPIError, PolicyClient, PolicySnapshot
from .compiler import CompiledPolicy, CompileError, EndpointInfo, PolicyRef, compile_policies, required_cidrs
from .identity import IdentityAllocator, IdentityError, cidr_labels, endpoint_labels
from .policy import Policy, PolicyValidationError, policy_from_object
from .selector import Labels, SelectorCache, namespaced_subject

log = logging.getLogger("flowscope.enforcer.sync")

IDENTITY_FILE = "identities.json"
CACHE_FILE = "policy-cache.json"
MAX_GRAVEYARD = 10_000  # names of deleted policies kept for flows of connections they allowed


# --------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------


def parse_items(items: Iterable[dict], cache: Optional[dict] = None) -> tuple[list[Policy], list[str]]:
    """Policies from REST list items (``{namespace, name, revision, content_hash, policy}``), each carrying
    its revision. ``cache`` (a dict kept by the caller) skips re-validating unchanged documents. Invalid
    items are skipped and described in the second list."""
    out, problems = [], []
    cache = cache if cache is not None else {}
    seen = set()
    for item in items:
        try:
            key = (item.get("namespace", ""), item["name"], item.get("content_hash", ""), int(item.get("revision", 0)))
        except (KeyError, TypeError, ValueError, AttributeError):
            problems.append(f"malformed policy item: {str(item)[:200]}")
            continue
        p = cache.get(key)
        if p is None:
            try:
                p = policy_from_object(item["policy"]).with_revision(key[3])
            except PolicyValidationError as e:
                problems.append(f"policy {key[0]}/{key[1]} rev {key[3]}: {e}")
                continue
            except (KeyError, TypeError) as e:
                problems.append(f"policy {key[0]}/{key[1]}: malformed item ({e})")
                continue
            cache[key] = p
        out.append(p)
        seen.add(key)
    for k in [k for k in cache if k not in seen]:
        del cache[k]
    return out, problems


def endpoint_infos(records: Sequence[EndpointRecord], index: Optional[EndpointIndex] = None) -> list[EndpointInfo]:
    """Compiler inputs for the endpoint records (``identity`` already set). Addresses claimed by two
    records go to the one the index resolves them to (the newest record wins in ``EndpointIndex``);
    records without an identity are left out."""
    out = []
    for rec in records:
        if rec.identity <= 0:
            continue
        ips = []
        for a in rec.ips:
            try:
                ip = str(ipaddress.ip_interface(a).ip)
            except ValueError:
                continue
            if index is None or index.by_ip.get(ip) is rec:
                ips.append(ip)
        name = f"{rec.namespace}/{rec.pod_name}" if rec.pod_name else rec.container_id
        out.append(EndpointInfo(identity=rec.identity, labels=endpoint_labels(rec.namespace, rec.labels),
                                ips=tuple(ips), name=name, ifindex=rec.host_ifindex, local=True))
    return out


def default_deny_map(policies: Sequence[Policy], endpoints: Sequence[EndpointInfo],
                     ids: dict[tuple[str, str], int]) -> dict[tuple[int, str], tuple[list[int], list[int]]]:
    """``(identity, direction) -> (enforcing policy ids, audit-mode policy ids)`` of the policies that put
    local endpoints under default deny (the policies behind a POLICY_DENIED drop)."""
    local = {ep.identity: Labels(ep.labels) for ep in endpoints if ep.local}
    cache = SelectorCache(local)
    out: dict[tuple[int, str], tuple[list[int], list[int]]] = {}
    for p in policies:
        pid = ids.get(p.key)
        if pid is None:
            continue
        for spec in p.specs:
            dirs = [d for d in ("ingress", "egress") if spec.default_deny(d)]
            if not dirs:
                continue
            audit = p.spec_audit(spec)
            for ident in cache.select(namespaced_subject(spec.endpointSelector.selector, p.namespace)):
                for d in dirs:
                    enforcing, audited = out.setdefault((ident, d), ([], []))
                    lst = audited if audit else enforcing
                    if pid not in lst:
                        lst.append(pid)
    return out


class PolicyNamesTable:
    """``probe.events.PolicyNames`` for one compiled policy set (immutable once built)."""

    def __init__(self, refs: dict[int, PolicyRef], by_ifindex: dict[int, int],
                 default_deny: dict[tuple[int, str], tuple[list[int], list[int]]]):
        self._flow_refs = {pid: r.to_flow() for pid, r in refs.items()}
        self._by_ifindex = dict(by_ifindex)
        self._dd: dict[tuple[int, str], list[schema.Policy]] = {}
        for key, (enforcing, audited) in default_deny.items():
            ids = enforcing or audited
            self._dd[key] = [self._flow_refs[i] for i in sorted(ids) if i in self._flow_refs]

    def policy(self, policy_id: int) -> Optional[schema.Policy]:
        return self._flow_refs.get(policy_id)

    def default_deny(self, ifindex: int, direction: str) -> list[schema.Policy]:
        ident = self._by_ifindex.get(ifindex)
        if ident is None:
            return []
        return self._dd.get((ident, direction), [])


# --------------------------------------------------------------------------------------------
# The component
# --------------------------------------------------------------------------------------------


@dataclass
class SyncConfig:
    server: str = "http://127.0.0.1:8080"
    state_dir: Optional[str] = None
    token: Optional[str] = None
    global_audit: bool = False
    long_poll_s: float = 4.0       # the server holds a poll up to this long when nothing changes
    poll_interval_s: float = 0.5   # between polls when the server answers at once (no long poll)
    retry_max_s: float = 10.0      # backoff cap while the server is unreachable


@dataclass
class SyncStatus:
    server_revision: int = -1      # the server's policy set revision in force (-1: none yet)
    compiled_revision: int = 0
    policies: int = 0
    endpoints: int = 0
    entries: int = 0
    applies: int = 0
    last_error: str = ""
    source: str = ""               # server | cache | local
    timings_ms: dict[str, float] = field(default_factory=dict)
    map_counts: dict[str, int] = field(default_factory=dict)


class PolicySync:
    """See the module docstring. ``client`` defaults to a :class:`PolicyClient` of ``cfg.server``; pass
    ``client=None`` with ``fetch=False`` to drive it with :meth:`use_policies` only (tests, benches)."""

    name = "policy"

    def __init__(self, cfg: SyncConfig, *, client: Any = "default", fetch: bool = True,
                 allocator: Optional[IdentityAllocator] = None):
        self.cfg = cfg
        state = Path(cfg.state_dir) if cfg.state_dir else default_state_dir()
        self.state_dir = state
        self._allocator = allocator
        self.cache_path = state / CACHE_FILE
        self.client = PolicyClient(cfg.server, cfg.token) if client == "default" else client
        self._fetch_enabled = fetch and self.client is not None
        self.maps = None            # enforcer.datapath.PolicyMaps once bound
        self.builder = None         # probe.events.FlowBuilder once bound
        self._l7: list = []
        self._lock = threading.Lock()
        self._applied = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._policies: list[Policy] = []
        self._policy_revision = -1
        self._policy_source = ""
        self._endpoints: list[EndpointInfo] = []
        self._host_ips: list[str] = []
        self._dirty = True
        self._parse_cache: dict = {}
        self._previous: Optional[CompiledPolicy] = None
        self._all_refs: dict[int, PolicyRef] = {}
        self._received_at = 0.0
        self.compiled: Optional[CompiledPolicy] = None
        self.stat = SyncStatus()
        self._warned: set[str] = set()

    @property
    def allocator(self) -> IdentityAllocator:
        """The identity allocator (opened on first use; a corrupt file raises IdentityStoreError each time,
        so a repaired file is picked up without a restart)."""
        if self._allocator is None:
            self._allocator = IdentityAllocator(self.state_dir / IDENTITY_FILE)
        return self._allocator

    # -- agent seam -------------------------------------------------------------------------

    def bind(self, agent: Any) -> None:
        from .datapath import PolicyMaps

        self.maps = PolicyMaps.from_datapath(agent.dp)
        self.builder = agent.builder
        self._l7 = [s for s in agent.sources if s is not self and hasattr(s, "set_policies")]
        self.start()

    def start(self) -> None:
        if self._threads:
            return
        self._load_cache()
        worker = threading.Thread(target=self._apply_loop, name="flowscope-policy-apply", daemon=True)
        self._threads.append(worker)
        if self._fetch_enabled:
            self._threads.append(threading.Thread(target=self._fetch_loop, name="flowscope-policy-fetch", daemon=True))
        for t in self._threads:
            t.start()

    def attach(self, ifindex: int, ifname: str) -> None:  # enforcement follows endpoints, see set_index
        pass

    def detach(self, ifindex: int) -> None:
        pass

    def set_index(self, index: EndpointIndex) -> None:
        """Identities for the endpoints (written into the records the flows are enriched from), then a
        recompile in the background."""
        records = list({id(r): r for r in list(index.by_ip.values()) + list(index.by_ifindex.values())}.values())
        records.sort(key=lambda r: (r.namespace, r.pod_name, r.container_id, r.ifname))
        try:
            idents = self.allocator.allocate_many([endpoint_labels(r.namespace, r.labels) for r in records])
        except IdentityError as e:
            self._error(f"identities: {e}")
            idents = [0] * len(records)
        for rec, ident in zip(records, idents):
            rec.identity = ident
        endpoints = endpoint_infos(records, index)
        claimed = {ip for ep in endpoints for ip in ep.ips}
        host_ips = sorted(ip for ip in index.host_ips if ip not in claimed)
        with self._lock:
            if endpoints != self._endpoints or host_ips != self._host_ips:
                self._endpoints, self._host_ips = endpoints, host_ips
                self._dirty = True
                self._wake.set()

    def poll(self) -> list[schema.Flow]:
        return []

    def lost(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout=2.0 if t.name.endswith("apply") else 0.2)
        self._threads.clear()
        if self.client is not None:
            try:
                self.client.close()
            except Exception:  # noqa: BLE001 - closing a pool a long poll still uses
                pass

    # -- control ----------------------------------------------------------------------------

    def use_policies(self, policies: Sequence[Policy], revision: int, source: str = "local") -> None:
        """Put ``policies`` (server revision ``revision``) in force (also used by the fetch thread)."""
        with self._lock:
            self._policies = list(policies)
            self._policy_revision = revision
            self._policy_source = source
            self._received_at = time.perf_counter()
            self._dirty = True
            self._wake.set()

    def wait_applied(self, revision: int, timeout: float = 5.0) -> bool:
        """Wait until the server revision ``revision`` (or a newer one) is in the kernel."""
        end = time.monotonic() + timeout
        with self._applied:
            while self.stat.server_revision < revision:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._applied.wait(left)
        return True

    def status(self) -> dict[str, Any]:
        with self._lock:
            return dataclasses.asdict(self.stat)

    # -- fetch thread -----------------------------------------------------------------------

    def _fetch_loop(self) -> None:
        etag = f'"{self._policy_revision}"' if self._policy_revision >= 0 else ""
        backoff = 0.0
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                snap: Optional[PolicySnapshot] = self.client.poll(etag, wait=self.cfg.long_poll_s)
                backoff = 0.0
                if any(k.startswith("fetch:") for k in self._warned):
                    log.info("the policy server answers again")
                    self._warned = {k for k in self._warned if not k.startswith("fetch:")}
            except PolicyAPIError as e:
                if self._stop.is_set():
                    return
                if e.status == 404:
                    self._warn_once("no-api", f"the server has no policy API ({e}); nothing to enforce from it")
                    backoff = self.cfg.retry_max_s
                else:
                    backoff = min(self.cfg.retry_max_s, max(0.5, backoff * 2))
                    self._warn_once(f"fetch:{e.status}",
                                    f"policy fetch failed: {e}; retrying (last known policies stay in force)")
                self._stop.wait(backoff)
                continue
            except Exception:  # noqa: BLE001 - the thread must survive anything
                log.exception("policy fetch failed")
                self._stop.wait(min(self.cfg.retry_max_s, 1.0))
                continue
            if snap is None:
                if time.monotonic() - t0 < min(1.0, self.cfg.long_poll_s / 2):  # the server does not long-poll
                    self._stop.wait(self.cfg.poll_interval_s)
                continue
            policies, problems = parse_items(snap.items, self._parse_cache)
            for p in problems:
                log.error("ignoring a policy from the server: %s", p)
            etag = snap.etag or f'"{snap.revision}"'
            self._save_cache(snap)
            self.use_policies(policies, snap.revision, "server")

    def _load_cache(self) -> None:
        try:
            data = orjson.loads(self.cache_path.read_bytes())
            rev, items = int(data["revision"]), list(data["items"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring the policy cache %s: %s", self.cache_path, e)
            return
        policies, problems = parse_items(items, self._parse_cache)
        for p in problems:
            log.warning("policy cache: %s", p)
        log.info("enforcing %d cached policies (revision %d) until the server answers", len(policies), rev)
        self.use_policies(policies, rev, "cache")

    def _save_cache(self, snap: PolicySnapshot) -> None:
        blob = orjson.dumps({"revision": snap.revision, "items": snap.items})
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".policy-cache.", dir=self.cache_path.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, self.cache_path)
        except OSError as e:
            self._warn_once("cache", f"cannot write the policy cache {self.cache_path}: {e}")

    # -- apply thread -----------------------------------------------------------------------

    def _apply_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            if self._stop.is_set():
                return
            with self._lock:
                if not self._dirty:
                    continue
                self._dirty = False
                policies, revision = self._policies, self._policy_revision
                endpoints, host_ips = self._endpoints, self._host_ips
                source, received = self._policy_source, self._received_at
            try:
                self._recompute(policies, revision, endpoints, host_ips, source, received)
            except (CompileError, IdentityError) as e:
                self._error(f"policies not applied (the previous ones stay in force): {e}")
            except Exception as e:  # noqa: BLE001 - keep enforcing what is loaded; report
                log.exception("applying policies failed")
                self._error(f"applying policies failed: {type(e).__name__}: {e}")

    def _recompute(self, policies: list[Policy], revision: int, endpoints: list[EndpointInfo],
                   host_ips: list[str], source: str, received: float) -> None:
        t0 = time.perf_counter()
        cidrs = sorted(required_cidrs(policies))
        cidr_ids = dict(zip(cidrs, self.allocator.allocate_many([cidr_labels(c) for c in cidrs]))) if cidrs else {}
        previous = self._previous
        if previous is not None and self._all_refs:
            # Policy ids are never reused: deleted policies keep theirs (flows may still name them).
            previous = msgspec.structs.replace(previous, policies=tuple(
                sorted(self._all_refs.values(), key=lambda r: r.id)))
        compiled = compile_policies(policies, endpoints, host_ips=host_ips, global_audit=self.cfg.global_audit,
                                    cidr_identities=cidr_ids, previous=previous)
        t1 = time.perf_counter()
        result = self.maps.apply(compiled) if self.maps is not None else None
        t2 = time.perf_counter()
        for ref in compiled.policies:
            self._all_refs[ref.id] = ref
        if len(self._all_refs) > MAX_GRAVEYARD + len(compiled.policies):
            live = {r.id for r in compiled.policies}
            for pid in sorted(self._all_refs)[: len(self._all_refs) - MAX_GRAVEYARD - len(live)]:
                if pid not in live:
                    del self._all_refs[pid]
        ids = {(r.namespace, r.name): r.id for r in compiled.policies}
        names = PolicyNamesTable(self._all_refs, {e.ifindex: e.identity for e in compiled.endpoints if e.ifindex},
                                 default_deny_map(policies, endpoints, ids))
        if self.builder is not None:
            self.builder.policy_names = names
        for src in self._l7:
            try:
                src.set_policies(policies)
            except Exception as e:  # noqa: BLE001 - L7 visibility must not stop enforcement
                log.warning("handing policies to %s failed: %s", type(src).__name__, e)
        t3 = time.perf_counter()
        self._previous = compiled
        self.compiled = compiled
        with self._applied:
            st = self.stat
            st.server_revision = revision
            st.compiled_revision = compiled.revision
            st.policies = len(policies)
            st.endpoints = len(endpoints)
            st.entries = len(compiled.entries)
            st.applies += 1
            st.source = source
            st.last_error = ""
            st.timings_ms = {"compile": (t1 - t0) * 1e3, "maps": (t2 - t1) * 1e3, "names": (t3 - t2) * 1e3,
                             "received_to_kernel": (t2 - received) * 1e3 if received else 0.0}
            st.map_counts = result.counts if result is not None else {}
            self._applied.notify_all()
        if result is not None and result.changed:
            what = f"policy revision {revision} ({source})" if revision >= 0 else "no policies yet"
            log.info("%s in the kernel: %d policies, %d endpoints, %d entries, %d map changes in %.1f ms", what,
                     len(policies), len(endpoints), len(compiled.entries), result.changed, (t2 - t1) * 1e3)

    # -- reporting --------------------------------------------------------------------------

    def _error(self, msg: str) -> None:
        log.error("%s", msg)
        with self._lock:
            self.stat.last_error = msg

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", msg)


def build_policy_sync(agent_cfg: Any) -> PolicySync:
    """The agent's policy component for an ``AgentConfig``."""
    return PolicySync(SyncConfig(server=agent_cfg.server, state_dir=agent_cfg.state_dir, token=agent_cfg.token,
                                 global_audit=bool(getattr(agent_cfg, "policy_audit_mode", False))))
