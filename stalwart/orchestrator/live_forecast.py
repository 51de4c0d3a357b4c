"""One job's live forecast band, kept by its supervisor off the training path.

The supervisor hands it rank 0's losses as they arrive (`observe`, on the report threads: a dict
store, or after the fit a median of 20 numbers) and the LR schedule the rank sent (`schedule`). Once
the run is `fraction` of the way through its schedule, the curve law is fitted on the losses so far on
a thread of its own (`stalwart.forecast.live.fit_band`: about a second of the controller's CPU, never a
rank's), and from then on each loss is compared with the band. What it finds leaves through `emit`
(events) and `on_ready` (the supervisor saves its figures).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import numpy as np

# stalwart.forecast (SciPy) is imported where a forecast is first needed, not with the controller.

log = logging.getLogger(__name__)

MAX_PREFIX = 500_000  # losses kept for the fit (a run of 2.5M steps fits on its first 500k)


class LiveForecast:
    """Lifecycle: built per job (with the band JSON an earlier controller saved, if any); `schedule` when
    rank 0 sends its LR schedule; `observe` for every rank-0 record; `status()`/`band_json()` read it.
    Thread-safe for one observing thread at a time (the supervisor's report lock) plus the fit thread."""

    def __init__(self, fraction: float, emit: Callable[..., None], on_ready: Callable[[], None],
                 band: dict | None = None):
        self.fraction = fraction
        self._emit = emit
        self._on_ready = on_ready
        self._lr: np.ndarray | None = None
        self._prefix: dict[int, float] = {}
        self._state = "ready" if band is not None else "waiting"  # waiting -> fitting -> ready | unavailable
        self._watch = None
        if band is not None:
            from stalwart.forecast.live import Band, BandWatch

            self._watch = BandWatch(Band.from_json(band))

    @property
    def fit_until(self) -> int | None:
        return None if self._lr is None else max(1, int(self.fraction * (len(self._lr) - 1)))

    def schedule(self, steps: list, values: list) -> None:
        """The LR of the run's steps, as (step, lr) samples up to its last step (see
        `TrainContext.report_lr_schedule`, or the spec's `monitoring.lr_schedule`)."""
        if self._state != "waiting":
            return
        from stalwart.forecast.live import schedule_from_points

        try:
            self._lr = schedule_from_points(steps, values, int(max(steps)))
        except ValueError as exc:
            self._unavailable(f"the LR schedule is unusable: {exc}")

    def observe(self, step: int, loss) -> None:
        if not isinstance(loss, (int, float)):
            return
        watch = self._watch
        if watch is not None:
            where = watch.observe(step, float(loss))
            if where is not None:
                _, smoothed, mid, low, high = watch.current
                self._emit("forecast_band_left", f"the loss left the forecast band at step {step}: its median over "
                           f"the last {watch.smooth} steps, {smoothed:.4g}, is {where} [{low:.4g}, {high:.4g}] "
                           f"(forecast {mid:.4g})", step=step, direction=where, loss=smoothed, forecast=mid,
                           low=low, high=high)
            return
        if self._state != "waiting" or not np.isfinite(loss):
            return
        if len(self._prefix) < MAX_PREFIX:
            self._prefix[int(step)] = float(loss)
        until = self.fit_until
        if until is not None and step >= until:
            self._state = "fitting"
            points = {s: v for s, v in self._prefix.items() if s <= until and s < len(self._lr)}
            threading.Thread(target=self._fit, args=(points, self._lr), name="live-forecast", daemon=True).start()

    def _fit(self, points: dict[int, float], lr: np.ndarray) -> None:
        from stalwart.forecast.errors import ForecastError
        from stalwart.forecast.live import BandWatch, fit_band

        steps = sorted(points)
        try:
            band = fit_band(steps, [points[s] for s in steps], lr)
        except (ForecastError, ValueError) as exc:
            self._unavailable(f"the curve law could not be fitted on steps up to {self.fit_until}: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - a fit that breaks must not take the controller's thread down
            log.exception("live forecast fit failed")
            self._unavailable(f"the curve law's fit failed: {type(exc).__name__}: {exc}")
            return
        self._prefix = {}
        self._watch = BandWatch(band)
        self._state = "ready"
        bound = " (an upper bound: the LR has not decayed enough yet to fit its effect)" if band.upper_bound else ""
        self._emit("forecast_ready", f"forecast from steps {band.fitted_on[0]}-{band.fitted_on[1]}: loss "
                   f"{band.final:.4g} [{band.final_low:.4g}, {band.final_high:.4g}] at step {band.final_step} "
                   f"({band.level:.0%}){bound}", final_step=band.final_step, prediction=band.final,
                   low=band.final_low, high=band.final_high, fitted_on=band.fitted_on, upper_bound=band.upper_bound)
        self._on_ready()

    def _unavailable(self, why: str) -> None:
        self._state = "unavailable"
        self._prefix = {}
        self._emit("forecast_unavailable", why)

    def band_json(self) -> dict | None:
        watch = self._watch
        return watch.band.to_json() if watch is not None else None

    def status(self) -> dict | None:
        """The band at the newest judged step and the forecast at the last one (None before the fit)."""
        watch = self._watch
        if watch is None:
            return None
        b = watch.band
        out = {"final_step": b.final_step, "final_loss": b.final, "final_low": b.final_low,
               "final_high": b.final_high, "upper_bound": b.upper_bound, "fitted_on": b.fitted_on}
        if watch.current is not None:
            step, smoothed, mid, low, high = watch.current
            out.update(step=step, loss=mid, low=low, high=high, smoothed_loss=smoothed, outside=watch.outside)
        return out
