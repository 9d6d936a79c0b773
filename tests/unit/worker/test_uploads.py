"""A worker's uploaded files: importable at once, replaced by a new version,
refused with a reason, gone when the worker stops."""

from __future__ import annotations

import importlib
import os
import re
import secrets
import sys
import zipfile
from collections.abc import Iterator
from io import BytesIO

import pytest

from apportion_common.uploads import UploadError
from worker_service.uploads import Uploads


@pytest.fixture
def uploads() -> Iterator[Uploads]:
    kept = Uploads()
    yield kept
    kept.close()


def test_a_module_imports_at_once_and_a_new_version_replaces_it(uploads: Uploads) -> None:
    name = f"up_{secrets.token_hex(4)}"
    try:
        uploads.add(f"{name}.py", b"VERSION = 1\n")
        assert sys.modules[name].VERSION == 1
        uploads.add(f"{name}.py", b"VERSION = 2\n")
        assert importlib.import_module(name).VERSION == 2
    finally:
        sys.modules.pop(name, None)


def test_a_zip_of_packages_goes_on_the_path(uploads: Uploads) -> None:
    name = f"pkg_{secrets.token_hex(4)}"
    archive = BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr(f"{name}/__init__.py", "ANSWER = 42\n")
    try:
        uploads.add("bundle.zip", archive.getvalue())
        assert importlib.import_module(name).ANSWER == 42
    finally:
        sys.modules.pop(name, None)


@pytest.mark.parametrize(
    ("filename", "data", "says"),
    [
        ("../evil.py", b"", "not a bare file name"),
        (".hidden.py", b"", "not a bare file name"),
        ("notes.txt", b"", "only .py, .zip, .egg"),
        ("broken_upload.py", b"def (:\n", "does not import: SyntaxError"),
    ],
)
def test_bad_files_are_refused_naming_why(
    uploads: Uploads, filename: str, data: bytes, says: str
) -> None:
    with pytest.raises(UploadError, match=re.escape(says)):
        uploads.add(filename, data)


def test_closing_removes_the_directory_and_its_path_entries(uploads: Uploads) -> None:
    name = f"gone_{secrets.token_hex(4)}"
    try:
        uploads.add(f"{name}.py", b"")
        directory = sys.modules[name].__file__
        assert directory is not None
        uploads.close()
        assert not any(name in entry for entry in sys.path if "apportion-uploads-" in entry)
        assert not os.path.exists(directory)
    finally:
        sys.modules.pop(name, None)
