"""Telling "nothing answers there (yet)" from "something else answers there".

A worker or client pointed at the wrong port must stop and say so: retrying
cannot help. Nothing listening, or a scheduler not up yet, is worth retrying.
"""

from __future__ import annotations

import grpc

#: What grpc says when the other end speaks HTTP/1 (a web server, a proxy).
_NOT_HTTP2 = ("Failed parsing HTTP/2", "http1.x")


def not_a_scheduler(exc: grpc.RpcError) -> str | None:
    """What answered instead of an apportion scheduler, or None when the
    error does not show one (nothing listens, a network fault: retry)."""
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    if code == grpc.StatusCode.UNIMPLEMENTED:
        # A gRPC server without the Scheduler service: another worker, another program.
        return f"it answered UNIMPLEMENTED: {details}"
    if any(marker in details for marker in _NOT_HTTP2):
        return f"it does not speak gRPC (an HTTP server?): {details}"
    return None
