"""NaN, loss spikes, hangs and a killed controller, caused for real in running jobs."""

import time

import pytest
import ray

from jobspecs import stopped, tiny_gpt_spec
from jobspecs import wait_for
from test_recovery import assert_bitwise_equal, final_state


def run(client, spec, timeout=300):
    job = client.submit(spec)
    return job, job.wait(timeout=timeout)


def faults(job):
    return [e for e in job.events() if e["kind"] == "fault"]


@pytest.mark.parametrize("fault,steps,cause,memory", [
    # The NaN variant is `slow`: test_nan_in_the_last_step covers a NaN's rollback in the default run.
    pytest.param({"kind": "nan", "step": 45}, 60, "nan", None, marks=pytest.mark.slow, id="nan"),
    pytest.param({"kind": "spike", "step": 40, "factor": 3.0, "length": 10}, 60, "loss_spike", None, id="spike"),
    # In-memory snapshots every step are all newer than the rollback's target: storage it is.
    pytest.param({"kind": "nan", "step": 45}, 60, "nan", 1, id="nan-with-memory-snapshots", marks=pytest.mark.slow),
])
def test_rollback_and_skip_matches_a_run_fed_the_same_data(client, fault, steps, cause, memory):
    ft = {"skip_batches": 5, "budgets": {cause: 1}, "spike_warmup_steps": 25}
    # keep_last=5: the detection must find the pre-onset checkpoint even on a loaded test machine.
    ckpt = {"every_steps": 10, "keep_last": 5, **({"memory_every_steps": memory} if memory else {})}
    job, status = run(client, tiny_gpt_spec(steps=steps, checkpoint=ckpt, faults=[fault], fault_tolerance=ft))
    assert status["state"] == "SUCCEEDED"
    assert status["restarts"] == {cause: 1}
    (event,) = faults(job)
    onset = event["data"]["onset_step"] or event["data"]["step"]
    assert fault["step"] <= onset <= event["data"]["step"] <= fault["step"] + 5
    target = event["data"]["rollback_to"]
    assert target == ((onset - 1) // 10) * 10  # the newest checkpoint from before the onset
    skip = event["data"]["skip"]
    assert skip == [[target, event["data"]["step"] + 5]]
    restored = [e for e in job.events() if e["kind"] == "restored"]
    assert restored[0]["data"]["step"] == target
    assert restored[0]["data"]["tier"] == "storage"
    # The undisturbed run, told to skip the same batches, ends in exactly the same state.
    _, baseline = run(client, tiny_gpt_spec(steps=steps, checkpoint={"every_steps": 10}, data={"skip": skip}))
    assert_bitwise_equal(final_state(status, steps), final_state(baseline, steps))


def test_nan_in_the_last_step_is_not_a_success(client):
    # The last step's report lands before the ranks' results: the job must not end SUCCEEDED on it.
    job, status = run(client, tiny_gpt_spec(steps=30, checkpoint={"every_steps": 10},
                                            faults=[{"kind": "nan", "step": 30}],
                                            fault_tolerance={"skip_batches": 5, "budgets": {"nan": 1}}))
    assert status["state"] == "SUCCEEDED" and status["restarts"] == {"nan": 1}, status
    (event,) = faults(job)
    assert event["data"]["step"] == 30 and event["data"]["rollback_to"] == 20


def test_sigstop_of_a_rank_is_a_hang_with_stacks(client):
    spec = tiny_gpt_spec(steps=40, checkpoint={"every_steps": 10}, fault_tolerance={"hang_timeout_s": 4})
    job = client.submit(spec)
    status = wait_for(lambda: (s := job.status()).get("step", 0) >= 13 and s.get("ranks") and s)
    with stopped(status["ranks"][1]["pid"]):
        final = job.wait(timeout=300)
    assert final["state"] == "SUCCEEDED"
    assert final["restarts"] == {"hang": 1}
    (event,) = faults(job)
    assert 1 in event["data"]["stalled_ranks"]
    assert "no answer" in event["data"]["stacks"]["1"]  # a stopped process cannot show its stack
    assert "train.py" in event["data"]["stacks"]["0"]  # rank 0 waits for rank 1 inside the step
    assert 0 <= event["data"]["detection_latency_s"] < 3
    assert_bitwise_equal(final_state(final, 40), final_state(client.submit(
        tiny_gpt_spec(steps=40, checkpoint={"every_steps": 10})).wait(timeout=300), 40))


@pytest.mark.slow  # the SIGSTOP test above covers hang detection; this one the injected fault
def test_injected_hang_reports_where_it_hangs(client):
    spec = tiny_gpt_spec(steps=30, checkpoint={"every_steps": 10}, fault_tolerance={"hang_timeout_s": 3},
                         faults=[{"kind": "hang", "rank": 0, "step": 15}])
    job, status = run(client, spec)
    assert status["state"] == "SUCCEEDED" and status["restarts"] == {"hang": 1}
    stacks = faults(job)[0]["data"]["stacks"]
    assert "_inject" in stacks["0"]


def test_a_stopped_controller_is_not_a_hang(client):
    # The controller's process stands still (SIGSTOP here; swapped out, starved by its host on a bad day)
    # for longer than the hang timeout, while the ranks train to their end and give up waiting for it
    # to take their last reports (FINAL_REPORT_WAIT_S). When it runs again, no rank may look hung for
    # the time it stood still, and the job's figures are its last step's.
    from stalwart.orchestrator.controller import FINAL_REPORT_WAIT_S

    job = client.submit(tiny_gpt_spec(steps=100, checkpoint={"every_steps": 50}, fault_tolerance={"hang_timeout_s": 4}))
    wait_for(lambda: job.status().get("step", 0) >= 80)
    controller = ray.get(ray.get_actor("stalwart-controller", namespace="stalwart").ping.remote())["pid"]
    with stopped(controller):
        time.sleep(FINAL_REPORT_WAIT_S + 3)
    status = job.wait(timeout=300)
    assert status["state"] == "SUCCEEDED" and not status["restarts"], faults(job)
    assert status["step"] == 100 and status["last_checkpoint_step"] == 100


@pytest.mark.slow  # 20 s; test_secrets kills the controller mid-run too, and asserts the resumed figures
def test_controller_killed_mid_run(client):
    job = client.submit(tiny_gpt_spec(steps=40, checkpoint={"every_steps": 10}))
    wait_for(lambda: (s := job.status()).get("step", 0) >= 15 and (s.get("last_checkpoint_step") or 0) >= 10)
    controller = ray.get_actor("stalwart-controller", namespace="stalwart")
    ray.kill(controller, no_restart=False)
    # The new controller carries on from the figures the old one saved, not from step 0.
    resumed = wait_for(lambda: (s := job.status())["attempts"][0]["cause"] == "controller_restart" and s)
    assert resumed["step"] >= 10 and resumed["last_checkpoint_step"] >= 10
    status = job.wait(timeout=300)
    assert status["state"] == "SUCCEEDED"
    causes = [a["cause"] for a in status["attempts"]]
    assert causes[0] == "controller_restart" and causes[-1] == "succeeded"
    assert not status["restarts"]  # a controller restart spends no budget
    assert final_state(status, 40)


@pytest.mark.slow  # 33 s (two runs); test_recovery's two kills in a row cover a fault during a recovery
def test_two_faults_in_a_row(client):
    spec = tiny_gpt_spec(steps=40, checkpoint={"every_steps": 10},
                         faults=[{"kind": "kill", "rank": 0, "step": 15, "attempt": 1},
                                 {"kind": "kill", "rank": 1, "step": 25, "attempt": 2}])
    job, status = run(client, spec)
    assert status["state"] == "SUCCEEDED"
    assert status["restarts"] == {"node_failure": 2}
    assert_bitwise_equal(final_state(status, 40), final_state(client.submit(
        tiny_gpt_spec(steps=40, checkpoint={"every_steps": 10})).wait(timeout=300), 40))


@pytest.mark.slow  # 13 s; test_detectors covers the rule on scripted per-rank times
def test_straggler_is_reported_without_a_restart(client):
    spec = tiny_gpt_spec(steps=50, checkpoint={"every_steps": 10},
                         faults=[{"kind": "slow", "rank": 1, "step": 10, "length": 25, "factor": 4}])
    job, status = run(client, spec)
    assert status["state"] == "SUCCEEDED" and not status["restarts"]
    events = [e for e in job.events() if e["kind"] in ("straggler", "straggler_recovered")]
    assert [(e["kind"], e["data"]["rank"]) for e in events][:2] == [("straggler", 1), ("straggler_recovered", 1)]
    assert events[0]["data"]["ratio"] > 1.5


@pytest.mark.slow  # 26 s; trend's unit tests cover the rule, the rollback path is the spike test's
def test_creeping_loss_is_rolled_back_as_a_divergence(client):
    # From step 120 the reported loss creeps up linearly to 2x over 150 steps and the grad norm grows
    # (its 4th power): no single step stands out, so only the trend detector can see it.
    drift = {"kind": "drift", "step": 120, "factor": 2.0, "length": 150}
    ft = {"skip_batches": 5, "budgets": {"divergence": 1}, "trend_warmup_steps": 60}
    job, status = run(client, tiny_gpt_spec(steps=300, checkpoint={"every_steps": 10, "keep_last": 30},
                                            faults=[drift], fault_tolerance=ft), timeout=600)
    assert status["state"] == "SUCCEEDED", status
    assert status["restarts"] == {"divergence": 1}
    (event,) = faults(job)
    data = event["data"]
    assert data["cause"] == "divergence" and data["grad_ratio"] > 1.2
    assert drift["step"] <= data["step"] <= drift["step"] + 100  # caught within 100 steps of the onset
    assert drift["step"] - 40 <= data["onset_step"] <= drift["step"] + 25
    assert data["rollback_to"] < data["onset_step"] and data["rollback_to"] % 10 == 0
    assert data["skip"] == [[data["rollback_to"], data["step"] + 5]]
    restored = [e for e in job.events() if e["kind"] == "restored"]
    assert restored[0]["data"]["step"] == data["rollback_to"]
    assert status["step"] == 300
