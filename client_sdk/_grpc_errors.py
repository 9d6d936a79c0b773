"""gRPC errors as the SDK's exceptions: the one module that reads a gRPC status.

Every gRPC call of the client (and of the ``apportion`` operator commands)
fails through here, as httpx's ``map_httpcore_exceptions`` does for httpcore:

====================  ==========================================================
status                raised
====================  ==========================================================
UNAUTHENTICATED       :class:`SchedulerConnectionError` saying what the caller
                      sent and what to pass (connecting, a command's call);
                      on a unary call of a connected client, as any failure
NOT_FOUND             :class:`KeyError` (a unary call: no such worker or task)
INVALID_ARGUMENT      :class:`ValueError` (a unary call: a bad argument)
any other             :class:`SchedulerConnectionError` (unreachable, or failed)
====================  ==========================================================

A broken stream is :class:`StreamBroken` (a SchedulerConnectionError), which
says whether reconnecting may help. What a *task* raised is another matter:
:mod:`client_sdk._errors` rebuilds that from what the scheduler says.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator
from typing import Any

import grpc

from apportion_common.wrong_peer import not_a_scheduler

from .exceptions import SchedulerConnectionError


class Caller(enum.Enum):
    """Who makes a call: its messages name it and say how to send a token."""

    CLIENT = "client"  # a Client
    COMMAND = "command"  # an operator command (apportion status, ...)


class StreamBroken(SchedulerConnectionError):
    """The client's stream failed; ``refused``: the scheduler refused the
    credentials, so reconnecting would only be refused again."""

    def __init__(self, reason: str, refused: bool = False) -> None:
        super().__init__(reason)
        self.refused = refused


def _sent(token_sent: bool) -> str:
    return "a token it did not accept" if token_sent else "no token"


def refused(exc: Any, address: str, token_sent: bool, caller: Caller) -> SchedulerConnectionError:
    """UNAUTHENTICATED, told with what was sent and what to pass instead."""
    if caller is Caller.CLIENT:
        return SchedulerConnectionError(
            f"the scheduler at {address} refused this client "
            f"(UNAUTHENTICATED: {exc.details()}); this client sent {_sent(token_sent)}: "
            "pass Client(..., token=...) or set APPORTION_TOKEN"
        )
    return SchedulerConnectionError(
        f"the scheduler at {address} refused this call "
        f"(UNAUTHENTICATED: {exc.details()}); "
        f"this command sent {_sent(token_sent)}: pass --token or set APPORTION_TOKEN"
    )


def access_error(exc: Any, address: str, token_sent: bool) -> SchedulerConnectionError:
    """The call that checks a new client's credentials failed."""
    if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
        return refused(exc, address, token_sent, Caller.CLIENT)
    found = not_a_scheduler(exc)
    if found is not None:
        return wrong_peer(address, found)
    return SchedulerConnectionError(
        f"the scheduler at {address}: {exc.code().name}: {exc.details()}"
    )


def wrong_peer(address: str, found: str) -> SchedulerConnectionError:
    """Something that is no apportion scheduler answers at ``address``."""
    return SchedulerConnectionError(f"{address} is not an apportion scheduler ({found})")


def unreachable(address: str, timeout: float, why: str) -> SchedulerConnectionError:
    """No scheduler answered a new client; ``why`` from :func:`why_unreachable`."""
    return SchedulerConnectionError(f"no scheduler answered at {address} within {timeout:g}s{why}")


def why_unreachable(exc: Any, tls: bool) -> str:
    """Why a channel never got ready (a TLS handshake refused, say), briefly."""
    used = "TLS" if tls else "plaintext (no TLS)"
    return f" ({exc.code().name}: {exc.details()}; this client used {used})"


def call_error(exc: Any, method: str, address: str, token_sent: bool, caller: Caller) -> Exception:
    """A failed unary call (``method``, e.g. "ExplainTask") as the SDK's exception."""
    code = exc.code()
    if code == grpc.StatusCode.NOT_FOUND:
        return KeyError(exc.details())
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ValueError(exc.details())
    if caller is Caller.COMMAND:
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return refused(exc, address, token_sent, caller)
        found = not_a_scheduler(exc)
        if found is not None:
            return wrong_peer(address, found)
        return SchedulerConnectionError(
            f"cannot reach the scheduler at {address}: {code.name}: {exc.details()}"
        )
    return SchedulerConnectionError(f"{method}: {code.name}: {exc.details()}")


@contextlib.contextmanager
def mapped_call_errors(
    method: str, address: str, token_sent: bool, caller: Caller
) -> Iterator[None]:
    """Raise what :func:`call_error` says for a gRPC error inside the block."""
    try:
        yield
    except grpc.RpcError as exc:
        raise call_error(exc, method, address, token_sent, caller) from None


def stream_error(exc: Any) -> StreamBroken:
    """A failed read or write of the client's stream (a gRPC error, or a write
    after our side ended it) as :class:`StreamBroken`."""
    if isinstance(exc, grpc.RpcError):
        code = exc.code()
        return StreamBroken(
            f"{code.name}: {exc.details()}", refused=code == grpc.StatusCode.UNAUTHENTICATED
        )
    return StreamBroken(f"the stream is closed for writing ({exc})")
