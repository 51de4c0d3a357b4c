"""The checks a scaling fit must pass before its extrapolation is believed. Each returns a list of
`Problem`s (empty when it passes); `predict.py` refuses on any, unless forced.

The thresholds are deliberately loose: they catch fits that cannot be right, not fits that might be
off by a few percent (the interval says that)."""

from __future__ import annotations

import numpy as np

from stalwart.forecast.errors import (EXPONENT_OUT_OF_RANGE, NOT_FALLING, SHORT_RANGE, TOO_FEW_POINTS,
                                      Problem)

# L(C) has 3 parameters: 4 budgets leave one degree of freedom to test the law on.
MIN_BUDGETS = 4
# L(N, D) has 5 parameters.
MIN_SIZE_RUNS = 8
# The fitted points must span at least a factor 4 (two doublings) in compute (and, for L(N, D), in N
# and in D), and the target may lie at most this many times as many decades beyond the largest fitted
# compute as the fitted points span: a 10x span may be stretched 1000x, not 10^6x.
MIN_SPAN = 4.0
MAX_REACH = 3.0
# Exponents seen in published fits: L(C) with an irreducible term, b ~0.05-0.35 (Hoffmann et al. 2022
# imply ~0.15; the isoFLOP sweeps of Porian et al. 2024, fitted whole, give 0.07-0.33); L(N, D), alpha and
# beta ~0.07-0.7 (Kaplan et al. 2020 ~0.08-0.1 without E; Hoffmann et al. 0.34/0.28; Besiroglu et al.
# 2024 0.35/0.37). The bands below are wider than all of these.
B_RANGE = (0.02, 0.6)
ALPHA_BETA_RANGE = (0.03, 1.2)


def count_problems(n: int, minimum: int, what: str) -> list[Problem]:
    if n < minimum:
        return [Problem(TOO_FEW_POINTS, f"{n} {what}; the fit needs at least {minimum}")]
    return []


def reach_problems(fitted_compute: np.ndarray, target_compute: float) -> list[Problem]:
    """The fitted compute range is too short, or the target too far beyond it."""
    lo, hi = float(np.min(fitted_compute)), float(np.max(fitted_compute))
    if hi / lo < MIN_SPAN:
        return [Problem(SHORT_RANGE, f"the fitted runs span {hi / lo:.3g}x in compute ({lo:.3g} to {hi:.3g} "
                                     f"FLOPs); at least {MIN_SPAN:g}x is needed to see a trend")]
    reach = np.log10(target_compute / hi) / np.log10(hi / lo)
    if reach > MAX_REACH:
        return [Problem(SHORT_RANGE, f"the target ({target_compute:.3g} FLOPs) lies {target_compute / hi:.3g}x "
                                     f"beyond the largest fitted run, more than {MAX_REACH:g} times the "
                                     f"{hi / lo:.3g}x the fitted runs span (in decades)")]
    return []


def span_problems(values: np.ndarray, what: str) -> list[Problem]:
    span = float(np.max(values) / np.min(values))
    if span < MIN_SPAN:
        return [Problem(SHORT_RANGE, f"the fitted runs span {span:.3g}x in {what}; at least {MIN_SPAN:g}x is needed")]
    return []


def falling_problems(compute: np.ndarray, loss: np.ndarray) -> list[Problem]:
    """The frontier must fall: a least-squares line of log loss on log compute with a negative slope."""
    if len(loss) < 2 or np.ptp(np.log(compute)) == 0:
        return []  # counted by count_problems
    slope = float(np.polyfit(np.log(compute), np.log(loss), 1)[0])
    if slope >= 0:
        return [Problem(NOT_FALLING, f"the best loss does not fall with compute (log-log slope {slope:+.3f}); "
                                     "more compute would not help by this data")]
    return []


def exponent_problems(name: str, value: float, band: tuple[float, float]) -> list[Problem]:
    lo, hi = band
    if not lo <= value <= hi:
        return [Problem(EXPONENT_OUT_OF_RANGE, f"the fitted exponent {name} = {value:.3g} lies outside "
                                               f"[{lo:g}, {hi:g}], beyond any published fit")]
    return []
