"""`stalwart run` as `ray job stop` (or `kill`) ends it: SIGTERM cancels the job like Ctrl-C does."""

from __future__ import annotations

import signal

import psutil

from clitools import small_job, wait_for


def rank_processes(home) -> list[int]:
    """This test's rank worker processes (Ray titles them after the actor class; they inherit STALWART_HOME)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if (p.info["cmdline"] or [""])[0].startswith("ray::RankWorker") and \
                    p.environ().get("STALWART_HOME") == str(home):
                found.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_sigterm_to_stalwart_run_cancels_the_job(cli, tmp_path):
    spec = small_job(tmp_path, steps=100_000)  # runs until it is stopped
    run = cli.background("run", str(spec))

    def checkpointed():
        jobs = cli.json("list")
        if not jobs:
            return None
        status = cli.json("status", jobs[0]["id"])
        return status if status.get("last_checkpoint_step") else None

    status = wait_for(checkpointed, timeout=240, what="the job's first checkpoint", every=1.0)
    assert status["state"] == "RUNNING" and rank_processes(cli.home)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=120) == 130, run.stderr.read()[-3000:]
    status = cli.json("status", status["id"])
    assert status["state"] == "CANCELLED", status
    assert "SIGTERM" in status["reason"], status
    wait_for(lambda: not rank_processes(cli.home), timeout=60, what="no rank process left")
