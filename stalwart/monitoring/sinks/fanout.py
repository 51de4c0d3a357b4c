"""`Trackers`: one job's tracker sinks, run on one background thread behind a bounded queue."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Callable

from stalwart.monitoring.sinks.base import TrackerSink

log = logging.getLogger(__name__)

# Batches of reports and events waiting for the trackers. The controller ships a rank's reports
# every report_interval_s (0.5 s by default), so this is minutes of backlog before anything drops.
QUEUE_SIZE = 10_000
# How long closing waits for the trackers to take what is queued and finish their runs.
CLOSE_TIMEOUT_ENV = "STALWART_TRACKERS_CLOSE_TIMEOUT_S"
CLOSE_TIMEOUT_S = float(os.environ.get(CLOSE_TIMEOUT_ENV, "30"))

_CLOSE = object()


class Trackers:
    """Hands one job's reports and events to its sinks, on a thread of its own.

    Lifecycle: construct with the sinks; `start(resume, ...)` opens them on the thread (an import, a
    server, a W&B service process: seconds that no caller should wait for); `metrics()` and `event()`
    from any thread, any time, never block: when the queue is full the item is dropped and counted
    (a slow tracker must not slow the controller, which reads the reports that detect faults); then
    `close(timeout, outcome)` once or more: the first call lets the thread hand over what is queued,
    closes every sink and waits up to `timeout`; anything given after it is ignored.

    Each sink's calls are guarded apart (see `_call`): a sink that fails to open is left out, and one
    that raises later keeps getting data (its server may come back). `on_problem`, if given, hears
    about the first failure of each sink and the first dropped item, in words for the job's events.
    """

    def __init__(self, sinks: dict[str, TrackerSink], job_id: str, job_name: str, config: dict,
                 *, queue_size: int = QUEUE_SIZE):
        self.sinks = dict(sinks)
        self.job_id, self.job_name, self.config = job_id, job_name, config
        self.dropped = 0
        self.errors: dict[str, int] = {name: 0 for name in self.sinks}
        self._resume: dict = {}
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._open: dict[str, TrackerSink] = {}
        self._thread = threading.Thread(target=self._run, name=f"trackers-{job_id}", daemon=True)
        self._on_open: Callable[[dict], None] | None = None
        self._on_problem: Callable[[str], None] = lambda message: None
        self._outcome: str | None = None
        self._closing = threading.Lock()
        self._closed = False

    @property
    def resume(self) -> dict:
        """{sink name: what its open returned}: the stored one until the sinks have opened."""
        return dict(self._resume)

    def start(self, resume: dict | None = None, *, on_open: Callable[[dict], None] | None = None,
              on_problem: Callable[[str], None] | None = None) -> "Trackers":
        """Open the sinks on the thread, each with its part of `resume` (what its `open` returned for
        this job before, under its name), then serve the queue. `on_open(resume)` is called there once they have
        opened, with what to store for a later controller; `on_problem(message)` as said above."""
        self._resume = {k: v for k, v in (resume or {}).items() if k in self.sinks}
        self._on_open = on_open
        if on_problem is not None:
            self._on_problem = on_problem
        self._thread.start()
        return self

    def metrics(self, records: list[dict], attempt: int) -> None:
        if records:
            self._put(("metrics", (records, attempt)))

    def event(self, event: dict) -> None:
        self._put(("event", (event,)))

    def close(self, timeout: float = CLOSE_TIMEOUT_S, outcome: str | None = None) -> bool:
        """Hand over what is queued, close every sink with the job's `outcome` (its final state, or
        None when it has not ended), and wait up to `timeout` s. True when all that finished in time;
        otherwise the thread goes on alone (it is a daemon: a stuck tracker holds nothing up)."""
        with self._closing:
            first = not self._closed
            self._closed = True
            if first:
                self._outcome = outcome
        if not self._thread.is_alive():
            return True
        deadline = time.monotonic() + timeout
        if first:
            try:  # the thread drains the queue, so there is room before long unless a sink is stuck
                self._queue.put(_CLOSE, timeout=timeout)
            except queue.Full:
                pass
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            if first:
                log.warning("job %s: trackers did not finish within %.0f s (%s); leaving them behind",
                            self.job_id, timeout, CLOSE_TIMEOUT_ENV)
                self._tell(f"trackers did not finish within {timeout:.0f} s; what they had not written "
                           f"yet may be missing ({CLOSE_TIMEOUT_ENV} sets the wait)")
            return False
        return True

    # ---- the thread ---------------------------------------------------------------------
    def _put(self, item: tuple) -> None:
        if self._closed:
            return
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:
                log.warning("job %s: trackers fall behind; dropping reports for them (the job goes on)", self.job_id)
                self._tell("trackers fall behind the reports: some points are missing from them "
                           "(the job is not slowed)")

    def _tell(self, message: str) -> None:
        try:
            self._on_problem(message)
        except Exception:  # noqa: BLE001 - telling about a tracker must not fail the caller either
            log.warning("job %s: could not record a tracker problem: %s", self.job_id, message, exc_info=True)

    def _run(self) -> None:
        for name, sink in self.sinks.items():
            opened = self._call(name, "open", sink.open, self.job_id, self.job_name, self.config,
                                self._resume.get(name))
            if opened is not _FAILED:
                self._open[name] = sink
                self._resume = {**self._resume, name: opened}
        if self._on_open is not None and self._open:
            self._call("trackers", "save", self._on_open, self.resume)
        while True:
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                if self._closed:  # closed while the queue was too full for _CLOSE: it is drained now
                    break
                continue
            if item is _CLOSE:
                break
            method, args = item
            for name, sink in self._open.items():
                self._call(name, method, getattr(sink, method), *args)
        for name, sink in self._open.items():
            self._call(name, "close", sink.close, self._outcome)

    def _call(self, name: str, what: str, fn: Callable, *args):
        # Trackers are other projects' code reaching disks and servers, with error types of their own
        # (HTTP, protobuf, file systems...) that no list here could name: anything one raises is logged
        # and counted, so that it neither kills this thread (the other sinks) nor ever fails the job.
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - see above
            count = self.errors[name] = self.errors.get(name, 0) + 1
            if count == 1 or what == "open":
                log.warning("job %s: tracker %s failed in %s: %s", self.job_id, name, what, exc, exc_info=True)
                left = "it is left out for this job" if what == "open" else "later failures are only counted"
                self._tell(f"tracker {name} failed ({what}): {type(exc).__name__}: {exc}; {left}; the job goes on")
            return _FAILED


_FAILED = object()
