"""AttemptPlan: what one attempt's ranks must know beyond the spec, built once by the supervisor.

It travels from the supervisor, through the gang and the rank worker, to the rank's TrainContext,
unchanged (frozen). The failure policy's part of it (data to skip, the rollback target, pinned
checkpoints, an LR scale) arrives as a `Rewind`; the spec's own part (its data.skip, resume_from,
init_from, faults to inject) is merged in here, in one place, so neither overwrites the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Range = tuple[int, int]


@dataclass(frozen=True)
class Rewind:
    """The failure policy's say in the next attempt (empty for a plain restart)."""

    skip: tuple[Range, ...] = ()  # batch index ranges [start, end) to skip, from rollbacks
    pinned: tuple[int, ...] = ()  # checkpoint steps retention must keep (rollback targets)
    max_step: int | None = None  # restore from no checkpoint newer than this (a rollback)
    lr_scale: float = 1.0  # multiply every learning rate (a spike that came back)


@dataclass(frozen=True)
class AttemptPlan:
    checkpoint_uri: str
    resume_from: str | None = None  # a checkpoint to start from until the job has one of its own
    init_from: str | None = None  # weights (DCP or safetensors) for a start with no checkpoint to restore
    s3_options: Any = None  # spec.S3Options (secrets included: it only travels to the ranks)
    skip: tuple[Range, ...] = ()
    pinned: tuple[int, ...] = ()
    max_step: int | None = None
    lr_scale: float = 1.0
    cache_dir: str | None = None  # node-local copies of remote checkpoints
    faults: tuple[dict, ...] = field(default_factory=tuple)  # injected faults (rehearsals)
    # Ranks whose processes lived through the last attempt (set by the gang at start): their in-memory
    # snapshots will likely restore this attempt, so no rank reads storage ahead of the restore.
    kept_ranks: tuple[int, ...] = ()
    # Ranks whose call of the last attempt goes on in this one (launchers.rejoin): survivors that stayed in
    # their training loop. When there are any, no rank takes part in a start from rank 0's parameters
    # (DDP's broadcast, DeepSpeed's at its engine's construction: they did theirs long ago), and the
    # restore sets every rank's.
    live_ranks: tuple[int, ...] = ()
    # Ranks from spares on standby, whose call of the function waits where it needs the world (their
    # restore; DeepSpeed's: `prepare`) and goes on from there.
    standby_ranks: tuple[int, ...] = ()
    # For `every_steps: auto` (checkpointing.interval): the intervals the last attempt's ranks agreed on
    # (tier -> steps; rank 0 proposes them again first), and the job's history the failure rate comes from.
    auto_intervals: tuple[tuple[str, int], ...] = ()
    # The in-memory snapshots' replication ring (checkpointing.memory.replica_ring), from where the
    # gang's ranks run: each rank's copy on another node where the job spans more than one.
    ring: tuple[int, ...] = ()
    run_s: float = 0.0  # seconds since the job's first step, before this attempt
    fault_count: int = 0  # attempts that ended in a fault

    @classmethod
    def build(cls, *, checkpoint_uri: str, spec_skip=(), rewind: Rewind | None = None, **kwargs) -> "AttemptPlan":
        """The spec's skips and the policy's, together (sorted, duplicates dropped)."""
        rewind = rewind or Rewind()
        skip = tuple(sorted({(int(a), int(b)) for a, b in (*spec_skip, *rewind.skip)}))
        return cls(checkpoint_uri=checkpoint_uri, skip=skip, pinned=tuple(sorted(set(rewind.pinned))),
                   max_step=rewind.max_step, lr_scale=rewind.lr_scale, **kwargs)
