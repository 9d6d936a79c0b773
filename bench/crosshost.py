"""A hand-off between two hosts: two network namespaces joined by a veth pair.

    host A  10.232.0.1 [veth-a] ---- [veth-b] 10.232.0.2  host B
    scheduler, producer worker,                consumer worker
    client

Each host has its own network (and so its own host id): values go over the
wire in chunks, never through shared memory. Needs root and iproute2; where
namespaces cannot be made, :func:`measure` returns nothing and says why.

``python -m bench.crosshost --system apportion`` prints one JSON object; the
part that runs inside host A is the same module with ``--inside``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from typing import Any

from bench import handoff
from bench.clusters import BIN, ROOT, processes

IP = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin")
SHAPE = "tuple"
NBYTES = 100 * 1000**2
HOST_A, HOST_B = "10.232.0.1", "10.232.0.2"
PORT = 8786


def _ip(*args: str) -> None:
    done = subprocess.run([IP or "ip", *args], capture_output=True, text=True, timeout=15)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def measure(system: str, timeout: float = 600) -> dict[str, float]:
    """``crosshost_<shape>_100MB_MBps`` for ``system``, or {} where no namespaces."""
    suffix = secrets.token_hex(3)
    a, b = f"apportion-bench-{suffix}-a", f"apportion-bench-{suffix}-b"
    made: list[str] = []
    try:
        for ns in (a, b):
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", a, "link", "add", "veth-a", "type", "veth", "peer", "name", "veth-b", "netns", b)
        _ip("-n", a, "addr", "add", f"{HOST_A}/24", "dev", "veth-a")
        _ip("-n", b, "addr", "add", f"{HOST_B}/24", "dev", "veth-b")
        _ip("-n", a, "link", "set", "veth-a", "up")
        _ip("-n", b, "link", "set", "veth-b", "up")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        inside = ["-m", "bench.crosshost", "--inside", "--system", system, "--peer-ns", b]
        done = subprocess.run(
            [IP or "ip", "netns", "exec", a, sys.executable, *inside],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=ROOT,
        )
        if done.returncode != 0:
            raise RuntimeError(f"the cross-host round failed:\n{done.stderr[-3000:]}")
        figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
        return figures
    except (RuntimeError, OSError) as exc:
        if not made:
            print(f"crosshost: skipped, no network namespaces here ({exc})", file=sys.stderr)
            return {}
        raise
    finally:
        for ns in made:
            subprocess.run([IP or "ip", "netns", "del", ns], capture_output=True, timeout=15)


def _inside(system: str, peer_ns: str) -> dict[str, float]:
    """On host A: scheduler, producer and client here, the consumer on host B."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), APPORTION_LOG_LEVEL="WARNING")
    quiet: dict[str, Any] = {
        "stdin": subprocess.DEVNULL,
        "stdout": subprocess.DEVNULL,
        "stderr": subprocess.DEVNULL,
        "env": env,
    }
    on_b = [IP or "ip", "netns", "exec", peer_ns]
    with processes() as procs:
        if system == "apportion":
            address = f"{HOST_A}:{PORT}"
            scheduler = [str(BIN / "apportion"), "scheduler", "--host", "0.0.0.0"]
            procs.append(subprocess.Popen([*scheduler, "--port", str(PORT)], **quiet))
            time.sleep(1)
            worker = [str(BIN / "apportion"), "worker", address, "--nthreads", "1"]
        else:
            address = f"tcp://{HOST_A}:{PORT}"
            scheduler = [str(BIN / "dask"), "scheduler", "--host", "0.0.0.0", "--port", str(PORT)]
            procs.append(subprocess.Popen([*scheduler, "--no-dashboard"], **quiet))
            time.sleep(1)
            worker = [str(BIN / "dask"), "worker", address, "--nthreads", "1", "--no-dashboard"]
            worker += ["--no-nanny"]
        procs.append(subprocess.Popen([*worker, "--resources", "PRODUCER=1"], **quiet))
        procs.append(subprocess.Popen([*on_b, *worker, "--resources", "CONSUMER=1"], **quiet))
        with _client(system, address) as client:
            rate = handoff.handoff_MBps(client, SHAPE, NBYTES, "CONSUMER")
    return {f"crosshost_{SHAPE}_{handoff.size_label(NBYTES)}_MBps": rate}


def _client(system: str, address: str) -> Any:
    if system == "apportion":
        from client_sdk import Client

        client: Any = Client(address, timeout=60)
    else:
        from distributed import Client as DaskClient

        client = DaskClient(address, timeout=60)  # type: ignore[no-untyped-call]
    client.wait_for_workers(2, timeout=60)
    return client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--system", choices=("apportion", "dask"), default="apportion")
    parser.add_argument("--inside", action="store_true", help="(internal) run on host A")
    parser.add_argument("--peer-ns", help="(internal) host B's namespace")
    args = parser.parse_args()
    if args.inside:
        print(json.dumps(_inside(args.system, args.peer_ns)))
    else:
        print(json.dumps(measure(args.system)))


if __name__ == "__main__":
    main()
