"""Clients and keys: a client leaving, releasing or resubmitting keys, two
clients sharing a task, inputs missing on a worker. Driven with plain events
through :class:`Sim` (``validate()`` after every event)."""

from __future__ import annotations

import itertools

import pytest

from apportion_common.locations import InputLocation
from scheduler_service.clients import FORGET
from scheduler_service.commands import CancelRun, ReleaseData
from scheduler_service.events import ClientJoined, ClientLeft, KeysReleased, TasksForgotten
from scheduler_service.state import MEMORY, RELEASED, WAITING
from tests.helpers.scheduler_sim import BOOM, Sim, addr, assigns, updates

# ========================================================== clients, keys


def test_client_leaving_releases_its_tasks() -> None:
    sim = Sim()
    sim.join(1, nthreads=3)
    sim(ClientJoined("c"))
    sim.submit("running")
    sim.submit("done")
    sim.submit("shared")
    sim.submit("shared", client="other")
    sim.submit("queued", deps=("running",))
    running = sim.run_of("running")
    sim.finish("done")
    cmds = sim(ClientLeft("c"))
    assert CancelRun(1, "running", running.run_id) in cmds
    assert ReleaseData(1, "done") in cmds
    assert set(sim.state.tasks) == {"shared"}
    assert "c" not in sim.state.clients
    assert sim.used(1) == {}
    assert sim.state.workers[1].runs.keys() == {running.run_id, sim.run_of("shared").run_id}
    cmds = sim.finish(running)
    assert ReleaseData(1, "running", running.run_id) in cmds
    sim.finish("shared")
    assert updates(sim.log, "shared")[-1].client_id == "other"
    sim.assert_idle()


def test_keys_released_forgets_tasks_and_sends_release_data() -> None:
    sim = Sim()
    sim.join(1)
    sim.submit("a")
    sim.finish("a")
    cmds = sim(KeysReleased("c", ("a",)))
    assert cmds == [ReleaseData(1, "a")]
    assert sim.state.tasks == {}
    assert sim.state.workers[1].has == set()
    assert sim(KeysReleased("c", ("a", "never"))) == []


def test_released_input_is_kept_while_a_dependent_needs_it() -> None:
    sim = Sim()
    sim.join(1)
    sim.submit("a")
    sim.submit("blocker")
    sim.finish("a")
    sim.submit("b", deps=("a",))
    cmds = sim(KeysReleased("c", ("a",)))
    assert cmds == []
    assert sim.status("a") == MEMORY
    sim.finish("blocker")
    cmds = sim.finish("b")
    assert ReleaseData(1, "a") in cmds
    assert set(sim.state.tasks) == {"a", "b", "blocker"}
    assert sim.status("a") == RELEASED
    sim(KeysReleased("c", ("b",)))
    assert set(sim.state.tasks) == {"blocker"}


@pytest.mark.parametrize("order", list(itertools.permutations(["x", "y", "z"])))
def test_releasing_a_waiting_graph_in_any_order(order: tuple[str, ...]) -> None:
    # Bug fixed in the state machine (found by test_state_properties): forgetting z
    # dropped its input y before unlinking z from x, so dropping y looked up
    # x's dependents and found the deleted z (KeyError in _needs_data).
    sim = Sim()
    sim.join(1, GPU=1)
    sim.submit("x", GPU=2)  # never fits: x stays ready, y and z wait
    sim.submit("y", deps=("x",))
    sim.submit("z", deps=("y", "x"))
    sim(KeysReleased("c", order))
    assert sim.state.tasks == {}
    assert sim.state.clients == {"c": set()}


def test_client_leaving_with_a_waiting_graph() -> None:
    sim = Sim()
    sim.join(1, GPU=1)
    sim.submit("x", GPU=2)
    sim.submit("y", deps=("x",))
    sim.submit("z", deps=("y", "x"))
    assert sim(ClientLeft("c")) == []
    assert sim.state.tasks == {}


def test_key_released_by_one_client_stays_for_another() -> None:
    sim = Sim()
    sim.join(1)
    sim.submit("a")
    sim.submit("a", client="other")
    sim.finish("a")
    assert sim(KeysReleased("c", ("a",))) == []
    assert sim.status("a") == MEMORY
    assert sim.state.tasks["a"].wanted_by == {"other"}


def test_missing_inputs_requeue_the_task_and_recompute_the_input() -> None:
    sim = Sim()
    sim.join(1)
    sim.join(2, nthreads=2, G=1)
    sim.submit("a")
    sim.finish("a")
    sim.submit("b", deps=("a",), G=1)
    assert sim.run_of("b").worker_id == 2
    # Worker 1 dropped a (say it restarted) and b could not fetch it.
    cmds = sim.missing("b", ("a", addr(1)))
    assert sim.used(2) == {}
    assert sim.status("b") == WAITING
    (assign,) = assigns(cmds)
    assert assign.key == "a"
    cmds = sim.finish("a")
    (assign,) = assigns(cmds)
    assert assign.key == "b"
    sim.finish("b")
    assert sim.status("b") == MEMORY
    sim.assert_idle()


def test_missing_input_that_lives_elsewhere_too_is_not_recomputed() -> None:
    sim = Sim()
    sim.join(1)
    sim.join(2, H=1)
    sim.join(3, G=1)
    sim.submit("a")
    sim.finish("a")
    sim.submit("x", deps=("a",), H=1)
    sim.finish("x", fetched=(("a", 100),))
    assert sim.state.tasks["a"].who_has == {1, 2}
    sim.submit("b", deps=("a",), G=1)
    cmds = sim.missing("b", ("a", addr(1)))
    # Only worker 1's copy is gone: b is placed again at once, fetching from 2.
    (assign,) = assigns(cmds)
    assert assign.key == "b"
    assert assign.inputs == (InputLocation("a", (addr(2),), 100),)
    assert sim.state.tasks["a"].who_has == {2}
    assert "a" not in sim.state.workers[1].has


def test_submitting_an_existing_key_returns_its_current_status() -> None:
    sim = Sim()
    sim.join(1, nthreads=2)
    sim.submit("a")
    sim.submit("bad")
    (update,) = updates(sim.submit("a", client="c2"))
    assert (update.client_id, update.key, update.status) == ("c2", "a", "pending")
    assert assigns(sim.log).count(sim.run_of("a")) == 1  # not run twice
    sim.finish("a", nbytes=7)
    (update,) = updates(sim.submit("a", client="c3"))
    assert (update.status, update.addresses, update.nbytes) == ("finished", (addr(1),), 7)
    sim.fail("bad")
    (update,) = updates(sim.submit("bad", client="c3"))
    assert (update.status, update.error) == ("error", BOOM)
    assert sim.state.tasks["a"].wanted_by == {"c", "c2", "c3"}


def test_submitting_a_released_key_computes_it_again() -> None:
    sim = Sim()
    sim.join(1)
    sim.submit("a")
    sim.submit("b", deps=("a",))
    sim.finish("a")
    sim.finish("b")
    sim(KeysReleased("c", ("a",)))
    assert sim.status("a") == RELEASED
    cmds = sim.submit("a", client="c2")
    assert [a.key for a in assigns(cmds)] == ["a"]
    assert updates(cmds)[0].status == "pending"


# ====================================================== fire and forget


def test_a_forgotten_task_runs_to_the_end_after_its_client_leaves() -> None:
    sim = Sim()
    sim.join(1, nthreads=1)
    sim(ClientJoined("c"))
    sim.submit("load")
    sim.submit("process", deps=("load",))
    sim.submit("other")
    sim(TasksForgotten("c", ("process",)))
    cmds = sim(ClientLeft("c"))
    assert not [c for c in cmds if isinstance(c, CancelRun)]  # load runs on, for process
    assert set(sim.state.tasks) == {"load", "process"}  # "other" went with the client
    sim.finish("load")
    cmds = sim.finish("process")
    # Done: nobody wants the result, so it goes, and the task with it.
    assert ReleaseData(1, "process") in cmds
    assert sim.state.tasks == {} and sim.state.clients.get(FORGET, set()) == set()
    sim.assert_idle()


def test_a_forgotten_task_that_errs_is_let_go_too() -> None:
    sim = Sim()
    sim.join(1)
    sim.submit("bad")
    sim.submit("after", deps=("bad",))
    sim(TasksForgotten("c", ("bad", "after")))
    sim(ClientLeft("c"))
    sim.fail("bad")
    assert sim.state.tasks == {}
    sim.assert_idle()


def test_forgetting_a_finished_or_unknown_task_keeps_nothing() -> None:
    sim = Sim()
    sim.join(1)
    sim.submit("done")
    sim.finish("done")
    sim(TasksForgotten("c", ("done", "nowhere")))
    assert FORGET not in sim.state.tasks["done"].wanted_by
    sim(ClientLeft("c"))
    assert sim.state.tasks == {}
