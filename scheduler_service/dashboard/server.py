"""The scheduler's HTTP port: the dashboard page and its live feed, the
Prometheus metrics, the state as JSON and a health probe (aiohttp, on the
scheduler's own event loop).

==========================  ==============================================  =========
path                        what                                            token
==========================  ==============================================  =========
``/``                       the dashboard page (``/?token=T`` logs in)      yes
``/static/...``             its script and style sheet                      yes
``/api/v1/stream``          the page's updates (server-sent events, 1/s)    yes
``/api/v1/state``           ``Client.scheduler_info()``, as JSON            yes
``/logs/scheduler``         the scheduler's newest log lines                yes
``/logs/worker/WORKER``     a worker's (see :mod:`.logpages`)               yes
``/api/v1/logs/...``        the same as JSON                                yes
``/metrics``                Prometheus text format                          yes
``/health``                 ``ok`` while the scheduler serves               no
==========================  ==============================================  =========

The token is the scheduler's client token (what ``GetClusterState`` needs),
sent as ``Authorization: Bearer TOKEN``; a browser opens ``/?token=TOKEN``
once and gets an HttpOnly cookie instead (a random value of this process,
never the token). With TLS the port serves HTTPS with the scheduler's
certificate, without asking for a client certificate (a browser has none).

A worker's log lines live in the worker: the dashboard asks it
(``Worker/GetLogs``) with the scheduler's own secret, which workers accept
for that method only (:mod:`apportion_common.security`), and with the
scheduler's TLS files. A worker that does not answer within
:data:`.logpages.WORKER_LOGS_TIMEOUT_S` gets a page that says so; the
scheduler's loop only awaits it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import json
import logging
import secrets
import socket
from collections.abc import Awaitable, Callable, Collection
from importlib import resources
from typing import TYPE_CHECKING, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from apportion_common.logring import LogLine, LogsUnavailable
from apportion_common.security import ServerSecurity, is_loopback

from .activity import RunActivity
from .feed import Feed, LoopLag
from .logpages import (
    API_PREFIX,
    SCHEDULER_LOGS_PATH,
    WORKER_LOGS_PREFIX,
    WORKER_LOGS_TIMEOUT_S,
    LogAnswer,
    find_worker,
    lines_wanted,
    unknown_worker,
)
from .metrics import exposition, make_registry
from .view import state_info

if TYPE_CHECKING:
    from ..state import ClusterState

log = logging.getLogger("scheduler_service")

#: The gRPC method whose token the dashboard asks for: the client role's.
AS_METHOD = "/apportion.v1.Scheduler/GetClusterState"
COOKIE = "apportion_session"
#: Seconds open requests (a page's event stream) get to end when the scheduler stops.
SHUTDOWN_S = 1.0
OPEN_PATHS = frozenset({"/health"})
STATIC = {
    "dashboard.js": "application/javascript",
    "dashboard.css": "text/css",
}
SECURITY_HEADERS = {
    # Everything the page needs comes from this port: nothing else may load.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class WorkerLogs(Protocol):
    """Reads workers' newest lines (:class:`apportion_common.logs_pb.WorkerLogReader`)."""

    async def read(self, address: str, n: int | None, timeout: float) -> list[LogLine]: ...

    async def keep_only(self, addresses: Collection[str]) -> None: ...

    async def close(self) -> None: ...


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8787`` too) as (host, port); ValueError names what is wrong."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"dashboard address {address!r}: expected HOST:PORT (port 0-65535)")
    return host, int(port)


def exposure_warning(host: str, is_open: bool) -> str | None:
    """What to warn of when an open dashboard is reachable beyond this machine
    (TLS alone keeps no one out: it asks for no client certificate)."""
    if not is_open or is_loopback(host):
        return None
    return (
        f"the dashboard listens on {host}, beyond loopback, without a token: anyone who "
        "can reach it sees the cluster's state (set --token or --client-token)"
    )


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


class Dashboard:
    """The HTTP port of one scheduler. ``port`` taken: a free one instead, with
    a WARNING (many schedulers on one machine, as in tests)."""

    def __init__(
        self,
        state: ClusterState,
        activity: RunActivity,
        scheduler_address: Callable[[], str],
        host: str = "127.0.0.1",
        port: int = 8787,
        security: ServerSecurity | None = None,
        *,
        scheduler_logs: Callable[[int | None], list[LogLine]],
        worker_logs: WorkerLogs,
    ) -> None:
        self._state = state
        self._scheduler_address = scheduler_address
        #: the scheduler's newest lines; a reader of workers' and how long each gets
        self._scheduler_logs = scheduler_logs
        self._worker_logs = worker_logs
        self.worker_logs_timeout = WORKER_LOGS_TIMEOUT_S
        self.host = host
        self.port = port
        self._security = security or ServerSecurity()
        authorizer = self._security.authorizer
        self._open = authorizer is None or authorizer.check(AS_METHOD, None) is None
        self._session = secrets.token_urlsafe(32)
        self.lag = LoopLag()
        self.feed = Feed(state, activity)
        self._registry = make_registry(state, activity, lambda: self.lag.seconds)
        self._runner: web.AppRunner | None = None
        self._lag_task: asyncio.Task[None] | None = None
        self._static = {
            name: (resources.files(__package__) / "static" / name).read_bytes() for name in STATIC
        }
        self._page = (resources.files(__package__) / "static" / "index.html").read_bytes()

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        scheme = "https" if self._security.tls is not None else "http"
        return f"{scheme}://{self.address}/"

    async def start(self) -> None:
        ssl_context = None if self._security.tls is None else self._security.tls.https_context()
        try:
            sock = _listen(self.host, self.port)
        except OSError as exc:
            if self.port == 0 or exc.errno != errno.EADDRINUSE:
                why = exc.strerror or str(exc)
                raise OSError(f"cannot serve the dashboard on {self.address}: {why}") from exc
            taken = self.address
            sock = _listen(self.host, 0)
            self.port = sock.getsockname()[1]
            log.warning(
                "dashboard port %s is not free (%s); serving the dashboard on %s instead",
                taken,
                exc.strerror or exc,
                self.address,
            )
        self.port = sock.getsockname()[1]
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/", self._index)
        app.router.add_get("/static/{name}", self._asset)
        app.router.add_get("/api/v1/stream", self._stream)
        app.router.add_get("/api/v1/state", self._state_json)
        for prefix in ("", API_PREFIX):
            app.router.add_get(prefix + SCHEDULER_LOGS_PATH, self._scheduler_log_lines)
            app.router.add_get(prefix + WORKER_LOGS_PREFIX + "{worker}", self._worker_log_lines)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_S
        )
        await self._runner.setup()
        await web.SockSite(self._runner, sock, ssl_context=ssl_context).start()
        self._lag_task = asyncio.create_task(self.lag.run())
        exposed = exposure_warning(self.host, self._open)
        if exposed is not None:
            log.warning("%s", exposed)
        log.info("dashboard at %s", self.url)

    async def stop(self) -> None:
        if self._lag_task is not None:
            self._lag_task.cancel()
            await asyncio.gather(self._lag_task, return_exceptions=True)
        await self.feed.close()
        if self._runner is not None:
            await self._runner.cleanup()
        await self._worker_logs.close()

    # ------------------------------------------------------------ security

    def _token_ok(self, token: str) -> bool:
        authorizer = self._security.authorizer
        assert authorizer is not None
        return authorizer.check(AS_METHOD, [("authorization", f"Bearer {token}")]) is None

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await self._admit(request, handler)
        if not response.prepared:  # a stream sent its own already
            response.headers.update(SECURITY_HEADERS)
        return response

    async def _admit(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._open or request.path in OPEN_PATHS:
            return await handler(request)
        header = request.headers.get("Authorization")
        if header is not None:
            authorizer = self._security.authorizer
            assert authorizer is not None
            if authorizer.check(AS_METHOD, [("authorization", header)]) is None:
                return await handler(request)
            return _refused("the token was not accepted")
        cookie = request.cookies.get(COOKIE)
        if cookie is not None and hmac.compare_digest(cookie.encode(), self._session.encode()):
            return await handler(request)
        token = request.query.get("token")
        if request.path == "/" and token is not None:
            if not self._token_ok(token):
                return _refused("the token was not accepted")
            # Logged in: the cookie from now on, and the token off the address bar.
            found = web.Response(status=302, headers={"Location": "/"})
            found.set_cookie(
                COOKIE,
                self._session,
                httponly=True,
                samesite="Strict",
                secure=self._security.tls is not None,
            )
            return found
        return _refused("this scheduler needs its client token")

    # ------------------------------------------------------------ handlers

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(body=self._page, content_type="text/html", charset="utf-8")

    async def _asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC:
            raise web.HTTPNotFound(text=f"no static file {name!r}")
        return web.Response(body=self._static[name], content_type=STATIC[name], charset="utf-8")

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
        )
        response.headers.update(SECURITY_HEADERS)
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            async with contextlib.aclosing(self.feed.updates()) as updates:
                async for update in updates:
                    await response.write(b"data: " + update + b"\n\n")
        return response

    async def _state_json(self, request: web.Request) -> web.Response:
        info = state_info(self._state, self._scheduler_address(), self.address)
        return web.Response(text=json.dumps(info), content_type="application/json")

    async def _metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=exposition(self._registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _scheduler_log_lines(self, request: web.Request) -> web.Response:
        address = self._scheduler_address()
        whose, who = f"the scheduler {address}", {"scheduler": address}
        try:
            n = lines_wanted(request.query.get("n"))
        except ValueError as exc:
            return _log_reply(request, LogAnswer(whose, who, None, error=str(exc), status=400))
        return _log_reply(request, LogAnswer(whose, who, n, self._scheduler_logs(n)))

    async def _worker_log_lines(self, request: web.Request) -> web.Response:
        return _log_reply(request, await self._worker_answer(request))

    async def _worker_answer(self, request: web.Request) -> LogAnswer:
        wanted = request.match_info["worker"]
        workers = self._state.workers.values()
        worker = find_worker(workers, wanted)
        if worker is None:
            why = unknown_worker(wanted)
            return LogAnswer(f"worker {wanted}", {"worker": wanted}, None, error=why, status=404)
        whose = f"worker {worker.name} ({worker.address})"
        who = {"worker": {"id": worker.worker_id, "name": worker.name, "address": worker.address}}
        try:
            n = lines_wanted(request.query.get("n"))
        except ValueError as exc:
            return LogAnswer(whose, who, None, error=str(exc), status=400)
        await self._worker_logs.keep_only({w.address for w in workers})
        try:
            lines = await self._worker_logs.read(worker.address, n, self.worker_logs_timeout)
        except LogsUnavailable as exc:
            # 504: it did not answer in time; 502: it answered with a refusal, or is gone.
            status = 504 if exc.timed_out else 502
            return LogAnswer(whose, who, n, error=f"{whose} gave no logs: {exc}", status=status)
        return LogAnswer(whose, who, n, lines)


def _log_reply(request: web.Request, answer: LogAnswer) -> web.Response:
    """The answer as JSON under /api/v1, else as the HTML page."""
    if request.path.startswith(API_PREFIX):
        body, content_type = answer.as_json(), "application/json"
    else:
        body, content_type = answer.as_html(), "text/html"
    return web.Response(text=body, status=answer.status, content_type=content_type)


def _refused(why: str) -> web.Response:
    return web.Response(
        status=401,
        text=(
            f"{why}: send 'Authorization: Bearer TOKEN' or open /?token=TOKEN once in a browser\n"
        ),
        headers={"WWW-Authenticate": 'Bearer realm="apportion"'},
    )
