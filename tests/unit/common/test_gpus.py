"""GPU detection (NVML, else nvidia-smi: a stand-in here), CUDA_VISIBLE_DEVICES,
``auto`` amounts, and sharing the devices out among worker processes."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pydantic
import pytest
import typer

from apportion.cli.worker import _child_command, _child_env, _with_gpus, _worker_settings
from apportion_common import gpus
from apportion_common.gpus import (
    GpuDetectionError,
    GpuDevice,
    detect_gpus,
    need_gpus,
    resolve_auto,
    split_devices,
    visible_devices_value,
)
from apportion_common.resources import (
    ResourceSpecError,
    auto_names,
    check_amount,
    check_resources,
    parse_resources,
    parse_spellings,
)
from apportion_common.settings import WorkerSettings
from client_sdk import LocalCluster
from tests.helpers.fake_nvidia_smi import (
    FAIL_ENV,
    FAKE_BYTES,
    FAKE_NAME,
    HANG_ENV,
    FakeGpus,
    fake_uuid,
    install_fake_nvidia_smi,
)

ADDRESS = "127.0.0.1:8786"


@pytest.fixture
def fake_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeGpus:
    for name in list(os.environ):
        if name.upper().startswith("APPORTION_"):
            monkeypatch.delenv(name)
    return install_fake_nvidia_smi(tmp_path, monkeypatch)


def ids(devices: list[GpuDevice]) -> list[str]:
    return [d.id for d in devices]


# ------------------------------------------------------------------ detection


@pytest.mark.parametrize("count", [2, 4])
def test_the_devices_nvidia_smi_lists(fake_gpus: FakeGpus, count: int) -> None:
    fake_gpus.set_count(count)
    found = detect_gpus()
    assert found == [
        GpuDevice(str(i), i, fake_uuid(i), FAKE_NAME, FAKE_BYTES) for i in range(count)
    ]


def test_environ_is_read_from_the_mapping_given(fake_gpus: FakeGpus) -> None:
    env = dict(os.environ, FAKE_NVIDIA_SMI_COUNT="4", CUDA_VISIBLE_DEVICES="2")
    assert ids(detect_gpus(env)) == ["2"]
    assert ids(detect_gpus()) == ["0", "1"]  # os.environ untouched


def test_no_nvidia_smi_means_no_gpus(fake_gpus: FakeGpus, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", fake_gpus.without_nvidia_smi()["PATH"])
    assert detect_gpus() == []
    with pytest.raises(GpuDetectionError) as info:
        need_gpus("GPU=auto")
    assert str(info.value) == "GPU=auto: no GPU found (nvidia-smi: not found)"


def test_a_failing_nvidia_smi_means_no_gpus(
    fake_gpus: FakeGpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAIL_ENV, "1")
    assert detect_gpus() == []
    with pytest.raises(GpuDetectionError, match="nvidia-smi: exited with 9: NVIDIA-SMI has"):
        need_gpus("GPU=auto")


def test_a_hung_nvidia_smi_means_no_gpus(
    fake_gpus: FakeGpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(HANG_ENV, "1")
    monkeypatch.setattr(gpus, "NVIDIA_SMI_TIMEOUT_S", 0.5)
    with pytest.raises(GpuDetectionError, match=r"no answer within 0\.5s"):
        need_gpus("GPU=auto")


def _fake_nvml(fail_init: bool = False) -> types.ModuleType:
    nvml = types.ModuleType("pynvml")

    def init() -> None:
        if fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def memory(handle: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(total=80 * 1024**3 + 12345)  # not whole MiB

    nvml.nvmlInit = init  # type: ignore[attr-defined]
    nvml.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetCount = lambda: 3  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetUUID = lambda h: f"GPU-nvml-{h}".encode()  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetName = lambda h: "NVIDIA NVML GPU"  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetMemoryInfo = memory  # type: ignore[attr-defined]
    return nvml


def test_nvml_first_where_it_works(fake_gpus: FakeGpus, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml())
    assert ids(detect_gpus()) == ["0", "1"]  # NVML off (APPORTION_GPU_NO_NVML)
    monkeypatch.delenv(gpus.NO_NVML_ENV)
    found = detect_gpus()
    assert [(d.uuid, d.name) for d in found] == [
        (f"GPU-nvml-{i}", "NVIDIA NVML GPU") for i in range(3)
    ]
    assert {d.memory_bytes for d in found} == {80 * 1024**3}  # whole MiB, as nvidia-smi says


def test_nvidia_smi_when_nvml_fails(fake_gpus: FakeGpus, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(gpus.NO_NVML_ENV)
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(fail_init=True))
    assert [d.uuid for d in detect_gpus()] == [fake_uuid(0), fake_uuid(1)]


# ------------------------------------------------------- CUDA_VISIBLE_DEVICES


@pytest.mark.parametrize(
    ("visible", "indices", "expected_ids"),
    [
        ("1", [1], ["1"]),
        ("3,1", [3, 1], ["3", "1"]),  # its order, not the machine's
        (" 2 , 0 ", [2, 0], ["2", "0"]),
        (fake_uuid(2), [2], [fake_uuid(2)]),
        (f"{fake_uuid(3)},0", [3, 0], [fake_uuid(3), "0"]),
        ("GPU-1a", [1], ["GPU-1a"]),  # a unique prefix, as CUDA allows
        ("gpu-2A2B", [2], ["gpu-2A2B"]),
    ],
)
def test_cuda_visible_devices_chooses_and_orders(
    fake_gpus: FakeGpus,
    monkeypatch: pytest.MonkeyPatch,
    visible: str,
    indices: list[int],
    expected_ids: list[str],
) -> None:
    fake_gpus.set_count(4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    found = detect_gpus()
    assert [d.index for d in found] == indices
    assert ids(found) == expected_ids  # as the variable spelled them
    assert [d.uuid for d in found] == [fake_uuid(i) for i in indices]


def test_an_empty_cuda_visible_devices_means_none(
    fake_gpus: FakeGpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert detect_gpus() == []
    with pytest.raises(GpuDetectionError, match=r"no GPU found \(CUDA_VISIBLE_DEVICES is empty\)"):
        need_gpus("GPU=auto")


@pytest.mark.parametrize(
    ("visible", "named"),
    [
        ("7", "'7' names no GPU"),
        ("0,GPU-ffff", "'GPU-ffff' names no GPU"),
        ("GPU-", "'GPU-' names several GPUs"),
        ("1,1", "GPU 1 is named twice"),
        (f"1,{fake_uuid(1)}", "is named twice"),
    ],
)
def test_a_bad_cuda_visible_devices_entry_is_named(
    fake_gpus: FakeGpus, monkeypatch: pytest.MonkeyPatch, visible: str, named: str
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with pytest.raises(GpuDetectionError) as info:
        detect_gpus()
    message = str(info.value)
    assert named in message and "\n" not in message
    if "names" in named:  # and what there is to choose from
        assert f"0 ({fake_uuid(0)}), 1 ({fake_uuid(1)})" in message


# -------------------------------------------------------- amounts and shares


def test_auto_amounts_count_the_devices_and_sum_their_memory(fake_gpus: FakeGpus) -> None:
    fake_gpus.set_count(2)
    devices = detect_gpus()
    amounts, texts = resolve_auto(
        {"MEMORY": 1e9}, {"MEMORY": "1GB"}, {"GPU", "GPU_MEMORY"}, devices
    )
    assert amounts == {"MEMORY": 1e9, "GPU": 2.0, "GPU_MEMORY": 2.0 * FAKE_BYTES}
    assert texts == {"MEMORY": "1GB", "GPU": "2", "GPU_MEMORY": "163118MiB"}
    assert check_amount("GPU_MEMORY", texts["GPU_MEMORY"]) == amounts["GPU_MEMORY"]
    # Only what was asked for.
    assert resolve_auto({}, {}, {"GPU_MEMORY"}, devices[:1])[1] == {"GPU_MEMORY": "81559MiB"}
    assert resolve_auto({"GPU": 2.0}, {}, set(), []) == ({"GPU": 2.0}, {})
    whole = [GpuDevice(str(i), i, f"u{i}", "x", 80 * 1024**3) for i in range(2)]
    assert resolve_auto({}, {}, {"GPU_MEMORY"}, whole)[1] == {"GPU_MEMORY": "160GiB"}
    with pytest.raises(GpuDetectionError, match="GPU=auto: no GPU found"):
        resolve_auto({}, {}, {"GPU"}, [])


def _devices(count: int) -> list[GpuDevice]:
    return [GpuDevice(str(i), i, fake_uuid(i), FAKE_NAME, FAKE_BYTES) for i in range(count)]


@pytest.mark.parametrize(
    ("count", "nworkers", "expected"),
    [
        (4, 2, [["0", "1"], ["2", "3"]]),
        (4, 4, [["0"], ["1"], ["2"], ["3"]]),
        (4, 1, [["0", "1", "2", "3"]]),
        (2, 2, [["0"], ["1"]]),
    ],
)
def test_split_is_even_and_contiguous(count: int, nworkers: int, expected: list[list[str]]) -> None:
    shares = split_devices(_devices(count), nworkers)
    assert [ids(share) for share in shares] == expected
    assert [visible_devices_value(s) for s in shares] == [",".join(e) for e in expected]


def test_an_uneven_split_is_refused() -> None:
    with pytest.raises(GpuDetectionError) as info:
        split_devices(_devices(4), 3)
    assert str(info.value) == (
        "--nworkers 3 cannot split 4 GPUs (0,1,2,3) evenly: use a count that divides 4"
    )
    with pytest.raises(GpuDetectionError, match=r"^3 workers cannot split 2 GPUs"):
        split_devices(_devices(2), 3, asked="3 workers")
    with pytest.raises(GpuDetectionError, match="--nworkers 4 cannot split 2 GPUs"):
        split_devices(_devices(2), 4)


# -------------------------------------------------------------- auto parsing


def test_gpu_and_gpu_memory_may_be_auto() -> None:
    written = parse_spellings("GPU=auto GPU_MEMORY=AUTO,MEMORY=1GB")
    assert written == {"GPU": "auto", "GPU_MEMORY": "auto", "MEMORY": "1GB"}
    assert auto_names(written) == {"GPU", "GPU_MEMORY"}
    assert auto_names({"GPU": 2, "gpu": "auto", "CPU": "auto"}) == frozenset()


@pytest.mark.parametrize("spec", ["CPU=auto", "gpu=auto", "GPU=1 MEMORY=Auto"])
def test_other_resources_cannot_be_auto(spec: str) -> None:
    name = spec.split()[-1].split("=")[0]
    with pytest.raises(ResourceSpecError) as info:
        parse_spellings(spec)
    assert str(info.value) == f"resource {name}=auto: only GPU and GPU_MEMORY can be auto"


def test_auto_is_no_amount_where_a_number_is_needed() -> None:
    for refuse in (lambda: parse_resources("GPU=auto"), lambda: check_resources({"GPU": "auto"})):
        with pytest.raises(ResourceSpecError, match="GPU=auto: auto is only for the resources"):
            refuse()


def test_settings_keep_auto_apart(fake_gpus: FakeGpus, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPORTION_WORKER__RESOURCES__GPU", "auto")
    monkeypatch.setenv("APPORTION_WORKER__RESOURCES__MEMORY", "1GB")
    monkeypatch.setenv("APPORTION_WORKER__AUTO_RESOURCES", '["CPU"]')  # never set apart
    s = WorkerSettings()
    assert (s.resources, s.resources_text, s.auto_resources) == (
        {"MEMORY": 1e9},
        {"MEMORY": "1GB"},
        {"GPU"},
    )
    given = WorkerSettings(resources={"GPU_MEMORY": "Auto", "GPU": 1})
    assert (given.resources, given.auto_resources) == ({"GPU": 1.0}, {"GPU_MEMORY"})
    monkeypatch.setenv("APPORTION_WORKER__RESOURCES__CPU", "auto")
    with pytest.raises(pydantic.ValidationError, match="only GPU and GPU_MEMORY can be auto"):
        WorkerSettings()


def test_nworkers_may_be_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APPORTION_WORKER__NWORKERS", raising=False)
    assert WorkerSettings(nworkers="GPU").nworkers == "gpu"
    assert WorkerSettings(nworkers="3").nworkers == 3
    monkeypatch.setenv("APPORTION_WORKER__NWORKERS", "gpu")
    assert WorkerSettings().nworkers == "gpu"
    for bad in ("abc", "0", 0):
        with pytest.raises(pydantic.ValidationError):
            WorkerSettings(nworkers=bad)


# ------------------------------------------------ what the worker command does


def test_the_nanny_shares_the_devices_out(fake_gpus: FakeGpus) -> None:
    settings, devices = _with_gpus(
        _worker_settings("GPU=auto GPU_MEMORY=auto A=1", None, 2, None, None)
    )
    assert ids(devices) == ["0", "1"]
    assert settings.resources == {"A": 1.0} and settings.auto_resources == {"GPU", "GPU_MEMORY"}
    env = _child_env(settings, devices)
    assert env is not None and [env(i) for i in range(2)] == [
        {"CUDA_VISIBLE_DEVICES": "0"},
        {"CUDA_VISIBLE_DEVICES": "1"},
    ]
    command = _child_command(ADDRESS, settings, 1)
    assert command[command.index("--resources") + 1] == "A=1 GPU=auto GPU_MEMORY=auto"
    assert "--isolate-gpu-tasks" not in command


def test_nworkers_gpu_is_one_process_per_gpu(fake_gpus: FakeGpus) -> None:
    fake_gpus.set_count(4)
    settings, devices = _with_gpus(
        _worker_settings(None, None, "gpu", None, None, None, None, True)
    )
    assert (settings.nworkers, settings.auto_resources, len(devices)) == (4, {"GPU"}, 4)
    env = _child_env(settings, devices)
    assert env is not None and env(3) == {"CUDA_VISIBLE_DEVICES": "3"}
    command = _child_command(ADDRESS, settings, 0)
    assert command[command.index("--resources") + 1] == "GPU=auto"
    assert "--isolate-gpu-tasks" in command


def test_without_auto_nothing_is_looked_for(
    fake_gpus: FakeGpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", fake_gpus.without_nvidia_smi()["PATH"])
    settings, devices = _with_gpus(_worker_settings("GPU=2", None, 2, None, None))
    assert (settings.resources, devices, _child_env(settings, devices)) == ({"GPU": 2.0}, [], None)


@pytest.mark.parametrize(
    ("spec", "nworkers", "count", "message"),
    [
        ("GPU=2", "gpu", 2, "--nworkers gpu declares GPU=auto: leave GPU=2 out"),
        ("GPU=auto", 3, 4, "--nworkers 3 cannot split 4 GPUs (0,1,2,3) evenly"),
        ("GPU=auto", 1, 0, "GPU=auto: no GPU found (nvidia-smi: no devices)"),
        (None, "gpu", 0, "--nworkers gpu: no GPU found"),
    ],
)
def test_the_worker_command_refuses_with_one_line(
    fake_gpus: FakeGpus,
    capsys: pytest.CaptureFixture[str],
    spec: str | None,
    nworkers: int | str,
    count: int,
    message: str,
) -> None:
    fake_gpus.set_count(count)
    with pytest.raises(typer.Exit) as info:
        settings, devices = _with_gpus(_worker_settings(spec, None, nworkers, None, None))
        _child_env(settings, devices)
    assert info.value.exit_code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


# ------------------------------------------------------------- LocalCluster


def test_local_cluster_refuses_before_starting_anything(
    fake_gpus: FakeGpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_gpus.set_count(4)
    with pytest.raises(GpuDetectionError, match=r"^3 workers cannot split 4 GPUs"):
        LocalCluster(n_workers=3, resources={"GPU": "auto"})
    with pytest.raises(ResourceSpecError, match="CPU=auto: only GPU and GPU_MEMORY"):
        LocalCluster(n_workers=1, resources={"CPU": "auto"})
    monkeypatch.setenv("PATH", fake_gpus.without_nvidia_smi()["PATH"])
    with pytest.raises(ValueError, match=r"GPU_MEMORY=auto: no GPU found \(nvidia-smi: not"):
        LocalCluster(n_workers=2, resources={"GPU_MEMORY": "auto"})
