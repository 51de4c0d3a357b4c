"""MLflow: one run per job, through MlflowClient (stalwart[mlflow], i.e. mlflow-skinny, or full mlflow)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from stalwart.monitoring.sinks.base import Marker, Timeline, TrackerSink, flatten, scalars

# MLflow's limits on one log_batch call and on a value's length.
_BATCH = 1000
_PARAMS_PER_BATCH = 100
_VALUE_LEN = 500  # of a param or tag, well under MLflow's own limit: enough to read, never refused
# Outcome -> MLflow's run status.
_STATUS = {"SUCCEEDED": "FINISHED", "FAILED": "FAILED", "CANCELLED": "KILLED"}
_UNSAFE = re.compile(r"[^\w.\-/ :]")  # characters MLflow refuses in a param, metric or tag name


class MlflowSink(TrackerSink):
    """A run named after the job id in `experiment` (created if missing), tagged `stalwart.job_id`.

    Metrics per step under their report names (loss, grad_norm, tokens, the user's own); markers as
    metrics `stalwart/<marker>` (see `base.markers`); the job's state, attempt, last checkpoint, last
    fault and rollback as `stalwart.*` tags; the spec (its `config` and sections) as params, once.
    A resumed job continues the same run (its id is what `open` returns); when that run is gone
    (deleted from the store) a new one starts. The run ends FINISHED, FAILED or KILLED with the job.
    """

    name = "mlflow"

    def __init__(self, tracking_uri: str, experiment: str):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_id: str | None = None
        self._client = None
        self._timeline = Timeline()

    def open(self, job_id: str, job_name: str, config: dict, resume: dict | None) -> dict:
        uri = self.tracking_uri
        if uri.startswith("file:") or ("://" not in uri and uri != "databricks"):
            # A plain path or file:///dir: MLflow 3 refuses its file store unless asked for it, and this
            # spec asked for it by name. (Set for the controller's process, where only trackers use it.)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            if "://" not in uri:
                uri = Path(uri).expanduser().as_uri()
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=uri)
        self.run_id = (resume or {}).get("run_id")
        if self.run_id is not None:
            try:
                self._client.update_run(self.run_id, status="RUNNING")
            except MlflowException:
                self.run_id = None  # gone from the store: a new run, rather than none
        if self.run_id is None:
            run = self._client.create_run(self._experiment_id(), run_name=job_id,
                                          tags={"stalwart.job_id": job_id, "stalwart.job_name": job_name})
            self.run_id = run.info.run_id
            self._log_params(config)
        return {"run_id": self.run_id}

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        found = self._client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        try:
            return self._client.create_experiment(self.experiment)
        except MlflowException:  # another job's sink created it meanwhile
            found = self._client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def _log_params(self, config: dict) -> None:
        from mlflow.entities import Param

        params = [Param(_name(k)[:250], str(v)[:_VALUE_LEN]) for k, v in flatten(config).items() if v is not None]
        for i in range(0, len(params), _PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=params[i:i + _PARAMS_PER_BATCH])

    def metrics(self, records: list[dict], attempt: int) -> None:
        from mlflow.entities import Metric

        points = []
        for r in records:
            ms = _ms(r.get("ts"))
            points += [Metric(_name(k), v, ms, r["step"]) for k, v in scalars(r).items()]
            points += [_marker(*placed) for placed in self._timeline.reported(r["step"])]
        for i in range(0, len(points), _BATCH):
            self._client.log_batch(self.run_id, metrics=points[i:i + _BATCH])

    def event(self, event: dict) -> None:
        from mlflow.entities import RunTag

        points = [_marker(*placed) for placed in self._timeline.place(event)]
        tags = {}
        kind, data = event.get("kind"), event.get("data") or {}
        if kind == "state":
            tags["stalwart.state"] = data.get("state")
        elif kind == "attempt_started":
            tags["stalwart.attempt"] = event.get("attempt")
        elif kind == "checkpoint_committed":
            tags.update({"stalwart.last_checkpoint_step": data.get("step"), "stalwart.last_checkpoint": data.get("uri")})
        elif kind == "fault":
            tags["stalwart.last_fault"] = event.get("message")
            if data.get("restart") and data.get("rollback_to") is not None:
                tags["stalwart.rolled_back_to"] = data["rollback_to"]
        run_tags = [RunTag(k, str(v)[:_VALUE_LEN]) for k, v in tags.items() if v is not None]
        if points or run_tags:
            self._client.log_batch(self.run_id, metrics=points, tags=run_tags)

    def close(self, outcome: str | None = None) -> None:
        waiting = [_marker(*placed) for placed in self._timeline.end()]
        if waiting:
            self._client.log_batch(self.run_id, metrics=waiting)
        if outcome is None:
            return  # the job goes on (under a later controller): its run stays open
        self._client.set_tag(self.run_id, "stalwart.state", outcome)
        self._client.set_terminated(self.run_id, _STATUS.get(outcome, "FINISHED"))


def _name(key: str) -> str:
    return _UNSAFE.sub("_", key)


def _ms(ts: float | None) -> int:
    return int((ts or time.time()) * 1000)


def _marker(marker: Marker, step: int, ts: float | None):
    from mlflow.entities import Metric

    return Metric(f"stalwart/{marker.name}", marker.value, _ms(ts), step)
