"""A :class:`~apportion_common.gpus.GpuDevice` as an ``apportion.v1.GpuDevice``,
both ways: the worker registers its devices, the scheduler shows them."""

from __future__ import annotations

from protos import apportion_pb2 as pb

from .gpus import GpuDevice


def gpu_to_pb(g: GpuDevice) -> pb.GpuDevice:
    return pb.GpuDevice(
        id=g.id, index=g.index, uuid=g.uuid, name=g.name, memory_bytes=g.memory_bytes
    )


def gpu_from_pb(g: pb.GpuDevice) -> GpuDevice:
    return GpuDevice(g.id, g.index, g.uuid, g.name, g.memory_bytes)
