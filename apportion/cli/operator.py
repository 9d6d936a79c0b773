"""Commands that ask the running scheduler: ``status``, ``set-resources``, ``explain``."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, TypeVar

import grpc
import typer
from rich.console import Console
from rich.table import Table

from apportion_common.resources import ResourceSpecError, format_resources, parse_resources
from apportion_common.security import ClientSecurity
from client_sdk.info import ClusterInfo, cluster_info
from protos import apportion_pb2 as pb
from protos import apportion_pb2_grpc as pb_grpc

from .options import (
    TlsCaOption,
    TlsCertOption,
    TlsKeyOption,
    TokenOption,
    caller_security,
    check_address,
    fail,
)

#: Seconds a command waits for the scheduler's answer.
CALL_TIMEOUT_S = 10.0

R = TypeVar("R")


def status(
    scheduler_address: Annotated[str, typer.Argument(help="The scheduler, HOST:PORT.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    token: TokenOption = None,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
) -> None:
    """Show workers, their resources and what is in use."""
    check_address(scheduler_address)
    security = caller_security(token, tls_ca, tls_cert, tls_key)
    state = _call(
        scheduler_address,
        security,
        lambda stub, metadata: stub.GetClusterState(
            pb.GetClusterStateRequest(), timeout=CALL_TIMEOUT_S, metadata=metadata
        ),
    )
    info = cluster_info(state)
    if as_json:
        typer.echo(json.dumps(info, sort_keys=True))
        return
    _print_status(info)


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
    check_address(scheduler_address)
    security = caller_security(token, tls_ca, tls_cert, tls_key)
    try:
        amounts = parse_resources(resources)
    except ResourceSpecError as exc:
        fail(str(exc))
    request = pb.SetWorkerResourcesRequest(worker=worker, resources=amounts)
    reply = _call(
        scheduler_address,
        security,
        lambda stub, metadata: stub.SetWorkerResources(
            request, timeout=CALL_TIMEOUT_S, metadata=metadata
        ),
    )
    w = reply.worker
    declared = format_resources(dict(w.resources)) or "nothing"
    typer.echo(f"{w.name} ({w.address}) now declares {declared}")


def explain(
    scheduler_address: Annotated[str, typer.Argument(help="The scheduler, HOST:PORT.")],
    key: Annotated[str, typer.Argument(help="The task's key.")],
    token: TokenOption = None,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
) -> None:
    """Say in one sentence why a task is not running."""
    check_address(scheduler_address)
    security = caller_security(token, tls_ca, tls_cert, tls_key)
    reply = _call(
        scheduler_address,
        security,
        lambda stub, metadata: stub.ExplainTask(
            pb.ExplainTaskRequest(key=key), timeout=CALL_TIMEOUT_S, metadata=metadata
        ),
    )
    typer.echo(reply.explanation)


def _call(
    scheduler_address: str,
    security: ClientSecurity,
    call: Callable[[pb_grpc.SchedulerStub, tuple[tuple[str, str], ...]], R],
) -> R:
    try:
        with security.sync_channel(scheduler_address) as channel:
            return call(pb_grpc.SchedulerStub(channel), security.metadata)
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


def _print_status(info: ClusterInfo) -> None:
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
