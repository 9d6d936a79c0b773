"""What ``dask.annotate`` asked for, kept where dask would drop it.

Dask loses annotations on the way to a graph: dataframes built with query
planning ignore them (with a warning), and fusing array or dataframe tasks
drops those of the fused parts. apportion keeps them itself, in two ways:

- **When a collection is built.** A hook on dask's dataframe collections
  records, for each one made inside ``dask.annotate(...)``, its expression's
  name (the key prefix of its tasks), and wraps the user function it applies
  (``map_partitions(func1)``) in an :class:`~apportion_common.dask_node.Annotated`
  that carries the annotations wherever optimization moves or renames it.
  Arrays and delayed objects need no hook: their graph layers carry the
  annotations until optimization, and :func:`from_layers` reads them there.
- **When a graph runs.** :class:`Notes` finds, for each task of the final
  (optimized) graph, every annotation that applies: its own key's, those of
  the keys fused into it (a fused task holds its parts as a subgraph), and
  those of the annotated functions it calls. A task made of several
  annotated parts needs the most of each resource any part needs.

The hook is installed once dask's dataframe module is imported (at once if it
was before ``client_sdk``), never importing dask itself.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from types import ModuleType
from typing import Any

from apportion_common.dask_node import Annotated

#: dask's dataframe collections module (query planning): the hook's home.
_COLLECTION_MODULE = "dask.dataframe.dask_expr._collection"
#: Names of expressions built under annotations kept at most (the oldest go).
MAX_NAMES = 100_000
#: Functions of these modules are dask's or the standard library's plumbing,
#: not the user's: they are never wrapped (nor would wrapping them help).
_PLUMBING = ("dask", "pandas", "numpy", "pyarrow", "toolz", "tlz", "builtins", "operator")

_lock = threading.Lock()
#: expression name -> the annotations it was built under
_by_name: dict[str, dict[str, Any]] = {}
_installed = False


def _is_users(fn: object) -> bool:
    module = getattr(fn, "__module__", None) or ""
    return callable(fn) and module.split(".")[0] not in _PLUMBING and not isinstance(fn, type)


def functions_in(obj: Any, depth: int = 0) -> Iterable[Any]:
    """The annotated functions ``obj`` holds: itself, a partial's, a task's,
    and those inside its arguments, lists, tuples and dicts (a fused subgraph)."""
    if depth > 12:
        return
    if isinstance(obj, Annotated):
        yield obj
        return
    if isinstance(obj, functools.partial):
        yield from functions_in(obj.func, depth + 1)
        for arg in (*obj.args, *obj.keywords.values()):
            yield from functions_in(arg, depth + 1)
        return
    func = getattr(obj, "func", None)
    args = getattr(obj, "args", None)
    if func is not None and isinstance(args, tuple):  # a dask Task
        yield from functions_in(func, depth + 1)
        for arg in (*args, *(getattr(obj, "kwargs", None) or {}).values()):
            yield from functions_in(arg, depth + 1)
        return
    if isinstance(obj, list | tuple | set | frozenset):
        for item in obj:
            yield from functions_in(item, depth + 1)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from functions_in(item, depth + 1)


def keys_in(obj: Any, depth: int = 0) -> Iterable[Any]:
    """The keys of the tasks fused into ``obj`` (the subgraph it runs)."""
    if depth > 12:
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield key
            yield from keys_in(value, depth + 1)
        return
    args = getattr(obj, "args", None)
    if getattr(obj, "func", None) is not None and isinstance(args, tuple):
        for arg in (*args, *(getattr(obj, "kwargs", None) or {}).values()):
            yield from keys_in(arg, depth + 1)
    elif isinstance(obj, list | tuple):
        for item in obj:
            yield from keys_in(item, depth + 1)


def name_of(key: Any) -> str:
    """A dask key's name: ``"x-1f3a"`` of ``("x-1f3a", 0, 1)`` and of ``"x-1f3a"``."""
    return str(key[0]) if isinstance(key, tuple) and key else str(key)


#: The operands of dask's dataframe expressions that hold the user's function.
_FUNCTION_OPERANDS = ("func", "function")


def record(name: str, annotations: Mapping[str, Any]) -> None:
    """Expression ``name`` was built under ``annotations``."""
    with _lock:
        _by_name[name] = dict(annotations)
        if len(_by_name) > MAX_NAMES:
            del _by_name[next(iter(_by_name))]


def _annotated(expr: Any) -> Any:
    """``expr``, its user function wrapped with the annotations around it
    (the same expression without any), and its name recorded."""
    import dask

    annotations = dask.get_annotations()
    if not annotations:
        return expr
    wrapped = {
        name: Annotated(fn, dict(annotations))
        for name in _FUNCTION_OPERANDS
        if name in getattr(expr, "_parameters", ())
        and _is_users(fn := expr.operand(name))
        and not isinstance(fn, Annotated)
    }
    if wrapped:
        expr = expr.substitute_parameters(wrapped)
    record(str(expr._name), annotations)
    return expr


def _hook(module: ModuleType) -> None:
    """Wrap FrameBase.__init__ (every new dataframe collection passes there)."""
    frame_base = getattr(module, "FrameBase", None)
    if frame_base is None or getattr(frame_base.__init__, "_apportion_hook", False):
        return
    original = frame_base.__init__

    @functools.wraps(original)
    def __init__(self: Any, expr: Any, *args: Any, **kwargs: Any) -> None:
        original(self, _annotated(expr), *args, **kwargs)

    __init__._apportion_hook = True  # type: ignore[attr-defined]
    frame_base.__init__ = __init__
    # Dask warns that annotations are ignored here; with apportion they are not.
    setattr(module, "_WARN_ANNOTATIONS", False)  # noqa: B010 (a module attribute of dask)


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Runs the hook right after dask's dataframe collections are imported."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _COLLECTION_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Wrapped(spec.loader)
                return spec
        return None


class _Wrapped(importlib.abc.Loader):
    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        module: ModuleType | None = self._loader.create_module(spec)
        return module

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _hook(module)


def install() -> None:
    """Capture annotations from now on: at once if dask's dataframes are
    loaded, else as soon as they are. Cheap, idempotent, imports nothing."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    module = sys.modules.get(_COLLECTION_MODULE)
    if module is not None:
        _hook(module)
    else:
        sys.meta_path.insert(0, _AfterImport())


def from_layers(graph: Any) -> dict[str, dict[str, Any]]:
    """The annotations a HighLevelGraph's layers carry (arrays, delayed), by
    layer name. Fusion keeps those names inside the fused task, as the keys
    of its subgraph (blockwise adds a ``_.N`` suffix)."""
    by_name: dict[str, dict[str, Any]] = {}
    for name, layer in getattr(graph, "layers", {}).items():
        notes = getattr(layer, "annotations", None)
        if notes:
            by_name[str(name)] = dict(notes)
    return by_name


class Notes:
    """Finds the annotations of each task of a graph about to run."""

    def __init__(self, layer_names: dict[str, dict[str, Any]] | None = None) -> None:
        self._layer_names = layer_names or {}
        with _lock:
            self._names = dict(_by_name)

    def _by(self, name: str) -> dict[str, Any] | None:
        for candidate in (name, name.rsplit("_.", 1)[0]):
            for table in (self._layer_names, self._names):
                notes = table.get(candidate)
                if notes is not None:
                    return notes
        return None

    def of(self, key: Any, node: Any) -> list[dict[str, Any]]:
        """Every annotation that applies to task ``key`` (whose graph node is ``node``)."""
        found: list[dict[str, Any]] = []
        for k in (key, *keys_in(node)):
            notes = self._by(name_of(k))
            if notes is not None:
                found.append(notes)
        found.extend(fn.annotations for fn in functions_in(node))
        return found


def evaluated(notes: Mapping[str, Any], key: Any) -> dict[str, Any]:
    """Annotations with callables (Dask allows ``resources=lambda key: ...``)
    called with the task's key."""
    return {name: value(key) if callable(value) else value for name, value in notes.items()}


def combined(found: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One set of annotations for a task made of parts: the most of each
    resource and the highest priority and retries any part asks for; the
    first restriction to workers; other workers allowed if any part allows."""
    if len(found) == 1:
        return dict(found[0])
    out: dict[str, Any] = {}
    resources: dict[str, Any] = {}
    for notes in found:
        for name, amount in (notes.get("resources") or {}).items():
            resources[name] = _larger(resources.get(name), amount)
        for name in ("priority", "retries"):
            if notes.get(name) is not None:
                out[name] = max(out.get(name, notes[name]), notes[name])
        if notes.get("workers") and "workers" not in out:
            out["workers"] = notes["workers"]
        if notes.get("allow_other_workers"):
            out["allow_other_workers"] = True
    if resources:
        out["resources"] = resources
    return out


def _larger(a: Any, b: Any) -> Any:
    from apportion_common.resources import check_amount

    if a is None:
        return b
    return a if check_amount("resource", a) >= check_amount("resource", b) else b
