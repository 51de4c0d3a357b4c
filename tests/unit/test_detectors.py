"""Unit tests for stalwart.monitoring.detectors (pure logic, no Ray, no torch, no sleeping)."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from stalwart.monitoring.detectors import (
    HangWatch,
    Spike,
    SpikeConfig,
    SpikeDetector,
    StragglerDetector,
    _sorted_mad,
    derive_hang_timeout,
    is_nonfinite,
)

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _noise(rng: np.random.Generator, kind: str, n: int) -> np.ndarray:
    if kind == "gauss":
        return rng.standard_normal(n)
    if kind == "student3":  # heavy tails, unit variance
        return rng.standard_t(3, n) / math.sqrt(3.0)
    e = rng.standard_normal(n)  # gauss plus rare one-record outliers (hard batches)
    hit = rng.random(n) < 0.005
    e[hit] += rng.uniform(3.0, 8.0, hit.sum())
    return e


def curve(seed: int, n: int = 2000, shape: str = "fast_fall", noise: str = "gauss", level: float = 0.01,
          grad: bool = True) -> tuple[list[float], list[float] | None]:
    """A healthy run: loss with multiplicative noise at relative `level`; grad norm in log space."""
    rng = np.random.default_rng(seed)
    t = np.arange(n, dtype=float)
    if shape == "fast_fall":  # 11 -> ~2.3 within a few dozen steps, then a slow decline
        base = 2.0 + 8.5 * np.exp(-t / 25.0) + 0.6 * np.exp(-t / 800.0)
    elif shape == "plateau":  # flat after a slow decline
        base = 2.5 + 0.3 * np.exp(-t / 400.0)
    else:
        raise ValueError(shape)
    loss = base * (1 + level * _noise(rng, noise, n))
    if not grad:
        return loss.tolist(), None
    log_g = math.log(0.3) + 1.5 * np.exp(-t / 60.0) + 0.15 * _noise(rng, noise, n)
    return loss.tolist(), np.exp(log_g).tolist()


def feed(det: SpikeDetector, losses, grads=None, start: int = 0) -> list[Spike]:
    grads = grads if grads is not None else [None] * len(losses)
    out = []
    for i, (lo, g) in enumerate(zip(losses, grads)):
        s = det.update(start + i, lo, g)
        if s is not None:
            out.append(s)
    return out


def with_spike(losses, grads, onset: int, peak: float, duration: int, grad_lead: int | None):
    """Multiply a spike into copies of the curves; grad_lead None leaves the grad norm alone.

    Loss excess: up to `peak` on the first record, then linearly down over `duration` records.
    Grad norm: climbs x10 per record from `onset - grad_lead`, stays up through the spike.
    """
    lo = list(losses)
    for i in range(duration):
        lo[onset + i] *= 1 + (peak - 1) * (duration - i) / duration
    g = None if grads is None else list(grads)
    if g is not None and grad_lead is not None:
        for i in range(grad_lead + duration):
            g[onset - grad_lead + i] *= 10.0 ** min(i + 1, 3)
    return lo, g


# --------------------------------------------------------------------------------------------
# is_nonfinite
# --------------------------------------------------------------------------------------------


def test_is_nonfinite():
    assert not is_nonfinite(2.3)
    assert not is_nonfinite(2.3, None)
    assert not is_nonfinite(np.float32(2.3), np.float64(0.5))
    assert is_nonfinite(float("nan"))
    assert is_nonfinite(float("inf"), 1.0)
    assert is_nonfinite(1.0, float("-inf"))
    assert is_nonfinite(1.0, np.float16("nan"))
    assert is_nonfinite(None)
    assert is_nonfinite("not a number")


# --------------------------------------------------------------------------------------------
# SpikeDetector: healthy curves never fire
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("noise", ["gauss", "student3", "outliers"])
@pytest.mark.parametrize("level", [0.003, 0.01, 0.03])
@pytest.mark.parametrize("shape", ["fast_fall", "plateau"])
def test_healthy_noisy_curves_do_not_fire(shape, level, noise):
    for seed in range(3):
        losses, grads = curve(seed, shape=shape, noise=noise, level=level, grad=seed != 2)
        det = SpikeDetector()
        assert feed(det, losses, grads) == [], (shape, level, noise, seed)
        assert det.healthy_stats()["spikes"] == 0


def test_fast_fall_at_start_does_not_fire_even_with_short_warmup():
    # The loss falls 11 -> 2 with a time constant of 10 steps; judged from step 8 on.
    t = np.arange(600)
    rng = np.random.default_rng(0)
    losses = ((2.0 + 9.0 * np.exp(-t / 10.0)) * (1 + 0.005 * rng.standard_normal(600))).tolist()
    grads = np.exp(2.0 * np.exp(-t / 10.0) + 0.1 * rng.standard_normal(600)).tolist()
    det = SpikeDetector(SpikeConfig(warmup_steps=8))
    assert feed(det, losses, grads) == []
    assert det.score < 1.0


def test_slow_plateau_and_slow_upward_drift_do_not_fire():
    rng = np.random.default_rng(1)
    t = np.arange(5000)
    drift = (2.0 * (1 + 0.1 * t / 5000) * (1 + 0.01 * rng.standard_normal(5000))).tolist()
    assert feed(SpikeDetector(), drift) == []
    flat = (2.0 + 0.002 * rng.standard_normal(5000)).tolist()  # very smooth: MAD is tiny
    assert feed(SpikeDetector(), flat) == []


# --------------------------------------------------------------------------------------------
# SpikeDetector: spikes are caught, with the right onset
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("peak", [1.6, 2.0, 3.0])
@pytest.mark.parametrize("duration", [3, 10, 40])
@pytest.mark.parametrize("mode", ["grad_first", "together", "loss_only"])
def test_spikes_are_detected_with_onset(peak, duration, mode):
    losses, grads = curve(7, n=1200, level=0.01, grad=mode != "loss_only")
    onset = 900
    lead = {"grad_first": 2, "together": 0, "loss_only": None}[mode]
    lo, g = with_spike(losses, grads, onset, peak, duration, lead)
    spikes = feed(SpikeDetector(), lo, g)
    assert len(spikes) == 1, spikes
    s = spikes[0]
    first = onset - (lead or 0)
    assert s.onset_step == first
    # Corroborated by the grad norm, 2 strong records suffice (with a lead they are already
    # there when the loss jumps); the loss alone needs 3.
    assert s.step == onset + {"grad_first": 0, "together": 1, "loss_only": 2}[mode]
    assert s.score >= 1.0
    assert "loss" in s.reason


def test_grad_norm_first_real_bloom_excerpt():
    # BLOOM-176B chronicles (bigscience-workshop/bigscience, train/tr11-176B-ml/chronicles.md),
    # iterations 31214-31222, after a synthetic healthy prefix at the same level.
    real = [(31214, 2.198845, 0.242), (31215, 2.220424, 0.947), (31216, 2.595213, 2.390),
            (31217, 2.241558, 15.886), (31218, 2.345279, 145.119), (31219, 5.098124, 960.351),
            (31220, 3.492029, 353.201)]
    rng = np.random.default_rng(3)
    det = SpikeDetector()
    for i in range(300):
        assert det.update(31214 - 300 + i, 2.2 * (1 + 0.006 * rng.standard_normal()),
                          0.24 * math.exp(0.2 * rng.standard_normal())) is None
    spikes = [s for st, lo, g in real if (s := det.update(st, lo, g)) is not None]
    assert len(spikes) == 1
    assert spikes[0].onset_step == 31215  # the grad norm moved one record before the loss
    assert spikes[0].step == 31216


def test_onset_is_first_elevated_record_of_a_ramp():
    losses, _ = curve(11, n=800, level=0.005, grad=False)
    lo = list(losses)
    for i, m in enumerate([1.05, 1.15, 1.4, 2.0, 2.5, 2.0]):  # a gradual climb
        lo[600 + i] *= m
    spikes = feed(SpikeDetector(), lo)
    assert len(spikes) == 1
    assert spikes[0].onset_step == 600
    assert 602 <= spikes[0].step <= 604


# --------------------------------------------------------------------------------------------
# SpikeDetector: patience, grad-only bursts, baseline pollution, NaN
# --------------------------------------------------------------------------------------------


def _flat(n=400, seed=0, level=0.005):
    rng = np.random.default_rng(seed)
    return (2.0 * (1 + level * rng.standard_normal(n))).tolist()


@pytest.mark.parametrize("run", [1, 2])
def test_short_loss_only_bursts_are_not_spikes(run):
    lo = _flat()
    for i in range(run):
        lo[300 + i] = 4.0
    assert feed(SpikeDetector(), lo) == []


def test_third_consecutive_loss_record_confirms_without_grad():
    lo = _flat()
    lo[300:303] = [4.0, 4.0, 4.0]
    spikes = feed(SpikeDetector(), lo)
    assert [(s.onset_step, s.step) for s in spikes] == [(300, 302)]


def test_patience_is_configurable():
    lo = _flat()
    lo[300:303] = [4.0, 4.0, 4.0]
    assert feed(SpikeDetector(SpikeConfig(patience=4, loss_only_patience=4)), lo) == []
    lo[303] = 4.0
    spikes = feed(SpikeDetector(SpikeConfig(patience=4, loss_only_patience=4)), lo)
    assert [(s.onset_step, s.step) for s in spikes] == [(300, 303)]


def test_grad_only_burst_does_not_fire_unless_asked():
    lo = _flat()
    g = [0.3] * 400
    g[300:305] = [30.0] * 5
    assert feed(SpikeDetector(), lo, g) == []
    spikes = feed(SpikeDetector(SpikeConfig(require_loss=False)), lo, g)
    assert [(s.onset_step, s.step) for s in spikes] == [(300, 301)]


def test_grad_jump_after_a_single_loss_outlier_is_not_corroboration():
    lo, g = _flat(), [0.3] * 400
    lo[300] = 3.0          # one hard batch...
    g[301] = 3.0           # ...whose gradient echo follows it
    assert feed(SpikeDetector(), lo, g) == []


def test_spiky_records_do_not_pollute_the_baseline():
    lo = _flat(n=700)
    for i in range(300, 340):  # a 40-record plateau at 2x
        lo[i] *= 2.0
    for i in range(500, 504):  # a second, later spike
        lo[i] *= 1.8
    det = SpikeDetector()
    spikes = feed(det, lo[:340])
    assert len(spikes) == 1
    assert det.anomalous and det.in_spike
    assert abs(det.healthy_stats()["loss_median"] - 2.0) < 0.05
    spikes = feed(det, lo[340:], start=340)
    assert [s.onset_step for s in spikes] == [500]
    stats = det.healthy_stats()
    assert not stats["anomalous"] and stats["spikes"] == 2


def test_permanent_shift_is_accepted_after_rebaseline():
    lo = _flat(n=1200)
    for i in range(300, 1200):
        lo[i] *= 1.5
    det = SpikeDetector(SpikeConfig(rebaseline_after=100))
    spikes = feed(det, lo)
    assert len(spikes) == 1
    assert not det.anomalous
    assert abs(det.healthy_stats()["loss_median"] - 3.0) < 0.05


def test_nan_records_are_ignored():
    lo = _flat()
    det = SpikeDetector()
    feed(det, lo[:200])
    before = det.state_dict()
    assert det.update(200, float("nan"), 1.0) is None
    assert det.update(200, float("inf")) is None
    assert det.state_dict()["loss"] == before["loss"]
    assert det.healthy_stats()["last_step"] == 199
    # a non-finite or non-positive grad norm is treated as absent
    assert det.update(200, lo[200], float("nan")) is None
    assert det.update(201, lo[201], 0.0) is None


def test_warmup_and_score():
    det = SpikeDetector(SpikeConfig(warmup_steps=20))
    for i in range(20):
        assert det.update(i, 100.0 if i == 10 else 2.0) is None  # even a huge value: warming up
        assert det.score == 0.0
    assert det.healthy_stats()["warm"] and det.healthy_stats()["records"] == 20
    det.update(20, 2.0)
    det.update(21, 3.0)
    assert det.score > 1.0


def test_rewind_clears_the_run():
    lo = _flat()
    lo[300:303] = [4.0, 4.0, 4.0]
    det = SpikeDetector()
    assert len(feed(det, lo[:303])) == 1 and det.in_spike
    det.update(250, lo[250])  # resumed from a checkpoint at step 249
    assert not det.in_spike and not det.anomalous


def test_healthy_stats_shape():
    det = SpikeDetector()
    stats = det.healthy_stats()
    assert stats["last_step"] is None and stats["loss_median"] is None and not stats["warm"]
    losses, grads = curve(0, n=300)
    feed(det, losses, grads)
    stats = det.healthy_stats()
    assert set(stats) >= {"last_step", "loss_median", "loss_mad", "grad_norm_median", "anomalous", "score"}
    assert stats["last_step"] == 299 and stats["warm"] and not stats["anomalous"]
    assert stats["loss_mad"] > 0 and 0.1 < stats["grad_norm_median"] < 1.0
    json.dumps(stats)


# --------------------------------------------------------------------------------------------
# SpikeDetector: persistence, config, cost
# --------------------------------------------------------------------------------------------


# Grad norm up from 898, loss from 900 (confirmed there). Cut while healthy, inside the
# anomalous run before confirmation, and inside the confirmed spike.
@pytest.mark.parametrize("cut, spikes_after", [(200, 1), (899, 1), (905, 0)])
def test_state_dict_roundtrip(cut, spikes_after):
    losses, grads = curve(5, n=1200)
    lo, g = with_spike(losses, grads, 900, 2.0, 20, 2)
    a = SpikeDetector()
    feed(a, lo[:cut], g[:cut])
    b = SpikeDetector()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.state_dict() == a.state_dict()
    out_a = [(a.update(i, lo[i], g[i]), a.score) for i in range(cut, 1200)]
    out_b = [(b.update(i, lo[i], g[i]), b.score) for i in range(cut, 1200)]
    assert out_a == out_b
    assert sum(s is not None for s, _ in out_a) == spikes_after
    if cut == 899:
        assert next(s for s, _ in out_a if s is not None).onset_step == 898


def test_load_rejects_unknown_version():
    with pytest.raises(ValueError):
        SpikeDetector().load_state_dict({"version": 99})


@pytest.mark.parametrize("bad", [
    {"window": 4}, {"warmup_steps": 2}, {"patience": 0}, {"patience": 3, "loss_only_patience": 2},
    {"onset_threshold": 7.0}, {"peak_threshold": 5.0}, {"min_grad_ratio": 0.5}, {"level_window": 200},
])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        SpikeConfig(**bad)


def test_sorted_mad_matches_brute_force():
    rng = random.Random(0)
    for _ in range(2000):
        n = rng.randint(1, 30)
        s = sorted(rng.choice([rng.random(), round(rng.random(), 1)]) for _ in range(n))
        m = rng.choice([s[n // 2], rng.random(), s[0] - 1.0])
        assert _sorted_mad(s, m) == pytest.approx(sorted(abs(x - m) for x in s)[n // 2])


# --------------------------------------------------------------------------------------------
# StragglerDetector
# --------------------------------------------------------------------------------------------


def _round(det, step, times):
    out = None
    for rank, t in enumerate(times):
        out = det.update(rank, step, t)
    return out


def test_straggler_flagged_after_patience_and_cleared():
    det = StragglerDetector(factor=1.5, patience=3)
    assert _round(det, 0, [1.0, 1.0, 1.0, 1.0]) == frozenset()
    assert _round(det, 1, [1.0, 1.0, 1.8, 1.0]) == frozenset()
    assert _round(det, 2, [1.0, 1.0, 1.8, 1.0]) == frozenset()
    assert _round(det, 3, [1.0, 1.1, 1.8, 0.9]) == frozenset({2})
    rep = det.report()
    assert rep.stragglers == frozenset({2})
    assert rep.ratios[2] == pytest.approx(1.8)
    assert rep.ratios[0] == pytest.approx(1.0 / 1.1)
    assert _round(det, 4, [1.0, 1.0, 1.2, 1.0]) == frozenset()


def test_straggler_needs_consecutive_observations():
    det = StragglerDetector(factor=1.5, patience=2)
    _round(det, 0, [1.0, 1.0, 2.0])
    _round(det, 1, [1.0, 1.0, 1.0])
    assert _round(det, 2, [1.0, 1.0, 2.0]) == frozenset()
    assert _round(det, 3, [1.0, 1.0, 2.0]) == frozenset({2})


def test_straggler_two_ranks_and_bad_input():
    det = StragglerDetector(factor=1.5, patience=1)
    assert det.update(0, 0, 1.0) == frozenset()  # alone: nothing to compare with
    assert det.update(1, 0, 2.0) == frozenset({1})
    assert det.update(1, 0, 1.0) == frozenset({1})  # same step again: ignored
    assert det.update(1, 1, float("nan")) == frozenset({1})
    det.forget(1)
    assert det.stragglers == frozenset() and set(det.ratios()) == {0}


# --------------------------------------------------------------------------------------------
# Hangs
# --------------------------------------------------------------------------------------------


def test_derive_hang_timeout():
    assert derive_hang_timeout([]) == 60.0
    assert derive_hang_timeout([1.0, 2.0, 3.0]) == 60.0
    assert derive_hang_timeout([10.0, 100.0, 12.0]) == 120.0
    assert derive_hang_timeout([10.0, float("nan"), 12.0, -1.0], floor_s=5.0, factor=2.0) == 22.0


def test_hang_watch_with_injected_time():
    w = HangWatch(floor_s=60.0, factor=10.0, startup_s=300.0)
    w.start([0, 1], now=0.0)
    assert w.stalled(200.0) == set()          # startup grace
    assert w.stalled(301.0) == {0, 1}
    t = 0.0
    for step in range(1, 11):                 # 20 s steps on both ranks
        t += 20.0
        w.progress(0, step, t)
        w.progress(1, step, t)
    assert w.timeout_s == 200.0               # 10 x the 20 s median
    w.progress(0, 11, t + 20.0)
    w.progress(1, 10, t + 20.0)               # same step again: not progress
    assert w.stalled(t + 150.0) == set()
    assert w.stalled(t + 201.0) == {1}
    w.touch(1, t + 201.0)                     # e.g. saving a checkpoint
    assert w.stalled(t + 210.0) == set()
    w.progress(1, 3, t + 500.0)               # resumed from an earlier checkpoint: progress
    assert 1 not in w.stalled(t + 600.0)
    assert w.silence(t + 600.0)[1] == pytest.approx(100.0)
    w.forget(0)
    assert set(w.silence(t)) == {1}


def test_hang_watch_fixed_timeout():
    w = HangWatch(timeout_s=5.0, startup_s=1.0)
    w.progress(3, 0, now=100.0)
    w.progress(3, 1, now=101.0)
    assert w.timeout_s == 5.0
    assert w.stalled(105.5) == set()
    assert w.stalled(106.5) == {3}
    with pytest.raises(ValueError):
        HangWatch(timeout_s=0)


def test_time_the_watcher_stood_still_is_no_ranks_silence():
    from stalwart.orchestrator.freezes import FreezeWatch

    watch = HangWatch(4.0)
    watch.start([0, 1], now=0.0)
    watch.progress(0, 1, now=1.0)
    watch.progress(1, 1, now=1.0)
    freezes = FreezeWatch(tick_s=0.25, freeze_s=2.0, clock=lambda: 0.0)
    freezes.note(1.0, 1.25)  # a normal wake
    freezes.note(1.25, 12.0)  # the process stood still in between
    new, seen = freezes.since(0)
    assert seen == 1 and new == [(1.5, pytest.approx(10.5))]  # began by a tick after the last wake
    watch.progress(0, 2, now=12.1)  # rank 0's report, heard once it ran again
    assert watch.stalled(12.2) == {0, 1} - {0}  # without the pause: rank 1 silent for 11 s
    for began_by, seconds in new:
        watch.pause(seconds, before=began_by)
    assert watch.stalled(12.2) == set() and watch.silence(12.2)[1] == pytest.approx(0.7)
    assert watch.silence(12.2)[0] == pytest.approx(0.1)  # heard after the freeze: not moved
    assert watch.stalled(16.0) == {1}  # a rank that stays silent is still found
    assert freezes.since(seen) == ([], 1)
    assert not freezes.unsure(13.0)  # not started: nothing to be unsure of
