"""TrainContext: the only stalwart API that user code needs.

    def main(ctx, config):
        model, opt = ctx.prepare(Model(), torch.optim.AdamW(...))
        start = ctx.restore()
        for step, batch in ctx.batches(get_batch, steps=config["steps"]):
            loss = ...; loss.backward(); opt.step()
            ctx.report(step, loss=loss, tokens=n)
            ctx.checkpoint(step)
"""

from __future__ import annotations

import math
import os
import random
import statistics
import threading
import time
from collections import deque
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from stalwart.checkpointing import engine as ckpt
from stalwart.checkpointing import interval
from stalwart.checkpointing import memory as memories
from stalwart.checkpointing import share as shares
from stalwart.checkpointing.storage import Storage
from stalwart.errors import CheckpointCorrupt, CheckpointNotFound, Preempted, StalwartError, StorageError, WaitTimeout
from stalwart.launchers import preemption, rejoin, strategies
from stalwart.launchers.data import DataPosition, IndexedBatches, iterate
from stalwart.launchers.plan import AttemptPlan
from stalwart.launchers.reporter import Reporter

# How long restore() waits for the read-ahead started at construction (finding the checkpoint, reading
# its indexes and, on an unchanged world size, this rank's own shard) before it gives up.
RESTORE_PREFETCH_TIMEOUT_S = 1800.0
RESTORE_PREFETCH_TIMEOUT_ENV = "STALWART_RESTORE_PREFETCH_TIMEOUT_S"

# Script mode: the rank worker sets a factory; `stalwart.context()` builds the context on first use.
_CURRENT: "TrainContext | None" = None
_FACTORY: "Callable[[], TrainContext] | None" = None


def current() -> "TrainContext | None":
    """The TrainContext of the job this process runs in (`stalwart.context()`), or None outside stalwart."""
    global _CURRENT
    if _CURRENT is None and _FACTORY is not None:
        _CURRENT = _FACTORY()
    return _CURRENT


class TrainContext:
    """Built by the rank worker; handed to `entrypoint(ctx, config)`.

    Attributes: `rank`, `world_size`, `local_rank`, `device`, `job_id`, `attempt`, `config`.
    `restored_step` is the step the last `restore()` loaded (0 when it started fresh).
    """

    def __init__(self, *, job_id: str, attempt: int, rank: int, world_size: int, local_rank: int,
                 device: torch.device, config: dict, strategy: str, storage: Storage, every_steps: int | str,
                 keep_last: int, reporter: Reporter, plan: AttemptPlan, ckpt_group=None,
                 strategy_options: dict | None = None, lazy_group: bool = False, vote_group=None,
                 memory: memories.MemoryTier | None = None,
                 train: rejoin.TrainGroup | rejoin.ShardGroup | None = None,
                 rejoin_with: Callable | None = None, standby: bool = False, auto_memory: bool = False,
                 auto_mtbf_s: float = 3600.0):
        self.job_id = job_id
        self.attempt = attempt
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.device = device
        self.config = config
        self.strategy = strategy
        self.strategy_options = dict(strategy_options or {})
        self._strategy: strategies.Strategy | None = None
        # Script mode: the script initializes torch.distributed itself, so the checkpoint group is
        # made at the first restore() or checkpoint(), which every rank calls.
        self._lazy_group = lazy_group and world_size > 1
        # checkpoint.every_steps; with `auto` (checkpointing.interval), 0 until the ranks agree on one.
        self.every_steps = 0 if every_steps == "auto" else every_steps
        self.restored_step = 0
        self.restored_from: str | None = None
        self.restored_tier: str | None = None  # memory | local | storage
        # In-memory snapshots (checkpoint.memory_every_steps), kept by the process across attempts:
        # a rank that survived a peer's death restores from them instead of from storage.
        self._memory = memory
        # Survivors that stay in their loop (launchers.rejoin): DDP's gradients (FSDP's collectives) go over `train`, and
        # `rejoin_with(error)` waits for the next attempt's rendezvous and forms its groups.
        self._train = train
        self._rejoin_with = rejoin_with
        # A warm spare's run ahead of a fault: no groups yet; its restore waits for the attempt (`_join`).
        self._standby = standby
        self._reporter = reporter
        self._plan = plan
        self._data = DataPosition(skip=[tuple(r) for r in plan.skip])
        self._model: torch.nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._scheduler: Any = None
        self._extras: dict[str, Any] = {}  # prepare(extra=...), keep(): saved and restored with the rest
        self._restore_called = False
        self._recent_losses: deque[Any] = deque(maxlen=50)  # floats or 0-d tensors
        cache_dir = plan.cache_dir
        # A node-local copy only pays off when the storage is remote.
        self._cache = ckpt.LocalCache(cache_dir) if cache_dir and not storage.uri.startswith("file://") else None
        self._engine = ckpt.CheckpointEngine(
            storage, rank=rank, world_size=world_size, group=ckpt_group, strategy=strategy, keep_last=keep_last,
            job_id=job_id, attempt=attempt, on_result=self._on_save, cache=self._cache)
        self._engine.pinned.update(plan.pinned)
        self._vote = preemption.StopVote(vote_group, world_size, rank=rank, settings=len(interval.TIERS))
        self._auto_tiers = tuple(t for t, auto in (("durable", every_steps == "auto"),
                                                    ("memory", memory is not None and auto_memory))
                                 if auto)
        self._auto: interval.AutoInterval | None = None
        if self._auto_tiers and rank == 0:
            self._auto = interval.AutoInterval(self._auto_tiers, auto_mtbf_s, plan.run_s, plan.fault_count,
                                               time.monotonic, current=dict(plan.auto_intervals))
            self._propose_current()
        self._auto_polls = 0
        self._last_step: int | None = None  # ctx.batches(steps=)
        self._last_stall = 0.0
        self._faults = self._faults_of(plan)
        self._last_cpu: float | None = None
        # A restart (or --resume-from) will restore: find and read that checkpoint in the background
        # now, while the user's code builds and prepares the model, instead of after it.
        self._prefetch: _Prefetch | None = None
        if (attempt > 1 or plan.resume_from) and not (memory is not None and plan.kept_ranks) and not standby:
            # (Unless ranks survived the last attempt: their snapshots will likely restore this one.)
            self._prefetch = _Prefetch(self._find_checkpoint, f"the restore read-ahead of a checkpoint under "
                                       f"{plan.resume_from or storage.uri}")
        # A first attempt with init_from starts from those weights (unless the job's checkpoint root
        # already holds a checkpoint): read them while the model is built, too.
        self._weights: _Prefetch | None = None
        if plan.init_from and attempt == 1:
            self._weights = _Prefetch(lambda: _read_weights(plan.init_from),
                                      f"the read-ahead of the init_from weights at {plan.init_from}")

    def _faults_of(self, plan: AttemptPlan) -> dict:
        """The injected faults (rehearsals) this rank plays in this attempt, by step."""
        faults = {}
        for f in plan.faults:
            if f["attempt"] == self.attempt and (f["rank"] == self.rank or f["kind"] in ("nan", "spike", "drift")):
                span = range(f["step"], f["step"] + (f["length"] if f["kind"] in ("spike", "slow", "drift") else 1))
                for s in span:
                    faults[s] = f
        return faults

    # ---- model --------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                scheduler: Any = None, *, extra: dict[str, Any] | None = None) -> tuple[Any, Any]:
        """Move `model` to this rank's device and wrap it for the job's strategy; return (model, optimizer).

        ddp: DistributedDataParallel. fsdp: FSDP2 `fully_shard` (the optimizer is pointed at the
        sharded parameters, in place, so a scheduler built on it keeps working). deepspeed: the
        DeepSpeed engine and its ZeRO optimizer (call `model.backward(loss)` and `model.step()`).
        Register the optimizer and LR scheduler so checkpoints and restores include them. Build the
        optimizer on `model.parameters()` before calling, and take no step before.

        `extra` names other objects the run's trajectory depends on, each with `state_dict()` and
        `load_state_dict()`: a GradScaler, an EMA of the weights, a counter of your own. They are saved
        and restored with the rest (every checkpoint and in-memory snapshot); rank 0's copy is the one
        saved, so keep there what every rank holds alike. Under FSDP, state that is sharded like the
        model (an EMA of its DTensor parameters) is saved as each rank's share: build such an object on
        the prepared model and name it with `ctx.keep`.
        """
        extras = _checked_extras(extra)  # before the model is wrapped: bad input changes nothing
        self._strategy = strategies.make(self.strategy, self.strategy_options)
        self._report_model(model)  # before wrapping: FSDP and ZeRO-3 then hold only a shard of each
        model, optimizer = self._strategy.wrap(model, optimizer, self)
        self._register(scheduler, extras)
        return model, optimizer

    def track(self, model: Any, optimizer: Any = None, scheduler: Any = None, *,
              extra: dict[str, Any] | None = None) -> None:
        """Register a model your own code already wrapped (DDP, FSDP2 or a DeepSpeed engine) for
        checkpoints and restores, instead of `prepare` (script mode); `extra` as for `prepare`."""
        extras = _checked_extras(extra)
        self._strategy = strategies.adopt(model, optimizer)
        self._report_model(getattr(model, "module", model))
        self._register(scheduler, extras)

    def keep(self, name: str, obj: Any) -> None:
        """Save and restore `obj` with the job's state, as `prepare(extra={name: obj})` does: for what is
        built on the prepared model (an EMA of FSDP's sharded parameters). Call it before `ctx.restore()`."""
        if self._strategy is None:
            raise StalwartError("ctx.keep() comes after ctx.prepare(): it keeps objects built on the prepared model")
        if self._standby and getattr(self._strategy, "_deferred", False):
            # A spare on standby holds FSDP's model whole until it is a rank: what was built on it is not
            # what the rank will need. It gives up standing by; a replacement runs the function from its start.
            raise StandbyDeclined(f"a spare does not stand by for this job: ctx.keep({name!r}) keeps an object "
                                  "built on the FSDP model, which a spare shards only once it is a rank")
        if self._restore_called:
            raise StalwartError(f"ctx.keep({name!r}) after ctx.restore(): call it before, so the restore loads it")
        _checked_extras({name: obj})
        self._add_extra(name, obj)

    def _add_extra(self, name: str, obj: Any) -> None:
        if name in self._extras:
            raise StalwartError(f"ctx.keep: {name!r} is kept already; give each object a name of its own")
        self._strategy.extra_state(name, obj.state_dict())  # what a save would refuse, refused now
        self._extras[name] = obj

    def _report_model(self, model: Any) -> None:
        """Rank 0 tells the controller the model's size (`status()["params"]`: what a scaling sweep and
        `forecast fit --jobs` take for N). A sharded parameter counts whole (DTensor, ZeRO-3's ds_numel)."""
        if self.rank != 0:
            return
        try:
            params = [p for p in model.parameters()]
            total = sum(int(getattr(p, "ds_numel", 0) or p.numel()) for p in params)
            trainable = sum(int(getattr(p, "ds_numel", 0) or p.numel()) for p in params if p.requires_grad)
        except Exception:  # noqa: BLE001 - a model without parameters() says nothing
            return
        self._reporter.event("model", params=total, trainable_params=trainable)

    def _register(self, scheduler: Any, extras: dict[str, Any]) -> None:
        self._model = self._strategy.model
        self._optimizer = self._strategy.optimizer
        self._scheduler = scheduler
        self._extras = self._strategy.extras = {}  # one dict: the strategy reads what keep() adds
        for name, obj in extras.items():
            self._add_extra(name, obj)
        self._engine.layout = self._strategy.layout
        self._engine.strategy = self._strategy.name  # recorded in each manifest
        if self._memory is not None:
            self._memory.layout_kind = self._strategy.layout

    # ---- data ---------------------------------------------------------------------------
    def batches(self, source: Callable[[int], Any] | Sequence, *, steps: int | None = None,
                batch_size: int | None = None, shuffle: bool = True, seed: int = 0,
                collate: Callable | None = None) -> Iterator[tuple[int, Any]]:
        """Yield `(step, batch)` from the restored step + 1 up to `steps`.

        `source` is either `batch(index) -> batch`, a function of the global batch index alone
        (make it deterministic), or a map-style dataset with `batch_size`, which is then split
        across ranks with a seeded shuffle per epoch. Skipped ranges (after a rollback) are jumped.
        """
        if self._standby:
            self._join()  # a function that never restores
        if callable(source) and batch_size is None:
            batch_at = source
        else:
            if batch_size is None:
                raise ValueError("batch_size is required when batches() is given a dataset")
            batch_at = IndexedBatches(source, batch_size, self.rank, self.world_size, shuffle=shuffle, seed=seed,
                                      collate=collate)
        self._last_step = steps
        if steps is not None and self.rank == 0:
            self._reporter.event("progress", max_steps=steps)
            lambdas = getattr(self._scheduler, "lr_lambdas", None)
            groups = getattr(self._optimizer, "param_groups", None)
            if lambdas and groups and "initial_lr" in groups[0]:
                # A LambdaLR: its LR at every step is known now, for the live forecast (once, before training).
                try:  # evaluated at the steps sent only: a million-step run costs 4,096 calls
                    peak, shape = groups[0]["initial_lr"], lambdas[0]
                    idx = _lr_samples(steps)
                    self._reporter.event("lr_schedule", steps=[i + 1 for i in idx], lr=[peak * shape(i) for i in idx])
                except Exception as exc:  # noqa: BLE001 - the user's lambda; the forecast is optional
                    self.log(f"stalwart: no LR schedule for the live forecast ({type(exc).__name__}: {exc})")
        if self._train is None:
            return iterate(batch_at, self._data, self.restored_step, steps)
        return self._staying(batch_at, steps)

    def _staying(self, batch_at: Callable[[int], Any], steps: int | None) -> Iterator[tuple[int, Any]]:
        """`iterate`, but a step whose gradients could not be averaged (a peer died) is not the end:
        the rank rejoins the next attempt from here and the loop goes on from the restored step."""
        while True:
            for item in iterate(batch_at, self._data, self.restored_step, steps):
                if self._train.failed is not None:
                    break
                yield item
            if self._train.failed is None:
                return
            self._rejoin()

    def _enter(self, rendezvous: rejoin.Rendezvous, groups: rejoin.Groups) -> None:
        """Become this rank of `rendezvous.attempt`, whose groups are `groups`."""
        self._reporter.retarget(rendezvous.sink)
        self.attempt, self._plan = rendezvous.attempt, rendezvous.plan
        self._engine.group, self._engine.attempt = groups.checkpoint, rendezvous.attempt
        self._engine.pinned.update(rendezvous.plan.pinned)
        self._vote = preemption.StopVote(groups.vote, self.world_size, rank=self.rank, settings=len(interval.TIERS))
        self._propose_current()
        self._train.replace(groups.train, self.world_size, groups.check)
        self._faults = self._faults_of(rendezvous.plan)
        self._data = DataPosition(skip=[tuple(r) for r in rendezvous.plan.skip])

    def _join(self) -> None:
        """A spare on standby, at its restore (or first batch): wait to be made a rank of an attempt,
        then take part in its start as a rank that has just prepared its model would."""
        self._standby = False
        self._enter(*self._rejoin_with(None))
        if self._strategy is not None:
            self._strategy.join(self)  # FSDP shards the spare's model now that it has a world
        if not self._plan.live_ranks and self._model is not None:
            # Every rank of this attempt is starting: DDP's start from rank 0's parameters, which the
            # others did in `prepare`.
            self._train.start_from_rank0([*self._model.parameters(), *self._model.buffers()])
        if self.attempt > 1 and not self._plan.kept_ranks:
            self._prefetch = _Prefetch(self._find_checkpoint, f"the restore read-ahead of a checkpoint under "
                                       f"{self._plan.resume_from or self._engine.storage.uri}")

    def _rejoin(self) -> None:
        """After a peer's death: wait for the next attempt, form its groups, restore every rank from
        the in-memory snapshots (the replacement runs the same restore), in this process."""
        failed = self._train.failed
        if self._memory is None or not self._memory.holdings():
            raise rejoin.PeerLost(f"a peer was lost before the first in-memory snapshot: {failed}") from failed
        self._reporter.event("rejoining", rank=self.rank, attempt=self.attempt, error=str(failed).splitlines()[0][:300])
        self._reporter.flush()
        try:
            self._engine.wait(timeout_s=5.0)  # a save in flight ends with its broken group
        except StalwartError:
            pass
        t0 = time.perf_counter()
        self._enter(*self._rejoin_with(failed))
        if self._strategy is not None:
            self._strategy.rejoined(self)
        waited = time.perf_counter() - t0
        self._prefetch = None
        for p in self._model.parameters():
            p.grad = None  # the failed step's; a restored rank starts without
        step = self.restore()
        if step == 0:
            raise rejoin.PeerLost("a peer was lost and there was nothing to restore the ranks from") from failed
        self.log(f"stalwart: rejoined attempt {self.attempt} in this process after a peer was lost "
                 f"(waited {waited:.2f} s); going on from step {step} ({self.restored_tier})")

    @property
    def data_position(self) -> int:
        return self._data.position

    # ---- reporting ----------------------------------------------------------------------
    def report(self, step: int, loss: Any = None, grad_norm: Any = None, tokens: Any = None, **metrics: Any) -> None:
        """Record this step's figures; also the heartbeat. Never blocks on the controller.

        Tensors are converted on the reporter's thread, so passing `loss` as a tensor adds no sync.
        """
        if self._train is not None and self._train.failed is not None:
            return  # a step whose collectives failed (a peer is gone): it is redone after the rejoin
        if self._faults and step in self._faults and self._faults[step].get("at", "report") == "report":
            loss, grad_norm = _inject(self._faults[step], self.rank, loss, grad_norm, self._reporter, step)
        # This thread's CPU time since the last report: time blocked in a collective waiting for a
        # slower peer does not count, so it tells a straggler from the ranks that wait for it.
        cpu = time.thread_time()
        if "lr" not in metrics and self._optimizer is not None:
            # The LR as the optimizer has it (a float read): the trend detector holds while it rises
            # (a warmup or re-warmup raises the loss on purpose).
            groups = getattr(self._optimizer, "param_groups", None)
            if groups:
                metrics["lr"] = groups[0].get("lr")
        busy, self._last_cpu = (cpu - self._last_cpu if self._last_cpu is not None else None), cpu
        self._reporter.record(step, loss, grad_norm, tokens, metrics or None, self._data.position, busy)
        if loss is not None and (step % 10 == 0):
            # A sample for the checkpoint's loss statistics. A tensor is copied on its device (the
            # loss's memory may be reused: a buffer, a CUDA graph's output) and read only when a
            # checkpoint is taken, so reporting never waits for the device.
            self._recent_losses.append(loss.detach().clone() if isinstance(loss, torch.Tensor) else loss)

    def report_lr_schedule(self, lrs: Sequence[float], first_step: int = 1) -> None:
        """Tell the controller the LR of every step of the run (`lrs[i]`: the LR of step first_step + i,
        to the last step), for the live forecast band. Done for you when `prepare` got a LambdaLR and
        `batches` got `steps`; call it once, on rank 0, with any other schedule. At most 4,096 samples
        of it are sent (linear in between)."""
        if len(lrs):
            idx = _lr_samples(len(lrs))
            self._reporter.event("lr_schedule", steps=[first_step + i for i in idx], lr=[float(lrs[i]) for i in idx])

    def log(self, message: str) -> None:
        self._reporter.log(f"[rank {self.rank}] {message}\n")

    # ---- checkpoints --------------------------------------------------------------------
    def checkpoint(self, step: int, *, force: bool = False) -> bool:
        """Save when `step` is a multiple of checkpoint.every_steps (or `force`); return whether it did.

        Also keeps an in-memory snapshot, replicated to the next rank, when `step` is a multiple of
        checkpoint.memory_every_steps. Blocks only for the host-memory copies (and for a previous
        save or replication still in flight). Every rank must call it with the same steps; call it
        every step: it is also where the ranks stop together when one of them is preempted (a
        SIGTERM, its node drained), saving that step within fault_tolerance.preemption_grace_s and
        raising `Preempted` (let it propagate).
        """
        if self._train is not None:
            if self._train.failed is not None:
                return False  # this step's gradients were not averaged: it is redone after the rejoin
            try:
                stop = self._vote.poll(preemption.notice() is not None)
            except RuntimeError as exc:  # the vote's group broke with a peer: rejoin at the next batch
                self._train.fail(exc)
                return False
            if stop:
                self._stop_for_preemption(step)
            self._auto_intervals()
        elif self._vote_ready():
            if self._vote.poll(preemption.notice() is not None):
                self._stop_for_preemption(step)
            self._auto_intervals()
        snap = self._memory is not None and self._memory.due(step)
        durable = force or (self.every_steps > 0 and step % self.every_steps == 0)
        if "durable" in self._auto_tiers and step == self._last_step:
            durable = True  # an auto interval falls anywhere: the run's last step is always kept
        if not (snap or durable):
            return False
        self._save(step, snap=snap, durable=durable)
        return durable

    def _vote_ready(self) -> bool:
        """Whether this rank can take part in the preemption vote (script mode: once the script has
        initialized torch.distributed, when the groups are made)."""
        if self._lazy_group:
            if not dist.is_initialized():
                return False
            self._ensure_group()
        return True

    def _stop_for_preemption(self, step: int) -> None:
        """Every rank is here at `step`: save it, wait for the commit until the notice's deadline, learn
        whether every rank's part (and rank 0's manifest) made it, and raise Preempted."""
        notice = preemption.notice()
        deadline = notice.deadline if notice is not None else time.time() + preemption.grace_s()
        started = time.time()
        committed, error = False, None
        try:
            self._save(step)
            result = self._engine.wait(timeout_s=max(0.0, deadline - time.time()))
            committed = result is not None and result.committed and result.step == step
            error = None if result is None else result.error
        except StalwartError as exc:  # a save that cannot be taken or is too slow: the job still moves
            error = str(exc)
        # Also the fence: no rank leaves (and is stopped) before rank 0 has written the manifest.
        committed = self._vote.all_true(committed)
        reason = notice.reason if notice is not None else "a peer's preemption notice"
        if self.rank == 0 or notice is not None:
            self._reporter.event("emergency_checkpoint", step=step, rank=self.rank, committed=committed,
                                 seconds=time.time() - started, reason=reason, error=error)
            self._reporter.flush()
        raise Preempted(step, committed, reason)

    def _save(self, step: int, snap: bool = False, durable: bool = True) -> None:
        """Take this step's in-memory snapshot (`snap`) and/or its durable checkpoint (`durable`)."""
        if self._model is None:
            raise StalwartError("ctx.checkpoint() needs the model: call ctx.prepare(model, optimizer) first")
        self._ensure_group()
        state, rng = self._state(), _rng_state()
        if snap:
            if self._faults and self._faults.get(step, {}).get("at") == "snapshot":
                fault = self._faults[step]  # fired by the replication thread with the copy on its way
                self._memory.fault_in_copy = lambda: _inject(fault, self.rank, None, None, self._reporter, step)
            t0 = time.perf_counter()
            self._memory.snapshot(step, state, local={"rng": rng}, meta={"data": self._data.to_dict()})
            if self._auto is not None:
                self._auto.cost("memory", time.perf_counter() - t0)
        if not durable:
            return
        t0 = time.perf_counter()
        self._engine.save(step, state, local={"rng": rng}, meta={
            "data": self._data.to_dict(),
            "loss_stats": self._loss_stats(),
        }, first=self._rank0_paths)
        self._last_stall = time.perf_counter() - t0
        if self._auto is not None:
            self._auto.cost("durable", self._last_stall)

    # ---- every_steps: auto ---------------------------------------------------------------
    def _propose_current(self) -> None:
        """Rank 0, with a new vote: propose the intervals in force again, so that every rank of this
        attempt (a replacement too) takes them at the same step. Until a round carries them, no rank
        saves an auto tier: no rank can save a step its peers skip."""
        if self._auto is not None:
            for tier, steps in self._auto.current.items():
                self._vote.propose[interval.TIERS.index(tier)] = steps

    def _auto_intervals(self) -> None:
        """After each poll: take the intervals the ranks agreed on (the same values at the same poll on
        every rank); rank 0 refreshes its proposals every AUTO_EVERY_POLLS polls, and every poll while a
        tier has none yet (a step time is known after two)."""
        if not self._auto_tiers:
            return
        self._auto_polls += 1
        if self._auto is not None and (self._auto_polls % AUTO_EVERY_POLLS == 1 or not all(
                self._vote.propose[interval.TIERS.index(tier)] for tier in self._auto_tiers)):
            for tier, steps in self._auto.propose(self._vote.step_s()).items():
                self._vote.propose[interval.TIERS.index(tier)] = steps
        for tier in self._auto_tiers:
            steps = self._vote.settings[interval.TIERS.index(tier)]
            if tier == "durable":
                changed, self.every_steps = steps != self.every_steps, steps
            else:
                changed, self._memory.every_steps = steps != self._memory.every_steps, steps
            if changed and steps and self._auto is not None and (choice := self._auto.agreed(tier, steps)) is not None:
                self._reporter.event("checkpoint_interval", **choice.as_event())

    def restore(self) -> int:
        """Load the newest good checkpoint (or the one this attempt was told to use); return its step.

        Returns 0 when there is nothing to restore; then, with `checkpoint.init_from`, the model's
        weights are set from there (the optimizer stays fresh). Corrupt checkpoints are skipped for older ones,
        with an event. Every rank must call it, after `prepare`.
        """
        if self._model is None:
            raise StalwartError("ctx.restore() needs the model: call ctx.prepare(model, optimizer) first")
        self._restore_called = True
        if self._standby:
            self._join()
        self._ensure_group()
        if self.rank == 0:
            self._sweep_uncommitted()
        if self._memory is not None:
            step = self._restore_from_memory()
            if step is not None:
                self._weights = None  # the job's own state wins over init_from
                return step
            self._memory.drop()  # what it held is older than storage, or not every rank's: another trajectory
        loaded, state = self._read_checkpoint()
        if loaded is None:
            if self._plan.init_from:
                self._init_weights(self._plan.init_from)
            return 0
        self._weights = None  # a checkpoint of the job's own wins over init_from
        self._apply_common(state, loaded.local["rng"] if loaded.local is not None and loaded.same_world else None,
                           loaded.step, loaded.manifest.get("data"))
        self.restored_step = loaded.step
        self.restored_from = loaded.uri
        self.restored_tier = "local" if loaded.local_shards else "storage"
        self._reporter.event("restored", step=loaded.step, uri=loaded.uri, rank=self.rank, tier=self.restored_tier,
                             world_size=loaded.manifest["world_size"], local_shards=loaded.local_shards,
                             bytes_read=loaded.bytes_read, bytes_received=loaded.bytes_received)
        return loaded.step

    def _restore_from_memory(self) -> int | None:
        """Restore every rank from the in-memory snapshots when they hold every rank's state at one step
        no older than the newest durable checkpoint (and not past a rollback's target); return that step,
        or None (every rank alike) for a restore from storage. Collective over the snapshots' group."""
        tier, group = self._memory, self._memory.group
        newest = None
        if self.rank == 0:
            try:
                steps = ckpt.committed_steps(self._engine.storage)
                newest = steps[0] if steps else None
            except StorageError:
                newest = float("inf")  # storage cannot say: restoring from it will raise or retry there
        if self.world_size > 1 and group is not None:
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, {"holds": tier.holdings(), "durable": newest}, group=group)
        else:
            gathered = [{"holds": tier.holdings(), "durable": newest}]
        choice = memories.choose([g["holds"] for g in gathered], self.world_size, newest_durable=gathered[0]["durable"],
                                 max_step=self._plan.max_step)
        if choice is None:
            return None
        t0 = time.perf_counter()
        state, local, meta, received = memories.state_for(tier, choice, group)
        tier.keep_only(choice.step)  # newer snapshots hold the trajectory the fault cut off
        self._strategy.load(state)
        self._apply_common(state, (local or {}).get("rng"), choice.step, meta.get("data"))
        self._prefetch = None  # not needed: let a read-ahead started anyway go
        self.restored_step = choice.step
        self.restored_from = f"memory://rank-{choice.sources[self.rank]}/step-{choice.step}"
        self.restored_tier = "memory"
        self._reporter.event("restored", step=choice.step, uri=self.restored_from, rank=self.rank, tier="memory",
                             world_size=self.world_size, holder=choice.sources[self.rank], bytes_read=0,
                             bytes_received=received, seconds=time.perf_counter() - t0,
                             moved={str(r): h for r, h in choice.moved.items()})
        return choice.step

    def _apply_common(self, state: dict, rng: dict | None, step: int, data: dict | None) -> None:
        """What every restore applies besides the strategy's state: the LR scheduler, this rank's RNG
        (reseeded when there is none to follow: a changed world size), an LR scale, the data position."""
        if self._scheduler is not None and state.get("scheduler") is not None:
            self._scheduler.load_state_dict(state["scheduler"])
        saved = state.get("extra") or {}
        for name, obj in self._extras.items():
            if name in saved:
                self._strategy.load_extra(obj, saved[name], name)
            else:  # a checkpoint from before the object was added: it keeps the state it was built with
                self.log(f"stalwart: the restored step has no state for extra {name!r}; it starts fresh")
        if rng is not None:
            _set_rng_state(rng)
        else:
            # A different world size has no exact trajectory to follow; reseed deterministically.
            _seed_all(step * 1000 + self.rank)
        scale = float(self._plan.lr_scale or 1.0)
        if scale != 1.0 and self._optimizer is not None:
            # Escalation after a recurring spike: every LR the optimizer or scheduler would use shrinks.
            for group in self._optimizer.param_groups:
                group["lr"] *= scale
                if "initial_lr" in group:
                    group["initial_lr"] *= scale
            if self._scheduler is not None and hasattr(self._scheduler, "base_lrs"):
                self._scheduler.base_lrs = [lr * scale for lr in self._scheduler.base_lrs]
        data_position = DataPosition.from_dict(data)
        data_position.skip = sorted(set(data_position.skip) | set(self._data.skip))
        self._data = data_position

    def _init_weights(self, path: str) -> None:
        """A start with no checkpoint of its own: the model's weights from `path` (DCP or safetensors,
        trained elsewhere); the optimizer, scheduler and data position stay fresh (step 0)."""
        t0 = time.perf_counter()
        prefetch, self._weights = self._weights, None
        fmt, weights = prefetch.result() if prefetch is not None else _read_weights(path)
        try:
            self._strategy.load_weights(weights)
        except StalwartError as exc:
            raise StalwartError(f"checkpoint.init_from {path}: {exc}") from None
        if self.rank == 0:
            self._reporter.event("initialized", uri=path, format=fmt, tensors=len(weights),
                                 seconds=time.perf_counter() - t0)

    def _read_checkpoint(self) -> tuple[shares.Share | shares.FullShare | None, Any]:
        """Agree on a checkpoint, read this rank's share of it and apply it to the model and optimizer.

        A share read that finds damage raises on every rank, so all of them skip to the next older
        checkpoint together. Returns (the checkpoint, the state tree read), or (None, None).
        """
        prefetch, self._prefetch = self._prefetch, None
        storage, share, exact = prefetch.result() if prefetch is not None else self._find_checkpoint()
        share = self._agree(storage, share, exact)
        while share is not None:
            written_by = share.manifest.get("strategy", "ddp")
            if written_by != self._strategy.name:
                raise StalwartError(f"checkpoint {share.uri} was written by strategy {written_by!r}; this job "
                                    f"runs {self._strategy.name!r}, whose state has another form")
            share.group = self._engine.group
            try:
                with _RestoreProgress(self._reporter, share):
                    return share, self._strategy.restore(share)
            except RuntimeError as exc:
                if "Error(s) in loading state_dict" not in str(exc):
                    raise
                # Another model than the one saved (a changed size, renamed layers): say which checkpoint.
                raise StalwartError(f"checkpoint {share.uri} does not fit this job's model (was the model changed "
                                    f"since it was saved? resume from a checkpoint of this same model): {exc}") from None
            except CheckpointCorrupt as exc:
                if exact:  # exactly this one was asked for: a corrupt copy is an error, not a fallback
                    raise
                self._skipped(share.step, exc.reason)
                share = self._agree(storage, self._newest(storage, below=share.step), exact)
        return None, None

    def _agree(self, storage: Storage, share, exact: bool):
        """Every rank must read the same step: the oldest of the ranks' choices (a rank that could not
        verify a step drags all back). Each round, the ranks that chose another step open the agreed one."""
        if self.world_size == 1 or not dist.is_initialized():
            return share
        while True:
            steps: list[int] = [0] * self.world_size
            dist.all_gather_object(steps, -1 if share is None else share.step, group=self._engine.group)
            agreed = min(steps)
            if agreed < 0:
                return None
            if all(s == agreed for s in steps):
                return share
            if share is None or share.step != agreed:
                try:
                    share = self._open(storage, agreed)
                except CheckpointCorrupt as exc:
                    if exact:
                        raise
                    self._skipped(agreed, exc.reason)
                    share = self._newest(storage, below=agreed)

    def _find_checkpoint(self) -> tuple[Storage, Any, bool]:
        """This rank's choice, before the ranks agree: the named checkpoint, else the newest that opens
        (its manifest, every shard's index and, on an unchanged world size, this rank's own shard verify).
        Returns (storage, the opened checkpoint or None, whether it was named exactly)."""
        resume_from = self._plan.resume_from
        storage = self._engine.storage
        if resume_from:
            storage, step = ckpt.resolve(resume_from, self._plan.s3_options)
            if step is not None:  # exactly this one was asked for: a corrupt copy is an error, not a fallback
                return storage, self._open(storage, step), True
            share = self._newest(storage, below=None)
            if share is None:
                raise CheckpointNotFound(f"no loadable committed checkpoint under {resume_from}")
            return storage, share, False
        return storage, self._newest(storage, below=None), False

    def _open(self, storage: Storage, step: int):
        cache = self._cache if storage is self._engine.storage else None  # the cache holds this job's own shards
        return shares.open_share(storage, step, self.rank, self.world_size, cache=cache,
                                 ranged=shares.ranged_restores())

    def _newest(self, storage: Storage, below: int | None):
        """The newest committed checkpoint that opens, under the plan's max_step and below `below`."""
        limit = self._plan.max_step if storage is self._engine.storage else None
        if below is not None:
            limit = below - 1 if limit is None else min(limit, below - 1)
        for step in ckpt.committed_steps(storage):
            if limit is not None and step > limit:
                continue
            try:
                return self._open(storage, step)
            except CheckpointCorrupt as exc:
                self._skipped(step, exc.reason)
        return None

    def _skipped(self, step: int, reason: str) -> None:
        self._reporter.event("checkpoint_skipped", step=step, reason=reason, rank=self.rank)

    def _sweep_uncommitted(self) -> None:
        """Rank 0, first thing in restore(): remove what failed saves of earlier attempts left."""
        try:
            removed = self._engine.sweep_uncommitted()
        except StorageError as exc:  # only space is at stake; the next commit's retention tries again
            self.log(f"stalwart: could not remove uncommitted checkpoint steps: {exc}")
            return
        if removed:
            self.log(f"stalwart: removed uncommitted checkpoint step(s) {removed} left by earlier attempts")

    def _state(self) -> dict:
        state = {**self._strategy.state(),
                 "scheduler": self._scheduler.state_dict() if self._scheduler is not None else None}
        if self._extras:  # absent without any, so the tree (and older checkpoints) keep their shape
            state["extra"] = {name: self._strategy.extra_state(name, obj.state_dict())
                              for name, obj in self._extras.items()}
        return state

    def _rank0_paths(self, paths: list[str]) -> frozenset[str]:
        """What rank 0 writes of the replicated tensors: the strategy's picks and every extra's."""
        return self._strategy.rank0_paths(paths) | {p for p in paths if p.startswith("/extra/")}

    def _ensure_group(self) -> None:
        if not self._lazy_group:
            return
        if not dist.is_initialized():
            raise StalwartError("call torch.distributed.init_process_group() before ctx.restore() or ctx.checkpoint()")
        from stalwart.launchers.userland import collective_timeout

        self._engine.group = dist.new_group(backend="gloo", timeout=collective_timeout())
        self._vote = preemption.StopVote(dist.new_group(backend="gloo", timeout=collective_timeout()), self.world_size,
                                         rank=self.rank, settings=len(interval.TIERS))
        self._propose_current()
        self._lazy_group = False

    def _loss_stats(self) -> dict:
        losses = []
        for x in self._recent_losses:
            try:
                losses.append(float(x))
            except (RuntimeError, TypeError, ValueError):  # a sample that cannot be read must not fail a save
                continue
        finite = [x for x in losses if math.isfinite(x)]
        return {
            "samples": len(losses),
            "median": statistics.median(finite) if finite else None,
            "last": losses[-1] if losses else None,
            "nonfinite": len(finite) != len(losses),
        }

    def _on_save(self, result: ckpt.SaveResult) -> None:
        kind = "checkpoint_committed" if result.committed else "checkpoint_failed"
        if result.committed and self.rank != 0:
            return  # rank 0 speaks for a commit; any rank reports its own failure
        if result.committed and self._auto is not None:
            self._auto.upload(result.write_s)
        self._reporter.event(kind, step=result.step, rank=self.rank, stall_s=self._last_stall,
                             write_s=result.write_s, bytes=result.bytes, error=result.error,
                             uri=f"{self._engine.storage.uri}/{ckpt.step_dir(result.step)}")

    def close(self) -> None:
        """Wait for the save in flight, so a finished job's last checkpoint is committed."""
        self._prefetch = self._weights = None  # never restored: let the read-aheads go
        # Out of the loop, with the function returned: a last save may take a while yet, and no rank
        # waiting on this one in a collective is to be expected from here (the controller's early-return check).
        self._reporter.event("closing")
        self._reporter.flush()
        self._vote.close()
        self._engine.wait()
        if self._memory is not None:
            self._memory.wait()


class _RestoreProgress:
    """While a rank reads its share of a checkpoint: every `RESTORE_PROGRESS_S` seconds, an event with
    the bytes it read so far and the checkpoint's size, for `status` and `watch` (the supervisor keeps the
    latest per rank; they are not stored as events). A daemon thread; nothing when the read is quick."""

    def __init__(self, reporter: Reporter, share: Any):
        self._reporter, self._share = reporter, share
        self._done = threading.Event()
        shards = (getattr(share, "manifest", None) or {}).get("shards") or []
        self._total = sum(int(r.get("size") or 0) for r in shards)
        self._thread = threading.Thread(target=self._run, name="stalwart-restore-progress", daemon=True)

    def __enter__(self) -> "_RestoreProgress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()

    def _run(self) -> None:
        sent = -1
        while not self._done.wait(RESTORE_PROGRESS_S):
            n = int(getattr(self._share, "bytes_read", 0) or 0)
            if n != sent:
                self._reporter.event("restore_progress", step=self._share.step, bytes_read=n, bytes_total=self._total)
                sent = n


RESTORE_PROGRESS_S = 0.5
AUTO_EVERY_POLLS = 8  # rank 0 reconsiders the auto intervals once every this many polls (steps)


class _Prefetch:
    """Runs `find()` on a daemon thread; `result()` joins it and returns its value.

    A failed read-ahead (say, storage briefly unreachable) is not final: `result()` then runs
    `find()` again in the caller, so the restore behaves, and raises, as if nothing had been read ahead.
    `result()` raises WaitTimeout, naming `what`, when the read-ahead has not finished after
    STALWART_RESTORE_PREFETCH_TIMEOUT_S (default RESTORE_PREFETCH_TIMEOUT_S).
    """

    def __init__(self, find: Callable[[], Any], what: str = "the restore read-ahead"):
        self._find = find
        self._what = what
        self._value: Any = None
        self._failed = False
        self._thread = threading.Thread(target=self._run, name="stalwart-restore-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._find()
        except BaseException:  # noqa: BLE001 - retried in the caller, where an error is reported
            self._failed = True

    def result(self, timeout_s: float | None = None) -> Any:
        limit = float(os.environ.get(RESTORE_PREFETCH_TIMEOUT_ENV, RESTORE_PREFETCH_TIMEOUT_S)) \
            if timeout_s is None else timeout_s
        self._thread.join(limit)
        if self._thread.is_alive():
            raise WaitTimeout(self._what, limit, RESTORE_PREFETCH_TIMEOUT_ENV)
        return self._find() if self._failed else self._value


def _read_weights(path: str) -> tuple[str, dict]:
    from stalwart.checkpointing import formats

    return formats.check_weights(path), formats.read_weights(path)


_LR_SCHEDULE_POINTS = 4096


def _lr_samples(n: int) -> list[int]:
    """Evenly spaced indices into a schedule of n steps, the first and last included: not a million
    numbers for a long run (the controller interpolates linearly between them)."""
    return sorted(set(np.linspace(0, n - 1, min(n, _LR_SCHEDULE_POINTS)).round().astype(int).tolist()))


def _inject(fault: dict, rank: int, loss: Any, grad_norm: Any, reporter: Reporter, step: int) -> tuple[Any, Any]:
    """Carry out an injected fault at this report (a rehearsal the user asked for in `faults:`)."""
    import os
    import signal

    kind = fault["kind"]
    if kind in ("kill", "hang", "error"):
        reporter.log(f"[rank {rank}] stalwart: injecting fault {kind} at step {fault['step']}\n")
        reporter.flush()
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "hang":
        while True:  # stuck in Python, so the hang report can show where
            time.sleep(3600)
    if kind == "error":
        raise RuntimeError(f"injected error at step {fault['step']}")
    if kind == "slow":
        # A straggler: this rank burns `factor` x its last step's CPU time on top of the step.
        deadline = time.thread_time() + 0.05 * float(fault["factor"])
        x = 1.0
        while time.thread_time() < deadline:
            x = (x * 1.0000001) % 7.0
        return loss, grad_norm
    if kind == "nan":
        return float("nan"), grad_norm
    if kind == "spike":
        # Grad norm jumps harder than the loss, as in real spikes.
        scale = float(fault["factor"])
        return float(loss) * scale, (float(grad_norm) * scale * 10 if grad_norm is not None else None)
    if kind == "drift":
        # Slow divergence: the loss creeps up linearly to `factor` x over `length` steps, the grad norm
        # grows faster (the 4th power of the loss's factor), so no single step stands out.
        scale = 1.0 + (float(fault["factor"]) - 1.0) * (step - fault["step"] + 1) / fault["length"]
        return float(loss) * scale, (float(grad_norm) * scale ** 4 if grad_norm is not None else None)
    return loss, grad_norm


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


__all__ = ["TrainContext", "CheckpointCorrupt"]


class StandbyDeclined(Exception):
    """Raised in a spare on standby whose run cannot wait for an attempt as it is; the runner ends the
    standby run quietly (the spare is then not made a rank; a new worker is)."""


def _checked_extras(extra: dict[str, Any] | None) -> dict[str, Any]:
    """`prepare(extra=...)` checked: names a path can hold, objects that save and load their state."""
    extras = dict(extra or {})
    for name, obj in extras.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise StalwartError(f"extra: {name!r} is not a usable name: give each object a non-empty name "
                                "without '/'")
        missing = [m for m in ("state_dict", "load_state_dict") if not callable(getattr(obj, m, None))]
        if missing:
            raise StalwartError(f"extra {name!r} ({type(obj).__name__}) has no {' or '.join(missing)}(): pass "
                                "objects that save and load their state (a GradScaler, an AveragedModel, "
                                "a class of your own with both methods)")
    return extras
