"""Train a byte-level GPT on the Python standard library's own source: a corpus every machine has.

Run it with `stalwart run examples/tiny_gpt/job.yaml`. Every batch is a pure function of its index
(windows drawn by a generator seeded with the index and the rank), so a restored run sees exactly
the batches an uninterrupted run would.
"""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F

from model import GPT


def corpus(max_bytes: int) -> torch.Tensor:
    """The stdlib's .py files in a fixed order, as bytes, up to `max_bytes`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()


def main(ctx, config):
    torch.manual_seed(config.get("seed", 0))  # the same initial weights on every rank
    data = corpus(int(config.get("corpus_bytes", 4_000_000)))
    context, batch_size = config.get("context", 64), config.get("batch_size", 16)
    model = GPT(context=context, dim=config.get("dim", 256), layers=config.get("layers", 4),
                heads=config.get("heads", 4))
    steps, warmup, lr = config.get("steps", 300), config.get("warmup", 20), config.get("lr", 2e-3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    if config.get("schedule", "cosine") == "wsd":  # constant, then a linear decay to 0 over the last 20 %
        decay_from = int(0.8 * steps)
        shape = lambda s: 1.0 if s < decay_from else max(0.0, (steps - s) / (steps - decay_from))  # noqa: E731
    else:  # cosine to 10 % of the peak
        shape = lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))  # noqa: E731
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * shape(s))
    model, optimizer = ctx.prepare(model, optimizer, schedule)
    if ctx.rank == 0:
        print(f"{sum(getattr(p, 'ds_numel', p.numel()) for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"{len(data) / 1e6:.1f} MB of text, {ctx.world_size} ranks")
    start = ctx.restore()
    if start and ctx.rank == 0:
        print(f"resumed from step {start}")

    def batch(index: int):
        g = torch.Generator().manual_seed(index * 1009 + ctx.rank)
        starts = torch.randint(0, len(data) - context - 1, (batch_size,), generator=g)
        window = torch.stack([data[s:s + context + 1] for s in starts.tolist()]).to(ctx.device)
        return window[:, :-1], window[:, 1:]

    loss = None
    for step, (x, y) in ctx.batches(batch, steps=steps):
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        if ctx.strategy == "deepspeed":
            # The DeepSpeed engine owns backward, clipping (its gradient_clipping) and the step.
            model.backward(loss)
            model.step()
            grad_norm = model.get_global_grad_norm()
        else:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor, replicated on every rank
                grad_norm = grad_norm.full_tensor()
            optimizer.step()
        schedule.step()
        ctx.report(step, loss=loss.detach(), grad_norm=grad_norm, tokens=x.numel())
        ctx.checkpoint(step)
        if ctx.rank == 0 and step % 50 == 0:
            print(f"step {step}: loss {loss.item():.3f}")
    return {"final_loss": float(loss.detach()) if loss is not None else None}
