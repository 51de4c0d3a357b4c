"""Fault detectors: pure, stateful objects fed one record at a time.

Nothing here knows about Ray, torch or wall clocks: callers pass plain numbers (and the current
time, where time matters), which keeps every detector deterministic and unit-testable, and cheap
enough to run inline on every training step.

* `SpikeDetector` confirms loss spikes from the loss and the gradient norm together.
* `is_nonfinite` is the NaN/Inf check.
* `StragglerDetector` flags ranks whose step time stays well above their peers'.
* `derive_hang_timeout` and `HangWatch` find ranks that stopped making progress.
"""

from __future__ import annotations

import math
import statistics
from bisect import bisect_left, insort
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Iterable

__all__ = [
    "HangWatch",
    "Spike",
    "SpikeConfig",
    "SpikeDetector",
    "StragglerDetector",
    "StragglerReport",
    "derive_hang_timeout",
    "is_nonfinite",
]

# MAD * 1.4826 estimates the standard deviation of Gaussian noise; with it the robust z-scores
# read like ordinary ones on well-behaved curves.
_MAD_TO_SIGMA = 1.4826


# --------------------------------------------------------------------------------------------
# NaN / Inf
# --------------------------------------------------------------------------------------------


def is_nonfinite(loss: Any, grad_norm: Any = None) -> bool:
    """True when the loss, or the grad norm if given, is NaN or +/-Inf.

    Accepts anything `float()` accepts (Python and numpy scalars, 0-d tensors). A value that cannot
    be converted counts as non-finite, because a step whose loss cannot be read is not healthy.
    """
    values = (loss,) if grad_norm is None else (loss, grad_norm)
    for value in values:
        try:
            if not math.isfinite(float(value)):
                return True
        except (TypeError, ValueError):
            return True
    return False


# --------------------------------------------------------------------------------------------
# Robust streaming statistics
# --------------------------------------------------------------------------------------------


def _sorted_median(s: list[float]) -> float:
    n = len(s)
    h = n // 2
    return s[h] if n & 1 else 0.5 * (s[h - 1] + s[h])


def _sorted_mad(s: list[float], m: float) -> float:
    """Median absolute deviation of sorted `s` from `m`, in O(log n) with no allocation.

    The deviations below m (m - s[p-1], m - s[p-2], ...) and above it (s[p] - m, s[p+1] - m, ...)
    are two ascending sequences; their k-th smallest element is found by bisecting on how many
    come from the first one. Uses the upper median of the deviations (k = n // 2), which is all a
    scale estimate needs.
    """
    n = len(s)
    if n == 0:
        return 0.0
    p = bisect_left(s, m)
    n_a, n_b = p, n - p
    k = n // 2  # 0-based rank of the wanted deviation; k + 1 elements are taken in total
    lo, hi = max(0, k + 1 - n_b), min(k + 1, n_a)
    while lo < hi:
        i = (lo + hi) >> 1
        j = k + 1 - i
        # A[i] = m - s[p-1-i]; B[j-1] = s[p+j-1] - m. Want the smallest i with A[i] >= B[j-1].
        if m - s[p - 1 - i] < s[p + j - 1] - m:
            lo = i + 1
        else:
            hi = i
    i = lo
    j = k + 1 - i
    best = -1.0
    if i > 0:
        best = m - s[p - i]
    if j > 0:
        b = s[p + j - 1] - m
        if b > best:
            best = b
    return best


class _Track:
    """Robust level and noise scale of one signal, over the values it was allowed to see.

    * level: median of the last `level_window` accepted values (a short window, so it follows
      a falling curve closely and lags by only a few steps);
    * residuals: each accepted value minus the level just before it; their median is the lag
      bias of that short median on a steady trend, and their MAD the noise scale, both over the
      last `window` values. Residuals, not raw values, because the spread of raw values on a
      falling curve measures the slope, not the noise.

    Ring buffers (deques) keep arrival order for eviction; sorted lists give the medians, kept
    sorted by bisection, so each push costs two O(log n) searches and two short memmoves.
    """

    __slots__ = ("_lv_ring", "_lv_sorted", "_rs_ring", "_rs_sorted", "level", "center", "spread")

    def __init__(self, level_window: int, window: int):
        self._lv_ring: deque[float] = deque(maxlen=level_window)
        self._lv_sorted: list[float] = []
        self._rs_ring: deque[float] = deque(maxlen=window)
        self._rs_sorted: list[float] = []
        self.level = math.nan   # median of the level window (nan until the first push)
        self.center = 0.0       # median residual
        self.spread = 0.0       # MAD-based sigma of the residuals (0 until two pushes)

    def __len__(self) -> int:
        return len(self._lv_ring)

    def push(self, value: float) -> None:
        if self._lv_ring:
            self._push(self._rs_ring, self._rs_sorted, value - self.level)
        self._push(self._lv_ring, self._lv_sorted, value)
        self.level = _sorted_median(self._lv_sorted)
        rs = self._rs_sorted
        if rs:
            c = _sorted_median(rs)
            self.center = c
            self.spread = _MAD_TO_SIGMA * _sorted_mad(rs, c)

    @staticmethod
    def _push(ring: deque, srt: list, value: float) -> None:
        if len(ring) == ring.maxlen:
            old = ring[0]
            del srt[bisect_left(srt, old)]
        ring.append(value)
        insort(srt, value)

    def clear(self) -> None:
        self._lv_ring.clear()
        self._lv_sorted.clear()
        self._rs_ring.clear()
        self._rs_sorted.clear()
        self.level = math.nan
        self.center = 0.0
        self.spread = 0.0

    def state(self) -> dict:
        return {"levels": list(self._lv_ring), "residuals": list(self._rs_ring)}

    def restore(self, state: dict) -> None:
        self.clear()
        for v in state["levels"][-self._lv_ring.maxlen:]:
            self._push(self._lv_ring, self._lv_sorted, float(v))
        for v in state["residuals"][-self._rs_ring.maxlen:]:
            self._push(self._rs_ring, self._rs_sorted, float(v))
        if self._lv_sorted:
            self.level = _sorted_median(self._lv_sorted)
        if self._rs_sorted:
            self.center = _sorted_median(self._rs_sorted)
            self.spread = _MAD_TO_SIGMA * _sorted_mad(self._rs_sorted, self.center)


# --------------------------------------------------------------------------------------------
# Loss spikes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpikeConfig:
    """Knobs of `SpikeDetector`. Defaults are tuned with bench/spike_detector.py: no false alarm
    on its healthy curves (noise up to 4%, Student-t tails, hard-batch outliers, grad-norm
    bursts) while catching >= 0.99 of its 1.6x-3x spikes lasting 3-40 records.

    Scores are robust z-scores: (value - recent level) / (MAD-based noise sigma), for the loss in
    linear space and for the grad norm in log space (grad norms move multiplicatively: 0.24 ->
    2.4 -> 16 -> 145 -> 960 in the BLOOM-176B spike). A record is *elevated* when either z-score
    reaches `onset_threshold`, and *strong* for a signal when it passes that signal's threshold
    and minimum rise.

    window: residuals kept for the noise scale (records, not steps).
    level_window: recent accepted values whose median is the reference level. Short, so the
        reference follows the fast fall at the start of training; a falling curve then sits
        *below* its reference and cannot fire.
    warmup_steps: records that only feed the statistics before anything is judged (also applied
        after a re-baseline). At least 8, so the medians mean something.
    patience: consecutive strong records (loss or grad) needed to confirm a spike when the grad
        norm corroborates it (was strong at or before the loss peak). Isolated outliers (one
        hard batch) are noise; a spike persists.
    loss_only_patience: the same when the grad norm does not corroborate (absent, normal, or
        only jumping after the loss did). Without grad evidence, two consecutive heavy-tailed
        loss outliers are the likeliest false alarm, so one more record is asked for.
    loss_threshold, min_loss_rise: a record is loss-strong at z >= loss_threshold and at least
        min_loss_rise (fraction) above the reference; the rise bar stops a very smooth curve
        (tiny MAD) from firing on a 1% wobble.
    peak_threshold, min_peak_rise: a confirmed spike needs one loss record of the streak this far
        out (z and fraction). Real spikes are 1.6-3x at their peak and already +15-20% on their
        first loss records, while heavy-tailed noise pairs stay within a few percent or a few
        sigma; this is what keeps those pairs from confirming.
    grad_threshold, min_grad_ratio: a record is grad-strong at log-z >= grad_threshold and a grad
        norm at least min_grad_ratio x its reference.
    onset_threshold: the bar for *elevated*. The spike's onset is the first record of the
        unbroken elevated run that led to the confirmation, so a lower bar dates the onset
        earlier, the safe side for picking a checkpoint from before it.
    require_loss: confirmation needs the loss peak above. Grad-norm bursts that leave the loss
        alone are common and harmless (BLOOM-176B logged several before its first loss spike);
        they still date onsets. False: any long-enough streak confirms, grad-only included.
    min_rel_scale: floor on the loss noise sigma, as a fraction of the loss level.
    min_log_scale: floor on the grad-norm noise sigma in log space (0.05 is about 5%).
    rebaseline_after: records a confirmed spike may stay elevated before its level is accepted
        as the new normal (statistics reset, warm-up again), so a permanent shift does not
        leave the detector blind forever.
    """

    window: int = 100
    level_window: int = 16
    warmup_steps: int = 50
    patience: int = 2
    loss_only_patience: int = 3
    loss_threshold: float = 6.0
    min_loss_rise: float = 0.03
    peak_threshold: float = 12.0
    min_peak_rise: float = 0.1
    grad_threshold: float = 6.0
    min_grad_ratio: float = 2.0
    onset_threshold: float = 3.0
    require_loss: bool = True
    min_rel_scale: float = 1e-3
    min_log_scale: float = 0.05
    rebaseline_after: int = 200

    def __post_init__(self) -> None:
        problems = []
        if self.window < 8:
            problems.append(f"window must be >= 8, got {self.window}")
        if not 3 <= self.level_window <= self.window:
            problems.append(f"level_window must be in [3, window], got {self.level_window}")
        if self.warmup_steps < 8:
            problems.append(f"warmup_steps must be >= 8, got {self.warmup_steps}")
        if self.patience < 1 or self.loss_only_patience < self.patience:
            problems.append(f"need 1 <= patience <= loss_only_patience, got {self.patience} and "
                            f"{self.loss_only_patience}")
        if self.rebaseline_after < 1:
            problems.append(f"rebaseline_after must be >= 1, got {self.rebaseline_after}")
        for name in ("loss_threshold", "grad_threshold", "onset_threshold"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0")
        if self.onset_threshold > min(self.loss_threshold, self.grad_threshold):
            problems.append("onset_threshold must not exceed loss_threshold nor grad_threshold")
        if self.peak_threshold < self.loss_threshold or self.min_peak_rise < self.min_loss_rise:
            problems.append("peak_threshold/min_peak_rise must not be below loss_threshold/min_loss_rise")
        if self.min_loss_rise < 0 or self.min_grad_ratio < 1:
            problems.append("min_loss_rise must be >= 0 and min_grad_ratio >= 1")
        if self.min_rel_scale < 0 or self.min_log_scale < 0:
            problems.append("min_rel_scale and min_log_scale must be >= 0")
        if problems:
            raise ValueError("invalid SpikeConfig: " + "; ".join(problems))


@dataclass(frozen=True)
class Spike:
    """A confirmed loss spike.

    step: the record at which it was confirmed.
    onset_step: first record of the anomalous run; a checkpoint taken strictly before it predates
        the spike.
    score: peak anomaly score over the run (see `SpikeDetector.score`).
    reason: human-readable numbers behind the decision.
    """

    step: int
    onset_step: int
    score: float
    reason: str


_STATE_VERSION = 1


class SpikeDetector:
    """Confirms loss spikes online from (step, loss, grad_norm) records.

    Contract:
    * feed records in step order with `update`; it returns a `Spike` exactly once per spike, on
      the record that confirms it, else None;
    * a record whose step is not after the previous one is taken as a rewind (training resumed
      from a checkpoint): the anomalous run in progress is dropped, the baseline is kept (it only
      ever holds non-spiky values);
    * non-finite losses are ignored here (the caller routes them through `is_nonfinite`); a grad
      norm that is None, non-finite or <= 0 is treated as absent;
    * it never fires during the warm-up;
    * records that are strong for a signal never enter that signal's statistics, and elevated
      ones enter clipped at the elevation bar, so a spike cannot drag the baseline up and hide
      itself, while a slow genuine drift is still followed.
    """

    def __init__(self, config: SpikeConfig | None = None):
        self.config = config if config is not None else SpikeConfig()
        c = self.config
        self._loss = _Track(c.level_window, c.window)
        self._grad = _Track(c.level_window, c.window)  # log(grad_norm)
        self._log_min_grad_ratio = math.log(c.min_grad_ratio)
        self._reset_counters()

    def _reset_counters(self) -> None:
        self._seen = 0
        self._warm_left = self.config.warmup_steps
        self._last_step: int | None = None
        self._score = 0.0
        self._clear_run()
        self._in_spike = False
        self._spike_len = 0
        self._spikes = 0

    def _clear_run(self) -> None:
        self._run_start: int | None = None
        self._streak = 0
        self._streak_loss = False
        self._run_grad = False
        self._run_peak = 0.0

    # ---- public read-only views ------------------------------------------------------------

    @property
    def score(self) -> float:
        """Latest anomaly score: max(loss z / loss_threshold, grad z / grad_threshold), >= 0.

        1.0 means a signal is at its strong bar; 0 during warm-up or for non-finite records.
        """
        return self._score

    @property
    def in_spike(self) -> bool:
        """True from a confirmation until the signals come back below the elevation bar."""
        return self._in_spike

    @property
    def anomalous(self) -> bool:
        """True while an elevated run or a confirmed spike is in progress."""
        return self._in_spike or self._run_start is not None

    def healthy_stats(self) -> dict:
        """Plain-typed summary for a checkpoint manifest: was the run healthy at this point?

        Keys: last_step, records, warm (statistics are trusted), anomalous, in_spike, score,
        loss_median, loss_mad (MAD-based sigma of the loss residuals), grad_norm_median (None if
        no grad norms were seen), grad_log_mad, spikes (confirmed so far).
        """
        lt, gt = self._loss, self._grad
        return {
            "last_step": self._last_step,
            "records": self._seen,
            "warm": self._warm_left == 0,
            "anomalous": self.anomalous,
            "in_spike": self._in_spike,
            "score": self._score,
            "loss_median": None if math.isnan(lt.level) else lt.level,
            "loss_mad": lt.spread,
            "grad_norm_median": None if math.isnan(gt.level) else math.exp(gt.level),
            "grad_log_mad": gt.spread,
            "spikes": self._spikes,
        }

    # ---- the hot path ----------------------------------------------------------------------

    def update(self, step: int, loss: float, grad_norm: float | None = None) -> Spike | None:
        """Feed one record; return a `Spike` on the record that confirms one, else None."""
        loss = float(loss)
        if not math.isfinite(loss):
            self._score = 0.0
            return None
        log_g = None
        if grad_norm is not None:
            g = float(grad_norm)
            if g > 0.0 and math.isfinite(g):
                log_g = math.log(g)

        step = int(step)
        if self._last_step is not None and step <= self._last_step:
            self._clear_run()
            self._in_spike = False
            self._spike_len = 0
        self._last_step = step
        self._seen += 1
        c = self.config
        lt, gt = self._loss, self._grad

        if self._warm_left > 0:
            self._warm_left -= 1
            lt.push(loss)
            if log_g is not None:
                gt.push(log_g)
            self._score = 0.0
            return None

        # Loss: residual against the short-window median, minus that median's lag bias when the
        # curve is rising (clamped at 0: on a falling curve the lag only makes us more cautious).
        level = lt.level
        sigma = lt.spread
        floor = c.min_rel_scale * abs(level)
        if sigma < floor:
            sigma = floor
        if sigma < 1e-12:
            sigma = 1e-12
        center = lt.center if lt.center > 0.0 else 0.0
        lz = (loss - level - center) / sigma
        rise = loss - level
        loss_strong = lz >= c.loss_threshold and rise >= c.min_loss_rise * abs(level)
        loss_peak = loss_strong and lz >= c.peak_threshold and rise >= c.min_peak_rise * abs(level)

        gz = 0.0
        grad_strong = False
        if log_g is not None and len(gt) >= c.level_window // 2:
            g_level = gt.level
            g_sigma = gt.spread if gt.spread > c.min_log_scale else c.min_log_scale
            if g_sigma < 1e-12:
                g_sigma = 1e-12
            g_center = gt.center if gt.center > 0.0 else 0.0
            gz = (log_g - g_level - g_center) / g_sigma
            grad_strong = gz >= c.grad_threshold and log_g - g_level >= self._log_min_grad_ratio

        score = lz / c.loss_threshold
        gs = gz / c.grad_threshold
        if gs > score:
            score = gs
        if score < 0.0:
            score = 0.0
        self._score = score
        elevated = lz >= c.onset_threshold or gz >= c.onset_threshold

        if self._in_spike:
            if elevated:
                self._spike_len += 1
                if self._spike_len >= c.rebaseline_after:
                    # The "spike" never came down: accept its level as the new normal.
                    lt.clear()
                    gt.clear()
                    self._in_spike = False
                    self._spike_len = 0
                    self._warm_left = c.warmup_steps
                return None
            self._in_spike = False
            self._spike_len = 0

        if not elevated:
            self._clear_run()
            lt.push(loss)
            if log_g is not None:
                gt.push(log_g)
            return None

        # Elevated: part of an anomalous run. Keep strong values out of the statistics and clip
        # the rest at the elevation bar.
        if not loss_strong:
            lt.push(min(loss, level + center + c.onset_threshold * sigma))
        if log_g is not None and not grad_strong and len(gt) >= c.level_window // 2:
            gt.push(min(log_g, gt.level + max(gt.center, 0.0)
                        + c.onset_threshold * max(gt.spread, c.min_log_scale)))
        elif log_g is not None and len(gt) < c.level_window // 2:
            gt.push(log_g)

        if self._run_start is None:
            self._run_start = step
        if score > self._run_peak:
            self._run_peak = score
        if loss_strong or grad_strong:
            self._streak += 1
            # Grad evidence counts when it leads or coincides with the loss peak: that is how
            # instabilities look; a grad jump that only follows one huge loss record is the
            # ordinary echo of a hard batch.
            if grad_strong and not self._streak_loss:
                self._run_grad = True
            self._streak_loss = self._streak_loss or loss_peak
        else:
            self._streak = 0
            self._streak_loss = False
        need = c.patience if self._run_grad else c.loss_only_patience
        if self._streak < need or (c.require_loss and not self._streak_loss):
            return None

        spike = Spike(
            step=step,
            onset_step=self._run_start,
            score=self._run_peak,
            reason=self._reason(step, loss, level, lz, log_g, gz),
        )
        self._spikes += 1
        self._clear_run()
        self._in_spike = True
        self._spike_len = 0
        return spike

    def _reason(self, step: int, loss: float, level: float, lz: float,
                log_g: float | None, gz: float) -> str:
        parts = [f"loss {loss:.4g} vs recent median {level:.4g} "
                 f"({loss / level if level else math.inf:.2f}x, z={lz:.1f})"]
        if log_g is not None and len(self._grad):
            g, g0 = math.exp(log_g), math.exp(self._grad.level)
            parts.append(f"grad norm {g:.4g} vs recent median {g0:.4g} ({g / g0:.1f}x, log-z={gz:.1f})")
        parts.append(f"anomalous since step {self._run_start}, confirmed at step {step} after "
                     f"{self._streak} strong record(s)")
        return "; ".join(parts)

    # ---- persistence -----------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to resume, as JSON-serialisable plain types."""
        return {
            "version": _STATE_VERSION,
            "config": asdict(self.config),
            "loss": self._loss.state(),
            "grad": self._grad.state(),
            "seen": self._seen,
            "warm_left": self._warm_left,
            "last_step": self._last_step,
            "score": self._score,
            "run_start": self._run_start,
            "streak": self._streak,
            "streak_loss": self._streak_loss,
            "run_grad": self._run_grad,
            "run_peak": self._run_peak,
            "in_spike": self._in_spike,
            "spike_len": self._spike_len,
            "spikes": self._spikes,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict()`. The detector keeps its own config (a restarted job may
        have been re-tuned); the saved windows are trimmed to it if they are longer."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported SpikeDetector state version {state.get('version')!r}")
        self._loss.restore(state["loss"])
        self._grad.restore(state["grad"])
        self._seen = int(state["seen"])
        self._warm_left = int(state["warm_left"])
        self._last_step = state["last_step"]
        self._score = float(state["score"])
        self._run_start = state["run_start"]
        self._streak = int(state["streak"])
        self._streak_loss = bool(state["streak_loss"])
        self._run_grad = bool(state["run_grad"])
        self._run_peak = float(state["run_peak"])
        self._in_spike = bool(state["in_spike"])
        self._spike_len = int(state["spike_len"])
        self._spikes = int(state["spikes"])

    def reset(self) -> None:
        """Forget everything, as if freshly built."""
        self._loss.clear()
        self._grad.clear()
        self._reset_counters()


# --------------------------------------------------------------------------------------------
# Stragglers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StragglerReport:
    """stragglers: ranks flagged now; ratios: each rank's latest step time over the median of
    the other ranks' latest step times; median_s: median latest step time over all ranks."""

    stragglers: frozenset[int]
    ratios: dict[int, float]
    median_s: float


def _median_excluding(s: list[float], i: int) -> float:
    """Median of sorted `s` without its element at index i."""
    n = len(s) - 1
    h = n // 2

    def at(j: int) -> float:
        return s[j] if j < i else s[j + 1]

    return at(h) if n & 1 else 0.5 * (at(h - 1) + at(h))


class StragglerDetector:
    """Flags ranks whose step time stays above `factor` x their peers' median.

    Feed `update(rank, step, step_time_s)` with each rank's *own* step time (compute before the
    gradient all-reduce: in lock-step data parallelism the all-reduce makes every rank wait for
    the slowest, so wall time per step is the same everywhere and names nobody).

    A rank is compared with the median of the other ranks' latest times (leave-one-out, so a
    2-rank job can still name its slow rank), and becomes a straggler after `patience`
    consecutive observations above `factor`; one observation at or below clears it. Records for
    a step not after the rank's previous one, and non-finite or negative times, are ignored.
    Cost per update: O(log n) searches plus two memmoves over the n ranks' times.
    """

    def __init__(self, factor: float = 1.5, patience: int = 3, min_ranks: int = 2):
        if factor <= 1.0:
            raise ValueError(f"factor must be > 1, got {factor}")
        if patience < 1 or min_ranks < 2:
            raise ValueError("patience must be >= 1 and min_ranks >= 2")
        self.factor = factor
        self.patience = patience
        self.min_ranks = min_ranks
        self._latest: dict[int, tuple[int, float]] = {}
        self._sorted: list[float] = []
        self._count: dict[int, int] = {}
        self._stragglers: set[int] = set()

    def update(self, rank: int, step: int, step_time_s: float) -> frozenset[int]:
        """Record one observation; return the ranks that are stragglers now."""
        t = float(step_time_s)
        prev = self._latest.get(rank)
        if not (t >= 0.0 and math.isfinite(t)) or (prev is not None and step <= prev[0]):
            return frozenset(self._stragglers)
        s = self._sorted
        if prev is not None:
            del s[bisect_left(s, prev[1])]
        insort(s, t)
        self._latest[rank] = (step, t)
        if len(s) < self.min_ranks:
            return frozenset(self._stragglers)
        others = _median_excluding(s, bisect_left(s, t))
        slow = t > self.factor * others if others > 0.0 else t > 0.0
        n = self._count.get(rank, 0) + 1 if slow else 0
        self._count[rank] = n
        if n >= self.patience:
            self._stragglers.add(rank)
        else:
            self._stragglers.discard(rank)
        return frozenset(self._stragglers)

    @property
    def stragglers(self) -> frozenset[int]:
        return frozenset(self._stragglers)

    def ratios(self) -> dict[int, float]:
        """Each rank's latest step time over the median of the others' (O(n log n))."""
        s = self._sorted
        if len(s) < 2:
            return {r: 1.0 for r in self._latest}
        out = {}
        for rank, (_, t) in self._latest.items():
            m = _median_excluding(s, bisect_left(s, t))
            out[rank] = t / m if m > 0.0 else (math.inf if t > 0.0 else 1.0)
        return out

    def report(self) -> StragglerReport:
        return StragglerReport(
            stragglers=frozenset(self._stragglers),
            ratios=self.ratios(),
            median_s=_sorted_median(self._sorted) if self._sorted else math.nan,
        )

    def forget(self, rank: int) -> None:
        """Drop a rank (it left the gang)."""
        prev = self._latest.pop(rank, None)
        if prev is not None:
            del self._sorted[bisect_left(self._sorted, prev[1])]
        self._count.pop(rank, None)
        self._stragglers.discard(rank)

    def reset(self) -> None:
        self._latest.clear()
        self._sorted.clear()
        self._count.clear()
        self._stragglers.clear()


# --------------------------------------------------------------------------------------------
# Hangs
# --------------------------------------------------------------------------------------------


def derive_hang_timeout(step_times: Iterable[float], floor_s: float = 60.0, factor: float = 10.0) -> float:
    """max(floor_s, factor * median(step_times)); floor_s when no usable (finite, >= 0) times.

    The median, not the mean or max, so one slow step (an eval, a checkpoint) does not stretch
    the timeout; the floor covers jobs whose steps are so short that 10x would be a hiccup.
    """
    usable = [float(t) for t in step_times if t is not None and math.isfinite(float(t)) and float(t) >= 0.0]
    if not usable:
        return float(floor_s)
    return max(float(floor_s), factor * statistics.median(usable))


class HangWatch:
    """Tracks the last progress time of each rank; `stalled(now)` names the silent ones.

    Time is always passed in (`now`, in seconds on any monotonic clock), so tests never sleep.

    * `progress(rank, step, now)`: a report from a rank. It counts as progress only when the step
      differs from the rank's previous one (a lower step is a resume from a checkpoint, which is
      progress too). The intervals between consecutive progress reports, per step advanced, are
      kept (the last `history` of them) to derive the timeout when none is fixed.
    * `touch(rank, now)`: liveness without a step, for long operations the caller knows about
      (saving a checkpoint, an evaluation pass) that would otherwise look like a hang.
    * a rank that has reported no step yet (registered by `start` or `touch`) is judged against
      max(timeout, startup_s), since the first step pays for compilation and checkpoint loading.
    """

    def __init__(self, timeout_s: float | None = None, *, floor_s: float = 60.0, factor: float = 10.0,
                 startup_s: float = 600.0, history: int = 64):
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s}")
        self.fixed_timeout_s = timeout_s
        self.floor_s = floor_s
        self.factor = factor
        self.startup_s = startup_s
        self._step_times: deque[float] = deque(maxlen=history)
        # rank -> [last reported step (None before the first), time of last progress or touch]
        self._ranks: dict[int, list] = {}

    def start(self, ranks: Iterable[int], now: float) -> None:
        """Register ranks expected to report, with their clocks starting at `now`."""
        for r in ranks:
            self._ranks[r] = [None, float(now)]

    def progress(self, rank: int, step: int, now: float) -> None:
        entry = self._ranks.get(rank)
        if entry is None:
            self._ranks[rank] = [step, float(now)]
            return
        last_step, last_time = entry
        if step == last_step:
            return
        # Only an interval between two step reports is a step time: the one from registration
        # to the first step holds compilation and loading.
        if last_step is not None and step > last_step:
            dt = (now - last_time) / (step - last_step)
            if dt >= 0.0:
                self._step_times.append(dt)
        entry[0], entry[1] = step, float(now)

    def touch(self, rank: int, now: float) -> None:
        entry = self._ranks.get(rank)
        if entry is None:
            self._ranks[rank] = [None, float(now)]
        else:
            entry[1] = float(now)

    @property
    def timeout_s(self) -> float:
        """The fixed timeout, else one derived from the observed step times."""
        if self.fixed_timeout_s is not None:
            return float(self.fixed_timeout_s)
        return derive_hang_timeout(self._step_times, self.floor_s, self.factor)

    def silence(self, now: float) -> dict[int, float]:
        """Seconds since each rank's last progress (or touch)."""
        return {r: now - e[1] for r, e in self._ranks.items()}

    def stalled(self, now: float) -> set[int]:
        """Ranks with no progress within their timeout at time `now`."""
        timeout = self.timeout_s
        startup = max(timeout, self.startup_s)
        return {r for r, (step, t) in self._ranks.items()
                if now - t > (timeout if step is not None else startup)}

    def pause(self, seconds: float, before: float) -> None:
        """`seconds` ending at `before` in which no report could be heard (the watcher's own process did
        not run): taken out of the silence of every rank last heard from before then."""
        for entry in self._ranks.values():
            if entry[1] < before:
                entry[1] += seconds

    def forget(self, rank: int) -> None:
        self._ranks.pop(rank, None)

    def reset(self) -> None:
        self._ranks.clear()
        self._step_times.clear()
