"""The programmatic API: `Client` talks to the controller; `Job` is a handle on one job.

    client = stalwart.Client()              # local cluster, started if needed
    job = client.submit("job.yaml")
    status = job.wait(timeout=600)          # raises JobFailed if it failed

`Records` answers the same read-only questions from a state dir alone, with no cluster running
(after `stalwart run` ended, or while the cluster is down); the CLI falls back to it.

`HttpClient` has `Client`'s methods over stalwart's REST API, for a machine that reaches the API but
not Ray; `Client(server="http://head:8642", token=...)` hands one out.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterator

from stalwart.errors import ClusterError, JobFailed, JobNotFound, StalwartError
from stalwart.orchestrator import cluster
from stalwart.orchestrator.states import TERMINAL_STATES as TERMINAL
from stalwart.spec import JobSpec

CALL_TIMEOUT_S = 60.0  # how long a call waits for a (re)starting controller before giving up


class _JobsSource:
    """What `Client`, `HttpClient` and `Records` share beyond their calls: `job()` and `with`."""

    def status(self, job_id: str) -> dict:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def job(self, job_id: str) -> "Job":
        self.status(job_id)  # raises JobNotFound
        return Job(self, job_id)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Client(_JobsSource):
    """Lifecycle: construct (connects to Ray, starting a local cluster if allowed, and finds or
    creates the controller); use; `close()` disconnects and stops an in-process cluster it started.

    `address`: host:port, ray://host:port or the dashboard's http://host:8265 (default: RAY_ADDRESS,
    else the local cluster). `start`: 'background' (default; a local cluster that stays up),
    'inprocess' (goes with this process) or 'never' (raise NoCluster if none runs).

    `server`: the URL of stalwart's REST API instead of Ray; the result is then an `HttpClient` (with
    `token`, else STALWART_API_TOKEN, else the token file in `home`).
    """

    def __new__(cls, address: str | None = None, *, server: str | None = None, token: str | None = None, **kwargs):
        if server:
            return HttpClient(server, token=token, home=kwargs.get("home"))
        return super().__new__(cls)

    def __init__(self, address: str | None = None, *, home: str | os.PathLike | None = None,
                 start: str = "background", say=lambda msg: None, server: str | None = None,
                 token: str | None = None):
        # (`server` and `token` are __new__'s: with a server, this is never reached.)
        self.home = cluster.home_dir(home)
        self.how = cluster.connect(address, self.home, start=start, say=say)  # NoCluster before importing Ray
        import ray

        from stalwart.orchestrator.controller import get_or_create_controller

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
                    raise _no_answer(timeout, exc) from None
                time.sleep(0.5)

    @property
    def aio(self) -> "AsyncCalls":
        """The read calls and `cancel` for an event loop, answered without holding a thread while the
        controller works (the REST API's routes): `await client.aio.status(job_id)`."""
        return AsyncCalls(self)

    # ---- jobs ---------------------------------------------------------------------------
    def submit(self, spec: JobSpec | dict | str | os.PathLike, submission_id: str | None = None) -> "Job":
        """Validate `spec` (a JobSpec, a dict, or a YAML path) and queue it. Raises SpecError.

        A `submission_id` makes it idempotent: a submit with an id that an earlier one used gives that
        job (raising SubmissionConflict if its spec was another), never a second one."""
        spec = _as_spec(spec)
        job_id = self._call("submit", spec.to_dict(reveal_secrets=True), submission_id)
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

    def checkpoints(self, job_id: str) -> list[dict]:
        """The job's saved checkpoints, newest first. Raises JobNotFound, StorageError."""
        from stalwart.orchestrator import credentials

        stored = self.job_spec(job_id)
        try:  # a job that runs has its S3 keys kept in the cluster's memory
            s3 = credentials.restore(job_id, stored).checkpoint.s3
        except StalwartError:
            s3 = None
        return _checkpoints(self.status(job_id), stored, s3)

    def close(self) -> None:
        """Disconnect from Ray (stopping an in-process cluster this client started); a Ray connection the
        process had before this client was made is left as it was."""
        import ray

        if self.how != "connected" and ray.is_initialized():
            ray.shutdown()


def _no_answer(timeout: float, exc: BaseException) -> ClusterError:
    return ClusterError(f"the stalwart controller did not answer within {timeout:.0f} s ({type(exc).__name__}); "
                        f"`ray status` shows whether the cluster is up")


class AsyncCalls:
    """`Client`'s calls as coroutines, for one event loop. The same answers and errors, and the same wait
    (up to CALL_TIMEOUT_S) for a controller that Ray is restarting.

    `status` calls that come while one is on its way to the controller wait for it to come back, and
    then go together, in one call (`Controller.statuses`): under many concurrent polls (the REST API's
    clients) the controller and this process pay Ray's cost of a call once per batch, not per poll."""

    def __init__(self, client: Client):
        self._client = client
        self._waiting: list[tuple[str, Any]] = []  # (job id, future) of the status calls not yet sent
        self._sending = False

    async def _call(self, method: str, *args: Any, timeout: float = CALL_TIMEOUT_S) -> Any:
        import asyncio

        from ray.exceptions import RayActorError, RayTaskError

        deadline = time.monotonic() + timeout
        while True:
            try:
                call = getattr(self._client._controller, method).remote(*args)
                if hasattr(asyncio, "timeout"):  # 3.11: no task per call, as wait_for makes
                    async with asyncio.timeout(timeout):
                        return await call
                return await asyncio.wait_for(call, timeout)
            except RayTaskError as exc:
                if isinstance(exc.cause, StalwartError):
                    raise exc.cause from None
                raise
            except (RayActorError, asyncio.TimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise _no_answer(timeout, exc) from None
                await asyncio.sleep(0.5)

    async def jobs(self) -> list[dict]:
        return await self._call("jobs")

    async def status(self, job_id: str) -> dict:
        import asyncio

        future = asyncio.get_running_loop().create_future()
        self._waiting.append((job_id, future))
        if not self._sending:
            self._sending = True
            asyncio.get_running_loop().create_task(self._send_statuses())
        return await future

    async def _send_statuses(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    answers = await self._call("statuses", [job_id for job_id, _ in batch])
                except Exception as exc:  # noqa: BLE001 - each caller gets the error its call would have raised
                    answers = [exc] * len(batch)
                for (job_id, future), answer in zip(batch, answers):
                    if future.done():  # its caller went away
                        continue
                    if isinstance(answer, Exception):
                        future.set_exception(answer)
                    elif answer is None:
                        future.set_exception(JobNotFound(job_id))
                    else:
                        future.set_result(answer)
        finally:
            self._sending = False

    async def events(self, job_id: str, since: int = 0) -> list[dict]:
        return await self._call("events", job_id, since)

    async def metrics(self, job_id: str) -> list[dict]:
        return await self._call("metrics", job_id)

    async def read_logs(self, job_id: str, offset: int = 0) -> tuple[str, int]:
        return tuple(await self._call("logs", job_id, offset))

    async def job_spec(self, job_id: str) -> dict:
        return await self._call("job_spec", job_id)

    async def cancel(self, job_id: str, reason: str = "cancelled by request") -> str:
        return await self._call("cancel", job_id, reason)

    async def metrics_endpoint(self) -> str | None:
        return await self._call("metrics_endpoint")


class Records(_JobsSource):
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

    def checkpoints(self, job_id: str) -> list[dict]:
        """As `Client.checkpoints`; S3 keys given in the spec are not kept, so the AWS chain reads."""
        return _checkpoints(self.status(job_id), self.job_spec(job_id), None)

    def close(self) -> None:
        pass


def _as_spec(spec: JobSpec | dict | str | os.PathLike) -> JobSpec:
    """A JobSpec from a spec, a dict or a YAML path; one that names no folder for its code (neither
    `workdir` nor a runtime_env working_dir) gets this process's working directory."""
    if isinstance(spec, (str, os.PathLike)):
        spec = JobSpec.from_yaml(spec)
    elif isinstance(spec, dict):
        env = spec.get("runtime_env")
        spec = JobSpec.from_dict(spec, workdir=None if isinstance(env, dict) and env.get("working_dir") else os.getcwd())
    if spec.workdir is None and not (spec.runtime_env or {}).get("working_dir"):
        spec = spec.model_copy(update={"workdir": os.getcwd()})
    return spec


def _checkpoints(status: dict, stored_spec: dict, s3) -> list[dict]:
    """The checkpoints under a job's checkpoint URI, as `stalwart checkpoints list` shows them. `s3`:
    the job's S3 options with their keys, or None to take them from the stored spec less its keys."""
    from stalwart.checkpointing.engine import describe, resolve
    from stalwart.spec import MASK, S3Options

    if s3 is None:
        kept = {k: v for k, v in stored_spec["checkpoint"]["s3"].items() if v != MASK}
        kept.pop("access_key_id", None), kept.pop("secret_access_key", None)
        s3 = S3Options.model_validate(kept)
    storage, _ = resolve(status["checkpoint_uri"], s3)
    return describe(storage)


def _mark_stale(status: dict) -> dict:
    if status.get("state") not in TERMINAL:
        status["stale"] = True
    return status


class Job:
    """A handle on one job, through a `Client` (or, read-only, `Records`)."""

    def __init__(self, client: "_JobsSource", job_id: str):
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
        stream = getattr(self.client, "stream_logs", None)
        if stream is not None:  # over HTTP: one streamed response rather than a request per poll
            yield from stream(self.id)
            return
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


class HttpClient(_JobsSource):
    """`Client`'s methods over stalwart's REST API (served by `stalwart up` or `stalwart serve`), for a
    machine that reaches the API but not Ray. `Client(server=URL, token=...)` returns one.

    Lifecycle: construct (asks the server's version: raises ClusterError when none answers within
    CONNECT_WAIT_S, or the token is refused); use; `close()` ends its connections.

    Every call waits out a server that does not answer (it is restarting: it is back within seconds) for
    up to `timeout` seconds, then raises ClusterError. That is safe for a submit too: each submit carries
    a submission id (the caller's, or a new one), so a retried submit never makes a second job. Errors
    come back as the exceptions `Client` raises: JobNotFound, SpecError (TooLarge for a code package over
    the limit), SubmissionConflict, ClusterError.

    `submit` sends the job's code with it: the spec's folder (`workdir`, else the current directory)
    is zipped and travels in the request, and the ranks run from that copy (Ray's runtime_env
    working_dir), so the folder need not exist on the cluster. A spec whose runtime_env already names a
    working_dir is sent as it is.
    """

    live = True
    CONNECT_WAIT_S = 15.0

    def __init__(self, server: str, *, token: str | None = None, home: str | os.PathLike | None = None,
                 timeout: float = CALL_TIMEOUT_S):
        import httpx

        from stalwart.api import protocol

        self.server = server.rstrip("/") if "://" in server else f"http://{server.rstrip('/')}"
        self.home = Path(home or os.environ.get(cluster.HOME_ENV) or "~/.stalwart").expanduser()
        token = token or protocol.read_token(self.home)
        if not token:
            raise ClusterError(f"no token for the stalwart API at {self.server}: set {protocol.TOKEN_ENV} to the "
                               f"server's token (in $STALWART_HOME/{protocol.TOKEN_FILE} where it was started), "
                               f"or put it in {protocol.token_path(self.home)}")
        self.timeout = timeout
        # No read timeout on the whole: a submit with a large package may take a while to send.
        self._http = httpx.Client(base_url=self.server, headers={"Authorization": f"Bearer {token}"},
                                  timeout=httpx.Timeout(60.0, connect=5.0))
        self.controller_info = self._request("GET", "/v1/version", wait=self.CONNECT_WAIT_S).json()

    def _request(self, method: str, path: str, *, wait: float | None = None, **kwargs):
        import httpx

        deadline = time.monotonic() + (self.timeout if wait is None else wait)
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if time.monotonic() > deadline:
                    raise ClusterError(f"the stalwart API at {self.server} did not answer ({type(exc).__name__}: "
                                       f"{exc}); is `stalwart up` or `stalwart serve` running there?") from None
                time.sleep(0.5)
                continue
            if response.status_code == 503 and time.monotonic() < deadline:
                time.sleep(0.5)  # the controller behind it is restarting
                continue
            if response.is_success:
                return response
            raise self._error(response)

    def _error(self, response) -> StalwartError:
        from stalwart.api.protocol import TooLarge
        from stalwart.errors import SpecError, SubmissionConflict

        try:
            body = response.json()
        except ValueError:
            body = {}
        detail = body.get("detail") if isinstance(body.get("detail"), str) else response.text[:500]
        problems = [(p.get("path", ""), p.get("message", "")) for p in body.get("problems") or [] if isinstance(p, dict)]
        code = response.status_code
        if code == 401:
            return ClusterError(f"the stalwart API at {self.server} refused the token: give the one in "
                                f"$STALWART_HOME/api-token where the server was started (STALWART_API_TOKEN)")
        if code == 404 and body.get("job_id"):
            return JobNotFound(body["job_id"])
        if code == 409 and body.get("submission_id"):
            return SubmissionConflict(body["submission_id"], body.get("job_id", "?"))
        if code == 413:
            return TooLarge(problems or [("", detail)])
        if code == 422:
            return SpecError(problems or [("", detail)])
        if code >= 500:
            return ClusterError(f"the stalwart API at {self.server} failed ({code}): {detail}")
        return StalwartError(f"the stalwart API at {self.server} refused the request ({code}): {detail}")

    def _get(self, path: str, **params) -> Any:
        return self._request("GET", path, params=params or None).json()

    @staticmethod
    def _job_path(job_id: str, tail: str = "") -> str:
        from urllib.parse import quote

        return f"/v1/jobs/{quote(job_id, safe='')}{tail}"

    # ---- jobs ---------------------------------------------------------------------------
    def submit(self, spec: JobSpec | dict | str | os.PathLike, submission_id: str | None = None) -> "Job":
        """As `Client.submit`, sending the job's folder along (see the class). Raises SpecError (TooLarge
        when the folder packs to more than STALWART_MAX_PACKAGE_MB), SubmissionConflict, ClusterError."""
        import json
        import uuid

        from stalwart.api import protocol

        spec = _as_spec(spec)
        submission_id = submission_id or uuid.uuid4().hex
        body = json.dumps(spec.to_dict(reveal_secrets=True))
        params = {"submission_id": submission_id}
        if (spec.runtime_env or {}).get("working_dir"):
            response = self._request("POST", "/v1/jobs", params=params, content=body,
                                     headers={"Content-Type": "application/json"})
        else:
            package = protocol.pack(spec.workdir)
            response = self._request("POST", "/v1/jobs", params=params, data={"spec": body},
                                     files={"package": ("code.zip", package, "application/zip")})
        return Job(self, response.json()["id"])

    def jobs(self) -> list[dict]:
        return self._get("/v1/jobs")

    def status(self, job_id: str) -> dict:
        return self._get(self._job_path(job_id))

    def events(self, job_id: str, since: int = 0) -> list[dict]:
        return self._get(self._job_path(job_id, "/events"), since=since)

    def metrics(self, job_id: str) -> list[dict]:
        return self._get(self._job_path(job_id, "/metrics"))

    def read_logs(self, job_id: str, offset: int = 0) -> tuple[str, int]:
        chunk = self._get(self._job_path(job_id, "/logs"), offset=offset)
        return chunk["text"], chunk["offset"]

    def stream_logs(self, job_id: str, offset: int = 0) -> Iterator[str]:
        """The log from `offset` as it grows, until the job ends (one streamed response; a dropped
        connection is picked up again where it stopped)."""
        import codecs

        import httpx

        while True:
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            try:
                with self._http.stream("GET", self._job_path(job_id, "/logs"), params={"offset": offset, "follow": "true"},
                                       timeout=httpx.Timeout(60.0, connect=5.0, read=None)) as response:
                    if not response.is_success:
                        response.read()
                        raise self._error(response)
                    for raw in response.iter_raw():
                        offset += len(raw)
                        text = decoder.decode(raw)
                        if text:
                            yield text
                return
            except httpx.TransportError:
                self._request("GET", "/v1/version")  # waits for the server to come back, or raises

    def job_spec(self, job_id: str) -> dict:
        """The spec the job runs with, secrets masked."""
        return self._get(self._job_path(job_id), spec="true")["spec"]

    def cancel(self, job_id: str, reason: str = "cancelled by request") -> str:
        return self._request("POST", self._job_path(job_id, "/cancel"), json={"reason": reason}).json()["state"]

    def cancel_all(self, reason: str) -> list[str]:
        """Cancel every unfinished job and wait (up to 30 s each) for them to stop; returns their ids."""
        ids = [j["id"] for j in self.jobs() if j["state"] not in TERMINAL]
        for job_id in ids:
            self.cancel(job_id, reason)
        for job_id in ids:
            try:
                Job(self, job_id).wait(timeout=30, raise_on_failure=False)
            except TimeoutError:
                pass  # as over Ray: the cancel stands, the wait is bounded
        return ids

    def metrics_endpoint(self) -> str | None:
        """The controller's Prometheus scrape URL (on the head node), or None if it serves none."""
        return self._get("/v1/version").get("metrics_endpoint")

    def checkpoints(self, job_id: str) -> list[dict]:
        return self._get(self._job_path(job_id, "/checkpoints"))

    def close(self) -> None:
        self._http.close()
