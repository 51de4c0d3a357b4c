"""`stalwart sweep` end to end on real Ray: a ladder of jobs whose losses follow a known law of their
compute (tests/jobs/sweep), the fit on the ladder's envelope, and the held-out target compared."""

import json
from pathlib import Path

import pytest

from typer.testing import CliRunner

from stalwart.cli import app

SWEEP = Path(__file__).resolve().parents[1] / "jobs" / "sweep" / "sweep.yaml"


def test_a_sweep_runs_its_ladder_forecasts_the_held_out_target_and_runs_again_without_new_jobs(client, tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(app, ["sweep", str(SWEEP), "--json", "--out", str(out), "--plot", str(tmp_path / "s.png")])
    assert result.exit_code == 0, result.output
    forecast = json.loads(result.stdout)
    # The law is exact, 2 + 50 C^-0.3: the forecast 8x past the largest rung lands within 2 %, inside its band.
    target = forecast["target"]
    assert abs(forecast["error"]) < 0.02 and forecast["inside"]
    assert target["params"] == 1024 and target["tokens"] == 40 * 1000 and forecast["compute_span"] > 500
    assert len(forecast["runs"]) == 6 and forecast["failed"] == []
    assert forecast["fitted"] == [r["job"] for r in forecast["runs"] if r["steps"] == 20 or r["size"]["width"] == 16]
    rows = (out / "runs.csv").read_text().splitlines()
    assert rows[0] == "job,size,steps,params,tokens,compute,loss" and len(rows) == 1 + 7
    assert json.loads((out / "forecast.json").read_text())["prediction"] == forecast["prediction"]
    assert (tmp_path / "s.png").stat().st_size > 10_000

    # Every rung is an ordinary job, named for its place in the ladder ...
    jobs = [j for j in client.jobs() if j["name"].startswith("law-")]
    assert sorted(j["name"] for j in jobs) == sorted(["law-s0-5", "law-s0-20", "law-s1-5", "law-s1-20", "law-s2-5",
                                                      "law-s2-20", "law-target"])
    assert {j["state"] for j in jobs} == {"SUCCEEDED"}
    # ... and a sweep run again finds them: nothing new is submitted, the forecast is the same.
    again = runner.invoke(app, ["sweep", str(SWEEP), "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["prediction"] == forecast["prediction"]
    assert len([j for j in client.jobs() if j["name"].startswith("law-")]) == 7

    # The same runs taken as finished jobs by `forecast fit --jobs`.
    fit = runner.invoke(app, ["forecast", "fit", "--jobs", "law-s*", "--target-compute", str(target["compute"]),
                              "--last", "1", "--json"])
    assert fit.exit_code == 0, fit.output
    assert json.loads(fit.stdout)["prediction"] == pytest.approx(forecast["prediction"], rel=1e-3)
