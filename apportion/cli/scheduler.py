"""``apportion scheduler``: run the scheduler until interrupted."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from apportion_common.config_file import ConfigError
from apportion_common.security import Authorizer, ServerSecurity
from apportion_common.settings import SchedulerSettings

from .options import (
    TlsCaOption,
    TlsCertOption,
    TlsKeyOption,
    TokenOption,
    fail,
    read_tls,
    security_settings,
    settings_error,
    setup_logging,
)


def scheduler(
    host: Annotated[
        str | None,
        typer.Option(help="Interface to listen on.", metavar="HOST", show_default="127.0.0.1"),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(help="Port to listen on (0 picks one).", metavar="PORT", show_default="8786"),
    ] = None,
    starvation_after: Annotated[
        float | None,
        typer.Option(
            help="Seconds before a waiting task gets a worker reserved.",
            metavar="SECONDS",
            show_default="2",
        ),
    ] = None,
    placement: Annotated[
        str | None,
        typer.Option(
            help="spread: least busy fitting worker first; pack: busiest.",
            metavar="spread|pack",
            show_default="spread",
        ),
    ] = None,
    allowed_failures: Annotated[
        int | None,
        typer.Option(
            help="Worker deaths a task may cause before it errs.", metavar="N", show_default="3"
        ),
    ] = None,
    no_worker_timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds before a task no worker can hold errs.",
            metavar="SECONDS",
            show_default="wait for one",
        ),
    ] = None,
    worker_ttl: Annotated[
        float | None,
        typer.Option(
            help="Seconds of silence before a worker is declared lost.",
            metavar="SECONDS",
            show_default="5",
        ),
    ] = None,
    client_grace: Annotated[
        float | None,
        typer.Option(
            help="Seconds a disconnected client has to come back.",
            metavar="SECONDS",
            show_default="10",
        ),
    ] = None,
    state_dir: Annotated[
        str | None,
        typer.Option(
            help="Keep a journal of accepted tasks here; survive restarts.",
            metavar="DIR",
            show_default="in memory only",
        ),
    ] = None,
    worker_queue: Annotated[
        int | None,
        typer.Option(
            help="Tasks each worker may hold queued, to start as soon as one ends "
            "(two per thread, more of a kind of task measured short: "
            "about 5 ms of work per thread, at most 16; 0: none; N: N per worker).",
            metavar="N",
            show_default="measured",
        ),
    ] = None,
    dashboard_address: Annotated[
        str | None,
        typer.Option(
            help="Where the web dashboard and /metrics listen (a taken port: a free one).",
            metavar="HOST:PORT",
            show_default="127.0.0.1:8787",
        ),
    ] = None,
    no_dashboard: Annotated[
        bool,
        typer.Option(
            "--no-dashboard",
            help="Serve no dashboard, /metrics or /health (APPORTION_SCHEDULER__DASHBOARD=0).",
            show_default="served",
        ),
    ] = False,
    token: TokenOption = None,
    worker_token: Annotated[
        str | None,
        typer.Option(
            help="Replaces --token for workers (APPORTION_WORKER_TOKEN).",
            metavar="TOKEN",
            show_default="--token",
        ),
    ] = None,
    client_token: Annotated[
        str | None,
        typer.Option(
            help="Replaces --token for clients and the CLI (APPORTION_CLIENT_TOKEN).",
            metavar="TOKEN",
            show_default="--token",
        ),
    ] = None,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
) -> None:
    """Run the scheduler until interrupted."""
    overrides: dict[str, Any] = {
        k: v
        for k, v in {
            "host": host,
            "port": port,
            "starvation_after": starvation_after,
            "placement": placement,
            "allowed_failures": allowed_failures,
            "no_worker_timeout": no_worker_timeout,
            "worker_ttl": worker_ttl,
            "client_grace": client_grace,
            "state_dir": state_dir,
            "worker_queue": worker_queue,
            "dashboard_address": dashboard_address,
            # A flag wins over APPORTION_SCHEDULER__DASHBOARD: an address asks for one.
            "dashboard": False if no_dashboard else (True if dashboard_address else None),
        }.items()
        if v is not None
    }
    if no_dashboard and dashboard_address is not None:
        fail("--dashboard-address and --no-dashboard: give one or the other")
    try:
        settings = SchedulerSettings(**overrides)
    except ConfigError as exc:  # the configuration file, named in the message
        fail(str(exc))
    except ValidationError as exc:
        fail(settings_error(exc))
    secure = security_settings(
        token=token,
        worker_token=worker_token,
        client_token=client_token,
        tls_ca=tls_ca,
        tls_cert=tls_cert,
        tls_key=tls_key,
    )
    worker_secret, client_secret = secure.worker_role_token, secure.client_role_token
    security = ServerSecurity(
        None
        if worker_secret is None and client_secret is None
        else Authorizer.for_tokens(worker=worker_secret, client=client_secret),
        read_tls(secure, serving=True),
    )
    setup_logging(keep_lines=settings.log_lines)
    from scheduler_service import SchedulingPolicy, run_scheduler  # see app.py

    try:
        policy = SchedulingPolicy(
            starvation_after=settings.starvation_after,
            placement=settings.placement,
            allowed_failures=settings.allowed_failures,
            no_worker_timeout=settings.no_worker_timeout,
            client_grace=settings.client_grace,
            recovery_grace=settings.recovery_grace,
            worker_queue=settings.worker_queue,
        )
        asyncio.run(
            run_scheduler(
                settings.host,
                settings.port,
                policy=policy,
                validate=settings.check_invariants,
                worker_ttl=settings.worker_ttl,
                state_dir=settings.state_dir,
                security=security,
                dashboard_address=settings.dashboard_address if settings.dashboard else None,
            )
        )
    except OSError as exc:
        fail(str(exc))
