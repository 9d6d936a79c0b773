"""The worker's own books: leases taken and given back exactly once."""

from __future__ import annotations

import pytest

from apportion_common.resources import to_quanta
from worker_service.ledger import Ledger, OverCommitted


def test_the_ledger_says_when_a_run_fits() -> None:
    ledger = Ledger(to_quanta({"GPU": 1}), nthreads=2)
    gpu = to_quanta({"GPU": 1})
    assert ledger.fits(gpu) and ledger.could_ever_fit(gpu)
    ledger.acquire(1, gpu)
    assert not ledger.fits(gpu) and ledger.fits({})
    assert not ledger.could_ever_fit(to_quanta({"GPU": 2}))
    ledger.acquire(2, {})
    assert not ledger.fits({})  # no thread left
    ledger.release(1)
    assert ledger.fits(gpu)
    ledger.validate()


def test_a_lease_that_does_not_fit_is_refused_and_changes_nothing() -> None:
    ledger = Ledger(to_quanta({"GPU": 1, "MEMORY": 10}), nthreads=4)
    ledger.acquire(1, to_quanta({"GPU": 1}))
    with pytest.raises(OverCommitted, match="GPU"):
        ledger.acquire(2, to_quanta({"MEMORY": 5, "GPU": 1}))
    assert ledger.free == {"GPU": 0, **to_quanta({"MEMORY": 10})}
    with pytest.raises(OverCommitted, match="already holds"):
        ledger.acquire(1, {})
    ledger.validate()


def test_a_double_release_is_an_error() -> None:
    ledger = Ledger({}, nthreads=1)
    ledger.acquire(1, {})
    ledger.release(1)
    with pytest.raises(KeyError):
        ledger.release(1)


def test_lowering_a_declaration_below_what_is_held_lets_it_go_negative_until_runs_end() -> None:
    ledger = Ledger(to_quanta({"GPU": 2}), nthreads=2)
    ledger.acquire(1, to_quanta({"GPU": 2}))
    ledger.declare(to_quanta({"GPU": 1}))
    assert ledger.free == to_quanta({"GPU": -1})
    assert not ledger.fits(to_quanta({"GPU": 0.5}))
    ledger.validate()
    ledger.release(1)
    assert ledger.free == to_quanta({"GPU": 1})
    ledger.validate()
