"""The worker's side of the wire: assignments in, registration out."""

from __future__ import annotations

from protos import apportion_pb2 as pb
from worker_service import wire


def assignment(*inputs: pb.InputLocation) -> pb.TaskAssignment:
    return pb.TaskAssignment(key="t", run_id=1, payload=b"p", inputs=list(inputs))


def test_same_host_flags_come_with_each_input() -> None:
    a = wire.assignment_from_pb(
        assignment(
            pb.InputLocation(key="x", addresses=["h:1", "h:2"], nbytes=5, same_host=[True, False]),
            pb.InputLocation(key="y", addresses=["h:3"], nbytes=6),
        ),
        "test",
    )
    assert [(i.key, i.addresses, i.nbytes, i.same_host) for i in a.inputs] == [
        ("x", ("h:1", "h:2"), 5, (True, False)),
        ("y", ("h:3",), 6, ()),
    ]


def test_flags_that_do_not_match_the_addresses_are_ignored() -> None:
    a = wire.assignment_from_pb(
        assignment(pb.InputLocation(key="x", addresses=["h:1", "h:2"], same_host=[True])), "test"
    )
    assert a.inputs[0].same_host == ()


def test_the_registration_carries_the_host_id() -> None:
    msg = wire.registration_to_pb("w", "h:1", 2, {"GPU": 1.0}, 42, [], host_id="abc")
    assert msg.register.host_id == "abc" and msg.register.pid == 42


def test_host_peers_are_heard_only_when_the_batch_says_so() -> None:
    told = wire.instructions_from_pb(pb.WorkerInstructions(host_peers=0))
    assert told.host_peers == 0
    assert wire.instructions_from_pb(pb.WorkerInstructions(host_peers=3)).host_peers == 3
    assert wire.instructions_from_pb(pb.WorkerInstructions()).host_peers is None


def test_replications_with_a_bad_key_or_no_holder_are_skipped_and_retire_is_heard() -> None:
    batch = pb.WorkerInstructions(retire=True)
    batch.replicate.add(key="x", addresses=["h:1"], nbytes=5)
    batch.replicate.add(key="", addresses=["h:1"])
    batch.replicate.add(key="y")
    told = wire.instructions_from_pb(batch)
    assert [(i.key, i.addresses, i.nbytes) for i in told.replicate] == [("x", ("h:1",), 5)]
    assert told.retire and not wire.instructions_from_pb(pb.WorkerInstructions()).retire


def test_reports_carry_copies_taken_and_a_wish_to_retire() -> None:
    reports = wire.Reports(acquired=[("x", 5)], retire_me=True)
    assert reports
    msg = wire.reports_to_pb(reports).reports
    assert [(h.key, h.nbytes) for h in msg.acquired] == [("x", 5)] and msg.retire_me
