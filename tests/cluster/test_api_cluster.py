"""The REST API as `stalwart up` serves it: its token file, `stalwart --server` printing what the command
prints over Ray, a job whose code exists only in what it sent, and the API's process killed mid-run coming
back within seconds with no job lost or started twice; `stalwart down` ends it with the cluster."""

from __future__ import annotations

import shutil
import signal
import stat
import time

import httpx
import psutil
import yaml

from clitools import wait_for
from stalwart.client import HttpClient

TRAIN = '''import time


def main(ctx, config):
    print("running from the package", flush=True)
    for step in range(1, config["steps"] + 1):
        time.sleep(config["sleep"])
        ctx.report(step, loss=1.0 / step)
'''


def api_process(home) -> psutil.Process | None:
    """The API server's process of the cluster whose state dir is `home` (Ray names it after its class)."""
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any("ApiServer" in part for part in proc.info["cmdline"] or []) and \
                    proc.environ().get("STALWART_HOME") == str(home):
                return proc
        except psutil.Error:
            continue
    return None


def test_api_lives_with_the_cluster_and_outlives_its_own_death(cli, tmp_path):
    up = cli("up", "--num-cpus", "2")
    url = f"http://127.0.0.1:{cli.env['STALWART_API_PORT']}"
    token_file = cli.home / "api-token"
    assert f"REST API     {url}" in up.stdout and str(token_file) in up.stdout, up.stdout
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert len(token) >= 40 and token not in up.stdout + up.stderr
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{url}/v1/jobs").status_code == 401

    # A job whose code is in a folder that is gone once it is submitted: it runs from what it sent.
    code = tmp_path / "code"
    code.mkdir()
    (code / "mine.py").write_text(TRAIN)
    (code / "job.yaml").write_text(yaml.safe_dump({
        "name": "mine", "entrypoint": "mine:main", "config": {"steps": 40, "sleep": 0.15},
        "resources": {"workers": 1, "cpus_per_worker": 1}}))
    job_id = cli("--server", url, "submit", str(code / "job.yaml")).stdout.strip()
    shutil.rmtree(code)
    watcher = HttpClient(url, token=token)
    wait_for(lambda: (watcher.status(job_id).get("step") or 0) >= 1, 120, "a first step")

    # Kill the API's process mid-run; a client submits meanwhile and retries under one submission id.
    victim = api_process(cli.home)
    assert victim is not None
    killed_at = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    http = HttpClient(url, token=token)  # waits for the server to answer again
    back_after = time.monotonic() - killed_at
    assert back_after < 30, back_after
    quick = {"name": "quick", "entrypoint": "mine:main", "config": {"steps": 1, "sleep": 0},
             "runtime_env": {"working_dir": http.job_spec(job_id)["runtime_env"]["working_dir"]},  # the same code
             "resources": {"workers": 1, "cpus_per_worker": 1}}
    second = http.submit(quick, submission_id="only-once")
    assert api_process(cli.home).pid != victim.pid
    assert http.submit(quick, submission_id="only-once").id == second.id

    # Nothing lost, nothing started twice: the first job ran on in its one attempt.
    first = http.job(job_id).wait(timeout=180)
    assert first["state"] == "SUCCEEDED" and first["step"] == 40 and len(first["attempts"]) == 1, first
    assert second.wait(timeout=180)["state"] == "SUCCEEDED"
    assert [j["id"] for j in http.jobs()] == [job_id, second.id]
    assert "running from the package" in http.job(job_id).logs()

    # The command prints the same over HTTP as over Ray.
    # (tests/integration/test_api.py compares every read command; here the ones a user of the cluster runs)
    for args in (["status", job_id, "--json"], ["logs", job_id]):
        assert cli("--server", url, *args).stdout == cli(*args).stdout, args
    assert cli("--server", url, "logs", job_id, "--follow").stdout == cli("logs", job_id).stdout

    # Anything but loopback is asked for by name, and without TLS it is warned about.
    wide = cli("serve", "--host", "0.0.0.0")
    assert "without TLS" in wide.stderr and token not in wide.stdout + wide.stderr
    assert httpx.get(f"{url}/healthz").status_code == 200  # `serve` returns once it answers

    cli("down")
    wait_for(lambda: api_process(cli.home) is None, 30, "the API's process to end")
    try:
        httpx.get(f"{url}/healthz", timeout=2)
        raise AssertionError("the API still answers after `stalwart down`")
    except httpx.TransportError:
        pass
