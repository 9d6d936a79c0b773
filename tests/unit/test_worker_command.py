"""``apportion worker``'s settings and the command line its nanny starts each
worker process with: the amounts go on as the user wrote them."""

from __future__ import annotations

import os

import pytest

from apportion.cli.worker import _child_command, _worker_settings
from apportion_common.resources import parse_spellings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("APPORTION_"):
            monkeypatch.delenv(name)


def resources_arg(command: list[str]) -> str:
    return command[command.index("--resources") + 1]


def test_the_flag_s_amounts_reach_each_child_as_written() -> None:
    settings = _worker_settings("MEMORY=100GB GPU=2,X=100e9", None, 2, "w", None)
    assert settings.resources == {"MEMORY": 100e9, "GPU": 2.0, "X": 100e9}
    assert settings.resources_text == {"MEMORY": "100GB", "GPU": "2", "X": "100e9"}
    for index in range(2):
        given = resources_arg(_child_command("127.0.0.1:8786", settings, index))
        assert parse_spellings(given) == settings.resources_text


def test_the_environment_s_amounts_reach_each_child_as_written(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("APPORTION_WORKER__RESOURCES__MEMORY", "64GiB")
    settings = _worker_settings(None, None, 2, None, None)
    assert resources_arg(_child_command("127.0.0.1:8786", settings, 1)) == "MEMORY=64GiB"


def test_the_flag_replaces_the_environment_s_text_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPORTION_WORKER__RESOURCES__MEMORY", "64GiB")
    settings = _worker_settings("GPU=1", None, 1, None, None)
    assert (settings.resources, settings.resources_text) == ({"GPU": 1.0}, {"GPU": "1"})
