"""Benchmark: stalwart's REST API under load, side by side with Ray Jobs' own REST API on the same cluster.

Prints ONE JSON line. Run from the repository root: `python bench/api.py [--quick]` (about 3 minutes;
--quick: 200 submissions and 2,000 polls a side).

Set-up: `stalwart up --num-cpus 2` in a fresh STALWART_HOME, as a user starts it: a Ray head with its
dashboard (token auth on), the controller, and the REST API on a free port. Then 4 Ray Jobs
(`sleep 3600`, entrypoint_num_cpus 0.5 each) are submitted through the dashboard's REST API
(POST /api/jobs/, with Ray's token as the bearer): they hold the cluster's 2 CPUs, so every stalwart
job queues behind them and none starts, and they are what the Ray side polls.

0. An untimed warm-up submission (the controller's first submit imports torch, seconds of CPU on a
   thread of its own, for the rollbacks to come), cancelled, then a pause of WARM_UP_S.
1. Submissions: 1,000 POST /v1/jobs (a 1-rank job as JSON, each with a submission id of its own) from
   16 client threads, each with its own keep-alive connection. Then every one of the 1,000 again, as
   a client retrying would: each must give back the job it gave the first time.
   Lost: a submission whose job is not in GET /v1/jobs. Duplicated: two jobs for one submission id, or
   a job that no submission made.
2. Status polls, 16 threads, in rounds that take turns so that neither side gets the quieter minute:
   stalwart, Ray, Ray, stalwart, each round half of the polls. stalwart: GET /v1/jobs/{id} over the
   1,000 jobs, round robin. Ray: GET /api/jobs/{id} on the dashboard over its 4 jobs. Each request's
   latency is timed in its thread (client-side time included, alike for both).
3. Every stalwart job is cancelled (POST /v1/jobs/{id}/cancel, 16 threads) and waited for; the Ray
   jobs are stopped; `stalwart down`.

The figure is the ratio of stalwart's p99 status latency to Ray Jobs' (and the same for p50). Also
recorded: the CPU time each side's server processes spend per status request (stalwart: the API's actor
and the controller; Ray: the dashboard, its module processes and the GCS), which depends far less than
latency on what else the machine runs.
Targets: p99 status < 50 ms, p99 submit < 200 ms, ratio <= 1, nothing lost or duplicated.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BENCH, emit, note, ratio  # noqa: E402

CLIENTS = 16
RAY_JOBS = 4
WARM_UP_S = 10.0
STALWART = str(Path(sys.executable).parent / "stalwart")


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs)) - 1))]


def summary(ms: list[float]) -> dict:
    return {"n": len(ms), "p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90), "p99_ms": percentile(ms, 99),
            "max_ms": max(ms) if ms else None}


class Load:
    """`n` requests from CLIENTS threads, each with a keep-alive connection of its own; latencies in ms."""

    def __init__(self, base_url: str, headers: dict):
        import httpx

        self.clients = [httpx.Client(base_url=base_url, headers=headers, timeout=60) for _ in range(CLIENTS)]

    def run(self, n: int, request) -> tuple[list[float], list]:
        """`request(http, i)` makes request i and returns (ok, value); returns latencies and values by i."""
        latencies, values, errors = [0.0] * n, [None] * n, []

        def worker(t: int) -> None:
            http = self.clients[t]
            for i in range(t, n, CLIENTS):
                start = time.perf_counter()
                try:
                    ok, value = request(http, i)
                except Exception as exc:  # noqa: BLE001 - counted and reported: a failed request is a finding
                    ok, value = False, repr(exc)
                latencies[i] = (time.perf_counter() - start) * 1000
                values[i] = value
                if not ok:
                    errors.append((i, value))

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise RuntimeError(f"{len(errors)} request(s) failed, e.g. {errors[:3]}")
        return latencies, values

    def close(self) -> None:
        for http in self.clients:
            http.close()


def server_processes(home: Path, session_dir: str) -> dict[str, list]:
    """The processes that serve each side's status requests. stalwart: the API's actor and the
    controller. Ray Jobs: the dashboard, the module processes it starts, and the GCS it asks."""
    import psutil

    ours, theirs = [], []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if ("ApiServer" in cmd or "ray::Controller" in cmd) and proc.environ().get("STALWART_HOME") == str(home):
                ours.append(proc)
            elif session_dir in cmd and ("dashboard.py" in cmd or "gcs_server" in cmd):
                theirs.append(proc)
                if "dashboard.py" in cmd:
                    theirs += proc.children(recursive=True)
        except psutil.Error:
            continue
    return {"stalwart": ours, "ray": theirs}


def cpu_seconds(procs: list) -> dict[str, float]:
    """CPU seconds so far of each process, by a short name (its role)."""
    import psutil

    total: dict[str, float] = {}
    for proc in procs:
        try:
            cmd = " ".join(proc.cmdline())
            times = proc.cpu_times()
        except psutil.Error:
            continue
        name = next((n for n in ("ApiServer", "Controller", "gcs_server", "dashboard.py") if n in cmd), "module")
        total[name] = total.get(name, 0.0) + times.user + times.system
    return total


def stalwart_cli(env: dict, *args: str, timeout: float = 300) -> str:
    proc = subprocess.run([STALWART, *args], capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"stalwart {' '.join(args)} failed: {proc.stderr[-2000:]}")
    return proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--submissions", type=int, default=None)
    parser.add_argument("--polls", type=int, default=None)
    args = parser.parse_args()
    submissions = args.submissions or (200 if args.quick else 1000)
    polls = args.polls or (2000 if args.quick else 10_000)

    from stalwart._net import free_port
    from stalwart.orchestrator.cluster import ray_token_path

    home = Path(tempfile.mkdtemp(prefix="stalwart-bench-api-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "STALWART_SERVER")}
    env.update(STALWART_HOME=str(home), STALWART_API_PORT=str(port), STALWART_API_TOKEN=uuid.uuid4().hex)
    note(f"stalwart up (state in {home}) ...")
    t0 = time.monotonic()
    stalwart_cli(env, "up", "--num-cpus", "2")
    note(f"  up in {time.monotonic() - t0:.1f} s")
    import json

    record = json.loads((home / "cluster.json").read_text())
    api = f"http://127.0.0.1:{port}"
    dashboard = record["dashboard"]
    ray_token = os.environ.get("RAY_AUTH_TOKEN") or ray_token_path().read_text().strip()
    ours = Load(api, {"Authorization": f"Bearer {env['STALWART_API_TOKEN']}"})
    theirs = Load(dashboard, {"Authorization": f"Bearer {ray_token}"})
    result: dict = {}
    try:
        # Ray Jobs: the jobs that fill the cluster, and that its side polls.
        ray_ids = [f"bench-ray-{i}-{uuid.uuid4().hex[:6]}" for i in range(RAY_JOBS)]
        for sid in ray_ids:
            deadline = time.monotonic() + 120
            while True:  # the dashboard's job agent may still be starting: it answers 500 until then
                r = theirs.clients[0].post("/api/jobs/", json={"entrypoint": "sleep 3600", "submission_id": sid,
                                                               "entrypoint_num_cpus": 2 / RAY_JOBS})
                if r.status_code < 500 or time.monotonic() > deadline:
                    break
                time.sleep(2)
            if r.status_code >= 400:
                raise RuntimeError(f"Ray Jobs refused a submission ({r.status_code}): {r.text[-1500:]}")
        deadline = time.monotonic() + 120
        while any(theirs.clients[0].get(f"/api/jobs/{sid}").json()["status"] != "RUNNING" for sid in ray_ids):
            if time.monotonic() > deadline:
                raise RuntimeError("the Ray jobs did not start within 120 s")
            time.sleep(0.5)
        note(f"{RAY_JOBS} Ray jobs running (the cluster's CPUs are theirs)")

        spec = {"name": "bench-queued", "entrypoint": "_workload:latency_main", "workdir": str(BENCH),
                "config": {"steps": 1}, "resources": {"workers": 1, "cpus_per_worker": 1}}
        submission_ids = [f"bench-{i}-{uuid.uuid4().hex[:8]}" for i in range(submissions)]

        def submit(http, i):
            r = http.post("/v1/jobs", params={"submission_id": submission_ids[i]}, json=spec)
            return r.status_code == 201, r.json().get("id") if r.status_code == 201 else r.text[:300]

        # Untimed warm-up: the controller's first submit imports torch (on a thread of its own, for the
        # rollbacks to come), seconds of CPU that would otherwise land on the first timed submissions.
        warm = ours.clients[0].post("/v1/jobs", json={**spec, "name": "bench-warm-up"})
        warm.raise_for_status()
        ours.clients[0].post(f"/v1/jobs/{warm.json()['id']}/cancel")
        time.sleep(WARM_UP_S)
        note(f"{submissions} submissions from {CLIENTS} clients ...")
        t0 = time.monotonic()
        submit_ms, job_ids = ours.run(submissions, submit)
        submit_wall = time.monotonic() - t0
        retry_ms, again = ours.run(submissions, submit)  # the same submission ids: a client's retries
        listed = [j["id"] for j in ours.clients[0].get("/v1/jobs").json() if j["name"] != "bench-warm-up"]
        lost = sum(1 for j in job_ids if j not in set(listed))
        duplicated = (len(listed) - len(set(listed))) + len(set(listed) - set(job_ids)) + \
                     (len(job_ids) - len(set(job_ids))) + sum(1 for a, b in zip(job_ids, again) if a != b)
        states = {}
        for j in ours.clients[0].get("/v1/jobs").json():
            if j["name"] == "bench-warm-up":
                continue
            states[j["state"]] = states.get(j["state"], 0) + 1
        note(f"  submit p50 {percentile(submit_ms, 50):.1f} ms, p99 {percentile(submit_ms, 99):.1f} ms; "
             f"lost {lost}, duplicated {duplicated}; states {states}")

        def poll_ours(http, i):
            r = http.get(f"/v1/jobs/{job_ids[i % len(job_ids)]}")
            return r.status_code == 200 and r.json()["state"] == "PENDING", r.status_code

        def poll_theirs(http, i):
            r = http.get(f"/api/jobs/{ray_ids[i % len(ray_ids)]}")
            return r.status_code == 200 and r.json()["status"] == "RUNNING", r.status_code

        ours.run(CLIENTS * 4, poll_ours)  # untimed warm-up of both sides
        theirs.run(CLIENTS * 4, poll_theirs)
        poll_ms: dict[str, list[float]] = {"stalwart": [], "ray": []}
        wall: dict[str, float] = {"stalwart": 0.0, "ray": 0.0}
        # CPU time of each side's server processes per request: unlike latency, it hardly depends on what
        # else the machine runs meanwhile.
        servers = server_processes(home, record["session_dir"])
        cpu: dict[str, dict[str, float]] = {"stalwart": {}, "ray": {}}
        for side in ("stalwart", "ray", "ray", "stalwart"):
            t0, c0 = time.monotonic(), cpu_seconds(servers[side])
            ms, _ = (ours.run(polls // 2, poll_ours) if side == "stalwart" else theirs.run(polls // 2, poll_theirs))
            wall[side] += time.monotonic() - t0
            for name, seconds in cpu_seconds(servers[side]).items():
                cpu[side][name] = cpu[side].get(name, 0.0) + seconds - c0.get(name, seconds)
            poll_ms[side] += ms
            note(f"  {side}: {polls // 2} polls, p50 {percentile(ms, 50):.2f} ms, p99 {percentile(ms, 99):.2f} ms")

        note("cancelling ...")
        ours.run(len(job_ids), lambda http, i: (http.post(f"/v1/jobs/{job_ids[i]}/cancel").status_code == 200, None))
        deadline = time.monotonic() + 300
        while True:
            left = [j for j in ours.clients[0].get("/v1/jobs").json() if j["state"] != "CANCELLED"]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(1)
        s, r = summary(poll_ms["stalwart"]), summary(poll_ms["ray"])
        sub = summary(submit_ms)
        result = {
            "benchmark": "api",
            "figure": {"status_p50_ms": s["p50_ms"], "status_p99_ms": s["p99_ms"], "submit_p50_ms": sub["p50_ms"],
                       "submit_p99_ms": sub["p99_ms"]},
            "baseline": {"ray_jobs_status_p50_ms": r["p50_ms"], "ray_jobs_status_p99_ms": r["p99_ms"]},
            "ratio": ratio(s["p99_ms"], r["p99_ms"]),
            "ratio_p50": ratio(s["p50_ms"], r["p50_ms"]),
            "lost": lost, "duplicated": duplicated, "not_cancelled": len(left),
            "target": {"status_p99_ms": "< 50", "submit_p99_ms": "< 200", "ratio": "<= 1", "lost_or_duplicated": 0},
            "met": bool(s["p99_ms"] < 50 and sub["p99_ms"] < 200 and s["p99_ms"] <= r["p99_ms"]
                        and lost == 0 and duplicated == 0),
            "detail": {"submit": sub, "resubmit_same_id": summary(retry_ms), "status": s, "ray_jobs_status": r,
                       "submit_per_s": submissions / submit_wall,
                       "server_cpu_ms_per_status": {k: 1000 * sum(cpu[k].values()) / len(poll_ms[k]) for k in cpu},
                       "server_cpu_ms_per_status_by_process": {
                           k: {name: 1000 * sec / len(poll_ms[k]) for name, sec in cpu[k].items()} for k in cpu},
                       "status_per_s": {k: len(poll_ms[k]) / wall[k] for k in wall}},
            "setup": f"stalwart up --num-cpus 2; {submissions} submissions and {polls} polls a side from {CLIENTS} "
                     f"client threads (keep-alive); Ray side: GET /api/jobs/{{id}} over {RAY_JOBS} Ray Jobs",
        }
    finally:
        for sid in locals().get("ray_ids", []):
            try:
                theirs.clients[0].post(f"/api/jobs/{sid}/stop")
            except Exception:  # noqa: BLE001 - the cluster goes down next anyway
                pass
        ours.close()
        theirs.close()
        stalwart_cli(env, "down")
    emit(result)


if __name__ == "__main__":
    main()
