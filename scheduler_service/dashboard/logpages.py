"""The dashboard's log pages: the scheduler's newest lines and each worker's,
as a plain HTML page (the lines in a ``<pre>``) or as JSON. Pure functions:
:mod:`.server` reads the lines (the scheduler's ring; a worker's through
``Worker/GetLogs``) and answers with what these make.

===============================  =============================================
path                             what
===============================  =============================================
``/logs/scheduler``              the scheduler's newest lines (HTML)
``/logs/worker/WORKER``          a worker's, asked of the worker (HTML)
``/api/v1/logs/scheduler``       the scheduler's, as JSON
``/api/v1/logs/worker/WORKER``   a worker's, as JSON
===============================  =============================================

WORKER is a connected worker's id (what the page links to), name or
address; ``?n=`` how many lines (the newest, :data:`DEFAULT_LINES` unless
given). JSON: ``{"lines": [[level, line], ...], "n": N, ...}``, oldest first,
as ``client.get_worker_logs()`` gives them; a failure ``{"error": why}``.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from apportion_common.logring import LogLine

from ..records import WorkerRecord

#: Lines a log page shows unless ``?n=`` says otherwise.
DEFAULT_LINES = 1_000
#: Seconds a worker gets to answer for its page; past them the page says so.
WORKER_LOGS_TIMEOUT_S = 5.0
SCHEDULER_LOGS_PATH = "/logs/scheduler"
WORKER_LOGS_PREFIX = "/logs/worker/"
API_PREFIX = "/api/v1"
#: Levels drawn in colour; others stay plain.
MARKED_LEVELS = frozenset({"WARNING", "ERROR", "CRITICAL"})


def worker_logs_path(worker_id: int) -> str:
    """Where the page links a worker's logs: by id, which no name can shadow."""
    return f"{WORKER_LOGS_PREFIX}{worker_id}"


def lines_wanted(given: str | None) -> int:
    """``?n=``: a whole number >= 0 (ValueError says what was wrong)."""
    if given is None:
        return DEFAULT_LINES
    if not given.isascii() or not given.isdigit():
        raise ValueError(f"n must be a whole number >= 0, not {given!r}")
    return int(given)


def find_worker(workers: Iterable[WorkerRecord], wanted: str) -> WorkerRecord | None:
    """The connected worker ``wanted`` names: by id first (the page's links),
    then address, then name; the oldest when several share a name."""
    ordered = sorted(workers, key=lambda w: w.worker_id)
    for found in (
        (w for w in ordered if str(w.worker_id) == wanted),
        (w for w in ordered if w.address == wanted),
        (w for w in ordered if w.name == wanted),
    ):
        match = next(found, None)
        if match is not None:
            return match
    return None


def unknown_worker(wanted: str) -> str:
    return f"no worker {wanted!r} is connected to this scheduler (give its id, name or address)"


@dataclass(frozen=True, slots=True)
class LogAnswer:
    """What one log path answers: whose lines, how many were asked for, the
    lines themselves, or why there are none (``error``, with ``status``)."""

    #: "the scheduler 127.0.0.1:8786", "worker gpu-1 (127.0.0.1:40123)"
    whose: str
    #: the JSON fields that say whose (``{"scheduler": ADDRESS}``, ``{"worker": {...}}``)
    who: Mapping[str, Any]
    n: int | None
    lines: Sequence[LogLine] = ()
    error: str | None = None
    status: int = 200

    def as_json(self) -> str:
        if self.error is not None:
            return json.dumps({"error": self.error, **self.who})
        return json.dumps({**self.who, "n": self.n, "lines": [list(line) for line in self.lines]})

    def as_html(self) -> str:
        whose = html.escape(self.whose)
        if self.error is not None:
            body = f'<p id="error" class="error">{html.escape(self.error)}</p>'
        else:
            note = (
                f"{len(self.lines)} lines, the newest up to {self.n} "
                "(<code>?n=</code> for more or fewer), oldest first"
            )
            body = f'<p class="muted">{note}</p>\n<pre id="lines">{_html_lines(self.lines)}</pre>'
        return (
            '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>apportion: logs of {whose}</title>\n"
            '<link rel="stylesheet" href="/static/dashboard.css">\n</head>\n'
            '<body class="logs">\n<header>\n  <h1><a href="/">apportion</a></h1>\n'
            f'  <span id="whose">logs of {whose}</span>\n</header>\n'
            f"<main>\n{body}\n</main>\n</body>\n</html>\n"
        )


def _html_lines(lines: Sequence[LogLine]) -> str:
    out = []
    for level, text in lines:
        escaped = html.escape(text)
        if level in MARKED_LEVELS:
            escaped = f'<span class="{level}">{escaped}</span>'
        out.append(escaped)
    return "\n".join(out)
