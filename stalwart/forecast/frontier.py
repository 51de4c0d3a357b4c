"""The compute-optimal frontier of an isoFLOP sweep: the best loss reached at each compute budget.

A sweep trains many model sizes per budget, most of them too big or too small for it; only the best
one per budget says how loss falls with compute. The best observed run is a noisy minimum (it is
biased low, and the next budget may have sampled the optimum better), so where a budget has enough
runs around its best one, a parabola in log N through them gives the frontier point instead
(Chinchilla's approach 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

# Budgets closer than this (in decades of compute) are one budget: 6*N*D rounds differently for
# runs meant to share a budget, and real budgets sit a factor of 1.4 or more apart.
SAME_BUDGET_DEX = 0.02
# The parabola goes through this many runs around the best one, which needs a run on each side (a
# vertex bracketed by the sizes tried). On the Porian sweeps at 128x: median error 2.3 % this way,
# 4.3 % with symmetric windows (two runs each side: half as many budgets smoothed), 3.9 % with the
# best run per budget (docs/BENCHMARKS.md).
PARABOLA_RUNS = 5


@dataclass(frozen=True)
class Frontier:
    """One point per budget, smallest budget first: `compute`, `loss` (the frontier's loss),
    `best_observed` (the best run's loss), `runs` (runs at that budget), `smoothed` (True where the
    point came from a parabola), `params` (the optimal size where known, else NaN)."""

    compute: np.ndarray
    loss: np.ndarray
    best_observed: np.ndarray
    runs: np.ndarray
    smoothed: np.ndarray
    params: np.ndarray

    def __len__(self) -> int:
        return len(self.loss)

    def to_rows(self) -> list[dict]:
        return [{"compute": float(c), "loss": float(l), "best_observed": float(b), "runs": int(n),
                 "smoothed": bool(s), **({"params": float(p)} if np.isfinite(p) else {})}
                for c, l, b, n, s, p in zip(self.compute, self.loss, self.best_observed, self.runs,
                                            self.smoothed, self.params)]


def budget_groups(compute: np.ndarray) -> list[np.ndarray]:
    """Indices of the runs of each budget, smallest budget first. Runs whose log10 compute lies
    within SAME_BUDGET_DEX of the previous one (in sorted order) join its budget."""
    order = np.argsort(compute, kind="stable")
    logc = np.log10(compute[order])
    breaks = np.flatnonzero(np.diff(logc) > SAME_BUDGET_DEX) + 1
    return [g for g in np.split(order, breaks) if len(g)]


def extract_frontier(compute: np.ndarray, loss: np.ndarray, params: Optional[np.ndarray] = None,
                     smooth: bool = True) -> Frontier:
    """The lower envelope of (compute, loss), one point per budget (see `budget_groups`).

    With `params` and `smooth`, a budget of at least PARABOLA_RUNS runs whose best run has runs of
    other sizes on both sides gets the vertex of a parabola (loss against log N) through the
    PARABOLA_RUNS runs nearest in size, if it opens upwards and its vertex lies between them;
    otherwise the best run's loss.
    Precondition: arrays of one length, all values positive (as `Runs` holds them)."""
    cs, ls, bs, ns, ss, ps = [], [], [], [], [], []
    for idx in budget_groups(compute):
        best = idx[np.argmin(loss[idx])]
        value, size, smoothed = loss[best], (params[best] if params is not None else np.nan), False
        if smooth and params is not None:
            vertex = _parabola_vertex(np.log(params[idx]), loss[idx])
            if vertex is not None:
                (logn, value), smoothed = vertex, True
                size = float(np.exp(logn))
        cs.append(float(np.exp(np.mean(np.log(compute[idx])))))
        ls.append(float(value))
        bs.append(float(loss[best]))
        ns.append(len(idx))
        ss.append(smoothed)
        ps.append(size)
    return Frontier(np.array(cs), np.array(ls), np.array(bs), np.array(ns), np.array(ss), np.array(ps, dtype=float))


def _parabola_vertex(logn: np.ndarray, loss: np.ndarray) -> Optional[tuple[float, float]]:
    """(log N, loss) at the vertex of a parabola through the best run and its neighbours in size
    (PARABOLA_RUNS of them, the window shifted where the best run is near an edge), or None when
    the best run has no run on one side, fewer runs exist, or the parabola does not open upwards
    with its vertex between the runs used."""
    order = np.argsort(logn)
    logn, loss = logn[order], loss[order]
    i = int(np.argmin(loss))
    if len(loss) < PARABOLA_RUNS or i == 0 or i == len(loss) - 1:
        return None  # an optimum at the edge of the sizes tried is not bracketed
    lo = min(max(i - PARABOLA_RUNS // 2, 0), len(loss) - PARABOLA_RUNS)
    x, y = logn[lo:lo + PARABOLA_RUNS], loss[lo:lo + PARABOLA_RUNS]
    if np.ptp(x) <= 0:
        return None  # several runs of one size: no curvature to fit
    k2, k1, k0 = np.polyfit(x, y, 2)
    if k2 <= 0:
        return None
    xv = -k1 / (2 * k2)
    if not x[0] <= xv <= x[-1]:
        return None
    return float(xv), float(k0 - k1 * k1 / (4 * k2))
