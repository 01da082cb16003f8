"""``flowscope``: one command for the server, the node agent, both together, the demo, and clients.

Errors are one clear line on stderr and a non-zero exit, never a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Optional

import click

from api.hubble.config import hubble_options
from flowscope.export import EXPORT_OPTION_NAMES, export_config_from_options, export_options
from flowscope.token_cli import (AGENT_OPTION_NAMES, SERVER_OPTION_NAMES, agent_security_options,
                                 apply_agent_security, server_security_options, server_security_settings)

DEFAULT_SERVER = "http://127.0.0.1:8080"


def server_option(f):
    return click.option("--server", "server", envvar="FLOWSCOPE_SERVER", default=DEFAULT_SERVER,
                        show_default=True, help="Flowscope server URL (or $FLOWSCOPE_SERVER).")(f)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


class FlowscopeGroup(click.Group):
    """Turns any unexpected exception into one line (the full traceback with --debug)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except KeyboardInterrupt:
            raise SystemExit(130)
        except Exception as e:  # noqa: BLE001 - the CLI's last line of defence
            if os.environ.get("FLOWSCOPE_DEBUG") or (ctx.obj or {}).get("debug"):
                raise
            click.echo(f"flowscope: error: {e}", err=True)
            raise SystemExit(1)


@click.group(cls=FlowscopeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="flowscope")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Flowscope: network flows from eBPF, in Hubble's schema, stored, queried and streamed."""
    ctx.obj = {"debug": debug}


# ------------------------------------------------------------------------------------ server

def _server_options(f):
    f = click.option("--db", "db_url", envvar="FLOWSCOPE_DB", default=None,
                     help="SQLAlchemy URL (default sqlite:///./var/flowscope.db).")(f)
    f = click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")(f)
    f = click.option("--port", default=8080, show_default=True, type=int, help="Port to listen on.")(f)
    return f


def _hubble_config(options: dict):
    """The Hubble gRPC API settings of the --hubble-* options, checked (one clear error, no traceback)."""
    from api.hubble.config import config_from_options
    from api.hubble.server import HubbleStartError, preflight

    try:
        return preflight(config_from_options(**options))
    except HubbleStartError as e:
        raise click.ClickException(str(e)) from None


@main.command()
@_server_options
@hubble_options
@export_options
@server_security_options
@click.option("--log-level", default="info", show_default=True)
def server(db_url: Optional[str], host: str, port: int, log_level: str, **hubble) -> None:
    """Run the API server (ingest, queries, live stream, dashboard) and Hubble's gRPC API."""
    _setup_logging(log_level)
    from api.server import serve

    export = export_config_from_options({k: hubble.pop(k) for k in EXPORT_OPTION_NAMES})  # --export-*
    security = server_security_settings({k: hubble.pop(k) for k in SERVER_OPTION_NAMES})  # --auth, --retention-*
    serve(db_url=db_url, host=host, port=port, log_level=log_level, hubble=_hubble_config(hubble), export=export,
          **security)


# ------------------------------------------------------------------------------------ agent

def _agent_options(f):
    """Every option of the node agent (shared by `agent` and `up`)."""
    opts = [
        click.option("--interface", "-i", "interfaces", multiple=True,
                     help="Interface to observe (repeatable; globs like 'veth*' allowed)."),
        click.option("--no-endpoints", is_flag=True,
                     help="Do not attach to the endpoints registered by the CNI plugin."),
        click.option("--state-dir", envvar="FLOWSCOPE_STATE_DIR", default=None,
                     help="Node state directory (endpoint registry), default /var/run/flowscope."),
        click.option("--node-name", default=socket.gethostname, show_default="hostname"),
        click.option("--update-interval", default=5.0, show_default=True, type=float,
                     help="Seconds between periodic updates of long flows."),
        click.option("--monitor-aggregation-flags", "report_tcp_flags", default="all", show_default=True,
                     help="TCP flags whose first sighting in a direction produces a flow record, e.g. "
                          "'syn,fin,rst' (fewer records per connection on churn-heavy nodes)."),
        click.option("--batch-size", default=1000, show_default=True, type=int),
        click.option("--flush-interval", default=0.2, show_default=True, type=float,
                     help="Max seconds a flow waits before it is shipped."),
        click.option("--l7/--no-l7", "l7", default=True, show_default=True,
                     help="L7 visibility (HTTP, gRPC, Kafka, DNS) through socket filters on the observed interfaces."),
        click.option("--l7-ports", default=None, metavar="PORTS",
                     help="Comma list of ports always under L7 visibility (default 53,80,3000,5000,8000,8080,"
                          "8081,9092,50051); other ports are sniffed for a known protocol."),
        click.option("--l7-cpu-budget", default=0.25, show_default=True, type=click.FloatRange(0),
                     help="CPU (in cores) the L7 capture may use on average; beyond it packets are dropped "
                          "in the kernel and reported as lost events (0 = no limit)."),
        click.option("--policy/--no-policy", "policy", default=True, show_default=True,
                     help="Enforce the server's network policies (CiliumNetworkPolicy) on the endpoints."),
        click.option("--policy-audit-mode", is_flag=True,
                     help="Global audit mode: report what policies would drop (verdict AUDIT), drop nothing."),
        export_options,
        agent_security_options,
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


AGENT_CONFIG_KEYS = ("interfaces", "no_endpoints", "state_dir", "node_name", "update_interval", "report_tcp_flags",
                     "batch_size", "flush_interval", "l7", "l7_ports", "l7_cpu_budget", "policy",
                     "policy_audit_mode")


def _pop_agent_options(kw: dict) -> dict:
    """Take the agent's options out of a command's keyword arguments."""
    names = set(AGENT_CONFIG_KEYS) | set(EXPORT_OPTION_NAMES) | set(AGENT_OPTION_NAMES)
    return {k: kw.pop(k) for k in list(kw) if k in names}


def _agent_config(server: str, opts: dict):
    from probe.agent import AgentConfig
    from probe.datapath import parse_tcp_flag_mask

    if not opts["interfaces"] and opts["no_endpoints"]:
        raise click.UsageError("nothing to observe: give --interface, or allow endpoints")
    try:
        parse_tcp_flag_mask(opts["report_tcp_flags"])
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--monitor-aggregation-flags") from None
    cfg = AgentConfig(server=server, interfaces=list(opts["interfaces"]), follow_endpoints=not opts["no_endpoints"],
                      state_dir=opts["state_dir"], node_name=opts["node_name"],
                      update_interval=opts["update_interval"], report_tcp_flags=opts["report_tcp_flags"],
                      batch_size=opts["batch_size"], flush_interval=opts["flush_interval"], l7=opts["l7"],
                      l7_cpu_budget=opts["l7_cpu_budget"],
                      policy=opts["policy"], policy_audit_mode=opts["policy_audit_mode"])
    if opts["l7_ports"] is not None:
        from probe.l7capture import parse_ports

        try:
            cfg.l7_ports = list(parse_ports(opts["l7_ports"]))
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--l7-ports") from None
    apply_agent_security(cfg, {k: opts[k] for k in AGENT_OPTION_NAMES})  # --token, --spool-*
    cfg.export = export_config_from_options({k: opts[k] for k in EXPORT_OPTION_NAMES})  # --export-*
    return cfg


@main.command()
@server_option
@_agent_options
@click.option("--cleanup", is_flag=True, help="Only remove probe filters left by a killed agent, then exit.")
@click.option("--log-level", default="info", show_default=True)
def agent(server: str, cleanup: bool, log_level: str, **kw) -> None:
    """Run the node agent: attach the tc probe, build flows, ship them to the server."""
    _setup_logging(log_level)
    if cleanup:
        from probe.datapath import remove_stale_attachments

        removed = remove_stale_attachments()
        click.echo(f"removed probe filters from {len(removed)} interface(s)")
        return
    from probe.agent import run_agent

    raise SystemExit(run_agent(_agent_config(server, _pop_agent_options(kw))))


# ------------------------------------------------------------------------------------ up

@main.command()
@_server_options
@_agent_options
@hubble_options
@click.option("--log-level", default="info", show_default=True)
def up(db_url, host, port, log_level, **kw) -> None:
    """Run the server and the agent together (the server in a child process); takes the options of both."""
    _setup_logging(log_level)
    from api.hubble.config import DISABLED_ARGS, config_from_options
    from flowscope.platform import Platform

    agent_opts = _pop_agent_options(kw)
    cfg = _agent_config("", agent_opts)  # validate the agent's options before starting anything
    hubble_cfg = config_from_options(**kw)
    if agent_opts["state_dir"]:  # the server reads the endpoint registry too (Hubble agent events)
        os.environ["FLOWSCOPE_STATE_DIR"] = agent_opts["state_dir"]
    with Platform(db_url=db_url, host=host, port=port, log_level=log_level,
                  server_args=hubble_cfg.cli_args() if hubble_cfg else DISABLED_ARGS) as plat:
        cfg.server = plat.url
        click.echo(f"Flowscope is up: {plat.url}  (Ctrl-C to stop)", err=True)
        plat.run_agent(cfg)


# ------------------------------------------------------------------------------------ demo

@main.command()
@_server_options
@click.option("--duration", type=float, default=0, help="Stop after this many seconds (0 = until Ctrl-C).")
@click.option("--log-level", default="warning", show_default=True)
def demo(db_url, host, port, duration: float, log_level: str) -> None:
    """The platform plus a small workload in network namespaces, with live flows."""
    _setup_logging(log_level)
    from flowscope.demo import run_demo

    raise SystemExit(run_demo(db_url=db_url, host=host, port=port, duration=duration, log_level=log_level))


def _register_optional() -> None:
    """Commands that live in other packages; each is added when its module is present."""
    try:
        from flowscope.observe import observe_command

        main.add_command(observe_command, "observe")
    except ImportError:
        pass
    try:
        from cni.install import cni_group

        main.add_command(cni_group, "cni")
    except ImportError:
        pass
    try:
        from enforcer.cli import policy_group

        main.add_command(policy_group, "policy")
    except ImportError:
        pass
    try:
        from flowscope.alert_cli import alert_group

        main.add_command(alert_group, "alert")
    except ImportError:
        pass
    try:
        from flowscope.token_cli import token_group

        main.add_command(token_group, "token")
    except ImportError:
        pass


_register_optional()

if __name__ == "__main__":  # pragma: no cover
    main()
