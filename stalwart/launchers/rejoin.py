"""Ranks that never leave the training loop when a peer dies (DDP jobs with in-memory snapshots, CPU).

Without this, a rank that outlives a dead peer ends its call (its collective breaks), and the next
attempt runs the user's function again in the same process: process group, model build, DDP,
restore. Here the survivors stay inside `ctx.batches()`:

1. Gradients are averaged by a DDP communication hook over a group of stalwart's own (`TrainGroup`);
   DDP itself is given a one-rank group, so its own collectives (the parameter check at
   construction, the bucket order after the first steps) never span ranks. A failed all-reduce
   does not raise through the user's backward: the hook returns the rank's own gradients and marks
   the group failed. The optimizer step that follows is undone by the restore below.
2. At the next batch, the context sees the mark, says so, and waits for the next attempt's
   rendezvous (`Mailbox`, filled by the gang through `RankWorker.rejoin`). It then forms the process
   groups again with the replacement rank, in the order a starting rank forms them (`form_groups`),
   and restores every rank from the in-memory snapshots (the replacement's from its peer's replica)
   with the restore the replacement runs too. The loop goes on from the restored step.

A rank that cannot wait (no rendezvous within `STALWART_REJOIN_WAIT_S`, a collective of the user's
own that raised) ends its call as before, and the restart takes the usual path.
"""

from __future__ import annotations

import datetime
import inspect
import os
import threading
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

REJOIN_WAIT_ENV = "STALWART_REJOIN_WAIT_S"
DEFAULT_REJOIN_WAIT_S = 60.0


_DDP_PARAMETERS = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters


def rejoin_wait_s() -> float:
    return float(os.environ.get(REJOIN_WAIT_ENV, DEFAULT_REJOIN_WAIT_S))


def applies(spec) -> bool:
    """Whether a job's surviving ranks stay in their loop: checkpoint.memory_in_loop, DDP, in-memory
    snapshots, CPU, a function entrypoint."""
    return (spec.checkpoint.memory_every_steps is not None and spec.checkpoint.memory_in_loop
            and spec.strategy.name == "ddp"
            and spec.script is None and spec.resources.gpus_per_worker <= 0 and spec.resources.workers > 1)


class PeerLost(RuntimeError):
    """A collective failed because a peer is gone; the loop can rejoin the next attempt."""


class TrainGroup:
    """The group DDP's gradients are averaged over; `failed` holds the first error since it was formed.

    Bucket by bucket, as DDP does, overlapping the backward, while every rank's bucket holds the same
    parameters in the same order: each bucket's layout (the sequence of its parameters' places in the
    model) is checked first with a small all-reduce on a group of its own (`check`). DDP lays its buckets
    out anew after a rank's first steps, so a rank that joined running peers has another layout than
    theirs for a step; from the first bucket that differs (every rank sees it at the same bucket) to the
    end of that backward, the gradients are summed together at the last bucket, in the model's parameter
    order (`register`), so that the same parameters' gradients are added."""

    def __init__(self, group, world_size: int, check=None):
        self.group, self.world_size, self.check = group, world_size, check
        self.failed: BaseException | None = None
        self._order: dict[int, int] = {}  # id(parameter) -> its place in the model's parameters
        self._pending: list = []  # (bucket buffer, its parameters, their gradients, future) of this backward
        self._layout = torch.zeros(2, dtype=torch.int64)
        self.unmatched = 0  # backward passes that found bucket layouts differing between ranks

    def register(self, model: torch.nn.Module) -> None:
        self._order = {id(p): i for i, p in enumerate(model.parameters())}

    def fail(self, exc: BaseException) -> None:
        if self.failed is None:
            self.failed = exc

    def replace(self, group, world_size: int, check=None) -> None:
        self.group, self.world_size, self.failed, self.check = group, world_size, None, check
        self._pending = []

    def broadcast(self, tensors, src: int = 0) -> None:
        """Rank `src`'s values of `tensors` on every rank (a failure marks the group, never raises)."""
        if self.failed is not None:
            return
        try:
            for t in tensors:
                dist.broadcast(t.data, src=src, group=self.group)
        except RuntimeError as exc:
            self.fail(exc)

    def add(self, bucket) -> torch.futures.Future:
        """One of DDP's buckets, already divided by the world size: summed now when every rank's is laid
        out alike, else kept for the sum at the last bucket. Never raises."""
        buffer, params, grads = bucket.buffer(), bucket.parameters(), bucket.gradients()
        future: torch.futures.Future = torch.futures.Future()
        if self.failed is None and not self._pending and self._same_layout(params):
            try:
                work = dist.all_reduce(buffer, group=self.group, async_op=True)
            except RuntimeError as exc:
                self.fail(exc)
                future.set_result(buffer)
                return future

            def done(fut) -> None:
                try:
                    fut.wait()
                except Exception as exc:  # noqa: BLE001 - a peer gone: gloo says so in many ways
                    self.fail(exc)
                future.set_result(buffer)

            work.get_future().add_done_callback(done)
            return future
        self._pending.append((buffer, params, grads, future))
        if bucket.is_last():
            pending, self._pending = self._pending, []
            if self.failed is None:
                self.unmatched += 1
                self._sum([(self._order.get(id(p), 1 << 40), g) for _, ps, gs, _ in pending
                           for p, g in zip(ps, gs)])
            for buffer_, _, _, fut in pending:
                fut.set_result(buffer_)
        return future

    def _same_layout(self, params) -> bool:
        """Whether every rank's bucket holds these parameters in this order (collective, small)."""
        if self.check is None:
            return False
        h = len(params)
        for p in params:
            h = (h * 1_000_003 + self._order.get(id(p), -1) + 2) % (1 << 61)
        self._layout[0], self._layout[1] = h, -h
        try:
            dist.all_reduce(self._layout, op=dist.ReduceOp.MAX, group=self.check)
        except RuntimeError as exc:
            self.fail(exc)
            return False
        return int(self._layout[0]) == -int(self._layout[1])

    def _sum(self, items: list) -> None:
        """Sum the gradients over the group in parameter order, packed by dtype (one all-reduce each).
        Only for a backward whose bucket layouts differ between ranks: the first after a rank joins."""
        items.sort(key=lambda item: item[0])
        by_dtype: dict = {}
        for _, grad in items:
            by_dtype.setdefault(grad.dtype, []).append(grad)
        try:
            for grads in by_dtype.values():
                flat = torch.cat([g.reshape(-1) for g in grads])
                dist.all_reduce(flat, group=self.group)
                offset = 0
                for g in grads:
                    g.copy_(flat[offset:offset + g.numel()].view_as(g))
                    offset += g.numel()
        except RuntimeError as exc:  # a peer gone: the rank keeps its own gradients for this step
            self.fail(exc)


def average_gradients(state: TrainGroup, bucket) -> torch.futures.Future:
    """DDP communication hook: the mean over `state.group`, as DDP's own all-reduce computes it
    (divide, then sum); the rank's own gradients if the group has failed."""
    bucket.buffer().div_(state.world_size)
    return state.add(bucket)


# DDP checks the hook's return annotation (a string under postponed annotations).
average_gradients.__annotations__["return"] = torch.futures.Future[torch.Tensor]


def local_group() -> dist.ProcessGroup:
    """A one-rank gloo group of this process alone (no rendezvous, no peer): what DDP is given."""
    store = dist.HashStore()
    group = dist.ProcessGroup(store, 0, 1)
    backend = dist.ProcessGroupGloo(store, 0, 1)
    group._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, backend)
    group._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
    return group


def wrap_ddp(model: torch.nn.Module, train: TrainGroup, options: dict, sync: bool) -> torch.nn.Module:
    """DDP over a one-rank group, its gradients averaged over `train` by the hook. `sync`: start every
    rank from rank 0's parameters and buffers, as DDP does (not for a rank joining running peers: the
    restore sets them). Buffers follow rank 0's before each forward, as DDP's broadcast_buffers does."""
    options = dict(options)
    broadcast_buffers = options.pop("broadcast_buffers", True) and options.get("forward_sync_buffers", True)
    train.register(model)
    if sync:
        train.broadcast([*model.parameters(), *model.buffers()])
    # Over a one-rank group DDP's own buffer sync would be a no-op; newer torch names its switch differently.
    quiet = ({"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_PARAMETERS
             else {"broadcast_buffers": False})
    options.pop("forward_sync_buffers", None)
    ddp = torch.nn.parallel.DistributedDataParallel(model, process_group=local_group(), **quiet, **options)
    ddp.register_comm_hook(train, average_gradients)
    buffers = [b for b in model.buffers()]
    if broadcast_buffers and buffers:
        ddp.register_forward_pre_hook(lambda module, args: train.broadcast(buffers))
    return ddp


def skip_failed_steps(optimizer, train: TrainGroup) -> None:
    """Make `optimizer.step()` do nothing on a step whose gradients could not be averaged: the restore
    that follows sets every parameter anyway, and the rank gets to its rejoin sooner (an AdamW step over
    a large model is a good part of a CPU step). One attribute read per step otherwise. Kept a bound
    method, as torch's LR schedulers expect of `optimizer.step` (they wrap it through `__func__`)."""
    step = optimizer.step

    def guarded(self, *args, **kwargs):
        if train.failed is not None:
            return None
        return step(*args, **kwargs)

    if hasattr(step, "_wrapped_by_lr_sched"):
        guarded._wrapped_by_lr_sched = True  # type: ignore[attr-defined]  # a scheduler's wrapper is inside
    optimizer.step = types.MethodType(guarded, optimizer)


@dataclass
class Rendezvous:
    """What a waiting rank needs to join the next attempt (sent by the gang)."""

    attempt: int
    master_addr: str
    master_port: int
    plan: Any
    sink: Any


class Mailbox:
    """Where a rank waiting in its loop receives the next attempt's rendezvous (one per worker process)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._rendezvous: Rendezvous | None = None
        self.waiting = False

    def put(self, rendezvous: Rendezvous) -> None:
        with self._cond:
            self._rendezvous = rendezvous
            self._cond.notify_all()

    def wait(self, timeout_s: float) -> Rendezvous | None:
        with self._cond:
            self.waiting = True
            try:
                self._cond.wait_for(lambda: self._rendezvous is not None, timeout=timeout_s)
                rendezvous, self._rendezvous = self._rendezvous, None
                return rendezvous
            finally:
                self.waiting = False


@dataclass
class Groups:
    """The process groups of one attempt, formed in one order by every rank."""

    checkpoint: Any = None
    vote: Any = None
    memory: Any = None
    train: Any = None
    check: Any = None  # the bucket layout checks of `train` (a queue of their own: not behind a bucket's sum)


def form_groups(backend: str, rank: int, world_size: int, timeout: datetime.timedelta, memory: bool,
                train: bool) -> Groups:
    """Initialize torch.distributed from MASTER_ADDR/MASTER_PORT and make the attempt's groups: the
    checkpoint records' and the preemption vote's (each apart from the training collectives), the
    in-memory snapshots' (`memory`) and the gradients' (`train`). Every rank of an attempt calls it,
    a starting rank and a rank rejoining from its loop alike: groups are matched by creation order."""
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    groups = Groups()
    if world_size > 1:
        groups.checkpoint = dist.new_group(backend="gloo", timeout=timeout)
        groups.vote = dist.new_group(backend="gloo", timeout=timeout)
        if memory:
            groups.memory = dist.new_group(backend="gloo", timeout=timeout)
        if train:
            groups.train = dist.new_group(backend="gloo", timeout=timeout)
            groups.check = dist.new_group(backend="gloo", timeout=timeout)
    return groups


def leave_groups() -> None:
    """Drop this process's groups (a peer is gone: what they would wait for never comes)."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except (RuntimeError, ValueError):
            pass
