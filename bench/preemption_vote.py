"""Benchmark: what the preemption vote costs a training step.

Prints ONE JSON line. Run from the repository root: `python bench/preemption_vote.py [--quick]`.

`TrainContext.checkpoint(step)` posts one non-blocking all-reduce of one int per step on a gloo group of
its own and reads the previous one (stalwart.launchers.preemption.StopVote), so that the ranks stop
together when one of them is preempted. Two gloo ranks (torch.multiprocessing.spawn, one torch thread
each) train the same small DDP model (an MLP, 1.1M parameters, batch 64) in alternating blocks, with
and without `vote.poll()` after each step: the blocks take turns so both variants see the same
background load. Reported per variant: the median step time over the blocks (rank 0), their ratio
(median of the per-round ratios: target <= 1.01, stalwart's work "well under 1%"), and the time
`poll()` itself takes on the training thread (wall: median, p90 and mean, the mean being the cost per
step, since most polls only count and one every `period` posts a round; CPU time of the thread: mean,
which the machine's other tenants disturb much less), and the period the ranks settled on. `cpu_ratio`:
the training thread's CPU time per step with the vote (step + the mean poll) over without.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from _common import emit, median, note


def _rank(rank: int, world: int, port: int, rounds: int, block: int, out) -> None:
    import torch
    import torch.distributed as dist

    from stalwart.launchers.preemption import StopVote

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(
        torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 512)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    vote = StopVote(dist.new_group(backend="gloo"), world, rank=rank)
    x = torch.randn(64, 512)

    def step():
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(20):  # warm-up
        step()
    times = {"bare": [], "vote": []}
    poll_us, poll_cpu_us = [], []
    step_cpu = {"bare": [], "vote": []}
    for r in range(rounds):
        for variant in (("bare", "vote") if r % 2 == 0 else ("vote", "bare")):
            block_times = []
            for _ in range(block):
                t0, c0 = time.perf_counter(), time.thread_time()
                step()
                step_cpu[variant].append(time.thread_time() - c0)
                if variant == "vote":
                    t1, c1 = time.perf_counter(), time.thread_time()
                    vote.poll(False)
                    poll_us.append((time.perf_counter() - t1) * 1e6)
                    poll_cpu_us.append((time.thread_time() - c1) * 1e6)
                block_times.append(time.perf_counter() - t0)
            times[variant].append(statistics.median(block_times))
    vote.close()
    if rank == 0:
        out.put({"times": times, "poll_us": poll_us, "poll_cpu_us": poll_cpu_us, "period": vote.period,
                 "step_cpu": step_cpu})
    dist.destroy_process_group()


def main() -> None:
    import torch.multiprocessing as mp

    from stalwart._net import free_port

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds, block = (10, 10) if args.quick else (40, 20)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, rounds, block, out)) for r in range(2)]
    for p in procs:
        p.start()
    note(f"2 ranks, {rounds} rounds of {block} steps per variant ...")
    result = out.get(timeout=1800)
    for p in procs:
        p.join(60)
    bare, vote = result["times"]["bare"], result["times"]["vote"]
    per_round = [v / b for v, b in zip(vote, bare)]
    polls = sorted(result["poll_us"])
    emit({"bench": "preemption_vote", "steps_per_variant": rounds * block,
          "step_ms_bare": median(bare) * 1000, "step_ms_with_vote": median(vote) * 1000,
          "ratio": statistics.median(per_round), "poll_us_median": median(polls),
          "poll_us_p90": polls[int(0.9 * (len(polls) - 1))], "poll_us_mean": statistics.fmean(polls),
          "poll_cpu_us_mean": statistics.fmean(result["poll_cpu_us"]), "vote_period_steps": result["period"],
          "poll_fraction_of_step": statistics.fmean(polls) / 1e6 / median(vote),
          "step_cpu_ms_bare": median(result["step_cpu"]["bare"]) * 1000,
          "cpu_ratio": (median(result["step_cpu"]["vote"]) + statistics.fmean(result["poll_cpu_us"]) / 1e6)
          / median(result["step_cpu"]["bare"]), "target_ratio": 1.01})


if __name__ == "__main__":
    main()
