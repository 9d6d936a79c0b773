"""The command line's manners (issue 13): --version, bare `apportion`, help in plain
words with every default, Dask's --nthreads default, and specs refused before
anything changes."""

from __future__ import annotations

import subprocess

import pytest

from apportion.cli.options import cores
from tests.helpers.processes import Processes, cluster_state, run_apportion, wait_for

UNREACHABLE = "127.0.0.1:1"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return run_apportion(*args, env={"COLUMNS": "100"})


def test_version() -> None:
    done = run("--version")
    assert done.returncode == 0 and done.stdout.strip() == "apportion 0.1.0", done


def test_bare_apportion_prints_help_and_no_error() -> None:
    done = run()
    assert done.returncode in (0, 2)
    assert "Usage: apportion" in done.stdout and "worker" in done.stdout
    assert "error" not in done.stderr and done.stderr.strip() == ""


@pytest.mark.parametrize(
    "command", ["scheduler", "worker", "local", "status", "set-resources", "logs"]
)
def test_help_names_every_flag_in_plain_words_with_its_default(command: str) -> None:
    done = run(command, "--help")
    assert done.returncode == 0, done
    text = done.stdout
    for tag in ("<bool>", "<int>", "<float>", "{scheduler_address}", "{ADDRESS}"):
        assert tag not in text, f"{tag} in:\n{text}"
    # An option's line starts two spaces in; its help may wrap onto deeper ones.
    flags = [line.split()[0] for line in text.splitlines() if line.startswith("  --")]
    flags = [flag for flag in flags if flag != "--help"]
    assert flags and text.count("[default:") >= len(flags), text
    if command not in ("scheduler", "local"):  # the commands that take the scheduler's address
        assert "ADDRESS" in text.splitlines()[0], text


def test_nthreads_defaults_to_the_cores_divided_by_nworkers(processes: Processes) -> None:
    address = processes.scheduler()
    processes.start("worker", address, "--name", "auto")
    processes.start("worker", address, "--name", "split", "--nworkers", "2")
    wait_for(lambda: len(cluster_state(address).workers) == 3, 30, "three worker processes")
    threads = {w.name: w.nthreads for w in cluster_state(address).workers}
    assert threads["auto"] == cores()
    assert threads["split-0"] == threads["split-1"] == max(1, cores() // 2)


def test_a_resource_named_twice_is_refused_in_one_line() -> None:
    done = run("worker", UNREACHABLE, "--resources", "GPU=2 GPU=3")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done
    assert "'GPU' is named twice" in done.stderr


def test_set_resources_refuses_an_empty_or_doubled_spec_and_changes_nothing(
    processes: Processes,
) -> None:
    address = processes.scheduler()
    processes.worker(address, "--name", "gpu-1", "--resources", "GPU=2")
    for spec, said in (("", "no resources"), ("  ", "no resources"), ("GPU=1 GPU=4", "twice")):
        done = run("set-resources", address, "gpu-1", spec)
        assert done.returncode == 2, done
        assert len(done.stderr.strip().splitlines()) == 1 and said in done.stderr, done
    assert dict(cluster_state(address).workers[0].resources) == {"GPU": 2.0}
