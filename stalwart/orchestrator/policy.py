"""The failure policy decides; the supervisor acts. Decisions are values."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from stalwart.spec import FaultTolerance

# Causes that are not the job's fault and spend no budget.
FREE_CAUSES = {"controller_restart"}


@dataclass(frozen=True)
class Decision:
    restart: bool
    reason: str
    delay_s: float = 0.0
    plan: dict = field(default_factory=dict)


class FailurePolicy:
    """Budgets per cause plus a global cap, with exponential backoff between restarts."""

    def __init__(self, config: FaultTolerance):
        self.config = config
        self.spent: Counter[str] = Counter()

    @property
    def restarts(self) -> int:
        return sum(self.spent.values())

    def decide(self, cause: str, error: str) -> Decision:
        if cause in FREE_CAUSES:
            return Decision(True, f"{cause}: restarting (spends no budget)")
        budget = self.config.budgets.get(cause, 0)
        if self.spent[cause] >= budget:
            if budget == 0 and cause == "user_error":
                why = "an error in the job's code is not retried (set fault_tolerance.budgets.user_error to retry)"
            else:
                why = f"the {cause} budget of {budget} restart(s) is spent"
            return Decision(False, f"{error} ({why})")
        if self.restarts >= self.config.max_restarts:
            return Decision(False, f"{error} (fault_tolerance.max_restarts={self.config.max_restarts} reached)")
        delay = min(self.config.backoff_s * (2 ** self.spent[cause]), self.config.max_backoff_s)
        self.spent[cause] += 1
        return Decision(True, f"{cause}: restart {self.spent[cause]} of {budget}", delay)
