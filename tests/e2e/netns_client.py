"""The client side of tests/e2e/test_netns_e2e.py, run in the scheduler's
network namespace: ``python -m tests.e2e.netns_client SCENARIO ADDRESS ...``.

It runs as its own process because entering a namespace changes the network
of every thread of a process, grpc's included, so the pytest process stays
where it is. It prints one JSON object per line on stdout (``{"event": ...}``)
and, where the test must act mid-run, waits for a line on stdin.

Scenarios:

``transfer ADDRESS PRODUCER CONSUMER``
    A result made on one worker host and consumed on the other, both ways.
``lose-worker ADDRESS DOOMED``
    Tasks running on both workers; once some run on DOOMED it prints
    ``{"event": "busy"}`` and waits for ``cut`` on stdin (the test takes the
    link down in between), then times how long the scheduler takes to drop
    DOOMED and waits for every result.
"""

from __future__ import annotations

import hashlib
import json
import select
import sys
import time
from typing import Any

import cloudpickle

import tests
from apportion_common.transfer import STRIPE_MIN_BYTES
from client_sdk import Client, Future, get_task_context

# Workers cannot import the test modules: send their functions by value.
cloudpickle.register_pickle_by_value(tests)

#: Large enough to come striped over several connections, in many 1 MiB
#: chunks (far above the size that travels inline).
BLOB_BYTES = STRIPE_MIN_BYTES + 3 * 1024 * 1024 + 123
#: Every wait here is bounded; the test's own bounds are a little longer.
RESULT_TIMEOUT_S = 40.0


def blob(seed: int) -> bytes:
    """Deterministic bytes, so both ends can check them without sending them."""
    return bytes((i * 7 + seed) % 256 for i in range(256)) * (BLOB_BYTES // 256) + bytes(
        BLOB_BYTES % 256
    )


def produce(seed: int) -> tuple[str, bytes]:
    return get_task_context().worker_name, blob(seed)


def consume(made: tuple[str, bytes]) -> dict[str, Any]:
    maker, data = made
    return {
        "maker": maker,
        "consumer": get_task_context().worker_name,
        "nbytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def double_slowly(x: int, seconds: float) -> tuple[int, str]:
    time.sleep(seconds)
    return 2 * x, get_task_context().worker_name


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def results(futures: list[Future], timeout: float) -> list[Any]:
    deadline = time.monotonic() + timeout
    return [f.result(timeout=max(0.1, deadline - time.monotonic())) for f in futures]


def transfer(address: str, producer: str, consumer: str) -> None:
    with Client(address) as client:
        runs = []
        for seed, (a, b) in enumerate([(producer, consumer), (consumer, producer)]):
            made = client.submit(produce, seed, workers=[a])
            used = client.submit(consume, made, workers=[b])
            runs.append((seed, made, used))
        out = []
        for seed, made, used in runs:
            summary = results([used], RESULT_TIMEOUT_S)[0]
            # The client fetches the large result too, from a worker host holding it.
            maker, data = results([made], RESULT_TIMEOUT_S)[0]
            out.append(
                {
                    **summary,
                    "expected_sha256": hashlib.sha256(blob(seed)).hexdigest(),
                    "fetched_ok": maker == summary["maker"] and data == blob(seed),
                }
            )
        emit("done", runs=out)


def lose_worker(address: str, doomed: str) -> None:
    with Client(address) as client:
        # A result that lives only on the doomed host (too large to travel
        # inline): once that host is gone it must be made again.
        early = client.submit(produce, 9, workers=[doomed], allow_other_workers=True)
        maker, data = results([early], RESULT_TIMEOUT_S)[0]
        early_before = {"maker": maker, "ok": data == blob(9)}
        futures = [client.submit(double_slowly, i, 2.0, resources={"slot": 1}) for i in range(6)]

        def running_on_doomed() -> int:
            info = client.scheduler_info()
            return sum(w["running"] for w in info["workers"].values() if w["name"] == doomed)

        deadline = time.monotonic() + 15
        while running_on_doomed() < 2:
            if time.monotonic() > deadline:
                emit("error", message=f"no task started on {doomed} within 15s")
                return
            time.sleep(0.05)
        emit("busy", early=early_before)
        ready, _, _ = select.select([sys.stdin], [], [], 15)
        if not ready or sys.stdin.readline().strip() != "cut":
            emit("error", message="the test did not cut the link within 15s")
            return
        cut_at = time.monotonic()

        def doomed_listed() -> bool:
            info = client.scheduler_info()
            return any(w["name"] == doomed for w in info["workers"].values())

        while doomed_listed():
            if time.monotonic() > cut_at + RESULT_TIMEOUT_S:
                emit("error", message=f"{doomed} still listed {RESULT_TIMEOUT_S}s after the cut")
                return
            time.sleep(0.05)
        lost_after = time.monotonic() - cut_at
        values = results(futures, RESULT_TIMEOUT_S)
        maker, data = results([early], RESULT_TIMEOUT_S)[0]
        emit(
            "done",
            values=[v for v, _ in values],
            ran_on=[w for _, w in values],
            early={"maker": maker, "ok": data == blob(9)},
            lost_after_s=round(lost_after, 2),
            done_after_s=round(time.monotonic() - cut_at, 2),
        )


def main(argv: list[str]) -> None:
    scenario, *args = argv
    if scenario == "transfer":
        transfer(*args)
    elif scenario == "lose-worker":
        lose_worker(*args)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
