"""Getting a run's inputs: from this worker's store, or from the peers that hold them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from apportion_common.locations import InputLocation
from apportion_common.serialize import Frames
from apportion_common.transfer import ChannelPool, NotShared, ResultUnavailable

from .assignment import Assignment
from .store import ResultStore

log = logging.getLogger("worker_service")

#: Inputs one run fetches from peers at the same time: side by side, a run
#: with many inputs does not wait a round trip for each.
MAX_CONCURRENT_FETCHES = 16
#: Inputs at most this large (as the scheduler announces them) that live on
#: one peer come in one FetchResults call rather than a stream each.
SMALL_FETCH_BYTES = 64 * 1024
#: Inputs at least this large that a peer on this host holds come through
#: shared memory; below it a segment's making and mapping cost more than
#: the stream's copies.
SHARE_MIN_BYTES = 1024 * 1024


@dataclass(slots=True)
class Inputs:
    """A run's inputs as far as they could be had."""

    values: dict[str, Frames] = field(default_factory=dict)
    #: (key, nbytes) of those fetched from peers (and now kept here too)
    fetched: list[tuple[str, int]] = field(default_factory=list)
    #: (key, address tried) of those no holder gave; the run cannot start
    missing: list[tuple[str, str]] = field(default_factory=list)


def local_inputs(
    store: ResultStore, a: Assignment, from_disk: bool = True
) -> dict[str, Frames] | None:
    """The run's inputs if this worker holds every one, else None; also None
    if one is spilled and not ``from_disk`` (on the event loop, which must not
    wait for a file: :meth:`InputFetcher.gather` reads it in a thread)."""
    values: dict[str, Frames] = {}
    for item in a.inputs:
        if not from_disk and store.is_spilled(item.key):
            return None
        local = store.get(item.key)
        if local is None:
            return None
        values[item.key] = local
    return values


class InputFetcher:
    """Fetches inputs from peers into this worker's store."""

    def __init__(
        self, store: ResultStore, peers: ChannelPool, own_address: str, share: bool = True
    ) -> None:
        self._store = store
        self._peers = peers
        #: this worker's own address: never fetched from (a local copy is in the store)
        self.own_address = own_address
        #: take large inputs from peers on this host through shared memory
        self.share = share

    async def gather(self, a: Assignment) -> Inputs:
        inputs = Inputs()
        remote: dict[str, InputLocation] = {}
        for item in a.inputs:
            local = await self.local(item.key)
            if local is not None:
                inputs.values[item.key] = local
            else:
                remote.setdefault(item.key, item)
        if not remote:
            return inputs
        together = await self._fetch_small_together(a.key, remote.values())
        for key, small in together.items():
            del remote[key]
            self._keep(inputs, key, small)
        limit = asyncio.Semaphore(MAX_CONCURRENT_FETCHES)

        async def fetch(item: InputLocation) -> tuple[Frames | None, list[str]]:
            async with limit:
                return await self.fetch_one(item, f"task {a.key}")

        outcomes = await asyncio.gather(*(fetch(item) for item in remote.values()))
        for key, (data, tried) in zip(remote, outcomes, strict=True):
            if data is None:
                inputs.missing.extend((key, address) for address in tried or [""])
            else:
                self._keep(inputs, key, data)
        return inputs

    async def local(self, key: str) -> Frames | None:
        """``key``'s value if this worker holds it, read in a thread if spilled."""
        if self._store.is_spilled(key):
            return await asyncio.to_thread(self._store.get, key)
        return self._store.get(key)

    async def fetch_one(self, item: InputLocation, why: str) -> tuple[Frames | None, list[str]]:
        """``item``'s value from the first holder that has it (through shared
        memory where it may), and the addresses tried in vain before it."""
        tried: list[str] = []
        for i, address in enumerate(item.addresses):
            if address != self.own_address:  # our own copy would have been local
                if self._shares(item, i):
                    try:
                        return await self._peers.share(address, item.key), tried
                    except NotShared:
                        pass  # bytes only: the stream is the faster way
                    except ResultUnavailable as exc:
                        log.info("%s: input %s; streaming it instead", why, exc)
                try:
                    return await self._peers.fetch(address, item.key, nbytes=item.nbytes), tried
                except ResultUnavailable as exc:
                    log.warning("%s: input %s", why, exc)
            tried.append(address)
        return None, tried

    def _shares(self, item: InputLocation, index: int) -> bool:
        return (
            self.share
            and item.nbytes >= SHARE_MIN_BYTES
            and index < len(item.same_host)
            and item.same_host[index]
        )

    def _keep(self, inputs: Inputs, key: str, data: Frames) -> None:
        self._store.put(key, 0, data)
        inputs.values[key] = data
        inputs.fetched.append((key, data.nbytes))

    async def _fetch_small_together(
        self, task_key: str, inputs: Iterable[InputLocation]
    ) -> dict[str, Frames]:
        """Small inputs that live on the same peer, fetched in one round trip
        per peer (FetchResults); what does not come back this way is fetched
        one by one after (another holder, a result larger than announced)."""
        by_peer: dict[str, list[str]] = {}
        for item in inputs:
            if item.nbytes <= SMALL_FETCH_BYTES:
                peer = next((a for a in item.addresses if a != self.own_address), None)
                if peer is not None:
                    by_peer.setdefault(peer, []).append(item.key)
        groups = [(peer, keys) for peer, keys in by_peer.items() if len(keys) > 1]
        if not groups:
            return {}

        async def fetch(peer: str, keys: list[str]) -> dict[str, Frames]:
            try:
                return await self._peers.fetch_small(peer, keys, SMALL_FETCH_BYTES)
            except ResultUnavailable as exc:
                log.warning("task %s: inputs %s", task_key, exc)
                return {}

        found: dict[str, Frames] = {}
        for part in await asyncio.gather(*(fetch(peer, keys) for peer, keys in groups)):
            found.update(part)
        return found
