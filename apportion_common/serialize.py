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
import pickle
import struct
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import cloudpickle

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


#: Buffers smaller than this stay inside the pickle: copying them costs less
#: than keeping them apart.
OUT_OF_BAND_MIN_BYTES = 64 * 1024
#: A framed value starts with this (a plain pickle starts with b"\x80").
MAGIC = b"APF1"
_HEAD = struct.Struct("<4sIQ")  # magic, number of buffers, pickle length
_BUFFER = struct.Struct("<QB")  # buffer length, read-only flag


@dataclass(frozen=True, slots=True)
class Frames:
    """A pickled value whose large buffers are kept apart, uncopied.

    On the wire it is one byte string: a header (:data:`MAGIC`, the number of
    buffers, the pickle's length, each buffer's length and whether it was
    read-only), the pickle stream, then the buffers. With no buffers it is
    just the pickle stream, which :func:`loads` reads like any other.
    """

    pickled: bytes
    buffers: tuple[memoryview, ...] = ()
    readonly: tuple[bool, ...] = ()

    @property
    def nbytes(self) -> int:
        return len(self.pickled) + sum(b.nbytes for b in self.buffers) + self._head_bytes()

    def __len__(self) -> int:
        return self.nbytes

    def _head_bytes(self) -> int:
        return _HEAD.size + _BUFFER.size * len(self.buffers) if self.buffers else 0

    def segments(self) -> list[bytes | memoryview]:
        """The wire form as pieces to send in order (nothing large is copied)."""
        if not self.buffers:
            return [self.pickled]
        head = _HEAD.pack(MAGIC, len(self.buffers), len(self.pickled)) + b"".join(
            _BUFFER.pack(b.nbytes, ro) for b, ro in zip(self.buffers, self.readonly, strict=True)
        )
        return [head, self.pickled, *self.buffers]

    def value(self) -> Any:
        # A buffer that is a whole bytes or bytearray object goes in as that
        # object, so a bytes result comes back without a copy. (A writable
        # buffer is shared, not copied, with every value made from it, as
        # Dask shares a worker's data between the tasks on that worker.)
        return pickle.loads(self.pickled, buffers=[_whole(b) for b in self.buffers])

    @classmethod
    def parse(cls, chunks: Iterable[bytes | bytearray | memoryview]) -> Frames:
        """Frames from the wire form, cut anywhere into ``chunks``.

        Each buffer is copied once out of the chunks, into a ``bytes`` for a
        read-only buffer (a ``bytes`` result comes back as that very object)
        or a ``bytearray`` for a writable one (a numpy array stays writable).
        """
        reader = _ChunkReader(chunks)
        if reader.peek(4) != MAGIC:
            return cls(bytes(reader.take(reader.remaining, readonly=True)))
        try:
            _, count, pickle_len = _HEAD.unpack(reader.take(_HEAD.size, readonly=True))
            specs = [_BUFFER.unpack(reader.take(_BUFFER.size, readonly=True)) for _ in range(count)]
        except struct.error:
            raise ValueError("a framed value whose header is cut short") from None
        pickled = bytes(reader.take(pickle_len, readonly=True))
        buffers = tuple(memoryview(reader.take(n, readonly=bool(ro))) for n, ro in specs)
        if reader.remaining:
            raise ValueError(f"a framed value with {reader.remaining} bytes past its end")
        return cls(pickled, buffers, tuple(bool(ro) for _, ro in specs))


class _ChunkReader:
    """Reads consecutive byte ranges out of a list of chunks."""

    def __init__(self, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
        self._chunks = [memoryview(c).cast("B") for c in chunks]
        self._index = 0
        self._offset = 0
        self.remaining = sum(c.nbytes for c in self._chunks)

    def peek(self, n: int) -> bytes:
        out = b""
        index, offset = self._index, self._offset
        while len(out) < n and index < len(self._chunks):
            out += bytes(self._chunks[index][offset : offset + n - len(out)])
            index, offset = index + 1, 0
        return out

    def take(self, n: int, *, readonly: bool) -> bytes | bytearray:
        if n > self.remaining:
            raise ValueError(f"a framed value cut short: {n} bytes wanted, {self.remaining} left")
        pieces: list[memoryview] = []
        want = n
        while want:
            chunk = self._chunks[self._index]
            piece = chunk[self._offset : self._offset + want]
            pieces.append(piece)
            want -= piece.nbytes
            self._offset += piece.nbytes
            if self._offset == chunk.nbytes:
                self._index, self._offset = self._index + 1, 0
        self.remaining -= n
        if not readonly:
            out = bytearray(n)
            at = 0
            for piece in pieces:
                out[at : at + piece.nbytes] = piece
                at += piece.nbytes
            return out
        if len(pieces) == 1:
            whole = _whole(pieces[0])
            if type(whole) is bytes:
                return whole  # a whole chunk: no copy
        return b"".join(pieces)


class _OutOfBand:
    """Pickles a bytes-like value as one out-of-band buffer."""

    __slots__ = ("data", "kind")

    def __init__(self, data: bytes | bytearray | memoryview, kind: str) -> None:
        self.data, self.kind = data, kind

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return _rebuild, (pickle.PickleBuffer(self.data), self.kind)


def _rebuild(buffer: Any, kind: str) -> bytes | bytearray:
    if kind == "bytearray":
        return buffer if type(buffer) is bytearray else bytearray(buffer)
    return buffer if type(buffer) is bytes else bytes(buffer)


def dumps_result(obj: object) -> Frames:
    """Pickle a task's result, keeping large buffers out of band (uncopied)."""
    if isinstance(obj, bytes | bytearray | memoryview) and _nbytes(obj) >= OUT_OF_BAND_MIN_BYTES:
        if isinstance(obj, memoryview):
            # A memoryview cannot be pickled at all; its bytes can.
            obj = _OutOfBand(obj.cast("B") if obj.c_contiguous else obj.tobytes(), "bytes")
        else:
            obj = _OutOfBand(obj, type(obj).__name__)
    buffers: list[memoryview] = []
    readonly: list[bool] = []

    def keep(buffer: pickle.PickleBuffer) -> bool:
        view = buffer.raw()
        if view.nbytes < OUT_OF_BAND_MIN_BYTES:
            return True  # in band
        buffers.append(view)
        readonly.append(view.readonly)
        return False

    try:
        pickled = _fast_dumps(obj, keep)
    except _NeedsCloudpickle:
        buffers.clear()
        readonly.clear()
        pickled = cloudpickle.dumps(obj, protocol=5, buffer_callback=keep)
    return Frames(pickled, tuple(buffers), tuple(readonly))


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


def _whole(view: memoryview) -> bytes | bytearray | memoryview:
    """The object ``view`` shows all of, when it is a bytes or bytearray; else ``view``."""
    base = view.obj
    if isinstance(base, bytes | bytearray) and view.nbytes == len(base) and view.c_contiguous:
        return base
    return view


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
