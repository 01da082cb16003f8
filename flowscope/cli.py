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
    f = click.option("--interface", "-i", "interfaces", multiple=True,
                     help="Interface to observe (repeatable; globs like 'veth*' allowed).")(f)
    f = click.option("--no-endpoints", is_flag=True,
                     help="Do not attach to the endpoints registered by the CNI plugin.")(f)
    f = click.option("--state-dir", envvar="FLOWSCOPE_STATE_DIR", default=None,
                     help="Node state directory (endpoint registry), default /var/run/flowscope.")(f)
    f = click.option("--node-name", default=socket.gethostname, show_default="hostname")(f)
    f = click.option("--update-interval", default=5.0, show_default=True, type=float,
                     help="Seconds between periodic updates of long flows.")(f)
    f = click.option("--batch-size", default=1000, show_default=True, type=int)(f)
    f = click.option("--flush-interval", default=0.2, show_default=True, type=float,
                     help="Max seconds a flow waits before it is shipped.")(f)
    return f


def _agent_config(server: str, interfaces, no_endpoints, state_dir, node_name, update_interval,
                  batch_size, flush_interval):
    from probe.agent import AgentConfig

    return AgentConfig(server=server, interfaces=list(interfaces), follow_endpoints=not no_endpoints,
                       state_dir=state_dir, node_name=node_name, update_interval=update_interval,
                       batch_size=batch_size, flush_interval=flush_interval)


@main.command()
@server_option
@_agent_options
@click.option("--l7/--no-l7", "l7", default=True, show_default=True,
              help="L7 visibility (HTTP, gRPC, Kafka, DNS) through socket filters on the observed interfaces.")
@click.option("--l7-ports", default=None, metavar="PORTS",
              help="Comma list of ports always under L7 visibility (default 53,80,3000,5000,8000,8080,8081,"
                   "9092,50051); other ports are sniffed for a known protocol.")
@click.option("--policy/--no-policy", "policy", default=True, show_default=True,
              help="Enforce the server's network policies (CiliumNetworkPolicy) on the endpoints.")
@click.option("--policy-audit-mode", is_flag=True,
              help="Global audit mode: report what policies would drop (verdict AUDIT), drop nothing.")
@click.option("--cleanup", is_flag=True, help="Only remove probe filters left by a killed agent, then exit.")
@export_options
@agent_security_options
@click.option("--log-level", default="info", show_default=True)
def agent(server: str, interfaces, no_endpoints, state_dir, node_name, update_interval, batch_size,
          flush_interval, l7: bool, l7_ports: Optional[str], policy: bool, policy_audit_mode: bool, cleanup: bool,
          log_level: str, **export) -> None:
    """Run the node agent: attach the tc probe, build flows, ship them to the server."""
    _setup_logging(log_level)
    from probe.datapath import remove_stale_attachments

    if cleanup:
        removed = remove_stale_attachments()
        click.echo(f"removed probe filters from {len(removed)} interface(s)")
        return
    if not interfaces and no_endpoints:
        raise click.UsageError("nothing to observe: give --interface, or allow endpoints")
    from probe.agent import run_agent

    cfg = _agent_config(server, interfaces, no_endpoints, state_dir, node_name, update_interval,
                        batch_size, flush_interval)
    cfg.l7 = l7
    cfg.policy = policy
    cfg.policy_audit_mode = policy_audit_mode
    apply_agent_security(cfg, {k: export.pop(k) for k in AGENT_OPTION_NAMES})  # --token, --spool-*
    cfg.export = export_config_from_options(export)  # --export-* (flow export to a file)
    if l7_ports is not None:
        from probe.l7capture import parse_ports

        try:
            cfg.l7_ports = list(parse_ports(l7_ports))
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--l7-ports") from None
    raise SystemExit(run_agent(cfg))


# ------------------------------------------------------------------------------------ up

@main.command()
@_server_options
@_agent_options
@hubble_options
@click.option("--log-level", default="info", show_default=True)
def up(db_url, host, port, interfaces, no_endpoints, state_dir, node_name, update_interval, batch_size,
       flush_interval, log_level, **hubble) -> None:
    """Run the server and the agent together (the server in a child process)."""
    _setup_logging(log_level)
    from api.hubble.config import DISABLED_ARGS, config_from_options
    from flowscope.platform import Platform

    hubble_cfg = config_from_options(**hubble)
    if state_dir:  # the server reads the endpoint registry too (Hubble agent events)
        os.environ["FLOWSCOPE_STATE_DIR"] = state_dir
    with Platform(db_url=db_url, host=host, port=port, log_level=log_level,
                  server_args=hubble_cfg.cli_args() if hubble_cfg else DISABLED_ARGS) as plat:
        cfg = _agent_config(plat.url, interfaces, no_endpoints, state_dir, node_name, update_interval,
                            batch_size, flush_interval)
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
