"""What a newcomer copies from the README runs as written.

Every ```python block of README.md runs as a script of its own, in a fresh
interpreter, as if pasted into a file (a block preceded by a ``<!-- not run
by ... -->`` comment names what it needs that a test machine lacks). The
first command the README gives, ``make demo``, runs ``examples/seed_pipeline.py``:
that runs here too, and so does every other example.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
#: Each snippet starts its own local cluster: seconds, not minutes.
SNIPPET_TIMEOUT_S = 120

_BLOCK = re.compile(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)\n```", re.DOTALL)


def _snippets() -> list[tuple[int, str, bool]]:
    """(line, code, runnable) of every python block in the README."""
    text = README.read_text()
    found = []
    for match in _BLOCK.finditer(text):
        line = text.count("\n", 0, match.start("code"))
        runnable = "not run by" not in match.group("before")
        found.append((line, match.group("code"), runnable))
    return found


SNIPPETS = _snippets()


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ, PYTHONUNBUFFERED="1", APPORTION_SCHEDULER__CHECK_INVARIANTS="1", COLUMNS="200"
    )
    return subprocess.run(
        args,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=SNIPPET_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )


def test_the_readme_has_runnable_snippets() -> None:
    assert sum(runnable for _, _, runnable in SNIPPETS) >= 1, "no README snippet would run"


@pytest.mark.parametrize(
    ("line", "code"),
    [(line, code) for line, code, runnable in SNIPPETS if runnable],
    ids=[f"README.md:{line}" for line, _, runnable in SNIPPETS if runnable],
)
def test_readme_snippet_runs(line: int, code: str, tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(code + "\n")
    done = _run([sys.executable, str(script)], tmp_path)
    assert done.returncode == 0, (
        f"README.md line {line} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    )
    # A comment "# VALUE" after a print names what it prints.
    for expected in re.findall(r"print\(.*\)\s+# (\S+)", code):
        assert expected in done.stdout.split(), (expected, done.stdout)


def test_the_collections_example_runs(tmp_path: Path) -> None:
    done = _run([sys.executable, str(ROOT / "examples" / "collections.py")], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every block held a GPU" in done.stdout, done.stdout
    assert "(GPU=0)" not in done.stdout, done.stdout


def test_make_demo_runs_the_seed_pipeline(tmp_path: Path) -> None:
    done = _run([sys.executable, str(ROOT / "examples" / "seed_pipeline.py")], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "aggregate = " in done.stdout, done.stdout
    assert "cluster shut down" in done.stdout, done.stdout
