"""The job supervisor: runs one job's state machine, acts on actors, and reads the report stream.

The loop is two lines: while the state is not terminal, act for it and step. Acting is the only
place that touches actors (through a gang); deciding is the failure policy's; stepping is `states.step`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import math
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

from stalwart.checkpointing import interval
from stalwart.monitoring.detectors import HangWatch, SpikeConfig, SpikeDetector, StragglerDetector, is_nonfinite
from stalwart.monitoring.trend import TrendConfig, TrendDetector
from stalwart.monitoring.metrics import STEP_TIMES, StepTimes
from stalwart.errors import GangStartFailed
from stalwart.launchers.plan import AttemptPlan, Rewind
from stalwart.orchestrator import states as st
from stalwart.orchestrator.freezes import FreezeWatch
from stalwart.orchestrator.freezes import shared as shared_freezes
from stalwart.orchestrator.live_forecast import LiveForecast
from stalwart.orchestrator.policy import FailurePolicy, PlacementPolicy, Rollback, spends_budget
from stalwart.orchestrator.queue import AdmissionQueue
from stalwart.orchestrator.store import JobRecord, Store
from stalwart.spec import JobSpec

log = logging.getLogger(__name__)

# Past a preemption notice's grace, how long the loop still waits for the ranks to end by themselves
# (their results travel back) before it stops the gang.
PREEMPTION_MARGIN_S = 10.0
# How often a running attempt asks Ray which nodes are draining.
DRAIN_CHECK_S = 1.0
# A rank's function returned before the run's last step: how long its peers may then make no progress
# before the job fails, saying so (they wait for it in a collective that never completes).
EARLY_RETURN_QUIET_S = 10.0


class Gang(Protocol):
    """What the supervisor needs from a gang of rank workers (RayGang in production, fakes in tests)."""

    world_size: int

    def reserve(self, timeout: float) -> bool: ...
    def waiting_for(self) -> str: ...
    def start(self, plan: AttemptPlan, sink_for: Callable[[int], Callable]) -> None: ...  # raises GangStartFailed
    def poll(self, timeout: float): ...  # -> GangOutcome | None
    def warm_spares(self) -> int: ...  # once the attempt trains: get ready for a fast restart; -> spares ready
    def stop(self, keep: bool = False) -> None: ...  # keep: hold the reservation for the next attempt


GangFactory = Callable[[str, int, JobSpec], Gang]
SinkFactory = Callable[[str, int, int], Callable[[dict], None]]


@dataclass
class LiveStats:
    """What the stream says about the current run; read by status() and the metrics exporter."""

    step: int = 0
    loss: float | None = None
    grad_norm: float | None = None
    max_steps: int | None = None
    last_checkpoint: str | None = None
    last_checkpoint_step: int | None = None
    last_checkpoint_at: float | None = None
    started_at: float | None = None
    last_report_at: float | None = None
    tokens: deque = field(default_factory=lambda: deque(maxlen=4096))  # (ts, tokens)
    step_times: deque = field(default_factory=lambda: deque(maxlen=256))  # (ts of rank-0 records)
    rank_last: dict = field(default_factory=dict)  # rank -> (ts, step)
    rank_step_s: dict = field(default_factory=dict)  # rank -> recent seconds per step
    restoring: dict = field(default_factory=dict)  # rank -> its last restore_progress event, while it reads

    def restore(self) -> dict | None:
        """The checkpoint read in progress, over the ranks still reading: bytes read, of the checkpoint's
        size (each rank reads about its share of it), and the rate since the first progress report."""
        reading = list(self.restoring.values())
        if not reading:
            return None
        read = sum(int(e.get("bytes_read") or 0) for e in reading)
        first = min(e["first_ts"] for e in reading)
        last = max(e.get("ts") or first for e in reading)
        return {"step": reading[0].get("step"), "bytes_read": read, "bytes_total": reading[0].get("bytes_total"),
                "ranks_reading": sorted(self.restoring), "bytes_per_s": read / (last - first) if last > first else None}

    @classmethod
    def resumed(cls, saved: dict) -> LiveStats:
        """Carry on from the figures a previous controller saved (`JobSupervisor.summary()`), so a job
        resumed after a controller restart neither shows step 0 nor forgets its last checkpoint."""
        def number(key):  # a non-finite loss was saved as text
            return saved.get(key) if isinstance(saved.get(key), (int, float)) else None

        return cls(step=number("step") or 0, loss=number("loss"), grad_norm=number("grad_norm"),
                   max_steps=number("max_steps"), last_checkpoint=saved.get("last_checkpoint"),
                   last_checkpoint_step=number("last_checkpoint_step"), last_checkpoint_at=number("last_checkpoint_at"))

    def tokens_per_s(self, window: float = 20.0) -> float | None:
        if len(self.tokens) < 2:
            return None
        horizon = self.tokens[-1][0] - window
        recent = [(t, n) for t, n in list(self.tokens) if t >= horizon]  # list(): on_report appends concurrently
        if len(recent) < 2:
            return None
        span = recent[-1][0] - recent[0][0]
        return sum(n for _, n in recent[1:]) / span if span > 0 else None

    def step_time_s(self) -> float | None:
        times = list(self.step_times)
        if len(times) < 3:
            return None
        return statistics.median(b - a for a, b in zip(times, times[1:]))


@dataclass(frozen=True)
class Detection:
    """A fault found in the report stream (or by the hang watch), waiting for the loop to act on it."""

    cause: str
    message: str
    step: int
    onset_step: int | None = None
    latency_s: float | None = None
    data: dict = field(default_factory=dict)


class JobSupervisor:
    """Lifecycle: construct, `start()` (a daemon thread runs the job to a terminal state), `cancel()`
    at any time, `on_report()` from the controller's threads as ranks report.

    The loop is `step_once()` until the state is terminal. Tests drive it themselves instead of
    starting the thread: `step_once(now)` with a fake clock (`clock=`) and a fake gang, one
    iteration at a time; it then never sleeps on real time (a backoff waits for `now` to pass it).
    """

    POLL_S = 0.5

    def __init__(self, job_id: str, spec: JobSpec, store: Store, gang_factory: GangFactory,
                 sink_factory: SinkFactory, checkpoint_uri: str, *, first_attempt: int = 1,
                 reason: str = "queued", resumed_cause: str | None = None, queue: AdmissionQueue | None = None,
                 clock: Callable[[], float] = time.monotonic, trackers=None, step_times: StepTimes | None = None,
                 freezes: FreezeWatch | None = None):
        self.job_id = job_id
        self.spec = spec
        self.store = store
        self.gang_factory = gang_factory
        self.clock = clock
        # Spans in which this process stood still, taken out of the ranks' silence (see freezes.py);
        # on time.monotonic's scale, so only with that clock (tests that drive time pass their own watch).
        self.freezes = freezes if freezes is not None else (shared_freezes() if clock is time.monotonic else None)
        self._freezes_seen = len(self.freezes.freezes) if self.freezes is not None else 0
        self.step_times = STEP_TIMES if step_times is None else step_times  # the step-time histogram
        self._now = clock()  # the time of the current iteration of the loop
        self._sleeps = True  # False while a test steps the loop with its own clock
        self._restart_at: float | None = None
        self.sink_factory = sink_factory
        self.checkpoint_uri = checkpoint_uri
        self.queue = queue  # None: nothing to wait for before reserving (tests)
        self.policy = FailurePolicy(spec.fault_tolerance)
        self.placement = PlacementPolicy(spec.resources, spec.fault_tolerance)
        self.record = JobRecord(store, job_id, trackers)
        saved = self.record.saved()
        for a in saved["attempts"]:
            if spends_budget(a["cause"]):
                self.policy.spent[a["cause"]] += 1
        self._last_attempt = first_attempt
        self.live = LiveStats.resumed(saved["detail"].get("stats") or {})
        self.state: st.JobState = st.Pending(reason, first_attempt)
        self.failure: dict | None = None
        self.ranks: list[dict] = []
        ft = spec.fault_tolerance
        self.spikes = SpikeDetector(SpikeConfig(warmup_steps=ft.spike_warmup_steps)) if ft.spike_detection else None
        self.trend = (TrendDetector(TrendConfig(warmup_blocks=-(-ft.trend_warmup_steps // TrendConfig.block)))
                      if ft.trend_detection else None)
        self.hangs = HangWatch(ft.hang_timeout_s, floor_s=ft.hang_floor_s)
        self._closing: set[int] = set()  # ranks whose function returned ("closing"), this attempt
        self._early_seen: float | None = None  # when an early return was first seen, this attempt
        mon = spec.monitoring
        self.forecast = (LiveForecast(mon.forecast_fit_fraction, self._event, self._save_stats,
                                      (saved["detail"].get("stats") or {}).get("forecast_band"))
                         if mon.forecast_band else None)
        if self.forecast is not None and mon.lr_schedule is not None:
            self.forecast.schedule(*mon.lr_schedule.sampled())  # rank 0's own, if it sends one, replaces it
        self.stragglers = StragglerDetector(factor=ft.straggler_factor)
        self.positions: dict[int, int] = {}
        self.commits: list[int] = []
        self.params: int | None = (saved["detail"].get("stats") or {}).get("params")  # the model's, from rank 0
        # every_steps: auto: the intervals rank 0 chose last, per tier (its `checkpoint_interval` events)
        self.intervals: dict = dict((saved["detail"].get("stats") or {}).get("checkpoint_interval") or {})
        self.recovering: dict | None = None  # the last fault, until the next attempt completes a step
        self._restored_tier: str | None = None  # memory | local | storage: how the current attempt restored
        self._detected: Detection | None = None
        self.world_size = spec.resources.workers  # smaller while running elastic, short of capacity
        self._grow_after: int | None = None
        self._grow_checked = 0.0
        self.quarantined: set[str] = set()
        # Nodes whose raylet did not answer after losing a rank: kept out of the next reservation, which
        # may come before Ray itself has declared them dead (the restart does not wait for that).
        self.unreachable: set[str] = set()
        # Nodes Ray drains (preemption, scale-down): kept out of reservations while they drain.
        self.draining: set[str] = set()
        self._drain_checked = -math.inf
        self._drain_told: set[str] = set()  # draining nodes whose ranks this attempt has told
        # The running attempt's first preemption notice: {"rank", "reason", "deadline" (on `clock`)}.
        self._notice: dict | None = None
        # The last committed save's figures and the failed saves, across attempts (for the metrics).
        self.saves = {"checkpoint_stall_s": None, "checkpoint_write_s": None, "checkpoint_bytes": None,
                      "checkpoint_failures": 0, "checkpoint_failures_since_commit": 0}
        # After a NaN/spike rollback, (the attempt it ended, the rollback target): that attempt's
        # checkpoints past the target are no restore points (a late commit of it may still arrive).
        self._rollback_cap: tuple[int, int] | None = None
        self._gang: Gang | None = None
        self._held: Gang | None = None  # a stopped gang whose reservation the next attempt may take over
        self._trained = False  # the running attempt has reported a step
        self._live_ranks: list[int] = []  # ranks of the running attempt that rejoined from their loop
        self._spares_ready = False
        self._started = False
        self._pending_since = self._now
        self._cancel_reason: str | None = None
        self._wake = threading.Event()
        self._lock = threading.Lock()
        # Saving the figures (state changes on the loop, commits on the report threads) computes and
        # writes them under one lock, so an older summary never overwrites a newer one.
        self._saving = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"supervisor-{job_id}", daemon=True)
        if resumed_cause:
            self._event("attempt_interrupted", f"attempt interrupted by {resumed_cause}; starting attempt {first_attempt}")

    # ---- public -----------------------------------------------------------------------
    def start(self) -> None:
        self._record_state()
        # A NaN or spike rollback reads the checkpoints through the engine module, which imports torch:
        # seconds in a controller that has not imported it yet. Import it now, off the fault path.
        threading.Thread(target=_import_engine, name="supervisor-warm-imports", daemon=True).start()
        self._thread.start()

    def cancel(self, reason: str = "cancelled by request") -> None:
        self._cancel_reason = reason
        self._wake.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def attempt(self) -> int:
        # Terminal states carry no attempt: a finished job reports the last one it ran.
        return getattr(self.state, "attempt", self._last_attempt)

    # ---- the loop ---------------------------------------------------------------------
    def step_once(self, now: float | None = None) -> st.JobState:
        """One iteration: act for the current state, step to the next; returns it. `now`: the
        time (on `clock`'s scale) for this iteration, given by tests that drive the loop."""
        self._sleeps = now is None
        self._now = self.clock() if now is None else now
        self._advance(self._act(self.state))
        return self.state

    def _run(self) -> None:
        try:
            while not self.state.terminal:
                self.step_once()
        except Exception as exc:  # noqa: BLE001 - a supervisor bug must end the job visibly, not silently
            log.exception("supervisor of %s crashed", self.job_id)
            self._stop_gang()
            self.state = st.Failed(f"internal error in the supervisor: {type(exc).__name__}: {exc}", "internal")
            self._record_state()
        finally:
            self._stop_gang()  # and release a reservation held for a restart that will not come
            if self.queue is not None:
                self.queue.remove(self.job_id)  # ended before it started: the next job may go

    def _advance(self, event: st.Event) -> None:
        before = self.state
        self._last_attempt = getattr(before, "attempt", self._last_attempt)
        self.state = st.step(before, event)
        if isinstance(self.state, st.Restarting) and not isinstance(before, st.Restarting):
            self._restart_at = self._now + self.state.delay_s  # the backoff counts from the fault
        if type(self.state) is not type(before) or self.state.describe() != before.describe():
            self._record_state()

    def _act(self, state: st.JobState) -> st.Event:
        if self._cancel_reason is not None:
            self._end_attempt("cancelled", self._cancel_reason)
            self._stop_gang()
            return st.CancelRequested(self._cancel_reason)
        if isinstance(state, st.Pending):
            return self._act_pending(state)
        if isinstance(state, st.Running):
            return self._act_running(state)
        if isinstance(state, st.Restarting):
            return self._act_restarting(state)
        raise st.IllegalTransition(f"nothing to do in {state.name}")

    def _act_pending(self, state: st.Pending) -> st.Event:
        queued = self.queue.admit(self.job_id) if self.queue is not None else None
        if queued is not None:
            if self._gang is not None:
                # It headed the queue until a job of higher priority came: a pending placement group
                # would compete with that job's for the next free resources.
                self._gang.stop()
                self._gang = None
            self._pause(self.POLL_S)  # a cancel wakes it
            return st.Waiting(queued)
        if self._gang is None:
            self.draining = set(_draining_nodes())
            avoid = self.quarantined | self.unreachable | self.draining
            kwargs = {"exclude_nodes": tuple(sorted(avoid))} if avoid else {}
            if self.world_size != self.spec.resources.workers:
                kwargs["world_size"] = self.world_size
            if self._held is not None:
                kwargs["previous"], self._held = self._held, None  # takes it over, or releases it
            self._gang = self.gang_factory(self.job_id, state.attempt, self.spec, **kwargs)
            self._pending_since = self._now
        if self._gang.reserve(self.POLL_S):
            self.unreachable.clear()  # they only had to be kept out of this reservation
            if self.queue is not None:
                self.queue.remove(self.job_id)  # admitted for good: its restarts do not queue again
            return st.Reserved()
        waited = self._now - self._pending_since
        avoided = self.quarantined | self.unreachable | self.draining
        wait = self.placement.while_waiting(attempt=state.attempt, waited=waited, world_size=self.world_size,
                                            fit=_bundles_that_fit(self.spec.resources), avoiding=len(avoided))
        if wait.action == "shrink":
            self._event("shrinking", wait.reason, world_size=wait.world_size, previous=self.world_size)
            self.world_size = wait.world_size
            self._gang.stop()
            self._gang = None
            return st.Waiting(f"elastic: restarting with {wait.world_size} rank(s)")
        if wait.action == "lift":
            self._event("quarantine_lifted", wait.reason)
            self.quarantined.clear()
            self.unreachable.clear()
            self._gang.stop()
            self._gang = None
            return st.Waiting("retrying with quarantined nodes allowed")
        if wait.action == "give_up":
            self._stop_gang()
            return st.Faulted("node_failure", wait.reason, restart=False)
        return st.Waiting(self._gang.waiting_for())

    def _act_running(self, state: st.Running) -> st.Event:
        gang = self._gang
        if not self._started:
            plan = self._attempt_plan(state.rewind)
            self.live = LiveStats(step=self.live.step, max_steps=self.live.max_steps, last_checkpoint=self.live.last_checkpoint,
                                  last_checkpoint_step=self.live.last_checkpoint_step,
                                  last_checkpoint_at=self.live.last_checkpoint_at, started_at=time.time())
            self.record.attempt_started(state.attempt, gang.world_size, self.live.last_checkpoint)
            self._started = True
            self._restored_tier = None
            try:
                gang.start(plan, lambda rank: self.sink_factory(self.job_id, state.attempt, rank))
            except GangStartFailed as exc:  # a rank lost before it could report: a fault like any other
                return self._on_failure("node_failure", None, str(exc))
            self._trained = self._spares_ready = False
            self._notice = None
            self._drain_told = set()
            self.ranks = list(getattr(gang, "ranks", []))
            self._detected = None
            self.hangs.reset()
            self.hangs.start(range(gang.world_size), self._now)
            self._closing, self._early_seen = set(), None
            self.stragglers.reset()
            warm = getattr(gang, "warm_ranks", 0)
            kept = list(getattr(gang, "kept_ranks", ()))
            self._live_ranks = list(getattr(gang, "live_ranks", ()))
            standby = list(getattr(gang, "standby_ranks", ()))
            self._event("attempt_started", f"attempt {state.attempt} started with {gang.world_size} ranks"
                        + (f" ({warm} from warm spares" + (f", {standby} with the function run up to its restore"
                                                           if standby else "") + ")" if warm else "")
                        + (f" (ranks {kept} in the processes that ran the last attempt"
                           + (f"; {self._live_ranks} never left their training loop" if self._live_ranks else "")
                           + ")" if kept else ""),
                        world_size=gang.world_size, warm_ranks=warm, kept_ranks=kept, live_ranks=self._live_ranks,
                        standby_ranks=standby)
            return st.Tick()
        outcome = gang.poll(self.POLL_S)
        if outcome is None:
            notice = self._notice
            if notice is not None and self._now > notice["deadline"]:
                return self._on_failure("preemption", notice["rank"], f"preempted ({notice['reason']}) and the ranks "
                                        f"did not stop within fault_tolerance.preemption_grace_s "
                                        f"({self.spec.fault_tolerance.preemption_grace_s:g} s)")
            detection = self._detected or self._check_hang()
            if detection is not None:
                return self._on_detection(detection)
            self._check_drains()
            if self._trained and not self._spares_ready:
                # Started once, now rather than at the start, where their imports would slow the first steps.
                ready = gang.warm_spares()
                if ready == gang.world_size:
                    self._spares_ready = True
                    self._event("spares_ready", f"{ready} warm spare rank process(es) ready for a restart", spares=ready)
            return self._maybe_grow()
        if outcome.succeeded:
            if self._detected is not None:
                # A NaN or a spike in the last steps (their reports land before the ranks' results):
                # the model it left is not a success; roll back like any other.
                return self._on_detection(self._detected)
            self._stop_gang()
            self._adopt_stored_commit()
            self._adopt_final_figures(outcome.last)
            self._end_attempt("succeeded")
            return st.Finished()
        cause = outcome.cause
        if cause == "node_failure" and not outcome.worker_died and (early := self._returned_early(self._finished())):
            # A broken connection, because a peer left the training loop: its function returned.
            return self._on_failure("user_error", early[0], early[1])
        if self._notice is not None and cause in ("node_failure", "hang"):
            # A rank told to stop died or was cut off before it could (SIGKILL after the SIGTERM, the
            # node gone at its drain deadline): still a preemption, and the job's fault budget is not spent.
            cause = "preemption"
        return self._on_failure(cause, outcome.rank, outcome.error, outcome.traceback)

    def _check_drains(self) -> None:
        """Ranks on a node that Ray drains get a preemption notice (once per node and attempt)."""
        if self._now - self._drain_checked < DRAIN_CHECK_S or not self.ranks:
            return
        self._drain_checked = self._now
        draining = _draining_nodes()
        new = {r["node_id"] for r in self.ranks if r["node_id"] in draining} - self._drain_told
        if not new:
            return
        self._drain_told |= new
        self.draining |= new
        for node in sorted(new):
            ranks = [r["rank"] for r in self.ranks if r["node_id"] == node]
            deadline = draining[node] / 1000 if draining[node] else None
            self._event("node_draining", f"node {node[:12]} is draining (rank(s) {ranks}): emergency checkpoint, then "
                        "the job moves", node_id=node, ranks=ranks, deadline=deadline)
            if hasattr(self._gang, "preempt"):
                self._gang.preempt(ranks, f"node {node[:12]} is draining", deadline)

    def _on_failure(self, cause: str, rank: int | None, error: str, traceback: str = "") -> st.Event:
        """A rank failed or its worker died: stop the gang (keeping the reservation), ask the policy."""
        self._stop_gang(keep=True)
        if cause == "node_failure":
            self._blame_node(rank)  # a preemption is no fault of the node's
        decision = self.policy.decide(cause, error)
        self._end_attempt(cause, error)
        self.recovering = {"at": time.time(), "cause": cause, "step": self.live.step}
        where = f" on rank {rank}" if rank is not None else ""
        self._event("fault", f"{cause}{where}: {error}", cause=cause, rank=rank,
                    step=self.live.step, decision=decision.reason, restart=decision.restart)
        if not decision.restart:
            self.failure = {"cause": cause, "rank": rank, "error": error, "traceback": traceback}
        return st.Faulted(cause, decision.reason if not decision.restart else error,
                          decision.restart, decision.delay_s, decision.rewind, rank, traceback)

    def _maybe_grow(self) -> st.Event:
        """Running short-handed: once the missing ranks fit again and a checkpoint has committed since, restart full."""
        full = self.spec.resources.workers
        if self.world_size >= full or self._gang is None:
            return st.Tick()
        if self._now - self._grow_checked < 2.0:
            return st.Tick()
        self._grow_checked = self._now
        if self._grow_after is None:
            if self.placement.grow_to(world_size=self.world_size, fit=_bundles_that_fit(self.spec.resources)):
                self._grow_after = len(self.commits)  # restart right after the next commit: little is lost
            return st.Tick()
        if len(self.commits) <= self._grow_after:
            return st.Tick()
        self._grow_after = None
        previous, self.world_size = self.world_size, full
        self._stop_gang()
        self._end_attempt("grow", f"capacity for {full} ranks is back")
        self._event("growing", f"capacity is back: restarting with {full} ranks (was {previous}) from the "
                    "checkpoint just committed", world_size=full, previous=previous)
        self.recovering = {"at": time.time(), "cause": "grow", "step": self.live.step}
        decision = self.policy.decide("grow", "grow back")
        return st.Faulted("grow", f"growing back to {full} ranks", True, 0.0, decision.rewind)

    def _blame_node(self, rank: int | None) -> None:
        """Count a failure against the failed rank's node; a node that fails twice is quarantined."""
        node = next((r["node_id"] for r in self.ranks if r["rank"] == rank), None)
        if node is None:
            return
        nodes = _nodes()
        others = {n for n, info in nodes.items() if info.get("Alive")} - self.quarantined - {node}
        if others and not _raylet_answers(nodes.get(node)):
            self.unreachable.add(node)
            self._event("node_unreachable", f"node {node[:12]} lost rank {rank} and its raylet does not answer: "
                        "the restart will not use it", node_id=node)
        if self.placement.blame(node, others_alive=bool(others), quarantined=self.quarantined):
            self.quarantined.add(node)
            self._event("node_quarantined", f"node {node[:12]} failed {self.placement.node_failures[node]} times: "
                        "this job will not use it again", node_id=node)

    def _check_hang(self) -> Detection | None:
        now = self._now
        if self.freezes is not None:
            if self.freezes.unsure(self.clock()):
                return None  # judged once the watch has told how long this process stood still
            new, self._freezes_seen = self.freezes.since(self._freezes_seen)
            with self._lock:  # the report threads move the same clocks
                for began_by, seconds in new:
                    self.hangs.pause(seconds, before=began_by)
        finished = self._finished()
        out = set(finished) | self._closing  # ranks whose function returned: none is hung
        if early := self._returned_early(finished):
            # Peers waiting for a rank that left before the run's last step: told once they have not
            # moved for EARLY_RETURN_QUIET_S since it left (ranks that are closing are out of the loop too).
            if self._early_seen is None:
                self._early_seen = now
            quiet = sorted(r for r, t in self.hangs.silence(now).items()
                           if r not in out and min(t, now - self._early_seen) > EARLY_RETURN_QUIET_S)
            if quiet:
                return Detection("user_error", early[1], self.live.step, data={"stalled_ranks": quiet})
        stalled = self.hangs.stalled(now) - out
        if not stalled:
            return None
        silence = self.hangs.silence(now)
        stacks = self._gang.stacks() if hasattr(self._gang, "stacks") else {}
        # The watch fires on the first rank past the timeout; the ranks that stopped with it (silent for
        # over half the timeout) are named too: which of them went quiet first is only a matter of when
        # their last reports arrived, and the stacks tell the stuck one from those waiting on it.
        ranks = sorted(stalled | {r for r, t in silence.items() if t > self.hangs.timeout_s / 2 and r not in out})
        longest = max(silence[r] for r in stalled)
        return Detection("hang", f"no progress from rank(s) {ranks} for {longest:.0f} s "
                         f"(hang timeout {self.hangs.timeout_s:.0f} s)", self.live.step,
                         latency_s=longest - self.hangs.timeout_s,
                         data={"stalled_ranks": ranks, "stacks": {str(k): v for k, v in stacks.items()}})

    def _finished(self) -> dict[int, int | None]:
        """The gang's ranks whose function returned this attempt, with their last steps."""
        return self._gang.finished() if hasattr(self._gang, "finished") else {}

    def _returned_early(self, finished: dict[int, int | None]) -> tuple[int, str] | None:
        """(rank, message) when a rank's function returned before the run's last step while its peers
        went on: they wait for it in their next collective, and a restart would do the same again."""
        total = self.live.max_steps
        # Only a rank known to have left before the end: the run's length is known (ctx.batches(steps=)),
        # and the rank reported a step short of it. Anything less sure is left to the hang timeout.
        early = {r: s for r, s in finished.items() if total is not None and s is not None and s < total}
        world = getattr(self._gang, "world_size", self.world_size)  # this attempt's (a shrunk one's too)
        if not early or len(finished) == world:
            return None
        rank = min(early, key=lambda r: (early[r], r))
        going = sorted(set(range(world)) - set(finished) - self._closing)
        if not going:
            return None  # the others have left their loops too (an early stop every rank took)
        at, of = f"after step {early[rank]}", f" of {total}"
        return rank, (f"rank {rank}'s function returned {at}{of} while rank(s) {going} went on training (step "
                      f"{self.live.step}): they wait for it in their next collective. Every rank must run the same "
                      "steps: give each the same number of batches (ctx.batches(..., steps=N) does), and return "
                      "from all of them at the end")

    def _on_detection(self, d: Detection) -> st.Event:
        """Act on a fault found in the stream: stop the gang, ask the policy, prepare a rollback."""
        self._stop_gang(keep=True)
        rollback = None
        if d.cause in ("nan", "loss_spike", "divergence"):
            rollback = Rollback(d.onset_step if d.onset_step is not None else d.step, d.step,
                                tuple(self._committed()), dict(self.positions))
        decision = self.policy.decide(d.cause, d.message, rollback)
        self._end_attempt(d.cause, d.message)
        self._event("fault", f"{d.cause}: {d.message}", cause=d.cause, step=d.step, onset_step=d.onset_step,
                    detection_latency_s=d.latency_s, decision=decision.reason, restart=decision.restart,
                    skip=[list(r) for r in decision.rewind.skip], rollback_to=decision.rewind.max_step, **d.data)
        self.recovering = {"at": time.time(), "cause": d.cause, "step": d.step}
        if decision.restart and rollback is not None:
            self._rollback_cap = (self.attempt, decision.rewind.max_step or 0)
            self._discard_after(decision.rewind.max_step or 0)
        if not decision.restart:
            self.failure = {"cause": d.cause, "error": decision.reason}
        return st.Faulted(d.cause, decision.reason if not decision.restart else d.message, decision.restart,
                          decision.delay_s, decision.rewind)

    def _committed(self) -> list[int]:
        """Committed steps: the storage is the truth (a commit's event may still be on its way)."""
        from stalwart.checkpointing.engine import committed_steps
        from stalwart.checkpointing.storage import open_storage
        from stalwart.errors import StorageError

        try:
            stored = committed_steps(open_storage(self.checkpoint_uri, self.spec.checkpoint.s3))
        except StorageError:
            stored = []
        return sorted(set(self.commits) | set(stored))

    def _adopt_stored_commit(self) -> None:
        """At a success, the newest checkpoint is the one storage holds: a commit whose report was still
        in flight when the ranks ended (a loaded controller takes longer than a rank waits) is not lost."""
        from stalwart.checkpointing.engine import step_dir
        from stalwart.checkpointing.storage import open_storage
        from stalwart.errors import StorageError

        steps, newest = self._committed(), self.live.last_checkpoint_step
        if steps and (newest is None or steps[-1] > newest):
            try:
                uri = f"{open_storage(self.checkpoint_uri, self.spec.checkpoint.s3).uri}/{step_dir(steps[-1])}"
            except StorageError:
                return
            with self._saving:
                self.live.last_checkpoint_step = steps[-1]
                self.live.last_checkpoint = uri
                self.live.last_checkpoint_at = time.time()
                self.commits.append(steps[-1])

    def _adopt_final_figures(self, last: dict | None) -> None:
        """At a success, rank 0's last step and loss as its result says: its final reports may not have
        landed (this process stood still, or was too loaded, while the ranks ended)."""
        if not last or last.get("step") is None:
            return
        with self._lock:
            if last["step"] > self.live.step:
                self.live.step, self.live.loss = last["step"], last.get("loss")

    def _discard_after(self, step: int) -> None:
        """Delete checkpoints newer than a rollback target: they hold the bad stretch, and the new
        attempt will save the same step numbers again."""
        from stalwart.checkpointing.engine import delete_checkpoint, list_steps
        from stalwart.checkpointing.storage import open_storage
        from stalwart.errors import StorageError

        try:
            storage = open_storage(self.checkpoint_uri, self.spec.checkpoint.s3)
            doomed = [s for s in list_steps(storage) if s > step]
            for s in doomed:
                delete_checkpoint(storage, s)
        except StorageError as exc:
            self._event("checkpoint_discard_failed", f"could not delete checkpoints after step {step}: {exc}")
            return
        self.commits = [s for s in self.commits if s <= step]
        if doomed:
            self._event("checkpoints_discarded", f"discarded checkpoints after step {step}: {sorted(doomed)}",
                        steps=sorted(doomed))

    def _act_restarting(self, state: st.Restarting) -> st.Event:
        self._stop_gang(keep=True)
        remaining = (self._restart_at if self._restart_at is not None else self._now) - self._now
        if remaining > 0:
            self._pause(remaining)
            if self._sleeps and self._cancel_reason is None:  # the backoff has passed (or a cancel came)
                self._restart_at = None
                return st.BackoffDone()
            return st.Tick()
        self._restart_at = None
        return st.BackoffDone()

    def _pause(self, seconds: float) -> None:
        """Wait on real time (a cancel cuts it short), unless a test steps the loop with its own clock."""
        if self._sleeps:
            self._wake.wait(seconds)
            self._wake.clear()

    # ---- helpers ----------------------------------------------------------------------
    def _attempt_plan(self, rewind: Rewind) -> AttemptPlan:
        """The one place an attempt's plan is built: the spec's part and the policy's `rewind`."""
        ckpt = self.spec.checkpoint
        # An explicit resume_from seeds the job until it has a checkpoint of its own.
        resume = ckpt.resume_from if self.live.last_checkpoint is None else None
        goodput = self.record.goodput() or {}
        return AttemptPlan.build(
            auto_intervals=tuple((tier, int(c["every_steps"])) for tier, c in self.intervals.items()
                                 if c.get("every_steps")),
            run_s=float(goodput.get("wall_s") or 0.0), fault_count=sum(self.policy.spent.values()),
            checkpoint_uri=self.checkpoint_uri, spec_skip=self.spec.data.skip, rewind=rewind, resume_from=resume,
            init_from=ckpt.init_from,
            s3_options=ckpt.s3, faults=tuple(f.model_dump() for f in self.spec.faults),
            cache_dir=ckpt.local_cache_dir or os.path.join(tempfile.gettempdir(), "stalwart-cache", self.job_id))

    def _stop_gang(self, keep: bool = False) -> None:
        """Stop the running gang. keep: hold its reservation (and spares) for the next attempt;
        otherwise release it, and any reservation still held. A gang whose stop() raised stays
        referenced, so that the crash handler's call releases it."""
        if self._held is not None and (self._gang is not None or not keep):
            self._held.stop()
            self._held = None
        if self._gang is not None:
            self._gang.stop(keep=keep)
            self._gang, self._held = None, (self._gang if keep else None)
        self._started = False

    def _end_attempt(self, cause: str, error: str = "") -> None:
        self.record.attempt_ended(self.attempt, cause, error)

    def _record_state(self) -> None:
        with self._saving:
            detail = {"reason": self.state.describe(), "attempt": self.attempt, "checkpoint_uri": self.checkpoint_uri,
                      "stats": self.summary()}
            if isinstance(self.state, st.Failed):
                detail.update(self.failure or {"error": self.state.reason, "cause": self.state.cause})
                detail["reason"] = self.state.reason
            self.record.state(self.state.name, detail)
        self._event("state", f"{self.state.name}" + (f": {self.state.describe()}" if self.state.describe() else ""),
                    state=self.state.name)

    def _event(self, kind: str, message: str, **data) -> None:
        self.record.event(kind, message, self.attempt, **data)

    # ---- the report stream --------------------------------------------------------------
    def on_report(self, attempt: int, rank: int, batch: dict) -> None:
        """Called on the controller's threads. Reports from an older attempt add their logs, the
        outcome of their saves (a gang being torn down still flushes what it committed) and, while the
        current attempt has reported nothing yet, rank 0's records to the job's history: a dying gang's
        last batch often lands after the next attempt began, and its steps are part of the curve."""
        if batch.get("logs"):
            self.record.logs(batch["logs"])
        if attempt != self.attempt:
            records = batch.get("records") or []
            with self._lock:
                if rank == 0 and records and attempt < self.attempt and self.live.last_report_at is None:
                    self.record.metrics([{**r, "attempt": attempt} for r in records])
            for ev in batch.get("events") or []:
                if ev.get("kind") in ("checkpoint_committed", "checkpoint_failed"):
                    self._on_worker_event(attempt, rank, ev)
            return
        with self._lock:
            live = self.live
            records = batch.get("records") or []
            if rank == 0:
                for ev in batch.get("events") or []:
                    if ev.get("kind") == "restored":  # read before the records: `recovered` names the tier
                        self._restored_tier = ev.get("tier")
            if records:
                self._trained = True
                live.last_report_at = time.time()
                live.restoring.pop(rank, None)
                ref = live.rank_last.get(rank) or (records[0]["ts"], records[0]["step"])
                if records[-1]["step"] > ref[1]:
                    live.rank_step_s[rank] = (records[-1]["ts"] - ref[0]) / (records[-1]["step"] - ref[1])
                live.rank_last[rank] = (records[-1]["ts"], records[-1]["step"])
                self._watch(rank, records)
            for r in records:
                if r.get("tokens"):
                    live.tokens.append((r["ts"], r["tokens"]))
            if rank == 0 and records:
                for r in records:
                    if live.step_times:
                        self.step_times.observe(self.job_id, self.spec.name, r["ts"] - live.step_times[-1])
                    live.step_times.append(r["ts"])
                last = records[-1]
                live.step = last["step"]
                live.loss = last.get("loss")
                live.grad_norm = last.get("grad_norm")
                if self.forecast is not None:
                    for r in records:
                        self.forecast.observe(r["step"], r.get("loss"))
                self.record.metrics([{**r, "attempt": attempt} for r in records])
        for ev in batch.get("events") or []:
            self._on_worker_event(attempt, rank, ev)

    def _watch(self, rank: int, records: list[dict]) -> None:
        """Feed the detectors; the first fault found waits in `_detected` for the loop."""
        now = self.clock()
        for r in records:
            self.hangs.progress(rank, r["step"], now)
            if r.get("busy_s") is not None:
                before = self.stragglers.stragglers
                after = self.stragglers.update(rank, r["step"], r["busy_s"])
                if after != before:
                    self._on_stragglers(before, after)
        if self.recovering is not None and rank == 0:
            rec = self.recovering
            self.recovering = None
            restored = min(r["step"] for r in records) - 1
            tier = self._restored_tier
            # in_loop: the surviving ranks stayed in their training loop (launchers.rejoin); restart:
            # every rank ran the user's function again.
            path = "in_loop" if self._live_ranks else "restart"
            self._event("recovered", f"recovered from {rec['cause']} in {time.time() - rec['at']:.1f} s "
                        f"({max(0, rec['step'] - restored)} steps lost" + (f", state from {tier}" if tier else "")
                        + (f", ranks {self._live_ranks} stayed in their loop" if self._live_ranks else "")
                        + ")", cause=rec["cause"], time_to_recover_s=time.time() - rec["at"],
                        steps_lost=max(0, rec["step"] - restored), tier=tier, path=path)
        if rank == 0:
            for r in records:
                if "position" in r:
                    self.positions[r["step"]] = r["position"]
            if len(self.positions) > 50_000:
                for step in sorted(self.positions)[:10_000]:
                    del self.positions[step]
        if self._detected is not None:
            return
        for r in records:
            if is_nonfinite(r.get("loss"), r.get("grad_norm")):
                self._detected = Detection("nan", f"non-finite loss or grad norm on rank {rank} at step {r['step']} "
                                           f"(loss {r.get('loss')}, grad norm {r.get('grad_norm')})", r["step"],
                                           latency_s=time.time() - r["ts"])
                return
            if rank == 0 and self.spikes is not None and r.get("loss") is not None:
                spike = self.spikes.update(r["step"], r["loss"], r.get("grad_norm"))
                if spike is not None:
                    self._detected = Detection("loss_spike", f"loss spike at step {spike.step} (onset step "
                                               f"{spike.onset_step}): {spike.reason}", spike.step, spike.onset_step,
                                               latency_s=time.time() - r["ts"], data={"score": spike.score})
                    return
            if rank == 0 and self.trend is not None and r.get("loss") is not None:
                lr = (r.get("metrics") or {}).get("lr")
                lr = lr if isinstance(lr, (int, float)) else None
                found = self.trend.update(r["step"], r["loss"], r.get("grad_norm"), lr)
                if found is not None:
                    self._detected = Detection("divergence", f"slow divergence at step {found.step} (onset step "
                                               f"{found.onset_step}): {found.reason}", found.step, found.onset_step,
                                               latency_s=time.time() - r["ts"],
                                               data={"rise": found.rise, "grad_ratio": found.grad_ratio})
                    return

    def _on_stragglers(self, before: frozenset, after: frozenset) -> None:
        ratios = self.stragglers.ratios()
        for rank in sorted(after - before):
            self._event("straggler", f"rank {rank} is a straggler: {ratios.get(rank, 0):.1f}x the others' busy time "
                        "per step (no restart; see the per-rank step time metric)", rank=rank, ratio=ratios.get(rank))
        for rank in sorted(before - after):
            self._event("straggler_recovered", f"rank {rank} keeps pace again", rank=rank)

    def _on_worker_event(self, attempt: int, rank: int, ev: dict) -> None:
        kind = ev.get("kind", "?")
        data = {k: v for k, v in ev.items() if k not in ("kind",)}
        if kind == "closing":  # out of its loop, its last save may still run: not a rank others wait on
            if attempt == self.attempt:
                self._closing.add(rank)
            return
        if kind == "checkpoint_committed":
            step = ev.get("step")
            newest = self.live.last_checkpoint_step
            # A late commit of an attempt a rollback ended is past the rollback target: the rollback
            # discarded it (or is about to), so it is no restore point.
            cap = self._rollback_cap
            usable = cap is None or attempt > cap[0] or step is None or step <= cap[1]
            if usable and (newest is None or step is None or step >= newest or attempt == self.attempt):
                with self._saving:
                    self.commits.append(step)
                    self.live.last_checkpoint = ev.get("uri")
                    self.live.last_checkpoint_step = step
                    self.live.last_checkpoint_at = ev.get("ts")
                    self.saves.update(checkpoint_stall_s=ev.get("stall_s"), checkpoint_write_s=ev.get("write_s"),
                                      checkpoint_bytes=ev.get("bytes"), checkpoint_failures_since_commit=0)
                    self.record.stats(self.summary())
            msg = f"checkpoint step {step} committed (stall {_ms(ev.get('stall_s'))}, write {_s(ev.get('write_s'))})"
            if attempt != self.attempt:
                msg += f" by attempt {attempt} as it ended" + ("" if usable else " (discarded by the rollback)")
        elif kind == "checkpoint_failed":
            self.saves["checkpoint_failures"] += 1
            if rank == 0 or self.saves["checkpoint_failures_since_commit"] == 0:
                self.saves["checkpoint_failures_since_commit"] += 1
            since = self.live.last_checkpoint_step
            msg = (f"checkpoint step {ev.get('step')} failed on rank {rank}: {ev.get('error')}; "
                   + (f"no committed checkpoint since step {since}" if since is not None else "no committed checkpoint yet"))
        elif kind == "checkpoint_skipped":
            msg = f"checkpoint step {ev.get('step')} skipped on restore: {ev.get('reason')}"
        elif kind == "restored":
            self.live.restoring.pop(rank, None)
            if rank != 0:
                return
            msg = f"restored from step {ev.get('step')} ({ev.get('uri')})"
        elif kind == "initialized":
            if rank != 0:
                return
            msg = f"weights initialized from {ev.get('uri')} ({ev.get('tensors')} tensors, {ev.get('format')})"
        elif kind == "progress":
            self.live.max_steps = ev.get("max_steps")
            return
        elif kind == "model":
            if rank != 0 or ev.get("params") == self.params:
                return  # said once: a restart reports the same model again
            self.params = ev.get("params")
            msg = f"model: {_count(ev.get('params'))} parameters ({_count(ev.get('trainable_params'))} trainable)"
        elif kind == "checkpoint_interval":
            if rank != 0:
                return
            tier = ev.get("tier")
            self.intervals[tier] = {k: v for k, v in data.items() if k not in ("ts", "rank", "step")}
            msg = "auto: " + interval.describe(tier, self.intervals[tier])
        elif kind == "restore_progress":  # every half second of a read: shown by status, not stored
            before = self.live.restoring.get(rank)
            self.live.restoring[rank] = {**ev, "first_ts": before["first_ts"] if before else ev.get("ts") or time.time()}
            return
        elif kind == "lr_schedule":
            if rank == 0 and self.forecast is not None:
                self.forecast.schedule(ev.get("steps") or [], ev.get("lr") or [])
            return  # thousands of numbers: kept by the forecast, not as an event
        elif kind == "preemption_notice":
            if attempt == self.attempt and self._notice is None:
                grace = self.spec.fault_tolerance.preemption_grace_s
                self._notice = {"rank": rank, "reason": ev.get("reason"),
                                "deadline": self.clock() + min(grace, ev.get("grace_s") or grace) + PREEMPTION_MARGIN_S}
            msg = (f"rank {rank} was preempted ({ev.get('reason')}): the ranks stop at the next step they all reach, "
                   f"after an emergency checkpoint (within {ev.get('grace_s') or 0:.0f} s)")
        elif kind == "emergency_checkpoint":
            if rank != 0 and ev.get("committed"):
                return  # rank 0 speaks for a commit
            msg = (f"emergency checkpoint at step {ev.get('step')} " +
                   (f"committed in {ev.get('seconds', 0):.1f} s" if ev.get("committed")
                    else f"did not commit: {ev.get('error') or 'not every rank saved in time'}"))
        else:
            msg = kind
        self.record.event(kind, msg, attempt, **data)

    # ---- status -----------------------------------------------------------------------
    def summary(self) -> dict:
        """The figures saved with the job's record (detail["stats"]) on every state change, checkpoint
        commit and at the end, so that status and list show them once this supervisor is gone."""
        live = self.live
        return {
            "step": live.step,
            "max_steps": live.max_steps,
            "loss": _finite(live.loss),
            "grad_norm": _finite(live.grad_norm),
            "tokens_per_s": live.tokens_per_s(),
            "step_time_s": live.step_time_s(),
            "last_checkpoint": live.last_checkpoint,
            "last_checkpoint_step": live.last_checkpoint_step,
            "last_checkpoint_at": live.last_checkpoint_at,
            "restarts": dict(self.policy.spent),
            "checkpoint_warning": self._checkpoint_warning(),
            "forecast": self.forecast.status() if self.forecast is not None else None,
            "forecast_band": self.forecast.band_json() if self.forecast is not None else None,
            "goodput": self.record.goodput(),
            "params": self.params,
            "checkpoint_interval": self.intervals or None,
        }

    def _save_stats(self) -> None:
        with self._saving:
            self.record.stats(self.summary())

    def _checkpoint_warning(self) -> str | None:
        """Said while saves keep failing (a full disk, storage down), until one commits again."""
        failed = self.saves["checkpoint_failures_since_commit"]
        if not failed:
            return None
        since = self.live.last_checkpoint_step
        return (f"{failed} save(s) failed since the last commit: no committed checkpoint "
                + (f"since step {since}" if since is not None else "yet"))

    def status(self) -> dict:
        live, summary = self.live, self.summary()
        step_time = summary["step_time_s"]
        eta = None
        if step_time and live.max_steps and not self.state.terminal:
            eta = max(0.0, (live.max_steps - live.step) * step_time)
        return {
            **summary,
            "eta_s": eta,
            "attempt": self.attempt,
            "ranks": self.ranks,
            "stragglers": sorted(self.stragglers.stragglers),
            # For the metrics exporter (stalwart.monitoring.metrics documents these keys).
            "rank_step_time_s": dict(live.rank_step_s),
            "restore": live.restore(),
            **self.saves,
        }


def _bundles_that_fit(res) -> int:
    """How many rank bundles the cluster's free resources hold now (ignoring how they split over nodes)."""
    try:
        import ray

        free = ray.available_resources()
    except Exception:  # noqa: BLE001 - outside Ray (unit tests) nothing fits
        return 0
    n = int(free.get("CPU", 0) // res.cpus_per_worker)
    if res.gpus_per_worker:
        n = min(n, int(free.get("GPU", 0) // res.gpus_per_worker))
    return n


def _nodes() -> dict[str, dict]:
    """Ray's node table by node id (dead nodes included); empty outside Ray (unit tests)."""
    try:
        import ray

        return {n["NodeID"]: n for n in ray.nodes()}
    except Exception:  # noqa: BLE001 - outside Ray there is no cluster to ask
        return {}


def _draining_nodes() -> dict[str, int]:
    """Nodes Ray is draining (`ray drain-node`, an autoscaler's preemption or scale-down), by node id, with
    their deadline (ms since the epoch, 0: none); empty outside Ray (unit tests)."""
    try:
        from ray._private.state import state

        return dict(state.get_draining_nodes())
    except Exception:  # noqa: BLE001 - outside Ray, or a GCS that does not answer: no drain is acted on now
        return {}


def _raylet_answers(node: dict | None, timeout: float = 1.0) -> bool:
    """Whether a node (its entry in Ray's node table) is alive there and its raylet accepts a connection now.

    Ray takes seconds to declare a lost node dead (health checks); a TCP connect to its raylet tells
    at once whether the machine or its raylet is gone, and costs a millisecond when it is not.
    """
    import socket

    if node is None or not node.get("Alive"):
        return False
    try:
        with socket.create_connection((node["NodeManagerAddress"], int(node["NodeManagerPort"])), timeout=timeout):
            return True
    except OSError:
        return False


def _import_engine() -> None:
    try:
        import stalwart.checkpointing.engine  # noqa: F401
    except Exception:  # noqa: BLE001 - only a warm-up; the fault path imports it again and reports errors
        log.debug("warming up the checkpoint engine import failed", exc_info=True)


def _finite(x):
    return x if x is None or math.isfinite(x) else str(x)


def _ms(x) -> str:
    return f"{x * 1000:.0f} ms" if isinstance(x, (int, float)) else "?"


def _count(n) -> str:
    if not isinstance(n, (int, float)):
        return "?"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def _s(x) -> str:
    return f"{x:.2f} s" if isinstance(x, (int, float)) else "?"
