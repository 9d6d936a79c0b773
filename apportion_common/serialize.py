"""The one place where task functions, arguments, results and errors are pickled.

Futures inside a task's arguments travel as :class:`InputRef` placeholders;
the worker swaps each for the value of that input before it calls the function.

Results are pickled with protocol 5 into :class:`Frames`: the pickle stream
plus the out-of-band buffers of large bytes-like values (``bytes``,
``bytearray`` or ``memoryview`` results, and anything that pickles through
``pickle.PickleBuffer``, such as numpy arrays). Those buffers are never copied
into the pickle: the worker keeps them as they are, streams them from there,
and the receiving side rebuilds each value from one buffer.
"""

from __future__ import annotations

import functools
import io
import pickle
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import cloudpickle

from .frames import MAGIC, rebuild_bytes
from .frames import OUT_OF_BAND_MIN_BYTES as OUT_OF_BAND_MIN_BYTES
from .frames import Frames as Frames
from .status import ErrorKind


class SerializationError(TypeError):
    """A function, argument or result that cannot be pickled."""


@dataclass(frozen=True, slots=True)
class InputRef:
    """Stands in for the result of task ``key`` inside a task's arguments."""

    key: str


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """An exception raised by a task (or by apportion on its behalf: ``kind``),
    in a form that survives the wire."""

    type_name: str
    message: str
    traceback: str = ""
    exception: bytes = b""  # cloudpickled exception, or b"" when it would not pickle
    kind: ErrorKind = ErrorKind.TASK


def dumps(obj: object) -> bytes:
    data: bytes = cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return data


def loads(data: bytes | bytearray | memoryview | Frames) -> Any:
    """A value from :func:`dumps` or :func:`dumps_result` (plain or framed)."""
    if isinstance(data, Frames):
        return data.value()
    if data[:4] == MAGIC:
        return Frames.parse([data]).value()
    return pickle.loads(data)


class _OutOfBand:
    """Pickles a bytes-like value as one out-of-band buffer."""

    __slots__ = ("data", "kind")

    def __init__(self, data: bytes | bytearray | memoryview, kind: str) -> None:
        self.data, self.kind = data, kind

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return rebuild_bytes, (pickle.PickleBuffer(self.data), self.kind)


def dumps_result(obj: object) -> Frames:
    """Pickle a task's result, keeping large buffers out of band (uncopied),
    wherever they sit in it: bare, in tuples, lists and dicts, inside
    objects, NumPy arrays and pandas columns."""
    if isinstance(obj, bytes | bytearray | memoryview) and _nbytes(obj) >= OUT_OF_BAND_MIN_BYTES:
        if isinstance(obj, memoryview):
            # A memoryview cannot be pickled at all; its bytes can.
            obj = _OutOfBand(obj.cast("B") if obj.c_contiguous else obj.tobytes(), "bytes")
        else:
            obj = _OutOfBand(obj, type(obj).__name__)
    if type(obj) in _ATOMS:
        return Frames(pickle.dumps(obj, protocol=5))
    found, unscanned = _scan_for_bytes(obj)
    if found:
        return _dumps_naming_bytes(obj)
    buffers = _Buffers()
    try:
        pickled = _fast_dumps(obj, buffers.keep)
    except _NeedsCloudpickle:
        buffers = _Buffers()
        pickled = cloudpickle.dumps(obj, protocol=5, buffer_callback=buffers.keep)
    if unscanned and len(pickled) >= max(RESCAN_IN_BAND_BYTES, unscanned * RESCAN_BYTES_PER_ITEM):
        # Large bytes may sit where the scan did not look: pickling again
        # costs less than copying them into the pickle and out again.
        return _dumps_naming_bytes(obj)
    return buffers.frames(pickled)


#: The most items of a result's containers (and attributes of its objects)
#: the scan looks at: it must stay cheap next to pickling a small result.
SCAN_ITEMS = 16
#: A result that pickled to at least this much, and at least this much per
#: item the scan left unseen, is pickled again with bytes values named by id:
#: a long list of small numbers is not worth it, a few large values are.
RESCAN_IN_BAND_BYTES = 1024 * 1024
RESCAN_BYTES_PER_ITEM = 1024
#: Values whose large buffers pickle out of band by themselves (PickleBuffer).
_SELF_FRAMING_MODULES = ("numpy", "pandas")
_ATOMS = (int, float, str, bool, complex, type(None))


def _scan_for_bytes(obj: object) -> tuple[bool, int]:
    """Whether a large bytes-like value sits inside ``obj`` (its tuples, lists,
    dicts and plain objects' attributes), and how many items went unseen."""
    stack, budget, unscanned = [obj], SCAN_ITEMS, 0
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is bytes or kind is bytearray or kind is memoryview:
            if _nbytes(item) >= OUT_OF_BAND_MIN_BYTES:  # type: ignore[arg-type]
                return True, 0
            continue
        if kind in _ATOMS or kind.__module__.partition(".")[0] in _SELF_FRAMING_MODULES:
            continue
        if kind is tuple or kind is list:
            items: Any = item
        elif kind is dict:
            items = item.values()  # type: ignore[attr-defined]
        else:
            items = getattr(item, "__dict__", None)
            if type(items) is not dict:
                unscanned += 1  # its own pickling: not looked into
                continue
            items = items.values()
        if len(items) > budget:
            unscanned += len(items)
            continue
        budget -= len(items)
        stack.extend(items)
    return False, unscanned


class _Buffers:
    """The buffers one pickling keeps out of band, in the order it met them."""

    def __init__(self) -> None:
        self.views: list[memoryview] = []
        self.readonly: list[bool] = []
        self.by_id: list[bool] = []
        #: id() of each value named so far (alive while pickling: ``obj`` holds it)
        self._named: dict[int, tuple[int, str]] = {}

    def keep(self, buffer: pickle.PickleBuffer) -> bool:
        """pickle's buffer_callback: False keeps ``buffer`` out of band."""
        view = buffer.raw()
        if view.nbytes < OUT_OF_BAND_MIN_BYTES:
            return True  # in band
        self._add(view, by_id=False)
        return False

    def name(self, obj: object) -> tuple[int, str] | None:
        """pickle's persistent_id: a large bytes-like value becomes (index, kind)."""
        kind = type(obj)
        if kind is bytes or kind is bytearray or kind is memoryview:
            named = self._named.get(id(obj))
            if named is not None:
                return named  # the same object again: pickle's memo does not see ids
            view = memoryview(obj)  # type: ignore[arg-type]
            view = (view if view.c_contiguous else memoryview(view.tobytes())).cast("B")
            if view.nbytes >= OUT_OF_BAND_MIN_BYTES or kind is memoryview:
                self._add(view, by_id=True)
                pid = len(self.views) - 1, "bytearray" if kind is bytearray else "bytes"
                self._named[id(obj)] = pid
                return pid
        return None

    def _add(self, view: memoryview, *, by_id: bool) -> None:
        self.views.append(view)
        self.readonly.append(view.readonly)
        self.by_id.append(by_id)

    def frames(self, pickled: bytes) -> Frames:
        by_id = tuple(self.by_id) if any(self.by_id) else ()
        return Frames(pickled, tuple(self.views), tuple(self.readonly), by_id)


class _NamingPickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, buffers: _Buffers) -> None:
        super().__init__(file, protocol=5, buffer_callback=buffers.keep)
        self._buffers = buffers

    def persistent_id(self, obj: object) -> tuple[int, str] | None:
        return self._buffers.name(obj)


class _NamingCloudPickler(cloudpickle.Pickler):  # type: ignore[misc]
    def __init__(self, file: io.BytesIO, buffers: _Buffers) -> None:
        super().__init__(file, protocol=5, buffer_callback=buffers.keep)
        self._buffers = buffers

    def persistent_id(self, obj: object) -> tuple[int, str] | None:
        return self._buffers.name(obj)


def _dumps_naming_bytes(obj: object) -> Frames:
    """Pickle ``obj`` with every large bytes-like value inside it named by a
    persistent id and kept out of band (pickle 5 would copy it in band)."""
    buffers, file = _Buffers(), io.BytesIO()
    try:
        _NamingPickler(file, buffers).dump(obj)
        pickled = file.getvalue()
        if pickled.count(b"__main__"):
            raise _NeedsCloudpickle
    except Exception:
        buffers, file = _Buffers(), io.BytesIO()
        _NamingCloudPickler(file, buffers).dump(obj)
        pickled = file.getvalue()
    return buffers.frames(pickled)


class _NeedsCloudpickle(Exception):
    pass


def _fast_dumps(
    obj: object,
    buffer_callback: Callable[[pickle.PickleBuffer], bool] | None = None,
    inner: bytes = b"",
) -> bytes:
    """The C pickler, where its output means the same on every machine.

    It is several times faster than cloudpickle for plain data, but pickles
    functions and classes by name only: anything it cannot pickle, or that
    names ``__main__`` (which is another module in another process), goes to
    cloudpickle instead (as Dask does). ``inner``: bytes inside ``obj`` that
    cloudpickle made already (their ``__main__`` is cloudpickle's own).
    """
    try:
        data = pickle.dumps(obj, protocol=5, buffer_callback=buffer_callback)
    except Exception as exc:
        raise _NeedsCloudpickle from exc
    if data.count(b"__main__") > inner.count(b"__main__"):
        raise _NeedsCloudpickle
    return data


@dataclass(frozen=True, slots=True)
class PickledFunction:
    """A task function pickled once (for all of a ``map``'s tasks), as bytes.

    Each task's payload carries these bytes; the worker unpickles a function
    once and reuses it while it stays in a small cache.
    """

    data: bytes

    def __reduce__(self) -> tuple[Any, ...]:
        return _load_function, (self.data,)


@functools.lru_cache(maxsize=256)
def _load_function(data: bytes) -> Any:
    return pickle.loads(data)


def dump_function(fn: Callable[..., Any]) -> PickledFunction:
    try:
        return PickledFunction(dumps(fn))
    except Exception as exc:
        name = getattr(fn, "__qualname__", repr(fn))
        raise SerializationError(
            f"cannot pickle task function {name!r}: {type(exc).__name__}: {exc}"
        ) from exc


def _nbytes(obj: bytes | bytearray | memoryview) -> int:
    return obj.nbytes if isinstance(obj, memoryview) else len(obj)


def dump_call(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    function: PickledFunction | None = None,
) -> bytes:
    """A task's payload; ``function``: ``fn`` already pickled (a map pickles it once)."""
    try:
        if function is None:
            if cloudpickle.list_registry_pickle_by_value():
                return dumps((fn, args, kwargs))  # modules the user wants sent by value
            # An importable function and plain arguments: the C pickler
            # writes what cloudpickle would, in a fraction of the time.
            try:
                return _fast_dumps((fn, args, kwargs))
            except _NeedsCloudpickle:
                return dumps((fn, args, kwargs))
        try:
            return _fast_dumps((function, args, kwargs), inner=function.data)
        except _NeedsCloudpickle:
            return dumps((function, args, kwargs))
    except Exception as exc:
        name = getattr(fn, "__qualname__", repr(fn))
        raise SerializationError(
            f"cannot pickle task {name!r} with its arguments: {type(exc).__name__}: {exc}"
        ) from exc


def substitute_inputs(obj: Any, values: Mapping[str, Any]) -> Any:
    """Replace every :class:`InputRef` in nested lists, tuples, sets and dicts."""
    if isinstance(obj, InputRef):
        return values[obj.key]
    if type(obj) is list:
        return [substitute_inputs(x, values) for x in obj]
    if type(obj) is tuple:
        return tuple(substitute_inputs(x, values) for x in obj)
    if type(obj) is dict:
        return {k: substitute_inputs(v, values) for k, v in obj.items()}
    if type(obj) in (set, frozenset):
        return type(obj)(substitute_inputs(x, values) for x in obj)
    return obj


def error_info(exc: BaseException) -> ErrorInfo:
    tb = "".join(traceback.format_exception(exc))
    try:
        pickled = dumps(exc)
        loads(pickled)  # an exception that pickles but will not unpickle is no use
    except Exception:
        pickled = b""
    return ErrorInfo(
        type_name=f"{type(exc).__module__}.{type(exc).__qualname__}",
        message=str(exc),
        traceback=tb,
        exception=pickled,
    )
