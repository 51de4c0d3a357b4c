"""Admission and durability without Ray: the queue, the fit check, the budget recount, stored status."""

import threading
import time

import pytest

from stalwart.errors import JobNotFound
from stalwart.launchers.gang import GangOutcome
from stalwart.orchestrator.policy import FREE_CAUSES, spends_budget
from stalwart.orchestrator.queue import AdmissionQueue, unfit
from stalwart.orchestrator.store import Store, stored_jobs, stored_status
from stalwart.orchestrator.supervisor import JobSupervisor
from stalwart.spec import JobSpec, Resources


def test_higher_priority_first_then_submit_order():
    q = AdmissionQueue()
    q.add("low-1", 0, submitted=1.0)
    q.add("low-2", 0, submitted=2.0)
    q.add("high", 5, submitted=3.0)
    q.add("low-0", 0, submitted=2.0)  # same submit time as low-2: the order of add() breaks the tie
    assert q.admit("high") is None
    assert q.admit("low-1") == "queued: 1 job(s) ahead (first: high, priority 5)"
    assert q.admit("low-0") == "queued: 3 job(s) ahead (first: high, priority 5)"
    q.remove("high")  # started
    assert q.admit("low-1") is None
    assert q.admit("low-2").startswith("queued: 1 job(s) ahead (first: low-1, priority 0)")
    q.remove("low-1")
    q.remove("low-1")  # twice is harmless
    assert q.admit("low-2") is None and len(q) == 2


def test_a_job_not_queued_is_admitted():
    q = AdmissionQueue()
    q.add("waiting", 9)
    assert q.admit("restarting") is None  # restarts were admitted once already and never queue


def test_each_job_of_many_threads_is_admitted_once_at_the_head():
    q = AdmissionQueue()
    ids = [f"j{i}" for i in range(20)]
    for i, job in enumerate(ids):
        q.add(job, priority=i % 3, submitted=float(i))
    started = []

    def run(job):
        while q.admit(job) is not None:
            time.sleep(0.001)
        started.append(job)
        q.remove(job)

    threads = [threading.Thread(target=run, args=(j,)) for j in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert started == sorted(ids, key=lambda j: (-(int(j[1:]) % 3), int(j[1:])))


def nodes(*cpus_gpus):
    return [{"CPU": c, "GPU": g, "memory": 1e9} if g else {"CPU": c, "memory": 1e9} for c, g in cpus_gpus]


def test_fit_check_refuses_what_no_node_or_the_whole_cluster_cannot_hold():
    two_cpus = nodes((2, 0))
    assert unfit(Resources(workers=2, cpus_per_worker=1), two_cpus) is None
    assert unfit(Resources(workers=2, cpus_per_worker=1, gpus_per_worker=4), two_cpus) == (
        "resources.gpus_per_worker", "each rank needs 4 GPU(s) but no node of this cluster has more than 0")
    path, msg = unfit(Resources(workers=1, cpus_per_worker=3), two_cpus)
    assert path == "resources.cpus_per_worker" and "more than 2" in msg
    path, msg = unfit(Resources(workers=3, cpus_per_worker=1), two_cpus)
    assert path == "resources.workers" and "holds at most 2" in msg
    # Elastic or not, the first start takes the whole gang (only a restart goes on with min_workers).
    assert unfit(Resources(workers=3, min_workers=2, cpus_per_worker=1), two_cpus)[0] == "resources.workers"
    assert unfit(Resources(workers=2, min_workers=1, cpus_per_worker=1), two_cpus) is None
    # Totals, not what is free: a full cluster only makes the job wait. Bundles add up over nodes.
    assert unfit(Resources(workers=4, cpus_per_worker=1, gpus_per_worker=1), nodes((2, 2), (2, 2))) is None
    assert unfit(Resources(workers=10, cpus_per_worker=0.3), nodes((3, 0))) is None  # no float rounding loss


def test_fit_check_wants_cpus_and_gpus_on_one_node():
    split = nodes((4, 0), (0.5, 8))  # the GPUs sit on a node with too few CPUs
    assert unfit(Resources(workers=1, cpus_per_worker=1, gpus_per_worker=1), split)[0] == "resources"
    assert unfit(Resources(workers=1), [])[0] == "resources.cpus_per_worker"


def test_fit_check_takes_a_vanishing_request():
    # Found by the REST API's fuzz: 2 / 5e-324 CPUs is infinite ranks per node, which floor() refuses.
    assert unfit(Resources(workers=4, cpus_per_worker=5e-324), [{"CPU": 2.0}]) is None


def test_only_causes_that_are_faults_spend_budget():
    assert not any(spends_budget(c) for c in FREE_CAUSES)
    assert [c for c in ("succeeded", "cancelled", "controller_restart", "grow", "node_failure", None)
            if spends_budget(c)] == ["node_failure"]


def test_a_new_controller_recounts_the_budget_from_the_store(tmp_path):
    store = Store(tmp_path)
    spec = JobSpec.from_dict({"name": "t", "entrypoint": "a:b"})
    store.add_job("t-1", "t", spec.to_dict(), "RUNNING", {})
    for attempt, cause in enumerate(["node_failure", "grow", "controller_restart", "hang"], start=1):
        store.start_attempt("t-1", attempt, 2, None)
        store.end_attempt("t-1", attempt, cause)
    sup = JobSupervisor("t-1", spec, store, None, lambda *a: None, str(tmp_path / "ck"), first_attempt=5)
    assert dict(sup.policy.spent) == {"node_failure": 1, "hang": 1}


class Gang:
    """Reserves at once when it `fits`; runs until told to finish."""

    made: list = []
    fits = True

    def __init__(self, job_id, attempt, spec, **kwargs):
        self.job_id, self.world_size, self.stopped, self.finish = job_id, spec.resources.workers, False, False
        Gang.made.append(self)

    def reserve(self, timeout):
        time.sleep(0.005)
        return Gang.fits

    def waiting_for(self):
        return "waiting for resources"

    def start(self, plan, sink_for):
        pass

    def poll(self, timeout):
        time.sleep(0.005)
        return GangOutcome(True) if self.finish else None

    def warm_spares(self):
        return 0

    def stop(self, keep=False):
        self.stopped = True


def supervise(tmp_path, store, queue, job_id, priority=0):
    spec = JobSpec.from_dict({"name": "t", "entrypoint": "a:b", "priority": priority})
    store.add_job(job_id, "t", spec.to_dict(), "PENDING", {})
    queue.add(job_id, priority)
    sup = JobSupervisor(job_id, spec, store, Gang, lambda *a: None, str(tmp_path / job_id), queue=queue)
    sup.POLL_S = 0.01
    sup.start()
    return sup


def wait(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.005)


def test_only_the_head_of_the_queue_holds_a_gang(tmp_path):
    Gang.made, Gang.fits = [], False
    store, queue = Store(tmp_path), AdmissionQueue()
    low = supervise(tmp_path, store, queue, "low")
    wait(lambda: [g.job_id for g in Gang.made] == ["low"])  # alone, it heads the queue and reserves
    high = supervise(tmp_path, store, queue, "high", priority=5)
    wait(lambda: Gang.made[0].stopped)  # overtaken: its pending reservation is given up
    wait(lambda: "queued: 1 job(s) ahead (first: high, priority 5)" in store.job("low")["detail"]["reason"])
    assert [g.job_id for g in Gang.made] == ["low", "high"]
    Gang.fits = True
    wait(lambda: high.state.name == "RUNNING")
    wait(lambda: low.state.name == "RUNNING")  # the head started and left the queue: the next one goes
    assert len(queue) == 0
    for gang in Gang.made:
        gang.finish = True
    low.join(5)
    high.join(5)
    assert low.state.name == high.state.name == "SUCCEEDED"


def test_a_cancelled_queued_job_leaves_the_queue(tmp_path):
    Gang.made, Gang.fits = [], False
    store, queue = Store(tmp_path), AdmissionQueue()
    first = supervise(tmp_path, store, queue, "first")
    second = supervise(tmp_path, store, queue, "second")
    wait(lambda: store.job("second")["detail"]["reason"].startswith("queued"))
    wait(lambda: [g.job_id for g in Gang.made] == ["first"])  # the head's gang: made on its own thread
    first.cancel()
    first.join(5)
    wait(lambda: [g.job_id for g in Gang.made] == ["first", "second"])
    second.cancel()
    second.join(5)
    assert len(queue) == 0


def test_stored_status_reads_what_the_supervisor_saved_from_another_store(tmp_path):
    spec = JobSpec.from_dict({"name": "t", "entrypoint": "a:b", "priority": 3})
    store = Store(tmp_path)
    store.add_job("t-1", "t", spec.to_dict(), "SUCCEEDED",
                  {"reason": "", "attempt": 2, "checkpoint_uri": "/ck",
                   "stats": {"step": 40, "loss": 1.5, "last_checkpoint_step": 40, "restarts": {"hang": 1}}})
    reader = Store(tmp_path, readonly=True)  # as another process would open it, the controller still there
    status = stored_status(reader, "t-1")
    assert (status["state"], status["step"], status["loss"], status["last_checkpoint_step"]) == ("SUCCEEDED", 40, 1.5, 40)
    assert status["attempt"] == 2 and status["priority"] == 3 and status["restarts"] == {"hang": 1}
    assert status["attempts"] == [] and status["log_path"].endswith("t-1/output.log")
    (row,) = stored_jobs(reader)
    assert (row["id"], row["step"], row["loss"], row["attempt"], row["priority"]) == ("t-1", 40, 1.5, 2, 3)
    assert not (tmp_path / "jobs" / "t-1").exists()  # a reader creates nothing
    with pytest.raises(JobNotFound):
        stored_status(reader, "nope")
    with pytest.raises(FileNotFoundError):
        Store(tmp_path / "elsewhere", readonly=True)
    assert not (tmp_path / "elsewhere").exists()


def test_a_resumed_supervisor_starts_from_the_saved_figures(tmp_path):
    spec = JobSpec.from_dict({"name": "t", "entrypoint": "a:b", "checkpoint": {"resume_from": "/seed"}})
    store = Store(tmp_path)
    store.add_job("t-1", "t", spec.to_dict(), "RUNNING",
                  {"stats": {"step": 17, "loss": "nan", "max_steps": 40, "last_checkpoint": "/ck/10",
                             "last_checkpoint_step": 10}})
    sup = JobSupervisor("t-1", spec, store, Gang, lambda *a: None, "/ck", first_attempt=2)
    status = sup.status()
    assert (status["step"], status["loss"], status["max_steps"], status["last_checkpoint_step"]) == (17, None, 40, 10)
    assert sup._attempt_plan(sup.state.rewind).resume_from is None  # it has checkpoints of its own now
