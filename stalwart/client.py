"""The programmatic API: `Client` talks to the controller; `Job` is a handle on one job.

    client = stalwart.Client()              # local cluster, started if needed
    job = client.submit("job.yaml")
    status = job.wait(timeout=600)          # raises JobFailed if it failed
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterator

import ray
from ray.exceptions import RayActorError, RayTaskError

from stalwart.errors import ClusterError, JobFailed, StalwartError
from stalwart.orchestrator import cluster
from stalwart.orchestrator.controller import TERMINAL, get_or_create_controller
from stalwart.spec import JobSpec


class Client:
    """Lifecycle: construct (connects to Ray, starting a local cluster if allowed, and finds or
    creates the controller); use; `close()` disconnects and stops an in-process cluster it started.

    `start`: 'background' (default; a local cluster that stays up), 'inprocess' (goes with this
    process) or 'never' (raise ClusterError if none runs).
    """

    def __init__(self, address: str | None = None, *, home: str | os.PathLike | None = None,
                 start: str = "background", say=lambda msg: None):
        self.home = cluster.home_dir(home)
        self.how = cluster.connect(address, self.home, start=start, say=say)
        self._controller = get_or_create_controller(str(self.home))
        self.controller_info = self._call("ping", timeout=120)

    @property
    def started_cluster(self) -> bool:
        return self.how.startswith("started")

    def _call(self, method: str, *args: Any, timeout: float = 60.0) -> Any:
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
            except RayActorError as exc:
                if time.monotonic() > deadline:
                    raise ClusterError(f"the stalwart controller is unavailable: {exc}") from None
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
        job_id = self._call("submit", spec.to_dict())
        return Job(self, job_id)

    def job(self, job_id: str) -> "Job":
        self._call("status", job_id)  # raises JobNotFound
        return Job(self, job_id)

    def jobs(self) -> list[dict]:
        return self._call("jobs")

    def close(self) -> None:
        if ray.is_initialized():
            ray.shutdown()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Job:
    def __init__(self, client: Client, job_id: str):
        self.client = client
        self.id = job_id

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self) -> dict:
        return self.client._call("status", self.id)

    def events(self, since: int = 0) -> list[dict]:
        return self.client._call("events", self.id, since)

    def metrics(self) -> list[dict]:
        return self.client._call("metrics", self.id)

    def logs(self) -> str:
        """Everything the ranks printed so far."""
        text, offset = "", 0
        while True:
            chunk, offset = self.client._call("logs", self.id, offset)
            if not chunk:
                return text
            text += chunk

    def follow_logs(self, poll_s: float = 0.5) -> Iterator[str]:
        """Yield log text as it arrives until the job ends."""
        offset = 0
        while True:
            chunk, offset = self.client._call("logs", self.id, offset)
            if chunk:
                yield chunk
                continue
            if self.status()["state"] in TERMINAL:
                chunk, offset = self.client._call("logs", self.id, offset)
                if chunk:
                    yield chunk
                return
            time.sleep(poll_s)

    def cancel(self, reason: str = "cancelled by request") -> str:
        return self.client._call("cancel", self.id, reason)

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

