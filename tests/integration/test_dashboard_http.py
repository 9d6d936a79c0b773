"""The scheduler's HTTP port, in process on 127.0.0.1: who may read what, the
state as JSON, the live feed, a taken port, HTTPS with the TLS files."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import trustme

from apportion_common.resources import to_quanta
from apportion_common.security import TLS, Authorizer, ServerSecurity
from client_sdk.info import cluster_info
from scheduler_service import SchedulerServer, wire
from scheduler_service.dashboard.server import COOKIE, exposure_warning
from scheduler_service.events import WorkerJoined, WorkerLeft

TOKEN = "dash-board_token"
GUARDED = ("/", "/static/dashboard.js", "/api/v1/state", "/metrics", "/api/v1/stream")


@pytest.fixture
async def guarded() -> AsyncIterator[SchedulerServer]:
    """A scheduler whose clients need TOKEN (its workers need none)."""
    security = ServerSecurity(Authorizer.for_tokens(worker=None, client=TOKEN))
    server = SchedulerServer(
        "127.0.0.1", 0, validate=True, security=security, dashboard_address="127.0.0.1:0"
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0)


def _url(server: SchedulerServer, path: str) -> str:
    assert server.dashboard is not None
    return server.dashboard.url.rstrip("/") + path


async def test_every_path_but_health_needs_the_client_token(guarded: SchedulerServer) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(_url(guarded, "/health")) as reply:
            assert (reply.status, await reply.text()) == (200, "ok")
        for path in GUARDED:
            async with http.get(_url(guarded, path)) as reply:
                assert reply.status == 401, path
                assert "Authorization: Bearer TOKEN" in await reply.text()
            bad = {"Authorization": "Bearer not-it"}
            async with http.get(_url(guarded, path), headers=bad) as reply:
                assert reply.status == 401, path
        good = {"Authorization": f"Bearer {TOKEN}"}
        for path in GUARDED[:-1]:
            async with http.get(_url(guarded, path), headers=good) as reply:
                assert reply.status == 200, path
                assert reply.headers["X-Frame-Options"] == "DENY"


async def test_a_browser_logs_in_once_and_keeps_an_httponly_cookie(
    guarded: SchedulerServer,
) -> None:
    jar = aiohttp.CookieJar(unsafe=True)  # unsafe: cookies for an IP address
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        async with http.get(_url(guarded, "/?token=wrong"), allow_redirects=False) as reply:
            assert reply.status == 401
        assert len(jar) == 0
        url = _url(guarded, f"/?token={TOKEN}")
        async with http.get(url, allow_redirects=False) as reply:
            assert reply.status == 302 and reply.headers["Location"] == "/"
            set_cookie = reply.headers["Set-Cookie"]
        assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie
        assert TOKEN not in set_cookie  # a value of this process, not the secret
        assert [c.key for c in jar] == [COOKIE]
        for path in ("/", "/metrics", "/api/v1/state"):
            async with http.get(_url(guarded, path)) as reply:
                assert reply.status == 200, path
    async with aiohttp.ClientSession() as stranger:
        forged = {"Cookie": f"{COOKIE}=guess"}
        async with stranger.get(_url(guarded, "/metrics"), headers=forged) as reply:
            assert reply.status == 401


async def test_the_state_is_what_scheduler_info_returns(guarded: SchedulerServer) -> None:
    servicer = guarded.servicer
    servicer.dispatch(WorkerJoined(7, "w7", "127.0.0.1:7007", 2, to_quanta({"GPU": 2})))
    try:
        good = {"Authorization": f"Bearer {TOKEN}"}
        async with (
            aiohttp.ClientSession() as http,
            http.get(_url(guarded, "/api/v1/state"), headers=good) as reply,
        ):
            state = await reply.json()
        reply_pb = wire.cluster_state_to_pb(
            guarded.address, servicer.state.snapshot(), servicer.dashboard_address
        )
        assert state == json.loads(json.dumps(cluster_info(reply_pb)))
        assert state["dashboard_address"] == guarded.dashboard.address  # type: ignore[union-attr]
        assert state["workers"]["127.0.0.1:7007"]["resources"] == {"GPU": 2.0}
    finally:
        servicer.dispatch(WorkerLeft(7))


async def test_the_feed_builds_only_while_someone_listens(guarded: SchedulerServer) -> None:
    assert guarded.dashboard is not None
    feed = guarded.dashboard.feed
    good = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        aiohttp.ClientSession() as http,
        http.get(_url(guarded, "/api/v1/stream"), headers=good) as reply,
    ):
        assert reply.headers["Content-Type"] == "text/event-stream"
        line = await asyncio.wait_for(reply.content.readline(), 5)
        snapshot = json.loads(line.removeprefix(b"data: "))
        assert set(snapshot) >= {"workers", "waiting", "progress", "stream", "prefixes"}
        assert feed.listeners == 1
    for _ in range(100):
        if feed.listeners == 0:
            break
        await asyncio.sleep(0.05)
    assert feed.listeners == 0


async def test_a_taken_port_is_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        server = SchedulerServer("127.0.0.1", 0, dashboard_address=f"127.0.0.1:{port}")
        with caplog.at_level(logging.WARNING, "scheduler_service"):
            await server.start()
        try:
            assert server.dashboard is not None
            assert server.dashboard.port not in (0, port)
            assert server.servicer.dashboard_address == server.dashboard.address
            assert any(
                f"127.0.0.1:{port} is not free" in r.getMessage()
                and server.dashboard.address in r.getMessage()
                for r in caplog.records
            )
            async with aiohttp.ClientSession() as http, http.get(_url(server, "/")) as reply:
                assert reply.status == 200  # no token on this one: open
        finally:
            await server.stop(0)


async def test_with_tls_files_the_dashboard_serves_https(tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    paths = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    for i, blob in enumerate(leaf.cert_chain_pems):
        blob.write_to_path(str(paths["cert"]), append=i > 0)
    leaf.private_key_pem.write_to_path(str(paths["key"]))
    tls = TLS(ca=paths["ca"], cert=paths["cert"], key=paths["key"])
    server = SchedulerServer(
        "127.0.0.1", 0, security=ServerSecurity(tls=tls), dashboard_address="127.0.0.1:0"
    )
    await server.start()
    try:
        assert server.dashboard is not None and server.dashboard.url.startswith("https://")
        # A browser has no client certificate: only the CA to trust the server.
        trust = ssl.create_default_context(cafile=str(paths["ca"]))
        async with aiohttp.ClientSession() as http:
            async with http.get(_url(server, "/metrics"), ssl=trust) as reply:
                assert reply.status == 200
                assert "apportion_workers 0.0" in await reply.text()
            plain = _url(server, "/health").replace("https://", "http://")
            with pytest.raises(aiohttp.ClientError):
                async with http.get(plain) as reply:
                    await reply.read()
    finally:
        await server.stop(0)


def test_an_open_dashboard_beyond_loopback_is_warned_of() -> None:
    assert exposure_warning("127.0.0.1", is_open=True) is None
    assert exposure_warning("0.0.0.0", is_open=False) is None
    warning = exposure_warning("0.0.0.0", is_open=True)
    assert warning is not None and "without a token" in warning


async def test_an_open_page_does_not_hold_up_the_scheduler_s_stop() -> None:
    server = SchedulerServer("127.0.0.1", 0, dashboard_address="127.0.0.1:0")
    await server.start()
    stopped = False
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(_url(server, "/api/v1/stream")) as reply,
        ):
            await asyncio.wait_for(reply.content.readline(), 5)
            started = asyncio.get_running_loop().time()
            await server.stop(0)
            stopped = True
            assert asyncio.get_running_loop().time() - started < 0.9  # not the 1 s grace
            await asyncio.wait_for(reply.content.read(), 5)  # the stream ended
    finally:
        if not stopped:
            await server.stop(0)
