"""Benchmark: time from SIGKILL of a rank to the first completed step after the restore, stalwart
against Ray Train (TorchTrainer + FailureConfig(max_failures=1), Ray 2.60), both checkpointing
about 400 MB of model + optimizer state to the same S3 server.

Prints ONE JSON line. Run from the repository root:
    python bench/recovery.py            # 3 repetitions of each side, interleaved
    python bench/recovery.py --quick    # 1 repetition of each side

Set-up: one in-process local Ray instance (2 CPUs) and one S3 server (`rclone serve s3` from
tests/s3server.py on 127.0.0.1, its data in a temp dir on the same disk). The job (bench/_faultjobs.py):
2 ranks x 1 CPU, DDP over gloo, a stack of 8 Linear(2048, 2048) with AdamW (33.6M parameters,
about 400 MB of state with the Adam moments), a checkpoint every 5 steps, 18 steps in all.

* stalwart: a job spec with `checkpoint.uri: s3://...` on the server and the default
  fault_tolerance (the first restart is immediate). ctx.checkpoint saves asynchronously (each rank writes half).
* Ray Train: TorchTrainer with RunConfig(storage_path=<bucket/prefix>, storage_filesystem=
  pyarrow.fs.S3FileSystem(endpoint_override=<the server>) (wrapped so that create_dir writes no
  directory markers, which rclone refuses: bench/_faultjobs.py s3_filesystem),
  failure_config=FailureConfig(max_failures=1)).
  The loop is the one Ray Train's docs show: prepare_model, get_checkpoint() + torch.load at the
  start, and every 5 steps rank 0 torch.saves model + optimizer into a temp dir and reports it
  (train.report uploads it synchronously); both ranks download the whole checkpoint to restore,
  as stalwart's ranks each read every shard.

In each trial the driver waits until rank 1 has completed step 12 and the checkpoint of step 10
is committed (stalwart: its `checkpoint_committed` event; Ray Train: train.report returned, which
it does only once the upload is done), so both sides have committed the same 2 checkpoints and
roll back to step 10; then it sends SIGKILL to rank 1's process from outside (pid from the
per-step stamps both loops write). The figure: seconds from the kill to the first step completed
by the new rank 0 process (its stamp). Also recorded, for both sides, from the stamps of the new
processes: kill -> user function entered, -> model prepared (DDP), -> checkpoint restored, ->
first step; and for stalwart, from job.events(): kill -> `fault` event (detection, and when no
worker died a grace of up to 3 s for the other ranks' errors; then the teardown), -> `attempt_started`
(backoff, placement group, new actors: split by the `state` events into backoff, reservation and
actor start),
and what comes after. For stalwart's restore, the parts of ctx.restore() (bench/_faultjobs.py
RestoreProfile: download, checksum check and copies, parse, load_state_dict and the ranks' agreement;
in a restart the read runs ahead on a background thread from the context's creation, during the
user's prepare, so those parts mostly fall outside restore()); for Ray Train's,
checkpoint.as_directory() (download) and torch.load. Medians over repetitions, and
the median of the per-repetition ratios (each pair ran back to back, under the same background load).

Target: stalwart / Ray Train <= 0.25.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BENCH, emit, median, note, ratio, start_local_ray  # noqa: E402
from _faultjobs import read_stamps  # noqa: E402
from jobspecs import wait_for  # noqa: E402

EVERY = 5
COMMITTED_BEFORE_KILL = 2  # checkpoints at steps 5 and 10
KILL_AFTER_STEP = 12
STEPS = 18


def job_config(stamps: Path) -> dict:
    return {"layers": 8, "dim": 2048, "batch_size": 8, "steps": STEPS, "every_steps": EVERY,
            "stamps_dir": str(stamps)}


def last_pid(path: Path) -> int | None:
    from _faultjobs import read_stamps

    rows = read_stamps(path)
    return rows[-1][2] if rows else None


def stepped(path: Path, step: int) -> bool:
    from _faultjobs import read_stamps

    return any(s.isdigit() and int(s) >= step for s, _, _ in read_stamps(path))


def after_kill(path: Path, old_pids: set[int], t_kill: float) -> dict:
    """From a rank's stamps: the first marks of a process started after the kill, as seconds after it."""
    from _faultjobs import read_stamps

    out = {}
    for what, ts, pid in read_stamps(path):
        if pid in old_pids or ts < t_kill:
            continue
        key = "first_step" if what.isdigit() else what
        if key not in out:
            out[key] = ts - t_kill
            if key == "first_step":
                out["first_step_no"] = int(what)
    return out


def kill(pid: int) -> float:
    t = time.time()
    os.kill(pid, signal.SIGKILL)
    return t


# ---- stalwart --------------------------------------------------------------------------------
def stalwart_trial(client, server, tmp: Path, i: int) -> dict:
    stamps = tmp / f"stalwart-{i}"
    stamps.mkdir()
    o = server.options
    spec = {"name": "bench-recovery", "entrypoint": "_faultjobs:stalwart_main", "workdir": str(BENCH),
            "config": job_config(stamps), "resources": {"workers": 2, "cpus_per_worker": 1},
            "checkpoint": {"uri": server.uri(f"stalwart-{i}-{os.getpid()}"), "every_steps": EVERY, "keep_last": 3,
                           "s3": {"endpoint_url": o.endpoint_url, "region": o.region,
                                  "access_key_id": o.access_key_id.get_secret_value(),
                                  "secret_access_key": o.secret_access_key.get_secret_value()}}}
    job = client.submit(spec)
    r0, r1 = stamps / "stalwart-rank0.txt", stamps / "stalwart-rank1.txt"
    target = COMMITTED_BEFORE_KILL * EVERY

    def ready():
        if not stepped(r1, KILL_AFTER_STEP):
            if job.status()["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
                raise RuntimeError(f"stalwart job ended before the kill:\n{job.logs()[-3000:]}")
            return False
        return any(e["kind"] == "checkpoint_committed" and e["data"].get("step") == target for e in job.events())

    wait_for(ready, 600, poll=0.05, what="stalwart: step 12 and checkpoint 10 committed")
    old = {last_pid(r0), last_pid(r1)}
    step_at_kill = job.status().get("step")
    t_kill = kill(last_pid(r1))
    final = job.wait(timeout=600, raise_on_failure=False)
    if final["state"] != "SUCCEEDED":
        raise RuntimeError(f"stalwart job {job.id} ended {final['state']}: {final.get('reason')}\n{job.logs()[-3000:]}")
    marks = after_kill(r0, old, t_kill)
    events = job.events()

    def first(kind, **match):
        return next((e for e in events if e["kind"] == kind and e["ts"] >= t_kill - 1
                     and all(e["data"].get(k) == v for k, v in match.items())), None)

    profile = {}
    new_pid = next((pid for what, ts, pid in read_stamps(r0) if pid not in old and ts >= t_kill), None)
    prof_path = stamps / f"restore-rank0-{new_pid}.json"
    if prof_path.exists():
        p = json.loads(prof_path.read_text())
        profile = {k: p[k] for k in ("engine_load_s", "download_wall_s", "parse_s", "list_s", "after_load_s")}
        profile["verify_and_copies_s"] = p["engine_load_s"] - p["download_wall_s"] - p["parse_s"]
    fault, started = first("fault"), first("attempt_started")
    restored, recovered = first("restored", rank=0), first("recovered")
    ev = {
        "fault_event_s": fault["ts"] - t_kill if fault else None,
        "attempt_started_s": started["ts"] - t_kill if started else None,
        "restored_event_s": restored["ts"] - t_kill if restored else None,
        "recovered_event_s": recovered["ts"] - t_kill if recovered else None,
    }
    pending, running = first("state", state="PENDING"), first("state", state="RUNNING")
    breakdown = {
        "detect_and_teardown_s": ev["fault_event_s"],
        "restart_s": (started["ts"] - fault["ts"]) if fault and started else None,  # the three below
        "restart_backoff_s": (pending["ts"] - fault["ts"]) if fault and pending else None,
        "restart_reserve_s": (running["ts"] - pending["ts"]) if pending and running else None,
        "restart_actors_s": (started["ts"] - running["ts"]) if running and started else None,
        "workers_to_function_s": (marks.get("start") - ev["attempt_started_s"])
        if marks.get("start") is not None and started else None,
        "prepare_s": _diff(marks, "prepared", "start"),
        "restore_s": _diff(marks, "restored", "prepared"),
        "first_step_s": _diff(marks, "first_step", "restored"),
    }
    return {"total_s": marks.get("first_step"), "marks": marks, "events": ev, "breakdown": breakdown,
            "restore_profile": profile, "step_at_kill": step_at_kill, "restored_step": restored["data"].get("step") if restored else None,
            "fault": fault["message"] if fault else None,
            "steps_lost": recovered["data"].get("steps_lost") if recovered else None, "job": job.id}


def _diff(marks: dict, a: str, b: str):
    return marks[a] - marks[b] if a in marks and b in marks else None


# ---- Ray Train -------------------------------------------------------------------------------
def raytrain_trial(server, tmp: Path, i: int) -> dict:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from _faultjobs import raytrain_loop, s3_filesystem
    from s3server import ACCESS_KEY, SECRET_KEY

    stamps = tmp / f"raytrain-{i}"
    stamps.mkdir()
    fs = s3_filesystem(f"127.0.0.1:{server.port}", ACCESS_KEY, SECRET_KEY)
    trainer = TorchTrainer(
        raytrain_loop, train_loop_config=job_config(stamps),
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"raytrain-{i}-{os.getpid()}", storage_path=f"{server.bucket}/raytrain",
                             storage_filesystem=fs, failure_config=FailureConfig(max_failures=1),
                             checkpoint_config=CheckpointConfig(num_to_keep=3)))
    outcome: dict = {}

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    r0, r1 = stamps / "raytrain-rank0.txt", stamps / "raytrain-rank1.txt"

    def ready():
        if "error" in outcome or "result" in outcome:
            raise RuntimeError(f"Ray Train run ended before the kill: {outcome}")
        # Step 10's report (and so its upload) returns before step 10's stamp, on every rank.
        return stepped(r1, KILL_AFTER_STEP)

    wait_for(ready, 600, poll=0.05, what="Ray Train: step 12")
    old = {last_pid(r0), last_pid(r1)}
    t_kill = kill(last_pid(r1))
    thread.join(timeout=600)
    if "error" in outcome or thread.is_alive():
        raise RuntimeError(f"Ray Train run failed: {outcome.get('error', 'still running after 600 s')}")
    marks = after_kill(r0, old, t_kill)
    breakdown = {
        "kill_to_function_s": marks.get("start"),
        "prepare_s": _diff(marks, "prepared", "start"),
        "restore_s": _diff(marks, "restored", "prepared"),
        "first_step_s": _diff(marks, "first_step", "restored"),
    }
    profile = {"download_s": _diff(marks, "downloaded", "prepared"),
               "torch_load_s": _diff(marks, "torch_loaded", "downloaded"),
               "after_load_s": _diff(marks, "restored", "torch_loaded")}
    result = outcome["result"]
    return {"total_s": marks.get("first_step"), "marks": marks, "breakdown": breakdown, "restore_profile": profile,
            "restored_from_step": marks.get("first_step_no", 0) - 1,
            "final_metrics": getattr(result, "metrics", None)}


def wait_idle(seconds: float = 2.0) -> None:
    """Let the previous run's processes exit and its CPUs come back before the next one starts."""
    import ray

    deadline = time.time() + 60
    while time.time() < deadline and ray.available_resources().get("CPU", 0) < 2:
        time.sleep(0.2)
    time.sleep(seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 repetition of each side instead of 3")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--only", choices=["stalwart", "raytrain"], help="run one side (for debugging; no ratio)")
    args = ap.parse_args()
    reps = args.reps or (1 if args.quick else 3)

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # pyarrow's AWS SDK sends aws-chunked uploads with CRC trailers, which rclone refuses (stalwart's boto3
    # client is configured the same way in code); set before ray.init so that every worker inherits it.
    os.environ["AWS_REQUEST_CHECKSUM_CALCULATION"] = "when_required"
    os.environ["AWS_RESPONSE_CHECKSUM_VALIDATION"] = "when_required"
    # Ray Train's workers unpickle raytrain_loop by reference: they need bench/ on their path.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(BENCH), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    start_local_ray()
    import stalwart
    from s3server import S3Server

    server = S3Server(bucket="bench")
    server.start()
    client = stalwart.Client()
    tmp = Path(tempfile.mkdtemp(prefix="stalwart-bench-recovery-"))
    runs: dict[str, list[dict]] = {"stalwart": [], "raytrain": []}
    loads = []
    try:
        for i in range(reps):
            order = ["stalwart", "raytrain"] if i % 2 == 0 else ["raytrain", "stalwart"]
            for side in ([args.only] if args.only else order):
                load0 = os.getloadavg()[0]
                res = stalwart_trial(client, server, tmp, i) if side == "stalwart" else raytrain_trial(server, tmp, i)
                loads.append([side, round(load0, 1), round(os.getloadavg()[0], 1)])
                runs[side].append(res)
                note(f"rep {i} {side}: total {res['total_s']:.2f} s; " + ", ".join(
                    f"{k} {v:.2f}" for k, v in res["breakdown"].items() if v is not None))
                wait_idle()
    finally:
        client.close()
        server.close()

    def med(side, *path):
        vals = []
        for r in runs[side]:
            v = r
            for p in path:
                v = v.get(p) if isinstance(v, dict) else None
            vals.append(v)
        return median(vals)

    def meds(side, section):
        keys = []
        for r in runs[side]:
            keys += [k for k in (r.get(section) or {}) if k not in keys]
        return {k: med(side, section, k) for k in keys}

    s, b = med("stalwart", "total_s"), med("raytrain", "total_s")
    r = ratio(s, b)
    pair_ratios = [ratio(x["total_s"], y["total_s"]) for x, y in zip(runs["stalwart"], runs["raytrain"])]
    emit({
        "benchmark": "recovery",
        "figure": {"stalwart_kill_to_first_step_s": s, "raytrain_kill_to_first_step_s": b},
        "ratio": r,
        "ratio_median_of_pairs": median(pair_ratios),
        "target": {"ratio": "<= 0.25"},
        "met": r is not None and r <= 0.25,
        "breakdown_s": {
            "stalwart": meds("stalwart", "breakdown"),
            "stalwart_restore": meds("stalwart", "restore_profile"),
            "stalwart_events_after_kill": meds("stalwart", "events"),
            "stalwart_marks_after_kill": meds("stalwart", "marks"),
            "raytrain": meds("raytrain", "breakdown"),
            "raytrain_restore": meds("raytrain", "restore_profile"),
            "raytrain_marks_after_kill": meds("raytrain", "marks"),
        },
        "runs_total_s": {side: [x["total_s"] for x in runs[side]] for side in runs},
        "restored_step": {"stalwart": [x["restored_step"] for x in runs["stalwart"]],
                          "raytrain": [x["restored_from_step"] for x in runs["raytrain"]]},
        "stalwart_steps_lost": [x["steps_lost"] for x in runs["stalwart"]],
        "load_avg_1m_per_trial": loads,
        "repetitions": reps,
        "setup": ("local Ray (2 CPUs, shared machine), 2 ranks x 1 CPU, gloo DDP, 8 x Linear(2048,2048) + AdamW "
                  "(~400 MB state), checkpoint every 5 steps to rclone serve s3 on 127.0.0.1, SIGKILL of rank 1 "
                  "after step 12 with 2 checkpoints committed; stalwart: default fault_tolerance (first restart immediate); "
                  "Ray Train 2.60 (Train v2): TorchTrainer, FailureConfig(max_failures=1), pyarrow S3FileSystem "
                  "to the same server, synchronous checkpoint upload (the default)"),
    })

if __name__ == "__main__":
    main()
