import copy

import pytest
import torch
from torch import nn

from nas.synth import SynthConfig, make_synthetic
from nas.train import ProxyConfig, fit, parameter_groups
from pruning.channel import PruneError, prune_to_flops
from pruning.finetune import BN_EPS, BN_MOMENTUM, FoldError, batchnorm_sites, fold_batchnorms, insert_batchnorms
from pruning.reparam import fuse_model
from space.builder import build_model
from space.cost import is_deploy
from tests.conftest import rel_err, tiny_yaml


@pytest.fixture(scope="module")
def pruned():
    """A pruned tiny model (SE, SPPF, C3) whose convs carry non-trivial biases, as trained weights would."""
    torch.manual_seed(0)
    result = prune_to_flops(fuse_model(build_model(tiny_yaml(nc=3))), 0.5, 64)
    with torch.no_grad():
        for m in result.model.modules():
            if isinstance(m, nn.Conv2d):
                m.bias.normal_(0, 0.5)
    return result


def _batch(seed=0, n=4, size=64):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _maps(model, x, train=False):
    with torch.no_grad():
        out = model.train(train)(x)
    maps = out if train else out[1]
    return torch.cat([m.flatten() for m in maps]), (None if train else out[0])


def test_insertion_is_output_neutral_in_eval_and_in_train_on_the_calibration_batch(pruned):
    plain = pruned.model
    x = _batch()
    with_bn = insert_batchnorms(plain, [x])
    sites = batchnorm_sites(with_bn)
    assert sites and all(bn is not None for _, _, bn in sites.values())
    ref_maps, ref_pred = _maps(plain, x)
    maps, pred = _maps(with_bn, x)
    assert rel_err(ref_maps, maps) < 1e-6 and rel_err(ref_pred, pred) < 1e-6
    ref_train, _ = _maps(plain, x, train=True)
    train, _ = _maps(with_bn, x, train=True)  # train mode: normalised with the batch's own statistics
    assert rel_err(ref_train, train) < 1e-5
    other = 0.2 + 0.3 * _batch(seed=1, n=2)  # ...which differ on a batch with other statistics: the BNs are live
    with torch.no_grad():
        assert rel_err(plain.model[0].train()(other), with_bn.model[0].train()(other)) > 1e-2


def test_batchnorms_hold_the_calibration_statistics(pruned):
    xs = [_batch(0), _batch(1, n=2)]
    with_bn = insert_batchnorms(pruned.model, xs)
    owner, conv, bn = batchnorm_sites(with_bn)["model.2.rbr_reparam"]
    with_bn.eval()
    with torch.no_grad():
        y = torch.cat([conv(with_bn.model[1](with_bn.model[0](x))) for x in xs]).double()  # pooled conv output
    mean, var = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.weight.double(), (var + BN_EPS).sqrt(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.bias.double(), mean, rtol=1e-5, atol=1e-6)
    assert (bn.eps, bn.momentum, int(bn.num_batches_tracked)) == (BN_EPS, BN_MOMENTUM, 2)
    assert isinstance(owner.rbr_reparam, nn.Sequential) and owner.rbr_reparam.conv is conv


def test_insertion_sites_keys_and_errors(pruned):
    plain = pruned.model
    chosen = insert_batchnorms(plain, [(_batch(), torch.zeros(0, 6))], convs=pruned.pruned_convs)
    assert {"model.3.0.rbr_reparam", "model.8.conv"} <= set(pruned.pruned_convs)
    assert {n for n, (_, _, bn) in batchnorm_sites(chosen).items() if bn is not None} == set(pruned.pruned_convs)
    keys = set(chosen.state_dict())
    assert "model.3.0.rbr_reparam.conv.weight" in keys and "model.3.0.rbr_reparam.bn.running_var" in keys
    assert "model.8.bn.weight" in keys and "model.8.conv.bias" in keys  # Conv: the BatchNorm takes the bn slot
    assert not any(".se." in k and ".bn." in k for k in keys) and not any(k.startswith("model.22.m.") and "bn" in k
                                                                          for k in keys)
    assert is_deploy(plain)  # the input is untouched (a copy was changed)
    with pytest.raises(PruneError, match=r"'model.4.se.up' is not a Conv or RepVGG conv .*SE and Detect"):
        insert_batchnorms(plain, [_batch()], convs=["model.4.se.up"])
    with pytest.raises(PruneError, match=r"already has a BatchNorm .* fold_batchnorms first"):
        insert_batchnorms(chosen, [_batch()])
    with pytest.raises(PruneError, match=r"batches gave no images"):
        insert_batchnorms(plain, [])
    with pytest.raises(PruneError, match=r"float images \(B, C, H, W\)"):
        insert_batchnorms(plain, [torch.zeros(3, 64, 64)])
    with pytest.raises(PruneError, match=r"train-time RepVGGBlock; .*fuse_model first"):
        insert_batchnorms(build_model(tiny_yaml(nc=3)), [_batch()])


def _conv_only_reference(plain: nn.Module, with_bn: nn.Module) -> nn.Module:
    """The plain network with each conv's weight and bias rewritten by hand as conv -> BatchNorm (eval), float64."""
    reference = copy.deepcopy(plain)
    for name, (_, conv, bn) in batchnorm_sites(with_bn).items():
        if bn is None:
            continue
        scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
        target = reference.get_submodule(name)
        with torch.no_grad():
            target.weight.copy_(conv.weight.double() * scale[:, None, None, None])
            target.bias.copy_((conv.bias.double() - bn.running_mean.double()) * scale + bn.bias.double())
    return reference


def test_fold_after_perturbation_matches_a_conv_only_reference(pruned):
    plain = pruned.model
    with_bn = insert_batchnorms(plain, [_batch()])
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # as fine-tuning would: every BatchNorm parameter and statistic moves
        for _, _, bn in batchnorm_sites(with_bn).values():
            n = bn.num_features
            bn.weight.mul_(torch.rand(n, generator=g) + 0.5)
            bn.bias.add_(torch.randn(n, generator=g) * 0.3)
            bn.running_mean.add_(torch.randn(n, generator=g) * 0.3)
            bn.running_var.mul_(torch.rand(n, generator=g) * 1.5 + 0.25)
    folded = fold_batchnorms(with_bn)
    assert is_deploy(folded) and folded is not with_bn and not is_deploy(with_bn)
    assert list(folded.state_dict()) == list(plain.state_dict())  # the keys from before the insertion
    assert [type(m) for m in folded.modules()] == [type(m) for m in plain.modules()]
    reference = _conv_only_reference(plain, with_bn)
    x = _batch(seed=3, n=2, size=96)
    ref_maps, ref_pred = _maps(reference, x)
    maps, pred = _maps(folded, x)
    assert rel_err(ref_maps, maps) < 1e-5 and rel_err(ref_pred, pred) < 1e-5
    unfolded_maps, _ = _maps(with_bn, x)
    assert rel_err(unfolded_maps, maps) < 1e-5
    assert rel_err(_maps(plain, x)[0], maps) > 1e-2  # the perturbation mattered: folding did real work


def test_fold_in_place_and_its_check(pruned):
    with_bn = insert_batchnorms(pruned.model, [_batch()], convs=pruned.pruned_convs[:3])
    same = fold_batchnorms(with_bn, inplace=True)
    assert same is with_bn and is_deploy(with_bn)
    broken = insert_batchnorms(pruned.model, [_batch()])
    _, _, bn = batchnorm_sites(broken)["model.0.rbr_reparam"]
    with torch.no_grad():
        bn.running_var[0] = float("nan")
    with pytest.raises(FoldError, match=r"changed the raw outputs by a relative nan"):
        fold_batchnorms(broken)


def test_fit_fine_tunes_the_inserted_batchnorms(pruned, tmp_path, monkeypatch):
    monkeypatch.setenv("REPNAS_CACHE_DIR", str(tmp_path / "cache"))
    data = make_synthetic(tmp_path / "shapes", SynthConfig(images=12, classes=3, imgsz=64, seed=1))
    model = insert_batchnorms(pruned.model, [_batch()], convs=pruned.pruned_convs)
    bns = [bn for _, _, bn in batchnorm_sites(model).values() if bn is not None]
    groups = parameter_groups(model, 5e-4)
    no_decay = {id(p) for p in groups[0]["params"]}
    assert all(id(bn.weight) in no_decay for bn in bns)  # BatchNorm weights: YOLOv5's no-decay group
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = ProxyConfig.finetune(epochs=1, imgsz=64, batch=4, device="cpu", quiet=True, workers=0)
    result = fit(model, data, cfg)
    assert result.history[0]["box"] > 0 and result.metrics is not None
    after = model.state_dict()
    moved = [k for k in after if ".bn." in k and after[k].is_floating_point() and not torch.equal(before[k], after[k])]
    assert any(k.endswith("running_mean") for k in moved) and any(k.endswith("weight") for k in moved)
    folded = fold_batchnorms(model)
    assert is_deploy(folded) and list(folded.state_dict()) == list(pruned.model.state_dict())
