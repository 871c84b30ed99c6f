"""nas.metrics on hand-derived answers: NMS, letterbox round trips and COCO mAP."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nas.metrics import ImageTruth, coco_map, non_max_suppression, scale_boxes, xywh2xyxy

EPS = 1e-6


def truth(height: int, width: int, boxes: list, classes: list) -> ImageTruth:
    return ImageTruth(height, width, np.array(boxes, dtype=float).reshape(-1, 4), np.array(classes))


def perfect(gt: list[ImageTruth], score: float = 1.0) -> list[np.ndarray]:
    """Detections equal to the ground truth boxes, (k, 6)."""
    return [np.column_stack((t.boxes, np.full(len(t.boxes), score), t.classes)) for t in gt]


def shifted(gt: list[ImageTruth], dx: float) -> list[np.ndarray]:
    return [np.column_stack((t.boxes + np.array([dx, 0, dx, 0]), np.ones(len(t.boxes)), t.classes)) for t in gt]


@pytest.fixture
def varied_gt() -> list[ImageTruth]:
    """Three classes, small / medium / large boxes, a background image."""
    return [
        truth(480, 640, [[10, 10, 20, 22], [50, 60, 150, 160], [200, 100, 600, 450]], [0, 1, 2]),
        truth(375, 500, [[0, 0, 40, 30], [300, 200, 480, 370]], [1, 1]),
        truth(500, 333, [[100, 100, 105, 108], [20, 300, 320, 490]], [2, 0]),
        truth(427, 640, [], []),
    ]


@pytest.fixture
def square_gt() -> list[ImageTruth]:
    """100x100 boxes with room to shift right: class 0 in two images, class 1 in one."""
    return [
        truth(400, 600, [[50, 50, 150, 150], [250, 200, 350, 300]], [0, 1]),
        truth(300, 400, [[20, 100, 120, 200]], [0]),
    ]


# --- COCO mAP -------------------------------------------------------------------------------------------------


def test_perfect_predictions_score_one(varied_gt):
    result = coco_map(varied_gt, perfect(varied_gt), nc=3)
    assert result.map50_95 == pytest.approx(1.0, abs=EPS)
    assert result.map50 == pytest.approx(1.0, abs=EPS)
    assert result.stats[8] == pytest.approx(1.0, abs=EPS)  # AR@100
    assert len(result.stats) == 12


def test_perfect_predictions_accept_tensors(varied_gt):
    detections = [torch.from_numpy(d).float() for d in perfect(varied_gt)]
    assert coco_map(varied_gt, detections, nc=3).map50_95 == pytest.approx(1.0, abs=EPS)


@pytest.mark.parametrize(("dx", "expected_map50_95"), [
    (16.0, 0.5),  # IoU 84/116 = 0.724: thresholds 0.50..0.70 match, 5 of 10
    (10.0, 0.7),  # IoU 90/110 = 0.818: thresholds 0.50..0.80 match, 7 of 10
    (40.0, 0.0),  # IoU 60/140 = 0.429: nothing matches
])
def test_shifted_boxes_score_the_fraction_of_thresholds_their_iou_reaches(square_gt, dx, expected_map50_95):
    iou = (100 - dx) / (100 + dx)
    result = coco_map(square_gt, shifted(square_gt, dx), nc=2)
    assert result.map50_95 == pytest.approx(expected_map50_95, abs=EPS)
    assert result.map50 == pytest.approx(1.0 if iou >= 0.5 else 0.0, abs=EPS)


def mixed(gt: list[ImageTruth]) -> list[np.ndarray]:
    """Class 0 shifted to IoU 0.724 (AP 0.5), class 1 perfect (AP 1): mAP50:95 = 0.75."""
    dets = []
    for t in gt:
        dx = np.where(t.classes == 0, 16.0, 0.0)[:, None]
        dets.append(np.column_stack((t.boxes + dx * np.array([1, 0, 1, 0]), np.ones(len(t.boxes)), t.classes)))
    return dets


def test_classes_without_ground_truth_are_ignored(square_gt):
    base = coco_map(square_gt, mixed(square_gt), nc=2)
    assert base.map50_95 == pytest.approx(0.75, abs=EPS)
    wider = coco_map(square_gt, mixed(square_gt), nc=5)  # classes 2..4: no ground truth, no predictions
    assert wider.stats == pytest.approx(base.stats, abs=EPS)
    # a confident false positive of class 3 (no ground truth anywhere) is ignored too
    with_fp = mixed(square_gt)
    with_fp[0] = np.vstack((with_fp[0], [400, 50, 500, 150, 1.0, 3]))
    assert coco_map(square_gt, with_fp, nc=5).stats == pytest.approx(base.stats, abs=EPS)


@pytest.mark.parametrize(("fp_score", "expected"), [
    # ranked FP, TP, TP: precision 1/2 at recall 1/2, 2/3 at recall 1; COCO's envelope makes it 2/3 everywhere
    (0.95, 2 / 3),
    # ranked TP, TP, FP: precision 1 up to recall 1, the FP comes after full recall
    (0.10, 1.0),
])
def test_false_positive_on_background_image(fp_score, expected):
    gt = [truth(200, 200, [[10, 10, 60, 60]], [0]), truth(200, 200, [[100, 100, 180, 150]], [0]),
          truth(200, 200, [], [])]
    detections = perfect(gt, score=0.9)
    detections[2] = np.array([[20, 20, 90, 90, fp_score, 0]])
    result = coco_map(gt, detections, nc=1)
    assert result.map50 == pytest.approx(expected, abs=EPS)
    assert result.map50_95 == pytest.approx(expected, abs=EPS)


def test_no_detections_score_zero(varied_gt):
    result = coco_map(varied_gt, [np.zeros((0, 6))] * len(varied_gt), nc=3)
    assert (result.map50_95, result.map50) == (0.0, 0.0)
    assert result.stats[0] == 0.0  # defined: there is ground truth, none of it found


def test_no_ground_truth_scores_zero():
    gt = [truth(100, 100, [], []), truth(100, 100, [], [])]
    result = coco_map(gt, [np.array([[1, 1, 50, 50, 0.9, 0]]), np.zeros((0, 6))], nc=2)
    assert (result.map50_95, result.map50) == (0.0, 0.0)
    assert result.stats[0] == -1.0  # COCO: undefined
    assert coco_map([], [], nc=2).map50_95 == 0.0


def test_coco_map_rejects_bad_inputs(square_gt):
    with pytest.raises(ValueError, match="one detections array per image"):
        coco_map(square_gt, [], nc=2)
    with pytest.raises(ValueError, match=r"class ids must be integers in 0\.\.1"):
        coco_map(square_gt, [np.array([[0, 0, 5, 5, 0.5, 2]]), np.zeros((0, 6))], nc=2)
    with pytest.raises(ValueError, match=r"boxes \(k, 4\)"):
        ImageTruth(10, 10, np.zeros((2, 5)), np.zeros(2))


# --- NMS -------------------------------------------------------------------------------------------------------


def make_pred(rows: list[list[float]]) -> torch.Tensor:
    """(1, N, 5 + nc) from rows cx, cy, w, h, obj, cls..."""
    return torch.tensor([rows], dtype=torch.float32)


def test_xywh2xyxy():
    out = xywh2xyxy(torch.tensor([[50.0, 40.0, 20.0, 10.0]]))
    assert out.tolist() == [[40.0, 35.0, 60.0, 45.0]]


def test_nms_keeps_the_higher_score_of_overlapping_boxes_of_one_class():
    pred = make_pred([[50, 50, 40, 40, 0.9, 0.9, 0.0], [52, 50, 40, 40, 0.8, 0.9, 0.0]])  # IoU 0.905
    (det,) = non_max_suppression(pred, iou_thres=0.6)
    assert det.shape == (1, 6)
    assert det[0].tolist() == pytest.approx([30, 30, 70, 70, 0.81, 0])


def test_nms_keeps_overlapping_boxes_of_different_classes():
    pred = make_pred([[50, 50, 40, 40, 0.9, 0.9, 0.0], [52, 50, 40, 40, 0.8, 0.0, 0.9]])
    (det,) = non_max_suppression(pred, iou_thres=0.6)
    assert det[:, 5].tolist() == [0, 1]
    assert det[:, 4].tolist() == pytest.approx([0.81, 0.72])


def test_nms_respects_max_det_and_max_nms():
    pred = make_pred([[20 + 50 * i, 20, 20, 20, 0.5 + 0.05 * i, 1.0] for i in range(8)])  # disjoint, nc=1
    (det,) = non_max_suppression(pred, max_det=3)
    assert det[:, 4].tolist() == pytest.approx([0.85, 0.80, 0.75])
    (det,) = non_max_suppression(pred, max_nms=2)
    assert det[:, 4].tolist() == pytest.approx([0.85, 0.80])


def test_nms_conf_thres_filters_objectness_and_score():
    pred = make_pred([
        [20, 20, 10, 10, 0.9, 0.9],  # score 0.81: kept
        [60, 20, 10, 10, 0.2, 1.0],  # objectness 0.2 <= 0.25: dropped
        [99, 20, 10, 10, 0.3, 0.5],  # objectness passes, score 0.15 <= 0.25: dropped
    ])
    (det,) = non_max_suppression(pred, conf_thres=0.25)
    assert det[:, 4].tolist() == pytest.approx([0.81])


def test_multi_label_gives_one_row_per_class_above_threshold():
    pred = make_pred([[50, 50, 20, 20, 0.9, 0.8, 0.5, 0.0005]])  # scores 0.72, 0.45, 0.00045
    (det,) = non_max_suppression(pred, conf_thres=0.001, multi_label=True)
    assert det[:, 5].tolist() == [0, 1]
    assert det[:, 4].tolist() == pytest.approx([0.72, 0.45])
    (det,) = non_max_suppression(pred, conf_thres=0.001, multi_label=False)
    assert det[:, 5].tolist() == [0]
    assert det[:, 4].tolist() == pytest.approx([0.72])


def test_nms_returns_one_tensor_per_image_even_when_empty():
    pred = torch.zeros(3, 5, 7)
    out = non_max_suppression(pred)
    assert [d.shape for d in out] == [(0, 6)] * 3


@pytest.mark.parametrize("kwargs", [{"conf_thres": 1.5}, {"conf_thres": -0.1}, {"iou_thres": 1.2}])
def test_nms_rejects_thresholds_outside_0_1(kwargs):
    with pytest.raises(ValueError, match=r"must hold, but got"):
        non_max_suppression(torch.zeros(1, 1, 6), **kwargs)


# --- scale_boxes -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("h0", "w0"), [(375, 500), (500, 333), (427, 640)])
def test_scale_boxes_undoes_a_letterbox(h0, w0):
    gen = torch.Generator().manual_seed(h0 * w0)
    xy = torch.rand(20, 2, generator=gen) * torch.tensor([w0, h0]) * 0.7
    wh = torch.rand(20, 2, generator=gen) * torch.tensor([w0, h0]) * 0.3 + 1
    boxes = torch.cat((xy, xy + wh), 1)  # (20, 4) in original pixels
    gain = 320 / max(h0, w0)
    pad_w, pad_h = (320 - w0 * gain) / 2, (320 - h0 * gain) / 2
    letterboxed = boxes * gain + torch.tensor([pad_w, pad_h, pad_w, pad_h])
    back = scale_boxes(letterboxed, (320, 320), (h0, w0))
    assert torch.allclose(back, boxes, atol=1.0)
    # the same with the loader's measured ratio and pad
    back = scale_boxes(letterboxed, (320, 320), (h0, w0), ratio_pad=((gain, gain), (pad_w, pad_h)))
    assert torch.allclose(back, boxes, atol=1.0)


def test_scale_boxes_clips_to_the_image_and_copies_extra_columns():
    # 500x375 (w x h) letterboxed to 320: gain 0.64, pad (0, 40)
    det = torch.tensor([[-10.0, 20.0, 330.0, 300.0, 0.9, 2.0]])  # reaches into the pad and past the edges
    out = scale_boxes(det, (320, 320), (375, 500))
    assert out[0].tolist() == pytest.approx([0, 0, 500, 375, 0.9, 2.0])
    assert det[0, 0] == -10.0  # input untouched


def test_nms_scale_and_map_together(varied_gt):
    """Ground truth letterboxed into a (1, N, 5 + nc) prediction, through NMS and back: perfect mAP."""
    detections = []
    for t in varied_gt:
        gain = 320 / max(t.height, t.width)
        pad = torch.tensor([(320 - t.width * gain) / 2, (320 - t.height * gain) / 2] * 2)
        xyxy = torch.from_numpy(t.boxes).float() * gain + pad  # (k, 4)
        xywh = torch.cat(((xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]), 1)
        cls = torch.nn.functional.one_hot(torch.from_numpy(t.classes), 3).float()  # (k, 3)
        pred = torch.cat((xywh, torch.ones(len(t.boxes), 1), cls), 1)[None]  # (1, k, 8)
        (det,) = non_max_suppression(pred)
        detections.append(scale_boxes(det, (320, 320), (t.height, t.width)))
    result = coco_map(varied_gt, detections, nc=3)
    assert result.map50_95 == pytest.approx(1.0, abs=EPS)
