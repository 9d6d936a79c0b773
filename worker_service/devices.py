"""Which GPUs each run holds on a worker that knows its devices (GPU=auto).

The scheduler counts GPU as an amount; this ledger turns a run's amount into
concrete devices, apart from all I/O. A run holding ``GPU=k`` gets
``floor(k)`` whole devices that no other run touches while it runs, and its
fraction (``GPU=0.5``, or the ``.5`` of ``GPU=1.5``) packed onto one more
device with room: the fullest device that still fits it (best fit), so that
whole devices stay free for whole leases as long as possible.

Amounts are fixed point, as in the ledger (one device is
:data:`~apportion_common.resources.QUANTA_PER_UNIT` quanta), so packing
0.1 + 0.2 + 0.7 fills a device exactly.

Packing can leave room spread over devices (0.6 on each of two) that the
scheduler, counting amounts, sees as 0.8 free: a run of ``GPU=0.8`` then fits
the amounts but no device; it waits here, holding its lease, until a device
frees (:meth:`DeviceLedger.allot` returns None).
"""

from __future__ import annotations

from collections.abc import Sequence

from apportion_common.resources import QUANTA_PER_UNIT

#: One whole device, in quanta.
DEVICE = QUANTA_PER_UNIT


class DeviceLedger:
    def __init__(self, devices: Sequence[str]) -> None:
        #: device ids in the worker's order (as CUDA_VISIBLE_DEVICES names them)
        self.devices: tuple[str, ...] = tuple(devices)
        #: quanta of each device held
        self.used: dict[str, int] = dict.fromkeys(self.devices, 0)
        #: run id -> (task key, {device: quanta})
        self.held: dict[int, tuple[str, dict[str, int]]] = {}
        #: set whenever a holding changes (the worker tells the scheduler)
        self.changed = False

    def could_ever_fit(self, amount: int) -> bool:
        whole, part = divmod(amount, DEVICE)
        return whole + (1 if part else 0) <= len(self.devices)

    def fits(self, amount: int) -> bool:
        """Devices for ``amount`` are free now (or none are needed)."""
        return self._choose(amount) is not None

    def allot(self, run_id: int, key: str, amount: int) -> tuple[str, ...] | None:
        """Give run ``run_id`` devices for ``amount`` quanta of GPU: their ids
        in the worker's order, or None when they are not free now. An amount
        no set of devices could hold (more than there are: the operator
        raised GPU past the devices) gets none: ``()``."""
        if run_id in self.held:
            raise ValueError(f"run {run_id} already holds devices")
        chosen = self._choose(amount)
        if chosen is None:
            return None
        if not chosen:
            return ()
        for device, quanta in chosen.items():
            self.used[device] += quanta
        self.held[run_id] = (key, chosen)
        self.changed = True
        return tuple(d for d in self.devices if d in chosen)

    def _choose(self, amount: int) -> dict[str, int] | None:
        if amount <= 0 or not self.could_ever_fit(amount):
            return {}
        whole, part = divmod(amount, DEVICE)
        free = [d for d in self.devices if self.used[d] == 0]
        chosen: dict[str, int] = {}
        if part:
            packed = [d for d in self.devices if 0 < self.used[d] <= DEVICE - part]
            if packed:
                # Best fit: the fullest device that takes it.
                home = max(packed, key=lambda d: self.used[d])
            elif len(free) > whole:
                home = free.pop()  # the last free one: whole leases take the first
            else:
                return None
            chosen[home] = part
        if len(free) < whole:
            return None
        for device in free[:whole]:
            chosen[device] = DEVICE
        return chosen

    def release(self, run_id: int) -> None:
        """The run ended: its devices go back (a run holding none: nothing)."""
        entry = self.held.pop(run_id, None)
        if entry is None:
            return
        for device, quanta in entry[1].items():
            self.used[device] -= quanta
        self.changed = True

    def holders(self) -> dict[str, list[str]]:
        """Each device and the keys of the tasks holding it now."""
        out: dict[str, list[str]] = {d: [] for d in self.devices}
        for key, chosen in self.held.values():
            for device in chosen:
                out[device].append(key)
        return out

    def validate(self) -> None:
        """Each device's use is the sum of its holders', between 0 and one
        whole device; a device held whole is held by one run alone."""
        summed = dict.fromkeys(self.devices, 0)
        for run_id, (_, chosen) in self.held.items():
            for device, quanta in chosen.items():
                if device not in summed or not 0 < quanta <= DEVICE:
                    raise AssertionError(f"run {run_id} holds {quanta} of device {device!r}")
                summed[device] += quanta
        for device in self.devices:
            if summed[device] != self.used[device]:
                raise AssertionError(
                    f"device {device}: used {self.used[device]} != held {summed[device]}"
                )
            if not 0 <= self.used[device] <= DEVICE:
                raise AssertionError(f"device {device} is used {self.used[device]}")
