"""End to end with real Ray: submit, train, fail, cancel, queue."""

import json

import pytest
import ray

from jobspecs import job_spec, tiny_gpt_spec, wait_for
from stalwart.errors import JobFailed, SpecError
from stalwart.orchestrator.store import Store, stored_jobs, stored_status




def test_tiny_gpt_trains_to_success_with_falling_loss(client):
    job = client.submit(tiny_gpt_spec(steps=60))
    status = job.wait(timeout=240)
    assert status["state"] == "SUCCEEDED"
    metrics = job.metrics()
    losses = [m["loss"] for m in metrics]
    assert len(losses) == 60
    assert losses[0] > 5.0  # byte-level: starts near ln 256
    assert sum(losses[-10:]) / 10 < 0.7 * losses[0]
    assert status["last_checkpoint_step"] == 60
    kinds = [e["kind"] for e in job.events()]
    assert "attempt_started" in kinds and "checkpoint_committed" in kinds
    assert "parameters" in job.logs()


def test_failing_user_function_ends_failed_with_traceback(client):
    job = client.submit(job_spec("testjobs:linear", {"steps": 50, "fail_step": 5, "fail_rank": 1}))
    with pytest.raises(JobFailed) as exc:
        job.wait(timeout=120)
    status = job.status()
    assert status["state"] == "FAILED"
    assert status["rank"] == 1 and status["cause"] == "user_error"
    assert "ValueError: boom at step 5" in status["traceback"]
    assert "boom at step 5" in job.logs()
    assert "not retried" in str(exc.value)


def test_a_rank_that_returns_early_fails_the_job_once_saying_so(client):
    # Its peers wait for it in their next collective: not a hang, not a lost node, and a restart would
    # only do it again. Before, such a job ran 7 attempts through the hang and node budgets.
    job = client.submit(job_spec("testjobs:linear", {"steps": 30, "return_at": 12, "sleep": 0.05}))
    status = job.wait(timeout=300, raise_on_failure=False)
    assert status["state"] == "FAILED" and len(status["attempts"]) == 1 and not status["restarts"], status
    assert "rank 1's function returned after step 11 of 30 while rank(s) [0] went on" in status["reason"]
    assert status["attempts"][0]["cause"] == "user_error"


def test_cancel_mid_run_releases_everything(client):
    from typer.testing import CliRunner

    from stalwart.cli import app

    job = client.submit(job_spec("testjobs:linear", {"steps": 10_000, "sleep": 0.05}))
    wait_for(lambda: (job.status().get("step") or 0) > 3, timeout=90)
    # `stalwart cancel JOB --json`, through this process's connection to the cluster.
    result = CliRunner().invoke(app, ["cancel", job.id, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"id": job.id, "state": "CANCELLED"}
    status = job.wait(timeout=60)
    assert status["state"] == "CANCELLED"
    assert status["attempts"][-1]["cause"] == "cancelled"
    # The gang's CPUs come back: no placement group or worker is left behind.
    wait_for(lambda: ray.available_resources().get("CPU", 0) >= 2, timeout=30)


@pytest.mark.slow  # the priority test below covers a job waiting for another
def test_second_job_waits_for_resources_then_runs(client):
    first = client.submit(job_spec("testjobs:linear", {"steps": 40, "sleep": 0.1}))
    wait_for(lambda: first.status()["state"] == "RUNNING", timeout=60)
    second = client.submit(job_spec("testjobs:linear", {"steps": 5}))
    pending = wait_for(lambda: (s := second.status())["state"] == "PENDING" and "waiting for resources" in
                       s.get("reason", "") and s, timeout=30)
    assert "CPU" in pending["reason"]
    assert first.wait(timeout=120)["state"] == "SUCCEEDED"
    assert second.wait(timeout=120)["state"] == "SUCCEEDED"
    assert second.status()["attempts"][0]["started"] >= first.status()["attempts"][0]["ended"] - 1


@pytest.mark.slow  # 26 s; the admission queue's unit tests cover the order
def test_waiting_jobs_hold_no_placement_group_and_start_by_priority(client):
    blocker = client.submit(job_spec("testjobs:linear", {"steps": 80, "sleep": 0.1}))
    wait_for(lambda: blocker.status()["state"] == "RUNNING", timeout=60)
    low = client.submit(job_spec("testjobs:linear", {"steps": 5}))
    high = client.submit(job_spec("testjobs:linear", {"steps": 5}, priority=5))
    queued = wait_for(lambda: "queued: " in (s := low.status())["reason"] and s, timeout=30)
    assert queued["state"] == "PENDING" and f"1 job(s) ahead (first: {high.id}, priority 5)" in queued["reason"]
    wait_for(lambda: "waiting for resources" in high.status()["reason"], timeout=30)

    def pending_groups() -> set[str]:
        return {pg["name"] for pg in ray.util.placement_group_table().values() if pg["state"] == "PENDING"}

    # Only the head of the queue holds a placement group (low's, made while it was alone, is gone).
    wait_for(lambda: pending_groups() == {f"stalwart-{high.id}-1"}, timeout=10, what="only the head's group pending")
    assert blocker.wait(timeout=120)["state"] == "SUCCEEDED"
    high_status, low_status = high.wait(timeout=120), low.wait(timeout=120)
    assert low_status["attempts"][0]["started"] >= high_status["attempts"][0]["ended"] - 1


def test_a_job_that_can_never_fit_is_refused_at_submit(client):
    before = len(client.jobs())
    with pytest.raises(SpecError, match=r"resources.gpus_per_worker: each rank needs 64 GPU"):
        client.submit(job_spec("testjobs:linear", resources={"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 64}))
    with pytest.raises(SpecError, match=r"resources.workers: .* holds at most 2"):
        client.submit(job_spec("testjobs:linear", workers=3))
    assert len(client.jobs()) == before


def test_a_finished_job_keeps_its_figures_for_another_process(client, ray_local):
    job = client.submit(job_spec("testjobs:linear", {"steps": 30}, checkpoint={"every_steps": 10}))
    assert job.wait(timeout=120)["state"] == "SUCCEEDED"
    stored = stored_status(Store(ray_local, readonly=True), job.id)  # as `stalwart status` would, no cluster
    assert stored["state"] == "SUCCEEDED" and stored["step"] == 30 and stored["max_steps"] == 30
    assert isinstance(stored["loss"], float) and stored["last_checkpoint_step"] == 30
    assert stored["tokens_per_s"] and stored["restarts"] == {}
    (row,) = [r for r in stored_jobs(Store(ray_local, readonly=True)) if r["id"] == job.id]
    assert row["step"] == 30 and row["loss"] == stored["loss"]


def test_bad_spec_is_refused_and_nothing_is_recorded(client):
    before = len(client.jobs())
    with pytest.raises(SpecError, match="resources.workers"):
        client.submit({"name": "x", "entrypoint": "a:b", "resources": {"workers": -1}})
    assert len(client.jobs()) == before


def test_unwritable_checkpoint_dir_is_refused_at_submit(client, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    import os
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("x")
        uri = str(blocker / "sub")  # a path under a regular file cannot be created, even by root
    else:
        uri = str(ro / "ck")
    with pytest.raises(SpecError, match="checkpoint.uri"):
        client.submit(job_spec("testjobs:linear", checkpoint={"uri": uri}))


@pytest.mark.slow  # 10 s, three jobs; what it guards is speed (Ray's niceness 15 slows the ranks), not results
def test_ranks_run_at_the_niceness_the_spec_asks_not_rays(client):
    def nice_values(resources: dict) -> tuple[list[str], str]:
        job = client.submit(job_spec("testjobs:niceness", resources={"workers": 2, "cpus_per_worker": 1, **resources}))
        assert job.wait(timeout=120)["state"] == "SUCCEEDED"
        logs = job.logs()
        return sorted(line.split("niceness=")[1].split()[0] for line in logs.splitlines() if "niceness=" in line), logs

    rays = nice_values({"niceness": None})[0]  # null: what Ray gave its workers (15 unless configured)
    assert len(set(rays)) == 1
    values, logs = nice_values({})  # default 0: a plain process's
    if values == ["0", "0"]:
        assert "CAP_SYS_NICE" not in logs
    else:  # not allowed to lower it here (no root or CAP_SYS_NICE): Ray's, and rank 0 says why
        assert values == rays and "needs root or CAP_SYS_NICE" in logs
    assert nice_values({"niceness": 19})[0] == ["19", "19"]  # raising it needs no privilege
