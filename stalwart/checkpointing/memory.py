"""The in-memory snapshot tier: each rank's state in its own host memory, and a copy on a peer.

Every `memory_every_steps` steps each rank copies the state a durable checkpoint takes (the
strategy's state, the LR scheduler, its RNG states, the data position) into host buffers it
reuses (`shards.Snapshot`: allocated once, while the state's layout stays the same), and sends that
copy to the next rank of a ring over a gloo group of its own, from a background thread. The copy is
the only part that blocks the step. The ring (`replica_ring`) goes round the nodes in turn, so that
each rank's copy lies on another node than the rank wherever the job spans more than one: a lost node
then takes ranks, not the copies of their state (ranks 0..3 on two nodes of two: 0 -> 2 -> 1 -> 3 -> 0).

Why gloo send/recv and not the Ray object store: an object lives as long as its owner, and the owner
of a `ray.put` is the process that put it, so the replica of a rank that was SIGKILLed would die with
it; keeping it would mean a second copy out of the store on the peer. A point-to-point send lands in
the peer's reused buffer once (docs/BENCHMARKS.md has the figures).

The tier outlives an attempt: it is kept per job in the process (`tier_for`), so that a rank whose
process survives a peer's death finds its snapshot, and the replica it holds, in the next attempt.
A restore from memory (`choose`, `MemoryTier.state_for`) needs every rank's state at one step, each
from the rank itself or from the peer holding its replica.

Lifecycle: `bind(rank, world_size, group)` at the start of each attempt (after the group exists);
`snapshot(step, state, local, meta)` from the training loop (every rank, same steps); `wait()` fences
the replication in flight; `keep_only(step)` after a restore from memory (newer snapshots belong to the
trajectory the fault cut off); `drop()` forgets everything (after a restore from storage).

Two generations of each: a rank keeps its last two snapshots and the last two replicas it received,
and overwrites the older one. One would not do: a rank that dies between two snapshots leaves its
peer to take the next one alone, and that peer must still hold its own state of the step whose replica
it holds. (A replica being received is marked unusable before its first byte arrives.) Host memory per
rank: 2x its state and 2x its predecessor's.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from stalwart.checkpointing import shards
from stalwart.errors import StalwartError, WaitTimeout

log = logging.getLogger(__name__)

# How long `MemoryTier.wait` (and so the next snapshot) waits for the replication in flight. It ends
# by itself when a peer dies (the connection breaks); this bounds a peer that is alive but stuck.
REPLICATION_WAIT_TIMEOUT_S = 300.0
REPLICATION_WAIT_TIMEOUT_ENV = "STALWART_MEMORY_REPLICATION_TIMEOUT_S"


# How long a new attempt waits for the previous attempt's replication thread (its group is gone, so
# it has ended or is about to); past it, the thread is left behind: what it receives is never used (its
# attempt's epoch is over) and its receive buffer is not reused. Measured: a thread sending to a peer
# that was SIGKILLed mid-transfer may not return for many seconds.
BIND_JOIN_S = 1.0


def replication_wait_timeout_s() -> float:
    return float(os.environ.get(REPLICATION_WAIT_TIMEOUT_ENV, REPLICATION_WAIT_TIMEOUT_S))


GENERATIONS = 2


@dataclass
class Held:
    """One rank's snapshot: where its tensors lie in `buffer`, and its small objects.

    `objects`: {"skeleton", "pieces", "local", "meta"}; `layout`: [(path, dtype, shape, offset, nbytes)]."""

    rank: int
    step: int
    world_size: int
    layout: list = field(default_factory=list)
    objects: dict = field(default_factory=dict)
    buffer: torch.Tensor | None = None
    received: bool = False  # received for a restore into a buffer of its own, not a reused one

    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel()

    def state(self) -> tuple[Any, Any, dict]:
        """(state tree, local objects, meta). The tensors are copied out of a reused buffer (the next
        snapshot overwrites it, and what a restore loads may keep the tensors it is given, as an
        optimizer's state does); a buffer received for the restore is handed over without a copy."""
        tensors = {}
        for path, dtype, shape, offset, nbytes in self.layout:
            raw = self.buffer[offset:offset + nbytes]
            view = raw.view(dtype).view(shape) if nbytes else torch.empty(shape, dtype=dtype)
            tensors[path] = view if self.received else view.clone()
        pieces = self.objects.get("pieces") or {}
        for path, place in pieces.items():
            tensors[path] = shards.Piece(tensors[path], tuple(place["shape"]), tuple(place["offset"]))
        return shards.unflatten(self.objects["skeleton"], tensors), self.objects.get("local"), self.objects.get("meta") or {}


class MemoryTier:
    """One rank's in-memory snapshots: its own, and the replica of rank (r - 1) % world.

    `snapshot` blocks for the copy into host memory and for a replication still in flight (the
    buffers it sends from are the ones the copy writes); replication runs on a daemon thread."""

    def __init__(self, job_id: str, every_steps: int):
        if every_steps < 0:  # 0: none due (every_steps: auto, until the ranks agree on an interval)
            raise ValueError(f"checkpoint.memory_every_steps must be at least 1, got {every_steps}")
        self.job_id = job_id
        self.every_steps = every_steps
        self.rank = 0
        self.world_size = 1
        self.ring: tuple[int, ...] = (0,)
        self.group = None
        self.layout_kind = "replicated"
        self._snapshots = [shards.Snapshot() for _ in range(GENERATIONS)]
        self._own: list[Held | None] = [None] * GENERATIONS
        self._replicas: list[Held | None] = [None] * GENERATIONS  # None also while one is being received
        self._recv_buffers: list[torch.Tensor | None] = [None] * GENERATIONS
        self._thread: threading.Thread | None = None
        self._in_flight: int | None = None
        self._epoch = 0  # one per bind(): a replication thread of an earlier attempt stores nothing
        self.last_error: str | None = None
        # An injected fault (spec `faults`, at: snapshot): called by the next replication between the
        # description and the bytes, i.e. with the copy on its way.
        self.fault_in_copy = None
        self.last_stall_s = 0.0
        self.last_replication_s = 0.0

    # ---- lifecycle ----------------------------------------------------------------------
    def bind(self, rank: int, world_size: int, group, layout: str | None = None, ring: tuple[int, ...] = ()) -> None:
        """Start an attempt: its rank, world size, the gloo group the replicas travel on and the ring's
        order (`replica_ring`; by rank when empty). The layout stays as it was unless given: a rank that
        stays in its loop keeps its model, which its `prepare` described (`Context.prepare`)."""
        if not self._join_quietly(BIND_JOIN_S):  # the last attempt's thread ended with its group, or soon will
            self._recv_buffers = [None] * GENERATIONS  # the stuck thread may still write into its buffer
        self._epoch += 1
        self.rank, self.world_size, self.group = rank, world_size, group
        self.layout_kind = layout or self.layout_kind
        self.ring = tuple(ring) if sorted(ring) == list(range(world_size)) else tuple(range(world_size))

    def drop(self) -> None:
        """Forget every snapshot (they belong to a trajectory that a restore from storage left)."""
        self.keep_only(None)

    def keep_only(self, step: int | None) -> None:
        """Forget every snapshot but those of `step` (all of them for None)."""
        self._join_quietly()
        for gens in (self._own, self._replicas):
            for i, held in enumerate(gens):
                if held is not None and held.step != step:
                    gens[i] = None

    @property
    def own(self) -> Held | None:
        """The newest own snapshot."""
        return _newest(self._own)

    @property
    def replica(self) -> Held | None:
        """The newest complete replica."""
        return _newest(self._replicas)

    @property
    def peer(self) -> int:
        """The rank whose replica this rank holds (the one before it in the ring)."""
        return self.ring[(self.ring.index(self.rank) - 1) % len(self.ring)]

    @property
    def holder(self) -> int:
        """The rank that holds this rank's replica (the one after it in the ring)."""
        return self.ring[(self.ring.index(self.rank) + 1) % len(self.ring)]

    @property
    def nbytes(self) -> int:
        """Host memory held: the own snapshot's buffer and the replica's."""
        return (sum(s.nbytes for s in self._snapshots)
                + sum(b.numel() for b in self._recv_buffers if b is not None))

    def due(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    # ---- taking a snapshot --------------------------------------------------------------
    def snapshot(self, step: int, state: Any, local: Any = None, meta: dict | None = None) -> None:
        """Copy `state` (this rank's tree, `shards.Piece` leaves for sharded layouts) and its own
        `local` objects into host memory, then replicate it to the next rank in the background.
        Every rank must call it at the same steps. The caller may change the state once it returns."""
        self.wait()
        t0 = time.perf_counter()
        pieces: dict[str, dict] | None = {} if self.layout_kind == "sharded" else None
        tensors, skeleton = shards.flatten(state, pieces=pieces)
        slot = _older(self._own)
        self._own[slot] = None  # its buffer is being overwritten
        snap = self._snapshots[slot]
        snap.capture(tensors)
        snap.ready()  # GPU copies land before the held snapshot is usable
        objects = _copy_small({"skeleton": skeleton, "pieces": pieces or {}, "local": local, "meta": dict(meta or {})})
        held = self._own[slot] = Held(self.rank, step, self.world_size, list(snap._layout), objects, snap._buffer)
        self.last_stall_s = time.perf_counter() - t0
        if self.world_size > 1 and self.group is not None:
            self._in_flight = step
            self._thread = threading.Thread(target=self._replicate, args=(held,),
                                            name=f"stalwart-memory-{step}", daemon=True)
            self._thread.start()

    def wait(self, timeout_s: float | None = None) -> None:
        """Block until the replication in flight is done (or failed). Raises WaitTimeout after
        `timeout_s` (default STALWART_MEMORY_REPLICATION_TIMEOUT_S)."""
        if self._thread is None:
            return
        limit = replication_wait_timeout_s() if timeout_s is None else timeout_s
        self._thread.join(limit)
        if self._thread.is_alive():
            raise WaitTimeout(f"the replication of the in-memory snapshot of step {self._in_flight} to rank "
                              f"{self.holder}", limit, REPLICATION_WAIT_TIMEOUT_ENV)
        self._thread = None

    def _join_quietly(self, timeout_s: float | None = None) -> bool:
        """Wait for the replication in flight; False when it is still running after `timeout_s`."""
        try:
            self.wait(timeout_s)
            return True
        except WaitTimeout:  # a stuck thread of a broken group: its replica is marked unusable already
            self._thread = None
            return False

    def _replicate(self, own: Held) -> None:
        # This thread must never raise into nowhere: a failed replication leaves the replica unusable
        # (a restore then takes the storage path) and the next snapshot tries again.
        t0, epoch = time.perf_counter(), self._epoch
        slot = _older(self._replicas)
        self._replicas[slot] = None  # being overwritten from here on; the other generation stays usable
        try:
            fault, self.fault_in_copy = self.fault_in_copy, None
            replica = _ring_exchange(own, self.holder, self.peer, self.group, lambda n: self._recv(slot, n), fault)
            if epoch == self._epoch:  # else a later attempt owns the slots now
                self._replicas[slot], self.last_error = replica, None
        except (RuntimeError, ValueError, pickle.UnpicklingError) as exc:  # a peer died, the group broke
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("in-memory snapshot of step %s not replicated: %s", own.step, exc)
        self.last_replication_s = time.perf_counter() - t0

    def _recv(self, slot: int, nbytes: int) -> torch.Tensor:
        """The reused buffer a replica is received into, reallocated when the peer's state changes size."""
        buf = self._recv_buffers[slot]
        if buf is None or buf.numel() != nbytes:
            buf = self._recv_buffers[slot] = torch.empty(nbytes, dtype=torch.uint8)
        return buf

    # ---- what it holds, and restoring from it -------------------------------------------
    def holdings(self) -> list[tuple[int, int, int]]:
        """What this rank can give a restore: (rank, step, world_size) of every snapshot it holds."""
        return sorted((h.rank, h.step, h.world_size) for h in (*self._own, *self._replicas) if h is not None)

    def held(self, rank: int, step: int) -> Held | None:
        for held in (*self._own, *self._replicas):
            if held is not None and held.rank == rank and held.step == step:
                return held
        return None


def _older(gens: list[Held | None]) -> int:
    """The slot to overwrite: an empty one, else the one holding the older step."""
    for i, held in enumerate(gens):
        if held is None:
            return i
    return min(range(len(gens)), key=lambda i: gens[i].step)


def _newest(gens: list[Held | None]) -> Held | None:
    held = [h for h in gens if h is not None]
    return max(held, key=lambda h: h.step) if held else None


@dataclass(frozen=True)
class MemoryChoice:
    """A restore from memory: the step, and for each rank the rank that holds its state."""

    step: int
    sources: dict[int, int]

    @property
    def moved(self) -> dict[int, int]:
        """The ranks whose state another rank holds: {rank: holder}."""
        return {r: h for r, h in self.sources.items() if r != h}


def choose(holdings: list[list[tuple[int, int, int]]], world_size: int, *, newest_durable: int | None = None,
           max_step: int | None = None) -> MemoryChoice | None:
    """The newest step at which every rank's state is held by some rank of this world, each rank's
    own copy first; None when there is none, or when it is older than the newest durable checkpoint
    (storage then has newer state) or newer than `max_step` (a rollback). `holdings[r]` is rank r's
    `MemoryTier.holdings()`. Pure: every rank computes the same answer from the same gathered input."""
    if len(holdings) != world_size:
        return None
    held = [{(r, s) for r, s, w in h if w == world_size} for h in holdings]
    steps = sorted({s for h in held for _r, s in h}, reverse=True)
    for step in steps:
        if max_step is not None and step > max_step:
            continue
        if newest_durable is not None and step < newest_durable:
            return None
        sources = {}
        for rank in range(world_size):
            holders = [h for h in [rank, *range(world_size)] if (rank, step) in held[h]]
            if not holders:
                break
            sources[rank] = holders[0]
        else:
            return MemoryChoice(step, sources)
    return None


def gather_choice(tier: MemoryTier, group, *, newest_durable: int | None, max_step: int | None) -> MemoryChoice | None:
    """Collective over `group` (every rank calls it): gather every rank's holdings and choose."""
    mine = tier.holdings()
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    return choose(gathered, dist.get_world_size(group), newest_durable=newest_durable, max_step=max_step)


def state_for(tier: MemoryTier, choice: MemoryChoice, group) -> tuple[Any, Any, dict, int]:
    """This rank's state at `choice.step`: its own snapshot, or the replica its holder sends it.
    Collective over `group`: every holder of a moved state sends it (in rank order, so the sends pair
    up). Returns (state tree, local objects, meta, bytes received)."""
    received = 0
    mine: Held | None = None
    for rank, holder in sorted(choice.moved.items()):
        if tier.rank == holder:
            held = tier.held(rank, choice.step)
            if held is None:
                raise StalwartError(f"rank {holder} was chosen to hold rank {rank}'s snapshot of step "
                                    f"{choice.step} and does not")  # `choose` and `holdings` disagree: a bug
            _send(held, rank, group)
        elif tier.rank == rank:
            mine = _receive(holder, group)
            received = mine.nbytes
    if mine is None:
        mine = tier.held(tier.rank, choice.step)
    tree, local, meta = mine.state()
    return tree, local, meta, received


# ---- the wire: a header (three int64), the pickled layout and objects, the tensor bytes ---------
def _describe(held: Held) -> bytes:
    return pickle.dumps({"rank": held.rank, "step": held.step, "world_size": held.world_size,
                         "layout": held.layout, "objects": held.objects}, protocol=pickle.HIGHEST_PROTOCOL)


def _ring_exchange(own: Held, nxt: int, prev: int, group, recv_into, fault=None) -> Held:
    """Send `own` to rank `nxt` and receive rank `prev`'s snapshot (both at once: a ring of blocking
    sends would deadlock). Raises RuntimeError when a peer is gone."""
    meta = _describe(own)
    head_out = torch.tensor([own.step, own.nbytes, len(meta)], dtype=torch.int64)
    head_in = torch.empty(3, dtype=torch.int64)
    _both(head_out, nxt, head_in, prev, group)
    step, nbytes, meta_len = (int(x) for x in head_in)
    meta_in = torch.empty(meta_len, dtype=torch.uint8)
    data_in = recv_into(nbytes)
    data_out = own.buffer if own.buffer is not None else torch.empty(0, dtype=torch.uint8)
    _both(torch.frombuffer(bytearray(meta), dtype=torch.uint8), nxt, meta_in, prev, group)
    if fault is not None:
        fault()
    _both(data_out, nxt, data_in, prev, group)
    desc = pickle.loads(meta_in.numpy().tobytes())
    if desc["step"] != step:
        raise ValueError(f"replica header says step {step}, its description {desc['step']}")
    return Held(desc["rank"], step, desc["world_size"], desc["layout"], desc["objects"], data_in)


def _both(out: torch.Tensor, dst: int, into: torch.Tensor, src: int, group) -> None:
    works = []
    if into.numel():
        works.append(dist.irecv(into, src=_global(group, src), group=group))
    if out.numel():
        works.append(dist.isend(out, dst=_global(group, dst), group=group))
    for w in works:
        w.wait()


def _send(held: Held, dst: int, group) -> None:
    meta = _describe(held)
    dst = _global(group, dst)
    dist.send(torch.tensor([held.step, held.nbytes, len(meta)], dtype=torch.int64), dst=dst, group=group)
    dist.send(torch.frombuffer(bytearray(meta), dtype=torch.uint8), dst=dst, group=group)
    if held.nbytes:
        dist.send(held.buffer, dst=dst, group=group)


def _receive(src: int, group) -> Held:
    src = _global(group, src)
    head = torch.empty(3, dtype=torch.int64)
    dist.recv(head, src=src, group=group)
    step, nbytes, meta_len = (int(x) for x in head)
    meta = torch.empty(meta_len, dtype=torch.uint8)
    dist.recv(meta, src=src, group=group)
    data = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes:
        dist.recv(data, src=src, group=group)
    desc = pickle.loads(meta.numpy().tobytes())
    return Held(desc["rank"], step, desc["world_size"], desc["layout"], desc["objects"], data, received=True)


def _global(group, rank: int) -> int:
    """The global rank of `rank` in `group` (send/recv take global ranks)."""
    return dist.get_global_rank(group, rank) if group is not None else rank


def _copy_small(obj: Any) -> Any:
    import copy

    return copy.deepcopy(obj)


def replica_ring(nodes: list) -> tuple[int, ...]:
    """The order of the replication ring for ranks on `nodes` (rank -> its node): the nodes' ranks
    taken in turn, a rank from each node in each round, so that a rank's successor (the holder of its
    copy) is on another node whenever two nodes still have ranks left in a round. With one node, by
    rank. Every rank computes it from the same list, or the gang sends it."""
    by_node: dict = {}
    for rank, node in enumerate(nodes):
        by_node.setdefault(node, []).append(rank)
    queues = sorted(by_node.values(), key=lambda ranks: (-len(ranks), ranks[0]))
    ring = []
    for i in range(max((len(q) for q in queues), default=0)):
        ring += [q[i] for q in queues if i < len(q)]
    return tuple(ring)


# ---- the tier of each job in this process, kept across attempts --------------------------------
_TIERS: dict[str, MemoryTier] = {}
_TIERS_LOCK = threading.Lock()


def tier_for(job_id: str, every_steps: int) -> MemoryTier:
    """This process's tier for `job_id`: the one an earlier attempt in this process left, if any."""
    with _TIERS_LOCK:
        tier = _TIERS.get(job_id)
        if tier is None:
            tier = _TIERS[job_id] = MemoryTier(job_id, every_steps)
        tier.every_steps = every_steps
        return tier


def forget(job_id: str) -> None:
    """Release a job's snapshots in this process (the job ended)."""
    with _TIERS_LOCK:
        tier = _TIERS.pop(job_id, None)
    if tier is not None:
        tier.drop()


__all__ = ["MemoryTier", "MemoryChoice", "Held", "choose", "gather_choice", "state_for", "tier_for", "forget"]
