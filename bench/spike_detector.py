"""Benchmark of `SpikeDetector`: recall, false alarms, detection delay, per-update cost.

Prints ONE JSON line. Run from anywhere: `python bench/spike_detector.py [--quick]`.

Cases:
* synthetic healthy curves: fast fall at the start, power-law decline, plateau, a two-stage
  fall and a slow upward drift; Gaussian, Student-t (df=3) and outlier-laced noise at relative
  levels 0.2%..4%; grad norms in log space with their own noise and isolated, harmless
  grad-norm bursts. Any alarm on one of them is a false alarm.
* synthetic spiky curves: the same healthy curves with one spike of 1.6x..3x the loss at its
  peak, lasting 3..40 records, either grad-norm-first (the norm climbs 1..3 records before the
  loss, as in BLOOM-176B), together with the loss, or with no grad norm at all. A hit is a first
  alarm at or after the labelled onset and before the spike ends, whose onset_step is within
  [onset - 5, onset + 2]; anything earlier is a false alarm.
* real excerpts: short runs of numbers typed from public training logs (sources cited next to
  each). The logs show only a few records before each spike, so each excerpt is spliced onto a
  synthetic prefix at the excerpt's own pre-spike level (noise levels stated per case); the
  prefix is the only invented part, and the excerpt's own step numbers are kept.
* a trivial baseline (EMA mean/variance z-score of the loss, z > 4 on one record) run on the
  same records for the cost ratio and, for context, its own recall and false alarms.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stalwart.monitoring.detectors import SpikeConfig, SpikeDetector  # noqa: E402

# --------------------------------------------------------------------------------------------
# Real excerpts (typed as data). Each: (step, loss, grad_norm or None).
# --------------------------------------------------------------------------------------------

# BLOOM-176B, first lm-loss spike (2022-04-12), iterations 31214-31222, one record per iteration.
# https://github.com/bigscience-workshop/bigscience/blob/master/train/tr11-176B-ml/chronicles.md
# Shows the grad norm leading: 0.24 -> 0.95 -> 2.4 -> 16 -> 145 -> 960 while the loss goes
# 2.20 -> 2.60 -> 2.24 -> 2.35 -> 5.10 (2.3x). Pre-spike level from the same log: loss ~2.20,
# grad norm ~0.15-0.27 (iterations 31214, 31250-31251, 42780-42784).
BLOOM_176B = [
    (31214, 2.198845, 0.242), (31215, 2.220424, 0.947), (31216, 2.595213, 2.390),
    (31217, 2.241558, 15.886), (31218, 2.345279, 145.119), (31219, 5.098124, 960.351),
    (31220, 3.492029, 353.201), (31221, 3.213059, 379.330), (31222, 2.804948, 650.246),
]
# Healthy BLOOM-176B records (2022-04-28 section of the same chronicles), used as a no-alarm case.
BLOOM_176B_HEALTHY = [
    (42780, 2.117073, 0.150), (42781, 2.116946, 0.140), (42782, 2.110646, 0.144),
    (42783, 2.124820, 0.135), (42784, 2.127643, 0.127),
]
# BigScience tr1-13B, "A huge lm loss spike": ~2.77 -> 7.34 -> 8.72, logged every 10 iterations
# (each record is a 10-iteration mean); the log's grad norm column reads 0.000 (not recorded), so
# this is a loss-only case.
# https://github.com/bigscience-workshop/bigscience/blob/master/train/tr1-13B-base/chronicles.md
TR1_13B = [
    (29020, 2.775923, None), (29030, 2.772822, None), (29040, 2.768131, None),
    (29050, 7.343709, None), (29060, 8.715872, None), (29070, 7.654131, None),
    (29080, 7.192470, None), (29090, 6.849044, None),
]
# BigScience tr8-104B, Experiment 2 (fp16): a gradual climb 6.37 -> 6.60 -> 7.31 -> 9.12 -> 10.24
# (1.6x), every 10 iterations, grad norms (loss-scaled fp16 values) from the same lines.
# https://github.com/bigscience-workshop/bigscience/blob/master/train/tr8-104B-wide/chronicles.md
TR8_104B_EXP2 = [
    (6900, 6.365808, 95313.572), (6910, 6.598378, 84678.880), (6920, 7.314456, 122716.232),
    (6930, 9.121927, 283384.130), (6940, 10.238650, 42359.376),
]
# Same chronicles, Experiment 11, "Analyzing Spike" at iteration 11447: the grad norm jumps 20x
# one record before the loss goes 3.11 -> 7.71 (2.5x). The excerpt ends there.
TR8_104B_EXP11 = [
    (11446, 3.062589, 12952.562), (11447, 3.114286, 262623.331), (11448, 7.712340, 254699.302),
]

# name, records, stride between records, labelled onset window (first anomalous record: any
# onset in [lo, hi] is right), prefix loss relative noise, prefix grad log-noise.
# The prefix noise levels are assumptions (stated, not measured): 0.6% for BLOOM's per-iteration
# loss (its healthy records wander by ~0.3-0.9%), 0.3% for the 10-iteration means, 0.2 in log
# space for grad norms (BLOOM's healthy grad norms move 0.24 -> 0.27 -> 0.21 between records).
REAL_SPIKES = [
    ("bloom176b_31216", BLOOM_176B, 1, (31215, 31216), 0.006, 0.2),
    ("tr1_13b_29050", TR1_13B, 10, (29050, 29050), 0.003, None),
    ("tr8_104b_exp2_6920", TR8_104B_EXP2, 10, (6910, 6920), 0.003, 0.2),
    ("tr8_104b_exp11_11447", TR8_104B_EXP11, 1, (11447, 11447), 0.006, 0.2),
]
REAL_HEALTHY = [("bloom176b_42780_healthy", BLOOM_176B_HEALTHY, 1, 0.006, 0.2)]


# --------------------------------------------------------------------------------------------
# Synthetic curves
# --------------------------------------------------------------------------------------------

SHAPES = ("fast_fall", "power", "plateau", "two_stage", "drift_up")
NOISES = ("gauss", "student3", "outliers")
NOISE_LEVELS = (0.002, 0.005, 0.01, 0.02, 0.04)


def _unit_noise(rng: np.random.Generator, kind: str, n: int) -> np.ndarray:
    if kind == "gauss":
        return rng.standard_normal(n)
    if kind == "student3":
        return rng.standard_t(3, n) / math.sqrt(3.0)  # unit variance
    # Gaussian plus rare one-record outliers of +3..8 sigma: a hard batch, not a spike.
    e = rng.standard_normal(n)
    hits = rng.random(n) < 0.005
    e[hits] += rng.uniform(3.0, 8.0, hits.sum())
    return e


def healthy_curve(rng: np.random.Generator, n: int, shape: str, noise: str, level: float,
                  with_grad: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """(loss, grad_norm) of a healthy run; loss noise is multiplicative at relative `level`."""
    t = np.arange(n, dtype=float)
    final = rng.uniform(1.5, 3.5)
    if shape == "fast_fall":
        base = final + rng.uniform(6, 9) * np.exp(-t / rng.uniform(15, 80)) \
            + rng.uniform(0.3, 1.0) * np.exp(-t / rng.uniform(300, 1500))
    elif shape == "power":
        base = final + rng.uniform(2, 8) * (1 + t / rng.uniform(5, 50)) ** (-rng.uniform(0.3, 0.8))
    elif shape == "plateau":
        base = final + rng.uniform(0.0, 0.2) * np.exp(-t / 5000.0)
    elif shape == "two_stage":
        # fall to a plateau, linger, fall again (the "unigram plateau" of LM training)
        mid = final + rng.uniform(2, 4)
        knee = rng.uniform(0.25, 0.5) * n
        base = mid + (11.0 - mid) * np.exp(-t / rng.uniform(10, 40)) \
            - (mid - final) / (1 + np.exp(-(t - knee) / rng.uniform(20, 80)))
    elif shape == "drift_up":
        base = final * (1 + rng.uniform(0.02, 0.08) * t / n)
    else:
        raise ValueError(shape)
    loss = base * (1 + level * _unit_noise(rng, noise, n))
    if not with_grad:
        return loss, None
    g_final = math.exp(rng.uniform(math.log(0.1), math.log(5.0)))
    log_g = math.log(g_final) + rng.uniform(0.5, 2.0) * np.exp(-t / rng.uniform(20, 200)) \
        + rng.uniform(-0.3, 0.3) * t / n
    sig_g = rng.uniform(0.05, 0.3)
    log_g = log_g + sig_g * _unit_noise(rng, noise, n)
    # Isolated grad-norm bursts (1-2 records, 3-30x) that leave the loss alone.
    for start in np.flatnonzero(rng.random(n) < 0.002):
        width = int(rng.integers(1, 3))
        log_g[start:start + width] += math.log(rng.uniform(3, 30))
    return loss, np.exp(log_g)


def inject_spike(rng: np.random.Generator, loss: np.ndarray, grad: np.ndarray | None, onset: int,
                 peak: float, duration: int, mode: str) -> tuple[int, int]:
    """Add a spike in place; return (labelled onset, index of the spike's last record)."""
    rise = int(rng.integers(1, 4))
    rise = min(rise, duration)
    excess = np.zeros(duration)
    for i in range(duration):
        if i < rise:
            excess[i] = (peak - 1) * (i + 1) / rise
        else:
            excess[i] = (peak - 1) * (duration - i) / (duration - rise + 1)
    # Real spikes are not smooth: jitter the excess (BLOOM: 2.60, 2.24, 2.35, 5.10, 3.49, ...).
    excess *= np.exp(0.3 * rng.standard_normal(duration))
    end = min(onset + duration, len(loss))
    loss[onset:end] *= 1 + excess[: end - onset]
    label = onset
    if grad is not None:
        lead = int(rng.integers(1, 4)) if mode == "grad_first" else 0
        g_peak = 10 ** rng.uniform(1.0, 3.5)
        span = lead + duration
        start = onset - lead
        for i in range(span):
            if start + i >= len(grad):
                break
            # climbs geometrically to its peak by the loss peak, decays with the loss
            frac = min(1.0, (i + 1) / (lead + rise))
            if i >= lead + rise:
                frac = (span - i) / (span - lead - rise + 1)
            grad[start + i] *= g_peak ** frac
        label = start
    return label, end - 1


# --------------------------------------------------------------------------------------------
# Runners
# --------------------------------------------------------------------------------------------


class EmaZ:
    """Trivial baseline: EMA mean and variance of the loss; alarm when z > 4 after a warm-up."""

    def __init__(self, alpha: float = 0.05, z: float = 4.0, warmup: int = 50):
        self.alpha, self.z, self.warmup = alpha, z, warmup
        self.n = 0
        self.mean = 0.0
        self.var = 0.0

    def update(self, step: int, loss: float, grad_norm: float | None = None):
        self.n += 1
        if self.n == 1:
            self.mean = loss
            return None
        d = loss - self.mean
        fire = self.n > self.warmup and d > self.z * math.sqrt(self.var) if self.var > 0 else False
        a = self.alpha
        self.mean += a * d
        self.var = (1 - a) * (self.var + a * d * d)
        return step if fire else None


def run_detector(det, steps: list, losses: list, grads: list | None) -> tuple[list, float]:
    """Feed a whole curve; return (alarms as (step, onset), seconds spent inside update)."""
    alarms = []
    upd = det.update
    g = grads if grads is not None else [None] * len(losses)
    t0 = time.perf_counter()
    for s, l, gn in zip(steps, losses, g):
        r = upd(s, l, gn)
        if r is not None:
            alarms.append(r)
    dt = time.perf_counter() - t0
    out = []
    for r in alarms:
        out.append((r.step, r.onset_step) if hasattr(r, "onset_step") else (r, r))
    return out, dt


def synthetic(seed: int, n_curves: int, length: int, config: SpikeConfig) -> dict:
    rng = np.random.default_rng(seed)
    res = {"healthy": 0, "healthy_fa": 0, "spiky": 0, "hits": 0, "spiky_fa": 0,
           "onset_exact": 0, "onset_pm1": 0, "onset_late": 0, "delays": [], "updates": 0, "det_s": 0.0,
           "base_s": 0.0, "base_healthy_fa": 0, "base_hits": 0, "misses": []}
    combos = [(sh, nk, lv) for sh in SHAPES for nk in NOISES for lv in NOISE_LEVELS]
    for c in range(n_curves):
        shape, noise, level = combos[c % len(combos)]
        mode = ("grad_first", "together", "no_grad")[c % 3]
        loss, grad = healthy_curve(rng, length, shape, noise, level, with_grad=mode != "no_grad")
        steps = list(range(length))
        # healthy run
        alarms, dt = run_detector(SpikeDetector(config), steps, loss.tolist(),
                                  None if grad is None else grad.tolist())
        balarms, bdt = run_detector(EmaZ(), steps, loss.tolist(), None)
        res["healthy"] += 1
        res["healthy_fa"] += bool(alarms)
        res["base_healthy_fa"] += bool(balarms)
        res["updates"] += length
        res["det_s"] += dt
        res["base_s"] += bdt
        # the same run with a spike
        loss2, grad2 = loss.copy(), None if grad is None else grad.copy()
        onset = int(rng.integers(config.warmup_steps + 300, length - 60))
        peak = float(rng.uniform(1.6, 3.0))
        duration = int(rng.integers(3, 41))
        label, last = inject_spike(rng, loss2, grad2, onset, peak, duration, mode)
        alarms, _ = run_detector(SpikeDetector(config), steps, loss2.tolist(),
                                 None if grad2 is None else grad2.tolist())
        balarms, _ = run_detector(EmaZ(), steps, loss2.tolist(), None)
        res["spiky"] += 1
        first = alarms[0] if alarms else None
        if first is not None and first[0] < label:
            res["spiky_fa"] += 1
        elif first is not None and first[0] <= last and label - 5 <= first[1] <= label + 2:
            res["hits"] += 1
            res["onset_exact"] += first[1] == label
            res["onset_pm1"] += abs(first[1] - label) <= 1
            res["onset_late"] += first[1] > label
            res["delays"].append(first[0] - label)
        else:
            res["misses"].append({"shape": shape, "noise": noise, "level": level, "mode": mode,
                                  "peak": round(peak, 2), "duration": duration,
                                  "alarm": first, "label": label})
        if balarms and label <= balarms[0][0] <= last:
            res["base_hits"] += 1
    return res


def real_cases(seeds: int, config: SpikeConfig) -> dict:
    """Per excerpt: share of prefix seeds on which it is caught with an onset in its labelled
    window, the most common (onset, alarm) steps, and the labelled window."""
    out = {}
    for name, rows, stride, (lo, hi), noise, gnoise in REAL_SPIKES:
        hits, firsts = 0, []
        for seed in range(seeds):
            steps, losses, grads = _with_prefix(seed, rows, stride, noise, gnoise)
            alarms, _ = run_detector(SpikeDetector(config), steps, losses, grads)
            first = alarms[0] if alarms else None
            hits += first is not None and first[0] >= lo and lo <= first[1] <= hi
            firsts.append(None if first is None else (first[1], first[0]))
        typical = statistics.mode(firsts)
        out[name] = {"recall": round(hits / seeds, 3), "labelled_onset": [lo, hi],
                     "onset": typical and typical[0], "alarm": typical and typical[1]}
    for name, rows, stride, noise, gnoise in REAL_HEALTHY:
        fas = 0
        for seed in range(seeds):
            steps, losses, grads = _with_prefix(seed, rows, stride, noise, gnoise)
            alarms, _ = run_detector(SpikeDetector(config), steps, losses, grads)
            fas += bool(alarms)
        out[name] = {"false_alarms": fas, "runs": seeds}
    return out


def long_healthy(seed: int, n_curves: int, length: int, config: SpikeConfig) -> tuple[int, int]:
    """(records, alarms) over long healthy runs cycling through every shape/noise/level."""
    rng = np.random.default_rng(seed)
    combos = [(sh, nk, lv) for sh in SHAPES for nk in NOISES for lv in NOISE_LEVELS]
    alarms = 0
    for c in range(n_curves):
        shape, noise, level = combos[(c * 7) % len(combos)]
        loss, grad = healthy_curve(rng, length, shape, noise, level, with_grad=c % 2 == 0)
        found, _ = run_detector(SpikeDetector(config), list(range(length)), loss.tolist(),
                                None if grad is None else grad.tolist())
        alarms += len(found)
    return n_curves * length, alarms


def _with_prefix(seed: int, rows: list, stride: int, noise: float, gnoise: float | None,
                 n_prefix: int = 300) -> tuple[list, list, list | None]:
    """Synthetic healthy prefix at the excerpt's first-record level, then the excerpt itself."""
    rng = np.random.default_rng(1000 + seed)
    first_step, first_loss, first_g = rows[0]
    steps = [first_step - stride * (n_prefix - i) for i in range(n_prefix)]
    losses = (first_loss * (1 + noise * rng.standard_normal(n_prefix))).tolist()
    grads = None
    if first_g is not None:
        grads = (first_g * np.exp(gnoise * rng.standard_normal(n_prefix))).tolist()
        grads += [g for _, _, g in rows]
    steps += [s for s, _, _ in rows]
    losses += [lo for _, lo, _ in rows]
    return steps, losses, grads


def main() -> None:
    quick = "--quick" in sys.argv
    config = SpikeConfig()
    r = synthetic(seed=20240412, n_curves=150 if quick else 600, length=1500, config=config)
    long_records, long_alarms = long_healthy(seed=31216, n_curves=5 if quick else 40, length=20000,
                                             config=config)
    real = real_cases(seeds=10 if quick else 30, config=config)
    det_us = r["det_s"] / r["updates"] * 1e6
    base_us = r["base_s"] / r["updates"] * 1e6
    d = sorted(r["delays"])
    hits = max(1, r["hits"])
    line = {
        "bench": "spike_detector",
        "recall": round(r["hits"] / r["spiky"], 4),
        "spiky_curves": r["spiky"],
        "false_alarm_healthy_curves": r["healthy_fa"],
        "healthy_curves": r["healthy"],
        "false_alarm_before_spike": r["spiky_fa"],
        "long_healthy_records": long_records,
        "long_healthy_alarms": long_alarms,
        # records from the first anomalous record (grad-norm lead included) to the alarm
        "delay_median_records": statistics.median(d) if d else None,
        "delay_p90_records": d[int(0.9 * (len(d) - 1))] if d else None,
        "onset_exact": round(r["onset_exact"] / hits, 4),
        "onset_within_1": round(r["onset_pm1"] / hits, 4),
        "onset_late": round(r["onset_late"] / hits, 4),
        "per_update_us": round(det_us, 2),
        "baseline_per_update_us": round(base_us, 2),
        "cost_ratio_vs_baseline": round(det_us / base_us, 2),
        "baseline_recall": round(r["base_hits"] / r["spiky"], 4),
        "baseline_false_alarm_healthy_curves": r["base_healthy_fa"],
        "real": real,
        "misses": r["misses"][:3],
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
