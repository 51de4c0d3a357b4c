"""The live forecast band (stalwart.forecast.live) and its keeper in the supervisor
(orchestrator/live_forecast.py), on curves made here: pure, no Ray, no sleeping on time."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from stalwart.forecast import ForecastError
from stalwart.forecast.live import Band, BandWatch, fit_band, schedule_from_points
from stalwart.orchestrator.live_forecast import LiveForecast

N = 1000


def cosine(n=N, warmup=30):
    s = np.arange(n + 1, dtype=float)
    return np.minimum(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * s / n)))


def law_curve(lr, noise=0.01, seed=0):
    """A curve of the law's own family (so the fit is right) with multiplicative noise."""
    s1 = np.cumsum(lr / lr.max())
    rng = np.random.default_rng(seed)
    return (2.0 + 3.0 * s1 ** -0.5) * (1 + noise * rng.standard_normal(len(lr)))


def test_band_covers_the_rest_of_a_healthy_run_and_widens_with_the_reach():
    lr = cosine()
    curve = law_curve(lr)
    steps = np.arange(1, 201)
    band = fit_band(steps, curve[steps], lr)
    assert band.final_step == N and band.fitted_on == [30, 200]  # from the end of the warmup (step 29)
    assert np.isfinite(band.low + band.mid + band.high).all()
    assert band.final_low <= band.final <= band.final_high
    _, lo0, hi0 = band.at(200)
    _, lo1, hi1 = band.at(N)
    assert hi1 - lo1 > hi0 - lo0  # wider the further it reaches
    watch = BandWatch(band)
    told = [w for s in range(1, N + 1) if (w := watch.observe(s, curve[s])) is not None]
    assert told == [] and watch.outside is None and watch.current[0] == N


def test_a_creeping_loss_leaves_the_band_once_and_a_rewind_starts_the_median_afresh():
    lr = cosine()
    curve = law_curve(lr)
    band = fit_band(np.arange(1, 201), curve[1:201], lr)
    creep = curve * (1 + np.clip((np.arange(N + 1) - 500) / 200, 0, None))
    watch = BandWatch(band)
    told = [(s, w) for s in range(1, N + 1) if (w := watch.observe(s, creep[s])) is not None]
    assert len(told) == 1 and told[0][1] == "above" and 500 < told[0][0] < 600
    assert watch.current[1] > watch.current[4]
    watch.observe(400, curve[400])  # a rollback: the next 20 records make a new median before judging
    assert all(watch.observe(s, curve[s]) is None for s in range(401, 420))


def test_an_upper_bound_band_does_not_tell_a_run_that_falls_below_it():
    # Constant LR then a decay in the last 20 %: the first 20 % sees no annealing, so C is left out.
    lr = np.ones(N + 1)
    lr[800:] = np.linspace(1, 0, N + 1 - 800)
    lr[:30] = np.arange(1, 31) / 30
    curve = law_curve(lr)
    band = fit_band(np.arange(1, 201), curve[1:201], lr)
    assert band.upper_bound
    watch = BandWatch(band)
    assert [w for s in range(1, N + 1) if (w := watch.observe(s, curve[s] * 0.8)) is not None] == []


def test_too_few_steps_is_refused_and_bad_schedules_name_the_problem():
    lr = cosine()
    with pytest.raises(ForecastError, match="at least 20"):
        fit_band(np.arange(31, 40), law_curve(lr)[31:40], lr)
    with pytest.raises(ValueError, match="must increase"):
        schedule_from_points([1, 3, 2], [0.1, 0.2, 0.3], 5)
    assert schedule_from_points([1, 3], [1.0, 3.0], 4).tolist() == [1.0, 1.0, 2.0, 3.0, 3.0]


def test_keeper_fits_off_the_report_path_then_watches_and_survives_a_new_controller():
    lr = cosine()
    curve = law_curve(lr)
    events, saved = [], threading.Event()
    keeper = LiveForecast(0.2, lambda kind, msg, **data: events.append((kind, msg, data)), saved.set)
    steps = np.arange(1, N + 1)
    keeper.schedule(steps[::7].tolist() + [N], lr[1:][::7].tolist() + [float(lr[N])])
    for s in range(1, 201):
        keeper.observe(s, float(curve[s]))  # the fit starts on a thread of its own at step 200
    assert saved.wait(60), events
    (kind, msg, data), = events
    assert kind == "forecast_ready" and data["fitted_on"] == [30, 200] and "at step 1000" in msg
    creep = curve * (1 + np.clip((np.arange(N + 1) - 500) / 200, 0, None))
    for s in range(201, N + 1):
        keeper.observe(s, float(creep[s]))
    assert [e[0] for e in events] == ["forecast_ready", "forecast_band_left"]
    assert events[1][2]["direction"] == "above" and keeper.status()["outside"] == "above"
    # A restarted controller gets the band from the stored figures and keeps watching.
    again = LiveForecast(0.2, lambda *a, **k: None, lambda: None, band=keeper.band_json())
    assert again.status()["final_loss"] == pytest.approx(keeper.status()["final_loss"])
    assert Band.from_json(keeper.band_json()).at(1000) == Band.from_json(again.band_json()).at(1000)


def test_keeper_says_why_when_no_forecast_can_be_made():
    events = []
    keeper = LiveForecast(0.2, lambda kind, msg, **data: events.append(kind), lambda: None)
    keeper.schedule([3, 2], [0.1, 0.1])
    assert events == ["forecast_unavailable"]
    keeper.observe(500, 2.0)  # nothing more happens
    assert events == ["forecast_unavailable"] and keeper.status() is None


def test_a_schedule_stated_in_the_spec_is_validated_and_sampled_with_its_kinks():
    from stalwart.errors import SpecError
    from stalwart.spec import JobSpec, LRSchedule

    with pytest.raises(SpecError, match="monitoring.lr_schedule.*warmup_steps"):
        JobSpec.from_dict({"name": "t", "entrypoint": "a:b",
                           "monitoring": {"lr_schedule": {"kind": "cosine", "steps": 100, "warmup_steps": 100}}})
    wsd = LRSchedule(kind="wsd", steps=1000, warmup_steps=100, decay_fraction=0.2)
    assert [wsd.lr_at(s) for s in (50, 100, 500, 820, 910, 1000)] == pytest.approx([0.5, 1, 1, 1, 0.5, 0])
    steps, values = wsd.sampled(points=50)
    assert steps[0] == 1 and steps[-1] == 1000 and {101, 820} <= set(steps)
    lr = schedule_from_points(steps, values, 1000)
    assert lr[820] == pytest.approx(1.0) and lr[910] == pytest.approx(0.5)
    cos = LRSchedule(kind="cosine", steps=1000, min_ratio=0.1)
    assert cos.lr_at(1000) == pytest.approx(0.1) and cos.lr_at(500) == pytest.approx(0.55, abs=0.01)


def test_a_rank_sends_at_most_4096_samples_of_its_schedule_ends_included():
    from stalwart.launchers.context import _lr_samples

    assert _lr_samples(10) == list(range(10))
    big = _lr_samples(1_000_000)
    assert len(big) == 4096 and big[0] == 0 and big[-1] == 999_999 and big == sorted(big)
