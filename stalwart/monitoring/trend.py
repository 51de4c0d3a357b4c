"""Slow divergence: a loss that creeps up over hundreds of steps while the grad norm grows.

`SpikeDetector` follows slow changes on purpose (its reference level is a short median), so a loss
that climbs 0.1 % per step never stands out from its own recent past. `TrendDetector` looks at the
shape of the last stretch of the curve instead, block by block:

* records are summarised in blocks of `block` records by their median (one hard batch or a
  heavy-tailed draw moves a median little), for the loss and for log(grad norm);
* the baseline is the lowest smoothed loss seen (the mean of `smooth` consecutive block medians),
  with the grad level and the step at that point; the *rise* is the smoothed loss now over it;
* a *creep* is a rise that is spread over the window of the last `window` blocks: their straight
  line slopes up significantly (t >= `slope_t` against the blocks' own noise, estimated from
  their differences over a long history) and by at least `min_window_rise` over the window, the
  newest half of the window still slopes up, and a straight line fits the window better than one
  step does (a data-mixture change is a step: the level jumps, then stays);
* an alarm needs a creep with a rise of `min_rise` and the grad norm `min_grad_ratio` above its
  level at the baseline (divergence drives both), or a rise of `loss_only_rise` when the grad norm
  is absent or flat, on `patience` consecutive blocks;
* while the reported learning rate rose within the window (a warmup or a re-warmup), a rising loss
  is what the schedule does, and nothing is judged.

Pure, like the other detectors: plain numbers in, a `Divergence` out once per alarm; no clock.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

__all__ = ["Divergence", "TrendConfig", "TrendDetector"]

_MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class TrendConfig:
    """Knobs of `TrendDetector`; defaults tuned with bench/divergence_cases.py (see its cases).

    block: records per block (the median that makes everything else robust).
    smooth: block medians averaged for the current level and for the baseline.
    window: blocks whose shape is judged (block * window records: 60 by default).
    warmup_blocks: blocks that only feed the statistics before anything is judged (also after a
        rewind); the fast fall at the start of training must be over before the running minimum
        means anything.
    min_rise: the smoothed loss over its lowest level, as a fraction, for an alarm with grad evidence.
    min_grad_ratio: the smoothed grad norm over its level at the loss's lowest point.
    loss_only_rise: the rise needed when the grad norm does not corroborate (absent or flat).
    min_window_rise: the fitted line's rise over the window, as a fraction of the level: a healthy
        run whose loss drifts up a few percent over thousands of steps rises far less than this
        over one window.
    slope_t: how many standard errors the window's slope must clear.
    patience: consecutive blocks on which everything holds.
    noise_blocks: block-median differences kept to estimate the blocks' noise.
    min_rel_noise: floor on that noise, as a fraction of the level (a perfectly smooth curve
        would otherwise make any wobble significant).
    history_blocks: smoothed levels kept to date the onset (the newest one near the lowest).
    """

    block: int = 5
    smooth: int = 3
    window: int = 12
    warmup_blocks: int = 40
    min_rise: float = 0.03
    min_grad_ratio: float = 1.2
    loss_only_rise: float = 0.10
    min_window_rise: float = 0.015
    slope_t: float = 3.0
    patience: int = 2
    noise_blocks: int = 60
    history_blocks: int = 200
    min_rel_noise: float = 5e-4

    def __post_init__(self) -> None:
        problems = []
        if self.block < 1:
            problems.append(f"block must be >= 1, got {self.block}")
        if not 1 <= self.smooth <= self.window // 2:
            problems.append(f"smooth must be in [1, window // 2], got {self.smooth}")
        if self.window < 6:
            problems.append(f"window must be >= 6 blocks, got {self.window}")
        if self.warmup_blocks < self.window:
            problems.append(f"warmup_blocks must be >= window ({self.window}), got {self.warmup_blocks}")
        if not 0 < self.min_rise <= self.loss_only_rise:
            problems.append(f"need 0 < min_rise <= loss_only_rise, got {self.min_rise} and {self.loss_only_rise}")
        if self.min_grad_ratio < 1:
            problems.append(f"min_grad_ratio must be >= 1, got {self.min_grad_ratio}")
        if self.min_window_rise < 0 or self.slope_t <= 0:
            problems.append("min_window_rise must be >= 0 and slope_t > 0")
        if self.patience < 1:
            problems.append(f"patience must be >= 1, got {self.patience}")
        if self.history_blocks < self.window:
            problems.append(f"history_blocks must be >= window ({self.window}), got {self.history_blocks}")
        if self.noise_blocks < 8:
            problems.append(f"noise_blocks must be >= 8, got {self.noise_blocks}")
        if self.min_rel_noise < 0:
            problems.append("min_rel_noise must be >= 0")
        if problems:
            raise ValueError("invalid TrendConfig: " + "; ".join(problems))


@dataclass(frozen=True)
class Divergence:
    """A confirmed slow divergence.

    step: the record at which it was confirmed.
    onset_step: the first step of the block where the loss was lowest before it rose: a checkpoint
        taken strictly before it predates the divergence.
    rise: the smoothed loss over its lowest level, minus 1.
    grad_ratio: the smoothed grad norm over its level at that point (None without grad norms).
    reason: the numbers behind the decision.
    """

    step: int
    onset_step: int
    rise: float
    grad_ratio: float | None
    reason: str


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n & 1 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _line(ys: list[float]) -> tuple[float, float]:
    """Least-squares slope of ys against 0..n-1, and the residual sum of squares."""
    n = len(ys)
    xbar = (n - 1) / 2
    ybar = sum(ys) / n
    sxx = sum((i - xbar) ** 2 for i in range(n))
    slope = sum((i - xbar) * (y - ybar) for i, y in enumerate(ys)) / sxx
    rss = sum((y - ybar - slope * (i - xbar)) ** 2 for i, y in enumerate(ys))
    return slope, rss


def _best_step(ys: list[float], edge: int = 2) -> float:
    """Residual sum of squares of the best one-step (two constant levels) fit, `edge` points a side."""
    n = len(ys)
    total, total2 = sum(ys), sum(y * y for y in ys)
    best = math.inf
    left = 0.0
    for k in range(1, n):
        left += ys[k - 1]
        if k < edge or n - k < edge:
            continue
        right = total - left
        rss = total2 - left * left / k - right * right / (n - k)
        best = min(best, rss)
    return best


class TrendDetector:
    """Confirms slow divergence online from (step, loss, grad_norm, lr) records.

    Contract (as `SpikeDetector`'s): feed records in step order with `update`; it returns a
    `Divergence` once, on the record that confirms it, else None. A step not after the previous one
    is a rewind (training resumed from a checkpoint): everything is forgotten and the warm-up starts
    again, since the baseline may hold the stretch that was rolled back. Non-finite losses are
    ignored (the NaN check has them); a grad norm that is None, non-finite or <= 0 is absent, and so
    is an lr that is None. One rise is told once: after an alarm, the next needs the loss to have come
    back within half of `min_rise` of its lowest first (or a rewind).
    """

    def __init__(self, config: TrendConfig | None = None):
        self.config = config if config is not None else TrendConfig()
        self.reset()

    def reset(self) -> None:
        """Forget everything, as if freshly built."""
        c = self.config
        self._last_step: int | None = None
        self._buf_loss: list[float] = []
        self._buf_grad: list[float] = []
        self._buf_first: int | None = None
        self._lr_prev: float | None = None
        self._lr_rise_block: int | None = None  # index of the last block in which the lr went up
        self._blocks = 0
        self._loss_b: deque[float] = deque(maxlen=c.window)
        self._grad_b: deque[float | None] = deque(maxlen=c.window)
        self._first_b: deque[int] = deque(maxlen=c.window)
        self._diffs: deque[float] = deque(maxlen=c.noise_blocks)
        self._min: tuple[float, int, float | None] | None = None  # (smoothed loss, its first step, log grad)
        self._levels: deque[tuple[float, int]] = deque(maxlen=c.history_blocks)  # (smoothed loss, first step)
        self._fired = False  # an alarm was given for the current rise
        self._held = 0
        self._alarms = 0

    @property
    def alarms(self) -> int:
        return self._alarms

    def update(self, step: int, loss: float, grad_norm: float | None = None,
               lr: float | None = None) -> Divergence | None:
        if self._last_step is not None and step <= self._last_step:
            self.reset()
        self._last_step = step
        try:
            loss = float(loss)
        except (TypeError, ValueError):
            return None
        if not math.isfinite(loss):
            return None
        if lr is not None:
            lr = float(lr)
            if self._lr_prev is not None and lr > self._lr_prev * (1 + 1e-9):
                self._lr_rise_block = self._blocks
            self._lr_prev = lr
        g = None
        if grad_norm is not None:
            try:
                gv = float(grad_norm)
            except (TypeError, ValueError):
                gv = math.nan
            if math.isfinite(gv) and gv > 0:
                g = math.log(gv)
        if self._buf_first is None:
            self._buf_first = step
        self._buf_loss.append(loss)
        if g is not None:
            self._buf_grad.append(g)
        if len(self._buf_loss) < self.config.block:
            return None
        return self._close_block(step)

    def _close_block(self, step: int) -> Divergence | None:
        c = self.config
        lb = _median(self._buf_loss)
        gb = _median(self._buf_grad) if len(self._buf_grad) * 2 > len(self._buf_loss) else None
        first = self._buf_first
        self._buf_loss, self._buf_grad, self._buf_first = [], [], None
        if self._loss_b:
            self._diffs.append(lb - self._loss_b[-1])
        self._loss_b.append(lb)
        self._grad_b.append(gb)
        self._first_b.append(first)
        self._blocks += 1
        if len(self._loss_b) < c.smooth:
            return None
        level = sum(list(self._loss_b)[-c.smooth:]) / c.smooth
        recent_g = [x for x in list(self._grad_b)[-c.smooth:] if x is not None]
        glevel = sum(recent_g) / len(recent_g) if len(recent_g) == c.smooth else None
        start = self._first_b[-c.smooth]
        self._levels.append((level, start))
        if self._min is None or level < self._min[0]:
            self._min = (level, start, glevel)
        if self._blocks < c.warmup_blocks or level <= 0:
            self._held = 0
            return None
        if self._lr_rise_block is not None and self._blocks - self._lr_rise_block <= c.window:
            self._held = 0  # the schedule raised the LR: a rising loss is expected
            return None
        base, _, gbase = self._min
        rise = level / base - 1 if base > 0 else 0.0
        if self._fired:
            # Told once per rise: again only after the loss came back near its lowest (or a rewind).
            self._fired = rise > c.min_rise / 2
            self._held = 0
            return None
        grad_ratio = math.exp(glevel - gbase) if glevel is not None and gbase is not None else None
        needed = c.min_rise if grad_ratio is not None and grad_ratio >= c.min_grad_ratio else c.loss_only_rise
        creep = rise >= needed and self._creeping(level)
        self._held = self._held + 1 if creep else 0
        if self._held < c.patience:
            return None
        self._held = 0
        self._alarms += 1
        self._fired = True
        onset = self._onset(base)
        gtext = f", grad norm {grad_ratio:.2f}x its level there" if grad_ratio is not None else ", no grad norm"
        return Divergence(step, onset, rise, grad_ratio,
                          f"smoothed loss {level:.4g} is {rise:+.1%} over its lowest {base:.4g} (from step {onset})"
                          f"{gtext}; rising steadily over the last {c.window * c.block} records")

    def _onset(self, base: float) -> int:
        """Where the rise began: the first step of the newest smoothed level still within a third of
        `min_rise` of the lowest one (on a flat stretch the lowest level itself may be far older)."""
        near = base * (1 + self.config.min_rise / 3)
        for level, start in reversed(self._levels):
            if level <= near:
                return start
        return self._min[1]

    def _creeping(self, level: float) -> bool:
        c = self.config
        ys = list(self._loss_b)
        if len(ys) < c.window or len(self._diffs) < c.window:
            return False
        sigma = _MAD_TO_SIGMA * _median([abs(d - _median(list(self._diffs))) for d in self._diffs]) / math.sqrt(2)
        sigma = max(sigma, c.min_rel_noise * level)
        n = len(ys)
        sxx = n * (n * n - 1) / 12
        slope, rss_line = _line(ys)
        if slope * (n - 1) < c.min_window_rise * level or slope < c.slope_t * sigma / math.sqrt(sxx):
            return False
        half = ys[n // 2:]
        h = len(half)
        slope_recent, _ = _line(half)
        if slope_recent < 0.5 * c.slope_t * sigma / math.sqrt(h * (h * h - 1) / 12):
            return False
        return rss_line < _best_step(ys)
