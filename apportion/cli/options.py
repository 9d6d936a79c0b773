"""What several commands share: failing with one line, logging, addresses,
settings errors, security flags."""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError

from apportion_common.logring import LINE_FORMAT, install_log_ring
from apportion_common.security import TLS, ClientSecurity, SecurityConfigError, tls_from_paths
from apportion_common.settings import SecuritySettings


def fail(message: str) -> NoReturn:
    typer.echo(f"apportion: error: {message}", err=True)
    raise typer.Exit(2)


def setup_logging(keep_lines: int | None = None) -> None:
    """Log lines to stderr from APPORTION_LOG_LEVEL up (INFO by default); with
    ``keep_lines``, also keep the newest that many in memory for GetLogs (the
    scheduler's and each worker's process), from INFO up whatever stderr
    shows: a LocalCluster quiets stderr to WARNING, as Dask's log deque
    keeps what silence_logs hides."""
    logging.basicConfig(
        level=os.environ.get("APPORTION_LOG_LEVEL", "INFO").upper(),
        format=LINE_FORMAT,
        stream=sys.stderr,
    )
    if keep_lines is None:
        return
    root = logging.getLogger()
    for handler in root.handlers:
        handler.setLevel(root.level)
    root.setLevel(min(root.level, logging.INFO))
    install_log_ring(keep_lines)


def cores() -> int:
    """The CPUs this process may run on (its affinity, as Dask counts them)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_nthreads(nworkers: int) -> int:
    """Dask's default: the cores shared out among the worker processes."""
    return max(1, cores() // max(nworkers, 1))


#: The scheduler's address, as every command that talks to it takes it.
AddressArgument = Annotated[
    str, typer.Argument(help="The scheduler, HOST:PORT.", metavar="ADDRESS", show_default=False)
]


def check_address(address: str) -> str:
    """``HOST:PORT`` (``tcp://`` in front too, the Dask habit), without the scheme."""
    bare = address.removeprefix("tcp://")
    host, sep, port = bare.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        fail(f"address {address!r}: expected HOST:PORT")
    return bare


def settings_error(exc: ValidationError) -> str:
    """The first thing pydantic found wrong, as one line naming the setting."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {first['msg'].removeprefix('Value error, ')}"


# Security options, shared by every command that serves or calls (security.py).
# Prefer the environment for tokens: other users of a machine can see argv.
TokenOption = Annotated[
    str | None,
    typer.Option(
        help="Shared secret, sent as 'authorization: Bearer TOKEN' (env APPORTION_TOKEN).",
        metavar="TOKEN",
        show_default="none",
    ),
]
TlsCaOption = Annotated[
    str | None,
    typer.Option(
        help="CA certificate (PEM) the other side's must chain to (APPORTION_TLS_CA).",
        metavar="FILE",
        show_default="no TLS",
    ),
]
TlsCertOption = Annotated[
    str | None,
    typer.Option(
        help="This side's certificate (PEM) (APPORTION_TLS_CERT).",
        metavar="FILE",
        show_default="no TLS",
    ),
]
TlsKeyOption = Annotated[
    str | None,
    typer.Option(
        help="This side's private key (PEM) (APPORTION_TLS_KEY).",
        metavar="FILE",
        show_default="no TLS",
    ),
]


def security_settings(**flags: str | None) -> SecuritySettings:
    """Flags over APPORTION_TOKEN, APPORTION_TLS_* and the like; bad ones exit 2."""
    try:
        given: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
        return SecuritySettings(**given)
    except ValidationError as exc:
        fail(settings_error(exc))


def read_tls(settings: SecuritySettings, serving: bool) -> TLS | None:
    """The TLS files, read now: a missing or bad one stops us before anything starts."""
    try:
        tls = tls_from_paths(settings.tls_ca, settings.tls_cert, settings.tls_key)
        if tls is not None and serving:
            tls.server_credentials()
        elif tls is not None:
            tls.channel_credentials()
    except SecurityConfigError as exc:
        fail(str(exc))
    return tls


def caller_security(
    token: str | None, tls_ca: str | None, tls_cert: str | None, tls_key: str | None
) -> ClientSecurity:
    """For commands that call the scheduler as a client: --token, else
    APPORTION_CLIENT_TOKEN, else APPORTION_TOKEN."""
    settings = security_settings(token=token, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
    chosen = settings.token if token is not None else settings.client_role_token
    return ClientSecurity(chosen, read_tls(settings, serving=False))
