"""The metrics for real: a real Prometheus scrapes the controller while a real job trains, restarts
and checkpoints; every dashboard panel's query must return data. Then the terminal views and the
report on the same job."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jobspecs import tiny_gpt_spec, wait_for
from stalwart.cli import app

DASHBOARD = Path(__file__).resolve().parents[2] / "stalwart" / "monitoring" / "dashboard.json"
KILL_STEP = 15
runner = CliRunner()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


class Prometheus:
    def __init__(self, binary: str, config: str, workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (workdir / "prometheus.yml").write_text(config)
        self.log = open(workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=workdir)
        self.logfile = workdir / "prometheus.log"

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited ({self.proc.returncode}):\n{self.logfile.read_text()}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def api(self, path: str, **params) -> dict:
        body = get_json(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}")
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list:
        return self.api("query", query=expr)["result"]

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def endpoint(client) -> str:
    url = client.metrics_endpoint()
    assert url and url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
    return url


@pytest.fixture(scope="module")
def prometheus(endpoint, tmp_path_factory):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the `prometheus` binary is not installed (Debian/Ubuntu: apt-get install prometheus)")
    # The scrape config is the one `stalwart monitoring prometheus-config` prints, at a 1 s interval.
    result = runner.invoke(app, ["monitoring", "prometheus-config", "--interval", "1s"])
    assert result.exit_code == 0, result.output
    config = result.stdout
    assert endpoint.split("//")[1].split("/")[0] in config
    workdir = tmp_path_factory.mktemp("prometheus")
    if shutil.which("promtool"):
        (workdir / "check.yml").write_text(config)
        check = subprocess.run(["promtool", "check", "config", str(workdir / "check.yml")], capture_output=True,
                               text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
    prom = Prometheus(binary, config, workdir)
    try:
        wait_for(prom.ready, timeout=60, what="prometheus ready")
        # Discovery hands targets to the scrape loop a few seconds after start: wait for a first scrape.
        wait_for(lambda: prom.query("stalwart_exporter_scrape_error == 0"), timeout=180, what="a first scrape")
        yield prom
    finally:
        prom.close()


@pytest.fixture(scope="module")
def faulty_job(client, request):
    """A long tiny-GPT run whose rank 1 is killed at step 15: attempt 2 resumes from step 10.

    Prometheus (where installed) is up before the job is submitted, so it sees the restart counter
    go from 0 to 1; the terminal views' test runs without it."""
    if shutil.which("prometheus"):
        request.getfixturevalue("prometheus")
    spec = tiny_gpt_spec(steps=5000, checkpoint={"every_steps": 10},
                         faults=[{"kind": "kill", "rank": 1, "step": KILL_STEP}],
                         fault_tolerance={"backoff_s": 0.5},
                         # The forecast band (fitted at 1 % of the 5,000 steps) feeds the loss panel's band.
                         monitoring={"forecast_fit_fraction": 0.01})
    job = client.submit(spec)
    job.submitted_at = time.time()
    try:
        wait_for(lambda: (s := job.status())["state"] == "RUNNING" and s["attempt"] == 2
                 and (s.get("last_checkpoint_step") or 0) >= 20 and s["step"] >= 25
                 and s.get("checkpoint_stall_s") is not None and len(s.get("rank_step_time_s") or {}) == 2,
                 timeout=420, poll=1, what="attempt 2 past its first checkpoint")
        yield job
    finally:
        job.cancel("test over")
        job.wait(timeout=300, raise_on_failure=False)


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def substitute(expr: str, job_id: str) -> str:
    # What Grafana does before sending the query: the variables, and its built-in interval.
    return (expr.replace("${job}", job_id).replace("$job", job_id)
            .replace("$__rate_interval", "1m").replace("$__interval", "15s"))


def has_finite(result: list) -> bool:
    for series in result:
        points = [series["value"]] if "value" in series else series.get("values", [])
        if any(math.isfinite(float(v)) for _, v in points):
            return True
    return False


def test_every_dashboard_panel_returns_data_from_a_real_prometheus(prometheus, faulty_job):
    job_id = faulty_job.id
    # Prometheus scrapes the controller (target up) and has the job's series.
    wait_for(lambda: any(t["health"] == "up" for t in prometheus.api("targets")["activeTargets"]),
             timeout=180, what="scrape target up")
    wait_for(lambda: prometheus.query(f'stalwart_job_step{{job_id="{job_id}"}} >= 25'), timeout=180,
             what="the job's step in Prometheus")
    # The dashboard's `job` variable: label_values(stalwart_job_step, job_id).
    assert job_id in prometheus.api("label/job_id/values", **{"match[]": "stalwart_job_step"})

    targets = [(p["title"], t["refId"], substitute(t["expr"], job_id))
               for p in dashboard()["panels"] for t in p.get("targets", [])]
    assert len(targets) >= 20
    missing = dict.fromkeys((title, ref) for title, ref, _ in targets)
    deadline = time.monotonic() + 240  # generous: CI machines are shared and slow at times
    while missing and time.monotonic() < deadline:
        for title, ref, expr in targets:
            if (title, ref) in missing and has_finite(prometheus.query(expr)):
                del missing[(title, ref)]
        if missing:
            time.sleep(2)
    assert not missing, "panels without data: " + "; ".join(
        f"{t}/{r}: {e}" for t, r, e in targets if (t, r) in missing)

    # Spot-check meaning, not just presence.
    state = prometheus.query(f'stalwart_job_state{{job_id="{job_id}"}} == 1')
    assert [s["metric"]["state"] for s in state] == ["RUNNING"]
    restarts = prometheus.query(f'stalwart_job_restarts_total{{job_id="{job_id}",cause="node_failure"}}')
    assert float(restarts[0]["value"][1]) == 1
    assert float(prometheus.query(f'stalwart_job_attempt{{job_id="{job_id}"}}')[0]["value"][1]) == 2
    wait_for(lambda: prometheus.query(f'stalwart_checkpoint_last_step{{job_id="{job_id}"}} >= 20'), timeout=60,
             what="the step-20 checkpoint in Prometheus")
    assert float(prometheus.query(f'stalwart_checkpoint_size_bytes{{job_id="{job_id}"}}')[0]["value"][1]) > 10_000
    # Both ranks' gauges: the fixture saw them in the job's status, a scrape may not have yet.
    ranks = wait_for(lambda: (r := prometheus.query(f'stalwart_rank_step_duration_seconds{{job_id="{job_id}"}}'))
                     and len(r) == 2 and r, timeout=60, what="both ranks' step times in Prometheus")
    assert sorted(s["metric"]["rank"] for s in ranks) == ["0", "1"]
    assert all("step" not in s["metric"] for s in ranks)

    # Annotations run as range queries over the dashboard's time range, as Grafana does: the
    # restart annotation must mark the restart.
    annotations = [a for a in dashboard()["annotations"]["list"] if a.get("expr")]
    assert {a["name"] for a in annotations} >= {"Restarts"}
    for a in annotations:
        data = prometheus.api("query_range", query=substitute(a["expr"], job_id),
                              start=f"{faulty_job.submitted_at - 5:.3f}", end=f"{time.time():.3f}", step="1s")
        if a["name"] != "Restarts":
            continue  # optional annotations (checkpoints, off by default) need only be valid PromQL
        assert data["result"], f"annotation {a['name']!r} found nothing: {a['expr']}"
        if a["name"] == "Restarts":
            assert {s["metric"]["cause"] for s in data["result"]} == {"node_failure"}


def test_top_watch_and_report_show_the_job(faulty_job, tmp_path, monkeypatch):
    import stalwart.cli

    job_id = faulty_job.id
    monkeypatch.setattr(stalwart.cli.console, "width", 160)  # not a terminal: Rich would assume 80 columns

    result = runner.invoke(app, ["top", "--once"])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if job_id in line)
    assert "RUNNING" in row and "node_failure 1" in row
    assert any(ch in row for ch in "▁▂▃▄▅▆▇█")  # the loss sparkline

    result = runner.invoke(app, ["watch", job_id, "--once"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert job_id in out and "RUNNING" in out
    assert sum(0x2800 < ord(ch) <= 0x28FF for ch in out) > 30  # the braille loss curve
    assert "▲" in out  # attempt 2's start is marked under the curve
    assert "fault" in out and "checkpoint_committed" in out and "restored" in out

    png = tmp_path / "report.png"
    result = runner.invoke(app, ["report", job_id, "--out", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    if os.environ.get("STALWART_KEEP_REPORT"):
        shutil.copy(png, os.environ["STALWART_KEEP_REPORT"])

    result = runner.invoke(app, ["watch", "no-such-job", "--once"])
    assert result.exit_code != 0 and "no-such-job" in result.output
