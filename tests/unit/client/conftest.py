"""Every client test here runs twice: on a synchronous Client (its loop in a
thread of its own) and on an asynchronous one (on the test's loop), both
over a :class:`~tests.helpers.stub_transport.StubTransport`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from client_sdk import Client
from tests.helpers.stub_transport import ADDRESS, StubTransport, resolve


@dataclass
class Harness:
    client: Client[Any]
    stub: StubTransport

    @property
    def asynchronous(self) -> bool:
        return self.client.asynchronous


async def connect(stub: StubTransport, mode: str, **options: Any) -> Client[Any]:
    if mode == "sync":
        return Client(ADDRESS, _transport=stub, **options)
    return await Client(ADDRESS, asynchronous=True, _transport=stub, **options)


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    mode: str = request.param
    return mode


@pytest.fixture
async def h(mode: str) -> AsyncIterator[Harness]:
    stub = StubTransport()
    client = await connect(stub, mode)
    try:
        yield Harness(client, stub)
    finally:
        await resolve(client.close())
