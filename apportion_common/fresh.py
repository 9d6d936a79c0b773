"""Fresh memory for large values as they arrive, on huge pages where the kernel has them.

Filling memory that nothing has touched yet costs a page fault per 4 KiB
page, and on the virtual machines the benchmarks run on those faults, not
the copy, were most of a large value's arrival. Memory advised with
``MADV_HUGEPAGE`` faults in 2 MiB at a time (where transparent huge pages are
on at all, "always" or "madvise"), which fills several times faster. Values
below :data:`HUGE_MIN_BYTES` take ordinary memory: they hold no whole huge page.

Two kinds: a ``bytes`` filled in place before anyone sees it (as CPython's
own readers such as ``os.read`` fill theirs), for read-only buffers, so a
``bytes`` value comes back as ``bytes`` without a second copy; and a private
anonymous mapping for writable ones (NumPy arrays, pandas columns), which
stay writable and are rebuilt over it without a copy.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import sys

#: Below this a buffer holds no whole huge page: ordinary memory.
HUGE_MIN_BYTES = 4 * 1024 * 1024
HUGE_PAGE_BYTES = 2 * 1024 * 1024

#: CPython: a new ``bytes`` may be filled in place before anyone sees it.
FILL_BYTES_IN_PLACE = sys.implementation.name == "cpython"
if FILL_BYTES_IN_PLACE:
    _new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
    _new_bytes.restype = ctypes.py_object
    _new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
    _BYTES_DATA_OFFSET = bytes.__basicsize__ - 1  # ob_sval; basicsize counts its NUL

_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)
_libc_madvise = None
if _MADV_HUGEPAGE is not None and sys.platform == "linux":
    try:
        _libc_madvise = ctypes.CDLL(None, use_errno=True).madvise
        _libc_madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        _libc_madvise.restype = ctypes.c_int
    except (OSError, AttributeError):
        _libc_madvise = None


def new_bytes(n: int) -> tuple[bytes | bytearray, memoryview]:
    """A ``bytes`` of ``n`` bytes and a writable view to fill it through
    (CPython); elsewhere a ``bytearray`` the caller turns into ``bytes``."""
    if not (FILL_BYTES_IN_PLACE and n):
        buffer = bytearray(n)
        return buffer, memoryview(buffer)
    obj: bytes = _new_bytes(None, n)
    address = id(obj) + _BYTES_DATA_OFFSET
    if n >= HUGE_MIN_BYTES:
        _advise_huge(address, n)
    raw = (ctypes.c_char * n).from_address(address)
    return obj, memoryview(raw).cast("B")


def new_writable(n: int) -> tuple[bytearray | mmap.mmap, memoryview]:
    """A writable buffer of ``n`` bytes (zeroed) and a view of it."""
    if n < HUGE_MIN_BYTES or _MADV_HUGEPAGE is None:
        buffer = bytearray(n)
        return buffer, memoryview(buffer)
    # Private, not mmap's default shared: shared anonymous memory lives in
    # shmem, which takes huge pages only where tmpfs is told to.
    mapped = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # no huge pages here: ordinary ones, still correct
        mapped.madvise(_MADV_HUGEPAGE)
    return mapped, memoryview(mapped)


def _advise_huge(address: int, n: int) -> None:
    """Advise huge pages for the whole 2 MiB pages inside [address, address + n)."""
    if _libc_madvise is None:
        return
    start = (address + HUGE_PAGE_BYTES - 1) & ~(HUGE_PAGE_BYTES - 1)
    end = (address + n) & ~(HUGE_PAGE_BYTES - 1)
    if end > start:
        _libc_madvise(start, end - start, _MADV_HUGEPAGE)  # a refusal only costs speed
