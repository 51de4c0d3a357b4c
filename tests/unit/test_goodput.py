"""The goodput ledger on scripted histories: where each second of a job goes, fed live or replayed."""

from __future__ import annotations

import pytest

from stalwart.monitoring.goodput import Ledger


def ev(kind, ts, attempt=1, **data):
    return {"kind": kind, "ts": ts, "attempt": attempt, "data": data}


def recs(attempt, steps, t0, dt=1.0):
    return [{"step": s, "ts": t0 + i * dt, "attempt": attempt, "loss": 1.0} for i, s in enumerate(steps)]


def killed_job() -> list:
    """Submitted at 0; steps 1-10 at t=10..19 (a save at step 5 stalls 0.2 s); a rank dies after step 10,
    seen at 20.5; attempt 2 starts at 26, restores step 5 at 28, trains 6-15 at 29..38, and succeeds."""
    return [
        ("e", ev("submitted", 0.0, 0)),
        ("e", ev("attempt_started", 5.0)),
        ("r", recs(1, range(1, 6), 10.0)),
        ("e", ev("checkpoint_committed", 14.5, step=5, rank=0, stall_s=0.2)),
        ("r", recs(1, range(6, 11), 15.0)),
        ("e", ev("fault", 20.5, cause="node_failure", rank=1, step=10, restart=True)),
        ("e", ev("state", 20.5, state="RESTARTING")),
        ("e", ev("attempt_started", 26.0, 2)),
        ("e", ev("restored", 28.0, 2, step=5)),
        ("r", recs(2, range(6, 16), 29.0)),
        ("e", ev("state", 38.2, 2, state="SUCCEEDED")),
    ]


def feed(history) -> Ledger:
    ledger = Ledger()
    for what, item in history:
        ledger.records(item) if what == "r" else ledger.event(item)
    return ledger


def test_a_killed_job_splits_its_gap_and_counts_the_steps_trained_again():
    g = feed(killed_job()).summary(now=100.0)
    assert g["startup_s"] == pytest.approx(10.0)
    assert g["wall_s"] == pytest.approx(28.0)  # first report (10) to last (38)
    lost = g["lost_s"]
    assert lost["detection"] == pytest.approx(1.5)  # last report at 19, the fault seen at 20.5
    assert lost["restart"] == pytest.approx(5.5)  # to attempt 2's start
    assert lost["restore"] == pytest.approx(2.0)  # to its restore
    # Steps 6-10 again: from the restore (28) to step 10's report (33).
    assert lost["recomputed"] == pytest.approx(5.0)
    assert lost["checkpoint"] == pytest.approx(0.2)
    # New steps: 1-10 of attempt 1 (9 s between 10 reports) and 11-15 of attempt 2 (5 s), less the stall.
    assert g["productive_s"] == pytest.approx(14.0 - 0.2)
    assert g["ratio"] == pytest.approx(13.8 / 28.0, abs=1e-3)
    assert g["productive_s"] + sum(lost.values()) == pytest.approx(g["wall_s"])
    assert not g["in_gap"]


def test_replay_of_the_stored_history_gives_what_the_live_ledger_gave():
    history = killed_job()
    events = [item for what, item in history if what == "e"]
    metrics = [r for what, item in history if what == "r" for r in item]
    assert Ledger.replay(events, metrics).summary(100.0) == feed(history).summary(100.0)
    timeline = Ledger.replay(events, metrics).timeline(100.0)
    assert [k for k, *_ in timeline] == ["startup", "productive", "detection", "restart", "restore", "recomputed",
                                         "productive"]
    assert [a for *_, a in timeline] == [1, 1, 2, 2, 2, 2, 2]


def test_an_open_gap_is_counted_up_to_now_with_what_is_known():
    ledger = feed(killed_job()[:7])  # the fault seen, nothing since
    g = ledger.summary(now=24.0)
    assert g["in_gap"] and g["wall_s"] == pytest.approx(14.0)
    assert g["lost_s"]["detection"] == pytest.approx(1.5) and g["lost_s"]["restart"] == pytest.approx(3.5)
    ledger.event(ev("attempt_started", 26.0, 2))
    g = ledger.summary(now=27.0)
    assert g["lost_s"]["restart"] == pytest.approx(5.5) and g["lost_s"]["restore"] == pytest.approx(1.0)
    # A job cancelled in the gap: counted to its end, not to whenever the summary is asked for.
    ledger.event(ev("state", 27.5, 2, state="CANCELLED"))
    assert ledger.summary(now=500.0)["wall_s"] == pytest.approx(17.5)


def test_a_hang_is_detection_time_and_a_rollback_recomputes_from_its_target():
    ledger = Ledger()
    ledger.event(ev("submitted", 0.0, 0))
    ledger.records(recs(1, range(1, 21), 1.0))  # steps 1-20 at 1..20
    ledger.event(ev("fault", 80.0, cause="hang", step=20, restart=True))  # a 60 s hang timeout
    ledger.event(ev("attempt_started", 82.0, 2))
    ledger.event(ev("restored", 83.0, 2, step=10))
    ledger.records(recs(2, range(11, 31), 84.0))  # 11-20 again, then 21-30
    g = ledger.summary(now=200.0)
    assert g["lost_s"]["detection"] == pytest.approx(60.0)
    assert g["lost_s"]["recomputed"] == pytest.approx(10.0)  # restore (83) to step 20 (93)
    assert g["productive_s"] == pytest.approx(19.0 + 10.0)


def test_late_reports_of_the_dying_attempt_move_the_gap_and_older_ones_are_ignored():
    ledger = Ledger()
    ledger.event(ev("submitted", 0.0, 0))
    ledger.records(recs(1, range(1, 4), 1.0))  # 1-3 at 1..3
    ledger.event(ev("fault", 10.0, cause="node_failure", restart=True))
    ledger.records(recs(1, range(4, 7), 4.0))  # 4-6 at 4..6: rank 0's last batch, landed after the fault
    ledger.event(ev("attempt_started", 12.0, 2))
    ledger.records(recs(2, range(7, 9), 14.0))
    ledger.records(recs(1, [99], 15.0))  # a batch of attempt 1 arriving now is not counted anywhere
    g = ledger.summary(now=20.0)
    assert g["lost_s"]["detection"] == pytest.approx(4.0)  # from step 6's report (6), not step 3's
    assert g["productive_s"] == pytest.approx(5.0 + 1.0)  # attempt 2's first step is part of its restore
    assert g["wall_s"] == pytest.approx(14.0)


def test_a_new_attempt_without_a_fault_event_is_all_restart_and_no_report_means_no_figures():
    assert Ledger().summary(now=5.0) is None
    ledger = Ledger()
    ledger.records(recs(1, [1, 2], 0.0))
    ledger.records(recs(2, [3], 10.0))  # a move after a preemption notice: no fault event, no restore
    g = ledger.summary(now=10.0)
    assert g["lost_s"]["restart"] == pytest.approx(9.0) and g["startup_s"] == 0.0
