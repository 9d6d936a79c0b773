"""Tokens and TLS settings: the role table, the checks, the digests, and the
interceptor on real in-process servers (port 0) with real channels."""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apportion_common import security
from apportion_common.security import (
    TLS,
    Authorizer,
    ClientSecurity,
    Role,
    SecurityConfigError,
    ServerSecurity,
    check_token,
    is_loopback,
    presented_token,
    roles_for,
    token_digest,
)
from apportion_common.settings import SecuritySettings
from protos import apportion_pb2 as pb
from protos import apportion_pb2_grpc as pb_grpc
from scheduler_service import SchedulerServer
from worker_service.worker import Worker

WORKER_STREAM = "/apportion.v1.Scheduler/WorkerStream"
CLIENT_STREAM = "/apportion.v1.Scheduler/ClientStream"
FETCH = "/apportion.v1.Worker/FetchResult"
WORKER_LOGS = "/apportion.v1.Worker/GetLogs"
#: The worker's methods a client token opens, besides GetLogs.
CLIENTS_WORKER_METHODS = ("FetchResult", "FetchResults", "RunFunction", "UploadFile")


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


# ------------------------------------------------------------------ roles


def test_every_rpc_of_both_services_has_an_explicit_role() -> None:
    for service in pb.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            assert f"/{service.full_name}/{method.name}" in security.METHOD_ROLES


def test_role_mapping() -> None:
    assert roles_for(WORKER_STREAM) == {Role.WORKER}
    for name in ("ClientStream", "GetClusterState", "SetWorkerResources", "ExplainTask"):
        assert roles_for(f"/apportion.v1.Scheduler/{name}") == {Role.CLIENT}
    assert roles_for(FETCH) == {Role.WORKER, Role.CLIENT}
    assert roles_for(WORKER_LOGS) == {Role.CLIENT, Role.SCHEDULER}
    # The scheduler's own secret opens nothing else, on either service.
    assert [m for m, roles in security.METHOD_ROLES.items() if Role.SCHEDULER in roles] == [
        WORKER_LOGS
    ]
    # Health and reflection stay open.
    assert roles_for("/grpc.health.v1.Health/Check") is None
    assert roles_for("/grpc.health.v1.Health/Watch") is None
    assert roles_for("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") is None
    assert roles_for("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo") is None
    # A method added later is never open by accident.
    assert roles_for("/apportion.v1.Scheduler/Shutdown") == {Role.CLIENT}
    assert roles_for("/apportion.v1.Worker/Other") == {Role.WORKER, Role.CLIENT}
    assert roles_for("/other.Service/Method") == {Role.WORKER, Role.CLIENT}


# ----------------------------------------------------------------- tokens


def test_digest_is_sha256_of_the_token() -> None:
    assert token_digest("abc") == hashlib.sha256(b"abc").digest()
    assert len(token_digest("x" * 1000)) == 32


@pytest.mark.parametrize("bad", ["", "has space", "tab\there", "caf\u00e9", "new\nline"])
def test_a_token_must_be_printable_ascii(bad: str) -> None:
    with pytest.raises(SecurityConfigError) as info:
        check_token(bad)
    if bad:
        assert bad not in str(info.value)  # the secret is never echoed


def test_presented_token_parsing() -> None:
    assert presented_token(None) is None
    assert presented_token([("x-other", "Bearer a")]) is None
    assert presented_token(bearer("tok")) == "tok"
    assert presented_token([("authorization", "bearer  tok ")]) == "tok"
    assert presented_token([("authorization", b"Bearer tok")]) == "tok"
    assert presented_token([("authorization", "Basic dXNlcg==")]) is None
    assert presented_token([("authorization", "Bearer")]) is None


def test_one_token_for_both_roles() -> None:
    auth = Authorizer.for_tokens(worker="t", client="t")
    for method in (WORKER_STREAM, CLIENT_STREAM, FETCH):
        assert auth.check(method, bearer("t")) is None
        missing = auth.check(method, [])
        assert missing is not None and "authorization: Bearer <token>" in missing
        wrong = auth.check(method, bearer("T"))
        assert wrong is not None and "not accepted" in wrong
    assert auth.check("/grpc.health.v1.Health/Check", []) is None


def test_separate_tokens_are_refused_in_each_others_role() -> None:
    auth = Authorizer.for_tokens(worker="w", client="c")
    assert auth.check(WORKER_STREAM, bearer("w")) is None
    assert auth.check(WORKER_STREAM, bearer("c")) is not None
    assert auth.check(CLIENT_STREAM, bearer("c")) is None
    assert auth.check(CLIENT_STREAM, bearer("w")) is not None
    refusal = auth.check(CLIENT_STREAM, bearer("w"))
    assert refusal is not None and "the client token" in refusal
    assert auth.check(FETCH, bearer("w")) is None
    assert auth.check(FETCH, bearer("c")) is None


def test_a_role_without_a_token_is_open() -> None:
    auth = Authorizer.for_tokens(worker="w", client=None)
    assert auth.check(CLIENT_STREAM, []) is None
    assert auth.check(WORKER_STREAM, []) is not None
    assert auth.check(FETCH, []) is None  # clients may fetch: they need no token


def test_worker_side_accepts_clients_only_once_told_the_digest() -> None:
    auth = Authorizer({Role.WORKER: token_digest("w")})
    assert auth.check(FETCH, bearer("c")) is not None  # not registered yet
    auth.set_role(Role.CLIENT, token_digest("c"))
    assert auth.check(FETCH, bearer("c")) is None
    assert auth.check(FETCH, bearer("w")) is None
    assert auth.check(FETCH, bearer("x")) is not None
    auth.set_role(Role.CLIENT, None)  # the scheduler lets clients in without one
    assert auth.check(FETCH, []) is None


def test_worker_side_accepts_the_scheduler_secret_for_its_logs_only() -> None:
    auth = Authorizer({Role.WORKER: token_digest("w")})
    assert auth.check(WORKER_LOGS, bearer("s")) is not None  # not registered yet
    auth.set_role(Role.CLIENT, token_digest("c"))
    auth.set_role(Role.SCHEDULER, token_digest("s"))
    assert auth.check(WORKER_LOGS, bearer("s")) is None
    assert auth.check(WORKER_LOGS, bearer("c")) is None
    refusal = auth.check(WORKER_LOGS, bearer("w"))  # a peer's worker token: not its logs
    # The hint names only the tokens users hold.
    assert refusal is not None and "send the client token as" in refusal
    for name in (*CLIENTS_WORKER_METHODS, "ShareResult"):
        assert auth.check(f"/apportion.v1.Worker/{name}", bearer("s")) is not None, name
    auth.forget_role(Role.SCHEDULER)  # registered again with a scheduler that sent none
    assert auth.check(WORKER_LOGS, bearer("s")) is not None
    assert auth.check(WORKER_LOGS, bearer("c")) is None


def test_the_comparison_is_constant_time_over_digests(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", recording)
    auth = Authorizer.for_tokens(worker="w", client="c")
    assert auth.check(FETCH, bearer("w")) is None
    # Both accepted digests are compared, even after the first matched, and
    # only fixed-length digests are: neither timing nor length leaks.
    assert len(calls) == 2
    assert all(len(a) == len(b) == 32 for a, b in calls)
    assert {b for _, b in calls} == {token_digest("w"), token_digest("c")}
    calls.clear()
    assert auth.check(WORKER_STREAM, bearer("a-much-longer-wrong-token")) is not None
    assert calls == [(token_digest("a-much-longer-wrong-token"), token_digest("w"))]


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPORTION_TOKEN", "shared")
    monkeypatch.setenv("APPORTION_CLIENT_TOKEN", "for-clients")
    monkeypatch.setenv("APPORTION_WORKER_TOKEN", "")
    monkeypatch.setenv("APPORTION_TLS_CA", "/etc/ca.pem")
    s = SecuritySettings()
    assert s.worker_role_token == "shared"
    assert s.client_role_token == "for-clients"
    assert s.tls_ca == Path("/etc/ca.pem")
    assert "shared" not in repr(s) and "for-clients" not in repr(s)
    monkeypatch.setenv("APPORTION_TOKEN", "with space")
    with pytest.raises(ValueError, match="printable ASCII"):
        SecuritySettings()


# -------------------------------------------------------------------- TLS


def test_tls_settings_errors_name_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(SecurityConfigError, match="cert and key go together"):
        TLS(ca=b"-----BEGIN CERTIFICATE-----", cert="c.pem")
    missing = tmp_path / "nope.pem"
    with pytest.raises(SecurityConfigError, match=r"TLS CA .*nope\.pem: cannot read it"):
        TLS(ca=missing).channel_credentials()
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(SecurityConfigError, match="not PEM"):
        TLS(ca=garbage).channel_credentials()
    with pytest.raises(SecurityConfigError, match="a server needs a TLS cert and key"):
        TLS(ca=garbage).server_credentials()
    with pytest.raises(SecurityConfigError, match="must be a file path"):
        TLS(ca=b"-----BEGIN CERTIFICATE-----").env()
    with pytest.raises(SecurityConfigError, match="needs a CA"):
        security.tls_from_paths(None, "c.pem", "k.pem")
    assert security.tls_from_paths(None, None, None) is None
    assert "key=" not in repr(TLS(ca="ca.pem", cert="c.pem", key="k.pem"))


# ----------------------------------------------------- exposure warnings


def test_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("[::1]")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("")
    assert not is_loopback("10.1.2.3")


def test_a_warning_when_serving_beyond_loopback_unprotected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = logging.getLogger("test_security")
    with caplog.at_level(logging.WARNING, "test_security"):
        ServerSecurity().warn_if_exposed("127.0.0.1", "the scheduler", log)
        ServerSecurity(Authorizer.for_tokens(worker="w", client="c")).warn_if_exposed(
            "0.0.0.0", "the scheduler", log
        )
        assert caplog.records == []
        ServerSecurity().warn_if_exposed("0.0.0.0", "the scheduler", log)
        ServerSecurity(Authorizer.for_tokens(worker="w", client=None)).warn_if_exposed(
            "0.0.0.0", "the scheduler", log
        )
    assert len(caplog.records) == 2
    assert "a worker or a client" in caplog.records[0].getMessage()
    assert "may act as a client " in caplog.records[1].getMessage()


# ------------------------------------------- the interceptor, in process

Stub = Callable[..., Any]


async def _code(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_scheduler_refuses_calls_and_streams_without_the_token() -> None:
    secure = ServerSecurity(Authorizer.for_tokens(worker="w", client="c"))
    server = SchedulerServer("127.0.0.1", 0, validate=True, security=secure)
    await server.start()
    try:
        async with ClientSecurity().aio_channel(server.address) as anonymous:
            stub = pb_grpc.SchedulerStub(anonymous)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetClusterState(pb.GetClusterStateRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "authorization: Bearer <token>" in (info.value.details() or "")
            # A stream is refused before the servicer reads anything.
            stream = stub.ClientStream()
            await stream.write(pb.ClientToScheduler(hello=pb.ClientHello(client_id="x")))
            assert await stream.code() == grpc.StatusCode.UNAUTHENTICATED
            # The worker token is not the client token.
            assert (
                await _code(stub.GetClusterState(pb.GetClusterStateRequest(), metadata=bearer("w")))
                == grpc.StatusCode.UNAUTHENTICATED
            )
            # Health stays open.
            health = health_pb2_grpc.HealthStub(anonymous)
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        async with ClientSecurity("c").aio_channel(server.address) as operator:
            # Unary calls carry the token by the channel's interceptor.
            state = await pb_grpc.SchedulerStub(operator).GetClusterState(
                pb.GetClusterStateRequest(), timeout=5
            )
            assert list(state.workers) == []
        assert server.servicer.client_token_sha256 == token_digest("c")
    finally:
        await server.stop(0)


async def test_worker_takes_the_client_token_by_its_digest() -> None:
    secure = ServerSecurity(Authorizer.for_tokens(worker="w", client="c"))
    server = SchedulerServer("127.0.0.1", 0, validate=True, security=secure)
    await server.start()
    worker = Worker(server.address, host="127.0.0.1", token="w")
    try:
        await worker.start()
        await worker.wait_registered(10)
        request = pb.FetchResultRequest(key="missing")
        expected = {
            None: grpc.StatusCode.UNAUTHENTICATED,
            "x": grpc.StatusCode.UNAUTHENTICATED,
            "w": grpc.StatusCode.NOT_FOUND,  # past the check
            "c": grpc.StatusCode.NOT_FOUND,  # the worker was never given "c"
        }
        for token, code in expected.items():
            async with ClientSecurity(token).aio_channel(worker.address) as channel:
                call = pb_grpc.WorkerStub(channel).FetchResult(request, timeout=5)
                try:
                    async for _ in call:
                        pass
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == code, (token, exc)
                else:
                    raise AssertionError(f"FetchResult with {token!r} succeeded")
    finally:
        await worker.close()
        await server.stop(0)


async def test_worker_takes_the_scheduler_s_secret_for_get_logs_alone() -> None:
    secure = ServerSecurity(Authorizer.for_tokens(worker="w", client="c"))
    server = SchedulerServer("127.0.0.1", 0, validate=True, security=secure)
    await server.start()
    worker = Worker(server.address, host="127.0.0.1", token="w")
    secret = server.as_scheduler.token
    assert secret is not None and secret not in ("w", "c")
    assert server.servicer.scheduler_token_sha256 == token_digest(secret)
    try:
        await worker.start()
        await worker.wait_registered(10)
        async with server.as_scheduler.aio_channel(worker.address) as channel:
            stub = pb_grpc.WorkerStub(channel)
            assert await _code(stub.GetLogs(pb.GetLogsRequest(), timeout=5)) == grpc.StatusCode.OK
            refused = [
                await _code(stub.RunFunction(pb.RunFunctionRequest(), timeout=5)),
                await _code(stub.UploadFile(pb.UploadFileRequest(), timeout=5)),
                await _code(stub.FetchResults(pb.FetchResultsRequest(), timeout=5)),
            ]
            assert refused == [grpc.StatusCode.UNAUTHENTICATED] * 3
            fetch = stub.FetchResult(pb.FetchResultRequest(key="missing"), timeout=5)
            assert await fetch.code() == grpc.StatusCode.UNAUTHENTICATED
        async with ClientSecurity("w").aio_channel(worker.address) as peer:
            call = pb_grpc.WorkerStub(peer).GetLogs(pb.GetLogsRequest(), timeout=5)
            assert await _code(call) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await worker.close()
        await server.stop(0)
