"""What the dashboard costs the scheduler: throughput with the page open.

The throughput workload (20,000 no-op tasks, ``resources={"GPU": 1}``,
2 workers x (2 threads, GPU=2)) runs against three schedulers, interleaved
in each round:

- ``off``: ``--no-dashboard``;
- ``on``: the dashboard served (its run counters and task stream fed), no page open;
- ``stream``: the page's event stream read by ``curl`` (what an open page
  costs the scheduler: a snapshot a second, built and sent, and no more);
- ``open``: the page open in headless Chromium, its event stream live (on a
  2-CPU machine the browser's drawing takes CPU from the cluster too: its
  CPU time is shown apart);
- ``open-nice``: the same with Chromium at ``nice 19``, so that it draws with
  what CPU the cluster leaves, as a browser on the operator's own machine
  would.

Each figure is tasks per second and the scheduler process's CPU time per
task (user + system, from /proc: what the dashboard's work adds to the
scheduler itself, apart from the browser's share of this machine's CPUs).
The table gives medians and the ratios against ``off`` from the same rounds.

``--paired N``: instead, one cluster with the dashboard on and one browser,
and N pairs of runs, the page closed (``about:blank``) then open: each
pair's ratio is free of what differs between clusters started apart (which
swings more than 5 % on a busy 2-CPU machine); the median ratio is shown.

``python -m bench.dashboard [--rounds 3] [--tasks 20000] [--paired N]``;
needs /usr/bin/chromium and playwright (the dev extra).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench import workloads
from bench.clusters import BIN, _spawn, free_port, processes
from bench.procstat import cpu_seconds

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
MODES = ("off", "on", "stream", "open", "open-nice")
WORKERS = [(2, "GPU=2"), (2, "GPU=2")]


@contextlib.contextmanager
def _cluster(mode: str) -> Iterator[tuple[Any, int, str]]:
    """(client, scheduler pid, dashboard address) of a fresh cluster."""
    from client_sdk import Client

    port, dash_port = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    scheduler = [str(BIN / "apportion"), "scheduler", "--port", str(port)]
    scheduler += (
        ["--no-dashboard"] if mode == "off" else ["--dashboard-address", f"127.0.0.1:{dash_port}"]
    )
    with processes() as procs:
        _spawn(procs, scheduler)
        for i, (nthreads, resources) in enumerate(WORKERS):
            worker = [str(BIN / "apportion"), "worker", address, "--nthreads", str(nthreads)]
            _spawn(procs, [*worker, "--name", f"w{i}", "--resources", resources])
        with Client(address, timeout=30) as client:
            client.wait_for_workers(len(WORKERS), timeout=60)
            info = client.scheduler_info()
            yield client, procs[0].pid, str(info.get("dashboard_address", ""))


@contextlib.contextmanager
def _page_open(dashboard: str, nice: bool = False) -> Iterator[None]:
    """The dashboard open in headless Chromium until the block ends."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as playwright:
        executable = CHROMIUM
        if nice:
            executable = str(Path(tmp) / "chromium-nice")
            Path(executable).write_text(f'#!/bin/sh\nexec nice -n 19 {CHROMIUM} "$@"\n')
            Path(executable).chmod(0o755)
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"http://{dashboard}/")
            # Live: the worker rows are drawn from the event stream.
            page.locator("tr.worker").nth(len(WORKERS) - 1).wait_for(timeout=30_000)
            yield
        finally:
            browser.close()


@contextlib.contextmanager
def _stream_read(dashboard: str) -> Iterator[None]:
    """The page's event stream read (and dropped) by curl until the block ends."""
    url = f"http://{dashboard}/api/v1/stream"
    reader = subprocess.Popen(["curl", "-sN", url], stdout=subprocess.PIPE)
    try:
        assert reader.stdout is not None
        reader.stdout.readline()  # the first event: the stream is live
        drain = subprocess.Popen(["cat"], stdin=reader.stdout, stdout=subprocess.DEVNULL)
        yield
    finally:
        reader.terminate()
        reader.wait(10)
        drain.wait(10)


def _chromium_cpu_seconds() -> float:
    """CPU time of every live Chromium process (the browser and its helpers)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if (entry / "comm").read_text().startswith("chrom"):
                    total += cpu_seconds(int(entry.name))
    return total


def measure(mode: str, n: int) -> dict[str, float]:
    watch: dict[str, Callable[[str], contextlib.AbstractContextManager[None]]] = {
        "stream": _stream_read,
        "open": _page_open,
        "open-nice": functools.partial(_page_open, nice=True),
    }
    watching = watch.get(mode)
    with _cluster(mode) as (client, scheduler_pid, dashboard):
        workloads.throughput(client, {"GPU": 1}, n=min(n, 2_000))  # warm-up
        with watching(dashboard) if watching else contextlib.nullcontext():
            cpu_before, browser_before = cpu_seconds(scheduler_pid), _chromium_cpu_seconds()
            start = time.perf_counter()
            rate = workloads.throughput(client, {"GPU": 1}, n=n)
            elapsed = time.perf_counter() - start
            cpu = cpu_seconds(scheduler_pid) - cpu_before
            browser = _chromium_cpu_seconds() - browser_before
    return {
        "tasks_per_s": rate,
        "scheduler_us_per_task": cpu / n * 1e6,
        "browser_cpu_share": browser / elapsed,
    }


def paired(pairs: int, n: int) -> None:
    """Throughput with the page closed, then open, ``pairs`` times in one cluster."""
    from playwright.sync_api import sync_playwright

    closed: list[float] = []
    opened: list[float] = []
    with _cluster("on") as (client, _, dashboard), sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            workloads.throughput(client, {"GPU": 1}, n=min(n, 2_000))  # warm-up
            for i in range(pairs):
                page.goto("about:blank")  # the event stream ends with the page
                closed.append(workloads.throughput(client, {"GPU": 1}, n=n))
                page.goto(f"http://{dashboard}/")
                page.locator("tr.worker").nth(len(WORKERS) - 1).wait_for(timeout=30_000)
                opened.append(workloads.throughput(client, {"GPU": 1}, n=n))
                print(
                    f"pair {i + 1}/{pairs}: closed {closed[-1]:,.0f}, open {opened[-1]:,.0f}"
                    f" tasks/s ({opened[-1] / closed[-1]:.3f})",
                    flush=True,
                )
        finally:
            browser.close()
    ratios = [o / c for o, c in zip(opened, closed, strict=True)]
    print(
        f"\npage open / closed, {n:,} tasks, {pairs} pairs in one cluster: median"
        f" {statistics.median(ratios):.3f} (from {min(ratios):.3f} to {max(ratios):.3f});"
        f" medians {statistics.median(opened):,.0f} / {statistics.median(closed):,.0f} tasks/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=workloads.N_THROUGHPUT)
    parser.add_argument("--paired", type=int, default=0, metavar="N")
    args = parser.parse_args()
    if args.paired:
        paired(args.paired, args.tasks)
        return
    figures: dict[str, dict[str, list[float]]] = {m: {} for m in MODES}
    for r in range(args.rounds):
        for mode in MODES:
            start = time.monotonic()
            got = measure(mode, args.tasks)
            for name, value in got.items():
                figures[mode].setdefault(name, []).append(value)
            print(
                f"round {r + 1}/{args.rounds} {mode}: {time.monotonic() - start:.0f}s,"
                f" {got['tasks_per_s']:,.0f} tasks/s, {got['scheduler_us_per_task']:.1f} us a task",
                flush=True,
            )
    print(f"\ndashboard cost, {args.tasks:,} tasks, {args.rounds} interleaved rounds (medians):")
    columns = [("tasks/s", 9), ("x off", 6), ("sched us/task", 14), ("x off", 6)]
    columns.append(("browser CPUs", 13))
    print(" " * 9, *(f"{name:>{width}}" for name, width in columns))
    base = {k: statistics.median(v) for k, v in figures["off"].items()}
    for mode in MODES:
        med = {k: statistics.median(v) for k, v in figures[mode].items()}
        rate, cpu = med["tasks_per_s"], med["scheduler_us_per_task"]
        print(
            f"{mode:9} {rate:9,.0f} {rate / base['tasks_per_s']:6.3f}"
            f" {cpu:14.1f} {cpu / base['scheduler_us_per_task']:6.3f}"
            f" {med['browser_cpu_share']:13.2f}"
        )


if __name__ == "__main__":
    main()
