"""ONNX export of fused (and pruned) detectors, checked against PyTorch with onnxruntime.

The exported graph takes `images` (B, 3, H, W) float 0..1 and returns `output` (B, N, 5 + nc): YOLOv5's decoded
predictions (xywh in input pixels, objectness, class scores), the batch axis dynamic. It uses torch's TorchScript
exporter (`dynamo=False`), which needs only `onnx`; onnxruntime runs the check. Both come with the `onnx` extra:
`pip install -e ".[onnx]"`.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pruning.atomic import atomic_path
from space.errors import RepnasError

OPSET = 17
TOLERANCE = 1e-4


class OnnxUnavailable(RepnasError):
    """onnx or onnxruntime is not installed."""


class _Decoded(nn.Module):
    """The detector's eval output without the raw maps: what deployments consume."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]


def _require() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise OnnxUnavailable(f"ONNX export needs onnx and onnxruntime ({err.name} is missing): "
                              'pip install -e ".[onnx]"') from None


def export_onnx(model: nn.Module, path: str | Path, imgsz: int | tuple[int, int] = 640, *,
                opset: int = OPSET, check: bool = True) -> dict:
    """Write `model` (fused or pruned, float32) as ONNX to `path`; with `check`, run it in onnxruntime on a seeded
    input of batch 2 and compare with PyTorch. Returns {"path", "imgsz", "opset", "max_abs_diff", "max_rel_diff"};
    raises RepnasError when the difference is >= TOLERANCE relative to the output's scale (see `compare`)."""
    _require()
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = _Decoded(copy.deepcopy(model)).to("cpu", torch.float32).eval()  # the caller's model stays as is
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript tracer notes on the grid cache and shape arithmetic
        torch.onnx.export(wrapped, (x,), str(tmp), dynamo=False, opset_version=opset, input_names=["images"],
                          output_names=["output"], dynamic_axes={"images": {0: "batch"}, "output": {0: "batch"}})
    report = {"path": str(path), "imgsz": [h, w], "opset": opset}
    if check:
        report |= compare(wrapped, path, torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(1)))
        if not report["max_abs_diff_normalised"] < TOLERANCE:
            raise RepnasError(f"{path}: onnxruntime's output differs from PyTorch's by {report['max_abs_diff']:.2e} "
                              f"(normalised {report['max_abs_diff_normalised']:.2e} >= {TOLERANCE:g})")
    return report


def compare(model: nn.Module, path: str | Path, x: torch.Tensor) -> dict:
    """Max absolute difference between PyTorch and onnxruntime on `x`: raw, and with the box columns (pixels) divided
    by the input size so every column is on a 0..1 scale (fp32 rounding of a 640-px coordinate alone is 6e-5)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = (model(x)[0] if not isinstance(model, _Decoded) else model(x)).numpy()
    scale = np.ones(want.shape[-1], dtype=np.float64)
    scale[:4] = max(x.shape[-2:])
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    return {"max_abs_diff": float(diff.max()), "max_abs_diff_normalised": float((diff / scale).max()),
            "shape": list(want.shape)}
