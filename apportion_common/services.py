"""Registering a gRPC service so that a request that does not parse is
refused with INVALID_ARGUMENT naming what was wrong.

The generated ``add_*Servicer_to_server`` hands request bytes to protobuf
before our code runs; garbage there ends the call with UNKNOWN ("Exception
deserializing request") and an ERROR in the server's log. Here each unary
request is parsed by a lenient deserializer, and a request that did not parse
is refused before the servicer method sees it. Streamed requests are parsed as
they are read (``context.read()`` raises, and the servicer answers it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import grpc
from google.protobuf.message import DecodeError


@dataclass(frozen=True, slots=True)
class Malformed:
    """A request that did not parse, and why."""

    reason: str


def _lenient(message_class: Any) -> Callable[[bytes], object]:
    def parse(data: bytes) -> object:
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return Malformed(f"{message_class.DESCRIPTOR.full_name} could not be parsed: {exc}")

    return parse


def _unary_unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def handle(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        return await behavior(request, context)

    return handle


def _unary_stream(behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def handle(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        async for item in behavior(request, context):
            yield item

    return handle


def add_service(
    server: grpc.aio.Server,
    servicer: object,
    messages: ModuleType,
    service: str,
    response_serializers: Mapping[str, Callable[[Any], bytes]] | None = None,
) -> None:
    """Register ``servicer`` for the service named ``service`` in the
    generated module ``messages`` (as the generated code would, with lenient
    unary requests). ``response_serializers`` replaces a method's serializer
    (a method that yields bytes it already serialized, say)."""
    descriptor = messages.DESCRIPTOR.services_by_name[service]
    overrides = response_serializers or {}
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in descriptor.methods:
        request_class = getattr(messages, method.input_type.name)
        response_class = getattr(messages, method.output_type.name)
        serialize = overrides.get(method.name, response_class.SerializeToString)
        behavior = getattr(servicer, method.name)
        if method.client_streaming:
            make = (
                grpc.stream_stream_rpc_method_handler
                if method.server_streaming
                else grpc.stream_unary_rpc_method_handler
            )
            handlers[method.name] = make(
                behavior,
                request_deserializer=request_class.FromString,
                response_serializer=serialize,
            )
        elif method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _unary_stream(behavior),
                request_deserializer=_lenient(request_class),
                response_serializer=serialize,
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary_unary(behavior),
                request_deserializer=_lenient(request_class),
                response_serializer=serialize,
            )
    full_name = descriptor.full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(full_name, handlers),))
    server.add_registered_method_handlers(full_name, handlers)
