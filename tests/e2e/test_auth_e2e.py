"""Tokens and mutual TLS, end to end: real ``apportion`` processes, the SDK and grpcurl.

Each test starts its own scheduler and workers the way a user would, checks
that the wrong credentials are refused everywhere (SDK, workers, grpcurl, CLI)
and the right ones work end to end: a small result, a result too large to
travel inline (fetched from the worker), and a dependency handed from one
worker to the other. At the end, used resources must be back to zero.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from apportion_common.security import TLS, ClientSecurity
from client_sdk import Client, LocalCluster, SchedulerConnectionError
from protos import apportion_pb2 as pb
from protos import apportion_pb2_grpc as pb_grpc
from tests.helpers.processes import APPORTION, Processes, wait_for

TOKEN = "s3cret-token_for.tests"
WORKER_TOKEN = "worker-only-secret"
CLIENT_TOKEN = "client-only-secret"
#: Larger than the worker's INLINE_RESULT_BYTES (16 KiB): fetched from the worker.
BIG = 200_000

Grpcurl = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a test does not pass must not come from the environment instead."""
    for name in (
        "APPORTION_TOKEN",
        "APPORTION_WORKER_TOKEN",
        "APPORTION_CLIENT_TOKEN",
        "APPORTION_TLS_CA",
        "APPORTION_TLS_CERT",
        "APPORTION_TLS_KEY",
    ):
        monkeypatch.delenv(name, raising=False)


def cluster_state(address: str, security: ClientSecurity) -> pb.ClusterState:
    with security.sync_channel(address) as channel:
        state: pb.ClusterState = pb_grpc.SchedulerStub(channel).GetClusterState(
            pb.GetClusterStateRequest(), timeout=10, metadata=security.metadata
        )
        return state


def wait_for_workers(address: str, security: ClientSecurity, n: int) -> pb.ClusterState:
    wait_for(lambda: len(cluster_state(address, security).workers) >= n, 30, f"{n} workers")
    return cluster_state(address, security)


def assert_all_released(processes: Processes, address: str, security: ClientSecurity) -> None:
    """As the scheduler_address fixture: every lease back to zero, the scheduler alive."""

    def idle() -> bool:
        return all(
            w.running == 0 and all(v == 0 for v in w.used_resources.values())
            for w in cluster_state(address, security).workers
        )

    wait_for(idle, 15, "resources to be released")
    scheduler = processes.procs[0]
    assert scheduler.poll() is None, f"the scheduler died with status {scheduler.returncode}"


def assert_refused_worker(proc: subprocess.Popen[bytes]) -> None:
    """A refused worker exits non-zero on its own, saying why on stderr."""
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        raise AssertionError("a worker with the wrong token kept running") from None
    assert proc.returncode != 0
    assert "UNAUTHENTICATED" in err.decode(), err.decode()


def big(n: int) -> bytes:
    return b"x" * n


def where() -> str:
    from client_sdk import get_task_context

    return get_task_context().worker_name


def run_workload(client: Client) -> None:
    """Small result, large result from a worker, a dependency across workers."""
    assert client.submit(pow, 2, 10).result(timeout=30) == 1024
    # Restricted to w1, consumed on w2: the input moves between the workers.
    data = client.submit(big, BIG, workers=["w1"])
    assert data.result(timeout=30) == b"x" * BIG  # the client fetches it from w1
    size = client.submit(len, data, workers=["w2"])
    assert size.result(timeout=30) == BIG
    assert client.submit(where, workers=["w2"]).result(timeout=30) == "w2"


def start_scheduler_and_workers(
    processes: Processes,
    scheduler_args: list[str],
    worker_args: list[str],
    security: ClientSecurity,
    worker_env: dict[str, str] | None = None,
) -> str:
    address = processes.scheduler(*scheduler_args)
    for name in ("w1", "w2"):
        processes.start("worker", address, "--name", name, *worker_args, env=worker_env)
    wait_for_workers(address, security, 2)
    return address


def grpcurl_state(
    grpcurl: Grpcurl, address: str, *headers: str
) -> subprocess.CompletedProcess[str]:
    args = [a for h in headers for a in ("-H", h)]
    return grpcurl(*args, address, "apportion.v1.Scheduler/GetClusterState")


def worker_address(address: str, security: ClientSecurity, name: str) -> str:
    return next(w.address for w in cluster_state(address, security).workers if w.name == name)


# ----------------------------------------------------------------- tokens


def test_one_token_guards_scheduler_workers_and_grpcurl(
    processes: Processes, grpcurl: Grpcurl
) -> None:
    good = ClientSecurity(TOKEN)
    address = start_scheduler_and_workers(processes, ["--token", TOKEN], ["--token", TOKEN], good)

    # Workers without the token, or with a wrong one, stop with one clear line.
    assert_refused_worker(processes.start("worker", address, capture=True))
    assert_refused_worker(processes.start("worker", address, "--token", "wrong", capture=True))
    assert len(cluster_state(address, good).workers) == 2

    # The SDK: refused at Client() itself, saying what to pass.
    with pytest.raises(SchedulerConnectionError, match=r"UNAUTHENTICATED.*token="):
        Client(address)
    with pytest.raises(SchedulerConnectionError, match=r"UNAUTHENTICATED.*did not accept"):
        Client(address, token="wrong")

    # grpcurl: refused without or with a wrong token; health and reflection stay open.
    missing = grpcurl_state(grpcurl, address)
    assert missing.returncode != 0
    assert "Unauthenticated" in missing.stderr and "authorization: Bearer" in missing.stderr
    wrong = grpcurl_state(grpcurl, address, "authorization: Bearer wrong")
    assert wrong.returncode != 0 and "Unauthenticated" in wrong.stderr
    right = grpcurl_state(grpcurl, address, f"authorization: Bearer {TOKEN}")
    assert right.returncode == 0, right.stderr
    assert {w["name"] for w in json.loads(right.stdout)["workers"]} == {"w1", "w2"}
    health = grpcurl(address, "grpc.health.v1.Health/Check")
    assert health.returncode == 0 and "SERVING" in health.stdout
    listed = grpcurl(address, "list")
    assert listed.returncode == 0 and "apportion.v1.Scheduler" in listed.stdout

    # A worker's own service: the token, or nothing at all.
    w1 = worker_address(address, good, "w1")
    fetch = ["-d", '{"key": "no-such-key"}', w1, "apportion.v1.Worker/FetchResult"]
    refused = grpcurl(*fetch)
    assert refused.returncode != 0 and "Unauthenticated" in refused.stderr
    accepted = grpcurl("-H", f"authorization: Bearer {TOKEN}", *fetch)
    assert "NotFound" in accepted.stderr, accepted.stderr  # past the check: no such result
    assert "apportion.v1.Worker" in grpcurl(w1, "list").stdout

    # The CLI's unary commands.
    cli = [APPORTION, "status", address, "--json"]
    no_token = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert no_token.returncode == 2 and "UNAUTHENTICATED" in no_token.stderr
    with_token = subprocess.run(
        [*cli, "--token", TOKEN], capture_output=True, text=True, timeout=60
    )
    assert with_token.returncode == 0, with_token.stderr
    assert len(json.loads(with_token.stdout)["workers"]) == 2

    with Client(address, token=TOKEN) as client:
        run_workload(client)
    assert_all_released(processes, address, good)


def test_worker_and_client_tokens_are_refused_in_each_others_role(
    processes: Processes, grpcurl: Grpcurl
) -> None:
    operator = ClientSecurity(CLIENT_TOKEN)
    # The workers take their token from the environment, as a deployment would.
    address = start_scheduler_and_workers(
        processes,
        ["--worker-token", WORKER_TOKEN, "--client-token", CLIENT_TOKEN],
        [],
        operator,
        worker_env={"APPORTION_TOKEN": WORKER_TOKEN},
    )
    assert_refused_worker(processes.start("worker", address, "--token", CLIENT_TOKEN, capture=True))
    with pytest.raises(SchedulerConnectionError, match="UNAUTHENTICATED"):
        Client(address, token=WORKER_TOKEN)
    as_worker = grpcurl_state(grpcurl, address, f"authorization: Bearer {WORKER_TOKEN}")
    assert as_worker.returncode != 0 and "Unauthenticated" in as_worker.stderr
    as_client = grpcurl_state(grpcurl, address, f"authorization: Bearer {CLIENT_TOKEN}")
    assert as_client.returncode == 0, as_client.stderr

    # The workers were never given the client token, yet take it (by digest)
    # for FetchResult; a peer's worker token works there too.
    w2 = worker_address(address, operator, "w2")
    fetch = ["-d", '{"key": "no-such-key"}', w2, "apportion.v1.Worker/FetchResult"]
    for token in (CLIENT_TOKEN, WORKER_TOKEN):
        reply = grpcurl("-H", f"authorization: Bearer {token}", *fetch)
        assert "NotFound" in reply.stderr, reply.stderr
    wrong = grpcurl("-H", "authorization: Bearer wrong", *fetch)
    assert "Unauthenticated" in wrong.stderr

    # A worker's log lines are the clients' to read, not its peers'.
    w2_logs = ["-d", "{}", w2, "apportion.v1.Worker/GetLogs"]
    as_peer = grpcurl("-H", f"authorization: Bearer {WORKER_TOKEN}", *w2_logs)
    assert as_peer.returncode != 0 and "Unauthenticated" in as_peer.stderr
    as_client = grpcurl("-H", f"authorization: Bearer {CLIENT_TOKEN}", *w2_logs)
    assert as_client.returncode == 0 and "registered with" in as_client.stdout, as_client.stderr
    logs = [APPORTION, "logs", address, "w2"]
    refused = subprocess.run(logs, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "UNAUTHENTICATED" in refused.stderr
    shown = subprocess.run(
        [*logs, "--token", CLIENT_TOKEN], capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0 and "registered with" in shown.stdout, shown.stderr

    with Client(address, token=CLIENT_TOKEN) as client:
        run_workload(client)  # the large result is fetched from w1 with the client token
        assert any("registered with" in line for _, line in client.get_worker_logs()[w2])
        assert client.get_scheduler_logs()
    assert_all_released(processes, address, operator)


# ------------------------------------------------------------ mutual TLS


@dataclass(frozen=True)
class Pki:
    tls: TLS
    ca: Path
    cert: Path
    key: Path
    stranger: TLS  # a certificate from another CA


def _issue(ca: trustme.CA, directory: Path, name: str) -> tuple[Path, Path]:
    leaf = ca.issue_cert("127.0.0.1", "localhost")  # an IP SAN: addresses are IPs
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    for i, blob in enumerate(leaf.cert_chain_pems):
        blob.write_to_path(str(cert), append=i > 0)
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca, other = trustme.CA(), trustme.CA()
    ca_path, other_ca_path = tmp_path / "ca.pem", tmp_path / "other-ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    other.cert_pem.write_to_path(str(other_ca_path))
    cert, key = _issue(ca, tmp_path, "node")
    stranger_cert, stranger_key = _issue(other, tmp_path, "stranger")
    return Pki(
        tls=TLS(ca=ca_path, cert=cert, key=key),
        ca=ca_path,
        cert=cert,
        key=key,
        stranger=TLS(ca=ca_path, cert=stranger_cert, key=stranger_key),
    )


def test_mutual_tls(processes: Processes, pki: Pki, grpcurl_tls: Grpcurl) -> None:
    secure = ClientSecurity(tls=pki.tls)
    flags = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.cert), "--tls-key", str(pki.key)]
    address = start_scheduler_and_workers(
        processes,
        flags,
        [],
        secure,
        # The workers read theirs from the environment.
        worker_env={
            "APPORTION_TLS_CA": str(pki.ca),
            "APPORTION_TLS_CERT": str(pki.cert),
            "APPORTION_TLS_KEY": str(pki.key),
        },
    )

    # Without a certificate, with one from another CA, or in plaintext: refused.
    for tls in (TLS(ca=pki.ca), pki.stranger):
        with pytest.raises(SchedulerConnectionError, match="no scheduler answered"):
            Client(address, tls=tls, timeout=1)
    with pytest.raises(SchedulerConnectionError, match=r"plaintext \(no TLS\)"):
        Client(address, timeout=1)

    # grpcurl with the client certificate works; without it, the handshake fails.
    cert_args = ["-cacert", str(pki.ca), "-cert", str(pki.cert), "-key", str(pki.key)]
    listed = grpcurl_tls(*cert_args, address, "list")
    assert listed.returncode == 0 and "apportion.v1.Scheduler" in listed.stdout, listed.stderr
    state = grpcurl_tls(*cert_args, address, "apportion.v1.Scheduler/GetClusterState")
    assert state.returncode == 0 and len(json.loads(state.stdout)["workers"]) == 2
    # (A refused handshake looks like a peer that never answers: wait 2 s, not 10.)
    no_cert = grpcurl_tls("-connect-timeout", "2", "-cacert", str(pki.ca), address, "list")
    assert no_cert.returncode != 0
    w1 = worker_address(address, secure, "w1")
    assert "apportion.v1.Worker" in grpcurl_tls(*cert_args, w1, "list").stdout
    assert grpcurl_tls("-connect-timeout", "2", "-cacert", str(pki.ca), w1, "list").returncode != 0

    with Client(address, tls=pki.tls) as client:
        run_workload(client)  # peers and the client reach the workers over TLS too
    assert_all_released(processes, address, secure)


def test_local_cluster_with_token_and_tls(pki: Pki) -> None:
    with LocalCluster(n_workers=2, token=TOKEN, tls=pki.tls) as cluster:
        with pytest.raises(SchedulerConnectionError, match="UNAUTHENTICATED"):
            Client(cluster.address, tls=pki.tls, timeout=5)
        with Client(cluster) as client:  # the cluster's own credentials
            assert client.submit(big, BIG).result(timeout=30) == b"x" * BIG
            assert sum(client.gather(client.map(len, [b"ab", b"c"]))) == 3
        security = ClientSecurity(TOKEN, pki.tls)
        wait_for(
            lambda: all(w.running == 0 for w in cluster_state(cluster.address, security).workers),
            15,
            "tasks to finish",
        )
