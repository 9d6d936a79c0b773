"""The wire boundary: every field that arrives is checked, and a refusal names it.

Run as a script, this file times the check of one TaskSpec (the per-task cost
the scheduler pays at its boundary):

    .venv/bin/python -m tests.unit.test_wire
"""

from __future__ import annotations

import math
import timeit

import pytest

from apportion_common import boundary, serialize
from apportion_common.boundary import WireError, check_address
from protos import apportion_pb2 as pb
from scheduler_service import wire

PAYLOAD = serialize.dump_call(abs, (-1,), {})


def spec(**fields: object) -> pb.TaskSpec:
    base: dict[str, object] = {"key": "t", "payload": PAYLOAD}
    base.update(fields)
    return pb.TaskSpec(**base)  # type: ignore[arg-type]


def test_a_good_task_spec_becomes_a_submission() -> None:
    sub = wire.submission_from_pb(
        spec(
            resources={"GPU": 0.5, "MEMORY": 1e11, "unused": 0},
            dependencies=["a", "b"],
            priority=-3,
            retries=2,
            workers=["gpu-1", "127.0.0.1:9000"],
            allow_other_workers=True,
        )
    )
    assert sub.key == "t" and sub.payload == PAYLOAD
    # Fixed point; a zero amount is no need at all.
    assert sub.resources == {"GPU": 500_000_000, "MEMORY": 10**20}
    assert sub.dependencies == ("a", "b") and sub.workers == ("gpu-1", "127.0.0.1:9000")
    assert (sub.priority, sub.retries, sub.allow_other_workers) == (-3, 2, True)


@pytest.mark.parametrize(
    ("fields", "detail"),
    [
        ({"key": ""}, "task '': key: String should have at least 1 character"),
        ({"key": "k" * 1025}, "key: String should have at most 1024 characters"),
        ({"resources": {"GPU": math.nan}}, "resources['GPU']: Input should be a finite number"),
        ({"resources": {"GPU": math.inf}}, "resources['GPU']: Input should be a finite number"),
        ({"resources": {"GPU": -1}}, "resources['GPU']: Input should be greater than or equal"),
        ({"resources": {"GPU": 1e19}}, "resources['GPU']: Input should be less than or equal"),
        ({"resources": {"": 1}}, "resources['']: the name is empty"),
        ({"resources": {"  ": 1}}, "resources['  ']: the name is blank"),
        ({"resources": {"n" * 257: 1}}, "the name is longer than 256 characters"),
        ({"resources": {f"r{i}": 1 for i in range(1025)}}, "resources: Dictionary should have at"),
        ({"dependencies": ["a", ""]}, "dependencies[1]: String should have at least 1"),
        ({"dependencies": ["d"] * 100_001}, "dependencies: Tuple should have at most 100000"),
        ({"workers": ["k" * 1025]}, "workers[0]: String should have at most 1024"),
        (
            {"payload": bytes(boundary.MAX_PAYLOAD_BYTES + 1)},
            "payload: 134217729 bytes; at most 134217728",
        ),
    ],
)
def test_a_bad_task_spec_is_refused_naming_the_field(
    fields: dict[str, object], detail: str
) -> None:
    with pytest.raises(WireError) as info:
        wire.submission_from_pb(spec(**fields))
    assert str(info.value).startswith("task '")
    assert detail in str(info.value)


def test_a_refusal_names_a_few_problems_and_echoes_no_huge_input() -> None:
    bad = spec(key="x" * 1000, resources={"a" * 200: math.nan}, dependencies=["", "", ""])
    with pytest.raises(WireError) as info:
        wire.submission_from_pb(bad)
    text = str(info.value)
    assert "and 1 more" in text
    assert len(text) < 600  # the key and the name are shortened, not echoed whole


@pytest.mark.parametrize(
    "address", ["127.0.0.1:8786", "gpu-1.cluster.local:1", "[::1]:65535", "[fe80::1%eth0]:80"]
)
def test_addresses_that_are_host_and_port(address: str) -> None:
    assert check_address(address) == address


@pytest.mark.parametrize(
    "address",
    [
        "",
        "host",
        ":80",
        "host:",
        "host:0",
        "host:65536",
        "host:http",
        "a b:1",
        "[::1]",
        "[:80",
        "h:+1",
    ],
)
def test_addresses_that_are_not(address: str) -> None:
    with pytest.raises(ValueError, match=r"host:port|port in 1\.\.65535"):
        check_address(address)


def register(**fields: object) -> pb.RegisterWorker:
    base: dict[str, object] = {"name": "w", "address": "127.0.0.1:9000", "nthreads": 2}
    base.update(fields)
    return pb.RegisterWorker(**base)  # type: ignore[arg-type]


def test_a_good_registration() -> None:
    reg = wire.registration_from_pb(register(name="", resources={"GPU": 2}))
    assert reg == wire.Registration("127.0.0.1:9000", "127.0.0.1:9000", 2, {"GPU": 2 * 10**9})
    assert wire.registration_from_pb(register(host_id="abc")).host_id == "abc"


def test_a_registration_keeps_the_amounts_as_written() -> None:
    reg = wire.registration_from_pb(
        register(
            resources={"MEMORY": 100e9, "GPU": 2, "NONE": 0},
            declared_text={"MEMORY": "100GB", "GPU": "2", "NONE": "0"},
        )
    )
    # A zero amount is not declared, so neither is its text.
    assert reg.resources_text == {"MEMORY": "100GB", "GPU": "2"}
    assert wire.registration_from_pb(register(resources={"GPU": 2})).resources_text == {}


@pytest.mark.parametrize(
    ("fields", "detail"),
    [
        (
            {"resources": {"MEMORY": 70e9}, "declared_text": {"MEMORY": "100GB"}},
            "declared_text['MEMORY']: '100GB' does not read as the amount declared (70000000000.0)",
        ),
        ({"declared_text": {"GPU": "2"}}, "declared_text['GPU']: no amount of that resource"),
        (
            {"resources": {"GPU": 2}, "declared_text": {"GPU": "x" * 65}},
            "declared_text['GPU']: String should have at most 64 characters",
        ),
        (
            {"resources": {"GPU": 2}, "declared_text": {"GPU": ""}},
            "declared_text['GPU']: String should have at least 1 character",
        ),
        ({"nthreads": 0}, "nthreads: Input should be greater than or equal to 1"),
        ({"nthreads": 100_001}, "nthreads: Input should be less than or equal to 100000"),
        ({"address": "localhost"}, "address: 'localhost' is not host:port"),
        ({"address": "h:0"}, "address: 'h:0' has no port in 1..65535"),
        ({"name": "n" * 1025}, "name: String should have at most 1024"),
        ({"host_id": "h" * 1025}, "host_id: String should have at most 1024"),
        ({"resources": {"GPU": math.nan}}, "resources['GPU']: Input should be a finite number"),
    ],
)
def test_a_bad_registration_is_refused_naming_the_field(
    fields: dict[str, object], detail: str
) -> None:
    with pytest.raises(WireError) as info:
        wire.registration_from_pb(register(**fields))
    assert str(info.value).startswith("RegisterWorker from ")
    assert detail in str(info.value)


def test_reports_become_events() -> None:
    done = pb.TaskFinished(
        key="t", run_id=4, nbytes=10, fetched_keys=["a"], fetched_nbytes=[3], inline_result=b"r"
    )
    event = wire.finished_from_pb(1, done, "finished[0]")
    assert (event.key, event.run_id, event.fetched, event.inline_result) == (
        "t",
        4,
        (("a", 3),),
        b"r",
    )
    missing = pb.TaskMissingInputs(
        key="t",
        run_id=4,
        inputs=[pb.MissingInput(key="a", address=""), pb.MissingInput(key="b", address="h:1")],
    )
    assert wire.missing_from_pb(1, missing, "m").missing == (("a", ""), ("b", "h:1"))
    with pytest.raises(WireError, match=r"m: inputs\[0\].address: 'nowhere' is not host:port"):
        wire.missing_from_pb(
            1,
            pb.TaskMissingInputs(
                key="t", run_id=4, inputs=[pb.MissingInput(key="a", address="nowhere")]
            ),
            "m",
        )


def test_parallel_lists_must_match() -> None:
    done = pb.TaskFinished(key="t", run_id=1, fetched_keys=["a", "b"], fetched_nbytes=[1])
    with pytest.raises(WireError, match="fetched_keys has 2 items but fetched_nbytes 1"):
        wire.finished_from_pb(1, done, "finished[0]")


def test_over_long_error_text_is_cut_not_refused() -> None:
    limit = boundary.MAX_ERROR_TEXT_CHARS
    error = pb.TaskError(
        type_name="",
        message="m" * (limit + 10),
        traceback="start" + "t" * limit + "where it raised",
        exception=b"x" * (boundary.MAX_ERROR_PICKLE_BYTES + 1),
    )
    info = wire.error_from_pb(error)
    assert info.type_name == "builtins.Exception"
    assert info.message.startswith("m" * limit) and "10 characters cut" in info.message
    assert info.traceback.endswith("where it raised") and "start" not in info.traceback
    assert info.exception == b""  # rebuilt from type name and message instead


def test_key_lists_and_client_ids() -> None:
    assert wire.check_keys(["a", "b"], "cancel.keys") == ("a", "b")
    with pytest.raises(WireError, match=r"^cancel.keys\[1\]: String should have at least 1"):
        wire.check_keys(["a", ""], "cancel.keys")
    assert wire.client_id_from_pb(pb.ClientHello(client_id="c", resume_keys=["k"])) == (
        "c",
        ("k",),
    )
    with pytest.raises(WireError, match=r"ClientHello\.client_id"):
        wire.client_id_from_pb(pb.ClientHello())


def time_task_spec_checks(number: int = 100_000) -> dict[str, float]:
    """Microseconds per TaskSpec for the scheduler's boundary (best of 5)."""
    typical = spec(
        key="process-0123456789abcdef0123456789abcdef",
        resources={"GPU": 1.0},
        dependencies=["load-0123456789abcdef0123456789abcdef"],
    )
    bare = spec(key="inc-0123456789abcdef0123456789abcdef")
    return {
        name: min(timeit.repeat(lambda s=s: wire.submission_from_pb(s), number=number, repeat=5))
        / number
        * 1e6
        for name, s in (("one resource, one dependency", typical), ("no resources", bare))
    }


if __name__ == "__main__":
    for name, us in time_task_spec_checks().items():
        print(f"TaskSpec -> TaskSubmission ({name}): {us:.2f} us")


def test_set_resources_carries_the_amounts_as_written() -> None:
    request = pb.SetWorkerResourcesRequest(
        worker="w", resources={"MEMORY": 64 * 1024**3, "GPU": 4}, resources_text={"MEMORY": "64GiB"}
    )
    name, resources, written = wire.set_resources_from_pb(request)
    assert (name, written) == ("w", {"MEMORY": "64GiB"})
    assert resources == {"MEMORY": 64 * 1024**3 * 10**9, "GPU": 4 * 10**9}
    request.resources_text["GPU"] = "2"
    with pytest.raises(WireError, match=r"resources_text\['GPU'\]: '2' does not read as"):
        wire.set_resources_from_pb(request)
