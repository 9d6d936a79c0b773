"""apportion: a resource-aware distributed task scheduler.

This package is the command line (``apportion``, :mod:`apportion.cli`): it
composes the services. What they share lives in :mod:`apportion_common`; the
public Python API in :mod:`client_sdk`.
"""

__version__ = "0.1.0"
