"""Labelled cases for slow divergence, and the benchmark of `TrendDetector` on them.

`python bench/divergence_cases.py [--curves N]` prints one JSON line per case: recall (a first alarm
within 100 steps of the labelled onset), late (a first alarm after that), detection delay (steps from
the onset to the alarm, median and p90), the error of the dated onset (negative: earlier than the
truth, the safe side for a rollback), false alarms (curves with an alarm before the onset, or any
alarm on a benign case), the detector's cost per record (the spike detector's beside it, as the
baseline), and for comparison what today's `SpikeDetector` finds on the same records. One record
per step. The detector's defaults were tuned on other seeds of these cases (1000 and up) than the
ones measured here (0 to N-1).

Every curve is a healthy run first: a loss that falls (fast fall, power law, or a plateau, or a
healthy slow drift upwards of 2-8 % over the whole run), relative noise of 0.5-2 % (Gaussian,
Student-t with 3 degrees of freedom, or Gaussian with rare hard-batch outliers), a grad norm in log
space with its own noise, and a reported LR (linear warmup, then a cosine decay to 10 %). Then:

Divergences (each must be caught within 100 steps of its onset; onset at step 500-900 of 1,600):
* `creep_linear`: the loss rises by R = 20-60 % over T = 200-400 steps, linearly, and keeps rising;
  the grad norm grows by G = 3-20x over the same T (geometrically).
* `creep_accelerating`: the same with (t/T)^1.5: slower at first, so harder within 100 steps.
* `creep_loss_only`: `creep_linear` with no grad norm reported.
Benign changes (any alarm is a false alarm):
* `healthy`: the plain curves.
* `level_shift`: a data-mixture change: from one step on, the loss is 5-30 % higher (and the grad
  norm 0.8-1.6x), then the curve carries on as before.
* `rewarmup`: an LR re-warmup: the LR climbs back to its peak over W = 50-200 steps and decays
  again; the loss bumps up 3-10 % by the end of the climb and comes back over 3W; the grad norm
  follows it by up to 1.4x. The rank reports the LR.
* `rewarmup_no_lr`: the same bump with no LR reported (the detector cannot see the schedule).
* `hard_batches`: 1 % of steps are single hard batches: 1.5-3x the loss, 3-30x the grad norm.
* `heavy_tail`: Student-t noise with 2 degrees of freedom (infinite variance) at 1-4 %.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stalwart.monitoring.detectors import SpikeDetector  # noqa: E402
from stalwart.monitoring.trend import TrendDetector  # noqa: E402

STEPS = 1600
DEADLINE = 100  # steps after the onset by which a divergence must be caught
DIVERGENT = ("creep_linear", "creep_accelerating", "creep_loss_only")
BENIGN = ("healthy", "level_shift", "rewarmup", "rewarmup_no_lr", "hard_batches", "heavy_tail")
CASES = DIVERGENT + BENIGN


def _noise(rng: np.random.Generator, kind: str, n: int) -> np.ndarray:
    if kind == "gauss":
        return rng.standard_normal(n)
    if kind == "student3":
        return rng.standard_t(3, n) / math.sqrt(3.0)
    if kind == "student2":  # infinite variance: scaled so its interquartile range matches a unit Gaussian's
        return rng.standard_t(2, n) * (1.349 / 1.633)
    e = rng.standard_normal(n)
    hits = rng.random(n) < 0.005
    e[hits] += rng.uniform(3.0, 8.0, hits.sum())
    return e


def _lr(n: int, warmup: int = 50) -> np.ndarray:
    t = np.arange(n, dtype=float)
    cos = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * np.clip((t - warmup) / (n - warmup), 0, 1)))
    return np.where(t < warmup, (t + 1) / warmup, cos)


def make_case(case: str, seed: int, n: int = STEPS) -> dict:
    """One labelled curve: {"loss", "grad" (None when not reported), "lr" (None when not reported),
    "onset" (None for a benign case), "divergent"} as numpy arrays / ints."""
    rng = np.random.default_rng([CASES.index(case), seed])
    t = np.arange(n, dtype=float)
    final = rng.uniform(1.5, 3.5)
    shape = rng.choice(["fast_fall", "power", "plateau", "drift_up"])
    if shape == "fast_fall":
        base = final + rng.uniform(6, 9) * np.exp(-t / rng.uniform(15, 80)) \
            + rng.uniform(0.3, 1.0) * np.exp(-t / rng.uniform(300, 1500))
    elif shape == "power":
        base = final + rng.uniform(2, 8) * (1 + t / rng.uniform(5, 50)) ** (-rng.uniform(0.3, 0.8))
    elif shape == "plateau":
        base = final + rng.uniform(0.0, 0.2) * np.exp(-t / 5000.0) + 6 * np.exp(-t / 30)
    else:
        base = final * (1 + rng.uniform(0.02, 0.08) * t / n) + 6 * np.exp(-t / 30)
    noise_kind = rng.choice(["gauss", "student3", "outliers"])
    level = rng.choice([0.005, 0.01, 0.02])
    if case == "heavy_tail":
        noise_kind, level = "student2", rng.uniform(0.01, 0.04)
    log_g = math.log(math.exp(rng.uniform(math.log(0.1), math.log(5.0)))) \
        + rng.uniform(0.5, 2.0) * np.exp(-t / rng.uniform(20, 200)) + rng.uniform(-0.3, 0.3) * t / n
    lr = _lr(n)
    mult = np.ones(n)
    onset = None
    if case in DIVERGENT:
        onset = int(rng.integers(500, 900))
        R, T, G = rng.uniform(0.2, 0.6), rng.uniform(200, 400), math.exp(rng.uniform(math.log(3), math.log(20)))
        u = np.clip((t - onset) / T, 0, None) ** (1.5 if case == "creep_accelerating" else 1.0)
        mult *= 1 + R * u
        log_g = log_g + math.log(G) * u
    elif case == "level_shift":
        at = int(rng.integers(300, 1300))
        mult[at:] *= 1 + rng.uniform(0.05, 0.3)
        log_g[at:] += math.log(rng.uniform(0.8, 1.6))
    elif case in ("rewarmup", "rewarmup_no_lr"):
        at, W = int(rng.integers(400, 1100)), int(rng.integers(50, 201))
        climb = np.clip((t - at) / W, 0, 1)
        lr = np.where(t < at, lr, lr[at] + (1 - lr[at]) * climb)
        after = t >= at + W
        lr[after] = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * np.clip((t[after] - at - W) / (n - at - W), 0, 1)))
        bump = np.where(t < at + W, climb, np.clip(1 - (t - at - W) / (3 * W), 0, 1))
        mult *= 1 + rng.uniform(0.03, 0.10) * bump
        log_g = log_g + math.log(rng.uniform(1.0, 1.4)) * bump
    loss = base * mult * (1 + level * _noise(rng, noise_kind, n))
    log_g = log_g + rng.uniform(0.05, 0.3) * _noise(rng, noise_kind, n)
    if case == "hard_batches":
        hits = rng.random(n) < 0.01
        hits[:100] = False
        loss[hits] *= rng.uniform(1.5, 3.0, hits.sum())
        log_g[hits] += np.log(rng.uniform(3, 30, hits.sum()))
    return {"loss": loss, "grad": None if case == "creep_loss_only" else np.exp(log_g),
            "lr": None if case == "rewarmup_no_lr" else lr, "onset": onset, "divergent": case in DIVERGENT}


def first_alarm(detector, curve: dict) -> tuple[int | None, int | None]:
    """Feed a curve (one record per step) to a TrendDetector or a SpikeDetector; (step of the first
    alarm, its onset_step), or (None, None)."""
    loss, grad, lr = curve["loss"].tolist(), curve["grad"], curve["lr"]
    grad = None if grad is None else grad.tolist()
    lr = None if lr is None else lr.tolist()
    trend = isinstance(detector, TrendDetector)
    for step in range(len(loss)):
        g = None if grad is None else grad[step]
        if trend:
            found = detector.update(step, loss[step], g, None if lr is None else lr[step])
        else:
            found = detector.update(step, loss[step], g)
        if found is not None:
            return step, found.onset_step
    return None, None


def score(case: str, curves: int, make_detector) -> dict:
    delays, onset_errors, hits, false_alarms, late, fed, spent = [], [], 0, 0, 0, 0, 0.0
    for seed in range(curves):
        c = make_case(case, seed)
        t0 = time.perf_counter()
        step, onset_step = first_alarm(make_detector(), c)
        spent += time.perf_counter() - t0
        fed += len(c["loss"]) if step is None else step + 1
        if not c["divergent"]:
            false_alarms += step is not None
        elif step is None:
            pass
        elif step < c["onset"]:
            false_alarms += 1
        elif step - c["onset"] <= DEADLINE:
            hits += 1
            delays.append(step - c["onset"])
            onset_errors.append(onset_step - c["onset"])
        else:
            late += 1
    out = {"false_alarms": false_alarms, "per_update_us": spent / fed * 1e6}
    if case in DIVERGENT:
        out.update(recall=hits / curves, late=late,
                   delay_median_steps=statistics.median(delays) if delays else None,
                   delay_p90_steps=float(np.quantile(delays, 0.9)) if delays else None,
                   onset_error_median_steps=statistics.median(onset_errors) if onset_errors else None,
                   onset_after_truth=sum(e > 0 for e in onset_errors))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--curves", type=int, default=200, help="curves per case")
    ap.add_argument("--repeat", type=int, default=5, help="repetitions of the cost measurement")
    args = ap.parse_args()
    for case in CASES:
        trend = score(case, args.curves, TrendDetector)
        spike = score(case, args.curves, SpikeDetector)
        line = {"bench": "divergence_cases", "case": case, "divergent": case in DIVERGENT, "curves": args.curves,
                "steps_per_curve": STEPS, **trend,
                "spike_detector": {k: spike[k] for k in ("recall", "false_alarms", "per_update_us") if k in spike}}
        print(json.dumps(_rounded(line)), flush=True)
    print(json.dumps(_rounded(cost(args.repeat))), flush=True)


def cost(repeat: int, curves: int = 20) -> dict:
    """Per-record cost on healthy curves, the trend detector and the spike detector taking turns,
    `repeat` times; medians (the per-case figures above are single runs on a shared machine)."""
    data = [make_case("healthy", 10_000 + s) for s in range(curves)]
    fed = sum(len(c["loss"]) for c in data)
    times: dict[str, list[float]] = {"trend": [], "spike": []}
    for _ in range(repeat):
        for name, make in (("trend", TrendDetector), ("spike", SpikeDetector)):
            t0 = time.perf_counter()
            for c in data:
                first_alarm(make(), c)
            times[name].append((time.perf_counter() - t0) / fed * 1e6)
    trend, spike = statistics.median(times["trend"]), statistics.median(times["spike"])
    return {"bench": "divergence_cases", "case": "cost", "records": fed, "repeats": repeat,
            "trend_per_update_us": trend, "spike_per_update_us": spike, "ratio_vs_spike_detector": trend / spike,
            "runs_trend_us": times["trend"], "runs_spike_us": times["spike"]}


def _rounded(line: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else [round(x, 3) for x in v] if isinstance(v, list) else v)
            for k, v in line.items()}


if __name__ == "__main__":
    main()
