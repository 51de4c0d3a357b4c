"""A plain torchrun-style DDP training script, which stalwart runs unmodified in each rank.

    torchrun --nproc_per_node 2 examples/script_mode/train_ddp.py --steps 200
    python examples/script_mode/train_ddp.py --steps 200        # one process
    stalwart run examples/script_mode/job.yaml                   # gang-scheduled, restarted on failure

It initializes torch.distributed itself from the environment (MASTER_ADDR/PORT, RANK, WORLD_SIZE,
LOCAL_RANK), as under torchrun. Under stalwart, `stalwart.context()` returns the job's TrainContext,
and the lines marked `ctx` give it checkpoints, an exact resume after a restart, reports and
NaN/spike/hang detection; anywhere else it returns None and the script trains as it would without.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

try:
    import stalwart
except ImportError:  # the script does not need stalwart to run
    stalwart = None


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def batch(step: int, rank: int, batch_size: int, device: torch.device):
    """A pure function of (step, rank): a resumed run sees exactly the batches of an unbroken one."""
    g = torch.Generator().manual_seed(step * 1009 + rank)
    x = torch.randn(batch_size, 32, generator=g)
    y = 0.5 * x[:, :8].sum(-1, keepdim=True) + torch.sin(2 * x[:, :1]) + 0.05 * torch.randn(batch_size, 1, generator=g)
    return x.to(device), y.to(device)


def main() -> None:
    args = parse_args()
    for key, default in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, default)  # plain `python train_ddp.py`: a world of one
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = torch.nn.Sequential(torch.nn.Linear(32, args.width), torch.nn.GELU(),
                                torch.nn.Linear(args.width, args.width), torch.nn.GELU(),
                                torch.nn.Linear(args.width, 1)).to(device)
    model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    ctx = stalwart.context() if stalwart else None                          # ctx
    start = 0
    if ctx:                                                                 # ctx
        ctx.track(model, optimizer)  # checkpoints hold the model, optimizer and RNG states
        start = ctx.restore()        # the last committed checkpoint's step, 0 on a fresh start

    for step in range(start + 1, args.steps + 1):
        x, y = batch(step, rank, args.batch_size, device)
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ctx:                                                             # ctx
            ctx.report(step, loss=loss.detach(), tokens=x.shape[0])
            ctx.checkpoint(step)     # every checkpoint.every_steps; returns after the snapshot
        if rank == 0 and step % 50 == 0:
            print(f"step {step}: loss {loss.item():.4f} ({world} ranks)", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
