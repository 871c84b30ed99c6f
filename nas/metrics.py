"""Detection metrics: YOLOv5-style NMS, boxes back to original pixels, and COCO mAP via pycocotools.

Pure functions (no files): the validation loop feeds `Detect` eval output through `non_max_suppression`,
maps boxes back with `scale_boxes`, and ranks architectures on `coco_map(...).map50_95`.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchvision

# COCO treats id 0 as "unmatched" in COCOeval's match tables, so every id we hand it is ours + 1.
_ID_OFFSET = 1


def xywh2xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) centre x, centre y, width, height -> (..., 4) x1, y1, x2, y2, as a new tensor."""
    xy, half_wh = boxes[..., :2], boxes[..., 2:4] / 2
    return torch.cat((xy - half_wh, xy + half_wh), dim=-1)


def non_max_suppression(pred: torch.Tensor, conf_thres: float = 0.001, iou_thres: float = 0.6, max_det: int = 300,
                        *, multi_label: bool = True, max_nms: int = 30000) -> list[torch.Tensor]:
    """Per-image detections (n, 6) x1, y1, x2, y2, score, class from `Detect` eval output (B, N, 5 + nc).

    YOLOv5 val semantics: a candidate needs objectness > conf_thres; score = objectness * class score;
    multi_label keeps every (box, class) pair scoring > conf_thres (one row each), otherwise only the best class.
    At most max_nms candidates (highest score) enter class-aware NMS; at most max_det survive, best first.
    """
    if not 0.0 <= conf_thres <= 1.0:
        raise ValueError(f"`0 <= conf_thres <= 1` must hold, but got {conf_thres=}")
    if not 0.0 <= iou_thres <= 1.0:
        raise ValueError(f"`0 <= iou_thres <= 1` must hold, but got {iou_thres=}")
    if max_det < 1 or max_nms < 1:
        raise ValueError(f"`max_det >= 1` and `max_nms >= 1` must hold, but got ({max_det=}, {max_nms=})")
    if pred.ndim != 3 or pred.shape[-1] < 6:
        raise ValueError(f"pred must be (B, N, 5 + nc) with nc >= 1, but got shape {tuple(pred.shape)}")

    output = []
    for x in pred:  # (N, 5 + nc)
        x = x[x[:, 4] > conf_thres]  # (n, 5 + nc)
        box = xywh2xyxy(x[:, :4])  # (n, 4)
        scores = x[:, 5:] * x[:, 4:5]  # (n, nc)
        if multi_label:
            i, j = (scores > conf_thres).nonzero(as_tuple=True)  # (m,), (m,)
            det = torch.cat((box[i], scores[i, j, None], j[:, None].to(x.dtype)), 1)  # (m, 6)
        else:
            best, j = scores.max(1, keepdim=True)  # (n, 1), (n, 1)
            det = torch.cat((box, best, j.to(x.dtype)), 1)[best.view(-1) > conf_thres]  # (m, 6)
        det = det[det[:, 4].argsort(descending=True)[:max_nms]]
        keep = torchvision.ops.batched_nms(det[:, :4], det[:, 4], det[:, 5].long(), iou_thres)  # sorted by score
        output.append(det[keep[:max_det]])
    return output


def scale_boxes(boxes_xyxy: torch.Tensor, letterbox_shape: Sequence[int], original_shape: Sequence[int],
                ratio_pad: tuple[tuple[float, float], tuple[float, float]] | None = None) -> torch.Tensor:
    """Map (..., 4+) xyxy boxes from the letterboxed input (h1, w1) back to the original image (h0, w0) pixels.

    Undo the centred pad, then the gain, then clip to the image; extra columns (score, class) are copied.
    Without ratio_pad the letterbox is recomputed as YOLOv5 does: gain = min(h1/h0, w1/w0),
    pad = ((w1 - w0*gain)/2, (h1 - h0*gain)/2). ratio_pad = ((gain_h, gain_w), (pad_w, pad_h)) is what the
    data loader measured after rounding the resized size; each axis is divided by its own gain.
    """
    (h1, w1), (h0, w0) = letterbox_shape[:2], original_shape[:2]
    if ratio_pad is None:
        gain_h = gain_w = min(h1 / h0, w1 / w0)
        pad_w, pad_h = (w1 - w0 * gain_w) / 2, (h1 - h0 * gain_h) / 2
    else:
        (gain_h, gain_w), (pad_w, pad_h) = ratio_pad
    out = boxes_xyxy.clone()  # (..., 4+)
    out[..., [0, 2]] = ((out[..., [0, 2]] - pad_w) / gain_w).clamp(0, w0)
    out[..., [1, 3]] = ((out[..., [1, 3]] - pad_h) / gain_h).clamp(0, h0)
    return out


@dataclass(frozen=True, eq=False)  # eq=False: == on arrays is ambiguous
class ImageTruth:
    """Ground truth of one image in original pixels: boxes (k, 4) x1, y1, x2, y2 and classes (k,) in 0..nc-1.

    An image with k = 0 is a background image: it still counts, so its false positives cost precision.
    """

    height: int
    width: int
    boxes: np.ndarray  # (k, 4) xyxy
    classes: np.ndarray  # (k,)

    def __post_init__(self) -> None:
        boxes = np.asarray(self.boxes, dtype=np.float64)
        classes = np.asarray(self.classes, dtype=np.int64)
        if boxes.size == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.ndim != 2 or boxes.shape[1] != 4 or classes.shape != (len(boxes),):
            raise ValueError(f"ImageTruth needs boxes (k, 4) and classes (k,), but got shapes "
                             f"{boxes.shape} and {classes.shape}")
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"ImageTruth needs a positive image size, but got ({self.height=}, {self.width=})")
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "classes", classes)


@dataclass(frozen=True)
class CocoResult:
    """COCO bbox metrics. map fields are 0.0 where COCO says -1 (undefined); `stats` are COCO's 12 as printed."""

    map50_95: float
    map50: float
    stats: tuple[float, ...]


def coco_map(ground_truth: Sequence[ImageTruth], detections: Sequence[np.ndarray | torch.Tensor],
             nc: int) -> CocoResult:
    """COCO mAP@0.5:0.95 and mAP@0.5 with pycocotools' standard COCOeval (100 detections per image count).

    `detections[i]` is (n, 6) x1, y1, x2, y2, score, class in the original pixels of `ground_truth[i]`.
    COCO averages over classes that have ground truth: a class absent from it, and its detections, are ignored.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(ground_truth) != len(detections):
        raise ValueError(f"one detections array per image is needed, but got {len(ground_truth)} images "
                         f"and {len(detections)} detection arrays")
    if nc < 1:
        raise ValueError(f"`nc >= 1` must hold, but got {nc=}")

    images, gt_anns, dt_anns = [], [], []
    for image_id, (truth, det) in enumerate(zip(ground_truth, detections), start=_ID_OFFSET):
        images.append({"id": image_id, "height": truth.height, "width": truth.width})
        _check_classes(truth.classes, nc, f"ground_truth[{image_id - _ID_OFFSET}]")
        for (x1, y1, x2, y2), cls in zip(truth.boxes.tolist(), truth.classes.tolist()):
            w, h = x2 - x1, y2 - y1
            gt_anns.append({"id": len(gt_anns) + 1, "image_id": image_id, "category_id": cls + _ID_OFFSET,
                            "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": 0})
        det = _as_numpy(det, f"detections[{image_id - _ID_OFFSET}]")  # (n, 6)
        _check_classes(det[:, 5], nc, f"detections[{image_id - _ID_OFFSET}]")
        for x1, y1, x2, y2, score, cls in det.tolist():
            dt_anns.append({"image_id": image_id, "category_id": int(cls) + _ID_OFFSET,
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})

    categories = [{"id": c + _ID_OFFSET, "name": str(c)} for c in range(nc)]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        gt = COCO()
        gt.dataset = {"images": images, "annotations": gt_anns, "categories": categories}
        gt.createIndex()
        if dt_anns:
            dt = gt.loadRes(dt_anns)
        else:  # loadRes fails on an empty list; an empty result set scores 0 where there is ground truth
            dt = COCO()
            dt.dataset = {"images": images, "annotations": [], "categories": categories}
            dt.createIndex()
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = tuple(float(s) for s in evaluator.stats)
    return CocoResult(map50_95=max(stats[0], 0.0), map50=max(stats[1], 0.0), stats=stats)


def _as_numpy(det: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    array = det.detach().cpu().numpy() if isinstance(det, torch.Tensor) else np.asarray(det)
    array = array.astype(np.float64)
    if array.size == 0:
        return array.reshape(0, 6)
    if array.ndim != 2 or array.shape[1] != 6:
        raise ValueError(f"{name} must be (n, 6) x1, y1, x2, y2, score, class, but got shape {array.shape}")
    return array


def _check_classes(classes: np.ndarray, nc: int, name: str) -> None:
    if len(classes) and not (np.all(classes >= 0) and np.all(classes < nc) and np.all(classes == np.round(classes))):
        bad = sorted({float(c) for c in classes if not (0 <= c < nc and c == round(c))})
        raise ValueError(f"{name}: class ids must be integers in 0..{nc - 1} (nc={nc}), but got {bad[:5]}")
