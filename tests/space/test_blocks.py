import pytest
import torch
from torch import nn

from space.blocks import C3, SPPF, Conv, Detect, RepVGGBlock, SEBlock, autopad, make_divisible
from space.builder import build_model
from tests.conftest import randomize_batchnorm, tiny_yaml

BLOCK_CASES = [  # (in, out, stride, groups, use_se)
    (16, 16, 1, 1, False),  # identity branch
    (16, 32, 1, 1, False),  # no identity (channels change)
    (16, 16, 2, 1, False),  # no identity (stride 2)
    (32, 32, 1, 1, True),
    (32, 64, 2, 1, True),
    (32, 32, 1, 4, False),  # grouped, identity
    (32, 64, 2, 4, True),
]


@pytest.mark.parametrize(("cin", "cout", "stride", "groups", "use_se"), BLOCK_CASES)
def test_repvgg_block_matches_reference_block(reference_block, cin, cout, stride, groups, use_se):
    torch.manual_seed(0)
    ref = reference_block.RepVGGBlock(cin, cout, 3, stride, 1, 1, groups, "zeros", False, use_se)
    ours = RepVGGBlock(cin, cout, 3, stride, 1, 1, groups, "zeros", False, use_se)
    randomize_batchnorm(ref)
    ref_sd = ref.state_dict()
    assert list(ours.state_dict()) == list(ref_sd)
    assert all(ours.state_dict()[k].shape == v.shape for k, v in ref_sd.items())
    ours.load_state_dict(ref_sd)
    x = torch.randn(2, cin, 16, 16)
    for train in (True, False):
        ref.train(train)
        ours.train(train)
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)


def test_repvgg_block_deploy_keys_match_reference(reference_block):
    ref = reference_block.RepVGGBlock(16, 32, 3, 2, 1, 1, 1, "zeros", True, True)
    ours = RepVGGBlock(16, 32, 3, 2, 1, 1, 1, "zeros", True, True)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    ref.eval()
    ours.eval()
    x = torch.randn(1, 16, 12, 12)
    torch.testing.assert_close(ours(x), ref(x))


def test_se_pools_globally_so_non_square_inputs_work(reference_block):
    torch.manual_seed(0)
    ref = reference_block.SEBlock(32, 2)
    ours = SEBlock(32, 2)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 32, 8, 8)
    torch.testing.assert_close(ours(x), ref(x))  # equal on square maps
    x = torch.randn(2, 32, 6, 10)
    expected = x * torch.sigmoid(ours.up(torch.relu(ours.down(x.mean((2, 3), keepdim=True)))))
    torch.testing.assert_close(ours(x), expected)
    with pytest.raises(RuntimeError):
        ref(x)  # the reference pools with a (W, W) kernel and breaks here


def test_se_takes_channels_from_input_at_run_time():
    se = SEBlock(32, 2)
    se.down = nn.Conv2d(24, 2, 1)  # as after pruning the block's output channels to 24
    se.up = nn.Conv2d(2, 24, 1)
    assert se(torch.randn(1, 24, 5, 7)).shape == (1, 24, 5, 7)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kernel_size": 5, "padding": 2}, "kernel_size=3 with padding=1"),
        ({"dilation": 2}, "dilation=1"),
        ({"padding_mode": "reflect"}, "padding_mode='zeros'"),
        ({"groups": 3}, "groups=3 must divide"),
    ],
)
def test_repvgg_block_rejects_settings_its_fusion_cannot_honour(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RepVGGBlock(16, 32, **kwargs)


def test_repvgg_se_needs_16_channels():
    with pytest.raises(ValueError, match="use_se needs out_channels >= 16"):
        RepVGGBlock(8, 8, use_se=True)


def test_yolov5_helpers():
    assert make_divisible(64 * 0.25, 8) == 16
    assert make_divisible(20, 8) == 24
    assert autopad(3) == 1 and autopad(1) == 0 and autopad(3, dilation=2) == 2 and autopad(3, 0) == 0


def test_conv_activation_options():
    assert isinstance(Conv(8, 8).act, nn.SiLU)
    assert isinstance(Conv(8, 8, act=False).act, nn.Identity)
    assert isinstance(Conv(8, 8, act_layer=nn.ReLU).act, nn.ReLU)
    fused = Conv(8, 8, 3, deploy=True)
    assert isinstance(fused.bn, nn.Identity) and fused.conv.bias is not None


def test_c3_and_sppf_shapes_and_yolov5_parameter_names():
    c3 = C3(32, 64, 2, False)
    names = {k.rsplit(".", 1)[0] for k in c3.state_dict()}
    assert {"cv1.conv", "cv1.bn", "cv2.conv", "cv3.conv", "m.0.cv1.conv", "m.1.cv2.bn"} <= names
    assert c3(torch.randn(1, 32, 8, 8)).shape == (1, 64, 8, 8)
    assert SPPF(32, 48)(torch.randn(1, 32, 8, 8)).shape == (1, 48, 8, 8)


def _detect(nc=2):
    anchors = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119]]
    d = Detect(nc, anchors, (8, 16))
    d.stride.copy_(torch.tensor([8.0, 16.0]))
    d.anchors /= d.stride.view(-1, 1, 1)
    return d


def test_detect_train_returns_raw_maps_and_eval_decodes_boxes_in_pixels():
    torch.manual_seed(0)
    d = _detect(nc=2)
    feats = [torch.randn(2, 8, 4, 6), torch.randn(2, 16, 2, 3)]
    raw = d.train()([f.clone() for f in feats])
    assert [tuple(t.shape) for t in raw] == [(2, 3, 4, 6, 7), (2, 3, 2, 3, 7)]
    pred, raw_eval = d.eval()([f.clone() for f in feats])
    assert pred.shape == (2, 3 * 24 + 3 * 6, 7)
    torch.testing.assert_close(raw_eval[0], raw[0])
    # decode one cell by hand: level 1, anchor 2, cell (y=1, x=2)
    t = raw[1][0, 2, 1, 2].sigmoid()
    cx = (t[0] * 2 - 0.5 + 2) * 16
    cy = (t[1] * 2 - 0.5 + 1) * 16
    w = (t[2] * 2) ** 2 * 59
    h = (t[3] * 2) ** 2 * 119
    row = pred[0, 3 * 24 + (2 * 6 + 1 * 3 + 2)]
    torch.testing.assert_close(row[:4], torch.stack([cx, cy, w, h]))
    torch.testing.assert_close(row[4:], t[4:])


def test_detect_grid_follows_anchor_edits():
    d = _detect().eval()
    feats = [torch.zeros(1, 8, 2, 2), torch.zeros(1, 16, 1, 1)]
    before = d([f.clone() for f in feats])[0]
    with torch.no_grad():
        d.anchors *= 2
    after = d([f.clone() for f in feats])[0]
    torch.testing.assert_close(after[..., 2:4], before[..., 2:4] * 2)


def test_detect_bias_initialisation_is_yolov5s():
    model = build_model(tiny_yaml(nc=3))
    detect = model.detect
    for conv, s in zip(detect.m, (8, 16, 32)):
        b = conv.bias.detach().view(detect.na, -1)
        fresh = nn.Conv2d(conv.in_channels, conv.out_channels, 1)  # default init range is +-1/sqrt(fan_in)
        bound = 1 / conv.in_channels**0.5
        assert fresh.bias.abs().max() <= bound
        obj_prior = torch.log(torch.tensor(8 / (640 / s) ** 2))
        cls_prior = torch.log(torch.tensor(0.6 / (3 - 0.99999)))
        assert ((b[:, 4] - obj_prior).abs() <= bound + 1e-6).all()
        assert ((b[:, 5:] - cls_prior).abs() <= bound + 1e-6).all()


def test_models_share_no_activation_state():
    relu_cfg = dict(tiny_yaml(), activation="nn.LeakyReLU(0.1)")
    leaky = build_model(relu_cfg)
    silu = build_model(tiny_yaml())
    assert isinstance(leaky.model[8].act, nn.LeakyReLU) and leaky.model[8].act.negative_slope == 0.1
    assert isinstance(silu.model[8].act, nn.SiLU)
    assert isinstance(leaky.model[0].nonlinearity, nn.SiLU)  # RepVGG keeps its own SiLU, as in the reference
    assert leaky.model[8].act is not leaky.model[12].act
