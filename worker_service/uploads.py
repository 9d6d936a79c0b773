"""Files clients upload for tasks to import (``client.upload_file``).

Each worker process keeps them in a directory of its own (removed when it
stops) that is first on ``sys.path``; a ``.zip`` or ``.egg`` goes on the
path itself. A ``.py`` is imported at once, or reloaded if it was imported
before, so a mistake in it is reported to the client that uploaded it, and a
new version replaces the old one for the tasks that run after.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

from apportion_common.uploads import UploadError, check_upload

log = logging.getLogger("worker_service")


class Uploads:
    def __init__(self) -> None:
        self._directory: Path | None = None
        # Uploads arrive from the loop's threads and the scheduler's batches.
        self._lock = threading.Lock()

    def add(self, filename: str, data: bytes) -> None:
        """Keep ``data`` as ``filename`` where tasks import from; raise
        :class:`UploadError` naming what is wrong (a bad name, an import error)."""
        check_upload(filename, len(data))
        with self._lock:
            path = self._dir() / filename
            partial = path.with_name(f".{filename}.partial")
            partial.write_bytes(data)
            os.replace(partial, path)  # an importer never reads half a file
            entry = str(path.parent if filename.endswith(".py") else path)
            if entry not in sys.path:
                sys.path.insert(0, entry)
            sys.path_importer_cache.pop(entry, None)  # a zip read before is read again
            importlib.invalidate_caches()
            if filename.endswith(".py"):
                _import_afresh(path.stem, filename)
        log.info("uploaded %s (%d bytes)", filename, len(data))

    def add_from_scheduler(self, files: list[tuple[str, bytes]]) -> None:
        """Files uploaded before this worker joined: one that fails is logged
        (the client that uploaded it heard of it from the workers it reached)."""
        for filename, data in files:
            try:
                self.add(filename, data)
            except UploadError as exc:
                log.error("an uploaded file: %s", exc)

    def _dir(self) -> Path:
        if self._directory is None:
            self._directory = Path(tempfile.mkdtemp(prefix="apportion-uploads-"))
        return self._directory

    def close(self) -> None:
        with self._lock:
            if self._directory is not None:
                for entry in (str(self._directory), *map(str, self._directory.iterdir())):
                    while entry in sys.path:
                        sys.path.remove(entry)
                shutil.rmtree(self._directory, ignore_errors=True)
                self._directory = None


def _import_afresh(name: str, filename: str) -> None:
    try:
        module = sys.modules.get(name)
        if module is None:
            importlib.import_module(name)
        else:
            importlib.reload(module)
    except BaseException as exc:  # whatever the module's own code raises
        raise UploadError(f"{filename} does not import: {type(exc).__name__}: {exc}") from None
