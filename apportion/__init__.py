"""apportion: a resource-aware distributed task scheduler.

This package holds what the scheduler, the workers, the client SDK and the
command line share: resource parsing, serialization, settings and the gRPC
server plumbing. The public Python API lives in :mod:`client_sdk`.
"""

__version__ = "0.1.0"
