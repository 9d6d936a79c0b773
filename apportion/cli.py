"""The ``apportion`` command line. It only parses and hands off.

Bad input exits with status 2 and one line on stderr naming what was wrong,
before anything starts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from typing import Annotated, Any, NoReturn

import grpc
import typer
from pydantic import ValidationError

from .resources import ResourceSpecError, format_resources, parse_resources
from .settings import SchedulerSettings, WorkerSettings

app = typer.Typer(
    name="apportion",
    help="A resource-aware distributed task scheduler.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(message: str) -> NoReturn:
    typer.echo(f"apportion: error: {message}", err=True)
    raise typer.Exit(2)


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("APPORTION_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def check_address(address: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        fail(f"address {address!r}: expected HOST:PORT")
    return address


def _settings_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {first['msg'].removeprefix('Value error, ')}"


@app.command()
def scheduler(
    host: Annotated[str | None, typer.Option(help="Interface to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on (0 picks one).")] = None,
    starvation_after: Annotated[
        float | None,
        typer.Option(help="Seconds before a waiting task gets a worker reserved (default 2)."),
    ] = None,
    placement: Annotated[
        str | None,
        typer.Option(help="spread: least busy fitting worker first (default); pack: busiest."),
    ] = None,
    allowed_failures: Annotated[
        int | None,
        typer.Option(help="Worker deaths a task may cause before it errs (default 3)."),
    ] = None,
    no_worker_timeout: Annotated[
        float | None,
        typer.Option(help="Seconds before a task no worker can hold errs (default: wait)."),
    ] = None,
) -> None:
    """Run the scheduler until interrupted."""
    from scheduler_service import SchedulingPolicy, run_scheduler

    overrides: dict[str, Any] = {
        k: v
        for k, v in {
            "host": host,
            "port": port,
            "starvation_after": starvation_after,
            "placement": placement,
            "allowed_failures": allowed_failures,
            "no_worker_timeout": no_worker_timeout,
        }.items()
        if v is not None
    }
    try:
        settings = SchedulerSettings(**overrides)
    except ValidationError as exc:
        fail(_settings_error(exc))
    setup_logging()
    try:
        policy = SchedulingPolicy(
            starvation_after=settings.starvation_after,
            placement=settings.placement,
            allowed_failures=settings.allowed_failures,
            no_worker_timeout=settings.no_worker_timeout,
        )
        asyncio.run(
            run_scheduler(
                settings.host, settings.port, policy=policy, validate=settings.check_invariants
            )
        )
    except OSError as exc:
        fail(str(exc))


@app.command()
def worker(
    scheduler_address: Annotated[str, typer.Argument(help="The scheduler, HOST:PORT.")],
    resources: Annotated[
        str | None,
        typer.Option(help='Resources of each worker process, e.g. "GPU=2 MEMORY=100e9".'),
    ] = None,
    nthreads: Annotated[int | None, typer.Option(help="Threads per worker process.")] = None,
    nworkers: Annotated[int | None, typer.Option(help="Worker processes to start.")] = None,
    name: Annotated[
        str | None, typer.Option(help="Worker name (suffixed -0, -1... if several).")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Address to serve results on.")] = None,
) -> None:
    """Run worker processes that execute tasks within their declared resources."""
    check_address(scheduler_address)
    settings = _worker_settings(resources, nthreads, nworkers, name, host)
    setup_logging()
    if settings.nworkers > 1:
        raise typer.Exit(_supervise(scheduler_address, settings))
    from worker_service import run_worker

    asyncio.run(
        run_worker(
            scheduler_address,
            resources=settings.resources,
            nthreads=settings.nthreads,
            name=settings.name,
            host=settings.host,
        )
    )
    # Task threads cannot be interrupted; do not let one hold the process up.
    if threading.active_count() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _worker_settings(
    resources: str | None,
    nthreads: int | None,
    nworkers: int | None,
    name: str | None,
    host: str | None,
) -> WorkerSettings:
    overrides: dict[str, Any] = {
        k: v
        for k, v in {"nthreads": nthreads, "nworkers": nworkers, "name": name, "host": host}.items()
        if v is not None
    }
    try:
        parsed = parse_resources(resources) if resources is not None else None
        if parsed is not None:
            # Passed in, the environment's resources are not even read (a bad
            # one there must not stop a worker whose flag overrides it): see
            # _ResourcesFromEnv.
            overrides["resources"] = parsed
        settings = WorkerSettings(**overrides)
    except ResourceSpecError as exc:
        fail(str(exc))
    except ValidationError as exc:
        fail(_settings_error(exc))
    if parsed is not None:
        # The flag replaces resources from the environment as a whole.
        settings = settings.model_copy(update={"resources": parsed})
    return settings


def _supervise(scheduler_address: str, settings: WorkerSettings) -> int:
    """Run ``nworkers`` single worker processes; restart any that crash."""

    def spawn(index: int) -> subprocess.Popen[bytes]:
        args = [
            sys.executable,
            "-m",
            "apportion",
            "worker",
            scheduler_address,
            "--nthreads",
            str(settings.nthreads),
            "--nworkers",
            "1",
            "--resources",
            format_resources(settings.resources),
        ]
        if settings.name:
            args += ["--name", f"{settings.name}-{index}"]
        if settings.host:
            args += ["--host", settings.host]
        return subprocess.Popen(args, stdin=subprocess.DEVNULL)

    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    children = {i: spawn(i) for i in range(settings.nworkers)}
    log = logging.getLogger("worker_service")
    while not stopping.wait(0.2):
        for index, proc in list(children.items()):
            code = proc.poll()
            if code is not None and not stopping.is_set():
                log.warning("worker process %d exited with %d; restarting it", index, code)
                children[index] = spawn(index)
    for proc in children.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in children.values():
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return 0


@app.command()
def local(
    workers: Annotated[int, typer.Option(help="Worker processes.")] = 2,
    nthreads: Annotated[int, typer.Option(help="Threads per worker.")] = 1,
    resources: Annotated[str | None, typer.Option(help="Resources of each worker.")] = None,
    port: Annotated[int, typer.Option(help="Scheduler port (0 picks one).")] = 8786,
) -> None:
    """Run a scheduler and workers on this machine until interrupted."""
    from client_sdk import LocalCluster

    if workers < 0 or nthreads < 1:
        fail("--workers must be >= 0 and --nthreads >= 1")
    try:
        res = parse_resources(resources) if resources is not None else {}
    except ResourceSpecError as exc:
        fail(str(exc))
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        cluster = LocalCluster(n_workers=workers, nthreads=nthreads, resources=res, port=port)
    except (RuntimeError, TimeoutError) as exc:
        fail(f"the local cluster did not start: {exc}")
    with cluster:
        typer.echo(f"apportion local cluster: scheduler at {cluster.address}, {workers} workers")
        typer.echo(f"  connect with: Client({cluster.address!r}); stop with Ctrl-C")
        while not stopping.wait(0.5):
            pass


@app.command()
def status(
    scheduler_address: Annotated[str, typer.Argument(help="The scheduler, HOST:PORT.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Show workers, their resources and what is in use."""
    from client_sdk.client import cluster_info
    from protos import apportion_pb2 as pb

    check_address(scheduler_address)
    state = _unary(scheduler_address, "GetClusterState", pb.GetClusterStateRequest())
    info = cluster_info(state)
    if as_json:
        typer.echo(json.dumps(info, sort_keys=True))
        return
    _print_status(info)


@app.command("set-resources")
def set_resources(
    scheduler_address: Annotated[str, typer.Argument(help="The scheduler, HOST:PORT.")],
    worker: Annotated[str, typer.Argument(help="The worker's address or name.")],
    resources: Annotated[str, typer.Argument(help='What it declares from now, e.g. "GPU=4".')],
) -> None:
    """Change what a running worker declares."""
    from protos import apportion_pb2 as pb

    check_address(scheduler_address)
    try:
        amounts = parse_resources(resources)
    except ResourceSpecError as exc:
        fail(str(exc))
    reply = _unary(
        scheduler_address,
        "SetWorkerResources",
        pb.SetWorkerResourcesRequest(worker=worker, resources=amounts),
    )
    w = reply.worker
    declared = format_resources(dict(w.resources)) or "nothing"
    typer.echo(f"{w.name} ({w.address}) now declares {declared}")


@app.command()
def explain(
    scheduler_address: Annotated[str, typer.Argument(help="The scheduler, HOST:PORT.")],
    key: Annotated[str, typer.Argument(help="The task's key.")],
) -> None:
    """Say in one sentence why a task is not running."""
    from protos import apportion_pb2 as pb

    check_address(scheduler_address)
    reply = _unary(scheduler_address, "ExplainTask", pb.ExplainTaskRequest(key=key))
    typer.echo(reply.explanation)


def _unary(scheduler_address: str, method: str, request: Any) -> Any:
    from protos import apportion_pb2_grpc as pb_grpc

    try:
        with grpc.insecure_channel(scheduler_address) as channel:
            return getattr(pb_grpc.SchedulerStub(channel), method)(request, timeout=10)
    except grpc.RpcError as exc:
        code = exc.code()
        if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
            fail(exc.details())
        fail(f"cannot reach the scheduler at {scheduler_address}: {code.name}")


def _print_status(info: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"apportion scheduler {info['address']}")
    for column in ("worker", "address", "threads", "running", "resources (used / declared)"):
        table.add_column(column)
    for address, w in sorted(info["workers"].items(), key=lambda kv: kv[1]["name"]):
        used = w["used_resources"]
        res = ", ".join(f"{n} {used.get(n, 0):g}/{v:g}" for n, v in sorted(w["resources"].items()))
        table.add_row(w["name"], address, str(w["nthreads"]), str(w["running"]), res or "-")
    console = Console()
    console.print(table)
    tasks = ", ".join(f"{state} {n}" for state, n in sorted(info["tasks"].items())) or "none"
    console.print(f"tasks: {tasks}")


def main() -> None:
    """Entry point. Usage errors (a bad flag, a missing argument) become one
    line on stderr and status 2, like every other bad input."""
    try:
        result = app(standalone_mode=False)
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        raise SystemExit(130) from None
    except Exception as exc:
        # Click's usage errors, which typer vendors privately: matched by
        # their interface rather than an import of typer's internals.
        format_message = getattr(exc, "format_message", None)
        if format_message is None or not hasattr(exc, "exit_code"):
            raise
        ctx = getattr(exc, "ctx", None)
        command = "apportion" if ctx is None or ctx.parent is None else f"apportion {ctx.info_name}"
        hint = f" (see '{command} --help')"
        typer.echo(f"apportion: error: {format_message()}{hint}", err=True)
        raise SystemExit(2) from None
    if isinstance(result, int):
        raise SystemExit(result)
