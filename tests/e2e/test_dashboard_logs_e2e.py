"""The dashboard's log links with real ``apportion`` processes: a task's own
log line on its worker's page (the link read off the page's snapshot), the
scheduler's "listening on" line on its page, every log path behind the
token, an unknown worker named in a 404, a frozen worker named on a page
that says it did not answer while the scheduler serves on; and, with
separate worker and client tokens and mutual TLS, the scheduler still
reads a worker's lines (it never holds the client token)."""

from __future__ import annotations

import json
import signal
import ssl
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import trustme

from apportion_common.security import TLS
from client_sdk import Client
from tests.e2e.test_logs_e2e import log_through_own_logger
from tests.helpers.processes import Processes

TOKEN = "dashboard-logs-token"
WORKER_TOKEN = "dashboard-logs-worker-token"
CLIENT_TOKEN = "dashboard-logs-client-token"
#: What the scheduler's dashboard gives a worker to answer (logpages.WORKER_LOGS_TIMEOUT_S).
WORKER_ANSWER_S = 5


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("APPORTION_TOKEN", "APPORTION_WORKER_TOKEN", "APPORTION_CLIENT_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def get(
    url: str, token: str | None = TOKEN, context: ssl.SSLContext | None = None
) -> tuple[int, str]:
    """(status, body) of a GET, with ``Authorization: Bearer token`` unless None."""
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read().decode()


def first_snapshot(base: str) -> dict[str, Any]:
    """The first update the page's event stream sends."""
    request = urllib.request.Request(
        base + "/api/v1/stream", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=30) as stream:
        for raw in stream:
            if raw.startswith(b"data: "):
                snapshot: dict[str, Any] = json.loads(raw.removeprefix(b"data: "))
                return snapshot
    raise AssertionError("the event stream ended before its first snapshot")


def test_the_dashboard_links_to_the_logs_of_each_worker_and_the_scheduler(
    processes: Processes,
) -> None:
    # A long TTL: the worker frozen below stays connected, as a hung one does at first.
    address = processes.scheduler(
        "--token", TOKEN, "--dashboard-address", "127.0.0.1:0", "--worker-ttl", "60"
    )
    for name in ("alpha", "beta"):
        # No nanny: the process to freeze is the worker itself.
        processes.start("worker", address, "--token", TOKEN, "--name", name, "--no-nanny")
    beta = processes.procs[-1]
    marker = f"<i>{uuid.uuid4().hex}</i> & co"
    with Client(address, token=TOKEN) as client:
        client.wait_for_workers(2, timeout=30)
        where = client.submit(log_through_own_logger, marker, workers=["alpha"]).result(30)
        info = client.scheduler_info()
    base = f"http://{info['dashboard_address']}"
    addresses = {w["name"]: a for a, w in info["workers"].items()}
    assert where == addresses["alpha"]

    status, index = get(base + "/")
    assert status == 200 and 'id="scheduler-logs" href="/logs/scheduler"' in index
    links = {row["name"]: row["logs"] for row in first_snapshot(base)["workers"]}
    assert set(links) == {"alpha", "beta"}

    status, page = get(base + links["alpha"])
    assert status == 200, page
    assert f"logs of worker alpha ({where})" in page
    escaped = marker.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    assert f"WARNING mytask: {escaped} line 0" in page
    assert marker not in page  # the line's markup is shown, never rendered
    status, page = get(base + links["beta"])
    assert status == 200 and "registered with" in page and escaped not in page
    status, body = get(base + "/api/v1/logs/worker/alpha?n=1")
    assert status == 200
    ((level, line),) = json.loads(body)["lines"]
    assert level == "WARNING" and line.endswith(f"mytask: {marker} line 0")

    status, page = get(base + "/logs/scheduler")
    assert status == 200 and f"scheduler listening on {address}" in page
    assert escaped not in page  # the scheduler's own lines, not a worker's

    guarded = ["/logs/scheduler", links["alpha"], "/api/v1/logs/scheduler", "/logs/worker/beta"]
    for path in guarded:
        assert get(base + path, token=None)[0] == 401, path
        assert get(base + path, token="not-it")[0] == 401, path

    status, page = get(base + "/logs/worker/nobody")
    assert status == 404 and "no worker &#x27;nobody&#x27; is connected" in page
    status, body = get(base + "/api/v1/logs/worker/nobody")
    assert status == 404 and "no worker 'nobody' is connected" in json.loads(body)["error"]

    beta.send_signal(signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(1) as pool:
            asking = pool.submit(get, base + links["beta"])
            # While the dashboard waits for beta, the scheduler serves as ever.
            status, state = get(base + "/api/v1/state")
            assert status == 200 and set(json.loads(state)["workers"]) == set(addresses.values())
            assert not asking.done()
            status, page = asking.result(WORKER_ANSWER_S + 25)
    finally:
        beta.send_signal(signal.SIGCONT)
    assert status == 504
    beta_address = addresses["beta"]
    assert f"worker beta ({beta_address}) gave no logs: no answer within 5 s" in page


def _pki(directory: Path) -> tuple[Path, Path, Path]:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    ca_path, cert, key = directory / "ca.pem", directory / "node.pem", directory / "node.key"
    ca.cert_pem.write_to_path(str(ca_path))
    for i, blob in enumerate(leaf.cert_chain_pems):
        blob.write_to_path(str(cert), append=i > 0)
    leaf.private_key_pem.write_to_path(str(key))
    return ca_path, cert, key


def test_with_separate_tokens_and_mutual_tls_the_scheduler_reads_a_worker_s_logs(
    processes: Processes, tmp_path: Path
) -> None:
    ca, cert, key = _pki(tmp_path)
    tls_flags = ["--tls-ca", str(ca), "--tls-cert", str(cert), "--tls-key", str(key)]
    address = processes.scheduler(
        "--worker-token",
        WORKER_TOKEN,
        "--client-token",
        CLIENT_TOKEN,
        "--dashboard-address",
        "127.0.0.1:0",
        *tls_flags,
    )
    processes.start("worker", address, "--token", WORKER_TOKEN, "--name", "secure", *tls_flags)
    with Client(address, token=CLIENT_TOKEN, tls=TLS(ca, cert, key)) as client:
        client.wait_for_workers(1, timeout=30)
        dashboard = client.scheduler_info()["dashboard_address"]
    # A browser's view: it trusts the CA and has no client certificate.
    trust = ssl.create_default_context(cafile=str(ca))
    url = f"https://{dashboard}/logs/worker/secure"
    status, page = get(url, CLIENT_TOKEN, trust)
    assert status == 200, page
    assert "registered with" in page  # asked of the worker over TLS, with the scheduler's secret
    assert get(url, WORKER_TOKEN, trust)[0] == 401  # a worker's token opens no dashboard path
