"""Copies of inputs that a worker fetched from a peer are the scheduler's to
release, whatever became of the run that fetched them: a run that failed or
was cancelled leaves no copy behind that the scheduler does not know of (it
would stay in the worker's memory for good), and a copy the scheduler counts
is never dropped behind its back (a peer would be sent to a holder without
it)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from client_sdk import Client
from scheduler_service import SchedulerServer
from tests.helpers.processes import until
from worker_service.worker import Worker

INPUT_BYTES = 1_000_000


def make() -> bytes:
    return b"k" * INPUT_BYTES


def refuse(value: bytes) -> None:
    raise ValueError(f"refused {len(value)} bytes")


@contextlib.asynccontextmanager
async def maker_and_taker(address: str) -> AsyncIterator[tuple[Worker, Worker, Client[Any]]]:
    """Two workers, "maker" and "taker", and an asynchronous client."""
    async with (
        Worker(address, name="maker", validate=True) as maker,
        Worker(address, name="taker", validate=True) as taker,
    ):
        await maker.wait_registered(10)
        await taker.wait_registered(10)
        async with Client(address, asynchronous=True) as client:
            yield maker, taker, client


async def test_a_failed_task_s_fetched_input_goes_with_its_key(
    scheduler_server: SchedulerServer,
) -> None:
    async with maker_and_taker(scheduler_server.address) as (maker, taker, client):
        made = await client.submit(make, workers=["maker"])
        refused = await client.submit(refuse, made, workers=["taker"])
        with pytest.raises(ValueError, match=f"refused {INPUT_BYTES} bytes"):
            await refused.result()
        key = made.key
        assert key in taker.store  # fetched for the run that failed
        del made, refused
        await until(
            lambda: key not in taker.store and key not in maker.store,
            "both copies to go with the key",
            10,
        )


def hold(value: bytes, seconds: float) -> int:
    time.sleep(seconds)
    return len(value)


async def test_a_cancelled_task_s_fetched_input_goes_with_its_key(
    scheduler_server: SchedulerServer,
) -> None:
    async with maker_and_taker(scheduler_server.address) as (maker, taker, client):
        made = await client.submit(make, workers=["maker"])
        held = await client.submit(hold, made, 0.5, workers=["taker"])
        key = made.key
        await until(lambda: key in taker.store, "the taker to fetch the input", 10)
        await held.cancel()
        assert held.status == "cancelled"
        await until(lambda: not taker.state.running, "the cancelled run to end", 10)
        assert await made.result() == make()  # the key itself lives on
        del made, held
        await until(
            lambda: key not in taker.store and key not in maker.store,
            "both copies to go with the key",
            10,
        )
