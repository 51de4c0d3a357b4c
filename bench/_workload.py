"""The training loop shared by bench/step_overhead.py, bench/strategy_overhead.py and bench/start_latency.py.

Not a benchmark itself. The same model, batches and optimizer run either bare (plain
torch.distributed processes) or under stalwart (`stalwart_main` is a job entrypoint: the
benchmarks submit it with `workdir: bench/`). Rank 0 measures its own step times inside the
loop and writes them to `config["out"]` as JSON, so process and cluster start-up are excluded.

The model is examples/tiny_gpt's GPT with a small config (about 0.4M parameters; a step takes
roughly 50-150 ms on one CPU thread). `wrap_bare` wraps it for each strategy (ddp, fsdp, deepspeed)
as a user would without stalwart; under stalwart, `ctx.prepare` does it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples" / "tiny_gpt"))

from model import GPT  # noqa: E402

DEFAULTS = {"dim": 128, "layers": 2, "heads": 4, "context": 64, "batch_size": 32, "lr": 1e-3,
            "warmup": 20, "steps": 220, "seed": 0}


def _cfg(config: dict) -> dict:
    return {**DEFAULTS, **(config or {})}


def build_model(config: dict):
    c = _cfg(config)
    torch.manual_seed(c["seed"])  # the same initial weights on every rank
    return GPT(context=c["context"], dim=c["dim"], layers=c["layers"], heads=c["heads"])


def make_optimizer(model, config: dict):
    return torch.optim.AdamW(model.parameters(), lr=_cfg(config)["lr"], weight_decay=0.01)


def build(config: dict):
    model = build_model(config)
    return model, make_optimizer(model, config)


DEEPSPEED_OPTIONS = {"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}
STRATEGY_SPECS = {"ddp": {"name": "ddp"}, "fsdp": {"name": "fsdp"},
                  "deepspeed": {"name": "deepspeed", "options": DEEPSPEED_OPTIONS}}


def wrap_bare(strategy: str, model, config: dict, world: int, device: torch.device):
    """(model, optimizer) wrapped for `strategy` by hand, in a process group already initialized:
    DistributedDataParallel; FSDP2 `fully_shard` on each block and the root, the optimizer built on
    the sharded parameters; `deepspeed.initialize` with ZeRO stage 2 and clipping at 1.0."""
    model = model.to(device)
    if strategy == "ddp":
        optimizer = make_optimizer(model, config)
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None), optimizer
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, make_optimizer(model, config)
    if strategy == "deepspeed":
        import deepspeed

        from stalwart.launchers.strategies import _skip_cpu_shm_op, deepspeed_config

        _skip_cpu_shm_op()  # as under stalwart: no gcc build of an inference-only kernel
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=make_optimizer(model, config),
                                                       config=deepspeed_config(DEEPSPEED_OPTIONS),
                                                       dist_init_required=False)
        return engine, optimizer
    raise ValueError(f"unknown strategy {strategy!r}")


def batch_fn(config: dict, rank: int):
    """`batch(index) -> (x, y)`: random bytes seeded by the index and the rank (no corpus to read)."""
    c = _cfg(config)
    context, batch_size = c["context"], c["batch_size"]

    def batch(index: int):
        g = torch.Generator().manual_seed(index * 1009 + rank)
        window = torch.randint(0, 256, (batch_size, context + 1), generator=g)
        return window[:, :-1], window[:, 1:]

    return batch


def train_step(model, optimizer, x, y, strategy: str = "ddp"):
    logits = model(x)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    if strategy == "deepspeed":  # the engine zeroes, clips and steps
        model.backward(loss)
        model.step()
        return loss, model.get_global_grad_norm()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss, grad_norm


class Baton:
    """Takes turns with the other variants, so that they all run under the same background load.

    Steps are grouped in blocks: block 0 holds the `warmup` steps, blocks 1..`blocks` hold `block`
    steps each. Before a block, every rank waits until the driver names its variant and block in
    the file `turn`; after it, each rank leaves a `done-<side>-<block>-<rank>` file. Only the
    steps inside a block are timed (each block's first step, which spans the wait, is not), so
    the waiting never counts. With `dir` None there is no turn-taking (one block after the warm-up).
    """

    POLL_S = 0.005

    def __init__(self, config: dict, side: str, rank: int):
        c = _cfg(config)
        self.dir = Path(c["baton_dir"]) if c.get("baton_dir") else None
        self.side, self.rank = side, rank
        self.warmup, self.block = c["warmup"], c.get("block") or (c["steps"] - c["warmup"])
        self.blocks = c.get("blocks") or 1
        self.steps = self.warmup + self.block * self.blocks
        self.stamps: dict[int, list[tuple[float, float]]] = {}

    def block_of(self, step: int) -> int:
        return 0 if step <= self.warmup else 1 + (step - self.warmup - 1) // self.block

    def timed(self, step: int) -> bool:
        """Whether `step` is timed: inside a block, and not the block's first step (it spans the wait)."""
        return step > self.warmup and (step - self.warmup - 1) % self.block != 0

    def timed_steps(self) -> int:
        return self.blocks * (self.block - 1)

    def wait(self, k: int) -> None:
        if self.dir is None:
            return
        want = f"{self.side}:{k}"
        path = self.dir / "turn"
        while True:
            try:
                if path.read_text() == want:
                    return
            except FileNotFoundError:
                pass
            time.sleep(self.POLL_S)

    def done(self, k: int) -> None:
        if self.dir is not None:
            (self.dir / f"done-{self.side}-{k}-{self.rank}").touch()

    def after_step(self, step: int) -> None:
        """Call at the end of every step (after report and checkpoint)."""
        k = self.block_of(step)
        self.stamps.setdefault(k, []).append((time.perf_counter(), time.process_time()))
        last = step == self.warmup or (step > self.warmup and (step - self.warmup) % self.block == 0)
        if last:
            self.done(k)
            if k < self.blocks:
                self.wait(k + 1)

    def result(self) -> dict:
        """Per timed block: the wall durations of its steps (all but the first) and CPU seconds per step."""
        blocks = []
        for k in range(1, self.blocks + 1):
            st = self.stamps.get(k, [])
            walls = [b[0] - a[0] for a, b in zip(st, st[1:])]
            cpu = (st[-1][1] - st[0][1]) / len(walls) if len(walls) else None
            blocks.append({"block": k, "durations_s": walls, "cpu_per_step_s": cpu})
        return {"side": self.side, "blocks": blocks, "threads": torch.get_num_threads()}


def write_result(path: str, result: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, path)


# ---- under stalwart ------------------------------------------------------------------------
def stalwart_main(ctx, config):
    """A job entrypoint: the loop through ctx.batches / ctx.report / ctx.checkpoint."""
    c = _cfg(config)
    model, optimizer = build(c)
    model, optimizer = ctx.prepare(model, optimizer)
    ctx.restore()
    user_batch = batch_fn(c, ctx.rank)
    in_batch_fn = [0.0]

    def batch(index: int):
        t0 = time.perf_counter()
        try:
            return user_batch(index)
        finally:
            in_batch_fn[0] += time.perf_counter() - t0

    baton = Baton(c, c.get("side", "stalwart"), ctx.rank)
    baton.wait(0)
    # stalwart's own time on the training thread: in ctx.batches (less the batch function's own
    # time), ctx.report and ctx.checkpoint, summed over the timed steps of every block.
    own, t_next = 0.0, time.perf_counter()
    parts = [0.0, 0.0, 0.0]  # the same, split: ctx.batches, ctx.report, ctx.checkpoint
    for step, (x, y) in ctx.batches(batch, steps=baton.steps):
        t_got = time.perf_counter()
        loss, grad_norm = train_step(model, optimizer, x, y, ctx.strategy)
        t0 = time.perf_counter()
        ctx.report(step, loss=loss.detach(), grad_norm=grad_norm, tokens=x.numel())
        t_reported = time.perf_counter()
        ctx.checkpoint(step)
        t1 = time.perf_counter()
        if baton.timed(step):
            own += (t_got - t_next - in_batch_fn[0]) + (t1 - t0)
            parts[0] += t_got - t_next - in_batch_fn[0]
            parts[1] += t_reported - t0
            parts[2] += t1 - t_reported
        in_batch_fn[0] = 0.0
        baton.after_step(step)
        t_next = time.perf_counter()
    if ctx.rank == 0 and c.get("out"):
        n = max(1, baton.timed_steps())
        write_result(c["out"], {**baton.result(), "own_s_per_timed_step": own / n,
                                "own_s_per_timed_step_parts": {k: v / n for k, v in
                                                               zip(("batches", "report", "checkpoint"), parts)}})
    return {"steps": baton.steps}


# ---- bare: torch.multiprocessing.spawn + gloo + DDP -------------------------------------------
def bare_rank(rank: int, world: int, port: int, config: dict) -> None:
    import torch.distributed as dist

    c = _cfg(config)
    strategy = c.get("strategy", "ddp")
    if c.get("nice") is not None:
        from stalwart.launchers.niceness import set_niceness

        set_niceness(int(c["nice"]), all_threads=True)  # e.g. 15, the niceness Ray gives its workers
    torch.set_num_threads(1)  # what stalwart's runner does for cpus_per_worker: 1
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # as torchrun sets them
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, optimizer = wrap_bare(strategy, build_model(c), c, world, torch.device("cpu"))
        batch = batch_fn(c, rank)
        baton = Baton(c, c.get("side", "bare"), rank)
        baton.wait(0)
        for index in range(baton.steps):
            x, y = batch(index)
            train_step(model, optimizer, x, y, strategy)
            baton.after_step(index + 1)
        if rank == 0 and c.get("out"):
            write_result(c["out"], baton.result())
    finally:
        dist.destroy_process_group()


# ---- start latency (bench/start_latency.py) ----------------------------------------------------
def latency_main(ctx, config):
    """A job entrypoint that records wall-clock times: entry, ready to train, first step done."""
    stamps = {"entry": time.time()}
    c = _cfg(config)
    model, optimizer = build(c)
    model, optimizer = ctx.prepare(model, optimizer)
    ctx.restore()
    stamps["ready"] = time.time()
    batch = batch_fn(c, ctx.rank)
    for step, (x, y) in ctx.batches(batch, steps=c["steps"]):
        loss, grad_norm = train_step(model, optimizer, x, y)
        ctx.report(step, loss=loss.detach(), grad_norm=grad_norm, tokens=x.numel())
        ctx.checkpoint(step)
        if step == 1:
            stamps["step1"] = time.time()
            if ctx.rank == 0 and c.get("out"):
                write_result(c["out"], stamps)
    return {"steps": c["steps"]}


def bare_latency_rank(rank: int, world: int, addr: str, port: int, config: dict) -> dict:
    """The same work in a bare Ray actor: gloo process group, DDP model, one step; wall-clock times."""
    import torch.distributed as dist

    stamps = {"entry": time.time()}
    c = _cfg(config)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world)
    try:
        model, optimizer = build(c)
        model = torch.nn.parallel.DistributedDataParallel(model)
        stamps["ready"] = time.time()
        x, y = batch_fn(c, rank)(0)
        train_step(model, optimizer, x, y)
        stamps["step1"] = time.time()
    finally:
        dist.destroy_process_group()
    return stamps
