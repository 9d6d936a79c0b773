"""``apportion local``: a scheduler and workers on this machine until interrupted."""

from __future__ import annotations

import signal
import threading
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from apportion_common.config_file import ConfigError
from apportion_common.resources import ResourceSpecError, parse_spellings
from apportion_common.settings import SchedulerSettings, WorkerSettings

from .options import (
    TlsCaOption,
    TlsCertOption,
    TlsKeyOption,
    TokenOption,
    default_nthreads,
    fail,
    read_tls,
    security_settings,
    settings_error,
)


def local(
    workers: Annotated[int, typer.Option(help="Worker processes.", metavar="N")] = 2,
    nthreads: Annotated[
        int | None,
        typer.Option(
            help="Threads per worker.", metavar="N", show_default="the cores divided by --workers"
        ),
    ] = None,
    resources: Annotated[
        str | None,
        typer.Option(
            help="Resources of each worker; GPU=auto and GPU_MEMORY=auto: the GPUs it may "
            "use, shared out evenly among the workers.",
            metavar="SPEC",
            show_default="none",
        ),
    ] = None,
    memory_limit: Annotated[
        str | None,
        typer.Option(
            help="Memory each worker process may use (not the MEMORY resource): bytes or "
            "300MB, 2GiB...; auto: the machine's divided by --workers; 0: no limit.",
            metavar="BYTES",
            show_default="auto",
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(help="Scheduler port (0 picks one).", metavar="PORT", show_default="8786"),
    ] = None,
    token: TokenOption = None,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
) -> None:
    """Run a scheduler and workers on this machine until interrupted."""
    try:
        # As written: each worker declares MEMORY=100GB so, and status shows it so.
        res = parse_spellings(resources) if resources is not None else None
        # Flags over the environment over the configuration file; resources
        # not given here are the workers' own to read (LocalCluster).
        given: dict[str, Any] = {} if port is None else {"port": port}
        chosen = SchedulerSettings(**given)
        given = {} if res is None else {"resources": res}
        if memory_limit is not None:
            given["memory_limit"] = memory_limit
        configured = WorkerSettings(**given)
    except (ResourceSpecError, ConfigError) as exc:
        fail(str(exc))
    except ValidationError as exc:
        fail(settings_error(exc))
    if nthreads is None:
        nthreads = configured.nthreads or default_nthreads(workers)
    if workers < 0 or nthreads < 1:
        fail("--workers must be >= 0 and --nthreads >= 1")
    secure = security_settings(token=token, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
    tls = read_tls(secure, serving=True)
    from client_sdk import LocalCluster  # see app.py: services load when their command runs

    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        cluster = LocalCluster(
            n_workers=workers,
            nthreads=nthreads,
            resources=res,
            memory_limit=configured.memory_limit,
            port=chosen.port,
            token=secure.token,
            tls=tls,
        )
    except ValueError as exc:  # GPU=auto: no GPU, or a count that does not share them out
        fail(str(exc))
    except (RuntimeError, TimeoutError) as exc:
        fail(f"the local cluster did not start: {exc}")
    with cluster:
        typer.echo(f"apportion local cluster: scheduler at {cluster.address}, {workers} workers")
        creds = ", token=..." if secure.token else ""
        creds += ", tls=TLS(ca=..., cert=..., key=...)" if tls is not None else ""
        typer.echo(f"  connect with: Client({cluster.address!r}{creds}); stop with Ctrl-C")
        while not stopping.wait(0.5):
            pass
