"""Prometheus metrics: a custom collector that turns job snapshots into metric families at scrape time.

The collector owns no job state: on every scrape it calls `snapshot()` (the controller passes a
function that returns one status dict per job it wants exported) and converts what it gets. Nothing
here imports the orchestrator. The step-time histogram is the exception to "snapshots only": it is a
prometheus_client `Histogram` (`StepTimes`) that the supervisor observes on each report, every rank-0
step as it arrives, so no step is missed whatever the scrape interval; the collector exports it.

The snapshot dict of one job (missing keys and None values are simply not exported):

    id, name, state          str; state one of STATES
    attempt, step, max_steps int (a finished job reports attempt 0: then the last of `attempts` counts)
    attempts                 list of {"attempt": int, ...}, the job's attempts so far
    loss, grad_norm          float (or "nan"/"inf" strings, as status() writes non-finite numbers)
    tokens_per_s             float, tokens per second over the recent window
    rank_step_time_s         {rank: seconds}, each rank's recent seconds per step
    last_checkpoint_step     int
    last_checkpoint_at       float, unix time of the last committed checkpoint
    checkpoint_stall_s       float, seconds the last committed save blocked the step (rank 0)
    checkpoint_write_s       float, seconds the last committed save took to write (rank 0)
    checkpoint_bytes         int, bytes rank 0 wrote for the last committed checkpoint
    checkpoint_failures      int, failed saves so far (any rank)
    checkpoint_failures_since_commit  int, failed saves since the newest commit (0 once one commits)
    restarts                 {cause: count}
    forecast                 {loss, low, high: the live forecast band at the newest judged step;
                             final_loss, final_low, final_high: the forecast at the run's last step;
                             outside: "above"/"below"/None} (stalwart.orchestrator.live_forecast)
    goodput                  {ratio, lost_s: {cause: seconds}, ...} (stalwart.monitoring.goodput)

Conventions: every name starts with `stalwart_`, carries its base unit (seconds, bytes), counters
end in `_total`. Labels are bounded: job_id and job_name on everything, plus `state` (six values),
`cause` (the fault causes; on lost seconds, where the time went), `rank` (per-rank figures only) and `bound` (mid, low, high: the forecast).
Never the step.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from typing import Any, Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from stalwart.monitoring.goodput import LOST
from stalwart.spec import Cause

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_PORT", "PORT_ENV", "STATES", "STEP_BUCKETS", "STEP_TIMES", "JobsCollector", "StepTimes", "serve",
           "start_exporter"]

PORT_ENV = "STALWART_METRICS_PORT"
DEFAULT_PORT = 9464
STATES = ("PENDING", "RUNNING", "RESTARTING", "SUCCEEDED", "FAILED", "CANCELLED")
CAUSES: tuple[str, ...] = Cause.__args__  # node_failure, hang, nan, loss_spike, divergence, user_error
# Seconds per step: from a few milliseconds (small models) to minutes (large ones, or a stall).
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

JOB = ["job_id", "job_name"]
Snapshot = Callable[[], Iterable[dict]]


class StepTimes:
    """Each job's rank-0 step durations: one prometheus_client `Histogram` (labels job_id, job_name),
    observed by the supervisor as each report arrives, so that every step counts, however fast the
    steps and however rare the scrapes. Thread-safe (prometheus_client's children are).

    Lifecycle: `observe()` from the report threads; a `JobsCollector` exports the jobs of its
    snapshot and `forget()`s the others (their series end)."""

    def __init__(self) -> None:
        self.histogram = Histogram("stalwart_job_step_duration_seconds", "Wall-clock seconds per training step on "
                                   "rank 0.", JOB, buckets=STEP_BUCKETS, registry=None)
        self._lock = threading.Lock()
        self._names: dict[str, str] = {}  # job_id -> job_name, for removing its series

    def observe(self, job_id: str, job_name: str, seconds: float) -> None:
        if not math.isfinite(seconds) or seconds < 0:
            return
        self._child(job_id, job_name).observe(seconds)

    def _child(self, job_id: str, job_name: str):
        with self._lock:
            self._names[job_id] = job_name
        return self.histogram.labels(job_id, job_name)

    def forget(self, job_id: str) -> None:
        with self._lock:
            name = self._names.pop(job_id, None)
        if name is not None:
            try:
                self.histogram.remove(job_id, name)
            except KeyError:
                pass

    def collect(self, jobs: dict[str, str]) -> Iterator[Metric]:
        """The histogram over `jobs` ({job_id: job_name}; one not observed yet shows zero counts)."""
        for job_id, name in jobs.items():
            self._child(job_id, name)
        with self._lock:
            gone = set(self._names) - set(jobs)
        for job_id in gone:
            self.forget(job_id)
        for family in self.histogram.collect():
            # Without the _created series prometheus_client adds: a family no dashboard reads.
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


# The process's step times: the controller's supervisors observe them, its exporter collects them.
STEP_TIMES = StepTimes()


class JobsCollector(Collector):
    """A prometheus_client collector over job snapshots.

    Lifecycle: construct with `snapshot` (a function returning the job dicts described in this
    module's docstring), register on a registry (or hand to `serve`), and every scrape calls
    `collect()`. Thread-safe: concurrent scrapes are serialised.

    The step-time histogram comes from `step_times` (observed on each report, see `StepTimes`), for
    the jobs of the snapshot; jobs that leave the snapshot are forgotten there.
    """

    def __init__(self, snapshot: Snapshot, clock: Callable[[], float] = time.time, step_times: StepTimes | None = None):
        self._snapshot = snapshot
        self._clock = clock
        self._lock = threading.Lock()
        self.step_times = STEP_TIMES if step_times is None else step_times

    def describe(self) -> list[Metric]:
        return []  # registration must not take a snapshot

    def collect(self) -> Iterator[Metric]:
        try:
            jobs = list(self._snapshot())
            error = 0
        except Exception:  # noqa: BLE001 - a failed snapshot must show on the dashboard, not kill the scrape
            log.exception("stalwart metrics: the job snapshot failed")
            jobs, error = [], 1
        f = _families()
        f["scrape_error"].add_metric([], error)
        now = self._clock()
        with self._lock:
            seen: dict[str, str] = {}
            for job in jobs:
                job_id = str(job.get("id", ""))
                if not job_id:
                    continue
                seen[job_id] = str(job.get("name", ""))
                self._add_job(f, job, [job_id, seen[job_id]], now)
            # A failed snapshot says nothing about which jobs left: their histograms are kept.
            step_times = [] if error else list(self.step_times.collect(seen))
        yield from f.values()
        yield from step_times

    def _add_job(self, f: dict, job: dict, labels: list[str], now: float) -> None:
        state = job.get("state")
        for s in STATES:
            f["state"].add_metric(labels + [s], 1.0 if s == state else 0.0)
        attempt = job.get("attempt") or ((job.get("attempts") or [{}])[-1].get("attempt"))
        _gauge(f["attempt"], labels, attempt)
        _gauge(f["step"], labels, job.get("step"))
        _gauge(f["max_steps"], labels, job.get("max_steps"))
        _gauge(f["loss"], labels, job.get("loss"))
        _gauge(f["grad_norm"], labels, job.get("grad_norm"))
        _gauge(f["tokens"], labels, job.get("tokens_per_s"))


        for rank, seconds in sorted((job.get("rank_step_time_s") or {}).items(), key=lambda kv: int(kv[0])):
            _gauge(f["rank_step_time"], labels + [str(rank)], seconds)

        restarts = dict.fromkeys(CAUSES, 0)
        restarts.update(job.get("restarts") or {})
        for cause, n in sorted(restarts.items()):
            f["restarts"].add_metric(labels + [str(cause)], float(n))
        f["ckpt_failures"].add_metric(labels, float(job.get("checkpoint_failures") or 0))
        _gauge(f["ckpt_failing"], labels, job.get("checkpoint_failures_since_commit"))

        _gauge(f["ckpt_step"], labels, job.get("last_checkpoint_step"))
        at = _num(job.get("last_checkpoint_at"))
        if at is not None:
            f["ckpt_age"].add_metric(labels, max(0.0, now - at))
        _gauge(f["ckpt_stall"], labels, job.get("checkpoint_stall_s"))
        _gauge(f["ckpt_write"], labels, job.get("checkpoint_write_s"))
        _gauge(f["ckpt_bytes"], labels, job.get("checkpoint_bytes"))

        gp = job.get("goodput") or {}
        _gauge(f["goodput"], labels, gp.get("ratio"))
        for cause in LOST:
            _gauge(f["lost"], labels + [cause], (gp.get("lost_s") or {}).get(cause, 0.0 if gp else None))

        fc = job.get("forecast") or {}
        for bound, key in (("mid", "loss"), ("low", "low"), ("high", "high")):
            _gauge(f["forecast"], labels + [bound], fc.get(key))
            _gauge(f["forecast_final"], labels + [bound], fc.get("final_" + ("loss" if key == "loss" else key)))
        if "outside" in fc:
            f["forecast_outside"].add_metric(labels, 1.0 if fc["outside"] == "above" else
                                             -1.0 if fc["outside"] == "below" else 0.0)


def _families() -> dict[str, Metric]:
    g, c = GaugeMetricFamily, CounterMetricFamily
    return {
        "state": g("stalwart_job_state", "1 for the job's current state, 0 for the others.", labels=JOB + ["state"]),
        "attempt": g("stalwart_job_attempt", "The job's current attempt number (1 = first run).", labels=JOB),
        "step": g("stalwart_job_step", "Last training step rank 0 reported.", labels=JOB),
        "max_steps": g("stalwart_job_max_steps", "Steps the job will run in all, when it said so.", labels=JOB),
        "loss": g("stalwart_job_loss", "Last training loss rank 0 reported.", labels=JOB),
        "grad_norm": g("stalwart_job_grad_norm", "Last gradient norm rank 0 reported.", labels=JOB),
        "tokens": g("stalwart_job_tokens_per_second", "Training throughput over the last 20 s, all ranks.",
                    labels=JOB),
        "rank_step_time": g("stalwart_rank_step_duration_seconds",
                            "Each rank's recent seconds per step (straggler view).", labels=JOB + ["rank"]),
        "restarts": c("stalwart_job_restarts", "Restarts of the job, by the cause of the fault.",
                      labels=JOB + ["cause"]),
        "ckpt_failures": c("stalwart_checkpoint_failures", "Checkpoint saves that failed, any rank.", labels=JOB),
        "ckpt_failing": g("stalwart_checkpoint_failures_since_commit",
                          "Failed saves since the newest committed checkpoint (0 once one commits).", labels=JOB),
        "ckpt_step": g("stalwart_checkpoint_last_step", "Step of the newest committed checkpoint.", labels=JOB),
        "ckpt_age": g("stalwart_checkpoint_age_seconds", "Seconds since the newest checkpoint was committed.",
                      labels=JOB),
        "ckpt_stall": g("stalwart_checkpoint_stall_seconds",
                        "Seconds the last committed save blocked training (snapshot to host memory).", labels=JOB),
        "ckpt_write": g("stalwart_checkpoint_write_seconds",
                        "Seconds the last committed save took to write in the background.", labels=JOB),
        "ckpt_bytes": g("stalwart_checkpoint_size_bytes",
                        "Bytes rank 0 wrote for the last committed checkpoint (its shard).", labels=JOB),
        "goodput": g("stalwart_job_goodput_ratio", "Goodput since the first step: the share of the time spent "
                     "training steps not trained before, net of checkpoint stalls.", labels=JOB),
        "lost": g("stalwart_job_lost_seconds", "Seconds the job lost since its first step, by cause: detection, "
                  "restart, restore (faults), recomputed (steps trained again), checkpoint (save stalls).",
                  labels=JOB + ["cause"]),
        "forecast": g("stalwart_job_forecast_loss", "The live forecast of the loss at the current step (fitted "
                      "on the run's first steps), and its band: bound is mid, low or high.", labels=JOB + ["bound"]),
        "forecast_final": g("stalwart_job_forecast_final_loss", "The live forecast of the loss at the run's last "
                            "step, with its interval: bound is mid, low or high.", labels=JOB + ["bound"]),
        "forecast_outside": g("stalwart_job_forecast_outside_band", "1 while the smoothed loss is above the "
                              "forecast band, -1 below it, 0 inside.", labels=JOB),
        "scrape_error": g("stalwart_exporter_scrape_error", "1 if collecting the job snapshot failed.", labels=[]),
    }


def _gauge(family: GaugeMetricFamily, labels: list[str], value: Any) -> None:
    x = _num(value)
    if x is not None:
        family.add_metric(labels, x)


def _num(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)  # "nan" / "inf" strings (non-finite values in status()) become floats
    except (TypeError, ValueError):
        return None


# ---- serving ----------------------------------------------------------------------------------
def serve(collector: Collector, host: str = "127.0.0.1", port: int = 0):
    """Serve `collector` alone (a private registry) over HTTP on host:port; port 0 picks a free one.

    Returns (server, port). Stop with `server.shutdown(); server.server_close()`. Raises OSError if
    the port cannot be bound.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server, server.server_port


def start_exporter(collector: Collector, host: str = "127.0.0.1", port: int | None = None):
    """`serve` on the port from $STALWART_METRICS_PORT (default 9464; 0 = any free port).

    A taken port falls back to a free one (logged); returns (server, port), or (None, None) if
    nothing could be bound (logged), so a monitoring problem never stops the caller.
    """
    if port is None:
        raw = os.environ.get(PORT_ENV, "").strip()
        try:
            port = int(raw) if raw else DEFAULT_PORT
        except ValueError:
            log.warning("stalwart metrics: %s=%r is not a port number; using %d", PORT_ENV, raw, DEFAULT_PORT)
            port = DEFAULT_PORT
    try:
        return serve(collector, host, port)
    except OSError as exc:
        if port == 0:
            log.error("stalwart metrics: cannot serve on %s: %s; no metrics endpoint", host, exc)
            return None, None
        try:
            server, bound = serve(collector, host, 0)
        except OSError as exc2:
            log.error("stalwart metrics: cannot serve on %s: %s; no metrics endpoint", host, exc2)
            return None, None
        log.warning("stalwart metrics: port %d on %s is taken (%s); serving on port %d instead",
                    port, host, exc.strerror or exc, bound)
        return server, bound
