"""`make bench-load`: 100,000 queued tasks from 20 concurrent clients.

Real processes on 127.0.0.1, started as a user starts them: one
``apportion scheduler --port 0``, then ``--clients`` separate Python processes,
each with its own asynchronous ``client_sdk.Client``, each submitting
``--tasks-per-client`` tasks that need ``SLOT=1``, a resource no worker offers
yet, so that every task queues in the scheduler.

Phase 1 (queue): the clients submit in steps (0, 10, 25, 50, 75, 100 % of
their tasks); after each step, once the scheduler counts every task and has
gone idle, the scheduler's memory (VmRSS, and USS/PSS from smaps_rollup) is
sampled. A least-squares line through (pending tasks, bytes) gives bytes per
pending task; the pickled payload per task is measured too, so the figure can
be given with payloads aside. The submit rate counts the time from each step's
command to the scheduler holding the step's tasks, not the pauses to sample.

Phase 2 (drain): ``--workers`` ``apportion worker`` processes join with
``--nthreads`` threads and ``SLOT=<nthreads>``; every client gathers its
results and checks it got exactly the values it expects (each derived from
(client index, task index)): none missing, duplicated or wrong. Then the
clients drop their futures and the scheduler must hold no task and no worker
any resource.

Every wait is bounded (``--timeout`` for the whole run); every process started
is stopped at the end, also on error or Ctrl-C. Raw figures go to
bench/results/load.json, process logs to bench/results/load-logs/.

The client processes run bench/load_client.py (``python -m bench.load_client``;
the parent drives each over its stdin and reads JSON lines from its stdout);
bench/load_figures.py holds the figures and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from bench.clusters import BIN, ROOT, processes
from bench.load_client import SLOT
from bench.load_figures import Figures, fit, print_table
from bench.procstat import cpu_seconds, memory_of, tree_cpu_seconds

#: Fractions of each client's tasks submitted before each memory sample.
STEPS = (0.0, 0.10, 0.25, 0.50, 0.75, 1.0)
LOG_DIR = ROOT / "bench" / "results" / "load-logs"

# --------------------------------------------------------- parent: plumbing


class RunFailed(RuntimeError):
    """The run went wrong: the message says what and where to look."""


@dataclass
class Deadline:
    seconds: float
    start: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def wait_for(
        self, predicate: Callable[[], bool], what: str, at_most: float, interval: float = 0.05
    ) -> None:
        """Poll ``predicate`` for at most ``at_most`` s (and within the run's budget)."""
        allowed = self.allow(at_most)
        limit = time.monotonic() + allowed
        while not predicate():
            if time.monotonic() > limit:
                raise RunFailed(f"timed out after {allowed:.0f}s waiting for {what}{self.why()}")
            time.sleep(interval)

    def allow(self, at_most: float) -> float:
        """Seconds for one wait: ``at_most``, or what is left of the run's budget."""
        return min(at_most, max(self.left(), 0.0))

    def why(self) -> str:
        spent = self.left() <= 0
        return f" (the whole run's --timeout {self.seconds:g}s is spent)" if spent else ""


def child_env() -> dict[str, str]:
    env = dict(
        os.environ, APPORTION_LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT)
    )
    # A production scheduler: the test suite's per-event check of the books
    # walks every task, which is not what a user runs.
    env.pop("APPORTION_SCHEDULER__CHECK_INVARIANTS", None)
    return env


def spawn(
    procs: list[subprocess.Popen[bytes]], name: str, args: list[str], *, pipes: bool = False
) -> subprocess.Popen[bytes]:
    """Start a process with its stderr (and stdout unless ``pipes``) in LOG_DIR."""
    stderr = (LOG_DIR / f"{name}.err").open("wb")
    stdout: IO[bytes] | int = subprocess.PIPE if pipes else (LOG_DIR / f"{name}.out").open("wb")
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=child_env(),
            cwd=ROOT,
        )
    finally:
        stderr.close()
        if not isinstance(stdout, int):
            stdout.close()
    procs.append(proc)
    return proc


class Observer:
    """GetClusterState over a plain unary call (no client stream of its own)."""

    def __init__(self, address: str) -> None:
        import grpc

        from protos import apportion_pb2 as pb
        from protos import apportion_pb2_grpc as pb_grpc

        self._pb = pb
        self._channel = grpc.insecure_channel(address)
        self._stub = pb_grpc.SchedulerStub(self._channel)

    def state(self) -> Any:
        import grpc

        try:
            return self._stub.GetClusterState(self._pb.GetClusterStateRequest(), timeout=30)
        except grpc.RpcError as exc:
            raise RunFailed(
                f"the scheduler did not answer GetClusterState ({exc.code().name}: "
                f"{exc.details()}); see {LOG_DIR}/scheduler.err"
            ) from None

    def tasks(self) -> dict[str, int]:
        return dict(self.state().task_counts)

    def close(self) -> None:
        self._channel.close()


class Clients:
    """The client processes, driven by lines on stdin, answering JSON lines."""

    def __init__(
        self, procs: list[subprocess.Popen[bytes]], address: str, n: int, by_reference: bool
    ) -> None:
        self.replies: queue.Queue[tuple[int, dict[str, Any] | None]] = queue.Queue()
        entry = (
            [
                "-c",
                "import sys; from bench.load_client import client_main; client_main(sys.argv[1:])",
            ]
            if by_reference
            else ["-m", "bench.load_client"]
        )
        self.procs = [
            spawn(
                procs,
                f"client-{i}",
                [sys.executable, *entry, "--address", address, "--index", str(i)],
                pipes=True,
            )
            for i in range(n)
        ]
        for i, proc in enumerate(self.procs):
            threading.Thread(target=self._read, args=(i, proc), daemon=True).start()

    def _read(self, index: int, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            try:
                self.replies.put((index, json.loads(raw)))
            except json.JSONDecodeError:
                continue  # not one of ours (a stray print); the log has stderr
        self.replies.put((index, None))

    def send(self, line: str) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):  # noticed as EOF by the reader
                proc.stdin.write(f"{line}\n".encode())
                proc.stdin.flush()

    def collect(self, key: str, deadline: Deadline, at_most: float) -> list[dict[str, Any]]:
        """One reply holding ``key`` from every client, in client order."""
        got: dict[int, Any] = {}
        allowed = deadline.allow(at_most)
        limit = time.monotonic() + allowed
        while len(got) < len(self.procs):
            try:
                index, reply = self.replies.get(timeout=max(limit - time.monotonic(), 0.01))
            except queue.Empty:
                missing = sorted(set(range(len(self.procs))) - got.keys())
                raise RunFailed(
                    f"timed out after {allowed:.0f}s waiting for {key!r} from clients {missing}"
                    f"{deadline.why()}; see {LOG_DIR}/client-N.err"
                ) from None
            if reply is None:
                code = self.procs[index].poll()
                raise RunFailed(
                    f"client {index} exited (status {code}) before answering {key!r}; "
                    f"see {LOG_DIR}/client-{index}.err"
                )
            if key in reply:
                got[index] = reply
        return [got[i] for i in range(len(self.procs))]


def start_scheduler(procs: list[subprocess.Popen[bytes]], deadline: Deadline) -> tuple[int, str]:
    proc = spawn(
        procs,
        "scheduler",
        [str(BIN / "apportion"), "scheduler", "--host", "127.0.0.1", "--port", "0"],
    )
    out = LOG_DIR / "scheduler.out"
    address: list[str] = []

    def listening() -> bool:
        if proc.poll() is not None:
            raise RunFailed(f"the scheduler exited with {proc.returncode}; see {LOG_DIR}")
        for line in out.read_text().splitlines():
            if "listening on" in line:
                address.append(line.rsplit(" ", 1)[1])
                return True
        return False

    deadline.wait_for(listening, "the scheduler to listen", 30)
    return proc.pid, address[0]


def wait_idle(pid: int, deadline: Deadline, at_most: float = 10.0) -> None:
    """Until the process used under 10 ms of CPU in 0.3 s: its work is done."""
    last = [cpu_seconds(pid)]

    def idle() -> bool:
        now = cpu_seconds(pid)
        quiet = now - last[0] < 0.01
        last[0] = now
        return quiet

    with contextlib.suppress(RunFailed):  # a busy scheduler still gives a sample
        deadline.wait_for(idle, "the scheduler to go idle", at_most, interval=0.3)


def run(args: argparse.Namespace) -> Figures:
    figures = Figures(args.clients, args.tasks_per_client, args.workers, args.nthreads)
    figures.by_reference = args.by_reference
    figures.loadavg_start = os.getloadavg()
    n_total = args.clients * args.tasks_per_client
    figures.tasks = n_total
    figures.key_bytes = len(f"work-{'0' * 32}")  # the SDK's default key: name-uuid4hex
    deadline = Deadline(args.timeout)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    wall_start = time.monotonic()
    with processes() as procs:
        pid, address = start_scheduler(procs, deadline)
        observer = Observer(address)
        try:
            started = time.monotonic()
            clients = Clients(procs, address, args.clients, args.by_reference)
            ready = clients.collect("ready", deadline, 120)
            figures.payload_bytes = sum(r["payload_bytes"] for r in ready) / len(ready)
            figures.clients_ready_s = time.monotonic() - started

            # Phase 1: queue every task, sampling memory after each step.
            cpu_before = cpu_seconds(pid)
            for fraction in STEPS:
                upto = round(fraction * args.tasks_per_client)
                want = upto * args.clients
                if fraction > 0:
                    started = time.monotonic()
                    clients.send(f"submit {upto}")
                    clients.collect("submitted", deadline, 300)
                    deadline.wait_for(
                        lambda: sum(observer.tasks().values()) >= want,  # noqa: B023 (called here)
                        f"the scheduler to hold {want:,} tasks",
                        300,
                        # GetClusterState counts every task: polled faster,
                        # it would slow the scheduler it measures.
                        interval=0.1,
                    )
                    figures.submit_steps_s.append(time.monotonic() - started)
                    figures.submit_s += figures.submit_steps_s[-1]
                wait_idle(pid, deadline)
                counts = observer.tasks()
                mem = memory_of(pid)
                figures.samples.append(
                    {"tasks": sum(counts.values()), "counts": counts, **asdict(mem)}
                )
                print(
                    f"queued {sum(counts.values()):>7,}: RSS {mem.rss / 2**20:7.1f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
            figures.scheduler_cpu_submit_s = cpu_seconds(pid) - cpu_before
            figures.submit_tps = n_total / figures.submit_s
            held = figures.samples[-1]["tasks"]
            if held != n_total:
                raise RunFailed(
                    f"the scheduler holds {held:,} tasks, not the {n_total:,} submitted"
                )

            # Phase 2: workers join; every client gathers and checks.
            cpu_before = cpu_seconds(pid)
            clients.send(f"gather {max(deadline.left() - 30, 10):.0f}")
            spawned = time.monotonic()
            spawned_wall = time.time()
            workers = [
                spawn(
                    procs,
                    f"worker-{i}",
                    [
                        str(BIN / "apportion"),
                        "worker",
                        address,
                        "--nthreads",
                        str(args.nthreads),
                        "--resources",
                        f"{SLOT}={args.nthreads}",
                        "--name",
                        f"load-{i}",
                    ],
                )
                for i in range(args.workers)
            ]
            deadline.wait_for(
                lambda: len(observer.state().workers) > 0, "a worker to join", 60, interval=0.1
            )
            joined_wall = time.time()
            figures.workers_joined_after_s = time.monotonic() - spawned
            reports = [r["report"] for r in clients.collect("report", deadline, deadline.left())]
            timed_out = [i for i, r in enumerate(reports) if r["timed_out"]]
            if timed_out:
                raise RunFailed(
                    f"clients {timed_out} did not get all results in time: "
                    + "; ".join(f"client {i}: {reports[i]['statuses']}" for i in timed_out)
                )
            last = max(r["last_result"] for r in reports)
            figures.drain_s = last - joined_wall
            figures.drain_tps = n_total / figures.drain_s
            figures.drain_from_spawn_tps = n_total / (last - spawned_wall)
            figures.scheduler_cpu_drain_s = cpu_seconds(pid) - cpu_before
            figures.worker_cpu_s = [tree_cpu_seconds(w.pid) for w in workers]
            figures.client_cpu_drain_s = [r["cpu_s"] - r["cpu_before_gather_s"] for r in reports]
            figures.client_cpu_submit_s = [
                r["cpu_before_gather_s"] - c["cpu_s"] for r, c in zip(reports, ready, strict=True)
            ]
            figures.client_map_s = [r["submit_s"] for r in reports]
            keys = ("received", "errors", "missing", "duplicated", "wrong", "misplaced")
            figures.checks = {k: sum(r[k] for r in reports) for k in keys}
            bad = [i for i, r in enumerate(reports) if any(r[k] for k in keys[1:])]
            bad += [i for i, r in enumerate(reports) if r["received"] != args.tasks_per_client]
            if bad:
                raise RunFailed(
                    "wrong results for clients "
                    + "; ".join(f"{i}: {reports[i]}" for i in sorted(set(bad)))
                )

            # Every future dropped: the scheduler must hold no task, no lease.
            started = time.monotonic()

            def released() -> bool:
                state = observer.state()
                return not sum(state.task_counts.values()) and all(
                    w.running == 0 and not any(w.used_resources.values()) for w in state.workers
                )

            try:
                deadline.wait_for(released, "every task and lease to be released", 60)
            except RunFailed as exc:
                raise RunFailed(f"{exc}: the scheduler says {observer.state()}") from None
            figures.release_s = time.monotonic() - started
            wait_idle(pid, deadline)
            mem = memory_of(pid)
            figures.rss_peak, figures.rss_released, figures.uss_released = mem.hwm, mem.rss, mem.uss
            clients.send("exit")
            for i, proc in enumerate(clients.procs):
                try:
                    proc.wait(max(min(30, deadline.left()), 1))
                except subprocess.TimeoutExpired:
                    raise RunFailed(f"client {i} did not exit when told to") from None
            wait_idle(pid, deadline)
            figures.rss_clients_gone = memory_of(pid).rss
            for i in range(args.clients):
                text = (LOG_DIR / f"client-{i}.err").read_text(errors="replace")
                figures.client_warnings += text.count("waits until a worker that fits joins")
        finally:
            observer.close()
    figures.wall_s = time.monotonic() - wall_start
    figures.loadavg_end = os.getloadavg()
    for name in ("rss", "uss", "pss"):
        points = [(s["tasks"], s[name]) for s in figures.samples if s[name] is not None]
        if len(points) >= 2:
            figures.fits[name] = fit(points)
    return figures


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM ends the run as Ctrl-C does, so every process is stopped."""
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20, help="client processes (20)")
    parser.add_argument(
        "--tasks-per-client", type=int, default=5_000, help="tasks each submits (5,000)"
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes (2)")
    parser.add_argument(
        "--nthreads", type=int, default=2, help="threads per worker, and its SLOT amount (2)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="4 clients x 1,000 tasks (a smoke run)"
    )
    parser.add_argument(
        "--by-reference",
        action="store_true",
        help="clients import the task function, so it pickles as a reference "
        "(by default it lives in the client's __main__ and travels by value)",
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds for the whole run")
    parser.add_argument(
        "--out", help="raw figures (bench/results/load.json; load-quick.json with --quick)"
    )
    args = parser.parse_args()
    if args.quick:
        args.clients, args.tasks_per_client = 4, 1_000
    if args.out is None:
        args.out = f"bench/results/load{'-quick' if args.quick else ''}.json"
    for name in ("clients", "tasks_per_client", "workers", "nthreads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")

    signal.signal(signal.SIGTERM, _interrupt)
    # Also when started in the background, where a shell ignores SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        figures = run(args)
    except RunFailed as exc:
        sys.exit(f"bench-load failed: {exc}")
    except KeyboardInterrupt:
        sys.exit("bench-load interrupted; every process it started was stopped")
    print_table(figures)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        **asdict(figures),
    }
    out.write_text(json.dumps(raw, indent=2) + "\n")
    print(f"raw figures: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
