"""L(N, D) = E + A/N^alpha + B/D^beta: loss against parameters N and training tokens D.

Two readings of the runs, as for L(C) (compute_law.py):
* the best law, fitted as Hoffmann et al. 2022 describe it: log L = LSE(a - alpha log N, b - beta log D,
  e) with A = e^a, B = e^b, E = e^e, a Huber loss on the log residuals (robust to the odd bad run),
  L-BFGS-B from several starts. It gives the parameters and residuals.
* the forecast: for fixed (alpha, beta) the law is linear in (E, A, B), so every pair on a grid gets
  its least-squares (E, A, B), and the laws are weighed by how well they fit; the forecast is the
  weighted median of their predictions and the interval its quantiles.
With a dozen runs E trades off against the exponents almost freely; the best law picks one corner
of that valley (on Gadre et al.'s sweep, E ~0.3-0.5 where ~1.7 is typical) and misses 1000x out by
6-16%, where the weighted median missed by 1-8% (docs/BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product

import numpy as np
from scipy.optimize import minimize

HUBER_DELTA = 1e-3
# Starts for the best-law search (log A, log B, log E, alpha, beta): Hoffmann et al.'s grid, coarser.
GRID = np.array(list(product([0, 5, 10, 15, 20, 25], [0, 5, 10, 15, 20, 25], [-1.0, -0.5, 0.0, 0.5, 1.0],
                             [0.1, 0.3, 0.6, 1.0, 1.5], [0.1, 0.3, 0.6, 1.0, 1.5])), dtype=float)
BOUNDS = [(-10, 80), (-10, 80), (-6, None), (0.01, 3.0), (0.01, 3.0)]
STARTS = 2
# The exponents weighed for the forecast: wider than any published fit, so the checks see a runaway.
EXPONENT_GRID = np.linspace(0.02, 1.5, 75)
NOISE_FLOOR = 2e-3  # relative, as in compute_law (why there): an exact fit must not count as certain


@dataclass(frozen=True)
class SizeFit:
    """A fitted L(N, D): the best law's `E`, `A`, `alpha`, `B`, `beta`; the runs (`params_n`, `tokens`,
    `loss`); and the weighed laws (`grid_coef`: E, A, B per law; `grid_alpha`, `grid_beta`, `grid_w`)."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    params_n: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray
    grid_coef: np.ndarray = field(repr=False)
    grid_alpha: np.ndarray = field(repr=False)
    grid_beta: np.ndarray = field(repr=False)
    grid_w: np.ndarray = field(repr=False)

    @property
    def params(self) -> dict:
        return {"E": self.E, "A": self.A, "alpha": self.alpha, "B": self.B, "beta": self.beta}

    def predict(self, n, d) -> np.ndarray:
        """The best law's loss at (n, d)."""
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

    def quantiles(self, n, d, qs=(0.05, 0.5, 0.95)) -> np.ndarray:
        """Quantiles of the weighed laws' loss at (n, d): scalars give one value per q (in the order
        of `qs`), arrays of points a row per q."""
        scalar = np.ndim(n) == 0 and np.ndim(d) == 0
        n, d = np.atleast_1d(np.asarray(n, dtype=float)), np.atleast_1d(np.asarray(d, dtype=float))
        e, a, b = (c[:, None] for c in self.grid_coef.T)
        preds = e + a * n[None, :] ** -self.grid_alpha[:, None] + b * d[None, :] ** -self.grid_beta[:, None]
        out = np.empty((len(qs), preds.shape[1]))
        for j in range(preds.shape[1]):
            order = np.argsort(preds[:, j])
            cum = np.cumsum(self.grid_w[order])
            cum = (cum - 0.5 * self.grid_w[order]) / cum[-1]
            out[:, j] = np.interp(qs, cum, preds[order, j])
        return out[:, 0] if scalar else out

    def residuals(self) -> np.ndarray:
        return self.predict(self.params_n, self.tokens) / self.loss - 1

    def r2(self) -> float:
        y = np.log(self.loss)
        ss_tot = float(np.sum((y - y.mean()) ** 2))
        ss_res = float(np.sum((np.log(self.predict(self.params_n, self.tokens)) - y) ** 2))
        return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")

    def optimal_loss(self, compute: float) -> tuple[float, float]:
        """(loss, N) of the best split of `compute` = 6*N*D between size and tokens, best law."""
        n = np.geomspace(1e3, 1e15, 4001)
        losses = self.predict(n, compute / (6 * n))
        i = int(np.argmin(losses))
        return float(losses[i]), float(n[i])


def fit_size_law(params, tokens, loss) -> SizeFit:
    """Fit L(N, D) to runs: the best law and the weighed grid of laws (see the module's docstring).

    Precondition: at least 5 runs (5 parameters), all values positive and finite. Raises ValueError
    when no law on the grid has positive E, A and B (runs whose loss does not fall with N or D)."""
    n, d, y = (np.log(np.asarray(v, dtype=float)) for v in (params, tokens, loss))
    coef, rss = _projected(n, d, y)
    ok = (coef > 0).all(-1)
    if not ok.any():
        raise ValueError("no law with positive E, A and B fits these runs")
    # Gaussian relative residuals with an unknown scale integrated out: weight rss^(-(n-3)/2), three
    # coefficients being fitted per law; a flat prior on the exponents.
    logw = np.where(ok, -0.5 * max(len(y) - 3, 1) * np.log(np.maximum(rss, len(y) * NOISE_FLOOR ** 2)), -np.inf)
    weight = np.exp(logw - logw.max())
    ia, ib = np.nonzero(weight > 1e-9)
    i, j = np.unravel_index(np.argmin(np.where(ok, rss, np.inf)), rss.shape)  # not logw: the floor ties it
    e, a, b = coef[i, j]
    starts = [np.array([np.log(a), np.log(b), np.log(e), EXPONENT_GRID[i], EXPONENT_GRID[j]])]
    starts += list(GRID[np.argsort(_grid_values(n, d, y))[:STARTS]])
    best = min((_local(s, n, d, y) for s in starts), key=lambda r: r.fun)
    la, lb, le, al, be = best.x
    return SizeFit(float(np.exp(le)), float(np.exp(la)), float(al), float(np.exp(lb)), float(be),
                   np.exp(n), np.exp(d), np.exp(y), coef[ia, ib], EXPONENT_GRID[ia], EXPONENT_GRID[ib],
                   weight[ia, ib])


def _projected(n, d, y) -> tuple[np.ndarray, np.ndarray]:
    """For every (alpha, beta) on EXPONENT_GRID: (E, A, B) minimizing the squared relative residuals
    (weights 1/L^2, close to log residuals), and that minimum. Shapes (G, G, 3) and (G, G)."""
    loss = np.exp(y)
    w = 1.0 / loss ** 2
    xa = np.exp(-EXPONENT_GRID[:, None] * n[None, :])  # (G, runs): N^-alpha
    xb = np.exp(-EXPONENT_GRID[:, None] * d[None, :])  # D^-beta
    g = len(EXPONENT_GRID)
    # The normal equations of [1, N^-alpha, D^-beta] for all pairs at once, from sums that separate
    # in alpha and beta (matrix products, not a loop over the grid).
    gram = np.empty((g, g, 3, 3))
    gram[..., 0, 0] = w.sum()
    gram[..., 0, 1] = gram[..., 1, 0] = (xa @ w)[:, None]
    gram[..., 0, 2] = gram[..., 2, 0] = (xb @ w)[None, :]
    gram[..., 1, 1] = (xa ** 2 @ w)[:, None]
    gram[..., 2, 2] = (xb ** 2 @ w)[None, :]
    gram[..., 1, 2] = gram[..., 2, 1] = (xa * w) @ xb.T
    rhs = np.empty((g, g, 3))
    rhs[..., 0] = w @ loss
    rhs[..., 1] = (xa @ (w * loss))[:, None]
    rhs[..., 2] = (xb @ (w * loss))[None, :]
    gram[..., [0, 1, 2], [0, 1, 2]] *= 1 + 1e-12  # a ridge relative to each column's own scale (N^-1.5 is ~1e-12)
    coef = np.linalg.solve(gram, rhs[..., None])[..., 0]
    rss = w @ loss ** 2 - np.einsum("abi,abi->ab", coef, rhs)  # at the solution: sum w L^2 - coef . rhs
    return coef, np.maximum(rss, 0.0)


def _local(start, n, d, y):
    return minimize(_objective, start, args=(n, d, y), jac=True, method="L-BFGS-B", bounds=BOUNDS)


def _objective(p, n, d, y):
    """Huber loss of the log residuals, and its gradient in (log A, log B, log E, alpha, beta).
    Written out rather than with scipy.special: it runs thousands of times per fit."""
    la, lb, le, al, be = p
    t1, t2 = la - al * n, lb - be * d
    top = np.maximum(np.maximum(t1, t2), le)
    e1, e2, e3 = np.exp(t1 - top), np.exp(t2 - top), np.exp(le - top)
    total = e1 + e2 + e3
    r = top + np.log(total) - y
    small = np.abs(r) <= HUBER_DELTA
    value = np.where(small, 0.5 * r * r, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA)).sum()
    dr = np.where(small, r, HUBER_DELTA * np.sign(r)) / total
    g1, g2 = dr * e1, dr * e2
    grad = np.array([g1.sum(), g2.sum(), (dr * e3).sum(), -(g1 * n).sum(), -(g2 * d).sum()])
    return float(value), grad


def _grid_values(n, d, y) -> np.ndarray:
    """The Huber objective at every start in GRID at once."""
    la, lb, le, al, be = (GRID[:, i:i + 1] for i in range(5))
    pred = np.logaddexp(np.logaddexp(la - al * n, lb - be * d), le)
    r = np.abs(pred - y)
    return np.where(r <= HUBER_DELTA, 0.5 * r * r, HUBER_DELTA * (r - 0.5 * HUBER_DELTA)).sum(1)
