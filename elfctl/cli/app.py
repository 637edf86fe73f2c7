"""The Typer app and what every command shares: error handling and the console.

Commands live one per module in this package and register themselves on `app`.
They parse and validate, call the library, and print; they hold no maths.
Heavy imports (torch, transformers) happen inside the commands so `--help` is fast.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import typer
import typer.core
from rich.console import Console
from rich.markup import escape

from elfctl.cli.options import flag
from elfctl.errors import UserError


class _FlagHelp:
    """--help rendered as the flag it is: typer 0.29 shows every option's type (`<bool>`),
    and a metavar, empty as `options.flag` gives our own flags, is what replaces it."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class _Command(_FlagHelp, typer.core.TyperCommand):
    pass


class _Group(_FlagHelp, typer.core.TyperGroup):
    pass


class _App(typer.Typer):
    """Every command is a `_Command`."""

    def command(self, *args: Any, cls: Any = None, **kwargs: Any):
        return super().command(*args, cls=cls or _Command, **kwargs)


app = _App(
    cls=_Group,
    name="elfctl",
    help="Train, sample, evaluate and convert ELF (Embedded Language Flows) models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

# Human-facing output; stdout is kept for --json. soft_wrap: log lines stay whole in files.
console = Console(stderr=True, soft_wrap=True)
out = Console()  # machine-readable output (--json) and result tables

_state = {"debug": False}


@app.callback()
def _root(
    debug: bool = flag("--debug", help="Show full tracebacks on errors."),
) -> None:
    _state["debug"] = debug


def fail(message: str, code: int = 2) -> None:
    # escape: a message may hold brackets ("pip install 'elfctl[wandb]'", an infill
    # template's [gap:5], paths) that rich would otherwise swallow as markup.
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn UserError into one sentence and exit 2; other errors into exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except UserError as e:
            if _state["debug"]:
                raise
            fail(str(e), 2)
        except KeyboardInterrupt:
            console.print("interrupted")
            raise typer.Exit(130) from None
        except Exception as e:  # noqa: BLE001 - the CLI's last line of defence
            if _state["debug"]:
                raise
            fail(f"{type(e).__name__}: {e} (run with --debug for the traceback)", 1)

    return wrapper


def log(message: str) -> None:
    """A library log callback: one plain line on stderr."""
    console.print(message, highlight=False)


def quiet_unless_main(procs) -> None:
    """Under several processes only the main one prints (`distributed.Processes`)."""
    if not procs.is_main:
        console.quiet = out.quiet = True


def is_terminal() -> bool:
    return sys.stderr.isatty()
