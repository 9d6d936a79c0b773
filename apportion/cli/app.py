"""The typer application behind the ``apportion`` console script.

Each command lives in a module of its own and only parses and hands off to
the service it starts or calls; they are registered here. Bad input exits
with status 2 and one line on stderr naming what was wrong, before anything
starts.
"""

from __future__ import annotations

import typer

from .local import local
from .operator import explain, set_resources, status
from .scheduler import scheduler
from .worker import worker

app = typer.Typer(
    name="apportion",
    help="A resource-aware distributed task scheduler.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# In the order ``apportion --help`` lists them.
app.command()(scheduler)
app.command()(worker)
app.command()(local)
app.command()(status)
app.command("set-resources")(set_resources)
app.command()(explain)


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
        ctx = getattr(exc, "ctx", None)
        command = "apportion" if ctx is None or ctx.parent is None else f"apportion {ctx.info_name}"
        hint = f" (see '{command} --help')"
        typer.echo(f"apportion: error: {format_message()}{hint}", err=True)
        raise SystemExit(2) from None
    if isinstance(result, int):
        raise SystemExit(result)
