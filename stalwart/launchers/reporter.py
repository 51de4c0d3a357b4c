"""The per-rank report pump: `record` is an append, shipping happens on a background thread.

A training step never waits on the controller: `record` appends a tuple to a list, and every
`interval` seconds a daemon thread converts what piled up and hands it to `sink`, which sends it
without waiting for an answer (a Ray actor call whose result is never fetched). If the controller
is gone, reports are dropped, and training goes on.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from typing import Any, Callable

Sink = Callable[[dict], None]
_MAX_PENDING = 100_000  # bound memory if the sink stalls for a long time


class Reporter:
    """Lifecycle: construct, `start()`, call `record/log/event` from any thread, `close()` at the end
    (which ships what is left). Every shipped batch is a dict with keys records, logs, events, sent_at."""

    def __init__(self, sink: Sink, interval: float = 0.5):
        self._sink = sink
        self._interval = interval
        self._records: list[tuple] = []
        self._logs: list[str] = []
        self._events: list[dict] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="stalwart-reporter", daemon=True)
        self.dropped = 0
        self._shipped_last: dict | None = None  # the newest record shipped, converted

    def last_figures(self) -> dict | None:
        """The newest record's step and loss, for the rank's result: what the controller learns even
        when the reports themselves were lost (it stood still while the rank ended)."""
        pending = self._records
        last = _convert(pending[-1]) if pending else self._shipped_last
        return None if last is None else {"step": int(last["step"]), "loss": last.get("loss")}

    def start(self) -> "Reporter":
        self._thread.start()
        return self

    def record(self, step: int, loss: Any, grad_norm: Any = None, tokens: Any = None, metrics: dict | None = None,
               position: int | None = None, busy_s: float | None = None) -> None:
        # The hot path: no conversion, no lock (list.append is atomic under the GIL).
        if len(self._records) < _MAX_PENDING:
            self._records.append((step, time.time(), loss, grad_norm, tokens, metrics, position, busy_s))
        else:
            self.dropped += 1

    def log(self, text: str) -> None:
        if len(self._logs) < _MAX_PENDING:
            self._logs.append(text)

    def event(self, kind: str, **data: Any) -> None:
        self._events.append({"kind": kind, "ts": time.time(), **data})

    def flush(self) -> None:
        """Ship what is pending now, from the caller's thread."""
        self._ship()

    def retarget(self, sink: Sink) -> None:
        """Ship what is pending to the current sink, then send to `sink` (a rank that joined the next
        attempt in its process: reports carry the attempt they belong to)."""
        self._ship()
        with self._lock:
            self._sink = sink

    def close(self) -> None:
        self._stopped = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._ship(final=True)

    def _loop(self) -> None:
        while not self._stopped:
            self._wake.wait(self._interval)
            self._ship()

    def _ship(self, final: bool = False) -> None:
        with self._lock:
            records, self._records = self._records, []
            logs, self._logs = self._logs, []
            events, self._events = self._events, []
            converted = [_convert(r) for r in records]
            if converted:
                self._shipped_last = converted[-1]
            batch = {
                "records": converted,
                "logs": logs,
                "events": events,
                "sent_at": time.time(),
                # The last batch of a rank: delivered before the rank says it is done, so that a NaN or a
                # spike in the final steps is seen before the job could be called a success.
                "final": final,
            }
            try:
                self._sink(batch)
            except Exception as exc:  # noqa: BLE001 - a lost report must never stop training
                print(f"stalwart: report dropped: {exc}", file=sys.__stderr__)


def _convert(record: tuple) -> dict:
    step, ts, loss, grad_norm, tokens, metrics, position, busy_s = record
    out = {"step": int(step), "ts": ts, "loss": _num(loss)}
    if busy_s is not None:
        out["busy_s"] = busy_s
    if position is not None:
        out["position"] = position
    if grad_norm is not None:
        out["grad_norm"] = _num(grad_norm)
    if tokens is not None:
        out["tokens"] = _num(tokens)
    if metrics:
        out["metrics"] = {k: _num(v) for k, v in metrics.items()}
    return out


def _num(value: Any) -> float | None:
    if value is None:
        return None
    placements = getattr(value, "placements", None)
    if placements is not None and hasattr(value, "to_local"):
        # A DTensor (FSDP's grad norm): read a replicated one locally. Reading a partial or sharded
        # one would be a collective, which this thread must never start; report it as missing.
        if not all(p.is_replicate() for p in placements):
            return None
        value = value.to_local()
    try:
        x = float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        return None
    return x if not math.isnan(x) else float("nan")
