"""Dask graphs as apportion tasks, without processes: keys, order,
dependencies, annotations found through fusion, and the wrong uses."""

from __future__ import annotations

import sys
from typing import Any

import dask
import dask.array as da
import pytest
from dask import delayed

from apportion_common import serialize
from client_sdk import Client
from client_sdk._dask import capture
from client_sdk._dask.api import require_dask
from client_sdk._dask.graph import to_specs
from client_sdk._spec import TaskOptions
from tests.helpers.stub_transport import ADDRESS, StubTransport

NONE = TaskOptions({}, 0, 0, (), False)


def inc(x: int) -> int:
    return x + 1


def test_a_graph_becomes_one_task_per_node_inputs_first() -> None:
    graph = {"c": (sum, ["a", "b"]), ("b", 0): (inc, "a"), "a": 1, "b": (inc, ("b", 0))}
    submission = to_specs(graph, capture.Notes(), NONE, client=object())
    keys = [spec.key for spec in submission.specs]
    assert keys.index("a") < keys.index("b-0") < keys.index("b") < keys.index("c")
    by_key = {spec.key: spec for spec in submission.specs}
    assert sorted(by_key["c"].dependencies) == ["a", "b"]
    assert submission.names[("b", 0)] == "b-0"
    # What a worker runs: the node, on its inputs' values.
    fn, args, _ = serialize.loads(by_key["c"].payload)
    pickled, dependencies, held, *refs = args
    values = {"a": 1, "b": 3}
    assert fn(pickled, dependencies, held, *(values[r.key] for r in refs)) == 4


def test_keys_that_read_the_same_stay_apart() -> None:
    graph = {("x", 1): 1, "x-1": 2}
    names = to_specs(graph, capture.Notes(), NONE, client=object()).names
    assert len(set(names.values())) == 2


def test_a_graph_missing_an_input_is_refused_by_name() -> None:
    from dask._task_spec import Task, TaskRef

    with pytest.raises(KeyError, match="needs 'nowhere'"):
        to_specs({"a": Task("a", inc, TaskRef("nowhere"))}, capture.Notes(), NONE, object())


def test_annotations_of_fused_parts_combine_to_the_most_each_needs() -> None:
    found = [
        {"resources": {"GPU": 1, "MEMORY": "1GB"}, "priority": 1},
        {"resources": {"GPU": 0.5, "MEMORY": 2e9}, "retries": 2, "priority": 5},
    ]
    assert capture.combined(found) == {
        "resources": {"GPU": 1, "MEMORY": 2e9},
        "priority": 5,
        "retries": 2,
    }
    assert capture.evaluated({"resources": lambda key: {"GPU": len(key)}}, "ab") == {
        "resources": {"GPU": 2}
    }


def test_an_array_annotation_is_found_inside_the_fused_task() -> None:
    with dask.annotate(resources={"GPU": 1}):
        y = da.ones(10, chunks=5).map_blocks(inc, dtype=float)
    total = y.sum()
    (optimized,) = dask.optimize(total)
    notes = capture.Notes(capture.from_layers(total.__dask_graph__()))
    graph = dict(optimized.__dask_graph__())
    annotated = {key for key, node in graph.items() if notes.of(key, node)}
    # The map_blocks step lives on inside the sum's tasks only.
    assert annotated and all("sum" in capture.name_of(key) for key in annotated)
    submission = to_specs(graph, notes, NONE, client=object())
    gpu = {spec.key for spec in submission.specs if dict(spec.resources) == {"GPU": 1.0}}
    assert gpu == {submission.names[key] for key in annotated}


def where(*args: Any) -> None:
    """Stands for a user function."""


def test_a_delayed_call_outside_the_block_is_not_annotated_by_its_function() -> None:
    with dask.annotate(resources={"GPU": 1}):
        inside = delayed(where)(1)
    outside = delayed(where)(inside)
    notes = capture.Notes(capture.from_layers(outside.__dask_graph__()))
    graph = dict(outside.__dask_graph__())
    assert notes.of(inside.key, graph[inside.key])
    assert not notes.of(outside.key, graph[outside.key])


def test_running_a_collection_without_dask_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "dask", None)
    with pytest.raises(ImportError, match=r"pip install 'apportion\[dask\]'"):
        require_dask()


def test_a_future_of_another_client_in_a_graph_is_refused() -> None:
    one, other = StubTransport(), StubTransport()
    a = Client(ADDRESS, _transport=one, set_as_default=False)
    b = Client(ADDRESS, _transport=other, set_as_default=False)
    try:
        stranger = b.submit(inc, 1, key="theirs")
        with pytest.raises(ValueError, match="future 'theirs' of another client"):
            a.get({"x": stranger, "y": (inc, "x")}, "y")
    finally:
        a.close()
        b.close()


def double(part: Any) -> Any:
    return part * 2


def test_a_dataframe_function_is_annotated_only_where_it_was_annotated(tmp_path: Any) -> None:
    """The same function under dask.annotate in one pipeline and outside it
    in another: only the first's tasks need the GPU, through optimization
    (query planning drops dask's own annotations, and fuses)."""
    import dask.dataframe as dd
    import pandas as pd

    pd.DataFrame({"a": range(6), "b": 1}).to_csv(tmp_path / "x.csv", index=False)
    x = dd.read_csv(str(tmp_path / "x.csv"))
    with dask.annotate(resources={"GPU": 1}):
        annotated = x.map_partitions(double)
    plain = x.map_partitions(double)

    def needs(collection: Any) -> set[tuple[tuple[str, float], ...]]:
        graph = dict(collection["a"].optimize().__dask_graph__())
        submission = to_specs(graph, capture.Notes(), NONE, client=object())
        return {tuple(sorted(dict(spec.resources).items())) for spec in submission.specs}

    assert (("GPU", 1.0),) in needs(annotated)
    assert needs(plain) == {()}
    # The annotated one still computes the same values (the wrapper is transparent).
    assert annotated.compute(scheduler="sync")["a"].tolist() == [i * 2 for i in range(6)]
