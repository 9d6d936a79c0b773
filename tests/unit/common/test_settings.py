"""WorkerSettings and SchedulerSettings from the environment and from flags."""

from __future__ import annotations

import os

import pydantic
import pytest

from apportion_common.settings import SchedulerSettings, WorkerSettings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No APPORTION_* variable from the outer environment leaks in."""
    for name in list(os.environ):
        if name.upper().startswith("APPORTION_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    s = WorkerSettings()
    # nthreads None: the command line makes it the cores divided by nworkers.
    assert (s.resources, s.nthreads, s.nworkers, s.name, s.host) == ({}, None, 1, None, None)


def test_resources_from_env_keep_their_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPORTION_WORKER__RESOURCES__GPU", "2")
    monkeypatch.setenv("APPORTION_WORKER__RESOURCES__MEMORY", "100e9")
    monkeypatch.setenv("APPORTION_WORKER__RESOURCES__myDisk", "0.5")
    s = WorkerSettings()
    assert s.resources == {"GPU": 2.0, "MEMORY": 100e9, "myDisk": 0.5}
    assert "gpu" not in s.resources


def test_resources_keep_the_text_they_were_written_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPORTION_WORKER__RESOURCES__MEMORY", "64 GiB")
    monkeypatch.setenv("APPORTION_WORKER__RESOURCES__GPU", "2")
    s = WorkerSettings()
    assert s.resources == {"MEMORY": 64 * 1024**3, "GPU": 2.0}
    assert s.resources_text == {"MEMORY": "64GiB", "GPU": "2"}
    # Given as arguments: text where it is text; a number has none.
    given = WorkerSettings(resources={"MEMORY": "100GB", "GPU": 1})
    assert given.resources_text == {"MEMORY": "100GB"}
    # Never set apart from the resources it spells.
    monkeypatch.setenv("APPORTION_WORKER__RESOURCES_TEXT__GPU", "9")
    assert WorkerSettings().resources_text == {"MEMORY": "64GiB", "GPU": "2"}


def test_lower_and_upper_case_names_are_different_resources(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("APPORTION_WORKER__RESOURCES__GPU", "2")
    monkeypatch.setenv("APPORTION_WORKER__RESOURCES__gpu", "3")
    assert WorkerSettings().resources == {"GPU": 2.0, "gpu": 3.0}


def test_nthreads_and_other_fields_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPORTION_WORKER__NTHREADS", "4")
    monkeypatch.setenv("APPORTION_WORKER__NWORKERS", "3")
    monkeypatch.setenv("APPORTION_WORKER__NAME", "gpu-box")
    s = WorkerSettings()
    assert (s.nthreads, s.nworkers, s.name) == (4, 3, "gpu-box")
    assert s.resources == {}


def test_flags_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPORTION_WORKER__RESOURCES__GPU", "2")
    monkeypatch.setenv("APPORTION_WORKER__NTHREADS", "4")
    s = WorkerSettings(nthreads=8, resources={"GPU": 1})
    assert (s.nthreads, s.resources) == (8, {"GPU": 1.0})
    # A flag for another field leaves the environment's resources in place.
    assert WorkerSettings(nthreads=2).resources == {"GPU": 2.0}


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("abc", "GPU='abc'"),
        ("nan", "GPU='nan'"),
        ("inf", "GPU='inf'"),
        ("-1", "GPU='-1'"),
        ("", "GPU=''"),
    ],
)
def test_bad_resource_in_env_raises_naming_it(
    monkeypatch: pytest.MonkeyPatch, value: str, fragment: str
) -> None:
    monkeypatch.setenv("APPORTION_WORKER__RESOURCES__GPU", value)
    with pytest.raises(pydantic.ValidationError) as info:
        WorkerSettings()
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("APPORTION_WORKER__NTHREADS", "x"),
        ("APPORTION_WORKER__NTHREADS", "0"),
        ("APPORTION_WORKER__NTHREADS", "-2"),
        ("APPORTION_WORKER__NTHREADS", "1.5"),
        ("APPORTION_WORKER__NWORKERS", "0"),
    ],
)
def test_bad_counts_in_env_raise(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(pydantic.ValidationError):
        WorkerSettings()


def test_bad_resources_as_arguments_raise() -> None:
    with pytest.raises(pydantic.ValidationError, match="GPU=-1"):
        WorkerSettings(resources={"GPU": -1})
    with pytest.raises(pydantic.ValidationError):
        WorkerSettings(nthreads=0)


def test_scheduler_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (SchedulerSettings().host, SchedulerSettings().port) == ("127.0.0.1", 8786)
    monkeypatch.setenv("APPORTION_SCHEDULER__PORT", "9000")
    monkeypatch.setenv("APPORTION_SCHEDULER__HOST", "0.0.0.0")
    s = SchedulerSettings()
    assert (s.host, s.port) == ("0.0.0.0", 9000)
    monkeypatch.setenv("APPORTION_SCHEDULER__PORT", "70000")
    with pytest.raises(pydantic.ValidationError):
        SchedulerSettings()
