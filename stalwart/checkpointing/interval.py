"""`every_steps: auto`: how often to save, from what saving costs and how often the job fails.

The Young/Daly rule: with a checkpoint costing `C` seconds of training and failures every `M` seconds
on average, the time lost per unit of run time (the checkpoints' cost plus the work redone after a
failure, half an interval on average) is smallest at an interval of about sqrt(2 C M). Daly (2006)
adds the higher-order terms used here, which matter when C is not small against M.

What C is, per tier: for durable checkpoints the time the step waits for the save (the host copy; the
upload runs in the background), but never an interval shorter than the last upload took (saves would
queue behind each other); for in-memory snapshots the time `snapshot()` blocks (the copy, and waiting
for the previous replication when it is still running). M comes from the job's own history: its run
time over its faults, with one fault's worth of a prior (`checkpoint.auto_mtbf_s`), so that a job that
has not failed yet gets the prior, and a job that keeps failing gets its observed rate.

`AutoInterval` is rank 0's chooser: fed the step times, the costs it measures and the history the
attempt's plan carries, it proposes an interval in steps per tier; every rank takes a proposal at the
same step (through the preemption vote's rounds), so the ranks always agree on which steps save.
Pure but for the clock it is given; unit-tested against scripted costs.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

TIERS = ("durable", "memory")
# What a save is assumed to cost before one was measured, per tier (seconds).
PRIOR_COST_S = {"durable": 1.0, "memory": 0.1}
# A proposal that moves less than this fraction from the interval in force is not made (no churn: the
# time lost is flat near the optimum, C/T + T/2M being 8 % above its least at 1.5x the best T and 25 %
# at half of it, while a loaded machine moves the step time by tens of percent).
HYSTERESIS = 0.5
MAX_STEPS = 1_000_000


def young_daly(cost_s: float, mtbf_s: float) -> float:
    """Seconds of training between two checkpoints that lose the least time (Daly's higher-order form
    of Young's sqrt(2 C M)); M itself once a checkpoint costs half the time between failures or more."""
    if cost_s <= 0:
        return 0.0
    if mtbf_s <= 0 or cost_s >= 2 * mtbf_s:
        return max(mtbf_s, cost_s)
    x = cost_s / (2 * mtbf_s)
    return max(cost_s, math.sqrt(2 * cost_s * mtbf_s) * (1 + math.sqrt(x) / 3 + x / 9) - cost_s)


def mtbf(run_s: float, faults: int, prior_s: float) -> float:
    """The mean time between failures to plan for: the run so far plus one prior failure's worth of
    time, over the failures seen plus that one."""
    return (max(0.0, run_s) + prior_s) / (max(0, faults) + 1)


@dataclass(frozen=True)
class Choice:
    """An interval chosen for one tier, and why (sent in the `checkpoint_interval` event)."""

    tier: str
    every_steps: int
    interval_s: float
    cost_s: float
    measured: bool  # False: the cost is the prior, no save of this tier was timed yet
    mtbf_s: float
    step_s: float
    floor_s: float = 0.0  # the last upload's time, when it set the interval (durable only)

    def as_event(self) -> dict:
        return {"tier": self.tier, "every_steps": self.every_steps, "interval_s": round(self.interval_s, 3),
                "cost_s": round(self.cost_s, 4), "cost_measured": self.measured, "mtbf_s": round(self.mtbf_s, 1),
                "step_s": round(self.step_s, 4), "upload_floor_s": round(self.floor_s, 3)}


class AutoInterval:
    """Rank 0's choice of checkpoint intervals for the tiers set to `auto`.

    `tiers`: those set to auto; `prior_mtbf_s`: checkpoint.auto_mtbf_s; `run_s`, `faults`: the job's
    history before this attempt (from its plan); `clock`: seconds, monotonic (time.monotonic)."""

    def __init__(self, tiers, prior_mtbf_s: float, run_s: float, faults: int, clock, current: dict | None = None):
        self.tiers = tuple(t for t in TIERS if t in tiers)
        self.prior_mtbf_s = prior_mtbf_s
        self.run_s, self.faults = run_s, faults
        self._clock = clock
        self._started = clock()
        self._costs = {t: deque(maxlen=5) for t in TIERS}
        self._upload_s: float | None = None
        self.current: dict[str, int] = dict(current or {})  # tier -> steps in force on every rank
        self.choices: dict[str, Choice] = {}

    def cost(self, tier: str, seconds: float) -> None:
        """A save of `tier` blocked the step this long."""
        if seconds >= 0:
            self._costs[tier].append(seconds)

    def upload(self, seconds: float) -> None:
        """A durable save's background write took this long (start to commit)."""
        if seconds > 0:
            self._upload_s = seconds

    def mtbf_s(self) -> float:
        return mtbf(self.run_s + (self._clock() - self._started), self.faults, self.prior_mtbf_s)

    def choose(self, tier: str, step_s: float) -> Choice:
        measured = bool(self._costs[tier])
        cost = statistics.median(self._costs[tier]) if measured else PRIOR_COST_S[tier]
        m = self.mtbf_s()
        seconds = young_daly(cost, m)
        floor = self._upload_s if tier == "durable" and self._upload_s else 0.0
        seconds = max(seconds, floor)
        steps = max(1, min(MAX_STEPS, round(seconds / step_s))) if step_s > 0 else 1
        return Choice(tier, steps, seconds, cost, measured, m, step_s, floor if floor >= seconds else 0.0)

    def propose(self, step_s: float | None) -> dict[str, int]:
        """The intervals (tier -> steps) to propose now: only those that moved more than HYSTERESIS from
        the one in force, have none yet, or come from the tier's first timed save. Empty before a step
        time is known."""
        if not step_s or step_s <= 0:
            return {}
        out = {}
        for tier in self.tiers:
            choice = self.choose(tier, step_s)
            now = self.current.get(tier)
            before = self.choices.get(tier)
            first_timed = choice.measured and (before is None or not before.measured)  # said, whatever the move
            if now is None or abs(choice.every_steps - now) > HYSTERESIS * now or (
                    first_timed and choice.every_steps != now):
                self.choices[tier] = choice
                out[tier] = choice.every_steps
        return out

    def agreed(self, tier: str, steps: int) -> Choice | None:
        """Every rank now saves `tier` every `steps`: the choice made for it, the first time it is seen."""
        if self.current.get(tier) == steps:
            return None
        self.current[tier] = steps
        return self.choices.get(tier)


def describe(tier: str, choice: dict) -> str:
    """One line for events, `status` and `watch`: the interval chosen for `tier`, and from what."""
    what = {"durable": "checkpoints", "memory": "in-memory snapshots"}.get(tier, tier)
    cost = f"{choice.get('cost_s', 0):.3g} s" + ("" if choice.get("cost_measured") else " (assumed, none timed yet)")
    line = (f"{what} every {choice.get('every_steps')} steps (~{_duration(choice.get('interval_s'))}): "
            f"save cost {cost}, mean time between failures {_duration(choice.get('mtbf_s'))}")
    if choice.get("upload_floor_s"):
        line += f"; no shorter than the last upload ({_duration(choice['upload_floor_s'])})"
    return line


def _duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "?"
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.3g} min"
    return f"{seconds / 3600:.3g} h"
