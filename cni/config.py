"""What one plugin invocation asks for: the CNI_* environment and the network configuration on stdin.

Pure: parses and validates, raising :class:`~cni.errors.CNIError` with the spec's code (4 for the
environment, 6 for undecodable stdin, 1 for versions, 7 for the configuration).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional

from cni import errors as E
from cni.errors import CNIError
from cni.versions import SUPPORTED_VERSIONS, version_ge, normalize_result

COMMANDS = ("ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION")

# Which variables each verb needs (as the reference plugins' dispatcher requires them).
REQUIRED_ENV: dict[str, tuple[str, ...]] = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "STATUS": ("CNI_PATH",),
    "GC": ("CNI_PATH",),
    "VERSION": (),
}

# Labels may also come in CNI_ARGS (runtimes such as Podman forward CNI_ARGS from their environment
# but not container labels): FLOWSCOPE_LABELS=app=web,tier=front
LABELS_ARG = "FLOWSCOPE_LABELS"

_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_MAC = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_MTU = 1500
DEFAULT_HOST_IF_PREFIX = "fsc"
BUILTIN_IPAM = "flowscope-ipam"


@dataclass
class Request:
    """The CNI_* environment of one invocation."""

    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: dict[str, str] = field(default_factory=dict)
    path: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


def parse_cni_args(s: str) -> dict[str, str]:
    """``"K=V;K2=V2"`` -> dict; values may contain ``=``. Raises CNIError(4) on a pair without ``=``."""
    out: dict[str, str] = {}
    for pair in (s or "").split(";"):
        if not pair:
            continue
        k, sep, v = pair.partition("=")
        if not sep or not k:
            raise CNIError(E.INVALID_ENV, "invalid CNI_ARGS", f"{pair!r} is not KEY=VALUE")
        out[k] = v
    return out


def validate_ifname(name: str) -> None:
    if not name or len(name) > 15 or name in (".", "..") or any(c in name for c in "/: \t\n%"):
        raise CNIError(E.INVALID_ENV, "invalid CNI_IFNAME",
                       f"{name!r}: must be 1-15 characters without '/', ':', '%' or whitespace")


def parse_env(env: Mapping[str, str]) -> Request:
    cmd = env.get("CNI_COMMAND", "")
    if not cmd:
        raise CNIError(E.INVALID_ENV, "required env variables [CNI_COMMAND] missing",
                       "CNI_COMMAND must be one of " + ", ".join(COMMANDS))
    if cmd not in COMMANDS:
        raise CNIError(E.INVALID_ENV, f"unknown CNI_COMMAND: {cmd}",
                       "CNI_COMMAND must be one of " + ", ".join(COMMANDS))
    missing = [k for k in REQUIRED_ENV[cmd] if not env.get(k)]
    if missing:
        raise CNIError(E.INVALID_ENV, f"required env variables [{','.join(missing)}] missing",
                       f"{cmd} needs {', '.join(REQUIRED_ENV[cmd])}")
    req = Request(
        command=cmd,
        container_id=env.get("CNI_CONTAINERID", ""),
        netns=env.get("CNI_NETNS", ""),
        ifname=env.get("CNI_IFNAME", ""),
        args=parse_cni_args(env.get("CNI_ARGS", "")),
        path=[p for p in env.get("CNI_PATH", "").split(":") if p],
        env=dict(env),
    )
    if req.container_id and not _CONTAINER_ID.match(req.container_id):
        raise CNIError(E.INVALID_ENV, "invalid CNI_CONTAINERID",
                       f"{req.container_id!r}: must match {_CONTAINER_ID.pattern}")
    if req.ifname:
        validate_ifname(req.ifname)
    return req


def decode_stdin(data: bytes) -> dict:
    """Stdin as a JSON object, or CNIError(6)."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise CNIError(E.DECODE_FAILURE, "failed to decode network configuration",
                       f"stdin is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise CNIError(E.DECODE_FAILURE, "failed to decode network configuration",
                       f"stdin must be a JSON object, not {type(obj).__name__}")
    return obj


def config_version(obj: dict) -> str:
    """The config's cniVersion if we support it, else CNIError(1)."""
    v = obj.get("cniVersion")
    if v is None:
        raise CNIError(E.INCOMPATIBLE_VERSION, "incompatible CNI versions",
                       'config has no "cniVersion"; supported: ' + ", ".join(SUPPORTED_VERSIONS))
    if v not in SUPPORTED_VERSIONS:
        raise CNIError(E.INCOMPATIBLE_VERSION, "incompatible CNI versions",
                       f'config is "{v}", plugin supports {list(SUPPORTED_VERSIONS)}')
    return v


@dataclass
class NetConf:
    cni_version: str
    name: str
    type: str
    mtu: int = DEFAULT_MTU
    ipam: dict = field(default_factory=dict)
    dns: dict = field(default_factory=dict)
    runtime_config: dict = field(default_factory=dict)
    args: dict = field(default_factory=dict)
    prev_result: Optional[dict] = None
    log_file: str = ""
    log_level: str = "info"
    host_if_prefix: str = DEFAULT_HOST_IF_PREFIX
    link_local_gateway: bool = True
    state_dir: str = ""
    raw: dict = field(default_factory=dict)

    @property
    def ipam_type(self) -> str:
        return str(self.ipam.get("type") or BUILTIN_IPAM)

    @property
    def builtin_ipam(self) -> bool:
        return self.ipam_type == BUILTIN_IPAM


def _bad(details: str) -> CNIError:
    return CNIError(E.INVALID_CONFIG, "invalid network configuration", details)


def _opt(obj: dict, key: str, typ: type | tuple, default):
    v = obj.get(key, default)
    if v is None:
        return default
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        names = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise _bad(f'"{key}" must be {names}, not {type(v).__name__}')
    return v


def parse_netconf(obj: dict, command: str) -> NetConf:
    """Validate one plugin's configuration (as a runtime passes it out of a conflist)."""
    version = config_version(obj)
    name = obj.get("name")
    if command != "VERSION" and (not isinstance(name, str) or not name):
        raise _bad('"name" (the network name) is required')
    if isinstance(name, str) and not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", name):
        raise _bad(f'"name" {name!r} may only hold letters, digits, "_", "." and "-"')
    if obj.get("ipMasq") is True:
        raise CNIError(E.UNSUPPORTED_FIELD, "unsupported field in network configuration",
                       "ipMasq=true: flowscope-cni routes pod addresses without NAT; masquerade on the node "
                       "or chain a plugin that does")
    conf = NetConf(cni_version=version, name=name or "", type=str(obj.get("type") or ""), raw=obj)
    conf.mtu = _opt(obj, "mtu", int, DEFAULT_MTU)
    if not 68 <= conf.mtu <= 65535:
        raise _bad(f'"mtu" {conf.mtu} out of range 68-65535')
    conf.ipam = _opt(obj, "ipam", dict, {})
    if "type" in conf.ipam and (not isinstance(conf.ipam["type"], str) or not conf.ipam["type"]
                                or "/" in conf.ipam["type"]):
        raise _bad('"ipam.type" must be a plugin name')
    conf.dns = _opt(obj, "dns", dict, {})
    conf.runtime_config = _opt(obj, "runtimeConfig", dict, {})
    conf.args = _opt(obj, "args", dict, {})
    conf.log_file = _opt(obj, "logFile", str, "")
    conf.log_level = _opt(obj, "logLevel", str, "info").lower()
    if conf.log_level not in LOG_LEVELS:
        raise _bad(f'"logLevel" must be one of {", ".join(LOG_LEVELS)}')
    conf.host_if_prefix = _opt(obj, "hostIfPrefix", str, DEFAULT_HOST_IF_PREFIX)
    if not re.match(r"^[a-z][a-z0-9]{0,6}$", conf.host_if_prefix):
        raise _bad('"hostIfPrefix" must be 1-7 lowercase letters/digits starting with a letter')
    conf.link_local_gateway = _opt(obj, "linkLocalGateway", bool, True)
    conf.state_dir = _opt(obj, "stateDir", str, "")
    prev = obj.get("prevResult")
    if prev is not None:
        try:
            conf.prev_result = normalize_result(prev)
        except ValueError as e:
            raise CNIError(E.DECODE_FAILURE, "failed to decode prevResult", str(e)) from None
    if command == "CHECK" and not version_ge(version, "0.4.0"):
        raise CNIError(E.INCOMPATIBLE_VERSION, "config version does not allow CHECK",
                       f"CHECK needs cniVersion 0.4.0 or later, config is {version}")
    if command in ("STATUS", "GC") and not version_ge(version, "1.1.0"):
        raise CNIError(E.INCOMPATIBLE_VERSION, f"config version does not allow {command}",
                       f"{command} needs cniVersion 1.1.0, config is {version}")
    # Everything in the container-facing config is checked now so that ADD fails before touching anything.
    if command in ("ADD", "CHECK"):
        labels_from(conf, {})
        requested_mac(conf, {})
    return conf


# ---- labels, identity, per-attachment requests ------------------------------------------------


def parse_labels(obj: object, where: str) -> dict[str, str]:
    """Labels as a dict, a list of ``"k=v"`` strings or a list of ``{key, value}`` objects (CNI conventions)."""
    out: dict[str, str] = {}
    if obj is None:
        return out
    items: list[tuple[object, object]] = []
    if isinstance(obj, dict):
        items = list(obj.items())
    elif isinstance(obj, list):
        for e in obj:
            if isinstance(e, str):
                k, sep, v = e.partition("=")
                if not sep:
                    raise _bad(f'{where}: label {e!r} is not "key=value"')
                items.append((k, v))
            elif isinstance(e, dict) and "key" in e:
                items.append((e.get("key"), e.get("value", "")))
            else:
                raise _bad(f'{where}: labels must be "key=value" strings or {{"key", "value"}} objects')
    else:
        raise _bad(f"{where}: labels must be an object or a list")
    for k, v in items:
        if not isinstance(k, str) or not k.strip() or any(c in k for c in "\n\r\t ="):
            raise _bad(f"{where}: invalid label key {k!r}")
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise _bad(f"{where}: label {k!r} has a non-string value")
        out[k] = str(v)
    return out


def labels_from(conf: NetConf, cni_args: Mapping[str, str]) -> dict[str, str]:
    """``args.cni.labels``, then ``runtimeConfig.labels``, then CNI_ARGS FLOWSCOPE_LABELS (later wins)."""
    labels: dict[str, str] = {}
    cni_section = conf.args.get("cni") if isinstance(conf.args.get("cni"), dict) else {}
    labels.update(parse_labels(cni_section.get("labels"), "args.cni.labels"))
    labels.update(parse_labels(conf.runtime_config.get("labels"), "runtimeConfig.labels"))
    raw = cni_args.get(LABELS_ARG, "")
    if raw:
        labels.update(parse_labels([p for p in raw.split(",") if p], f"CNI_ARGS {LABELS_ARG}"))
    return labels


def pod_identity(container_id: str, cni_args: Mapping[str, str]) -> tuple[str, str]:
    """(namespace, pod name): from K8S_POD_NAMESPACE / K8S_POD_NAME, else "default" / a name from the id."""
    ns = cni_args.get("K8S_POD_NAMESPACE") or "default"
    name = cni_args.get("K8S_POD_NAME") or f"pod-{container_id[:12]}"
    return ns, name


def requested_mac(conf: NetConf, cni_args: Mapping[str, str]) -> str:
    mac = cni_args.get("MAC") or conf.runtime_config.get("mac") or ""
    if mac and (not isinstance(mac, str) or not _MAC.match(mac) or int(mac[:2], 16) & 1):
        raise _bad(f"requested MAC {mac!r} is not a unicast MAC address")
    return mac.lower() if isinstance(mac, str) else ""


def requested_ips(conf: NetConf, cni_args: Mapping[str, str]) -> list[str]:
    """Static addresses asked for with ``runtimeConfig.ips`` or CNI_ARGS ``IP=a,b`` (plain addresses)."""
    raw: list = []
    if conf.runtime_config.get("ips"):
        raw = conf.runtime_config["ips"]
        if not isinstance(raw, list):
            raise _bad('"runtimeConfig.ips" must be a list')
    elif cni_args.get("IP"):
        raw = [p for p in cni_args["IP"].split(",") if p]
    out = []
    for a in raw:
        try:
            out.append(str(ipaddress.ip_interface(str(a)).ip))
        except ValueError:
            raise _bad(f"requested IP {a!r} is not an IP address") from None
    return out


def host_ifname(prefix: str, container_id: str, ifname: str) -> str:
    """The host side's name: stable for one attachment, 15 characters at most (like Cilium's lxc<hash>)."""
    digest = hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()
    return (prefix + digest)[:15]
