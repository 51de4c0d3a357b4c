"""The rank side of a preemption: the SIGTERM handler's notice, and the ranks' vote over real gloo."""

from __future__ import annotations

import os
import signal

import torch.distributed as dist
import torch.multiprocessing as mp

from stalwart._net import free_port
from stalwart.launchers import preemption


def test_sigterm_while_a_rank_runs_is_a_notice_and_outside_keeps_its_old_meaning():
    seen, delivered = [], []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        preemption.install_signal_handler()
        preemption.begin(12.0, delivered.append)
        os.kill(os.getpid(), signal.SIGTERM)
        notice = preemption.notice()
        assert notice is not None and notice.reason == "SIGTERM"
        assert abs(notice.deadline - notice.received - 12.0) < 1e-6
        preemption.notify("a second notice")  # the first one wins
        assert preemption.notice().reason == "SIGTERM"
        _wait(lambda: delivered)
        assert delivered == [notice] and seen == []
        preemption.end()
        assert preemption.notice() is None
        os.kill(os.getpid(), signal.SIGTERM)  # no rank running: the handler that was there before
        assert seen == [signal.SIGTERM]
        preemption.begin(5.0, delivered.append)
        preemption.notify("node abc is draining", deadline=1234.0)
        assert preemption.notice().deadline == 1234.0
    finally:
        preemption.end()
        signal.signal(signal.SIGTERM, previous)


def _wait(predicate, timeout: float = 10.0):
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "not within the deadline"
        time.sleep(0.01)


def _voter(rank: int, world: int, port: int, noticed_at: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    vote = preemption.StopVote(dist.new_group(backend="gloo"), world)
    stopped = None
    for step in range(1, 200):
        if vote.poll(rank == world - 1 and step >= noticed_at):
            stopped = step
            break
    everyone_saved = vote.all_true(rank != 0 or stopped is not None)
    out.put((rank, stopped, everyone_saved))
    dist.destroy_process_group()


def test_the_ranks_stop_together_at_the_step_after_one_of_them_was_told():
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    world, port = 3, free_port()
    procs = [ctx.Process(target=_voter, args=(r, world, port, 7, out)) for r in range(world)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(60)
    # Only the last rank had the notice, at step 7: every rank reads that round VOTE_LAG polls later.
    at = 7 + preemption.VOTE_LAG
    assert results == [(0, at, True), (1, at, True), (2, at, True)]


def test_one_rank_votes_alone():
    vote = preemption.StopVote(None, 1)
    assert not vote.poll(False) and vote.poll(True) and vote.all_true(True) and not vote.all_true(False)
