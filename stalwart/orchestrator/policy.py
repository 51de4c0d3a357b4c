"""The failure policy decides; the supervisor acts. Decisions are values."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from stalwart.launchers.plan import Rewind
from stalwart.spec import FaultTolerance

# Causes that are not the job's fault and spend no budget.
FREE_CAUSES = {"controller_restart", "grow"}
# How an attempt ends without a fault.
ENDINGS = {"succeeded", "cancelled"}
# Causes with a budget of their own that neither count toward max_restarts nor back off: a preemption
# is the cluster taking a node back, not a fault that repeats because of the job.
UNCAPPED_CAUSES = {"preemption"}


def spends_budget(cause: str | None) -> bool:
    """Whether an attempt that ended with `cause` spent a restart (a new controller recounts them)."""
    return bool(cause) and cause not in FREE_CAUSES and cause not in ENDINGS


@dataclass(frozen=True)
class Decision:
    restart: bool
    reason: str
    delay_s: float = 0.0
    rewind: Rewind = field(default_factory=Rewind)


@dataclass(frozen=True)
class Rollback:
    """What the supervisor knows when a NaN or a spike is found, for choosing where to go back to."""

    onset_step: int
    fault_step: int
    committed: tuple[int, ...]  # committed checkpoint steps
    positions: dict  # step -> data position after that step (rank 0's reports)


class FailurePolicy:
    """Budgets per cause plus a global cap, with exponential backoff between restarts.

    NaN and loss spikes roll back to the newest committed checkpoint from before the onset and
    skip the data from there to the fault plus `skip_batches`; a spike that comes back inside the
    skipped-past stretch escalates (a lower learning rate, or failing with the reason).
    """

    def __init__(self, config: FaultTolerance):
        self.config = config
        self.spent: Counter[str] = Counter()
        self.skips: list[tuple[int, int]] = []
        self.pinned: set[int] = set()
        self.lr_scale = 1.0
        self._last_rollback: tuple[int, int] | None = None  # (target step, fault step + margin)

    @property
    def restarts(self) -> int:
        return sum(self.spent.values())

    def _capped(self) -> int:
        """Restarts that count toward max_restarts."""
        return sum(n for cause, n in self.spent.items() if cause not in UNCAPPED_CAUSES)

    def decide(self, cause: str, error: str, rollback: Rollback | None = None) -> Decision:
        decision = self._budget(cause, error)
        if not decision.restart or rollback is None:
            return Decision(decision.restart, decision.reason, decision.delay_s, self._rewind())
        return self._rollback(decision, rollback)

    def _rewind(self, max_step: int | None = None) -> Rewind:
        return Rewind(tuple(self.skips), tuple(sorted(self.pinned)), max_step, self.lr_scale)

    def _rollback(self, decision: Decision, rb: Rollback) -> Decision:
        margin = self.config.skip_batches
        reason = decision.reason
        if self._last_rollback and self._last_rollback[0] < rb.onset_step <= self._last_rollback[1] + margin:
            if self.config.spike_escalation == "fail":
                return Decision(False, f"the spike came back after skipping data (onset step {rb.onset_step}); "
                                       "spike_escalation is 'fail'")
            self.lr_scale *= self.config.spike_lr_scale
            reason += f"; it came back, so the learning rate is scaled by {self.lr_scale:g}"
        before = [s for s in rb.committed if s < rb.onset_step]
        target = max(before) if before else 0
        start = rb.positions.get(target, target) if target else 0
        end = rb.positions.get(rb.fault_step, rb.fault_step) + margin
        self.skips.append((start, end))
        if target:
            self.pinned.add(target)
        self._last_rollback = (target, rb.fault_step + margin)
        where = f"checkpoint step {target}" if target else "the start (no checkpoint before the onset)"
        reason += f"; rolling back to {where} and skipping batches [{start}, {end})"
        return Decision(True, reason, decision.delay_s, self._rewind(max_step=target))

    def _budget(self, cause: str, error: str) -> Decision:
        if cause in FREE_CAUSES:
            return Decision(True, f"{cause}: restarting (spends no budget)")
        budget = self.config.budgets.get(cause, 0)
        if self.spent[cause] >= budget:
            if budget == 0 and cause == "user_error":
                why = "an error in the job's code is not retried (set fault_tolerance.budgets.user_error to retry)"
            else:
                why = f"the {cause} budget of {budget} restart(s) is spent"
            return Decision(False, f"{error} ({why})")
        if cause not in UNCAPPED_CAUSES and self._capped() >= self.config.max_restarts:
            return Decision(False, f"{error} (fault_tolerance.max_restarts={self.config.max_restarts} reached)")
        # The first restart for a cause is immediate (a fault every few hours should not cost seconds
        # each time); a cause that recurs waits backoff_s, then twice that, and so on.
        n = self.spent[cause]
        delay = 0.0 if n == 0 or cause in UNCAPPED_CAUSES else \
            min(self.config.backoff_s * (2 ** (n - 1)), self.config.max_backoff_s)
        self.spent[cause] += 1
        return Decision(True, f"{cause}: restart {self.spent[cause]} of {budget}", delay)


# ---- where, and with how many ranks, the next attempt runs ---------------------------------------
QUARANTINE_AFTER = 2  # failures of one node before the job stops using it


@dataclass(frozen=True)
class WaitDecision:
    """What to do while a restart waits for its gang: `wait`, `shrink` (to `world_size` ranks),
    `lift` (use quarantined or unreachable nodes again) or `give_up` (a fault that ends the job)."""

    action: str
    reason: str = ""
    world_size: int | None = None


class PlacementPolicy:
    """Elastic shrink and grow, node quarantine and the resource wait, as values; the supervisor acts.

    Pure: the supervisor passes in what it sees (seconds waited, bundles that fit now, nodes).
    """

    def __init__(self, resources, config: FaultTolerance, quarantine_after: int = QUARANTINE_AFTER):
        self.resources = resources
        self.config = config
        self.quarantine_after = quarantine_after
        self.node_failures: Counter[str] = Counter()

    def while_waiting(self, *, attempt: int, waited: float, world_size: int, fit: int, avoiding: int) -> WaitDecision:
        """A gang of `world_size` has waited `waited` s to be placed; `fit` bundles fit now; the
        reservation avoids `avoiding` nodes. The first attempt always waits for its full gang."""
        res, ft = self.resources, self.config
        if attempt == 1:
            return WaitDecision("wait")
        if res.min_workers is not None and waited >= ft.elastic_wait_s:
            smaller = min(world_size - 1, fit)
            if smaller >= res.min_workers:
                return WaitDecision("shrink", f"the full gang of {world_size} has not fit for {waited:.0f} s: going "
                                    f"on with {smaller} rank(s) (min_workers {res.min_workers})", smaller)
        if avoiding and waited > ft.resource_wait_s / 2:
            # Better a suspect node than no progress at all.
            return WaitDecision("lift", f"no room without the {avoiding} quarantined or unreachable node(s) after "
                                f"{waited:.0f} s: using them again")
        if waited > ft.resource_wait_s:
            return WaitDecision("give_up", f"resources did not come back within {ft.resource_wait_s:g} s")
        return WaitDecision("wait")

    def grow_to(self, *, world_size: int, fit: int) -> int | None:
        """Running short-handed: the full size to restart with once the missing ranks fit again."""
        full = self.resources.workers
        return full if world_size < full and fit >= full - world_size else None

    def blame(self, node: str, *, others_alive: bool, quarantined: set[str]) -> bool:
        """Count a failure against `node`; True when it is to be quarantined now. Only where other
        nodes exist: on a one-node cluster a quarantine would strand the job."""
        self.node_failures[node] += 1
        return others_alive and node not in quarantined and self.node_failures[node] >= self.quarantine_after
