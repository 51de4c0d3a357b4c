"""Scaling sweeps without running anything: the file, the jobs it plans, and what a finished job gives."""

from pathlib import Path

import pytest

from stalwart.forecast.sweep import SweepError, SweepLoss, SweepSpec, envelope, load_sweep, plan, run_result

HERE = Path(__file__).resolve().parents[1] / "jobs" / "sweep"


def test_the_plan_is_a_grid_then_the_target_with_stable_submission_ids():
    sweep, base = load_sweep(HERE / "sweep.yaml")
    jobs = plan(sweep, base)
    assert [j["name"] for j in jobs] == ["law-s0-5", "law-s0-20", "law-s1-5", "law-s1-20", "law-s2-5", "law-s2-20",
                                         "law-target"]
    assert jobs[3]["spec"]["config"] == {"tokens": 1000, "width": 64, "steps": 20}
    assert jobs[-1]["target"] and jobs[-1]["spec"]["config"]["width"] == 1024
    assert Path(jobs[0]["spec"]["workdir"]) == HERE.parent  # the base job's workdir, from its own file
    assert [j["submission_id"] for j in plan(*load_sweep(HERE / "sweep.yaml"))] == [j["submission_id"] for j in jobs]
    assert len({j["submission_id"] for j in jobs}) == len(jobs)


@pytest.mark.parametrize("text, says", [
    ("name: Bad Name\njob: job.yaml\nsizes: [{a: 1}, {a: 2}]\nsteps: [1]\ntarget: {compute: 1, run: false}", "name"),
    ("name: s\njob: job.yaml\nsizes: [{a: 1}]\nsteps: [1]\ntarget: {compute: 1, run: false}", "sizes"),
    ("name: s\njob: job.yaml\nsizes: [{a: 1}, {a: 1}]\nsteps: [1]\ntarget: {compute: 1, run: false}", "distinct"),
    ("name: s\njob: job.yaml\nsizes: [{a: 1}, {a: 2}]\nsteps: [1, 1]\ntarget: {compute: 1, run: false}", "steps"),
    ("name: s\njob: job.yaml\nsizes: [{a: 1}, {a: 2}]\nsteps: [1]\ntarget: {steps: 5}", "needs size and steps"),
    ("name: s\njob: job.yaml\nsizes: [{a: 1}, {a: 2}]\nsteps: [1]\ntarget: {run: false}", "needs compute"),
    ("name: s\njob: nowhere.yaml\nsizes: [{a: 1}, {a: 2}]\nsteps: [1]\ntarget: {compute: 1, run: false}", "cannot read"),
    ("name: s\njob: job.yaml\nsizes: [{a: 1}, {a: 2}]\nsteps: [1]\ntarget: {compute: 1, run: false}\nextra: 1", "extra"),
    ("[1, 2", "not valid YAML"),
])
def test_a_broken_sweep_file_says_what_to_change(tmp_path, text, says):
    (tmp_path / "job.yaml").write_text("name: j\nentrypoint: a:b\n")
    (tmp_path / "s.yaml").write_text(text)
    with pytest.raises(SweepError, match=says):
        load_sweep(tmp_path / "s.yaml")


def status(**kw):
    return {"id": "law-s0-5-abc", "state": "SUCCEEDED", "params": 100, "attempts": [{"world_size": 2}], **kw}


def test_a_result_takes_the_last_report_of_each_step_and_counts_every_ranks_tokens():
    metrics = [{"step": s, "loss": 10.0 - s, "tokens": 500, "attempt": 1} for s in range(1, 9)]
    metrics += [{"step": s, "loss": 5.0 - s / 10, "tokens": 500, "attempt": 2} for s in range(6, 11)]  # after a restart
    r = run_result(status(), metrics, SweepLoss(last=3))
    assert r["step"] == 10 and r["tokens"] == 10 * 500 * 2 and r["params"] == 100
    assert r["loss"] == pytest.approx((4.2 + 4.1 + 4.0) / 3)
    assert r["compute"] == pytest.approx(6 * 100 * 10_000)
    assert run_result(status(), [{"step": 1, "metrics": {"eval": 3.5}, "tokens": 1}], SweepLoss(metric="eval"))["loss"] == 3.5


@pytest.mark.parametrize("kw, metrics, says", [
    ({"state": "FAILED", "reason": "rank 1: boom"}, [], "ended FAILED: rank 1: boom"),
    ({"params": None}, [{"step": 1, "loss": 1.0, "tokens": 1}], "no parameter count"),
    ({}, [], "no step"),
    ({}, [{"step": 1, "loss": "nan", "tokens": 1}], "no finite 'loss'"),
    ({}, [{"step": 1, "loss": 1.0}], "no tokens"),
])
def test_a_job_that_cannot_give_a_result_says_why(kw, metrics, says):
    with pytest.raises(SweepError, match=says):
        run_result(status(**kw), metrics)


def test_the_envelope_keeps_the_runs_no_cheaper_run_beats():
    rows = [{"job": j, "compute": c, "loss": lo} for j, c, lo in
            [("a", 1, 5.0), ("b", 2, 4.0), ("c", 3, 4.5), ("d", 4, 3.0), ("e", 4, 3.0), ("f", 8, 2.9)]]
    assert [r["job"] for r in envelope(rows)] == ["a", "b", "d", "f"]


def test_the_law_follows_the_target_unless_the_file_names_one():
    sweep, _ = load_sweep(HERE / "sweep.yaml")
    assert sweep.law_for_target() == "compute"  # named in the file
    for target, law in (({"size": {"w": 1}, "steps": 5}, "size"), ({"run": False, "params": 1, "tokens": 2}, "size"),
                        ({"run": False, "compute": 1e20}, "compute")):
        spec = SweepSpec.model_validate({"name": "s", "job": "j.yaml", "sizes": [{"w": 1}, {"w": 2}], "steps": [1],
                                         "target": target})
        assert spec.law_for_target() == law
