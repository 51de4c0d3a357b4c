"""`stalwart up` -> submit -> list -> logs --follow -> status -> down, as subprocesses, with Ray's token
auth on; read-only commands from the state dir once the cluster is gone; clear one-line errors."""

from __future__ import annotations

import os
import signal
import time

import psutil

from clitools import small_job
from stalwart._net import free_port


def ray_processes_of(session_dir: str) -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any(session_dir in arg for arg in p.info["cmdline"] or [])]


def test_up_submit_follow_status_down(cli, tmp_path):
    # A Ray instance someone started by hand on the same machine: `stalwart down` must leave it alone.
    port = free_port()
    other = cli.ray("start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                    "--disable-usage-stats", env={"RAY_AUTH_MODE": "token"})
    assert other.returncode == 0, other.stderr
    other_gcs = [p for p in psutil.process_iter(["cmdline"])
                 if (p.info["cmdline"] or [""])[0].endswith("gcs_server")
                 and f"--gcs_server_port={port}" in p.info["cmdline"]]
    assert len(other_gcs) == 1
    try:
        up = cli("up", "--num-cpus", "2")
        assert "dashboard" in up.stdout and "RAY_AUTH_MODE=token ray start --address=" in up.stdout
        record = (cli.home / "cluster.json").read_text()
        assert "auth_token" not in record

        spec = small_job(tmp_path, steps=30)
        job_id = cli("submit", str(spec)).stdout.strip()
        assert job_id.startswith("tiny-gpt-")
        assert [j["id"] for j in cli.json("list")] == [job_id]
        # The same cluster named the ways users have it: its address, and its dashboard URL (Ray Jobs').
        info = __import__("json").loads(record)
        for address in (info["address"], info["dashboard"]):
            assert [j["id"] for j in cli.json("list", "--address", address)] == [job_id]

        # A CLI process attached to the job dies: the job goes on.
        follower = cli.background("logs", job_id, "--follow")
        time.sleep(3)
        follower.send_signal(signal.SIGKILL)
        follower.wait()

        logs = cli("logs", job_id, "--follow", timeout=300).stdout
        assert "parameters" in logs
        status = cli.json("status", job_id)
        assert status["state"] == "SUCCEEDED" and status["step"] == 30
        assert status["last_checkpoint_step"] == 30, status

        # A live view stopped the polite way (`kill`, `timeout`, a supervisor): exit code 143, no dump
        # from Ray's native signal handler, no traceback.
        viewer = cli.background("top")
        gcs_port = int(info["address"].rsplit(":", 1)[1])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(
                c.raddr and c.raddr.port == gcs_port for c in psutil.Process(viewer.pid).net_connections()):
            time.sleep(0.2)
        time.sleep(8)  # connected, then the rest of its start (imports, the controller's handle): past it
        viewer.send_signal(signal.SIGTERM)
        _, stderr = viewer.communicate(timeout=60)
        assert viewer.returncode == 143, stderr
        assert "SIGTERM received" not in stderr and "Traceback" not in stderr, stderr

        # `ray` itself works next to stalwart, with the same token.
        address = __import__("json").loads(record)["address"]
        ray_status = cli.ray("status", f"--address={address}", env={"RAY_AUTH_MODE": "token"})
        assert ray_status.returncode == 0 and "Resources" in ray_status.stdout
        session = __import__("json").loads(record)["session_dir"]
        assert ray_processes_of(session)

        down = cli("down")
        assert "stopped the cluster" in down.stdout
        assert not ray_processes_of(session)
        assert all(p.is_running() for p in other_gcs), "stalwart down stopped a Ray instance it did not start"

        # The cluster is gone; the records are not: read-only commands answer from the state dir.
        after = cli.json("status", job_id)
        assert after["state"] == "SUCCEEDED" and after["step"] == 30 and after["loss"] is not None
        assert [j["id"] for j in cli.json("list")] == [job_id]
        # As typed at an 80-column terminal: the id whole (it is copied into the next command), no ETA
        # for a job that has ended, and `checkpoints JOB` is `checkpoints list JOB`.
        assert job_id in cli("list", env={"COLUMNS": "80"}).stdout.split()
        assert "ETA" not in cli("status", job_id).stdout
        listed = cli("checkpoints", job_id, "--json")
        assert [c["step"] for c in __import__("json").loads(listed.stdout)] == [30, 20, 10]
        assert "checkpoint_committed" in cli("events", job_id).stdout
        report = cli("report", job_id, "--out", str(tmp_path / "report.png"))
        assert (tmp_path / "report.png").stat().st_size > 10_000, report.stderr
        assert "parameters" in cli("logs", job_id).stdout
    finally:
        for p in other_gcs:
            try:
                cmdline = p.cmdline()
            except psutil.NoSuchProcess:
                continue
            session = next((a.split("=", 1)[1] for a in cmdline if a.startswith("--session-dir=")), None)
            for pid in ray_processes_of(session) if session else []:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def test_job_commands_without_a_cluster_say_how_to_start_one(cli, tmp_path):
    spec = small_job(tmp_path)
    for args in (["submit", str(spec)], ["cancel", "tiny-gpt-000000"], ["monitoring", "prometheus-config"]):
        proc = cli(*args, check=False, timeout=120)
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        assert "stalwart up" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    # Nothing was started by asking.
    assert not (cli.home / "cluster.json").exists()
    # Reads of a state dir with nothing in it are empty, not errors.
    assert cli.json("list") == []
    missing = cli("status", "nope-123456", check=False)
    assert missing.returncode == 1 and "nope-123456" in missing.stderr and "Traceback" not in missing.stderr


def test_bad_addresses_get_one_line_that_says_what_to_do(cli):
    for address, expected in (("127.0.0.1:1", "no Ray cluster answers at 127.0.0.1:1"),
                              ("ftp://host:1", "give host:port, ray://host:port or http://host:8265"),
                              ("http://127.0.0.1:1", "no Ray dashboard answers at http://127.0.0.1:1")):
        proc = cli("list", "--address", address, check=False, timeout=60)
        assert proc.returncode == 1, (address, proc.stdout, proc.stderr)
        assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) <= 3  # one message (Rich may wrap it)
