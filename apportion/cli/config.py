"""``apportion config``: the settings a scheduler and a worker started here
would use, each with where it came from."""

from __future__ import annotations

import typer
from pydantic import ValidationError

from apportion_common.config_file import (
    CONFIG_ENV,
    ConfigError,
    describe,
    find_config_file,
    search_paths,
)
from apportion_common.settings import SchedulerSettings, WorkerSettings

from .options import fail, settings_error


def config() -> None:
    """Print the scheduler's and the worker's settings, one per line, each with
    its source: default, file PATH or env NAME."""
    try:
        path = find_config_file()
        lines = [*describe(SchedulerSettings, "scheduler"), *describe(WorkerSettings, "worker")]
    except ConfigError as exc:
        fail(str(exc))
    except ValidationError as exc:  # the environment's (the file's are ConfigError)
        fail(settings_error(exc))
    if path is None:
        looked = ", ".join(str(p) for p in search_paths())
        typer.echo(f"# no configuration file ({CONFIG_ENV} unset; none at {looked})")
    else:
        typer.echo(f"# configuration file: {path}")
    for line in lines:
        typer.echo(f"{line.key} = {line.value}  ({line.source})")
