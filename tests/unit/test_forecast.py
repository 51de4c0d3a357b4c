"""stalwart.forecast: laws fitted on synthetic runs with known parameters recover them and predict
held-out points; untrustworthy fits are refused by name; bad input names its row; the CLI."""

import json
import pickle

import numpy as np
import pytest

from stalwart.forecast import (ForecastError, Runs, RunsFileError, annealing_areas, extract_frontier,
                               fit_compute_law, fit_size_law, forecast_compute, forecast_curve, forecast_size,
                               read_runs, resolve_target)
from stalwart.forecast.frontier import budget_groups

# A Chinchilla-like law (Hoffmann et al.'s fitted values).
E, A, ALPHA, B, BETA = 1.69, 406.4, 0.34, 410.7, 0.28


def chinchilla(n, d):
    return E + A / np.asarray(n, float) ** ALPHA + B / np.asarray(d, float) ** BETA


def true_optimum(c):
    n = np.geomspace(1e5, 1e13, 20001)
    return float(chinchilla(n, c / (6 * n)).min())


def isoflop_runs(budgets, sizes_per_budget=9, noise=0.0, seed=0) -> Runs:
    """An isoFLOP sweep: at each budget, sizes from 1/8x to 8x around the optimum (off-centre by a
    factor 1.3, so that no run sits exactly at it)."""
    rng = np.random.default_rng(seed)
    cs, ns, ds = [], [], []
    for c in budgets:
        grid = np.geomspace(1e5, 1e13, 20001)
        n_opt = grid[np.argmin(chinchilla(grid, c / (6 * grid)))]
        for n in 1.3 * n_opt * np.geomspace(1 / 8, 8, sizes_per_budget):
            cs.append(c), ns.append(n), ds.append(c / (6 * n))
    n, d = np.array(ns), np.array(ds)
    loss = chinchilla(n, d) * (1 + noise * rng.standard_normal(len(n)))
    return Runs(np.array(cs), loss, n, d)


def write_csv(path, header, rows):
    path.write_text(",".join(header) + "\n" + "\n".join(",".join(str(v) for v in r) for r in rows) + "\n")
    return path


# ------------------------------------------------------------------------------------------------
# L(C) on a frontier


def test_compute_law_recovers_a_known_law_and_predicts_100x_beyond():
    a, b, c = 2.0, 0.15, 1.8
    compute = np.geomspace(1e17, 1e20, 10)
    rng = np.random.default_rng(1)
    loss = (a * (compute / 1e17) ** -b + c) * (1 + 0.001 * rng.standard_normal(len(compute)))
    fit = fit_compute_law(compute, loss)
    assert fit.b == pytest.approx(b, abs=0.02) and fit.c == pytest.approx(c, abs=0.15)
    target, truth = 1e22, a * (1e22 / 1e17) ** -b + c
    lo, mid, hi = fit.quantiles([target])[:, 0]
    assert mid == pytest.approx(truth, rel=0.01) and lo <= truth <= hi
    assert fit.r2() > 0.999 and np.max(np.abs(fit.residuals())) < 0.005


def test_frontier_of_an_isoflop_sweep_takes_the_best_size_per_budget():
    budgets = np.geomspace(1e17, 1.6e18, 5)
    runs = isoflop_runs(budgets)
    frontier = extract_frontier(runs.compute, runs.loss, runs.params)
    assert len(frontier) == 5 and frontier.runs.tolist() == [9] * 5 and frontier.smoothed.all()
    for c, loss, best in zip(frontier.compute, frontier.loss, frontier.best_observed):
        truth = true_optimum(c)
        # The parabola's vertex lands closer to the true optimum than the best sampled size does.
        assert abs(loss - truth) < abs(best - truth) and loss == pytest.approx(truth, rel=1e-3)
    # Without sizes there is no parabola: the best run per budget.
    plain = extract_frontier(runs.compute, runs.loss)
    assert not plain.smoothed.any() and np.allclose(plain.loss, plain.best_observed)


def test_budgets_group_runs_whose_compute_differs_by_rounding():
    compute = np.array([1e18, 1.0004e18, 0.9997e18, 2e18, 2.0001e18, 4e18])
    groups = budget_groups(compute)
    assert [sorted(g.tolist()) for g in groups] == [[0, 1, 2], [3, 4], [5]]


def test_forecast_compute_from_an_isoflop_sweep_predicts_the_optimum_100x_beyond():
    runs = isoflop_runs(np.geomspace(1e17, 1e19, 8), noise=0.002, seed=3)
    f = forecast_compute(runs, 1e21)
    truth = true_optimum(1e21)
    assert f.law == "compute" and not f.warnings
    assert f.prediction == pytest.approx(truth, rel=0.02) and f.low <= truth <= f.high
    out = f.to_json()
    assert {"prediction", "low", "high", "params", "frontier"} <= set(out) and len(out["frontier"]) == 8
    assert set(out["params"]) >= {"a", "b", "c"}


# ------------------------------------------------------------------------------------------------
# L(N, D) on every run


def test_size_law_recovers_exponents_and_predicts_a_held_out_bigger_run():
    rng = np.random.default_rng(2)
    n = np.repeat(np.geomspace(2e7, 4e8, 5), 4)
    d = n * np.tile([10, 20, 40, 80], 5)
    loss = chinchilla(n, d) * (1 + 0.002 * rng.standard_normal(len(n)))
    fit = fit_size_law(n, d, loss)
    assert fit.alpha == pytest.approx(ALPHA, abs=0.05) and fit.beta == pytest.approx(BETA, abs=0.05)
    assert fit.E == pytest.approx(E, abs=0.15) and np.max(np.abs(fit.residuals())) < 0.01
    runs = Runs(6 * n * d, loss, n, d)
    f = forecast_size(runs, 4e9, 8e10)  # 10x the largest size, 25x the largest compute
    truth = float(chinchilla(4e9, 8e10))
    assert f.prediction == pytest.approx(truth, rel=0.02) and f.low <= truth <= f.high
    assert f.law == "size" and f.target["compute"] == pytest.approx(6 * 4e9 * 8e10) and not f.warnings


def test_size_law_leaves_out_runs_far_too_short_for_their_size():
    n = np.repeat(np.geomspace(2e7, 4e8, 5), 4)
    d = n * np.tile([2, 20, 40, 80], 5)  # 2 tokens per parameter: left out by default
    runs = Runs(6 * n * d, chinchilla(n, d), n, d)
    f = forecast_size(runs, 4e9, 8e10)
    assert len(f.used) == 15 and "left out 5 run(s)" in f.notes[0]


# ------------------------------------------------------------------------------------------------
# refusals


def law_points(compute, b=0.12):
    return Runs(np.asarray(compute, float), 2.0 * (np.asarray(compute, float) / 1e17) ** -b + 1.8)


def test_too_few_budgets_is_refused_and_force_returns_the_fit():
    runs = law_points([1e17, 1e18, 1e19])
    with pytest.raises(ForecastError) as info:
        forecast_compute(runs, 1e20)
    assert info.value.codes == ["too_few_points"] and info.value.result is not None
    assert "--force" in str(info.value)
    forced = forecast_compute(runs, 1e20, force=True)
    assert [p.code for p in forced.warnings] == ["too_few_points"] and forced.prediction > 0


def test_a_short_compute_range_or_a_far_target_is_refused():
    with pytest.raises(ForecastError) as info:
        forecast_compute(law_points(np.geomspace(1e18, 2e18, 5)), 1e19)
    assert info.value.codes == ["short_range"] and "span" in str(info.value)
    with pytest.raises(ForecastError) as info:
        forecast_compute(law_points(np.geomspace(1e17, 1e18, 5)), 1e23)  # 10^5x beyond a 10x span
    assert info.value.codes == ["short_range"] and "beyond" in str(info.value)


def test_a_frontier_that_does_not_fall_is_refused():
    compute = np.geomspace(1e17, 1e19, 6)
    runs = Runs(compute, 3.0 + 0.01 * np.log10(compute / 1e17))  # loss creeps up with compute
    with pytest.raises(ForecastError) as info:
        forecast_compute(runs, 1e20)
    assert "not_falling" in info.value.codes


def test_an_exponent_beyond_any_published_fit_is_refused():
    runs = law_points(np.geomspace(1e17, 1e19, 6), b=1.0)
    with pytest.raises(ForecastError) as info:
        forecast_compute(runs, 1e20)
    assert info.value.codes == ["exponent_out_of_range"] and "b = " in str(info.value)


def test_forecast_errors_survive_pickling():
    err = ForecastError([("short_range", "too short")], None)
    back = pickle.loads(pickle.dumps(err))
    assert back.codes == ["short_range"] and str(back) == str(err)
    bad = pickle.loads(pickle.dumps(RunsFileError("row 3: bad", source="x.csv", row=3)))
    assert bad.row == 3 and str(bad) == "x.csv: row 3: bad"


def test_targets_resolve_to_a_law():
    assert resolve_target(compute=1e21) == {"law": "compute", "compute": 1e21}
    assert resolve_target(params=1e9, tokens=2e10)["compute"] == pytest.approx(1.2e20)
    assert resolve_target(compute=1.2e20, params=1e9)["tokens"] == pytest.approx(2e10)
    for bad in ({}, {"params": 1e9}, {"compute": 1e21, "params": 1e9, "tokens": 1e9}, {"compute": -1.0}):
        with pytest.raises(ValueError):
            resolve_target(**bad)


# ------------------------------------------------------------------------------------------------
# input


GOOD = [(1e17, 3.9), (2e17, 3.7), (4e17, 3.55), (8e17, 3.42)]


@pytest.mark.parametrize("rows, header, expected", [
    ([(1e17, 3.9), (2e17, 3.7)], ["compute", "los"], "missing column 'loss'"),
    ([(1e17, 3.9), (2e17, 3.7)], ["cost", "loss"], "'compute' (or 'flops')"),
    ([(1e17, 3.9), (2e17, -3.7), (4e17, 3.5)], ["compute", "loss"], "row 2: 'loss' is -3.7; it must be positive"),
    ([(1e17, 3.9), (2e17, 3.7), (4e17, "nan")], ["compute", "loss"], "row 3: 'loss' is nan"),
    ([(1e17, 3.9), (2e17, "")], ["compute", "loss"], "row 2: no value for 'loss'"),
    ([(1e17, 3.9), ("lots", 3.7)], ["compute", "loss"], "row 2: 'compute' is 'lots', not a number"),
    ([(1e17, 3.9)], ["compute", "loss"], "1 run(s) found"),
    ([(1e17, 3.9), (2e17, 3.7), (4e17, 3.5), (2e17, 3.7)], ["compute", "loss"], "row 4 repeats row 2"),
])
def test_bad_input_names_the_row(tmp_path, rows, header, expected):
    path = write_csv(tmp_path / "runs.csv", header, rows)
    with pytest.raises(RunsFileError) as info:
        read_runs(path)
    assert expected in str(info.value) and str(path) in str(info.value)


def test_runs_read_from_csv_and_json_alike(tmp_path):
    csv_runs = read_runs(write_csv(tmp_path / "r.csv", ["params", "tokens", "loss", "note"],
                                   [(1e6, 2e7, 4.0, "a"), (2e6, 4e7, 3.7, "b")]))
    (tmp_path / "r.json").write_text(json.dumps({"runs": [{"params": 1e6, "tokens": 2e7, "loss": 4.0},
                                                          {"params": 2e6, "tokens": 4e7, "loss": 3.7}]}))
    json_runs = read_runs(tmp_path / "r.json")
    for runs in (csv_runs, json_runs):
        assert runs.has_params_tokens and np.allclose(runs.compute, [1.2e14, 4.8e14])
    (tmp_path / "bad.json").write_text('[{"compute": 1e17, "loss": 3.9}, {"compute": 2e17, "loss": null}]')
    with pytest.raises(RunsFileError, match="run 2: no value for 'loss'"):
        read_runs(tmp_path / "bad.json")


def test_columns_as_files_name_them(tmp_path):
    # Spreadsheet exports and other tools' logs: any case, common aliases, tabs or semicolons.
    (tmp_path / "a.tsv").write_text("N\tD\tLoss\n1e6\t2e7\t4.0\n2e6\t4e7\t3.7\n")
    (tmp_path / "b.csv").write_text("FLOPs;Loss\n1.2e14;4.0\n4.8e14;3.7\n")
    for name in ("a.tsv", "b.csv"):
        runs = read_runs(tmp_path / name)
        assert np.allclose(runs.compute, [1.2e14, 4.8e14]) and np.allclose(runs.loss, [4.0, 3.7])
    (tmp_path / "c.csv").write_text("FLOPs,Val_Loss\n1e17,3.9\nlots,3.7\n")
    with pytest.raises(RunsFileError, match="row 2: 'FLOPs' is 'lots'"):  # the file's own name for it
        read_runs(tmp_path / "c.csv", loss_column="val_loss")


# ------------------------------------------------------------------------------------------------
# curve forecast


def cosine(steps, warmup=50, floor=0.1):
    s = np.arange(steps)
    return np.minimum(1, (s + 1) / warmup) * (floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * s / steps)))


def wsd(steps, warmup=50, decay_from=0.8):
    s = np.arange(steps, dtype=float)
    lr = np.minimum(1, (s + 1) / warmup)
    start = int(decay_from * steps)
    lr[start:] = 1 - (s[start:] - start + 1) / (steps - start)
    return np.maximum(lr, 0)


def law_curve(lr, noise=0.005, seed=0, l0=2.0, a=1.5, alpha=0.5, c=4e-4):
    s1, s2 = annealing_areas(lr)
    clean = l0 + a * s1 ** -alpha - c * s2
    return clean + noise * np.random.default_rng(seed).standard_normal(len(lr)), clean


def test_annealing_areas_follow_the_schedule():
    s1, s2 = annealing_areas(np.full(100, 3e-4))
    assert np.allclose(s1, np.arange(1, 101)) and not s2.any()  # normalized LR; no drop, no annealing
    lr = cosine(400)
    s1, s2 = annealing_areas(lr)
    peak = int(np.argmax(lr))
    assert not s2[:peak + 1].any() and (np.diff(s2[peak:]) >= 0).all() and s2[-1] > 0
    with pytest.raises(ValueError):
        annealing_areas([0.0, 0.0])


def test_curve_forecast_predicts_the_final_loss_of_a_cosine_run():
    lr = cosine(2000)
    noisy, clean = law_curve(lr)
    n = 1000
    f = forecast_curve(np.arange(n), noisy[:n], lr, bootstrap=20)
    assert f.step == 1999 and f.prediction == pytest.approx(clean[-1], rel=0.005)
    assert f.low <= clean[-1] <= f.high and not f.warnings
    assert f.fit.C == pytest.approx(4e-4, rel=0.3)


def test_a_prefix_without_annealing_is_refused_unless_c_is_known():
    lr = wsd(2000)
    noisy, clean = law_curve(lr)
    n = 400  # 20%: the LR has not dropped yet
    with pytest.raises(ForecastError) as info:
        forecast_curve(np.arange(n), noisy[:n], lr, bootstrap=0)
    assert info.value.codes == ["no_annealing_seen"]
    upper = forecast_curve(np.arange(n), noisy[:n], lr, bootstrap=0, force=True)
    assert upper.fit.C == 0 and upper.prediction > clean[-1]  # without the decay's drop: an upper bound
    known = forecast_curve(np.arange(n), noisy[:n], lr, annealing_coef=4e-4, bootstrap=0)
    assert known.prediction == pytest.approx(clean[-1], rel=0.01)


def test_curve_input_is_checked():
    lr = cosine(200)
    with pytest.raises(ValueError):
        forecast_curve(np.arange(50), np.full(50, np.nan), lr)
    with pytest.raises(ValueError):
        forecast_curve(np.arange(300), np.ones(300), lr)  # steps beyond the schedule


# ------------------------------------------------------------------------------------------------
# CLI


@pytest.fixture
def sweep_csv(tmp_path):
    runs = isoflop_runs(np.geomspace(1e17, 1e19, 8), noise=0.002, seed=3)
    return write_csv(tmp_path / "runs.csv", ["params", "tokens", "loss"],
                     [(f"{n:.6g}", f"{d:.6g}", f"{l:.6f}") for n, d, l in zip(runs.params, runs.tokens, runs.loss)])


def invoke(*args):
    from typer.testing import CliRunner

    from stalwart.cli import app

    return CliRunner().invoke(app, ["forecast", "fit", *map(str, args)])


def test_cli_prints_the_forecast_as_text_json_and_a_plot(sweep_csv, tmp_path):
    result = invoke(sweep_csv, "--target-compute", "1e21")
    assert result.exit_code == 0, result.output
    assert "forecast at 1e+21 FLOPs: loss" in result.stdout and "90% interval" in result.stdout
    plot = tmp_path / "out.png"
    result = invoke(sweep_csv, "--target-compute", "1e21", "--json", "--plot", plot)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["low"] <= out["prediction"] <= out["high"] and len(out["frontier"]) == 8
    assert out["prediction"] == pytest.approx(true_optimum(1e21), rel=0.02) and {"a", "b", "c"} <= set(out["params"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_refuses_quietly_bad_fits_and_writes_nothing(tmp_path):
    runs = write_csv(tmp_path / "few.csv", ["compute", "loss"], GOOD[:3])
    plot = tmp_path / "out.png"
    result = invoke(runs, "--target-compute", "1e19", "--plot", plot)
    assert result.exit_code == 1 and "too_few_points" in result.output and not plot.exists()
    result = invoke(runs, "--target-compute", "1e19", "--plot", plot, "--force")
    assert result.exit_code == 0 and "warning (forced): too_few_points" in result.output and plot.exists()


def test_cli_names_the_bad_row_and_the_missing_target(tmp_path):
    bad = write_csv(tmp_path / "bad.csv", ["compute", "loss"], GOOD + [(1.6e18, "nan")])
    result = invoke(bad, "--target-compute", "1e19", "--plot", tmp_path / "p.png")
    assert result.exit_code == 1 and "row 5: 'loss' is nan" in result.output and not (tmp_path / "p.png").exists()
    result = invoke(bad, "--target-params", "1e9")
    assert result.exit_code == 2 and "give a target" in result.output
