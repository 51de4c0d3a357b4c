"""The gradient average of ranks that stay in their loop (launchers.rejoin), on real gloo groups."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stalwart._net import free_port


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 4))


def _batch(rank: int) -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(rank))


def _averaged(rank: int, world: int, port: int, out: str) -> None:
    from stalwart.launchers.rejoin import TrainGroup, wrap_ddp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = _model()
    train = TrainGroup(dist.new_group(backend="gloo"), world)
    # Each rank lays DDP's buckets out differently, as a rank that joined running peers does for a step.
    ddp = wrap_ddp(model, train, {"bucket_cap_mb": 0.001 * (rank + 1)}, sync=True)
    ddp(_batch(rank)).pow(2).mean().backward()
    torch.save({"grads": [p.grad.clone() for p in model.parameters()], "failed": train.failed is not None},
               f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _local_grads(rank: int) -> list[torch.Tensor]:
    model = _model()
    model(_batch(rank)).pow(2).mean().backward()
    return [p.grad.clone() for p in model.parameters()]


def test_gradients_are_averaged_whatever_the_bucket_layout_of_each_rank(tmp_path):
    mp.spawn(_averaged, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    expected = [(a / 2 + b / 2) for a, b in zip(_local_grads(0), _local_grads(1))]
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert not got["failed"]
        for g, e in zip(got["grads"], expected):
            torch.testing.assert_close(g, e, rtol=0, atol=1e-7)


def _survives(rank: int, world: int, port: int, out: str) -> None:
    from stalwart.launchers.rejoin import TrainGroup, wrap_ddp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = _model()
    train = TrainGroup(dist.new_group(backend="gloo"), world)
    ddp = wrap_ddp(model, train, {}, sync=True)
    ddp(_batch(rank)).sum().backward()  # both ranks
    if rank == 1:
        os._exit(0)  # gone, as a SIGKILLed rank is
    for _ in range(2):  # a backward with the peer gone neither raises nor hangs
        ddp(_batch(rank)).sum().backward()
    torch.save({"failed": repr(train.failed)}, f"{out}/survivor.pt")
    os._exit(0)


def test_a_dead_peer_marks_the_group_failed_instead_of_raising_through_backward(tmp_path):
    ctx = mp.spawn(_survives, args=(2, free_port(), str(tmp_path)), nprocs=2, join=False)
    for p in ctx.processes:
        p.join(120)
    assert "Error" in torch.load(tmp_path / "survivor.pt")["failed"]
