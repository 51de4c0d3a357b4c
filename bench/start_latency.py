"""Benchmark: time from `Client.submit` to the first completed step, on a warm local cluster.

Prints ONE JSON line. Run from the repository root: `python bench/start_latency.py [--quick]`.

Set-up: one in-process local Ray instance (2 CPUs) and the stalwart controller, created before
anything is timed, and one untimed warm-up of each side. Then, interleaved (the order alternates
each repetition):

* stalwart: `Client.submit(spec)` of a 2-rank job (bench/_workload.py `latency_main`: the tiny GPT
  of bench/step_overhead.py, ctx.prepare / ctx.restore / ctx.batches / ctx.report / ctx.checkpoint,
  3 steps, checkpoints to a fresh local directory). The figure is the time from just before
  `submit` to the moment `job.status()` (polled every 20 ms) first shows step >= 1: the first
  report has reached the controller. Also recorded, from wall-clock stamps written by rank 0:
  submit -> user function entered, -> model ready, -> step 1 done (the step itself, without
  the report's trip to the controller).
* baseline, a bare Ray actor gang: a placement group of 2 {CPU: 1} bundles (waited ready), two
  plain actors in it, rank 0's address fetched, then both initialise a gloo process group, build
  the same DDP model and run one step; the figure is the time until the driver holds both results.

Target: stalwart median < 5 s. The ratio stalwart / baseline is printed for context.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BENCH, emit, median, note, ratio, start_local_ray  # noqa: E402

STEPS = 3


def stalwart_once(client, tmp: Path, i: int) -> dict:
    out = tmp / f"stamps-{i}.json"
    spec = {"name": "bench-latency", "entrypoint": "_workload:latency_main", "workdir": str(BENCH),
            "config": {"steps": STEPS, "out": str(out)},
            "resources": {"workers": 2, "cpus_per_worker": 1},
            "checkpoint": {"uri": str(tmp / f"ckpt-{i}"), "every_steps": 10**9}}
    t0 = time.time()
    job = client.submit(spec)
    t_submitted = time.time()
    while True:
        status = job.status()
        if (status.get("step") or 0) >= 1:
            t_seen = time.time()
            break
        if status["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
            # Finished before a poll saw step 1 (cannot happen with 3 steps and 20 ms polls, but be safe).
            t_seen = time.time()
            break
        time.sleep(0.02)
    final = job.wait(timeout=300, poll_s=0.2)
    if final["state"] != "SUCCEEDED":
        raise RuntimeError(f"{job.id} ended {final['state']}: {final.get('reason')}\n{job.logs()[-3000:]}")
    stamps = json.loads(out.read_text())
    first = next((m for m in job.metrics() if m.get("step") == 1), None)
    return {"total_s": t_seen - t0, "submit_call_s": t_submitted - t0, "entry_s": stamps["entry"] - t0,
            "ready_s": stamps["ready"] - t0, "step1_done_s": stamps["step1"] - t0,
            "report_to_controller_s": t_seen - stamps["step1"],
            "metrics_ts_step1_s": (first["ts"] - t0) if first else None}


def baseline_once(worker_cls) -> dict:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    t0 = time.time()
    pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="PACK")
    ray.get(pg.ready())
    actors = [worker_cls.options(num_cpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(
        pg, placement_group_bundle_index=r)).remote() for r in range(2)]
    addr, port = ray.get(actors[0].address.remote())
    stamps = ray.get([a.run.remote(r, 2, addr, port, {"steps": 1}) for r, a in enumerate(actors)])
    t_done = time.time()
    for a in actors:
        ray.kill(a)
    remove_placement_group(pg)
    s0 = stamps[0]
    return {"total_s": t_done - t0, "entry_s": s0["entry"] - t0, "ready_s": s0["ready"] - t0,
            "step1_done_s": max(s["step1"] for s in stamps) - t0}


def make_worker_cls():
    import ray

    bench = str(BENCH)

    @ray.remote
    class BareWorker:
        def address(self):
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                return "127.0.0.1", s.getsockname()[1]

        def run(self, rank, world, addr, port, config):
            if bench not in sys.path:
                sys.path.insert(0, bench)
            import _workload

            return _workload.bare_latency_rank(rank, world, addr, port, config)

    return BareWorker


def wait_idle(seconds: float = 1.0) -> None:
    """Let the previous gang's processes exit before the next one is timed."""
    import ray

    deadline = time.time() + 30
    while time.time() < deadline and ray.available_resources().get("CPU", 0) < 2:
        time.sleep(0.1)
    time.sleep(seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 repetitions instead of 5")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args()
    reps = args.reps or (2 if args.quick else 5)

    start_local_ray()
    import stalwart

    client = stalwart.Client()
    worker_cls = make_worker_cls()
    tmp = Path(tempfile.mkdtemp(prefix="stalwart-bench-latency-"))

    # Untimed warm-up of both paths (first imports, first worker processes, first job).
    stalwart_once(client, tmp, -1)
    wait_idle()
    baseline_once(worker_cls)
    wait_idle()

    runs = {"stalwart": [], "baseline": []}
    for i in range(reps):
        order = ["stalwart", "baseline"] if i % 2 == 0 else ["baseline", "stalwart"]
        for side in order:
            res = stalwart_once(client, tmp, i) if side == "stalwart" else baseline_once(worker_cls)
            runs[side].append(res)
            note(f"rep {i} {side}: " + ", ".join(f"{k} {v:.2f}" for k, v in res.items() if v is not None))
            wait_idle()

    def med(side, key):
        return median([r.get(key) for r in runs[side]])

    s_total, b_total = med("stalwart", "total_s"), med("baseline", "total_s")
    emit({
        "benchmark": "start_latency",
        "figure": {"submit_to_first_step_seen_s": s_total,
                   "submit_to_step1_done_s": med("stalwart", "step1_done_s")},
        "baseline": {"bare_ray_gang_to_first_step_s": b_total,
                     "bare_ray_gang_step1_done_s": med("baseline", "step1_done_s")},
        "ratio": ratio(s_total, b_total),
        "target": {"figure": "< 5 s"},
        "met": s_total < 5.0,
        "breakdown_s": {
            "stalwart": {k: med("stalwart", k) for k in ("submit_call_s", "entry_s", "ready_s", "step1_done_s",
                                                          "report_to_controller_s", "metrics_ts_step1_s",
                                                          "total_s")},
            "baseline": {k: med("baseline", k) for k in ("entry_s", "ready_s", "step1_done_s", "total_s")},
        },
        "runs_total_s": {side: [r["total_s"] for r in runs[side]] for side in runs},
        "repetitions": reps,
        "setup": "warm in-process local Ray (2 CPUs), controller up, 2 ranks x 1 CPU, gloo, tiny GPT",
    })
    client.close()


if __name__ == "__main__":
    main()
