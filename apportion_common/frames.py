"""A pickled value with its large buffers kept apart, and its one wire form.

:class:`Frames` is what a worker stores, streams to a peer over gRPC in
chunks, or writes into a shared-memory segment for a peer on the same host.
Its buffers are never copied into the pickle: the sender sends them from
where they lie, and the receiver rebuilds each value from one buffer, so a
bytes result comes back as one ``bytes`` object and a NumPy array as an
array over the received (or mapped) memory.

Two kinds of buffer: those pickle 5 hands out itself (``PickleBuffer``: NumPy
arrays, pandas columns, bytes results made out of band), fed back through
``pickle.loads(buffers=...)``; and ``bytes``/``bytearray``/``memoryview``
values found anywhere inside a result, which pickle would otherwise copy in
band and which travel as persistent ids instead (``by_id``).
"""

from __future__ import annotations

import io
import mmap
import pickle
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from . import fresh

#: Buffers smaller than this stay inside the pickle: copying them costs less
#: than keeping them apart.
OUT_OF_BAND_MIN_BYTES = 64 * 1024
#: A framed value starts with this (a plain pickle starts with b"\x80").
MAGIC = b"APF1"
_HEAD = struct.Struct("<4sIQ")  # magic, number of buffers, pickle length
_BUFFER = struct.Struct("<QB")  # buffer length, flags
_READONLY = 1
_BY_ID = 2  # a bytes-like value named by a persistent id, not a PickleBuffer


@dataclass(frozen=True, slots=True)
class Frames:
    """A pickled value whose large buffers are kept apart, uncopied.

    On the wire it is one byte string: a header (:data:`MAGIC`, the number of
    buffers, the pickle's length, each buffer's length and flags), the pickle
    stream, then the buffers. With no buffers it is just the pickle stream,
    which :func:`apportion_common.serialize.loads` reads like any other.
    """

    pickled: bytes
    buffers: tuple[memoryview, ...] = ()
    readonly: tuple[bool, ...] = ()
    #: per buffer: True where a persistent id in the pickle names it
    by_id: tuple[bool, ...] = ()

    @property
    def nbytes(self) -> int:
        return len(self.pickled) + sum(b.nbytes for b in self.buffers) + self.head_bytes()

    def __len__(self) -> int:
        return self.nbytes

    def head_bytes(self) -> int:
        return _HEAD.size + _BUFFER.size * len(self.buffers) if self.buffers else 0

    def _flags(self, index: int) -> int:
        by_id = self.by_id[index] if self.by_id else False
        return (_READONLY if self.readonly[index] else 0) | (_BY_ID if by_id else 0)

    def segments(self) -> list[bytes | memoryview]:
        """The wire form as pieces to send in order (nothing large is copied)."""
        if not self.buffers:
            return [self.pickled]
        head = _HEAD.pack(MAGIC, len(self.buffers), len(self.pickled)) + b"".join(
            _BUFFER.pack(b.nbytes, self._flags(i)) for i, b in enumerate(self.buffers)
        )
        return [head, self.pickled, *self.buffers]

    def value(self) -> Any:
        # A buffer that is a whole bytes or bytearray object goes in as that
        # object, so a bytes result comes back without a copy. (A writable
        # buffer is shared, not copied, with every value made from it, as
        # Dask shares a worker's data between the tasks on that worker.)
        whole = [_whole(b) for b in self.buffers]
        if not self.by_id:
            # No persistent ids (most values): the plain C unpickler.
            return pickle.loads(self.pickled, buffers=whole)
        out_of_band = [b for b, named in zip(whole, self.by_id, strict=True) if not named]
        named = {i: b for i, (b, n) in enumerate(zip(whole, self.by_id, strict=True)) if n}
        return _Unpickler(self.pickled, out_of_band, named).load()

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
        specs = _read_head(reader)
        pickled = bytes(reader.take(specs.pickle_len, readonly=True))
        buffers = tuple(memoryview(reader.take(n, readonly=ro)) for n, ro, _ in specs.buffers)
        if reader.remaining:
            raise ValueError(f"a framed value with {reader.remaining} bytes past its end")
        return cls(pickled, buffers, *specs.flags())


@dataclass(frozen=True, slots=True)
class Head:
    """The header of a framed value: what follows it, and how long it is."""

    pickle_len: int
    buffers: list[tuple[int, bool, bool]]  # length, read-only, by id
    nbytes: int = 0  # of the header itself

    def flags(self) -> tuple[tuple[bool, ...], tuple[bool, ...]]:
        return tuple(ro for _, ro, _ in self.buffers), tuple(n for _, _, n in self.buffers)

    @staticmethod
    def size(start: bytes) -> int:
        """How long the header is that ``start`` (its first 16 bytes) begins; 0: no header."""
        if start[:4] != MAGIC or len(start) < _HEAD.size:
            return 0
        count: int = _HEAD.unpack(start[: _HEAD.size])[1]
        return _HEAD.size + _BUFFER.size * count

    @staticmethod
    def read(head: bytes) -> Head:
        """The header in ``head`` (exactly :meth:`size` bytes)."""
        return _read_head(_ChunkReader([head]))


#: The bytes that say how long a header is (see :meth:`Head.size`).
HEAD_START_BYTES = _HEAD.size


def _read_head(reader: _ChunkReader) -> Head:
    try:
        _, count, pickle_len = _HEAD.unpack(reader.take(_HEAD.size, readonly=True))
        specs = [_BUFFER.unpack(reader.take(_BUFFER.size, readonly=True)) for _ in range(count)]
    except struct.error:
        raise ValueError("a framed value whose header is cut short") from None
    flags = [(n, bool(f & _READONLY), bool(f & _BY_ID)) for n, f in specs]
    return Head(pickle_len, flags, _HEAD.size + _BUFFER.size * count)


class Assembler:
    """Frames from the wire form as its chunks arrive, each byte copied once,
    straight into the buffer it belongs to.

    A chunk is copied while it is fresh in the cache and then dropped, so the
    value's memory is written once and never read back to be put together;
    keeping every chunk and joining them at the end costs three passes over
    memory instead of one.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.received = 0
        self._prefix = bytearray()  # the header, until it is whole
        self._head: Head | None = None
        #: per piece to fill (the pickle, then each buffer): its object, a
        #: writable view of it, and whether it is read-only
        self._pieces: list[tuple[bytes | bytearray | mmap.mmap, memoryview, bool]] = []
        self._index = 0
        self._offset = 0

    def feed(self, data: memoryview) -> None:
        if self.received + data.nbytes > self.total:
            raise ValueError(f"more than the {self.total} bytes announced")
        self.received += data.nbytes
        if not self._pieces:
            data = self._read_head(data)
        while data.nbytes:
            _, view, _ = self._pieces[self._index]
            n = min(data.nbytes, view.nbytes - self._offset)
            view[self._offset : self._offset + n] = data[:n]
            self._offset += n
            data = data[n:]
            if self._offset == view.nbytes and self._index + 1 < len(self._pieces):
                self._index, self._offset = self._index + 1, 0

    def _wanted(self) -> int:
        """Bytes of the wire form needed to know its layout (0: known)."""
        prefix = self._prefix
        if len(prefix) < 4:
            return min(4, self.total)
        if prefix[:4] != MAGIC:
            return 0
        if len(prefix) < HEAD_START_BYTES:
            return HEAD_START_BYTES
        size = Head.size(bytes(prefix[:HEAD_START_BYTES]))
        return size if len(prefix) < size else 0

    def _read_head(self, data: memoryview) -> memoryview:
        """Take header bytes off ``data``; once the layout is known, make the
        pieces to fill and return what is left of ``data``."""
        prefix = self._prefix
        while want := self._wanted():
            take = min(data.nbytes, want - len(prefix))
            prefix += data[:take]
            data = data[take:]
            if len(prefix) < want:
                return data  # empty: the header goes on in the next chunk
        if prefix[:4] != MAGIC:
            # A plain pickle: one piece, the header bytes read so far its start.
            self._pieces = [_fillable(self.total, readonly=True)]
            self._pieces[0][1][: len(prefix)] = prefix
            self._offset = len(prefix)
            return data
        head = Head.read(bytes(prefix))
        if head.nbytes + head.pickle_len + sum(n for n, _, _ in head.buffers) != self.total:
            raise ValueError(f"a framed value of {self.total} bytes whose header says otherwise")
        self._head = head
        pieces = [_fillable(head.pickle_len, readonly=True)]
        pieces += [_fillable(n, readonly=ro, by_id=by_id) for n, ro, by_id in head.buffers]
        self._pieces = pieces
        return data

    def frames(self) -> Frames:
        if self.received != self.total or (not self._pieces and self.total):
            raise ValueError(f"a framed value cut short: {self.received} of {self.total} bytes")
        made = [bytes(obj) if ro and type(obj) is bytearray else obj for obj, _, ro in self._pieces]
        self._pieces = []  # the views go: nothing writes into the values any more
        if self._head is None:
            return Frames(bytes(made[0]) if made else b"")
        pickled, *buffers = made
        return Frames(bytes(pickled), tuple(memoryview(b) for b in buffers), *self._head.flags())


def _fillable(
    n: int, *, readonly: bool, by_id: bool = False
) -> tuple[bytes | bytearray | mmap.mmap, memoryview, bool]:
    """A fresh buffer of ``n`` bytes to fill: a ``bytes`` for a read-only one
    (a bytes value comes back as bytes), a ``bytearray`` for a bytearray value
    named by id (it comes back as that very object), else writable memory on
    huge pages (arrays stay writable; see :mod:`apportion_common.fresh`)."""
    if readonly:
        return (*fresh.new_bytes(n), readonly)
    if by_id:
        buffer = bytearray(n)
        return buffer, memoryview(buffer), readonly
    return (*fresh.new_writable(n), readonly)


class _Unpickler(pickle.Unpickler):
    """Reads the persistent ids :mod:`apportion_common.serialize` writes for
    bytes-like values: ``(index, kind)`` of a buffer."""

    def __init__(self, pickled: bytes, out_of_band: Sequence[Any], named: dict[int, Any]) -> None:
        super().__init__(io.BytesIO(pickled), buffers=out_of_band)
        self._named = named

    def persistent_load(self, pid: Any) -> Any:
        try:
            index, kind = pid
            return rebuild_bytes(self._named[index], kind)
        except (TypeError, ValueError, KeyError):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}") from None


def rebuild_bytes(buffer: Any, kind: str) -> bytes | bytearray:
    """The ``bytes`` or ``bytearray`` a buffer was made from: the very
    object when the buffer is one, else a copy (Python needs one piece)."""
    if kind == "bytearray":
        return buffer if type(buffer) is bytearray else bytearray(buffer)
    if type(buffer) is bytes:
        return buffer
    view = memoryview(buffer).cast("B")
    if view.nbytes < fresh.HUGE_MIN_BYTES:
        return bytes(view)
    obj, fill = fresh.new_bytes(view.nbytes)  # a large copy: into fresh huge pages
    fill[:] = view
    fill.release()
    return obj if type(obj) is bytes else bytes(obj)


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


def _whole(view: memoryview) -> bytes | bytearray | memoryview:
    """The object ``view`` shows all of, when it is a bytes or bytearray; else ``view``."""
    base = view.obj
    if isinstance(base, bytes | bytearray) and view.nbytes == len(base) and view.c_contiguous:
        return base
    return view
