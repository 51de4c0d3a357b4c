"""Unit tests for stalwart.monitoring.trend (pure logic: no Ray, no torch, no sleeping), on the
labelled cases of bench/divergence_cases.py."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from divergence_cases import BENIGN, DEADLINE, first_alarm, make_case  # noqa: E402

from stalwart.monitoring.trend import TrendConfig, TrendDetector  # noqa: E402

SEEDS = range(20)


def test_config_is_validated_and_names_the_knob():
    with pytest.raises(ValueError, match="warmup_blocks must be >= window"):
        TrendConfig(warmup_blocks=5)
    with pytest.raises(ValueError, match="min_rise <= loss_only_rise"):
        TrendConfig(min_rise=0.2, loss_only_rise=0.1)
    with pytest.raises(ValueError, match="min_grad_ratio"):
        TrendConfig(min_grad_ratio=0.5)


@pytest.mark.parametrize("case,least", [("creep_linear", 0.9), ("creep_accelerating", 0.6)])
def test_creeping_divergence_is_caught_within_100_steps_and_dated_before_it(case, least):
    hits = 0
    for seed in SEEDS:
        c = make_case(case, seed)
        step, onset_step = first_alarm(TrendDetector(), c)
        assert step is None or step >= c["onset"], f"seed {seed}: alarm at {step}, before the onset {c['onset']}"
        if step is not None and step - c["onset"] <= DEADLINE:
            hits += 1
            # The rollback goes to a checkpoint before onset_step: it may be a little late (the rise starts
            # slowly), never far.
            assert onset_step <= c["onset"] + 25, (seed, onset_step, c["onset"])
    assert hits / len(SEEDS) >= least


@pytest.mark.parametrize("case", [b for b in BENIGN if b != "rewarmup_no_lr"])
def test_benign_changes_raise_no_alarm(case):
    for seed in SEEDS:
        step, _ = first_alarm(TrendDetector(), make_case(case, seed))
        assert step is None, f"{case} seed {seed}: false alarm at step {step}"


def test_a_rising_lr_explains_a_rising_loss():
    # The same re-warmup bumps: with the LR reported nothing fires; without it, some look like a divergence.
    with_lr = sum(first_alarm(TrendDetector(), make_case("rewarmup", s))[0] is not None for s in SEEDS)
    without = [make_case("rewarmup", s) | {"lr": None} for s in SEEDS]
    assert with_lr == 0
    assert sum(first_alarm(TrendDetector(), c)[0] is not None for c in without) >= 1


def _ramp(n=900, onset=400, rise=0.5, over=250, grad=True):
    rng = np.random.default_rng(7)
    t = np.arange(n, dtype=float)
    mult = 1 + rise * np.clip((t - onset) / over, 0, None)
    loss = 2.0 * mult * (1 + 0.01 * rng.standard_normal(n))
    g = 0.5 * mult ** 4 * np.exp(0.1 * rng.standard_normal(n))
    return loss, (g if grad else None)


def test_one_divergence_is_told_once_and_a_rewind_starts_afresh():
    loss, g = _ramp()
    det = TrendDetector()
    found = [d for s in range(len(loss)) if (d := det.update(s, loss[s], g[s], 1e-3)) is not None]
    assert len(found) == 1 and 400 <= found[0].step <= 500
    assert found[0].rise >= 0.03 and found[0].grad_ratio >= 1.2 and "over its lowest" in found[0].reason
    # Training resumed from a checkpoint (the step goes back): the warm-up starts again, no alarm on
    # the healthy stretch that follows.
    again = [det.update(s, loss[s], g[s], 1e-3) for s in range(100, 400)]
    assert not any(again)


def test_loss_only_needs_a_larger_rise_and_non_finite_records_are_ignored():
    loss, _ = _ramp(rise=0.5)
    det = TrendDetector()
    found = None
    for s in range(len(loss)):
        det.update(2 * s, float("nan"), None)  # skipped: the NaN check has them
        found = found or det.update(2 * s + 1, loss[s], None, None)
    assert found is not None and found.grad_ratio is None and found.rise >= TrendConfig().loss_only_rise


def test_cost_per_update_is_a_few_microseconds():
    import time

    loss, g = _ramp(n=5000, onset=10**9)
    det = TrendDetector()
    t0 = time.perf_counter()
    for s in range(len(loss)):
        det.update(s, loss[s], g[s], 1e-3)
    assert (time.perf_counter() - t0) / len(loss) < 200e-6  # generous: a loaded shared machine
