"""A stand-in ``nvidia-smi``, so that GPU detection runs on machines without GPUs.

:func:`install_fake_nvidia_smi` writes an executable ``nvidia-smi`` into a
directory, puts that first on PATH, turns NVML off (``APPORTION_GPU_NO_NVML``:
on a machine with GPUs NVML would find the real ones) and unsets
``CUDA_VISIBLE_DEVICES``. Processes a test starts inherit all of it.

The stand-in answers apportion's query (``--query-gpu=index,uuid,name,
memory.total --format=csv,noheader``) with ``FAKE_NVIDIA_SMI_COUNT`` devices
(2 unless set), each ``NVIDIA Fake GPU`` with :data:`FAKE_MIB` MiB and the
UUID :func:`fake_uuid` gives it; ``FAKE_NVIDIA_SMI_FAIL=1`` makes it fail
as nvidia-smi does without a driver, ``FAKE_NVIDIA_SMI_HANG=1`` hang.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from apportion_common.gpus import NO_NVML_ENV, NVIDIA_SMI_QUERY

COUNT_ENV = "FAKE_NVIDIA_SMI_COUNT"
FAIL_ENV = "FAKE_NVIDIA_SMI_FAIL"
HANG_ENV = "FAKE_NVIDIA_SMI_HANG"
FAKE_NAME = "NVIDIA Fake GPU"
#: An H100's memory as nvidia-smi reports it.
FAKE_MIB = 81559
FAKE_BYTES = FAKE_MIB * 1024 * 1024


def fake_uuid(index: int) -> str:
    """Device ``index``'s UUID: ``GPU-1a1b...`` for 1; its first 6 characters
    are unique to it (a prefix test's), ``GPU-`` is common to all."""
    return f"GPU-{index}a{index}b8f3c-0000-4000-8000-{index:012d}"


_SCRIPT = """#!{python}
import os, sys, time
if os.environ.get({fail!r}):
    print("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.")
    sys.exit(9)
if os.environ.get({hang!r}):
    time.sleep(60)
if sys.argv[1:] != {query!r}:
    print("fake nvidia-smi: unexpected arguments", sys.argv[1:], file=sys.stderr)
    sys.exit(2)
for i in range(int(os.environ.get({count!r}, "2"))):
    uuid = "GPU-%da%db8f3c-0000-4000-8000-%012d" % (i, i, i)
    print("%d, %s, {name}, {mib} MiB" % (i, uuid))
"""


def write_fake_nvidia_smi(directory: Path) -> Path:
    """An executable ``nvidia-smi`` in ``directory`` (see the module's docstring)."""
    path = directory / "nvidia-smi"
    path.write_text(
        _SCRIPT.format(
            python=sys.executable,
            fail=FAIL_ENV,
            hang=HANG_ENV,
            query=list(NVIDIA_SMI_QUERY),
            count=COUNT_ENV,
            name=FAKE_NAME,
            mib=FAKE_MIB,
        )
    )
    path.chmod(0o755)
    return path


@dataclass
class FakeGpus:
    """The installed stand-in: :meth:`set_count` devices from now on."""

    bin_dir: Path
    monkeypatch: pytest.MonkeyPatch

    def set_count(self, count: int) -> None:
        self.monkeypatch.setenv(COUNT_ENV, str(count))

    def without_nvidia_smi(self) -> dict[str, str]:
        """An environment whose PATH finds no nvidia-smi at all (a machine
        without GPUs), for a process a test starts."""
        empty = self.bin_dir.parent / "no-gpu-bin"
        empty.mkdir(exist_ok=True)
        return {"PATH": str(empty)}


def install_fake_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeGpus:
    """The stand-in first on PATH, 2 devices, NVML off, no CUDA_VISIBLE_DEVICES."""
    bin_dir = tmp_path / "fake-gpu-bin"
    bin_dir.mkdir()
    write_fake_nvidia_smi(bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', os.defpath)}")
    monkeypatch.setenv(NO_NVML_ENV, "1")
    monkeypatch.setenv(COUNT_ENV, "2")
    for name in (FAIL_ENV, HANG_ENV, "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    return FakeGpus(bin_dir, monkeypatch)
