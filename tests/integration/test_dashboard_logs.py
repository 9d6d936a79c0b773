"""The dashboard's log pages, in process on 127.0.0.1: the scheduler's lines
and a real worker's, asked of it with the scheduler's own secret while
clients and workers hold separate tokens; who may read them; an unknown
worker, a bad ``?n=``, a worker that does not answer and one that is gone."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from apportion_common.logring import LogRing
from apportion_common.security import Authorizer, ServerSecurity
from scheduler_service import SchedulerServer
from scheduler_service.events import WorkerJoined, WorkerLeft
from worker_service.worker import Worker

CLIENT_TOKEN = "logs-client-token"
WORKER_TOKEN = "logs-worker-token"
AS_CLIENT = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
MARKER = "<b>marker</b> & more"
ESCAPED = "&lt;b&gt;marker&lt;/b&gt; &amp; more"


@pytest.fixture
def root_ring() -> Iterator[LogRing]:
    """A ring on the root logger: the in-process worker's GetLogs answers from it."""
    ring = LogRing(100)
    root = logging.getLogger()
    root.addHandler(ring)
    try:
        yield ring
    finally:
        root.removeHandler(ring)


@pytest.fixture
async def cluster(root_ring: LogRing) -> AsyncIterator[tuple[SchedulerServer, Worker]]:
    """A scheduler whose clients and workers need different tokens, with one worker."""
    security = ServerSecurity(Authorizer.for_tokens(worker=WORKER_TOKEN, client=CLIENT_TOKEN))
    server = SchedulerServer(
        "127.0.0.1", 0, validate=True, security=security, dashboard_address="127.0.0.1:0"
    )
    await server.start()
    worker = Worker(server.address, host="127.0.0.1", token=WORKER_TOKEN, name="alpha")
    try:
        await worker.start()
        await worker.wait_registered(10)
        yield server, worker
    finally:
        await worker.close()
        await server.stop(0)


def _url(server: SchedulerServer, path: str) -> str:
    assert server.dashboard is not None
    return server.dashboard.url.rstrip("/") + path


async def _get(
    server: SchedulerServer, path: str, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(_url(server, path), headers=AS_CLIENT if headers is None else headers) as reply,
    ):
        return reply.status, await reply.text()


async def _json(server: SchedulerServer, path: str) -> tuple[int, dict[str, object]]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(_url(server, path), headers=AS_CLIENT) as reply,
    ):
        return reply.status, await reply.json()


async def test_a_worker_s_page_shows_its_lines_escaped(
    cluster: tuple[SchedulerServer, Worker],
) -> None:
    server, worker = cluster
    assert server.dashboard is not None
    logging.getLogger("mytask").warning(MARKER)
    (row,) = server.dashboard.feed.build()["workers"]
    assert row["logs"] == f"/logs/worker/{worker.worker_id}"

    status, page = await _get(server, row["logs"])
    assert status == 200
    assert f"logs of worker alpha ({worker.address})" in page
    # The line as the ring keeps it (time, level, logger, message), escaped, marked as a warning.
    line = rf'<span class="WARNING">[0-9-]+ [0-9:,]+ WARNING mytask: {ESCAPED}</span>'
    assert re.search(line, page), page
    assert MARKER not in page  # no markup of the lines reaches the page

    status, body = await _json(server, "/api/v1/logs/worker/alpha?n=1")  # by name
    assert status == 200
    assert body["worker"] == {"id": worker.worker_id, "name": "alpha", "address": worker.address}
    assert body["n"] == 1
    ((level, text),) = body["lines"]
    assert level == "WARNING" and text.endswith(f"mytask: {MARKER}")
    status, by_address = await _json(server, f"/api/v1/logs/worker/{worker.address}?n=1")
    assert (status, by_address["lines"]) == (200, body["lines"])


async def test_log_pages_need_the_client_token(cluster: tuple[SchedulerServer, Worker]) -> None:
    server, worker = cluster
    paths = [
        "/logs/scheduler",
        f"/logs/worker/{worker.worker_id}",
        "/api/v1/logs/scheduler",
        f"/api/v1/logs/worker/{worker.worker_id}",
    ]
    for path in paths:
        for headers in ({}, {"Authorization": f"Bearer {WORKER_TOKEN}"}):
            status, text = await _get(server, path, headers)
            assert status == 401, (path, headers)
            assert "Authorization: Bearer TOKEN" in text  # the 401 of every guarded path
        status, _ = await _get(server, path)
        assert status == 200, path


async def test_the_scheduler_s_page_shows_its_newest_lines(
    cluster: tuple[SchedulerServer, Worker],
) -> None:
    server, _ = cluster
    ring = LogRing(10)
    for text in ("line-one", "line-two", "<script>alert(1)</script>"):
        ring.emit(logging.makeLogRecord({"msg": text, "levelname": "ERROR", "name": "s"}))
    server.servicer.log_ring = ring
    status, page = await _get(server, "/logs/scheduler?n=2")
    assert status == 200
    assert f"logs of the scheduler {server.address}" in page
    assert "line-one" not in page and "line-two" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>" not in page
    status, body = await _json(server, "/api/v1/logs/scheduler")
    assert (status, body["scheduler"], body["n"]) == (200, server.address, 1000)
    assert [level for level, _ in body["lines"]] == ["ERROR"] * 3


async def test_an_unknown_worker_or_a_bad_n_is_named(
    cluster: tuple[SchedulerServer, Worker],
) -> None:
    server, worker = cluster
    status, page = await _get(server, "/logs/worker/nobody")
    assert status == 404 and "no worker &#x27;nobody&#x27; is connected" in page
    status, body = await _json(server, "/api/v1/logs/worker/nobody")
    assert status == 404 and "no worker 'nobody' is connected" in str(body["error"])
    for bad in ("-1", "x", "1.5"):
        status, body = await _json(server, f"/api/v1/logs/worker/{worker.worker_id}?n={bad}")
        assert status == 400 and body["error"] == f"n must be a whole number >= 0, not {bad!r}"
        status, body = await _json(server, f"/api/v1/logs/scheduler?n={bad}")
        assert status == 400 and bad in str(body["error"])


async def test_a_worker_that_does_not_answer_gets_a_page_that_says_so(
    cluster: tuple[SchedulerServer, Worker],
) -> None:
    server, _ = cluster
    assert server.dashboard is not None
    server.dashboard.worker_logs_timeout = 1.0
    # A port that takes connections and never speaks: a frozen worker.
    with socket.create_server(("127.0.0.1", 0)) as mute:
        address = f"127.0.0.1:{mute.getsockname()[1]}"
        server.servicer.dispatch(WorkerJoined(90, "mute", address, 1, {}))
        try:
            asking = asyncio.create_task(_get(server, "/logs/worker/mute"))
            await asyncio.sleep(0.2)
            # Meanwhile the scheduler serves as ever.
            status, _ = await _get(server, "/api/v1/state")
            assert status == 200 and not asking.done()
            status, page = await asyncio.wait_for(asking, 10)
            assert status == 504
            assert f"worker mute ({address}) gave no logs: no answer within 1 s" in page
        finally:
            server.servicer.dispatch(WorkerLeft(90))
    # A worker whose port is closed: refused at once.
    with socket.create_server(("127.0.0.1", 0)) as closed:
        address = f"127.0.0.1:{closed.getsockname()[1]}"
    server.servicer.dispatch(WorkerJoined(91, "gone", address, 1, {}))
    try:
        status, body = await _json(server, "/api/v1/logs/worker/gone")
        assert status == 502 and "UNAVAILABLE" in str(body["error"])
        assert str(body["error"]).startswith(f"worker gone ({address}) gave no logs")
    finally:
        server.servicer.dispatch(WorkerLeft(91))
