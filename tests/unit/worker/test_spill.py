"""Results spilled to disk: least recently used first, read back intact
(bytes, arrays, plain pickles) without coming back into memory, their files
gone when they are released, replaced or the store is cleared, and what dead
processes left removed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from apportion_common import serialize, shm
from worker_service import spill
from worker_service.spill import SpillDirectory
from worker_service.store import ResultStore


def result(value: object) -> serialize.Frames:
    return serialize.dumps_result(value)


def files(tmp_path: Path) -> list[Path]:
    return sorted(p for p in tmp_path.rglob("*") if p.is_file())


def test_the_least_recently_used_go_first_and_come_back_intact(tmp_path: Path) -> None:
    store = ResultStore(SpillDirectory(tmp_path))
    values = {f"k{i}": bytes([i]) * 200_000 for i in range(4)}
    for i, (key, value) in enumerate(values.items()):
        store.put(key, i + 1, result(value))
    managed = store.managed
    store.get("k0")  # used: now the most recent
    one = store.nbytes("k1")
    assert one is not None
    freed = store.spill(one + 1)  # two results' worth: k1, then k2
    assert freed == one + store.nbytes("k2")  # type: ignore[operator]
    assert [store.is_spilled(k) for k in values] == [False, True, True, False]
    assert store.managed == managed - freed and store.spilled_bytes == freed
    assert len(files(tmp_path)) == 2
    for key, value in values.items():
        data = store.get(key)
        assert data is not None and data.value() == value
    assert store.is_spilled("k1")  # read back, not taken back into memory


def test_arrays_and_plain_pickles_round_trip(tmp_path: Path) -> None:
    store = ResultStore(SpillDirectory(tmp_path))
    array = np.arange(100_000, dtype=np.float64)
    store.put("array", 1, result({"a": array, "n": 3}))
    store.put("small", 2, serialize.dumps(42))  # a plain pickle, kept as it is
    assert store.spill(10**9) > 0
    back = store.get("array")
    assert back is not None
    value = back.value()
    np.testing.assert_array_equal(value["a"], array) and value["n"] == 3
    value["a"][0] = -1  # writable, as an array handed to a task is
    small = store.get("small")
    assert small is not None and serialize.loads(small) == 42


def test_files_go_when_results_are_released_replaced_kept_or_cleared(tmp_path: Path) -> None:
    directory = SpillDirectory(tmp_path)
    store = ResultStore(directory)
    for i in range(4):
        store.put(f"k{i}", i + 1, result(b"x" * 1000), incarnation=i % 2)
    store.spill(10**9)
    assert len(files(tmp_path)) == 4
    store.release("k0", run_id=99)  # another run's result: kept
    assert len(files(tmp_path)) == 4
    store.release("k0")
    store.put("k1", 5, result(b"new"), incarnation=1)  # replaced: the old file goes
    assert len(files(tmp_path)) == 2 and store.get("k1") is not None
    held = store.keep_only_own()  # fetched copies (incarnation 0) go
    assert sorted(k for k, _, _ in held) == ["k1", "k3"]  # k1: a result it made again
    assert len(files(tmp_path)) == 1
    store.clear()
    directory.close()
    assert files(tmp_path) == [] and list(tmp_path.iterdir()) == []
    assert (store.managed, store.spilled_bytes) == (0, 0)


def test_a_result_released_while_it_is_written_leaves_no_file(tmp_path: Path) -> None:
    class Releasing(SpillDirectory):
        def write(self, frames: serialize.Frames) -> Path:
            path = super().write(frames)
            store.release("k")  # the scheduler released it meanwhile
            return path

    store = ResultStore(Releasing(tmp_path))
    store.put("k", 1, result(b"x" * 1000))
    assert store.spill(10**9) == 0
    assert files(tmp_path) == [] and store.spilled_bytes == 0 and store.managed == 0


def test_a_spilled_result_loses_its_segment(tmp_path: Path) -> None:
    store = ResultStore(SpillDirectory(tmp_path))
    published = shm.publish(result(np.ones(300_000)), 1)
    if published is None:
        return  # no /dev/shm here
    frames, segment = published
    store.put("k", 1, frames, 1, segment)
    store.spill(10**9)
    assert store.segment("k") is None
    assert not (shm.SHM_DIR / segment.name).exists()
    data = store.get("k")
    assert data is not None and data.value().sum() == 300_000


def test_the_directory_is_made_on_first_use_and_named_after_the_process(tmp_path: Path) -> None:
    directory = SpillDirectory(tmp_path / "deeper")
    assert directory.path is None
    directory.write(result(b"x"))
    made = directory.path
    assert made is not None and made.parent == tmp_path / "deeper"
    assert made.name.startswith(f"{spill.PREFIX}{os.getpid()}-")
    directory.close()
    assert not made.exists()


def test_what_dead_processes_spilled_is_removed(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    pid = int(dead.stdout)
    (tmp_path / f"{spill.PREFIX}{pid}-abc").mkdir()
    (tmp_path / f"{spill.PREFIX}{pid}-abc" / "1").write_bytes(b"x")
    mine = tmp_path / f"{spill.PREFIX}{os.getpid()}-def"
    mine.mkdir()
    (tmp_path / "someone-else").mkdir()
    assert spill.remove_orphans(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [mine.name, "someone-else"]
    assert spill.remove_directories_of(tmp_path, os.getpid()) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["someone-else"]
