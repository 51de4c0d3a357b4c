"""Benchmark of the live forecast band: the tiny GPT run as stalwart jobs (real Ray, 2 ranks), one with a
cosine schedule and one with constant-then-linear-decay (WSD), the controller fitting the curve law on
each run's first 20 % of steps as it trains.

Prints ONE JSON line. `python bench/live_forecast.py [--steps N]` (default 600 steps a run).

Per run: the forecast of the final loss the controller made (`forecast_ready`) against the truth (the
mean of the last 20 losses rank 0 reported), its relative error, whether its interval held the truth,
and, as the baseline side by side, the error of a persistence forecast (the mean of the last 20 losses
of the fitted steps, taken as the final loss). Also: the share of the steps after the fit at which the
loss (its 20-step median) was inside the band (or below it when the band is an upper bound: that is
not told either), the `forecast_band_left` events on these healthy runs
(each is a false alarm), and the restarts (the trend and spike detectors run too: any is a false
alarm on a healthy run).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, note, start_local_ray  # noqa: E402
from jobspecs import tiny_gpt_spec  # noqa: E402


def run(client, schedule: str, steps: int) -> dict:
    spec = tiny_gpt_spec(steps=steps, checkpoint={"every_steps": 100})
    spec["config"].update(schedule=schedule, warmup=max(5, steps // 30))
    t0 = time.perf_counter()
    job = client.submit(spec)
    status = job.wait(timeout=3600)
    events = job.events()
    losses = {m["step"]: m["loss"] for m in job.metrics() if isinstance(m.get("loss"), (int, float))}
    truth = statistics.fmean(losses[s] for s in sorted(losses)[-20:])
    ready = [e["data"] for e in events if e["kind"] == "forecast_ready"]
    out = {"schedule": schedule, "steps": steps, "state": status["state"], "restarts": status.get("restarts") or {},
           "truth": truth, "seconds": time.perf_counter() - t0,
           "band_left_events": [e["data"] for e in events if e["kind"] == "forecast_band_left"]}
    if not ready:
        out["forecast"] = None
        out["why"] = [e["message"] for e in events if e["kind"] == "forecast_unavailable"]
        return out
    f = ready[0]
    fit_end = f["fitted_on"][1]
    prefix = [losses[s] for s in sorted(losses) if s <= fit_end][-20:]
    persistence = statistics.fmean(prefix)
    band = status["forecast_band"]
    post = [s for s in sorted(losses) if s > fit_end + 20]
    inside = 0
    for s in post:
        window = [losses[t] for t in range(s - 19, s + 1) if t in losses]
        med = statistics.median(window)
        lo, hi = np.interp(s, band["steps"], band["low"]), np.interp(s, band["steps"], band["high"])
        inside += bool(lo <= med <= hi) or (band["upper_bound"] and med < lo)
    out.update(forecast=f["prediction"], low=f["low"], high=f["high"], fitted_on=f["fitted_on"],
               upper_bound=f["upper_bound"], error=f["prediction"] / truth - 1,
               covered=f["low"] <= truth <= f["high"], width=(f["high"] - f["low"]) / truth,
               baseline_persistence_error=persistence / truth - 1,
               abs_error_ratio_vs_persistence=abs(f["prediction"] / truth - 1) / abs(persistence / truth - 1),
               steps_inside_band=inside / len(post) if post else None)
    note(f"{schedule}: truth {truth:.4f} forecast {f['prediction']:.4f} [{f['low']:.4f}, {f['high']:.4f}] "
         f"error {out['error']:+.2%} (persistence {out['baseline_persistence_error']:+.2%}), "
         f"inside the band {out['steps_inside_band']:.0%}, band left {len(out['band_left_events'])}x")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    args = ap.parse_args()
    start_local_ray()
    import stalwart

    client = stalwart.Client()
    runs = [run(client, kind, args.steps) for kind in ("cosine", "wsd")]
    errors = [abs(r["error"]) for r in runs if r.get("forecast") is not None]
    emit({"benchmark": "live_forecast", "fit_fraction": 0.2, "runs": runs,
          "median_abs_error": statistics.median(errors) if errors else None,
          "median_abs_error_persistence": statistics.median(abs(r["baseline_persistence_error"]) for r in runs
                                                            if r.get("forecast") is not None) if errors else None})


if __name__ == "__main__":
    main()
