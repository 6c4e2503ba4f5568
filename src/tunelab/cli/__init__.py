"""The `tunelab` command: one sub-command per verb, each a thin call into a stage.

One module per group of commands (run, experiments, info, ...), all registered on the app in common.py.
User mistakes (TunelabError) print one line, `error: ...`, and exit with status 2. Only bugs show a
traceback.
"""

from __future__ import annotations

import os
import sys

import typer

from tunelab.cli import run, experiments, info, data, registry, export, serve  # noqa: F401,I001  (each registers its commands on the app, in help order)
from tunelab.cli.common import app, err
from tunelab.errors import TunelabError

__all__ = ["app", "main"]


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        # Without standalone mode click returns a command's `typer.Exit(code)` instead of exiting with it.
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except TunelabError as e:
        err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise
