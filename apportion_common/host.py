"""Which host a process runs on, as far as sharing memory goes.

Two workers may hand results over in shared memory only when they see the
same ``/dev/shm``: the same machine (boot), and the same mount and network
namespaces (containers, and the network namespaces that stand for other
hosts in tests, each get their own). An IP address says none of this: every
container may be 127.0.0.1, and one machine may have many addresses.

What a process tells its peers to dial is another matter:
:func:`advertised_host`, the local address that routes to the scheduler.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
from pathlib import Path


def advertised_host(scheduler_address: str) -> str:
    """The local address that routes to the scheduler (what peers should dial)."""
    host = scheduler_address.rsplit(":", 1)[0].strip("[]")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, 9))  # UDP connect sends nothing
            return str(probe.getsockname()[0])
    except OSError:
        return "127.0.0.1"


@functools.cache
def host_id() -> str:
    """A short id equal for processes that may share memory segments."""
    parts = [_read("/proc/sys/kernel/random/boot_id") or socket.gethostname()]
    for namespace in ("mnt", "net", "ipc"):
        try:
            parts.append(str(os.stat(f"/proc/self/ns/{namespace}").st_ino))
        except OSError:
            parts.append("")
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:16]


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""
