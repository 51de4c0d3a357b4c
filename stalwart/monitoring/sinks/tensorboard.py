"""TensorBoard: event files under DIR/<job id>, written with torch's SummaryWriter (stalwart[tensorboard])."""

from __future__ import annotations

import json
from pathlib import Path

from stalwart.monitoring.sinks.base import Marker, Timeline, TrackerSink, scalars


class TensorBoardSink(TrackerSink):
    """Scalars per step under their report names (loss, grad_norm, tokens, the user's own); markers as
    scalars `stalwart/<marker>` (see `base.markers`); every event as text under `stalwart/events`.

    A resumed job writes a new event file into the same directory, which TensorBoard reads as the same
    run. Steps that a restart or rollback trains again appear twice, once per attempt: nothing is
    dropped, and the restart and rollback markers show where that happened.
    """

    name = "tensorboard"

    def __init__(self, root: Path):
        self.root = root
        self.dir: Path | None = None
        self._writer = None
        self._timeline = Timeline()

    def open(self, job_id: str, job_name: str, config: dict, resume: dict | None) -> dict:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = self.root / job_id
        # Flushed after every call instead (a controller may go at any moment), not on a timer.
        self._writer = SummaryWriter(log_dir=str(self.dir), flush_secs=3600)
        if resume is None:
            self._writer.add_text("stalwart/spec", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)
        return {"dir": str(self.dir)}

    def metrics(self, records: list[dict], attempt: int) -> None:
        for r in records:
            for name, value in scalars(r).items():
                self._writer.add_scalar(name, value, r["step"], walltime=r.get("ts"))
            for placed in self._timeline.reported(r["step"]):
                self._mark(*placed)
        self._writer.flush()

    def event(self, event: dict) -> None:
        for placed in self._timeline.place(event):
            self._mark(*placed)
        step = (event.get("data") or {}).get("step")
        self._writer.add_text("stalwart/events", f"**{event.get('kind')}** (attempt {event.get('attempt')}): "
                              f"{event.get('message', '')}", step if isinstance(step, int) else self._timeline.step or 0,
                              walltime=event.get("ts"))
        self._writer.flush()

    def _mark(self, marker: Marker, step: int, ts: float | None) -> None:
        self._writer.add_scalar(f"stalwart/{marker.name}", marker.value, step, walltime=ts)

    def close(self, outcome: str | None = None) -> None:
        for placed in self._timeline.end():
            self._mark(*placed)
        if outcome is not None:
            self._writer.add_text("stalwart/events", f"**ended**: {outcome}", self._timeline.step or 0)
        self._writer.close()
