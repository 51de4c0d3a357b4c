"""Experiment trackers: TensorBoard, MLflow and Weights & Biases, behind one small sink interface.

`base.TrackerSink` is the interface (its docstring states the lifecycle), `fanout.Trackers` runs one
job's sinks on a thread of their own, and `trackers_for(spec, job_dir)` builds them from a spec's
`monitoring` section. Each tracker's package is an optional extra, imported only when a sink opens.
"""

from __future__ import annotations

from pathlib import Path

from stalwart.monitoring.sinks.base import Marker, TrackerSink, markers, scalars
from stalwart.monitoring.sinks.fanout import Trackers
from stalwart.spec import JobSpec

__all__ = ["Marker", "TrackerSink", "Trackers", "local_path", "markers", "scalars", "trackers_for"]


def local_path(value: str) -> Path:
    """A spec's local directory (an absolute path, `~/...`, or file:///dir) as a Path."""
    return Path(value.removeprefix("file://")).expanduser()


def trackers_for(spec: JobSpec, job_id: str, job_dir: str | Path) -> Trackers | None:
    """The trackers `spec.monitoring` asks for, not started yet; None when it asks for none.
    `job_dir` (the job's folder in the state dir) holds what a tracker keeps locally by default."""
    mon = spec.monitoring
    sinks: dict[str, TrackerSink] = {}
    if mon.tensorboard:
        from stalwart.monitoring.sinks.tensorboard import TensorBoardSink

        sinks["tensorboard"] = TensorBoardSink(local_path(mon.tensorboard))
    if mon.mlflow:
        from stalwart.monitoring.sinks.mlflow import MlflowSink

        sinks["mlflow"] = MlflowSink(mon.mlflow.tracking_uri, mon.mlflow.experiment)
    if mon.wandb:
        from stalwart.monitoring.sinks.wandb import WandbSink

        sinks["wandb"] = WandbSink(mon.wandb.project, mon.wandb.mode,
                                   local_path(mon.wandb.dir) if mon.wandb.dir else Path(job_dir))
    if not sinks:
        return None
    # What the trackers record as the run's configuration: the spec as stored (secrets masked), less
    # the environment, where users put tokens that must not travel to a tracker's server.
    config = {k: v for k, v in spec.to_dict().items() if k not in ("env", "runtime_env")}
    return Trackers(sinks, job_id, spec.name, config)
