"""Admission: which waiting job may reserve resources next, and whether a job can ever fit the cluster.

Jobs waiting for their first start queue here, highest `priority` first, then in submit order. Only
the head may create its placement group; the others hold none, so that a freed slot goes to the job
the queue names rather than to whichever pending placement group Ray serves first. A job leaves the
queue once its gang is reserved (or it ends); its restarts do not queue again, as it was admitted.
"""

from __future__ import annotations

import bisect
import itertools
import math
import threading
import time

from stalwart.spec import Resources


class AdmissionQueue:
    """Thread-safe: the controller adds jobs, each supervisor's thread asks `admit` and `remove`s itself."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._order: dict[str, tuple[int, float, int]] = {}  # job id -> sort key
        self._priority: dict[str, int] = {}
        # The same entries as (key, job id), in queue order: every waiting job's supervisor asks `admit`
        # twice a second, so a position must cost a bisection, not a pass over the queue (1,000 queued
        # jobs made that 2 million comparisons a second).
        self._sorted: list[tuple[tuple[int, float, int], str]] = []
        self._seq = itertools.count()  # breaks ties of equal submit times in the order of add()

    def add(self, job_id: str, priority: int = 0, submitted: float | None = None) -> None:
        """Queue a job; `submitted` (default now) is its submit time, given when rebuilding from the store."""
        when = time.time() if submitted is None else submitted
        with self._lock:
            self._drop(job_id)
            key = (-priority, when, next(self._seq))
            self._order[job_id] = key
            self._priority[job_id] = priority
            bisect.insort(self._sorted, (key, job_id))

    def remove(self, job_id: str) -> None:
        """Take a job out (started or ended); removing one that is not queued does nothing."""
        with self._lock:
            self._drop(job_id)

    def _drop(self, job_id: str) -> None:
        key = self._order.pop(job_id, None)
        self._priority.pop(job_id, None)
        if key is not None:
            del self._sorted[bisect.bisect_left(self._sorted, (key, job_id))]

    def admit(self, job_id: str) -> str | None:
        """None if `job_id` may reserve its resources now (it heads the queue, or is not queued);
        otherwise the reason it waits."""
        with self._lock:
            key = self._order.get(job_id)
            if key is None:
                return None
            ahead = bisect.bisect_left(self._sorted, (key, job_id))  # keys are unique: those before are ahead
            if not ahead:
                return None
            first = self._sorted[0][1]
            return f"queued: {ahead} job(s) ahead (first: {first}, priority {self._priority[first]})"

    def __len__(self) -> int:
        with self._lock:
            return len(self._order)


_MOST_RANKS = 1 << 20


def unfit(res: Resources, nodes: list[dict[str, float]]) -> tuple[str, str] | None:
    """Why a gang of `res` can never be placed on a cluster of these nodes, as (field path, message),
    or None if it can. `nodes` holds each alive node's total resources (Ray's node table), so a job
    that only has to wait for running jobs to end is not refused."""
    bundle = {"CPU": res.cpus_per_worker, "GPU": res.gpus_per_worker}
    bundle = {k: v for k, v in bundle.items() if v > 0}
    field = {"CPU": "resources.cpus_per_worker", "GPU": "resources.gpus_per_worker"}
    for kind, need in bundle.items():
        most = max((node.get(kind, 0) for node in nodes), default=0)
        if most < need:
            return field[kind], (f"each rank needs {need:g} {kind}(s) but no node of this cluster has more "
                                 f"than {most:g}")
    # Ray keeps resources to 4 decimals: a small tolerance keeps 0.3 CPU x 10 within 3 CPUs. The cap keeps a
    # vanishing request (1e-300 CPU) finite: no gang is larger than it anyway.
    per_node = [min(math.floor(min(node.get(k, 0) / v + 1e-6, _MOST_RANKS)) for k, v in bundle.items())
                for node in nodes]
    want = "{" + ", ".join(f"{k}: {v:g}" for k, v in bundle.items()) + "}"
    if max(per_node, default=0) == 0:
        return "resources", f"no node of this cluster has {want} at once for one rank"
    # The first start takes the whole gang (only a restart may go on with min_workers).
    if sum(per_node) < res.workers:
        return "resources.workers", (f"the gang needs {res.workers} rank(s) of {want} but the whole cluster "
                                     f"holds at most {sum(per_node)}")
    return None
