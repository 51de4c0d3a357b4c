"""The Prometheus collector: metric families from fake job snapshots, the HTTP endpoint, the dashboard."""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from stalwart.monitoring import metrics as m
from stalwart.monitoring.metrics import CAUSES, STATES, JobsCollector, StepTimes, serve, start_exporter

DASHBOARD = Path(m.__file__).with_name("dashboard.json")
NOW = 1_700_000_000.0


def full_job(**over) -> dict:
    job = {
        "id": "gpt-abc123", "name": "gpt", "state": "RUNNING", "attempt": 2, "step": 120, "max_steps": 300,
        "loss": 2.5, "grad_norm": 0.75, "tokens_per_s": 4096.0,
        "rank_step_time_s": {0: 0.25, 1: 0.31},
        "last_checkpoint_step": 100, "last_checkpoint_at": NOW - 42.0,
        "checkpoint_stall_s": 0.012, "checkpoint_write_s": 0.8, "checkpoint_bytes": 1_234_567,
        "checkpoint_failures": 1, "restarts": {"node_failure": 1},
        "forecast": {"step": 120, "loss": 2.4, "low": 2.3, "high": 2.6, "smoothed_loss": 2.5, "outside": None,
                     "final_step": 300, "final_loss": 2.1, "final_low": 1.9, "final_high": 2.4},
        # Keys the collector ignores (status() carries many more): they must not break anything.
        "attempts": [{"attempt": 1}], "ranks": [{"rank": 0, "node": "x"}], "log_path": "/tmp/x",
    }
    job.update(over)
    return job


def exposition(collector: JobsCollector) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry).decode()


def samples(text: str) -> dict:
    """{(name, frozenset(labels.items())): value} over every sample of the exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels) -> float:
    matches = [v for (n, ls), v in samples(text).items() if n == name and set(labels.items()) <= set(ls)]
    assert len(matches) == 1, (name, labels, matches)
    return matches[0]


def has(text: str, name: str, **labels) -> bool:
    return any(n == name and set(labels.items()) <= set(ls) for (n, ls) in samples(text))


JOB = {"job_id": "gpt-abc123", "job_name": "gpt"}


def observed(*durations: float, job: dict = JOB) -> StepTimes:
    """A step-time histogram that the supervisor would have fed with these rank-0 step durations."""
    times = StepTimes()
    for d in durations:
        times.observe(job["job_id"], job["job_name"], d)
    return times


def test_every_figure_of_a_running_job_is_exported():
    text = exposition(JobsCollector(lambda: [full_job()], clock=lambda: NOW, step_times=observed(0.2, 0.3, 0.02, 1.5)))
    for s in STATES:
        assert value(text, "stalwart_job_state", state=s, **JOB) == (1.0 if s == "RUNNING" else 0.0)
    assert value(text, "stalwart_job_attempt", **JOB) == 2
    assert value(text, "stalwart_job_step", **JOB) == 120
    assert value(text, "stalwart_job_max_steps", **JOB) == 300
    assert value(text, "stalwart_job_loss", **JOB) == 2.5
    assert value(text, "stalwart_job_grad_norm", **JOB) == 0.75
    assert value(text, "stalwart_job_tokens_per_second", **JOB) == 4096
    assert value(text, "stalwart_rank_step_duration_seconds", rank="0", **JOB) == 0.25
    assert value(text, "stalwart_rank_step_duration_seconds", rank="1", **JOB) == 0.31
    for cause in CAUSES:  # every cause is there from the start, so rate() and increase() see the first one
        assert value(text, "stalwart_job_restarts_total", cause=cause, **JOB) == (1 if cause == "node_failure" else 0)
    assert value(text, "stalwart_checkpoint_failures_total", **JOB) == 1
    assert value(text, "stalwart_checkpoint_last_step", **JOB) == 100
    assert value(text, "stalwart_checkpoint_age_seconds", **JOB) == pytest.approx(42.0)
    assert value(text, "stalwart_checkpoint_stall_seconds", **JOB) == 0.012
    assert value(text, "stalwart_checkpoint_write_seconds", **JOB) == 0.8
    assert value(text, "stalwart_checkpoint_size_bytes", **JOB) == 1_234_567
    assert value(text, "stalwart_exporter_scrape_error") == 0
    # The step-time histogram: 0.02 <= 0.025, 0.2 <= 0.25, 0.3 <= 0.5, 1.5 <= 2.5.
    assert value(text, "stalwart_job_step_duration_seconds_bucket", le="0.01", **JOB) == 0
    assert value(text, "stalwart_job_step_duration_seconds_bucket", le="0.025", **JOB) == 1
    assert value(text, "stalwart_job_step_duration_seconds_bucket", le="0.25", **JOB) == 2
    assert value(text, "stalwart_job_step_duration_seconds_bucket", le="0.5", **JOB) == 3
    assert value(text, "stalwart_job_step_duration_seconds_bucket", le="2.5", **JOB) == 4
    assert value(text, "stalwart_job_step_duration_seconds_bucket", le="+Inf", **JOB) == 4
    assert value(text, "stalwart_job_step_duration_seconds_count", **JOB) == 4
    assert value(text, "stalwart_job_step_duration_seconds_sum", **JOB) == pytest.approx(2.02)


def test_names_and_labels_follow_the_conventions():
    text = exposition(JobsCollector(lambda: [full_job(), full_job(id="b-1", name="b", state="PENDING")],
                                    clock=lambda: NOW))
    families = list(text_string_to_metric_families(text))
    assert families
    allowed = {"job_id", "job_name", "state", "cause", "rank", "bound", "le"}
    for family in families:
        assert family.name.startswith("stalwart_"), family.name
        assert family.documentation, family.name
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples)
        for s in family.samples:
            assert set(s.labels) <= allowed, (s.name, s.labels)  # bounded: never the step
            if s.name != "stalwart_exporter_scrape_error":
                assert {"job_id", "job_name"} <= set(s.labels)
    assert "milli" not in text and "_ms" not in text  # base units


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)")
def test_promtool_accepts_the_exposition():
    jobs = [full_job(), full_job(id="p-1", name="p", state="PENDING", step=0, loss=None, grad_norm=None,
                                 tokens_per_s=None)]
    text = exposition(JobsCollector(lambda: jobs, clock=lambda: NOW, step_times=observed(0.2, 0.3)))
    proc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stdout + proc.stderr  # no lint warnings


def test_a_pending_job_exports_only_what_it_has():
    job = {"id": "q-1", "name": "q", "state": "PENDING", "attempt": 1}
    text = exposition(JobsCollector(lambda: [job], step_times=StepTimes()))
    lab = {"job_id": "q-1", "job_name": "q"}
    assert value(text, "stalwart_job_state", state="PENDING", **lab) == 1
    assert value(text, "stalwart_job_restarts_total", cause="node_failure", **lab) == 0
    assert value(text, "stalwart_checkpoint_failures_total", **lab) == 0
    assert value(text, "stalwart_job_step_duration_seconds_count", **lab) == 0
    for name in ("stalwart_job_loss", "stalwart_job_step", "stalwart_checkpoint_age_seconds",
                 "stalwart_checkpoint_size_bytes", "stalwart_rank_step_duration_seconds",
                 "stalwart_job_tokens_per_second"):
        assert not has(text, name, **lab), name


def test_non_finite_loss_is_exported_as_nan_and_inf():
    # status() writes non-finite numbers as strings ("nan", "inf") so they survive JSON.
    text = exposition(JobsCollector(lambda: [full_job(loss="nan", grad_norm="inf")]))
    assert math.isnan(value(text, "stalwart_job_loss", **JOB))
    assert value(text, "stalwart_job_grad_norm", **JOB) == math.inf


def test_step_time_histogram_counts_every_step_however_fast_and_rare_the_scrapes():
    # 20,000 steps at 1,000 steps/s between two scrapes: all of them count (a window of recent steps
    # read at scrape time dropped those above ~17 steps/s at a 15 s interval).
    times = StepTimes()
    collector = JobsCollector(lambda: [full_job()], step_times=times)
    count = lambda: value(exposition(collector), "stalwart_job_step_duration_seconds_count", **JOB)  # noqa: E731
    assert count() == 0
    for _ in range(20_000):
        times.observe("gpt-abc123", "gpt", 0.001)
    assert count() == 20_000
    assert count() == 20_000  # a scrape with nothing new adds nothing
    times.observe("gpt-abc123", "gpt", 3.0)
    text = exposition(collector)
    assert value(text, "stalwart_job_step_duration_seconds_bucket", le="0.005", **JOB) == 20_000
    assert value(text, "stalwart_job_step_duration_seconds_bucket", le="2.5", **JOB) == 20_000
    assert value(text, "stalwart_job_step_duration_seconds_bucket", le="+Inf", **JOB) == 20_001
    assert value(text, "stalwart_job_step_duration_seconds_sum", **JOB) == pytest.approx(23.0)
    times.observe("gpt-abc123", "gpt", float("nan"))  # never a broken series
    assert count() == 20_001


def test_jobs_that_leave_the_snapshot_are_forgotten():
    jobs = [full_job(), full_job(id="old-1", name="old", state="SUCCEEDED")]
    times = observed(0.1)
    times.observe("old-1", "old", 0.2)
    collector = JobsCollector(lambda: jobs, step_times=times)
    text = exposition(collector)
    assert has(text, "stalwart_job_step", job_id="old-1")
    assert value(text, "stalwart_job_step_duration_seconds_count", job_id="old-1") == 1
    jobs.pop()
    text = exposition(collector)
    assert not has(text, "stalwart_job_step", job_id="old-1")
    assert not has(text, "stalwart_job_step_duration_seconds_count", job_id="old-1")
    assert has(text, "stalwart_job_step", job_id="gpt-abc123")


def test_a_failing_snapshot_is_reported_not_raised():
    def broken():
        raise RuntimeError("store is locked")

    text = exposition(JobsCollector(broken))
    assert value(text, "stalwart_exporter_scrape_error") == 1


def _get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()


def test_serve_exposes_only_the_collector_over_http():
    server, port = serve(JobsCollector(lambda: [full_job()]), "127.0.0.1", 0)
    try:
        status, ctype, body = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        assert 'stalwart_job_step{job_id="gpt-abc123",job_name="gpt"} 120.0' in body
        assert "python_gc" not in body and "process_cpu" not in body  # a private registry
    finally:
        server.shutdown()
        server.server_close()


def test_start_exporter_falls_back_to_a_free_port_when_taken(monkeypatch, caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        monkeypatch.setenv(m.PORT_ENV, str(busy))
        server, port = start_exporter(JobsCollector(lambda: []))
        try:
            assert port and port != busy
            assert f"port {busy}" in caplog.text and f"port {port}" in caplog.text
            assert "stalwart_exporter_scrape_error 0.0" in _get(f"http://127.0.0.1:{port}/metrics")[2]
        finally:
            server.shutdown()
            server.server_close()


def test_start_exporter_takes_the_port_from_the_environment(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    monkeypatch.setenv(m.PORT_ENV, str(free))
    server, port = start_exporter(JobsCollector(lambda: []))
    try:
        assert port == free
    finally:
        server.shutdown()
        server.server_close()
    monkeypatch.setenv(m.PORT_ENV, "0")
    server, port = start_exporter(JobsCollector(lambda: []))
    try:
        assert port > 0
    finally:
        server.shutdown()
        server.server_close()


# ---- the supervisor's figures, from a real JobSupervisor fed a report stream ------------------
def test_supervisor_status_carries_what_the_collector_needs(tmp_path):
    from stalwart.orchestrator.store import Store
    from stalwart.orchestrator.supervisor import JobSupervisor
    from stalwart.spec import JobSpec

    store = Store(tmp_path)
    spec = JobSpec.from_dict({"name": "t", "entrypoint": "a:b", "resources": {"workers": 2}})
    store.add_job("t-1", "t", spec.to_dict(), "PENDING", {})
    times = StepTimes()
    sup = JobSupervisor("t-1", spec, store, gang_factory=None, sink_factory=None, checkpoint_uri=str(tmp_path),
                        step_times=times)
    t0 = 1000.0

    def records(first, n, dt):
        return [{"step": s, "ts": t0 + s * dt, "loss": 3.0 - s * 0.01, "grad_norm": 1.0, "tokens": 64}
                for s in range(first, first + n)]

    sup.on_report(1, 0, {"records": records(1, 5, 0.5)})
    sup.on_report(1, 1, {"records": records(1, 3, 0.7)})
    sup.on_report(1, 0, {"records": records(6, 5, 0.5)})
    sup.on_report(1, 1, {"records": records(4, 2, 0.7)})
    sup.on_report(1, 0, {"records": [], "events": [
        {"kind": "checkpoint_committed", "ts": t0 + 5, "step": 10, "rank": 0, "stall_s": 0.02, "write_s": 0.4,
         "bytes": 4096, "error": None, "uri": "file:///x/step_10"}]})
    sup.on_report(1, 1, {"records": [], "events": [
        {"kind": "checkpoint_failed", "ts": t0 + 6, "step": 10, "rank": 1, "stall_s": 0.02, "write_s": 0.1,
         "bytes": 0, "error": "disk full", "uri": "file:///x/step_10"}]})
    s = sup.status()
    assert s["rank_step_time_s"] == {0: pytest.approx(0.5), 1: pytest.approx(0.7)}
    assert (s["checkpoint_stall_s"], s["checkpoint_write_s"], s["checkpoint_bytes"]) == (0.02, 0.4, 4096)
    assert s["checkpoint_failures"] == 1
    assert s["last_checkpoint_step"] == 10
    json.dumps(s, default=str)  # status() still travels as JSON (the CLI's --json)

    text = exposition(JobsCollector(lambda: [{"id": "t-1", "name": "t", "state": "RUNNING", **s}],
                                    clock=lambda: t0 + 10, step_times=times))
    lab = {"job_id": "t-1", "job_name": "t"}
    assert value(text, "stalwart_job_step", **lab) == 10
    assert value(text, "stalwart_job_step_duration_seconds_bucket", le="0.5", **lab) == 9  # 10 rank-0 records
    assert value(text, "stalwart_job_step_duration_seconds_count", **lab) == 9
    assert value(text, "stalwart_rank_step_duration_seconds", rank="1", **lab) == pytest.approx(0.7)
    assert value(text, "stalwart_checkpoint_age_seconds", **lab) == pytest.approx(5)
    assert value(text, "stalwart_checkpoint_failures_total", **lab) == 1


# ---- the dashboard ------------------------------------------------------------------------------
def dashboard_targets(dash: dict) -> list[tuple[str, str]]:
    out = []
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            out.append((panel["title"], t["expr"]))
    return out


def test_dashboard_is_importable_and_covers_every_metric():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["id"] is None and dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["job"]["definition"] == "label_values(stalwart_job_step, job_id)"
    assert variables["job"]["datasource"]["uid"] == "${datasource}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
    exprs = " ".join(e for _, e in dashboard_targets(dash))
    used = set(re.findall(r"stalwart_[a-z_]+", exprs))
    text = exposition(JobsCollector(lambda: [full_job()], clock=lambda: NOW))
    exported = {f.name + ("_total" if f.type == "counter" else "") for f in text_string_to_metric_families(text)}
    used_families = {re.sub(r"_(bucket|sum|count)$", "", u) for u in used}
    assert exported <= used_families, f"metrics without a panel: {exported - used_families}"
    assert used_families <= exported, f"panels query unknown metrics: {used_families - exported}"
    restarts = [a for a in dash["annotations"]["list"] if a.get("name") == "Restarts"]
    assert restarts and "stalwart_job_restarts_total" in restarts[0]["expr"]


def test_cli_prints_the_dashboard():
    from typer.testing import CliRunner

    from stalwart.cli import app

    result = CliRunner().invoke(app, ["monitoring", "dashboard"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["uid"] == json.loads(DASHBOARD.read_text())["uid"]


def test_a_finished_job_keeps_its_last_attempt_and_counts_no_step_twice():
    # A finished job's status says attempt 0: its last attempt is shown, and its steps stay counted once.
    job = full_job(attempt=3)
    collector = JobsCollector(lambda: [job], step_times=observed(*[0.1] * 5))
    assert value(exposition(collector), "stalwart_job_step_duration_seconds_count", **JOB) == 5
    job.update(state="SUCCEEDED", attempt=0, attempts=[{"attempt": 1}, {"attempt": 2}, {"attempt": 3}])
    text = exposition(collector)
    assert value(text, "stalwart_job_attempt", **JOB) == 3
    assert value(text, "stalwart_job_step_duration_seconds_count", **JOB) == 5


def test_forecast_band_is_exported_next_to_the_loss():
    text = exposition(JobsCollector(lambda: [full_job()], clock=lambda: NOW))
    lab = {"job_id": "gpt-abc123", "job_name": "gpt"}
    assert value(text, "stalwart_job_forecast_loss", bound="mid", **lab) == 2.4
    assert value(text, "stalwart_job_forecast_loss", bound="high", **lab) == 2.6
    assert value(text, "stalwart_job_forecast_final_loss", bound="low", **lab) == 1.9
    assert value(text, "stalwart_job_forecast_outside_band", **lab) == 0
    above = exposition(JobsCollector(lambda: [full_job(forecast={"outside": "above"})], clock=lambda: NOW))
    assert value(above, "stalwart_job_forecast_outside_band", **lab) == 1
    bare = exposition(JobsCollector(lambda: [full_job(forecast=None)], clock=lambda: NOW))
    assert "stalwart_job_forecast_loss{" not in bare  # no forecast yet: no series
