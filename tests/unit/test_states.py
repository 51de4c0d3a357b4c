"""The job state machine, stepped purely and through the supervisor with a fake gang."""

import time

import pytest

from stalwart.launchers.gang import GangOutcome
from stalwart.orchestrator import states as st
from stalwart.orchestrator.store import Store
from stalwart.orchestrator.supervisor import JobSupervisor
from stalwart.spec import JobSpec


def test_happy_path():
    s = st.Pending()
    s = st.step(s, st.Waiting("waiting for resources"))
    assert isinstance(s, st.Pending) and s.reason == "waiting for resources"
    s = st.step(s, st.Reserved())
    assert isinstance(s, st.Running) and s.attempt == 1
    s = st.step(s, st.Finished())
    assert isinstance(s, st.Succeeded) and s.terminal


def test_restart_increments_attempt():
    s = st.step(st.Running(1), st.Faulted("node_failure", "rank died", restart=True, delay_s=2))
    assert isinstance(s, st.Restarting) and s.delay_s == 2 and not s.terminal
    s = st.step(s, st.BackoffDone())
    assert isinstance(s, st.Pending) and s.attempt == 2


def test_fail_and_cancel_are_terminal():
    failed = st.step(st.Running(1), st.Faulted("user_error", "boom", restart=False, rank=1, traceback="tb"))
    assert isinstance(failed, st.Failed) and failed.rank == 1 and failed.terminal
    with pytest.raises(st.IllegalTransition):
        st.step(failed, st.Tick())
    assert isinstance(st.step(st.Pending(), st.CancelRequested()), st.Cancelled)


def test_illegal_event():
    with pytest.raises(st.IllegalTransition):
        st.step(st.Pending(), st.Finished())


class FakeGang:
    """Ends each attempt with the next scripted outcome after `polls` polls."""

    script: list = []
    created: list = []

    def __init__(self, job_id, attempt, spec, **kwargs):
        self.world_size = spec.resources.workers
        self.attempt = attempt
        self.polls = 0
        self.stopped = False
        self.kept = None  # keep= of the last stop(): whether the reservation was held for a restart
        self.previous = kwargs.get("previous")
        FakeGang.created.append(self)

    def reserve(self, timeout):
        return True

    def waiting_for(self):
        return "waiting"

    def start(self, plan, sink_for):
        self.plan = plan

    def poll(self, timeout):
        self.polls += 1
        if self.polls < 2:
            return None
        return FakeGang.script.pop(0)

    def warm_spares(self):
        return 0

    def stop(self, keep=False):
        self.stopped = True
        self.kept = keep


def run_job(tmp_path, script, **ft):
    FakeGang.script = list(script)
    FakeGang.created = []
    spec = JobSpec.from_dict({"name": "t", "entrypoint": "a:b",
                              "fault_tolerance": {"backoff_s": 0, **ft}})
    store = Store(tmp_path)
    store.add_job("t-1", "t", spec.to_dict(), "PENDING", {})
    sup = JobSupervisor("t-1", spec, store, FakeGang, lambda *a: None, str(tmp_path / "ck"))
    sup.POLL_S = 0.01
    sup.start()
    sup.join(10)
    return sup, store


def test_supervisor_restarts_within_budget_then_succeeds(tmp_path):
    died = GangOutcome(False, "node_failure", 1, "rank 1's worker died")
    sup, store = run_job(tmp_path, [died, died, GangOutcome(True)], budgets={"node_failure": 2})
    assert sup.state.name == "SUCCEEDED"
    assert [g.attempt for g in FakeGang.created] == [1, 2, 3]
    assert all(g.stopped for g in FakeGang.created)
    # Each restart was offered the stopped gang's reservation; the last one was released.
    assert [g.previous for g in FakeGang.created] == [None, *FakeGang.created[:-1]]
    assert [g.kept for g in FakeGang.created] == [True, True, False]
    assert [a["cause"] for a in store.attempts("t-1")] == ["node_failure", "node_failure", "succeeded"]
    kinds = [e["kind"] for e in store.events("t-1")]
    assert kinds.count("fault") == 2


def test_supervisor_fails_when_budget_spent(tmp_path):
    died = GangOutcome(False, "node_failure", 0, "rank 0's worker died")
    sup, store = run_job(tmp_path, [died, died], budgets={"node_failure": 1})
    assert sup.state.name == "FAILED"
    assert FakeGang.created[-1].kept is False  # no restart is coming: the reservation is released
    assert "budget of 1" in store.job("t-1")["detail"]["reason"]


def test_user_error_is_not_retried_by_default(tmp_path):
    boom = GangOutcome(False, "user_error", 1, "ValueError: boom", "Traceback ...ValueError: boom")
    sup, store = run_job(tmp_path, [boom])
    assert sup.state.name == "FAILED"
    detail = store.job("t-1")["detail"]
    assert detail["rank"] == 1 and "ValueError" in detail["traceback"]
    assert "not retried" in detail["reason"]


def test_cancel_stops_the_gang(tmp_path):
    FakeGang.script = []
    FakeGang.created = []
    spec = JobSpec.from_dict({"name": "t", "entrypoint": "a:b"})
    store = Store(tmp_path)
    store.add_job("t-2", "t", spec.to_dict(), "PENDING", {})

    class Forever(FakeGang):
        def poll(self, timeout):
            time.sleep(0.01)
            return None

    sup = JobSupervisor("t-2", spec, store, Forever, lambda *a: None, str(tmp_path / "ck"))
    sup.POLL_S = 0.01
    sup.start()
    deadline = time.monotonic() + 5
    while not (FakeGang.created and hasattr(FakeGang.created[0], "plan")) and time.monotonic() < deadline:
        time.sleep(0.01)
    sup.cancel("test")
    sup.join(5)
    assert sup.state.name == "CANCELLED"
    assert FakeGang.created[0].stopped
    assert store.attempts("t-2")[0]["cause"] == "cancelled"


def test_first_restart_for_a_cause_is_immediate_then_backoff_doubles():
    from stalwart.orchestrator.policy import FailurePolicy
    from stalwart.spec import FaultTolerance

    policy = FailurePolicy(FaultTolerance(backoff_s=2, max_backoff_s=5, budgets={"node_failure": 5, "hang": 2}))
    delays = [policy.decide("node_failure", "died").delay_s for _ in range(4)]
    assert delays == [0.0, 2.0, 4.0, 5.0]
    assert policy.decide("hang", "stuck").delay_s == 0.0  # each cause counts its own recurrences


def test_preemption_has_its_own_budget_outside_max_restarts_and_never_backs_off():
    from stalwart.orchestrator.policy import FailurePolicy
    from stalwart.spec import FaultTolerance

    policy = FailurePolicy(FaultTolerance(max_restarts=1, backoff_s=2, budgets={"preemption": 3}))
    assert policy.decide("node_failure", "died").restart
    for _ in range(3):  # max_restarts is reached, yet preemptions restart, at once
        decision = policy.decide("preemption", "SIGTERM")
        assert decision.restart and decision.delay_s == 0.0
    assert not policy.decide("preemption", "SIGTERM").restart  # its own budget is spent
    assert "max_restarts=1" in policy.decide("hang", "stuck").reason
    assert FaultTolerance().budgets["preemption"] == 100 and FaultTolerance().preemption_grace_s == 30
