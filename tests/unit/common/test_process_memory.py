"""A worker process's memory limit: ``auto`` (the machine's, or the cgroup's
where lower, shared out among the processes), bytes or byte sizes, 0 for
none; the fractions from the environment; what the nanny tells each child;
a bad value stopping ``apportion worker`` with one line naming it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from apportion.cli.app import app
from apportion.cli.worker import _child_command, _with_memory_limit, _worker_settings
from apportion_common import process_memory
from apportion_common.process_memory import (
    Resident,
    check_memory_limit,
    resolve_memory_limit,
    system_memory,
)
from apportion_common.settings import WorkerSettings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("APPORTION_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(
    ("given", "limit"),
    [
        ("300MB", 300_000_000),
        ("2GiB", 2 * 1024**3),
        ("1e9", 1_000_000_000),
        (123, 123),
        ("0", 0),
        (" auto ", "auto"),
        ("AUTO", "auto"),
    ],
)
def test_limits_read_like_resource_amounts(given: object, limit: int | str) -> None:
    assert check_memory_limit(given) == limit


@pytest.mark.parametrize("bad", ["lots", "-1", "1e999", "12 parsecs", "nan"])
def test_a_bad_limit_is_refused_naming_it(bad: str) -> None:
    with pytest.raises(ValueError, match=repr(bad).replace("(", r"\(")):
        check_memory_limit(bad)


def test_the_cgroup_limit_counts_where_it_is_lower(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    monkeypatch.setattr(process_memory, "CGROUP_LIMIT_FILES", (v2, v1))
    machine = system_memory()  # neither file: the machine's
    v2.write_text("max\n")  # no limit (cgroup v2)
    v1.write_text("9223372036854771712\n")  # no limit (cgroup v1)
    assert system_memory() == machine
    v1.write_text(f"{machine // 4}\n")
    assert system_memory() == machine // 4
    v2.write_text(f"{machine // 8}\n")
    assert system_memory() == machine // 8
    assert resolve_memory_limit("auto", 2) == machine // 16
    assert resolve_memory_limit(5_000, 2) == 5_000  # given: per process already


def test_resident_memory_is_measured_and_zero_for_a_gone_process() -> None:
    assert 10_000_000 < Resident()() < 10_000_000_000
    assert Resident(2**22 + 12345)() == 0


def test_resident_memory_counts_the_children_found_at_the_last_scan() -> None:
    now = [0.0]
    measure = Resident(clock=lambda: now[0])
    alone = measure()
    with subprocess.Popen(
        [sys.executable, "-c", "import sys; b = b'x' * 150_000_000; print(1, flush=True); input()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    ) as child:
        try:
            assert child.stdout is not None and child.stdout.readline() == b"1\n"
            assert measure() < alone + 100_000_000  # not looked for again yet
            now[0] += Resident.CHILDREN_RESCAN_S
            assert measure() > alone + 140_000_000
        finally:
            child.kill()
            child.wait(10)
    assert measure() < alone + 100_000_000  # gone: counts for nothing, before the next scan


def test_the_fractions_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPORTION_WORKER__MEMORY_LIMIT", "4GB")
    monkeypatch.setenv("APPORTION_WORKER__MEMORY__TARGET", "false")
    monkeypatch.setenv("APPORTION_WORKER__MEMORY__PAUSE", "0.5")
    settings = WorkerSettings()
    assert settings.memory_limit == 4_000_000_000
    assert (settings.memory.target, settings.memory.spill) == (None, 0.7)
    assert (settings.memory.pause, settings.memory.terminate) == (0.5, 0.95)
    assert WorkerSettings().local_directory is None


@pytest.mark.parametrize("bad", ["0", "1.5", "-0.1", "lots"])
def test_a_fraction_must_be_above_0_and_at_most_1(
    monkeypatch: pytest.MonkeyPatch, bad: str
) -> None:
    monkeypatch.setenv("APPORTION_WORKER__MEMORY__SPILL", bad)
    with pytest.raises(ValueError, match="spill"):
        WorkerSettings()


def test_each_child_is_told_its_share_and_where_to_spill(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPORTION_WORKER__LOCAL_DIRECTORY", "/scratch/spill")
    settings = _with_memory_limit(_worker_settings(None, None, 4, None, None))
    assert settings.memory_limit == system_memory() // 4
    command = _child_command("127.0.0.1:8786", settings, 0)
    assert command[command.index("--memory-limit") + 1] == str(system_memory() // 4)
    assert command[command.index("--local-directory") + 1] == "/scratch/spill"


def test_apportion_worker_refuses_a_bad_limit_with_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    result = CliRunner().invoke(app, ["worker", "127.0.0.1:1", "--memory-limit", "lots"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--memory-limit 'lots'" in lines[0], result.output
    monkeypatch.setenv("APPORTION_WORKER__MEMORY_LIMIT", "-5")
    result = CliRunner().invoke(app, ["worker", "127.0.0.1:1"])
    assert result.exit_code == 2 and "memory_limit" in result.output, result.output
