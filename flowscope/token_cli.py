"""``flowscope token create|list|revoke``: API tokens, managed directly in the server's database.

Run where the database is reachable (the server's host, or anywhere with the PostgreSQL URL): this is how
the first admin token is made, before any token exists. A token is printed once, on stdout, and only
its SHA-256 is stored; ``list`` never shows secrets. Remote management goes through the API
(``/api/v1/tokens``, admin role).
"""

from __future__ import annotations

import json
from typing import Optional

import click

ROLE_HELP = "agent: send flows; viewer: read, stream, dashboard; admin: everything (policies, alerts, tokens)."


def _db_option(f):
    return click.option("--db", "db_url", envvar="FLOWSCOPE_DB", default=None,
                        help="The server's database URL (default $FLOWSCOPE_DB or sqlite:///./var/flowscope.db).")(f)


def _store(db_url: Optional[str]):
    from api import migrate
    from api.auth import TokenStore
    from api.db import make_engine

    engine = make_engine(db_url)
    migrate.upgrade(engine)  # a fresh database gets its tables (idempotent)
    return TokenStore(engine)


def _fail(e: Exception) -> None:
    raise click.ClickException(str(e))


@click.group("token")
def token_group() -> None:
    """Create, list and revoke API tokens (roles: agent, viewer, admin)."""


@token_group.command("create")
@click.option("--role", required=True, type=click.Choice(["agent", "viewer", "admin"]), help=ROLE_HELP)
@click.option("--name", required=True, help="What the token is for, e.g. node-1 or alice (unique among active tokens).")
@click.option("--rate-limit", type=click.FloatRange(min=0), default=None,
              help="Requests per second for this token (default: the role's; 0 = unlimited).")
@_db_option
def create_cmd(role: str, name: str, rate_limit: Optional[float], db_url: Optional[str]) -> None:
    """Create a token and print it (the only time it is shown)."""
    from api.auth import TokenError

    store = _store(db_url)
    try:
        info, token = store.create(name, role, rate_limit)
    except TokenError as e:
        _fail(e)
    finally:
        store.engine.dispose()
    click.echo(f"created token {info.id} ({info.name}, role {info.role}); it is shown only now:", err=True)
    click.echo(token)


@token_group.command("list")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked tokens.")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@_db_option
def list_cmd(include_revoked: bool, output: str, db_url: Optional[str]) -> None:
    """List tokens (never their secrets)."""
    store = _store(db_url)
    try:
        infos = store.list(include_revoked=include_revoked)
    finally:
        store.engine.dispose()
    rows = [i.to_json() for i in infos]
    if output == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no tokens", err=True)
        return
    cols = ["id", "name", "role", "created", "last_used", "revoked", "rate_limit"]
    cells = [[("" if r[c] is None else str(r[c])) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths)).rstrip())
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


@token_group.command("revoke")
@click.argument("token", metavar="ID_OR_NAME")
@_db_option
def revoke_cmd(token: str, db_url: Optional[str]) -> None:
    """Revoke a token by id or name (servers stop accepting it within 5 seconds)."""
    from api.auth import TokenError

    store = _store(db_url)
    try:
        info = store.revoke(token)
    except TokenError as e:
        _fail(e)
    finally:
        store.engine.dispose()
    click.echo(f"revoked token {info.id} ({info.name}, role {info.role})")


# ------------------------------------------------------------------------------------------------
# Options of `flowscope server` and `flowscope agent` for authentication, retention and the spool
# (registered in flowscope/cli.py; defined here to keep them next to the token commands)
# ------------------------------------------------------------------------------------------------

SERVER_OPTION_NAMES = ("auth", "rate_limit", "retention_max_age", "retention_max_size", "retention_interval")
AGENT_OPTION_NAMES = ("token", "spool_dir", "spool_max_size")


def server_security_options(f):
    """``--auth``, ``--rate-limit``, ``--retention-*`` for ``flowscope server``."""
    f = click.option("--retention-interval", default="60s", show_default=True, metavar="DURATION",
                     help="How often retention runs.")(f)
    f = click.option("--retention-max-size", default="10GiB", show_default=True, metavar="SIZE",
                     help="Delete the oldest flows while they use more than this (0 = no limit).")(f)
    f = click.option("--retention-max-age", default="7d", show_default=True, metavar="DURATION",
                     help="Delete flows older than this (0 = keep forever).")(f)
    f = click.option("--rate-limit", type=click.FloatRange(min=0), default=None,
                     help="Requests/s per API token (default per role: agent 100, viewer 50, admin 50; 0 = off).")(f)
    f = click.option("--auth", is_flag=True, default=False,
                     help="Require API tokens on loopback too (always required beyond loopback).")(f)
    return f


def server_security_settings(options: dict) -> dict:
    """``serve()`` keyword arguments from the options above."""
    from api.retention import RetentionPolicy, parse_duration, parse_size

    try:
        policy = RetentionPolicy(max_age_s=parse_duration(options["retention_max_age"]),
                                 max_bytes=parse_size(options["retention_max_size"]),
                                 interval_s=max(1.0, parse_duration(options["retention_interval"])))
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    return {"auth_required": True if options["auth"] else None, "rate_limit": options["rate_limit"],
            "retention": policy if policy.enabled else None}


def agent_security_options(f):
    """``--token``, ``--spool-dir``, ``--spool-max-size`` for ``flowscope agent``."""
    f = click.option("--spool-max-size", default="1GiB", show_default=True, metavar="SIZE",
                     help="Bound of the on-disk spool; beyond it new flows are dropped and reported as lost.")(f)
    f = click.option("--spool-dir", default=None, metavar="DIR",
                     help="Where batches wait while the server is slow or down (default "
                          "/var/lib/flowscope/spool/<server+node hash>; '' = memory only).")(f)
    f = click.option("--token", envvar="FLOWSCOPE_TOKEN", default=None,
                     help="API token with the agent role ($FLOWSCOPE_TOKEN); needed when the server requires tokens.")(f)
    return f


def apply_agent_security(cfg, options: dict) -> None:
    """Set the agent config fields from the options above."""
    from api.retention import parse_size

    cfg.token = options["token"] or None
    cfg.spool_dir = options["spool_dir"]
    try:
        cfg.spool_max_bytes = parse_size(options["spool_max_size"])
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--spool-max-size") from None
