"""glibc's allocator, set once for a worker process: results stream fast and
memory measured falls when they are released.

A worker allocates a 1 MiB ``bytes`` for every chunk of a result it streams
(gRPC hands each message over as one) and frees it straight after. glibc's
defaults map blocks past 128 KiB and unmap them when freed, then raise that
threshold as far as 32 MiB, so freed results of up to 32 MiB stay in the
heap and memory measured stays high (paused and restarted workers holding
nothing). Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_=65536`` for the second,
which pins the mmap threshold at 128 KiB: every chunk is then mapped,
faulted in and unmapped on both sides, and results move between workers at
half the rate (figures in the README's Performance section).

Here blocks of 4 MiB or more are mapped (a large result's memory goes back
as soon as it is freed) and up to 16 MiB freed at the top of the heap is
kept for reuse (the next chunk comes without page faults).
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("worker_service")

#: Blocks this large or larger get a mapping of their own, unmapped when freed.
MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024
#: Free memory at the top of the heap kept for reuse rather than given back.
TRIM_THRESHOLD_BYTES = 16 * 1024 * 1024

# mallopt's parameter numbers, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Variables that tune glibc's allocator: a user who sets one has chosen.
_USER_TUNING = (
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
    "GLIBC_TUNABLES",
)


def tune_allocator() -> bool:
    """Set the thresholds above in this process (glibc only; elsewhere, or
    where the environment tunes the allocator already, nothing); whether set."""
    if any(name in os.environ for name in _USER_TUNING):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
    if not done:
        log.debug("mallopt refused the allocator thresholds; glibc's defaults stay")
    return done
