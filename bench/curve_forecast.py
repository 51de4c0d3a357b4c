"""Benchmark of the curve forecast (`stalwart.forecast.forecast_curve`): predict a run's final loss
from its first 20% (and 50%) of steps and its whole LR schedule.

Prints ONE JSON line. `python bench/curve_forecast.py [--gpt-steps N] [--no-gpt] [--save DIR | --load DIR]`
(--save keeps the curves, --load recomputes the figures from kept curves without training).

Two schedules, as in issue 13: cosine (to 10% of the peak, as examples/tiny_gpt/train.py) and
constant then a linear decay to zero over the last 20% (WSD); a 3% linear warmup in both.
Two ways to forecast:
* "alone": the law fitted on the run's own prefix only. Until the LR has dropped in the observed
  steps, the annealing term cannot be fitted; the forecast then refuses (we force it to measure it).
* "pilot": the annealing coefficient C (and its decay) taken from a pilot run a quarter as long,
  with the same peak LR and schedule shape, fitted whole; the rest of the law fitted on the run's
  own prefix.
Curves:
* a noisy quadratic model (SGD on a quadratic with a power-law spectrum and gradient noise; its
  expected loss computed exactly, plus 0.5% per-step noise): curves made by a different mechanism
  than the law, so the law is tested, not echoed.
* the tiny GPT of examples/tiny_gpt (smaller: dim 128, 2 layers), trained here in one process on
  CPU; the truth is the loss on 64 held-out batches after the last step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, emit, note  # noqa: E402

from stalwart.forecast import ForecastError, fit_curve, forecast_curve  # noqa: E402

FRACTIONS = (0.2, 0.5)


def schedule(kind: str, steps: int) -> np.ndarray:
    s = np.arange(steps, dtype=float)
    warm = np.minimum(1.0, (s + 1) / max(int(0.03 * steps), 1))
    if kind == "cosine":
        return warm * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * s / steps)))
    start = int(0.8 * steps)
    shape = np.ones(steps)
    shape[start:] = 1 - (s[start:] - start + 1) / (steps - start)
    return warm * np.maximum(shape, 0.0)


def nqm_curve(lr: np.ndarray, seed: int, dims: int = 2000, noise: float = 0.005) -> tuple[np.ndarray, float]:
    """Per-step losses (with relative noise) and the exact expected final loss of SGD on
    0.5 * sum h_i x_i^2, h_i = i^-1.3, x_0 ~ 1, gradient noise of variance 0.02 * h_i."""
    h = np.arange(1, dims + 1, dtype=float) ** -1.3
    m = np.ones(dims)
    eta = 0.8 * lr / lr.max()
    out = np.empty(len(lr))
    for i, e in enumerate(eta):
        m = (1 - e * h) ** 2 * m + e * e * 0.02 * h
        out[i] = 0.5 * np.sum(h * m) + 1.0  # + an irreducible 1.0
    rng = np.random.default_rng(seed)
    return out * (1 + noise * rng.standard_normal(len(out))), float(out[-1])


def gpt_curve(lr: np.ndarray, seed: int = 0) -> tuple[np.ndarray, float]:
    """Per-step training losses of the tiny GPT under `lr` (peak 2e-3), and its held-out loss after."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO / "examples" / "tiny_gpt"))
    from model import GPT
    from train import corpus

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    data = corpus(4_000_000)
    model = GPT(context=64, dim=128, layers=2, heads=4)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)

    def batch(index: int, salt: int = 0):
        g = torch.Generator().manual_seed(index * 1009 + salt)
        starts = torch.randint(0, len(data) - 65, (16,), generator=g)
        w = torch.stack([data[s:s + 65] for s in starts.tolist()])
        return w[:, :-1], w[:, 1:]

    losses = np.empty(len(lr))
    for step, rate in enumerate(lr * 2e-3 / lr.max()):
        for group in opt.param_groups:
            group["lr"] = float(rate)
        x, y = batch(step)
        loss = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses[step] = loss.item()
    with torch.no_grad():
        held = [F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1)).item()
                for x, y in (batch(i, salt=7_777_777) for i in range(64))]
    return losses, float(np.mean(held))


def forecasts(curve, truth: float, lr: np.ndarray, pilot) -> dict:
    out = {}
    for frac in FRACTIONS:
        n = int(frac * len(lr))
        steps = np.arange(n)
        for how, kw in (("alone", {}), ("pilot", {"annealing_coef": pilot.C, "decay": pilot.decay})):
            try:
                f = forecast_curve(steps, curve[:n], lr, **kw)
                refused = []
            except ForecastError as exc:
                f, refused = forecast_curve(steps, curve[:n], lr, force=True, **kw), exc.codes
            out[f"{how}@{frac:g}"] = {"error": f.prediction / truth - 1, "covered": f.low <= truth <= f.high,
                                      "width": (f.high - f.low) / truth, "refused": refused}
    return out


def run_case(source: str, kind: str, steps: int, make, save: Path | None = None, load: Path | None = None) -> dict:
    lr = schedule(kind, steps)
    pilot_lr = schedule(kind, steps // 4)
    t0 = time.perf_counter()
    if load is not None:  # curves saved by an earlier run (--save): the same figures without training
        z = np.load(load / f"{source}-{kind}.npz")
        lr, pilot_lr, curve, pilot_curve = z["lr"], z["pilot_lr"], z["curve"], z["pilot_curve"]
        truth = float(z["truth"])
    else:
        pilot_curve, _ = make(pilot_lr, 1)
        curve, truth = make(lr, 0)
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
        np.savez(save / f"{source}-{kind}.npz", lr=lr, curve=curve, truth=truth, pilot_lr=pilot_lr,
                 pilot_curve=pilot_curve)
    pilot = fit_curve(np.arange(len(pilot_lr)), pilot_curve, pilot_lr)
    result = {"source": source, "schedule": kind, "steps": len(lr), "truth": truth, "pilot": pilot.params,
              **forecasts(curve, truth, lr, pilot), "seconds": time.perf_counter() - t0}
    note(f"{source:4s} {kind:6s} truth {truth:.4f} " + " ".join(
        f"{k} {v['error']:+.2%}{'' if v['covered'] else '(out)'}{'!' + ','.join(v['refused']) if v['refused'] else ''}"
        for k, v in result.items() if isinstance(v, dict) and "error" in v))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpt-steps", type=int, default=1200, help="steps of each tiny-GPT run (0.1-0.5 s each on CPU)")
    ap.add_argument("--no-gpt", action="store_true", help="the noisy quadratic model only")
    ap.add_argument("--save", type=Path, help="write each case's curves and schedules here (.npz)")
    ap.add_argument("--load", type=Path, help="read the curves an earlier --save wrote instead of training")
    args = ap.parse_args()
    cases = [run_case("nqm", kind, 4000, nqm_curve, args.save, args.load) for kind in ("cosine", "wsd")]
    if not args.no_gpt:
        cases += [run_case("gpt", kind, args.gpt_steps, gpt_curve, args.save, args.load) for kind in ("cosine", "wsd")]
    emit({"benchmark": "curve_forecast", "cases": cases})


if __name__ == "__main__":
    main()
