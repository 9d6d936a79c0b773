"""GPU=auto with real processes, started as a user starts them, on a stand-in
nvidia-smi (tests/helpers/fake_nvidia_smi.py): worker processes share the
devices out, each seeing its own through CUDA_VISIBLE_DEVICES."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from client_sdk import Client, LocalCluster
from tests.helpers.fake_nvidia_smi import (
    FAKE_BYTES,
    FAKE_NAME,
    FakeGpus,
    install_fake_nvidia_smi,
)
from tests.helpers.processes import Processes, run_apportion, wait_for_workers

UNREACHABLE = "127.0.0.1:1"  # nothing listens there: a worker that started would hang


@pytest.fixture
def fake_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeGpus:
    return install_fake_nvidia_smi(tmp_path, monkeypatch)


def visible_devices() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def by_device(client: Client) -> dict[str | None, dict[str, float]]:
    """Each worker's declared resources, keyed by the CUDA_VISIBLE_DEVICES it sees."""
    workers = client.scheduler_info()["workers"]
    seen = client.run(visible_devices)
    assert len(set(seen.values())) == len(seen), seen  # no two see the same
    return {seen[address]: workers[address]["resources"] for address in workers}


def test_nworkers_share_the_gpus_out(
    fake_gpus: FakeGpus, processes: Processes, scheduler_address: str
) -> None:
    processes.worker(
        scheduler_address,
        "--nworkers",
        "2",
        "--resources",
        "GPU=auto GPU_MEMORY=auto MEMORY=1GB",
        wait=False,
    )
    wait_for_workers(scheduler_address, 2)
    each = {"GPU": 1, "GPU_MEMORY": FAKE_BYTES, "MEMORY": 1e9}
    with Client(scheduler_address) as client:
        assert by_device(client) == {"0": each, "1": each}
        texts = [w["resources_text"] for w in client.scheduler_info()["workers"].values()]
    assert all(t["GPU_MEMORY"] == "81559MiB" and t["MEMORY"] == "1GB" for t in texts), texts


def test_nworkers_gpu_starts_one_process_per_gpu(
    fake_gpus: FakeGpus, processes: Processes, scheduler_address: str
) -> None:
    fake_gpus.set_count(4)
    processes.worker(scheduler_address, env={"APPORTION_WORKER__NWORKERS": "gpu"}, wait=False)
    wait_for_workers(scheduler_address, 4)
    with Client(scheduler_address) as client:
        assert by_device(client) == {str(i): {"GPU": 1} for i in range(4)}


def test_the_users_cuda_visible_devices_is_kept(
    fake_gpus: FakeGpus, processes: Processes, scheduler_address: str
) -> None:
    fake_gpus.set_count(4)
    env = {"CUDA_VISIBLE_DEVICES": "1", "APPORTION_WORKER__RESOURCES__GPU": "auto"}
    processes.worker(scheduler_address, env=env)
    with Client(scheduler_address) as client:
        assert by_device(client) == {"1": {"GPU": 1}}


def test_a_gpu_number_without_auto_looks_for_nothing(
    fake_gpus: FakeGpus, processes: Processes, scheduler_address: str
) -> None:
    env = {**fake_gpus.without_nvidia_smi(), "CUDA_VISIBLE_DEVICES": "0,1"}
    processes.worker(
        scheduler_address, "--nworkers", "2", "--resources", "GPU=2", env=env, wait=False
    )
    wait_for_workers(scheduler_address, 2)
    with Client(scheduler_address) as client:
        assert list(client.run(visible_devices).values()) == ["0,1", "0,1"]
        workers = client.scheduler_info()["workers"].values()
        assert [w["resources"] for w in workers] == [{"GPU": 2}, {"GPU": 2}]


@pytest.mark.parametrize(
    ("args", "count", "message"),
    [
        (["--resources", "GPU=auto"], 0, "GPU=auto: no GPU found (nvidia-smi: not found)"),
        (["--nworkers", "3", "--resources", "GPU=auto"], 4, "--nworkers 3 cannot split 4 GPUs"),
        (["--resources", "CPU=auto"], 2, "resource CPU=auto: only GPU and GPU_MEMORY can be auto"),
        (["--nworkers", "gpu", "--resources", "GPU=2"], 2, "leave GPU=2 out"),
    ],
)
def test_bad_gpu_requests_exit_2_with_one_line(
    fake_gpus: FakeGpus, args: list[str], count: int, message: str
) -> None:
    fake_gpus.set_count(count)
    env = fake_gpus.without_nvidia_smi() if count == 0 else {}
    result = run_apportion("worker", UNREACHABLE, "--death-timeout", "1", *args, env=env)
    assert result.returncode == 2, result
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("apportion: error: ") and message in line, line
    assert "Traceback" not in result.stderr


def test_local_refuses_an_uneven_share(fake_gpus: FakeGpus) -> None:
    fake_gpus.set_count(4)
    result = run_apportion("local", "--port", "0", "--workers", "3", "--resources", "GPU=auto")
    assert result.returncode == 2, result
    assert result.stderr.strip().splitlines() == [
        "apportion: error: 3 workers cannot split 4 GPUs (0,1,2,3) evenly: "
        "use a count that divides 4"
    ]


def test_local_cluster_shares_the_gpus_out(fake_gpus: FakeGpus) -> None:
    with LocalCluster(n_workers=2, resources={"GPU": "auto"}) as cluster, Client(cluster) as client:
        assert by_device(client) == {"0": {"GPU": 1}, "1": {"GPU": 1}}


def task_gpus(seconds: float) -> dict[str, object]:
    """What a task is given and sees, holding its lease for a while."""
    from client_sdk import get_task_context

    time.sleep(seconds)
    return {
        "gpus": get_task_context().gpus,
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "pid": os.getpid(),
    }


def test_tasks_on_a_gpu_auto_worker_get_their_own_devices(
    fake_gpus: FakeGpus, processes: Processes, scheduler_address: str
) -> None:
    fake_gpus.set_count(2)
    processes.worker(scheduler_address, "--nthreads", "3", "--resources", "GPU=auto")
    with Client(scheduler_address) as client:
        together = [client.submit(task_gpus, 1.5, resources={"GPU": 1}) for _ in range(2)]
        # While they run, status shows which task holds which device.
        deadline = time.monotonic() + 15
        while True:
            status = run_apportion("status", scheduler_address, env={"COLUMNS": "200"})
            held = [line for line in status.stdout.splitlines() if "gpu " in line]
            if sum(key in status.stdout for key in (f.key for f in together)) == 2:
                break
            assert time.monotonic() < deadline, status.stdout
        assert any("gpu 0:" in line for line in held) and any("gpu 1:" in line for line in held)
        seen = client.gather(together)
        assert sorted(s["gpus"] for s in seen) == [("0",), ("1",)]
        assert {s["visible"] for s in seen} == {"0,1"}  # threads: the process sees both
        isolated = client.submit(task_gpus, 0, resources={"GPU": 1}, isolate=True).result()
        assert isolated["visible"] == isolated["gpus"][0]  # type: ignore[index]
        assert isolated["pid"] not in {s["pid"] for s in seen}
        (worker,) = client.scheduler_info()["workers"].values()
        assert [(g["id"], g["name"]) for g in worker["gpus"]] == [
            ("0", FAKE_NAME),
            ("1", FAKE_NAME),
        ]
