"""Entrypoints for the strategy tests (imported inside the rank workers; workdir is tests/jobs)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "tiny_gpt"))

import train  # noqa: E402  examples/tiny_gpt/train.py


def resave_then_train(ctx, config):
    """The tiny GPT example, except that whatever `ctx.restore()` loads is saved again at once (same
    step, this job's own checkpoint root), so a test can compare a resharded load with its source."""
    restore = ctx.restore

    def restore_and_save():
        step = restore()
        if step:
            ctx.checkpoint(step, force=True)
            ctx.close()  # committed before training goes on
        return step

    ctx.restore = restore_and_save
    return train.main(ctx, config)


def dump_then_train(ctx, config):
    """The tiny GPT example, except that right after `ctx.restore()` (where checkpoint.init_from
    applies) rank 0 writes every parameter's full value (DeepSpeed: its fp32 master weight), the
    restored step and whether the optimizer holds any state, to `config["dump"]`; then it trains."""
    restore = ctx.restore

    def restore_and_dump():
        step = restore()
        params = _full_parameters(ctx)
        if ctx.rank == 0:
            import torch

            optimizer = ctx._strategy.optimizer
            base = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's ZeRO optimizer wraps the user's
            torch.save({"step": step, "params": params, "optimizer_state": len(base.state)}, config["dump"])
        return step

    ctx.restore = restore_and_dump
    return train.main(ctx, config)


def _full_parameters(ctx) -> dict:
    """Every parameter gathered whole, on the CPU (collective for fsdp and deepspeed)."""
    model = ctx._strategy.model
    if ctx.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ctx.strategy == "deepspeed":
        from deepspeed.utils import safe_get_full_fp32_param

        return {n: safe_get_full_fp32_param(p).detach().cpu().clone() for n, p in model.named_parameters()}
    return {n: t.detach().cpu().clone() for n, t in model.state_dict().items()}
