"""What runs around the user's code in a rank: importing the entrypoint, copying its output to the
job log, the collective timeout, and turning what it raises into a UserCodeError.

Both the rank worker and the runner use these; keeping them here keeps the import graph one-way
(worker -> runner -> context, and each of them -> userland).
"""

from __future__ import annotations

import datetime
import importlib
import io
import os
import sys
import threading
import traceback

from stalwart.errors import Preempted, StalwartError

# torch.distributed's own timeout must stay above stalwart's hang detection, so that stalwart
# sees a hang (and takes the stacks) before the collective gives up. Override with this variable.
COLLECTIVE_TIMEOUT_ENV = "STALWART_COLLECTIVE_TIMEOUT_S"
DEFAULT_COLLECTIVE_TIMEOUT_S = 1800.0


class UserCodeError(StalwartError):
    """The user's function raised. Carries the rank and the formatted traceback."""

    def __init__(self, rank: int, error: str, traceback_text: str, communication: bool = False,
                 preempted: bool = False):
        self.rank = rank
        self.error = error
        self.traceback_text = traceback_text
        # True when the error came out of a collective (a peer vanished), not from the user's logic.
        self.communication = communication
        # True when the ranks stopped for a preemption (stalwart's Preempted), not for an error.
        self.preempted = preempted
        super().__init__(f"rank {rank} raised {error}")

    def __reduce__(self):
        return (UserCodeError, (self.rank, self.error, self.traceback_text, self.communication, self.preempted))


class Tee(io.TextIOBase):
    """Writes through to the original stream and copies whole lines to the job log."""

    def __init__(self, original, sink, prefix: str):
        self._original = original
        self._sink = sink
        self._prefix = prefix
        self._partial = ""
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        try:
            self._original.write(text)
        except (OSError, ValueError):
            pass
        with self._lock:
            text = self._partial + text
            *lines, self._partial = text.split("\n")
            for line in lines:
                self._sink(f"{self._prefix}{line}\n")
        return len(text)

    def flush(self) -> None:
        try:
            self._original.flush()
        except (OSError, ValueError):
            pass

    def close_partial(self) -> None:
        if self._partial:
            self._sink(f"{self._prefix}{self._partial}\n")
            self._partial = ""


def import_entrypoint(entrypoint: str, workdir: str | None):
    for path in (workdir, os.getcwd()):
        if path and path not in sys.path:
            sys.path.insert(0, path)
    module_name, _, func_name = entrypoint.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise StalwartError(f"cannot import entrypoint module {module_name!r} (workdir {workdir}): {exc}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise StalwartError(f"entrypoint {entrypoint!r}: module {module_name!r} has no function {func_name!r}")
    return func


def collective_timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get(COLLECTIVE_TIMEOUT_ENV, DEFAULT_COLLECTIVE_TIMEOUT_S)))


def format_user_error(rank: int, exc: BaseException) -> UserCodeError:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    communication = _is_communication_error(exc)
    return UserCodeError(rank, f"{type(exc).__name__}: {exc}", text, communication, isinstance(exc, Preempted))


def _is_communication_error(exc: BaseException) -> bool:
    import torch.distributed as dist

    from stalwart.launchers.rejoin import PeerLost

    if isinstance(exc, (getattr(dist, "DistError", ()), PeerLost)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Gloo", "gloo",
                            "NCCL", "Socket Timeout", "Broken pipe"))

