"""Who may call what: shared-secret tokens and mutual TLS for both services.

Tokens travel as gRPC metadata ``authorization: Bearer TOKEN`` (what
``grpcurl -H`` sends). Each server checks them in one interceptor, on every
call and stream, before the servicer sees anything:

============================================  =====================================
method                                        needs
============================================  =====================================
``apportion.v1.Scheduler/WorkerStream``       the worker token
other ``apportion.v1.Scheduler`` methods      the client token
``apportion.v1.Worker/FetchResult(s)``        the worker token or the client token
``apportion.v1.Worker/ShareResult``           the worker token
``apportion.v1.Worker/GetLogs``               the client token or the scheduler's secret
``grpc.health.v1.Health``, reflection         nothing (always open)
============================================  =====================================

A role whose token is not set is open. Workers never hold the client secret:
the scheduler tells each worker the SHA-256 of the client token when it
registers, and the worker compares digests. For the same reason the
scheduler's dashboard cannot read a worker's logs with the client token: the
scheduler makes a random secret at start (:data:`Role.SCHEDULER`), tells
workers its digest next to the client token's, and presents it to
``Worker/GetLogs``, the only method that accepts it. Every comparison is between
SHA-256 digests with :func:`hmac.compare_digest`, so neither the time taken nor
the token's length tells a caller how close a guess was.

Mutual TLS is separate and may be combined with tokens: servers require a
client certificate signed by the configured CA; channels present theirs.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import logging
import os
import socket
import ssl
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from .grpc_server import CHANNEL_OPTIONS

#: Exit status of a worker the scheduler refused (sysexits' EX_NOPERM): a
#: supervisor should not restart it, the same credentials would be refused again.
UNAUTHENTICATED_EXIT_CODE = 77

AUTH_METADATA_KEY = "authorization"
_SCHEME = "bearer"

#: Services anyone may call: health checks and reflection must keep working
#: for load balancers and ``grpcurl list`` without a secret.
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)


class Role(enum.Enum):
    WORKER = "worker"
    CLIENT = "client"
    #: the scheduler process itself, by the secret it made at start (no user sets it)
    SCHEDULER = "scheduler"


#: The roles a user gives tokens to (--worker-token, --client-token).
USER_ROLES = (Role.WORKER, Role.CLIENT)


_WORKER = frozenset({Role.WORKER})
_CLIENT = frozenset({Role.CLIENT})
_EITHER = frozenset({Role.WORKER, Role.CLIENT})

#: Which roles may call each method (any one of them suffices).
METHOD_ROLES: Mapping[str, frozenset[Role]] = {
    "/apportion.v1.Scheduler/WorkerStream": _WORKER,
    "/apportion.v1.Scheduler/ClientStream": _CLIENT,
    "/apportion.v1.Scheduler/GetClusterState": _CLIENT,
    "/apportion.v1.Scheduler/SetWorkerResources": _CLIENT,
    "/apportion.v1.Scheduler/ExplainTask": _CLIENT,
    "/apportion.v1.Scheduler/RetireWorkers": _CLIENT,
    "/apportion.v1.Scheduler/UploadFile": _CLIENT,
    "/apportion.v1.Scheduler/Restart": _CLIENT,
    "/apportion.v1.Scheduler/Shutdown": _CLIENT,
    "/apportion.v1.Scheduler/GetLogs": _CLIENT,
    # Peers fetch inputs with the worker token, clients results with theirs.
    "/apportion.v1.Worker/FetchResult": _EITHER,
    "/apportion.v1.Worker/FetchResults": _EITHER,
    # Only peers on the same host: a segment costs the host's memory.
    "/apportion.v1.Worker/ShareResult": _WORKER,
    # Code and files, as a task would bring: the clients' calls.
    "/apportion.v1.Worker/RunFunction": _CLIENT,
    "/apportion.v1.Worker/UploadFile": _CLIENT,
    # What the worker and its tasks logged: the clients' to read, as their
    # results, and the scheduler's (its dashboard's log pages).
    "/apportion.v1.Worker/GetLogs": frozenset({Role.CLIENT, Role.SCHEDULER}),
}

#: A method missing from METHOD_ROLES (one added later) is never open by
#: accident: on the scheduler it is an operator's call, anywhere else it
#: needs one of the tokens.
_SERVICE_ROLES: Mapping[str, frozenset[Role]] = {
    "apportion.v1.Scheduler": _CLIENT,
    "apportion.v1.Worker": _EITHER,
}


def roles_for(method: str) -> frozenset[Role] | None:
    """The roles that may call ``method`` ("/package.Service/Method"); None: anyone."""
    service = method.lstrip("/").partition("/")[0]
    if service in OPEN_SERVICES:
        return None
    return METHOD_ROLES.get(method) or _SERVICE_ROLES.get(service, _EITHER)


class SecurityConfigError(ValueError):
    """A token or TLS setting that cannot work (the message names which)."""


def check_token(token: str, what: str = "token") -> str:
    """A token must fit in an HTTP/2 header value: printable ASCII, no spaces."""
    if not token:
        raise SecurityConfigError(f"{what} is empty")
    for i, ch in enumerate(token):
        if not "!" <= ch <= "~":
            # Never echo the secret itself, only where it goes wrong.
            raise SecurityConfigError(
                f"{what} may hold only printable ASCII without spaces "
                f"(character {i + 1} of {len(token)} is not)"
            )
    return token


def token_digest(token: str) -> bytes:
    """SHA-256 of a token: what servers keep and compare, and what workers are told."""
    return hashlib.sha256(token.encode("ascii")).digest()


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return () if token is None else ((AUTH_METADATA_KEY, f"Bearer {token}"),)


def presented_token(metadata: Iterable[Any] | None) -> str | None:
    """The token in ``authorization: Bearer TOKEN``, or None if none was sent."""
    for item in metadata or ():
        key, value = item[0], item[1]
        if key != AUTH_METADATA_KEY:
            continue
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        scheme, _, token = str(value).strip().partition(" ")
        if scheme.lower() == _SCHEME and token.strip():
            return token.strip()
        return None
    return None


def _hint(roles: frozenset[Role]) -> str:
    # The scheduler's secret is no one's to send: name only the tokens users hold.
    names = " or ".join(sorted(f"the {r.value} token" for r in roles if r in USER_ROLES))
    return f"send {names} as metadata 'authorization: Bearer <token>'"


class Authorizer:
    """Decides, per method, whether the presented token is good enough.

    ``digests`` maps a role to the SHA-256 of its token, or to None when the
    role is open. A role missing from the mapping is accepted from nobody
    (a worker does not know the client digest before it registers).
    """

    def __init__(self, digests: Mapping[Role, bytes | None]) -> None:
        self._digests: dict[Role, bytes | None] = dict(digests)

    @classmethod
    def for_tokens(cls, *, worker: str | None, client: str | None) -> Authorizer:
        return cls(
            {
                Role.WORKER: None if worker is None else token_digest(worker),
                Role.CLIENT: None if client is None else token_digest(client),
            }
        )

    def set_role(self, role: Role, digest: bytes | None) -> None:
        """Accept ``role`` with this digest from now on (None: open)."""
        self._digests[role] = digest

    def forget_role(self, role: Role) -> None:
        """Accept ``role`` from nobody from now on."""
        self._digests.pop(role, None)

    def digest(self, role: Role) -> bytes | None:
        return self._digests.get(role)

    def check(self, method: str, metadata: Iterable[Any] | None) -> str | None:
        """None if the call may go ahead, else why not (the UNAUTHENTICATED details)."""
        roles = roles_for(method)
        if roles is None:
            return None
        known = [self._digests[r] for r in roles if r in self._digests]
        if any(d is None for d in known):
            return None  # one of the roles that may call this is open
        token = presented_token(metadata)
        if token is None:
            return f"{method.lstrip('/')} needs a token: {_hint(roles)}"
        presented = hashlib.sha256(token.encode("utf-8", "replace")).digest()
        ok = False
        for expected in known:
            assert expected is not None
            # Compare against every accepted digest, not stopping at a match.
            ok |= hmac.compare_digest(presented, expected)
        if ok:
            return None
        return f"{method.lstrip('/')}: the token was not accepted; {_hint(roles)}"


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that only refuses the call."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses, with UNAUTHENTICATED, every call the authorizer does not allow.

    It runs once per call or stream (not per message), before the servicer.
    """

    def __init__(self, authorizer: Authorizer) -> None:
        self.authorizer = authorizer

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        refusal = self.authorizer.check(
            handler_call_details.method, handler_call_details.invocation_metadata
        )
        handler = await continuation(handler_call_details)
        if refusal is None or handler is None:
            return handler
        return _refusal(handler, refusal)


# ------------------------------------------------------------------ TLS

PemSource = str | os.PathLike[str] | bytes


@dataclass(frozen=True, slots=True)
class TLS:
    """Mutual TLS settings: ``ca`` verifies the other side, ``cert``/``key`` are ours.

    Each is a file path or the PEM bytes themselves. Servers need all three
    (they require client certificates); a channel without ``cert``/``key``
    can reach no apportion server, which is only useful to test that refusal.
    """

    ca: PemSource
    cert: PemSource | None = None
    key: PemSource | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise SecurityConfigError(
                "TLS cert and key go together: give both (or neither, for a client without one)"
            )

    @staticmethod
    def _read(source: PemSource, what: str) -> bytes:
        if isinstance(source, bytes):
            data, where = source, f"TLS {what} (PEM bytes)"
        else:
            where = f"TLS {what} {os.fspath(source)}"
            try:
                data = Path(source).read_bytes()
            except OSError as exc:
                raise SecurityConfigError(f"{where}: cannot read it: {exc.strerror}") from None
        if b"-----BEGIN " not in data:
            raise SecurityConfigError(f"{where}: not PEM (no '-----BEGIN' line)")
        return data

    def channel_credentials(self) -> grpc.ChannelCredentials:
        ca = self._read(self.ca, "CA")
        if self.cert is None or self.key is None:
            return grpc.ssl_channel_credentials(root_certificates=ca)
        return grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=self._read(self.key, "key"),
            certificate_chain=self._read(self.cert, "cert"),
        )

    def server_credentials(self) -> grpc.ServerCredentials:
        if self.cert is None or self.key is None:
            raise SecurityConfigError("a server needs a TLS cert and key (--tls-cert, --tls-key)")
        return grpc.ssl_server_credentials(
            [(self._read(self.key, "key"), self._read(self.cert, "cert"))],
            root_certificates=self._read(self.ca, "CA"),
            require_client_auth=True,
        )

    def https_context(self) -> ssl.SSLContext:
        """A server context for HTTPS (the dashboard) with the same certificate.

        It asks for no client certificate: a browser has none to give, so on
        that port the token is what keeps others out."""
        if self.cert is None or self.key is None:
            raise SecurityConfigError("a server needs a TLS cert and key (--tls-cert, --tls-key)")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        cert, key = self._read(self.cert, "cert"), self._read(self.key, "key")
        # load_cert_chain reads files only: PEM given as bytes goes through a
        # private temporary directory that is removed at once.
        with tempfile.TemporaryDirectory() as tmp:
            cert_path, key_path = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
            cert_path.write_bytes(cert)
            key_path.touch(mode=0o600)
            key_path.write_bytes(key)
            try:
                context.load_cert_chain(cert_path, key_path)
            except ssl.SSLError as exc:
                raise SecurityConfigError(f"TLS cert and key: cannot use them: {exc}") from None
        return context

    def env(self) -> dict[str, str]:
        """As APPORTION_TLS_* variables, for a child process (paths only)."""
        out = {}
        for what, source in (("CA", self.ca), ("CERT", self.cert), ("KEY", self.key)):
            if source is None:
                continue
            if isinstance(source, bytes):
                raise SecurityConfigError(
                    f"TLS {what.lower()} for a child process must be a file path, not PEM bytes"
                )
            out[f"APPORTION_TLS_{what}"] = os.fspath(Path(source).absolute())
        return out


def tls_from_paths(
    ca: str | os.PathLike[str] | None,
    cert: str | os.PathLike[str] | None,
    key: str | os.PathLike[str] | None,
) -> TLS | None:
    """--tls-ca/--tls-cert/--tls-key (or APPORTION_TLS_*) as a TLS, or None if none given."""
    if ca is None and cert is None and key is None:
        return None
    if ca is None:
        raise SecurityConfigError("TLS needs a CA (--tls-ca / APPORTION_TLS_CA) to verify peers")
    return TLS(ca=ca, cert=cert, key=key)


@dataclass(frozen=True, slots=True)
class ClientSecurity:
    """What a caller presents: a token, TLS, both or neither."""

    token: str | None = field(default=None, repr=False)
    tls: TLS | None = None

    def __post_init__(self) -> None:
        if self.token is not None:
            check_token(self.token)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """For calls made without the channel's interceptors (streams, sync stubs)."""
        return bearer_metadata(self.token)

    def aio_channel(
        self, address: str, extra_options: Sequence[tuple[str, Any]] = ()
    ) -> grpc.aio.Channel:
        """An asyncio channel; unary calls on it carry the token by themselves.

        Streams are opened with ``metadata=self.metadata`` instead: a stream
        interceptor in grpc.aio adds tasks to every write of a long-lived
        stream, while metadata given at the open costs nothing after it.
        """
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (
            ()
            if self.token is None
            else (_BearerUnaryUnary(self.token), _BearerUnaryStream(self.token))
        )
        if self.tls is None:
            return grpc.aio.insecure_channel(
                address, options=[*CHANNEL_OPTIONS, *extra_options], interceptors=interceptors
            )
        return grpc.aio.secure_channel(
            address,
            self.tls.channel_credentials(),
            options=[*CHANNEL_OPTIONS, *extra_options],
            interceptors=interceptors,
        )

    def sync_channel(self, address: str) -> grpc.Channel:
        """A blocking channel (CLI); pass ``metadata=self.metadata`` to each call."""
        if self.tls is None:
            return grpc.insecure_channel(address)
        return grpc.secure_channel(address, self.tls.channel_credentials())

    def describe(self) -> str:
        parts = ["a token" if self.token else "no token", "TLS" if self.tls else "no TLS"]
        return " and ".join(parts)


def _with_token(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()), *bearer_metadata(token))
    return details._replace(metadata=metadata)


class _BearerUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(_with_token(client_call_details, self._token), request)


class _BearerUnaryStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(_with_token(client_call_details, self._token), request)


@dataclass(slots=True)
class ServerSecurity:
    """What a server demands: tokens per role (an Authorizer), TLS, both or neither."""

    authorizer: Authorizer | None = None
    tls: TLS | None = None

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        if self.authorizer is None:
            return []
        return [AuthInterceptor(self.authorizer)]

    def credentials(self) -> grpc.ServerCredentials | None:
        return None if self.tls is None else self.tls.server_credentials()

    def open_roles(self) -> list[Role]:
        if self.authorizer is None:
            return list(USER_ROLES)
        return [r for r in USER_ROLES if self.authorizer.digest(r) is None]

    def warn_if_exposed(self, host: str, what: str, logger: logging.Logger) -> None:
        """A WARNING when ``host`` reaches beyond loopback with no TLS and an open role."""
        if self.tls is not None or is_loopback(host):
            return
        open_roles = self.open_roles()
        if not open_roles:
            return
        who = " or ".join(f"a {r.value}" for r in open_roles)
        logger.warning(
            "%s listens on %s, beyond loopback, without a token or TLS: anyone who can reach it "
            "may act as %s (set --token / APPORTION_TOKEN, or --tls-ca/--tls-cert/--tls-key)",
            what,
            host,
            who,
        )


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) reaches only this machine."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if not host:
        return False
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(
        ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos
    )
