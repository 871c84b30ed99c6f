import optuna
import pytest
import torch
from torch import nn

from pruning.reparam import fuse_model, fusion_error
from space.blocks import Conv, RepVGGBlock
from space.builder import build_model
from space.cost import count_gflops, count_params, is_deploy
from space.searchspace import load_space, sample_arch
from tests.conftest import randomize_batchnorm, rel_err, tiny_yaml
from tests.space.test_blocks import BLOCK_CASES

TOL = 1e-5


class _Wrap(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x)


@pytest.mark.parametrize(("cin", "cout", "stride", "groups", "use_se"), BLOCK_CASES)
def test_repvgg_block_fusion_is_exact(cin, cout, stride, groups, use_se):
    torch.manual_seed(1)
    model = randomize_batchnorm(_Wrap(RepVGGBlock(cin, cout, 3, stride, 1, 1, groups, "zeros", False, use_se)))
    model.eval()
    fused = fuse_model(model)
    block = fused.block
    assert block.deploy and not hasattr(block, "rbr_dense") and block.rbr_identity is None
    assert (block.rbr_reparam.kernel_size, block.rbr_reparam.stride) == ((3, 3), (stride, stride))
    assert isinstance(block.se, nn.Identity) != use_se  # SE kept
    x = torch.randn(2, cin, 15, 11)
    assert rel_err(model(x), fused(x)) < TOL


def test_identity_branch_is_really_fused():
    """Only the identity BatchNorm is non-trivial: the fused conv must reproduce it on its own."""
    block = RepVGGBlock(8, 8)
    with torch.no_grad():
        for branch in (block.rbr_dense, block.rbr_1x1):
            branch.conv.weight.zero_()
            branch.bn.running_mean.zero_()
            branch.bn.bias.zero_()
    randomize_batchnorm(block.rbr_identity, seed=3)
    block.eval()
    x = torch.randn(1, 8, 6, 6)
    expected = nn.functional.silu(block.rbr_identity(x))
    assert rel_err(expected, fuse_model(block)(x)) < TOL


def test_conv_bn_fusion_is_exact():
    conv = randomize_batchnorm(Conv(8, 16, 3, 2)).eval()
    fused = fuse_model(conv)
    assert isinstance(fused.bn, nn.Identity) and fused.conv.bias is not None
    x = torch.randn(2, 8, 9, 9)
    assert rel_err(conv(x), fused(x)) < TOL


def test_whole_model_fusion_is_exact_and_idempotent(seed_yaml):
    for cfg in (seed_yaml, tiny_yaml()):
        torch.manual_seed(0)
        model = randomize_batchnorm(build_model(cfg), seed=2)
        fused = fuse_model(model)
        assert is_deploy(fused) and not is_deploy(model)
        for shape in ((2, 3, 64, 64), (1, 3, 96, 64)):
            assert fusion_error(model, fused, torch.randn(*shape)) < TOL
        twice = fuse_model(fused)
        x = torch.randn(1, 3, 64, 64)
        torch.testing.assert_close(twice.eval()(x)[0], fused.eval()(x)[0], rtol=0, atol=0)


def test_fused_models_report_params_and_gflops():
    model = build_model(tiny_yaml())
    fused = fuse_model(model)
    assert 0 < count_params(fused) < count_params(model)
    assert 0 < count_gflops(fused, 64) < count_gflops(model, 64)


def test_fuse_returns_a_copy_unless_inplace():
    model = build_model(tiny_yaml())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse_model(model)
    assert fused is not model and any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    same = fuse_model(model, inplace=True)
    assert same is model and is_deploy(model)


def test_fused_weights_load_into_a_deploy_build():
    model = randomize_batchnorm(build_model(tiny_yaml()))
    fused = fuse_model(model)
    deploy = build_model(tiny_yaml(), deploy=True)
    deploy.load_state_dict(fused.state_dict())
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(deploy.eval()(x)[0], fused.eval()(x)[0])


def test_sampled_models_fuse_exactly():
    space = load_space()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(4):
        arch = sample_arch(study.ask(), space)
        model = randomize_batchnorm(build_model(arch.to_yaml(nc=2)))
        assert fusion_error(model, fuse_model(model), torch.randn(1, 3, 64, 64)) < TOL
