"""The worker's one stream to the scheduler: register, read instructions,
write reports, heartbeat; and again, with backoff, when the stream breaks.

Reports wait in :attr:`SchedulerLink.reports` until the writer sends them. A
busy worker's reports wait up to :data:`REPORT_COALESCE_S` for others to travel
with them: each message costs both ends the same CPU whatever it carries. An
idle worker reports at once, and one that runs out of work meanwhile says so
(:meth:`SchedulerLink.flush`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from typing import Any, Protocol

import grpc

from apportion_common.gpus import GpuDevice
from apportion_common.security import UNAUTHENTICATED_EXIT_CODE, ClientSecurity
from apportion_common.wrong_peer import not_a_scheduler
from protos import apportion_pb2 as pb
from protos import apportion_pb2_grpc as pb_grpc

from . import wire

log = logging.getLogger("worker_service")

MAX_BACKOFF_S = 5.0
#: How long a busy worker's reports wait for others to travel with them.
REPORT_COALESCE_S = 0.001


#: The status a worker exits with after --death-timeout seconds without a
#: scheduler (the nanny does not restart it: it would only wait again).
DEATH_TIMEOUT_EXIT_CODE = 75


class WorkerRefused(Exception):
    """The scheduler refused this worker for good (bad settings, wrong token).

    Not SystemExit inside the task: that would tear the event loop down
    mid-flight; ``run_worker`` turns it into the exit status after closing.
    """

    def __init__(self, exit_code: int) -> None:
        super().__init__(f"refused by the scheduler (exit status {exit_code})")
        self.exit_code = exit_code


class LinkOwner(Protocol):
    """What the stream needs of the worker it serves."""

    nthreads: int
    resources: dict[str, float]
    #: the amounts as written, where they were (MEMORY="100GB")
    resources_text: dict[str, str]
    #: registered so the scheduler can tell which peers share memory ("": none)
    host_id: str
    #: the GPUs this process may use (GPU=auto), shown by the scheduler
    gpus: tuple[GpuDevice, ...]
    #: bytes of memory this process may use (0: no limit), shown by the scheduler
    memory_limit: int

    @property
    def name(self) -> str: ...

    @property
    def address(self) -> str: ...

    @property
    def busy(self) -> bool:
        """Runs are going on or queued: more reports are coming."""
        ...

    def registration_held(self) -> list[tuple[str, int, int]]:
        """(key, incarnation, nbytes) of results to offer when registering."""
        ...

    def on_registered(self, client_token_sha256: bytes, scheduler_token_sha256: bytes) -> None:
        """Registered; clients present a token whose SHA-256 is the first
        (b"": none), the scheduler itself one whose SHA-256 is the second."""
        ...

    def on_instructions(self, instructions: wire.Instructions) -> None: ...

    async def orphan_everything(self) -> None:
        """The stream broke: settle what ran under it before registering again."""
        ...


class SchedulerLink:
    def __init__(
        self,
        scheduler_address: str,
        credentials: ClientSecurity,
        owner: LinkOwner,
        death_timeout: float | None = None,
    ):
        self.scheduler_address = scheduler_address
        #: seconds without a scheduler after which the worker gives up (None: never)
        self.death_timeout = death_timeout
        self._credentials = credentials
        self._owner = owner
        self.reports = wire.Reports()
        self.registered = asyncio.Event()
        #: set when a registered stream ends (cleared when one registers again)
        self.lost = asyncio.Event()
        self.worker_id = 0
        self._wake = asyncio.Event()
        #: ends a report's wait for company early: the worker ran out of work
        self._flush = asyncio.Event()

    def wake(self) -> None:
        """Reports are waiting: send them (soon)."""
        self._wake.set()

    def flush(self) -> None:
        """The worker ran out of work: send what waits now."""
        self._flush.set()

    async def run_forever(self, stopping: asyncio.Event) -> None:
        backoff = 0.1
        attempt = 0
        alone_since = time.monotonic()  # without a scheduler since
        while not stopping.is_set():
            attempt += 1
            try:
                await self._session()
                backoff = 0.1
            except grpc.aio.AioRpcError as exc:
                refused = exc.code() in (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.ALREADY_EXISTS,
                )
                if refused and not self.registered.is_set():
                    # Its registration (settings, name) was refused: it would be again.
                    log.error("the scheduler refused this worker: %s", exc.details())
                    raise WorkerRefused(2) from None
                found = not_a_scheduler(exc)
                if found is not None:
                    log.error(
                        "%s is not an apportion scheduler (%s); check the address",
                        self.scheduler_address,
                        found,
                    )
                    raise WorkerRefused(2) from None
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    # The same credentials would be refused again: stop here.
                    log.error(
                        "the scheduler %s refused this worker (UNAUTHENTICATED: %s); "
                        "start it with the worker token: --token or APPORTION_TOKEN",
                        self.scheduler_address,
                        exc.details(),
                    )
                    raise WorkerRefused(UNAUTHENTICATED_EXIT_CODE) from None
                log.warning(
                    "scheduler %s unreachable (attempt %d: %s: %s); retrying in %.1fs",
                    self.scheduler_address,
                    attempt,
                    exc.code().name,
                    exc.details(),
                    backoff,
                )
            if self.registered.is_set():
                attempt, alone_since = 0, time.monotonic()  # it had one until now
            elif self.death_timeout is not None:
                alone = time.monotonic() - alone_since
                if alone >= self.death_timeout:
                    log.error(
                        "no scheduler at %s for %.0fs (death timeout %gs); stopping",
                        self.scheduler_address,
                        alone,
                        self.death_timeout,
                    )
                    raise WorkerRefused(DEATH_TIMEOUT_EXIT_CODE)
                backoff = min(backoff, max(self.death_timeout - alone, 0.05))
            if self.registered.is_set():
                self.lost.set()
            self.registered.clear()
            await self._owner.orphan_everything()
            # What the old stream never carried would only confuse the next one.
            self.reports = wire.Reports()
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _session(self) -> None:
        owner = self._owner
        async with self._credentials.aio_channel(self.scheduler_address) as channel:
            stub = pb_grpc.SchedulerStub(channel)
            call = stub.WorkerStream(metadata=self._credentials.metadata)
            await call.write(
                wire.registration_to_pb(
                    owner.name,
                    owner.address,
                    owner.nthreads,
                    owner.resources,
                    os.getpid(),
                    owner.registration_held(),
                    owner.host_id,
                    owner.resources_text,
                    owner.gpus,
                    owner.memory_limit,
                )
            )
            first = await call.read()
            if first is grpc.aio.EOF:
                raise ConnectionError("the scheduler closed the stream before registering us")
            assert isinstance(first, pb.SchedulerToWorker)
            self.worker_id = first.registered.worker_id
            self.lost.clear()
            registered = first.registered
            owner.on_registered(registered.client_token_sha256, registered.scheduler_token_sha256)
            interval = first.registered.heartbeat_interval_s or 2.0
            log.info(
                "registered with %s as worker %d (%s)",
                self.scheduler_address,
                self.worker_id,
                owner.address,
            )
            self.registered.set()
            writer = asyncio.create_task(self._write_reports(call))
            heartbeat = asyncio.create_task(self._heartbeat(interval))
            try:
                while True:
                    msg = await call.read()
                    if msg is grpc.aio.EOF:
                        log.warning("the scheduler closed our stream")
                        return
                    assert isinstance(msg, pb.SchedulerToWorker)
                    owner.on_instructions(wire.instructions_from_pb(msg.instructions))
            finally:
                writer.cancel()
                heartbeat.cancel()
                await asyncio.gather(writer, heartbeat, return_exceptions=True)
                call.cancel()

    async def _heartbeat(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.reports.heartbeat = True
            self._wake.set()

    async def _write_reports(self, call: Any) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self.reports:
                continue
            if self._owner.busy:
                # More reports are on their way: let them travel together.
                self._flush.clear()
                timer = asyncio.get_running_loop().call_later(REPORT_COALESCE_S, self._flush.set)
                await self._flush.wait()
                timer.cancel()
                self._wake.clear()
            reports, self.reports = self.reports, wire.Reports()
            await call.write(wire.reports_to_pb(reports))
