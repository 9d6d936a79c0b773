"""Bad input from a submitter, on real processes: a payload that is not a pickle,
and a function the worker cannot unpickle. The submitter gets a clear error for
that task; its other tasks, other clients and the worker carry on."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import grpc
import pytest

from apportion_common import serialize
from apportion_common.grpc_server import insecure_channel
from client_sdk import Client, SerializationError
from protos import apportion_pb2 as pb
from protos import apportion_pb2_grpc as pb_grpc
from tests.helpers.processes import Processes, assert_all_released, cluster_state

TIMEOUT = 30.0


def explode(message: str) -> None:
    raise RuntimeError(message)


class UnpicklesBadly:
    """Pickles fine here; unpickling it (on the worker) raises."""

    def __reduce__(self) -> tuple[object, ...]:
        return (explode, ("this argument cannot be rebuilt",))


def identity(x: object) -> object:
    return x


@pytest.fixture
def module_only_here(tmp_path: Path) -> Iterator[ModuleType]:
    """A module this process imports and the worker's cannot: its functions
    are pickled by reference, so the worker fails to unpickle them."""
    name = f"only_here_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text("def triple(x):\n    return 3 * x\n")
    sys.path.insert(0, str(tmp_path))
    try:
        yield __import__(name)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)


async def test_a_garbage_payload_errs_that_task_alone(
    processes: Processes, scheduler_address: str
) -> None:
    """A TaskSpec whose payload is not a pickle (sent raw: the SDK cannot make
    one) errs with the reason; the good task in the same batch runs."""
    worker = processes.worker(scheduler_address, "--nthreads", "2")
    good = pb.TaskSpec(key="good", payload=serialize.dump_call(abs, (-4,), {}))
    garbage = pb.TaskSpec(key="garbage", payload=b"\x80\x05this is not a pickle")
    async with insecure_channel(scheduler_address) as channel:
        call = pb_grpc.SchedulerStub(channel).ClientStream(timeout=TIMEOUT)
        await call.write(pb.ClientToScheduler(hello=pb.ClientHello(client_id="raw-client")))
        await call.write(pb.ClientToScheduler(submit=pb.SubmitTasks(tasks=[garbage, good])))
        final: dict[str, pb.TaskUpdate] = {}
        while len(final) < 2:
            msg = await asyncio.wait_for(call.read(), TIMEOUT)
            assert msg is not grpc.aio.EOF
            final.update({u.key: u for u in msg.updates if u.status != pb.TASK_STATUS_PENDING})
        assert final["good"].status == pb.TASK_STATUS_FINISHED
        assert serialize.loads(final["good"].inline_result) == 4
        error = final["garbage"].status, final["garbage"].error
        assert error[0] == pb.TASK_STATUS_ERROR
        assert error[1].type_name == "apportion_common.serialize.SerializationError"
        assert "cannot unpickle the function of task 'garbage'" in error[1].message
        await call.done_writing()
    # The worker is still there and still works, for anyone.
    with Client(scheduler_address) as client:
        assert client.submit(abs, -5).result(timeout=TIMEOUT) == 5
    assert worker.poll() is None
    assert len(cluster_state(scheduler_address).workers) == 1


def test_a_function_the_worker_cannot_unpickle_errs_clearly(
    processes: Processes, scheduler_address: str, module_only_here: ModuleType
) -> None:
    worker = processes.worker(scheduler_address, "--nthreads", "2", "--resources", "GPU=1")
    with Client(scheduler_address) as client:
        lost = client.submit(module_only_here.triple, 2, resources={"GPU": 1})
        bad_arg = client.submit(identity, UnpicklesBadly(), resources={"GPU": 1})
        fine = [client.submit(identity, i, resources={"GPU": 1}) for i in range(4)]

        with pytest.raises(SerializationError) as info:
            lost.result(timeout=TIMEOUT)
        message = str(info.value)
        assert f"cannot unpickle the function of task {lost.key!r}" in message
        assert module_only_here.__name__ in message  # No module named ...
        assert lost.status == "error"

        with pytest.raises(SerializationError, match="this argument cannot be rebuilt"):
            bad_arg.result(timeout=TIMEOUT)

        assert client.gather(fine) == [0, 1, 2, 3]
    assert_all_released(scheduler_address)
    assert worker.poll() is None
    assert len(cluster_state(scheduler_address).workers) == 1
