"""``flowscope cni install``: put the plugin where runtimes look and write a network conflist.

The plugin written to ``--bin-dir`` is a three-line Python shim run as ``python -sSE`` (no site
initialisation: about 8 ms of interpreter start-up instead of ~35 ms) on this installation's
interpreter; it imports :mod:`cni.plugin` from this installation, so upgrading Flowscope upgrades
the plugin. The conflist gets the highest CNI version that every plugin in it speaks (1.1.0 when
Flowscope is alone; Debian's reference plugins stop at 1.0.0).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

import click

import cni
from cni.config import BUILTIN_IPAM, parse_netconf
from cni.errors import CNIError
from cni.versions import SUPPORTED_VERSIONS, best_common_version

PLUGIN_TYPE = "flowscope-cni"
DEFAULT_SUBNET = "10.85.0.0/16"
CHAIN_DEFAULTS = {
    "portmap": {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
    "tuning": {"type": "tuning"},
    "bandwidth": {"type": "bandwidth", "capabilities": {"bandwidth": True}},
    "firewall": {"type": "firewall"},
}
DEFAULT_PLUGIN_DIRS = ("/opt/cni/bin", "/usr/lib/cni", "/usr/libexec/cni")


def shim_text(python: str, import_root: str) -> str:
    return (
        f"#!{python} -sSE\n"
        "# flowscope-cni: the Flowscope CNI plugin, written by `flowscope cni install`.\n"
        "import sys\n"
        f"sys.path.insert(0, {import_root!r})\n"
        "from cni.plugin import main\n"
        "sys.exit(main())\n"
    )


def package_root() -> str:
    """The directory that holds the ``cni`` package (the source tree or site-packages)."""
    return str(Path(cni.__file__).resolve().parent.parent)


def _atomic_write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_conflist(name: str, subnets: list[str], mtu: int, chain: list[str], cni_version: str,
                   state_dir: str = "", log_file: str = "", link_local_gateway: bool = True) -> dict:
    """The network configuration list (pure). Raises CNIError(7) for an invalid result."""
    plugin: dict = {"type": PLUGIN_TYPE, "mtu": mtu,
                    "ipam": {"type": BUILTIN_IPAM, "ranges": [[{"subnet": s}] for s in subnets]}}
    if not link_local_gateway:
        plugin["linkLocalGateway"] = False
    if state_dir:
        plugin["stateDir"] = state_dir
    if log_file:
        plugin["logFile"] = log_file
    # Validate exactly as ADD will (fails here, not on the first container).
    from cni.ipam_config import parse_ipam_config

    parse_netconf({"cniVersion": cni_version, "name": name, **plugin}, "ADD")
    parse_ipam_config(plugin["ipam"])
    plugins = [plugin] + [dict(CHAIN_DEFAULTS.get(c, {"type": c})) for c in chain]
    return {"cniVersion": cni_version, "name": name, "plugins": plugins}


def negotiate_version(chain: list[str], plugin_dirs: list[str]) -> str:
    """The highest version we and every chained plugin speak (asked with VERSION)."""
    from cni.delegate import find_plugin, supported_versions

    best = SUPPORTED_VERSIONS[-1]
    for c in chain:
        path = find_plugin(c, plugin_dirs)
        speaks = supported_versions(path, dict(os.environ))
        common = best_common_version(best, speaks)
        if common is None:
            raise CNIError(1, f"plugin {c} shares no CNI version with flowscope-cni", f"it speaks {speaks}")
        best = common
    return best


@click.group("cni")
def cni_group() -> None:
    """The Flowscope CNI plugin: install it for container runtimes."""


@cni_group.command("install")
@click.option("--bin-dir", default="/opt/cni/bin", show_default=True, type=click.Path(file_okay=False),
              help="Where runtimes find CNI plugins (CNI_PATH).")
@click.option("--conf-dir", default="/etc/cni/net.d", show_default=True, type=click.Path(file_okay=False),
              help="Where runtimes read network configurations.")
@click.option("--name", default="flowscope", show_default=True, help="Network name.")
@click.option("--subnet", "subnets", multiple=True, help=f"Pod subnet; repeat for dual stack. [default: {DEFAULT_SUBNET}]")
@click.option("--mtu", default=1500, show_default=True, type=click.IntRange(68, 65535))
@click.option("--chain", multiple=True, help="Plugins to chain after flowscope-cni, e.g. portmap, tuning, bandwidth.")
@click.option("--cni-version", default="auto", show_default=True,
              type=click.Choice(("auto",) + SUPPORTED_VERSIONS),
              help="cniVersion of the conflist; auto = highest every plugin in the list speaks. Use 1.0.0 for "
                   "runtimes built on libcni < 1.2 (Podman 4, containerd 1.6/1.7): they cannot read 1.1.0 results.")
@click.option("--plugin-dir", "plugin_dirs", multiple=True,
              help="Where to find chained plugins when negotiating the version (default: bin-dir, /usr/lib/cni, ...).")
@click.option("--priority", default=10, show_default=True, type=click.IntRange(0, 99),
              help="Prefix of the conflist file name (runtimes pick the first file in order).")
@click.option("--state-dir", default="", help="stateDir for the plugin (default: $FLOWSCOPE_STATE_DIR or /var/run/flowscope).")
@click.option("--log-file", default="", help="Plugin log file.")
@click.option("--ipam-gateway", is_flag=True, help="Route pods via the subnet's gateway instead of 169.254.1.1/fe80::1.")
def install(bin_dir: str, conf_dir: str, name: str, subnets: tuple[str, ...], mtu: int, chain: tuple[str, ...],
            cni_version: str, plugin_dirs: tuple[str, ...], priority: int, state_dir: str, log_file: str,
            ipam_gateway: bool) -> None:
    """Write the plugin into BIN_DIR and <priority>-<name>.conflist into CONF_DIR."""
    dirs = list(plugin_dirs) or [bin_dir, *DEFAULT_PLUGIN_DIRS]
    try:
        version = negotiate_version(list(chain), dirs) if cni_version == "auto" else cni_version
        conflist = build_conflist(name, list(subnets) or [DEFAULT_SUBNET], mtu, list(chain), version,
                                  state_dir, log_file, not ipam_gateway)
    except CNIError as e:
        raise click.ClickException(str(e)) from None
    plugin_path = Path(bin_dir) / PLUGIN_TYPE
    conf_path = Path(conf_dir) / f"{priority:02d}-{name}.conflist"
    try:
        _atomic_write(plugin_path, shim_text(sys.executable, package_root()), 0o755)
        _atomic_write(conf_path, json.dumps(conflist, indent=2) + "\n", 0o644)
    except OSError as e:
        raise click.ClickException(f"cannot write {e.filename}: {e.strerror}") from None
    click.echo(f"plugin:   {plugin_path}")
    click.echo(f"conflist: {conf_path} (cniVersion {version}, plugins: "
               f"{', '.join(p['type'] for p in conflist['plugins'])})")


@cni_group.command("uninstall")
@click.option("--bin-dir", default="/opt/cni/bin", show_default=True, type=click.Path(file_okay=False))
@click.option("--conf-dir", default="/etc/cni/net.d", show_default=True, type=click.Path(file_okay=False))
@click.option("--name", default="flowscope", show_default=True)
@click.option("--priority", default=10, show_default=True, type=click.IntRange(0, 99))
def uninstall(bin_dir: str, conf_dir: str, name: str, priority: int) -> None:
    """Remove what install wrote (attached containers keep their network until DEL)."""
    for p in (Path(bin_dir) / PLUGIN_TYPE, Path(conf_dir) / f"{priority:02d}-{name}.conflist"):
        removed: Optional[bool] = None
        try:
            p.unlink()
            removed = True
        except FileNotFoundError:
            removed = False
        click.echo(f"{'removed' if removed else 'absent '} {p}")
