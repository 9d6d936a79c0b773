"""The client: submit functions with resource needs, get futures back.

:class:`Client` is the public facade, and only that: it checks and turns each
call into work for the client's core (:mod:`client_sdk._core`, the key states
and the stream to the scheduler), handed over by a bridge
(:mod:`client_sdk._bridge`). ``Client(address)`` blocks, with the core on a
loop in a thread of its own; ``Client(address, asynchronous=True)`` runs the
core on the caller's loop and its methods return coroutines. Task specs are
built by :mod:`client_sdk._spec`; the network is behind
:mod:`client_sdk._transport`.

For type checkers the two are ``Client[Literal[False]]`` and
``Client[Literal[True]]``: the same methods, blocking or as coroutines.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Coroutine, Generator, Iterable, Mapping
from typing import Any, Literal, Protocol, Self, TypeVar, overload

from apportion_common import serialize
from apportion_common.resources import check_resources, spellings
from apportion_common.security import TLS
from protos import apportion_pb2 as pb

from ._bridge import AsyncBridge, SyncBridge
from ._control import ControlCalls
from ._core import CONNECT_TIMEOUT_S, RECONNECT_TIMEOUT_S, ClientCore
from ._dask import api as dask_api
from ._dask.api import as_dask_default, require_dask
from ._spec import SpecBuilder, map_keys, task_options
from ._transport import GrpcTransport, Transport, client_security
from .cluster import LocalCluster
from .future import Future, IsAsync
from .info import ClusterInfo, WorkerInfo, cluster_info, worker_info

T = TypeVar("T")

#: Tasks of a map() handed to the client's loop at a time.
MAP_BATCH = 1_000
#: Seconds a unary call (scheduler_info, set_resources, explain) may take.
CALL_TIMEOUT_S = 10.0
#: How often wait_for_workers asks the scheduler.
WORKERS_POLL_S = 0.1


class HasAddress(Protocol):
    """Anything with the scheduler's ``host:port`` as ``.address`` (a LocalCluster)."""

    @property
    def address(self) -> str: ...


def _address_of(address: Any) -> str:
    """Accept ``"host:port"`` (``tcp://`` in front too, the Dask habit) or
    anything with an ``.address`` (a LocalCluster)."""
    addr = getattr(address, "address", address)
    if isinstance(addr, str) and addr.startswith("tcp://"):
        addr = addr.removeprefix("tcp://")
    if isinstance(addr, str) and "://" in addr:
        raise ValueError(
            f"scheduler address {addr!r}: give host:port (TLS is turned on with tls=TLS(...))"
        )
    if not isinstance(addr, str) or ":" not in addr:
        raise ValueError(f"scheduler address must look like host:port, not {address!r}")
    return addr


class Client(ControlCalls[IsAsync]):
    """Connect to a scheduler and run functions on its workers.

    ``Client(address)`` blocks; ``Client(address, asynchronous=True)`` is used
    with ``async with`` and its methods are coroutines.

    ``token`` (default: ``APPORTION_CLIENT_TOKEN``, else ``APPORTION_TOKEN``)
    is sent as ``authorization: Bearer TOKEN`` on every call; ``tls`` (a
    :class:`TLS`, default from ``APPORTION_TLS_CA/CERT/KEY``) turns on mutual
    TLS. ``Client(cluster)`` uses a LocalCluster's own when given neither.

    If the stream to the scheduler breaks (a network blip, a scheduler
    restart), the client reconnects with backoff for ``reconnect_timeout``
    seconds and its futures carry on; only then do pending ones fail with
    SchedulerConnectionError.
    """

    @overload
    def __init__(
        self: Client[Literal[False]],
        address: str | HasAddress | None = None,
        *,
        asynchronous: Literal[False] = False,
        timeout: float = CONNECT_TIMEOUT_S,
        token: str | None = None,
        tls: TLS | None = None,
        reconnect_timeout: float = RECONNECT_TIMEOUT_S,
        set_as_default: bool = True,
    ) -> None: ...
    @overload
    def __init__(
        self: Client[Literal[True]],
        address: str | HasAddress | None = None,
        *,
        asynchronous: Literal[True],
        timeout: float = CONNECT_TIMEOUT_S,
        token: str | None = None,
        tls: TLS | None = None,
        reconnect_timeout: float = RECONNECT_TIMEOUT_S,
        set_as_default: bool = True,
    ) -> None: ...
    @overload
    def __init__(
        self: Client[Any],
        address: str | HasAddress | None = None,
        *,
        asynchronous: bool,
        timeout: float = CONNECT_TIMEOUT_S,
        token: str | None = None,
        tls: TLS | None = None,
        reconnect_timeout: float = RECONNECT_TIMEOUT_S,
        set_as_default: bool = True,
    ) -> None: ...
    def __init__(
        self,
        address: str | HasAddress | None = None,
        *,
        asynchronous: bool = False,
        timeout: float = CONNECT_TIMEOUT_S,
        token: str | None = None,
        tls: TLS | None = None,
        reconnect_timeout: float = RECONNECT_TIMEOUT_S,
        set_as_default: bool = True,
        _transport: Transport | None = None,
    ) -> None:
        # _transport: what the core reaches the network through (tests give a
        # stub); by default gRPC, with the token and TLS resolved here.
        #: the LocalCluster this client started (Client() with no address),
        #: closed with it
        self.cluster: LocalCluster | None = None
        if address is None:
            address = self.cluster = LocalCluster(n_workers=1, nthreads=os.cpu_count() or 1)
        self.address = scheduler = _address_of(address)
        self.asynchronous = asynchronous
        self._timeout = timeout
        security = client_security(address, token, tls)
        self._specs = SpecBuilder()

        def make_core() -> ClientCore:
            # (Not a method: the bridge holds it, and must not hold the Client,
            # so that a Client nobody holds is closed at once.)
            transport = _transport or GrpcTransport(scheduler, security)
            return ClientCore(transport, reconnect_timeout)

        self._bridge: SyncBridge | AsyncBridge
        if asynchronous:
            self._bridge = AsyncBridge(make_core)
        else:
            self._bridge = SyncBridge(make_core)
            try:
                self._bridge.connect(timeout)
            except BaseException:
                self._close_extras()
                raise
        #: undoes this client being dask's default scheduler (sync clients only:
        #: dask's compute() waits for its results)
        self._as_default = as_dask_default(self) if set_as_default and not asynchronous else None

    # ---------------------------------------------------------- lifecycle

    def _async_bridge(self) -> AsyncBridge:
        if not isinstance(self._bridge, AsyncBridge):
            raise TypeError("a synchronous Client is used with 'with', not 'async with'")
        return self._bridge

    async def _aconnect(self) -> Self:
        await self._async_bridge().connect(self._timeout)
        return self

    def __await__(self) -> Generator[Any, None, Self]:
        return self._aconnect().__await__()

    async def __aenter__(self) -> Self:
        if not self._async_bridge().connected:
            await self._aconnect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._async_bridge().close()
        self._close_extras()

    def __enter__(self) -> Self:
        if self.asynchronous:
            raise TypeError("an asynchronous Client is used with 'async with'")
        return self

    def __exit__(self, *exc: object) -> None:
        assert isinstance(self._bridge, SyncBridge)  # see __enter__
        self._bridge.close()
        self._close_extras()

    @overload
    def close(self: Client[Literal[False]]) -> None: ...
    @overload
    def close(self: Client[Literal[True]]) -> Coroutine[Any, Any, None]: ...
    def close(self) -> Any:
        """Close the stream (the scheduler releases this client's tasks), and
        the LocalCluster the client started, if it did."""
        if isinstance(self._bridge, AsyncBridge):
            return self._aclose()
        self._bridge.close()
        self._close_extras()
        return None

    async def _aclose(self) -> None:
        await self._async_bridge().close()
        self._close_extras()

    def _close_extras(self) -> None:
        """No longer dask's default scheduler; the LocalCluster it started, closed."""
        as_default, self._as_default = getattr(self, "_as_default", None), None
        if as_default is not None:
            as_default()
        cluster, self.cluster = self.cluster, None
        if cluster is not None:
            cluster.close()

    def __del__(self) -> None:
        try:
            bridge = self._bridge
            if isinstance(bridge, SyncBridge) and bridge.running:
                bridge.close()
            self._close_extras()
        except Exception:
            pass

    @property
    def core(self) -> ClientCore:
        """The client's core (its key states and stream), once connected."""
        return self._bridge.core

    # --------------------------------------------------------------- submit

    @overload
    def submit(
        self: Client[Literal[False]],
        fn: Callable[..., Any],
        *args: Any,
        resources: Mapping[str, float | str] | None = None,
        key: str | None = None,
        retries: int | None = None,
        priority: int | None = None,
        workers: str | Iterable[str] | None = None,
        allow_other_workers: bool = False,
        pure: bool = False,
        isolate: bool = False,
        **kwargs: Any,
    ) -> Future[Literal[False]]: ...
    @overload
    def submit(
        self: Client[Literal[True]],
        fn: Callable[..., Any],
        *args: Any,
        resources: Mapping[str, float | str] | None = None,
        key: str | None = None,
        retries: int | None = None,
        priority: int | None = None,
        workers: str | Iterable[str] | None = None,
        allow_other_workers: bool = False,
        pure: bool = False,
        isolate: bool = False,
        **kwargs: Any,
    ) -> Coroutine[Any, Any, Future[Literal[True]]]: ...
    def submit(
        self,
        fn: Callable[..., Any],
        *args: Any,
        resources: Mapping[str, float | str] | None = None,
        key: str | None = None,
        retries: int | None = None,
        priority: int | None = None,
        workers: str | Iterable[str] | None = None,
        allow_other_workers: bool = False,
        pure: bool = False,
        isolate: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` on a worker that has ``resources`` free.

        ``workers`` (names or addresses) restricts where it may run; with
        ``allow_other_workers=True`` they are only preferred. Resources are
        never loosened either way. ``pure=True``: the key comes from the
        function and its arguments, so the same call is the same task (by
        default every call is a new task). ``isolate=True``: it runs in a
        child process of the worker that sees only the task's GPUs
        (``CUDA_VISIBLE_DEVICES``), not in one of the worker's threads.
        """
        options = task_options(
            resources, retries, priority, workers, allow_other_workers, isolate=isolate
        )
        spec = self._specs.spec(fn, args, kwargs, key, options, self, pure=pure)
        (future,) = self._submit_specs([spec])
        return _ready(future) if self.asynchronous else future

    @overload
    def map(
        self: Client[Literal[False]],
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        resources: Mapping[str, float | str] | None = None,
        key: str | list[str] | None = None,
        retries: int | None = None,
        priority: int | None = None,
        workers: str | Iterable[str] | None = None,
        allow_other_workers: bool = False,
        pure: bool = False,
        isolate: bool = False,
        **kwargs: Any,
    ) -> list[Future[Literal[False]]]: ...
    @overload
    def map(
        self: Client[Literal[True]],
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        resources: Mapping[str, float | str] | None = None,
        key: str | list[str] | None = None,
        retries: int | None = None,
        priority: int | None = None,
        workers: str | Iterable[str] | None = None,
        allow_other_workers: bool = False,
        pure: bool = False,
        isolate: bool = False,
        **kwargs: Any,
    ) -> Coroutine[Any, Any, list[Future[Literal[True]]]]: ...
    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        resources: Mapping[str, float | str] | None = None,
        key: str | list[str] | None = None,
        retries: int | None = None,
        priority: int | None = None,
        workers: str | Iterable[str] | None = None,
        allow_other_workers: bool = False,
        pure: bool = False,
        isolate: bool = False,
        **kwargs: Any,
    ) -> Any:
        """One task per element (zipped across ``iterables``), submitted as one batch."""
        options = task_options(
            resources, retries, priority, workers, allow_other_workers, isolate=isolate
        )
        argsets = list(zip(*iterables, strict=False))
        keys = map_keys(key, len(argsets))
        # The function is pickled once for all the tasks (cloudpickle is slow
        # for a function defined in __main__).
        function = serialize.dump_function(fn) if callable(fn) and argsets else None
        futures: list[Future[Any]] = []
        # Handed over MAP_BATCH at a time, so that the first tasks are on
        # their way (and running) while the rest are still being pickled.
        for start in range(0, len(argsets), MAP_BATCH):
            specs = [
                self._specs.spec(fn, tuple(a), kwargs, k, options, self, function, pure=pure)
                for a, k in zip(
                    argsets[start : start + MAP_BATCH], keys[start : start + MAP_BATCH], strict=True
                )
            ]
            futures.extend(self._submit_specs(specs))
        return _ready(futures) if self.asynchronous else futures

    def _submit_specs(self, specs: list[pb.TaskSpec]) -> list[Future[Any]]:
        """Submit ``specs`` as one batch; a Future of each (client_sdk's own use)."""
        futures: list[Future[Any]] = [Future(spec.key, self, self._bridge) for spec in specs]
        self._bridge.submit(specs)
        return futures

    # ------------------------------------------------- dask collections

    def compute(
        self,
        collections: Any,
        resources: Mapping[str, float | str] | None = None,
        optimize_graph: bool = True,
        priority: int = 0,
        retries: int = 0,
        workers: str | Iterable[str] | None = None,
        allow_other_workers: bool = False,
    ) -> Any:
        """A Future of a dask collection's value (or a list of them, for a
        list). Annotations (``dask.annotate``) apply to the tasks they were
        made under, optimized or not; ``resources`` etc. to every task.
        With an asynchronous client, a coroutine."""
        require_dask()
        options = task_options(
            resources, retries, priority, workers, allow_other_workers, annotated=False
        )
        futures = dask_api.compute(self, collections, optimize_graph, options)
        return _ready(futures) if self.asynchronous else futures

    def persist(
        self,
        collections: Any,
        resources: Mapping[str, float | str] | None = None,
        optimize_graph: bool = True,
        priority: int = 0,
        retries: int = 0,
        workers: str | Iterable[str] | None = None,
        allow_other_workers: bool = False,
    ) -> Any:
        """The same kind of collection (or list), backed by results held on
        the cluster while it lives. With an asynchronous client, a coroutine."""
        require_dask()
        options = task_options(
            resources, retries, priority, workers, allow_other_workers, annotated=False
        )
        persisted = dask_api.persist(self, collections, optimize_graph, options)
        return _ready(persisted) if self.asynchronous else persisted

    def get(
        self,
        dsk: Any,
        keys: Any,
        resources: Mapping[str, float | str] | None = None,
        priority: int = 0,
        retries: int = 0,
        workers: str | Iterable[str] | None = None,
        allow_other_workers: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Run a dask graph and return the results of ``keys`` (a key, or
        nested lists of them): the scheduler function of ``dask.compute(x,
        scheduler=client.get)``. With an asynchronous client, a coroutine."""
        require_dask()
        options = task_options(
            resources, retries, priority, workers, allow_other_workers, annotated=False
        )
        return dask_api.get(self, dsk, keys, options)

    # -------------------------------------------------------------- results

    @overload
    def gather(self: Client[Literal[False]], futures: Any) -> Any: ...
    @overload
    def gather(self: Client[Literal[True]], futures: Any) -> Coroutine[Any, Any, Any]: ...
    def gather(self, futures: Any) -> Any:
        """Results of futures, in the same nesting (lists, tuples, dicts)."""

        async def run() -> Any:
            return await self.core.gather(futures)

        return self._bridge.run(run())

    @overload
    def cancel(
        self: Client[Literal[False]], futures: Future[Any] | Iterable[Future[Any]]
    ) -> None: ...
    @overload
    def cancel(
        self: Client[Literal[True]], futures: Future[Any] | Iterable[Future[Any]]
    ) -> Coroutine[Any, Any, None]: ...
    def cancel(self, futures: Future[Any] | Iterable[Future[Any]]) -> Any:
        items = [futures] if isinstance(futures, Future) else list(futures)
        return self._bridge.cancel([f.key for f in items])

    # ---------------------------------------------------- the scheduler's

    @overload
    def set_resources(
        self: Client[Literal[False]], worker: str, resources: Mapping[str, float | str]
    ) -> WorkerInfo: ...
    @overload
    def set_resources(
        self: Client[Literal[True]], worker: str, resources: Mapping[str, float | str]
    ) -> Coroutine[Any, Any, WorkerInfo]: ...
    def set_resources(self, worker: str, resources: Mapping[str, float | str]) -> Any:
        """Change what ``worker`` (an address or a name) declares, while it runs.

        Raising starts waiting tasks at once; lowering below what running tasks
        hold lets them finish and starts nothing new that needs more than fits.
        Returns the worker's entry as in ``scheduler_info()["workers"]``.
        """
        request = pb.SetWorkerResourcesRequest(
            worker=worker, resources=check_resources(resources), resources_text=spellings(resources)
        )

        async def run() -> WorkerInfo:
            reply = await self.core.transport.set_worker_resources(request, CALL_TIMEOUT_S)
            return worker_info(reply.worker)

        return self._bridge.run(run())

    @overload
    def explain(self: Client[Literal[False]], future: Future[Any] | str) -> str: ...
    @overload
    def explain(
        self: Client[Literal[True]], future: Future[Any] | str
    ) -> Coroutine[Any, Any, str]: ...
    def explain(self, future: Future[Any] | str) -> Any:
        """One sentence on why a task is not running (or what it is doing)."""
        request = pb.ExplainTaskRequest(key=future.key if isinstance(future, Future) else future)

        async def run() -> str:
            reply = await self.core.transport.explain_task(request, CALL_TIMEOUT_S)
            return str(reply.explanation)

        return self._bridge.run(run())

    @overload
    def scheduler_info(self: Client[Literal[False]]) -> ClusterInfo: ...
    @overload
    def scheduler_info(self: Client[Literal[True]]) -> Coroutine[Any, Any, ClusterInfo]: ...
    def scheduler_info(self) -> Any:
        """Workers with their resources and what is in use now."""

        async def run() -> ClusterInfo:
            state = await self.core.transport.get_cluster_state(
                pb.GetClusterStateRequest(), CALL_TIMEOUT_S
            )
            return cluster_info(state)

        return self._bridge.run(run())

    @overload
    def wait_for_workers(
        self: Client[Literal[False]], n_workers: int, timeout: float | None = None
    ) -> None: ...
    @overload
    def wait_for_workers(
        self: Client[Literal[True]], n_workers: int, timeout: float | None = None
    ) -> Coroutine[Any, Any, None]: ...
    def wait_for_workers(self, n_workers: int, timeout: float | None = None) -> Any:
        """Return once at least ``n_workers`` workers are connected; raise
        TimeoutError if they are not within ``timeout`` seconds."""

        async def run() -> None:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                state = await self.core.transport.get_cluster_state(
                    pb.GetClusterStateRequest(), CALL_TIMEOUT_S
                )
                if len(state.workers) >= n_workers:
                    return
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{n_workers} worker(s) did not join within {timeout:g}s "
                        f"({len(state.workers)} did)"
                    )
                await asyncio.sleep(WORKERS_POLL_S)

        return self._bridge.run(run())

    def __repr__(self) -> str:
        return f"<Client scheduler={self.address!r}>"


async def _ready(value: T) -> T:
    return value


__all__ = ["Client"]
