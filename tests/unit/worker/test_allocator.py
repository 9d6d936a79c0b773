"""The worker's allocator thresholds: set in a worker process on glibc,
left alone where the user tunes the allocator through the environment."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

PROBE = "from worker_service.allocator import tune_allocator; print(tune_allocator())"


def _probe(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_"))}
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_worker_process_sets_the_thresholds_on_glibc() -> None:
    assert _probe() == "True"


@pytest.mark.parametrize("name", ["MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"])
def test_a_user_s_own_tuning_is_left_alone(name: str) -> None:
    assert _probe(**{name: "65536"}) == "False"
