"""The tracker sink interface, and what every sink reads out of reports and events the same way."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any


class TrackerSink(abc.ABC):
    """One experiment tracker (TensorBoard, MLflow, W&B...) receiving one job's reports and events.

    Lifecycle, all calls from one thread (the job's `Trackers` thread), in this order:
    1. `open(job_id, job_name, config, resume)` once. `config` is the job's spec as stored (secrets
       masked, environment left out). `resume` is what an earlier `open` of this sink for the same job
       returned (a controller restarted meanwhile), or None for a new job: the sink continues that
       run rather than starting another. Returns what a later `open` needs for that: JSON-able, no
       secrets (it is stored with the job). Raising here leaves the sink out for the whole job.
    2. `metrics(records, attempt)` and `event(event)`, any number of times, interleaved in the order
       the controller recorded them. `records` are rank 0's reports for one attempt: dicts with
       `step` and `ts`, usually `loss`, `grad_norm`, `tokens`, maybe `metrics` (ctx.report's keyword
       arguments) and other numbers; a non-finite value may come as a float or as the string "nan",
       "inf" or "-inf" (`scalars()` reads them all). Steps go back after a restart or a rollback.
       `event` is one stored event: seq, ts, kind, attempt, message and data (see `markers()`).
    3. `close(outcome)` once: flush and release. `outcome` is the job's final state (SUCCEEDED,
       FAILED, CANCELLED), or None when the job has not ended and may be resumed later.
    Any method may raise; the caller logs it and goes on (a tracker never fails a job).
    """

    name: str = "tracker"

    @abc.abstractmethod
    def open(self, job_id: str, job_name: str, config: dict, resume: dict | None) -> dict: ...

    @abc.abstractmethod
    def metrics(self, records: list[dict], attempt: int) -> None: ...

    @abc.abstractmethod
    def event(self, event: dict) -> None: ...

    @abc.abstractmethod
    def close(self, outcome: str | None = None) -> None: ...


# Keys of a report that are not figures to plot: the step and time themselves, the data position,
# the rank's CPU time per step (for straggler detection), the attempt, and the nested user metrics.
_NOT_SCALARS = frozenset({"step", "ts", "attempt", "position", "busy_s", "metrics"})


def number(value: Any) -> float | None:
    """`value` as a float (NaN and infinities included, also when written as strings), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def scalars(record: dict) -> dict[str, float]:
    """The figures of one report, by name: loss, grad_norm, tokens, other numbers, and the user's own
    metrics under their own names. Missing or non-numeric values are left out."""
    out = {}
    for key, value in [*record.items(), *(record.get("metrics") or {}).items()]:
        if key not in _NOT_SCALARS and (x := number(value)) is not None:
            out[key] = x
    return out


@dataclass(frozen=True)
class Marker:
    """A moment worth seeing next to the curves (a restart, a rollback, a committed checkpoint...),
    as a number at a training step. `step` None: where the job is now (the last step reported)."""

    name: str
    value: float
    step: int | None = None


def markers(event: dict) -> list[Marker]:
    """The markers an event makes; most events make none.

    restart: a new attempt after the first (value: the attempt); fault: a fault stopped the attempt
    (value 1, at the step it was seen); rollback: a NaN or spike restart goes back (value: the step it
    goes back to); checkpoint: a committed save (value and step: its step); restored: an attempt
    restored a checkpoint (value: its step); checkpoints_discarded: how many a rollback deleted;
    time_to_recover_s: from a fault to the first step after it.
    """
    kind, data = event.get("kind"), event.get("data") or {}
    step = data.get("step") if isinstance(data.get("step"), int) else None
    if kind == "attempt_started" and (event.get("attempt") or 0) > 1:
        return [Marker("restart", float(event["attempt"]))]
    if kind == "fault":
        out = [Marker("fault", 1.0, step)]
        if data.get("restart") and isinstance(data.get("rollback_to"), int):
            out.append(Marker("rollback", float(data["rollback_to"]), step))
        return out
    if kind == "checkpoint_committed" and step is not None:
        return [Marker("checkpoint", float(step), step)]
    if kind == "restored" and step is not None:
        return [Marker("restored", float(step), step)]
    if kind == "checkpoints_discarded":
        return [Marker("checkpoints_discarded", float(len(data.get("steps") or [])))]
    if kind == "recovered" and (seconds := number(data.get("time_to_recover_s"))) is not None:
        return [Marker("time_to_recover_s", seconds)]
    return []


class Timeline:
    """Places a sink's markers at steps: a marker without a step of its own goes at the last step
    reported. A sink opened by a new controller has seen no step yet: its markers wait, and go at the
    first step reported after them (or at 0 when the job ends before any)."""

    def __init__(self) -> None:
        self.step: int | None = None
        self._waiting: list[tuple[Marker, float | None]] = []

    def place(self, event: dict) -> list[tuple[Marker, int, float | None]]:
        """The event's markers that can be placed now, each with its step and time (the event's)."""
        placed = []
        for m in markers(event):
            step = m.step if m.step is not None else self.step
            if step is None:
                self._waiting.append((m, event.get("ts")))
            else:
                placed.append((m, step, event.get("ts")))
        return placed

    def reported(self, step: int) -> list[tuple[Marker, int, float | None]]:
        """Note a reported step; returns the markers that waited for one, placed there."""
        self.step = step
        waiting, self._waiting = self._waiting, []
        return [(m, step, ts) for m, ts in waiting]

    def end(self) -> list[tuple[Marker, int, float | None]]:
        """The markers still waiting when the sink closes."""
        waiting, self._waiting = self._waiting, []
        return [(m, self.step or 0, ts) for m, ts in waiting]


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level with dotted keys ({"a": {"b": 1}} -> {"a.b": 1}), for trackers
    whose parameters are flat."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
