"""Where a run's inputs live, as the scheduler tells the worker that runs it:
holders on the worker's own host first, flagged, so the input comes through
shared memory (issue 12)."""

from __future__ import annotations

from tests.helpers.scheduler_sim import Sim, addr


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
