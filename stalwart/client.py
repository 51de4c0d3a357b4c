"""The programmatic API: `Client` talks to the controller; `Job` is a handle on one job.

    client = stalwart.Client()              # local cluster, started if needed
    job = client.submit("job.yaml")
    status = job.wait(timeout=600)          # raises JobFailed if it failed

`Records` answers the same read-only questions from a state dir alone, with no cluster running
(after `stalwart run` ended, or while the cluster is down); the CLI falls back to it.
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterator

from stalwart.errors import ClusterError, JobFailed, JobNotFound, StalwartError
from stalwart.orchestrator import cluster
from stalwart.orchestrator.states import TERMINAL_STATES as TERMINAL
from stalwart.spec import JobSpec

CALL_TIMEOUT_S = 60.0  # how long a call waits for a (re)starting controller before giving up


class Client:
    """Lifecycle: construct (connects to Ray, starting a local cluster if allowed, and finds or
    creates the controller); use; `close()` disconnects and stops an in-process cluster it started.

    `address`: host:port, ray://host:port or the dashboard's http://host:8265 (default: RAY_ADDRESS,
    else the local cluster). `start`: 'background' (default; a local cluster that stays up),
    'inprocess' (goes with this process) or 'never' (raise NoCluster if none runs).
    """

    def __init__(self, address: str | None = None, *, home: str | os.PathLike | None = None,
                 start: str = "background", say=lambda msg: None):
        import ray

        from stalwart.orchestrator.controller import get_or_create_controller

        self.home = cluster.home_dir(home)
        self.how = cluster.connect(address, self.home, start=start, say=say)
        # A controller that exists keeps its own home; a new one on a cluster that this machine
        # started (or was told to use) takes the home asked for, else the head node's default.
        try:
            self._controller = get_or_create_controller(str(self.home) if home or self.how != "address" else None)
            self.controller_info = self._call("ping", timeout=120)
        except BaseException:
            if self.how == "started-inprocess" and ray.is_initialized():
                ray.shutdown()
            raise

    @property
    def started_cluster(self) -> bool:
        return self.how.startswith("started")

    def _call(self, method: str, *args: Any, timeout: float = CALL_TIMEOUT_S) -> Any:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        # A restarting controller is briefly unavailable; retry for a while before giving up.
        deadline = time.monotonic() + timeout
        while True:
            try:
                return ray.get(getattr(self._controller, method).remote(*args), timeout=timeout)
            except RayTaskError as exc:
                cause = exc.cause
                if isinstance(cause, StalwartError):
                    raise cause from None
                raise
            except (RayActorError, GetTimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise ClusterError(f"the stalwart controller did not answer within {timeout:.0f} s "
                                       f"({type(exc).__name__}); `ray status` shows whether the cluster is up") from None
                time.sleep(0.5)

    # ---- jobs ---------------------------------------------------------------------------
    def submit(self, spec: JobSpec | dict | str | os.PathLike) -> "Job":
        """Validate `spec` (a JobSpec, a dict, or a YAML path) and queue it. Raises SpecError."""
        if isinstance(spec, (str, os.PathLike)):
            spec = JobSpec.from_yaml(spec)
        elif isinstance(spec, dict):
            spec = JobSpec.from_dict(spec, workdir=os.getcwd())
        if spec.workdir is None:
            spec = spec.model_copy(update={"workdir": os.getcwd()})
        job_id = self._call("submit", spec.to_dict(reveal_secrets=True))
        return Job(self, job_id)

    def job(self, job_id: str) -> "Job":
        self.status(job_id)  # raises JobNotFound
        return Job(self, job_id)

    def jobs(self) -> list[dict]:
        return self._call("jobs")

    def status(self, job_id: str) -> dict:
        return self._call("status", job_id)

    def events(self, job_id: str, since: int = 0) -> list[dict]:
        return self._call("events", job_id, since)

    def metrics(self, job_id: str) -> list[dict]:
        return self._call("metrics", job_id)

    def read_logs(self, job_id: str, offset: int = 0) -> tuple[str, int]:
        """The log text from byte `offset` on (a bounded chunk), and the offset after it."""
        return self._call("logs", job_id, offset)

    def job_spec(self, job_id: str) -> dict:
        """The spec the job runs with, secrets masked."""
        return self._call("job_spec", job_id)

    def cancel(self, job_id: str, reason: str = "cancelled by request") -> str:
        return self._call("cancel", job_id, reason)

    def cancel_all(self, reason: str) -> list[str]:
        """Cancel every unfinished job and wait (up to 30 s each) for them to stop; returns their ids."""
        return self._call("cancel_all", reason, timeout=120)

    def metrics_endpoint(self) -> str | None:
        """The controller's Prometheus scrape URL, or None if it serves none."""
        return self._call("metrics_endpoint")

    def close(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Records:
    """The read-only half of `Client`, served from a state dir's store with no cluster running.

    What it shows is what the controller last recorded; a job recorded as running may have
    stopped with its cluster (`status` then says so in `stale`).
    """

    live = False

    def __init__(self, home: str | os.PathLike | None = None):
        from stalwart.orchestrator.store import Store

        self.home = cluster.home_dir(home)
        if not (self.home / "controller.db").exists():
            self._store = None
        else:
            self._store = Store(self.home, readonly=True)

    def jobs(self) -> list[dict]:
        from stalwart.orchestrator.store import stored_jobs

        if self._store is None:
            return []
        return [_mark_stale(j) for j in stored_jobs(self._store)]

    def job(self, job_id: str) -> "Job":
        self.status(job_id)
        return Job(self, job_id)

    def status(self, job_id: str) -> dict:
        from stalwart.orchestrator.store import stored_status

        if self._store is None:
            raise JobNotFound(job_id)
        return _mark_stale(stored_status(self._store, job_id))

    def events(self, job_id: str, since: int = 0) -> list[dict]:
        self.status(job_id)
        return self._store.events(job_id, since)

    def metrics(self, job_id: str) -> list[dict]:
        self.status(job_id)
        return self._store.read_metrics(job_id)

    def read_logs(self, job_id: str, offset: int = 0) -> tuple[str, int]:
        self.status(job_id)
        return self._store.read_log(job_id, offset)

    def job_spec(self, job_id: str) -> dict:
        job = self._store.job(job_id) if self._store is not None else None
        if job is None:
            raise JobNotFound(job_id)
        return job["spec"]

    def cancel(self, job_id: str, reason: str = "") -> str:
        raise ClusterError(f"cannot cancel {job_id}: no cluster is running, so nothing runs it "
                           f"({cluster.NO_CLUSTER_HINT})")

    def close(self) -> None:
        pass


def _mark_stale(status: dict) -> dict:
    if status.get("state") not in TERMINAL:
        status["stale"] = True
    return status


class Job:
    """A handle on one job, through a `Client` (or, read-only, `Records`)."""

    def __init__(self, client: Client | Records, job_id: str):
        self.client = client
        self.id = job_id

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self) -> dict:
        return self.client.status(self.id)

    def events(self, since: int = 0) -> list[dict]:
        return self.client.events(self.id, since)

    def metrics(self) -> list[dict]:
        return self.client.metrics(self.id)

    def spec(self) -> dict:
        return self.client.job_spec(self.id)

    def logs(self) -> str:
        """Everything the ranks printed so far."""
        text, offset = "", 0
        while True:
            chunk, offset = self.client.read_logs(self.id, offset)
            if not chunk:
                return text
            text += chunk

    def follow_logs(self, poll_s: float = 0.5) -> Iterator[str]:
        """Yield log text as it arrives until the job ends."""
        offset = 0
        while True:
            chunk, offset = self.client.read_logs(self.id, offset)
            if chunk:
                yield chunk
                continue
            if self.status()["state"] in TERMINAL or not getattr(self.client, "live", True):
                chunk, offset = self.client.read_logs(self.id, offset)
                if chunk:
                    yield chunk
                return
            time.sleep(poll_s)

    def cancel(self, reason: str = "cancelled by request") -> str:
        return self.client.cancel(self.id, reason)

    def wait(self, timeout: float | None = None, *, poll_s: float = 0.5, raise_on_failure: bool = True) -> dict:
        """Block until the job ends; return its final status.

        Raises TimeoutError after `timeout` seconds, and JobFailed if it failed (unless told not to).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status()
            if status["state"] in TERMINAL:
                if status["state"] == "FAILED" and raise_on_failure:
                    raise JobFailed(self.id, status.get("reason", ""), status.get("attempts"))
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.id} still {status['state']} after {timeout} s")
            time.sleep(poll_s)
