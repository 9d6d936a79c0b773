"""Scheduler lifecycle: start, serve, stop.

Shutdown order: health goes NOT_SERVING, the server stops accepting calls and
gives open streams a short grace period, then everything is cancelled.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from apportion_common.grpc_server import ServingHealth, bind, install_stop_signals, make_server
from apportion_common.logring import kept_lines
from apportion_common.logs_pb import WorkerLogReader
from apportion_common.security import ClientSecurity, Role, ServerSecurity, token_digest
from apportion_common.services import add_service
from protos import apportion_pb2 as pb

from .dashboard.activity import RunActivity
from .journal import Journal
from .policy import SchedulingPolicy
from .servicer import SchedulerServicer

if TYPE_CHECKING:
    from .dashboard.server import Dashboard

log = logging.getLogger("scheduler_service")

SCHEDULER_SERVICE = pb.DESCRIPTOR.services_by_name["Scheduler"].full_name


class SchedulerServer:
    """A scheduler on ``host:port`` (port 0 picks a free one).

    ``validate=True`` checks the state machine's invariants after every event.
    With a ``state_dir`` the accepted tasks are journaled there, and a
    scheduler started on the same directory picks up where the last one died.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8786,
        *,
        validate: bool = False,
        on_invariant_error: Callable[[], None] | None = None,
        policy: SchedulingPolicy | None = None,
        security: ServerSecurity | None = None,
        worker_ttl: float = 5.0,
        state_dir: Path | None = None,
        dashboard_address: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        #: Tokens per role and TLS (apportion_common.security); None: open, plaintext.
        self.security = security or ServerSecurity()
        self._server = make_server(self.security.interceptors())
        self._journal = Journal(state_dir) if state_dir is not None else None
        self.servicer = SchedulerServicer(
            lambda: self.address,
            validate=validate,
            on_invariant_error=on_invariant_error,
            policy=policy,
            worker_ttl=worker_ttl,
            journal=self._journal,
        )
        if self.security.authorizer is not None:
            self.servicer.client_token_sha256 = self.security.authorizer.digest(Role.CLIENT) or b""
        # This process's own secret, for the dashboard to read workers' logs:
        # it knows the client token only by its digest. Made anew each start,
        # never written anywhere; workers learn its digest as they register.
        scheduler_token = secrets.token_urlsafe(32)
        self.servicer.scheduler_token_sha256 = token_digest(scheduler_token)
        #: what the scheduler presents to workers (GetLogs): its secret, its TLS files
        self.as_scheduler = ClientSecurity(scheduler_token, self.security.tls)
        self._clock: asyncio.Task[None] | None = None
        #: HOST:PORT for the dashboard and /metrics (None: not served)
        self.dashboard_address = dashboard_address
        self.dashboard: Dashboard | None = None
        add_service(self._server, self.servicer, pb, "Scheduler")
        self._health = ServingHealth(self._server, [SCHEDULER_SERVICE])

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        if self.dashboard_address is not None:
            # Before anything runs: its counters see every run from the start.
            self.servicer.activity = RunActivity(self.servicer.state)
        recovered = self.servicer.recover()
        if recovered:
            assert self._journal is not None
            log.info("recovered %d task(s) from %s", recovered, self._journal.path)
        self.port = bind(self._server, self.host, self.port, self.security.credentials())
        self.security.warn_if_exposed(self.host, "the scheduler", log)
        await self._server.start()
        if self.servicer.activity is not None:
            await self._start_dashboard(self.servicer.activity)
        self._clock = asyncio.create_task(self.servicer.keep_time())
        await self._health.set(True)
        log.info("scheduler listening on %s", self.address)

    async def _start_dashboard(self, activity: RunActivity) -> None:
        # Imported here: aiohttp costs a scheduler started without a dashboard nothing.
        from .dashboard.server import Dashboard, split_address

        assert self.dashboard_address is not None
        host, port = split_address(self.dashboard_address)
        servicer = self.servicer
        self.dashboard = Dashboard(
            servicer.state,
            activity,
            lambda: self.address,
            host,
            port,
            self.security,
            scheduler_logs=lambda n: kept_lines(servicer.log_ring, n),
            worker_logs=WorkerLogReader(self.as_scheduler),
        )
        try:
            await self.dashboard.start()
        except BaseException:
            await self._server.stop(0)
            raise
        self.servicer.dashboard_address = self.dashboard.address

    async def stop(self, grace: float = 1.0) -> None:
        await self._health.set(False)
        if self.dashboard is not None:
            await self.dashboard.stop()
        await self._server.stop(grace)
        if self._clock is not None:
            self._clock.cancel()
            await asyncio.gather(self._clock, return_exceptions=True)
        if self._journal is not None:
            self._journal.close()

    async def __aenter__(self) -> SchedulerServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


INVARIANT_EXIT_CODE = 70
GC_YOUNG_THRESHOLD = 100_000


def _die_on_invariant_error() -> None:
    os._exit(INVARIANT_EXIT_CODE)


#: After Shutdown, how long the workers' streams get to end before the scheduler stops.
SHUTDOWN_GRACE_S = 0.5


async def run_scheduler(
    host: str,
    port: int,
    *,
    policy: SchedulingPolicy | None = None,
    validate: bool = False,
    handle_signals: bool = True,
    security: ServerSecurity | None = None,
    worker_ttl: float = 5.0,
    state_dir: Path | None = None,
    dashboard_address: str | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM. Prints the bound address on stdout first.

    With ``validate`` (tests set ``APPORTION_SCHEDULER__CHECK_INVARIANTS=1``) the books
    are checked after every event, and a broken invariant ends the process with
    status 70 so that no test can miss it.
    """
    server = SchedulerServer(
        host,
        port,
        validate=validate,
        on_invariant_error=_die_on_invariant_error,
        policy=policy,
        security=security,
        worker_ttl=worker_ttl,
        state_dir=state_dir,
        dashboard_address=dashboard_address,
    )
    await server.start()
    # The scheduler's own process: collect young objects every
    # GC_YOUNG_THRESHOLD allocations, not the default 700. Its books are many
    # small long-lived objects that every collection walks again, so frequent
    # collections cost a good share of its CPU.
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    print(f"apportion scheduler listening on {server.address}", flush=True)
    stop = asyncio.Event()
    if handle_signals:
        install_stop_signals(stop)
    try:
        stopped = asyncio.create_task(stop.wait())
        asked = asyncio.create_task(server.servicer.shutdown_asked.wait())
        await asyncio.wait({stopped, asked}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        asked.cancel()
        if server.servicer.shutdown_asked.is_set():
            # The workers were told to exit: give their streams a moment to end.
            await asyncio.sleep(SHUTDOWN_GRACE_S)
    finally:
        log.info("scheduler stopping")
        await server.stop()
