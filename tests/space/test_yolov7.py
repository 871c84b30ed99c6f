"""YOLOv7 model YAMLs: the dialect, its modules and numerics, YOLOv7's own parameter counts and names, and the
YOLOv7 search space. The reference figures are YOLOv7's own `parse_model` at commit a207844
(../shared/reference/yolov7/: SOURCE.md, reference_counts.json and the two YAMLs, kept unchanged)."""

import copy
import json

import optuna
import pytest
import torch
import yaml
from torch import nn

from nas.loss import DetectionLoss, LossHyp
from space import yolov7 as v7
from space.blocks import Conv, Detect, RepVGGBlock
from space.builder import MODULES_V7, V7_ONLY, build_model, dialect_of
from space.cost import count_gflops, count_params, model_cost
from space.errors import ModelConfigError, SpaceConfigError
from space.searchspace import Arch, Stage, arch_cost, load_space, parse_space, sample_arch, seed_arch
from space.yamlio import format_model_yaml, parse_yaml_text
from tests.conftest import SHARED, randomize_batchnorm, rel_err, tiny_yaml

REFERENCE = SHARED / "reference" / "yolov7"
ANCHORS = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]


def tiny_v7_yaml(nc: int = 3, head: str = "IDetect") -> dict:
    """A small YOLOv7-dialect model with every YOLOv7 module repnas builds (MP, SP, SPPCSPC, RepConv with and
    without its identity branch, IDetect), per-row activations, and the RepVGG block (with SE) in the backbone."""
    leaky = "nn.LeakyReLU(0.1)"
    return {
        "nc": nc, "depth_multiple": 1.0, "width_multiple": 1.0, "anchors": copy.deepcopy(ANCHORS),
        "backbone": [
            [-1, 1, "Conv", [16, 3, 2, "None", 1, leaky]],                       # 0-P1/2
            [-1, 1, "RepVGGBlock", [32, 3, 2]],                                  # 1-P2/4
            [-1, 1, "MP", []],
            [-1, 1, "Conv", [16, 1, 1]],
            [-3, 1, "Conv", [16, 1, 1]],
            [-1, 1, "Conv", [16, 3, 2]],
            [[-1, -3], 1, "Concat", [1]],                                        # 6-P3/8
            [-1, 1, "RepVGGBlock", [64, 3, 2, 1, 1, 1, "zeros", False, True]],   # 7-P4/16
            [-1, 1, "RepConv", [64, 3, 1]],                                      # identity branch
            [-1, 1, "Conv", [128, 3, 2, "None", 1, "nn.ReLU()"]],                # 9-P5/32
        ],
        "head": [
            [-1, 1, "SPPCSPC", [64]],                                            # 10
            [-1, 1, "Conv", [32, 1, 1]],
            [-1, 1, "SP", [5]],
            [-2, 1, "SP", [9]],
            [-3, 1, "SP", [13]],
            [[-1, -2, -3, -4], 1, "Concat", [1]],
            [-1, 1, "Conv", [32, 1, 1]],                                         # 16
            [-1, 1, "nn.Upsample", ["None", 2, "nearest"]],
            [[-1, 8], 1, "Concat", [1]],
            [-1, 1, "Conv", [32, 1, 1]],                                         # 19
            [-1, 1, "nn.Upsample", ["None", 2, "nearest"]],
            [[-1, 6], 1, "Concat", [1]],
            [-1, 1, "Conv", [16, 3, 1]],                                         # 22-P3/8
            [-1, 1, "Conv", [32, 3, 2]],
            [[-1, 19], 1, "Concat", [1]],
            [-1, 1, "Conv", [32, 1, 1]],                                         # 25-P4/16
            [-1, 1, "Conv", [64, 3, 2]],
            [[-1, 16], 1, "Concat", [1]],
            [-1, 1, "RepConv", [64, 3, 1]],                                      # 28-P5/32, no identity
            [[22, 25, 28], 1, head, ["nc", "anchors"]],
        ],
    }


def _reference(name: str):
    path = REFERENCE / f"{name}.yaml"
    if not path.exists():
        pytest.skip(f"{path} is absent: these tests compare against ../shared (set REPNAS_SHARED to its folder)")
    return path, json.loads((REFERENCE / "reference_counts.json").read_text())[name]


def randomize_implicit(model: nn.Module, seed: int = 1) -> nn.Module:
    """Implicit layers far from their init (a shift N(0, 0.3), a scale U(0.5, 1.5)): a folding bug must show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, v7.ImplicitA):
                m.implicit.copy_(torch.randn(m.implicit.shape, generator=g) * 0.3)
            elif isinstance(m, v7.ImplicitM):
                m.implicit.copy_(torch.rand(m.implicit.shape, generator=g) + 0.5)
    return model


# ----------------------------------------------------------------------------------------------------------------
# YOLOv7's own figures


@pytest.mark.parametrize(("name", "params", "entries"), [("yolov7-tiny", 6_228_762, 344), ("yolov7", 37_622_682, 566)])
def test_yolov7_yamls_build_with_yolov7s_parameter_count_keys_and_shapes(name, params, entries):
    path, ref = _reference(name)
    model = build_model(path, nc=80)
    assert model.dialect == "yolov7"
    assert count_params(model) == ref["params"] == params
    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert got == list(ref["keys"].items())  # names, shapes and order
    assert len(got) == entries
    torch.testing.assert_close(model.stride, torch.tensor([8.0, 16.0, 32.0]))


def test_a_yolov7_state_dict_loads_and_ours_goes_back():
    """Weights move both ways: a state_dict with YOLOv7's recorded names and shapes loads strictly, and ours has
    exactly those names and shapes (the test above), so it loads into YOLOv7's model."""
    path, ref = _reference("yolov7-tiny")
    g = torch.Generator().manual_seed(0)
    theirs = {k: torch.randn(shape, generator=g) if shape else torch.tensor(7) for k, shape in ref["keys"].items()}
    model = build_model(path, nc=80)
    model.load_state_dict(theirs)  # strict
    again = build_model(path, nc=80)
    again.load_state_dict(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_yolov7_fuse_figures_and_outputs():
    """fuse_model on yolov7.yaml: RepConv fused, implicit layers folded, outputs equal to 1e-5 with random BatchNorm
    statistics and implicit values. YOLOv7's own fuse() leaves 36,907,898 parameters: it keeps IDetect's implicit
    tensors, which its fused forward no longer uses; ours drops them, so ours + theirs = YOLOv7's figure."""
    from pruning.reparam import fuse_model

    path, _ = _reference("yolov7")
    torch.manual_seed(0)
    model = randomize_implicit(randomize_batchnorm(build_model(path, nc=80))).eval()
    implicit = sum(p.numel() for n, p in model.named_parameters() if ".ia." in n or ".im." in n)
    fused = fuse_model(model)
    assert implicit == 3 * 255 + 256 + 512 + 1024
    assert count_params(fused) == 36_905_341 and count_params(fused) + implicit == 36_907_898
    assert [m.deploy for m in fused.modules() if isinstance(m, v7.RepConv)] == [True] * 3
    assert fused.detect.ia is None and fused.detect.im is None
    deploy = build_model(path, nc=80, deploy=True)  # the same structure, built directly
    shapes = [(k, v.shape) for k, v in fused.state_dict().items()]
    assert [(k, v.shape) for k, v in deploy.state_dict().items()] == shapes
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        (pred, maps), (pred_f, maps_f) = model(x), fused(x)
    assert rel_err(pred, pred_f) < 1e-5
    assert rel_err(torch.cat([m.flatten() for m in maps]), torch.cat([m.flatten() for m in maps_f])) < 1e-5


def test_yolov7_gflops_match_its_readme():
    """YOLOv7's README: 104.7 GFLOPs at 640 (fused); counted here as thop MACs x 2 on the deploy form."""
    path, _ = _reference("yolov7")
    cost = model_cost(build_model(path, nc=80, device="meta"), 640)
    assert cost.gflops_deploy == pytest.approx(104.7, rel=0.01)
    assert cost.params_deploy == 36_905_341 and cost.gflops > cost.gflops_deploy


def test_yaml_text_round_trip_writes_activations_as_yolov7_does():
    path, ref = _reference("yolov7-tiny")
    d = yaml.safe_load(path.read_text())
    text = format_model_yaml(d)
    assert "[32, 3, 2, None, 1, nn.LeakyReLU(0.1)]" in text  # unquoted, as in YOLOv7's files
    again = parse_yaml_text(text, "text")
    assert again == d and count_params(build_model(again)) == ref["params"]


# ----------------------------------------------------------------------------------------------------------------
# the dialect


def test_dialect_is_explicit_or_detected_from_yolov7_only_modules():
    assert dialect_of(tiny_v7_yaml()) == "yolov7"
    assert dialect_of(tiny_yaml()) == "yolov5"
    ambiguous = {"nc": 1, "anchors": 1, "backbone": [[-1, 1, "Conv", [16, 3, 2]]],
                 "head": [[[-1, -1], 1, "Detect", ["nc", "anchors"]]]}
    assert dialect_of(ambiguous) == "yolov5"  # Conv/Concat/Detect exist in both: YOLOv5
    assert dialect_of(dict(ambiguous, dialect="yolov7")) == "yolov7"
    assert {"MP", "SP", "SPPCSPC", "RepConv", "IDetect"} == V7_ONLY
    assert set(MODULES_V7) == V7_ONLY | {"Conv", "Concat", "RepVGGBlock", "nn.Upsample", "Detect"}
    with pytest.raises(ModelConfigError, match=r"field 'dialect': 'yolov8' is not a dialect; write one of yolov5, "):
        dialect_of(dict(ambiguous, dialect="yolov8"))


def _one_conv(args, **top) -> dict:
    return {"nc": 1, "anchors": [[10, 13]], **top, "backbone": [[-1, 1, "Conv", args]],
            "head": [[-1, 1, "Conv", [8, 3, 2]], [-1, 1, "Conv", [8, 3, 2]], [[-1], 1, "Detect", ["nc", "anchors"]]]}


def test_rows_mean_what_each_dialect_means():
    """The 6th Conv argument is a dilation in YOLOv5 7.0 and an activation in YOLOv7."""
    v5 = build_model(_one_conv([16, 3, 2, None, 1, 2]))
    assert v5.model[0].conv.dilation == (2, 2) and isinstance(v5.model[0].act, nn.SiLU)
    v7_model = build_model(_one_conv([16, 3, 2, None, 1, "nn.LeakyReLU(0.1)"], dialect="yolov7"))
    conv = v7_model.model[0]
    assert conv.conv.dilation == (1, 1) and isinstance(conv.act, nn.LeakyReLU) and conv.act.negative_slope == 0.1
    assert isinstance(v7_model.detect, v7.DetectV7) and "model.3.anchor_grid" in v7_model.state_dict()
    with pytest.raises(ModelConfigError, match=r"field 'args\[5\] \(act\)': 2 \(int\), expected true/false"):
        build_model(_one_conv([16, 3, 2, None, 1, 2], dialect="yolov7"))


def test_an_activation_in_a_yolov5_yaml_points_to_the_dialect_key():
    with pytest.raises(ModelConfigError, match=r"backbone row 0 \(layer 0\), Conv: field 'args\[5\] \(dilation\)': "
                                               r"'nn.LeakyReLU\(0.1\)' is an activation, which YOLOv7's Conv takes "
                                               r"here.*write the top-level field `dialect: yolov7`"):
        build_model(_one_conv([16, 3, 2, None, 1, "nn.LeakyReLU(0.1)"]))


def test_per_row_activations_come_from_the_fixed_table():
    cfg = tiny_v7_yaml()
    cfg["head"][1] = [-1, 1, "Conv", [32, 1, 1, None, 1, False]]
    cfg["backbone"][4] = [-3, 1, "Conv", [16, 1, 1, "None", 1, "None"]]  # YOLOv7: neither True nor a module
    cfg["head"][-2] = [-1, 1, "RepConv", [64, 3, 1, None, 1, "nn.Hardswish()"]]
    model = build_model(cfg)
    acts = {i: model.model[i].act for i in (0, 3, 9, 11, 28)}
    assert isinstance(acts[0], nn.LeakyReLU) and acts[0].negative_slope == 0.1
    assert isinstance(acts[3], nn.SiLU)  # no activation given: YOLOv7's Conv default
    assert isinstance(acts[9], nn.ReLU) and isinstance(acts[11], nn.Identity) and isinstance(acts[28], nn.Hardswish)
    assert isinstance(model.model[4].act, nn.Identity)
    assert isinstance(model.model[8].act, nn.SiLU) and isinstance(model.model[10].cv1.act, nn.SiLU)
    other = build_model(cfg)
    assert other.model[0].act is not model.model[0].act  # a fresh module per layer, never shared
    assert str(model.layer_info[0].args[-1]) == "nn.LeakyReLU(0.1)"


@pytest.mark.parametrize(("spec", "pattern"), [
    ("__import__('os').system('true')", r"\"__import__\('os'\).*is not a known activation"),
    ("nn.Softmax()", r"'nn.Softmax\(\)' is not a known activation; use one of nn.SiLU\(\), "),
    ("nn.ReLU(0.1)", r"nn.ReLU\(\) takes no argument"),
    ("nn.LeakyReLU(1e999)", r"slope '1e999' is not a finite number"),
])
def test_activations_outside_the_table_are_refused_never_evaluated(spec, pattern):
    cfg = tiny_v7_yaml()
    cfg["backbone"][0] = [-1, 1, "Conv", [16, 3, 2, None, 1, spec]]
    where = r"backbone row 0 \(layer 0\), Conv: field 'args\[5\] \(act\)': .*"
    with pytest.raises(ModelConfigError, match=where + pattern):
        build_model(cfg)


@pytest.mark.parametrize(("change", "pattern"), [
    (lambda c: c["head"].__setitem__(1, [-1, 1, "C3", [32, False]]),
     r"head row 1 \(layer 11\): field 'module': unknown module 'C3'; known modules: Conv, Concat, MP, .* C3 is "
     r"YOLOv5's, and this YAML is read as YOLOv7's \(it names MP, RepConv, SPPCSPC, SP, IDetect\)"),
    (lambda c: c.update(dialect="yolov5", backbone=[[-1, 1, "Conv", [16, 3, 2]], *c["backbone"][1:9],
                                                  [-1, 1, "Conv", [128, 3, 2]]]),
     r"backbone row 2 \(layer 2\): field 'module': unknown module 'MP'; known modules: Conv, .* MP is a YOLOv7 "
     r"module: write `dialect: yolov7`"),
    (lambda c: c.__setitem__("activation", "nn.ReLU()"), r"field 'activation' is YOLOv5's; a YOLOv7 YAML names"),
    (lambda c: c["backbone"][1].__setitem__(2, []),
     r"backbone row 1 \(layer 1\): field 'module': unknown module \[\]; known modules: Conv, Concat, MP, SP, "),
    (lambda c: c["head"].__setitem__(0, [-1, 1, "SPPCSPC", [64, False, 1, 0.5, [5, 8]]]),
     r"field 'args\[4\] \(kernel_sizes\)': \[5, 8\] must be a list of 1..8 odd kernel sizes"),
    (lambda c: c["head"].__setitem__(-2, [-1, 1, "RepConv", [64, 1, 1]]),
     r"field 'args\[1\] \(kernel_size\)': 1 is outside 3..3"),
    (lambda c: c["head"].__setitem__(-1, [[22, 25, 28], 1, "Concat", [1]]), r"the last row must be IDetect or Detect"),
    (lambda c: c["head"].__setitem__(-1, [[22, 25], 1, "IDetect", ["nc", "anchors"]]),
     r"IDetect reads 2 layers but anchors has 3 levels"),
])
def test_bad_yolov7_rows_name_place_value_and_fix(change, pattern):
    cfg = tiny_v7_yaml()
    change(cfg)
    with pytest.raises(ModelConfigError, match=pattern):
        build_model(cfg)


# ----------------------------------------------------------------------------------------------------------------
# YOLOv7's blocks and arithmetic


def test_tiny_v7_builds_runs_and_trains_with_the_yolov5_loss():
    model = build_model(tiny_v7_yaml(nc=3))
    types = {type(m) for m in model.model}
    assert {v7.Conv, v7.MP, v7.SP, v7.SPPCSPC, v7.RepConv, RepVGGBlock, v7.IDetect} <= types
    assert isinstance(model.model[8].rbr_identity, nn.BatchNorm2d) and model.model[28].rbr_identity is None
    assert model.layer_info[10].args[:3] == (128, 64, 1)  # SPPCSPC gets `number` as its 3rd argument
    raw = model.train()(torch.rand(2, 3, 64, 64))
    assert [tuple(t.shape) for t in raw] == [(2, 3, 8, 8, 8), (2, 3, 4, 4, 8), (2, 3, 2, 2, 8)]
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.2, 0.3], [1, 2, 0.3, 0.6, 0.4, 0.2]])
    loss, _ = DetectionLoss(model, LossHyp().scaled(3, 3, 64))(raw, targets)
    loss.backward()
    assert torch.isfinite(loss) and model.detect.ia[0].implicit.grad.abs().sum() > 0
    pred, _ = model.eval()(torch.rand(1, 3, 96, 64))
    assert pred.shape == (1, 3 * (12 * 8 + 6 * 4 + 3 * 2), 8)


def test_sppcspc_repconv_and_idetect_compute_yolov7s_arithmetic():
    """Each block against its definition written out (YOLOv7's common.py / yolo.py forwards), in eval mode."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 12, 12)
    block = randomize_batchnorm(v7.SPPCSPC(16, 24)).eval()
    assert block.cv1.conv.out_channels == 24  # hidden int(2 * c2 * e)
    x1 = block.cv4(block.cv3(block.cv1(x)))
    pools = [nn.functional.max_pool2d(x1, k, 1, k // 2) for k in (5, 9, 13)]
    expected = block.cv7(torch.cat((block.cv6(block.cv5(torch.cat([x1, *pools], 1))), block.cv2(x)), 1))
    assert torch.allclose(block(x), expected)

    rep = randomize_batchnorm(v7.RepConv(16, 16, act=v7.Activation("nn.LeakyReLU", 0.1))).eval()
    branch = rep.rbr_dense[1](rep.rbr_dense[0](x)) + rep.rbr_1x1[1](rep.rbr_1x1[0](x)) + rep.rbr_identity(x)
    assert torch.allclose(rep(x), nn.functional.leaky_relu(branch, 0.1))
    assert list(rep.state_dict())[:2] == ["rbr_identity.weight", "rbr_identity.bias"]
    assert "rbr_dense.0.weight" in rep.state_dict() and "rbr_1x1.1.running_var" in rep.state_dict()

    head = randomize_implicit(v7.IDetect(2, ANCHORS, (16, 16, 16))).train()
    ia, im, conv = head.ia[0].implicit, head.im[0].implicit, head.m[0]
    out = head([x, x[..., ::2, ::2], x[..., ::4, ::4]])[0]  # (B, na, H, W, 5 + nc)
    expected = (im * conv(x + ia)).view(2, 3, 7, 12, 12).permute(0, 1, 3, 4, 2)
    assert torch.allclose(out, expected)

    conv = v7.Conv(16, 8, 3, 2)
    assert isinstance(conv, Conv) and isinstance(conv.act, nn.SiLU) and conv.conv.padding == (1, 1)
    assert isinstance(v7.MP().m, nn.MaxPool2d) and v7.MP().m.stride == 2 and v7.SP(5).m.padding == 2


def test_anchor_grid_holds_the_pixel_anchors_and_flips_with_them():
    model = build_model(tiny_v7_yaml())
    head = model.detect
    pixels = torch.tensor(ANCHORS, dtype=torch.float32).view(3, 1, 3, 1, 1, 2)
    assert torch.equal(head.anchor_grid, pixels)
    assert torch.equal(head.anchors * head.stride.view(-1, 1, 1), pixels.view(3, 3, 2))
    reversed_cfg = tiny_v7_yaml()
    reversed_cfg["anchors"] = ANCHORS[::-1]  # YOLOv7's check_anchor_order flips both back, after the division by
    flipped = build_model(reversed_cfg).detect  # the strides (as YOLOv7 does: yolo.py, then utils/autoanchor.py)
    divided = torch.tensor(ANCHORS[::-1], dtype=torch.float32).view(3, 3, 2) / torch.tensor([8.0, 16, 32]).view(3, 1, 1)
    assert torch.equal(flipped.anchor_grid, pixels) and torch.equal(flipped.anchors, divided.flip(0))


def test_yolov7_class_prior_and_a_detect_head():
    """YOLOv7's Model._initialize_biases writes log(0.6 / (nc - 0.99)) where YOLOv5 7.0 writes nc - 0.99999."""
    import math

    for head, offset in ((v7.DetectV7(3, ANCHORS, (16, 32, 64)), 0.99), (Detect(3, ANCHORS, (16, 32, 64)), 0.99999)):
        head.stride.copy_(torch.tensor([8.0, 16.0, 32.0]))
        for conv in head.m:
            nn.init.zeros_(conv.bias)
        head.initialize_biases()
        bias = head.m[2].bias.view(3, -1)  # (na, 5 + nc) at stride 32
        assert torch.allclose(bias[:, 5:], torch.full((3, 3), math.log(0.6 / (3 - offset))))
        assert torch.allclose(bias[:, 4], torch.full((3,), math.log(8 / (640 / 32) ** 2)))
    model = build_model(tiny_v7_yaml(nc=3, head="Detect"))
    assert type(model.detect) is v7.DetectV7
    assert "model.29.anchor_grid" in model.state_dict() and "model.29.ia.0.implicit" not in model.state_dict()


def test_deploy_build_and_meta_cost():
    cfg = tiny_v7_yaml()
    deploy = build_model(cfg, deploy=True)
    assert deploy.detect.ia is None and all(m.deploy for m in deploy.modules() if isinstance(m, v7.RepConv))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deploy.modules())
    meta = build_model(cfg, device="meta")
    assert count_params(meta) == count_params(build_model(cfg))
    assert count_gflops(meta, 64) == count_gflops(build_model(cfg), 64)
    cost = model_cost(build_model(cfg), 64)
    assert cost.params_deploy == count_params(deploy) < cost.params and cost.gflops_deploy < cost.gflops


# ----------------------------------------------------------------------------------------------------------------
# the YOLOv7 search space


def test_the_yolov7_space_writes_yolov7_yamls_with_the_seeds_equivalent_as_baseline():
    space = load_space("yolov7")
    assert space.dialect == "yolov7"
    arch = seed_arch(space)
    assert (arch.dialect, arch.head_width, arch.head_depth) == ("yolov7", 1.0, 2)
    assert Arch.from_params(arch.to_params(), space) == arch  # a point of the space
    cfg = arch.to_yaml(80)
    assert cfg["backbone"] == seed_arch().to_yaml(80)["backbone"]  # the seed design's RepVGG backbone
    assert dialect_of(cfg) == "yolov7" and "dialect" not in cfg
    assert [row[2] for row in cfg["head"]][-4:] == ["RepConv", "RepConv", "RepConv", "IDetect"]
    assert cfg["head"][0] == [-1, 1, "SPPCSPC", [256]]
    model = build_model(cfg)
    assert isinstance(model.detect, v7.IDetect) and model.dialect == "yolov7"
    params, gflops = arch_cost(arch, 640)
    assert (params, round(gflops, 1)) == (14_742_845, 44.8)  # the YOLOv5 seed: 12,798,333, 43.2
    assert Arch.from_model_yaml(cfg, space, "seed") == arch


def test_the_yolov7_head_is_yolov7_tinys_after_its_spp():
    """Rows after the SPP block, as (module, out channels, kernel, stride), against yolov7-tiny.yaml's rows 38-76
    (its three output Convs are RepConvs here, as in yolov7.yaml)."""
    path, _ = _reference("yolov7-tiny")
    tiny = yaml.safe_load(path.read_text())["head"][9:-1]
    ours = seed_arch(load_space("yolov7")).to_yaml(80)["head"][1:-1]

    def shape(row):
        module = "Conv" if row[2] == "RepConv" else row[2]
        return (module, *row[3][:3]) if module == "Conv" else (module, len(row[0]) if isinstance(row[0], list) else 1)

    assert [shape(r) for r in ours] == [shape(r) for r in tiny]


def test_sampled_yolov7_archs_build_and_invert():
    space = load_space("yolov7")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(6):
        arch = sample_arch(study.ask(), space)
        cfg = arch.to_yaml(5)
        model = build_model(cfg, device="meta")
        assert model.dialect == "yolov7" and model.nc == 5
        assert Arch.from_model_yaml(cfg, space, "sampled") == arch
        assert Arch.from_model_yaml(parse_yaml_text(arch.to_yaml_text(5), "text"), space, "text") == arch
        elan = next(row for row in cfg["head"] if row[2] == "Concat" and len(row[0]) > 2)
        assert elan[0] == list(range(-1, -arch.head_depth - 3, -1))


def test_a_model_yaml_of_the_other_dialect_is_refused_by_name():
    v7_arch = seed_arch(load_space("yolov7"))
    with pytest.raises(SpaceConfigError, match=r"b.yaml: a yolov7 model YAML, but the space .*default.yaml writes "
                                               r"yolov5 models; give the baseline as a model of this space, or search "
                                               r"a space with `dialect: yolov7`"):
        Arch.from_model_yaml(v7_arch.to_yaml(80), load_space(), "b.yaml", what="the baseline")
    with pytest.raises(SpaceConfigError, match=r"a yolov5 model YAML, but the space .*yolov7.yaml writes yolov7"):
        Arch.from_model_yaml(seed_arch().to_yaml(80), load_space("yolov7"), "b.yaml")


def test_space_dialect_field_is_checked_and_defaults_to_yolov5():
    base = {"stages": {n: {"depth": [1], "width": [32]} for n in ("P1", "P2", "P3", "P4", "P5")}}
    assert parse_space(base).dialect == "yolov5"
    small = parse_space(dict(base, dialect="yolov7"))
    arch = Arch((Stage(1, 32),) * 5, dialect="yolov7")
    assert Arch.from_params(arch.to_params(), small) == arch
    with pytest.raises(SpaceConfigError, match=r"field 'dialect': 'v7' must be one of yolov5, yolov7"):
        parse_space(dict(base, dialect="v7"))
    with pytest.raises(SpaceConfigError, match=r"Arch: dialect='yolov6' must be one of yolov5, yolov7"):
        Arch((Stage(1, 32),) * 5, dialect="yolov6")
