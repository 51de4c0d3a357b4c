"""The in-memory snapshot tier (checkpointing/memory.py) on real gloo process groups (torch.multiprocessing
spawn, CPU), with real DDP and FSDP2 models: snapshots into reused buffers, the ring replica each rank
holds of its predecessor, and a restore that takes a lost rank's state from the peer holding it,
bitwise equal to what that rank had. `choose` (which step, from whom) is a pure function, tested alone.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stalwart.checkpointing.memory import MemoryChoice, MemoryTier, choose

WIDTH, LAYERS = 64, 3


# ---- choose: pure --------------------------------------------------------------------------------
def _holds(world: int, own: dict[int, int], replica: dict[int, int]) -> list[list]:
    """Rank r holds its own snapshots of steps own[r] and own[r] - 1, and rank r-1's of replica[r] and
    replica[r] - 1 (two generations of each)."""
    out = []
    for r in range(world):
        h = []
        if replica.get(r) is not None:
            h += [((r - 1) % world, replica[r] - g, world) for g in (0, 1)]
        if own.get(r) is not None:
            h += [(r, own[r] - g, world) for g in (0, 1)]
        out.append(h)
    return out


def test_every_rank_restores_its_own_snapshot():
    assert choose(_holds(3, {0: 8, 1: 8, 2: 8}, {0: 8, 1: 8, 2: 8}), 3) == MemoryChoice(8, {0: 0, 1: 1, 2: 2})


def test_a_lost_rank_gets_its_state_from_the_next_rank():
    choice = choose(_holds(3, {0: 8, 2: 8}, {0: 8, 2: 8}), 3)  # rank 1 is a fresh replacement
    assert choice == MemoryChoice(8, {0: 0, 1: 2, 2: 2}) and choice.moved == {1: 2}


def test_a_lost_rank_whose_holder_was_lost_too_falls_back():
    assert choose(_holds(3, {0: 8}, {0: 8}), 3) is None  # ranks 1 and 2 fresh: rank 1's state is gone


def test_a_rank_lost_between_snapshots_is_restored_at_the_last_step_its_peer_holds():
    # Rank 1 died after its snapshot of step 8; ranks 0 and 2 went on to take step 9 alone (rank 2's
    # replica of step 9 never came). The previous generation still has every rank at step 8.
    holds = [[(2, 9, 3), (2, 8, 3), (0, 9, 3), (0, 8, 3)], [], [(1, 8, 3), (1, 7, 3), (2, 9, 3), (2, 8, 3)]]
    assert choose(holds, 3) == MemoryChoice(8, {0: 0, 1: 2, 2: 2})


def test_storage_newer_than_memory_wins():
    holds = _holds(2, {0: 8, 1: 8}, {0: 8, 1: 8})
    assert choose(holds, 2, newest_durable=10) is None
    assert choose(holds, 2, newest_durable=8) == MemoryChoice(8, {0: 0, 1: 1})


def test_a_rollback_target_older_than_the_snapshots_falls_back():
    assert choose(_holds(2, {0: 8, 1: 8}, {0: 8, 1: 8}), 2, max_step=5) is None


def test_a_changed_world_size_falls_back():
    assert choose(_holds(2, {0: 8, 1: 8}, {0: 8, 1: 8}) + [[]], 3) is None


def test_the_interval_is_validated():
    with pytest.raises(ValueError, match="memory_every_steps"):
        MemoryTier("job", -1)
    assert not any(MemoryTier("job", 0).due(step) for step in range(1, 10))  # auto, before the ranks agree


def test_the_spec_field_is_validated():
    from stalwart.errors import SpecError
    from stalwart.spec import JobSpec

    base = {"name": "m", "entrypoint": "train:main"}
    assert JobSpec.from_dict({**base, "checkpoint": {"memory_every_steps": 4}}).checkpoint.memory_every_steps == 4
    assert JobSpec.from_dict(base).checkpoint.memory_every_steps is None
    with pytest.raises(SpecError, match="checkpoint.memory_every_steps"):
        JobSpec.from_dict({**base, "checkpoint": {"memory_every_steps": 0}})
    with pytest.raises(SpecError, match="script mode"):
        JobSpec.from_dict({**base, "entrypoint": {"script": "/bin/true"}, "checkpoint": {"memory_every_steps": 1}})


# ---- real gloo groups -----------------------------------------------------------------------------
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS))
        self.head = torch.nn.Linear(WIDTH, 4)

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(x)


class _Ctx:
    device = torch.device("cpu")

    def __init__(self, world_size):
        self.world_size = world_size


def _flat_state(strategy) -> dict[str, torch.Tensor]:
    from stalwart.checkpointing import shards

    tensors, _ = shards.flatten({**strategy.state(), "scheduler": None}, pieces={})
    return {k: v.detach().clone() for k, v in tensors.items()}


def _train(strategy, model, opt, rank: int, steps: int) -> None:
    for _ in range(steps):
        model(torch.randn(8, WIDTH)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _rank_main(rank: int, world: int, store: str, kind: str, lost: int, out_dir: str, ring: tuple) -> None:
    from stalwart.checkpointing import memory
    from stalwart.launchers import strategies

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    group = dist.new_group(backend="gloo")
    try:
        torch.manual_seed(0)
        model = Net()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        strategy = strategies.make(kind)
        model, opt = strategy.wrap(model, opt, _Ctx(world))
        tier = memory.MemoryTier(f"job-{kind}", 2)
        tier.bind(rank, world, group, layout=strategy.layout, ring=ring)
        torch.manual_seed(100 + rank)
        buffers, expected = set(), None
        for step in range(1, 7):
            _train(strategy, model, opt, rank, 1)
            if tier.due(step):
                tier.snapshot(step, {**strategy.state(), "scheduler": None}, local={"rank": rank, "step": step},
                              meta={"data": {"position": step}})
                buffers.add(tier.own.buffer.data_ptr())
                expected = _flat_state(strategy)
        tier.wait()
        held = tier.holdings()
        replica = tier.replica
        # The replica is the predecessor's snapshot: bitwise what that rank holds as its own.
        gathered: list = [None] * world
        dist.all_gather_object(gathered, {k: v for k, v in expected.items()}, group=group)
        rep_tree, rep_local, rep_meta = replica.state()
        from stalwart.checkpointing import shards

        rep_flat, _ = shards.flatten(rep_tree, pieces={})
        peer = ring[(ring.index(rank) - 1) % world]
        replica_equal = all(torch.equal(rep_flat[k], gathered[peer][k]) for k in gathered[peer])

        # Rank `lost` dies after step 6's snapshot; the others go on and take step 8's (its replica never
        # goes anywhere: no group), overwriting their older generation.
        if rank != lost:
            with torch.no_grad():  # (no training step: it would need rank `lost` in its collectives)
                for p in strategy.model.parameters():
                    (p.to_local() if hasattr(p, "to_local") else p).add_(1.0)
            tier.group = None
            tier.snapshot(8, {**strategy.state(), "scheduler": None}, local={"rank": rank, "step": 8})
            tier.group = group
        # Rank `lost` is replaced: a fresh process would hold nothing, and other weights.
        if rank == lost:
            tier.drop()
            torch.manual_seed(7)
            with torch.no_grad():
                for p in strategy.model.parameters():
                    (p.to_local() if hasattr(p, "to_local") else p).normal_()
        choice = memory.gather_choice(tier, group, newest_durable=None, max_step=None)
        tree, local, meta, received = memory.state_for(tier, choice, group)
        strategy.load(tree)
        after = _flat_state(strategy)
        restored_equal = set(after) == set(expected) and all(torch.equal(after[k], expected[k]) for k in expected)
        Path(out_dir, f"{kind}-{rank}.json").write_text(json.dumps({
            "buffers": len(buffers), "holdings": [list(h) for h in held],
            "replica_equal": replica_equal, "replica_local": rep_local, "replica_meta": rep_meta,
            "choice": {"step": choice.step, "sources": {str(k): v for k, v in choice.sources.items()}},
            "received": received, "local": local, "meta": meta, "restored_equal": restored_equal,
            "nbytes": tier.nbytes, "state_bytes": sum(v.numel() * v.element_size() for v in expected.values())}))
        dist.barrier(group=group)
    finally:
        dist.destroy_process_group()


def _run(tmp_path: Path, world: int, kind: str, lost: int, ring: tuple) -> list[dict]:
    store = tmp_path / f"store-{uuid.uuid4().hex[:8]}"
    mp.spawn(_rank_main, args=(world, str(store), kind, lost, str(tmp_path), ring), nprocs=world, join=True)
    return [json.loads((tmp_path / f"{kind}-{r}.json").read_text()) for r in range(world)]


def test_the_ring_puts_each_copy_on_another_node_where_it_can():
    from stalwart.checkpointing.memory import replica_ring

    assert replica_ring(["a", "a", "b", "b"]) == (0, 2, 1, 3)  # every copy on the other node
    assert replica_ring(["a", "b", "a", "b"]) == (0, 1, 2, 3)
    assert replica_ring(["a", "a", "b"]) == (0, 2, 1)  # rank 1's copy on rank 0: node a has 2 of 3
    assert replica_ring(["a", "a", "b", "b", "c", "c"]) == (0, 2, 4, 1, 3, 5)
    assert replica_ring(["a", "a", "a"]) == (0, 1, 2)
    for nodes in (["a", "a", "b", "b"], ["a", "b", "c"], ["x", "y", "y", "y", "x"]):
        ring = replica_ring(nodes)
        assert sorted(ring) == list(range(len(nodes)))


# DDP on 3 ranks with the ring two nodes give ranks on nodes a, a, b: rank r's copy is not on r + 1.
@pytest.mark.parametrize("kind,world,ring", [("ddp", 3, (0, 2, 1)), ("fsdp", 2, (0, 1))])
def test_ring_replicas_restore_a_lost_rank_bitwise(tmp_path, kind, world, ring):
    lost = 1
    results = _run(tmp_path, world, kind, lost, ring)
    for rank, r in enumerate(results):
        assert r["buffers"] == 2, "two snapshot buffers, allocated once and reused in turn"
        # Each holds its own snapshots of the last two snapshot steps and its predecessor's in the ring.
        peer = ring[(ring.index(rank) - 1) % world]
        assert r["holdings"] == sorted([[rank, 4, world], [rank, 6, world], [peer, 4, world], [peer, 6, world]])
        assert r["replica_equal"], f"rank {rank}'s replica differs from rank {peer}'s snapshot"
        assert r["replica_local"] == {"rank": peer, "step": 6}
        assert r["replica_meta"] == {"data": {"position": 6}}
        holder = ring[(ring.index(lost) + 1) % world]
        assert r["choice"] == {"step": 6, "sources": {str(q): (holder if q == lost else q) for q in range(world)}}
        assert r["restored_equal"], f"rank {rank} is not bitwise what it was at step 6"
        assert r["local"] == {"rank": rank, "step": 6} and r["meta"] == {"data": {"position": 6}}
        # Host memory: two of its own snapshots and two of one peer's (64-byte alignment aside).
        assert r["nbytes"] <= 4 * r["state_bytes"] * 1.05 + 8192
    assert results[lost]["received"] > 0 and all(r["received"] == 0 for q, r in enumerate(results) if q != lost)
