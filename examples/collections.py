"""The seed's "Resources with collections" on a local apportion cluster.

A worker with GPU=1 and one without. A dask dataframe read from CSV files has
two steps annotated with ``dask.annotate(resources={"GPU": 1})``; a dask array
has one, a ``dask.delayed`` call another. Dask would drop the dataframe's
annotations (query planning) and the array's (fusion); apportion keeps them:
every annotated partition, block and call runs holding the GPU, on the GPU
worker, one at a time. Prints where each step ran.

Run with ``python examples/collections.py`` (needs ``pip install 'apportion[dask]'``).
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from pathlib import Path

import dask
import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from client_sdk import Client, LocalCluster, get_task_context

PARTITIONS = 6


def where() -> str:
    """``worker (GPU=n)`` inside a task; "" where dask calls it to learn its output."""
    try:
        ctx = get_task_context()
    except RuntimeError:
        return ""
    return f"{ctx.worker_name} (GPU={ctx.resources.get('GPU', 0):g})"


def func1(part: pd.DataFrame) -> pd.DataFrame:
    time.sleep(0.05 if len(part) else 0)  # pretend to run a GPU kernel
    return part.assign(x=part["x"] + 1, step1=where())


def func2(part: pd.DataFrame) -> pd.DataFrame:
    return part.assign(x=part["x"] * 2, step2=where())


def scale(block: np.ndarray) -> np.ndarray:
    return block * (2 if where().endswith("(GPU=1)") else 0)


def train(rows: int) -> str:
    return f"trained on {rows} rows on {where()}"


def main() -> None:
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(PARTITIONS):
            part = pd.DataFrame({"x": range(i * 10, i * 10 + 10)})
            part.to_csv(Path(tmp) / f"part-{i}.csv", index=False)
        with LocalCluster(n_workers=0, nthreads=4) as cluster:
            cluster.add_worker(resources={"GPU": 1}, name="gpu-worker")
            cluster.add_worker(name="cpu-worker")
            with Client(cluster):  # also dask's scheduler while it is open
                x = dd.read_csv(str(Path(tmp) / "part-*.csv"))
                with dask.annotate(resources={"GPU": 1}):
                    y = x.map_partitions(func1)
                    z = y.map_partitions(func2)
                frame = z.compute()  # optimized, as by default

                with dask.annotate(resources={"GPU": 1}):
                    scaled = da.ones(1_000, chunks=100).map_blocks(scale, dtype=float)
                total = scaled.sum().compute()  # map_blocks fused into the sum

                with dask.annotate(resources={"GPU": 1}):
                    model = dask.delayed(train)(len(frame))
                trained = model.compute()

    table = Table(title="Where the annotated steps ran")
    table.add_column("step")
    table.add_column("ran on")
    for step in ("step1", "step2"):
        counts = Counter(frame[step])
        table.add_row(f"dataframe {step}", ", ".join(f"{n} x {w}" for w, n in counts.items()))
    table.add_row("array map_blocks", "every block held a GPU" if total == 2_000 else "NOT all")
    table.add_row("delayed train", trained)
    console.print(table)
    console.print(f"sum of z.x = {frame['x'].sum()}; cluster shut down.")


if __name__ == "__main__":
    main()
