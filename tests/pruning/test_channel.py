import math
import re

import optuna
import pytest
import torch
from torch import nn

from nas.loss import DetectionLoss, LossHyp
from pruning.channel import PruneError, parse_target, prune_to_flops
from pruning.reparam import fuse_model
from space.blocks import SEBlock
from space.builder import build_model
from space.cost import count_gflops, count_params
from space.errors import RepnasError
from space.searchspace import load_space, sample_arch
from tests.conftest import SEED_YAML, tiny_yaml

IMGSZ = 320


@pytest.fixture(scope="module")
def seed_fused():
    if not SEED_YAML.exists():
        pytest.skip(f"{SEED_YAML} is absent (set REPNAS_SHARED to the shared folder)")
    torch.manual_seed(0)
    return fuse_model(build_model(SEED_YAML, nc=3))


@pytest.fixture(scope="module")
def tiny_fused():
    torch.manual_seed(0)
    return fuse_model(build_model(tiny_yaml(nc=3)))


def _convs(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def _check_channel_rules(original, pruned, round_to=8):
    """Detect untouched; every pruned conv a multiple of round_to; SE squeeze untouched and up following its block."""
    before, after = _convs(original), _convs(pruned)
    assert before.keys() == after.keys()
    for a, b in zip(original.detect.m, pruned.detect.m):
        assert (b.out_channels, b.weight.shape[0]) == (a.out_channels, a.out_channels)
    se_down = {f"{n}.down" for n, m in pruned.named_modules() if isinstance(m, SEBlock)}
    for name, conv in after.items():
        assert conv.weight.shape[:2] == (conv.out_channels, conv.in_channels)
        if name in se_down:
            assert conv.out_channels == before[name].out_channels  # internal neurons: never rounded or emptied
            assert conv.out_channels >= conv.in_channels / 16
        elif conv.out_channels != before[name].out_channels:
            assert conv.out_channels % round_to == 0 and conv.out_channels >= round_to, name
    for name, module in pruned.named_modules():
        if isinstance(module, SEBlock):
            block_conv = pruned.get_submodule(name.rpartition(".")[0]).rbr_reparam
            assert module.up.out_channels == module.down.in_channels == block_conv.out_channels


def _check_forward(original, pruned):
    """The pruned network runs in eval (decoded) and train (raw maps) mode, with the unpruned output shapes."""
    for shape in ((2, 3, 64, 64), (1, 3, 96, 64)):
        x = torch.rand(*shape)
        with torch.no_grad():
            pred, maps = pruned.eval()(x)
            ref_pred, ref_maps = original.eval()(x)
            raw = pruned.train()(x)
        original.train()
        assert pred.shape == ref_pred.shape and torch.isfinite(pred).all()
        assert [m.shape for m in maps] == [m.shape for m in ref_maps] == [m.shape for m in raw]
        assert all(torch.equal(a, b) for a, b in zip(maps, raw))  # no BatchNorm: both modes agree


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7, 0.9])
def test_seed_model_reaches_the_target_within_2_percent(seed_fused, fraction):
    result = prune_to_flops(seed_fused, fraction, IMGSZ)
    before = count_gflops(seed_fused, IMGSZ)
    assert result.gflops_before == pytest.approx(before)
    assert result.target_gflops == pytest.approx(fraction * before)
    achieved = count_gflops(result.model, IMGSZ)  # counted again, independently of the result's own figure
    assert achieved == pytest.approx(result.gflops_after)
    assert abs(achieved / (fraction * before) - 1) <= 0.02
    assert result.params_after == count_params(result.model) < result.params_before == count_params(seed_fused)
    assert 1 <= result.steps <= 5 and result.seconds > 0
    _check_channel_rules(seed_fused, result.model)
    assert result.plan == {n: {"in": m.in_channels, "out": m.out_channels} for n, m in _convs(result.model).items()}
    assert all(result.channels[n] == (m.out_channels, result.plan[n]["out"]) for n, m in _convs(seed_fused).items())


def test_seed_model_pruned_runs_at_other_input_sizes(seed_fused):
    result = prune_to_flops(seed_fused, 0.5, IMGSZ)
    _check_forward(seed_fused, result.model)


def test_absolute_target(seed_fused):
    result = prune_to_flops(seed_fused, "2.5G", IMGSZ)
    assert result.target_gflops == 2.5
    assert abs(count_gflops(result.model, IMGSZ) / 2.5 - 1) <= 0.02


def test_round_to_16(seed_fused):
    result = prune_to_flops(seed_fused, "60%", IMGSZ, round_to=16)
    assert abs(result.error) <= 0.02
    _check_channel_rules(seed_fused, result.model, round_to=16)
    assert any(before != after for before, after in result.channels.values())


def test_every_module_kind_stays_consistent(tiny_fused):
    """The tiny model has SE, SPPF, C3, Concat and Upsample: all must stay wired after pruning."""
    result = prune_to_flops(tiny_fused, 0.5, 64)
    assert abs(result.error) <= 0.02
    _check_channel_rules(tiny_fused, result.model)
    _check_forward(tiny_fused, result.model)
    sppf = result.model.model[7]
    assert sppf.cv2.conv.in_channels == 4 * sppf.cv1.conv.out_channels  # the pooled copies follow cv1
    c3 = result.model.model[11]
    assert c3.cv3.conv.in_channels == c3.m[0].cv2.conv.out_channels + c3.cv2.conv.out_channels
    assert result.model.model[5].se.up.out_channels < 64  # the SE blocks were pruned with their convs
    assert "model.5.se.up" not in result.pruned_convs and "model.5.rbr_reparam" in result.pruned_convs


def test_prune_returns_a_copy_unless_inplace(tiny_fused):
    model = fuse_model(build_model(tiny_yaml(nc=3)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune_to_flops(model, 0.5, 64)
    assert result.model is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    same = prune_to_flops(model, 0.5, 64, inplace=True)
    assert same.model is model and count_params(model) == same.params_after < same.params_before


def test_prune_keeps_the_weights_of_kept_channels(seed_fused):
    """A pruned conv holds a subset of the original filters, sliced on both axes, not new weights."""
    result = prune_to_flops(seed_fused, 0.5, IMGSZ)
    first0, first1 = seed_fused.model[0].rbr_reparam, result.model.model[0].rbr_reparam  # reads the image: 3 inputs
    kept = [next(k for k in range(first0.out_channels) if torch.equal(f, first0.weight[k])) for f in first1.weight]
    assert len(kept) == first1.out_channels < first0.out_channels
    assert torch.equal(first1.bias, first0.bias[kept])
    second0, second1 = seed_fused.model[1].rbr_reparam, result.model.model[1].rbr_reparam
    assert second1.in_channels == len(kept)
    for f in second1.weight:  # each kept filter, restricted to the inputs that survived
        assert any(torch.equal(f, second0.weight[k][kept]) for k in range(second0.out_channels))


def _batches(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        images = torch.rand(2, 3, size, size, generator=g)
        targets = torch.tensor([[0, 0, 0.5, 0.5, 0.4, 0.3], [0, 1, 0.25, 0.3, 0.2, 0.2], [1, 2, 0.6, 0.6, 0.5, 0.6]])
        out.append((images, targets))
    return out


def _loss_fn(model, batch):
    hyp = LossHyp().scaled(model.detect.nl, model.detect.nc, batch[0].shape[-1])
    return DetectionLoss(model, hyp)(model(batch[0]), batch[1])[0]


def test_taylor_importance_runs_and_differs_from_l2(tiny_fused):
    taylor = prune_to_flops(tiny_fused, 0.5, 64, importance="taylor", calibration=_batches(), loss_fn=_loss_fn)
    l2 = prune_to_flops(tiny_fused, 0.5, 64, importance="l2")
    assert abs(taylor.error) <= 0.02 and taylor.importance == "taylor"
    assert taylor.plan == l2.plan  # how many channels go is the uniform ratio; which ones is the importance
    a, b = taylor.model.state_dict(), l2.model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert all(p.grad is None for p in taylor.model.parameters())  # calibration gradients are not left behind
    l1 = prune_to_flops(tiny_fused, 0.5, 64, importance="l1")
    assert l1.plan == l2.plan


def test_taylor_needs_calibration_and_a_loss(tiny_fused):
    with pytest.raises(PruneError, match=r"importance='taylor' needs calibration batches and a loss_fn"):
        prune_to_flops(tiny_fused, 0.5, 64, importance="taylor", calibration=_batches())
    with pytest.raises(PruneError, match=r"calibration gave no batches"):
        prune_to_flops(tiny_fused, 0.5, 64, importance="taylor", calibration=[], loss_fn=_loss_fn)


def test_random_importance_is_seeded_and_differs_from_l2(tiny_fused):
    a = prune_to_flops(tiny_fused, 0.5, 64, importance="random", seed=1)
    b = prune_to_flops(tiny_fused, 0.5, 64, importance="random", seed=1)
    c = prune_to_flops(tiny_fused, 0.5, 64, importance="random", seed=2)
    l2 = prune_to_flops(tiny_fused, 0.5, 64)
    sa, sb, sc, sl = (r.model.state_dict() for r in (a, b, c, l2))
    assert abs(a.error) <= 0.02
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa) and any(not torch.equal(sa[k], sl[k]) for k in sa)


def test_a_custom_importance_callable_decides(tiny_fused):
    """Scores falling with the channel index: the last channels go first, so the first ones stay."""
    result = prune_to_flops(tiny_fused, 0.5, 64, importance=lambda group: -torch.arange(len(group[0][1])).float())
    w0, w1 = tiny_fused.model[0].rbr_reparam.weight, result.model.model[0].rbr_reparam.weight
    assert torch.equal(w1, w0[: w1.shape[0]])  # lowest score (highest index) went first


def test_keep_protects_named_convs(tiny_fused):
    result = prune_to_flops(tiny_fused, 0.6, 64, keep=["model.2.rbr_reparam"])
    assert result.channels["model.2.rbr_reparam"] == (32, 32)
    with pytest.raises(PruneError, match=r"keep: 'model.99.conv' is not a conv of the model"):
        prune_to_flops(tiny_fused, 0.6, 64, keep=["model.99.conv"])


@pytest.mark.parametrize(("target", "gflops"), [(0.5, 5.0), ("0.5", 5.0), ("50%", 5.0), (" 50 % ", 5.0), (1, 10.0),
                                                ("100%", 10.0), ("2.5G", 2.5), ("2.5 GFLOPs", 2.5), ("2.5g", 2.5),
                                                ("800M", 0.8), ("1e0G", 1.0), (0.01, 0.1), ("10G", 10.0)])
def test_parse_target(target, gflops):
    assert parse_target(target, 10.0) == pytest.approx(gflops)


@pytest.mark.parametrize(("target", "message"), [
    (1.5, r"1.5 is above 100% .*a plain number is a fraction; write '2.5G'"),
    ("150%", r"150% is above 100%"),
    (0.005, r"0.005 is below the 1% minimum"),
    ("0.5%", r"0.5% is below the 1% minimum"),
    (0, r"0 is below the 1% minimum"),
    ("20G", r"20 GFLOPs is above the unpruned model's 10 GFLOPs"),
    ("0.05G", r"0.05 GFLOPs is below 1% of the unpruned 10 GFLOPs"),
    ("half", r"'half' is not a FLOPs target; write a fraction"),
    ("2.5X", r"'2.5X' is not a FLOPs target"),
    ("-0.5", r"'-0.5' is not a FLOPs target"),
    ("", r"'' is not a FLOPs target"),
    (None, r"None is not a FLOPs target"),
    (True, r"True is not a FLOPs target"),
    (math.nan, r"nan is not finite"),
    (math.inf, r"inf is not finite"),
])
def test_bad_targets_are_rejected(target, message):
    with pytest.raises(PruneError, match=message) as info:
        parse_target(target, 10.0)
    assert isinstance(info.value, RepnasError) and isinstance(info.value, ValueError)


def test_bad_targets_are_rejected_before_any_pruning(tiny_fused):
    with pytest.raises(PruneError, match=r"above 100%"):
        prune_to_flops(tiny_fused, "120%", 64)
    with pytest.raises(PruneError, match=r"above the unpruned model's"):
        prune_to_flops(tiny_fused, "1G", 64)


def test_unreachable_target_is_a_clear_error(tiny_fused):
    with pytest.raises(PruneError, match=r"below the smallest reachable .* with round_to=8 .* lower round_to"):
        prune_to_flops(tiny_fused, "10%", 64)
    assert abs(prune_to_flops(tiny_fused, "20%", 64).error) <= 0.02  # reachable: the floor is near 16%


def grouped_yaml(nc: int = 3) -> dict:
    """tiny_yaml with 4 grouped convs (groups=4): model.2, the two blocks of model.3, model.6."""
    model_yaml = tiny_yaml(nc)
    model_yaml["backbone"][2] = [-1, 1, "RepVGGBlock", [32, 3, 2, 1, 1, 4]]
    model_yaml["backbone"][3] = [-1, 2, "RepVGGBlock", [32, 3, 1, 1, 1, 4]]
    model_yaml["backbone"][6] = [-1, 1, "RepVGGBlock", [64, 3, 2, 1, 1, 4]]
    return model_yaml


def test_target_below_what_grouped_convs_allow_names_them_and_the_reachable_floor():
    torch.manual_seed(0)
    model = fuse_model(build_model(grouped_yaml()))
    with pytest.raises(PruneError) as err:
        prune_to_flops(model, "20%", 64)
    message = str(err.value)
    assert "\n" not in message and message.startswith("target='20%' (")
    assert ("grouped convolutions are never pruned, nor the convs whose channels they share: 4 grouped convs "
            "(model.2.rbr_reparam, model.3.0.rbr_reparam, model.3.1.rbr_reparam and 1 more)") in message
    assert message.endswith("or lower round_to, or build the grouped layers with groups=1")
    floor = float(re.search(r"smallest reachable ([0-9.e-]+) deploy GFLOPs", message).group(1))
    result = prune_to_flops(model, f"{floor}G", 64)  # the floor it names is reachable
    assert abs(result.error) <= 0.02
    grouped = {n for n, m in _convs(model).items() if m.groups > 1}
    assert all(result.channels[n][0] == result.channels[n][1] for n in grouped)  # never pruned
    assert any(before != after for before, after in result.channels.values())


def test_bad_arguments_are_clear_errors(tiny_fused):
    with pytest.raises(PruneError, match=r"fused \(deploy\) network.*fuse_model"):
        prune_to_flops(build_model(tiny_yaml(nc=3)), 0.5, 64)
    with pytest.raises(PruneError, match=r"importance='l3' is unknown; use one of l1, l2, taylor, random"):
        prune_to_flops(tiny_fused, 0.5, 64, importance="l3")
    with pytest.raises(PruneError, match=r"round_to=0 must be a positive integer"):
        prune_to_flops(tiny_fused, 0.5, 64, round_to=0)
    with pytest.raises(PruneError, match=r"steps=0 must be a positive integer"):
        prune_to_flops(tiny_fused, 0.5, 64, steps=0)


def test_full_target_changes_nothing(tiny_fused):
    result = prune_to_flops(tiny_fused, 1.0, 64)
    assert result.steps == 0 and result.gflops_after == result.gflops_before and not result.pruned_convs


def _sampled_archs(n, seed):
    space = load_space("default")
    sampler = optuna.samplers.RandomSampler(seed=seed)
    study = optuna.create_study(sampler=sampler)
    return [sample_arch(study.ask(), space) for _ in range(n)]


def _check_space_point(arch, fractions):
    """FLOPs depend on the channel counts only (the count per group is importance-independent), so a weightless
    meta model with random importance answers the target question for large models in a fraction of the time."""
    meta = fuse_model(build_model(arch.to_yaml(nc=3), device="meta"))
    for fraction in fractions:
        result = prune_to_flops(meta, fraction, IMGSZ, importance="random")
        assert abs(count_gflops(result.model, IMGSZ) / (fraction * result.gflops_before) - 1) <= 0.02, (arch, fraction)
        _check_channel_rules(meta, result.model)


def test_space_points_with_and_without_se_reach_a_target():
    archs = _sampled_archs(10, seed=0)
    with_se = next(a for a in archs if any(s.se for s in a.stages))
    without = next(a for a in archs if not any(s.se for s in a.stages))
    for arch in (with_se, without):
        _check_space_point(arch, [0.5])


@pytest.mark.slow
def test_ten_space_points_reach_every_target():
    archs = _sampled_archs(10, seed=0)
    assert any(any(s.se for s in a.stages) for a in archs) and any(not any(s.se for s in a.stages) for a in archs)
    for arch in archs:
        _check_space_point(arch, [0.3, 0.5, 0.7, 0.9])


def test_pruned_space_point_with_se_runs_with_real_weights():
    arch = next(a for a in _sampled_archs(10, seed=0) if sum(s.se for s in a.stages) >= 2)
    torch.manual_seed(0)
    model = fuse_model(build_model(arch.to_yaml(nc=3)))
    result = prune_to_flops(model, 0.5, 64)
    assert abs(result.error) <= 0.02
    _check_channel_rules(model, result.model)
    _check_forward(model, result.model)
