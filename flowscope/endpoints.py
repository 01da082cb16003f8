"""The node's endpoint registry: which local interfaces and addresses belong to which workload.

The CNI plugin writes one record per attachment; the agent reads them (also those written while it
was down) to attach the probe and to enrich flows with pod name, namespace, labels and identity.

Storage: one JSON file per attachment under ``<state_dir>/endpoints/``, written atomically
(temp file + rename), so readers never see half a record and a crash leaves no partial state.
``state_dir`` is ``$FLOWSCOPE_STATE_DIR`` or ``/var/run/flowscope``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable, Optional

import msgspec

from flowscope import schema

NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
LABEL_SOURCE = "k8s"

# Cilium's reserved identities.
IDENTITY_HOST = 1
IDENTITY_WORLD = 2
IDENTITY_UNMANAGED = 3
IDENTITY_HEALTH = 4
IDENTITY_INIT = 5
IDENTITY_REMOTE_NODE = 6
RESERVED_LABELS = {IDENTITY_HOST: ["reserved:host"], IDENTITY_WORLD: ["reserved:world"]}
FIRST_USER_IDENTITY = 256


def default_state_dir() -> Path:
    return Path(os.environ.get("FLOWSCOPE_STATE_DIR", "/var/run/flowscope"))


class EndpointRecord(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=False):
    """One container attachment. ``labels`` are plain ``key -> value`` (no source prefix)."""

    container_id: str
    ifname: str = "eth0"
    netns: str = ""
    host_ifname: str = ""
    host_ifindex: int = 0
    ips: list[str] = []
    namespace: str = "default"
    pod_name: str = ""
    labels: dict[str, str] = {}
    endpoint_id: int = 0
    identity: int = 0
    node_name: str = ""
    mac: str = ""
    created_ns: int = 0

    @property
    def key(self) -> str:
        return attachment_key(self.container_id, self.ifname)

    def hubble_labels(self) -> list[str]:
        """Labels as Hubble prints them: ``k8s:key=value``, with the namespace label, sorted."""
        out = {f"{LABEL_SOURCE}:{k}={v}" for k, v in self.labels.items()}
        if self.namespace:
            out.add(f"{LABEL_SOURCE}:{NAMESPACE_LABEL}={self.namespace}")
        return sorted(out)

    def to_hubble(self) -> schema.Endpoint:
        return schema.Endpoint(
            ID=self.endpoint_id,
            identity=self.identity,
            namespace=self.namespace,
            labels=self.hubble_labels(),
            pod_name=self.pod_name,
        )


_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def attachment_key(container_id: str, ifname: str) -> str:
    """File-name-safe key of one (container, interface) attachment."""
    return f"{_SAFE.sub('_', container_id)}--{_SAFE.sub('_', ifname)}"


_decoder = msgspec.json.Decoder(EndpointRecord)
_encoder = msgspec.json.Encoder()


class EndpointStore:
    """The registry on disk. Safe for concurrent writers of different attachments."""

    def __init__(self, state_dir: Optional[Path | str] = None):
        self.dir = Path(state_dir or default_state_dir()) / "endpoints"

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def put(self, rec: EndpointRecord) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_encoder.encode(rec))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path(rec.key))
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def get(self, container_id: str, ifname: str) -> Optional[EndpointRecord]:
        try:
            return _decoder.decode(self._path(attachment_key(container_id, ifname)).read_bytes())
        except (FileNotFoundError, msgspec.DecodeError):
            return None

    def delete(self, container_id: str, ifname: str) -> bool:
        try:
            self._path(attachment_key(container_id, ifname)).unlink()
            return True
        except FileNotFoundError:
            return False

    def list(self) -> list[EndpointRecord]:
        out = []
        try:
            names = sorted(os.listdir(self.dir))
        except FileNotFoundError:
            return []
        for name in names:
            if not name.endswith(".json") or name.startswith("."):
                continue
            try:
                out.append(_decoder.decode((self.dir / name).read_bytes()))
            except (FileNotFoundError, msgspec.DecodeError, msgspec.ValidationError):
                continue  # vanished or corrupt: skip, never crash the reader
        return out

    def version(self) -> tuple[int, int]:
        """Change detector: (entry count, digest of every record's name and inode). Records are
        replaced by rename, so any put or delete changes it; a directory mtime alone can miss two
        changes within one timestamp tick."""
        try:
            entries = sorted((e.name, e.inode()) for e in os.scandir(self.dir)
                             if e.name.endswith(".json") and not e.name.startswith("."))
        except FileNotFoundError:
            return 0, 0
        return len(entries), hash(tuple(entries))


class EndpointIndex:
    """Lookups for enrichment: address -> endpoint, host ifindex -> endpoint.

    Addresses not in the index are ``host`` when they belong to this node, else ``world``.
    """

    def __init__(self, records: Iterable[EndpointRecord] = (), host_ips: Iterable[str] = ()):
        self.by_ip: dict[str, EndpointRecord] = {}
        self.by_ifindex: dict[int, EndpointRecord] = {}
        self.host_ips = {str(ipaddress.ip_address(a)) for a in host_ips}
        for r in records:
            for a in r.ips:
                self.by_ip[str(ipaddress.ip_interface(a).ip)] = r
            if r.host_ifindex:
                self.by_ifindex[r.host_ifindex] = r
        self._cache: dict[str, schema.Endpoint] = {}

    def endpoint_for_ip(self, ip: str) -> schema.Endpoint:
        ep = self._cache.get(ip)
        if ep is not None:
            return ep
        rec = self.by_ip.get(ip)
        if rec is not None:
            ep = rec.to_hubble()
        elif ip in self.host_ips:
            ep = schema.Endpoint(identity=IDENTITY_HOST, labels=RESERVED_LABELS[IDENTITY_HOST])
        else:
            ep = schema.Endpoint(identity=IDENTITY_WORLD, labels=RESERVED_LABELS[IDENTITY_WORLD])
        if len(self._cache) < 100_000:
            self._cache[ip] = ep
        return ep
