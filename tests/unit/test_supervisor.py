"""The supervisor stepped one iteration at a time with a fake gang and a fake clock (no thread, no
sleeping), and the placement policy's decisions as values."""

from __future__ import annotations

import pytest

from stalwart.errors import GangStartFailed
from stalwart.launchers.gang import GangOutcome
from stalwart.launchers.plan import AttemptPlan, Rewind
from stalwart.orchestrator.policy import FailurePolicy, PlacementPolicy, Rollback
from stalwart.orchestrator.store import Store
from stalwart.orchestrator.supervisor import JobSupervisor
from stalwart.spec import FaultTolerance, JobSpec, Resources


class ScriptedGang:
    """A gang whose attempts end as scripted: each entry is an outcome, or an exception start() raises."""

    script: list = []
    created: list = []

    def __init__(self, job_id, attempt, spec, **kwargs):
        self.world_size = kwargs.get("world_size") or spec.resources.workers
        self.attempt = attempt
        self.plan: AttemptPlan | None = None
        self.stopped = False
        self.kwargs = kwargs
        ScriptedGang.created.append(self)

    def reserve(self, timeout):
        return True

    def waiting_for(self):
        return "waiting for 2 x {CPU: 1}"

    def start(self, plan, sink_for):
        self.plan = plan
        if ScriptedGang.script and isinstance(ScriptedGang.script[0], Exception):
            raise ScriptedGang.script.pop(0)

    def poll(self, timeout):
        return ScriptedGang.script.pop(0) if ScriptedGang.script else None

    def warm_spares(self):
        return 0

    def stop(self, keep=False):
        self.stopped = True


def supervisor(tmp_path, script, spec: dict | None = None) -> JobSupervisor:
    ScriptedGang.script = list(script)
    ScriptedGang.created = []
    spec = JobSpec.from_dict({"name": "t", "entrypoint": "a:b", **(spec or {})})
    store = Store(tmp_path)
    store.add_job("t-1", "t", spec.to_dict(), "PENDING", {})
    sup = JobSupervisor("t-1", spec, store, ScriptedGang, lambda *a: (lambda batch: None), str(tmp_path / "ck"),
                        clock=lambda: 0.0)
    sup._record_state()
    return sup


def run(sup: JobSupervisor, until: str, start: float = 0.0, step_s: float = 1.0, limit: int = 100) -> float:
    """Step with a clock that advances `step_s` per iteration until the state is `until`; returns the time."""
    now = start
    for _ in range(limit):
        if sup.step_once(now).name == until:
            return now
        now += step_s
    raise AssertionError(f"never reached {until}; in {sup.state.name}: {sup.state.describe()}")


def kinds(sup: JobSupervisor) -> list[str]:
    return [e["kind"] for e in sup.store.events("t-1")]


def test_a_rank_lost_while_the_gang_starts_is_a_restart_not_an_internal_error(tmp_path):
    sup = supervisor(tmp_path, [GangStartFailed("a rank's worker died while the gang started: killed"),
                                GangOutcome(True)], {"fault_tolerance": {"budgets": {"node_failure": 1}}})
    run(sup, "SUCCEEDED")
    assert [g.attempt for g in ScriptedGang.created] == [1, 2]
    assert [a["cause"] for a in sup.store.attempts("t-1")] == ["node_failure", "succeeded"]
    assert sup.policy.spent["node_failure"] == 1


def test_a_success_takes_rank_0s_last_figures_from_its_result(tmp_path):
    # Its last reports never landed (the controller stood still while the ranks ended): the result says.
    sup = supervisor(tmp_path, [GangOutcome(True, last={"step": 100, "loss": 1.25})])
    run(sup, "SUCCEEDED")
    assert sup.live.step == 100 and sup.live.loss == 1.25
    sup = supervisor(tmp_path / "again", [GangOutcome(True, last=None)])  # a function that reported nothing
    run(sup, "SUCCEEDED")
    assert sup.live.step == 0


def attempt_with_a_returned_rank(tmp_path, max_steps, steps, finished):
    """A running attempt whose ranks last reported `steps` (by rank) and whose `finished` ranks' functions
    returned (rank -> last step); returns the supervisor and the time."""
    sup = supervisor(tmp_path, [])
    t = run(sup, "RUNNING") + 1
    sup.step_once(t)  # the attempt starts
    sup.live.max_steps, sup.live.step = max_steps, steps[0]
    for rank, step in enumerate(steps):
        sup.hangs.progress(rank, step, t)
    sup._gang.finished = lambda: finished
    return sup, t


def test_peers_left_waiting_by_a_rank_that_returned_early_fail_the_job_saying_so(tmp_path):
    sup, t = attempt_with_a_returned_rank(tmp_path, 30, [12, 11], {1: 11})  # rank 1 returned after step 11 of 30
    assert sup.step_once(t + 5).name == "RUNNING"  # seen now: rank 0 may still be moving
    assert sup.step_once(t + 14).name == "RUNNING"  # quiet for 14 s, but only 9 s since rank 1 left
    assert sup.step_once(t + 16).name == "FAILED"
    (fault,) = [e for e in sup.store.events("t-1") if e["kind"] == "fault"]
    assert fault["data"]["cause"] == "user_error" and fault["data"]["stalled_ranks"] == [0]
    assert "rank 1's function returned after step 11 of 30 while rank(s) [0] went on" in fault["message"]
    # At the run's end the ranks return one after another: no fault, and a returned rank is not hung.
    sup, t = attempt_with_a_returned_rank(tmp_path / "end", 30, [30, 30], {1: 30})
    assert sup.step_once(t + 30).name == "RUNNING" and "fault" not in kinds(sup)
    # An early stop every rank took (a `break` at step 12): rank 0 is out of its loop too, saving.
    sup, t = attempt_with_a_returned_rank(tmp_path / "stop", 30, [12, 12], {1: 12})
    sup._on_worker_event(sup.attempt, 0, {"kind": "closing"})
    assert sup.step_once(t + 5).name == "RUNNING" and sup.step_once(t + 30).name == "RUNNING"
    assert "fault" not in kinds(sup)
    # The run's length unknown: no early-return verdict, only the hang timeout (a returned rank excepted).
    sup, t = attempt_with_a_returned_rank(tmp_path / "unknown", None, [12, 11], {1: 11})
    assert sup.step_once(t + 30).name == "RUNNING"
    sup.step_once(t + 61)
    (fault,) = [e for e in sup.store.events("t-1") if e["kind"] == "fault"]
    assert fault["data"]["cause"] == "hang" and fault["data"]["stalled_ranks"] == [0]


def test_the_specs_skips_survive_a_restart_before_the_first_checkpoint(tmp_path):
    died = GangOutcome(False, "node_failure", 1, "rank 1's worker died")
    sup = supervisor(tmp_path, [died, GangOutcome(True)],
                     {"data": {"skip": [[5, 10]]}, "fault_tolerance": {"budgets": {"node_failure": 1}}})
    run(sup, "SUCCEEDED")
    assert [g.plan.skip for g in ScriptedGang.created] == [((5, 10),), ((5, 10),)]


def test_a_backoff_waits_for_the_clock_not_for_real_time(tmp_path):
    died = GangOutcome(False, "node_failure", 1, "died")
    sup = supervisor(tmp_path, [died, died, GangOutcome(True)],
                     {"fault_tolerance": {"budgets": {"node_failure": 2}, "backoff_s": 30}})
    t = run(sup, "RESTARTING")  # the first restart is immediate ...
    t = run(sup, "RESTARTING", start=t + 1)  # ... the second waits backoff_s
    assert sup.step_once(t + 10).name == "RESTARTING"
    assert sup.step_once(t + 29).name == "RESTARTING"
    assert sup.step_once(t + 31).name == "PENDING"
    run(sup, "SUCCEEDED", start=t + 32)


def test_a_commit_flushed_by_an_ending_attempt_is_kept(tmp_path):
    died = GangOutcome(False, "node_failure", 0, "died")
    sup = supervisor(tmp_path, [None, died], {"fault_tolerance": {"budgets": {"node_failure": 1}}})
    run(sup, "RESTARTING")
    # Attempt 1's rank 0 committed step 20 just before it died; its report arrives now.
    sup.on_report(1, 0, {"events": [{"kind": "checkpoint_committed", "step": 20, "uri": "file:///ck/20", "ts": 1.0}]})
    assert "checkpoint_committed" in kinds(sup)
    assert sup.status()["last_checkpoint_step"] == 20
    assert sup.commits == [20]


def test_the_last_batch_of_an_ending_attempt_stays_in_the_history(tmp_path):
    died = GangOutcome(False, "node_failure", 0, "died")
    sup = supervisor(tmp_path, [None, died, None], {"fault_tolerance": {"budgets": {"node_failure": 1}}})
    t = run(sup, "RESTARTING")
    run(sup, "RUNNING", start=t + 1)
    assert sup.attempt == 2
    # Rank 0 of attempt 1 flushed its steps 1-3 as it ended; they land after attempt 2 started.
    sup.on_report(1, 0, {"records": [{"step": s, "ts": float(s), "loss": 1.0 / s} for s in (1, 2, 3)]})
    assert [(m["step"], m["attempt"]) for m in sup.store.read_metrics("t-1")] == [(1, 1), (2, 1), (3, 1)]
    assert sup.live.step == 0  # the history only: not what the current attempt shows
    sup.on_report(2, 0, {"records": [{"step": 1, "ts": 10.0, "loss": 1.0}]})
    sup.on_report(1, 0, {"records": [{"step": 4, "ts": 4.0, "loss": 0.25}]})  # once attempt 2 reported: too late
    assert [(m["step"], m["attempt"]) for m in sup.store.read_metrics("t-1")][3:] == [(1, 2)]


def test_failing_saves_say_since_when(tmp_path):
    sup = supervisor(tmp_path, [None] * 10)
    run(sup, "RUNNING")
    sup.on_report(1, 0, {"events": [{"kind": "checkpoint_committed", "step": 20, "uri": "u", "ts": 1.0}]})
    assert sup.status()["checkpoint_warning"] is None
    for step in (30, 40):
        for rank in (0, 1):
            sup.on_report(1, rank, {"events": [{"kind": "checkpoint_failed", "step": step, "error": "No space left"}]})
    status = sup.status()
    assert status["checkpoint_failures_since_commit"] == 2
    assert "no committed checkpoint since step 20" in status["checkpoint_warning"]
    sup.on_report(1, 0, {"events": [{"kind": "checkpoint_committed", "step": 50, "uri": "u", "ts": 2.0}]})
    assert sup.status()["checkpoint_warning"] is None


def test_rollback_plan_carries_the_skips_pins_and_target():
    policy = FailurePolicy(FaultTolerance(skip_batches=5, budgets={"nan": 2}))
    decision = policy.decide("nan", "loss is nan", Rollback(onset_step=45, fault_step=46, committed=(20, 40, 60),
                                                             positions={40: 40, 46: 46}))
    assert decision.restart
    assert decision.rewind == Rewind(skip=((40, 51),), pinned=(40,), max_step=40, lr_scale=1.0)
    plan = AttemptPlan.build(checkpoint_uri="file:///ck", spec_skip=[(5, 10), (40, 51)], rewind=decision.rewind)
    assert plan.skip == ((5, 10), (40, 51)) and plan.max_step == 40 and plan.pinned == (40,)


@pytest.fixture
def elastic():
    return PlacementPolicy(Resources(workers=4, min_workers=2), FaultTolerance(elastic_wait_s=10, resource_wait_s=100))


def test_a_restart_shrinks_after_the_elastic_wait_to_what_fits(elastic):
    assert elastic.while_waiting(attempt=1, waited=500, world_size=4, fit=1, avoiding=0).action == "wait"
    assert elastic.while_waiting(attempt=2, waited=5, world_size=4, fit=3, avoiding=0).action == "wait"
    shrink = elastic.while_waiting(attempt=2, waited=11, world_size=4, fit=3, avoiding=0)
    assert (shrink.action, shrink.world_size) == ("shrink", 3)
    # Fewer than min_workers fit: no shrink; past the resource wait, give up.
    assert elastic.while_waiting(attempt=2, waited=11, world_size=4, fit=1, avoiding=0).action == "wait"
    assert elastic.while_waiting(attempt=2, waited=101, world_size=4, fit=1, avoiding=0).action == "give_up"


def test_quarantine_is_lifted_rather_than_waiting_forever(elastic):
    assert elastic.while_waiting(attempt=2, waited=40, world_size=4, fit=1, avoiding=1).action == "wait"
    assert elastic.while_waiting(attempt=2, waited=51, world_size=4, fit=1, avoiding=1).action == "lift"


def test_a_node_is_quarantined_on_its_second_failure_where_others_exist(elastic):
    assert not elastic.blame("n1", others_alive=True, quarantined=set())
    assert elastic.blame("n1", others_alive=True, quarantined=set())
    assert not elastic.blame("n2", others_alive=False, quarantined=set())
    assert not elastic.blame("n2", others_alive=False, quarantined=set())  # alone: never strand the job


def test_growing_back_needs_the_missing_ranks_to_fit(elastic):
    assert elastic.grow_to(world_size=2, fit=1) is None
    assert elastic.grow_to(world_size=2, fit=2) == 4
    assert elastic.grow_to(world_size=4, fit=8) is None


def test_a_creeping_loss_is_a_divergence_rolled_back_before_its_onset(tmp_path):
    import numpy as np

    sup = supervisor(tmp_path, [None] * 50, {"fault_tolerance": {"skip_batches": 5, "budgets": {"divergence": 1}}})
    run(sup, "RUNNING")
    sup.step_once(100.0)  # the gang starts
    for step in (100, 200, 300, 400):
        sup.on_report(1, 0, {"events": [{"kind": "checkpoint_committed", "step": step, "uri": f"u/{step}", "ts": 1.0}]})
    rng = np.random.default_rng(3)
    steps = np.arange(1, 601)
    creep = 1 + 0.4 * np.clip((steps - 420) / 250, 0, None)  # +40 % over 250 steps from step 420
    loss = 2.0 * creep * (1 + 0.01 * rng.standard_normal(len(steps)))
    grad = 0.5 * creep ** 4 * np.exp(0.1 * rng.standard_normal(len(steps)))
    for i in range(0, len(steps), 10):  # batches of 10 records, as a rank ships them
        sup.on_report(1, 0, {"records": [{"step": int(s), "ts": float(s), "loss": float(lo), "grad_norm": float(g),
                                          "metrics": {"lr": 1e-3}, "position": int(s)}
                                         for s, lo, g in zip(steps[i:i + 10], loss[i:i + 10], grad[i:i + 10])]})
        if sup._detected is not None:
            break
    assert sup._detected is not None and sup._detected.cause == "divergence"
    assert 420 <= sup._detected.step <= 520 and sup._detected.onset_step <= 440
    assert sup.step_once(200.0).name == "RESTARTING"
    (fault,) = [e for e in sup.store.events("t-1") if e["kind"] == "fault"]
    assert fault["data"]["cause"] == "divergence" and fault["data"]["rollback_to"] == 400
    assert fault["data"]["skip"] == [[400, sup._detected.step + 5]]


def test_the_specs_lr_schedule_feeds_the_live_forecast(tmp_path):
    import time

    import numpy as np

    schedule = {"kind": "cosine", "steps": 500, "warmup_steps": 10, "min_ratio": 0.1}
    sup = supervisor(tmp_path, [None] * 50, {"monitoring": {"lr_schedule": schedule}})
    run(sup, "RUNNING")
    sup.step_once(100.0)
    s1 = np.cumsum([sup.spec.monitoring.lr_schedule.lr_at(s) for s in range(1, 501)])
    loss = 2.0 + 3.0 * s1 ** -0.5
    sup.on_report(1, 0, {"records": [{"step": s, "ts": float(s), "loss": float(loss[s - 1])} for s in range(1, 101)]})
    deadline = time.monotonic() + 60  # the fit runs on a thread of its own
    while "forecast_ready" not in kinds(sup) and time.monotonic() < deadline:
        time.sleep(0.05)
    (ready,) = [e for e in sup.store.events("t-1") if e["kind"] == "forecast_ready"]
    assert ready["data"]["final_step"] == 500 and ready["data"]["fitted_on"][1] == 100
    assert sup.status()["forecast"]["final_loss"] == pytest.approx(loss[-1], rel=0.05)


NOTICE = {"records": [], "events": [{"kind": "preemption_notice", "ts": 0.0, "rank": 1, "reason": "SIGTERM",
                                     "grace_s": 5.0}]}


def test_a_preempted_rank_whose_worker_dies_is_a_preemption_not_a_node_failure(tmp_path):
    # The SIGKILL that follows a SIGTERM, or the node gone at its drain deadline, before the ranks stopped.
    sup = supervisor(tmp_path, [None, GangOutcome(False, "node_failure", 1, "rank 1's worker died: killed"),
                                GangOutcome(True)],
                     {"fault_tolerance": {"budgets": {"node_failure": 0}, "max_restarts": 0}})
    now = run(sup, "RUNNING")
    sup.step_once(now + 1)  # the gang starts
    sup.on_report(1, 1, NOTICE)
    run(sup, "SUCCEEDED", start=now + 2)
    assert sup.summary()["restarts"] == {"preemption": 1}
    assert [a["cause"] for a in sup.store.attempts("t-1")] == ["preemption", "succeeded"]
    assert "preemption_notice" in kinds(sup)


def test_preempted_ranks_that_do_not_stop_within_the_grace_are_stopped(tmp_path):
    sup = supervisor(tmp_path, [], {"fault_tolerance": {"preemption_grace_s": 5}})
    now = run(sup, "RUNNING")
    sup.step_once(now + 1)
    sup.on_report(1, 1, NOTICE)
    sup.step_once(now + 2)
    assert sup.state.name == "RUNNING"  # within the grace (and the margin for the ranks' results)
    at = run(sup, "RESTARTING", start=now + 3)
    assert at >= 5 + 10  # grace_s plus PREEMPTION_MARGIN_S, on the supervisor's clock
    assert sup.state.cause == "preemption" and "preemption_grace_s" in sup.state.error
    assert ScriptedGang.created[0].stopped


def test_a_success_takes_the_newest_commit_from_storage_when_its_report_was_lost(tmp_path):
    from stalwart.checkpointing.engine import MANIFEST, step_dir

    sup = supervisor(tmp_path, [None, GangOutcome(True)])
    run(sup, "RUNNING")
    sup.on_report(1, 0, {"events": [{"kind": "checkpoint_committed", "step": 10, "uri": "x/10", "ts": 1.0}]})
    # Steps 20 and 30 committed, but their reports never reached the controller (the ranks ended first).
    for step in (20, 30):
        (tmp_path / "ck" / step_dir(step)).mkdir(parents=True)
        (tmp_path / "ck" / step_dir(step) / MANIFEST).write_text("{}")
    run(sup, "SUCCEEDED")
    saved = sup.store.job("t-1")["detail"]["stats"]
    assert saved["last_checkpoint_step"] == 30 and saved["last_checkpoint"].endswith(step_dir(30))


def test_a_restore_in_progress_shows_in_status_until_each_rank_restored(tmp_path):
    sup = supervisor(tmp_path, [None] * 10)
    run(sup, "RUNNING")
    assert sup.status()["restore"] is None
    for rank, (ts, n) in enumerate([(10.0, 30_000_000), (10.5, 20_000_000)]):
        sup.on_report(1, rank, {"events": [{"kind": "restore_progress", "ts": ts - 0.5, "step": 20, "bytes_read": 0,
                                            "bytes_total": 100_000_000}]})
        sup.on_report(1, rank, {"events": [{"kind": "restore_progress", "ts": ts, "step": 20, "bytes_read": n,
                                            "bytes_total": 100_000_000}]})
    restore = sup.status()["restore"]
    assert restore["step"] == 20 and restore["bytes_read"] == 50_000_000 and restore["bytes_total"] == 100_000_000
    assert restore["ranks_reading"] == [0, 1] and restore["bytes_per_s"] == pytest.approx(50e6 / 1.0)  # 9.5 to 10.5
    sup.on_report(1, 0, {"events": [{"kind": "restored", "step": 20, "uri": "u", "ts": 11.0}]})
    assert sup.status()["restore"]["ranks_reading"] == [1]
    sup.on_report(1, 1, {"records": [{"step": 21, "ts": 12.0, "loss": 1.0}]})  # training again: done reading
    assert sup.status()["restore"] is None
    assert "restore_progress" not in kinds(sup)  # shown, not stored
