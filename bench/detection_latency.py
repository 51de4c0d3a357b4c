"""Benchmark: how long stalwart takes to notice each kind of fault, on a small job.

Prints ONE JSON line. Run from the repository root:
    python bench/detection_latency.py            # 3 jobs per fault kind, then the node-loss scenario once
    python bench/detection_latency.py --quick    # 1 job per fault kind, no node-loss scenario
    python bench/detection_latency.py --no-node  # skip the node-loss scenario

Set-up: one in-process local Ray instance (2 CPUs) and the stalwart controller; the job is
tests/jobspecs.py `tiny_gpt_spec` (examples/tiny_gpt, a 2-layer byte-level GPT, 2 ranks x 1 CPU,
gloo DDP, a checkpoint every 10 steps to a local directory). One job per fault and repetition,
each run to SUCCEEDED (the job recovers on its own). Kinds:

  kill_injected   faults: [{kind: kill, rank: 1, step: 25}]: rank 1 SIGKILLs itself in ctx.report of
                  step 25. Injection time: rank 0's report of step 25 (job.metrics(); the ranks finish a
                  step together, since DDP's all-reduce joins them), or when that report died unshipped
                  with the gang, rank 0's report of step 24 plus the median step time.
  kill_sigkill    os.kill(rank 1's pid, SIGKILL) from the driver once the job reports step >= 13 (pid from
                  job.status()["ranks"]). Injection time: the kill.
  nan             faults: [{kind: nan, step: 45}] (60 steps): the reported loss is NaN at step 45.
  loss_spike      faults: [{kind: spike, step: 70, factor: 3, length: 10}] (100 steps; the detector's
                  warm-up is 50 reports): loss x3 and grad norm x30 from step 70.
  hang            faults: [{kind: hang, rank: 0, step: 15}] with fault_tolerance.hang_timeout_s: 5: rank 0
                  sleeps forever inside ctx.report of step 15. Injection time: rank 0's report of step 14
                  plus the median step time (rank 0 stops right after computing step 15).
  node_loss       tests/chaos/node_loss_scenario.py in a subprocess (its own ray.cluster_utils.Cluster of
                  two 2-CPU nodes): a node is removed under the job (and its rank processes killed, as a
                  lost machine takes them); its `acted_after_removal_s` = fault event ts - removal time.

Two figures per kind (medians over repetitions):
  detection_latency_s  the fault event's own `detection_latency_s` where the supervisor records one
                       (nan, loss_spike: time from the offending report's timestamp to the moment the
                       report stream flagged it; hang: silence beyond the timeout when the hang watch
                       fired); otherwise (kills, node loss) the fault event's ts minus the injection time.
  fault_event_s        the fault event's ts minus the injection time, for every kind: detection plus
                       acting on it (the supervisor loop's next poll, taking the stacks for a hang, and
                       stopping the gang, which the event follows). For hang, minus the 5 s timeout.
The job's recovery (`recovered` event: time_to_recover_s, steps_lost) is recorded as well.
Target (README/issue): detect node failures, hangs, NaNs and loss spikes on its own; no numeric
target for the latency; reported for the record.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, emit, median, note, start_local_ray  # noqa: E402

HANG_TIMEOUT_S = 5.0


def spec_for(kind: str, tmp: Path, i: int) -> dict:
    from jobspecs import tiny_gpt_spec

    ckpt = {"every_steps": 10, "keep_last": 5, "uri": str(tmp / f"{kind}-{i}")}
    if kind == "kill_injected":
        return tiny_gpt_spec(steps=40, checkpoint=ckpt, faults=[{"kind": "kill", "rank": 1, "step": 25}])
    if kind == "kill_sigkill":
        return tiny_gpt_spec(steps=40, checkpoint=ckpt)
    if kind == "nan":
        return tiny_gpt_spec(steps=60, checkpoint=ckpt, faults=[{"kind": "nan", "step": 45}],
                             fault_tolerance={"skip_batches": 5})
    if kind == "loss_spike":
        return tiny_gpt_spec(steps=100, checkpoint=ckpt,
                             faults=[{"kind": "spike", "step": 70, "factor": 3.0, "length": 10}],
                             fault_tolerance={"skip_batches": 5})
    if kind == "hang":
        return tiny_gpt_spec(steps=30, checkpoint=ckpt, faults=[{"kind": "hang", "rank": 0, "step": 15}],
                             fault_tolerance={"hang_timeout_s": HANG_TIMEOUT_S})
    raise ValueError(kind)


def report_ts(metrics: list[dict], step: int, attempt: int = 1) -> float | None:
    return next((m["ts"] for m in metrics if m.get("step") == step and m.get("attempt", 1) == attempt), None)


def median_step_s(metrics: list[dict], attempt: int = 1) -> float | None:
    ts = sorted(m["ts"] for m in metrics if m.get("attempt", 1) == attempt)
    return statistics.median(b - a for a, b in zip(ts, ts[1:])) if len(ts) > 2 else None


def step_done_ts(metrics: list[dict], step: int) -> float | None:
    """When rank 0 finished `step` in attempt 1: its report's ts, else (the report may die unshipped with the
    gang) the previous step's ts plus the median step time."""
    ts = report_ts(metrics, step)
    if ts is not None:
        return ts
    before, dt = report_ts(metrics, step - 1), median_step_s(metrics)
    return before + dt if before is not None and dt is not None else None


def one(client, kind: str, tmp: Path, i: int) -> dict:
    job = client.submit(spec_for(kind, tmp, i))
    t_inject = None
    if kind == "kill_sigkill":
        deadline = time.monotonic() + 300
        while True:
            status = job.status()
            if (status.get("step") or 0) >= 13 and status.get("ranks"):
                break
            if status["state"] in ("SUCCEEDED", "FAILED", "CANCELLED") or time.monotonic() > deadline:
                raise RuntimeError(f"{job.id} did not reach step 13: {status['state']}")
            time.sleep(0.05)
        pid = next(r["pid"] for r in status["ranks"] if r["rank"] == 1)
        t_inject = time.time()
        os.kill(pid, signal.SIGKILL)
    final = job.wait(timeout=600, raise_on_failure=False)
    if final["state"] != "SUCCEEDED":
        raise RuntimeError(f"{kind}: job {job.id} ended {final['state']}: {final.get('reason')}\n{job.logs()[-3000:]}")
    events, metrics = job.events(), job.metrics()
    fault = next((e for e in events if e["kind"] == "fault"), None)
    if fault is None:  # a missed fault is a result to report, not a crash of the benchmark
        return {"missed": True, "state": final["state"], "restarts": final.get("restarts"), "cause": None,
                "detection_latency_s": None, "fault_event_s": None, "time_to_recover_s": None}
    # The recovery is the first `recovered` event of a later attempt: a report of the dead attempt that
    # reaches the controller after the fault can raise a spurious one in the same attempt (reported here).
    recovered = next((e for e in events if e["kind"] == "recovered" and (e["attempt"] or 0) > (fault["attempt"] or 0)),
                     None)
    spurious = any(e["kind"] == "recovered" and e["attempt"] == fault["attempt"] for e in events)
    data = fault["data"]
    if kind == "kill_injected":
        t_inject = step_done_ts(metrics, 25)
    elif kind == "nan":
        t_inject = step_done_ts(metrics, 45)
    elif kind == "loss_spike":
        t_inject = step_done_ts(metrics, 70)  # the onset
    elif kind == "hang":
        t_inject = step_done_ts(metrics, 15) if report_ts(metrics, 15) is None else None  # never reported
    after = fault["ts"] - t_inject if t_inject is not None else None
    if kind == "hang" and after is not None:
        after -= HANG_TIMEOUT_S
    own = data.get("detection_latency_s")
    out = {
        "detection_latency_s": own if own is not None else after,
        "fault_event_s": after,
        "cause": data.get("cause"),
        "fault_step": data.get("step"),
        "onset_step": data.get("onset_step"),
        "time_to_recover_s": recovered["data"].get("time_to_recover_s") if recovered else None,
        "steps_lost": recovered["data"].get("steps_lost") if recovered else None,
        "state": final["state"],
        "restarts": final.get("restarts"),
        "spurious_recovered_event": spurious,
    }
    if kind == "loss_spike":
        # From the detecting report (the event's figure) and from the first spiked report (onset).
        detecting = report_ts(metrics, data.get("step"))
        out["detected_at_step"] = data.get("step")
        out["steps_after_onset"] = (data.get("step") or 0) - 70
        out["from_detecting_report_s"] = (fault["ts"] - detecting) if detecting else None
    return out


def node_loss(home: Path) -> dict:
    """tests/chaos/node_loss_scenario.py in a subprocess; its RESULT line."""
    script = REPO / "tests" / "chaos" / "node_loss_scenario.py"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(script), str(home)], capture_output=True, text=True, timeout=900,
                          env=env, cwd=str(REPO))
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT "):])
            out = {"detection_latency_s": r.get("acted_after_removal_s"),
                   "fault_event_s": r.get("acted_after_removal_s"),
                   "time_to_recover_s": r.get("time_to_recover_s"), "state": r.get("state"),
                   "restarts": r.get("restarts"), "bitwise_equal": r.get("bitwise_equal"), "scenario_result": r}
            if r.get("acted_after_removal_s") is None:
                out["note"] = ("no fault event: the job did not see a node failure (when this happened in a debug "
                               "run, the stalwart controller had been placed on the removed node, died with it, "
                               "and the job resumed through the controller-restart path, which records no fault)")
            return out
    raise RuntimeError(f"node_loss_scenario printed no RESULT (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


KINDS = ("kill_injected", "kill_sigkill", "nan", "loss_spike", "hang")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 job per kind instead of 3; no node-loss scenario")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--no-node", action="store_true", help="skip the node-loss scenario")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of " + ",".join(KINDS))
    args = ap.parse_args()
    reps = args.reps or (1 if args.quick else 3)
    kinds = [k for k in args.kinds.split(",") if k]

    home = start_local_ray()
    import ray

    import stalwart

    client = stalwart.Client()
    tmp = Path(tempfile.mkdtemp(prefix="stalwart-bench-detect-"))
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for i in range(reps):
        # Rotate the order so no kind always runs first (after an idle spell) or last.
        order = kinds[i % len(kinds):] + kinds[:i % len(kinds)]
        for kind in order:
            res = one(client, kind, tmp, i)
            runs[kind].append(res)
            note(f"rep {i} {kind}: detection {res['detection_latency_s']}, fault event {res['fault_event_s']}, "
                 f"recover {res['time_to_recover_s']}")
    client.close()
    ray.shutdown()

    result: dict[str, dict] = {}
    for kind, rs in runs.items():
        entry = {k: median([r.get(k) for r in rs]) for k in ("detection_latency_s", "fault_event_s",
                                                              "time_to_recover_s", "steps_lost")}
        entry["runs_detection_latency_s"] = [r.get("detection_latency_s") for r in rs]
        entry["cause"] = next((r["cause"] for r in rs if r.get("cause")), None)
        entry["missed"] = sum(bool(r.get("missed")) for r in rs)
        if kind == "loss_spike":
            entry["steps_after_onset"] = median([r.get("steps_after_onset") for r in rs])
            entry["from_detecting_report_s"] = median([r.get("from_detecting_report_s") for r in rs])
        if kind == "hang":
            entry["hang_timeout_s"] = HANG_TIMEOUT_S
            entry["note"] = "latencies are beyond the 5 s timeout"
        entry["all_succeeded"] = all(r["state"] == "SUCCEEDED" for r in rs)
        entry["spurious_recovered_events"] = sum(bool(r.get("spurious_recovered_event")) for r in rs)
        result[kind] = entry
    if not (args.quick or args.no_node):
        try:
            r = node_loss(Path(tempfile.mkdtemp(prefix="stalwart-bench-nodeloss-")))
            result["node_loss"] = {**r, "runs": 1}
        except Exception as exc:  # noqa: BLE001 - optional: reported, not fatal
            result["node_loss"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    emit({
        "benchmark": "detection_latency",
        "figure": {k: v.get("detection_latency_s") for k, v in result.items()},
        "kinds": result,
        "repetitions": reps,
        "load_avg_1m_at_end": round(os.getloadavg()[0], 1),
        "setup": "local Ray (2 CPUs, shared machine), tiny_gpt_spec (2 ranks x 1 CPU, gloo), report_interval_s 0.5, "
                 "supervisor poll 0.5 s, hang_timeout_s 5, checkpoints every 10 steps to a local dir",
        "home": str(home),
    })


if __name__ == "__main__":
    main()
