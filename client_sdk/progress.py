"""``progress(futures)``: a progress bar in the terminal until the tasks are done."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from .future import Future
from .waiting import as_completed, futures_of, one_client

#: The statuses counted as erred on the bar.
_ERRED = frozenset({"error", "lost"})


class _Rate(ProgressColumn):
    """Tasks a second so far."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} tasks/s" if speed else "- tasks/s", style="progress.data.speed")


def _bar(console: Console | None) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[erred]} erred"),
        _Rate(),
        TimeRemainingColumn(),
        console=console,
    )


def progress(*fs: Future[Any] | Iterable[Future[Any]], console: Console | None = None) -> Any:
    """Draw a bar of the futures' tasks (done of total, erred, rate, time
    left) until every one is done, then return. With an asynchronous
    client, a coroutine. ``console``: where to draw (the terminal by default).
    """
    futures = [f for item in fs for f in futures_of(item)]
    client = one_client(futures, "progress")
    if client is not None and client.asynchronous:
        return _progress_async(futures, console)
    with _bar(console) as bar:
        task = bar.add_task("tasks", total=len(futures), erred=0)
        erred = 0
        for future in as_completed(futures):
            erred += future.status in _ERRED
            bar.update(task, advance=1, erred=erred)
    return None


async def _progress_async(futures: list[Future[Any]], console: Console | None) -> None:
    with _bar(console) as bar:
        task = bar.add_task("tasks", total=len(futures), erred=0)
        erred = 0
        async for future in as_completed(futures):
            erred += future.status in _ERRED
            bar.update(task, advance=1, erred=erred)
