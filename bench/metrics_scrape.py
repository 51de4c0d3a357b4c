"""Benchmark of the Prometheus exporter under a large job: scrape latency and report-path CPU.

Prints ONE JSON line. Run from anywhere: `python bench/metrics_scrape.py [--ranks 256] [--hz 10] [--seconds 12]`.

Set-up, in one process and without Ray: a real `Controller` (its store in a temp dir, its exporter on
a free port) holding one job's real `JobSupervisor` (not started: no gang). A reporting thread plays
256 ranks that each ship one report batch (one training record) at 10 Hz through the controller's
push path (`Controller.push` -> `JobSupervisor.on_report`), as the ranks' reporters do; rank 0's
records also go to the job's metrics.jsonl, and rank 0 commits a checkpoint every 50 steps.

Measured while the ranks report:
* scrape time: wall time of a full HTTP GET of the controller's /metrics (median and p90 of 20),
  against a baseline measured side by side, interleaved with it: prometheus_client's HTTP server
  serving an empty registry (the fixed cost of a scrape); the ratio is real / baseline.
* report CPU: CPU seconds the reporting thread spent inside `push` (aggregation: stats, deques,
  metrics file) per wall second, as a fraction of one core; and the thread's total CPU fraction
  (including building the simulated batches) for context.

Targets: median scrape < 100 ms, report CPU < 20% of one core.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client import CollectorRegistry, start_http_server  # noqa: E402


def scrape(url: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as resp:
        body = resp.read()
    return time.perf_counter() - t0, len(body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=256)
    ap.add_argument("--hz", type=float, default=10.0)
    ap.add_argument("--seconds", type=float, default=12.0, help="how long the ranks report")
    ap.add_argument("--scrapes", type=int, default=20)
    args = ap.parse_args()

    home = tempfile.mkdtemp(prefix="stalwart-bench-")
    os.environ["STALWART_METRICS_PORT"] = "0"
    from stalwart.orchestrator.controller import Controller
    from stalwart.orchestrator.supervisor import JobSupervisor
    from stalwart.spec import JobSpec

    controller = Controller(home)
    spec = JobSpec.from_dict({"name": "bench", "entrypoint": "train:main",
                              "resources": {"workers": args.ranks, "cpus_per_worker": 1}})
    job_id = "bench-000001"
    controller.store.add_job(job_id, spec.name, spec.to_dict(), "RUNNING", {"checkpoint_uri": home, "attempt": 1})
    sup = JobSupervisor(job_id, spec, controller.store, gang_factory=None, sink_factory=None, checkpoint_uri=home)
    controller.supervisors[job_id] = sup
    attempt = sup.attempt
    endpoint = controller.metrics_endpoint()

    empty_server, _ = start_http_server(0, addr="127.0.0.1", registry=CollectorRegistry())
    baseline_url = f"http://127.0.0.1:{empty_server.server_port}/metrics"

    stop = threading.Event()
    stats = {"push_cpu": 0.0, "thread_cpu": 0.0, "wall": 0.0, "batches": 0, "late_ticks": 0, "ticks": 0}

    def ranks() -> None:
        period = 1.0 / args.hz
        t_start = time.perf_counter()
        c_start = time.thread_time()
        push_cpu = 0.0
        tick = 0
        while not stop.is_set():
            step = tick + 1
            now = time.time()
            for rank in range(args.ranks):
                batch = {"records": [{"step": step, "ts": now + rank * 1e-6, "loss": 3.0 - step * 1e-4,
                                      "grad_norm": 1.0, "tokens": 2048.0}],
                         "logs": [], "events": [], "sent_at": now}
                if rank == 0 and step % 50 == 0:
                    batch["events"].append({"kind": "checkpoint_committed", "ts": now, "step": step, "rank": 0,
                                            "stall_s": 0.01, "write_s": 0.5, "bytes": 1 << 20, "error": None,
                                            "uri": f"{home}/step-{step}"})
                c0 = time.thread_time()
                controller.push(job_id, attempt, rank, batch)
                push_cpu += time.thread_time() - c0
                stats["batches"] += 1
            tick += 1
            delay = t_start + tick * period - time.perf_counter()
            if delay > 0:
                stop.wait(delay)
            else:
                stats["late_ticks"] += 1
        stats.update(push_cpu=push_cpu, thread_cpu=time.thread_time() - c_start, wall=time.perf_counter() - t_start,
                     ticks=tick)

    reporter = threading.Thread(target=ranks, name="ranks", daemon=True)
    reporter.start()
    time.sleep(min(3.0, args.seconds / 3))  # let the stats windows fill
    real, base, size = [], [], 0
    gap = max(0.05, (args.seconds - min(3.0, args.seconds / 3)) / max(1, args.scrapes) - 0.02)
    for i in range(args.scrapes):
        # Interleaved, alternating which goes first, so both see the same load.
        order = [(endpoint, real), (baseline_url, base)] if i % 2 == 0 else [(baseline_url, base), (endpoint, real)]
        for url, out in order:
            seconds, n = scrape(url)
            out.append(seconds)
            if url == endpoint:
                size = n
        time.sleep(gap)
    stop.set()
    reporter.join(timeout=30)
    body = urllib.request.urlopen(endpoint, timeout=30).read().decode()

    empty_server.shutdown()
    controller._metrics_server.shutdown()
    status = sup.status()
    p90 = lambda xs: statistics.quantiles(xs, n=10)[-1]  # noqa: E731
    med_real, med_base = statistics.median(real), statistics.median(base)
    push_frac = stats["push_cpu"] / stats["wall"]
    result = {
        "bench": "metrics_scrape",
        "ranks": args.ranks,
        "report_hz": args.hz,
        "batches_per_s": round(stats["batches"] / stats["wall"], 1),
        "late_ticks": stats["late_ticks"],
        "ticks": stats["ticks"],
        "scrapes": len(real),
        "scrape_ms_median": round(med_real * 1000, 2),
        "scrape_ms_p90": round(p90(real) * 1000, 2),
        "scrape_bytes": size,
        "series": sum(1 for line in body.splitlines() if line and not line.startswith("#")),
        "baseline_empty_registry_scrape_ms_median": round(med_base * 1000, 2),
        "scrape_ratio_vs_baseline": round(med_real / med_base, 2),
        "report_cpu_fraction_of_core": round(push_frac, 4),
        "reporting_thread_cpu_fraction_of_core": round(stats["thread_cpu"] / stats["wall"], 4),
        "push_us_per_batch": round(stats["push_cpu"] / max(1, stats["batches"]) * 1e6, 2),
        "rank_series_exported": len(status["rank_step_time_s"]),
        "target_scrape_ms": 100,
        "target_report_cpu_fraction": 0.2,
        "meets_targets": med_real < 0.100 and push_frac < 0.20,
        "cpus": os.cpu_count(),
        "note": "one process, no Ray: the push path's Ray call overhead is not included",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
