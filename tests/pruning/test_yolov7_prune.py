"""YOLOv7-dialect models through re-parameterisation and channel pruning: RepConv fused, IDetect's implicit layers
folded, the dependency graph across MP/SP/SPPCSPC/RepConv/IDetect, and the pruned model saved, fine-tuned, loaded."""

import copy
import warnings

import pytest
import torch
from torch import nn

from pruning.channel import dependency_graph, prune_to_flops
from pruning.finetune import fold_batchnorms, insert_batchnorms
from pruning.portable import load_pruned, save_pruned
from pruning.reparam import fuse_model, fusion_error
from space import yolov7 as v7
from space.builder import build_model
from space.cost import count_gflops, count_params, is_deploy
from tests.conftest import randomize_batchnorm, rel_err
from tests.space.test_yolov7 import randomize_implicit, tiny_v7_yaml

TOL = 1e-5


@pytest.fixture(scope="module")
def trained_like():
    """The tiny YOLOv7 model with random BatchNorm statistics and implicit values (as training leaves them)."""
    torch.manual_seed(0)
    return randomize_implicit(randomize_batchnorm(build_model(tiny_v7_yaml(nc=3)))).eval()


@pytest.fixture(scope="module")
def fused(trained_like):
    return fuse_model(trained_like)


def _raw(model, x):
    with torch.no_grad():
        pred, maps = model.eval()(x)
    return pred, torch.cat([m.flatten() for m in maps])


@pytest.mark.parametrize(("cin", "cout", "stride", "groups"),
                         [(8, 8, 1, 1), (8, 16, 2, 1), (8, 8, 1, 2), (8, 16, 1, 4)])
def test_repconv_fusion_is_exact(cin, cout, stride, groups):
    torch.manual_seed(1)
    block = randomize_batchnorm(v7.RepConv(cin, cout, 3, stride, None, groups, v7.Activation("nn.LeakyReLU", 0.1)))
    block.eval()
    assert (block.rbr_identity is not None) == (cin == cout and stride == 1)
    deploy = fuse_model(block)
    assert deploy.deploy and list(deploy.state_dict()) == ["rbr_reparam.weight", "rbr_reparam.bias"]
    assert isinstance(deploy.act, nn.LeakyReLU)
    x = torch.randn(2, cin, 13, 9)
    assert rel_err(block(x), deploy(x)) < TOL


def test_idetect_folding_is_exact_and_matches_yolov7s_formula():
    torch.manual_seed(2)
    head = randomize_implicit(v7.IDetect(2, [[10, 13, 16, 30, 33, 23]], (16,))).eval()
    head.stride.fill_(8.0)
    folded = fuse_model(head)
    assert folded.deploy and folded.ia is None and folded.im is None
    assert set(folded.state_dict()) == {"anchors", "anchor_grid", "m.0.weight", "m.0.bias"}
    w, b = head.m[0].weight.detach(), head.m[0].bias.detach()
    ia, im = head.ia[0].implicit.detach().view(-1), head.im[0].implicit.detach().view(-1)
    # YOLOv7's IDetect.fuse: bias += W @ ia; then bias *= im and weight *= im (per output channel)
    assert torch.allclose(folded.m[0].bias, (b + w.flatten(1) @ ia) * im, rtol=1e-6, atol=1e-6)
    assert torch.allclose(folded.m[0].weight, w * im.view(-1, 1, 1, 1))
    x = [torch.randn(1, 16, 8, 8)]
    with torch.no_grad():
        assert rel_err(head(list(x))[0], folded(list(x))[0]) < TOL


def test_fused_tiny_v7_equals_its_source_and_the_deploy_build(trained_like, fused):
    assert is_deploy(fused) and fused.detect.ia is None
    assert all(m.deploy for m in fused.modules() if isinstance(m, (v7.RepConv, v7.IDetect)))
    for shape in ((1, 3, 64, 64), (2, 3, 96, 64)):
        x = torch.rand(*shape)
        (pred, maps), (pred_f, maps_f) = _raw(trained_like, x), _raw(fused, x)
        assert rel_err(pred, pred_f) < TOL and rel_err(maps, maps_f) < TOL
    assert fusion_error(trained_like, fused, torch.rand(1, 3, 64, 64)) < TOL
    deploy = build_model(tiny_v7_yaml(nc=3), deploy=True)
    deploy.load_state_dict(fused.state_dict())  # strict: the deploy build has the fused structure
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(_raw(deploy, x)[1], _raw(fused, x)[1])
    again = fuse_model(fused)
    assert all(torch.equal(a, b) for a, b in zip(fused.state_dict().values(), again.state_dict().values()))


def test_prune_reaches_the_target_through_every_yolov7_module(fused):
    result = prune_to_flops(fused, 0.5, 64)
    assert abs(result.error) <= 0.02
    assert count_gflops(result.model, 64) == pytest.approx(result.gflops_after)
    model = result.model
    before = {n: m.out_channels for n, m in fused.named_modules() if isinstance(m, nn.Conv2d)}
    assert any(m.out_channels < before[n] for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    sppcspc = model.model[10]
    assert sppcspc.cv5.conv.in_channels == 4 * sppcspc.cv4.conv.out_channels  # the three pools follow cv4
    assert sppcspc.cv7.conv.in_channels == sppcspc.cv6.conv.out_channels + sppcspc.cv2.conv.out_channels
    assert model.model[16].conv.in_channels == 4 * model.model[11].conv.out_channels  # SP branches follow their conv
    concat6 = model.model[5].conv.out_channels + model.model[4].conv.out_channels  # MP-downsample join
    assert model.model[7].rbr_reparam.in_channels == concat6
    assert model.model[8].rbr_reparam.in_channels == model.model[7].rbr_reparam.out_channels
    assert model.model[7].se.up.out_channels == model.model[7].rbr_reparam.out_channels
    head = model.detect
    assert [c.in_channels for c in head.m] == [model.model[i].conv.out_channels for i in (22, 25)] + [
        model.model[28].rbr_reparam.out_channels]
    assert [c.out_channels for c in head.m] == [c.out_channels for c in fused.detect.m]  # predictions never pruned
    for shape in ((2, 3, 64, 64), (1, 3, 96, 64)):
        with torch.no_grad():
            pred, maps = model.eval()(torch.rand(*shape))
        assert torch.isfinite(pred).all() and [m.shape[-1] for m in maps] == [8] * 3


def test_the_dependency_graph_prunes_implicit_layers_with_their_conv():
    """Before fusion IDetect's ImplicitA sits between its input conv and the output conv: removing channels of that
    conv must remove the same channels of the implicit shift (ImplicitM follows the output conv, never pruned)."""
    torch.manual_seed(3)
    model = randomize_implicit(build_model(tiny_v7_yaml(nc=3))).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch-pruning warns about parameters it has to guess about
        dg = dependency_graph(model, torch.zeros(1, 3, 64, 64))
    feeding = model.model[28].rbr_dense[0]  # RepConv into IDetect level 2: 64 channels
    shift = model.detect.ia[2].implicit.detach().clone()
    drop = [0, 5, 9, 63]
    group = dg.get_pruning_group(feeding, dg.get_pruner_of_module(feeding).prune_out_channels, drop)
    group.prune()
    keep = [c for c in range(64) if c not in drop]
    assert model.detect.ia[2].implicit.shape == (1, 60, 1, 1)
    assert torch.equal(model.detect.ia[2].implicit.detach(), shift[:, keep])
    assert model.detect.m[2].in_channels == 60 and model.detect.im[2].implicit.shape == (1, 24, 1, 1)
    assert model.model[28].rbr_1x1[0].out_channels == 60  # the RepConv's branches move together
    raw = model.train()(torch.rand(1, 3, 64, 64))
    assert [tuple(t.shape) for t in raw] == [(1, 3, 8, 8, 8), (1, 3, 4, 4, 8), (1, 3, 2, 2, 8)]


def test_pruned_v7_model_saves_loads_and_fine_tunes(fused, tmp_path):
    result = prune_to_flops(fused, 0.6, 64)
    loaded = load_pruned(save_pruned(result.model, tmp_path / "pruned", result.plan))
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(_raw(loaded, x)[1], _raw(result.model, x)[1])
    assert count_params(loaded) == result.params_after
    assert any(n.endswith("rbr_reparam") and isinstance(dict(result.model.named_modules())[n.rsplit(".", 1)[0]],
                                                        v7.RepConv) for n in result.pruned_convs)
    batches = [torch.rand(2, 3, 64, 64) for _ in range(2)]
    with_bn = insert_batchnorms(result.model, batches, convs=result.pruned_convs)  # RepConv convs included
    assert not is_deploy(with_bn)
    with torch.no_grad():
        for m in with_bn.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.mul_(1.1)  # as fine-tuning would change them
    folded = fold_batchnorms(copy.deepcopy(with_bn).eval())
    assert is_deploy(folded) and rel_err(_raw(with_bn, x)[1], _raw(folded, x)[1]) < TOL
