"""``pick_worker`` and ``infeasibility_reason`` over plain objects."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from apportion_common.resources import Quanta, to_quanta
from scheduler_service.placement import fits, infeasibility_reason, pick_worker


@dataclass
class W:
    worker_id: int
    nthreads: int = 1
    free_slots: int = 1
    free: Quanta = field(default_factory=dict)


def q(**amounts: float) -> Quanta:
    return to_quanta(amounts)


# ---------------------------------------------------------------- fits


def test_fits_compares_every_needed_amount() -> None:
    assert fits({}, {})
    assert fits(q(A=1), q(A=1, B=5))
    assert not fits(q(A=1), q(B=5))
    assert not fits(q(A=1, B=1), q(A=1, B=0.5))
    assert fits(q(A=0.1) | q(B=0.2), q(A=0.1, B=0.2))
    assert fits(q(GPU=2), q(GPU=2))
    assert not fits(q(GPU=2), q(GPU=1.999999999))


# --------------------------------------------------------- pick_worker


def test_filters_on_free_resources() -> None:
    workers = [W(1, free=q(A=0.5)), W(2, free=q(B=3)), W(3, free=q(A=1))]
    assert pick_worker(q(A=1), workers) is workers[2]
    assert pick_worker(q(A=2), workers) is None
    assert pick_worker(q(C=1), workers) is None


def test_filters_on_free_threads() -> None:
    workers = [W(1, nthreads=4, free_slots=0, free=q(A=9)), W(2, free_slots=1, free=q(A=1))]
    assert pick_worker(q(A=1), workers) is workers[1]
    assert pick_worker(q(A=1), workers[:1]) is None
    assert pick_worker({}, [W(1, free_slots=0)]) is None


def test_task_without_needs_fits_any_worker_with_a_thread() -> None:
    workers = [W(5, free=q(GPU=1))]
    assert pick_worker({}, workers) is workers[0]


def test_prefers_input_bytes_over_load_and_id() -> None:
    workers = [
        W(1, nthreads=4, free_slots=4),
        W(2, nthreads=4, free_slots=1),
        W(3, nthreads=4, free_slots=1),
    ]
    assert pick_worker({}, workers, {2: 100, 3: 200}) is workers[2]
    assert pick_worker({}, workers, {2: 200, 3: 200}) is workers[1]
    assert pick_worker({}, workers, {}) is workers[0]
    assert pick_worker({}, workers, None) is workers[0]


def test_input_bytes_on_a_worker_that_does_not_fit_do_not_count() -> None:
    workers = [W(1, free=q(A=1)), W(2, free=q(B=1))]
    assert pick_worker(q(A=1), workers, {2: 10**9}) is workers[0]


def test_prefers_the_least_busy_by_fraction_of_threads() -> None:
    # 1 of 4 threads busy (25%) beats 1 of 2 (50%) though fewer are free.
    workers = [W(1, nthreads=2, free_slots=1), W(2, nthreads=4, free_slots=3)]
    assert pick_worker({}, workers) is workers[1]
    workers = [W(1, nthreads=8, free_slots=2), W(2, nthreads=2, free_slots=1)]
    assert pick_worker({}, workers) is workers[1]


def test_ties_go_to_the_lowest_worker_id_whatever_the_order() -> None:
    workers = [W(7), W(3), W(5)]
    assert pick_worker({}, workers) is workers[1]
    assert pick_worker({}, list(reversed(workers))) is workers[1]


def test_more_free_resource_is_no_preference() -> None:
    # Placement does not pack or spread by resource amount, only by load.
    workers = [W(1, free=q(A=1)), W(2, free=q(A=100))]
    assert pick_worker(q(A=1), workers) is workers[0]


def _key(w: W, input_bytes: dict[int, int]) -> tuple[int, float, int]:
    return (-input_bytes.get(w.worker_id, 0), (w.nthreads - w.free_slots) / w.nthreads, w.worker_id)


NAMES = ("A", "B", "GPU")
amounts = st.integers(0, 4).map(lambda n: n * 250_000_000)  # 0, 0.25, ..., 1
quanta = st.dictionaries(st.sampled_from(NAMES), amounts).map(
    lambda d: {k: v for k, v in d.items() if v}
)


@st.composite
def worker_lists(draw: st.DrawFn) -> list[W]:
    ids = draw(st.lists(st.integers(1, 50), unique=True, max_size=8))
    out = []
    for worker_id in ids:
        nthreads = draw(st.integers(1, 4))
        out.append(
            W(worker_id, nthreads, draw(st.integers(0, nthreads)), draw(quanta)),
        )
    return out


@settings(max_examples=300, deadline=None)
@given(
    need=quanta,
    workers=worker_lists(),
    input_bytes=st.dictionaries(st.integers(1, 50), st.integers(0, 1000), max_size=6),
)
def test_chosen_worker_fits_and_none_is_strictly_better(
    need: Quanta, workers: list[W], input_bytes: dict[int, int]
) -> None:
    chosen = pick_worker(need, workers, input_bytes)
    fitting = [
        w
        for w in workers
        if w.free_slots > 0 and all(w.free.get(n, 0) >= a for n, a in need.items())
    ]
    if not fitting:
        assert chosen is None
        return
    assert isinstance(chosen, W)
    assert chosen in fitting
    assert chosen.free_slots > 0
    for name, amount in need.items():
        assert chosen.free.get(name, 0) >= amount
    best = min(_key(w, input_bytes) for w in fitting)
    assert _key(chosen, input_bytes) == best
    # Deterministic: the order the workers come in does not matter.
    assert pick_worker(need, list(reversed(workers)), input_bytes) is chosen


# ------------------------------------------------- infeasibility_reason


def test_feasible_need_has_no_reason() -> None:
    assert infeasibility_reason(q(A=1), [q(B=1), q(A=2)]) is None
    assert infeasibility_reason({}, [{}]) is None


def test_reason_without_workers() -> None:
    assert infeasibility_reason(q(A=1), []) == (
        "no workers are connected; it needs A=1 (the most any worker offers is A=0)"
    )
    assert infeasibility_reason({}, []) == "no workers are connected"


def test_reason_names_the_resource_and_the_most_offered() -> None:
    reason = infeasibility_reason(q(GPU=2, A=1), [q(GPU=1.5, A=1), q(GPU=0.5)])
    assert reason == "no worker offers GPU=2 (the most any worker offers is GPU=1.5)"
    reason = infeasibility_reason(q(GPU=1, B=3), [q(A=1)])
    assert reason == (
        "no worker offers B=3 (the most any worker offers is B=0); "
        "GPU=1 (the most any worker offers is GPU=0)"
    )


def test_reason_when_no_single_worker_has_both() -> None:
    reason = infeasibility_reason(q(A=1, B=0.5), [q(A=1), q(B=1)])
    assert reason == "no single worker offers A=1 B=0.5 together"
