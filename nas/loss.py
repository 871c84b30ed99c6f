"""YOLOv5's detection loss (v7.0 `ComputeLoss` numerics): CIoU box loss, IoU-target objectness, BCE classes.

Targets are YOLOv5's: a (N, 6) float tensor of `[image_index, class, cx, cy, w, h]` with the box normalised to
0..1 of the (letterboxed) input image. Predictions are the Detect head's training-mode output: one raw map per
level, each (B, na, H, W, 5 + nc). Anchors are read from `model.detect` in stride units on every call, so an
anchor update (autoanchor, a loaded checkpoint) is picked up without rebuilding the loss.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from space.errors import ConfigError

# YOLOv5's per-level objectness weights: P3-P5 for three levels, else P3-P7
OBJ_BALANCE_3 = (4.0, 1.0, 0.4)
OBJ_BALANCE_5 = (4.0, 1.0, 0.25, 0.06, 0.02)
FOCAL_ALPHA = 0.25
NEIGHBOUR_BIAS = 0.5  # a centre within this much of a cell edge also claims the cell across that edge


@dataclasses.dataclass(frozen=True)
class LossHyp:
    """Loss gains and matching threshold (YOLOv5 hyp.scratch-low defaults), before `scaled` is applied."""

    box: float = 0.05  # box loss gain
    cls: float = 0.5  # class loss gain
    cls_pw: float = 1.0  # class BCE positive weight
    obj: float = 1.0  # objectness loss gain
    obj_pw: float = 1.0  # objectness BCE positive weight
    anchor_t: float = 4.0  # a target matches an anchor when both wh ratios lie within 1/anchor_t..anchor_t
    label_smoothing: float = 0.0  # class targets become 1 - eps/2 and eps/2
    fl_gamma: float = 0.0  # focal loss gamma; 0 is plain BCE

    def __post_init__(self):
        for name in ("box", "cls", "cls_pw", "obj", "obj_pw", "fl_gamma"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"LossHyp.{name} must be a finite number >= 0, but got {name}={value!r}")
        if not (isinstance(self.anchor_t, (int, float)) and math.isfinite(self.anchor_t) and self.anchor_t > 1):
            raise ConfigError(f"LossHyp.anchor_t must be a finite number > 1 (a wh ratio limit, YOLOv5 uses 4.0), "
                              f"but got anchor_t={self.anchor_t!r}")
        eps = self.label_smoothing
        if not (isinstance(eps, (int, float)) and 0 <= eps <= 1):
            raise ConfigError(f"LossHyp.label_smoothing must lie in 0..1 (0 disables it), "
                              f"but got label_smoothing={eps!r}")

    def scaled(self, nl: int, nc: int, imgsz: int) -> LossHyp:
        """The gains YOLOv5's train.py uses: scaled to the number of levels, classes and the image size."""
        for name, value in (("nl", nl), ("nc", nc), ("imgsz", imgsz)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"LossHyp.scaled: {name} must be a positive integer, but got {name}={value!r}")
        level_gain = 3 / nl
        return dataclasses.replace(self, box=self.box * level_gain, cls=self.cls * nc / 80 * level_gain,
                                   obj=self.obj * (imgsz / 640) ** 2 * level_gain)


class Targets(NamedTuple):
    """Per-level assignments from `DetectionLoss.build_targets`; each field is a list with one entry per level."""

    cls: list[torch.Tensor]  # (n,) class index
    box: list[torch.Tensor]  # (n, 4) xy offset from the cell's corner (-0.5..1.5), wh in grid units
    indices: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]  # (b, a, gj, gi), each (n,)
    anchors: list[torch.Tensor]  # (n, 2) the matched anchor, grid units


def bbox_iou(box1: torch.Tensor, box2: torch.Tensor, xywh: bool = True, CIoU: bool = False,
             eps: float = 1e-7) -> torch.Tensor:
    """IoU (or Complete IoU) of boxes (..., 4) against boxes (..., 4), broadcast; returns (..., 1).

    CIoU = IoU - centre distance² / enclosing diagonal² - alpha * v, where v penalises differing aspect ratios
    and alpha is treated as a constant for the gradient (Zheng et al. 2020, as YOLOv5).
    """
    if xywh:
        (x1, y1, w1, h1), (x2, y2, w2, h2) = box1.chunk(4, -1), box2.chunk(4, -1)
        left1, right1, top1, bottom1 = x1 - w1 / 2, x1 + w1 / 2, y1 - h1 / 2, y1 + h1 / 2
        left2, right2, top2, bottom2 = x2 - w2 / 2, x2 + w2 / 2, y2 - h2 / 2, y2 + h2 / 2
    else:
        left1, top1, right1, bottom1 = box1.chunk(4, -1)
        left2, top2, right2, bottom2 = box2.chunk(4, -1)
        w1, h1 = right1 - left1, (bottom1 - top1).clamp(eps)
        w2, h2 = right2 - left2, (bottom2 - top2).clamp(eps)

    inter = ((right1.minimum(right2) - left1.maximum(left2)).clamp(0)
             * (bottom1.minimum(bottom2) - top1.maximum(top2)).clamp(0))
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    if not CIoU:
        return iou

    enclosing_w = right1.maximum(right2) - left1.minimum(left2)
    enclosing_h = bottom1.maximum(bottom2) - top1.minimum(top2)
    diagonal2 = enclosing_w**2 + enclosing_h**2 + eps
    centre_dist2 = ((left2 + right2 - left1 - right1) ** 2 + (top2 + bottom2 - top1 - bottom1) ** 2) / 4
    v = (4 / math.pi**2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)).pow(2)
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (centre_dist2 / diagonal2 + v * alpha)


def bce_with_logits(pred: torch.Tensor, target: torch.Tensor, *, pos_weight: float = 1.0,
                    focal_gamma: float = 0.0, focal_alpha: float = FOCAL_ALPHA) -> torch.Tensor:
    """Mean BCE-with-logits; with `focal_gamma > 0`, YOLOv5's focal form (TF addons' weighting) instead."""
    weight = pred.new_tensor([pos_weight])
    if focal_gamma <= 0:
        return F.binary_cross_entropy_with_logits(pred, target, pos_weight=weight)
    loss = F.binary_cross_entropy_with_logits(pred, target, pos_weight=weight, reduction="none")
    prob = pred.sigmoid()
    p_t = target * prob + (1 - target) * (1 - prob)  # probability given to the true label
    alpha_factor = target * focal_alpha + (1 - target) * (1 - focal_alpha)
    return (loss * (alpha_factor * (1.0 - p_t) ** focal_gamma)).mean()


class DetectionLoss:
    """YOLOv5's `ComputeLoss`: `loss, items = DetectionLoss(model, hyp)(preds, targets)`.

    `loss` is the 0-dim total `(lbox + lobj + lcls) * batch_size` to backpropagate; `items` is the detached
    (lbox, lobj, lcls), each already multiplied by its gain. `hyp` is used as given: apply
    `hyp.scaled(nl, nc, imgsz)` first to get train.py's gains. The objectness target at an assigned cell is the
    detached IoU clamped at 0 (YOLOv5's gr = 1). `autobalance=True` adapts the per-level objectness weights
    from call to call, as YOLOv5 does, relative to the stride-16 level.
    """

    def __init__(self, model: torch.nn.Module, hyp: LossHyp = LossHyp(), *, autobalance: bool = False):
        self.model = getattr(model, "module", model)  # unwrap DataParallel / DDP
        self.hyp = hyp
        self.autobalance = autobalance
        detect = self.model.detect
        if detect.nl > len(OBJ_BALANCE_5):
            raise ConfigError(f"DetectionLoss supports at most {len(OBJ_BALANCE_5)} detection levels (YOLOv5's "
                              f"objectness balance), but the model has nl={detect.nl}")
        self.balance = list(OBJ_BALANCE_3 if detect.nl == 3 else OBJ_BALANCE_5)  # instance state: autobalance edits it
        self.balance_ref = 0
        if autobalance:
            strides = [float(s) for s in detect.stride]
            if 16.0 not in strides:
                raise ConfigError(f"DetectionLoss(autobalance=True) normalises to the stride-16 level, but the "
                                  f"model's strides are {strides}; use autobalance=False")
            self.balance_ref = strides.index(16.0)

    def __call__(self, preds: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        detect = self.model.detect
        hyp = self.hyp
        if len(preds) != detect.nl:
            raise ValueError(f"DetectionLoss expects one prediction map per level ({detect.nl}), got {len(preds)}")
        device = preds[0].device
        lbox = torch.zeros(1, device=device)
        lobj = torch.zeros(1, device=device)
        lcls = torch.zeros(1, device=device)
        cls_pos, cls_neg = 1.0 - 0.5 * hyp.label_smoothing, 0.5 * hyp.label_smoothing
        tgt = self.build_targets(preds, targets)

        for i, pred in enumerate(preds):  # (B, na, H, W, 5 + nc)
            b, a, gj, gi = tgt.indices[i]
            obj_target = torch.zeros(pred.shape[:4], dtype=pred.dtype, device=device)  # (B, na, H, W)
            n = b.shape[0]
            if n:
                pxy, pwh, _, pcls = pred[b, a, gj, gi].split((2, 2, 1, detect.nc), 1)  # (n, 2) (n, 2) _ (n, nc)
                pxy = pxy.sigmoid() * 2 - 0.5
                pwh = (pwh.sigmoid() * 2) ** 2 * tgt.anchors[i]
                iou = bbox_iou(torch.cat((pxy, pwh), 1), tgt.box[i], CIoU=True).squeeze(-1)  # (n,)
                lbox += (1.0 - iou).mean()
                obj_target[b, a, gj, gi] = iou.detach().clamp(0).type(obj_target.dtype)

                if detect.nc > 1:  # a single class needs no class loss: objectness says it all
                    cls_target = torch.full_like(pcls, cls_neg)  # (n, nc)
                    cls_target[torch.arange(n, device=device), tgt.cls[i]] = cls_pos
                    lcls += bce_with_logits(pcls, cls_target, pos_weight=hyp.cls_pw, focal_gamma=hyp.fl_gamma)

            level_obj = bce_with_logits(pred[..., 4], obj_target, pos_weight=hyp.obj_pw, focal_gamma=hyp.fl_gamma)
            lobj += level_obj * self.balance[i]
            if self.autobalance:
                self.balance[i] = self.balance[i] * 0.9999 + 0.0001 / level_obj.detach().item()

        if self.autobalance:
            self.balance = [w / self.balance[self.balance_ref] for w in self.balance]
        lbox *= hyp.box
        lobj *= hyp.obj
        lcls *= hyp.cls
        batch_size = preds[0].shape[0]
        return ((lbox + lobj + lcls) * batch_size).squeeze(0), torch.cat((lbox, lobj, lcls)).detach()

    def build_targets(self, preds: list[torch.Tensor], targets: torch.Tensor) -> Targets:
        """Assign each target to anchors (wh ratio rule) and cells (its own plus up to two neighbours) per level.

        Only the shapes of `preds` are used. A neighbour is the cell across the nearer x edge and the one across
        the nearer y edge, when the centre is within `NEIGHBOUR_BIAS` of it and that cell is inside the grid;
        so the predicted xy offset must reach -0.5..1.5, which YOLOv5's `2 * sigmoid - 0.5` decode does.
        """
        detect = self.model.detect
        if targets.ndim != 2 or targets.shape[1] != 6:
            raise ValueError(f"targets must be (N, 6) rows of [image, class, cx, cy, w, h], "
                             f"got shape {tuple(targets.shape)}")
        device = preds[0].device
        na, nt = detect.na, targets.shape[0]
        targets = targets.to(device=device, dtype=torch.float32)
        anchor_index = torch.arange(na, device=device, dtype=torch.float32).view(na, 1).repeat(1, nt)  # (na, nt)
        rows = torch.cat((targets.repeat(na, 1, 1), anchor_index[..., None]), 2)  # (na, nt, 7) + anchor index
        # own cell, then the neighbour across the left, top, right and bottom edge
        offsets_all = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], device=device).float() * NEIGHBOUR_BIAS

        out = Targets([], [], [], [])
        for i in range(detect.nl):
            anchors = detect.anchors[i].to(device)  # (na, 2) grid units
            ny, nx = preds[i].shape[2:4]
            to_grid = torch.tensor([1, 1, nx, ny, nx, ny, 1], device=device, dtype=torch.float32)
            t = rows * to_grid  # (na, nt, 7), xywh in grid units
            if nt:
                ratio = t[..., 4:6] / anchors[:, None]  # (na, nt, 2)
                matched = torch.max(ratio, 1 / ratio).max(2).values < self.hyp.anchor_t  # (na, nt)
                t = t[matched]  # (m, 7)

                gxy = t[:, 2:4]  # (m, 2)
                gxy_from_far_edge = to_grid[[2, 3]] - gxy  # (m, 2)
                near_low = ((gxy % 1 < NEIGHBOUR_BIAS) & (gxy > 1)).T  # (2, m): left, top neighbour
                near_high = ((gxy_from_far_edge % 1 < NEIGHBOUR_BIAS) & (gxy_from_far_edge > 1)).T  # right, bottom
                use = torch.stack((torch.ones_like(near_low[0]), near_low[0], near_low[1],
                                   near_high[0], near_high[1]))  # (5, m)
                t = t.repeat((5, 1, 1))[use]  # (k, 7)
                offsets = (torch.zeros_like(gxy)[None] + offsets_all[:, None])[use]  # (k, 2)
            else:
                t = rows[0]  # (0, 7)
                offsets = 0

            image_class, gxy, gwh, a = t.split((2, 2, 2, 1), 1)
            a = a.long().view(-1)  # (k,)
            b, c = image_class.long().T  # (k,) (k,)
            gij = (gxy - offsets).long()  # (k, 2) cell column, row
            gij[:, 0].clamp_(0, nx - 1)
            gij[:, 1].clamp_(0, ny - 1)
            gi, gj = gij.T
            out.indices.append((b, a, gj, gi))
            out.box.append(torch.cat((gxy - gij, gwh), 1))  # (k, 4), xy relative to the (clamped) cell
            out.anchors.append(anchors[a])  # (k, 2)
            out.cls.append(c)
        return out
