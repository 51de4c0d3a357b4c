"""L(C) = a * C^(-b) + c: loss against training compute, with c the loss no compute removes.

Fitted on a frontier (one point per budget), usually 4-12 points. So few points pin the curve's bend
(and with it c) only loosely: laws with quite different c fit them almost equally well and part ways
far beyond them. The forecast therefore weighs every law on a grid of (b, c) by how well it fits
(a follows from b and c by least squares) and reports the median and quantiles of their
predictions, while the single best law (a Huber fit on log loss) gives the parameters and residuals.
On the public sweeps in docs/BENCHMARKS.md the median over laws missed by less than the best law did,
which overshoots whenever noise makes the points look more bent than they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

# The grid of laws weighed: b log-spaced (a scale-free prior on the exponent), c uniform below the
# lowest loss seen. Both wider than any published fit, so that the checks can see a fit run off.
B_GRID = np.geomspace(0.01, 1.5, 160)
C_STEPS = 160
# No run's final loss is known better than ~0.2%: Gadre et al. 2024 give token-level 95% intervals of
# about +-0.2% on their validation losses, and another seed moves a small model's loss at least as
# much. A residual floor at that level keeps an exact fit of a few smoothed points from counting as
# certain (at 5e-4 the 90% interval held the truth on 13 of the 15 Porian sets, at 2e-3 on 14).
NOISE_FLOOR = 2e-3
HUBER_DELTA = 1e-3  # on log loss, as in Hoffmann et al. 2022


@dataclass(frozen=True)
class ComputeFit:
    """A fitted L(C). `a`, `b`, `c`: the best law; `c_ref`: the compute C is divided by inside the fit
    (L = a * (C/c_ref)^(-b) + c, so `a` is the reducible loss at c_ref); `compute`, `loss`: the points.
    `grid_*`: the laws weighed for the prediction, with their weights."""

    a: float
    b: float
    c: float
    c_ref: float
    compute: np.ndarray
    loss: np.ndarray
    grid_a: np.ndarray = field(repr=False)
    grid_b: np.ndarray = field(repr=False)
    grid_c: np.ndarray = field(repr=False)
    grid_w: np.ndarray = field(repr=False)

    @property
    def params(self) -> dict:
        # a at C = 1 FLOP as well, for people comparing with published fits written that way.
        return {"a": self.a * self.c_ref ** self.b, "b": self.b, "c": self.c, "a_at_c_ref": self.a, "c_ref": self.c_ref}

    def best(self, compute) -> np.ndarray:
        """The best law's loss at `compute` (array-like)."""
        return self.a * (np.asarray(compute, dtype=float) / self.c_ref) ** (-self.b) + self.c

    def quantiles(self, compute, qs=(0.05, 0.5, 0.95)) -> np.ndarray:
        """Quantiles (rows, in the order of `qs`) of the weighed laws' loss at each `compute`."""
        x = np.log(np.atleast_1d(np.asarray(compute, dtype=float)) / self.c_ref)
        preds = self.grid_a[:, None] * np.exp(-self.grid_b[:, None] * x[None, :]) + self.grid_c[:, None]
        return np.stack([_weighted_quantile(preds[:, j], self.grid_w, qs) for j in range(len(x))], axis=1)

    def residuals(self) -> np.ndarray:
        """Relative residuals of the best law at the fitted points: fit / observed - 1."""
        return self.best(self.compute) / self.loss - 1

    def r2(self) -> float:
        """R^2 of the best law on log loss (1 is perfect; a frontier that barely moves has a low one)."""
        y = np.log(self.loss)
        ss_tot = float(np.sum((y - y.mean()) ** 2))
        ss_res = float(np.sum((np.log(self.best(self.compute)) - y) ** 2))
        return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def fit_compute_law(compute, loss) -> ComputeFit:
    """Fit L(C) = a*C^(-b) + c to frontier points.

    Precondition: at least 2 points, compute and loss positive and finite (the checks in `checks.py`
    decide whether the fit may be trusted; this function fits whatever it is given). Raises
    ValueError if no law on the grid fits (only possible with fewer than 2 distinct computes)."""
    compute, loss = np.asarray(compute, dtype=float), np.asarray(loss, dtype=float)
    c_ref = float(compute.max())
    x = np.log(compute / c_ref)
    bs, cs = np.meshgrid(B_GRID, np.linspace(0.0, loss.min() * (1 - 1e-3), C_STEPS), indexing="ij")
    bs, cs = bs.ravel(), cs.ravel()
    # For each (b, c), a by least squares on relative residuals (weights 1/L^2): closed form.
    basis = np.exp(-bs[:, None] * x[None, :])
    w = 1.0 / loss ** 2
    target = loss[None, :] - cs[:, None]
    a = (basis * target * w).sum(1) / (basis * basis * w).sum(1)
    pred = a[:, None] * basis + cs[:, None]
    rss = (((pred - loss) / loss) ** 2).sum(1) + len(loss) * NOISE_FLOOR ** 2
    # Gaussian residuals with an unknown scale (integrated out under a 1/sigma prior): weight
    # rss^(-(n-1)/2), n-1 because a was fitted. Laws with a <= 0 do not fall: no weight.
    logw = -0.5 * (len(loss) - 1) * np.log(rss)
    logw[a <= 0] = -np.inf
    if not np.isfinite(logw).any():
        raise ValueError("no falling power law fits these points")
    weight = np.exp(logw - logw.max())
    # Starts for the best law ranked by the raw residual: the weights are tied at the noise floor.
    best_a, best_b, best_c = _huber_refine(x, loss, a, bs, cs, np.where(a > 0, -rss, -np.inf))
    keep = weight > 1e-9 * weight.max()  # laws that carry no weight need not be kept
    return ComputeFit(best_a, best_b, best_c, c_ref, compute, loss, a[keep], bs[keep], cs[keep], weight[keep])


def _huber_refine(x, loss, a, bs, cs, score, starts: int = 5) -> tuple[float, float, float]:
    """The best law: Huber loss on log residuals, L-BFGS-B from the `starts` grid laws of highest
    `score` (-inf: not a start)."""
    y, cmax = np.log(loss), float(loss.min()) * (1 - 1e-6)

    def objective(p):
        la, lb, c = p
        r = np.log(np.exp(la) * np.exp(-np.exp(lb) * x) + c) - y
        return float(np.sum(_huber(r)))

    best = None
    for i in np.argsort(-score)[:starts]:
        if not np.isfinite(score[i]):
            break
        res = minimize(objective, [np.log(a[i]), np.log(bs[i]), cs[i]], method="L-BFGS-B",
                       bounds=[(-30, 30), (np.log(1e-4), np.log(10.0)), (0.0, cmax)])
        if best is None or res.fun < best.fun:
            best = res
    la, lb, c = best.x
    return float(np.exp(la)), float(np.exp(lb)), float(c)


def _huber(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    ar = np.abs(r)
    return np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta))


def _weighted_quantile(values: np.ndarray, weights: np.ndarray, qs) -> np.ndarray:
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    cum = (cum - 0.5 * weights[order]) / cum[-1]  # midpoints: a lone heavy law sits at its own value
    return np.interp(qs, cum, values[order])
