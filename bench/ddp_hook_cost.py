"""Benchmark: the step time of DDP with stalwart's gradient average (launchers.rejoin: a one-rank DDP
group and a hook that sums every gradient once per backward, in parameter order, over a gloo group of
its own) against plain DDP, side by side in the same two processes.

Prints ONE JSON line. Run from the repository root:
    python bench/ddp_hook_cost.py            # 5 rounds
    python bench/ddp_hook_cost.py --quick    # 2 rounds

Two CPU ranks (torch.multiprocessing, gloo, one torch thread each). Each process builds the model twice
(the same seed): one copy wrapped by plain DDP, one by `rejoin.wrap_ddp`; blocks of steps take turns
(which goes first alternates by round) after untimed warm-up steps of each. Two workloads: 8 x
Linear(2048, 2048) + AdamW (large gradients: summed in place) and a stack of 64 x Linear(128, 128)
(small ones: packed into one buffer first). Figure: the median step time of each; ratio: hook / plain
(median of per-round ratios).
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

WORKLOADS = {"large": (8, 2048, 8), "small": (64, 128, 32)}  # layers, width, batch


def _model(layers: int, width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def _rank(rank: int, world: int, port: int, rounds: int, steps: int, out: str) -> None:
    from stalwart.launchers.rejoin import TrainGroup, wrap_ddp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for name, (layers, width, batch) in WORKLOADS.items():
        plain_model, hook_model = _model(layers, width), _model(layers, width)
        plain = torch.nn.parallel.DistributedDataParallel(plain_model)
        hooked = wrap_ddp(hook_model, TrainGroup(dist.new_group(backend="gloo"), world, dist.new_group(backend="gloo")),
                          {}, sync=True)
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
        results[name] = times
    if rank == 0:
        torch.save(results, f"{out}/times.pt")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds, steps = (2, 3) if args.quick else (5, 5)
    from stalwart._net import free_port

    out = tempfile.mkdtemp(prefix="stalwart-bench-hook-")
    mp.spawn(_rank, args=(2, free_port(), rounds, steps, out), nprocs=2, join=True)
    times = torch.load(f"{out}/times.pt")
    figure = {name: {"plain_step_s": median(t["plain"]), "hook_step_s": median(t["hook"])} for name, t in times.items()}
    emit({
        "benchmark": "ddp_hook_cost",
        "figure": figure,
        "ratio": {name: median([ratio(h, p) for h, p in zip(t["hook"], t["plain"])]) for name, t in times.items()},
        "rounds": rounds, "steps_per_block": steps,
        "setup": "2 CPU ranks (mp.spawn, gloo, 1 torch thread each), AdamW; large: 8 x Linear(2048, 2048), batch 8; "
                 "small: 64 x Linear(128, 128), batch 32; plain DDP vs rejoin.wrap_ddp, blocks taking turns",
    })


if __name__ == "__main__":
    main()
