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


# How many polls after posting a round a rank reads it: by then gloo's thread has long completed it, so
# reading never waits for a peer or for that thread to be scheduled (one poll behind, it did, under load).
VOTE_LAG = 4


class StopVote:
    """The ranks agree, at a step all of them reach, that one of them has a notice.

    Each `poll(local)` posts this step's flag in a non-blocking all-reduce (MAX) on a gloo group of its
    own and reads the round posted VOTE_LAG polls before, which is long complete: every rank reads the
    same result at the same call, so all stop together (VOTE_LAG steps after the notice), and no step
    waits on the controller. The cost of a step is posting one all-reduce of one int
    (bench/preemption_vote.py). Every rank must call `poll` the same number of times
    (`TrainContext.checkpoint` does, once per step).
    """

    def __init__(self, group=None, world_size: int = 1, lag: int = VOTE_LAG):
        self.group = group
        self.world_size = world_size
        self.lag = max(1, lag)
        self._rounds: deque = deque()  # (flag tensor, work), oldest first
        # The flags, reused in turn (a round's tensor is free again once it has been read).
        self._flags = [torch.zeros(1, dtype=torch.int32) for _ in range(self.lag + 1)]
        self._next = 0

    def poll(self, local: bool) -> bool:
        if self.group is None or self.world_size == 1:
            return local
        flag = self._flags[self._next]
        self._next = (self._next + 1) % len(self._flags)
        flag.fill_(1 if local else 0)
        self._rounds.append((flag, dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)))
        if len(self._rounds) <= self.lag:
            return False
        flag, work = self._rounds.popleft()
        work.wait()
        if flag.item():
            self.close()  # every rank stops here: finish the rounds still in flight together
            return True
        return False

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
