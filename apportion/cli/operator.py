"""Commands that ask the running scheduler: ``status``, ``set-resources``,
``explain``, ``retire``, ``restart``, ``shutdown``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from apportion_common.resources import ResourceSpecError, format_resources, parse_resources
from apportion_common.security import ClientSecurity
from protos import apportion_pb2 as pb

from .options import (
    AddressArgument,
    TlsCaOption,
    TlsCertOption,
    TlsKeyOption,
    TokenOption,
    caller_security,
    check_address,
    fail,
)

if TYPE_CHECKING:  # the client SDK itself loads when a command runs (see app.py)
    from client_sdk._transport import GrpcTransport
    from client_sdk.info import ClusterInfo

#: Seconds a command waits for the scheduler's answer.
CALL_TIMEOUT_S = 10.0

R = TypeVar("R")


def status(
    scheduler_address: AddressArgument,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object.", show_default="a table")
    ] = False,
    token: TokenOption = None,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
) -> None:
    """Show workers, their resources and what is in use."""
    scheduler_address = check_address(scheduler_address)
    security = caller_security(token, tls_ca, tls_cert, tls_key)
    state = _call(
        scheduler_address,
        security,
        lambda scheduler: scheduler.get_cluster_state(pb.GetClusterStateRequest(), CALL_TIMEOUT_S),
    )
    from client_sdk.info import cluster_info

    info = cluster_info(state)
    if as_json:
        typer.echo(json.dumps(info, sort_keys=True))
        return
    _print_status(info)


def set_resources(
    scheduler_address: AddressArgument,
    worker: Annotated[str, typer.Argument(help="The worker's address or name.", metavar="WORKER")],
    resources: Annotated[
        str, typer.Argument(help='What it declares from now, e.g. "GPU=4".', metavar="SPEC")
    ],
    token: TokenOption = None,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
) -> None:
    """Change what a running worker declares."""
    scheduler_address = check_address(scheduler_address)
    security = caller_security(token, tls_ca, tls_cert, tls_key)
    try:
        amounts = parse_resources(resources)
    except ResourceSpecError as exc:
        fail(str(exc))
    if not amounts:
        # Most likely an unset shell variable: it would take away everything.
        fail(f"no resources in {resources!r}; to take one away say so, e.g. GPU=0")
    request = pb.SetWorkerResourcesRequest(worker=worker, resources=amounts)
    reply = _call(
        scheduler_address,
        security,
        lambda scheduler: scheduler.set_worker_resources(request, CALL_TIMEOUT_S),
    )
    w = reply.worker
    declared = format_resources(dict(w.resources)) or "nothing"
    typer.echo(f"{w.name} ({w.address}) now declares {declared}")


def retire(
    scheduler_address: AddressArgument,
    workers: Annotated[
        list[str], typer.Argument(help="Workers' addresses or names.", metavar="WORKER...")
    ],
    timeout: Annotated[
        float,
        typer.Option(help="Give up waiting after this many seconds.", metavar="SECONDS"),
    ] = 60.0,
    token: TokenOption = None,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
) -> None:
    """Take workers out of service without losing work, and wait until they are gone.

    Nothing new is placed on them; their running and queued tasks finish,
    results still wanted move to other workers, then each exits (its nanny
    does not restart it).
    """
    scheduler_address = check_address(scheduler_address)
    security = caller_security(token, tls_ca, tls_cert, tls_key)
    _check_wait(timeout)
    request = pb.RetireWorkersRequest(workers=workers, timeout_s=timeout)
    reply = _call(
        scheduler_address,
        security,
        lambda scheduler: scheduler.retire_workers(request, timeout + CALL_TIMEOUT_S),
    )
    for w in reply.retired:
        typer.echo(f"retired {w.name} ({w.address})")
    if reply.draining:
        still = ", ".join(f"{w.name} ({w.address})" for w in reply.draining)
        fail(f"still draining after {timeout:g}s: {still}")


def restart(
    scheduler_address: AddressArgument,
    timeout: Annotated[
        float,
        typer.Option(help="Wait this long for the workers to be back.", metavar="SECONDS"),
    ] = 60.0,
    token: TokenOption = None,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
) -> None:
    """Cancel every task and restart every worker process through its nanny."""
    scheduler_address = check_address(scheduler_address)
    security = caller_security(token, tls_ca, tls_cert, tls_key)
    _check_wait(timeout)
    reply = _call(
        scheduler_address,
        security,
        lambda scheduler: scheduler.restart(
            pb.RestartRequest(timeout_s=timeout), timeout + CALL_TIMEOUT_S
        ),
    )
    typer.echo(f"restarted: {len(reply.workers)} worker(s) registered")


def shutdown(
    scheduler_address: AddressArgument,
    token: TokenOption = None,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
) -> None:
    """Stop every worker (and its nanny), then the scheduler."""
    scheduler_address = check_address(scheduler_address)
    security = caller_security(token, tls_ca, tls_cert, tls_key)
    _call(
        scheduler_address,
        security,
        lambda scheduler: scheduler.shutdown(pb.ShutdownRequest(), CALL_TIMEOUT_S),
    )
    typer.echo(f"the scheduler at {scheduler_address} and its workers are stopping")


def explain(
    scheduler_address: AddressArgument,
    key: Annotated[str, typer.Argument(help="The task's key.", metavar="KEY")],
    token: TokenOption = None,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
) -> None:
    """Say in one sentence why a task is not running."""
    scheduler_address = check_address(scheduler_address)
    security = caller_security(token, tls_ca, tls_cert, tls_key)
    reply = _call(
        scheduler_address,
        security,
        lambda scheduler: scheduler.explain_task(pb.ExplainTaskRequest(key=key), CALL_TIMEOUT_S),
    )
    typer.echo(reply.explanation)


def _check_wait(timeout: float) -> None:
    """A --timeout to wait for: finite and >= 0, else one line and status 2."""
    if not (timeout >= 0 and timeout != float("inf")):
        fail(f"--timeout must be a number of seconds >= 0, not {timeout}")


def _call(
    scheduler_address: str,
    security: ClientSecurity,
    call: Callable[[GrpcTransport], Awaitable[R]],
) -> R:
    """One call on the scheduler, through the client SDK's transport; its
    errors, as the SDK maps them, exit 2 with one line."""

    from client_sdk import SchedulerConnectionError
    from client_sdk._grpc_errors import Caller
    from client_sdk._transport import GrpcTransport

    async def run() -> R:
        scheduler = GrpcTransport(scheduler_address, security, caller=Caller.COMMAND)
        try:
            return await call(scheduler)
        finally:
            await scheduler.close()

    try:
        return asyncio.run(run())
    except (KeyError, ValueError) as exc:  # NOT_FOUND, INVALID_ARGUMENT
        fail(str(exc.args[0]))
    except SchedulerConnectionError as exc:
        fail(str(exc))


def _print_status(info: ClusterInfo) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"apportion scheduler {info['address']}")
    columns = ("worker", "address", "threads", "running", "queued", "resources (used / declared)")
    for column in columns:
        table.add_column(column)
    for address, w in sorted(info["workers"].items(), key=lambda kv: kv[1]["name"]):
        used = w["used_resources"]
        res = ", ".join(f"{n} {used.get(n, 0):g}/{v:g}" for n, v in sorted(w["resources"].items()))
        table.add_row(
            w["name"] + (" (draining)" if w["draining"] else ""),
            address,
            str(w["nthreads"]),
            str(w["running"]),
            str(w["queued"]),
            res or "-",
        )
    console = Console()
    console.print(table)
    tasks = ", ".join(f"{state} {n}" for state, n in sorted(info["tasks"].items())) or "none"
    console.print(f"tasks: {tasks}")
    if info["dashboard_address"]:
        console.print(f"dashboard: {info['dashboard_address']}")
