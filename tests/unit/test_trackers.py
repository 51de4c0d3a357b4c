"""Experiment trackers: the fan-out with fake sinks, then each real sink, read back with its library's own reader."""

from __future__ import annotations

import glob
import importlib.util
import math
import threading

import pytest

from stalwart.errors import SpecError
from stalwart.monitoring.sinks import Marker, TrackerSink, Trackers, markers, scalars
from stalwart.orchestrator.store import JobRecord, Store
from stalwart.spec import JobSpec
from trackerfiles import wandb_run


# ---- what every sink reads the same way ---------------------------------------------------------
def test_scalars_are_the_reported_numbers_with_nonfinite_strings_read():
    record = {"step": 3, "ts": 1.0, "attempt": 1, "position": 7, "busy_s": 0.1, "loss": "nan", "grad_norm": "inf",
              "tokens": 16, "lr": 0.1, "note": "text", "metrics": {"acc": 0.5, "bad": None}}
    out = scalars(record)
    assert set(out) == {"loss", "grad_norm", "tokens", "lr", "acc"}
    assert math.isnan(out["loss"]) and out["grad_norm"] == math.inf and out["acc"] == 0.5


def test_markers_say_restarts_rollbacks_and_checkpoints():
    assert markers({"kind": "attempt_started", "attempt": 1, "data": {}}) == []
    assert markers({"kind": "attempt_started", "attempt": 2, "data": {}}) == [Marker("restart", 2.0)]
    assert markers({"kind": "fault", "data": {"step": 8, "restart": True, "rollback_to": 5}}) == [
        Marker("fault", 1.0, 8), Marker("rollback", 5.0, 8)]
    assert markers({"kind": "fault", "data": {"step": 8, "restart": False, "rollback_to": 5}}) == [Marker("fault", 1.0, 8)]
    assert markers({"kind": "checkpoint_committed", "data": {"step": 5}}) == [Marker("checkpoint", 5.0, 5)]
    assert markers({"kind": "checkpoints_discarded", "data": {"steps": [6, 7]}}) == [Marker("checkpoints_discarded", 2.0)]
    assert markers({"kind": "state", "data": {"state": "RUNNING"}}) == []


# ---- the fan-out ----------------------------------------------------------------------------------
class FakeSink(TrackerSink):
    def __init__(self, fail_on: str | None = None, gate: threading.Event | None = None):
        self.calls: list[tuple] = []
        self.fail_on, self.gate = fail_on, gate

    def _do(self, *call):
        if self.gate is not None:
            self.gate.wait(10)
        self.calls.append(call)
        if call[0] == self.fail_on:
            raise RuntimeError(f"{call[0]} broke")

    def open(self, job_id, job_name, config, resume):
        self._do("open", job_id, job_name, config, resume)
        return {"run": f"{job_id}-run", "was": resume}

    def metrics(self, records, attempt):
        self._do("metrics", [r["step"] for r in records], attempt)

    def event(self, event):
        self._do("event", event["kind"])

    def close(self, outcome=None):
        self._do("close", outcome)


def test_fanout_hands_everything_over_in_order_and_closes_with_the_outcome():
    a, b = FakeSink(), FakeSink()
    saved = []
    trackers = Trackers({"a": a, "b": b}, "job-1", "job", {"config": {"lr": 1}})
    trackers.start({"a": {"run": "old"}, "gone": {}}, on_open=saved.append)
    trackers.metrics([{"step": 1}, {"step": 2}], 1)
    trackers.event({"kind": "fault"})
    trackers.metrics([], 1)  # nothing to hand over
    assert trackers.close(timeout=10, outcome="SUCCEEDED")
    trackers.event({"kind": "late"})  # after close: ignored
    assert a.calls == [("open", "job-1", "job", {"config": {"lr": 1}}, {"run": "old"}), ("metrics", [1, 2], 1),
                       ("event", "fault"), ("close", "SUCCEEDED")]
    assert b.calls[0][-1] is None  # no earlier run of its own
    assert saved == [{"a": {"run": "job-1-run", "was": {"run": "old"}}, "b": {"run": "job-1-run", "was": None}}]
    assert trackers.resume == saved[0]
    assert trackers.close(timeout=1)  # again: nothing more


def test_a_failing_tracker_is_told_once_and_never_stops_the_others():
    broken, failing, fine = FakeSink(fail_on="open"), FakeSink(fail_on="metrics"), FakeSink()
    problems = []
    trackers = Trackers({"broken": broken, "failing": failing, "fine": fine}, "job-1", "job", {})
    trackers.start(on_problem=problems.append)
    for step in range(3):
        trackers.metrics([{"step": step}], 1)
    assert trackers.close(timeout=10, outcome="FAILED")
    assert [c[0] for c in broken.calls] == ["open"]  # left out after a failed open
    assert [c[0] for c in failing.calls] == ["open", "metrics", "metrics", "metrics", "close"]
    assert [c[0] for c in fine.calls] == ["open", "metrics", "metrics", "metrics", "close"]
    assert trackers.errors == {"broken": 1, "failing": 3, "fine": 0}
    assert len(problems) == 2
    assert "tracker broken failed (open): RuntimeError: open broke; it is left out" in problems[0]
    assert "tracker failing failed (metrics)" in problems[1] and "only counted" in problems[1]
    assert "broken" not in trackers.resume


def test_a_slow_tracker_makes_the_queue_drop_and_count_never_block():
    gate = threading.Event()
    slow = FakeSink(gate=gate)
    problems = []
    trackers = Trackers({"slow": slow}, "job-1", "job", {}, queue_size=2)
    trackers.start(on_problem=problems.append)
    for step in range(50):  # the sink is stuck in open: at most 2 wait, the rest drop at once
        trackers.metrics([{"step": step}], 1)
    assert trackers.dropped == 48
    assert problems == ["trackers fall behind the reports: some points are missing from them (the job is not slowed)"]
    gate.set()
    assert trackers.close(timeout=10)
    assert [c for c in slow.calls if c[0] == "metrics"] == [("metrics", [0], 1), ("metrics", [1], 1)]


def test_close_gives_up_on_a_stuck_tracker_after_its_timeout():
    gate = threading.Event()
    problems = []
    trackers = Trackers({"stuck": FakeSink(gate=gate)}, "job-1", "job", {}).start(on_problem=problems.append)
    assert not trackers.close(timeout=0.2, outcome="SUCCEEDED")
    assert "did not finish within 0 s" in problems[0] and "STALWART_TRACKERS_CLOSE_TIMEOUT_S" in problems[0]
    gate.set()


def test_job_record_feeds_the_trackers_and_closes_them_before_the_end_is_stored(tmp_path):
    store = Store(tmp_path)
    store.add_job("job-1", "job", {}, "PENDING", {})
    sink = FakeSink()
    trackers = Trackers({"fake": sink}, "job-1", "job", {}).start()
    seen_state = []
    sink.close = lambda outcome=None: seen_state.append((outcome, store.job("job-1")["state"]))
    record = JobRecord(store, "job-1", trackers)
    record.state("RUNNING", {"reason": ""})
    record.metrics([{"step": 1, "loss": 1.0, "attempt": 1}])
    record.event("checkpoint_committed", "saved", 1, step=1)
    record.state("SUCCEEDED", {"reason": ""})
    assert seen_state == [("SUCCEEDED", "RUNNING")]  # closed before the store said SUCCEEDED
    assert sink.calls[1:] == [("metrics", [1], 1), ("event", "checkpoint_committed")]
    assert store.job("job-1")["detail"]["trackers"] == {"fake": {"run": "job-1-run", "was": None}}
    record.close()  # the controller's hook, once the supervisor is gone: nothing more to do


# ---- the spec -------------------------------------------------------------------------------------
def spec_with(monitoring: dict) -> JobSpec:
    return JobSpec.from_dict({"name": "t", "entrypoint": "m:f", "monitoring": monitoring})


@pytest.mark.parametrize("monitoring,problem", [
    ({"tensorboard": "runs/tb"}, "monitoring.tensorboard: relative; trackers run in the controller"),
    ({"tensorboard": "s3://bucket/tb"}, "monitoring.tensorboard: not a local directory"),
    ({"wandb": {"mode": "offline", "dir": "wandb"}}, "monitoring.wandb.dir: relative"),
    ({"wandb": {"mode": "sometimes"}}, "monitoring.wandb.mode"),
    ({"mlflow": {"tracking_uri": "ftp://host/x"}}, "unsupported tracking URI scheme 'ftp'"),
    ({"mlflow": {"tracking_uri": "file:///x", "experimnt": "e"}},
     "monitoring.mlflow.experimnt: unknown field; expected one of: tracking_uri, experiment"),
])
def test_spec_refuses_tracker_settings_that_cannot_work(monitoring, problem):
    with pytest.raises(SpecError) as exc:
        spec_with(monitoring)
    assert problem in str(exc.value)


def test_spec_never_shows_a_tracking_uri_password():
    with pytest.raises(SpecError) as exc:
        spec_with({"mlflow": {"tracking_uri": "https://me:hunter2@mlflow.example"}})
    assert "holds credentials" in str(exc.value) and "hunter2" not in str(exc.value)


@pytest.mark.parametrize("section,name,value", [("tensorboard", "TensorBoard", "/tmp/tb"),
                                                ("mlflow", "MLflow", {"tracking_uri": "file:///tmp/m"}),
                                                ("wandb", "W&B", {"mode": "offline"})])
def test_spec_asking_for_a_missing_tracker_names_the_extra(monkeypatch, section, name, value):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == section else real(name, *a))
    with pytest.raises(SpecError) as exc:
        spec_with({section: value})
    assert f"monitoring.{section}: the {name} tracker needs the {section} package" in str(exc.value)
    assert f"pip install 'stalwart[{section}]'" in str(exc.value)


# ---- the real sinks, fed one job with a restart and read back --------------------------------------
def _records(steps, attempt, loss_at=lambda s: 10.0 / s):
    return [{"step": s, "ts": 1_700_000_000 + 1000 * attempt + s, "loss": loss_at(s), "grad_norm": 1.0, "tokens": 16,
             "attempt": attempt, "position": s, "metrics": {"acc": s / 100}} for s in steps]


def _event(kind, attempt, **data):
    return {"seq": 0, "ts": 1_700_000_100.0, "kind": kind, "attempt": attempt, "message": f"{kind} happened", "data": data}


def run_job(make_sink) -> tuple[dict, dict]:
    """Feed a job to two sinks, as two controllers would: the first runs attempt 1 (a checkpoint at 5,
    a NaN at step 8 that rolls back to 5) and goes away; the second resumes and finishes. Steps 6-8 run twice;
    step 3's loss arrives as the string "nan"."""
    first = make_sink()
    resume = first.open("job-1", "job", {"config": {"steps": 10}, "resources": {"workers": 2}}, None)
    first.event(_event("attempt_started", 1))
    first.metrics(_records(range(1, 9), 1, lambda s: "nan" if s == 3 else 10.0 / s), 1)
    first.event(_event("checkpoint_committed", 1, step=5, uri="file:///ckpt/5"))
    first.event(_event("fault", 1, cause="nan", step=8, restart=True, rollback_to=5))
    first.close(None)  # the controller goes; the job goes on
    second = make_sink()
    resumed = second.open("job-1", "job", {"config": {"steps": 10}}, resume)
    second.event(_event("attempt_started", 2))
    second.event(_event("restored", 2, step=5, uri="file:///ckpt/5"))
    second.metrics(_records(range(6, 11), 2), 2)
    second.event(_event("checkpoint_committed", 2, step=10, uri="file:///ckpt/10"))
    second.event(_event("state", 2, state="SUCCEEDED"))
    second.close("SUCCEEDED")
    return resume, resumed


def test_tensorboard_event_files_hold_the_curves_and_markers_of_both_runs(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from stalwart.monitoring.sinks.tensorboard import TensorBoardSink

    resume, resumed = run_job(lambda: TensorBoardSink(tmp_path / "tb"))
    assert resume == resumed == {"dir": str(tmp_path / "tb" / "job-1")}  # the same run: one folder
    assert len(glob.glob(str(tmp_path / "tb" / "job-1" / "events.out.tfevents.*"))) == 2
    acc = EventAccumulator(resume["dir"], size_guidance={"scalars": 0, "tensors": 0}).Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert [s for s, _ in loss] == [1, 2, 3, 4, 5, 6, 7, 8, 6, 7, 8, 9, 10]  # nothing dropped
    assert math.isnan(loss[2][1]) and loss[0][1] == pytest.approx(10.0)
    assert [(e.step, e.value) for e in acc.Scalars("acc")][-1] == (10, pytest.approx(0.1))
    assert [(e.step, e.value) for e in acc.Scalars("stalwart/checkpoint")] == [(5, 5.0), (10, 10.0)]
    assert [(e.step, e.value) for e in acc.Scalars("stalwart/rollback")] == [(8, 5.0)]
    # A sink of a new controller has seen no step yet: the restart goes at the first step after it.
    assert [(e.step, e.value) for e in acc.Scalars("stalwart/restart")] == [(6, 2.0)]
    assert [(e.step, e.value) for e in acc.Scalars("stalwart/restored")] == [(5, 5.0)]
    texts = [t.tensor_proto.string_val[0].decode() for t in acc.Tensors("stalwart/events/text_summary")]
    assert any("**fault** (attempt 1): fault happened" in t for t in texts)
    assert texts[-1] == "**ended**: SUCCEEDED"
    assert len(acc.Tensors("stalwart/spec/text_summary")) == 1  # written once, not again on resume


def test_mlflow_run_holds_the_curves_markers_and_tags_and_is_resumed(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only when asked to
    from mlflow.tracking import MlflowClient

    from stalwart.monitoring.sinks.mlflow import MlflowSink

    uri = (tmp_path / "mlruns").as_uri()
    resume, resumed = run_job(lambda: MlflowSink(uri, "exp"))
    assert resume == resumed  # the same run id
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(resume["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "job-1"
    assert client.get_experiment(run.info.experiment_id).name == "exp"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    loss = sorted((m.timestamp, m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert [s for _, s, _ in loss] == [1, 2, 3, 4, 5, 6, 7, 8, 6, 7, 8, 9, 10]
    assert math.isnan(loss[2][2])
    steps = {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, f"stalwart/{k}"))
             for k in ("checkpoint", "rollback", "restart", "fault")}
    assert steps == {"checkpoint": [(5, 5.0), (10, 10.0)], "rollback": [(8, 5.0)], "restart": [(6, 2.0)],
                     "fault": [(8, 1.0)]}
    tags, params = run.data.tags, run.data.params
    assert tags["stalwart.job_id"] == "job-1" and tags["stalwart.state"] == "SUCCEEDED"
    assert tags["stalwart.attempt"] == "2" and tags["stalwart.rolled_back_to"] == "5"
    assert tags["stalwart.last_checkpoint_step"] == "10" and tags["stalwart.last_checkpoint"] == "file:///ckpt/10"
    assert params == {"config.steps": "10", "resources.workers": "2"}


def test_wandb_offline_runs_share_the_job_id_and_keep_every_step(tmp_path):
    pytest.importorskip("wandb")
    from stalwart.monitoring.sinks.wandb import STEP, WandbSink

    resume, resumed = run_job(lambda: WandbSink("proj", "offline", tmp_path))
    assert resume == resumed == {"id": "job-1", "project": "proj"}
    run = wandb_run(tmp_path, "job-1", runs=2)
    assert len(run["files"]) == 2  # one folder per controller, one id: `wandb sync` puts them in one run
    history, tags, summary = run["history"], run["tags"], run["summary"]
    loss = [(h[STEP], h["loss"]) for h in history if "loss" in h]
    assert [s for s, _ in loss] == [1, 2, 3, 4, 5, 6, 7, 8, 6, 7, 8, 9, 10]  # W&B kept the steps that went back
    assert math.isnan(loss[2][1])
    assert [(h[STEP], h["stalwart/checkpoint"]) for h in history if "stalwart/checkpoint" in h] == [(5, 5), (10, 10)]
    assert [(h[STEP], h["stalwart/rollback"]) for h in history if "stalwart/rollback" in h] == [(8, 5)]
    assert [(h[STEP], h["stalwart/restart"]) for h in history if "stalwart/restart" in h] == [(6, 2)]
    assert {"rolled-back", "restarted"} <= tags
    assert summary["stalwart/state"] == "SUCCEEDED"
