"""``apportion worker``: worker processes, under a nanny unless told otherwise."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from apportion_common.config_file import ConfigError
from apportion_common.gpus import (
    GpuDetectionError,
    GpuDevice,
    auto_label,
    need_gpus,
    resolve_auto,
    split_devices,
    visible_devices_value,
)
from apportion_common.process_memory import check_memory_limit, resolve_memory_limit
from apportion_common.resources import (
    AUTO,
    ResourceSpecError,
    check_resources,
    format_resources,
    parse_spellings,
)
from apportion_common.settings import WorkerSettings

from .options import (
    AddressArgument,
    TlsCaOption,
    TlsCertOption,
    TlsKeyOption,
    TokenOption,
    check_address,
    default_nthreads,
    fail,
    read_tls,
    security_settings,
    settings_error,
    setup_logging,
)


def worker(
    scheduler_address: AddressArgument,
    resources: Annotated[
        str | None,
        typer.Option(
            help='Resources of each worker process, e.g. "GPU=2 MEMORY=100e9"; '
            "GPU=auto and GPU_MEMORY=auto: the GPUs it may use, counted and their memory "
            "summed.",
            metavar="SPEC",
            show_default="none",
        ),
    ] = None,
    nthreads: Annotated[
        int | None,
        typer.Option(
            help="Threads per worker process.",
            metavar="N",
            show_default="the cores divided by --nworkers",
        ),
    ] = None,
    nworkers: Annotated[
        str | None,
        typer.Option(
            help="Worker processes to start; gpu: one per GPU it may use (with GPU=auto), "
            "and with GPU=auto any count shares the GPUs out evenly.",
            metavar="N|gpu",
            show_default="1",
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(
            help="Worker name (suffixed -0, -1... if several).",
            metavar="NAME",
            show_default="its address",
        ),
    ] = None,
    host: Annotated[
        str | None,
        typer.Option(
            help="Address to serve results on.",
            metavar="HOST",
            show_default="the one that reaches the scheduler",
        ),
    ] = None,
    death_timeout: Annotated[
        float | None,
        typer.Option(
            help="Exit with a non-zero status after this many seconds without a scheduler "
            "(APPORTION_WORKER__DEATH_TIMEOUT).",
            metavar="SECONDS",
            show_default="keep trying",
        ),
    ] = None,
    drain_timeout: Annotated[
        float | None,
        typer.Option(
            help="On SIGTERM, let running and queued tasks finish and move wanted results "
            "to other workers for at most this many seconds before stopping; 0: stop at "
            "once (APPORTION_WORKER__DRAIN_TIMEOUT).",
            metavar="SECONDS",
            show_default="30",
        ),
    ] = None,
    nanny: Annotated[
        bool,
        typer.Option(
            "--nanny/--no-nanny",
            help="Run each worker process under a parent that restarts it if it dies.",
        ),
    ] = True,
    isolate_gpu_tasks: Annotated[
        bool | None,
        typer.Option(
            "--isolate-gpu-tasks/--no-isolate-gpu-tasks",
            help="Run each task that holds a GPU in a child process that sees only its "
            "own GPUs (APPORTION_WORKER__ISOLATE_GPU_TASKS).",
            show_default="off",
        ),
    ] = None,
    memory_limit: Annotated[
        str | None,
        typer.Option(
            help="Memory each worker process may use (not the MEMORY resource): bytes or "
            "300MB, 2GiB...; past fractions of it, results spill to disk, the worker "
            "pauses, its nanny restarts it; auto: the machine's (or cgroup's) divided by "
            "--nworkers; 0: no limit (APPORTION_WORKER__MEMORY_LIMIT).",
            metavar="BYTES",
            show_default="auto",
        ),
    ] = None,
    local_directory: Annotated[
        str | None,
        typer.Option(
            help="Where each worker process makes a directory of its own for results it "
            "spills to disk, removed when it exits (APPORTION_WORKER__LOCAL_DIRECTORY).",
            metavar="DIR",
            show_default="the system's temp directory",
        ),
    ] = None,
    token: TokenOption = None,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
) -> None:
    """Run worker processes that execute tasks within their declared resources."""
    scheduler_address = check_address(scheduler_address)
    settings = _worker_settings(
        resources, nthreads, nworkers, name, host, death_timeout, drain_timeout, isolate_gpu_tasks
    )
    if memory_limit is not None or local_directory is not None:
        settings = _with_memory_flags(settings, memory_limit, local_directory)
    settings, devices = _with_gpus(settings)
    settings = _with_memory_limit(settings)
    secure = security_settings(token=token, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
    # --token, else APPORTION_WORKER_TOKEN, else APPORTION_TOKEN.
    worker_secret = secure.token if token is not None else secure.worker_role_token
    tls = read_tls(secure, serving=True)  # a worker also serves results
    # Child worker processes read these from the environment they inherit
    # (not argv, which other users of the machine can see).
    if worker_secret is not None:
        os.environ["APPORTION_WORKER_TOKEN"] = worker_secret
    if tls is not None:
        os.environ.update(tls.env())
    assert isinstance(settings.nworkers, int)  # _with_gpus counted "gpu"
    supervising = nanny or settings.nworkers > 1
    # The worker process keeps its last lines (GetLogs); a nanny has no server to tell them.
    setup_logging(keep_lines=None if supervising else settings.log_lines)
    from worker_service.memory import MemoryFractions, terminate_bytes  # see app.py

    limit = int(settings.memory_limit)
    fractions = MemoryFractions(**settings.memory.model_dump())
    spill_parent = None if settings.local_directory is None else str(settings.local_directory)
    if supervising:
        from worker_service.nanny import Nanny  # see app.py

        supervisor = Nanny(
            lambda index: _child_command(scheduler_address, settings, index),
            settings.nworkers,
            settings.drain_timeout,
            env=_child_env(settings, devices),
            terminate_at=terminate_bytes(limit, fractions),
            local_directory=spill_parent,
        )
        supervisor.stop_on_signals()
        raise typer.Exit(supervisor.run())
    from worker_service import run_worker  # see app.py
    from worker_service.allocator import tune_allocator

    tune_allocator()  # this process is the worker: results stream in 1 MiB chunks

    try:
        declared, written = resolve_auto(
            settings.resources, settings.resources_text, settings.auto_resources, devices
        )
    except ValueError as exc:
        fail(str(exc))
    status = asyncio.run(
        run_worker(
            scheduler_address,
            resources=declared,
            resources_text=written,
            nthreads=settings.nthreads or 1,
            name=settings.name,
            host=settings.host,
            token=worker_secret,
            tls=tls,
            validate=settings.check_invariants,
            shared_memory=settings.shared_memory,
            death_timeout=settings.death_timeout,
            drain_timeout=settings.drain_timeout,
            gpus=devices,
            isolate_gpu_tasks=settings.isolate_gpu_tasks,
            memory_limit=limit,
            memory=fractions,
            local_directory=spill_parent,
        )
    )
    # Task threads cannot be interrupted; do not let one hold the process up.
    if threading.active_count() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    if status:
        raise typer.Exit(status)


def _child_command(scheduler_address: str, settings: WorkerSettings, index: int) -> list[str]:
    """How the nanny starts worker process ``index``: this command, one process.
    ``auto`` amounts go on as ``auto``: each child finds its own devices, those
    its ``CUDA_VISIBLE_DEVICES`` leaves it (:func:`_child_env`)."""
    declared = format_resources(settings.resources, settings.resources_text)
    auto = " ".join(f"{name}={AUTO}" for name in sorted(settings.auto_resources))
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
        # As written, so the scheduler hears MEMORY=100GB from each child too.
        " ".join(part for part in (declared, auto) if part),
    ]
    if settings.name:
        several = settings.nworkers != 1
        args += ["--name", f"{settings.name}-{index}" if several else settings.name]
    if settings.host:
        args += ["--host", settings.host]
    if settings.death_timeout is not None:
        args += ["--death-timeout", str(settings.death_timeout)]
    args += ["--drain-timeout", str(settings.drain_timeout)]
    if settings.isolate_gpu_tasks:
        args.append("--isolate-gpu-tasks")
    args += ["--memory-limit", str(settings.memory_limit)]  # resolved: this child's share
    if settings.local_directory is not None:
        args += ["--local-directory", str(settings.local_directory)]
    return args


def _with_gpus(settings: WorkerSettings) -> tuple[WorkerSettings, list[GpuDevice]]:
    """The devices that ``auto`` and ``--nworkers gpu`` stand for, found now
    (none looked for without them: then GPU=N is just a number), with
    ``nworkers`` counted and ``nthreads`` defaulted; bad cases exit 2."""
    auto = set(settings.auto_resources)
    if settings.nworkers == "gpu":
        if "GPU" in settings.resources:
            given = settings.resources_text.get("GPU", f"{settings.resources['GPU']:g}")
            fail(f"--nworkers gpu declares GPU=auto: leave GPU={given} out, or give a count")
        auto.add("GPU")
    devices: list[GpuDevice] = []
    if auto:
        what = "--nworkers gpu" if settings.nworkers == "gpu" else auto_label(auto)
        try:
            devices = need_gpus(what)
        except GpuDetectionError as exc:
            fail(str(exc))
    nworkers = len(devices) if settings.nworkers == "gpu" else settings.nworkers
    update: dict[str, Any] = {"nworkers": nworkers, "auto_resources": frozenset(auto)}
    if settings.nthreads is None:
        update["nthreads"] = default_nthreads(nworkers)
    return settings.model_copy(update=update), devices


def _child_env(
    settings: WorkerSettings, devices: list[GpuDevice]
) -> Callable[[int], dict[str, str]] | None:
    """Each child's ``CUDA_VISIBLE_DEVICES``: its share of ``devices``, with
    ``auto``; None (the nanny's environment as it is) without."""
    if not settings.auto_resources:
        return None
    assert isinstance(settings.nworkers, int)
    try:
        shares = split_devices(devices, settings.nworkers)
    except GpuDetectionError as exc:
        fail(str(exc))
    return lambda index: {"CUDA_VISIBLE_DEVICES": visible_devices_value(shares[index])}


def _worker_settings(
    resources: str | None,
    nthreads: int | None,
    nworkers: int | str | None,
    name: str | None,
    host: str | None,
    death_timeout: float | None = None,
    drain_timeout: float | None = None,
    isolate_gpu_tasks: bool | None = None,
) -> WorkerSettings:
    """Flags over the environment, checked; no devices looked for (:func:`_with_gpus`)."""
    given = {
        "nthreads": nthreads,
        "nworkers": nworkers,
        "name": name,
        "host": host,
        "death_timeout": death_timeout,
        "drain_timeout": drain_timeout,
        "isolate_gpu_tasks": isolate_gpu_tasks,
    }
    overrides: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    try:
        written = parse_spellings(resources) if resources is not None else None
        if written is not None:
            # Passed in, the environment's resources are not even read (a bad
            # one there must not stop a worker whose flag overrides it): see
            # _ResourcesFromEnv.
            overrides["resources"] = written
        settings = WorkerSettings(**overrides)
    except (ResourceSpecError, ConfigError) as exc:  # ConfigError: the file, naming it
        fail(str(exc))
    except ValidationError as exc:
        fail(settings_error(exc))
    if written is not None:
        # The flag replaces resources from the environment as a whole.
        plain = {k: v for k, v in written.items() if k not in settings.auto_resources}
        update = {"resources": check_resources(plain), "resources_text": plain}
        settings = settings.model_copy(update=update)
    if settings.nthreads is None and isinstance(settings.nworkers, int):
        settings = settings.model_copy(update={"nthreads": default_nthreads(settings.nworkers)})
    return settings


def _with_memory_limit(settings: WorkerSettings) -> WorkerSettings:
    """The memory limit in bytes per process (``auto``: the machine's shared
    out among ``nworkers``, counted by :func:`_with_gpus`): each child is told its share."""
    assert isinstance(settings.nworkers, int)
    limit = resolve_memory_limit(settings.memory_limit, settings.nworkers)
    return settings.model_copy(update={"memory_limit": limit})


def _with_memory_flags(
    settings: WorkerSettings, memory_limit: str | None, local_directory: str | None
) -> WorkerSettings:
    """--memory-limit and --local-directory over the environment; a bad limit exits 2."""
    update: dict[str, Any] = {}
    if memory_limit is not None:
        try:
            update["memory_limit"] = check_memory_limit(memory_limit)
        except ValueError as exc:
            fail(f"--memory-limit {exc}")
    if local_directory is not None:
        update["local_directory"] = Path(local_directory)
    return settings.model_copy(update=update)
