"""Forecast a run's final loss from its first steps and its whole learning-rate schedule.

The law (Tissue et al. 2024, "Scaling Law with Learning Rate Annealing"): the loss after step s is
L(s) = L0 + A * S1(s)^(-alpha) - C * S2(s), where S1(s) is the learning rate summed up to s (how far
the optimizer has travelled) and S2(s) the annealing area: the sum over steps of a momentum of the LR
drops, m_i = decay * m_(i-1) + (lr_(i-1) - lr_i), so a drop keeps lowering the loss for a while after
it happened (decay ~0.999 in the paper; chosen by fit here, see DECAYS). The schedule is known in
advance, so S1 and S2 are known to the last step and the fitted law can be read there.

Choices of ours, not the paper's: the LR is divided by its peak (so A and C do not depend on its
scale); the warmup's rise is not an annealing (S2 starts at the peak) and its steps are not fitted;
C can only be fitted once the LR has dropped in the observed steps, so a prefix with no drop (a
constant phase) is refused unless C is given (`annealing_coef`, e.g. from an earlier run's fit).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from scipy.optimize import least_squares
from scipy.signal import lfilter
from scipy.stats import norm

from stalwart.forecast.errors import NO_ANNEALING_SEEN, TOO_FEW_POINTS, ForecastError, Problem

DECAY = 0.999
# The paper's 0.999 suits runs of tens of thousands of steps; on short runs (the tiny GPT's 1,200)
# a shorter memory fits better. When C is fitted, the decay is the one of these that fits best.
DECAYS = (0.9, 0.97, 0.99, 0.995, 0.999)
MIN_POINTS = 20
# C is trusted from the data when the fitted steps have seen at least this share of the schedule's
# final annealing area; below it, the forecast would rest on an extrapolation of C over >10x.
MIN_ANNEALING_SEEN = 0.1
# alpha below ~0.05 turns A * S1^-alpha into a logarithm with a large negative L0 that never levels
# off (what the unconstrained fit did on the tiny GPT's noisy early steps); a loss is >= 0, so L0 >= 0.
ALPHA_GRID = np.geomspace(0.05, 3.0, 60)


def annealing_areas(lr, decay: float = DECAY) -> tuple[np.ndarray, np.ndarray]:
    """(S1, S2) at every step of the schedule `lr` (LR at step 0, 1, ...; divided by its peak).

    S1[s]: the LR summed over steps 0..s. S2[s]: the momentum of LR drops summed over steps 0..s,
    counted from the peak (the first step at the largest LR) on. Raises ValueError on an empty
    schedule, a negative or non-finite LR, or an all-zero one."""
    lr = np.asarray(lr, dtype=float)
    if lr.ndim != 1 or not len(lr) or not np.isfinite(lr).all() or (lr < 0).any() or lr.max() <= 0:
        raise ValueError("the LR schedule must be a non-empty 1-D array of finite values >= 0, not all zero")
    eta = lr / lr.max()
    peak = int(np.argmax(eta))
    drops = np.zeros_like(eta)
    drops[peak + 1:] = eta[peak:-1] - eta[peak + 1:]
    m = lfilter([1.0], [1.0, -decay], drops)  # m[i] = decay * m[i-1] + drops[i], m = 0 up to the peak
    return np.cumsum(eta), np.cumsum(m)


@dataclass(frozen=True)
class CurveFit:
    """The fitted law: L0, A, alpha, C (in units of the peak-normalized LR), `decay`, and the areas
    of the whole schedule (`s1`, `s2`, indexed by step)."""

    L0: float
    A: float
    alpha: float
    C: float
    decay: float
    s1: np.ndarray = field(repr=False)
    s2: np.ndarray = field(repr=False)

    @property
    def params(self) -> dict:
        return {"L0": self.L0, "A": self.A, "alpha": self.alpha, "C": self.C, "decay": self.decay}

    def predict(self, steps) -> np.ndarray:
        steps = np.asarray(steps, dtype=int)
        return _law((self.L0, self.A, self.alpha, self.C), self.s1[steps], self.s2[steps])


@dataclass(frozen=True)
class CurveForecast:
    """The loss predicted at `step` (the schedule's last), with an interval at `level` from refits on
    resampled blocks of residuals; `warnings` lists failed checks (only when forced)."""

    step: int
    prediction: float
    low: float
    high: float
    level: float
    fit: CurveFit
    rms_residual: float
    warnings: list = field(default_factory=list)

    def to_json(self) -> dict:
        return {"step": self.step, "prediction": self.prediction, "low": self.low, "high": self.high,
                "level": self.level, "params": self.fit.params, "rms_residual": self.rms_residual,
                "warnings": [p._asdict() for p in self.warnings]}


def fit_curve(steps, losses, lr, *, decay: Optional[float] = None, annealing_coef: Optional[float] = None,
              fit_from: Optional[int] = None) -> CurveFit:
    """Fit the law to (step, loss) pairs of a run whose LR at every step is `lr`.

    Steps before `fit_from` (default: the LR peak, the end of the warmup) are not fitted.
    `annealing_coef` fixes C instead of fitting it (then pass the `decay` it was fitted with; DECAY
    otherwise). `decay` None with C fitted: the one of DECAYS that fits best. Preconditions: steps
    are integers in [0, len(lr)), losses finite; raises ValueError otherwise, or when fewer than 3
    steps remain to fit."""
    steps, losses = _checked(steps, losses, len(lr))
    start = int(np.argmax(np.asarray(lr, dtype=float))) + 1 if fit_from is None else int(fit_from)
    keep = steps >= start
    if keep.sum() < 3:
        raise ValueError(f"{int(keep.sum())} observed step(s) at or after step {start}; the law needs more")
    return _fit_decays(lr, steps[keep], losses[keep], annealing_coef, decay)


def _fit_decays(lr, steps, y, coef: Optional[float], decay: Optional[float]) -> CurveFit:
    """The fit over the candidate decays (see `fit_curve`) with the least squared residual."""
    candidates = (decay,) if decay is not None else (DECAYS if coef is None else (DECAY,))
    best = None
    for dec in candidates:
        s1, s2 = annealing_areas(lr, dec)
        p = _fit(s1[steps], s2[steps], y, coef)
        rss = float(np.sum((_law(p, s1[steps], s2[steps]) - y) ** 2))
        if best is None or rss < best[0]:
            best = (rss, CurveFit(*p, dec, s1, s2))
    return best[1]


def forecast_curve(steps, losses, lr, *, decay: Optional[float] = None, annealing_coef: Optional[float] = None,
                   level: float = 0.9, bootstrap: int = 100, force: bool = False, seed: int = 0,
                   fit_from: Optional[int] = None) -> CurveForecast:
    """The loss at the last step of the schedule `lr` (its length is the run's length), from the
    observed (steps, losses) so far. `decay`, `annealing_coef`, `fit_from`: as in `fit_curve`.

    Raises ForecastError when fewer than MIN_POINTS steps past the warmup were observed, or when the
    observed steps hold less than MIN_ANNEALING_SEEN of the final annealing area and no
    `annealing_coef` is given (C cannot be told from the data). With `force`, returns the forecast
    with those warnings; without enough annealing seen, C is then 0: the loss the run would reach
    without its LR decay, an upper bound. ValueError for malformed input (see `fit_curve`)."""
    steps, losses = _checked(steps, losses, len(lr))
    s1, s2 = annealing_areas(lr, DECAY if decay is None else decay)  # for the share seen
    start = int(np.argmax(np.asarray(lr, dtype=float))) + 1 if fit_from is None else int(fit_from)
    keep = steps >= start
    problems = []
    if keep.sum() < MIN_POINTS:
        problems.append(Problem(TOO_FEW_POINTS, f"{int(keep.sum())} steps observed after the warmup; "
                                                f"at least {MIN_POINTS} are needed"))
    last = len(lr) - 1
    seen = float(s2[steps[keep]].max()) / s2[last] if keep.any() and s2[last] > 0 else 1.0
    coef = annealing_coef
    if coef is None and seen < MIN_ANNEALING_SEEN:
        problems.append(Problem(NO_ANNEALING_SEEN, f"the observed steps hold {seen:.1%} of the schedule's "
                                                   "annealing area; its effect cannot be fitted yet (give "
                                                   "annealing_coef from an earlier run, or wait)"))
        coef = 0.0  # C would be fitted to noise: leave the annealing out (an upper bound) and say so
    if keep.sum() < 3:
        raise ForecastError(problems, None)
    fit = _fit_decays(lr, steps[keep], losses[keep], coef, decay)
    p, s1, s2 = (fit.L0, fit.A, fit.alpha, fit.C), fit.s1, fit.s2
    x1, x2, y = s1[steps[keep]], s2[steps[keep]], losses[keep]
    mid = float(fit.predict([last])[0])
    resid = y - _law(p, x1, x2)
    preds = _block_bootstrap(p, x1, x2, y, resid, coef, s1[last], s2[last], bootstrap, seed)
    q = (1 - level) / 2
    lo, hi = (np.quantile(preds, [q, 1 - q]) if len(preds) else (mid, mid))
    # The bootstrap sees the noise, not the law's own misfit, which grows the further it reaches.
    # Measure it on the run itself: fit the first half of the observed steps, see how far off the law
    # is over the second half (per unit of log S1), and stretch that to the last step.
    drift = _drift_per_log_s1(x1, x2, y, coef)
    reach = float(np.log(s1[last] / x1.max()))
    if drift > 0 and reach > 0:
        z = float(norm.ppf(1 - q))
        lo, hi = mid - np.hypot(mid - lo, z * drift * reach * mid), mid + np.hypot(hi - mid, z * drift * reach * mid)
    result = CurveForecast(last, mid, float(min(lo, mid)), float(max(hi, mid)), level, fit,
                           float(np.sqrt(np.mean(resid ** 2))), problems)
    if problems and not force:
        raise ForecastError(problems, result)
    return result


def _law(p, s1, s2):
    L0, A, alpha, C = p
    return L0 + A * s1 ** (-alpha) - C * s2


def _fit(s1, s2, y, coef: Optional[float]) -> tuple[float, float, float, float]:
    """Least squares: alpha on a grid with (L0, A, C) solved linearly (all >= 0), then a joint Huber
    refinement (robust to a few hard batches) scaled to the residuals' spread."""
    best = None
    for alpha in ALPHA_GRID:
        cols = [np.ones_like(s1), s1 ** (-alpha)] + ([] if coef is not None else [-s2])
        target = y + (coef * s2 if coef is not None else 0.0)
        sol, *_ = np.linalg.lstsq(np.stack(cols, 1), target, rcond=None)
        sol = np.maximum(sol, [0.0, 0.0] + ([] if coef is not None else [0.0]))
        rss = float(np.sum((np.stack(cols, 1) @ sol - target) ** 2))
        if best is None or rss < best[0]:
            best = (rss, alpha, sol)
    _, alpha, sol = best
    p0 = [sol[0], sol[1], alpha, coef if coef is not None else sol[2]]
    scale = max(1.4826 * float(np.median(np.abs(y - _law(p0, s1, s2)))), 1e-6)
    free = [0, 1, 2] + ([] if coef is not None else [3])

    def residual(q):
        p = list(p0)
        for i, v in zip(free, q):
            p[i] = v
        return _law(p, s1, s2) - y

    lo = [0.0, 0.0, ALPHA_GRID[0], 0.0][:len(free)]
    hi = [np.inf, np.inf, 5.0, np.inf][:len(free)]
    x0 = np.clip([p0[i] for i in free], np.array(lo) + 1e-12, np.array(hi) - 1e-12)
    res = least_squares(residual, x0, bounds=(lo, hi), loss="huber", f_scale=2 * scale)
    p = list(p0)
    for i, v in zip(free, res.x):
        p[i] = float(v)
    return tuple(p)


def _drift_per_log_s1(s1, s2, y, coef) -> float:
    """Relative error of the law fitted on the first half of the points, over the second half's last
    tenth (smoothed), per unit of log S1 beyond the half; 0 when there are too few points."""
    half = len(y) // 2
    if half < MIN_POINTS // 2:
        return 0.0
    p = _fit(s1[:half], s2[:half], y[:half], coef)
    tail = slice(len(y) - max(len(y) // 10, 3), len(y))
    error = abs(float(np.mean(_law(p, s1[tail], s2[tail]) - y[tail]))) / float(np.mean(y[tail]))
    return error / max(float(np.log(s1[tail].mean() / s1[half - 1])), 1e-6)


def _block_bootstrap(p, x1, x2, y, resid, coef, s1_last, s2_last, n, seed) -> np.ndarray:
    """Predictions at the last step from refits on the fitted curve plus residuals resampled in blocks
    (neighbouring steps' noise is correlated: smoothed logs, shared batches)."""
    if n <= 0 or len(y) < 10:
        return np.empty(0)
    rng = np.random.default_rng(seed)
    block = max(len(y) // 20, 1)
    fitted = y - resid
    out = []
    for _ in range(n):
        starts = rng.integers(0, len(y) - block + 1, len(y) // block + 1)
        noise = np.concatenate([resid[s:s + block] for s in starts])[:len(y)]
        q = _fit(x1, x2, fitted + noise, coef)
        out.append(_law(q, np.array([s1_last]), np.array([s2_last]))[0])
    return np.array(out)


def _checked(steps, losses, length: int) -> tuple[np.ndarray, np.ndarray]:
    steps, losses = np.asarray(steps), np.asarray(losses, dtype=float)
    if steps.shape != losses.shape or steps.ndim != 1:
        raise ValueError("steps and losses must be 1-D arrays of one length")
    if not np.all(np.equal(np.mod(steps, 1), 0)) or (steps < 0).any() or (steps >= length).any():
        raise ValueError(f"steps must be integers in [0, {length}) (the schedule's length)")
    if not np.isfinite(losses).all():
        raise ValueError("losses must be finite")
    return steps.astype(int), losses
