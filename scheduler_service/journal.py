"""The write-ahead journal of accepted tasks, in SQLite (``--state-dir``).

It holds what a restarted scheduler needs to finish what clients asked for:
each task the scheduler still knows (its submission and incarnation, or its
final error) and which clients want it. It does not hold where results are:
workers that reconnect say what they hold, and the rest is computed again.

The state machine says what changed (journal commands); this module only
writes them down. Writes of one turn of the event loop share one transaction,
committed before the loop turns again, so a burst of submissions costs one
commit. SQLite in WAL mode with ``synchronous=NORMAL`` survives the process
being killed at any point (a power cut may lose the last few commits).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from pathlib import Path

from apportion_common.serialize import ErrorInfo
from apportion_common.status import ErrorKind

from .commands import (
    JournalCommand,
    JournalFailure,
    JournalForgetClient,
    JournalForgetTask,
    JournalTask,
    JournalUnwant,
    JournalWant,
)
from .events import RecoveredTask, TaskSubmission

JOURNAL_FILE = "journal.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    incarnation INTEGER NOT NULL,
    payload BLOB NOT NULL,
    spec TEXT NOT NULL,
    error TEXT
);
CREATE TABLE IF NOT EXISTS wants (
    client TEXT NOT NULL,
    key TEXT NOT NULL,
    PRIMARY KEY (client, key)
);
CREATE INDEX IF NOT EXISTS wants_by_key ON wants (key);
"""


class JournalError(OSError):
    """The state directory cannot hold a journal (permissions, a corrupt file)."""


class Journal:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / JOURNAL_FILE
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise JournalError(f"cannot keep a journal at {self.path}: {exc}") from exc
        self._in_transaction = False

    def close(self) -> None:
        self.commit()
        self._db.close()

    # ------------------------------------------------------------ reading

    def load(self) -> tuple[RecoveredTask, ...]:
        """Every journaled task, in the order it was accepted."""
        wanted: dict[str, list[str]] = {}
        for client, key in self._db.execute("SELECT client, key FROM wants ORDER BY client"):
            wanted.setdefault(key, []).append(client)
        recovered = []
        rows = self._db.execute(
            "SELECT key, incarnation, payload, spec, error FROM tasks ORDER BY seq"
        )
        for key, incarnation, payload, spec_json, error_json in rows:
            spec = json.loads(spec_json)
            submission = TaskSubmission(
                key=key,
                payload=bytes(payload),
                resources={name: int(q) for name, q in spec["resources"].items()},
                dependencies=tuple(spec["dependencies"]),
                priority=int(spec["priority"]),
                retries=int(spec["retries"]),
                workers=tuple(spec["workers"]),
                allow_other_workers=bool(spec["allow_other_workers"]),
                isolate=bool(spec.get("isolate", False)),
            )
            error = None if error_json is None else _error_from_json(error_json)
            recovered.append(
                RecoveredTask(submission, int(incarnation), tuple(wanted.get(key, ())), error)
            )
        return tuple(recovered)

    # ------------------------------------------------------------ writing

    def record(self, cmd: JournalCommand) -> None:
        """Write one change; it is committed at the end of this loop turn."""
        if not self._in_transaction:
            self._db.execute("BEGIN")
            self._in_transaction = True
            # Without a running loop (startup, unit tests) the caller commits.
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().call_soon(self.commit)
        match cmd:
            case JournalTask():
                spec = cmd.submission
                self._db.execute(
                    "INSERT OR REPLACE INTO tasks (key, incarnation, payload, spec, error) "
                    "VALUES (?, ?, ?, ?, NULL)",
                    (cmd.key, cmd.incarnation, spec.payload, _spec_json(spec)),
                )
                self._db.execute("DELETE FROM wants WHERE key = ?", (cmd.key,))
                self._db.execute(
                    "INSERT OR IGNORE INTO wants (client, key) VALUES (?, ?)",
                    (cmd.client_id, cmd.key),
                )
            case JournalWant():
                self._db.execute(
                    "INSERT OR IGNORE INTO wants (client, key) VALUES (?, ?)",
                    (cmd.client_id, cmd.key),
                )
            case JournalUnwant():
                self._db.execute(
                    "DELETE FROM wants WHERE client = ? AND key = ?", (cmd.client_id, cmd.key)
                )
            case JournalForgetClient():
                self._db.execute("DELETE FROM wants WHERE client = ?", (cmd.client_id,))
            case JournalForgetTask():
                self._db.execute("DELETE FROM tasks WHERE key = ?", (cmd.key,))
                self._db.execute("DELETE FROM wants WHERE key = ?", (cmd.key,))
            case JournalFailure():
                self._db.execute(
                    "UPDATE tasks SET error = ? WHERE key = ?", (_error_json(cmd.error), cmd.key)
                )

    def commit(self) -> None:
        if self._in_transaction:
            self._db.execute("COMMIT")
            self._in_transaction = False

    def counts(self) -> tuple[int, int]:
        """(tasks, wants) currently journaled."""
        (tasks,) = self._db.execute("SELECT COUNT(*) FROM tasks").fetchone()
        (wants,) = self._db.execute("SELECT COUNT(*) FROM wants").fetchone()
        return int(tasks), int(wants)


def _spec_json(spec: TaskSubmission) -> str:
    return json.dumps(
        {
            "resources": spec.resources,
            "dependencies": list(spec.dependencies),
            "priority": spec.priority,
            "retries": spec.retries,
            "workers": list(spec.workers),
            "allow_other_workers": spec.allow_other_workers,
            "isolate": spec.isolate,
        }
    )


def _error_json(error: ErrorInfo) -> str:
    # The pickled exception is kept too (hex), so the client gets its type back.
    return json.dumps(
        {
            "type_name": error.type_name,
            "message": error.message,
            "traceback": error.traceback,
            "exception": error.exception.hex(),
            "kind": error.kind.value,
        }
    )


def _error_from_json(error_json: str) -> ErrorInfo:
    fields = json.loads(error_json)
    return ErrorInfo(
        str(fields["type_name"]),
        str(fields["message"]),
        str(fields["traceback"]),
        bytes.fromhex(str(fields["exception"])),
        # Journals written before kinds were kept hold the task's own errors.
        ErrorKind(fields.get("kind", ErrorKind.TASK.value)),
    )
