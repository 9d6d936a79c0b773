"""The house rules of the layout, checked on the source: which package may
import which, and where protobuf stops.

The shared library imports no service; no service imports another, nor the
command line; the command line (``apportion``) may import them all. Inside
the scheduler and the worker, protobuf stops at the wire: their state
machines work on plain dataclasses.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("apportion", "apportion_common", "scheduler_service", "worker_service", "client_sdk")
#: What each package may import of the others (protos aside: every one may).
ALLOWED = {
    "apportion_common": set(),
    "scheduler_service": {"apportion_common"},
    "worker_service": {"apportion_common"},
    "client_sdk": {"apportion_common"},
    "apportion": {"apportion_common", "scheduler_service", "worker_service", "client_sdk"},
}
#: Modules that may touch protobuf: where messages come in and go out.
WIRE_MODULES = {
    # operator_calls.py: the servicer's unary calls, a base of its class
    "scheduler_service": {"servicer.py", "operator_calls.py", "wire.py", "server.py"},
    "worker_service": {"servicer.py", "wire.py", "stream.py"},
}


def _imports(path: Path) -> set[str]:
    """Top-level packages a module imports (relative imports stay inside)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def _modules(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_imports_only_what_it_may(package: str) -> None:
    others = set(PACKAGES) - {package}
    for path in _modules(package):
        wrong = (_imports(path) & others) - ALLOWED[package]
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"


@pytest.mark.parametrize("package", sorted(WIRE_MODULES))
def test_protobuf_stops_at_the_wire(package: str) -> None:
    for path in _modules(package):
        if path.name not in WIRE_MODULES[package]:
            assert "protos" not in _imports(path), f"{path.relative_to(ROOT)} imports protos"


#: Where our own Python lives (protos/ holds generated code: exempt).
SOURCE_DIRS = (*PACKAGES, "bench", "tests", "examples")
#: A module longer than this is two modules waiting to be told apart.
MAX_MODULE_LINES = 600


def test_no_module_is_over_600_lines() -> None:
    long = {
        str(path.relative_to(ROOT)): n
        for directory in SOURCE_DIRS
        for path in (ROOT / directory).rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"
