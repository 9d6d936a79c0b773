"""``make gpu-check``: on a machine with NVIDIA GPUs, show that ``GPU=auto``
matches the machine and that each task uses the device it was given.

Not part of ``make test`` (the suite fakes the devices). It:

1. detects the GPUs as a worker does and compares them with ``nvidia-smi -L``
   (within ``CUDA_VISIBLE_DEVICES`` where that is set);
2. starts a local cluster of one worker per GPU (``GPU=auto``: the devices
   split one per process) plus one worker holding every GPU, and checks what
   each declares;
3. runs one ``GPU=1`` task per device on the all-GPU worker, at once, each in
   a thread (``get_task_context().gpus``) and each isolated
   (``isolate=True``: a child process that sees only its device); each task
   allocates 256 MiB on its device with torch or cupy where installed, and
   finds its own process in ``nvidia-smi``'s process list on the device it
   was given (a container that hides other PIDs: the framework's device UUID
   instead).

Prints one line per check and exits 1 if any failed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from typing import Any

from apportion_common.gpus import GpuDevice, detect_gpus

ALLOC_BYTES = 256 * 1024 * 1024
#: How long a task keeps its allocation, so that the others overlap it.
HOLD_S = 2.0


def _smi(*args: str) -> list[str]:
    done = subprocess.run(
        ["nvidia-smi", *args], capture_output=True, text=True, timeout=30, check=False
    )
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def _framework() -> str:
    for name in ("torch", "cupy"):
        try:
            __import__(name)
        except ImportError:
            continue
        return name
    return ""


def use_gpu(hold_s: float = HOLD_S) -> dict[str, Any]:
    """In a task: allocate on the first device this process sees (isolated)
    or on the device the task was given (thread), and say where it landed."""
    from client_sdk import get_task_context

    ctx = get_task_context()
    seen = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    # In a thread the process sees every device of the worker: the task's is
    # its position in that list; isolated, the process sees only its own.
    visible = [v for v in seen.split(",") if v]
    ordinal = visible.index(ctx.gpus[0]) if ctx.gpus and ctx.gpus[0] in visible else 0
    out: dict[str, Any] = {
        "gpus": list(ctx.gpus),
        "visible": seen,
        "pid": os.getpid(),
        "framework": _framework(),
    }
    held: Any = None
    if out["framework"] == "torch":
        import torch

        device = torch.device("cuda", ordinal)
        held = torch.empty(ALLOC_BYTES, dtype=torch.uint8, device=device)
        props = torch.cuda.get_device_properties(device)
        out["framework_uuid"] = str(getattr(props, "uuid", ""))
    elif out["framework"] == "cupy":
        import cupy

        with cupy.cuda.Device(ordinal):
            held = cupy.empty(ALLOC_BYTES, dtype=cupy.uint8)
    if held is not None:
        rows = _smi("--query-compute-apps=pid,gpu_uuid", "--format=csv,noheader")
        out["smi_uuids"] = [
            uuid.strip()
            for pid, _, uuid in (r.partition(",") for r in rows)
            if pid == str(os.getpid())
        ]
        time.sleep(hold_s)
    return out


class Checks:
    """Prints each check as it is made; counts the failures."""

    def __init__(self) -> None:
        self.failed = 0

    def __call__(self, ok: bool, line: str) -> None:
        self.failed += not ok
        print(f"[{'ok' if ok else 'FAILED'}] {line}")


def check_split(check: Checks, by_id: dict[str, GpuDevice]) -> None:
    """One worker process per GPU, each declaring GPU=1 and owning one device."""
    from client_sdk import Client, LocalCluster

    n = len(by_id)
    auto = {"GPU": "auto", "GPU_MEMORY": "auto"}
    with LocalCluster(n_workers=n, nthreads=1, resources=auto) as cluster, Client(cluster) as c:
        workers = c.scheduler_info()["workers"].values()
        gpus = sorted(w["resources"].get("GPU", 0) for w in workers)
        check(gpus == [1.0] * n, f"{n} processes with GPU=auto: each declares GPU=1: {gpus}")
        owned = sorted(g["id"] for w in workers for g in w["gpus"])
        check(owned == sorted(by_id), f"one device per process: {owned}")


def check_tasks(check: Checks, by_id: dict[str, GpuDevice]) -> None:
    """One GPU=1 task per device at once on a worker holding them all, in
    threads and isolated: each on the device it was given."""
    from client_sdk import Client, LocalCluster

    n = len(by_id)
    whole = {"GPU": "auto"}
    with (
        LocalCluster(n_workers=1, nthreads=n, resources=whole) as cluster,
        Client(cluster) as client,
    ):
        (info,) = client.scheduler_info()["workers"].values()
        declared = info["resources"].get("GPU")
        check(declared == n, f"one process declares GPU={declared}")
        for isolate in (False, True):
            how = "isolated" if isolate else "in threads"
            futures = [
                client.submit(use_gpu, resources={"GPU": 1}, isolate=isolate) for _ in range(n)
            ]
            results = client.gather(futures)
            given = [r["gpus"][0] if r["gpus"] else "" for r in results]
            check(sorted(given) == sorted(by_id), f"{how}: each task got its own: {given}")
            for r, device_id in zip(results, given, strict=True):
                _check_landing(check, how, r, by_id.get(device_id), isolate)
            if not any(r["framework"] for r in results):
                print(f"  ({how}: no torch or cupy here: nothing allocated on the GPUs)")


def _check_landing(
    check: Checks, how: str, r: dict[str, Any], device: GpuDevice | None, isolate: bool
) -> None:
    if isolate:
        seen = r["visible"]
        check(seen == (device.id if device else ""), f"{how}: CUDA_VISIBLE_DEVICES={seen!r}")
    if not r["framework"] or device is None:
        return
    uuids = r.get("smi_uuids") or [r.get("framework_uuid", "")]
    where = "nvidia-smi" if r.get("smi_uuids") else r["framework"]
    ok = any(u and device.uuid.endswith(u.removeprefix("GPU-")) for u in uuids)
    check(ok, f"{how}: pid {r['pid']} allocated on {uuids} ({where}), given {device.uuid}")


def main() -> int:
    if shutil.which("nvidia-smi") is None:
        print("gpu-check: nvidia-smi is not on PATH: no NVIDIA GPU here to check")
        return 1
    check = Checks()
    devices = detect_gpus()
    listed = _smi("-L")
    wanted = os.environ.get("CUDA_VISIBLE_DEVICES")
    expect = len(listed) if wanted is None else len([w for w in wanted.split(",") if w])
    print(f"nvidia-smi -L: {len(listed)} GPU(s); CUDA_VISIBLE_DEVICES={wanted!r}")
    for d in devices:
        print(f"  GPU=auto sees {d.id}: {d.name}, {d.memory_bytes / 2**30:.1f} GiB, {d.uuid}")
    check(
        bool(devices) and len(devices) == expect, f"GPU=auto: {len(devices)}, nvidia-smi: {expect}"
    )
    if not devices:
        return 1
    by_id = {d.id: d for d in devices}
    check_split(check, by_id)
    check_tasks(check, by_id)
    print(
        "gpu-check: all checks passed" if not check.failed else f"gpu-check: {check.failed} FAILED"
    )
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
