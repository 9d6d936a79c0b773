"""The client's cluster controls over a stub transport: what each sends, and
what it makes of the answers (run, upload_file, restart, retire_workers,
get_scheduler_logs, get_worker_logs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from protos import apportion_pb2 as pb
from tests.helpers.stub_transport import resolve

from .conftest import Harness


def add_workers(h: Harness, *names: str) -> None:
    for i, name in enumerate(names):
        h.stub.cluster_state.workers.add(name=name, address=f"10.0.0.{i + 1}:7000")


def boom() -> None:
    raise ZeroDivisionError("on purpose")


async def test_run_calls_each_worker_or_those_named_and_keys_results_by_address(
    h: Harness,
) -> None:
    add_workers(h, "a", "b")
    assert await resolve(h.client.run(pow, 2, 3)) == {"10.0.0.1:7000": 8, "10.0.0.2:7000": 8}
    assert await resolve(h.client.run(pow, 2, 4, workers=["b"])) == {"10.0.0.2:7000": 16}
    assert await resolve(h.client.run(divmod, 7, 2, workers="10.0.0.1:7000")) == {
        "10.0.0.1:7000": (3, 1)
    }
    with pytest.raises(ZeroDivisionError, match="on purpose"):
        await resolve(h.client.run(boom))
    with pytest.raises(KeyError, match="'c'"):
        await resolve(h.client.run(pow, 2, 3, workers=["a", "c"]))


async def test_upload_file_goes_to_the_scheduler_then_to_each_worker(
    h: Harness, tmp_path: Path
) -> None:
    add_workers(h, "a", "b")
    path = tmp_path / "mymod.py"
    path.write_text("X = 1\n")
    await resolve(h.client.upload_file(path))
    uploads = [r for r in h.stub.requests if isinstance(r, pb.UploadFileRequest)]
    assert [(u.filename, u.data) for u in uploads] == [("mymod.py", b"X = 1\n")] * 3
    with pytest.raises(ValueError, match=r"only \.py"):
        await resolve(h.client.upload_file(tmp_path / "data.csv"))


async def test_restart_asks_the_scheduler_and_returns_the_workers_back(h: Harness) -> None:
    add_workers(h, "a")
    back = await resolve(h.client.restart(timeout=5))
    assert [w["name"] for w in back.values()] == ["a"]
    (request,) = [r for r in h.stub.requests if isinstance(r, pb.RestartRequest)]
    assert request.timeout_s == 5


async def test_retire_workers_returns_them_by_address(h: Harness) -> None:
    gone = await resolve(h.client.retire_workers(["a"], timeout=5))
    assert gone == {
        "a.stub:1": {
            "name": "a",
            "nthreads": 0,
            "resources": {},
            "used_resources": {},
            "running": 0,
            "queued": 0,
            "draining": False,
            "resources_text": {},
            "gpus": [],
            "memory_limit": 0,
            "memory": 0,
            "spilled_bytes": 0,
            "paused": False,
        }
    }


def log_lines(*texts: str) -> list[pb.LogLine]:
    return [pb.LogLine(level="INFO", text=t) for t in texts]


async def test_get_scheduler_logs_returns_level_and_line_pairs_oldest_first(h: Harness) -> None:
    h.stub.logs[""] = log_lines("one", "two", "three")
    assert await resolve(h.client.get_scheduler_logs()) == [
        ("INFO", "one"),
        ("INFO", "two"),
        ("INFO", "three"),
    ]
    assert await resolve(h.client.get_scheduler_logs(n=2)) == [("INFO", "two"), ("INFO", "three")]
    assert await resolve(h.client.get_scheduler_logs(n=None)) == [
        ("INFO", t) for t in ("one", "two", "three")
    ]
    asked = [r for r in h.stub.requests if isinstance(r, pb.GetLogsRequest)]
    assert [r.n if r.HasField("n") else None for r in asked] == [100, 2, None]
    with pytest.raises(ValueError, match="n must be"):
        await resolve(h.client.get_scheduler_logs(n=-1))


async def test_get_worker_logs_asks_each_worker_or_those_named(h: Harness) -> None:
    add_workers(h, "a", "b")
    h.stub.logs["10.0.0.1:7000"] = log_lines("a1", "a2")
    h.stub.logs["10.0.0.2:7000"] = log_lines("b1")
    assert await resolve(h.client.get_worker_logs()) == {
        "10.0.0.1:7000": [("INFO", "a1"), ("INFO", "a2")],
        "10.0.0.2:7000": [("INFO", "b1")],
    }
    assert await resolve(h.client.get_worker_logs(n=1, workers=["b"])) == {
        "10.0.0.2:7000": [("INFO", "b1")]
    }
    assert await resolve(h.client.get_worker_logs(n=1, workers="10.0.0.1:7000")) == {
        "10.0.0.1:7000": [("INFO", "a2")]
    }
    with pytest.raises(KeyError, match="'c'"):
        await resolve(h.client.get_worker_logs(workers=["a", "c"]))
