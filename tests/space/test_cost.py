"""Parameters and FLOPs (space/cost.py): counts against hand-computed figures, the built and deploy (fused) forms of a
RepVGG model, and the one-line error for a model that does not run at an input size."""

from __future__ import annotations

import pytest
from torch import nn

from pruning.reparam import fuse_model
from space.builder import build_model
from space.cost import ModelCost, cfg_cost, count_gflops, count_params, is_deploy, model_cost
from space.errors import ModelConfigError
from tests.conftest import tiny_yaml


def test_count_params_counts_every_weight_and_bias():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)  # 8 x 3 x 3 x 3
    assert count_params(conv) == 216
    assert count_params(nn.Sequential(conv, nn.BatchNorm2d(8))) == 216 + 2 * 8  # BatchNorm: weight and bias
    assert count_params(nn.Conv2d(3, 8, 1)) == 8 * 3 + 8


def test_count_gflops_is_twice_the_multiply_accumulates_of_a_conv():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    macs = 8 * 64 * 64 * (3 * 3 * 3)  # one MAC per output element per kernel weight
    assert count_gflops(conv, 64) == pytest.approx(2 * macs / 1e9, rel=1e-9)
    strided = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)  # 32 x 32 outputs
    assert count_gflops(strided, 64) == pytest.approx(2 * 8 * 32 * 32 * 27 / 1e9, rel=1e-9)
    assert count_gflops(conv, (64, 32)) == pytest.approx(count_gflops(conv, 64) / 2, rel=1e-9)  # (h, w)
    with pytest.raises(ValueError, match="imgsz must be positive"):
        count_gflops(conv, 0)


def test_model_cost_of_a_built_repvgg_model_and_of_its_fused_form():
    model = build_model(tiny_yaml(2))
    cost = model_cost(model, 64)
    assert cost.imgsz == (64, 64) and cost.params == count_params(model)
    assert cost.params_deploy < cost.params  # the 1x1 and identity branches and the BatchNorms fold away
    assert cost.gflops_deploy < cost.gflops
    fused = fuse_model(model)
    assert model_cost(fused, 64) == ModelCost(cost.params_deploy, cost.gflops_deploy, cost.params_deploy,
                                              cost.gflops_deploy, (64, 64))  # a fused model is its own deploy form
    assert count_params(fused) == cost.params_deploy


def test_is_deploy_is_true_only_without_batchnorms():
    model = build_model(tiny_yaml(2))
    assert not is_deploy(model) and is_deploy(fuse_model(model))
    assert is_deploy(nn.Conv2d(3, 8, 3))
    assert not is_deploy(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))


def test_cfg_cost_equals_the_cost_of_the_built_model():
    assert cfg_cost(tiny_yaml(2), 64) == model_cost(build_model(tiny_yaml(2)), 64)
    more_classes = cfg_cost(tiny_yaml(2), 64, nc=80)  # nc overrides the YAML's: a wider Detect
    assert more_classes.params > cfg_cost(tiny_yaml(2), 64).params


def test_a_model_that_does_not_run_at_the_input_size_gets_one_line_naming_the_size_and_the_stride():
    model = build_model(tiny_yaml(2))  # largest stride 32: at 48 px the P4 and upsampled P5 maps disagree (3 vs 4)
    with pytest.raises(ModelConfigError) as err:
        count_gflops(model, 48)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("the model does not run at a 48x48 input (")
    assert message.endswith("; use an input size that is a multiple of its largest stride 32")
    with pytest.raises(ModelConfigError, match="does not run at a 48x48 input"):
        model_cost(model, 48)
