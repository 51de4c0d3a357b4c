"""The `stalwart` command: a thin Typer + Rich layer over `stalwart.Client`.

One module per group of commands (jobs, cluster, checkpoints, monitoring, the live views); they
register on the one Typer app in `common`. Errors reach the user as one line and exit code 1
(2 stays for usage errors); STALWART_DEBUG=1 shows the traceback of an unexpected one.
"""

from __future__ import annotations

import os
import sys
import threading

from rich.markup import escape

from stalwart.cli import checkpoints, cluster, jobs, monitoring, serve, views  # noqa: F401 - they register commands
from stalwart.cli import forecast, sweep  # noqa: F401 - register `stalwart forecast` and `stalwart sweep`
from stalwart.cli.common import app, console, err
from stalwart.errors import StalwartError


class _OwnStdout:
    """stdout for the command's own output; Ray's background threads write to stderr instead.

    A connected driver prints cluster-wide notices (a node died, a worker was killed) to sys.stdout
    from threads named ray_*, at any moment; on stdout they would break `--json` and piped output.
    """

    def __init__(self, out, other):
        self._out, self._other = out, other

    def _target(self):
        return self._other if threading.current_thread().name.startswith("ray_") else self._out

    def write(self, text):
        return self._target().write(text)

    def flush(self):
        self._out.flush()
        self._other.flush()

    def __getattr__(self, name):
        return getattr(self._out, name)


def main() -> None:
    if not isinstance(sys.stdout, _OwnStdout):
        sys.stdout = _OwnStdout(sys.stdout, sys.stderr)
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
