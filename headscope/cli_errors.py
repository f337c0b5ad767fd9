"""How the command line fails: one ``error:`` line on stderr and exit status 1.

Every failure, whatever raised it, ends the same way. A user error (a
``HeadscopeError``, a bad option or argument, a disk or permission problem,
memory) says what to do; anything else is a bug and says so. Nothing a user
typed is read as markup, and the line stays one line. ``HEADSCOPE_DEBUG=1``
shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
import warnings

import typer
import typer.core
from rich.console import Console
from rich.text import Text

from headscope.errors import HeadscopeError
from headscope.text import plain

errors = Console(stderr=True, markup=False, highlight=False)


def print_error(message: str) -> None:
    errors.print(Text("error: ", style="bold red") + Text(plain(message)), soft_wrap=True)


def _is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, MemoryError):
        return True
    message = str(err).lower()
    return isinstance(err, RuntimeError) and (
        "out of memory" in message or "can't allocate memory" in message
    )


def user_message(err: BaseException) -> str | None:
    """The line a user sees for ``err``; None for a bug (shown as an internal error)."""
    if isinstance(err, HeadscopeError):
        return str(err)
    if isinstance(err, typer.TyperException):  # click's errors: a bad option or argument
        context = getattr(err, "ctx", None)
        hint = f" (see `{context.command_path} --help`)" if context is not None else ""
        return err.format_message() + hint
    if isinstance(err, OSError):
        where = f" {err.filename}" if err.filename else ""
        reason = err.strerror or str(err) or type(err).__name__
        return (
            f"cannot read or write{where}: {reason}; check the path, its permissions "
            "and the free disk space"
        )
    if _is_out_of_memory(err):
        return (
            f"ran out of memory ({plain(err)[:120]}); use a shorter --seq-len, "
            "a smaller --batch-size, or only streaming detectors"
        )
    return None


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {plain(message)}\n"


class OneLineErrors(typer.core.TyperGroup):
    """The command group: runs a command and turns any failure into one line."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        warnings.formatwarning = _one_line_warning
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = result if isinstance(result, int) else 0
        except (KeyboardInterrupt, typer.Abort):
            print_error("interrupted; nothing was left half-written")
            code = 130
        except Exception as err:
            if os.environ.get("HEADSCOPE_DEBUG"):
                raise
            message = user_message(err)
            if message is None:
                message = (
                    f"internal error, a bug in headscope ({type(err).__name__}: {err}); "
                    "please report it with the output of HEADSCOPE_DEBUG=1"
                )
            print_error(message)
            code = 1
        if standalone_mode:
            sys.exit(code)
        return code
