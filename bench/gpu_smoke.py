"""GPU smoke check: the GPU path end to end, as one prepared script for a machine with a CUDA GPU.

    python bench/gpu_smoke.py [--quick] [--strategies ddp,fsdp,deepspeed] [--params-m 50]

Without a CUDA GPU it exits at once (status 0) with one JSON line saying why it skipped, unless
`--cpu` asks it to run the jobs of step 2 on CPU ranks (gloo) to try the script itself. With one:

1. snapshot stall: a model of about `--params-m` million fp32 parameters plus its AdamW state on the
   GPU, saved by the checkpoint engine (world size 1, local directory). Reported: the time save()
   blocks the caller (the snapshot is queued on a side CUDA stream into a pinned host buffer), the
   time until the copy has landed (the current stream waits for it), a plain blocking copy of the
   same tensors to pageable host memory for comparison, and the background write time.
2. per strategy (ddp, fsdp, deepspeed if importable): a 1-GPU stalwart job on a local Ray instance
   (NCCL, device from Ray) trains the tiny GPT with a checkpoint every 10 steps; a second job
   resumes from the first one's last checkpoint and trains 10 more steps. Reported: both jobs'
   states, the restored step, the checkpoint stalls the ranks measured, the loss.

Prints one JSON line per check; exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))


def emit(line: dict) -> None:
    print(json.dumps(line), flush=True)


def job_main(ctx, config):
    """Job entrypoint (workdir bench/): the tiny GPT example, after checking it really runs on the GPU."""
    import torch.distributed as dist

    sys.path.insert(0, str(REPO / "examples" / "tiny_gpt"))
    import train

    if config.pop("cpu_dry_run", False):
        return train.main(ctx, config)
    if ctx.device.type != "cuda":
        raise RuntimeError(f"rank {ctx.rank} runs on {ctx.device}, not on a GPU")
    if dist.get_backend() != "nccl":
        raise RuntimeError(f"rank {ctx.rank} uses {dist.get_backend()}, not nccl")
    return train.main(ctx, config)


def snapshot_stall(params_m: float, reps: int) -> dict:
    import torch

    from stalwart.checkpointing import engine
    from stalwart.checkpointing.storage import FileStorage

    width = 4096
    layers = max(1, int(params_m * 1e6 // (width * width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)]).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(8, width, device="cuda")).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    tensors = [t for t in list(state["model"].values()) + [v for s in opt.state.values() for v in s.values()]
               if torch.is_tensor(t) and t.is_cuda]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    root = Path(tempfile.mkdtemp(prefix="stalwart-gpu-smoke-"))
    eng = engine.CheckpointEngine(FileStorage(root), rank=0, world_size=1, keep_last=1)
    stall, landed, write = [], [], []
    for i in range(reps + 1):  # the first save allocates the pinned buffer: left out
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        eng.save(i + 1, state)
        t1 = time.perf_counter()
        torch.cuda.current_stream().synchronize()  # waits for the side-stream copy (the stream waits on it)
        t2 = time.perf_counter()
        result = eng.wait()
        if not result.committed:
            raise RuntimeError(f"save {i + 1} did not commit: {result.error}")
        if i:
            stall.append(t1 - t0)
            landed.append(t2 - t0)
            write.append(result.write_s)
    # Correctness: what was saved is what is on the GPU.
    loaded = engine.load(eng.storage, reps + 1, 0)
    for k, v in state["model"].items():
        if not torch.equal(loaded.state["model"][k], v.cpu()):
            raise RuntimeError(f"{k} differs after a save from the GPU")
    blocking = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for t in tensors:
            t.to("cpu")
        torch.cuda.synchronize()
        blocking.append(time.perf_counter() - t0)
    return {"check": "snapshot_stall", "ok": True, "bytes": nbytes, "params_m": round(layers * width * width / 1e6, 1),
            "save_blocks_ms": round(statistics.median(stall) * 1000, 3),
            "copy_landed_ms": round(statistics.median(landed) * 1000, 3),
            "blocking_pageable_copy_ms": round(statistics.median(blocking) * 1000, 3),
            "copy_gb_per_s": round(nbytes / statistics.median(landed) / 1e9, 2),
            "write_s": round(statistics.median(write), 3), "reps": reps}


def strategy_jobs(client, strategy: str, steps: int, cpu: bool = False) -> dict:
    from _workload import STRATEGY_SPECS
    base = {"entrypoint": "gpu_smoke:job_main", "workdir": str(BENCH), "strategy": STRATEGY_SPECS[strategy],
            "config": {"steps": steps, "dim": 256, "layers": 4, "heads": 4, "context": 64, "batch_size": 32,
                       "corpus_bytes": 1_000_000, "warmup": 5, "lr": 0.002},
            "resources": {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0 if cpu else 1}}
    if cpu:
        base["config"]["cpu_dry_run"] = True
    t0 = time.perf_counter()
    first = client.submit({**base, "name": f"gpu-{strategy}", "checkpoint": {"every_steps": 10}})
    s1 = first.wait(timeout=600, raise_on_failure=False)
    out = {"check": f"strategy_{strategy}", "first_state": s1["state"], "first_s": round(time.perf_counter() - t0, 1)}
    if s1["state"] != "SUCCEEDED":
        return {**out, "ok": False, "error": s1.get("reason"), "logs": first.logs()[-2000:]}
    stalls = [e["data"].get("stall_s") for e in first.events() if e["kind"] == "checkpoint_committed"]
    t0 = time.perf_counter()
    config = {**base["config"], "steps": steps + 10}
    second = client.submit({**base, "name": f"gpu-{strategy}-resume", "config": config,
                            "checkpoint": {"every_steps": 10, "resume_from": s1["last_checkpoint"]}})
    s2 = second.wait(timeout=600, raise_on_failure=False)
    restored = [e["data"]["step"] for e in second.events() if e["kind"] == "restored"]
    losses = [m["loss"] for m in first.metrics()] + [m["loss"] for m in second.metrics()]
    ok = s2["state"] == "SUCCEEDED" and restored == [steps] and len(losses) == steps + 10
    return {**out, "ok": ok, "second_state": s2["state"], "second_s": round(time.perf_counter() - t0, 1),
            "restored_step": restored[0] if restored else None,
            "stall_ms": [round(s * 1000, 2) for s in stalls if s is not None],
            "loss_first": round(losses[0], 3) if losses else None, "loss_last": round(losses[-1], 3) if losses else None,
            **({} if ok else {"error": s2.get("reason"), "logs": second.logs()[-2000:]})}


def gpu_snapshot(args) -> bool:
    import torch

    try:
        line = snapshot_stall(args.params_m / (4 if args.quick else 1), reps=3 if args.quick else 5)
    except Exception as exc:  # noqa: BLE001 - report and go on to the jobs
        line = {"check": "snapshot_stall", "ok": False, "error": f"{type(exc).__name__}: {exc}"}
    emit(line)
    torch.cuda.empty_cache()
    return line["ok"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and repetitions")
    ap.add_argument("--strategies", default="ddp,fsdp,deepspeed")
    ap.add_argument("--cpu", action="store_true", help="no GPU: run the strategy jobs on CPU to try the script")
    ap.add_argument("--params-m", type=float, default=100.0, help="model size for the snapshot stall, in millions")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available() and not args.cpu:
        emit({"check": "gpu_smoke", "skipped": True,
              "reason": f"no CUDA GPU visible to torch {torch.__version__} "
                        f"(cuda build: {torch.version.cuda}, CUDA_VISIBLE_DEVICES="
                        f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); nothing to check on this machine"})
        return 0
    failed = False
    if args.cpu:
        emit({"check": "device", "ok": True, "name": "cpu (--cpu: no snapshot stall, jobs on gloo)",
              "torch": torch.__version__})
    else:
        emit({"check": "device", "ok": True, "name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
              "torch": torch.__version__, "cuda": torch.version.cuda})
        failed |= not gpu_snapshot(args)

    from _common import start_local_ray

    home = start_local_ray(num_cpus=min(8, os.cpu_count() or 2), num_gpus=0 if args.cpu else 1)
    import stalwart

    client = stalwart.Client(home=home)
    wanted = [s.strip() for s in args.strategies.split(",") if s.strip()]
    for strategy in wanted:
        if strategy == "deepspeed":
            from stalwart.launchers.strategies import deepspeed_missing

            if deepspeed_missing():
                emit({"check": "strategy_deepspeed", "skipped": True, "reason": deepspeed_missing()})
                continue
        try:
            line = strategy_jobs(client, strategy, steps=20 if args.quick else 40, cpu=args.cpu)
        except Exception as exc:  # noqa: BLE001
            line = {"check": f"strategy_{strategy}", "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        emit(line)
        failed |= not line["ok"]
    client.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
