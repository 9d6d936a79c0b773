"""``config.set`` and ``config.get``: for a block or for the process, nested
blocks layered, mistakes refused when set; and what a LocalCluster takes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from client_sdk import config
from client_sdk.config import _config, _for_local_cluster


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.upper().startswith("APPORTION_") and name != "APPORTION_CONFIG":
            monkeypatch.delenv(name)
    yield
    _config.clear()  # what a test set for the process


def test_a_block_sets_for_its_length_a_plain_call_for_the_process() -> None:
    with config.set({"worker.resources.GPU": 2}):
        assert config.get("worker.resources") == {"GPU": 2.0}
    assert config.get("worker.resources") == {}
    config.set({"worker.nthreads": 3})
    assert config.get("worker.nthreads") == 3


def test_nested_blocks_layer() -> None:
    with config.set({"worker.resources.GPU": 2, "worker.nthreads": 2}):
        with config.set({"worker.resources.MEMORY": "100GB", "worker.nthreads": 4}):
            assert config.get("worker.resources") == {"GPU": 2.0, "MEMORY": "100GB"}
            assert config.get("worker.nthreads") == 4
        assert config.get("worker.resources") == {"GPU": 2.0}
        assert config.get("worker.nthreads") == 2
        # A plain call inside a block outlives it; what the block set does not.
        config.set({"worker.death_timeout": 5})
    assert _config == {"worker": {"death_timeout": 5}}


def test_keywords_name_settings_with_double_underscores() -> None:
    with config.set(worker__nthreads=2, scheduler__placement="pack"):
        assert (config.get("worker.nthreads"), config.get("scheduler.placement")) == (2, "pack")


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"worker.nthread": 2}, "worker.nthread: unknown setting (did you mean worker.nthreads?)"),
        ({"workers.nthreads": 2}, "workers.nthreads: unknown setting (names start"),
        ({"worker.nthreads": "x"}, "worker.nthreads: Input should be a valid integer"),
        ({"worker.resources.GPU": -1}, "worker.resources: resource GPU=-1: the amount must"),
        ({"worker.resources.CPU": "auto"}, "worker.resources: resource CPU=auto: only GPU"),
        ({"worker.death_timeout": None}, "worker.death_timeout: None cannot be set"),
        ({"scheduler.token": "s3cret"}, "scheduler.token: secrets and TLS are not configured"),
        ({"worker": 3}, "worker: expected a mapping of its settings"),
    ],
)
def test_mistakes_are_refused_when_set_and_nothing_is_set(
    given: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError) as info:
        config.set({"worker.nthreads": 2, **given})
    assert str(info.value).startswith(message), str(info.value)
    assert _config == {}


def test_get_merges_set_over_the_environment_over_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[worker]\nnthreads = 4\nname = "file"\n[worker.resources]\nGPU = 1\n')
    monkeypatch.setenv("APPORTION_CONFIG", str(path))
    monkeypatch.setenv("APPORTION_WORKER__NAME", "env")
    assert (config.get("worker.nthreads"), config.get("worker.name")) == (4, "env")
    assert config.get("worker.resources") == {"GPU": 1.0}
    with config.set({"worker.name": "set", "worker.resources.MEMORY": "1GB"}):
        assert config.get("worker.name") == "set"
        # Resources set here replace the file's as a whole.
        assert config.get("worker.resources") == {"MEMORY": "1GB"}
    assert config.get("worker")["name"] == "env"
    assert config.get("worker.resources.X", None) is None
    with pytest.raises(KeyError):
        config.get("worker.resources.X")
    with pytest.raises(ValueError, match=r"worker\.nope: unknown setting"):
        config.get("worker.nope")


def test_a_local_cluster_gets_the_settings_as_variables_and_arguments(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with config.set(
        {
            "worker.resources.GPU": "auto",
            "worker.resources.MEMORY": "100GB",
            "worker.nthreads": 3,
            "worker.isolate_gpu_tasks": True,
            "scheduler.port": 9000,
            "scheduler.worker_ttl": 2.5,
        }
    ):
        given = _for_local_cluster()
    assert given.env == {
        "APPORTION_WORKER__NTHREADS": "3",
        "APPORTION_WORKER__ISOLATE_GPU_TASKS": "true",
        "APPORTION_SCHEDULER__PORT": "9000",
        "APPORTION_SCHEDULER__WORKER_TTL": "2.5",
    }
    assert given.resources == {"MEMORY": "100GB", "GPU": "auto"}
    assert (given.nthreads, given.scheduler_port, given.scheduler_host) == (3, 9000, None)
    # Without set(): none of its own, the environment's nthreads and resources.
    monkeypatch.setenv("APPORTION_WORKER__NTHREADS", "2")
    given = _for_local_cluster()
    assert (given.env, given.nthreads, given.resources, given.scheduler_port) == ({}, 2, {}, None)
