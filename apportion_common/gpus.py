"""GPUs as devices: what this process may use, found by NVML or nvidia-smi.

:func:`detect_gpus` asks NVML (``pynvml``, from the ``apportion[gpu]`` extra)
first and ``nvidia-smi`` when NVML is missing or fails, then keeps those
``CUDA_VISIBLE_DEVICES`` names, in its order. ``APPORTION_GPU_NO_NVML=1``
skips NVML (tests put a stand-in ``nvidia-smi`` first on PATH, which NVML
would ignore on a machine with real GPUs).

A worker that declares ``GPU=auto`` or ``GPU_MEMORY=auto`` declares what it
found (:func:`resolve_auto`); several worker processes share the devices out
evenly (:func:`split_devices`), each seeing its own through
``CUDA_VISIBLE_DEVICES`` (:func:`visible_devices_value`).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .resources import ResourceSpecError

#: Set (to anything but "" or "0") to go straight to nvidia-smi.
NO_NVML_ENV = "APPORTION_GPU_NO_NVML"
#: Seconds nvidia-smi may take: a hung driver must not hold a worker's start up.
NVIDIA_SMI_TIMEOUT_S = 5.0
NVIDIA_SMI_QUERY = ("--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader")
MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class GpuDevice:
    """One GPU this process may use.

    ``id`` is the device as ``CUDA_VISIBLE_DEVICES`` names it here: the index
    (``"1"``) or the UUID (``"GPU-..."``) the variable gave, else the index.
    """

    id: str
    index: int
    uuid: str
    name: str
    memory_bytes: int


class GpuDetectionError(ValueError):
    """No GPU where some were asked for, or GPUs that cannot be used as asked."""


def detect_gpus(environ: Mapping[str, str] | None = None) -> list[GpuDevice]:
    """The GPUs this process may use (none where none is found), in
    ``CUDA_VISIBLE_DEVICES`` order where that is set.

    Raises :class:`GpuDetectionError` for a ``CUDA_VISIBLE_DEVICES`` entry
    that names none of the devices found, or names one twice.
    """
    return _detect(os.environ if environ is None else environ)[0]


def need_gpus(what: str, environ: Mapping[str, str] | None = None) -> list[GpuDevice]:
    """:func:`detect_gpus`, raising :class:`GpuDetectionError` when there are
    none: ``"GPU=auto: no GPU found (nvidia-smi: not found)"`` for ``what``
    ``"GPU=auto"``."""
    devices, why = _detect(os.environ if environ is None else environ)
    if not devices:
        raise GpuDetectionError(f"{what}: no GPU found ({why})")
    return devices


def auto_label(names: Iterable[str]) -> str:
    """``"GPU=auto GPU_MEMORY=auto"``: what asked for the devices, for messages."""
    return " ".join(f"{name}=auto" for name in sorted(names))


def split_devices(
    devices: Sequence[GpuDevice], nworkers: int, *, asked: str | None = None
) -> list[list[GpuDevice]]:
    """``devices`` in ``nworkers`` contiguous groups of the same size.

    Raises :class:`GpuDetectionError` when the count does not divide them,
    worded after ``asked`` (by default ``"--nworkers N"``).
    """
    asked = asked or f"--nworkers {nworkers}"
    count = len(devices)
    if nworkers < 1 or not devices or count % nworkers:
        listed = ",".join(d.id for d in devices) or "none"
        raise GpuDetectionError(
            f"{asked} cannot split {count} GPUs ({listed}) evenly: use a count that divides {count}"
        )
    each = count // nworkers
    return [list(devices[i * each : (i + 1) * each]) for i in range(nworkers)]


def visible_devices_value(devices: Iterable[GpuDevice]) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a child process that is to see ``devices``."""
    return ",".join(d.id for d in devices)


def resolve_auto(
    resources: Mapping[str, float],
    resources_text: Mapping[str, str],
    auto_names: Iterable[str],
    devices: Sequence[GpuDevice],
) -> tuple[dict[str, float], dict[str, str]]:
    """``resources`` and their spellings with each of ``auto_names`` filled
    in from ``devices``: GPU their count, GPU_MEMORY their memory in bytes
    (spelled in a unit that reads back exactly, e.g. ``163118MiB``)."""
    names = set(auto_names)
    amounts, texts = dict(resources), dict(resources_text)
    if not names:
        return amounts, texts
    if not devices:
        raise GpuDetectionError(f"{auto_label(names)}: no GPU found")
    found = {
        "GPU": (float(len(devices)), str(len(devices))),
        "GPU_MEMORY": _bytes_amount(sum(d.memory_bytes for d in devices)),
    }
    for name in names:
        if name not in found:
            raise ResourceSpecError(f"resource {name}=auto: only GPU and GPU_MEMORY can be auto")
        amounts[name], texts[name] = found[name]
    return amounts, texts


def _bytes_amount(total: int) -> tuple[float, str]:
    """``total`` bytes and their spelling in the largest binary unit that
    divides them (``160GiB``, ``163118MiB``), so status shows it as such."""
    unit, size = "B", 1
    for name, power in (("KiB", 1), ("MiB", 2), ("GiB", 3), ("TiB", 4)):
        if total and total % 1024**power == 0:
            unit, size = name, 1024**power
    return float(total), f"{total // size}{unit}"


# ------------------------------------------------------------------ detection


def _detect(env: Mapping[str, str]) -> tuple[list[GpuDevice], str]:
    """The visible devices and, where there are none, why (for messages)."""
    found, why = _from_nvml(env)
    if found is None:
        found, why = _from_nvidia_smi(env)
    if not found:
        return [], why
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return found, why
    chosen = _visible(found, visible)
    return chosen, why if chosen else "CUDA_VISIBLE_DEVICES is empty"


def _visible(found: list[GpuDevice], value: str) -> list[GpuDevice]:
    """Those of ``found`` that ``CUDA_VISIBLE_DEVICES=value`` names, in its
    order, each with ``id`` as the variable spelled it."""
    chosen: list[GpuDevice] = []
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        device = _named(found, entry)
        if any(d.index == device.index for d in chosen):
            raise GpuDetectionError(f"CUDA_VISIBLE_DEVICES={value}: GPU {entry} is named twice")
        chosen.append(GpuDevice(entry, device.index, device.uuid, device.name, device.memory_bytes))
    return chosen


def _named(found: list[GpuDevice], entry: str) -> GpuDevice:
    if entry.isdigit():
        matches = [d for d in found if d.index == int(entry)]
    else:  # a UUID, or as CUDA allows a prefix of one that names a single device
        matches = [d for d in found if d.uuid.lower().startswith(entry.lower())]
    if len(matches) == 1:
        return matches[0]
    listed = ", ".join(f"{d.index} ({d.uuid})" for d in found)
    problem = "names several GPUs" if matches else "names no GPU"
    raise GpuDetectionError(
        f"CUDA_VISIBLE_DEVICES entry {entry!r} {problem} of those found: {listed}"
    )


def _from_nvml(env: Mapping[str, str]) -> tuple[list[GpuDevice] | None, str]:
    """The devices NVML lists; None where it is missing or fails (nvidia-smi next)."""
    if env.get(NO_NVML_ENV, "") not in ("", "0"):
        return None, "NVML: skipped"
    try:
        nvml: Any = importlib.import_module("pynvml")
    except ImportError:
        return None, "NVML: pynvml is not installed"
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError and kin: no driver, no library
        return None, f"NVML: {exc}"
    try:
        devices = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            total = int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
            # Whole MiB, as nvidia-smi reports it: the same GPU_MEMORY either way.
            devices.append(
                GpuDevice(
                    str(index),
                    index,
                    _text(nvml.nvmlDeviceGetUUID(handle)),
                    _text(nvml.nvmlDeviceGetName(handle)),
                    total // MIB * MIB,
                )
            )
        return devices, "NVML: no devices"
    except Exception as exc:  # a device NVML cannot read: nvidia-smi may
        return None, f"NVML: {exc}"
    finally:
        # Nothing is left to do with NVML whether or not it shuts down cleanly.
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


def _text(value: object) -> str:
    """pynvml's strings (bytes before nvidia-ml-py 11.515)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _from_nvidia_smi(env: Mapping[str, str]) -> tuple[list[GpuDevice], str]:
    binary = shutil.which("nvidia-smi", path=env.get("PATH", os.defpath))
    if binary is None:
        return [], "nvidia-smi: not found"
    try:
        done = subprocess.run(
            [binary, *NVIDIA_SMI_QUERY],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
            env=dict(env),
        )
    except subprocess.TimeoutExpired:
        return [], f"nvidia-smi: no answer within {NVIDIA_SMI_TIMEOUT_S:g}s"
    except OSError as exc:
        return [], f"nvidia-smi: {exc.strerror or exc}"
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        return [], f"nvidia-smi: exited with {done.returncode}" + (f": {said[0]}" if said else "")
    devices = []
    for line in done.stdout.splitlines():
        if not line.strip():
            continue
        device = _smi_line(line)
        if device is None:
            return [], f"nvidia-smi: unreadable line {line.strip()!r}"
        devices.append(device)
    return devices, "nvidia-smi: no devices"


def _smi_line(line: str) -> GpuDevice | None:
    """``0, GPU-8f3c..., NVIDIA H100 80GB HBM3, 81559 MiB``; None if not so."""
    fields = [f.strip() for f in line.split(",")]
    if len(fields) < 4 or not fields[0].isdigit():
        return None
    index, uuid, memory = int(fields[0]), fields[1], fields[-1]
    name = ", ".join(fields[2:-1])  # a name with a comma in it
    number, _, unit = memory.partition(" ")
    # "[N/A]" and the like: a device whose memory is unknown declares none.
    mib = int(number) if number.isdigit() and unit.strip() == "MiB" else 0
    return GpuDevice(str(index), index, uuid, name, mib * MIB)
