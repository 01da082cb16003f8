"""``flowscope alert``: manage alert rules on a Flowscope server.

* ``apply -f FILE|-``  create or replace the rules in FILE (YAML or JSON; several ``---`` documents allowed);
* ``list``             rules with their condition, window, severity and how many alert groups fire;
* ``delete NAME``      delete a rule (its firing alerts are sent as resolved);
* ``test -f FILE``     evaluate a rule against the stored flows of its last window: what would fire, with
                       sample flows (nothing is stored or sent);
* ``state``            alert groups and their state; ``deliveries``: the webhook delivery log.

Errors are one line on stderr: exit status 2 for an invalid rule, 1 when the server fails or is unreachable.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import click
import httpx
import orjson

DEFAULT_SERVER = "http://127.0.0.1:8080"


class _Fail(click.ClickException):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = code

    def show(self, file: Any = None) -> None:
        click.echo(f"Error: {self.message}", err=True)


def _read(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as e:
        raise _Fail(f"cannot read {path}: {e.strerror}", 2) from None


def _call(ctx: click.Context, method: str, path: str, body: Optional[bytes] = None,
          params: Optional[dict[str, Any]] = None) -> Any:
    server = ctx.obj["server"].rstrip("/")
    headers = {"content-type": "application/yaml"} if body is not None else {}
    if ctx.obj.get("token"):
        headers["authorization"] = f"Bearer {ctx.obj['token']}"
    try:
        r = httpx.request(method, server + path, content=body, params=params, timeout=ctx.obj["timeout"],
                          headers=headers)
    except httpx.HTTPError as e:
        raise _Fail(f"cannot reach {server}: {e}") from None
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text.strip()[:300]
        raise _Fail(str(detail), 2 if r.status_code in (400, 404, 413, 422) else 1)
    return r.json()


@click.group("alert", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--server", envvar="FLOWSCOPE_SERVER", default=DEFAULT_SERVER, show_default=True,
              help="Flowscope server URL (or $FLOWSCOPE_SERVER).")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True, help="Seconds per request.")
@click.option("--token", envvar="FLOWSCOPE_TOKEN", default=None,
              help="API token ($FLOWSCOPE_TOKEN); needed when the server requires tokens (admin role to change rules).")
@click.pass_context
def alert_group(ctx: click.Context, server: str, timeout: float, token: Optional[str]) -> None:
    """Alert rules: a flow filter, a condition over a window, a webhook."""
    ctx.obj = {"server": server, "timeout": timeout, "token": token}


@alert_group.command("apply")
@click.option("-f", "--file", "path", required=True, metavar="FILE", help="Rule file (YAML or JSON; '-' = stdin).")
@click.pass_context
def apply_cmd(ctx: click.Context, path: str) -> None:
    """Create or replace the rules in FILE (all or nothing)."""
    out = _call(ctx, "POST", "/api/v1/alerts/rules", _read(path))
    for item in out["applied"]:
        click.echo(f"alert rule {item['name']} {item['result']}")


def _condition_text(c: dict[str, Any]) -> str:
    parts = [f"{k}={orjson.dumps(v).decode() if isinstance(v, (dict, list)) else v}"
             for k, v in c.items() if k not in ("window", "min_count")]
    return " ".join(parts)


@alert_group.command("list")
@click.option("-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table", show_default=True)
@click.pass_context
def list_cmd(ctx: click.Context, output: str) -> None:
    """List the rules."""
    rules = _call(ctx, "GET", "/api/v1/alerts/rules")["rules"]
    if output == "json":
        click.echo(orjson.dumps(rules, option=orjson.OPT_INDENT_2).decode())
        return
    if output == "yaml":
        import yaml

        click.echo(yaml.safe_dump_all(rules, sort_keys=False), nl=False)
        return
    state = _call(ctx, "GET", "/api/v1/alerts/state")["alerts"]
    firing: dict[str, int] = {}
    for a in state:
        if a["state"] == "firing":
            firing[a["rule"]] = firing.get(a["rule"], 0) + 1
    rows = [("NAME", "CONDITION", "WINDOW", "FOR", "SEVERITY", "FIRING", "WEBHOOK")]
    for r in rules:
        c = r["condition"]
        rows.append((r["name"], _condition_text(c), c["window"], r["for"], r["severity"],
                     str(firing.get(r["name"], 0)) + ("" if r.get("enabled", True) else " (disabled)"),
                     (r.get("webhook") or {}).get("url", "-")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


@alert_group.command("delete")
@click.argument("name")
@click.pass_context
def delete_cmd(ctx: click.Context, name: str) -> None:
    """Delete the rule NAME."""
    _call(ctx, "DELETE", f"/api/v1/alerts/rules/{name}")
    click.echo(f"alert rule {name} deleted")


@alert_group.command("test")
@click.option("-f", "--file", "path", required=True, metavar="FILE", help="One rule (YAML or JSON; '-' = stdin).")
@click.option("--samples", type=click.IntRange(min=0, max=5), default=3, show_default=True,
              help="Sample flows to show per alert group.")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.pass_context
def test_cmd(ctx: click.Context, path: str, samples: int, output: str) -> None:
    """Evaluate a rule against the stored flows of its last window and show what would fire."""
    res = _call(ctx, "POST", "/api/v1/alerts/rules/test", _read(path))
    if output == "json":
        click.echo(orjson.dumps(res, option=orjson.OPT_INDENT_2).decode())
        return
    click.echo(f"rule {res['rule']}: {res['matched_flows']} matching flows in the last {res['window']}")
    if not res["groups"]:
        click.echo("nothing would fire")
    from flowscope import printer as pr
    from flowscope.printer import load_flow_lenient

    p = pr.Printer("compact", out=sys.stdout, err=sys.stderr)
    for g in res["groups"]:
        mark = "WOULD FIRE" if g["would_fire"] else "ok"
        click.echo(f"  {mark}: {g['summary']}" + (f" (after for: {res['for']})" if g["would_fire"] and
                                                   res["for"] not in ("0s", "") else ""))
        for f in g["sample_flows"][:samples]:
            click.echo("    ", nl=False)
            p.write({"flow": load_flow_lenient(f)})
    p.close()


@alert_group.command("state")
@click.pass_context
def state_cmd(ctx: click.Context) -> None:
    """Alert groups: rule, group, state, since, value."""
    rows = [("RULE", "GROUP", "STATE", "SINCE", "VALUE")]
    for a in _call(ctx, "GET", "/api/v1/alerts/state")["alerts"]:
        rows.append((a["rule"], a["group"] or "-", a["state"], a.get("since") or "-", str(a.get("value"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


@alert_group.command("deliveries")
@click.option("--rule", default=None, help="Only this rule.")
@click.option("--limit", type=click.IntRange(min=1, max=10_000), default=50, show_default=True)
@click.pass_context
def deliveries_cmd(ctx: click.Context, rule: Optional[str], limit: int) -> None:
    """The webhook delivery log, newest first."""
    params: dict[str, Any] = {"limit": limit}
    if rule:
        params["rule"] = rule
    rows = [("TIME", "RULE", "STATE", "ATTEMPT", "RESULT", "URL")]
    for d in _call(ctx, "GET", "/api/v1/alerts/deliveries", params=params)["deliveries"]:
        result = "ok" if d["ok"] else (d["error"] or "failed")
        rows.append((d["time"] or "-", d["rule"], d["state"], str(d["attempt"]), result[:60], d["url"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
