"""The `stalwart` command: a thin Typer + Rich layer over `stalwart.Client`.

One module per group of commands (jobs, cluster, checkpoints, monitoring, the live views); they
register on the one Typer app in `common`. Errors reach the user as one line and exit code 1
(2 stays for usage errors); STALWART_DEBUG=1 shows the traceback of an unexpected one.
"""

from __future__ import annotations

import os
import sys

from rich.markup import escape

from stalwart.cli import checkpoints, cluster, jobs, monitoring, serve, views  # noqa: F401 - they register commands
from stalwart.cli import forecast  # noqa: F401 - registers `stalwart forecast`
from stalwart.cli.common import app, console, err
from stalwart.errors import StalwartError


def main() -> None:
    try:
        app()
    except StalwartError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if os.environ.get("STALWART_DEBUG"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        err.print(f"[bold red]error:[/] {type(exc).__name__}: {escape(first)} (STALWART_DEBUG=1 shows the traceback)",
                  highlight=False)
        sys.exit(1)


__all__ = ["app", "console", "main"]
