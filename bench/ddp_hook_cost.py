"""Benchmark: the step time of DDP with stalwart's gradient average (launchers.rejoin: a one-rank DDP
group and a hook that sums each bucket over a gloo group of its own, its layout checked with the peers
only until the layouts settle) against plain DDP, side by side in the same two processes.

Prints ONE JSON line. Run from the repository root:
    python bench/ddp_hook_cost.py            # 7 rounds, about a minute
    python bench/ddp_hook_cost.py --quick    # 2 rounds, half-length blocks

Two CPU ranks (torch.multiprocessing, gloo, one torch thread each). Each process builds the model twice
(the same seed): one copy wrapped by plain DDP, one by `rejoin.wrap_ddp`; blocks of steps (5 steps of
the large workload, 25 of the others) take turns (which goes first alternates by round) after two
untimed warm-up steps of each. Three workloads, with AdamW:
8 x Linear(2048, 2048) (large gradients), a stack of 64 x Linear(128, 128) (many small ones), and
32 x (Linear(128, 128), BatchNorm1d(128)) (96 buffers, rank 0's broadcast before every forward).
Figure: the median step time of each; ratio: hook / plain (median of per-round ratios). The timed
steps are those of a settled attempt: the bucket layout checks (one small synchronous all-reduce per
bucket) stop during the warm-up, once DDP has laid its buckets out for good (`layout_checks`: how many
rank 0 made in all, warm-up included; `checking`: whether it still was at the end). `bitwise_equal`:
whether the two copies of the model ended equal (they took the same steps on the same batches).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from _common import emit, median, ratio  # noqa: E402

# layers, width, batch, a BatchNorm1d after each Linear (buffers: DDP broadcasts rank 0's before each
# forward), steps per block (a block of about half a second or more: shorter ones are mostly noise)
WORKLOADS = {"large": (8, 2048, 8, False, 5), "small": (64, 128, 32, False, 25), "buffers": (32, 128, 32, True, 25)}


def _model(layers: int, width: int, norm: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[m for _ in range(layers) for m in (
        [torch.nn.Linear(width, width), torch.nn.BatchNorm1d(width)] if norm else [torch.nn.Linear(width, width)])])


def _rank(rank: int, world: int, port: int, rounds: int, quick: bool, out: str) -> None:
    from stalwart.launchers.rejoin import TrainGroup, wrap_ddp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for name, (layers, width, batch, norm, steps) in WORKLOADS.items():
        steps = max(2, steps // 2) if quick else steps
        plain_model, hook_model = _model(layers, width, norm), _model(layers, width, norm)
        plain = torch.nn.parallel.DistributedDataParallel(plain_model)
        train = TrainGroup(dist.new_group(backend="gloo"), world, dist.new_group(backend="gloo"))
        hooked = wrap_ddp(hook_model, train, {}, sync=True)
        sides = {"plain": (plain, torch.optim.AdamW(plain.parameters(), lr=1e-4)),
                 "hook": (hooked, torch.optim.AdamW(hooked.parameters(), lr=1e-4))}
        x = torch.randn(batch, width, generator=torch.Generator().manual_seed(rank))

        def block(side: str, n: int) -> float:
            model, opt = sides[side]
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(n):
                opt.zero_grad(set_to_none=True)
                model(x).pow(2).mean().backward()
                opt.step()
            dist.barrier()
            return (time.perf_counter() - t0) / n

        block("plain", 2), block("hook", 2)
        times: dict = {"plain": [], "hook": []}
        for r in range(rounds):
            for side in (("plain", "hook") if r % 2 == 0 else ("hook", "plain")):
                times[side].append(block(side, steps))
        # Both sides took the same steps on the same batches: the same parameters if the averages were.
        same = all(torch.equal(a, b)
                   for a, b in zip(plain_model.state_dict().values(), hook_model.state_dict().values()))
        results[name] = {**times, "layout_checks": train.checks, "checking": train.checking, "bitwise_equal": same}
    if rank == 0:
        torch.save(results, f"{out}/times.pt")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds = 2 if args.quick else 7
    from stalwart._net import free_port

    out = tempfile.mkdtemp(prefix="stalwart-bench-hook-")
    mp.spawn(_rank, args=(2, free_port(), rounds, args.quick, out), nprocs=2, join=True)
    times = torch.load(f"{out}/times.pt")
    figure = {name: {"plain_step_s": median(t["plain"]), "hook_step_s": median(t["hook"])} for name, t in times.items()}
    emit({
        "benchmark": "ddp_hook_cost",
        "figure": figure,
        "ratio": {name: median([ratio(h, p) for h, p in zip(t["hook"], t["plain"])]) for name, t in times.items()},
        "layout_checks": {name: t["layout_checks"] for name, t in times.items()},
        "checking": {name: t["checking"] for name, t in times.items()},
        "bitwise_equal": {name: t["bitwise_equal"] for name, t in times.items()},
        "rounds": rounds,
        "steps_per_block": {name: max(2, w[-1] // 2) if args.quick else w[-1] for name, w in WORKLOADS.items()},
        "setup": "2 CPU ranks (mp.spawn, gloo, 1 torch thread each), AdamW; large: 8 x Linear(2048, 2048), batch 8; "
                 "small: 64 x Linear(128, 128), batch 32; "
                 "buffers: 32 x (Linear(128, 128), BatchNorm1d(128)), batch 32; "
                 "plain DDP vs rejoin.wrap_ddp, blocks taking turns",
    })


if __name__ == "__main__":
    main()
