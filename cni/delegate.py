"""Running another CNI plugin (a delegated IPAM such as Debian's ``host-local``) the way libcni does.

The plugin is looked up in ``CNI_PATH``, run with the caller's environment (``CNI_COMMAND`` replaced),
the network configuration on stdin. A failure becomes a :class:`CNIError` carrying the plugin's own
code and message. The config version is lowered to the highest one the plugin speaks (asked once
with VERSION and cached per binary), so a 1.1.0 network can still use 1.0.0-era IPAM plugins.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from typing import Mapping, Optional

from cni import errors as E
from cni.errors import CNIError
from cni.versions import best_common_version, render_result

EXEC_TIMEOUT = 60.0

_versions_cache: dict[tuple[str, int], list[str]] = {}
_cache_lock = threading.Lock()


def find_plugin(name: str, path: list[str]) -> str:
    for d in path:
        p = os.path.join(d, name)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    raise CNIError(E.INVALID_CONFIG, f'failed to find plugin "{name}" in path {path}',
                   "install it or fix CNI_PATH / the network's plugin type")


def _run(plugin: str, command: str, env: Mapping[str, str], stdin: bytes) -> subprocess.CompletedProcess:
    run_env = dict(env)
    run_env["CNI_COMMAND"] = command
    try:
        return subprocess.run([plugin], input=stdin, env=run_env, capture_output=True, timeout=EXEC_TIMEOUT,
                              close_fds=True)
    except subprocess.TimeoutExpired:
        raise CNIError(E.TRY_AGAIN, f"plugin {os.path.basename(plugin)} timed out",
                       f"{command} did not finish within {EXEC_TIMEOUT:.0f}s") from None
    except OSError as e:
        raise CNIError(E.IO_FAILURE, f"cannot run plugin {os.path.basename(plugin)}", str(e)) from None


def supported_versions(plugin: str, env: Mapping[str, str]) -> list[str]:
    st = os.stat(plugin)
    key = (plugin, st.st_mtime_ns)
    with _cache_lock:
        hit = _versions_cache.get(key)
    if hit is not None:
        return hit
    p = _run(plugin, "VERSION", env, b'{"cniVersion":"1.1.0"}')
    versions: list[str] = []
    if p.returncode == 0:
        try:
            versions = [v for v in json.loads(p.stdout).get("supportedVersions", []) if isinstance(v, str)]
        except (ValueError, AttributeError):
            versions = []
    with _cache_lock:
        _versions_cache[key] = versions
    return versions


def exec_plugin(plugin: str, command: str, env: Mapping[str, str], conf: dict) -> Optional[dict]:
    """Run ``plugin`` for ``command`` with ``conf``; the decoded stdout for ADD/VERSION, else None."""
    name = os.path.basename(plugin)
    conf = dict(conf)
    wanted = conf.get("cniVersion", "")
    if command != "VERSION" and isinstance(wanted, str):
        speaks = supported_versions(plugin, env)
        if speaks and wanted not in speaks:
            lower = best_common_version(wanted, speaks)
            if lower is None:
                raise CNIError(E.INCOMPATIBLE_VERSION, f"plugin {name} does not speak CNI {wanted}",
                               f"it supports {speaks}")
            conf["cniVersion"] = lower
            if isinstance(conf.get("prevResult"), dict):
                conf["prevResult"] = render_result(conf["prevResult"], lower)
    p = _run(plugin, command, env, json.dumps(conf).encode())
    if p.returncode != 0:
        stderr = p.stderr.decode(errors="replace").strip()
        try:
            obj = json.loads(p.stdout)
        except ValueError:
            obj = None
        err = CNIError.from_dict(obj, fallback=f"exit status {p.returncode}: {stderr[-500:]}")
        err.msg = f"{name}: {err.msg}"
        raise err
    if command not in ("ADD", "VERSION"):
        return None
    try:
        out = json.loads(p.stdout)
    except ValueError as e:
        raise CNIError(E.DECODE_FAILURE, f"{name} printed an undecodable result", str(e)) from None
    if not isinstance(out, dict):
        raise CNIError(E.DECODE_FAILURE, f"{name} printed an undecodable result", "not a JSON object")
    return out
