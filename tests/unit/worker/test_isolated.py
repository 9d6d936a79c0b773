"""Isolated tasks (issue 15): a task run in a child process seeing only its
GPUs comes back as it would from a task thread (value, error, unpicklable
result, task context, inputs); the children are pooled per device set; a
child that dies fails its task and its pool is replaced; shutdown leaves no
child behind.

Starting a pool's first child costs a fresh interpreter (about a second on
two CPUs), so the tests share one runner and as few device sets as they can.
"""

from __future__ import annotations

import operator
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from apportion_common import serialize, shm
from apportion_common.serialize import ErrorInfo, Frames, InputRef
from apportion_common.task_context import TaskContext, get_task_context
from worker_service.execute import Outcome, execute
from worker_service.isolated import SHM_MIN_BYTES, IsolatedProcessDied, IsolatedRunner

#: What the worker's own process sees: each child must see its devices instead.
PARENT_VISIBLE = "9"


@pytest.fixture(scope="module")
def runner() -> Iterator[IsolatedRunner]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CUDA_VISIBLE_DEVICES", PARENT_VISIBLE)
        kept = IsolatedRunner(max_per_pool=2)
        try:
            yield kept
        finally:
            kept.shutdown()


def _context(key: str = "k", gpus: tuple[str, ...] = ()) -> TaskContext:
    return TaskContext(key, "10.0.0.1:7000", "w-1", {"GPU": float(len(gpus))}, gpus)


def _run(
    runner: IsolatedRunner,
    fn: Callable[..., Any],
    *args: Any,
    gpus: tuple[str, ...] = (),
    inputs: Mapping[str, Frames] | None = None,
    **options: Any,
) -> Outcome:
    payload = serialize.dump_call(fn, args, {})
    return runner.run("k", payload, inputs or {}, _context("k", gpus), **options)


def _value(outcome: Outcome) -> Any:
    assert isinstance(outcome.result, Frames), outcome.result
    return serialize.loads(outcome.result)


def _error(outcome: Outcome) -> ErrorInfo:
    assert isinstance(outcome.result, ErrorInfo), outcome.result
    return outcome.result


def _raise_value_error(message: str) -> None:
    raise ValueError(message)


def _alive(pid: int) -> bool:
    try:
        import psutil  # type: ignore[import-untyped]
    except ImportError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return bool(psutil.pid_exists(pid))


def test_values_come_back_intact(runner: IsolatedRunner) -> None:
    big = _value(_run(runner, lambda: b"\x01\x02" * (5 * 2**20)))  # a cloudpickled lambda
    assert type(big) is bytes and big == b"\x01\x02" * (5 * 2**20)
    assert _value(_run(runner, divmod, 7, 2)) == (3, 1)  # an importable function
    assert _value(_run(runner, lambda: (1, "a", None, [2.5]))) == (1, "a", None, [2.5])
    np = pytest.importorskip("numpy")
    array = _value(_run(runner, np.arange, 10**6))
    assert isinstance(array, np.ndarray) and array.shape == (10**6,) and array[-1] == 10**6 - 1
    outcome = _run(runner, time.sleep, 0.2)
    assert 0.2 <= outcome.duration < 1.0  # measured in the child, not the spawn


def test_a_task_error_comes_back_with_its_type_and_the_remote_traceback(
    runner: IsolatedRunner,
) -> None:
    error = _error(_run(runner, _raise_value_error, "bad input"))
    assert error.type_name == "builtins.ValueError" and error.message == "bad input"
    assert "_raise_value_error" in error.traceback and "ValueError: bad input" in error.traceback
    exc = serialize.loads(error.exception)
    assert type(exc) is ValueError and str(exc) == "bad input"


def test_an_unpicklable_result_fails_as_it_does_in_a_thread(runner: IsolatedRunner) -> None:
    payload = serialize.dump_call(lambda: threading.Lock(), (), {})
    in_child = _error(runner.run("k", payload, {}, _context()))
    in_thread = _error(execute("k", payload, {}, _context()))
    assert in_child.type_name == in_thread.type_name
    assert in_child.type_name == "apportion_common.serialize.SerializationError"
    assert in_child.message == in_thread.message and "cannot be pickled" in in_child.message


@pytest.mark.parametrize(
    ("gpus", "visible"), [(("1",), "1"), (("0", "1"), "0,1"), ((), "")], ids=["1", "0,1", "none"]
)
def test_the_child_sees_only_its_gpus_and_the_parent_is_unchanged(
    runner: IsolatedRunner, gpus: tuple[str, ...], visible: str
) -> None:
    assert _value(_run(runner, os.getenv, "CUDA_VISIBLE_DEVICES", gpus=gpus)) == visible
    assert os.environ["CUDA_VISIBLE_DEVICES"] == PARENT_VISIBLE


def test_visible_none_leaves_the_parents_devices(runner: IsolatedRunner) -> None:
    seen = _run(runner, os.getenv, "CUDA_VISIBLE_DEVICES", gpus=("1",), visible=None)
    assert _value(seen) == PARENT_VISIBLE


def test_the_task_context_works_in_the_child(runner: IsolatedRunner) -> None:
    context = _context("ctx-key", ("1",))
    payload = serialize.dump_call(get_task_context, (), {})
    got = _value(runner.run("ctx-key", payload, {}, context))
    assert got == context and got.gpus == ("1",) and got.worker_name == "w-1"


def test_inputs_reach_the_task(runner: IsolatedRunner) -> None:
    inputs = {"a": serialize.dumps_result(b"x" * 200_000), "b": serialize.dumps_result(b"yz")}
    assert inputs["a"].buffers  # its wire form has a header and an out-of-band buffer
    outcome = _run(runner, operator.add, InputRef("a"), InputRef("b"), inputs=inputs)
    assert _value(outcome) == b"x" * 200_000 + b"yz"


def _segments() -> set[str]:
    return {p.name for p in shm.SHM_DIR.glob(f"{shm.PREFIX}*")} if shm.available() else set()


def _sum_and_mean(array: Any) -> tuple[float, float, bool]:
    return float(array.sum()), float(array.mean()), bool(array.flags.writeable)


def test_large_values_cross_in_shared_memory_and_leave_no_segment(
    runner: IsolatedRunner,
) -> None:
    """A value of a MiB or more goes to the child and back through a segment,
    read once, whose name is gone afterwards (whether the task returned,
    raised, or its child died)."""
    np = pytest.importorskip("numpy")
    if not shm.available():
        pytest.skip("no writable /dev/shm here")
    before = _segments()
    array = np.arange(4 * 2**20, dtype=np.float64)  # 32 MiB
    frames = serialize.dumps_result(array)
    assert frames.nbytes >= SHM_MIN_BYTES
    inputs = {"a": frames}
    got = _value(_run(runner, _sum_and_mean, InputRef("a"), inputs=inputs))
    assert got == (float(array.sum()), float(array.mean()), True)  # mapped, still writable
    back = _value(_run(runner, np.ones, 4 * 2**20))  # a 32 MiB result
    assert isinstance(back, np.ndarray) and back.sum() == 4 * 2**20
    assert _segments() == before
    error = _error(_run(runner, _raise_value_error, "after a big input", inputs=inputs))
    assert error.message == "after a big input"
    died = runner.run("dies", serialize.dump_call(os._exit, (4,), {}), inputs, _context("dies"))
    assert "exit code 4" in _error(died).message
    assert _segments() == before


def test_a_pool_is_reused_per_device_set(runner: IsolatedRunner) -> None:
    first = _value(_run(runner, os.getpid, gpus=("1",)))
    assert _value(_run(runner, os.getpid, gpus=("1",))) == first
    other = _value(_run(runner, os.getpid, gpus=()))
    assert len({first, other, os.getpid()}) == 3


def test_tasks_from_several_threads_at_once(runner: IsolatedRunner) -> None:
    def one(i: int) -> Any:
        return _value(_run(runner, operator.mul, i, 3, gpus=("1",) if i % 2 else ()))

    with ThreadPoolExecutor(6) as threads:
        assert list(threads.map(one, range(12))) == [i * 3 for i in range(12)]


def test_a_dead_child_fails_its_task_and_the_next_task_gets_a_fresh_pool(
    runner: IsolatedRunner,
) -> None:
    dead = _value(_run(runner, os.getpid, gpus=("3",)))
    error = _error(
        runner.run("dies", serialize.dump_call(os._exit, (3,), {}), {}, _context("dies", ("3",)))
    )
    assert error.type_name == "worker_service.isolated.IsolatedProcessDied"
    assert "'dies'" in error.message and "'3'" in error.message and "exit code 3" in error.message
    assert type(serialize.loads(error.exception)) is IsolatedProcessDied
    assert not _alive(dead)
    fresh = _value(_run(runner, os.getpid, gpus=("3",)))
    assert fresh != dead and _alive(fresh)


def test_shutdown_stops_a_running_task_and_leaves_no_child(tmp_path: Path) -> None:
    runner = IsolatedRunner(max_per_pool=2)
    try:
        pids = {_value(_run(runner, os.getpid, gpus=("0",))), _value(_run(runner, os.getpid))}
        marker = tmp_path / "started"

        def sleeper(path: str) -> None:
            Path(path).touch()
            time.sleep(60)

        with ThreadPoolExecutor(1) as thread:
            running = thread.submit(_run, runner, sleeper, str(marker), gpus=("0",))
            deadline = time.monotonic() + 30
            while not marker.exists():
                assert time.monotonic() < deadline and not running.done()
                time.sleep(0.02)
            children = [pid for pool in runner._pools.values() for pid in pool.processes]
            assert pids <= set(children)
            began = time.monotonic()
            runner.shutdown()
            assert time.monotonic() - began < 5  # it does not wait for the sleeper
            stopped = _error(running.result(timeout=10))
        assert stopped.type_name == "worker_service.isolated.IsolatedProcessDied"
        assert "shutting down" in stopped.message
        assert not [pid for pid in children if _alive(pid)]
        late = _error(_run(runner, os.getpid))  # after shutdown: an error, not a raise
        assert late.type_name == "worker_service.isolated.IsolatedProcessDied"
    finally:
        runner.shutdown()


_KILLED_PARENT = """
import os, signal
from apportion_common import serialize, shm
from apportion_common.task_context import TaskContext
from worker_service.isolated import IsolatedRunner

runner = IsolatedRunner(max_per_pool=1)
payload = serialize.dump_call(os.getpid, (), {})
print(serialize.loads(runner.run("k", payload, {}, TaskContext("k", "a", "w")).result), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_children_end_when_the_worker_is_killed_outright() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_PARENT], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    child = int(done.stdout)
    deadline = time.monotonic() + 10
    while _alive(child):  # an orphan: init reaps it once it exits
        assert time.monotonic() < deadline, f"child {child} outlived its parent"
        time.sleep(0.02)
