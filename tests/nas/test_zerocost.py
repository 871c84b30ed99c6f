"""Training-free scores (nas/zerocost.py): hand-computed values, seeds, width, and the model left untouched."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nas.data import load_data_config
from nas.synth import SynthConfig, make_synthetic
from nas.zerocost import entropy_score, grad_norm_score, sample_batch, score_arch, synflow_score
from space.builder import build_model
from space.searchspace import parse_space
from tests.conftest import randomize_batchnorm, tiny_yaml
from tests.nas.study.data.old_assets import BASELINE, TINY_SPACE


def _tiny(nc: int = 2, width_multiple: float = 1.0, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(tiny_yaml(nc) | {"width_multiple": width_multiple})


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REPNAS_CACHE_DIR", str(tmp_path / "cache"))  # the label cache of sample_batch


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return load_data_config(make_synthetic(tmp_path_factory.mktemp("zc"), SynthConfig(images=16, classes=2,
                                                                                        imgsz=64)))


def test_synflow_of_a_hand_made_network_is_its_hand_computed_value():
    # 1x1 convs 3 -> 2 -> 1 on a 2x2 all-ones input. With |w|: hidden channel j = row sum a_j = (6, 1.5) per pixel,
    # output = 2 * 6 + 4 * 1.5 = 18 per pixel, R = 4 pixels * 18 = 72. Each bias-free layer contributes
    # sum |theta * dR/dtheta| = R (R is linear in each layer's weights), so the score is 2 R = 144.
    # The BatchNorm (random statistics) must count as removed and the ReLU passes positives unchanged.
    net = nn.Sequential(nn.Conv2d(3, 2, 1, bias=False), nn.BatchNorm2d(2), nn.ReLU(), nn.Conv2d(2, 1, 1, bias=False))
    randomize_batchnorm(net)
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, -1.0]]).view(2, 3, 1, 1))
        net[3].weight.copy_(torch.tensor([[-2.0, 4.0]]).view(1, 2, 1, 1))
    assert synflow_score(net, 2) == pytest.approx(144.0, rel=1e-12)


def test_synflow_grows_with_input_size_as_the_output_sum_does():
    net = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.Conv2d(4, 1, 1, bias=False))
    assert synflow_score(net, 4) == pytest.approx(4 * synflow_score(net, 2), rel=1e-12)  # 16 vs 4 pixels


def test_entropy_is_deterministic_for_a_seed_and_differs_for_another():
    model = _tiny()
    a, b, c = entropy_score(model, 64, seed=0), entropy_score(model, 64, seed=0), entropy_score(model, 64, seed=1)
    assert a == b
    assert a != c
    assert math.isfinite(a) and math.isfinite(c)


def test_entropy_does_not_depend_on_the_models_own_weights():
    # MAE-DET draws fresh Gaussian weights: two initialisations of one architecture score the same
    assert entropy_score(_tiny(seed=0), 64, seed=3) == entropy_score(_tiny(seed=1), 64, seed=3)


def test_a_wider_model_has_a_higher_entropy():
    narrow, wide = _tiny(width_multiple=1.0), _tiny(width_multiple=2.0)
    for seed in (0, 1):
        assert entropy_score(wide, 64, seed=seed) > entropy_score(narrow, 64, seed=seed) + 1.0


def test_a_deeper_backbone_has_a_higher_entropy():
    shallow = tiny_yaml(2)
    deep = tiny_yaml(2)
    deep["backbone"][3] = [-1, 4, "RepVGGBlock", [32, 3, 1]]  # P3: 2 -> 4 stride-1 blocks; indices unchanged
    torch.manual_seed(0)
    s, d = build_model(shallow), build_model(deep)
    assert entropy_score(d, 64) > entropy_score(s, 64)


def test_entropy_refuses_a_backbone_without_repvgg_stages():
    cfg = tiny_yaml(2)
    cfg["backbone"][0] = [-1, 1, "Conv", [16, 3, 2]]
    with pytest.raises(ValueError, match="RepVGG"):
        entropy_score(build_model(cfg), 64)


def test_grad_norm_is_positive_and_finite_on_a_synthetic_batch(data):
    images, targets = sample_batch(data, 64, batch=4, seed=0)
    assert images.shape == (4, 3, 64, 64) and images.dtype == torch.float32 and float(images.max()) <= 1.0
    assert targets.shape[1] == 6 and len(targets) > 0
    score = grad_norm_score(_tiny(), images, targets)
    assert math.isfinite(score) and score > 0
    assert grad_norm_score(_tiny(), images, targets) == score  # same weights, same batch: same score


def test_scoring_leaves_the_model_unchanged(data):
    model = _tiny()
    randomize_batchnorm(model)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, targets = sample_batch(data, 64, batch=4, seed=0)
    entropy_score(model, 64)
    synflow_score(model, 64)
    grad_norm_score(model, images, targets)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights, signs, BatchNorm statistics
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_score_arch_is_deterministic_for_a_seed_and_differs_for_another(data):
    space = parse_space(TINY_SPACE, "tiny")
    a = score_arch(BASELINE, space, data, imgsz=64, seed=0)
    b = score_arch(BASELINE, space, data, imgsz=64, seed=0)
    c = score_arch(BASELINE, space, data, imgsz=64, seed=1)
    keys = ("params", "gflops_deploy", "entropy", "synflow", "grad_norm")
    assert [a[k] for k in keys] == [b[k] for k in keys]
    assert all(a[k] != c[k] for k in ("entropy", "synflow", "grad_norm"))  # other weights, inputs, minibatch
    assert (a["params"], a["gflops_deploy"]) == (c["params"], c["gflops_deploy"])
    assert a["params"] > 0 and a["synflow"] > 0 and a["grad_norm"] > 0
    assert set(a["ms"]) == {"cost", "build", "batch", "entropy", "synflow", "grad_norm"}


def test_score_arch_ranks_a_wider_arch_higher_on_params_and_entropy(data):
    space = parse_space(TINY_SPACE, "tiny")
    wide = BASELINE | {f"P{k}_width": 16 for k in range(1, 6)}
    narrow_scores = score_arch(BASELINE, space, data, imgsz=64)
    wide_scores = score_arch(wide, space, data, imgsz=64)
    assert wide_scores["params"] > narrow_scores["params"]
    assert wide_scores["entropy"] > narrow_scores["entropy"]
