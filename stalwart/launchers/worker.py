"""The rank worker: one Ray actor per rank, which sets up torch.distributed and calls the user's function."""

from __future__ import annotations

import datetime
import importlib
import io
import os
import sys
import threading
import traceback

import ray

from stalwart._net import free_port
from stalwart.errors import StalwartError
from stalwart.launchers.niceness import set_niceness

# torch.distributed's own timeout must stay above stalwart's hang detection, so that stalwart
# sees a hang (and takes the stacks) before the collective gives up. Override with this variable.
COLLECTIVE_TIMEOUT_ENV = "STALWART_COLLECTIVE_TIMEOUT_S"
DEFAULT_COLLECTIVE_TIMEOUT_S = 1800.0


class UserCodeError(StalwartError):
    """The user's function raised. Carries the rank and the formatted traceback."""

    def __init__(self, rank: int, error: str, traceback_text: str, communication: bool = False):
        self.rank = rank
        self.error = error
        self.traceback_text = traceback_text
        # True when the error came out of a collective (a peer vanished), not from the user's logic.
        self.communication = communication
        super().__init__(f"rank {rank} raised {error}")

    def __reduce__(self):
        return (UserCodeError, (self.rank, self.error, self.traceback_text, self.communication))


class _Tee(io.TextIOBase):
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


@ray.remote(max_concurrency=4)
class RankWorker:
    """Lifecycle: created in a placement-group bundle; `address()` (rank 0 only) picks the rendezvous;
    `run(payload)` runs the user's function to the end and returns a summary or raises UserCodeError;
    `stacks()` answers while `run` is busy (for hang reports). The supervisor kills the actor after."""

    def __init__(self, job_id: str, attempt: int, rank: int, world_size: int):
        self.job_id = job_id
        self.attempt = attempt
        self.rank = rank
        self.world_size = world_size

    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port("")

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def pid(self) -> int:
        return os.getpid()

    def gpu_ids(self) -> list[str]:
        """The GPUs Ray assigned to this worker (empty without GPUs)."""
        return [str(g) for g in ray.get_gpu_ids()]

    def warm(self, omp_threads: int, modules: list[str], niceness: int | None = None) -> None:
        """As a spare: import what a rank imports (torch, stalwart's runner, the strategy's modules),
        then idle until adopted. A module that fails to import is left for the rank to report.

        Ray gives an actor without CPUs OMP_NUM_THREADS=1 where a rank with `omp_threads` CPUs gets
        that many; set it as a rank's, before torch loads OpenMP (unless the job's runtime_env sets it).
        The imports run at the ranks' niceness: at Ray's 15 they would wait behind the ranks for as
        long as those keep the cores busy, and the spares would not be ready for the next fault."""
        set_niceness(niceness, all_threads=True)
        env_vars = (ray.get_runtime_context().runtime_env or {}).get("env_vars") or {}
        if os.environ.get("OMP_NUM_THREADS") == "1" and "OMP_NUM_THREADS" not in env_vars:
            os.environ["OMP_NUM_THREADS"] = str(omp_threads)
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - the rank imports it again and reports the error
                pass

    def adopt(self, attempt: int) -> None:
        """A warm spare becomes the rank of its bundle in `attempt`."""
        self.attempt = attempt

    def stacks(self) -> str:
        frames = sys._current_frames()
        names = {t.ident: t.name for t in threading.enumerate()}
        out = []
        for ident, frame in frames.items():
            out.append(f"--- thread {names.get(ident, ident)} ---\n")
            out.extend(traceback.format_stack(frame))
        return "".join(out)

    def run(self, payload: dict) -> dict:
        from stalwart.launchers.runner import run_rank

        return run_rank(self, payload)


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
    return UserCodeError(rank, f"{type(exc).__name__}: {exc}", text, communication)


def _is_communication_error(exc: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Gloo", "gloo",
                            "NCCL", "Socket Timeout", "Broken pipe"))

