"""every_steps: auto: the Young/Daly rule, the failure rate from a job's history, rank 0's chooser, and
the ranks taking its proposals at the same step (real gloo groups)."""

import math
import os

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from stalwart._net import free_port
from stalwart.checkpointing import interval
from stalwart.launchers import preemption
from stalwart.spec import CheckpointSpec


def test_young_daly_is_sqrt_2cm_to_first_order_and_never_below_the_cost():
    # C much smaller than M: Young's sqrt(2 C M) within a fraction of a percent (Daly's terms are small).
    assert interval.young_daly(1.0, 3600.0) == pytest.approx(math.sqrt(7200), rel=0.02)
    assert interval.young_daly(0.01, 3600.0) == pytest.approx(math.sqrt(72), rel=0.01)
    # It grows with both the cost and the time between failures.
    assert interval.young_daly(4.0, 3600.0) > interval.young_daly(1.0, 3600.0)
    assert interval.young_daly(1.0, 36000.0) > interval.young_daly(1.0, 3600.0)
    # A checkpoint costing half the time between failures or more: checkpoint once per failure.
    assert interval.young_daly(100.0, 50.0) == 100.0
    assert interval.young_daly(30.0, 50.0) >= 30.0
    assert interval.young_daly(0.0, 3600.0) == 0.0


def test_mtbf_is_the_prior_until_faults_come_then_the_jobs_own_rate():
    assert interval.mtbf(0.0, 0, 3600.0) == 3600.0
    assert interval.mtbf(7200.0, 0, 3600.0) == 10800.0  # two healthy hours: failures look rarer
    assert interval.mtbf(7200.0, 8, 3600.0) == pytest.approx(1200.0)  # 8 faults in 2 h (+ the prior's one)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_the_chooser_starts_from_the_prior_cost_then_the_measured_one():
    clock = Clock()
    auto = interval.AutoInterval(("durable", "memory"), prior_mtbf_s=3600.0, run_s=0.0, faults=0, clock=clock)
    assert auto.propose(None) == {}  # no step time yet: nothing proposed
    first = auto.propose(0.5)
    assert set(first) == {"durable", "memory"}
    assert not auto.choices["durable"].measured
    assert first["durable"] == round(interval.young_daly(interval.PRIOR_COST_S["durable"], 3600.0) / 0.5)
    for tier, steps in first.items():
        assert auto.agreed(tier, steps) is auto.choices[tier]
        assert auto.agreed(tier, steps) is None  # said once
    # Saves turn out cheap: the interval shrinks by the square root of the cost ratio.
    for _ in range(3):
        auto.cost("durable", 0.04)
    again = auto.propose(0.5)
    assert set(again) == {"durable"} and auto.choices["durable"].measured
    assert again["durable"] == pytest.approx(first["durable"] * math.sqrt(0.04), rel=0.05)
    auto.agreed("durable", again["durable"])
    assert auto.propose(0.52) == {}  # a small change in the step time moves nothing (no churn)
    # The first timed save is said even when it moves the interval less than the hysteresis.
    auto.cost("memory", interval.PRIOR_COST_S["memory"] * 0.8)
    assert set(auto.propose(0.5)) == {"memory"} and auto.choices["memory"].measured


def test_an_upload_slower_than_the_interval_sets_the_floor():
    auto = interval.AutoInterval(("durable",), prior_mtbf_s=60.0, run_s=0.0, faults=0, clock=Clock())
    auto.cost("durable", 0.01)  # sqrt(2 x 0.01 x 60) = 1.1 s
    auto.upload(30.0)  # but the last upload took 30 s: saves would queue
    steps = auto.propose(0.1)["durable"]
    assert steps == 300
    choice = auto.choices["durable"]
    assert choice.floor_s == 30.0 and "last upload" in interval.describe("durable", choice.as_event())


def test_faults_and_time_move_the_failure_rate():
    clock = Clock()
    auto = interval.AutoInterval(("memory",), prior_mtbf_s=600.0, run_s=1200.0, faults=5, clock=clock)
    assert auto.mtbf_s() == pytest.approx(1800.0 / 6)
    clock.now += 600.0  # ten more healthy minutes in this attempt
    assert auto.mtbf_s() == pytest.approx(2400.0 / 6)


def test_the_spec_takes_a_number_or_auto_and_names_what_else_to_give():
    assert CheckpointSpec(every_steps="auto", memory_every_steps="auto").every_steps == "auto"
    assert CheckpointSpec(every_steps=7).every_steps == 7
    for bad in (0, -3, "fast", 2.5, True):
        with pytest.raises(ValueError, match="whole number of steps .*or auto"):
            CheckpointSpec(every_steps=bad)


def _settings_voter(rank: int, world: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    vote = preemption.StopVote(dist.new_group(backend="gloo"), world, rank=rank, interval_s=0.0, settings=2)
    seen = []
    for step in range(1, 200):
        if rank == 0:  # rank 0 changes its mind every 37 steps
            vote.propose[:] = [10 + step // 37, 3]
        vote.poll(False)
        seen.append(tuple(vote.settings))
    vote.close()
    out.put((rank, seen))
    dist.destroy_process_group()


def test_every_rank_takes_rank_0s_proposals_at_the_same_step():
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    world, port = 3, free_port()
    procs = [ctx.Process(target=_settings_voter, args=(r, world, port, out)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(60)
    assert results[0] == results[1] == results[2]
    lag = preemption.VOTE_LAG  # a round every poll here; each read VOTE_LAG polls after it was posted
    for step, settings in enumerate(results[0], start=1):
        assert settings == ((0, 0) if step <= lag else (10 + (step - lag) // 37, 3)), step
