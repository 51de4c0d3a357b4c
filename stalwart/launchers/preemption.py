"""Preemption inside a rank: the notice, and the ranks' agreement on when to stop.

A notice comes from a SIGTERM to the rank's process (spot preemption, `ray stop`, a Kubernetes
eviction) or from the controller, which relays that Ray drains the rank's node. It reaches only some
ranks; `StopVote` makes all of them stop at the same step, where every rank takes part in an
emergency checkpoint (`TrainContext.checkpoint`), then raises `Preempted`.

Lifecycle, per process: `install_signal_handler()` once, on the main thread (the rank worker's
constructor); `begin(grace_s, on_notice)` when a rank starts running the user's code, `end()` when it
stops. A SIGTERM outside begin/end (a warm spare, an idle worker) keeps Ray's own meaning: the process exits.
"""

from __future__ import annotations

import signal
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Notice:
    reason: str  # "SIGTERM", or what the controller said (a draining node)
    deadline: float  # time.time() by which the emergency checkpoint must be committed
    received: float


class _Watch:
    """The process's one notice. The signal handler only assigns and sets an event (it may run at any
    bytecode of the main thread, so it takes no lock a thread of ours could hold); a daemon thread
    does the rest (telling the controller)."""

    def __init__(self) -> None:
        self.active = False
        self.grace_s = 30.0
        self.notice: Notice | None = None
        self.arrived = threading.Event()
        self.on_notice: Callable[[Notice], None] | None = None
        self.generation = 0


_watch = _Watch()


def install_signal_handler() -> None:
    """Route SIGTERM to a notice while a rank runs. Main thread only (Python's rule for handlers)."""
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        if _watch.active:
            notify("SIGTERM")
        elif callable(previous):
            previous(signum, frame)  # Ray's handler: the worker exits
        else:
            raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)


def begin(grace_s: float, on_notice: Callable[[Notice], None]) -> None:
    """A rank starts: notices count from now on; `on_notice` is called once, on a thread of its own."""
    _watch.grace_s = grace_s
    _watch.notice = None
    _watch.arrived.clear()
    _watch.on_notice = on_notice
    _watch.generation += 1
    _watch.active = True
    threading.Thread(target=_deliver, args=(_watch.generation,), name="stalwart-preemption", daemon=True).start()


def end() -> None:
    _watch.active = False
    _watch.on_notice = None
    _watch.generation += 1
    _watch.arrived.set()  # lets the delivery thread go


def notify(reason: str, deadline: float | None = None) -> None:
    """Record a notice (the first one wins). `deadline`: time.time() by which to be done; None: grace_s from now."""
    if not _watch.active or _watch.notice is not None:
        return
    now = time.time()
    _watch.notice = Notice(reason, deadline if deadline else now + _watch.grace_s, now)
    _watch.arrived.set()


def notice() -> Notice | None:
    return _watch.notice if _watch.active else None


def grace_s() -> float:
    return _watch.grace_s


def _deliver(generation: int) -> None:
    _watch.arrived.wait()
    callback, found = _watch.on_notice, _watch.notice
    if generation != _watch.generation or callback is None or found is None:
        return
    try:
        callback(found)
    except Exception:  # noqa: BLE001 - telling the controller is best effort; the vote still stops the ranks
        pass


# How many rounds after posting one a rank reads it: by then gloo's thread has long completed it, so
# reading never waits for a peer or for that thread to be scheduled (one behind, it did, under load).
VOTE_LAG = 3
# About how often the ranks vote: with fast steps, a round every few polls, so posting it costs the
# step little; with steps slower than this, every poll.
VOTE_INTERVAL_S = 0.2
MAX_PERIOD = 64  # polls between rounds, at most


class StopVote:
    """The ranks agree, at a step all of them reach, that one of them has a notice.

    Every `period` polls, a rank posts its flag in a non-blocking all-reduce (MAX) on a gloo group of
    its own and reads the round posted VOTE_LAG rounds before, which is long complete. Every rank reads
    the same round at the same poll, so all of them stop together, and no step waits on the
    controller or on the network. The period adapts so that rounds come about every
    VOTE_INTERVAL_S: rank 0 proposes it in each round (from its own time between polls) and every rank
    takes it when it reads that round, at the same poll, so the ranks never disagree on when to post.
    A notice stops the ranks about (VOTE_LAG + 1) rounds later: within a second with fast steps,
    VOTE_LAG + 1 steps with slow ones. The rounds carry rank 0's settings the same way (checkpoint
    intervals under `every_steps: auto`): rank 0 writes `propose[i]`, and every rank finds it in
    `settings[i]` after the same poll (0 until a round carried one). The cost of a poll without a
    round is a counter; of one with a round, posting an all-reduce of a few ints
    (bench/preemption_vote.py). Every rank must call `poll`
    the same number of times (`TrainContext.checkpoint` does, once per step).
    """

    def __init__(self, group=None, world_size: int = 1, lag: int = VOTE_LAG, rank: int = 0,
                 interval_s: float = VOTE_INTERVAL_S, settings: int = 0):
        self.group = group
        self.world_size = world_size
        self.rank = rank
        self.lag = max(1, lag)
        self.interval_s = interval_s
        self.period = 1  # polls between rounds, the same on every rank
        self._until_round = 0
        self._rounds: deque = deque()  # (tensor [flag, proposed period], work), oldest first
        # Reused in turn (a round's tensor is free again once it has been read); written and read through
        # numpy views of their memory, which skip torch's dispatch (tens of microseconds a call, loaded).
        self.propose = [0] * settings  # rank 0's proposals, sent with every round
        self.settings = [0] * settings  # the proposals every rank has read, at the same poll
        self._tensors = [torch.zeros(2 + settings, dtype=torch.int32) for _ in range(self.lag + 1)]
        self._views = [t.numpy() for t in self._tensors]
        self._next = 0
        self._noticed = False
        self._last_poll: float | None = None
        self._gaps: deque = deque(maxlen=16)  # rank 0's recent seconds between polls

    def poll(self, local: bool) -> bool:
        if self.rank == 0:
            now = time.monotonic()
            if self._last_poll is not None:
                self._gaps.append(now - self._last_poll)
            self._last_poll = now
        if self.group is None or self.world_size == 1:
            self.settings[:] = self.propose
            return local
        self._noticed = self._noticed or local
        if self._until_round > 0:
            self._until_round -= 1
            return False
        self._until_round = self.period - 1
        tensor, view = self._tensors[self._next], self._views[self._next]
        self._next = (self._next + 1) % len(self._tensors)
        view[0] = 1 if self._noticed else 0
        view[1] = self._proposal() if self.rank == 0 else 0
        if self.propose:
            view[2:] = self.propose if self.rank == 0 else 0
        self._rounds.append((view, dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group, async_op=True)))
        if len(self._rounds) <= self.lag:
            return False
        view, work = self._rounds.popleft()
        work.wait()
        stop, period = int(view[0]), int(view[1])
        for i in range(len(self.settings)):
            if view[2 + i]:
                self.settings[i] = int(view[2 + i])
        if stop:
            self.close()  # every rank stops here: finish the rounds still in flight together
            return True
        if period:
            self.period = period
        return False

    def step_s(self) -> float | None:
        """Rank 0's recent median seconds between polls (a step, when polled once a step)."""
        return statistics.median(self._gaps) if self._gaps else None

    def _proposal(self) -> int:
        """Rank 0's period: polls per VOTE_INTERVAL_S at its recent median step time (a median, so that a
        pause between steps, an evaluation or a regular save, does not make the rounds rarer)."""
        if not self.interval_s or not self._gaps:
            return 1
        step_s = statistics.median(self._gaps)
        return max(1, min(MAX_PERIOD, int(self.interval_s / step_s))) if step_s > 0 else MAX_PERIOD

    def all_true(self, value: bool) -> bool:
        """Blocking: whether `value` holds on every rank (after a `poll` that returned True)."""
        if self.group is None or self.world_size == 1:
            return value
        flag = torch.tensor([1 if value else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())

    def close(self) -> None:
        """Complete the rounds in flight (every rank posted them) before the group goes."""
        while self._rounds:
            self._rounds.popleft()[1].wait()
