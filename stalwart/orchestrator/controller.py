"""The controller: a detached, named Ray actor that owns every job's supervisor and records.

It is a threaded actor: queries, cancels and the ranks' report stream are served while the
supervisors' threads run the jobs. If the actor dies, Ray restarts it; the new one reads the store
and starts a new attempt of every job that was not finished (spending no fault budget).
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time

import ray

from stalwart.checkpointing.storage import open_storage
from stalwart.errors import JobNotFound, SpecError, StalwartError, StorageError, SubmissionConflict
from stalwart.launchers.gang import RayGang
from stalwart.launchers.niceness import set_niceness
from stalwart.monitoring.metrics import JobsCollector, start_exporter
from stalwart.monitoring.sinks import Trackers, trackers_for
from stalwart.orchestrator import credentials
from stalwart.orchestrator.cluster import NAMESPACE, home_dir
from stalwart.orchestrator.queue import AdmissionQueue, unfit
from stalwart.orchestrator.states import TERMINAL_STATES
from stalwart.orchestrator.store import SUMMARY_KEYS, Store, stored_jobs, stored_status
from stalwart.orchestrator.supervisor import JobSupervisor
from stalwart.spec import JobSpec

CONTROLLER_NAME = "stalwart-controller"
TERMINAL = TERMINAL_STATES


class _Sink:
    """A rank's report stream to the controller (it travels to the rank and is called there).

    Fire and forget: a training rank never waits for the controller's answer. Only a rank's final
    batch, sent once its work is done, is waited for (briefly), together with every batch still in
    flight: the controller is a threaded actor, which may run an earlier push after a later one, and
    all of them (a last checkpoint's commit, say) must land before the rank's result.
    """

    def __init__(self, controller, job_id: str, attempt: int, rank: int):
        self.controller, self.job_id, self.attempt, self.rank = controller, job_id, attempt, rank
        self._inflight: list = []

    def __call__(self, batch: dict) -> None:
        ref = self.controller.push.remote(self.job_id, self.attempt, self.rank, batch)
        if batch.get("final"):
            pending = self._inflight + [ref]
            ray.wait(pending, num_returns=len(pending), timeout=FINAL_REPORT_WAIT_S)
            self._inflight = []
            return
        self._inflight.append(ref)
        if len(self._inflight) > 64:  # keep only those not yet done (a cheap, non-blocking check)
            self._inflight = ray.wait(self._inflight, num_returns=len(self._inflight), timeout=0)[1]


# How long a finished rank waits for the controller to take its last reports.
FINAL_REPORT_WAIT_S = 10.0
# How old the nodes' resources that a submit's fit check uses may be.
NODES_TTL_S = 2.0


class Controller:
    def __init__(self, home: str | None):
        # The controller detects faults and must not queue behind the ranks (now at 0) for a core.
        set_niceness(0, all_threads=True)
        self.home = home_dir(home)  # None: this node's STALWART_HOME, else ~/.stalwart
        self.store = Store(self.home)
        self.supervisors: dict[str, JobSupervisor] = {}
        self.queue = AdmissionQueue()  # jobs waiting for their first start; their supervisors ask it
        self._self = None
        self._recording = threading.Lock()  # one submission id, one job: its check and its record go together
        self._nodes: tuple[float, list[dict]] | None = None  # (when, each alive node's resources)

        def snapshot() -> list[dict]:  # what a Prometheus scrape sees: live jobs, and jobs ended < 1 h ago
            since = time.time() - 3600
            return [self.status(j["id"]) for j in self.store.jobs()
                    if j["state"] not in TERMINAL or j["updated"] >= since]

        # Prometheus metrics on 127.0.0.1:$STALWART_METRICS_PORT (default 9464, 0 = any; a taken port falls back).
        self._metrics_server, self._metrics_port = start_exporter(JobsCollector(snapshot), "127.0.0.1")
        self._resume_unfinished()
        threading.Thread(target=_settle, name="controller-settle", daemon=True).start()

    def _handle(self):
        if self._self is None:
            self._self = ray.get_runtime_context().current_actor
        return self._self

    def _sink(self, job_id: str, attempt: int, rank: int):
        return _Sink(self._handle(), job_id, attempt, rank)

    def _supervise(self, job_id: str, spec: JobSpec, checkpoint_uri: str, **kwargs) -> JobSupervisor:
        trackers = self._trackers(job_id, spec)
        # RayGang takes exclude_nodes (quarantined nodes) from the supervisor.
        sup = JobSupervisor(job_id, spec, self.store, RayGang, self._sink, checkpoint_uri, queue=self.queue,
                            trackers=trackers, **kwargs)
        self.supervisors[job_id] = sup
        sup.start()
        if spec.secrets() or trackers is not None:
            threading.Thread(target=self._when_done, args=(sup,), daemon=True, name=f"done-{job_id}").start()
        return sup

    def _trackers(self, job_id: str, spec: JobSpec) -> Trackers | None:
        """The job's experiment trackers, started (they open on their own thread), continuing the runs
        that an earlier controller opened for this job; None when the spec asks for none."""
        trackers = trackers_for(spec, job_id, self.store.job_dir(job_id))
        if trackers is None:
            return None
        job = self.store.job(job_id) or {}
        return trackers.start(
            job.get("detail", {}).get("trackers"),
            on_open=lambda resume: self.store.update_detail(job_id, trackers=resume),
            # Straight to the store: an event about the trackers is not handed to them.
            on_problem=lambda message: self.store.add_event(job_id, "tracker_error", message, None))

    @staticmethod
    def _when_done(sup: JobSupervisor) -> None:
        sup.join()
        # A finished job is never resumed, so the cluster need not hold its secrets any longer.
        if sup.spec.secrets():
            credentials.forget(sup.job_id)
        # Its trackers closed as it ended (JobRecord.state); this covers a supervisor that stopped without an end.
        sup.record.close()

    def _resume_unfinished(self) -> None:
        # The queue first, whole, so that no job heads it only because the one before it was not added yet.
        for job in self.store.jobs():
            if job["state"] not in TERMINAL and not self.store.attempts(job["id"]):
                self.queue.add(job["id"], job["spec"].get("priority", 0), job["created"])
        for job in self.store.jobs():
            if job["state"] in TERMINAL:
                continue
            attempts = self.store.attempts(job["id"])
            last = attempts[-1]["attempt"] if attempts else 0
            if attempts:
                self.store.end_attempt(job["id"], last, "controller_restart", "the controller restarted")
            try:
                spec = credentials.restore(job["id"], job["spec"])  # the store has the secrets masked
            except SpecError as exc:
                self._cannot_resume(job, last, exc)
                continue
            self._supervise(job["id"], spec, job["detail"].get("checkpoint_uri") or self._default_uri(job["id"]),
                            first_attempt=last + 1, reason="controller restarted: waiting for resources",
                            resumed_cause="a controller restart" if attempts else None)

    def _cannot_resume(self, job: dict, attempt: int, exc: SpecError) -> None:
        # The job ends FAILED and says why, rather than the controller failing to start over one job.
        reason = "cannot resume after a restart: " + "; ".join(f"{path}: {msg}" for path, msg in exc.problems)
        self.store.set_state(job["id"], "FAILED", {**job["detail"], "reason": reason, "error": reason,
                                                   "attempt": attempt})
        self.store.add_event(job["id"], "state", f"FAILED: {reason}", attempt, state="FAILED")
        self.queue.remove(job["id"])
        credentials.forget(job["id"])

    def _default_uri(self, job_id: str) -> str:
        return str(self.home / "checkpoints" / job_id)

    # ---- API --------------------------------------------------------------------------
    def ping(self) -> dict:
        return {"home": str(self.home), "pid": os.getpid(), "jobs": len(self.supervisors)}

    def submit(self, spec_dict: dict, submission_id: str | None = None) -> str:
        """Validate, prove the checkpoint storage works, record, queue. Raises SpecError or StorageError.

        With a `submission_id` (the client's, for retries), a submit that an earlier one with the same
        id recorded gives that job's id and changes nothing; with another spec it raises SubmissionConflict.
        """
        spec = JobSpec.from_dict(spec_dict)
        if submission_id is not None and (known := self._submitted(submission_id, spec)):
            return known
        # One that can never fit would wait forever (and, heading the queue, hold up every job behind it).
        problem = unfit(spec.resources, self._node_resources())
        if problem is not None:  # refused only on the nodes as they are now
            problem = unfit(spec.resources, self._node_resources(fresh=True))
        if problem is not None:
            raise SpecError([problem])
        job_id = f"{spec.name}-{secrets.token_hex(3)}"
        uri = spec.checkpoint.uri or self._default_uri(job_id)
        try:
            open_storage(uri, spec.checkpoint.s3).check()
            if spec.checkpoint.resume_from:
                from stalwart.checkpointing.engine import committed_steps, resolve

                storage, step = resolve(spec.checkpoint.resume_from, spec.checkpoint.s3)
                if step is None and not committed_steps(storage):
                    raise SpecError([("checkpoint.resume_from", _no_checkpoint(spec.checkpoint.resume_from))])
        except StorageError as exc:
            raise SpecError([("checkpoint.uri", str(exc))]) from None
        if spec.checkpoint.init_from:
            from stalwart.checkpointing.formats import check_weights

            try:
                check_weights(spec.checkpoint.init_from)
            except StalwartError as exc:
                raise SpecError([("checkpoint.init_from", str(exc))]) from None
        with self._recording:
            if submission_id is not None and (known := self._submitted(submission_id, spec)):
                return known  # a retry that raced the first submit
            # The store (on disk) gets the spec with its secrets masked; the cluster's memory, their values.
            credentials.keep(job_id, spec)
            self.store.add_job(job_id, spec.name, spec.to_dict(), "PENDING", {"checkpoint_uri": uri},
                               submission_id=submission_id)
        self.store.add_event(job_id, "submitted", f"submitted; checkpoints at {uri}", 0)
        self.queue.add(job_id, spec.priority)
        self._supervise(job_id, spec, uri)
        return job_id

    def _node_resources(self, fresh: bool = False) -> list[dict]:
        """Each alive node's total resources, as Ray's node table had them at most NODES_TTL_S ago: the
        table is a few ms to fetch, and a burst of submissions needs it once, not once each. A refusal
        asks again with `fresh` (a node that joined a moment ago counts); an acceptance on a node that
        left a moment ago is a job that waits, as one submitted just before the node went."""
        now = time.monotonic()
        if fresh or self._nodes is None or now - self._nodes[0] > NODES_TTL_S:
            self._nodes = (now, [n["Resources"] for n in ray.nodes() if n.get("Alive")])
        return self._nodes[1]

    def _submitted(self, submission_id: str, spec: JobSpec) -> str | None:
        job = self.store.job_by_submission(submission_id)
        if job is None:
            return None
        if job["spec"] != json.loads(json.dumps(spec.to_dict())):  # as stored: masked, through JSON
            raise SubmissionConflict(submission_id, job["id"])
        return job["id"]

    def status(self, job_id: str) -> dict:
        out = stored_status(self.store, job_id)
        sup = self.supervisors.get(job_id)
        if sup is not None:
            # Newer than the figures it last saved; a resumed supervisor has no rate of its own yet.
            out.update({k: v for k, v in sup.status().items() if v is not None or k not in out})
        return out

    def statuses(self, job_ids: list[str]) -> list[dict | None]:
        """`status` of each job (None for one it does not know), in one call: the REST API answers the
        status polls that arrive together with one trip here, not one each."""
        out: list[dict | None] = []
        for job_id in job_ids:
            try:
                out.append(self.status(job_id))
            except JobNotFound:
                out.append(None)
        return out

    def job_spec(self, job_id: str) -> dict:
        job = self.store.job(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job["spec"]  # as stored: secrets masked

    def jobs(self) -> list[dict]:
        rows = stored_jobs(self.store)
        for row in rows:
            sup = self.supervisors.get(row["id"])
            if sup is not None:
                s = sup.status()
                row.update({k: s[k] for k in SUMMARY_KEYS if k in s and (s[k] is not None or k not in row)})
        return rows

    def events(self, job_id: str, since: int = 0) -> list[dict]:
        if self.store.job(job_id) is None:
            raise JobNotFound(job_id)
        return self.store.events(job_id, since)

    def logs(self, job_id: str, offset: int = 0) -> tuple[str, int]:
        if self.store.job(job_id) is None:
            raise JobNotFound(job_id)
        return self.store.read_log(job_id, offset)

    def metrics(self, job_id: str) -> list[dict]:
        if self.store.job(job_id) is None:
            raise JobNotFound(job_id)
        return self.store.read_metrics(job_id)

    def cancel(self, job_id: str, reason: str = "cancelled by request") -> str:
        job = self.store.job(job_id)
        if job is None:
            raise JobNotFound(job_id)
        if job["state"] in TERMINAL:
            return job["state"]
        sup = self.supervisors.get(job_id)
        if sup is not None:
            sup.cancel(reason)
        return "CANCELLING"

    def push(self, job_id: str, attempt: int, rank: int, batch: dict) -> None:
        sup = self.supervisors.get(job_id)
        if sup is not None:
            sup.on_report(attempt, rank, batch)

    def metrics_endpoint(self) -> str | None:
        """The Prometheus scrape URL of this controller's metrics, or None if none could be served."""
        return f"http://127.0.0.1:{self._metrics_port}/metrics" if self._metrics_port else None

    def cancel_all(self, reason: str) -> list[str]:
        ids = [j for j, s in self.supervisors.items() if not s.state.terminal]
        for job_id in ids:
            self.supervisors[job_id].cancel(reason)
        for job_id in ids:
            self.supervisors[job_id].join(timeout=30)
        return ids


def _no_checkpoint(uri: str) -> str:
    """Why `uri` cannot be resumed from, and, when it holds weights in a standard format, what can."""
    from stalwart.checkpointing.formats import detect

    fmt = None if "://" in uri and not uri.startswith("file://") else detect(uri)
    if fmt is not None:
        return (f"{uri} holds {fmt} weights, not a stalwart checkpoint: start from them with checkpoint.init_from "
                "(--init-from), which loads the weights at step 0 with a fresh optimizer")
    return f"no committed checkpoint under {uri}"


def _settle() -> None:
    """Import what the jobs' supervisors will (torch, through the checkpoint engine), then freeze what
    the garbage collector has seen so far. Its full collections then pass over the jobs' objects only,
    not the few hundred thousand that the imports made: such a pass stopped the controller, and every
    call to it, for about 150 ms (about 55 ms after the freeze) with 1,000 jobs queued."""
    import gc

    try:
        import stalwart.checkpointing.engine  # noqa: F401
    except Exception:  # noqa: BLE001 - only a warm-up: the supervisors import it again and report errors
        return
    gc.collect()
    gc.freeze()


RemoteController = ray.remote(Controller)


def get_or_create_controller(home: str | None):
    """The controller of the connected cluster, created (detached, named) if it does not exist."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On the head node: worker nodes come and go, and the controller should not go with them. Not
    # softly: Ray then spills it to a worker node now and then (seen with a head of 0 CPUs), and the
    # head going means the cluster going anyway.
    here = NodeAffinitySchedulingStrategy(node_id=_head_node_id(), soft=False)
    return RemoteController.options(
        name=CONTROLLER_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        num_cpus=0, max_concurrency=64, max_restarts=-1, scheduling_strategy=here,
    ).remote(home)


def _head_node_id() -> str:
    """The head node's id (it holds Ray's own services), else the node this process runs on."""
    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
            return node["NodeID"]
    return ray.get_runtime_context().get_node_id()
