import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from nas.data import ImageRecord, YoloDataset
from nas.evaluate import evaluate, ground_truth

SIZES = [(375, 500), (500, 333), (427, 640), (100, 100)]  # (h, w), varied aspect ratios


class Oracle(nn.Module):
    """Predicts exactly the ground truth of each image, placed through the letterbox the test computes itself."""

    def __init__(self, boxes_by_size: dict, imgsz: int, nc: int):
        super().__init__()
        self.boxes, self.imgsz, self.nc = boxes_by_size, imgsz, nc
        self.dummy = nn.Parameter(torch.zeros(1))
        self.stride = torch.tensor([8.0, 16.0, 32.0])

    def forward(self, x):
        preds = []
        for img in x:
            # every test image has a unique grey level that tells which one it is
            level = round(float(img[:, img.shape[1] // 2, img.shape[2] // 2].mean()) * 255)
            (h0, w0), boxes, classes = self.boxes[level]
            h1, w1 = round(h0 * self.imgsz / max(h0, w0)), round(w0 * self.imgsz / max(h0, w0))  # cached size
            gain_h, gain_w = h1 / h0, w1 / w0
            pad_w, pad_h = (x.shape[3] - w1) / 2, (x.shape[2] - h1) / 2
            xyxy = boxes * np.array([gain_w, gain_h, gain_w, gain_h]) + np.array([pad_w, pad_h, pad_w, pad_h])
            rows = torch.zeros(len(boxes), 5 + self.nc)
            rows[:, 0] = torch.tensor((xyxy[:, 0] + xyxy[:, 2]) / 2)
            rows[:, 1] = torch.tensor((xyxy[:, 1] + xyxy[:, 3]) / 2)
            rows[:, 2] = torch.tensor(xyxy[:, 2] - xyxy[:, 0])
            rows[:, 3] = torch.tensor(xyxy[:, 3] - xyxy[:, 1])
            rows[:, 4] = 1.0
            rows[torch.arange(len(boxes)), 5 + torch.tensor(classes)] = 1.0
            preds.append(rows)
        return torch.stack(preds), []


def _dataset(tmp_path, imgsz):
    records, truth = [], {}
    rng = np.random.default_rng(0)
    for k, (h, w) in enumerate(SIZES):
        level = 40 + 40 * k
        path = tmp_path / f"{k}.png"
        Image.fromarray(np.full((h, w, 3), level, np.uint8)).save(path)
        n = 3
        cxcy = rng.uniform(0.3, 0.7, (n, 2))
        wh = rng.uniform(0.1, 0.3, (n, 2))
        labels = np.concatenate([rng.integers(0, 2, (n, 1)), cxcy, wh], 1).astype(np.float32)
        record = ImageRecord(path, h, w, labels)
        records.append(record)
        gt = ground_truth(record)
        truth[level] = ((h, w), gt.boxes, gt.classes)
    return records, truth


@pytest.mark.parametrize("imgsz", [160, 320])
def test_perfect_predictions_through_rect_letterbox_score_one(tmp_path, imgsz):
    records, truth = _dataset(tmp_path, imgsz)
    dataset = YoloDataset(records, imgsz, rect=True, batch_size=2)
    metrics = evaluate(Oracle(truth, imgsz, nc=2), dataset, imgsz)
    assert metrics.images == len(SIZES) and metrics.boxes == 3 * len(SIZES)
    assert metrics.map50 == pytest.approx(1.0) and metrics.map50_95 == pytest.approx(1.0)


def test_ground_truth_is_in_original_pixels():
    record = ImageRecord(None, 200, 400, np.array([[1, 0.5, 0.5, 0.25, 0.5]], np.float32))
    gt = ground_truth(record)
    np.testing.assert_allclose(gt.boxes, [[150, 50, 250, 150]])
    assert gt.classes.tolist() == [1]
