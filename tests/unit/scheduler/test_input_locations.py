"""Where a run's inputs live, as the scheduler tells the worker that runs it:
holders on the worker's own host first, flagged, so the input comes through
shared memory (issue 12)."""

from __future__ import annotations

from scheduler_service.commands import Command, TellHostPeers
from scheduler_service.events import WorkerLeft
from tests.helpers.scheduler_sim import Sim, addr, assigns, updates


def held_twice(sim: Sim) -> None:
    """x made on worker 1, fetched by worker 2 (so both hold it)."""
    sim.submit("x", A=1)
    sim.finish("x", nbytes=10**8)
    sim.submit("y", ("x",), B=1)
    sim.finish("y", fetched=(("x", 10**8),))


def test_holders_on_the_same_host_come_first_and_are_flagged() -> None:
    sim = Sim()
    sim.join(1, host_id="h2", A=1)
    sim.join(2, host_id="h1", B=1)
    sim.join(3, host_id="h1", C=1)
    held_twice(sim)
    sim.submit("z", ("x",), C=1)
    (location,) = sim.run_of("z").inputs
    assert location.addresses == (addr(2), addr(1))
    assert location.same_host == (True, False)
    assert location.nbytes == 10**8


def test_a_worker_that_offers_no_host_id_shares_with_nobody() -> None:
    sim = Sim()
    sim.join(1, host_id="", A=1)
    sim.join(2, host_id="", B=1)
    sim.join(3, host_id="", C=1)
    held_twice(sim)
    sim.submit("z", ("x",), C=1)
    (location,) = sim.run_of("z").inputs
    assert location.addresses == (addr(1), addr(2)) and location.same_host == ()


def test_an_empty_host_id_never_matches_another_empty_one() -> None:
    sim = Sim()
    sim.join(1, host_id="", A=1)
    sim.join(2, host_id="h1", B=1)
    sim.submit("x", A=1)
    sim.finish("x")
    sim.submit("z", ("x",), B=1)
    assert sim.run_of("z").inputs[0].same_host == (False,)
    sim.finish("z")
    sim.assert_idle()


def peers_told(cmds: list[Command]) -> dict[int, int]:
    return {c.worker_id: c.count for c in cmds if isinstance(c, TellHostPeers)}


def test_workers_hear_how_many_others_share_their_host_as_they_come_and_go() -> None:
    sim = Sim()
    assert peers_told(sim.join(1, host_id="h1", A=1)) == {1: 0}
    assert peers_told(sim.join(2, host_id="h2", A=1)) == {2: 0}
    assert peers_told(sim.join(3, host_id="h1", A=1)) == {1: 1, 3: 1}
    assert peers_told(sim.join(4, host_id="", A=1)) == {}  # no shared memory: not told
    assert peers_told(sim(WorkerLeft(1))) == {3: 0}
    assert peers_told(sim(WorkerLeft(4))) == {}
    assert sim.state.books.on_host("h1") == {3}


def test_clients_hear_the_remaining_holders_when_one_goes() -> None:
    # bench-chaos: a client that knew only the holder that died asked it in
    # vain forever; the scheduler had the copy elsewhere and said nothing.
    sim = Sim()
    sim.join(1, host_id="h1", A=1)
    sim.join(2, host_id="h1", B=1)
    held_twice(sim)
    cmds = sim(WorkerLeft(1))
    (told,) = [u for u in updates(cmds, "x")]
    assert told.status == "finished" and told.addresses == (addr(2),)
    assert assigns(cmds) == []  # nothing made again
