"""Telling a wrong address (stop and say so) from an absent scheduler (retry)."""

from __future__ import annotations

import grpc
import pytest

from apportion_common.wrong_peer import not_a_scheduler


class Failed(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("code", "details", "said"),
    [
        (grpc.StatusCode.UNIMPLEMENTED, "Method not found!", "UNIMPLEMENTED"),
        (
            grpc.StatusCode.UNAVAILABLE,
            "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:80: "
            "Failed parsing HTTP/2 (Expected SETTINGS frame as the first frame, got frame type 79)",
            "HTTP server",
        ),
        (grpc.StatusCode.UNAVAILABLE, "Trying to connect an http1.x server", "HTTP server"),
    ],
)
def test_something_else_answering_is_named(code: grpc.StatusCode, details: str, said: str) -> None:
    found = not_a_scheduler(Failed(code, details))
    assert found is not None and said in found


@pytest.mark.parametrize(
    ("code", "details"),
    [
        (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; Connection refused"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"),
        (grpc.StatusCode.UNAUTHENTICATED, "no token"),
    ],
)
def test_nothing_there_or_a_refusal_is_not_a_wrong_peer(
    code: grpc.StatusCode, details: str
) -> None:
    assert not_a_scheduler(Failed(code, details)) is None
