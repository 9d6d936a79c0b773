"""The configuration file: where it is found, how it ranks against the
environment and flags, and the one line a mistake in it gets."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from apportion_common import config_file
from apportion_common.config_file import ConfigError, Setting, describe, find_config_file
from apportion_common.settings import SchedulerSettings, WorkerSettings

Writer = Callable[[str], Path]
#: The real search (the suite's conftest makes it look nowhere).
SEARCH_PATHS = config_file.search_paths


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("APPORTION_"):
            monkeypatch.delenv(name)


@pytest.fixture
def write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Writer:
    """Write the configuration file (APPORTION_CONFIG names it) and return its path."""
    path = tmp_path / "config.toml"
    monkeypatch.setenv("APPORTION_CONFIG", str(path))

    def write(text: str) -> Path:
        path.write_text(text)
        return path

    return write


# ------------------------------------------------------------------ discovery


def test_apportion_config_then_the_user_s_file_then_the_system_s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = tmp_path / "etc" / "config.toml"
    user = tmp_path / "xdg" / "apportion" / "config.toml"
    named = tmp_path / "named.toml"
    monkeypatch.setattr(config_file, "search_paths", SEARCH_PATHS)
    monkeypatch.setattr(config_file, "SYSTEM_CONFIG", system)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert find_config_file() is None
    for path in (system, user, named):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    monkeypatch.setenv("APPORTION_CONFIG", str(named))
    assert find_config_file() == named
    monkeypatch.setenv("APPORTION_CONFIG", "")  # empty: unset
    assert find_config_file() == user
    user.unlink()
    assert find_config_file() == system
    # Without XDG_CONFIG_HOME: ~/.config.
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert config_file.search_paths()[0] == tmp_path / "home/.config/apportion/config.toml"


def test_apportion_config_naming_no_file_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "missing.toml"
    monkeypatch.setenv("APPORTION_CONFIG", str(missing))
    with pytest.raises(ConfigError) as info:
        WorkerSettings()
    assert str(info.value) == f"{missing}: no such file (named by APPORTION_CONFIG)"
    monkeypatch.setenv("APPORTION_CONFIG", os.devnull)  # an empty file: none
    assert WorkerSettings().resources == {}


# ----------------------------------------------------------------- precedence


def test_flags_over_the_environment_over_the_file_over_defaults(
    write: Writer, monkeypatch: pytest.MonkeyPatch
) -> None:
    write('[worker]\nnthreads = 4\nname = "file"\nhost = "10.0.0.1"\n[scheduler]\nport = 9000\n')
    monkeypatch.setenv("APPORTION_WORKER__NTHREADS", "5")
    monkeypatch.setenv("APPORTION_WORKER__NAME", "env")
    s = WorkerSettings(nthreads=6)
    assert (s.nthreads, s.name, s.host, s.drain_timeout) == (6, "env", "10.0.0.1", 30.0)
    assert SchedulerSettings().port == 9000
    monkeypatch.setenv("APPORTION_SCHEDULER__PORT", "9001")
    assert SchedulerSettings().port == 9001
    assert SchedulerSettings(port=9002).port == 9002


def test_resources_from_a_higher_source_replace_the_file_s_as_a_whole(
    write: Writer, monkeypatch: pytest.MonkeyPatch
) -> None:
    write("[worker.resources]\nGPU = 2\nX = 1\n")
    assert WorkerSettings().resources == {"GPU": 2.0, "X": 1.0}
    monkeypatch.setenv("APPORTION_WORKER__RESOURCES__GPU", "3")
    assert WorkerSettings().resources == {"GPU": 3.0}
    assert WorkerSettings(resources={"Y": 1}).resources == {"Y": 1.0}
    # Another setting from the environment leaves the file's resources be.
    monkeypatch.delenv("APPORTION_WORKER__RESOURCES__GPU")
    monkeypatch.setenv("APPORTION_WORKER__NTHREADS", "2")
    assert WorkerSettings().resources == {"GPU": 2.0, "X": 1.0}


def test_names_keep_their_case_and_amounts_their_spelling(write: Writer) -> None:
    write('[worker.resources]\nGPU = "auto"\nMEMORY = "100GB"\ngpu = 1\ntpu_v4 = 0.5\n')
    s = WorkerSettings()
    assert s.resources == {"MEMORY": 100e9, "gpu": 1.0, "tpu_v4": 0.5}
    assert (s.resources_text, s.auto_resources) == ({"MEMORY": "100GB"}, {"GPU"})


def test_memory_fractions_from_the_file(write: Writer, monkeypatch: pytest.MonkeyPatch) -> None:
    if "memory" not in WorkerSettings.model_fields:
        pytest.skip("WorkerSettings.memory is not there yet")
    write("[worker.memory]\npause = 0.85\nterminate = false\n")
    monkeypatch.setenv("APPORTION_WORKER__MEMORY__TARGET", "0.5")
    memory = WorkerSettings().memory
    assert (memory.target, memory.pause, memory.terminate) == (0.5, 0.85, None)


# --------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('[worker]\nnthreads = "x"\n', "worker.nthreads: Input should be a valid integer"),
        (
            "[worker]\nnthread = 4\n",
            "worker.nthread: unknown setting (did you mean worker.nthreads?)",
        ),
        ("[worker]\nresources_text = {}\n", "worker.resources_text: unknown setting"),
        ("[worker.resources]\nGPU = -1\n", "worker.resources: resource GPU=-1: the amount must"),
        ('[worker.resources]\nCPU = "auto"\n', "worker.resources: resource CPU=auto: only GPU"),
        ("[worker.resources]\nGPU = true\n", "worker.resources: resource GPU=True: the amount"),
        ("[worker]\nnworkers = 0\n", "worker.nworkers: expected 1 to 1000 processes"),
        ("[worker\nnthreads = 4\n", "not valid TOML: Expected ']' at the end of a table"),
        ("[worker]\nnthreads = 4\nnthreads = 5\n", "not valid TOML: Cannot overwrite a value"),
        ("[wroker]\nnthreads = 4\n", "wroker: unknown section (expected [scheduler] or [worker])"),
        ("worker = 4\n", "worker: expected a table ([worker])"),
    ],
)
def test_a_bad_file_is_one_line_naming_the_file_the_key_and_the_problem(
    write: Writer, text: str, problem: str
) -> None:
    path = write(text)
    with pytest.raises(ConfigError) as info:
        WorkerSettings()
    message = str(info.value)
    assert message.startswith(f"{path}: {problem}"), message
    assert "\n" not in message


def test_tokens_stay_out_of_the_file(write: Writer) -> None:
    path = write('[scheduler]\ntoken = "s3cret"\n')
    with pytest.raises(ConfigError) as info:
        SchedulerSettings()
    assert str(info.value) == (
        f"{path}: scheduler.token: secrets and TLS are not configured so: "
        "use --token or APPORTION_TOKEN"
    )
    assert "s3cret" not in str(info.value)


def test_sections_a_command_does_not_read_are_not_checked_by_it(write: Writer) -> None:
    write('[worker]\nnthreads = "x"\n[scheduler]\nport = 9000\n')
    assert SchedulerSettings().port == 9000
    with pytest.raises(ConfigError, match=r"worker\.nthreads"):
        WorkerSettings()
    write('[scheduler]\nport = "x"\n[worker]\nnthreads = 2\n')
    assert WorkerSettings().nthreads == 2
    with pytest.raises(ConfigError, match=r"scheduler\.port"):
        SchedulerSettings()


# ------------------------------------------------------------ where from


def test_describe_names_each_setting_s_source(
    write: Writer, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write('[worker]\nnthreads = 4\nname = "file"\n[worker.resources]\nGPU = 2\nX = 1\n')
    monkeypatch.setenv("apportion_worker__name", "env")  # the variable's own case
    seen = {s.key: s for s in describe(WorkerSettings, "worker", {"nthreads": 6})}
    assert seen["worker.nthreads"] == Setting("worker.nthreads", "6", "flag")
    assert seen["worker.name"] == Setting("worker.name", '"env"', "env apportion_worker__name")
    assert seen["worker.resources.GPU"] == Setting("worker.resources.GPU", "2", f"file {path}")
    assert seen["worker.drain_timeout"] == Setting("worker.drain_timeout", "30.0", "default")
    assert "worker.resources_text" not in seen and "worker.auto_resources" not in seen
    # The environment's resources replace the file's: theirs alone, named exactly.
    monkeypatch.setenv("APPORTION_WORKER__RESOURCES__gpu", "100GB")
    seen = {s.key: s for s in describe(WorkerSettings, "worker")}
    assert seen["worker.resources.gpu"].source == "env APPORTION_WORKER__RESOURCES__gpu"
    assert seen["worker.resources.gpu"].value == '"100GB"'
    assert "worker.resources.GPU" not in seen and "worker.resources.X" not in seen


def test_describe_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {s.key: s for s in describe(SchedulerSettings, "scheduler")}
    assert seen["scheduler.port"] == Setting("scheduler.port", "8786", "default")
    assert seen["scheduler.placement"].value == '"spread"'
    assert seen["scheduler.no_worker_timeout"].value == "none"
    worker = {s.key: s for s in describe(WorkerSettings, "worker")}
    assert worker["worker.resources"] == Setting("worker.resources", "{}", "default")
