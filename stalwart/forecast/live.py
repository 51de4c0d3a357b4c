"""A forecast band for a running job: the curve law fitted on the run's own first steps.

`fit_band` fits the LR-annealing law (`forecast_curve`) on the losses of the first part of a run and
its whole LR schedule, and gives the predicted loss at every later step with a band around it.
`BandWatch` compares the run's smoothed loss with that band as records arrive and says when the run
leaves it. Both are pure: the controller calls `fit_band` on a thread of its own (it takes seconds)
and `BandWatch.observe` on each rank-0 record (microseconds).

The band: at the last fitted step it is the loss's own noise around the law (z x the residuals' RMS
over the square root of the smoothing window, at least MIN_REL_WIDTH of the loss); at the last step
of the schedule it is the forecast's interval; in between it widens with log S1 (how far the law
reaches past what it saw), as the forecast's interval does. When the fitted steps saw too little of
the schedule's annealing to fit it, the law leaves the annealing out (C = 0) and the forecast is an
upper bound: a run that falls below it is expected to, and only rising above the band is told.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.stats import norm

from stalwart.forecast.curve import forecast_curve
from stalwart.forecast.errors import NO_ANNEALING_SEEN, ForecastError

__all__ = ["Band", "BandWatch", "fit_band", "schedule_from_points"]

FIT_FRACTION = 0.2
LEVEL = 0.9
SMOOTH = 20  # records in the median compared with the band
MIN_REL_WIDTH = 0.01
GRID = 200  # steps at which the band is kept (and stored with the job)


@dataclass(frozen=True)
class Band:
    """The forecast over the rest of a run: `mid`, `low`, `high` at the `steps` of a grid (read between
    them with `at`), the forecast at `final_step` with its interval, the steps it was fitted on, and
    whether it is an upper bound (annealing not fitted)."""

    steps: list
    mid: list
    low: list
    high: list
    final_step: int
    final: float
    final_low: float
    final_high: float
    level: float
    fitted_on: list  # [first, last] step fitted
    upper_bound: bool
    warnings: list = field(default_factory=list)

    def at(self, step: int) -> tuple[float, float, float]:
        """(mid, low, high) at `step` (linear between grid points; the ends held outside them)."""
        return (float(np.interp(step, self.steps, self.mid)), float(np.interp(step, self.steps, self.low)),
                float(np.interp(step, self.steps, self.high)))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Band:
        return cls(**data)


def schedule_from_points(steps, lrs, last_step: int) -> np.ndarray:
    """The LR at every step 0..last_step from (step, lr) points (what a rank sends: samples of its schedule,
    linear in between, the first value before the first point, the last after the last).
    Raises ValueError for mismatched, unsorted, negative or non-finite points."""
    s, v = np.asarray(steps, dtype=float), np.asarray(lrs, dtype=float)
    if s.ndim != 1 or s.shape != v.shape or not len(s):
        raise ValueError("the LR schedule needs as many steps as values, at least one")
    if not (np.isfinite(s).all() and np.isfinite(v).all()) or (v < 0).any() or (np.diff(s) <= 0).any():
        raise ValueError("the LR schedule's steps must increase and its values be finite and >= 0")
    return np.interp(np.arange(last_step + 1), s, v)


def fit_band(steps, losses, lr, *, level: float = LEVEL, smooth: int = SMOOTH, bootstrap: int = 50) -> Band:
    """Fit the law on (steps, losses) with the schedule `lr` (LR at steps 0..len(lr)-1) and return the
    band to the schedule's last step. Raises ForecastError when the law cannot be fitted at all (too
    few steps after the warmup), ValueError for malformed input."""
    try:
        fc = forecast_curve(steps, losses, lr, level=level, bootstrap=bootstrap)
    except ForecastError as exc:
        if exc.result is None or list(exc.codes) != [NO_ANNEALING_SEEN]:
            raise
        fc = exc.result  # forced: C = 0, an upper bound, said in `upper_bound`
    upper = any(p.code == NO_ANNEALING_SEEN for p in fc.warnings)
    last = fc.step
    steps = np.asarray(steps, dtype=int)
    fit_end = int(steps.max())
    # The law is fitted from the step after the LR's peak (the end of the warmup) on; before it S1 may
    # be 0 and the law infinite, so the band starts there too.
    first = min(max(int(steps.min()), int(np.argmax(np.asarray(lr, dtype=float))) + 1), fit_end)
    z = float(norm.ppf(0.5 + level / 2))
    grid = np.unique(np.linspace(first, last, GRID).round().astype(int))
    mid = fc.fit.predict(grid)
    s1 = fc.fit.s1
    reach = np.log(s1[grid] / s1[fit_end]) / max(float(np.log(s1[last] / s1[fit_end])), 1e-12)
    reach = np.clip(reach, 0.0, 1.0)
    w0 = max(MIN_REL_WIDTH, z * fc.rms_residual / max(float(fc.prediction), 1e-12) / np.sqrt(smooth))
    w_hi = max(w0, (fc.high - fc.prediction) / fc.prediction)
    w_lo = max(w0, (fc.prediction - fc.low) / fc.prediction)
    high = mid * (1 + w0 + (w_hi - w0) * reach)
    low = mid * (1 - w0 - (w_lo - w0) * reach)
    return Band(grid.tolist(), mid.tolist(), low.tolist(), high.tolist(), int(last), float(fc.prediction),
                float(fc.low), float(fc.high), level, [first, fit_end], upper,
                [p.message for p in fc.warnings])


class BandWatch:
    """Says when a run leaves its band: `observe(step, loss)` returns "above" or "below" on the record
    where the median of the last `smooth` losses leaves it, once per excursion (again only after it
    came back inside), else None. Records up to the last fitted step are not judged (the band was
    fitted on them). A step not after the previous one is a rewind: the median starts afresh.
    Below an upper-bound band is not told (see the module's docstring)."""

    def __init__(self, band: Band, smooth: int = SMOOTH):
        self.band = band
        self.smooth = smooth
        self._recent: deque[float] = deque(maxlen=smooth)
        self._last_step: int | None = None
        self.outside: str | None = None  # "above" / "below" while out of the band
        self.current: tuple[int, float, float, float, float] | None = None  # step, smoothed, mid, low, high

    def observe(self, step: int, loss: float) -> str | None:
        if self._last_step is not None and step <= self._last_step:
            self._recent.clear()
        self._last_step = step
        if not np.isfinite(loss):
            return None
        self._recent.append(float(loss))
        if step <= self.band.fitted_on[1] or len(self._recent) < self.smooth:
            return None
        smoothed = statistics.median(self._recent)
        mid, low, high = self.band.at(step)
        self.current = (step, smoothed, mid, low, high)
        where = "above" if smoothed > high else ("below" if smoothed < low and not self.band.upper_bound else None)
        left = where if where is not None and where != self.outside else None
        self.outside = where
        return left
