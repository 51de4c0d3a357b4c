"""Spans of time in which the controller's process did not run: stopped (SIGSTOP, a debugger), swapped
out, starved by its host. Nothing a rank reported could be heard then, so no rank's silence may count
them: after a 25 s freeze both ranks of a healthy job looked hung, and it was restarted.

A daemon thread wakes every TICK_S and notes any gap between two wakes longer than FREEZE_S. It does
nothing else, so a slow supervisor loop (a state API call that takes seconds) is not a freeze: the
report threads were running meanwhile. `since(n)` hands a supervisor the freezes it has not seen yet.
"""

from __future__ import annotations

import threading
import time

TICK_S = 0.25
FREEZE_S = 2.0  # a gap between two wakes this long: the process, not one busy thread, stood still


class FreezeWatch:
    """Process-wide (`shared()`): the freezes seen since start, as (began by, seconds) on time.monotonic."""

    def __init__(self, tick_s: float = TICK_S, freeze_s: float = FREEZE_S, clock=time.monotonic):
        self.tick_s, self.freeze_s, self.clock = tick_s, freeze_s, clock
        self.freezes: list[tuple[float, float]] = []
        self.last_wake = clock()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> "FreezeWatch":
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="stalwart-freeze-watch", daemon=True)
                self._thread.start()
        return self

    def _run(self) -> None:
        last = self.clock()
        while True:
            time.sleep(self.tick_s)
            now = self.clock()
            self.note(last, now)
            last = now

    def note(self, before: float, now: float) -> None:
        """Two consecutive wakes at `before` and `now`: a freeze when they are too far apart."""
        if now - before > self.freeze_s:
            with self._lock:
                # (a time before which what was heard came before the freeze, its length): the freeze
                # began within a tick of the last wake, and ends a tick at most before this one.
                self.freezes.append((before + self.tick_s, now - before - self.tick_s))
        self.last_wake = now

    def unsure(self, now: float) -> bool:
        """Whether a freeze may be going on, or have ended unnoted, at `now`: the thread has not woken
        for longer than a freeze (a process just resumed, whose other threads ran first)."""
        return self._thread is not None and now - self.last_wake > self.freeze_s

    def since(self, seen: int) -> tuple[list[tuple[float, float]], int]:
        """The freezes after the first `seen`, and the new count to pass next time."""
        with self._lock:
            return self.freezes[seen:], len(self.freezes)


_shared: FreezeWatch | None = None
_shared_lock = threading.Lock()


def shared() -> FreezeWatch:
    """The process's watch, started on first use."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = FreezeWatch().start()
        return _shared
