"""Scoring a detector: eval-mode inference over a validation split, NMS, boxes back to original pixels, COCO mAP.

These are COCO numbers (pycocotools' COCOeval with standard settings, NMS at conf 0.001 and IoU 0.6, at most 300
detections kept per image, of which COCOeval scores the best 100); they can differ slightly from YOLOv5's val.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nas.data import (
    DataConfig,
    ImageRecord,
    YoloDataset,
    index_split,
    load_data_config,
    make_loader,
    xywhn_to_xyxy,
)
from nas.metrics import ImageTruth, coco_map, non_max_suppression, scale_boxes


@dataclass(frozen=True)
class Metrics:
    """mAP50-95 and mAP50 (COCO protocol) of one evaluation, with what it covered."""

    map50_95: float
    map50: float
    images: int
    boxes: int
    seconds: float


def ground_truth(record: ImageRecord) -> ImageTruth:
    """A record's labels as COCO ground truth in original pixels (xyxy)."""
    labels = record.labels
    boxes = xywhn_to_xyxy(labels, record.width, record.height).astype(np.float64)
    return ImageTruth(record.height, record.width, boxes, labels[:, 0].astype(np.int64))


def val_dataset(data: str | Path | DataConfig, imgsz: int, batch: int, stride: int = 32) -> YoloDataset:
    """The validation split as rect batches (checked and cached)."""
    cfg = data if isinstance(data, DataConfig) else load_data_config(data)
    index = index_split(cfg.val, cfg.nc, "val", str(cfg.source))
    return YoloDataset(index.records, imgsz, rect=True, batch_size=batch, stride=stride)


@torch.no_grad()
def evaluate(model: nn.Module, data: str | Path | DataConfig | YoloDataset, imgsz: int = 640, *, batch: int = 32,
             device: str | torch.device | None = None, conf: float = 0.001, iou: float = 0.6, max_det: int = 300,
             half: bool = False, workers: int = 0, nc: int | None = None) -> Metrics:
    """COCO mAP of `model` on a validation split (`data`: data.yaml, DataConfig, or a rect YoloDataset).

    Images are letterboxed to `imgsz` pixels (rectangular batches, as YOLOv5's val.py), detections NMS-ed
    (torchvision batched NMS at IoU `iou`, confidence >= `conf`, at most `max_det` per image), mapped back to
    original image pixels and scored by pycocotools' COCOeval with standard settings. `half` runs CUDA inference
    under fp16 autocast (the model's weights stay as they are); `workers` data-loader processes. Returns Metrics
    (map50_95, map50 in [0, 1], images, boxes, seconds). Raises RepnasError for a dataset that cannot be read and
    ValueError when the model's class count differs from the dataset's.
    """
    start = time.perf_counter()
    stride = int(getattr(model, "stride", torch.tensor([32])).max())
    dataset = data if isinstance(data, YoloDataset) else val_dataset(data, imgsz, batch, stride)
    if dataset.rect:
        batch = dataset.batch_size
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    was_training = model.training
    model.eval()
    nc = nc or getattr(model, "nc", None) or model.detect.nc
    truths, detections = [], []
    order = {str(r.path): r for r in dataset.records}
    try:
        for images, _, paths, shapes in make_loader(dataset, batch, shuffle=False, workers=workers,
                                                    pin_memory=device.type == "cuda"):
            x = images.to(device, non_blocking=True)
            x = x.float() / 255  # (B, 3, H, W)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.float16, enabled=half and device.type == "cuda"):
                pred = model(x)[0].float()  # (B, N, 5 + nc)
            for det, path, (original, ratio_pad) in zip(non_max_suppression(pred, conf, iou, max_det), paths, shapes):
                det = det.cpu()
                det[:, :4] = scale_boxes(det[:, :4], x.shape[2:], original, ratio_pad)
                detections.append(det.numpy())
                truths.append(ground_truth(order[path]))
    finally:
        model.train(was_training)
    result = coco_map(truths, detections, nc)
    return Metrics(result.map50_95, result.map50, len(truths), sum(len(t.boxes) for t in truths),
                   time.perf_counter() - start)
