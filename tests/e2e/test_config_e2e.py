"""The configuration file and ``config.set`` with real processes, started as a
user starts them: what a worker declares from the file, under the
environment and flags; a bad file; ``apportion config``; a LocalCluster
inside ``config.set``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from apportion_common.process_memory import system_memory
from client_sdk import Client, LocalCluster, config
from tests.helpers.processes import Processes, read_line, run_apportion, wait_for_workers

UNREACHABLE = "127.0.0.1:1"  # nothing listens there: a worker that started would hang
FILE = """\
[worker]
nthreads = 2

[worker.resources]
GPU = 2
MEMORY = "100GB"
"""


def _status(address: str) -> dict[str, Any]:
    result = run_apportion("status", address, "--json")
    assert result.returncode == 0, result
    info: dict[str, Any] = json.loads(result.stdout)
    return info


def _config_file(tmp_path: Path, text: str = FILE) -> dict[str, str]:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return {"APPORTION_CONFIG": str(path)}


def test_a_worker_declares_what_the_file_says(
    processes: Processes, scheduler_address: str, tmp_path: Path
) -> None:
    # Not processes.worker(), which gives --nthreads 1.
    processes.start("worker", scheduler_address, env=_config_file(tmp_path))
    wait_for_workers(scheduler_address, 1)
    (worker,) = _status(scheduler_address)["workers"].values()
    assert worker["resources"] == {"GPU": 2, "MEMORY": 100e9}
    assert worker["resources_text"]["MEMORY"] == "100GB"
    assert worker["nthreads"] == 2


def test_the_environment_beats_the_file_and_flags_beat_both(
    processes: Processes, scheduler_address: str, tmp_path: Path
) -> None:
    env = {**_config_file(tmp_path), "APPORTION_WORKER__RESOURCES__GPU": "3"}
    processes.worker(scheduler_address, "--name", "env", env=env)
    processes.worker(scheduler_address, "--name", "flag", "--resources", "GPU=5", env=env)
    declared = {w["name"]: w["resources"] for w in _status(scheduler_address)["workers"].values()}
    # Each source's resources replace the lower one's as a whole: no MEMORY.
    assert declared == {"env": {"GPU": 3}, "flag": {"GPU": 5}}


def test_a_bad_file_exits_2_with_one_line_before_starting(tmp_path: Path) -> None:
    env = _config_file(tmp_path, '[worker]\nnthreads = "four"\n')
    for args in (["worker", UNREACHABLE], ["local", "--port", "0"], ["config"]):
        result = run_apportion(*args, env=env)
        assert result.returncode == 2, result
        assert result.stderr.splitlines() == [
            f"apportion: error: {env['APPORTION_CONFIG']}: worker.nthreads: "
            "Input should be a valid integer, unable to parse string as an integer"
        ]
        assert result.stdout == ""  # nothing started


def test_a_scheduler_does_not_judge_the_worker_s_table(
    processes: Processes, tmp_path: Path
) -> None:
    env = _config_file(tmp_path, '[scheduler]\nplacement = "pack"\n[worker]\nnthreads = "x"\n')
    proc = processes.start("scheduler", "--port", "0", env=env)
    assert "listening on" in read_line(proc, 30)
    bad = _config_file(tmp_path, '[scheduler]\nplacement = "heap"\n')
    result = run_apportion("scheduler", "--port", "0", env=bad)
    assert result.returncode == 2, result
    assert f"{bad['APPORTION_CONFIG']}: scheduler.placement: Input should be" in result.stderr


def test_apportion_config_prints_each_setting_with_its_source(tmp_path: Path) -> None:
    env = {**_config_file(tmp_path), "APPORTION_WORKER__NTHREADS": "4"}
    path = env["APPORTION_CONFIG"]
    result = run_apportion("config", env=env)
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert lines[0] == f"# configuration file: {path}"
    for line in (
        f"worker.resources.GPU = 2  (file {path})",
        f'worker.resources.MEMORY = "100GB"  (file {path})',
        "worker.nthreads = 4  (env APPORTION_WORKER__NTHREADS)",
        "scheduler.port = 8786  (default)",
    ):
        assert line in lines, result.stdout


def test_a_local_cluster_started_inside_config_set_gets_its_settings() -> None:
    settings = {"worker.resources.GPU": 2, "worker.nthreads": 2, "scheduler.dashboard": False}
    with (
        config.set(settings),
        LocalCluster(n_workers=2) as cluster,
        Client(cluster) as client,
    ):
        info = client.scheduler_info()
    assert [(w["resources"], w["nthreads"]) for w in info["workers"].values()] == [
        ({"GPU": 2}, 2),
        ({"GPU": 2}, 2),
    ]
    assert info["dashboard_address"] == ""  # the scheduler's setting reached it too
    # memory_limit auto: the machine's memory shared out among the two, as Dask's LocalCluster does
    assert [w["memory_limit"] for w in info["workers"].values()] == [system_memory() // 2] * 2
    assert config.get("worker.resources") == {}  # the block is over


def test_a_local_cluster_s_own_arguments_beat_config_set() -> None:
    with (
        config.set({"worker.resources.GPU": 2, "worker.nthreads": 2, "worker.memory_limit": "3GB"}),
        LocalCluster(resources={"GPU": 1}, nthreads=1, memory_limit="200MB") as cluster,
        Client(cluster) as client,
    ):
        (worker,) = client.scheduler_info()["workers"].values()
    assert (worker["resources"], worker["nthreads"]) == ({"GPU": 1}, 1)
    assert worker["memory_limit"] == 200_000_000


def test_a_local_cluster_refuses_a_bad_memory_limit_before_starting() -> None:
    with pytest.raises(ValueError, match="memory_limit 'lots'"):
        LocalCluster(memory_limit="lots")
    with pytest.raises(ValueError, match="memory_limit '-1GB': the amount must be"):
        LocalCluster(memory_limit="-1GB")
