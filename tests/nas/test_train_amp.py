"""AMP's loss-scale calibration is not divergence: `nas.train.counts_as_divergence` and fit's use of it.

AMP runs on CUDA only, so the rule is a pure function tested here on its own, then against a real
torch.amp.GradScaler on the CPU (the scaler's arithmetic is the same there), and fit is shown to consult it for
every non-finite step (monkeypatched). benchmarks/gpu_checks.py runs a real AMP fit on a GPU.
"""

import pytest
import torch

from nas import train
from nas.synth import SynthConfig, make_synthetic
from nas.train import AMP_SCALE_FLOOR, MAX_BAD_STEPS, ProxyConfig, TrainingDiverged, counts_as_divergence, fit
from space.builder import build_model
from tests.conftest import tiny_yaml

FAST = {"epochs": 2, "imgsz": 64, "batch": 8, "val_every": 2, "device": "cpu", "quiet": True, "warmup_epochs": 0.5}


def test_a_finite_step_never_counts():
    assert not counts_as_divergence(True, False, None, None)
    assert not counts_as_divergence(True, True, 65536.0, 65536.0)
    assert not counts_as_divergence(True, True, 0.5, 0.5)


def test_without_amp_every_non_finite_step_counts():
    assert counts_as_divergence(False, False, None, None)


def test_with_amp_a_lowered_scale_above_the_floor_is_calibration():
    assert not counts_as_divergence(False, True, 65536.0, 32768.0)  # GradScaler's first overflow
    assert not counts_as_divergence(False, True, 2 * AMP_SCALE_FLOOR, AMP_SCALE_FLOOR)


def test_with_amp_a_non_finite_step_at_the_floor_or_without_a_lowered_scale_counts():
    assert counts_as_divergence(False, True, AMP_SCALE_FLOOR, AMP_SCALE_FLOOR / 2)  # no headroom left: divergence
    assert counts_as_divergence(False, True, 1024.0, 1024.0)  # the scaler did not back off: not its calibration
    assert counts_as_divergence(False, True, None, None)  # scales unknown: counted, as without AMP


def _scaler_steps(overflow_above: float, steps: int) -> tuple[int, int, float]:
    """`steps` optimizer steps of a real GradScaler (on the CPU) whose scaled gradients 'overflow' (are made
    infinite) while its scale is above `overflow_above`, as fp16 gradients do under a too-large loss scale; fit's
    bookkeeping with `counts_as_divergence`. Returns (calibration steps, bad steps counted, final scale)."""
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    bad = calibrating = 0
    for _ in range(steps):
        scaler.scale((weight * 3).sum()).backward()
        if scaler.get_scale() > overflow_above:
            weight.grad.fill_(float("inf"))
        scaler.unscale_(optimizer)
        finite = bool(torch.isfinite(torch.nn.utils.clip_grad_norm_([weight], 10.0)))
        before = None if finite else scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if finite:
            bad = 0
        elif counts_as_divergence(finite, True, before, scaler.get_scale()):
            bad += 1
            if bad >= MAX_BAD_STEPS:
                raise TrainingDiverged(f"{bad} bad steps")
        else:
            calibrating += 1
    return calibrating, bad, scaler.get_scale()


def test_a_real_grad_scalers_calibration_does_not_count():
    # 2**16 down to 2**10: six overflowing steps in a row, more than MAX_BAD_STEPS, then finite ones
    calibrating, bad, scale = _scaler_steps(overflow_above=1024.0, steps=10)
    assert calibrating == 6 > MAX_BAD_STEPS and bad == 0 and scale == 1024.0


def test_gradients_that_overflow_at_any_scale_still_diverge():
    # the scale halves 16 times (2**16 -> 1) as calibration, then MAX_BAD_STEPS more at the floor raise
    with pytest.raises(TrainingDiverged, match=f"{MAX_BAD_STEPS} bad steps"):
        _scaler_steps(overflow_above=0.0, steps=16 + MAX_BAD_STEPS)
    calibrating, bad, _ = _scaler_steps(overflow_above=0.0, steps=16 + MAX_BAD_STEPS - 1)
    assert (calibrating, bad) == (16, MAX_BAD_STEPS - 1)


@pytest.fixture
def tiny_data(tmp_path, monkeypatch):
    monkeypatch.setenv("REPNAS_CACHE_DIR", str(tmp_path / "cache"))
    return make_synthetic(tmp_path / "shapes", SynthConfig(images=24, classes=3, imgsz=64, seed=3))


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # every step was skipped
def test_fit_asks_the_rule_about_every_non_finite_step(tiny_data, monkeypatch):
    model = build_model(tiny_yaml(nc=3))
    weight = model.model[0].rbr_dense.conv.weight
    weight.register_hook(lambda grad: grad * float("inf"))  # every step's gradients are non-finite
    calls = []

    def calibration(*args):
        calls.append(args)
        return False  # as if each were AMP calibrating

    monkeypatch.setattr(train, "counts_as_divergence", calibration)
    result = fit(model, tiny_data, ProxyConfig(**FAST))  # no TrainingDiverged: the rule said none counts
    last = result.history[-1]
    assert len(calls) == last["skipped_steps"] == last["calibration_steps"] > MAX_BAD_STEPS
    assert set(calls) == {(False, False, None, None)}  # a CPU run: no AMP, no scale
    assert last["grad_scale"] is None
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    monkeypatch.setattr(train, "counts_as_divergence", counts_as_divergence)  # the real rule: the run diverges
    model = build_model(tiny_yaml(nc=3))
    model.model[0].rbr_dense.conv.weight.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(TrainingDiverged, match=f"non-finite for {MAX_BAD_STEPS} steps in a row"):
        fit(model, tiny_data, ProxyConfig(**FAST))
