"""The ``apportion`` command line: one module per command (or group of them),
registered on one typer application in :mod:`apportion.cli.app`."""

from .app import app, main

__all__ = ["app", "main"]
