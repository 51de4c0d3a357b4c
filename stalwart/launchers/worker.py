"""The rank worker: one Ray actor per rank, which sets up torch.distributed and calls the user's function."""

from __future__ import annotations

import importlib
import os
import sys
import threading
import traceback

import ray

from stalwart._net import free_port
from stalwart.launchers import preemption
from stalwart.launchers.rejoin import Mailbox, Rendezvous
from stalwart.launchers.niceness import set_niceness
from stalwart.launchers.userland import UserCodeError

__all__ = ["RankWorker", "UserCodeError"]

@ray.remote(max_concurrency=4)
class RankWorker:
    """Lifecycle: created in a placement-group bundle; `address()` (rank 0 only) picks the rendezvous;
    `run(payload)` runs the user's function to the end and returns a summary or raises UserCodeError;
    `stacks()` answers while `run` is busy (for hang reports), and so does `preempt()`. A SIGTERM while
    `run` is busy is a preemption notice, not an exit. The supervisor kills the actor after, except a
    rank that outlived a peer's death in a job with in-memory snapshots: `adopt(attempt)` and `run`
    again make it the same rank of the next attempt, in the same process (gang.RayGang). A DDP rank
    whose call stays in its training loop when a peer dies (launchers.rejoin) says `waiting()`, and
    `rejoin(...)` hands it the next attempt's rendezvous instead of a new `run`."""

    def __init__(self, job_id: str, attempt: int, rank: int, world_size: int):
        self.job_id = job_id
        self.attempt = attempt
        self.rank = rank
        self.world_size = world_size
        self.mailbox = Mailbox()
        preemption.install_signal_handler()  # the constructor runs on the process's main thread

    def preempt(self, reason: str, deadline: float | None = None) -> None:
        """A notice from the controller (Ray drains this node): stop after an emergency checkpoint."""
        preemption.notify(reason, deadline)

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
        """A warm spare (or a kept rank) becomes the rank of its bundle in `attempt`."""
        self.attempt = attempt

    def waiting(self) -> bool:
        """Whether this rank's `run` is in its loop, waiting for the next attempt's rendezvous."""
        return self.mailbox.waiting

    def rejoin(self, attempt: int, master_addr: str, master_port: int, plan, sink) -> None:
        """The next attempt's rendezvous, for the `run` waiting in its loop."""
        self.mailbox.put(Rendezvous(attempt, master_addr, master_port, plan, sink))

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
