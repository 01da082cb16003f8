"""The verbs. :func:`execute` takes one invocation (environment + stdin) and returns what the plugin
prints and its exit status; the thin client runs it in-process (standalone) and the node agent's
:class:`~cni.service.CNIService` runs it for forwarded requests.

ADD order (undone in reverse on any failure, so a failed ADD leaves nothing behind):
attachment record (``adding``) -> IPAM -> veth + addresses + routes -> forwarding -> endpoint record
-> attachment record (``ready``) -> result.
DEL releases IPAM first, then the host veth (the peer goes with it), the endpoint and attachment
records; every step is attempted and missing pieces are fine.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

from cni import errors as E
from cni import link
from cni.attachments import Attachment, AttachmentStore, attachment_lock
from cni.config import (NetConf, Request, decode_stdin, host_ifname, labels_from, parse_env, parse_netconf,
                        pod_identity, requested_ips, requested_mac)
from cni.errors import CNIError
from cni.ipam import Address, ipam_for
from cni.log import RequestLog
from cni.netns import netlink_in, open_netns
from cni.versions import CURRENT_VERSION, SUPPORTED_VERSIONS, render_result, version_info
from flowscope.endpoints import EndpointRecord, EndpointStore, default_state_dir

SOCKET_NAME = "cni.sock"


@dataclass
class Response:
    status: int
    stdout: bytes = b""
    stderr: bytes = b""


@dataclass
class Context:
    req: Request
    conf: NetConf
    state_dir: Path
    log: RequestLog
    agent: bool  # True when the node agent's service runs this request


def state_dir_for(conf: Optional[NetConf], env: Mapping[str, str]) -> Path:
    if conf is not None and conf.state_dir:
        return Path(conf.state_dir)
    if env.get("FLOWSCOPE_STATE_DIR"):
        return Path(env["FLOWSCOPE_STATE_DIR"])
    return default_state_dir()


def _peek_version(stdin: bytes) -> str:
    """The config's version for rendering an error, when it can be read and is one we speak."""
    try:
        v = json.loads(stdin).get("cniVersion")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return CURRENT_VERSION
    return v if v in SUPPORTED_VERSIONS else CURRENT_VERSION


def _early_log_config(log: RequestLog, obj: dict) -> None:
    """Honour logFile/logLevel even when the rest of the config turns out invalid (that error is logged too)."""
    level, file = obj.get("logLevel"), obj.get("logFile")
    log.configure(level.lower() if isinstance(level, str) else "info", file if isinstance(file, str) else "")


def execute(env: Mapping[str, str], stdin: bytes, *, agent: bool = False) -> Response:
    log = RequestLog(env.get("CNI_COMMAND", ""), env.get("CNI_CONTAINERID", ""), env.get("CNI_IFNAME", ""))
    version = _peek_version(stdin)
    started = time.perf_counter()
    try:
        req = parse_env(env)
        if req.command == "VERSION":
            return Response(0, json.dumps(version_info()).encode() + b"\n")
        obj = decode_stdin(stdin)
        _early_log_config(log, obj)
        conf = parse_netconf(obj, req.command)
        version = conf.cni_version
        log.configure(conf.log_level, conf.log_file)
        ctx = Context(req, conf, state_dir_for(conf, env), log, agent)
        out = VERBS[req.command](ctx)
        log.info(f"{req.command} done", network=conf.name, ms=f"{(time.perf_counter() - started) * 1e3:.1f}",
                 path="service" if agent else "standalone")
        stdout = (json.dumps(out) + "\n").encode() if out is not None else b""
        resp = Response(0, stdout)
    except CNIError as e:
        log.error(e.msg, code=e.code, details=e.details)
        resp = Response(1, (json.dumps(e.to_dict(version)) + "\n").encode())
    except Exception as e:  # never a traceback on stdout: an internal error with the reason
        log.error("internal error", error=repr(e))
        log.debug("traceback", tb=traceback.format_exc().replace("\n", " | "))
        err = CNIError(E.INTERNAL, "internal error", f"{type(e).__name__}: {e}")
        resp = Response(1, (json.dumps(err.to_dict(version)) + "\n").encode())
    problem = log.flush_file()
    resp.stderr = (log.render() + (f"flowscope-cni: {problem}\n" if problem else "")).encode()
    return resp


# ---- ADD ------------------------------------------------------------------------------------------


def _merge_prev(prev: Optional[dict], ours: dict) -> dict:
    """Append our interfaces/ips/routes to a chained prevResult (indices shifted)."""
    if not prev:
        return ours
    base = len(prev.get("interfaces") or [])
    out = {
        "interfaces": list(prev.get("interfaces") or []) + ours["interfaces"],
        "ips": list(prev.get("ips") or []) + [dict(ip, interface=ip["interface"] + base) for ip in ours["ips"]],
        "routes": list(prev.get("routes") or []) + ours["routes"],
        "dns": {**(prev.get("dns") or {}), **ours.get("dns", {})},
    }
    return out


def build_result(ctx: Context, addrs: list[Address], p: link.Plumbed, dns: dict) -> dict:
    req, conf = ctx.req, ctx.conf
    ips = []
    for a in addrs:
        plen = 32 if a.version == 4 else 128
        ips.append({"address": f"{a.ip}/{plen}", "gateway": p.gateways.get(a.version, ""), "interface": 1})
    return {
        "interfaces": [
            {"name": p.host_ifname, "mac": p.host_mac, "mtu": p.mtu},
            {"name": req.ifname, "mac": p.cont_mac, "mtu": p.mtu, "sandbox": req.netns},
        ],
        "ips": ips,
        "routes": p.routes,
        "dns": {**dns, **conf.dns},
    }


class _Undo:
    def __init__(self, log: RequestLog):
        self.steps: list[tuple[str, Callable[[], object]]] = []
        self.log = log

    def push(self, what: str, fn: Callable[[], object]) -> None:
        self.steps.append((what, fn))

    def run(self) -> None:
        for what, fn in reversed(self.steps):
            try:
                fn()
                self.log.info("rolled back", step=what)
            except Exception as e:  # keep undoing the rest
                self.log.error("rollback step failed", step=what, error=str(e))
        self.steps.clear()


def _delete_host_link(name: str) -> bool:
    with netlink_in() as host:
        return link.delete_link(host, name)


def cmd_add(ctx: Context) -> dict:
    req, conf, log = ctx.req, ctx.conf, ctx.log
    # Everything the request asks for is validated before anything is touched.
    labels = labels_from(conf, req.args)
    mac = requested_mac(conf, req.args)
    static_ips = requested_ips(conf, req.args)
    namespace, pod = pod_identity(req.container_id, req.args)
    hname = host_ifname(conf.host_if_prefix, req.container_id, req.ifname)
    ns_fd = open_netns(req.netns)
    attachments = AttachmentStore(ctx.state_dir)
    endpoints = EndpointStore(ctx.state_dir)
    undo = _Undo(log)
    try:
        with attachment_lock(ctx.state_dir, req.container_id, req.ifname):
            try:
                if attachments.exists(conf.name, req.container_id, req.ifname):
                    raise CNIError(E.INTERFACE_EXISTS, f"{req.container_id}/{req.ifname} is already attached "
                                   f"to network {conf.name}", "ADD was repeated without DEL")
                att = Attachment(conf.name, req.container_id, req.ifname, req.netns, hname, conf.ipam_type,
                                 "adding", conf.cni_version, {}, time.time_ns())
                attachments.put(att)
                undo.push("attachment record", lambda: attachments.delete(conf.name, req.container_id, req.ifname))
                ipam = ipam_for(conf, ctx.state_dir, req.path)
                res = ipam.add(req.container_id, req.ifname, static_ips, req.env)
                undo.push("IPAM reservation", lambda: ipam.delete(req.container_id, req.ifname, req.env))
                log.debug("addresses allocated", ips=",".join(a.ip for a in res.addresses))
                with netlink_in() as host, netlink_in(ns_fd) as ns:
                    p = link.plumb(host, ns, ns_fd, hname, req.ifname, conf.mtu, mac, res.addresses,
                                   conf.link_local_gateway, res.routes)
                undo.push(f"veth {hname}", lambda: _delete_host_link(hname))
                link.enable_forwarding(any(a.version == 6 for a in res.addresses))
                result = build_result(ctx, res.addresses, p, res.dns)
                rec = EndpointRecord(
                    container_id=req.container_id, ifname=req.ifname, netns=req.netns, host_ifname=hname,
                    host_ifindex=p.host_index, ips=[a.ip for a in res.addresses], namespace=namespace,
                    pod_name=pod, labels=labels, endpoint_id=p.host_index, identity=0,
                    node_name=socket.gethostname(), mac=p.cont_mac, created_ns=att.created_ns)
                endpoints.put(rec)
                undo.push("endpoint record", lambda: endpoints.delete(req.container_id, req.ifname))
                att.state, att.result = "ready", result
                attachments.put(att)
                undo.steps.clear()
            except BaseException:
                undo.run()
                raise
    finally:
        os.close(ns_fd)
    log.info("attached", host_if=hname, ips=",".join(a.ip for a in res.addresses), pod=f"{namespace}/{pod}")
    return render_result(_merge_prev(conf.prev_result, result), conf.cni_version)


# ---- DEL ------------------------------------------------------------------------------------------


def _teardown(ctx: Context, container_id: str, ifname: str, env: Mapping[str, str],
              att: Optional[Attachment]) -> list[CNIError]:
    """Best-effort removal of one attachment (call with its lock held). Returns the failures."""
    conf, log = ctx.conf, ctx.log
    failures: list[CNIError] = []
    try:
        ipam = ipam_for(conf, ctx.state_dir, ctx.req.path)
        released = ipam.delete(container_id, ifname, env)
        if released:
            log.debug("released addresses", ips=",".join(released))
    except CNIError as e:
        log.error("IPAM release failed", error=str(e))
        failures.append(e)
    hname = att.host_ifname if att and att.host_ifname else host_ifname(conf.host_if_prefix, container_id, ifname)
    try:
        if _delete_host_link(hname):
            log.debug("deleted veth", host_if=hname)
    except CNIError as e:
        log.error("veth removal failed", error=str(e))
        failures.append(e)
    EndpointStore(ctx.state_dir).delete(container_id, ifname)
    AttachmentStore(ctx.state_dir).delete(conf.name, container_id, ifname)
    return failures


def cmd_del(ctx: Context) -> None:
    req = ctx.req
    with attachment_lock(ctx.state_dir, req.container_id, req.ifname):
        att = AttachmentStore(ctx.state_dir).get(ctx.conf.name, req.container_id, req.ifname)
        failures = _teardown(ctx, req.container_id, req.ifname, req.env, att)
    if failures:
        raise failures[0]
    return None


# ---- CHECK ----------------------------------------------------------------------------------------


def _mismatch(what: str) -> CNIError:
    return CNIError(E.CHECK_FAILED, "attachment does not match prevResult", what)


def cmd_check(ctx: Context) -> None:
    req, conf = ctx.req, ctx.conf
    prev = conf.prev_result
    if prev is None:
        raise CNIError(E.INVALID_CONFIG, "invalid network configuration", "CHECK needs prevResult")
    ns_fd = open_netns(req.netns)
    try:
        ifaces = prev.get("interfaces") or []
        mine = [i for i, itf in enumerate(ifaces) if itf.get("name") == req.ifname and itf.get("sandbox")]
        if not mine:
            raise _mismatch(f"prevResult has no interface {req.ifname} in a sandbox")
        idx = mine[0]
        want = ifaces[idx]
        if want.get("sandbox") != req.netns:
            raise _mismatch(f"prevResult puts {req.ifname} in {want.get('sandbox')}, CNI_NETNS is {req.netns}")
        ips = [ip for ip in prev.get("ips") or [] if ip.get("interface", idx) == idx]
        att = AttachmentStore(ctx.state_dir).get(conf.name, req.container_id, req.ifname)
        hname = att.host_ifname if att and att.host_ifname else host_ifname(conf.host_if_prefix, req.container_id,
                                                                             req.ifname)
        with netlink_in(ns_fd) as ns, netlink_in() as host:
            cont = link.read_link(ns, req.ifname)
            hst = link.read_link(host, hname)
        if cont is None:
            raise _mismatch(f"interface {req.ifname} does not exist in {req.netns}")
        if want.get("mac") and want["mac"].lower() != cont.mac.lower():
            raise _mismatch(f"{req.ifname} has MAC {cont.mac}, prevResult says {want['mac']}")
        if cont.mtu != conf.mtu:
            raise _mismatch(f"{req.ifname} has MTU {cont.mtu}, the config says {conf.mtu}")
        if not cont.up:
            raise _mismatch(f"{req.ifname} is down")
        for ip in ips:
            itf = ipaddress.ip_interface(ip["address"])
            if f"{itf.ip}/{itf.network.prefixlen}" not in cont.addresses:
                raise _mismatch(f"{req.ifname} lacks address {ip['address']} (has {sorted(cont.addresses)})")
        for r in prev.get("routes") or []:
            net = str(ipaddress.ip_network(r["dst"], strict=False))
            if not any(d == net and (not r.get("gw") or g == r["gw"]) for d, g in cont.routes):
                raise _mismatch(f"route {net} via {r.get('gw', '-')} is missing in the container")
        if hst is None:
            raise _mismatch(f"host interface {hname} does not exist")
        if not hst.up:
            raise _mismatch(f"host interface {hname} is down")
        for ip in ips:
            a = ipaddress.ip_interface(ip["address"]).ip
            host_dst = f"{a}/{32 if a.version == 4 else 128}"
            if not any(d == host_dst for d, _ in hst.routes):
                raise _mismatch(f"host route {host_dst} via {hname} is missing")
        plain = [str(ipaddress.ip_interface(ip["address"]).ip) for ip in ips]
        ipam_for(conf, ctx.state_dir, req.path).check(req.container_id, req.ifname, plain, req.env)
        rec = EndpointStore(ctx.state_dir).get(req.container_id, req.ifname)
        if rec is None:
            raise _mismatch(f"endpoint record for {req.container_id}/{req.ifname} is missing")
        if sorted(rec.ips) != sorted(plain):
            raise _mismatch(f"endpoint record has {rec.ips}, prevResult {plain}")
    finally:
        os.close(ns_fd)
    return None


# ---- STATUS / GC ----------------------------------------------------------------------------------


def cmd_status(ctx: Context) -> None:
    if not ctx.agent:
        sock = ctx.state_dir / SOCKET_NAME
        raise CNIError(E.NOT_AVAILABLE, "flowscope node agent is not reachable",
                       f"no CNI service answers at {sock}; start the agent (ADD still works standalone)")
    try:
        ctx.state_dir.mkdir(parents=True, exist_ok=True)
        probe = ctx.state_dir / f".status-{os.getpid()}-{threading.get_ident()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CNIError(E.NOT_AVAILABLE_IMPACT, "state directory is not writable",
                       f"{ctx.state_dir}: {e.strerror or e}; ADD and DEL cannot record attachments") from None
    ipam_for(ctx.conf, ctx.state_dir, ctx.req.path).ready(ctx.req.env)
    return None


def cmd_gc(ctx: Context) -> None:
    conf, log = ctx.conf, ctx.log
    raw = conf.raw.get("cni.dev/valid-attachments")
    if not isinstance(raw, list) or not all(isinstance(a, dict) and isinstance(a.get("containerID"), str)
                                            and isinstance(a.get("ifname"), str) for a in raw):
        raise CNIError(E.INVALID_CONFIG, "invalid network configuration",
                       'GC needs "cni.dev/valid-attachments": [{"containerID", "ifname"}, ...]')
    valid = {(a["containerID"], a["ifname"]) for a in raw}
    store = AttachmentStore(ctx.state_dir)
    failures: list[CNIError] = []
    for att in store.list(conf.name):
        if (att.container_id, att.ifname) in valid:
            continue
        with attachment_lock(ctx.state_dir, att.container_id, att.ifname):
            current = store.get(conf.name, att.container_id, att.ifname)
            if current is None:
                continue  # a DEL got there first
            env = dict(ctx.req.env, CNI_CONTAINERID=att.container_id, CNI_IFNAME=att.ifname,
                       CNI_NETNS=att.netns, CNI_COMMAND="DEL")
            log.info("gc: removing stale attachment", stale=f"{att.container_id}/{att.ifname}")
            failures += _teardown(ctx, att.container_id, att.ifname, env, current)
    ipam = ipam_for(conf, ctx.state_dir, ctx.req.path)
    released = ipam.gc(valid, ctx.req.env,
                       protected=lambda c, i: store.exists(conf.name, c, i))
    for r in released:
        log.info("gc: released orphaned address", address=r)
    if failures:
        raise failures[0]
    return None


VERBS: dict[str, Callable[[Context], Optional[dict]]] = {
    "ADD": cmd_add,
    "DEL": cmd_del,
    "CHECK": cmd_check,
    "STATUS": cmd_status,
    "GC": cmd_gc,
}
