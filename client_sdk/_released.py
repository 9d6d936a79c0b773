"""Specs of tasks a client released before they finished (``del future``).

A task still pending may need one of them submitted again: a scheduler
killed before its journal held the graph comes back without it, and the
client no longer holds its future. They are kept while some pending task
needs them, and forgotten otherwise (pruned as releases pile up).
"""

from __future__ import annotations

from protos import apportion_pb2 as pb

#: Released specs kept beyond twice the keys held, before they are pruned.
SLACK = 1_000


class ReleasedSpecs:
    def __init__(self) -> None:
        self._specs: dict[str, pb.TaskSpec] = {}

    def keep(self, spec: pb.TaskSpec) -> None:
        self._specs[spec.key] = spec

    def piling_up(self, held: int) -> bool:
        """More kept than twice the ``held`` keys, and then some: time to prune
        with :meth:`needed_by` (amortized over the releases)."""
        return len(self._specs) > 2 * held + SLACK

    def needed_by(self, pending: list[pb.TaskSpec]) -> list[pb.TaskSpec]:
        """The kept specs ``pending`` tasks need, transitively, each input
        before what needs it; the others are forgotten."""
        kept = self._specs
        needed: dict[str, pb.TaskSpec] = {}
        stack: list[str] = [dep for spec in pending for dep in spec.dependencies]
        while stack:
            key = stack.pop()
            spec = kept.get(key)
            if spec is not None and key not in needed:
                needed[key] = spec
                stack.extend(spec.dependencies)
        self._specs = needed
        ordered: list[pb.TaskSpec] = []
        placed: set[str] = set()
        for root in needed:
            todo: list[tuple[str, bool]] = [(root, False)]
            while todo:  # post-order: each input before what needs it
                key, inputs_placed = todo.pop()
                if key in placed or key not in needed:
                    continue
                if inputs_placed:
                    placed.add(key)
                    ordered.append(needed[key])
                else:
                    todo.append((key, True))
                    todo.extend((dep, False) for dep in needed[key].dependencies)
        return ordered
