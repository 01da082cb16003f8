"""Spec versions: which we accept, and results rendered in the shape of the version a config asks for.

Pure and import-light (the thin plugin client imports it to answer VERSION without loading anything).

Internally a result is the 1.1.0 shape: ``{interfaces: [{name, mac, mtu?, sandbox?}],
ips: [{address, gateway?, interface?}], routes: [{dst, gw?, mtu?, advmss?, priority?, table?, scope?}],
dns: {...}}``. Differences rendered here:

* 0.3.0 / 0.3.1 / 0.4.0: every ``ips[]`` entry carries ``version`` ("4" or "6").
* 1.0.0: no ``version`` in ``ips``.
* 1.1.0: adds ``interfaces[].mtu`` / ``socketPath`` / ``pciID`` and ``routes[].mtu`` / ``advmss`` /
  ``priority`` / ``table`` / ``scope``; older versions drop them.
"""

from __future__ import annotations

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
CURRENT_VERSION = "1.1.0"

_IFACE_KEYS = ("name", "mac", "sandbox")
_IFACE_KEYS_11 = ("mtu", "socketPath", "pciID")
_ROUTE_KEYS = ("dst", "gw")
_ROUTE_KEYS_11 = ("mtu", "advmss", "priority", "table", "scope")


def parse_version(v: object) -> tuple[int, int, int]:
    """``"1.0.0"`` -> ``(1, 0, 0)``; ValueError for anything else."""
    if not isinstance(v, str):
        raise ValueError(f"version must be a string, not {type(v).__name__}")
    parts = v.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"malformed version {v!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


def version_ge(a: str, b: str) -> bool:
    return parse_version(a) >= parse_version(b)


def is_supported(v: object) -> bool:
    return v in SUPPORTED_VERSIONS


def version_info() -> dict:
    return {"cniVersion": CURRENT_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)}


def best_common_version(wanted: str, supported: list[str]) -> str | None:
    """The highest version in ``supported`` that we also speak and that is not above ``wanted``."""
    ours = [v for v in supported if v in SUPPORTED_VERSIONS and parse_version(v) <= parse_version(wanted)]
    return max(ours, key=parse_version) if ours else None


def _ip_version(address: str) -> str:
    return "6" if ":" in address else "4"


def render_result(result: dict, version: str) -> dict:
    """The internal result in the JSON shape of ``version`` (which must be supported)."""
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"unsupported version {version!r}")
    v11 = version == "1.1.0"
    legacy = parse_version(version) < (1, 0, 0)
    out: dict = {"cniVersion": version}
    ifaces = []
    for i in result.get("interfaces") or []:
        keys = _IFACE_KEYS + (_IFACE_KEYS_11 if v11 else ())
        ifaces.append({k: i[k] for k in keys if i.get(k) not in (None, "")})
    if ifaces:
        out["interfaces"] = ifaces
    ips = []
    for ip in result.get("ips") or []:
        e = {}
        if legacy:
            e["version"] = ip.get("version") or _ip_version(ip["address"])
        e["address"] = ip["address"]
        if ip.get("gateway"):
            e["gateway"] = ip["gateway"]
        if ip.get("interface") is not None:
            e["interface"] = ip["interface"]
        ips.append(e)
    if ips:
        out["ips"] = ips
    routes = []
    for r in result.get("routes") or []:
        keys = _ROUTE_KEYS + (_ROUTE_KEYS_11 if v11 else ())
        routes.append({k: r[k] for k in keys if r.get(k) not in (None, "")})
    if routes:
        out["routes"] = routes
    dns = {k: v for k, v in (result.get("dns") or {}).items() if v}
    out["dns"] = dns
    return out


def normalize_result(obj: object) -> dict:
    """A result of any supported version (prevResult, a delegated IPAM result) in the internal shape.

    Raises ValueError when it is not a result object.
    """
    if not isinstance(obj, dict):
        raise ValueError("a result must be a JSON object")
    if "ip4" in obj or "ip6" in obj:
        raise ValueError("0.1.0/0.2.0 results (ip4/ip6) are not supported")
    out: dict = {"interfaces": [], "ips": [], "routes": [], "dns": {}}
    for i in obj.get("interfaces") or []:
        if not isinstance(i, dict) or not isinstance(i.get("name"), str):
            raise ValueError("interfaces[] entries need a name")
        out["interfaces"].append(dict(i))
    for ip in obj.get("ips") or []:
        if not isinstance(ip, dict) or not isinstance(ip.get("address"), str):
            raise ValueError("ips[] entries need an address")
        e = {k: ip[k] for k in ("address", "gateway", "interface") if ip.get(k) is not None}
        if "interface" in e and not isinstance(e["interface"], int):
            raise ValueError("ips[].interface must be an index")
        out["ips"].append(e)
    for r in obj.get("routes") or []:
        if not isinstance(r, dict) or not isinstance(r.get("dst"), str):
            raise ValueError("routes[] entries need a dst")
        out["routes"].append(dict(r))
    dns = obj.get("dns")
    if isinstance(dns, dict):
        out["dns"] = dict(dns)
    return out
