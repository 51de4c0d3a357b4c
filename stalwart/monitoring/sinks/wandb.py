"""Weights & Biases: one run per job, its id the job id (stalwart[wandb]); offline mode needs no network."""

from __future__ import annotations

from pathlib import Path

from stalwart.monitoring.sinks.base import Marker, Timeline, TrackerSink, scalars

# The x axis of every chart. W&B's own step must only grow and drops a point logged with a smaller
# one; stalwart's step goes back after a restart or a rollback, so it is logged as a metric of its
# own that every other metric is plotted against (W&B's "custom step"), and W&B counts its own.
STEP = "stalwart/step"
# Run tags added when these markers first appear (see base.markers).
_TAGS = {"restart": "restarted", "rollback": "rolled-back"}


class WandbSink(TrackerSink):
    """Metrics per report under their report names (loss, grad_norm, tokens, the user's own) against
    `stalwart/step`; markers as metrics `stalwart/<marker>` (see `base.markers`); the job's state and
    attempt in the run's summary; tags `restarted` and `rolled-back`; the spec as the run's config.

    The run's id is the job id and it is opened with resume="allow", so a resumed job continues the
    same run: online, the same run on the server; offline, a new run folder with the same id under
    `dir`/wandb, which `wandb sync` uploads into that run. Online needs the controller's environment
    to hold W&B's credentials (WANDB_API_KEY, or `wandb login` there); W&B's service process and
    files belong to the controller's process, with console capture and system metrics off (they
    would be the controller's, not the job's).
    """

    name = "wandb"

    def __init__(self, project: str, mode: str, dir: Path):
        self.project, self.mode, self.dir = project, mode, dir
        self.run = None
        self._timeline = Timeline()

    def open(self, job_id: str, job_name: str, config: dict, resume: dict | None) -> dict:
        import wandb

        self.dir.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(console="off", silent=True, disable_git=True, save_code=False,
                                  x_disable_stats=True, x_disable_meta=True)
        # reinit="create_new": the controller runs many jobs, each with a run of its own at once.
        self.run = wandb.init(project=self.project, id=(resume or {}).get("id", job_id), name=job_id,
                              group=job_name, resume="allow", mode=self.mode, dir=str(self.dir),
                              config=config if resume is None else None, reinit="create_new", settings=settings)
        self.run.define_metric(STEP)
        self.run.define_metric("*", step_metric=STEP)
        return {"id": self.run.id, "project": self.project}

    def metrics(self, records: list[dict], attempt: int) -> None:
        for r in records:
            self.run.log({**scalars(r), STEP: r["step"]})
            for placed in self._timeline.reported(r["step"]):
                self._mark(*placed)

    def event(self, event: dict) -> None:
        kind, data = event.get("kind"), event.get("data") or {}
        for placed in self._timeline.place(event):
            self._mark(*placed)
        if kind == "state":
            self.run.summary["stalwart/state"] = data.get("state")
        elif kind == "attempt_started":
            self.run.summary["stalwart/attempt"] = event.get("attempt")

    def _mark(self, marker: Marker, step: int, ts: float | None) -> None:
        self.run.log({f"stalwart/{marker.name}": marker.value, STEP: step})
        tag = _TAGS.get(marker.name)
        if tag is not None and tag not in (self.run.tags or ()):
            self.run.tags = (*(self.run.tags or ()), tag)

    def close(self, outcome: str | None = None) -> None:
        for placed in self._timeline.end():
            self._mark(*placed)
        if outcome is not None:
            self.run.summary["stalwart/state"] = outcome
        self.run.finish(exit_code=0 if outcome in (None, "SUCCEEDED") else 1)
