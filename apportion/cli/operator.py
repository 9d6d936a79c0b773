"""Commands that ask the running scheduler: ``status``, ``set-resources``,
``explain``, ``retire``, ``restart``, ``shutdown``, ``logs``."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from apportion_common.grpc_server import install_stop_signals
from apportion_common.logs_pb import logs_request
from apportion_common.resources import (
    ResourceSpecError,
    format_resources,
    parse_resources,
    parse_spellings,
)
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
    from rich.console import RenderableType

    from client_sdk._transport import GrpcTransport

#: Seconds a command waits for the scheduler's answer.
CALL_TIMEOUT_S = 10.0
#: Seconds between two views of ``status --watch``.
WATCH_EVERY_S = 1.0

R = TypeVar("R")


def status(
    scheduler_address: AddressArgument,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object.", show_default="a table")
    ] = False,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch", help="Redraw the table every second until Ctrl-C.", show_default="once"
        ),
    ] = False,
    token: TokenOption = None,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
) -> None:
    """Show workers, their resources and what is in use."""
    scheduler_address = check_address(scheduler_address)
    security = caller_security(token, tls_ca, tls_cert, tls_key)
    if watch:
        if as_json:
            fail("--watch redraws a table: it does not go with --json")
        _call(scheduler_address, security, _watch)
        return
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
    from rich.console import Console

    from .status_view import status_view  # rich loads only for the commands that draw

    Console().print(status_view(info))


async def _watch(scheduler: GrpcTransport) -> None:
    """Redraw until SIGINT or SIGTERM; a scheduler that cannot be reached at
    first fails the command, later it is said in place of the table."""
    stop = asyncio.Event()
    install_stop_signals(stop)
    drawing = asyncio.create_task(_redraw(scheduler))
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({drawing, stopped}, return_when=asyncio.FIRST_COMPLETED)
    for task in (drawing, stopped):
        task.cancel()
    await asyncio.gather(stopped, return_exceptions=True)
    with contextlib.suppress(asyncio.CancelledError):
        await drawing  # its error, if it failed, goes to _call


async def _redraw(scheduler: GrpcTransport) -> None:
    from rich.console import Console, Group
    from rich.live import Live
    from rich.text import Text

    from client_sdk import SchedulerConnectionError
    from client_sdk.info import cluster_info

    from .status_view import status_view

    async def view() -> RenderableType:
        state = await scheduler.get_cluster_state(pb.GetClusterStateRequest(), CALL_TIMEOUT_S)
        return status_view(cluster_info(state))

    console = Console()
    table = shown = await view()
    # No screen to redraw (a pipe, a file): each view is printed after the last.
    live = Live(shown, console=console, auto_refresh=False) if console.is_terminal else None
    with live or contextlib.nullcontext():
        while True:
            if live is None:
                console.print(shown)
                console.print()
            else:
                live.update(shown, refresh=True)
            await asyncio.sleep(WATCH_EVERY_S)
            try:
                table = shown = await view()
            except SchedulerConnectionError as exc:
                why = Text(f"{exc} (trying again every {WATCH_EVERY_S:g}s)", "red")
                # On a screen the last table stays, the reason under it.
                shown = Group(table, why) if live is not None else why


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
        amounts, written = parse_resources(resources), parse_spellings(resources)
    except ResourceSpecError as exc:
        fail(str(exc))
    if not amounts:
        # Most likely an unset shell variable: it would take away everything.
        fail(f"no resources in {resources!r}; to take one away say so, e.g. GPU=0")
    request = pb.SetWorkerResourcesRequest(worker=worker, resources=amounts, resources_text=written)
    reply = _call(
        scheduler_address,
        security,
        lambda scheduler: scheduler.set_worker_resources(request, CALL_TIMEOUT_S),
    )
    w = reply.worker
    declared = format_resources(dict(w.resources), dict(w.resources_text)) or "nothing"
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


def logs(
    scheduler_address: AddressArgument,
    worker: Annotated[
        str | None,
        typer.Argument(
            help="A worker's address or name.", metavar="WORKER", show_default="the scheduler"
        ),
    ] = None,
    lines: Annotated[
        int, typer.Option("-n", "--lines", help="How many of the newest lines.", metavar="N")
    ] = 100,
    token: TokenOption = None,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
) -> None:
    """Print the newest log lines of the scheduler, or of one worker (its
    tasks' own loggers included)."""
    scheduler_address = check_address(scheduler_address)
    security = caller_security(token, tls_ca, tls_cert, tls_key)
    if lines < 0:
        fail(f"-n must be a number of lines >= 0, not {lines}")
    request = logs_request(lines)  # more than the ring holds: all it holds

    async def ask(scheduler: GrpcTransport) -> pb.GetLogsReply:
        if worker is None:
            return await scheduler.get_logs(request, CALL_TIMEOUT_S)
        state = await scheduler.get_cluster_state(pb.GetClusterStateRequest(), CALL_TIMEOUT_S)
        found = [w.address for w in state.workers if worker in (w.name, w.address)]
        if not found:
            raise KeyError(f"no worker {worker!r} at {scheduler_address}")
        return await scheduler.get_worker_logs(found[0], request, CALL_TIMEOUT_S)

    reply = _call(scheduler_address, security, ask)
    for line in reply.lines:
        typer.echo(line.text)


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
