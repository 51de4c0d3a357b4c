"""Benchmark: restores that read only their share, against the full read of every shard by every rank.

Prints ONE JSON line. Run from the repository root:
    python bench/restore_share.py            # ~200 MB of state, 3 repetitions, local dir and S3
    python bench/restore_share.py --quick    # 1 repetition
    python bench/restore_share.py --backends file --strategies fsdp

Set-up: rank processes (torch.multiprocessing.spawn, gloo, 1 torch thread each) save a checkpoint of
a stack of Linear(dim, dim) layers and AdamW after one step (params + exp_avg + exp_avg_sq), with
FSDP2 (fully_shard: each rank saves its own blocks) or DDP (replicated: the ranks split the writing),
at 2 and at 4 ranks. Then 2 and 4 ranks restore each checkpoint both ways, taking turns (which goes
first alternates by repetition), into a model built and wrapped beforehand:

  ranged   open_share + strategy.restore (the current code): each rank reads the byte ranges of the
           saved pieces that overlap its blocks, or, at the world size that saved, its own shard; DDP
           ranks read their own part and exchange the rest over the checkpoint's gloo group
  full     open_share(ranged=False) + strategy.restore: every rank reads and verifies every shard,
           rebuilds every tensor and cuts its block out (the code path before ranged reads)

Each restoring world first restores once each way, untimed (first-use costs). A restore's time runs
from the barrier before it to the end of strategy.restore on the slowest rank (opening the
checkpoint included; building the model not). Bytes read are each rank's own
count (Share.bytes_read: storage and node-local cache, manifest included); "received" is what a
rank got from the others over the group. The local directory's files are in the page cache (they
were just written), so local figures are the cost of copying, checksumming and rebuilding, not of
a disk; the S3 server is `rclone serve s3` on 127.0.0.1 (tests/s3server.py).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, median, note, ratio  # noqa: E402

MB = 1 << 20
WORLDS = (2, 4)


class _Ctx:  # what a strategy's wrap() reads of a TrainContext
    def __init__(self, world_size: int):
        import torch

        self.device = torch.device("cpu")
        self.world_size = world_size


def build(strategy_name: str, world: int, layers: int, dim: int, seed: int):
    import torch

    from stalwart.launchers import strategies

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(layers))  # FSDP: one unit each

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    torch.manual_seed(seed)
    model = Stack()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    strategy = strategies.make(strategy_name)
    model, opt = strategy.wrap(model, opt, _Ctx(world))
    return strategy, model, opt


def open_uri(cfg: dict, backend: str, name: str):
    from stalwart.checkpointing.storage import open_storage
    from stalwart.spec import S3Options

    if backend == "s3":
        options = S3Options(endpoint_url=cfg["endpoint"], region="us-east-1", access_key_id=cfg["access_key"],
                            secret_access_key=cfg["secret_key"])
        return open_storage(f"s3://{cfg['bucket']}/{cfg['run']}/{name}", options)
    return open_storage(str(Path(cfg["tmp"]) / "ckpt" / name))


def rank_main(rank: int, world: int, port: int, cfg: dict, phase: str) -> None:
    import torch
    import torch.distributed as dist

    from stalwart.checkpointing.engine import CheckpointEngine
    from stalwart.checkpointing.share import open_share

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    group = dist.new_group(backend="gloo")  # the checkpoint's own group, as the runner makes it
    out: dict = {"rank": rank}
    for strategy_name in cfg["strategies"]:
        if phase == "save":
            strategy, model, opt = build(strategy_name, world, cfg["layers"], cfg["dim"], 0)
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            opt.step()  # materialise exp_avg, exp_avg_sq
            opt.zero_grad(set_to_none=True)
            for backend in cfg["backends"]:
                eng = CheckpointEngine(open_uri(cfg, backend, f"{strategy_name}-w{world}"), rank=rank,
                                       world_size=world, group=group, strategy=strategy_name, layout=strategy.layout)
                eng.save(1, {**strategy.state(), "scheduler": None}, local={"rank": rank}, meta={})
                result = eng.wait()
                out[f"{strategy_name}/{backend}/saved"] = {"committed": result.committed, "bytes": result.bytes,
                                                            "error": result.error}
            del strategy, model, opt
            continue
        strategy, model, opt = build(strategy_name, world, cfg["layers"], cfg["dim"], 1)
        # Untimed, both ways: first-use costs (the group's connections, the optimizer state that a
        # first load creates) would otherwise fall on whichever path runs first.
        for ranged in (True, False):
            share = open_share(open_uri(cfg, cfg["backends"][0], f"{strategy_name}-w{world}"), 1, rank, world,
                               ranged=ranged)
            share.group = group
            strategy.restore(share)
        for backend in cfg["backends"]:
            for saved in WORLDS:
                key = f"{strategy_name}/{backend}/{saved}->{world}"
                runs = out[key] = {"ranged": [], "full": []}
                for rep in range(cfg["reps"]):
                    for ranged in ((True, False) if rep % 2 == 0 else (False, True)):
                        storage = open_uri(cfg, backend, f"{strategy_name}-w{saved}")
                        dist.barrier(group=group)
                        t0 = time.perf_counter()
                        share = open_share(storage, 1, rank, world, ranged=ranged)
                        share.group = group
                        strategy.restore(share)
                        elapsed = time.perf_counter() - t0
                        runs["ranged" if ranged else "full"].append(
                            {"s": elapsed, "bytes": share.bytes_read, "received": share.bytes_received})
                        del share
    Path(cfg["tmp"], f"{phase}-{world}-{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarize(ranks: list[dict], key: str) -> dict:
    """One restore configuration: per path, the slowest rank's time (median over repetitions) and
    the bytes each rank read (the same every repetition)."""
    out = {}
    for path in ("ranged", "full"):
        reps = len(ranks[0][key][path])
        out[path] = {
            "restore_s": median([max(r[key][path][i]["s"] for r in ranks) for i in range(reps)]),
            "read_MB_per_rank": [r[key][path][0]["bytes"] / MB for r in ranks],
            "received_MB_per_rank": [r[key][path][0]["received"] / MB for r in ranks],
        }
    out["ratio"] = {
        "max_read_per_rank": ratio(max(out["ranged"]["read_MB_per_rank"]), max(out["full"]["read_MB_per_rank"])),
        "total_read": ratio(sum(out["ranged"]["read_MB_per_rank"]), sum(out["full"]["read_MB_per_rank"])),
        "restore_s": ratio(out["ranged"]["restore_s"], out["full"]["restore_s"]),
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 repetition")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--backends", default="file,s3")
    ap.add_argument("--strategies", default="fsdp,ddp")
    args = ap.parse_args()
    reps = args.reps or (1 if args.quick else 3)
    backends = [b for b in args.backends.split(",") if b]
    strategies = [s for s in args.strategies.split(",") if s]

    import torch.multiprocessing as mp

    from s3server import ACCESS_KEY, SECRET_KEY, S3Server

    tmp = Path(tempfile.mkdtemp(prefix="stalwart-bench-share-"))
    server = S3Server(bucket="bench") if "s3" in backends else None
    results: dict[int, list[dict]] = {}
    try:
        if server is not None:
            server.start()
        cfg = {"layers": args.layers, "dim": args.dim, "reps": reps, "backends": backends, "strategies": strategies,
               "tmp": str(tmp), "run": f"{int(time.time())}", "bucket": "bench",
               "endpoint": server.endpoint_url if server else None, "access_key": ACCESS_KEY, "secret_key": SECRET_KEY}
        note(f"state: {args.layers} x Linear({args.dim}, {args.dim}) + AdamW; {reps} repetitions; "
             f"backends {backends}; strategies {strategies}; tmp {tmp}")
        for phase in ("save", "restore"):
            for world in WORLDS:
                note(f"{phase} at {world} ranks")
                mp.spawn(rank_main, args=(world, free_port(), cfg, phase), nprocs=world, join=True)
                if phase == "restore":
                    results[world] = [json.loads((tmp / f"restore-{world}-{r}.json").read_text())
                                      for r in range(world)]
        saves = [json.loads((tmp / f"save-{w}-{r}.json").read_text()) for w in WORLDS for r in range(w)]
    finally:
        if server is not None:
            server.close()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)

    params = args.layers * (args.dim * args.dim + args.dim)
    state_mb = 3 * 4 * params / MB  # fp32 weights, exp_avg, exp_avg_sq
    detail = {key: summarize(results[world], key)
              for world in WORLDS for key in results[world][0] if key != "rank"}
    emit({
        "benchmark": "restore_share",
        "state_MB": state_mb,
        "figure": {k: {"restore_s": v["ranged"]["restore_s"],
                       "max_read_MB_per_rank": max(v["ranged"]["read_MB_per_rank"])} for k, v in detail.items()},
        "baseline": {k: {"restore_s": v["full"]["restore_s"],
                         "max_read_MB_per_rank": max(v["full"]["read_MB_per_rank"])} for k, v in detail.items()},
        "ratio": {k: v["ratio"] for k, v in detail.items()},
        "detail": detail,
        "all_committed": all(v["committed"] for s in saves for k, v in s.items() if k.endswith("/saved")),
        "repetitions": reps,
        "setup": f"{args.layers} x Linear({args.dim}, {args.dim}) + AdamW saved at 2 and 4 ranks (mp.spawn, gloo, "
                 "1 torch thread each), restored at 2 and 4; local dir (page cache) + rclone serve s3 on 127.0.0.1",
    })


if __name__ == "__main__":
    main()
