"""Ranks that never leave the training loop when a peer dies (DDP, FSDP and DeepSpeed ZeRO 1/2 jobs with
in-memory snapshots, CPU).

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

FSDP and DeepSpeed ZeRO make many collectives of their own (all-gathers, reduce-scatters); their
group is a `ShardGroup`, a process group whose collectives never raise, given to FSDP as its device
mesh and to DeepSpeed as its data-parallel group (`DeepSpeedTopology`).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import inspect
import logging
import os
import sys
import threading
import types
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

log = logging.getLogger(__name__)

REJOIN_WAIT_ENV = "STALWART_REJOIN_WAIT_S"
DEFAULT_REJOIN_WAIT_S = 60.0


_DDP_PARAMETERS = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters


def rejoin_wait_s() -> float:
    return float(os.environ.get(REJOIN_WAIT_ENV, DEFAULT_REJOIN_WAIT_S))


def applies(spec) -> bool:
    """Whether a job's surviving ranks stay in their loop: checkpoint.memory_in_loop, DDP, FSDP or
    DeepSpeed ZeRO 1/2, in-memory snapshots, CPU, a function entrypoint."""
    return (spec.checkpoint.memory_every_steps is not None and spec.checkpoint.memory_in_loop
            and spec.strategy.name in ("ddp", "fsdp", "deepspeed")
            and spec.script is None and spec.resources.gpus_per_worker <= 0 and spec.resources.workers > 1)


def on_standby(spec) -> bool:
    """Whether warm spares run the function ahead of a fault, up to where it needs the world (`applies`):
    their restore for DDP (its wrap waits for the broadcast) and FSDP (its sharding waits for
    `Strategy.join`), `ctx.prepare` for DeepSpeed (`deepspeed.initialize` builds the engine over the
    world: a spare made a rank builds it then)."""
    return applies(spec)


def group_for(spec, groups: "Groups", rank: int, world_size: int) -> "TrainGroup | ShardGroup":
    """What the strategy's collectives go over in a job whose ranks stay in their loop."""
    if spec.strategy.name in ("fsdp", "deepspeed"):
        return ShardGroup(groups.train, rank, world_size)
    return TrainGroup(groups.train, world_size, groups.check)


class PeerLost(RuntimeError):
    """A collective failed because a peer is gone; the loop can rejoin the next attempt."""


class TrainGroup:
    """The group DDP's gradients are averaged over; `failed` holds the first error since it was formed.

    Bucket by bucket, as DDP does, overlapping the backward. That is right only while every rank's bucket
    holds the same parameters in the same order, and a rank that joins running peers lays its buckets
    out as a fresh DDP does (by the parameters' order; torch 2.13 puts them all in one bucket) for its
    first backward (two with static_graph), while its peers have the layout their DDP rebuilt from the
    order in which their gradients came in. So after the groups are formed (`__init__`, `replace`), each
    bucket's layout (the sequence of its parameters' places in the model) is checked first with a small
    synchronous all-reduce on a group of its own (`check`). From the first bucket that differs (every
    rank sees it at the same bucket) to the end of that backward, the gradients are summed together at
    the last bucket, in the model's parameter order (`register`), so that the same parameters' gradients
    are added.

    The checks stop once no rank's layout can change any more; then buckets are summed at once, as DDP
    sums them. Why that moment can be known: DDP lays its buckets out anew at most once in its life. Its
    Reducer rebuilds them before a forward only while `should_rebuild_buckets()` (`static_graph or not
    find_unused_parameters`, and not rebuilt yet), from the order recorded in the last backward that
    synchronized; it then sets `has_rebuilt_bucket_`, which only `_update_process_group` clears
    (stalwart never calls it), and DDP's Python side sets `_has_rebuilt_buckets`. Without static_graph
    the first backward records the order, so the layout is final from the second backward on; with it,
    the first backward reduces every bucket at its end and records nothing, so from the third; with
    find_unused_parameters alone, never rebuilt, from the first. Each check therefore carries a third
    value besides the layout: whether this rank's DDP may still lay its buckets out anew (`watch`: not
    rebuilt yet, and able to), reduced with MAX. When every bucket of a backward matched and that value
    is 0, every rank's buckets hold the same parameters and none will change: every rank stops checking
    at that last bucket, all of them, because each decides from the same reduced values (a rank that
    went on checking alone would wait in its check for good). The checks resume at the next `replace`,
    which is where a rank joins. Ranks whose final layouts differ (their gradients came in other orders)
    go on checking and summing at the last bucket: right, only slower. Without `watch` (no DDP to ask)
    a layout is taken to be able to change, and every bucket is checked."""

    def __init__(self, group, world_size: int, check=None):
        self.group, self.world_size, self.check = group, world_size, check
        self.failed: BaseException | None = None
        self._order: dict[int, int] = {}  # id(parameter) -> its place in the model's parameters
        self._pending: list = []  # (bucket buffer, its parameters, their gradients, future) of this backward
        self._layout = torch.zeros(3, dtype=torch.int64)  # hash, -hash, "may lay out anew" (all MAX-reduced)
        self._ddp: weakref.ref | None = None
        self.checking = True  # every bucket's layout is checked before its sum, until they settle
        self.checks = 0  # layout checks made
        self.unmatched = 0  # backward passes that found bucket layouts differing between ranks

    def register(self, model: torch.nn.Module) -> None:
        self._order = {id(p): i for i, p in enumerate(model.parameters())}

    def watch(self, ddp: torch.nn.parallel.DistributedDataParallel) -> None:
        """The DDP whose buckets come here (asked, at each check, whether it may lay them out anew)."""
        self._ddp = weakref.ref(ddp)

    def fail(self, exc: BaseException) -> None:
        if self.failed is None:
            self.failed = exc

    def replace(self, group, world_size: int, check=None) -> None:
        self.group, self.world_size, self.failed, self.check = group, world_size, None, check
        self._pending = []
        self.checking = True

    def start_from_rank0(self, tensors) -> None:
        """Every rank of an attempt that starts together takes rank 0's parameters and buffers, as DDP does."""
        self.broadcast(tensors)

    def broadcast(self, tensors, src: int = 0) -> None:
        """Rank `src`'s values of `tensors` on every rank (a failure marks the group, never raises). Small
        tensors travel packed, one broadcast per dtype: a model's buffers go before every forward, and one
        synchronous broadcast each made a step of 32 x (Linear, BatchNorm1d) 1.8 times as long as DDP's."""
        if self.failed is not None:
            return
        try:
            for pack in _packs(tensors):
                if len(pack) == 1:
                    dist.broadcast(pack[0], src=src, group=self.group)
                    continue
                flat = _flatten_dense_tensors(pack)
                dist.broadcast(flat, src=src, group=self.group)
                torch._foreach_copy_(pack, _unflatten_dense_tensors(flat, pack))
        except RuntimeError as exc:
            self.fail(exc)

    def add(self, bucket) -> torch.futures.Future:
        """One of DDP's buckets, already scaled by 1 / world size: summed now when every rank's is laid out
        alike (checked, or known since the layouts settled), else kept for the sum at the last bucket.
        Never raises."""
        if self.checking and (self._pending or not self._same_layout(bucket)):
            return self._keep(bucket)
        buffer = bucket.buffer()
        if self.failed is None:
            try:
                return dist.all_reduce(buffer, group=self.group, async_op=True).get_future().then(
                    functools.partial(self._summed, buffer))
            except RuntimeError as exc:
                self.fail(exc)
        future: torch.futures.Future = torch.futures.Future()
        future.set_result(buffer)
        return future

    def _summed(self, buffer: torch.Tensor, work: torch.futures.Future) -> torch.Tensor:
        """The bucket's sum once `work` is done; if it failed, the rank's own gradients, the group marked."""
        try:
            work.wait()
        except Exception as exc:  # noqa: BLE001 - a peer gone: gloo says so in many ways
            self.fail(exc)
        return buffer

    def _keep(self, bucket) -> torch.futures.Future:
        """Kept until the last bucket of this backward; there, every kept gradient summed in the model's
        parameter order (unless the group failed), and every kept bucket's future set."""
        future: torch.futures.Future = torch.futures.Future()
        self._pending.append((bucket.buffer(), bucket.parameters(), bucket.gradients(), future))
        if bucket.is_last():
            pending, self._pending = self._pending, []
            if self.failed is None:
                self.unmatched += 1
                self._sum([(self._order.get(id(p), 1 << 40), g) for _, ps, gs, _ in pending
                           for p, g in zip(ps, gs)])
            for buffer, _, _, fut in pending:
                fut.set_result(buffer)
        return future

    def _same_layout(self, bucket) -> bool:
        """Whether every rank's bucket holds the same parameters in the same order (collective, small);
        at the last bucket of a backward whose buckets all matched, the checks stop if no rank's DDP may
        lay its buckets out anew."""
        if self.check is None or self.failed is not None:
            return False
        params = bucket.parameters()
        h = len(params)
        for p in params:
            h = (h * 1_000_003 + self._order.get(id(p), -1) + 2) % (1 << 61)
        ddp = self._ddp() if self._ddp is not None else None
        layout = self._layout
        layout[0], layout[1], layout[2] = h, -h, int(_may_lay_out_anew(ddp))
        try:
            dist.all_reduce(layout, op=dist.ReduceOp.MAX, group=self.check)
        except RuntimeError as exc:
            self.fail(exc)
            return False
        self.checks += 1
        same = int(layout[0]) == -int(layout[1])
        if same and bucket.is_last() and int(layout[2]) == 0:
            self.checking = False
        return same

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


class _Settled(dist.Work):
    """The work of one of `ShardGroup`'s collectives: waiting never raises. A failure of the collective
    under it marks the group, and its outputs are left as they were (the step is redone anyway)."""

    def __init__(self, group: "ShardGroup", work, result):
        super().__init__()
        self._group, self._work, self._result = group, work, result

    def wait(self, timeout=None) -> bool:
        work, self._work = self._work, None
        if work is not None:
            try:
                work.wait()
            except Exception as exc:  # noqa: BLE001 - a peer gone: gloo says so in many ways
                self._group.fail(exc)
        return True

    def is_completed(self) -> bool:
        return self._work is None or self._work.is_completed()

    def get_future(self) -> torch.futures.Future:
        self.wait()
        future: torch.futures.Future = torch.futures.Future()
        future.set_result(self._result)
        return future


class ShardGroup(dist.ProcessGroup):
    """The group an FSDP job's model is sharded over, whose collectives never raise through the user's
    loop: what `TrainGroup` is to DDP's gradients, for every collective FSDP makes (the all-gathers
    of its forward and backward, the reduce-scatters of its gradients).

    It is a process group of its own that hands each collective to the attempt's gloo group
    (`inner`), and it stays the same object across attempts: FSDP keeps the group it was given (in
    its device mesh, in every parameter's sharding), so a rank that stays in its loop keeps its FSDP
    model and `replace` puts the next attempt's gloo group under it. Once a collective fails (a peer
    is gone), that one and every later one until `replace` return at once with their outputs as they
    were: the step goes on with wrong values and no error, the optimizer step is skipped
    (`skip_failed_steps`), and the context rejoins at the next batch and restores every rank from
    the in-memory snapshots. DTensor's functional all-reduce (`clip_grad_norm_` over FSDP's gradients)
    comes to `allreduce` here too; its all-gather (`full_tensor()` in the user's code) reaches the gloo
    backend through torch's dispatcher and raises as it would without stalwart: that rank then ends
    its call, and the restart takes the usual path."""

    NAME = "stalwart_fsdp"

    def __init__(self, group, rank: int, world_size: int):
        super().__init__(rank, world_size)
        self.failed: BaseException | None = None
        self._name = self.NAME
        self.inner = None
        self.replace(group, world_size)

    # What c10d and the device mesh ask of a group.
    def getBackendName(self) -> str:
        return "gloo"

    def setGroupName(self, name: str) -> None:
        self._name = name

    def getGroupName(self) -> str:
        return self._name

    def setGroupDesc(self, desc: str) -> None:
        self._desc = desc

    def getGroupDesc(self) -> str:
        return getattr(self, "_desc", "stalwart fsdp")

    def fail(self, exc: BaseException) -> None:
        if self.failed is None:
            self.failed = exc

    def replace(self, group, world_size: int, check=None) -> None:
        """The next attempt's gloo group (same ranks, same world size) under this one. `check`: what
        `TrainGroup.replace` takes too; FSDP has no bucket layouts to check."""
        if self.inner is not None and world_size != self.size():
            raise ValueError(f"an FSDP group of {self.size()} ranks cannot take {world_size}")
        self.inner, self.failed = group, None
        if group is not None:  # None: a spare on standby, sharding its model before it has an attempt's groups
            cpu = torch.device("cpu")
            self._register_backend(cpu, dist.ProcessGroup.BackendType.GLOO, group._get_backend(cpu))
            self._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
        self._enlist()

    def _enlist(self) -> None:
        """Known to c10d as its own groups are (the device mesh asks for its ranks, DTensor's functional
        collectives find it by name). Done again after each `replace`: leaving an attempt's groups
        (`leave_groups`) forgets every group c10d knew."""
        from torch._C._distributed_c10d import _register_process_group, _unregister_process_group
        from torch.distributed.distributed_c10d import _world

        ranks = {r: r for r in range(self.size())}
        _world.pg_group_ranks[self] = ranks
        _world.pg_map[self] = ("gloo", None)
        _world.pg_names[self] = self._name
        _world.pg_backend_config[self] = "cpu:gloo"
        try:
            _unregister_process_group(self._name)  # this group before the groups were left, or an earlier job's
        except (RuntimeError, ValueError):
            pass
        _register_process_group(self._name, self)

    def start_from_rank0(self, tensors) -> None:
        """Nothing: FSDP ranks start from their own shards, as FSDP does (DDP's start broadcasts)."""

    @contextlib.contextmanager
    def detached(self):
        """Every collective in the block returns at once, its outputs as they were: for a rank that
        joins running peers and builds what they built long ago (`deepspeed.initialize` broadcasts rank
        0's parameters over this group; the peers are in their loop, and the restore sets them)."""
        saved, self.failed = self.failed, _DETACHED
        try:
            yield self
        finally:
            self.failed = saved

    def _settle(self, start, result) -> _Settled:
        if self.failed is not None:
            return _Settled(self, None, result)
        try:
            return _Settled(self, start(), result)
        except RuntimeError as exc:
            self.fail(exc)
            return _Settled(self, None, result)

    # The collectives FSDP makes (and a few more a user's code may), each handed to the gloo group.
    def allreduce(self, tensors, opts=None):
        return self._settle(lambda: self.inner.allreduce(tensors, opts or dist.AllreduceOptions()), tensors)

    def broadcast(self, tensors, opts=None):
        return self._settle(lambda: self.inner.broadcast(tensors, opts or dist.BroadcastOptions()), tensors)

    def reduce(self, tensors, opts=None):  # ZeRO-2's gradients without use_multi_rank_bucket_allreduce
        return self._settle(lambda: self.inner.reduce(tensors, opts or dist.ReduceOptions()), tensors)

    def allgather(self, outputs, inputs, opts=None):
        return self._settle(lambda: self.inner.allgather(outputs, inputs), outputs)

    def _allgather_base(self, output, input, opts=None):
        return self._settle(lambda: self.inner._allgather_base(output, input), output)

    def all_gather_single(self, output, input, opts=None):
        return self._settle(lambda: self.inner._allgather_base(output, input), output)

    def reduce_scatter(self, outputs, inputs, opts=None):
        return self._settle(lambda: self.inner.reduce_scatter(outputs, inputs, opts or dist.ReduceScatterOptions()),
                            outputs)

    def _reduce_scatter_base(self, output, input, opts=None):
        return self._settle(lambda: self.inner._reduce_scatter_base(output, input, opts or dist.ReduceScatterOptions()),
                            output)

    def reduce_scatter_single(self, output, input, opts=None):
        return self._settle(lambda: self.inner.reduce_scatter_single(output, input, opts or dist.ReduceScatterOptions()),
                            output)

    def barrier(self, opts=None):
        return self._settle(lambda: self.inner.barrier(opts or dist.BarrierOptions()), None)


_DETACHED = PeerLost("a rank joining running peers: its collectives are not matched")


class DeepSpeedTopology:
    """The model-parallel unit ("mpu") DeepSpeed is given in a job whose ZeRO ranks stay in their
    loop: its data-parallel group is `train` (a `ShardGroup`: the gradients' reduce-scatters and the
    parameters' all-gathers never raise through the loop), with no model parallelism (a one-rank group
    of this process). The same objects for the engine's life: a rank that rejoins keeps its engine, and
    `enlist` (after each rejoin) puts them back where DeepSpeed and c10d look them up."""

    def __init__(self, train: "ShardGroup", rank: int):
        self.train, self.rank = train, rank
        self.model_parallel = local_group()
        self.enlist()

    def enlist(self) -> None:
        """Known to c10d (DeepSpeed asks a group's global ranks), and to DeepSpeed's module-wide
        groups (which leaving an attempt's groups forgot: `leave_groups`)."""
        from torch.distributed.distributed_c10d import _world

        group = self.model_parallel
        _world.pg_group_ranks[group] = {self.rank: 0}
        _world.pg_map[group] = ("gloo", None)
        _world.pg_names[group] = f"stalwart_model_parallel_{self.rank}"
        _world.pg_backend_config[group] = "cpu:gloo"
        groups = sys.modules.get("deepspeed.utils.groups")
        if groups is not None:
            groups.mpu = self

    def get_data_parallel_group(self):
        return self.train

    def get_data_parallel_world_size(self) -> int:
        return self.train.size()

    def get_data_parallel_rank(self) -> int:
        return self.train.rank()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(range(self.train.size()))

    def get_model_parallel_group(self):
        return self.model_parallel

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0


PACK_BYTES = 16 << 20  # tensors below this are broadcast packed together (`TrainGroup.broadcast`)


def _packs(tensors, cap: int = PACK_BYTES):
    """`tensors` (their `.data`) in packs of one dtype of at most `cap` bytes, a larger one alone: the
    same packs, in the same order, on every rank whose tensors are alike."""
    open_packs: dict = {}
    for t in tensors:
        t = t.data
        size = t.numel() * t.element_size()
        if size >= cap:
            yield [t]
            continue
        key = (t.dtype, t.device)
        pack, used = open_packs.get(key, ([], 0))
        if used + size > cap:
            yield pack
            pack, used = [], 0
        pack.append(t)
        open_packs[key] = (pack, used + size)
    for pack, _ in open_packs.values():
        if pack:
            yield pack


def _may_lay_out_anew(ddp) -> bool:
    """Whether `ddp` may still lay its buckets out anew: it has not (`_has_rebuilt_buckets`) and can
    (as its Reducer's `should_rebuild_buckets`: `static_graph or not find_unused_parameters`). Unknown
    (no DDP, a torch without that attribute): it may."""
    if ddp is None or not hasattr(ddp, "_has_rebuilt_buckets"):
        return True
    return not ddp._has_rebuilt_buckets and bool(ddp.static_graph or not ddp.find_unused_parameters)


def average_gradients(state: TrainGroup, bucket) -> torch.futures.Future:
    """DDP communication hook: the mean over `state.group`, as DDP's own reducer computes it (each
    gradient times 1 / world size, then the sum: a division by 3 would round otherwise than DDP's
    product); the rank's own gradients if the group has failed."""
    bucket.buffer().mul_(1.0 / state.world_size)
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
    train.watch(ddp)
    buffers = [b for b in model.buffers()]
    if broadcast_buffers and buffers:
        ddp.register_forward_pre_hook(lambda module, args: train.broadcast(buffers))
    return ddp


def skip_failed_steps(optimizer, train: "TrainGroup | ShardGroup") -> None:
    """Make `optimizer.step()` do nothing on a step whose collectives failed: the restore
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
    """Drop this process's groups (a peer is gone: what they would wait for never comes, or the call
    ended), and what libraries keep of them for the next call in this process."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except (RuntimeError, ValueError):
            pass
    _forget_deepspeed_groups()


# What DeepSpeed (0.19) caches of an engine's process groups, module-wide: its clone of the world group
# among them, which a later deepspeed.initialize in the same process would take up destroyed.
_DEEPSPEED_GROUPS = ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP",
                     "_MODEL_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP", "mesh_device", "mpu")
_DEEPSPEED_GROUP_MAPS = ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                         "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP")


def _forget_deepspeed_groups() -> None:
    """DeepSpeed's own release of its group references, as `deepspeed.comm.destroy_process_group` does
    it (stalwart destroys the groups through torch). Without it, a rank kept in its process for the
    next attempt failed in deepspeed.initialize: "Group ... is not registered"."""
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    release = getattr(groups, "_release_process_group_references", None)
    if release is not None:
        try:
            release(group=None)
            return
        except Exception as exc:  # noqa: BLE001 - called on the way out of a call: never hide its own error
            log.warning("DeepSpeed's group references not released (%s); resetting them by name", exc)
    for name in _DEEPSPEED_GROUPS:
        if hasattr(groups, name):
            setattr(groups, name, None)
    for name in _DEEPSPEED_GROUP_MAPS:
        cached = getattr(groups, name, None)
        if isinstance(cached, dict):
            cached.clear()
