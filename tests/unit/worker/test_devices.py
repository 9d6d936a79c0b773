"""Which GPU each run holds on a worker that knows its devices (GPU=auto):
the device ledger alone, then inside the worker's state machine (validated
after every step by :class:`WorkerSim`)."""

from __future__ import annotations

import random

import pytest

from apportion_common.resources import QUANTA_PER_UNIT, to_quanta
from tests.helpers.worker_sim import WorkerSim, run
from worker_service.devices import DEVICE, DeviceLedger
from worker_service.state import InvariantError, WorkerState


def q(amount: float) -> int:
    return round(amount * QUANTA_PER_UNIT)


# ------------------------------------------------------------- the ledger


def test_whole_leases_get_distinct_devices_in_order() -> None:
    ledger = DeviceLedger(["0", "1", "2"])
    assert ledger.allot(1, "a", q(1)) == ("0",)
    assert ledger.allot(2, "b", q(2)) == ("1", "2")
    assert ledger.allot(3, "c", q(1)) is None  # none free: it waits
    ledger.release(1)
    assert ledger.allot(3, "c", q(1)) == ("0",)
    assert ledger.holders() == {"0": ["c"], "1": ["b"], "2": ["b"]}
    ledger.validate()


def test_fractions_pack_onto_one_device_before_opening_another() -> None:
    ledger = DeviceLedger(["0", "1"])
    assert ledger.allot(1, "a", q(0.5)) == ("1",)  # the last free one: whole leases take "0"
    assert ledger.allot(2, "b", q(0.25)) == ("1",)  # best fit: the fullest that takes it
    assert ledger.allot(3, "c", q(0.25)) == ("1",)  # exactly full now, in fixed point
    assert ledger.used["1"] == DEVICE
    assert ledger.allot(4, "d", q(1)) == ("0",)  # the whole device stayed free
    assert ledger.allot(5, "e", q(0.1)) is None
    ledger.validate()


def test_best_fit_picks_the_fullest_device_that_takes_the_fraction() -> None:
    ledger = DeviceLedger(["0", "1", "2"])
    ledger.allot(1, "a", q(0.7))  # on "2"
    ledger.allot(2, "b", q(0.4))  # does not fit "2": on "1"
    assert ledger.allot(3, "c", q(0.3)) == ("2",)  # fits both; "2" is fuller
    assert ledger.allot(4, "d", q(0.5)) == ("1",)
    assert ledger.allot(5, "e", q(1)) == ("0",)
    ledger.validate()


def test_a_lease_of_one_and_a_half_takes_a_whole_device_and_half_another() -> None:
    ledger = DeviceLedger(["0", "1"])
    assert ledger.allot(1, "a", q(1.5)) == ("0", "1")
    assert ledger.used == {"0": DEVICE, "1": DEVICE // 2}
    assert ledger.allot(2, "b", q(0.5)) == ("1",)
    assert ledger.allot(3, "c", q(0.5)) is None
    ledger.validate()


def test_room_spread_over_devices_is_not_one_device() -> None:
    """0.6 on each of two devices: 0.8 is free by the amounts, on no device."""
    ledger = DeviceLedger(["0", "1"])
    ledger.allot(1, "a", q(0.6))
    ledger.allot(2, "b", q(0.6))
    assert ledger.held[1][1].keys() != ledger.held[2][1].keys()
    assert not ledger.fits(q(0.8))
    assert ledger.allot(3, "c", q(0.8)) is None
    ledger.release(1)
    assert ledger.fits(q(0.8))


def test_no_gpu_and_more_than_there_are_get_no_devices() -> None:
    ledger = DeviceLedger(["0"])
    assert ledger.allot(1, "a", 0) == ()
    assert ledger.allot(2, "b", q(2)) == ()  # the operator raised GPU past the devices
    assert ledger.held == {}
    ledger.release(3)  # never held: nothing to give back
    ledger.validate()


def test_validate_names_a_device_whose_books_are_off() -> None:
    ledger = DeviceLedger(["0", "1"])
    ledger.allot(1, "a", q(1))
    ledger.used["0"] -= 1
    with pytest.raises(AssertionError, match="device 0"):
        ledger.validate()


@pytest.mark.parametrize("seed", range(20))
def test_random_leases_never_share_a_whole_device_and_return_to_zero(seed: int) -> None:
    rng = random.Random(seed)
    ledger = DeviceLedger([str(i) for i in range(4)])
    amounts = [0.1, 0.25, 0.3, 0.5, 0.6, 1, 1.5, 2]
    live: list[int] = []
    for run_id in range(1, 400):
        if live and rng.random() < 0.45:
            ledger.release(live.pop(rng.randrange(len(live))))
        else:
            amount = q(rng.choice(amounts))
            if ledger.allot(run_id, f"k{run_id}", amount) is not None:
                live.append(run_id)
        ledger.validate()
        for _, chosen in ledger.held.values():
            for device, quanta in chosen.items():
                if quanta == DEVICE:
                    assert ledger.used[device] == DEVICE  # nobody else on it
    for run_id in live:
        ledger.release(run_id)
    assert set(ledger.used.values()) == {0}
    assert ledger.held == {}


# ------------------------------------------------------ the state machine


def test_concurrent_runs_on_a_two_gpu_worker_get_distinct_devices() -> None:
    sim = WorkerSim(nthreads=4, gpus=("0", "1"), GPU=2)
    assert sim.assign("a", queued=False, GPU=1) == ["a"]
    assert sim.assign("b", queued=False, GPU=1) == ["b"]
    assert {sim.gpus("a"), sim.gpus("b")} == {("0",), ("1",)}
    assert sim.assign("c", GPU=1) == []  # queued: no GPU free
    assert sim.end("a") == ["c"]
    assert sim.gpus("c") == sim.assignments["a"].gpus
    assert sim.assign("cpu", queued=False) == ["cpu"]
    assert sim.gpus("cpu") == ()


def test_a_run_that_fits_the_amounts_but_no_device_waits_holding_its_lease() -> None:
    sim = WorkerSim(nthreads=4, gpus=("0", "1"), GPU=2)
    sim.assign("a", queued=False, GPU=0.6)
    sim.assign("b", queued=False, GPU=0.6)
    assert sim.assign("c", queued=False, GPU=0.8) == []  # the scheduler saw 0.8 free
    state = sim.state
    assert [a.key for a in state.device_waiting] == ["c"]
    assert state.ledger.free["GPU"] == 0  # its lease is held meanwhile
    assert not state.started_waiting  # assigned to run, not queued: nothing to report
    ended = sim.end_run("a")
    assert [a.key for a in ended.started] == ["c"]
    assert sim.gpus("c") == sim.assignments["a"].gpus


def test_a_queued_run_that_takes_its_lease_but_waits_for_a_device_is_reported_started() -> None:
    sim = WorkerSim(nthreads=4, gpus=("0", "1"), GPU=2)
    sim.assign("a", queued=False, GPU=0.6)
    sim.assign("b", queued=False, GPU=0.6)
    assert sim.assign("c", GPU=0.8) == []
    assert [a.key for a in sim.state.started_waiting] == ["c"]
    assert sim.queued() == []


def test_dropping_the_queue_gives_back_the_leases_of_runs_waiting_for_a_device() -> None:
    sim = WorkerSim(nthreads=4, gpus=("0", "1"), GPU=2)
    sim.assign("a", queued=False, GPU=0.6)
    sim.assign("b", queued=False, GPU=0.6)
    sim.assign("c", queued=False, GPU=0.8)
    dropped = sim.state.drop_queue()
    assert [a.key for a in dropped] == ["c"]
    sim.state.validate()
    sim.end("a")
    sim.end("b")
    assert sim.state.ledger.free == to_quanta({"GPU": 2})
    assert set(sim.state.devices.used.values()) == {0}  # type: ignore[union-attr]


def test_without_known_devices_gpu_is_just_a_number() -> None:
    sim = WorkerSim(nthreads=4, GPU=2)
    assert sim.assign("a", queued=False, GPU=0.6) == ["a"]
    assert sim.assign("b", queued=False, GPU=0.6) == ["b"]
    assert sim.assign("c", queued=False, GPU=0.8) == ["c"]
    assert sim.gpus("c") == ()
    assert sim.state.devices is None


def test_validate_catches_a_run_waiting_for_a_device_that_is_free() -> None:
    state = WorkerState(to_quanta({"GPU": 2}), 2, ("0", "1"))
    a = run("a", 1, queued=False, GPU=1)
    state.ledger.acquire(1, a.need)
    state.running.add(1)
    state.device_waiting.append(a)  # as a bug would leave it
    with pytest.raises(InvariantError, match="waits for a device that is free"):
        state.validate()
