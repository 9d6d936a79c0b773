"""What ``apportion status`` draws, rendered as an 80-column terminal would
show it: names and addresses whole on one line, amounts as people write them,
an empty cluster said in words."""

from __future__ import annotations

import pytest
from rich.console import Console

from apportion.cli.status_view import NO_WORKERS, short_bytes, status_view
from client_sdk.info import ClusterInfo, WorkerInfo

SCHEDULER = "127.0.0.1:8786"


def worker(
    name: str,
    resources: dict[str, float],
    used: dict[str, float] | None = None,
    draining: bool = False,
    written: dict[str, str] | None = None,
    memory: tuple[int, int, int, bool] = (123_400_000, 4_000_000_000, 0, False),
) -> WorkerInfo:
    resident, limit, spilled, paused = memory
    return {
        "name": name,
        "nthreads": 16,
        "resources": resources,
        "used_resources": used or {},
        "running": 12,
        "queued": 130,
        "draining": draining,
        "resources_text": written or {},
        "gpus": [],
        "memory_limit": limit,
        "memory": resident,
        "spilled_bytes": spilled,
        "paused": paused,
    }


def render(info: ClusterInfo, width: int = 80) -> list[str]:
    console = Console(width=width, record=True, color_system=None)
    console.print(status_view(info))
    return console.export_text().splitlines()


WORKERS = {
    "192.168.100.200:45678": worker(
        "gpu-worker-on-a-long-host-name-0",
        {"GPU": 2, "MEMORY": 100e9, "tpu_v4_accelerator_cores": 0.5, "SCRATCH": 64 * 1024**3},
        {"GPU": 1, "MEMORY": 70e9},
    ),
    "10.0.0.7:40001": worker(
        "10.0.0.7:40001", {}, draining=True, memory=(3_500_000_000, 4_000_000_000, 2e9, True)
    ),
    "10.0.0.8:40002": worker("b", {"GPU": 1}),
}


@pytest.mark.parametrize("width", [80, 100, 160])
def test_each_name_and_address_stay_whole_on_one_line(width: int) -> None:
    lines = render({"address": SCHEDULER, "workers": WORKERS, "tasks": {}}, width)
    assert all(len(line) <= width for line in lines)  # the other columns wrapped
    for address, w in WORKERS.items():
        (row,) = [line for line in lines if address in line and w["name"] in line.split()]
        assert row.split()[:2] == [w["name"], address], row


def test_amounts_read_like_the_input() -> None:
    lines = render({"address": SCHEDULER, "workers": WORKERS, "tasks": {"processing": 3}}, 120)
    text = "\n".join(lines)
    assert "e+" not in text  # no 1e+11
    assert "GPU 1/2" in text
    assert "70G/100G" in text  # MEMORY=100e9, 70e9 of it held
    assert "0/64Gi" in text  # SCRATCH=64GiB
    assert "0/0.5" in text
    assert "draining" in text and "16 threads" in text
    assert "12 running" in text and "130 queued" in text
    assert lines[-1] == "tasks: processing 3"
    assert lines[0].strip() == f"apportion scheduler {SCHEDULER}"


def test_amounts_written_with_a_unit_show_as_written_and_held_in_that_style() -> None:
    workers = {
        "10.0.0.1:1": worker(
            "decimal",
            {"MEMORY": 100e9, "GPU": 2, "PLAIN": 100e9},
            {"MEMORY": 70e9, "GPU": 1, "PLAIN": 70e9},
            written={"MEMORY": "100GB", "GPU": "2", "PLAIN": "100e9"},
        ),
        "10.0.0.2:1": worker(
            "binary",
            {"MEMORY": 64 * 1024**3, "SCRATCH": 1e9},
            {"MEMORY": 32 * 1024**3, "SCRATCH": 5e8},
            # SCRATCH was written 1GB, then set to an amount given as a number.
            written={"MEMORY": "64GiB"},
        ),
    }
    lines = render({"address": SCHEDULER, "workers": workers, "tasks": {}})
    text = "\n".join(lines)
    assert all(len(line) <= 80 for line in lines)
    assert "MEMORY 70GB/100GB" in text
    assert "GPU 1/2" in text
    assert "PLAIN 70G/100G" in text  # 100e9: the short form, not 1e+11
    assert "MEMORY 32GiB/64GiB" in text
    assert "SCRATCH 500M/1G" in text  # no spelling: the short form
    assert "e+" not in text


def test_an_empty_cluster_says_so_in_words() -> None:
    lines = render({"address": SCHEDULER, "workers": {}, "tasks": {}})
    assert lines == [f"apportion scheduler {SCHEDULER}: {NO_WORKERS}", "tasks: none"]


def test_a_workers_own_memory_shows_under_its_name_apart_from_the_memory_resource() -> None:
    lines = render({"address": SCHEDULER, "workers": WORKERS, "tasks": {}})
    assert all(len(line) <= 80 for line in lines)
    under_names = [line.split()[0] for line in lines if line.startswith("  ") and line.split()]
    text = "\n".join(lines)
    assert "mem 123MB/4GB" in text  # resident of the limit
    assert "mem 3.5GB/4GB" in text and "2GB spilled" in text
    assert "paused" in under_names and "draining" in under_names
    unlimited = worker("x", {}, memory=(99_000_000, 0, 0, False))
    one = render({"address": SCHEDULER, "workers": {"a:1": unlimited}, "tasks": {}})
    assert any(line.split()[:2] == ["mem", "99MB"] for line in one)


@pytest.mark.parametrize(
    ("n", "shown"),
    [(0, "0B"), (999, "999B"), (1000, "1kB"), (123_456_789, "123MB"), (25.3e9, "25.3GB")],
)
def test_bytes_show_short(n: int, shown: str) -> None:
    assert short_bytes(int(n)) == shown
