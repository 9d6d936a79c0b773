"""gRPC errors become the SDK's exceptions in one place, with the messages
users and scripts have read so far (the CLI's, the client's)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from client_sdk import SchedulerConnectionError
from client_sdk._grpc_errors import (
    Caller,
    StreamBroken,
    access_error,
    call_error,
    mapped_call_errors,
    stream_error,
    unreachable,
    why_unreachable,
)

ADDR = "sched:8786"
NEEDS_TOKEN = "apportion.v1.Scheduler/GetClusterState needs a token"


class FakeRpcError(grpc.RpcError):  # type: ignore[misc]
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__()
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def rpc(code: grpc.StatusCode, details: str = "what the server said") -> FakeRpcError:
    return FakeRpcError(code, details)


@pytest.mark.parametrize("caller", list(Caller))
def test_a_missing_thing_or_a_bad_argument_is_the_caller_s_mistake(caller: Caller) -> None:
    missing = call_error(rpc(grpc.StatusCode.NOT_FOUND, "no worker 'x'"), "M", ADDR, False, caller)
    assert type(missing) is KeyError and missing.args == ("no worker 'x'",)
    bad = call_error(rpc(grpc.StatusCode.INVALID_ARGUMENT, "GPU=-1"), "M", ADDR, False, caller)
    assert type(bad) is ValueError and bad.args == ("GPU=-1",)


def test_a_client_s_failed_call_names_the_method() -> None:
    for code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED):
        exc = call_error(rpc(code, "gone"), "ExplainTask", ADDR, True, Caller.CLIENT)
        assert type(exc) is SchedulerConnectionError
        assert str(exc) == f"ExplainTask: {code.name}: gone"


def test_a_command_s_failed_call_says_the_scheduler_cannot_be_reached() -> None:
    exc = call_error(
        rpc(grpc.StatusCode.UNAVAILABLE, "failed to connect"), "M", ADDR, False, Caller.COMMAND
    )
    assert str(exc) == f"cannot reach the scheduler at {ADDR}: UNAVAILABLE: failed to connect"


@pytest.mark.parametrize(
    ("token_sent", "sent"), [(False, "no token"), (True, "a token it did not accept")]
)
def test_a_refusal_says_what_was_sent_and_what_to_pass(token_sent: bool, sent: str) -> None:
    refused = rpc(grpc.StatusCode.UNAUTHENTICATED, NEEDS_TOKEN)
    command = call_error(refused, "GetClusterState", ADDR, token_sent, Caller.COMMAND)
    assert str(command) == (
        f"the scheduler at {ADDR} refused this call (UNAUTHENTICATED: {NEEDS_TOKEN}); "
        f"this command sent {sent}: pass --token or set APPORTION_TOKEN"
    )
    client = access_error(refused, ADDR, token_sent)
    assert type(client) is SchedulerConnectionError
    assert str(client) == (
        f"the scheduler at {ADDR} refused this client (UNAUTHENTICATED: {NEEDS_TOKEN}); "
        f"this client sent {sent}: pass Client(..., token=...) or set APPORTION_TOKEN"
    )


def test_connecting_fails_with_a_scheduler_connection_error() -> None:
    # Whatever the status: a new client's check of its access failed.
    for code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
        exc = access_error(rpc(code, "d"), ADDR, False)
        assert type(exc) is SchedulerConnectionError
        assert str(exc) == f"the scheduler at {ADDR}: {code.name}: d"
    handshake = rpc(grpc.StatusCode.UNAVAILABLE, "handshake failed")
    for tls, used in ((True, "TLS"), (False, "plaintext (no TLS)")):
        exc = unreachable(ADDR, 2.5, why_unreachable(handshake, tls))
        assert str(exc) == (
            f"no scheduler answered at {ADDR} within 2.5s "
            f"(UNAVAILABLE: handshake failed; this client used {used})"
        )
    assert str(unreachable(ADDR, 10, "")) == f"no scheduler answered at {ADDR} within 10s"


def test_mapped_call_errors_raises_the_mapped_exception() -> None:
    with (
        pytest.raises(KeyError, match="no worker"),
        mapped_call_errors("SetWorkerResources", ADDR, False, Caller.CLIENT),
    ):
        raise rpc(grpc.StatusCode.NOT_FOUND, "no worker 'x'")
    with mapped_call_errors("SetWorkerResources", ADDR, False, Caller.CLIENT):
        pass  # nothing raised, nothing mapped


def test_a_broken_stream_says_whether_reconnecting_may_help() -> None:
    gone = stream_error(rpc(grpc.StatusCode.UNAVAILABLE, "Socket closed"))
    assert isinstance(gone, SchedulerConnectionError)
    assert (str(gone), gone.refused) == ("UNAVAILABLE: Socket closed", False)
    refused = stream_error(rpc(grpc.StatusCode.UNAUTHENTICATED, "the token was not accepted"))
    assert refused.refused
    half_closed = stream_error(asyncio.InvalidStateError("RPC is half closed"))
    assert type(half_closed) is StreamBroken and not half_closed.refused
