"""Restrictions, KilledWorker, runtime capacity, explain, no_worker_timeout and
the undeclared-resource warning, on the pure state machine."""

from __future__ import annotations

from apportion_common.status import ErrorKind
from scheduler_service import SchedulingPolicy
from scheduler_service.commands import DeclareResources
from scheduler_service.events import (
    TasksSubmitted,
    TaskSubmission,
    Tick,
    WorkerLeft,
    WorkerResourcesChanged,
)
from scheduler_service.state import ERRED, PROCESSING, READY, ClusterState
from tests.helpers.scheduler_sim import Sim, assigns, q, updates


def restricted(sim: Sim, key: str, workers: tuple[str, ...], loose: bool = False, **res: float):
    spec = TaskSubmission(key, key.encode(), q(**res), (), 0, 0, workers, loose)
    return sim(TasksSubmitted("c", (spec,)))


# ---------------------------------------------------------------- restrictions


def test_strict_restriction_runs_only_on_the_named_worker() -> None:
    sim = Sim()
    sim.join(1, nthreads=2, GPU=1)
    sim.join(2, nthreads=2, GPU=1)
    cmds = restricted(sim, "t", ("w2",), GPU=1)
    assert [a.worker_id for a in assigns(cmds)] == [2]
    # By address too; and it waits while its worker is busy, though w1 is free.
    cmds = restricted(sim, "u", ("10.0.0.2:7000",), GPU=1)
    assert assigns(cmds) == []
    assert sim.status("u") == READY
    cmds = sim.finish("t")
    assert [a.worker_id for a in assigns(cmds)] == [2]


def test_loose_restriction_prefers_but_falls_back_and_never_loosens_resources() -> None:
    sim = Sim()
    sim.join(1, nthreads=2, GPU=1)
    sim.join(2, nthreads=2, GPU=1)
    cmds = restricted(sim, "a", ("w2",), True, GPU=1)
    assert [a.worker_id for a in assigns(cmds)] == [2]  # preferred, though w1 joined first
    cmds = restricted(sim, "b", ("w2",), True, GPU=1)
    assert [a.worker_id for a in assigns(cmds)] == [1]  # w2 is busy: elsewhere
    cmds = restricted(sim, "c", ("w2",), True, GPU=1)
    assert assigns(cmds) == []  # GPU is exhausted everywhere: never loosened


def test_restriction_to_a_worker_without_the_resource_waits_and_says_why() -> None:
    sim = Sim()
    sim.join(1, GPU=1)
    sim.join(2)
    cmds = restricted(sim, "t", ("w2",), GPU=1)
    assert assigns(cmds) == []
    (update,) = updates(cmds, "t")
    assert "GPU=1" in update.waiting_reason
    cmds = restricted(sim, "v", ("w9",))
    assert "restricted to (w9)" in updates(cmds, "v")[0].waiting_reason
    assert "none of the workers it is restricted to (w9)" in sim.state.explain("v")


# ------------------------------------------------------------------ KilledWorker


def test_killed_worker_after_allowed_failures() -> None:
    sim = Sim()
    sim.state = ClusterState(SchedulingPolicy(allowed_failures=1))
    sim.join(1, nthreads=2)
    sim.join(2, nthreads=2)
    sim.submit("bad")
    sim.submit("innocent")  # dies once with w2, within allowed_failures
    first = sim.run_of("bad").worker_id
    cmds = sim(WorkerLeft(first))
    assert sim.status("bad") in (READY, PROCESSING)
    assert updates(cmds, "bad") == []
    second = sim.run_of("bad").worker_id
    cmds = sim(WorkerLeft(second))
    assert sim.status("bad") == ERRED
    (update,) = updates(cmds, "bad")
    assert update.error is not None
    assert update.error.kind is ErrorKind.KILLED_WORKER
    assert "'bad'" in update.error.message and "w1" in update.error.message
    assert sim.status("innocent") == READY  # one death is allowed: queued again
    sim.join(3)
    sim.finish("innocent")
    assert sim.state.tasks["innocent"].state == "memory"


# --------------------------------------------------------------- runtime capacity


def test_raising_capacity_starts_waiting_tasks_at_once() -> None:
    sim = Sim()
    sim.join(1, nthreads=4, GPU=1)
    for key in "abc":
        sim.submit(key, GPU=1)
    assert sim.running_on(1) == ["a"]
    cmds = sim(WorkerResourcesChanged(1, q(GPU=3)))
    assert DeclareResources(1, q(GPU=3)) in cmds
    assert sorted(a.key for a in assigns(cmds)) == ["b", "c"]
    assert sim.used(1) == {"GPU": 3.0}


def test_lowering_capacity_lets_running_tasks_finish_and_admits_nothing_until_it_fits() -> None:
    sim = Sim()
    sim.join(1, nthreads=4, GPU=2, CPU=4)
    for key in "abcd":
        sim.submit(key, GPU=1)
    sim.submit("cpu-only", CPU=1)
    assert sim.running_on(1) == ["a", "b", "cpu-only"]
    sim(WorkerResourcesChanged(1, q(GPU=1, CPU=4)))  # below the 2 held
    assert sim.state.workers[1].free["GPU"] < 0
    assert assigns(sim.finish("a")) == []  # GPU still 1 held of 1: c waits
    cmds = sim.finish("b")
    assert [a.key for a in assigns(cmds)] == ["c"]
    sim.finish("cpu-only")
    sim.finish("c")
    sim.finish("d")
    sim.assert_idle()


def test_removing_a_held_resource_keeps_the_books_exact() -> None:
    sim = Sim()
    sim.join(1, nthreads=2, GPU=1)
    sim.submit("a", GPU=1)
    sim(WorkerResourcesChanged(1, {}))
    sim.submit("b", GPU=1)
    assert sim.status("b") == READY
    sim.finish("a")
    assert sim.state.workers[1].free == {"GPU": 0}
    assert sim.status("b") == READY


# ------------------------------------------------------------------------ explain


def test_explain_says_why_in_one_sentence() -> None:
    sim = Sim()
    sim.join(1, nthreads=1, GPU=1)
    sim.submit("run", GPU=1)
    sim.submit("queued-1", GPU=1)
    sim.submit("queued-2", GPU=1)
    sim.submit("later", deps=("run",))
    sim.submit("never", GPU=4)
    assert sim.state.explain("run") == "task 'run' is running on w1"
    assert sim.state.explain("later") == "task 'later' waits for its input(s) 'run' (processing)"
    assert "no worker offers GPU=4 (the most any worker offers is GPU=1)" in sim.state.explain(
        "never"
    )
    text = sim.state.explain("queued-2")
    assert "GPU and threads" in text and "busy on every worker that fits it" in text
    assert "1 task(s) like it are ahead of it" in text
    assert "not known" in sim.state.explain("nope")
    sim.finish("run")
    assert sim.state.explain("run") == "task 'run' has finished; its result is held by w1"


# ---------------------------------------------------------------- no_worker_timeout


def test_no_worker_timeout_errs_tasks_no_worker_can_hold() -> None:
    sim = Sim()
    sim.state = ClusterState(SchedulingPolicy(no_worker_timeout=5.0))
    sim.join(1, GPU=1)
    sim(Tick(100.0))
    sim.submit("never", TPU=1)
    sim.submit("fine", GPU=1)
    sim(Tick(104.0))
    assert sim.status("never") == READY
    cmds = sim(Tick(105.5))
    (update,) = updates(cmds, "never")
    assert update.status == "error" and update.error is not None
    assert update.error.kind is ErrorKind.NO_VALID_WORKER
    assert "TPU=1" in update.error.message
    assert sim.status("fine") == PROCESSING


def test_without_no_worker_timeout_tasks_wait_for_a_worker_forever() -> None:
    sim = Sim()
    sim.submit("t", TPU=1)
    sim(Tick(1e6))
    assert sim.status("t") == READY
    cmds = sim.join(1, TPU=1)
    assert [a.key for a in assigns(cmds)] == ["t"]


# -------------------------------------------------------- undeclared resource names


def test_undeclared_resource_name_is_reported_at_submit_even_while_waiting_for_inputs() -> None:
    sim = Sim()
    sim.join(1, GPU=1)
    sim.submit("input")
    cmds = sim.submit("t", deps=("input",), TPUU=1)
    (update,) = updates(cmds, "t")
    assert update.status == "pending"
    assert update.waiting_reason == "task 't': needs TPUU, which no worker seen so far declares"
    cmds = sim.submit("u", deps=("input",), GPU=1)
    assert updates(cmds, "u") == []


def test_no_worker_timeout_still_applies_after_an_unfitting_worker_joins() -> None:
    sim = Sim()
    sim.state = ClusterState(SchedulingPolicy(no_worker_timeout=1.0))
    sim.join(1)
    sim.submit("t", TPU=1)
    sim.join(2, GPU=1)  # clears the cached answer; the task still fits nowhere
    cmds = sim(Tick(2.0))
    assert [u.status for u in updates(cmds, "t")] == ["error"]


def test_a_small_result_travels_inline_to_the_clients_waiting_for_it() -> None:
    from scheduler_service.events import TaskFinished

    sim = Sim()
    sim.join(1)
    sim.submit("t")
    run = sim.run_of("t")
    del sim.runs[run.run_id]
    cmds = sim(TaskFinished(1, "t", run.run_id, 5, (), b"small"))
    (update,) = updates(cmds, "t")
    assert update.status == "finished" and update.inline_result == b"small"
    # A client asking later is pointed at the holder (the scheduler keeps no data).
    cmds = sim(TasksSubmitted("late", (TaskSubmission("t", b"t", {}),)))
    (late,) = updates(cmds, "t")
    assert late.inline_result == b"" and late.addresses == ("10.0.0.1:7000",)


# ------------------------------------------------------------------ ordering


def test_a_later_stage_goes_before_first_stage_tasks_submitted_earlier() -> None:
    """The seed pipeline's shape: loads, then a process of each on the GPU.
    Once a load is done its process goes first, before loads submitted
    earlier; priority still comes before depth."""
    sim = Sim()
    sim.join(1, nthreads=1)
    for i in range(3):
        sim.submit(f"load-{i}")
    for i in range(3):
        sim.submit(f"process-{i}", (f"load-{i}",))
    sim.submit("urgent-load", priority=1)
    assert sim.running_on(1) == ["load-0"]
    [nxt] = assigns(sim.finish("load-0"))
    assert nxt.key == "urgent-load"  # priority first
    [nxt] = assigns(sim.finish("urgent-load"))
    assert nxt.key == "process-0"  # then the deeper task, before load-1
    [nxt] = assigns(sim.finish("process-0"))
    assert nxt.key == "load-1"
    sim.state.validate()
