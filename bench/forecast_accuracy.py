"""Benchmark of `stalwart.forecast` on public scaling sweeps: how close is a forecast made from
runs with 100-1000x less compute, and does its interval hold the truth?

Prints ONE JSON line (details per set on stderr with --verbose). Run it with the data directory:
`python bench/forecast_accuracy.py DATA_DIR [--verbose] [--ratio R]` (the public sweeps, with a
README naming them; --ratio fits up to another fraction of the largest compute than the protocol's).

Protocol (issue 13): per set, fit only the runs with compute <= 1/1000 of the largest (1/100 where the
set spans less than 10^4, which would leave the fit under 10x), predict the best loss at the largest
budget, and report the relative error and whether the 90% interval holds the truth.
* Porian et al. 2024 isoFLOP sweeps, one set per experimental setting (dataset, hparams, warmup,
  decay, param_count, loss_split): the truth is the best run at the largest budget; ours is
  `forecast_compute` (frontier, parabola-smoothed, and L(C)).
* Gadre et al. 2024 over-training grid, one set per training dataset, C4 validation loss: the largest
  budget holds one run, so the truth is that run's loss and ours is `forecast_size` at its N and D.
The anchor, on the same runs: a plain power law L = a*C^(-b) fitted (least squares, log-log) to the
frontier's best observed losses, read at the target compute.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, note  # noqa: E402

from stalwart.forecast import Runs, extract_frontier, forecast_compute, forecast_size  # noqa: E402
from stalwart.forecast.frontier import budget_groups  # noqa: E402

PORIAN = "porian2024_isoflop_runs.csv"
GADRE = "gadre2024_overtraining_104_models_losses.csv"
PORIAN_SETTING = ("dataset", "hparams", "warmup", "decay", "param_count", "loss_split")
LEVEL = 0.9


def porian_sets(data: Path):
    groups = defaultdict(list)
    with open(data / PORIAN) as f:
        for row in csv.DictReader(f):
            groups["/".join(row[k] for k in PORIAN_SETTING)].append(row)
    for name, rows in sorted(groups.items()):
        arr = {k: np.array([float(r[k]) for r in rows]) for k in ("flops", "params", "tokens", "loss")}
        yield "porian:" + name, Runs(arr["flops"], arr["loss"], arr["params"], arr["tokens"], name)


def gadre_sets(data: Path, loss_column: str = "loss_c4_val"):
    groups = defaultdict(list)
    with open(data / GADRE) as f:
        for row in csv.DictReader(f):
            groups[row["train_dataset"]].append(row)
    for name, rows in sorted(groups.items()):
        n = np.array([float(r["params"]) for r in rows])
        d = np.array([float(r["tokens"]) for r in rows])
        loss = np.array([float(r[loss_column]) for r in rows])
        yield f"gadre:{name}/{loss_column}", Runs(6 * n * d, loss, n, d, name)


def hold_out(runs: Runs, ratio: float | None = None):
    """(runs to fit, target budget's runs, the ratio used)."""
    span = runs.compute.max() / runs.compute.min()
    if ratio is None:
        ratio = 1e-3 if span >= 1e4 else 1e-2
    top = budget_groups(runs.compute)[-1]
    fit = runs.compute <= runs.compute[top].min() * ratio * (1 + 1e-6)
    return runs.subset(fit), top, ratio


def anchor(fit_runs: Runs, target_compute: float) -> float:
    f = extract_frontier(fit_runs.compute, fit_runs.loss, smooth=False)
    slope, icept = np.polyfit(np.log(f.compute), np.log(f.best_observed), 1)
    return float(np.exp(icept + slope * np.log(target_compute)))


def evaluate(name: str, runs: Runs, ratio: float | None = None) -> dict:
    fit_runs, top, ratio = hold_out(runs, ratio)
    best = top[np.argmin(runs.loss[top])]
    truth, target_c = float(runs.loss[best]), float(np.exp(np.mean(np.log(runs.compute[top]))))
    t0 = time.perf_counter()
    if name.startswith("gadre"):
        f = forecast_size(fit_runs, float(runs.params[best]), float(runs.tokens[best]), level=LEVEL, force=True)
    else:
        f = forecast_compute(fit_runs, target_c, level=LEVEL, force=True)
    seconds = time.perf_counter() - t0
    a = anchor(fit_runs, target_c)
    return {"set": name, "law": f.law, "ratio": ratio, "fit_runs": len(fit_runs), "fit_points": f.quality["points"],
            "reach": target_c / fit_runs.compute.max(), "truth": truth, "prediction": f.prediction,
            "low": f.low, "high": f.high, "error": f.prediction / truth - 1,
            "covered": f.low <= truth <= f.high, "width": (f.high - f.low) / truth,
            "best_fit_error": f.quality["best_fit_prediction"] / truth - 1,
            "anchor": a, "anchor_error": a / truth - 1, "warnings": [p.code for p in f.warnings],
            "params": f.params, "seconds": seconds}


def summary(rows: list[dict]) -> dict:
    def med(key):
        return statistics.median(abs(r[key]) for r in rows)
    return {"sets": len(rows), "median_abs_error": med("error"), "anchor_median_abs_error": med("anchor_error"),
            "best_fit_median_abs_error": med("best_fit_error"),
            "max_abs_error": max(abs(r["error"]) for r in rows),
            "coverage": sum(r["covered"] for r in rows) / len(rows),
            "median_interval_width": statistics.median(r["width"] for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_dir", type=Path, help="the directory holding the public sweeps (see its README)")
    ap.add_argument("--verbose", action="store_true", help="one line per set on stderr")
    ap.add_argument("--ratio", type=float, help="fit runs up to this fraction of the largest compute instead "
                                                "(to see how the error grows with the reach)")
    args = ap.parse_args()
    rows = []
    for name, runs in list(porian_sets(args.data_dir)) + list(gadre_sets(args.data_dir)):
        r = evaluate(name, runs, args.ratio)
        rows.append(r)
        if args.verbose:
            note(f"{name:52s} x{r['reach']:<6.0f} truth {r['truth']:.3f} ours {r['prediction']:.3f} "
                 f"[{r['low']:.3f}, {r['high']:.3f}] err {r['error']:+.2%} {'in ' if r['covered'] else 'OUT'} "
                 f"best-fit {r['best_fit_error']:+.2%} anchor {r['anchor_error']:+.2%} {','.join(r['warnings'])}")
    by_source = {src: summary([r for r in rows if r["set"].startswith(src)]) for src in ("porian", "gadre")}
    emit({"benchmark": "forecast_accuracy", "level": LEVEL, "ratio": args.ratio or "protocol", "all": summary(rows),
          **by_source,
          "sets": [{k: r[k] for k in ("set", "reach", "truth", "prediction", "low", "high", "error", "covered",
                                      "anchor_error", "warnings")} for r in rows]})


if __name__ == "__main__":
    main()
