"""The gradient average of ranks that stay in their loop (launchers.rejoin), on real gloo groups."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stalwart._net import free_port
from stalwart.launchers import rejoin


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 512), torch.nn.ReLU(),
                               torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 4))


def _batch(rank: int) -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(rank))


class _Bucket:
    """What DDP hands a communication hook: a flat buffer, its parameters and views of their gradients."""

    def __init__(self, params, grads, index, last):
        self._buffer = torch.cat([g.reshape(-1) for g in grads])
        self._params, self._index, self._last = params, index, last
        self._views, offset = [], 0
        for g in grads:
            self._views.append(self._buffer[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def buffer(self):
        return self._buffer

    def parameters(self):
        return self._params

    def gradients(self):
        return self._views

    def index(self):
        return self._index

    def is_last(self):
        return self._last


def _averaged(rank: int, world: int, port: int, out: str, same: bool) -> None:
    from stalwart.launchers.rejoin import TrainGroup, average_gradients

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = _model()
    model(_batch(rank)).pow(2).mean().backward()
    train = TrainGroup(dist.new_group(backend="gloo"), world, dist.new_group(backend="gloo"))
    train.register(model)
    params = list(model.parameters())[::-1]  # DDP's order: the last layer's first
    # Two buckets on every rank, or (rank 1, unless `same`) other ones: 3 parameters, then the rest, in
    # another order, as a rank that joined running peers lays them out for a step.
    cut = 2 if same or rank == 0 else 3
    parts = [params[:cut], params[cut:]] if same or rank == 0 else [params[:cut][::-1], params[cut:]]
    buckets = [_Bucket(ps, [p.grad for p in ps], i, i == len(parts) - 1) for i, ps in enumerate(parts)]
    futures = [average_gradients(train, b) for b in buckets]
    for fut in futures:
        fut.wait()
    got = {id(p): v.clone() for b in buckets for p, v in zip(b.parameters(), b.gradients())}
    torch.save({"grads": [got[id(p)] for p in model.parameters()], "failed": train.failed is not None,
                "unmatched": train.unmatched}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _local_grads(rank: int) -> list[torch.Tensor]:
    model = _model()
    model(_batch(rank)).pow(2).mean().backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("same", [True, False], ids=["same-layout", "other-layout"])
def test_gradients_are_averaged_whatever_the_bucket_layout_of_each_rank(tmp_path, same):
    mp.spawn(_averaged, args=(2, free_port(), str(tmp_path), same), nprocs=2, join=True)
    expected = [(a / 2 + b / 2) for a, b in zip(_local_grads(0), _local_grads(1))]
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert not got["failed"]
        # Bucket by bucket where the layouts agree; all together, in parameter order, where they do not.
        assert got["unmatched"] == (0 if same else 1)
        for g, e in zip(got["grads"], expected):
            torch.testing.assert_close(g, e, rtol=0, atol=1e-7)


def _survives(rank: int, world: int, port: int, out: str) -> None:
    from stalwart.launchers.rejoin import TrainGroup, wrap_ddp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = _model()
    train = TrainGroup(dist.new_group(backend="gloo"), world, dist.new_group(backend="gloo"))
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


def test_a_failed_step_takes_no_optimizer_step_and_schedulers_still_wrap_it():
    from stalwart.launchers.rejoin import TrainGroup, skip_failed_steps

    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)  # wraps optimizer.step first
    train = TrainGroup(None, 2)
    skip_failed_steps(optimizer, train)
    after = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)  # and one built after prepare
    weights = [p.detach().clone() for p in model.parameters()]
    model(_batch(0)).sum().backward()
    train.fail(RuntimeError("Connection closed by peer"))
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    train.replace(None, 2)
    optimizer.step()
    before.step()
    after.step()
    assert not all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))


# DDP's options, and the backward (counted from when the groups are formed, or a rank joined) by which
# every rank's bucket layout is final: DDP lays its buckets out anew once, from the order in which the
# gradients of its first backward came in (of its second with static_graph; never with
# find_unused_parameters alone).
SETTLED_AT = {"default": ({}, 2), "static-graph": ({"static_graph": True}, 3),
              "find-unused": ({"find_unused_parameters": True}, 1)}


def _joins(rank: int, world: int, port: int, out: str) -> None:
    from stalwart.launchers.rejoin import TrainGroup, wrap_ddp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {}
    for name, (options, settled_at) in SETTLED_AT.items():
        # Rank 1 joins its running peer (a new process: a fresh DDP), before the checks stopped and after.
        for join_after in (1, settled_at + 1):
            plain = torch.nn.parallel.DistributedDataParallel(_model())  # the reference: DDP's own average
            train = TrainGroup(dist.new_group(backend="gloo"), world, dist.new_group(backend="gloo"))
            ddp = wrap_ddp(_model(), train, options, sync=True)
            steps = []
            for step in range(join_after + settled_at + 2):
                if step == join_after:  # the next attempt's groups; rank 0 stayed in its loop
                    groups = dist.new_group(backend="gloo"), dist.new_group(backend="gloo")
                    if rank == 0:
                        train.replace(groups[0], world, groups[1])
                    else:
                        train = TrainGroup(groups[0], world, groups[1])
                        ddp = wrap_ddp(_model(), train, options, sync=False)
                checks, unmatched = train.checks, train.unmatched
                x = torch.randn(4, 8, generator=torch.Generator().manual_seed(100 * rank + step))
                for model in (plain, ddp):
                    model.zero_grad(set_to_none=True)
                    model(x).pow(2).mean().backward()
                steps.append({"checks": train.checks - checks, "unmatched": train.unmatched - unmatched,
                              "checking": train.checking, "failed": train.failed is not None,
                              "equal": all(torch.equal(a.grad, b.grad)
                                           for a, b in zip(plain.parameters(), ddp.parameters()))})
            results[name, join_after] = steps
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_layout_checks_stop_once_the_layouts_settle_and_resume_for_a_rank_that_joins(tmp_path):
    mp.spawn(_joins, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for (name, join_after), steps in results.items():
            settled_at = SETTLED_AT[name][1]
            where = f"rank {rank}, {name}, join after {join_after}: {steps}"
            # Bitwise DDP's own average at every step: bucket by bucket or, when layouts differ, all at the end.
            assert all(s["equal"] and not s["failed"] for s in steps), where
            for formed in (0, join_after):  # the first attempt's groups, then the next attempt's
                phase = steps[formed:join_after] if formed == 0 else steps[join_after:]
                # Checked until the layouts are final on every rank, then not at all.
                assert [s["checking"] for s in phase] == [i + 1 < settled_at for i in range(len(phase))], where
                assert all(s["checks"] > 0 for s in phase[:settled_at]), where
                assert all(s["checks"] == 0 for s in phase[settled_at:]), where
            # The joining rank's first layout is not its peer's (unless DDP never lays its buckets out anew).
            joined = steps[join_after:join_after + settled_at]
            assert any(s["unmatched"] for s in joined) == (name != "find-unused"), where
            assert all(s["unmatched"] == 0 for s in steps[:join_after]), where


def _beside_ddp(rank: int, world: int, port: int, out: str) -> None:
    from stalwart.launchers.rejoin import TrainGroup, wrap_ddp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    norm = [torch.nn.BatchNorm1d(4)]  # a buffer or three, broadcast from rank 0 before each forward
    plain = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(_model(), *norm))
    norm = [torch.nn.BatchNorm1d(4)]
    train = TrainGroup(dist.new_group(backend="gloo"), world, dist.new_group(backend="gloo"))
    ddp = wrap_ddp(torch.nn.Sequential(_model(), *norm), train, {}, sync=True)
    equal = []
    for step in range(3):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(100 * rank + step))
        for model in (plain, ddp):
            model.zero_grad(set_to_none=True)
            model(x).pow(2).mean().backward()
        equal.append(all(torch.equal(a.grad, b.grad) for a, b in zip(plain.parameters(), ddp.parameters())))
        equal.append(all(torch.equal(a, b) for a, b in zip(plain.buffers(), ddp.buffers())))
    torch.save(equal, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_the_average_is_ddps_own_bitwise_at_three_ranks(tmp_path):
    # Times 1/3, as DDP's reducer does: a division by 3 rounds otherwise (about a quarter of the elements).
    mp.spawn(_beside_ddp, args=(3, free_port(), str(tmp_path)), nprocs=3, join=True)
    for rank in range(3):
        assert all(torch.load(tmp_path / f"rank{rank}.pt")), rank


# ---- FSDP: the group the model is sharded over --------------------------------------------------------
def _sharded(rank: int, world: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from stalwart.launchers.rejoin import ShardGroup

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = ShardGroup(dist.new_group(backend="gloo"), rank, world)
    finals = {}
    for name, mesh in (("fsdp", init_device_mesh("cpu", (world,))), ("stalwart", DeviceMesh.from_group(group, "cpu"))):
        model = _model()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for step in range(3):
            model(_batch(rank + 10 * step)).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        finals[name] = {k: v.full_tensor() for k, v in model.state_dict().items()}  # DTensor's own collectives
    if rank == 1:
        os._exit(0)  # gone, as a SIGKILLed rank is
    for step in range(2):  # forward and backward with the peer gone neither raise nor hang
        model(_batch(rank)).pow(2).mean().backward()
    torch.save({"finals": finals, "failed": repr(group.failed)}, f"{out}/sharded.pt")
    os._exit(0)


def test_fsdp_over_stalwarts_group_is_fsdp_bitwise_and_a_dead_peer_fails_the_step_instead_of_raising(tmp_path):
    ctx = mp.spawn(_sharded, args=(2, free_port(), str(tmp_path)), nprocs=2, join=False)
    for p in ctx.processes:
        p.join(120)
    saved = torch.load(tmp_path / "sharded.pt")
    plain, ours = saved["finals"]["fsdp"], saved["finals"]["stalwart"]
    assert plain.keys() == ours.keys() and all(torch.equal(plain[k], ours[k]) for k in plain)
    assert "Error" in saved["failed"]


# ---- DeepSpeed: ZeRO's data-parallel group -------------------------------------------------------------
def _zero(rank: int, world: int, port: int, out: str, stage: int, zero: dict) -> None:
    import logging

    import deepspeed
    from deepspeed.utils import logger

    from stalwart.launchers.rejoin import DeepSpeedTopology, ShardGroup, skip_failed_steps
    from stalwart.launchers.strategies import _skip_cpu_shm_op, deepspeed_config

    logger.setLevel(logging.WARNING)
    _skip_cpu_shm_op()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = ShardGroup(dist.new_group(backend="gloo"), rank, world)
    config = deepspeed_config({"zero_optimization": {"stage": stage, **zero}, "gradient_clipping": 1.0})
    finals = {}
    for name in ("deepspeed", "stalwart"):
        model = _model()
        extra = {"mpu": DeepSpeedTopology(group, rank)} if name == "stalwart" else {}
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                                       config=config, dist_init_required=False, **extra)
        for step in range(3):
            engine.backward(engine(_batch(rank + 10 * step)).pow(2).mean())
            engine.step()
        finals[name] = [p.detach().clone() for p in engine.module.parameters()]
    skip_failed_steps(optimizer.optimizer, group)
    if rank == 1:
        os._exit(0)  # gone, as a SIGKILLed rank is
    master = [p.clone() for p in optimizer.single_partition_of_fp32_groups]
    for step in range(2):  # forward, backward and step with the peer gone neither raise nor hang
        engine.backward(engine(_batch(rank)).pow(2).mean())
        engine.step()
    kept = all(torch.equal(a, b) for a, b in zip(master, optimizer.single_partition_of_fp32_groups))
    torch.save({"finals": finals, "failed": repr(group.failed), "kept": kept}, f"{out}/zero.pt")
    os._exit(0)


@pytest.mark.parametrize("stage,zero", [
    pytest.param(1, {}, marks=pytest.mark.slow),  # 10 s each; one optimizer class, and
    pytest.param(2, {}, marks=pytest.mark.slow),  # test_strategies' in-loop ZeRO-2 kill runs stage 2 end to end
    pytest.param(2, {"use_multi_rank_bucket_allreduce": False}, marks=pytest.mark.slow),  # gradients by reduce
])
def test_zero_over_stalwarts_group_is_deepspeed_bitwise_and_a_dead_peer_fails_the_step_instead_of_raising(
        tmp_path, stage, zero):
    pytest.importorskip("deepspeed")
    ctx = mp.spawn(_zero, args=(2, free_port(), str(tmp_path), stage, zero), nprocs=2, join=False)
    for p in ctx.processes:
        p.join(180)
    saved = torch.load(tmp_path / "zero.pt")
    plain, ours = saved["finals"]["deepspeed"], saved["finals"]["stalwart"]
    assert len(plain) == len(ours) and all(torch.equal(a, b) for a, b in zip(plain, ours))
    assert "Error" in saved["failed"] and saved["kept"]  # the failed steps left the fp32 master weights alone


def test_leaving_the_groups_forgets_what_deepspeed_cached_of_them(monkeypatch):
    import sys
    import types

    released = []
    current = types.SimpleNamespace(_release_process_group_references=lambda group: released.append(group))
    monkeypatch.setitem(sys.modules, "deepspeed.utils.groups", current)
    rejoin.leave_groups()
    assert released == [None]
    # A DeepSpeed without that function: the known globals are reset by name.
    older = types.SimpleNamespace(_WORLD_GROUP=object(), mpu=object(), _ALL_TO_ALL_GROUP={"local_0": object()})
    monkeypatch.setitem(sys.modules, "deepspeed.utils.groups", older)
    rejoin.leave_groups()
    assert older._WORLD_GROUP is None and older.mpu is None and older._ALL_TO_ALL_GROUP == {}


def test_what_a_spare_imports_ahead_for_each_strategy_exists():
    # A name that no longer exists is skipped quietly by the spare (worker.warm), and its import cost
    # comes back on the recovery's critical path: catch a rename at the next upgrade.
    import importlib.util

    from stalwart.launchers.gang import SPARE_IMPORTS, STRATEGY_IMPORTS

    names = [*SPARE_IMPORTS, *(n for strategy, ns in STRATEGY_IMPORTS.items() for n in ns
                               if strategy != "deepspeed" or importlib.util.find_spec("deepspeed") is not None)]
    assert [n for n in names if importlib.util.find_spec(n) is None] == []
