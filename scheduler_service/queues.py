"""Ready tasks, queued by resource shape, best first.

:class:`ReadyQueues` owns one heap per shape (so a task whose resource is
exhausted never holds back one whose resource is free), the head entry of
each, the heads of all shapes as one list kept sorted (best first), the
shapes set aside ("parked") because no connected worker could ever hold
them, and each ready task's ``ready_gen`` and ``ready_since``. A task enters
through :meth:`ReadyQueues.push`, which marks its shape for the placement
pass (:class:`~.records.Changes`); it leaves lazily: an entry whose task is
no longer READY with that ``ready_gen`` is stale and skipped.

It must never decide where a task goes nor change anything but a task's
place here (state READY, ``ready_gen``, ``ready_since``); which heads the
placement pass passes over, assigns or parks is that pass's call.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections.abc import Iterator

from .records import READY, Changes, Shape, TaskRecord

#: A ready task in its shape's heap: (-priority, order(task), ready_gen, key).
#: Stale once the task is no longer READY with that ready_gen (skipped lazily).
Entry = tuple[int, int, int, str]

#: More tasks than one scheduler ever numbers (seq): see order.
_DEPTH_STRIDE = 1 << 48


def order(task: TaskRecord) -> int:
    """Where a ready task stands among those of its priority: deeper in its
    graph first, then in submission order. Finishing what started frees its
    inputs sooner, and a pipeline's later stages (often those that need the
    scarce resource: load, then process on a GPU) start as soon as their
    inputs are there instead of after every first-stage task; as dask.order
    prefers too. One int, so a heap entry stays four items."""
    return task.seq - task.depth * _DEPTH_STRIDE


class ReadyQueues:
    def __init__(self, tasks: dict[str, TaskRecord], changes: Changes) -> None:
        self._tasks = tasks
        self._changes = changes
        self._gens = itertools.count(1)
        #: each shape's ready tasks, a heap ordered by (-priority, order)
        self.heaps: dict[Shape, list[Entry]] = {}
        # The head entry of every shape's heap (its heap[0], kept in step), and
        # those heads, one per shape, as a list kept sorted, best first. A
        # placement pass walks it in order and stops at the first head it can
        # place, instead of rebuilding every shape's head (a large share of a
        # decision's time with dozens of shapes); heads it passes over stay
        # where they are (as a heap, each would cost a pop and a push back).
        self._head_of: dict[Shape, Entry] = {}
        self.heads: list[tuple[Entry, Shape]] = []
        # Shapes no connected worker could ever hold: their heads wait out of
        # `heads` until a worker joins or changes, instead of being tried (and
        # passed over) by every pass.
        self.parked: set[Shape] = set()

    def push(self, task: TaskRecord, now: float) -> None:
        """``task`` is ready (its inputs are in memory) since ``now``."""
        task.state = READY
        task.ready_gen = next(self._gens)
        task.ready_since = now
        shape = task.shape
        heap = self.heaps.get(shape)
        if heap is None:
            heap = self.heaps[shape] = []
        entry = (-task.priority, order(task), task.ready_gen, task.key)
        heapq.heappush(heap, entry)
        if heap[0] is entry:
            self._new_head(shape, entry)
        self._changes.shapes.add(shape)

    def _new_head(self, shape: Shape, entry: Entry) -> None:
        """``entry`` went to the top of ``shape``'s heap (a better task came)."""
        old = self._head_of.get(shape)
        self._head_of[shape] = entry
        if shape in self.parked:
            return  # still no worker could hold it
        heads = self.heads
        if old is not None:
            del heads[bisect.bisect_left(heads, (old, shape))]
        bisect.insort(heads, (entry, shape))

    def ready_head(self, at: int) -> TaskRecord | None:
        """The task of ``heads[at]`` or, where that went stale, of the first
        current head from there on; None past the last."""
        heads = self.heads
        tasks = self._tasks
        while at < len(heads):
            _, _, gen, key = heads[at][0]
            task = tasks.get(key)
            if task is not None and task.state == READY and task.ready_gen == gen:
                return task
            self.take_head(at)
        return None

    def take_head(self, at: int) -> None:
        """``heads[at]`` is assigned (or went stale): drop it from its shape's
        heap, and let the shape's next ready task take its place among the
        heads (never before ``at``: it comes after the one it follows);
        forget the shape if it has none left."""
        heads = self.heads
        shape = heads[at][1]
        heap = self.heaps[shape]
        heapq.heappop(heap)
        following = self._peek(heap)
        del heads[at]
        if following is not None:
            self._head_of[shape] = following
            bisect.insort(heads, (following, shape), lo=at)
        else:
            del self.heaps[shape]
            del self._head_of[shape]

    def _peek(self, heap: list[Entry]) -> Entry | None:
        while heap:
            entry = heap[0]
            task = self._tasks.get(entry[3])
            if task is not None and task.state == READY and task.ready_gen == entry[2]:
                return entry
            heapq.heappop(heap)
        return None

    def park(self, at: int) -> None:
        """Set ``heads[at]``'s shape aside: no connected worker could ever
        hold it (until the workers change: :meth:`unpark_all`)."""
        _, shape = self.heads.pop(at)
        self.parked.add(shape)

    def unpark_all(self) -> None:
        """The workers changed: every parked shape's head stands again."""
        for shape in self.parked:
            bisect.insort(self.heads, (self._head_of[shape], shape))
        self.parked.clear()

    # ------------------------------------------------------------ reading

    def by_shape(self) -> Iterator[list[TaskRecord]]:
        """The ready tasks of each shape, in heap order (not sorted); each
        shape's list is made as it comes, so tasks may change state between
        shapes."""
        tasks = self._tasks
        for heap in list(self.heaps.values()):
            yield [
                task
                for _, _, gen, key in heap
                if (task := tasks.get(key)) is not None
                and task.state == READY
                and task.ready_gen == gen
            ]

    def ahead_of(self, task: TaskRecord) -> int:
        """How many ready tasks of ``task``'s shape go before it."""
        mine = (-task.priority, order(task))
        ahead = 0
        for prio, rank, gen, key in self.heaps.get(task.shape, []):
            other = self._tasks.get(key)
            if (
                other is not None
                and other is not task
                and other.state == READY
                and other.ready_gen == gen
                and (prio, rank) < mine
            ):
                ahead += 1
        return ahead

    def head_task(self, shape: Shape) -> TaskRecord | None:
        """The best current ready task of ``shape`` (None: none is ready)."""
        for _, _, gen, key in sorted(self.heaps.get(shape, [])):
            task = self._tasks.get(key)
            if task is not None and task.state == READY and task.ready_gen == gen:
                return task
        return None
