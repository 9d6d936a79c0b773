"""One client of the chaos bench: submits its share of the graph, gathers
every result, checks each, and prints one JSON line (``bench.chaos`` reads it).

    python -m bench.chaos_client ADDRESS INDEX TASKS LOG_DIR
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

from bench.chaos_tasks import aggregate, expected, load, process
from client_sdk import Client

#: GPU results summed by each aggregate (on the MEMORY worker).
GROUP = 49


def _report_stragglers(futures: list[Any], index: int) -> None:
    """Every 30 s, on stderr: the futures not done yet (what a hang waits for)."""
    while True:
        time.sleep(30)
        waiting = [f for f in futures if not f.done()]
        if not waiting:
            return
        sample = ", ".join(f"{f.key} {f.status}" for f in waiting[:5])
        print(f"client {index}: {len(waiting)} not done: {sample}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> None:
    address, index, tasks, log_dir = argv[0], int(argv[1]), int(argv[2]), argv[3]
    # Per 49 items: 49 loads, 49 GPU tasks and one aggregate (99 tasks).
    items = tasks * GROUP // (2 * GROUP + 1)
    began = time.monotonic()
    with Client(address, timeout=60) as client:
        loads = [
            client.submit(load, log_dir, index, i, key=f"load-{index}-{i}") for i in range(items)
        ]
        processed = [
            client.submit(process, log_dir, x, resources={"GPU": 1}, key=f"process-{index}-{i}")
            for i, x in enumerate(loads)
        ]
        groups = [processed[at : at + GROUP] for at in range(0, items, GROUP)]
        sums = [
            client.submit(
                aggregate, log_dir, group, resources={"MEMORY": 1e9}, key=f"aggregate-{index}-{g}"
            )
            for g, group in enumerate(groups)
        ]
        del loads
        watchdog = threading.Thread(
            target=_report_stragglers, args=(processed + sums, index), daemon=True
        )
        watchdog.start()
        values = client.gather(processed)
        totals = client.gather(sums)
    wrong = sum(v != expected(index, i) for i, v in enumerate(values))
    want = [
        sum(expected(index, i) for i in range(at, min(at + GROUP, items)))
        for at in range(0, items, GROUP)
    ]
    wrong += sum(t != w for t, w in zip(totals, want, strict=True))
    keys = 2 * items + len(groups)
    print(
        json.dumps(
            {
                "client": index,
                "tasks": keys,
                "results": len(values) + len(totals),
                "expected_results": len(processed) + len(sums),
                "wrong": wrong,
                "seconds": time.monotonic() - began,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
