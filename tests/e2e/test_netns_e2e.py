"""Several hosts on one machine: Linux network namespaces joined by veth pairs.

A scheduler host and two worker hosts, each its own network namespace::

    worker host 1                 scheduler host                 worker host 2
    10.231.1.2 [veth-s] ---- [veth-w1] 10.231.1.1
                                       10.231.2.1 [veth-w2] ---- [veth-s] 10.231.2.2

The scheduler host forwards between its links and the workers route through
it by default, so the two worker hosts reach each other for peer transfers.
The real ``apportion`` processes run with ``ip netns exec``; the client runs
as a subprocess on the scheduler host (tests/e2e/netns_client.py), because
entering a namespace inside pytest would move grpc's threads too.

Needs root and iproute2 (CI and the dev machine have both); skipped, saying
why, where namespaces cannot be made.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from apportion_common.transfer import STRIPE_MIN_BYTES
from tests.helpers.processes import APPORTION, wait_for

REPO = Path(__file__).resolve().parents[2]
IP = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin")
#: Every wait below is bounded by one of these.
START_TIMEOUT_S = 30.0
CLIENT_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 5.0
#: With --worker-ttl 2 the scheduler gives up on a silent worker after 2 s.
WORKER_TTL_S = 2


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([IP or "ip", *args], capture_output=True, text=True, timeout=15)


def in_ns(ns: str, *argv: str) -> list[str]:
    """The command line that runs ``argv`` on the host of namespace ``ns``."""
    return [IP or "ip", "netns", "exec", ns, *argv]


def _must(*args: str) -> None:
    done = _ip(*args)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")


class CannotMakeNamespaces(Exception):
    """``ip netns add`` failed: the test is skipped, saying why."""


class Hosts:
    """Three namespaces and the processes started in them; :meth:`close` undoes it all."""

    def __init__(self, log_dir: Path) -> None:
        suffix = secrets.token_hex(3)
        self.scheduler_ns = f"apportion-{suffix}-sched"
        self.worker_ns = {1: f"apportion-{suffix}-w1", 2: f"apportion-{suffix}-w2"}
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self.log_dir = log_dir
        self.port = 0
        self.env = dict(
            os.environ,
            PYTHONUNBUFFERED="1",
            # As tests/conftest.py does: every scheduler checks its books after
            # every event and exits with status 70 on a fault.
            APPORTION_SCHEDULER__CHECK_INVARIANTS="1",
        )

    # ----------------------------------------------------------- network

    def add_namespaces(self) -> None:
        for ns in (self.scheduler_ns, *self.worker_ns.values()):
            done = _ip("netns", "add", ns)
            if done.returncode != 0:
                raise CannotMakeNamespaces(f"`ip netns add` failed: {done.stderr.strip()}")
            self.namespaces.append(ns)
            _must("-n", ns, "link", "set", "lo", "up")

    def connect(self) -> None:
        """The veth pairs, addresses and routes of the picture at the top."""
        for i, ns in self.worker_ns.items():
            # Made in the scheduler's namespace with its peer in the worker's:
            # the names need only be unique inside each namespace.
            _must(
                "-n",
                self.scheduler_ns,
                "link",
                "add",
                f"veth-w{i}",
                "type",
                "veth",
                "peer",
                "name",
                "veth-s",
                "netns",
                ns,
            )
            _must("-n", self.scheduler_ns, "addr", "add", f"10.231.{i}.1/24", "dev", f"veth-w{i}")
            _must("-n", ns, "addr", "add", f"10.231.{i}.2/24", "dev", "veth-s")
            _must("-n", self.scheduler_ns, "link", "set", f"veth-w{i}", "up")
            _must("-n", ns, "link", "set", "veth-s", "up")
            _must("-n", ns, "route", "add", "default", "via", f"10.231.{i}.1")
        # /proc/sys/net belongs to the namespace of whoever opens it.
        forward = subprocess.run(
            in_ns(self.scheduler_ns, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"),
            capture_output=True,
            text=True,
            timeout=15,
        )
        if forward.returncode != 0:
            raise RuntimeError(f"cannot enable forwarding: {forward.stderr.strip()}")

    def cut_link(self, worker: int) -> None:
        """Take the worker host's end down: the scheduler keeps its route and its
        packets vanish, and the worker cannot send anything: no RST, no FIN."""
        _must("-n", self.worker_ns[worker], "link", "set", "veth-s", "down")

    # --------------------------------------------------------- processes

    def spawn(
        self, ns: str, argv: list[str], name: str, *, pipes: bool = False
    ) -> subprocess.Popen[bytes]:
        """``ip netns exec NS argv...`` in a session of its own (killpg reaches it
        all), output in a log file that teardown prints; with ``pipes`` its stdin
        and stdout are pipes to talk to it by, and only stderr goes to the log."""
        log = self.log_dir / f"{name}.log"
        self.logs.append(log)
        with log.open("wb") as out:
            proc = subprocess.Popen(
                in_ns(ns, *argv),
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipes else out,
                stderr=out,
                env=self.env,
                cwd=REPO,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def start_scheduler(self, *args: str) -> subprocess.Popen[bytes]:
        proc = self.spawn(
            self.scheduler_ns,
            [APPORTION, "scheduler", "--host", "0.0.0.0", "--port", "0", *args],
            "scheduler",
        )
        log = self.log_dir / "scheduler.log"

        def listening() -> bool:
            assert proc.poll() is None, f"the scheduler exited with {proc.returncode}"
            return "listening on" in log.read_text()

        wait_for(listening, START_TIMEOUT_S, "the scheduler to listen")
        line = next(ln for ln in log.read_text().splitlines() if "listening on" in ln)
        self.port = int(line.rsplit(":", 1)[1])
        return proc

    @property
    def local_address(self) -> str:
        """The scheduler as seen from its own host."""
        return f"127.0.0.1:{self.port}"

    def start_worker(self, worker: int, name: str, *args: str) -> subprocess.Popen[bytes]:
        """A worker on worker host ``worker`` that dials the scheduler on its link."""
        proc = self.spawn(
            self.worker_ns[worker],
            [APPORTION, "worker", f"10.231.{worker}.1:{self.port}", "--name", name, *args],
            name,
        )
        log = self.log_dir / f"{name}.log"

        def registered() -> bool:
            assert proc.poll() is None, f"worker {name} exited with {proc.returncode}"
            return "registered with" in log.read_text()

        wait_for(registered, START_TIMEOUT_S, f"worker {name} to register")
        return proc

    def status(self) -> dict[str, Any]:
        """``apportion status --json``, run on the scheduler's host."""
        done = subprocess.run(
            in_ns(self.scheduler_ns, APPORTION, "status", self.local_address, "--json"),
            capture_output=True,
            text=True,
            timeout=30,
            env=self.env,
        )
        assert done.returncode == 0, done.stderr
        info: dict[str, Any] = json.loads(done.stdout)
        return info

    def wait_for_workers(self, *names: str) -> dict[str, str]:
        """Poll ``status --json`` until exactly these workers are listed; their addresses."""
        listed: dict[str, str] = {}

        def exactly() -> bool:
            nonlocal listed
            listed = worker_addresses(self.status())
            return sorted(listed) == sorted(names)

        try:
            wait_for(exactly, START_TIMEOUT_S, f"status to list workers {names}")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; it lists {listed}") from None
        return listed

    def client(self, *args: str) -> subprocess.Popen[bytes]:
        return self.spawn(
            self.scheduler_ns,
            [sys.executable, "-m", "tests.e2e.netns_client", *args],
            "client",
            pipes=True,
        )

    # ----------------------------------------------------------- teardown

    def close(self) -> None:
        try:
            self._stop_processes()
        finally:
            for ns in self.namespaces:
                # Deleting the namespace deletes the veth ends in it, and their peers.
                _ip("netns", "delete", ns)
        for log in self.logs:
            if log.exists():
                tail = log.read_text(errors="replace").splitlines()[-40:]
                print(f"----- {log.name} (last {len(tail)} lines)", *tail, sep="\n")

    def _stop_processes(self) -> None:
        # Only groups whose leader is not reaped yet: a reaped leader's pid
        # (its group id) may belong to someone else by now.
        live = [proc for proc in self.procs if proc.poll() is None]
        for proc in live:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in live:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                # A worker cut off from its scheduler may still be waiting on it.
                _signal_group(proc, signal.SIGKILL)
                proc.wait(STOP_TIMEOUT_S)
        for proc in self.procs:
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the whole group has exited
        os.killpg(proc.pid, sig)


def _cannot_make_namespaces() -> str | None:
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if IP is None:
        return "iproute2's `ip` is not installed"
    return None


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    reason = _cannot_make_namespaces()
    if reason is not None:
        pytest.skip(reason)
    made = Hosts(tmp_path)
    try:
        try:
            made.add_namespaces()
        except CannotMakeNamespaces as exc:
            pytest.skip(str(exc))
        made.connect()
        yield made
    finally:
        made.close()


def read_event(client: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    """The client's next JSON line, within ``timeout`` seconds."""
    out: IO[bytes] | None = client.stdout
    assert out is not None
    with selectors.DefaultSelector() as sel:
        sel.register(out, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError(f"the client printed nothing within {timeout}s")
    line = out.readline().decode()
    assert line, f"the client exited with {client.wait(STOP_TIMEOUT_S)} and printed nothing"
    event: dict[str, Any] = json.loads(line)
    assert event["event"] != "error", event
    return event


def worker_addresses(info: dict[str, Any]) -> dict[str, str]:
    return {w["name"]: address for address, w in info["workers"].items()}


def test_a_result_made_on_one_host_is_consumed_on_the_other(hosts: Hosts) -> None:
    scheduler = hosts.start_scheduler()
    hosts.start_worker(1, "w1")
    hosts.start_worker(2, "w2")
    # Each worker advertises the address its host routes to the scheduler by.
    addresses = hosts.wait_for_workers("w1", "w2")
    assert addresses["w1"].startswith("10.231.1.2:"), addresses
    assert addresses["w2"].startswith("10.231.2.2:"), addresses

    client = hosts.client("transfer", hosts.local_address, "w1", "w2")
    done = read_event(client, CLIENT_TIMEOUT_S)
    assert done["event"] == "done"
    # Both ways: made on w1 and used on w2, then made on w2 and used on w1.
    assert [(r["maker"], r["consumer"]) for r in done["runs"]] == [("w1", "w2"), ("w2", "w1")]
    for run in done["runs"]:
        assert run["nbytes"] > STRIPE_MIN_BYTES  # striped over two connections
        assert run["sha256"] == run["expected_sha256"]
        assert run["fetched_ok"], run
    assert client.wait(STOP_TIMEOUT_S * 2) == 0
    assert scheduler.poll() is None, f"the scheduler died with status {scheduler.returncode}"


def test_a_worker_whose_link_is_cut_is_lost_and_its_work_runs_on_the_other(
    hosts: Hosts,
) -> None:
    scheduler = hosts.start_scheduler("--worker-ttl", str(WORKER_TTL_S))
    hosts.start_worker(1, "doomed", "--nthreads", "2", "--resources", "slot=2")
    hosts.start_worker(2, "survivor", "--nthreads", "2", "--resources", "slot=2")
    addresses = hosts.wait_for_workers("doomed", "survivor")
    assert addresses["doomed"].startswith("10.231.1.2:"), addresses
    survivor_address = addresses["survivor"]
    assert survivor_address.startswith("10.231.2.2:"), addresses

    client = hosts.client("lose-worker", hosts.local_address, "doomed")
    busy = read_event(client, CLIENT_TIMEOUT_S)
    assert busy["event"] == "busy"
    assert busy["early"] == {"maker": "doomed", "ok": True}
    hosts.cut_link(1)
    assert client.stdin is not None
    client.stdin.write(b"cut\n")
    client.stdin.flush()

    done = read_event(client, CLIENT_TIMEOUT_S)
    assert done["event"] == "done"
    print(f"lost {done['lost_after_s']}s, all done {done['done_after_s']}s after the cut")
    # The heartbeat timeout, not gRPC keepalive (5 to 15 s on a silent link),
    # declared it lost: a generous bound, four times the TTL.
    assert done["lost_after_s"] < 4 * WORKER_TTL_S, done
    assert done["values"] == [2 * i for i in range(6)]
    # The tasks that ran on the doomed host when its link went were placed
    # again, and every task takes 2 s: none finished there before the cut.
    assert set(done["ran_on"]) == {"survivor"}, done
    # The large result that lived only on the doomed host was made again.
    assert done["early"] == {"maker": "survivor", "ok": True}
    assert client.wait(STOP_TIMEOUT_S * 2) == 0

    info: dict[str, Any] = {}

    def only_the_survivor_left_idle() -> bool:
        nonlocal info
        info = hosts.status()
        return list(info["workers"]) == [survivor_address] and all(
            w["running"] == 0 and all(v == 0 for v in w["used_resources"].values())
            for w in info["workers"].values()
        )

    try:
        wait_for(only_the_survivor_left_idle, 15, "only the survivor, idle, in status --json")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; the last status: {info}") from None
    assert scheduler.poll() is None, f"the scheduler died with status {scheduler.returncode}"
