"""``flowscope policy``: apply, list, get and delete network policies on the Flowscope server.

    flowscope policy apply -f policy.yaml            # or -f - for stdin; several -f allowed
    flowscope policy list [-n NAMESPACE] [-o table|json|yaml]
    flowscope policy get NAME [-n NAMESPACE] [-o yaml|json]
    flowscope policy delete NAME [-n NAMESPACE]

Policies are validated here first (every problem listed with its field path, nothing sent), then by
the server, which stores them with a revision; agents put them in the kernel within a second.
Exit codes: 0 ok, 1 rejected or failed, 2 usage.
"""

from __future__ import annotations

import sys
from typing import Optional

import click
import orjson
import yaml

from .client import PolicyAPIError, PolicyClient
from .policy import AUDIT_ANNOTATION, PolicyValidationError, load_policies

DEFAULT_SERVER = "http://127.0.0.1:8080"


def _server_option(f):
    return click.option("--server", envvar="FLOWSCOPE_SERVER", default=DEFAULT_SERVER, show_default=True,
                        help="Flowscope server URL (or $FLOWSCOPE_SERVER).")(f)


def _token_option(f):
    return click.option("--token", envvar="FLOWSCOPE_TOKEN", default=None, help="Bearer token ($FLOWSCOPE_TOKEN).")(f)


def _ns_option(f):
    f = click.option("--cluster-wide", "cluster_wide", is_flag=True,
                     help="A CiliumClusterwideNetworkPolicy (no namespace).")(f)
    return click.option("--namespace", "-n", default="default", show_default=True, help="Policy namespace.")(f)


def _fail(msg: str, code: int = 1) -> None:
    click.echo(f"Error: {msg}", err=True)
    raise click.exceptions.Exit(code)


def _report_invalid(errors: list, header: str) -> None:
    click.echo(f"Error: {header}", err=True)
    for e in errors:
        if isinstance(e, dict):
            where = ", ".join(x for x in (e.get("where", ""), f"policy {e['policy']}" if e.get("policy") else "") if x)
            path = e.get("path", "")
            body = f"{path}: {e.get('message', '')}" if path else e.get("message", "")
        else:
            where = ", ".join(x for x in (e.where, f"policy {e.policy}" if e.policy else "") if x)
            body = f"{e.path}: {e.message}" if e.path else e.message
        click.echo(f"  {where + ': ' if where else ''}{body}", err=True)
    raise click.exceptions.Exit(1)


def _client(server: str, token: Optional[str]) -> PolicyClient:
    return PolicyClient(server, token)


def _read_inputs(files: tuple[str, ...]) -> list[tuple[str, bytes]]:
    out = []
    for path in files:
        if path == "-":
            out.append(("<stdin>", sys.stdin.buffer.read()))
            continue
        try:
            with open(path, "rb") as fh:
                out.append((path, fh.read()))
        except OSError as e:
            _fail(f"cannot read {path}: {e.strerror}", 2)
    return out


@click.group("policy", context_settings={"help_option_names": ["-h", "--help"]})
def policy_group() -> None:
    """Network policies (CiliumNetworkPolicy): apply, list, get, delete."""


@policy_group.command("apply")
@click.option("--filename", "-f", "files", multiple=True, required=True, metavar="FILE",
              help="Policy file (YAML or JSON; several documents allowed); '-' reads stdin. Repeatable.")
@click.option("--namespace", "-n", default="default", show_default=True,
              help="Namespace of policies that do not name one.")
@click.option("--dry-run", is_flag=True, help="Only validate; send nothing.")
@_server_option
@_token_option
def apply_cmd(files: tuple[str, ...], namespace: str, dry_run: bool, server: str, token: Optional[str]) -> None:
    """Create or update policies (all of them, or none when one is invalid)."""
    inputs = _read_inputs(files)
    errors, policies = [], []
    for name, data in inputs:
        try:
            policies.extend(load_policies(data, default_namespace=namespace))
        except PolicyValidationError as e:
            for err in e.errors:
                where = ", ".join(x for x in (name if len(inputs) > 1 else "", err.where) if x)
                errors.append(type(err)(err.path, err.message, where, err.policy))
    if errors:
        n = len(errors)
        _report_invalid(errors, f"invalid policy ({n} error{'s' if n != 1 else ''}); nothing was applied")
    if dry_run:
        n = len(policies)
        click.echo(f"{n} polic{'ies' if n != 1 else 'y'} valid (dry run, nothing sent)")
        return
    # One request with every policy (canonical JSON): the server applies all of them or none.
    body = orjson.dumps([p.to_dict() for p in policies])
    with _client(server, token) as c:
        try:
            res = c.apply(body, namespace=namespace)
        except PolicyAPIError as e:
            if e.status == 422 and e.errors:
                _report_invalid(e.errors, "the server rejected the policies; nothing was applied")
            _fail(str(e))
            return
    for r in res["results"]:
        ref = f"{r['namespace']}/{r['name']}" if r["namespace"] else r["name"]
        click.echo(f"{r['kind'].lower()} {ref} {r['action']} (revision {r['revision']})")


@policy_group.command("list")
@click.option("--namespace", "-n", default=None, help="Only this namespace (default: all).")
@click.option("--output", "-o", type=click.Choice(["table", "json", "yaml"]), default="table", show_default=True)
@_server_option
@_token_option
def list_cmd(namespace: Optional[str], output: str, server: str, token: Optional[str]) -> None:
    """List policies (with the policy set's revision)."""
    with _client(server, token) as c:
        try:
            snap = c.list(namespace)
        except PolicyAPIError as e:
            _fail(str(e))
            return
    if output == "json":
        click.echo(orjson.dumps({"revision": snap.revision, "items": snap.items}, option=orjson.OPT_INDENT_2).decode())
        return
    if output == "yaml":
        click.echo(yaml.safe_dump_all([i["policy"] for i in snap.items], sort_keys=False), nl=False)
        return
    rows = [("NAMESPACE", "NAME", "KIND", "REVISION", "AUDIT", "UPDATED")]
    for i in snap.items:
        ann = (i["policy"].get("metadata", {}).get("annotations") or {}).get(AUDIT_ANNOTATION, "")
        specs = [i["policy"].get("spec")] + list(i["policy"].get("specs") or [])
        audit = ann.lower() == "true" or any(s and s.get("auditMode") for s in specs)
        rows.append((i["namespace"] or "-", i["name"], i["kind"], str(i["revision"]), "yes" if audit else "",
                     i["updated"][:19].replace("T", " ")))
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    click.echo(f"({len(snap.items)} polic{'ies' if len(snap.items) != 1 else 'y'}, revision {snap.revision})", err=True)


@policy_group.command("get")
@click.argument("name")
@_ns_option
@click.option("--output", "-o", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True)
@_server_option
@_token_option
def get_cmd(name: str, namespace: str, cluster_wide: bool, output: str, server: str, token: Optional[str]) -> None:
    """Show one policy (its canonical document)."""
    ns = "" if cluster_wide else namespace
    with _client(server, token) as c:
        try:
            item = c.get(ns, name)
        except PolicyAPIError as e:
            _fail(str(e))
            return
    if output == "json":
        click.echo(orjson.dumps(item, option=orjson.OPT_INDENT_2).decode())
        return
    click.echo(f"# revision {item['revision']}, updated {item['updated']}")
    click.echo(yaml.safe_dump(item["policy"], sort_keys=False), nl=False)


@policy_group.command("delete")
@click.argument("names", nargs=-1, required=True)
@_ns_option
@_server_option
@_token_option
def delete_cmd(names: tuple[str, ...], namespace: str, cluster_wide: bool, server: str, token: Optional[str]) -> None:
    """Delete policies by name."""
    ns = "" if cluster_wide else namespace
    failed = False
    with _client(server, token) as c:
        for name in names:
            try:
                res = c.delete(ns, name)
            except PolicyAPIError as e:
                click.echo(f"Error: {e}", err=True)
                failed = True
                continue
            d = res["deleted"]
            ref = f"{d['namespace']}/{d['name']}" if d["namespace"] else d["name"]
            click.echo(f"{d['kind'].lower()} {ref} deleted (revision {res['revision']})")
    if failed:
        raise click.exceptions.Exit(1)
