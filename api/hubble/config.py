"""Configuration of the Hubble API listener: address, TLS, token auth; the matching CLI options.

``flowscope server`` and ``flowscope up`` take:

* ``--hubble-listen HOST:PORT`` (default ``127.0.0.1:4245``, Hubble Relay's port; ``""`` disables it;
  ``$FLOWSCOPE_HUBBLE_LISTEN``). IPv6 as ``[::1]:4245``. When the *default* address is taken (another
  Flowscope, a ``cilium hubble port-forward``), the server logs a warning and runs without the Hubble API;
  an address given explicitly that cannot be bound stops the server with an error.
* ``--hubble-tls-cert FILE --hubble-tls-key FILE``: serve TLS (the hubble CLI: ``--tls`` or a ``tls://``
  server address); ``--hubble-tls-client-ca FILE`` additionally requires client certificates (mTLS).
* ``--hubble-token-file FILE``: require a token on every Observer call (the health service stays open).
  Each line is ``[ROLE ]TOKEN`` or ``[ROLE ]sha256:HEX`` (the token's SHA-256, so the file need not hold
  secrets); ROLE is ``viewer`` (default) or ``admin``; ``agent`` tokens are refused (ingest only).
  Clients send ``authorization: Bearer TOKEN``, or HTTP basic auth with the token as the password (the
  hubble CLI's ``--basic-auth-username any --basic-auth-password TOKEN``, which needs TLS).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import click

DEFAULT_LISTEN = "127.0.0.1:4245"
ENV_LISTEN = "FLOWSCOPE_HUBBLE_LISTEN"

Authorizer = Callable[[str], Optional[str]]
"""``token -> role`` (``viewer``, ``admin``, ``agent``) or None for an unknown token."""


class HubbleConfigError(ValueError):
    """A Hubble listener setting that cannot work; the message says which and why."""


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` / ``[V6]:PORT`` / ``:PORT`` (all interfaces) -> (host, port)."""
    s = text.strip()
    host, sep, port_text = s.rpartition(":")
    if not sep or not port_text.isdigit():
        raise HubbleConfigError(f"--hubble-listen: expected HOST:PORT, got {text!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise HubbleConfigError(f"--hubble-listen: port {port} out of range")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise HubbleConfigError(f"--hubble-listen: invalid IPv6 address in {text!r}") from None
    elif ":" in host:
        raise HubbleConfigError(f"--hubble-listen: write IPv6 addresses in brackets, e.g. [::1]:4245 (got {text!r})")
    return host or "0.0.0.0", port


def grpc_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class HubbleConfig:
    """Where and how the Observer gRPC service listens."""

    listen: str = DEFAULT_LISTEN
    explicit: bool = False  # given by the user: failing to bind it is an error, not a warning
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    tls_client_ca: Optional[str] = None
    token_file: Optional[str] = None
    authorizer: Optional[Authorizer] = field(default=None, repr=False)  # e.g. the server's token store
    node_name: Optional[str] = None  # for agent events (default: this host's name)
    state_dir: Optional[str] = None  # endpoint registry for agent events (default: $FLOWSCOPE_STATE_DIR)
    stream_queue_size: int = 10_000  # responses queued per following client before the oldest are dropped
    node_stale_after_s: float = 120.0  # a node silent for longer counts as unavailable

    def __post_init__(self) -> None:
        self.host, self.port = parse_listen(self.listen)
        if bool(self.tls_cert) != bool(self.tls_key):
            raise HubbleConfigError("--hubble-tls-cert and --hubble-tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise HubbleConfigError("--hubble-tls-client-ca needs --hubble-tls-cert and --hubble-tls-key")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @property
    def address(self) -> str:
        return grpc_address(self.host, self.port)

    def cli_args(self) -> list[str]:
        """The ``flowscope server`` options that recreate this config (``flowscope up`` passes them on);
        the default address stays implicit (so a taken default port is still only a warning)."""
        args = ["--hubble-listen", self.listen] if self.explicit else []
        for opt, value in (("--hubble-tls-cert", self.tls_cert), ("--hubble-tls-key", self.tls_key),
                           ("--hubble-tls-client-ca", self.tls_client_ca), ("--hubble-token-file", self.token_file)):
            if value:
                args += [opt, value]
        return args


def hubble_options(f: Any) -> Any:
    """The ``--hubble-*`` options (for ``flowscope server`` and ``flowscope up``)."""
    f = click.option("--hubble-token-file", type=click.Path(dir_okay=False), default=None,
                     help="Require a token on the Hubble API: a file of '[ROLE ]TOKEN' or '[ROLE ]sha256:HEX' lines.")(f)
    f = click.option("--hubble-tls-client-ca", type=click.Path(dir_okay=False), default=None,
                     help="CA for client certificates on the Hubble API (mTLS).")(f)
    f = click.option("--hubble-tls-key", type=click.Path(dir_okay=False), default=None,
                     help="TLS private key for the Hubble API.")(f)
    f = click.option("--hubble-tls-cert", type=click.Path(dir_okay=False), default=None,
                     help="TLS certificate for the Hubble API.")(f)
    f = click.option("--hubble-listen", envvar=ENV_LISTEN, default=None, metavar="HOST:PORT",
                     help=f"Hubble gRPC API (Observer) address [default: {DEFAULT_LISTEN}]; '' disables it.")(f)
    return f


DISABLED_ARGS = ["--hubble-listen", ""]
"""``flowscope server`` options for "no Hubble API"."""


def config_from_options(hubble_listen: Optional[str], hubble_tls_cert: Optional[str] = None,
                        hubble_tls_key: Optional[str] = None, hubble_tls_client_ca: Optional[str] = None,
                        hubble_token_file: Optional[str] = None, **extra: Any) -> Optional[HubbleConfig]:
    """A config from the CLI options (None: disabled). Raises click.BadParameter for bad values."""
    if hubble_listen is not None and hubble_listen.strip() == "":
        if hubble_tls_cert or hubble_token_file:
            raise click.BadParameter("TLS/token options given but the Hubble API is disabled", param_hint="--hubble-listen")
        return None
    try:
        return HubbleConfig(listen=hubble_listen or DEFAULT_LISTEN, explicit=hubble_listen is not None,
                            tls_cert=hubble_tls_cert, tls_key=hubble_tls_key, tls_client_ca=hubble_tls_client_ca,
                            token_file=hubble_token_file, **extra)
    except HubbleConfigError as e:
        raise click.BadParameter(str(e), param_hint="--hubble-*") from None
