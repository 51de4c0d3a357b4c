"""Benchmark: what in-memory snapshots (checkpoint.memory_every_steps) cost a training step, and how the
replica should travel.

Prints ONE JSON line. Run from the repository root:
    python bench/snapshot_cost.py            # tiny GPT and the ~400 MB model, 6 rounds each
    python bench/snapshot_cost.py --quick    # fewer rounds

Two CPU ranks (torch.multiprocessing, gloo, one torch thread each), DDP, run the same loop in the same
processes in blocks that take turns, so both variants see the same background load:

* none: train steps only;
* every_1: after each step, what ctx.checkpoint does for a due snapshot (the strategy's state, the RNG
  states, `MemoryTier.snapshot`: the copy into reused host buffers, then the ring replication to the
  other rank on a background thread);
* every_4: the same every 4th step;
* overlap_1: every step, the same snapshot taken on a thread of its own while the next step's forward
  and backward run, fenced before that step's optimizer step (an optimizer step pre-hook joins the
  thread): what overlapping the copy with compute would buy on this machine (`--only big` to run the
  large workload alone).

Blocks alternate (order rotating every round); a block's first step is not timed (it may overlap the
previous block's last replication). Figures: median step time per variant (rank 0, perf_counter), the
ratio against `none` (median of per-round ratios), the stall of `snapshot()` itself and the background
replication time, and the K that keeps the overhead <= 2% (overhead at K=1 divided by 0.02, rounded up).

Workloads: `tiny` (bench/_workload.py: examples/tiny_gpt's GPT, dim 128, 2 layers, batch 32 x 64,
AdamW) and `big` (bench/_faultjobs.py: 8 x Linear(2048, 2048) with AdamW, about 400 MB of state).

Transport (`transport` in the line): moving one rank's snapshot of the big state to its peer, as the tier
does it (gloo isend/irecv into a reused buffer), against the Ray object store (the sender `ray.put`s its
buffer; the peer `ray.get`s it and copies it into its own buffer, because an object dies with the process
that put it, and surviving its sender is the replica's whole point). Medians of 3.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, median, note  # noqa: E402

VARIANTS = ("none", "every_1", "every_4", "overlap_1")


def _model(kind: str):
    if kind == "tiny":
        import _workload

        model, opt = _workload.build({})
        batch = _workload.batch_fn({}, 0)
        return model, opt, batch, lambda m, o, x, y: _workload.train_step(m, o, x, y)
    import _faultjobs

    c = _faultjobs._cfg({})
    model, opt = _faultjobs.build(c)
    batch = _faultjobs.batch_at(c, 0)
    return model, opt, batch, lambda m, o, x, y: _faultjobs.train_step(m, o, x, y)


def _rank(rank: int, world: int, store: str, kind: str, rounds: int, block: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from stalwart.checkpointing.memory import MemoryTier
    from stalwart.launchers import strategies
    from stalwart.launchers.context import _rng_state

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    group = dist.new_group(backend="gloo")
    model, opt, batch, step_fn = _model(kind)

    class Ctx:
        device = torch.device("cpu")
        world_size = world

    strategy = strategies.make("ddp")
    model, opt = strategy.wrap(model, opt, Ctx())
    tier = MemoryTier("bench", 1)
    tier.bind(rank, world, group)
    times = {v: [] for v in VARIANTS}
    stalls, replications, fences = [], [], []
    index = 0
    copying: list = []  # overlap_1: the thread taking the last step's snapshot

    def fence(*_args) -> None:
        if copying:
            f0 = time.perf_counter()
            copying.pop().join()
            fences.append(time.perf_counter() - f0)

    opt.register_step_pre_hook(fence)  # nothing may change the state while its snapshot is copied

    def snapshot(at: int) -> None:
        tier.snapshot(at, {**strategy.state(), "scheduler": None}, local={"rng": _rng_state()},
                      meta={"data": {"position": at}})

    def run(variant: str, n: int, timed: list | None) -> None:
        nonlocal index
        every = {"none": 0, "every_1": 1, "every_4": 4, "overlap_1": 1}[variant]
        for i in range(n):
            t0 = time.perf_counter()
            x, y = batch(index)
            step_fn(model, opt, x, y)
            index += 1
            if every and index % every == 0 and variant == "overlap_1":
                thread = threading.Thread(target=snapshot, args=(index,), daemon=True)
                thread.start()
                copying.append(thread)
            elif every and index % every == 0:
                s0 = time.perf_counter()
                snapshot(index)
                if timed is not None:
                    stalls.append(time.perf_counter() - s0)
                    replications.append(tier.last_replication_s)
            if timed is not None and i > 0:
                timed.append(time.perf_counter() - t0)
        fence()

    run("every_1", 3, None)  # warm-up: buffers allocated, the first replication done
    run("none", 3, None)
    per_round = []
    for r in range(rounds):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        block_times = {}
        for v in order:
            tier.wait()
            before = len(times[v])
            run(v, block, times[v])
            block_times[v] = statistics.median(times[v][before:])
        per_round.append(block_times)
    tier.wait()
    if rank == 0:
        Path(out).write_text(json.dumps({"times": times, "per_round": per_round, "stalls": stalls, "fences": fences,
                                         "replications": [x for x in replications if x], "nbytes": tier.nbytes,
                                         "state_bytes": tier.own.nbytes}))
    dist.barrier(group=group)
    dist.destroy_process_group()


def workload(kind: str, rounds: int, block: int) -> dict:
    import torch.multiprocessing as mp

    tmp = Path(tempfile.mkdtemp(prefix="snapcost-"))
    out = tmp / "rank0.json"
    mp.spawn(_rank, args=(2, str(tmp / f"store-{uuid.uuid4().hex[:6]}"), kind, rounds, block, str(out)),
             nprocs=2, join=True)
    r = json.loads(out.read_text())
    med = {v: median(r["times"][v]) for v in VARIANTS}
    ratios = {v: median([p[v] / p["none"] for p in r["per_round"]]) for v in VARIANTS if v != "none"}
    overhead_1 = max(0.0, ratios["every_1"] - 1)
    return {"step_s": med, "ratio_vs_none": ratios, "snapshot_stall_s": median(r["stalls"]),
            "overlap_fence_wait_s": median(r["fences"]) if r["fences"] else None,
            "replication_s": median(r["replications"]), "state_mb": r["state_bytes"] / 1e6,
            "host_mb_per_rank": r["nbytes"] / 1e6, "host_per_state": r["nbytes"] / r["state_bytes"],
            "k_for_2pct": max(1, math.ceil(overhead_1 / 0.02)) if overhead_1 > 0 else 1,
            "steps_per_variant": len(r["times"]["none"])}


# ---- transport: gloo point-to-point against the Ray object store --------------------------------
def _gloo_rank(rank: int, store: str, nbytes: int, reps: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    buf = torch.ones(nbytes, dtype=torch.uint8)
    into = torch.empty(nbytes, dtype=torch.uint8)
    times = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        if rank == 0:
            dist.send(buf, dst=1)
        else:
            dist.recv(into, src=0)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def transport(nbytes: int, reps: int = 3) -> dict:
    import ray
    import torch.multiprocessing as mp

    tmp = Path(tempfile.mkdtemp(prefix="snapnet-"))
    mp.spawn(_gloo_rank, args=(str(tmp / "store"), nbytes, reps, str(tmp / "gloo.json")), nprocs=2, join=True)
    gloo = json.loads((tmp / "gloo.json").read_text())

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        @ray.remote(num_cpus=0)
        class Holder:
            def __init__(self, n):
                import torch

                self.buf = torch.ones(n, dtype=torch.uint8)
                self.into = torch.empty(n, dtype=torch.uint8)

            def put(self):
                return [ray.put(self.buf.numpy())]  # a list: the ref travels, not the object

            def take(self, refs):
                import torch

                self.into.copy_(torch.from_numpy(ray.get(refs[0])))  # own it: the object dies with its owner
                return True

        a, b = Holder.remote(nbytes), Holder.remote(nbytes)
        ray.get([a.__ray_ready__.remote(), b.__ray_ready__.remote()])
        object_store = []
        for _ in range(reps):
            t0 = time.perf_counter()
            refs = ray.get(a.put.remote())
            ray.get(b.take.remote(refs))
            object_store.append(time.perf_counter() - t0)
    finally:
        ray.shutdown()
    return {"mb": nbytes / 1e6, "gloo_s": statistics.median(gloo), "ray_object_store_s": statistics.median(object_store),
            "gloo_mb_per_s": nbytes / 1e6 / statistics.median(gloo),
            "object_store_mb_per_s": nbytes / 1e6 / statistics.median(object_store)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["tiny", "big"], help="one workload, no transport figure")
    args = parser.parse_args()
    rounds = 3 if args.quick else 6
    tiny = big = net = None
    if args.only in (None, "tiny"):
        note("tiny GPT ...")
        tiny = workload("tiny", rounds, 10)
        note(f"tiny: {tiny}")
    if args.only in (None, "big"):
        note("~400 MB model ...")
        big = workload("big", max(2, rounds // 2), 4)
        note(f"big: {big}")
    if args.only is None:
        note("transport ...")
        net = transport(int(big["state_mb"] * 1e6))
    emit({"benchmark": "snapshot_cost", "ranks": 2, "strategy": "ddp", "tiny": tiny, "big": big, "transport": net,
          "target_ratio_every_1": 1.02})


if __name__ == "__main__":
    main()
