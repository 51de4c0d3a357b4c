"""The engine's sharded layout, two ranks faked with threads: each rank writes its own blocks, a load
puts them back together, a torn tiling is refused. Also the GPU-visibility helper of the gang."""

import threading

import pytest
import torch

from stalwart.checkpointing import engine
from stalwart.checkpointing.shards import Piece, assemble, block_of
from stalwart.checkpointing.storage import FileStorage
from stalwart.errors import CheckpointCorrupt


class _Exchange:
    def __init__(self, n):
        self.records = [None] * n
        self.barrier = threading.Barrier(n)


class ThreadEngine(engine.CheckpointEngine):
    """Shard records swapped through memory instead of a gloo group."""

    exchange: _Exchange

    def _exchange(self, record):
        self.exchange.records[self.rank] = record
        self.exchange.barrier.wait()
        out = list(self.exchange.records)
        self.exchange.barrier.wait()
        return out


def engines(storage, world=2):
    ex = _Exchange(world)
    out = []
    for rank in range(world):
        e = ThreadEngine(storage, rank=rank, world_size=world, strategy="fsdp", layout="sharded", keep_last=5)
        e.exchange = ex
        out.append(e)
    return out


def state_of(rank, full, flat, bias, step):
    rows = [(0, 3), (3, 5)][rank]  # uneven: 3 rows and 2 rows
    flat_part = flat[:7] if rank == 0 else flat[7:]  # a ZeRO-style fragment of a flattened parameter
    return {"model": {"w": Piece(full[rows[0]:rows[1]], full.shape, (rows[0], 0)), "b": bias},
            "optimizer": {"state": {"w": {"exp_avg": Piece(flat_part, flat.shape, (0 if rank == 0 else 7,)),
                                          "step": torch.tensor(float(step))}},
                          "param_groups": [{"lr": 0.1, "params": ["w"]}]},
            "empty": Piece(torch.empty(0) if rank else torch.ones(4), (4,), (0,))}


def save_all(engs, step, full, flat, bias):
    for rank, e in enumerate(engs):
        e.save(step, state_of(rank, full, flat, bias, step), local={"rank": rank}, meta={"data": {"position": step}})
    return [e.wait() for e in engs]


def test_each_rank_writes_its_blocks_and_a_load_reassembles_them(tmp_path):
    storage = FileStorage(tmp_path / "ck")
    full, flat, bias = torch.randn(5, 3), torch.randn(12), torch.randn(3)
    results = save_all(engines(storage), 10, full, flat, bias)
    assert all(r.committed for r in results)
    manifest = engine.read_manifest(storage, 10)
    assert manifest["layout"] == "sharded" and manifest["strategy"] == "fsdp"
    for reader_rank in (0, 1, 2):  # any rank of any world size reads the same full state
        loaded = engine.load(storage, 10, reader_rank)
        assert torch.equal(loaded.state["model"]["w"], full)
        assert torch.equal(loaded.state["optimizer"]["state"]["w"]["exp_avg"], flat)
        assert torch.equal(loaded.state["model"]["b"], bias)
        assert torch.equal(loaded.state["empty"], torch.ones(4))
        assert loaded.state["optimizer"]["param_groups"] == [{"lr": 0.1, "params": ["w"]}]
    assert engine.load(storage, 10, 1).local == {"rank": 1}
    # Rank 1 wrote its own rows, not a copy of everything.
    sizes = {s["rank"]: s["size"] for s in manifest["shards"]}
    assert sizes[1] < sizes[0] + full.numel() * 4


def test_blocks_that_do_not_tile_the_tensor_are_refused(tmp_path):
    storage = FileStorage(tmp_path / "ck")
    engs = engines(storage)
    full = torch.randn(5, 3)
    # Both ranks claim rows 0-2: rows 3-4 are missing.
    for e in engs:
        e.save(1, {"w": Piece(full[0:3], full.shape, (0, 0))})
    assert all(e.wait().committed for e in engs)
    with pytest.raises(CheckpointCorrupt, match="reassembled"):
        engine.load(storage, 1, 0)


def test_replicated_layout_refuses_pieces(tmp_path):
    e = engine.CheckpointEngine(FileStorage(tmp_path / "ck"), rank=0, world_size=1)
    with pytest.raises(TypeError, match="replicated"):
        e.save(1, {"w": Piece(torch.ones(2), (2,), (0,))})


def test_assemble_and_block_of_are_inverse():
    full = torch.arange(24.0).view(4, 6)
    blocks = [((0, 0), block_of(full, (0, 0), (4, 3))), ((0, 3), block_of(full, (0, 3), (4, 3)))]
    assert torch.equal(assemble("x", (4, 6), [(list(o), t) for o, t in blocks]), full)
    with pytest.raises(ValueError, match="does not fit"):
        assemble("x", (4, 6), [((2, 0), full)])


def test_node_gpus_orders_by_local_rank():
    from stalwart.launchers.gang import node_gpus

    ids = [["3"], ["1"], ["0"]]  # ranks 0 and 1 share a node; rank 2 is elsewhere
    assert node_gpus(ids, [0, 1], 1) == {"cuda_visible_devices": "3,1", "cuda_device_index": 1}
    assert node_gpus(ids, [2], 2) == {"cuda_visible_devices": "0", "cuda_device_index": 0}
    shared = [["0"], ["0"]]  # fractional GPUs: two ranks on one device
    assert node_gpus(shared, [0, 1], 1) == {"cuda_visible_devices": "0", "cuda_device_index": 0}


def test_deepspeed_config_defaults_leave_user_settings_alone():
    from stalwart.launchers.strategies import deepspeed_config

    config = deepspeed_config({})
    assert config["zero_optimization"] == {"stage": 2}
    assert config["train_micro_batch_size_per_gpu"] == 1 and config["gradient_accumulation_steps"] == 1
    mine = {"zero_optimization": {"stage": 3, "overlap_comm": False}, "train_batch_size": 64, "bf16": {"enabled": True}}
    config = deepspeed_config(mine)
    assert config["zero_optimization"] == {"stage": 3, "overlap_comm": False}
    assert config["train_batch_size"] == 64 and "train_micro_batch_size_per_gpu" not in config
    assert mine == {"zero_optimization": {"stage": 3, "overlap_comm": False}, "train_batch_size": 64,
                    "bf16": {"enabled": True}}  # not modified


def test_unknown_strategy_is_refused():
    from stalwart.errors import StalwartError
    from stalwart.launchers.strategies import make

    with pytest.raises(StalwartError, match="expected one of ddp, fsdp, deepspeed"):
        make("horovod")
    assert make("fsdp").layout == "sharded" and make("ddp").layout == "replicated"
