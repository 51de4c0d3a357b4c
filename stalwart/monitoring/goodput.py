"""Where a job's time went: training new steps, or lost to a fault (detection, restart, restore,
steps trained again) or to checkpoint stalls, and the goodput that leaves.

One `Ledger` per job, fed what the controller records, in the order it records it: `event(e)` with
each stored event and `records(rs)` with rank 0's reports (dicts with step, ts and attempt). The
supervisor keeps one live (`status()["goodput"]`, the Prometheus exporter, the Grafana dashboard); the
CLI's `report` rebuilds one from the stored events and metrics (`Ledger.replay`). Every update is O(1).

The accounting, on the timestamps of reports (rank 0's clock) and events (the controller's):
- startup: from the submission to the first report (queueing, processes, the user's set-up, the
  first step). Outside the goodput window, as in bench/goodput.py, which starts at the first step.
- productive: time between consecutive reports of steps never reached before; minus
- checkpoint: what the committed saves blocked training (their stall_s), and
- recomputed: time between reports of steps an earlier attempt had already reached (after a restore
  or a rollback, the work since the checkpoint is done again).
- A fault that restarts the job opens a gap, closed by the first report of the next attempt:
  detection (the last report before the fault to the fault event: for a hang, the hang timeout),
  restart (the fault to the next attempt's start: back-off, waiting for resources, new processes),
  restore (the attempt's start to its `restored` event: the user's set-up and the checkpoint read).
  A gap with no fault event (a move after a preemption notice, a grow) is all restart from its start.

goodput = (productive - checkpoint) / (time from the first report to the last, or to now while a gap
is open, or to the job's end when it ended in a gap). A gap still open is split with what is known.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LOST = ("detection", "restart", "restore", "recomputed", "checkpoint")
_GAP_STATES = ("RESTARTING", "PENDING")
_TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
MAX_SEGMENTS = 4096  # a job restarts a bounded number of times; two or so segments per attempt


@dataclass
class _Gap:
    since: float  # the last report before it
    fault: float | None = None
    started: float | None = None  # the next attempt's start
    restored: float | None = None


@dataclass
class Ledger:
    submitted: float | None = None
    first: float | None = None  # the first report: the goodput window starts here
    last: float | None = None  # the last report of the attempt now reporting
    ended: float | None = None
    attempt: int = 0  # the attempt whose reports are coming
    high: int = 0  # the highest step reported by any attempt
    redo_until: int = 0  # steps up to here, reported by this attempt, were reached before
    seconds: dict = field(default_factory=lambda: dict.fromkeys(("startup", "productive", *LOST), 0.0))
    segments: list = field(default_factory=list)  # [kind, start, end, attempt], adjacent kinds merged
    _gap: _Gap | None = None
    _next_started: dict = field(default_factory=dict)  # attempt -> when it started (seen before its reports)
    _next_restored: dict = field(default_factory=dict)

    # ---- feeding ----------------------------------------------------------------------------------

    def event(self, e: dict) -> None:
        kind, ts, data = e.get("kind"), _ts(e.get("ts")), e.get("data") or {}
        if ts is None:
            return
        attempt = e.get("attempt") or 0
        if kind == "submitted" and self.submitted is None:
            self.submitted = ts
        elif kind == "fault" and data.get("restart"):
            gap = self._open_gap(ts)
            if gap is not None and gap.fault is None:
                gap.fault = ts
        elif kind == "state" and data.get("state") in _GAP_STATES:
            self._open_gap(ts)
        elif kind == "state" and data.get("state") in _TERMINAL:
            self.ended = ts
        elif kind == "attempt_started" and attempt > self.attempt:
            self._next_started.setdefault(attempt, ts)
        elif kind == "restored" and attempt > self.attempt:
            self._next_restored.setdefault(attempt, ts)
        elif kind == "checkpoint_committed" and data.get("rank", 0) == 0:
            stall = _ts(data.get("stall_s"))
            if stall is not None and stall > 0:
                self.seconds["checkpoint"] += stall

    def records(self, records: list[dict]) -> None:
        for r in records:
            ts, step = _ts(r.get("ts")), r.get("step")
            if ts is None or not isinstance(step, int):
                continue
            attempt = r.get("attempt") or self.attempt or 1
            if self.first is None:
                self.first = self.last = ts
                self.attempt, self.high = attempt, step
                self._forget_until(attempt)
                if self.submitted is not None:
                    self._add("startup", self.submitted, ts, attempt)
                continue
            if attempt > self.attempt:
                self._close_gap(attempt, ts, step)
            elif attempt < self.attempt:
                continue  # a late report of an attempt whose gap is closed
            else:
                self._add("recomputed" if step <= self.redo_until else "productive", self.last, ts, attempt)
                self.last = max(self.last, ts)
                if self._gap is not None:  # the attempt's last batch landed after its fault
                    self._gap.since = self.last
            self.high = max(self.high, step)

    @classmethod
    def replay(cls, events: list[dict], metrics: list[dict]) -> Ledger:
        """A ledger of a job's stored history: its events and rank 0's records, merged by time."""
        ledger = cls()
        feed = [(_ts(e.get("ts")) or 0.0, 0, i, e) for i, e in enumerate(events)]
        feed += [(_ts(m.get("ts")) or 0.0, 1, i, m) for i, m in enumerate(metrics)]
        for _, is_record, _, item in sorted(feed, key=lambda x: x[:3]):
            if is_record:
                ledger.records([item])
            else:
                ledger.event(item)
        return ledger

    # ---- reading ----------------------------------------------------------------------------------

    def summary(self, now: float) -> dict | None:
        """The figures so far (None before the first report); an open gap counted up to `now`, or to
        the job's end."""
        if self.first is None:
            return None
        seconds = dict(self.seconds)
        end = self.last
        if (gap := self._open()) is not None:
            end = max(self.last, self.ended if self.ended is not None else now)
            for kind, start, stop in self._gap_parts(gap, end):
                seconds[kind] += stop - start
        wall = max(0.0, end - self.first)
        useful = max(0.0, seconds["productive"] - seconds["checkpoint"])
        return {
            "ratio": round(min(1.0, useful / wall), 4) if wall > 0 else None,
            "wall_s": round(wall, 3),
            "productive_s": round(useful, 3),
            "lost_s": {k: round(seconds[k], 3) for k in LOST},
            "startup_s": round(seconds["startup"], 3),
            "in_gap": self._gap is not None and self.ended is None,
        }

    def timeline(self, now: float) -> list[tuple[str, float, float, int]]:
        """Segments (kind, start, end, attempt), oldest first, the open gap included."""
        out = [tuple(s) for s in self.segments]
        if (gap := self._open()) is not None:
            end = max(self.last, self.ended if self.ended is not None else now)
            out += [(kind, start, stop, self.attempt + 1) for kind, start, stop in self._gap_parts(gap, end)]
        return out

    # ---- inside -----------------------------------------------------------------------------------

    def _open(self) -> _Gap | None:
        """The open gap as known so far: with the next attempt's start and restore when they were seen."""
        if self._gap is None:
            return None
        gap = _Gap(self._gap.since, self._gap.fault)
        if self._next_started:
            gap.started = self._next_started[min(self._next_started)]
        if self._next_restored:
            gap.restored = self._next_restored[min(self._next_restored)]
        return gap

    def _open_gap(self, ts: float) -> _Gap | None:
        if self.first is None:
            return None  # before the first report: start-up, whatever happens
        if self._gap is None:
            self._gap = _Gap(since=self.last)
        return self._gap

    def _close_gap(self, attempt: int, ts: float, step: int) -> None:
        """The first report of `attempt`: the gap since the last one is over."""
        gap = self._gap or _Gap(since=self.last)  # reports of a new attempt without a fault seen: still a gap
        gap.started = self._next_started.pop(attempt, gap.started)
        gap.restored = self._next_restored.pop(attempt, gap.restored)
        self._forget_until(attempt)
        parts = self._gap_parts(gap, ts)
        for kind, start, stop in parts:
            self._add(kind, start, stop, attempt)
        self.redo_until = self.high
        # The first step after the restore (from `restored`, else from the attempt's start) is trained
        # again or new like any other.
        first_from = parts[-1][2] if parts else gap.since
        self._add("recomputed" if step <= self.redo_until else "productive", first_from, ts, attempt)
        self.attempt, self.last, self._gap = attempt, max(self.last, ts), None

    def _forget_until(self, attempt: int) -> None:
        self._next_started = {a: t for a, t in self._next_started.items() if a > attempt}
        self._next_restored = {a: t for a, t in self._next_restored.items() if a > attempt}

    @staticmethod
    def _gap_parts(gap: _Gap, end: float) -> list[tuple[str, float, float]]:
        """The gap [since, end) split at its fault, the next attempt's start and its restore."""
        def at(t: float | None, lo: float) -> float:
            return lo if t is None else min(max(t, lo), end)

        fault = at(gap.fault, gap.since)
        started = at(gap.started, fault) if gap.started is not None else end
        restored = at(gap.restored, started) if gap.restored is not None else end
        parts = [("detection", gap.since, fault), ("restart", fault, started), ("restore", started, restored)]
        return [p for p in parts if p[2] > p[1]]

    def _add(self, kind: str, start: float, end: float, attempt: int) -> None:
        if end <= start:
            return
        self.seconds[kind] += end - start
        if self.segments and self.segments[-1][0] == kind and self.segments[-1][3] == attempt:
            self.segments[-1][2] = max(self.segments[-1][2], end)
        elif len(self.segments) < MAX_SEGMENTS:
            self.segments.append([kind, start, end, attempt])


def _ts(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
