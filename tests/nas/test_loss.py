"""DetectionLoss (YOLOv5 ComputeLoss semantics) on hand-made cases: assignment, IoU, loss terms, training."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from nas.loss import DetectionLoss, LossHyp, bbox_iou, bce_with_logits
from space.builder import build_model
from space.errors import ConfigError
from tests.conftest import tiny_yaml

IMGSZ = 64  # levels 8x8 (stride 8), 4x4 (16), 2x2 (32)


@pytest.fixture(scope="module")
def model3():
    torch.manual_seed(0)
    return build_model(tiny_yaml(nc=3)).train()


def raw_preds(model, batch_size: int = 2, seed: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
    """Random raw maps with the head's training-mode shapes, (B, na, H, W, 5 + nc) per level."""
    g = torch.Generator().manual_seed(seed)
    d = model.detect
    return [torch.randn(batch_size, d.na, IMGSZ // int(s), IMGSZ // int(s), 5 + d.nc, generator=g, dtype=dtype)
            for s in d.stride]


def cells(targets, level: int) -> set[tuple[int, int, int, int]]:
    return set(zip(*(t.tolist() for t in targets.indices[level])))


def target_row(image: int, cls: int, gx: float, gy: float, w_px: float, h_px: float, grid: int) -> list[float]:
    """A target row whose centre lies at grid coordinates (gx, gy) of a grid x grid level."""
    return [image, cls, gx / grid, gy / grid, w_px / IMGSZ, h_px / IMGSZ]


# ---------------------------------------------------------------------------------------------- LossHyp


def test_hyp_defaults_are_yolov5_scratch_low():
    assert dataclasses.astuple(LossHyp()) == (0.05, 0.5, 1.0, 1.0, 1.0, 4.0, 0.0, 0.0)


def test_hyp_scaled_follows_train_py():
    assert LossHyp().scaled(3, 80, 640) == LossHyp()
    hyp = LossHyp().scaled(nl=3, nc=3, imgsz=64)
    assert hyp.box == pytest.approx(0.05)
    assert hyp.cls == pytest.approx(0.5 * 3 / 80)
    assert hyp.obj == pytest.approx(0.01)
    hyp4 = LossHyp().scaled(nl=4, nc=80, imgsz=1280)
    assert (hyp4.box, hyp4.cls, hyp4.obj) == pytest.approx((0.05 * 0.75, 0.5 * 0.75, 4 * 0.75))
    assert hyp4.anchor_t == 4.0


@pytest.mark.parametrize("field, value, words", [
    ("box", -0.1, "box"), ("obj_pw", float("nan"), "obj_pw"), ("fl_gamma", -1.0, "fl_gamma"),
    ("anchor_t", 1.0, "anchor_t"), ("label_smoothing", 1.5, "label_smoothing"),
])
def test_hyp_rejects_bad_values_naming_the_field(field, value, words):
    with pytest.raises(ConfigError, match=words):
        LossHyp(**{field: value})


def test_hyp_is_frozen_and_scaled_rejects_bad_counts():
    with pytest.raises(dataclasses.FrozenInstanceError):
        LossHyp().box = 1.0
    with pytest.raises(ConfigError, match="nl"):
        LossHyp().scaled(0, 3, 64)


# ---------------------------------------------------------------------------------------------- bbox_iou


def test_bbox_iou_identical_boxes_is_one():
    box = torch.tensor([[3.0, 4.0, 2.0, 5.0]])
    assert bbox_iou(box, box).item() == pytest.approx(1.0, abs=1e-6)
    assert bbox_iou(box, box, CIoU=True).item() == pytest.approx(1.0, abs=1e-6)


def test_bbox_iou_half_overlap_and_ciou_penalty():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 0.0, 2.0, 2.0]])  # shifted by half a width: inter 2, union 6
    iou = bbox_iou(a, b).item()
    ciou = bbox_iou(a, b, CIoU=True).item()
    assert iou == pytest.approx(1 / 3, abs=1e-6)
    # same aspect ratio, so only the centre term: distance² 1 over enclosing diagonal² 3² + 2²
    assert ciou == pytest.approx(1 / 3 - 1 / 13, abs=1e-6)
    assert ciou < iou


def test_bbox_iou_aspect_term_and_xyxy_form():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    tall = torch.tensor([[0.0, 0.0, 1.0, 4.0]])  # same centre, inter 1*2=2, union 4+4-2
    v = 4 / math.pi**2 * (math.atan(1 / 4) - math.atan(1.0)) ** 2
    alpha = v / (v - 1 / 3 + 1)
    assert bbox_iou(a, tall, CIoU=True).item() == pytest.approx(1 / 3 - alpha * v, abs=1e-6)
    xyxy = torch.tensor([[-1.0, -1.0, 1.0, 1.0]]), torch.tensor([[-0.5, -2.0, 0.5, 2.0]])
    assert bbox_iou(*xyxy, xywh=False).item() == pytest.approx(1 / 3, abs=1e-6)


def test_bbox_iou_disjoint_boxes_have_negative_ciou_and_broadcast():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[3.0, 0.0, 1.0, 1.0]])
    assert bbox_iou(a, b).item() == 0.0
    assert bbox_iou(a, b, CIoU=True).item() == pytest.approx(-9 / 17, abs=1e-6)  # distance² 9, diagonal² 4² + 1²
    assert bbox_iou(a.expand(5, 4), torch.rand(5, 4) + 0.1).shape == (5, 1)


# ---------------------------------------------------------------------------------------------- build_targets


def test_centre_cell_and_the_two_nearer_neighbours_are_assigned(model3):
    loss = DetectionLoss(model3, LossHyp(anchor_t=1.5))  # tight: only the equal anchor matches
    # level 0 (8x8): centre at x 3.25 (left half: left neighbour), y 5.75 (lower half: bottom neighbour);
    # size equal to anchor 0 (10x13 px = 1.25x1.625 cells)
    targets = torch.tensor([target_row(1, 2, 3.25, 5.75, 10, 13, grid=8)])
    tgt = loss.build_targets(raw_preds(model3), targets)
    assert cells(tgt, 0) == {(1, 0, 5, 3), (1, 0, 5, 2), (1, 0, 6, 3)}  # (b, a, gj, gi): own, left, bottom
    order = list(zip(tgt.indices[0][2].tolist(), tgt.indices[0][3].tolist()))
    box = dict(zip(order, tgt.box[0].tolist()))
    assert box[(5, 3)] == pytest.approx([0.25, 0.75, 1.25, 1.625])
    assert box[(5, 2)] == pytest.approx([1.25, 0.75, 1.25, 1.625])  # xy measured from the neighbour's corner
    assert box[(6, 3)] == pytest.approx([0.25, -0.25, 1.25, 1.625])
    assert tgt.anchors[0].tolist() == [[1.25, 1.625]] * 3
    assert tgt.cls[0].tolist() == [2, 2, 2]


def test_opposite_quadrant_picks_the_other_neighbours(model3):
    loss = DetectionLoss(model3, LossHyp(anchor_t=1.5))
    targets = torch.tensor([target_row(0, 0, 3.75, 5.25, 10, 13, grid=8)])  # right half, upper half
    assert cells(loss.build_targets(raw_preds(model3), targets), 0) == {(0, 0, 5, 3), (0, 0, 5, 4), (0, 0, 4, 3)}


def test_border_box_gets_no_out_of_grid_neighbour(model3):
    loss = DetectionLoss(model3, LossHyp(anchor_t=1.5))
    preds = raw_preds(model3)
    # first column, left half (left neighbour would be column -1); last row, lower half (row 8 is outside)
    corner = torch.tensor([target_row(0, 0, 0.25, 7.75, 10, 13, grid=8)])
    assert cells(loss.build_targets(preds, corner), 0) == {(0, 0, 7, 0)}
    # last column, right half; first row, upper half
    other = torch.tensor([target_row(0, 0, 7.75, 0.25, 10, 13, grid=8)])
    assert cells(loss.build_targets(preds, other), 0) == {(0, 0, 0, 7)}
    # centres on the very edges of the image stay inside the grid at every level
    edges = torch.tensor([[0, 0, 1.0, 1.0, 0.5, 0.5], [1, 1, 0.0, 0.0, 0.5, 0.5], [0, 2, 1.0, 0.0, 0.4, 0.6]])
    tgt = DetectionLoss(model3).build_targets(preds, edges)
    for level, pred in enumerate(preds):
        _, _, gj, gi = tgt.indices[level]
        assert gj.numel() > 0  # the boxes match anchors on every level
        assert gj.min() >= 0 and gi.min() >= 0
        assert gj.max() < pred.shape[2] and gi.max() < pred.shape[3]
        assert tgt.box[level][:, :2].min() >= -0.5 and tgt.box[level][:, :2].max() <= 1.5


def test_anchor_ratio_rule(model3):
    loss = DetectionLoss(model3)
    preds = raw_preds(model3)
    exact = torch.tensor([target_row(0, 0, 4.5, 4.5, 33, 23, grid=8)])  # anchor 2 of level 0: 4.125x2.875 cells
    tgt = loss.build_targets(preds, exact)
    assert 2 in tgt.indices[0][1].tolist()
    assert tgt.box[0][0, 2:].tolist() == pytest.approx([4.125, 2.875])
    # at the tight limit only the exact anchor survives
    assert set(DetectionLoss(model3, LossHyp(anchor_t=1.01)).build_targets(preds, exact).indices[0][1].tolist()) == {2}

    # a box 4 cells wide is more than 4x every anchor of level 0 (set to 0.5x0.5 cells): no match at level 0,
    # while levels 1 and 2 (anchors from 2.8 to 11.7 cells in their own grids) still take it
    anchors = model3.detect.anchors.clone()
    try:
        with torch.no_grad():
            model3.detect.anchors[0] = 0.5  # read at call time: no need to rebuild the loss
        large = torch.tensor([[0, 0, 0.5, 0.5, 0.5, 0.5]])
        tgt = loss.build_targets(preds, large)
        assert tgt.indices[0][0].numel() == 0
        assert tgt.indices[1][0].numel() > 0 and tgt.indices[2][0].numel() > 0
    finally:
        with torch.no_grad():
            model3.detect.anchors.copy_(anchors)


def test_empty_targets_build_empty_assignments(model3):
    tgt = DetectionLoss(model3).build_targets(raw_preds(model3), torch.zeros(0, 6))
    assert all(b.numel() == 0 for b, _, _, _ in tgt.indices)
    assert all(box.shape == (0, 4) for box in tgt.box)


def test_bad_target_shape_is_rejected(model3):
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        DetectionLoss(model3)(raw_preds(model3), torch.zeros(3, 5))


# ---------------------------------------------------------------------------------------------- loss terms


def test_empty_targets_only_objectness_and_backward_works(model3):
    model3.zero_grad()
    preds = model3(torch.randn(2, 3, IMGSZ, IMGSZ))
    loss, items = DetectionLoss(model3)(preds, torch.zeros(0, 6))
    lbox, lobj, lcls = items.tolist()
    assert lbox == 0 and lcls == 0 and lobj > 0
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(2 * lobj)  # times the batch size
    assert not items.requires_grad
    loss.backward()
    assert model3.detect.m[0].weight.grad.abs().sum() > 0


def exact_preds(model, loss: DetectionLoss, targets: torch.Tensor) -> list[torch.Tensor]:
    """Raw maps (float64) whose decoded box equals the target at every assigned cell, confident objectness
    there and unconfident elsewhere."""
    preds = [torch.full_like(p, -8.0) for p in raw_preds(model, dtype=torch.float64)]
    tgt = loss.build_targets(preds, targets)
    for level, pred in enumerate(preds):
        b, a, gj, gi = tgt.indices[level]
        box = tgt.box[level].double()  # (n, 4)
        xy = torch.logit((box[:, :2] + 0.5) / 2)  # inverse of 2 * sigmoid - 0.5
        wh = torch.logit(torch.sqrt(box[:, 2:] / tgt.anchors[level].double()) / 2)  # inverse of (2 * sigmoid)² * anchor
        pred[b, a, gj, gi, :4] = torch.cat((xy, wh), 1)
        pred[b, a, gj, gi, 4] = 8.0
    return preds


def test_prediction_equal_to_target_has_no_box_loss(model3):
    loss = DetectionLoss(model3)
    targets = torch.tensor([[0, 1, 0.40, 0.55, 0.30, 0.20], [1, 0, 0.71, 0.22, 0.15, 0.45],
                            [1, 2, 0.10, 0.90, 0.08, 0.12]])
    _, exact = loss(exact_preds(model3, loss, targets), targets)
    _, random = loss(raw_preds(model3, dtype=torch.float64), targets)
    assert exact[0].item() == pytest.approx(0.0, abs=1e-4)
    assert random[0] > 0.01
    assert exact[1] < random[1]


def test_single_class_model_has_no_class_loss():
    model = build_model(tiny_yaml(nc=1)).train()
    targets = torch.tensor([[0, 0, 0.5, 0.5, 0.3, 0.3], [1, 0, 0.2, 0.7, 0.1, 0.2]])
    _, items = DetectionLoss(model)(raw_preds(model), targets)
    assert items[0] > 0 and items[2] == 0


def bce(logit: float, target: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_label_smoothing_sets_class_targets(model3, eps):
    hyp = LossHyp(cls=1.0, label_smoothing=eps)
    loss = DetectionLoss(model3, hyp)
    targets = torch.tensor([[0, 1, 0.40, 0.55, 0.30, 0.20], [1, 2, 0.71, 0.22, 0.15, 0.45]])
    preds = raw_preds(model3)
    for p in preds:
        p[..., 5:] = 0.0
        p[..., 6] = 4.0  # the true class of the first target; wrong for the second
    tgt = loss.build_targets(preds, targets)
    cp, cn = 1 - eps / 2, eps / 2  # class targets: positive, negative
    expected = 0.0
    for level in range(3):
        cls = tgt.cls[level]
        if cls.numel():  # mean over (n, nc) of the BCE of each class logit against cp or cn
            per_row = [(bce(4.0 if k == 1 else 0.0, cp if k == c else cn)) for c in cls.tolist() for k in range(3)]
            expected += sum(per_row) / len(per_row)
    _, items = loss(preds, targets)
    assert items[2].item() == pytest.approx(expected, rel=1e-5)


def test_focal_loss_matches_its_formula_and_down_weights(model3):
    pred = torch.tensor([2.0, -1.0, 0.5])
    target = torch.tensor([1.0, 0.0, 1.0])
    gamma, alpha = 1.5, 0.25
    expected = 0.0
    for x, t in zip(pred.tolist(), target.tolist()):
        p = 1 / (1 + math.exp(-x))
        p_t = p if t else 1 - p
        expected += bce(x, t) * (alpha if t else 1 - alpha) * (1 - p_t) ** gamma
    assert bce_with_logits(pred, target, focal_gamma=gamma).item() == pytest.approx(expected / 3, rel=1e-6)
    assert bce_with_logits(pred, target).item() == pytest.approx(
        sum(bce(x, t) for x, t in zip(pred.tolist(), target.tolist())) / 3, rel=1e-6)

    targets = torch.tensor([[0, 1, 0.40, 0.55, 0.30, 0.20]])
    _, plain = DetectionLoss(model3)(raw_preds(model3), targets)
    _, focal = DetectionLoss(model3, LossHyp(fl_gamma=1.5))(raw_preds(model3), targets)
    assert focal[1] < plain[1] and focal[2] < plain[2]
    assert focal[0] == plain[0]  # the box loss has no focal form


def test_pos_weight_scales_the_positive_term():
    pred, target = torch.tensor([0.3]), torch.tensor([1.0])
    assert bce_with_logits(pred, target, pos_weight=2.0).item() == pytest.approx(2 * bce(0.3, 1.0), rel=1e-6)


def test_gains_and_level_balance(model3):
    targets = torch.tensor([[0, 1, 0.40, 0.55, 0.30, 0.20]])
    preds = raw_preds(model3)
    _, unit = DetectionLoss(model3, LossHyp(box=1.0, obj=1.0, cls=1.0))(preds, targets)
    _, gained = DetectionLoss(model3, LossHyp(box=0.5, obj=2.0, cls=0.25))(preds, targets)
    assert gained.tolist() == pytest.approx((unit * torch.tensor([0.5, 2.0, 0.25])).tolist(), rel=1e-6)
    # without targets the objectness loss is the 4.0 / 1.0 / 0.4 weighted sum of per-level BCEs against 0
    empty = torch.zeros(0, 6)
    _, items = DetectionLoss(model3)(preds, empty)
    per_level = [bce_with_logits(p[..., 4], torch.zeros_like(p[..., 4])).item() for p in preds]
    assert items[1].item() == pytest.approx(4.0 * per_level[0] + 1.0 * per_level[1] + 0.4 * per_level[2], rel=1e-6)


def test_autobalance_adapts_and_keeps_the_stride_16_weight_at_one(model3):
    loss = DetectionLoss(model3, autobalance=True)
    fixed = DetectionLoss(model3)
    loss(raw_preds(model3), torch.zeros(0, 6))
    assert loss.balance[1] == pytest.approx(1.0)
    assert loss.balance != [4.0, 1.0, 0.4]
    assert fixed.balance == [4.0, 1.0, 0.4]  # no state shared between instances


# ---------------------------------------------------------------------------------------------- training


def test_gradients_reach_parameters_and_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    model = build_model(tiny_yaml(nc=3)).train()
    x = torch.randn(2, 3, IMGSZ, IMGSZ)
    targets = torch.tensor([[0, 0, 0.30, 0.40, 0.25, 0.30], [0, 2, 0.70, 0.60, 0.50, 0.40],
                            [1, 1, 0.50, 0.50, 0.20, 0.60]])
    criterion = DetectionLoss(model, LossHyp().scaled(nl=3, nc=3, imgsz=IMGSZ))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for step in range(6):
        opt.zero_grad()
        loss, _ = criterion(model(x), targets)
        loss.backward()
        if step == 0:
            first = model.model[0]  # the first backbone layer
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in first.parameters())
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
