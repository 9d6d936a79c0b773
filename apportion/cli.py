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
import time
from typing import Annotated, Any, NoReturn

import grpc
import typer
from pydantic import ValidationError

from .resources import ResourceSpecError, format_resources, parse_resources
from .security import TLS, ClientSecurity, SecurityConfigError, tls_from_paths
from .settings import SchedulerSettings, SecuritySettings, WorkerSettings

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


# Security options, shared by every command that serves or calls (security.py).
# Prefer the environment for tokens: other users of a machine can see argv.
TokenOption = Annotated[
    str | None,
    typer.Option(
        help="Shared secret, sent as 'authorization: Bearer TOKEN' (env APPORTION_TOKEN).",
        show_default=False,
    ),
]
TlsCaOption = Annotated[
    str | None,
    typer.Option(help="CA certificate (PEM) the other side's must chain to (APPORTION_TLS_CA)."),
]
TlsCertOption = Annotated[
    str | None, typer.Option(help="This side's certificate (PEM) (APPORTION_TLS_CERT).")
]
TlsKeyOption = Annotated[
    str | None, typer.Option(help="This side's private key (PEM) (APPORTION_TLS_KEY).")
]


def _security_settings(**flags: str | None) -> SecuritySettings:
    """Flags over APPORTION_TOKEN, APPORTION_TLS_* and the like; bad ones exit 2."""
    try:
        given: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
        return SecuritySettings(**given)
    except ValidationError as exc:
        fail(_settings_error(exc))


def _tls(settings: SecuritySettings, serving: bool) -> TLS | None:
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


def _caller_security(
    token: str | None, tls_ca: str | None, tls_cert: str | None, tls_key: str | None
) -> ClientSecurity:
    """For commands that call the scheduler as a client: --token, else
    APPORTION_CLIENT_TOKEN, else APPORTION_TOKEN."""
    settings = _security_settings(token=token, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
    chosen = settings.token if token is not None else settings.client_role_token
    return ClientSecurity(chosen, _tls(settings, serving=False))


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
    worker_ttl: Annotated[
        float | None,
        typer.Option(help="Seconds of silence before a worker is declared lost (default 5)."),
    ] = None,
    client_grace: Annotated[
        float | None,
        typer.Option(help="Seconds a disconnected client has to come back (default 10)."),
    ] = None,
    state_dir: Annotated[
        str | None,
        typer.Option(help="Keep a journal of accepted tasks here; survive restarts."),
    ] = None,
    worker_queue: Annotated[
        int | None,
        typer.Option(
            help="Tasks each worker may hold queued, to start as soon as one ends "
            "(default: two per thread, more of a kind of task measured short: "
            "about 5 ms of work per thread, at most 16; 0: none; N: N per worker)."
        ),
    ] = None,
    token: TokenOption = None,
    worker_token: Annotated[
        str | None,
        typer.Option(
            help="Replaces --token for workers (APPORTION_WORKER_TOKEN).", show_default=False
        ),
    ] = None,
    client_token: Annotated[
        str | None,
        typer.Option(
            help="Replaces --token for clients and the CLI (APPORTION_CLIENT_TOKEN).",
            show_default=False,
        ),
    ] = None,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
) -> None:
    """Run the scheduler until interrupted."""
    from apportion.security import Authorizer, ServerSecurity
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
            "worker_ttl": worker_ttl,
            "client_grace": client_grace,
            "state_dir": state_dir,
            "worker_queue": worker_queue,
        }.items()
        if v is not None
    }
    try:
        settings = SchedulerSettings(**overrides)
    except ValidationError as exc:
        fail(_settings_error(exc))
    secure = _security_settings(
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
        _tls(secure, serving=True),
    )
    setup_logging()
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
    nanny: Annotated[
        bool,
        typer.Option(
            "--nanny/--no-nanny",
            help="Run each worker process under a parent that restarts it if it dies.",
        ),
    ] = True,
    token: TokenOption = None,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
) -> None:
    """Run worker processes that execute tasks within their declared resources."""
    check_address(scheduler_address)
    settings = _worker_settings(resources, nthreads, nworkers, name, host)
    secure = _security_settings(token=token, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
    # --token, else APPORTION_WORKER_TOKEN, else APPORTION_TOKEN.
    worker_secret = secure.token if token is not None else secure.worker_role_token
    tls = _tls(secure, serving=True)  # a worker also serves results
    # Child worker processes read these from the environment they inherit
    # (not argv, which other users of the machine can see).
    if worker_secret is not None:
        os.environ["APPORTION_WORKER_TOKEN"] = worker_secret
    if tls is not None:
        os.environ.update(tls.env())
    setup_logging()
    if nanny or settings.nworkers > 1:
        # A task that calls os._exit or crashes the interpreter takes its worker
        # process down; the parent starts a fresh one (the scheduler re-places
        # the task, and errs it after its allowed failures).
        raise typer.Exit(_supervise(scheduler_address, settings))
    from worker_service import run_worker

    asyncio.run(
        run_worker(
            scheduler_address,
            resources=settings.resources,
            nthreads=settings.nthreads,
            name=settings.name,
            host=settings.host,
            token=worker_secret,
            tls=tls,
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


#: A child that exits with one of these would fail the same way again.
_FATAL_EXIT_CODES = frozenset({2, 77})
#: A child that dies younger than this is restarted after a pause (no hot loop).
_MIN_LIFETIME_S = 1.0


def _die_with_parent() -> None:
    """In a child, before exec: get SIGKILL when the supervisor dies, so that a
    killed supervisor leaves no worker behind (Linux; elsewhere a no-op)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _supervise(scheduler_address: str, settings: WorkerSettings) -> int:
    """Run ``nworkers`` single worker processes; restart any that die.

    A child that exits with status 2 (refused: bad settings, wrong token) is
    not restarted: the supervisor stops the others and exits with its status.
    """

    def spawn(index: int) -> subprocess.Popen[bytes]:
        args = [
            sys.executable,
            "-m",
            "apportion",
            "worker",
            scheduler_address,
            "--no-nanny",
            "--nthreads",
            str(settings.nthreads),
            "--nworkers",
            "1",
            "--resources",
            format_resources(settings.resources),
        ]
        if settings.name:
            several = settings.nworkers > 1
            args += ["--name", f"{settings.name}-{index}" if several else settings.name]
        if settings.host:
            args += ["--host", settings.host]
        started[index] = time.monotonic()
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)

    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    started: dict[int, float] = {}
    children = {i: spawn(i) for i in range(settings.nworkers)}
    log = logging.getLogger("worker_service")
    status = 0
    while not stopping.wait(0.1):
        for index, proc in list(children.items()):
            code = proc.poll()
            if code is None or stopping.is_set():
                continue
            if code in _FATAL_EXIT_CODES:
                log.error("worker process %d exited with %d; stopping", index, code)
                status = code
                stopping.set()
                break
            log.warning("worker process %d exited with %d; restarting it", index, code)
            if time.monotonic() - started[index] < _MIN_LIFETIME_S:
                stopping.wait(_MIN_LIFETIME_S)
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
    return status


@app.command()
def local(
    workers: Annotated[int, typer.Option(help="Worker processes.")] = 2,
    nthreads: Annotated[int, typer.Option(help="Threads per worker.")] = 1,
    resources: Annotated[str | None, typer.Option(help="Resources of each worker.")] = None,
    port: Annotated[int, typer.Option(help="Scheduler port (0 picks one).")] = 8786,
    token: TokenOption = None,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
) -> None:
    """Run a scheduler and workers on this machine until interrupted."""
    from client_sdk import LocalCluster

    if workers < 0 or nthreads < 1:
        fail("--workers must be >= 0 and --nthreads >= 1")
    secure = _security_settings(token=token, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
    tls = _tls(secure, serving=True)
    try:
        res = parse_resources(resources) if resources is not None else {}
    except ResourceSpecError as exc:
        fail(str(exc))
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        cluster = LocalCluster(
            n_workers=workers,
            nthreads=nthreads,
            resources=res,
            port=port,
            token=secure.token,
            tls=tls,
        )
    except (RuntimeError, TimeoutError) as exc:
        fail(f"the local cluster did not start: {exc}")
    with cluster:
        typer.echo(f"apportion local cluster: scheduler at {cluster.address}, {workers} workers")
        creds = ", token=..." if secure.token else ""
        creds += ", tls=TLS(ca=..., cert=..., key=...)" if tls is not None else ""
        typer.echo(f"  connect with: Client({cluster.address!r}{creds}); stop with Ctrl-C")
        while not stopping.wait(0.5):
            pass


@app.command()
def status(
    scheduler_address: Annotated[str, typer.Argument(help="The scheduler, HOST:PORT.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    token: TokenOption = None,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
) -> None:
    """Show workers, their resources and what is in use."""
    from client_sdk.client import cluster_info
    from protos import apportion_pb2 as pb

    check_address(scheduler_address)
    security = _caller_security(token, tls_ca, tls_cert, tls_key)
    state = _unary(scheduler_address, "GetClusterState", pb.GetClusterStateRequest(), security)
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
    token: TokenOption = None,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
) -> None:
    """Change what a running worker declares."""
    from protos import apportion_pb2 as pb

    check_address(scheduler_address)
    security = _caller_security(token, tls_ca, tls_cert, tls_key)
    try:
        amounts = parse_resources(resources)
    except ResourceSpecError as exc:
        fail(str(exc))
    reply = _unary(
        scheduler_address,
        "SetWorkerResources",
        pb.SetWorkerResourcesRequest(worker=worker, resources=amounts),
        security,
    )
    w = reply.worker
    declared = format_resources(dict(w.resources)) or "nothing"
    typer.echo(f"{w.name} ({w.address}) now declares {declared}")


@app.command()
def explain(
    scheduler_address: Annotated[str, typer.Argument(help="The scheduler, HOST:PORT.")],
    key: Annotated[str, typer.Argument(help="The task's key.")],
    token: TokenOption = None,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
) -> None:
    """Say in one sentence why a task is not running."""
    from protos import apportion_pb2 as pb

    check_address(scheduler_address)
    security = _caller_security(token, tls_ca, tls_cert, tls_key)
    reply = _unary(scheduler_address, "ExplainTask", pb.ExplainTaskRequest(key=key), security)
    typer.echo(reply.explanation)


def _unary(scheduler_address: str, method: str, request: Any, security: ClientSecurity) -> Any:
    from protos import apportion_pb2_grpc as pb_grpc

    try:
        with security.sync_channel(scheduler_address) as channel:
            return getattr(pb_grpc.SchedulerStub(channel), method)(
                request, timeout=10, metadata=security.metadata
            )
    except grpc.RpcError as exc:
        code = exc.code()
        if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
            fail(exc.details())
        if code == grpc.StatusCode.UNAUTHENTICATED:
            sent = "a token it did not accept" if security.token else "no token"
            fail(
                f"the scheduler at {scheduler_address} refused this call "
                f"(UNAUTHENTICATED: {exc.details()}); "
                f"this command sent {sent}: pass --token or set APPORTION_TOKEN"
            )
        fail(f"cannot reach the scheduler at {scheduler_address}: {code.name}: {exc.details()}")


def _print_status(info: dict[str, Any]) -> None:
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
            w["name"],
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
