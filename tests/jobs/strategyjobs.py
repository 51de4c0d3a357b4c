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
