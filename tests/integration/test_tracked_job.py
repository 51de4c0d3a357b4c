"""Experiment trackers end to end: a job killed mid-run, as TensorBoard, MLflow and W&B (offline) see it."""

import importlib.util
import math

import pytest

from jobspecs import job_spec
from trackerfiles import wandb_run

needs_trackers = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("tensorboard", "mlflow", "wandb")),
    reason="pip install 'stalwart[tensorboard,mlflow,wandb]' to run the tracker test")


@needs_trackers
def test_a_restarted_job_shows_its_curve_restart_and_checkpoints_in_every_tracker(client, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mlruns = (tmp_path / "mlruns").as_uri()
    # Steps of 0.25 s: rank 0's reports of steps 1-5 reach the controller (every report_interval_s, 0.5 s)
    # before the kill (CI once saw none: the whole first attempt took less than a report interval, and
    # a rank stopped for a restart loses what it had not sent; steps after the checkpoint are redone).
    spec = job_spec("testjobs:linear", {"steps": 12, "sleep": 0.25}, checkpoint={"every_steps": 5},
                    faults=[{"kind": "kill", "rank": 1, "step": 8}],
                    monitoring={"tensorboard": str(tmp_path / "tb"), "mlflow": {"tracking_uri": mlruns},
                                "wandb": {"mode": "offline", "dir": str(tmp_path / "wb")}})
    job = client.submit(spec)
    status = job.wait(timeout=180)
    assert status["state"] == "SUCCEEDED" and len(status["attempts"]) == 2
    # The trackers closed before the job was recorded as ended: everything is on disk by now.
    assert set(status["trackers"]) == {"tensorboard", "mlflow", "wandb"}
    losses = {m["step"]: m["loss"] for m in job.metrics()}  # the store's, for comparison

    tb = EventAccumulator(status["trackers"]["tensorboard"]["dir"], size_guidance={"scalars": 0}).Reload()
    tb_loss = [(e.step, e.value) for e in tb.Scalars("loss")]
    assert {s for s, _ in tb_loss} == set(range(1, 13))
    assert tb_loss[-1] == (12, pytest.approx(losses[12]))
    assert [e.value for e in tb.Scalars("stalwart/restart")] == [2.0]
    # Attempt 1 may or may not have committed step 5 before rank 1 died; either way 5 and 10 are marked.
    assert sorted({e.step for e in tb.Scalars("stalwart/checkpoint")}) == [5, 10]
    assert len(tb.Scalars("stalwart/fault")) == 1

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only when asked to
    ml = MlflowClient(tracking_uri=mlruns)
    run = ml.get_run(status["trackers"]["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == job.id
    assert run.data.tags["stalwart.state"] == "SUCCEEDED" and run.data.tags["stalwart.attempt"] == "2"
    assert run.data.params["config.steps"] == "12"
    ml_loss = sorted((m.timestamp, m.step, m.value) for m in ml.get_metric_history(run.info.run_id, "loss"))
    assert {s for _, s, _ in ml_loss} == set(range(1, 13)) and ml_loss[-1][1:] == (12, pytest.approx(losses[12]))
    assert [m.value for m in ml.get_metric_history(run.info.run_id, "stalwart/restart")] == [2.0]
    assert sorted({m.step for m in ml.get_metric_history(run.info.run_id, "stalwart/checkpoint")}) == [5, 10]

    wb = wandb_run(tmp_path / "wb", job.id)
    assert len(wb["files"]) == 1 and wb["summary"]["stalwart/state"] == "SUCCEEDED" and "restarted" in wb["tags"]
    wb_loss = [(h["stalwart/step"], h["loss"]) for h in wb["history"] if "loss" in h]
    assert {s for s, _ in wb_loss} == set(range(1, 13)) and math.isclose(wb_loss[-1][1], losses[12], rel_tol=1e-6)
    assert sorted({h["stalwart/checkpoint"] for h in wb["history"] if "stalwart/checkpoint" in h}) == [5, 10]
    # Nothing went wrong on the way: no tracker told the job's events of a problem.
    assert not [e for e in job.events() if e["kind"] == "tracker_error"]
