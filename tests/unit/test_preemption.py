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


def _voter(rank: int, world: int, port: int, noticed_at: int, interval_s: float, out) -> None:
    import time

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    vote = preemption.StopVote(dist.new_group(backend="gloo"), world, rank=rank, interval_s=interval_s)
    stopped = None
    for step in range(1, 5000):
        if vote.poll(rank == world - 1 and step >= noticed_at):
            stopped = step
            break
        time.sleep(0.002)  # a 2 ms step
    everyone_saved = vote.all_true(rank != 0 or stopped is not None)
    out.put((rank, stopped, everyone_saved, vote.period))
    dist.destroy_process_group()


def _vote(noticed_at: int, interval_s: float) -> list:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    world, port = 3, free_port()
    procs = [ctx.Process(target=_voter, args=(r, world, port, noticed_at, interval_s, out)) for r in range(world)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(60)
    return results


def test_the_ranks_stop_together_a_fixed_number_of_rounds_after_one_was_told():
    # A round every poll (interval 0): only the last rank had the notice, at step 7; every rank reads
    # that round VOTE_LAG rounds later.
    at = 7 + preemption.VOTE_LAG
    assert _vote(7, 0.0) == [(0, at, True, 1), (1, at, True, 1), (2, at, True, 1)]


def test_with_fast_steps_the_ranks_vote_every_few_steps_and_still_stop_together():
    results = _vote(300, 0.05)  # 2 ms steps, a round about every 50 ms: a period of several steps
    steps = {r[1] for r in results}
    periods = {r[3] for r in results}
    assert len(steps) == 1 and len(periods) == 1, results
    (step,), (period,) = steps, periods
    assert period > 1
    assert 300 <= step <= 300 + (preemption.VOTE_LAG + 1) * preemption.MAX_PERIOD
    assert all(r[2] for r in results)


def test_one_rank_votes_alone():
    vote = preemption.StopVote(None, 1)
    assert not vote.poll(False) and vote.poll(True) and vote.all_true(True) and not vote.all_true(False)
