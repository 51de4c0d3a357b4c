"""Two nodes made as a person makes them: `stalwart up` on the head, `ray start --address` (token auth
on) for a second raylet on this machine. A 2-rank gang spans both; the second raylet is killed by
its pid mid-run, and the job finishes on what is left. The job keeps in-memory snapshots too: a lost
node's ranks cannot be replaced inside the reservation they held (it is not kept: the node may not be
declared dead yet), so the survivor's process is not kept either and the restart falls back to storage."""

from __future__ import annotations

import json
import signal

import psutil
import yaml

from clitools import small_job, wait_for


def raylets(session_dir: str) -> list[psutil.Process]:
    found = [p for p in psutil.process_iter(["cmdline", "create_time"])
             if (p.info["cmdline"] or [""])[0].endswith("raylet")
             and any(session_dir in arg for arg in p.info["cmdline"])]
    return sorted(found, key=lambda p: p.info["create_time"])


def _node_of(raylet: psutil.Process, ranks: list[dict]) -> str:
    """The node id of the ranks whose process descends from this raylet."""
    children = {c.pid for c in raylet.children(recursive=True)}
    return next(r["node_id"] for r in ranks if r["pid"] in children)


def test_gang_spans_two_nodes_and_survives_losing_one(cli, tmp_path):
    cli("up", "--num-cpus", "2")
    record = json.loads((cli.home / "cluster.json").read_text())
    joined = cli.ray("start", f"--address={record['address']}", "--num-cpus=1", "--disable-usage-stats",
                     env={"RAY_AUTH_MODE": "token"})
    assert joined.returncode == 0, joined.stderr
    head_raylet, worker_raylet = raylets(record["session_dir"])

    spec = small_job(tmp_path, steps=400, resources={"workers": 2, "cpus_per_worker": 1, "placement": "spread"},
                     fault_tolerance={"budgets": {"node_failure": 2}},
                     checkpoint={"every_steps": 10, "memory_every_steps": 5})
    # Steps of tens of milliseconds (small_job's are a few): the job must still be running when the status
    # polls (a CLI process each) have seen it spread over both nodes and the raylet is killed.
    pace = yaml.safe_load(spec.read_text())
    pace["config"].update(dim=96, layers=2, batch_size=16)
    spec.write_text(yaml.safe_dump(pace))
    job_id = cli("submit", str(spec)).stdout.strip()

    def spread_and_training():
        s = cli.json("status", job_id)
        nodes = {r["node_id"] for r in s.get("ranks") or []}
        return s if len(nodes) == 2 and (s.get("last_checkpoint_step") or 0) >= 20 else None

    before = wait_for(spread_and_training, 300, "a 2-node gang training past its second checkpoint")
    assert before["state"] == "RUNNING"
    worker_raylet.send_signal(signal.SIGKILL)
    # The rank on that node goes with its raylet, as on a lost machine.
    lost_rank = next(r for r in before["ranks"] if r["node_id"] != _node_of(head_raylet, before["ranks"]))
    wait_for(lambda: not psutil.pid_exists(lost_rank["pid"]), 60, "the lost node's rank to exit")

    status = wait_for(lambda: (s := cli.json("status", job_id))["state"] in ("SUCCEEDED", "FAILED", "CANCELLED")
                      and s, 420, "the job's end")
    assert status["state"] == "SUCCEEDED", status.get("reason")
    assert status["step"] == 400
    assert status["restarts"].get("node_failure") == 1
    assert len(status["attempts"]) == 2 and status["attempts"][0]["cause"] == "node_failure"
    lost = {r["node_id"] for r in before["ranks"]} - {r["node_id"] for r in status["ranks"]}
    assert len(lost) == 1, "the restart ran on the node that was lost"
    events = cli.json("events", job_id)
    recovered = [e["data"] for e in events if e["kind"] == "recovered"]
    assert [r["tier"] for r in recovered] == ["storage"], recovered
    assert head_raylet.is_running()
