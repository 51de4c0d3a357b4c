"""Faults caused for real: each time the job must SUCCEED with the same final state as an undisturbed run."""

import os
import signal
import time

import pytest
import torch

from jobspecs import job_spec, stopped, tiny_gpt_spec, wait_for
from stalwart.checkpointing import engine
from stalwart.checkpointing.shards import flatten
from stalwart.checkpointing.storage import open_storage
from stalwart.monitoring.goodput import Ledger

STEPS = 40


def final_state(status: dict, steps: int = STEPS) -> dict:
    storage = open_storage(status["checkpoint_uri"])
    step = engine.committed_steps(storage)[0]
    assert step == steps
    return engine.load(storage, step, 0).state


def assert_bitwise_equal(a: dict, b: dict) -> None:
    from stalwart.checkpointing.shards import flatten

    ta, _ = flatten(a)
    tb, _ = flatten(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), f"{key} differs"




@pytest.fixture(scope="module")
def undisturbed(client):
    status = client.submit(tiny_gpt_spec(steps=STEPS, checkpoint={"every_steps": 10})).wait(timeout=300)
    return final_state(status)


@pytest.mark.slow  # 21 s; the SIGKILL test below kills a rank for real and asserts the same end state
def test_injected_kill_restarts_and_matches_undisturbed_run(client, undisturbed):
    spec = tiny_gpt_spec(steps=STEPS, checkpoint={"every_steps": 10},
                         faults=[{"kind": "kill", "rank": 1, "step": 25}])
    job = client.submit(spec)
    status = job.wait(timeout=300)
    assert status["state"] == "SUCCEEDED"
    assert status["restarts"] == {"node_failure": 1}
    assert [a["cause"] for a in status["attempts"]] == ["node_failure", "succeeded"]
    restored = [e for e in job.events() if e["kind"] == "restored"]
    # Step 20's save may still be in flight when rank 1 dies (a loaded machine): then it never
    # commits, and the restart goes back to step 10. Either way the end state is exact.
    assert restored and restored[0]["data"]["step"] in (10, 20)
    assert_bitwise_equal(final_state(status), undisturbed)


@pytest.fixture(scope="module")
def norm_undisturbed(client):
    spec = job_spec("testjobs:norm_and_dropout", {"steps": 30}, checkpoint={"every_steps": 10})
    return final_state(client.submit(spec).wait(timeout=300), 30)


@pytest.mark.parametrize("checkpoint,fault", [
    ({}, {"kind": "kill", "rank": 1, "step": 25}),  # a restart from storage
    pytest.param({"memory_every_steps": 3, "memory_in_loop": True}, {"kind": "kill", "rank": 0, "step": 16},
                 marks=pytest.mark.slow),  # 12 s; rank 1 stays in its loop
])
def test_a_job_with_batchnorm_dropout_and_accumulation_resumes_bitwise(client, norm_undisturbed, checkpoint, fault):
    # BatchNorm's running statistics differ between ranks (each updates them on its own batch; DDP hands
    # every rank rank 0's before a forward): the checkpoint must hold rank 0's, or the restored job
    # goes on from values it never had. The job's EMA and counter (`prepare(extra=...)`) come back too.
    spec = job_spec("testjobs:norm_and_dropout", {"steps": 30}, checkpoint={"every_steps": 10, **checkpoint},
                    faults=[fault])
    job = client.submit(spec)
    status = job.wait(timeout=300)
    assert status["state"] == "SUCCEEDED" and status["restarts"] == {"node_failure": 1}
    final = final_state(status, 30)
    assert_bitwise_equal(final, norm_undisturbed)  # the EMA's weights (`extra`) too
    assert final["extra"]["seen"] == norm_undisturbed["extra"]["seen"] == {"batches": 30}
    assert final["extra"]["ema"]["n_averaged"] == 30


@pytest.mark.parametrize("checkpoint,fault", [
    ({}, {"kind": "kill", "rank": 1, "step": 25}),  # a restart from storage: each rank reads its share
    pytest.param({"memory_every_steps": 3, "memory_in_loop": True}, {"kind": "kill", "rank": 0, "step": 16},
                 marks=pytest.mark.slow),  # rank 1 stays in its loop; rank 0's share comes from its peer
])
def test_an_fsdp_jobs_sharded_ema_kept_with_ctx_keep_resumes_bitwise(client, checkpoint, fault):
    def spec(**sections):
        return job_spec("testjobs:kept_ema", {"steps": 30}, strategy={"name": "fsdp"}, **sections)

    undisturbed = final_state(client.submit(spec(checkpoint={"every_steps": 10})).wait(timeout=300), 30)
    status = client.submit(spec(checkpoint={"every_steps": 10, **checkpoint}, faults=[fault])).wait(timeout=300)
    assert status["state"] == "SUCCEEDED" and status["restarts"] == {"node_failure": 1}
    final = final_state(status, 30)
    assert sum(1 for k in flatten(final)[0] if k.startswith("/extra/ema/")) == 6  # every parameter's EMA
    assert_bitwise_equal(final, undisturbed)


def warm_ranks(job) -> list[int]:
    return [e["data"].get("warm_ranks", 0) for e in job.events() if e["kind"] == "attempt_started"]


def worker_processes() -> set[int]:
    """Pids of the rank worker processes on this machine (Ray titles them after the actor class)."""
    found = set()
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::RankWorker"):
                    found.add(int(entry))
        except (OSError, ValueError):
            continue
    return found


# Rank 0 of the first attempt burns ~0.25 s of CPU a step on top (parameters unchanged), so that the
# spares, started after the first report, have done their imports long before the job ends.
SLOW_FIRST_ATTEMPT = [{"kind": "slow", "rank": 0, "attempt": 1, "step": 1, "length": STEPS, "factor": 5}]


def _kill_point(job):
    """The job's status once it is past step 13 and between two checkpoints (every 10), so that a
    kill costs steps redone; fails at once, saying so, if the job got past its last such step first."""
    s = job.status()
    if s["state"] != "RUNNING" or s.get("step", 0) > STEPS - 4:
        raise AssertionError(f"the job reached step {s.get('step')} ({s['state']}) before a kill point: its "
                             "spares were ready too late for this test")
    return s if s.get("step", 0) >= 13 and 2 <= s["step"] % 10 <= 8 and s.get("ranks") else None


def test_sigkill_of_a_rank_mid_run(client, undisturbed):
    # Rank 0 slower than in the other tests: on a loaded machine the spares' imports took the first
    # attempt past its last kill point (CI, once).
    slow = [{**SLOW_FIRST_ATTEMPT[0], "factor": 8}]
    job = client.submit(tiny_gpt_spec(steps=STEPS, checkpoint={"every_steps": 10}, faults=slow))
    wait_for(lambda: any(e["kind"] == "spares_ready" for e in job.events()), what="spares ready")
    status = wait_for(lambda: _kill_point(job), what="a kill point")
    os.kill(status["ranks"][0]["pid"], signal.SIGKILL)
    status = job.wait(timeout=300)
    assert status["state"] == "SUCCEEDED"
    assert status["restarts"] == {"node_failure": 1}
    faults = [e for e in job.events() if e["kind"] == "fault"]
    assert "died" in faults[0]["message"]
    assert warm_ranks(job) == [0, 2]  # the restart's ranks were the spares, torch already imported
    assert_bitwise_equal(final_state(status), undisturbed)
    # Where the time went: the kill cost a restart, a restore and the steps since step 10 again, and
    # the stored history replayed gives the figures the live ledger gave.
    goodput = status["goodput"]
    assert 0 < goodput["ratio"] < 1 and not goodput["in_gap"]
    assert goodput["lost_s"]["restart"] > 0 and goodput["lost_s"]["restore"] > 0
    assert goodput["lost_s"]["recomputed"] > 0
    assert goodput["productive_s"] + sum(goodput["lost_s"].values()) == pytest.approx(goodput["wall_s"], abs=0.01)
    replayed = Ledger.replay(job.events(), job.metrics()).summary(0.0)
    assert replayed["ratio"] == pytest.approx(goodput["ratio"], abs=0.01)
    # (within 0.15 s: seen once 0.053 s apart, the live ledger and the replay placing the end of the
    # restore a record apart)
    assert replayed["lost_s"] == pytest.approx(goodput["lost_s"], abs=0.15)


@pytest.mark.slow  # 17 s; the spares' own path is covered by every restart that adopts them
def test_dead_spares_are_replaced_by_new_workers(client, undisturbed):
    job = client.submit(tiny_gpt_spec(steps=STEPS, checkpoint={"every_steps": 10}, faults=SLOW_FIRST_ATTEMPT))
    status = wait_for(lambda: (s := job.status()).get("step", 0) >= 13 and s.get("ranks") and s)
    ranks = {r["pid"] for r in status["ranks"]}
    spares = wait_for(lambda: len(found := worker_processes() - ranks) >= 2 and found, what="two spares")
    for pid in spares:
        os.kill(pid, signal.SIGKILL)
    os.kill(status["ranks"][1]["pid"], signal.SIGKILL)
    status = job.wait(timeout=300)
    assert status["state"] == "SUCCEEDED"
    assert status["restarts"] == {"node_failure": 1}
    assert warm_ranks(job) == [0, 0]
    assert_bitwise_equal(final_state(status), undisturbed)


def test_sigterm_to_a_rank_saves_at_once_and_moves_without_spending_node_failure(client, undisturbed):
    # Spot preemption, `ray stop`, a Kubernetes eviction: the rank's process gets SIGTERM.
    job = client.submit(tiny_gpt_spec(steps=STEPS, checkpoint={"every_steps": 10}, faults=SLOW_FIRST_ATTEMPT,
                                      fault_tolerance={"preemption_grace_s": 60}))
    status = wait_for(lambda: (s := job.status()).get("step", 0) >= 13 and s.get("ranks") and s)
    os.kill(status["ranks"][1]["pid"], signal.SIGTERM)
    status = job.wait(timeout=300)
    assert status["state"] == "SUCCEEDED"
    assert status["restarts"] == {"preemption": 1}  # node_failure's budget untouched
    assert [a["cause"] for a in status["attempts"]] == ["preemption", "succeeded"]
    events = job.events()
    emergency = [e for e in events if e["kind"] == "emergency_checkpoint"]
    assert emergency and emergency[0]["data"]["committed"], emergency
    step = emergency[0]["data"]["step"]
    assert step >= 13
    restored = [e for e in events if e["kind"] == "restored"]
    assert restored[0]["data"]["step"] == step  # the emergency checkpoint, not the last regular one


# ---- in-memory snapshots: survivors keep their processes ---------------------------------------------
def _pids(job, attempt: int) -> dict[int, int]:
    """Rank -> pid of `attempt`'s ranks (the status names them once the attempt has started)."""
    started = lambda: sum(e["kind"] == "attempt_started" for e in job.events()) >= attempt  # noqa: E731
    status = wait_for(lambda: started() and (s := job.status()).get("attempt") == attempt and s.get("ranks") and s,
                      what=f"attempt {attempt} running", timeout=300)
    return {r["rank"]: r["pid"] for r in status["ranks"]}


def _tiers(job, kind: str) -> list:
    return [e["data"].get("tier") for e in job.events() if e["kind"] == kind]


@pytest.mark.slow  # 14 s; test_strategies' FSDP kill restores from memory with the survivor kept, the in-loop tests below DDP's
def test_sigkill_survivors_keep_their_processes_and_restore_from_memory(client, undisturbed):
    spec = tiny_gpt_spec(steps=STEPS, checkpoint={"every_steps": 10, "memory_every_steps": 1},
                         faults=SLOW_FIRST_ATTEMPT)
    job = client.submit(spec)
    wait_for(lambda: job.status().get("step", 0) >= 13, what="step 13", timeout=300)
    before = _pids(job, 1)
    os.kill(before[1], signal.SIGKILL)
    after = _pids(job, 2)
    status = job.wait(timeout=300)
    assert status["state"] == "SUCCEEDED" and status["restarts"] == {"node_failure": 1}
    assert after[0] == before[0], "the surviving rank's process ran the next attempt"
    assert after[1] != before[1]
    started = [e["data"] for e in job.events() if e["kind"] == "attempt_started"]
    assert started[1]["kept_ranks"] == [0]
    # Without checkpoint.memory_in_loop, rank 0's call ended and ran the function again in its process.
    assert started[1]["live_ranks"] == []
    assert _tiers(job, "restored") == ["memory"] and _tiers(job, "recovered") == ["memory"]
    assert [e["data"]["path"] for e in job.events() if e["kind"] == "recovered"] == ["restart"]
    restored = next(e for e in job.events() if e["kind"] == "restored")
    assert restored["data"]["step"] >= 13  # the last snapshot every rank had, not the last checkpoint (10)
    assert_bitwise_equal(final_state(status), undisturbed)


@pytest.mark.slow  # 19 s; test_strategies' FSDP in-loop kill takes a spare on standby, the tests below rejoin DDP ranks in their loop
def test_a_spare_on_standby_takes_the_dead_ranks_place_from_its_restore(client, undisturbed):
    # Rank 0 slow in the first attempt: time for the spares to build the model and wait at their restore.
    slow = [{**SLOW_FIRST_ATTEMPT[0], "factor": 10}]
    spec = tiny_gpt_spec(steps=STEPS, checkpoint={"every_steps": 10, "memory_every_steps": 1,
                                                      "memory_in_loop": True}, faults=slow)
    job = client.submit(spec)
    wait_for(lambda: any(e["kind"] == "spares_ready" for e in job.events()) and job.status().get("step", 0) >= 3,
             what="spares waiting at their restore", timeout=300)
    before = _pids(job, 1)
    os.kill(before[1], signal.SIGKILL)
    status = job.wait(timeout=300)
    assert status["state"] == "SUCCEEDED" and status["restarts"] == {"node_failure": 1}
    started = [e["data"] for e in job.events() if e["kind"] == "attempt_started"]
    # Rank 0 stayed in its loop; rank 1's place went to the spare that had run the function up to its restore.
    assert started[1]["live_ranks"] == [0] and started[1]["standby_ranks"] == [1]
    assert [e["data"]["path"] for e in job.events() if e["kind"] == "recovered"] == ["in_loop"]
    assert _tiers(job, "restored") == ["memory"]
    assert_bitwise_equal(final_state(status), undisturbed)


@pytest.mark.slow  # 20 s; a guard for functions that block before their restore on a spare
def test_a_spare_stuck_before_its_restore_is_not_made_a_rank(client):
    # The spares' standby runs never reach their wait: the dead rank's place goes to a new worker,
    # not to a spare that would never read its rendezvous (the attempt would hang until the hang timeout).
    spec = job_spec("testjobs:stuck_on_standby", {"steps": 60, "sleep": 0.2},
                    checkpoint={"every_steps": 10, "memory_every_steps": 1, "memory_in_loop": True})
    job = client.submit(spec)
    wait_for(lambda: len(worker_processes()) >= 4 and job.status().get("step", 0) >= 15,
             what="spares started and step 15", timeout=300)
    time.sleep(3)  # their imports done, their standby runs started and stuck
    status = job.status()
    os.kill(next(r["pid"] for r in status["ranks"] if r["rank"] == 1), signal.SIGKILL)
    status = job.wait(timeout=300)
    assert status["state"] == "SUCCEEDED" and status["restarts"] == {"node_failure": 1}, status.get("reason")
    started = [e["data"] for e in job.events() if e["kind"] == "attempt_started"]
    assert started[1]["live_ranks"] == [0] and started[1]["standby_ranks"] == []
    assert [e["data"]["path"] for e in job.events() if e["kind"] == "recovered"] == ["in_loop"]


@pytest.mark.slow  # 14 s; the auto-interval and mid-copy tests rejoin ranks in their loop in the default run
def test_two_kills_in_a_row_with_ranks_in_their_loop(client, undisturbed):
    # Rank 0 first (rank 1 stays in its loop and rank 0's place, the rendezvous's host, is new), then in
    # the next attempt the survivor of the first fault.
    spec = tiny_gpt_spec(steps=STEPS, checkpoint={"every_steps": 10, "memory_every_steps": 1,
                                               "memory_in_loop": True},
                         faults=[{"kind": "kill", "rank": 0, "step": 15, "attempt": 1},
                                 {"kind": "kill", "rank": 1, "step": 25, "attempt": 2}])
    job = client.submit(spec)
    status = job.wait(timeout=300)
    assert status["state"] == "SUCCEEDED" and status["restarts"] == {"node_failure": 2}
    started = [e["data"] for e in job.events() if e["kind"] == "attempt_started"]
    assert [s["live_ranks"] for s in started[1:]] == [[1], [0]]
    assert [e["data"]["path"] for e in job.events() if e["kind"] == "recovered"] == ["in_loop", "in_loop"]
    assert_bitwise_equal(final_state(status), undisturbed)


def test_the_replacement_killed_during_the_recovery_still_ends_bitwise(client, undisturbed):
    # Rank 1 killed with rank 0 in its loop, then its replacement killed as soon as the next attempt
    # has its ranks (mid-recovery: forming groups, restoring). Whatever the second kill interrupts,
    # the job recovers again and ends where an undisturbed run does.
    spec = tiny_gpt_spec(steps=STEPS, checkpoint={"every_steps": 10, "memory_every_steps": 1,
                                                  "memory_in_loop": True}, faults=SLOW_FIRST_ATTEMPT)
    job = client.submit(spec)
    first = wait_for(lambda: (s := job.status()).get("step", 0) >= 13 and s.get("ranks") and s, what="step 13")
    os.kill(next(r["pid"] for r in first["ranks"] if r["rank"] == 1), signal.SIGKILL)
    replacement = _pids(job, 2)[1]
    try:
        os.kill(replacement, signal.SIGKILL)
    except ProcessLookupError:  # it went already (a spare that failed to start): still a second fault
        pass
    status = job.wait(timeout=300)
    assert status["state"] == "SUCCEEDED" and status["restarts"] == {"node_failure": 2}, status.get("reason")
    assert len(status["attempts"]) == 3
    assert_bitwise_equal(final_state(status), undisturbed)


def test_a_rank_killed_while_its_snapshot_is_copied_restores_the_step_before(client, undisturbed):
    # Rank 1 dies as its step-15 snapshot is on its way to rank 0: that replica is not whole, so no rank
    # holds rank 1's state of step 15; both generations are kept for this: step 14 restores, from memory.
    spec = tiny_gpt_spec(steps=STEPS, checkpoint={"every_steps": 10, "memory_every_steps": 1,
                                               "memory_in_loop": True},
                         faults=[{"kind": "kill", "rank": 1, "step": 15, "attempt": 1, "at": "snapshot"}])
    job = client.submit(spec)
    status = job.wait(timeout=300)
    assert status["state"] == "SUCCEEDED" and status["restarts"] == {"node_failure": 1}
    restored = [e["data"] for e in job.events() if e["kind"] == "restored"]
    assert [(r["step"], r["tier"]) for r in restored] == [(14, "memory")], restored
    assert_bitwise_equal(final_state(status), undisturbed)


@pytest.mark.slow  # 19 s; tests/unit/test_interval.py covers the choice, the in-loop tests here the rejoin
def test_auto_intervals_are_chosen_from_measured_costs_and_agreed_across_a_rejoin(client, undisturbed):
    # Both tiers on `auto`, with a short assumed time between failures so that a 40-step run saves often:
    # rank 0 proposes, every rank takes the same interval at the same step (a replacement rank too), and
    # a kill at step 25 still finds a snapshot every rank holds.
    spec = tiny_gpt_spec(steps=STEPS, checkpoint={"every_steps": "auto", "memory_every_steps": "auto",
                                               "memory_in_loop": True, "auto_mtbf_s": 5},
                         faults=[{"kind": "kill", "rank": 1, "step": 25, "attempt": 1}, *SLOW_FIRST_ATTEMPT])
    job = client.submit(spec)
    status = job.wait(timeout=300)
    assert status["state"] == "SUCCEEDED" and status["restarts"] == {"node_failure": 1}
    chosen = [e["data"] for e in job.events() if e["kind"] == "checkpoint_interval"]
    assert {c["tier"] for c in chosen} == {"durable", "memory"}, [(e["kind"], e["message"]) for e in job.events()]
    assert any(c["tier"] == "memory" and c["cost_measured"] for c in chosen), chosen
    assert all(c["every_steps"] >= 1 and c["mtbf_s"] >= 5 for c in chosen)
    assert set(status["checkpoint_interval"]) == {"durable", "memory"}
    assert [e["data"]["path"] for e in job.events() if e["kind"] == "recovered"] == ["in_loop"]
    assert _tiers(job, "restored") == ["memory"]
    # The last step is always kept under an auto interval, and the run is the undisturbed one.
    assert_bitwise_equal(final_state(status), undisturbed)


@pytest.mark.slow  # 25 s; the SIGSTOP test of test_detection covers hang detection, this one the memory tier's fallback
def test_sigstop_with_ranks_that_stay_in_their_loop_restarts_every_rank(client, undisturbed):
    # A stopped peer breaks no connection: rank 0 waits in its all-reduce, the hang detector stops the
    # gang, and the restart takes the usual path (no rank is kept).
    spec = tiny_gpt_spec(steps=STEPS, checkpoint={"every_steps": 10, "memory_every_steps": 1,
                                               "memory_in_loop": True},
                         fault_tolerance={"hang_timeout_s": 4})
    job = client.submit(spec)
    status = wait_for(lambda: (s := job.status()).get("step", 0) >= 13 and s.get("ranks") and s, timeout=300)
    with stopped(status["ranks"][1]["pid"]):
        final = job.wait(timeout=300)
    assert final["state"] == "SUCCEEDED" and final["restarts"] == {"hang": 1}
    assert [e["data"]["path"] for e in job.events() if e["kind"] == "recovered"] == ["restart"]
    assert_bitwise_equal(final_state(final), undisturbed)


@pytest.mark.slow  # memory.choose's unit tests cover the rule; the SIGKILL test above covers the tier end to end
def test_storage_newer_than_the_snapshots_wins_and_stays_bitwise(client, undisturbed):
    # Snapshots every 15 steps, checkpoints every 10: killed at step 28, the snapshot of step 15 is
    # older than the checkpoint of step 20, so the kept rank and the new one restore from storage.
    # (On a loaded machine step 20's save may not have committed yet: then memory's 15 is the newer.)
    spec = tiny_gpt_spec(steps=STEPS, checkpoint={"every_steps": 10, "memory_every_steps": 15},
                         faults=[{"kind": "kill", "rank": 1, "step": 28}])
    job = client.submit(spec)
    status = job.wait(timeout=300)
    assert status["state"] == "SUCCEEDED" and status["restarts"] == {"node_failure": 1}
    started = [e["data"] for e in job.events() if e["kind"] == "attempt_started"]
    assert started[1]["kept_ranks"] == [0]
    restored = [e["data"] for e in job.events() if e["kind"] == "restored"]
    assert [(r["step"], r["tier"]) for r in restored] in ([(20, "storage")], [(15, "memory")])
    assert_bitwise_equal(final_state(status), undisturbed)
