import copy
import time

import pytest
import torch
import yaml
from torch import nn

from space.blocks import C3, Conv, Detect, RepVGGBlock
from space.builder import MODULES, build_model
from space.cost import cfg_cost, count_gflops, model_cost
from space.errors import ModelConfigError
from tests.conftest import tiny_yaml

BN = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


def _conv_keys(prefix):
    return [f"{prefix}conv.weight"] + [f"{prefix}bn.{k}" for k in BN]


def _expected_seed_keys(reference_block):
    """State-dict keys and shapes of the seed YAML in YOLOv5 (patched with the reference block), derived from
    the reference block and YOLOv5's own module layout, independently of our builder."""
    keys = {}
    rows = [(3, 64, 2, 1), (64, 64, 2, 1), (64, 64, 1, 1), (64, 128, 2, 1), (128, 128, 1, 3), (128, 256, 2, 1),
            (256, 256, 1, 13), (256, 512, 2, 1)]
    for i, (cin, cout, stride, n) in enumerate(rows):
        for j in range(n):
            block = reference_block.RepVGGBlock(cin, cout, 3, stride)
            prefix = f"model.{i}." + (f"{j}." if n > 1 else "")
            keys |= {prefix + k: tuple(v.shape) for k, v in block.state_dict().items()}

    def conv(i, cin, cout, k, sub=""):
        p = f"model.{i}.{sub}"
        keys[p + "conv.weight"] = (cout, cin, k, k)
        keys.update({p + f"bn.{n}": (cout,) for n in BN[:4]})
        keys[p + "bn.num_batches_tracked"] = ()

    def c3(i, cin, cout):
        h = cout // 2
        conv(i, cin, h, 1, "cv1.")
        conv(i, cin, h, 1, "cv2.")
        conv(i, 2 * h, cout, 1, "cv3.")
        conv(i, h, h, 1, "m.0.cv1.")
        conv(i, h, h, 3, "m.0.cv2.")

    conv(8, 512, 256, 1)
    c3(11, 512, 256)
    conv(12, 256, 128, 1)
    c3(15, 256, 128)
    conv(16, 128, 128, 3)
    c3(18, 256, 256)
    conv(19, 256, 256, 3)
    c3(21, 512, 512)
    keys["model.22.anchors"] = (3, 3, 2)
    for k, cin in enumerate((128, 256, 512)):
        keys[f"model.22.m.{k}.weight"] = (255, cin, 1, 1)
        keys[f"model.22.m.{k}.bias"] = (255,)
    return keys


def test_seed_model_compatibility_bar(seed_yaml, reference_block):
    model = build_model(seed_yaml)
    assert len(model.model) == 23
    assert sum(p.numel() for p in model.parameters()) == 13_906_045
    cost = model_cost(model, 640)
    assert round(cost.gflops, 1) == 47.8
    assert round(cost.gflops_deploy, 1) == 43.2  # fully fused (RepVGG and Conv+BN); 43.3 with head BNs unfused
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == _expected_seed_keys(reference_block)
    assert next(iter(got)) == "model.0.rbr_dense.conv.weight" and list(got)[-1] == "model.22.m.2.bias"
    torch.testing.assert_close(model.stride, torch.tensor([8.0, 16.0, 32.0]))
    assert model.save == [4, 6, 8, 12, 15, 18, 21]


def test_seed_weights_load_into_a_fresh_build(seed_yaml):
    a, b = build_model(seed_yaml), build_model(seed_yaml)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(a.eval()(x)[0], b.eval()(x)[0])


def test_yolov5_init_applies_to_every_batchnorm():
    model = build_model(tiny_yaml())
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 and m.momentum == 0.03 for m in bns)
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.SiLU))


def test_forward_shapes_train_and_eval_square_and_not():
    model = build_model(tiny_yaml(nc=3))
    raw = model.train()(torch.randn(2, 3, 64, 64))
    assert [tuple(t.shape) for t in raw] == [(2, 3, 8, 8, 8), (2, 3, 4, 4, 8), (2, 3, 2, 2, 8)]
    pred, raw = model.eval()(torch.randn(1, 3, 96, 64))
    assert pred.shape == (1, 3 * (12 * 8 + 6 * 4 + 3 * 2), 8)


def test_depth_and_width_multiples_follow_yolov5_rounding():
    cfg = tiny_yaml()
    cfg["depth_multiple"], cfg["width_multiple"] = 0.33, 0.25
    cfg["backbone"][3] = [-1, 3, "RepVGGBlock", [32, 3, 1]]  # round(3 * 0.33) = 1
    cfg["head"][3] = [-1, 9, "C3", [32, False]]  # round(9 * 0.33) = 3 bottlenecks, n inserted as C3's 3rd arg
    model = build_model(cfg)
    info = model.layer_info
    assert info[0].args[:2] == (3, 8)  # make_divisible(16 * 0.25, 8) = 8
    assert info[3].number == 1 and isinstance(model.model[3], RepVGGBlock)
    assert info[11].args[2] == 3 and len(model.model[11].m) == 3
    assert info[11].number == 1  # like YOLOv5, C3 carries its repeats inside
    assert info[4].args[:2] == (8, 16)  # 64 * 0.25


def test_number_above_one_builds_a_sequential_with_yolov5_names():
    model = build_model(tiny_yaml())
    assert isinstance(model.model[3], nn.Sequential) and len(model.model[3]) == 2
    assert "model.3.1.rbr_dense.conv.weight" in model.state_dict()


def test_nc_override_and_integer_anchors():
    cfg = tiny_yaml(nc=80)
    cfg["anchors"] = 2
    model = build_model(cfg, nc=5)
    assert model.nc == 5 and model.yaml["nc"] == 5
    assert model.detect.na == 2 and model.detect.m[0].out_channels == 2 * 10


def test_dict_is_not_modified_and_yaml_text_builds_the_same(tmp_path):
    cfg = tiny_yaml()
    before = copy.deepcopy(cfg)
    model = build_model(cfg)
    assert cfg == before
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert sum(p.numel() for p in build_model(path).parameters()) == sum(p.numel() for p in model.parameters())


def test_deploy_build_has_the_fused_structure_and_cost():
    from pruning.reparam import fuse_model

    fused = fuse_model(build_model(tiny_yaml()))
    deploy = build_model(tiny_yaml(), deploy=True)
    assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in deploy.state_dict().items()}
    assert count_gflops(fused, 64) == count_gflops(deploy, 64)
    cost = cfg_cost(tiny_yaml(), 64)
    assert cost.gflops_deploy == count_gflops(fused, 64) < cost.gflops


def test_meta_build_allocates_nothing_and_counts_the_same():
    meta = build_model(tiny_yaml(), device="meta")
    real = build_model(tiny_yaml())
    assert all(p.is_meta for p in meta.parameters())
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in real.parameters())
    assert count_gflops(meta, (96, 64)) == count_gflops(real, (96, 64))


def test_registry_is_explicit():
    assert set(MODULES) == {"Conv", "Bottleneck", "C3", "SPPF", "Concat", "SEBlock", "RepVGGBlock", "Detect",
                            "nn.Upsample"}
    assert MODULES["C3"] is C3 and MODULES["Conv"] is Conv and MODULES["Detect"] is Detect


# ----------------------------------------------------------------------------------------------------------------
# errors: each names the place, the value and the fix


def _with_row(part, k, row, **top):
    cfg = tiny_yaml()
    cfg[part][k] = row
    cfg.update(top)
    return cfg


ERROR_CASES = {
    "unknown module": (_with_row("backbone", 2, [-1, 1, "RepVGGBlok", [32, 3, 2]]),
                       r"backbone row 2 \(layer 2\): field 'module': unknown module 'RepVGGBlok'; known modules: Conv"),
    "from out of range": (_with_row("head", 2, [[-1, -40], 1, "Concat", [1]]),
                          r"head row 2 \(layer 10\), Concat: field 'from': -40 is out of range \(only 10 earlier "
                          r"layers\); use 0..9 or -1..-10"),
    "from points forward": (_with_row("head", 2, [[-1, 12], 1, "Concat", [1]]),
                            r"layer 10\), Concat: field 'from': 12 points forward .* layers 0..9"),
    "from at layer 0": (_with_row("backbone", 0, [3, 1, "RepVGGBlock", [16, 3, 2]]),
                        r"field 'from': 3 but layer 0 can only read the input; use -1"),
    "repeated channel change": (_with_row("backbone", 2, [-1, 3, "RepVGGBlock", [32, 3, 2]]),
                                r"backbone row 2 \(layer 2\), RepVGGBlock: channel mismatch: 3 repeated "
                                r"RepVGGBlocks all take the row's input \(16 channels\) but output 32"),
    "SE input channels": (_with_row("backbone", 7, [-1, 1, "SEBlock", [32, 4]]),
                          r"channel mismatch: SEBlock input_channels=32 but its input has 64 channels; write 64"),
    "concat of different strides": (_with_row("head", 2, [[-1, 3], 1, "Concat", [1]]),
                                    r"head row 2 \(layer 10\), Concat: shape mismatch at a 256x256 input"),
    "empty backbone": (dict(tiny_yaml(), backbone=[]), r"field 'backbone': \[\]; give a non-empty list"),
    "missing backbone": ({k: v for k, v in tiny_yaml().items() if k != "backbone"}, r"field 'backbone': missing"),
    "row not a list of 4": (_with_row("backbone", 1, [-1, 1, "RepVGGBlock"]),
                            r"backbone row 1 \(layer 1\): \[-1, 1, 'RepVGGBlock'\] is not a row \[from, number, "
                            r"module, args\]"),
    "args not a list": (_with_row("backbone", 1, [-1, 1, "RepVGGBlock", 16]), r"field 'args': 16 must be a list"),
    "number not positive": (_with_row("backbone", 1, [-1, 0, "RepVGGBlock", [16, 3, 2]]),
                            r"field 'number': 0 must be a positive integer"),
    "from not an integer": (_with_row("backbone", 1, ["a", 1, "RepVGGBlock", [16, 3, 2]]),
                            r"field 'from': 'a' must be an integer or a list of integers"),
    "wrong argument type": (_with_row("backbone", 1, [-1, 1, "RepVGGBlock", [16, 3.5, 2]]),
                            r"field 'args\[1\] \(kernel_size\)': 3.5 \(float\), expected an integer"),
    "bool where int": (_with_row("backbone", 1, [-1, 1, "RepVGGBlock", [16, 3, True]]),
                       r"field 'args\[2\] \(stride\)': True \(bool\), expected an integer"),
    "string is never evaluated": (_with_row("backbone", 1, [-1, 1, "RepVGGBlock", ["__import__('os')", 3, 2]]),
                                  r"string \"__import__\('os'\)\" is not accepted \(strings are never evaluated"),
    "unknown string literal": (_with_row("head", 1, [-1, 1, "nn.Upsample", ["None", 2, "magic"]]),
                               r"field 'args\[2\] \(mode\)': string 'magic' is not accepted .* write one of "
                               r"\['nearest', 'bilinear', 'bicubic'\]"),
    "too many args": (_with_row("head", 0, [-1, 1, "Conv", [32, 1, 1, None, 1, 1, True, 7]]),
                      r"field 'args': 8 arguments, but Conv takes at most 7"),
    "missing args": (_with_row("head", 0, [-1, 1, "Conv", []]), r"field 'args': \[\] is missing out_channels"),
    "concat single input": (_with_row("head", 2, [-1, 1, "Concat", [1]]),
                            r"field 'from': Concat joins several layers; give a list"),
    "nc zero": (dict(tiny_yaml(), nc=0), r"field 'nc': 0 must be a positive integer"),
    "nc missing": ({k: v for k, v in tiny_yaml().items() if k != "nc"}, r"field 'nc' is missing"),
    "negative multiple": (dict(tiny_yaml(), depth_multiple=-1), r"field 'depth_multiple': -1 is not a number"),
    "unknown top-level field": (dict(tiny_yaml(), depth_multipel=0.5), r"unknown top-level field 'depth_multipel'"),
    "anchors uneven": (dict(tiny_yaml(), anchors=[[10, 13, 16], [1, 2], [3, 4]]),
                       r"field 'anchors\[0\]': \[10, 13, 16\] must be a non-empty list of positive w,h pairs"),
    "anchors vs levels": (dict(tiny_yaml(), anchors=[[10, 13], [30, 61]]),
                          r"Detect reads 3 layers but anchors has 2 levels"),
    "last row not Detect": (dict(tiny_yaml(), head=tiny_yaml()["head"][:-1]), r"the last row must be Detect"),
    "huge channels": (_with_row("backbone", 7, [-1, 1, "Conv", [10**6, 1, 1]]),
                      r"field 'args\[0\]': 1000000 channels x width_multiple 1.0 = 1000000 is over the limit"),
    "huge number": (_with_row("backbone", 3, [-1, 100000, "RepVGGBlock", [32, 3, 1]]),
                    r"field 'number': 100000 x depth_multiple 1.0 = 100000 repeats is over the limit of 256"),
    "too many params": (_with_row("backbone", 7, [-1, 200, "RepVGGBlock", [16384, 3, 2]]),
                        r"channel mismatch|parameters, over the limit"),
    "unknown activation": (dict(tiny_yaml(), activation="os.system('x')"),
                           r"field 'activation': \"os.system\('x'\)\" is not a known activation"),
    "RepVGG kernel": (_with_row("backbone", 1, [-1, 1, "RepVGGBlock", [16, 5, 2, 2]]),
                      r"backbone row 1 \(layer 1\), RepVGGBlock: cannot build .*kernel_size=3 with padding=1"),
    "groups do not divide": (_with_row("head", 0, [-1, 1, "Conv", [32, 1, 1, None, 3]]),
                             r"groups=3 must divide in_channels=64 and out_channels=32"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_model_config_errors_name_place_value_and_fix(case):
    cfg, pattern = ERROR_CASES[case]
    with pytest.raises(ModelConfigError, match=pattern) as info:
        build_model(cfg)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("<model dict>")


def test_params_limit_is_checked_before_any_weight_is_allocated():
    cfg = tiny_yaml()
    cfg["backbone"][6] = [-1, 1, "RepVGGBlock", [16384, 3, 2]]
    cfg["backbone"][7] = [-1, 255, "RepVGGBlock", [16384, 3, 1]]
    start = time.perf_counter()
    with pytest.raises(ModelConfigError, match=r"would have [\d,]+ parameters, over the limit of 1,000,000,000"):
        build_model(cfg)
    assert time.perf_counter() - start < 30  # a real build would need ~2.4 TB; meta building is quick


def test_nc_override_must_be_positive():
    with pytest.raises(ModelConfigError, match=r"nc override 0 must be a positive integer"):
        build_model(tiny_yaml(), nc=0)


def test_errors_from_a_file_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("nc: 3\nanchors: 3\nbackbone: []\nhead: []\n")
    with pytest.raises(ModelConfigError, match=rf"^{path}: field 'backbone'"):
        build_model(path)
    path.write_text("- [1, 2, 3]\n")
    with pytest.raises(ModelConfigError, match=rf"^{path}: a model YAML is a mapping with nc, anchors, backbone"):
        build_model(path)
    with pytest.raises(ModelConfigError, match=r"no such file"):
        build_model(tmp_path / "missing.yaml")
