"""A client process of `make bench-load` (bench/load.py starts and drives them).

Each submits its share of the tasks when the parent says so, gathers the
results, checks that it got exactly the values it expects (each derived from
its index and the task's), and answers in JSON lines on stdout. Run as
``python -m bench.load_client``, :func:`work` lives in ``__main__`` and
travels by value, as the functions of a user's script do; imported from here
(``--by-reference``), it travels as a reference.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import sys
import time
from collections import Counter
from typing import Any

#: The resource every task needs and no worker offers until the drain.
SLOT = "SLOT"

# ---------------------------------------------------------------- the task


def expected_value(client_index: int, task_index: int) -> int:
    """What task ``task_index`` of client ``client_index`` must return (a hash,
    so that a result delivered to the wrong future cannot pass as right)."""
    return (client_index * 1_000_003 + task_index) * 2_654_435_761 % 4_294_967_291


def work(client_index: int, task_index: int) -> tuple[int, int, int]:
    return client_index, task_index, expected_value(client_index, task_index)


def payload_bytes(samples: int = 50) -> float:
    """The mean pickled payload of one task, as this process's client sends it."""
    from apportion_common import serialize

    sizes = [len(serialize.dump_call(work, (i % 20, i * 97), {})) for i in range(samples)]
    return sum(sizes) / len(sizes)


# ----------------------------------------------------------- client process


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def verify(index: int, results: list[Any]) -> dict[str, int]:
    """Count what is wrong with one client's results (all zeros: all right)."""
    expected = {(index, ti, expected_value(index, ti)) for ti in range(len(results))}
    got: Counter[Any] = Counter()
    errors = misplaced = 0
    for ti, value in enumerate(results):
        if isinstance(value, BaseException):
            errors += 1
            continue
        value = tuple(value) if isinstance(value, list | tuple) else value
        got[value] += 1
        if value != (index, ti, expected_value(index, ti)):
            misplaced += 1
    return {
        "received": sum(got.values()),
        "errors": errors,
        "missing": len(expected - got.keys()),
        "duplicated": sum(n - 1 for n in got.values() if n > 1),
        "wrong": sum(n for v, n in got.items() if v not in expected),
        "misplaced": misplaced,
    }


async def _client(address: str, index: int) -> None:
    """Submit, gather and check when the parent says so (one command a line)."""
    from client_sdk import Client

    loop = asyncio.get_running_loop()
    async with Client(address, asynchronous=True) as client:
        # Run as ``-m bench.load_client``, work() lives in __main__ and
        # travels by value; imported (--by-reference), as a reference.
        _emit({"ready": True, "payload_bytes": payload_bytes(), "cpu_s": _cpu()})
        futures: list[Any] = []
        submit_s = 0.0
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return  # the parent is gone
            command, *rest = line.split()
            if command == "submit":
                upto = int(rest[0])
                started = time.perf_counter()
                indices = range(len(futures), upto)
                futures += await client.map(
                    work, [index] * len(indices), indices, resources={SLOT: 1}
                )
                submit_s += time.perf_counter() - started
                _emit({"submitted": len(futures)})
            elif command == "gather":
                timeout = float(rest[0])
                cpu_before = _cpu()
                try:
                    results = await asyncio.wait_for(
                        asyncio.gather(*futures, return_exceptions=True), timeout
                    )
                except TimeoutError:
                    statuses = Counter(f.status for f in futures)
                    _emit({"report": {"timed_out": True, "statuses": dict(statuses)}})
                    continue
                last_result = time.time()
                counts = verify(index, results)
                # Dropping the futures releases the tasks (the scheduler must
                # then hold none); the stream stays open until "exit".
                futures = []
                del results
                gc.collect()
                _emit(
                    {
                        "report": {
                            "timed_out": False,
                            "last_result": last_result,
                            "submit_s": submit_s,
                            "cpu_before_gather_s": cpu_before,
                            "cpu_s": _cpu(),
                            **counts,
                        }
                    }
                )
            elif command == "exit":
                return


def client_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.load_client")
    parser.add_argument("--address", required=True)
    parser.add_argument("--index", type=int, required=True)
    args = parser.parse_args(argv)
    asyncio.run(_client(args.address, args.index))


if __name__ == "__main__":
    client_main(sys.argv[1:])
