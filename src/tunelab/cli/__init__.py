"""The `tunelab` command: one sub-command per verb, each a thin call into a stage.

One module per group of commands (run, experiments, info, ...), all registered on the app in common.py.

Exit status, for scripts and CI pipelines:

  0    success
  1    some of the work failed (a `tunelab compare` with a failed technique, a `data check` rule that fired)
  2    a user mistake: a TunelabError (one line, `error: ...`) or a command-line usage error (click's usage
       line and its "did you mean"); never a traceback
  130  interrupted (Ctrl-C or SIGINT); a run it stopped records `interrupted`

Only bugs show a traceback (and exit 1).
"""

from __future__ import annotations

import os
import sys

import typer

from tunelab.cli import run, experiments, adapters, info, data, registry, export, serve  # noqa: F401,I001  (each registers its commands on the app, in help order)
from tunelab.cli.common import app, err
from tunelab.errors import TunelabError

__all__ = ["app", "main"]

USAGE_ERROR = 2
INTERRUPTED = 130


def _click_errors() -> tuple[type[BaseException], ...]:
    """The classes click's usage errors belong to: recent typer vendors its own click, older ones use click."""
    kinds: list[type[BaseException]] = []
    try:
        from typer._click.exceptions import ClickException  # typer >= 0.20 ships click inside it

        kinds.append(ClickException)
    except ImportError:
        pass
    try:
        import click

        kinds.append(click.ClickException)
    except ImportError:
        pass
    return tuple(kinds)


def _exit_code(returned) -> int:
    """What `app(standalone_mode=False)` returned as an exit status: a command's `typer.Exit(code)` comes back
    as its code; a command that returns normally gives None."""
    return returned if isinstance(returned, int) and not isinstance(returned, bool) else 0


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        # Without standalone mode click returns a command's `typer.Exit(code)` instead of exiting with it, and
        # raises usage errors here instead of printing them (so a TunelabError is never caught by click).
        code = _exit_code(app(standalone_mode=False))
    except TunelabError as e:
        err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        code = USAGE_ERROR
    except KeyboardInterrupt:
        code = INTERRUPTED
    except typer.Exit as e:
        code = e.exit_code
    except typer.Abort:  # click's wrapper of Ctrl-C (and of EOF at a prompt)
        code = INTERRUPTED
    except _click_errors() as e:  # usage errors: no such command or option, a bad value
        if getattr(e, "ctx", None) is None:  # raised before a command was known: say where help is
            command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
            err.print(f"Usage: tunelab {command or 'COMMAND'} [OPTIONS] [ARGS]...\n"
                      f"Try 'tunelab {command + ' ' if command else ''}--help' for help.\n", highlight=False)
        e.show()
        code = e.exit_code
    if code == INTERRUPTED:
        err.print("interrupted")
    sys.exit(code)
