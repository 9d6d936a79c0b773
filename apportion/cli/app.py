"""The typer application behind the ``apportion`` console script.

Each command lives in a module of its own and only parses and hands off to
the service it starts or calls; they are registered here. A command imports
its service when it runs, not when the CLI loads: every scheduler and worker
process starts through here, and a worker has no use for the scheduler's or
the client's modules (each costs a fraction of a second at every start). Bad input exits
with status 2 and one line on stderr naming what was wrong, before anything
starts.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from .config import config
from .local import local
from .operator import explain, logs, restart, retire, set_resources, shutdown, status
from .scheduler import scheduler
from .worker import worker


class _Command(TyperCommand):
    """Usage lines with arguments in plain words (``ADDRESS``, not ``{ADDRESS}``)."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:  # typer's own click Context
        return [
            piece[1:-1] if piece.startswith("{") and piece.endswith("}") else piece
            for piece in super().collect_usage_pieces(ctx)
        ]


app = typer.Typer(
    name="apportion",
    help="A resource-aware distributed task scheduler.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help: each flag with its metavar and default, no <type> tags.
    rich_markup_mode=None,
)


def _print_version(asked: bool) -> None:
    if asked:
        try:
            typer.echo(f"apportion {version('apportion')}")
        except PackageNotFoundError:  # run from a tree that was never installed
            typer.echo("apportion (not installed)")
        raise typer.Exit()


@app.callback()
def _top(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """A resource-aware distributed task scheduler."""


# In the order ``apportion --help`` lists them.
for command, name in (
    (scheduler, None),
    (worker, None),
    (local, None),
    (status, None),
    (set_resources, "set-resources"),
    (retire, None),
    (restart, None),
    (shutdown, None),
    (explain, None),
    (logs, None),
    (config, None),
):
    app.command(name, cls=_Command)(command)


def main() -> None:
    """Entry point. Usage errors (a bad flag, a missing argument) become one
    line on stderr and status 2, like every other bad input."""
    try:
        result = app(standalone_mode=False)
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        raise SystemExit(130) from None
    except Exception as exc:
        # Click's usage errors, which typer vendors privately: matched by
        # their interface rather than an import of typer's internals.
        format_message = getattr(exc, "format_message", None)
        if format_message is None or not hasattr(exc, "exit_code"):
            raise
        if type(exc).__name__ == "NoArgsIsHelpError":
            # Bare `apportion` (or a bare group): its help is the whole answer.
            typer.echo(format_message())
            raise SystemExit(exc.exit_code) from None
        ctx = getattr(exc, "ctx", None)
        command = "apportion" if ctx is None or ctx.parent is None else f"apportion {ctx.info_name}"
        hint = f" (see '{command} --help')"
        typer.echo(f"apportion: error: {format_message()}{hint}", err=True)
        raise SystemExit(2) from None
    if isinstance(result, int):
        raise SystemExit(result)
