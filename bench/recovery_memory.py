"""Benchmark: SIGKILL of a rank -> first step after recovery, restoring from the in-memory snapshots
(checkpoint.memory_every_steps, survivors keep their processes) against today's restore from storage.

Prints ONE JSON line. Run from the repository root:
    python bench/recovery_memory.py            # 3 repetitions of each side, interleaved
    python bench/recovery_memory.py --quick    # 1 repetition of each side
    python bench/recovery_memory.py --strategy fsdp   # the same with FSDP
    python bench/recovery_memory.py --strategy deepspeed   # ZeRO-2 (no spare on standby: rank 1 runs the function)

The workload and set-up are bench/recovery.py's stalwart side: one in-process local Ray instance
(2 CPUs), the rclone S3 server on 127.0.0.1, 2 ranks x 1 CPU, DDP over gloo, 8 x Linear(2048, 2048)
with AdamW (about 400 MB of state), a checkpoint every 5 steps, 80 steps, SIGKILL of rank 1 (its pid as
the controller has it) once it has done step 12, the checkpoint of step 10 has committed and the spares
are ready (`spares_ready`: a fault in a long run finds them so). The two sides differ only in the spec:

* memory: `checkpoint.memory_every_steps: 5` as well, so snapshots are taken at the checkpoint's steps
  and both sides restore the same step, losing the same steps; rank 0 stays in its training loop and
  restores from its own snapshot, rank 1 comes from a spare that ran the function up to its restore and
  receives its state from rank 0 (launchers.rejoin);
* storage: no in-memory snapshots (both ranks from warm spares, running the function from the start,
  restoring from the node-local copy or S3).

Figure: seconds from the kill to the first step completed by the new attempt's rank 0 (its stamp; for
a rank that stayed in its loop, the first step it did again; otherwise told apart by the attempt's
`start` mark after the kill). Also: kill -> `fault` event, -> `attempt_started`, -> rank 0 `restored`
mark, and the restored tier. Medians over repetitions, and the median of per-pair ratios.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BENCH, emit, median, note, ratio, start_local_ray  # noqa: E402
from _faultjobs import read_stamps  # noqa: E402
from jobspecs import wait_for  # noqa: E402

EVERY = 5
KILL_AFTER_STEP = 12
STEPS = 80


def _marks_after(path: Path, t_kill: float) -> dict:
    """Seconds after the kill of the new attempt's marks on one rank: its `start` (a rank that ran its
    function again), then what follows; `first_step`: the first step done after the recovery, that is
    after a `start`, or, for a rank that stayed in its loop (no `start`), the first step done again."""
    out: dict = {}
    done = 0  # the highest step stamped so far
    for what, ts, pid in read_stamps(path):
        if ts >= t_kill and "first_step" not in out:
            if what == "start" and "start" not in out:
                out["start"], out["pid"] = ts - t_kill, pid
            elif what.isdigit() and ("start" in out or int(what) <= done):
                out["first_step"], out["first_step_no"] = ts - t_kill, int(what)
                out.setdefault("pid", pid)
            elif not what.isdigit() and "start" in out and what not in out:
                out[what] = ts - t_kill
        if what.isdigit():
            done = max(done, int(what))
    return out


def trial(client, server, tmp: Path, i: int, side: str, strategy: str = "ddp") -> dict:
    stamps = tmp / f"{side}-{i}"
    stamps.mkdir()
    o = server.options
    checkpoint = {"uri": server.uri(f"{side}-{i}-{os.getpid()}"), "every_steps": EVERY, "keep_last": 3,
                  "s3": {"endpoint_url": o.endpoint_url, "region": o.region,
                         "access_key_id": o.access_key_id.get_secret_value(),
                         "secret_access_key": o.secret_access_key.get_secret_value()}}
    if side == "memory":
        checkpoint.update(memory_every_steps=EVERY, memory_in_loop=True)
    spec = {"name": f"bench-recovery-{side}", "entrypoint": "_faultjobs:stalwart_main", "workdir": str(BENCH),
            "config": {"layers": 8, "dim": 2048, "batch_size": 8, "steps": STEPS, "every_steps": EVERY,
                       "stamps_dir": str(stamps)},
            "resources": {"workers": 2, "cpus_per_worker": 1}, "checkpoint": checkpoint,
            "strategy": {"name": strategy}}
    job = client.submit(spec)
    r0, r1 = stamps / "stalwart-rank0.txt", stamps / "stalwart-rank1.txt"

    def ready():
        if not any(s.isdigit() and int(s) >= KILL_AFTER_STEP for s, _, _ in read_stamps(r1)):
            if job.status()["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
                raise RuntimeError(f"job ended before the kill:\n{job.logs()[-3000:]}")
            return False
        events = job.events()
        if job.status()["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
            raise RuntimeError(f"job ended before the kill: {[(e['kind'], e['message'][:80]) for e in events]}")
        # A fault in a long run finds the spares ready: wait for them (on 2 cores they start slowly).
        return (any(e["kind"] == "checkpoint_committed" and e["data"].get("step") == 2 * EVERY for e in events)
                and any(e["kind"] == "spares_ready" for e in events))

    wait_for(ready, 900, poll=0.05, what=f"{side}: step {KILL_AFTER_STEP} and checkpoint {2 * EVERY} committed")
    # The ranks' pids as the controller has them (a spare on standby stamps its own pid in the same files).
    pids = {r["rank"]: r["pid"] for r in job.status()["ranks"]}
    pid0 = pids[0]
    t_kill = time.time()
    os.kill(pids[1], signal.SIGKILL)
    final = job.wait(timeout=900, raise_on_failure=False)
    if final["state"] != "SUCCEEDED":
        raise RuntimeError(f"job {job.id} ended {final['state']}: {final.get('reason')}\n{job.logs()[-3000:]}")
    marks = _marks_after(r0, t_kill)
    events = job.events()

    def first(kind, **match):
        return next((e for e in events if e["kind"] == kind and e["ts"] >= t_kill - 1
                     and all(e["data"].get(k) == v for k, v in match.items())), None)

    fault, started, restored = first("fault"), first("attempt_started"), first("restored", rank=0)
    recovered = first("recovered")
    if side == "memory" and (recovered or {}).get("data", {}).get("path") != "in_loop":
        note(f"{job.id} did not recover in its loop: " + "; ".join(
            f"{e['kind']}: {e['message'][:200]}" for e in events if e["ts"] >= t_kill - 1) + "\n" + job.logs()[-3000:])
    return {"total_s": marks.get("first_step"), "marks": marks,
            "fault_event_s": fault["ts"] - t_kill if fault else None,
            "attempt_started_s": started["ts"] - t_kill if started else None,
            "restore_s": (marks["restored"] - marks["prepared"]) if "restored" in marks and "prepared" in marks else None,
            "tier": restored["data"].get("tier") if restored else None,
            "restored_step": restored["data"].get("step") if restored else None,
            "rank0_same_process": marks.get("pid") == pid0,
            "steps_lost": recovered["data"].get("steps_lost") if recovered else None, "job": job.id,
            "warm_ranks": started["data"].get("warm_ranks") if started else None,
            "standby_ranks": started["data"].get("standby_ranks") if started else None,
            "live_ranks": started["data"].get("live_ranks") if started else None,
            "path": recovered["data"].get("path") if recovered else None,
            "spares_ready_before_kill": any(e["kind"] == "spares_ready" and e["ts"] < t_kill for e in events)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--strategy", choices=["ddp", "fsdp", "deepspeed"], default="ddp")
    args = parser.parse_args()
    reps = 1 if args.quick else 3
    start_local_ray()
    import stalwart
    from s3server import S3Server

    server = S3Server(bucket="bench")
    server.start()
    client = stalwart.Client()
    tmp = Path(tempfile.mkdtemp(prefix="stalwart-bench-recovery-memory-"))
    runs: dict[str, list[dict]] = {"memory": [], "storage": []}
    try:
        for i in range(reps):
            for side in (["memory", "storage"] if i % 2 == 0 else ["storage", "memory"]):
                res = trial(client, server, tmp, i, side, args.strategy)
                runs[side].append(res)
                note(f"rep {i} {side}: {res}")
    finally:
        client.close()
        server.close()

    def med(side, key, sub=None):
        return median([(r.get(key) or {}).get(sub) if sub else r.get(key) for r in runs[side]])

    m, s = med("memory", "total_s"), med("storage", "total_s")
    emit({
        "benchmark": "recovery_memory",
        "strategy": args.strategy,
        "figure": {"memory_kill_to_first_step_s": m, "storage_kill_to_first_step_s": s},
        "ratio": ratio(m, s),
        "ratio_median_of_pairs": median([ratio(a["total_s"], b["total_s"]) for a, b in zip(runs["memory"], runs["storage"])]),
        "target": {"memory_kill_to_first_step_s": "<= 1.0"},
        "breakdown_s": {side: {k: med(side, k) for k in ("fault_event_s", "attempt_started_s", "restore_s")}
                        | {f"marks_{k}": med(side, "marks", k) for k in ("start", "prepared", "restored", "first_step")}
                        for side in runs},
        "tiers": {side: [r["tier"] for r in runs[side]] for side in runs},
        "restored_step": {side: [r["restored_step"] for r in runs[side]] for side in runs},
        "rank0_same_process": {side: [r["rank0_same_process"] for r in runs[side]] for side in runs},
        "runs_total_s": {side: [r["total_s"] for r in runs[side]] for side in runs},
        "repetitions": reps,
        "setup": (f"local Ray (2 CPUs, shared machine), 2 ranks x 1 CPU, gloo {args.strategy.upper()}, 8 x Linear(2048,2048) + AdamW "
                  "(~400 MB state), checkpoint every 5 steps to rclone serve s3 on 127.0.0.1 (memory side: and "
                  "in-memory snapshots every 5 steps), SIGKILL of rank 1 after step 12 with checkpoint 10 committed"),
    })


if __name__ == "__main__":
    main()
