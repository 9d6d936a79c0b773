"""The dashboard and /metrics of a real scheduler, with real workers: the
pending GPU demand while a GPU is busy, and the page in headless Chromium
while the seed pipeline runs."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from client_sdk import Client
from tests.helpers.processes import (
    START_TIMEOUT,
    Processes,
    cluster_state,
    read_line,
    run_apportion,
    wait_for,
)

CHROMIUM = "/usr/bin/chromium"
#: Set to a path (docs/dashboard.png) to keep the browser test's screenshot there.
SCREENSHOT_ENV = "APPORTION_DASHBOARD_SCREENSHOT"
#: Chromium's flags for a headless run in a container, with no calls home.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def wait_for_file(path: str) -> str:
    deadline = time.monotonic() + 30
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    return path


def scrape(dashboard: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://{dashboard}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


PENDING_GPU_BUSY = (
    "apportion_pending_demand",
    frozenset({("resource", "GPU"), ("reason", "busy")}),
)
HELD_GPU = (
    "apportion_worker_resource_held",
    frozenset({("worker", "gpu-1"), ("resource", "GPU")}),
)


def test_metrics_show_the_pending_demand_for_a_busy_gpu(
    processes: Processes, tmp_path: Path
) -> None:
    # No worker queue: the second task waits for placement, not on the worker.
    address = processes.scheduler("--dashboard-address", "127.0.0.1:0", "--worker-queue", "0")
    processes.worker(address, "--resources", "GPU=1", "--nthreads", "2", "--name", "gpu-1")
    gate = tmp_path / "go"
    with Client(address) as client:
        dashboard = client.scheduler_info()["dashboard_address"]
        assert dashboard.startswith("127.0.0.1:")
        status = run_apportion("status", address, "--json")
        assert json.loads(status.stdout)["dashboard_address"] == dashboard
        assert f"dashboard: {dashboard}" in run_apportion("status", address).stdout
        before = scrape(dashboard)
        assert before[PENDING_GPU_BUSY] == 0.0 and before[HELD_GPU] == 0.0

        first = client.submit(wait_for_file, str(gate), resources={"GPU": 1}, key="hold-1")
        wait_for(lambda: scrape(dashboard)[HELD_GPU] == 1.0, 10, "the GPU to be held")
        second = client.submit(wait_for_file, str(gate), resources={"GPU": 1}, key="hold-2")
        wait_for(lambda: scrape(dashboard)[PENDING_GPU_BUSY] == 1.0, 10, "pending GPU demand")
        waiting = scrape(dashboard)
        assert waiting[("apportion_tasks", frozenset({("state", "ready")}))] == 1.0
        assert waiting[("apportion_tasks_started_total", frozenset({("prefix", "hold")}))] == 1.0
        assert waiting[("apportion_worker_threads_busy", frozenset({("worker", "gpu-1")}))] == 1.0

        gate.touch()
        assert client.gather([first, second]) == [str(gate), str(gate)]
        done = scrape(dashboard)
        assert done[PENDING_GPU_BUSY] == 0.0
        assert done[("apportion_tasks_finished_total", frozenset({("prefix", "hold")}))] == 2.0
        assert done[("apportion_task_duration_seconds_count", frozenset({("prefix", "hold")}))] == 2


def test_the_dashboard_is_on_by_default_at_8787_or_a_free_port(processes: Processes) -> None:
    # The harness turns it off for other tests; a user's scheduler has it on.
    proc = processes.start(
        "scheduler", "--port", "0", env={"APPORTION_SCHEDULER__DASHBOARD": "1"}, capture=True
    )
    line = read_line(proc, START_TIMEOUT)
    address = line.rsplit(" ", 1)[-1]
    dashboard = cluster_state(address).dashboard_address
    with urllib.request.urlopen(f"http://{dashboard}/health", timeout=10) as reply:
        assert reply.read() == b"ok"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert proc.stderr is not None
    log = proc.stderr.read().decode()
    # Another scheduler on this machine may hold 8787: then a WARNING names the port taken.
    assert dashboard == "127.0.0.1:8787" or (
        "127.0.0.1:8787 is not free" in log and "instead" in log and dashboard in log
    ), log
    assert f"dashboard at http://{dashboard}/" in log


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--dashboard-address", "nope"), "dashboard_address: 'nope': expected HOST:PORT"),
        (("--dashboard-address", "127.0.0.1:70000"), "expected HOST:PORT (port 0-65535"),
        (("--no-dashboard", "--dashboard-address", "127.0.0.1:0"), "give one or the other"),
    ],
)
def test_a_bad_dashboard_address_stops_the_scheduler_with_one_line(
    args: tuple[str, ...], message: str
) -> None:
    done = run_apportion("scheduler", "--port", "0", *args)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr


# ------------------------------------------------------------ the browser


def load(i: int) -> list[int]:
    time.sleep(0.05)
    return list(range(i, i + 10))


def process(data: list[int]) -> int:
    time.sleep(0.3)  # a GPU kernel
    return sum(data)


def aggregate(parts: list[int]) -> int:
    time.sleep(1.5)  # long enough for the page to see MEMORY held
    return sum(parts)


#: What the test reads off the rendered page.
READ_PAGE = """() => ({
  updates: Number(document.body.dataset.updates || 0),
  schedulerLogs: document.getElementById("scheduler-logs")?.getAttribute("href") ?? null,
  workers: [...document.querySelectorAll("tr.worker")].map((tr) => ({
    name: tr.dataset.name,
    state: tr.dataset.state,
    logs: tr.querySelector("a.logs")?.getAttribute("href") ?? null,
    memory: {used: Number(tr.querySelector("td.memory").dataset.used),
             limit: Number(tr.querySelector("td.memory").dataset.limit),
             bar: tr.querySelector("td.memory .bar.memory") !== null},
    bars: Object.fromEntries([...tr.querySelectorAll(".bar.resource")].map((b) => [
      b.dataset.resource,
      {declared: Number(b.dataset.declared), held: Number(b.dataset.held)},
    ])),
  })),
  runs: Number(document.getElementById("stream").dataset.runs),
  running: Number(document.getElementById("stream").dataset.running),
  done: Object.fromEntries([...document.querySelectorAll("tr.prefix")].map(
    (tr) => [tr.dataset.prefix, Number(tr.children[1].textContent)])),
})"""


def _chromium_or_skip() -> None:
    if Path(CHROMIUM).exists():
        return
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing: .ci/run installs it (apt-get install chromium)")
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium); CI runs this test")


def test_the_dashboard_shows_the_seed_pipeline_in_a_browser(
    processes: Processes, tmp_path: Path
) -> None:
    _chromium_or_skip()
    from playwright.sync_api import sync_playwright

    address = processes.scheduler("--dashboard-address", "127.0.0.1:0")
    for name, resources in (
        ("gpu-worker-1", "GPU=2"),
        ("gpu-worker-2", "GPU=2"),
        ("memory-worker", "MEMORY=100e9"),
    ):
        processes.worker(address, "--resources", resources, "--nthreads", "2", "--name", name)
    with Client(address) as client, sync_playwright() as playwright:
        dashboard = client.scheduler_info()["dashboard_address"]
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            page.goto(f"http://{dashboard}/")
            page.wait_for_function("document.querySelectorAll('tr.worker').length === 3")
            first: dict[str, Any] = page.evaluate(READ_PAGE)
            bars = {w["name"]: w["bars"] for w in first["workers"]}
            assert bars == {
                "gpu-worker-1": {"GPU": {"declared": 2, "held": 0}},
                "gpu-worker-2": {"GPU": {"declared": 2, "held": 0}},
                "memory-worker": {"MEMORY": {"declared": 100e9, "held": 0}},
            }
            assert first["runs"] == 0
            # Links to the logs: the scheduler's in the header, each worker's in its row.
            assert first["schedulerLogs"] == "/logs/scheduler"
            links = {w["name"]: w["logs"] for w in first["workers"]}
            assert len(set(links.values())) == 3
            for name, link in links.items():
                assert re.fullmatch(r"/logs/worker/[0-9]+", link), link
                with urllib.request.urlopen(f"http://{dashboard}{link}", timeout=10) as reply:
                    assert f"logs of worker {name} (" in reply.read().decode()

            result: list[int] = []
            futures: list[Any] = []  # held to the end: the page counts the tasks kept

            def pipeline() -> None:
                data = [client.submit(load, i) for i in range(16)]
                processed = [client.submit(process, d, resources={"GPU": 1}) for d in data]
                final = client.submit(aggregate, processed, resources={"MEMORY": 70e9})
                futures.extend([*data, *processed, final])
                result.append(final.result(timeout=60))

            runner = threading.Thread(target=pipeline)
            runner.start()
            seen: list[dict[str, Any]] = []
            screenshot = tmp_path / "dashboard.png"
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline:
                now: dict[str, Any] = page.evaluate(READ_PAGE)
                seen.append(now)
                memory = next(w for w in now["workers"] if w["name"] == "memory-worker")
                if memory["bars"]["MEMORY"]["held"] and not screenshot.exists():
                    # The moment with most on the page: stream full, aggregate running.
                    page.screenshot(path=str(screenshot), full_page=True)
                if not runner.is_alive() and now["done"].get("aggregate") == 1:
                    break
                time.sleep(0.2)
            runner.join(timeout=10)
            assert result == [sum(sum(range(i, i + 10)) for i in range(16))]
        finally:
            browser.close()

    gpu_held = [
        sum(w["bars"]["GPU"]["held"] for w in s["workers"] if "GPU" in w["bars"]) for s in seen
    ]
    memory_held = [
        w["bars"]["MEMORY"]["held"] for s in seen for w in s["workers"] if "MEMORY" in w["bars"]
    ]
    assert max(gpu_held) >= 2, gpu_held  # the GPU bars moved while process tasks ran
    assert max(gpu_held) <= 4  # never beyond the 2 x 2 GPUs declared
    assert 70e9 in memory_held and memory_held[-1] == 0, memory_held
    runs = [s["runs"] for s in seen]
    assert runs == sorted(runs) and runs[-1] == 16 + 16 + 1  # the stream grew to every run
    assert any(s["running"] > 0 for s in seen)
    assert seen[-1]["done"] == {"load": 16, "process": 16, "aggregate": 1}
    assert seen[-1]["updates"] > first["updates"] + 2  # live: new snapshots kept coming
    # Each worker process's own memory, of its limit (auto: this machine's), beside the resources.
    for worker in seen[-1]["workers"]:
        memory = worker["memory"]
        assert memory["bar"] and 0 < memory["used"] < memory["limit"], worker
    assert screenshot.exists() and screenshot.stat().st_size > 10_000
    keep = os.environ.get(SCREENSHOT_ENV)
    if keep:
        shutil.copyfile(screenshot, keep)
