"""What one rank does inside its worker: environment, process groups, context, the user's function."""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist

from stalwart.checkpointing.storage import open_storage
from stalwart.launchers.context import TrainContext
from stalwart.launchers.reporter import Reporter
from stalwart.launchers.worker import _Tee, collective_timeout, format_user_error, import_entrypoint
from stalwart.spec import JobSpec


def run_rank(worker, payload: dict) -> dict:
    """Run the user's function for `worker.rank`; return a summary, or raise UserCodeError.

    `payload` keys: spec (dict), master_addr, master_port, plan (dict), sink (callable(batch)).
    """
    spec = JobSpec.model_validate(payload["spec"])
    rank, world = worker.rank, worker.world_size
    env = {
        "MASTER_ADDR": payload["master_addr"], "MASTER_PORT": str(payload["master_port"]),
        "RANK": str(rank), "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(payload.get("local_rank", 0)), "LOCAL_WORLD_SIZE": str(payload.get("local_world_size", 1)),
        "STALWART_JOB_ID": worker.job_id, "STALWART_ATTEMPT": str(worker.attempt),
    }
    os.environ.update(env)
    os.environ.update(spec.env)
    torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))

    reporter = Reporter(payload["sink"], spec.monitoring.report_interval_s).start()
    out, err = sys.stdout, sys.stderr
    sys.stdout = _Tee(out, reporter.log, f"[rank {rank}] ")
    sys.stderr = _Tee(err, reporter.log, f"[rank {rank}] ")
    ctx = None
    started = time.time()
    try:
        use_gpu = spec.resources.gpus_per_worker > 0 and torch.cuda.is_available()
        device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        if use_gpu:
            torch.cuda.set_device(device)
        timeout = collective_timeout()
        hang = spec.fault_tolerance.hang_timeout_s
        if hang is not None and timeout.total_seconds() < 3 * hang:
            # stalwart must see a hang (and take the stacks) before the collective gives up.
            timeout = type(timeout)(seconds=3 * hang)
        dist.init_process_group("nccl" if use_gpu else "gloo", rank=rank, world_size=world, timeout=timeout)
        # Checkpoint shard records travel on their own gloo group, from a background thread,
        # so they never interleave with the training collectives.
        ckpt_group = dist.new_group(backend="gloo", timeout=timeout) if world > 1 else None
        plan = payload.get("plan") or {}
        storage = open_storage(plan["checkpoint_uri"], spec.checkpoint.s3)
        ctx = TrainContext(
            job_id=worker.job_id, attempt=worker.attempt, rank=rank, world_size=world,
            local_rank=int(env["LOCAL_RANK"]), device=device, config=dict(spec.config),
            strategy=spec.strategy.name, storage=storage, every_steps=spec.checkpoint.every_steps,
            keep_last=spec.checkpoint.keep_last, reporter=reporter, plan=plan, ckpt_group=ckpt_group)
        func = import_entrypoint(spec.entrypoint, spec.workdir)
        result = func(ctx, dict(spec.config))
        ctx.close()
        return {"rank": rank, "seconds": time.time() - started, "result": _small(result)}
    except BaseException as exc:  # noqa: BLE001 - every failure is reported with its traceback
        error = format_user_error(rank, exc)
        reporter.log(f"[rank {rank}] {error.traceback_text}")
        raise error from None
    finally:
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, _Tee):
                stream.close_partial()
        sys.stdout, sys.stderr = out, err
        reporter.close()
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except (RuntimeError, ValueError):
                pass


def _small(value):
    """Return values travel back to the controller; keep only small, plain ones."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict) and len(value) <= 64:
        return {str(k): _small(v) for k, v in value.items() if isinstance(v, (bool, int, float, str, type(None)))}
    return repr(value)[:200]
