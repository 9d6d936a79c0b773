"""The cluster's controls on a Client, as Dask has them: ``retire_workers``,
``run``, ``upload_file``, ``restart``, ``shutdown``, ``get_scheduler_logs``
and ``get_worker_logs``.

A base of :class:`~client_sdk.client.Client`, kept apart so that the facade
stays about tasks; each method is a coroutine on an asynchronous client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Literal, overload

from apportion_common import serialize
from apportion_common.logring import LogLine
from apportion_common.logs_pb import lines_from_pb, logs_request
from apportion_common.uploads import check_upload
from protos import apportion_pb2 as pb

from ._errors import rebuild_exception
from .future import IsAsync
from .info import WorkerInfo, worker_info

if TYPE_CHECKING:
    from ._bridge import AsyncBridge, SyncBridge
    from ._core import ClientCore

#: Seconds a call on the scheduler or a worker may take (beyond any wait it asks for).
CALL_TIMEOUT_S = 10.0


class ControlCalls(Generic[IsAsync]):
    _bridge: SyncBridge | AsyncBridge

    @property
    def core(self) -> ClientCore:
        raise NotImplementedError  # the Client's

    @overload
    def retire_workers(
        self: ControlCalls[Literal[False]], workers: Iterable[str], timeout: float = ...
    ) -> dict[str, WorkerInfo]: ...
    @overload
    def retire_workers(
        self: ControlCalls[Literal[True]], workers: Iterable[str], timeout: float = ...
    ) -> Coroutine[Any, Any, dict[str, WorkerInfo]]: ...
    def retire_workers(self, workers: Iterable[str], timeout: float = 60.0) -> Any:
        """Take ``workers`` (addresses or names) out of service without losing
        work, as Dask's ``retire_workers``: nothing new is placed on them, their
        running and queued tasks finish, results still wanted are copied to
        other workers, then each exits (its nanny does not restart it).

        Blocks until they are gone and returns them by address, as
        ``scheduler_info()["workers"]`` showed them; raises ``TimeoutError``
        naming those still draining after ``timeout`` seconds (they go on
        draining).
        """
        names = [workers] if isinstance(workers, str) else list(workers)
        request = pb.RetireWorkersRequest(workers=names, timeout_s=timeout)

        async def run() -> dict[str, WorkerInfo]:
            reply = await self.core.transport.retire_workers(request, timeout + CALL_TIMEOUT_S)
            if reply.draining:
                still = ", ".join(w.name or w.address for w in reply.draining)
                raise TimeoutError(f"still draining after {timeout:g}s: {still}")
            return {w.address: worker_info(w) for w in reply.retired}

        return self._bridge.run(run())

    def run(
        self,
        function: Callable[..., Any],
        *args: Any,
        workers: Iterable[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Call ``function(*args, **kwargs)`` on each worker (all, or those of
        ``workers``: addresses or names), outside the task slots and holding no
        resources, as Dask's ``Client.run``; returns ``{address: result}``.
        The first exception a worker's call raised is raised here."""
        payload = serialize.dumps((function, args, kwargs))

        async def run() -> dict[str, Any]:
            addresses = await self._worker_addresses(workers)
            request = pb.RunFunctionRequest(payload=payload)
            transport = self.core.transport
            replies = await asyncio.gather(
                *(transport.run_function(a, request, CALL_TIMEOUT_S * 6) for a in addresses)
            )
            results: dict[str, Any] = {}
            for address, reply in zip(addresses, replies, strict=True):
                if reply.WhichOneof("outcome") == "error":
                    raise rebuild_exception(_error_info(reply.error))
                results[address] = serialize.loads(reply.result)
            return results

        return self._bridge.run(run())

    def upload_file(self, path: str | Path) -> Any:
        """Send a ``.py``, ``.zip`` or ``.egg`` file to every worker, now and
        joining later, where tasks can import it (a ``.py`` is imported at
        once, and reloaded if it was before). Raises ``ValueError`` naming the
        worker where it does not import, as Dask does."""
        path = Path(path)
        check_upload(path.name, 0)  # a wrong kind of file is refused before it is read
        data = path.read_bytes()
        request = pb.UploadFileRequest(filename=check_upload(path.name, len(data)), data=data)

        async def run() -> None:
            transport = self.core.transport
            # The scheduler first: a worker joining meanwhile gets it from there.
            await transport.upload_file(request, CALL_TIMEOUT_S)
            addresses = await self._worker_addresses(None)
            await asyncio.gather(
                *(transport.upload_to_worker(a, request, CALL_TIMEOUT_S * 6) for a in addresses)
            )

        return self._bridge.run(run())

    def restart(self, timeout: float = 60.0) -> Any:
        """Cancel every task (every pending future, this client's and others',
        ends cancelled) and restart every worker process through its nanny, as
        Dask's ``restart``; waits up to ``timeout`` seconds for as many workers
        to be back and returns their entries by address."""
        request = pb.RestartRequest(timeout_s=timeout)

        async def run() -> dict[str, WorkerInfo]:
            reply = await self.core.transport.restart(request, timeout + CALL_TIMEOUT_S)
            return {w.address: worker_info(w) for w in reply.workers}

        return self._bridge.run(run())

    def shutdown(self) -> Any:
        """Stop every worker (and its nanny), then the scheduler; then close
        this client."""
        from ._bridge import AsyncBridge

        async def run() -> None:
            await self.core.transport.shutdown(pb.ShutdownRequest(), CALL_TIMEOUT_S)

        if isinstance(self._bridge, AsyncBridge):

            async def then_close() -> None:
                await run()  # on the caller's loop, as every call of this client
                await self.close()

            return then_close()
        self._bridge.run(run())
        self.close()
        return None

    @overload
    def get_scheduler_logs(
        self: ControlCalls[Literal[False]], n: int | None = ...
    ) -> list[LogLine]: ...
    @overload
    def get_scheduler_logs(
        self: ControlCalls[Literal[True]], n: int | None = ...
    ) -> Coroutine[Any, Any, list[LogLine]]: ...
    def get_scheduler_logs(self, n: int | None = 100) -> Any:
        """The scheduler's newest ``n`` log lines (None: all it keeps, 10,000
        by default), oldest first, as Dask's: ``(level, line)`` pairs, each
        line with its time, level and logger name."""
        request = logs_request(n)

        async def run() -> list[LogLine]:
            return lines_from_pb(await self.core.transport.get_logs(request, CALL_TIMEOUT_S))

        return self._bridge.run(run())

    @overload
    def get_worker_logs(
        self: ControlCalls[Literal[False]],
        n: int | None = ...,
        workers: Iterable[str] | None = ...,
    ) -> dict[str, list[LogLine]]: ...
    @overload
    def get_worker_logs(
        self: ControlCalls[Literal[True]],
        n: int | None = ...,
        workers: Iterable[str] | None = ...,
    ) -> Coroutine[Any, Any, dict[str, list[LogLine]]]: ...
    def get_worker_logs(self, n: int | None = 100, workers: Iterable[str] | None = None) -> Any:
        """Each worker's newest ``n`` log lines (None: all it keeps), by
        address, as Dask's: ``{address: [(level, line), ...]}``, oldest
        first. What tasks logged through their own loggers is there too.
        ``workers``: addresses or names (all when None); an unknown one
        raises ``KeyError`` naming it."""
        request = logs_request(n)

        async def run() -> dict[str, list[LogLine]]:
            addresses = await self._worker_addresses(workers)
            transport = self.core.transport
            replies = await asyncio.gather(
                *(transport.get_worker_logs(a, request, CALL_TIMEOUT_S) for a in addresses)
            )
            return {a: lines_from_pb(r) for a, r in zip(addresses, replies, strict=True)}

        return self._bridge.run(run())

    async def _worker_addresses(self, workers: Iterable[str] | None) -> list[str]:
        state = await self.core.transport.get_cluster_state(
            pb.GetClusterStateRequest(), CALL_TIMEOUT_S
        )
        if workers is None:
            return [w.address for w in state.workers]
        wanted = [workers] if isinstance(workers, str) else list(workers)
        known = {w.address: w.address for w in state.workers}
        known.update({w.name: w.address for w in state.workers})
        missing = [w for w in wanted if w not in known]
        if missing:
            raise KeyError(f"no worker {', '.join(map(repr, missing))}")
        return list(dict.fromkeys(known[w] for w in wanted))

    def close(self) -> Any:
        raise NotImplementedError  # the Client's


def _error_info(error: pb.TaskError) -> serialize.ErrorInfo:
    return serialize.ErrorInfo(error.type_name, error.message, error.traceback, error.exception)
