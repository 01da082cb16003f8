"""A small libcni: runs a ``.conflist`` the way container runtimes do (like ``cnitool``).

ADD runs the plugins in order, each receiving the previous plugin's result as ``prevResult``; CHECK
runs them in order with the cached ADD result; DEL runs them in reverse with it; STATUS and GC run
each plugin. ``runtimeConfig`` carries only the capabilities a plugin declares. Results are kept in
memory per (network, container, ifname), as libcni keeps its result cache.

Used by the tests, the benchmark and the demo to attach namespaces through real plugin binaries.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence


class PluginError(Exception):
    """A plugin exited non-zero; ``code``/``msg``/``details`` from its error object when it printed one."""

    def __init__(self, plugin: str, command: str, status: int, stdout: str, stderr: str):
        self.plugin, self.command, self.status, self.stdout, self.stderr = plugin, command, status, stdout, stderr
        try:
            obj = json.loads(stdout)
        except ValueError:
            obj = {}
        obj = obj if isinstance(obj, dict) else {}
        self.code: Optional[int] = obj.get("code") if isinstance(obj.get("code"), int) else None
        self.msg: str = str(obj.get("msg", ""))
        self.details: str = str(obj.get("details", ""))
        super().__init__(f"{plugin} {command} failed (exit {status}, code {self.code}): {self.msg} {self.details}"
                         f"{' | stderr: ' + stderr.strip()[-400:] if stderr.strip() else ''}")


@dataclass
class RuntimeConf:
    container_id: str
    netns: str
    ifname: str = "eth0"
    args: Sequence[tuple[str, str]] = ()
    capability_args: Mapping[str, object] = field(default_factory=dict)


@dataclass
class ConfList:
    cni_version: str
    name: str
    plugins: list[dict]

    @classmethod
    def from_obj(cls, obj: dict) -> "ConfList":
        return cls(obj["cniVersion"], obj["name"], [dict(p) for p in obj["plugins"]])

    @classmethod
    def load(cls, path: str | Path) -> "ConfList":
        return cls.from_obj(json.loads(Path(path).read_text()))


class CNIRuntime:
    def __init__(self, cni_path: Sequence[str], env: Optional[Mapping[str, str]] = None, timeout: float = 60):
        self.cni_path = [str(p) for p in cni_path]
        self.env = dict(os.environ if env is None else env)
        self.timeout = timeout
        self.cache: dict[tuple[str, str, str], dict] = {}

    # ---- plumbing -------------------------------------------------------------------------------

    def find(self, plugin_type: str) -> str:
        for d in self.cni_path:
            p = os.path.join(d, plugin_type)
            if os.path.isfile(p) and os.access(p, os.X_OK):
                return p
        raise FileNotFoundError(f'failed to find plugin "{plugin_type}" in path {self.cni_path}')

    def exec(self, plugin_type: str, command: str, conf: dict, rt: Optional[RuntimeConf]) -> Optional[dict]:
        env = dict(self.env)
        env.update(CNI_COMMAND=command, CNI_PATH=":".join(self.cni_path))
        if rt is not None:
            env.update(CNI_CONTAINERID=rt.container_id, CNI_NETNS=rt.netns, CNI_IFNAME=rt.ifname,
                       CNI_ARGS=";".join(f"{k}={v}" for k, v in rt.args))
        p = subprocess.run([self.find(plugin_type)], input=json.dumps(conf).encode(), env=env,
                           capture_output=True, timeout=self.timeout)
        out, err = p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
        if p.returncode != 0:
            raise PluginError(plugin_type, command, p.returncode, out, err)
        if command == "ADD" or command == "VERSION":
            return json.loads(out)
        return None

    @staticmethod
    def plugin_conf(cl: ConfList, plugin: dict, rt: Optional[RuntimeConf], prev: Optional[dict]) -> dict:
        conf = dict(plugin)
        conf["name"] = cl.name
        conf["cniVersion"] = cl.cni_version
        if prev is not None:
            conf["prevResult"] = prev
        caps = plugin.get("capabilities") or {}
        if rt is not None:
            rc = {k: v for k, v in rt.capability_args.items() if caps.get(k)}
            if rc:
                conf["runtimeConfig"] = rc
        return conf

    # ---- verbs ----------------------------------------------------------------------------------

    def add(self, cl: ConfList, rt: RuntimeConf) -> dict:
        prev: Optional[dict] = None
        for plugin in cl.plugins:
            prev = self.exec(plugin["type"], "ADD", self.plugin_conf(cl, plugin, rt, prev), rt)
        assert prev is not None
        self.cache[(cl.name, rt.container_id, rt.ifname)] = prev
        return prev

    def check(self, cl: ConfList, rt: RuntimeConf) -> None:
        prev = self.cache.get((cl.name, rt.container_id, rt.ifname))
        if prev is None:
            raise LookupError(f"no cached result for {rt.container_id}/{rt.ifname} on {cl.name}")
        for plugin in cl.plugins:
            self.exec(plugin["type"], "CHECK", self.plugin_conf(cl, plugin, rt, prev), rt)

    def delete(self, cl: ConfList, rt: RuntimeConf) -> None:
        prev = self.cache.get((cl.name, rt.container_id, rt.ifname))
        for plugin in reversed(cl.plugins):
            self.exec(plugin["type"], "DEL", self.plugin_conf(cl, plugin, rt, prev), rt)
        self.cache.pop((cl.name, rt.container_id, rt.ifname), None)

    def status(self, cl: ConfList) -> None:
        for plugin in cl.plugins:
            self.exec(plugin["type"], "STATUS", self.plugin_conf(cl, plugin, None, None), None)

    def gc(self, cl: ConfList, valid: Sequence[tuple[str, str]]) -> None:
        attachments = [{"containerID": c, "ifname": i} for c, i in valid]
        for plugin in cl.plugins:
            conf = self.plugin_conf(cl, plugin, None, None)
            conf["cni.dev/valid-attachments"] = attachments
            self.exec(plugin["type"], "GC", conf, None)

    def version(self, plugin_type: str) -> dict:
        out = self.exec(plugin_type, "VERSION", {"cniVersion": "1.1.0"}, None)
        assert out is not None
        return out
