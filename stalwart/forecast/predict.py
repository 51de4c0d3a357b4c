"""Forecast the loss of a bigger run from finished smaller ones: the entry points of the package.

`forecast_compute` predicts the best loss reachable with a compute budget (from the frontier and
L(C)); `forecast_size` predicts the loss of a given model size trained on a given number of tokens
(from L(N, D) fitted on every run). Both refuse, with a `ForecastError` naming every failed check,
to extrapolate from a fit that cannot be trusted, unless `force=True`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
from scipy.stats import norm

from stalwart.forecast import checks
from stalwart.forecast.compute_law import ComputeFit, fit_compute_law
from stalwart.forecast.errors import ForecastError, Problem, RunsFileError
from stalwart.forecast.frontier import Frontier, extract_frontier
from stalwart.forecast.runs import Runs
from stalwart.forecast.size_law import SizeFit, fit_size_law

# Runs trained on fewer tokens per parameter than this (a quarter of the ~20 that is compute-optimal)
# are left out of an L(N, D) fit by default: they are short enough for the warmup and schedule to
# dominate, and sit far from where the law is meant to hold. On Gadre et al.'s sweep, keeping its runs
# at 5 tokens per parameter raised the median error of the 1000x forecasts from 2.4% to 5.9%
# (docs/BENCHMARKS.md; three sets only).
MIN_TOKENS_PER_PARAM = 10.0


@dataclass(frozen=True)
class Forecast:
    """A prediction and how far to trust it. `law` is "compute" (L(C) on the frontier) or "size"
    (L(N, D)); `low`/`high` bound the prediction at `level`; `warnings` lists the failed checks
    (non-empty only when forced); `notes` says what was left out and why; `used` holds the runs fitted."""

    law: str
    target: dict
    prediction: float
    low: float
    high: float
    level: float
    params: dict
    quality: dict
    frontier: Frontier
    fit: Union[ComputeFit, SizeFit] = field(repr=False)
    used: Runs = field(repr=False)
    warnings: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def to_json(self) -> dict:
        return {"prediction": self.prediction, "low": self.low, "high": self.high, "level": self.level,
                "law": self.law, "target": self.target, "params": self.params, "quality": self.quality,
                "frontier": self.frontier.to_rows(), "warnings": [p._asdict() for p in self.warnings],
                "notes": list(self.notes)}


def forecast_compute(runs: Runs, target_compute: float, *, level: float = 0.9, force: bool = False,
                     smooth: bool = True) -> Forecast:
    """The best loss reachable with `target_compute` FLOPs, from the runs' frontier and L(C).

    `level`: the interval's coverage (0 < level < 1). `smooth`: parabola frontier points where a budget
    has runs around its best (needs params). Raises ForecastError listing the failed checks (too few
    budgets, a short compute range or too far a target, a frontier that does not fall, an exponent
    outside the published band); with `force`, returns the fit with them in `warnings`, unless no
    law can be fitted at all (fewer than 2 budgets)."""
    _check_level(level)
    if not target_compute > 0:
        raise ValueError(f"target compute must be positive, got {target_compute}")
    frontier = extract_frontier(runs.compute, runs.loss, runs.params, smooth=smooth)
    problems = (checks.count_problems(len(frontier), checks.MIN_BUDGETS, "compute budgets")
                + checks.reach_problems(frontier.compute, target_compute)
                + checks.falling_problems(frontier.compute, frontier.loss))
    if len(frontier) < 2:
        raise ForecastError(problems or [Problem("too_few_points", "one compute budget")], None)
    try:
        fit = fit_compute_law(frontier.compute, frontier.loss)
    except ValueError as exc:
        raise ForecastError(problems + [Problem("not_falling", str(exc))], None) from None
    problems += checks.exponent_problems("b", fit.b, checks.B_RANGE)
    lo, mid, hi = fit.quantiles([target_compute], _quantiles(level))[:, 0]
    quality = _quality(fit.residuals(), fit.r2(), len(frontier), fit.best(target_compute))
    drift = float("nan")
    if len(frontier) >= checks.MIN_BUDGETS + 1:  # the sub-fit keeps one degree of freedom
        sub = fit_compute_law(frontier.compute[:-1], frontier.loss[:-1])
        drift = _drift(sub.quantiles(frontier.compute[-1:])[1], frontier.loss[-1:], frontier.compute[-1:],
                       frontier.compute[-2])
    lo, hi = _widen(lo, mid, hi, drift, target_compute, frontier.compute.max(), level, quality)
    result = Forecast("compute", {"compute": float(target_compute)}, float(mid), float(lo), float(hi), level,
                      fit.params, quality, frontier, fit, runs, problems)
    return _refuse_or_return(result, problems, force)


def forecast_size(runs: Runs, target_params: float, target_tokens: float, *, level: float = 0.9,
                  force: bool = False, min_tokens_per_param: float = MIN_TOKENS_PER_PARAM) -> Forecast:
    """The loss of a `target_params`-parameter model trained on `target_tokens` tokens, from L(N, D).

    Needs runs with params and tokens (RunsFileError otherwise). Runs below `min_tokens_per_param` are
    left out (said in `notes`). The prediction and interval are the weighted median and quantiles
    over the laws that fit (size_law.py); `params` is the best one. Raises ForecastError as
    `forecast_compute` does (checks: runs, spans of compute, N and D, a falling frontier, alpha and
    beta in the published band), and even when forced if fewer than 5 runs remain."""
    _check_level(level)
    if not runs.has_params_tokens:
        raise RunsFileError("an L(N, D) forecast needs 'params' and 'tokens' columns", source=runs.source)
    if not (target_params > 0 and target_tokens > 0):
        raise ValueError("target params and tokens must be positive")
    keep = runs.tokens / runs.params >= min_tokens_per_param
    used = runs.subset(keep)
    notes = []
    if (~keep).any():
        notes.append(f"left out {int((~keep).sum())} run(s) with fewer than {min_tokens_per_param:g} tokens "
                     "per parameter")
    target_compute = 6.0 * target_params * target_tokens
    frontier = extract_frontier(runs.compute, runs.loss, runs.params)
    problems = checks.count_problems(len(used), checks.MIN_SIZE_RUNS, "runs")
    if len(used) >= 2:
        used_frontier = extract_frontier(used.compute, used.loss, smooth=False)
        problems += (checks.reach_problems(used.compute, target_compute)
                     + checks.span_problems(used.params, "parameters")
                     + checks.span_problems(used.tokens, "tokens")
                     + checks.falling_problems(used_frontier.compute, used_frontier.loss))
    if len(used) < 5:  # fewer runs than parameters: nothing to return even when forced
        raise ForecastError(problems, None)
    try:
        fit = fit_size_law(used.params, used.tokens, used.loss)
    except ValueError as exc:
        raise ForecastError(problems + [Problem("not_falling", str(exc))], None) from None
    problems += (checks.exponent_problems("alpha", fit.alpha, checks.ALPHA_BETA_RANGE)
                 + checks.exponent_problems("beta", fit.beta, checks.ALPHA_BETA_RANGE))
    lo, mid, hi = fit.quantiles(target_params, target_tokens, _quantiles(level))
    quality = _quality(fit.residuals(), fit.r2(), len(used), float(fit.predict(target_params, target_tokens)))
    # No widening by held-out drift here, unlike L(C): on Gadre et al.'s sweep the drift of a sub-fit
    # of ~10 runs tripled the interval's width at 1000x, where the interval already held the truth;
    # three sets are too few to show it is worth that (docs/BENCHMARKS.md).
    quality.update({"held_out_drift_per_decade": float("nan"),
                    "decades_beyond": max(float(np.log10(target_compute / used.compute.max())), 0.0)})
    result = Forecast("size", {"params": float(target_params), "tokens": float(target_tokens),
                               "compute": target_compute}, float(mid), float(lo), float(hi), level,
                      fit.params, quality, frontier, fit, used, problems, notes)
    return _refuse_or_return(result, problems, force)


def _refuse_or_return(result: Forecast, problems: list[Problem], force: bool) -> Forecast:
    if problems and not force:
        raise ForecastError(problems, result)
    return result


def _drift(predicted, observed, compute, fitted_max: float) -> float:
    """Relative error per decade of compute of a sub-fit's predictions for held-out points lying
    beyond its largest compute `fitted_max` (points within 0.1 decade count as 0.1 decade out)."""
    errors = np.asarray(predicted) / np.asarray(observed) - 1
    decades = np.maximum(np.log10(np.asarray(compute) / fitted_max), 0.1)
    return float(np.sqrt(np.mean(errors ** 2) / np.mean(decades ** 2)))


def _widen(lo, mid, hi, drift: float, target: float, fitted_max: float, level: float, quality: dict):
    """The interval of the weighed laws, widened by the drift measured on held-out points times the
    decades to the target (added in quadrature to each side). The weighed laws only know the noise
    about one law family; the held-out points show how far that family itself bends away, which is
    what grows with the reach (at 16x on the Porian sweeps, the interval alone held the truth on 10
    of 15 sets, with the drift on 13)."""
    decades = max(float(np.log10(target / fitted_max)), 0.0)
    quality.update({"held_out_drift_per_decade": drift, "decades_beyond": decades})
    if not np.isfinite(drift) or decades == 0:
        return float(lo), float(hi)
    half = float(norm.ppf(_quantiles(level)[2])) * drift * decades * mid
    return float(mid - np.hypot(mid - lo, half)), float(mid + np.hypot(hi - mid, half))


def _quality(residuals: np.ndarray, r2: float, points: int, best_prediction) -> dict:
    return {"points": points, "r2_log": r2, "rms_residual": float(np.sqrt(np.mean(residuals ** 2))),
            "max_abs_residual": float(np.max(np.abs(residuals))), "residuals": [float(r) for r in residuals],
            "best_fit_prediction": float(best_prediction)}


def _quantiles(level: float) -> tuple[float, float, float]:
    return ((1 - level) / 2, 0.5, (1 + level) / 2)


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must lie between 0 and 1, got {level}")


def resolve_target(compute: Optional[float] = None, params: Optional[float] = None,
                   tokens: Optional[float] = None) -> dict:
    """What a target asks for: {"law": "compute", "compute": C} for a compute alone, else {"law": "size",
    "params": N, "tokens": D, "compute": 6ND}, any two of the three determining the third.
    Raises ValueError for no target, params or tokens alone, a non-positive value, or three values
    that disagree (6*N*D off the compute by more than 1%)."""
    given = {k: v for k, v in (("compute", compute), ("params", params), ("tokens", tokens)) if v is not None}
    bad = [k for k, v in given.items() if not v > 0]
    if bad:
        raise ValueError(f"the target {bad[0]} must be positive")
    if set(given) == {"compute"}:
        return {"law": "compute", "compute": float(compute)}
    if len(given) < 2:
        raise ValueError("give a target: --target-compute, or two of --target-compute, --target-params, "
                         "--target-tokens")
    if params is None:
        params = compute / (6.0 * tokens)
    if tokens is None:
        tokens = compute / (6.0 * params)
    if compute is not None and abs(6.0 * params * tokens / compute - 1) > 0.01:
        raise ValueError(f"the target compute {compute:.4g} is not 6 * params * tokens ({6.0 * params * tokens:.4g})")
    return {"law": "size", "params": float(params), "tokens": float(tokens), "compute": 6.0 * params * tokens}
