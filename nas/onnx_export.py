"""ONNX export of fused (and pruned) detectors, checked against PyTorch with onnxruntime.

The exported graph takes `images` (batch, 3, H, W): RGB, float32 0..1, letterboxed to H x W as YOLOv5 does. It
returns `output` (batch, N, 5 + nc), only the batch axis dynamic: YOLOv5's decoded predictions before NMS, one row
per anchor and grid cell (N = anchors x (H/8 x W/8 + H/16 x W/16 + H/32 x W/32), level by level), columns x, y, w, h
(box centre and size in input pixels), objectness and nc class scores (both after the sigmoid, 0..1; YOLOv5's
confidence is objectness x class score). NMS is not in the graph: apply it to the output (`nas.metrics` uses
confidence 0.001 and IoU 0.6 for mAP; deployments usually keep confidence >= 0.25).

It uses torch's TorchScript exporter (`dynamo=False`), which needs only `onnx`; torch >= 2.9 marks it deprecated
(its default, the torch.export-based exporter, needs `onnxscript`; see benchmarks/RESULTS.md). That exporter leaves
the output's last two dimensions symbolic with generated names; they are fixed to their values here. onnxruntime
runs the check. Both come with the `onnx` extra: `pip install -e ".[onnx]"`.
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
TOLERANCE = 1e-4  # max |onnxruntime - PyTorch| with the box columns divided by the input size (every column 0..1)
EXPORTER = "torch's TorchScript-based exporter (dynamo=False)"


class OnnxUnavailable(RepnasError):
    """onnx or onnxruntime is not installed."""


class DecodedOutput(nn.Module):
    """The detector's eval output without the raw maps: what deployments consume, and what every latency backend
    times (`nas.latency.deploy_copy`). forward: images (B, 3, H, W) -> decoded boxes (B, N, 5 + nc), no NMS."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]  # (B, N, 5 + nc)


def _require() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise OnnxUnavailable(f"ONNX export needs onnx and onnxruntime ({err.name} is missing): "
                              'pip install -e ".[onnx]"') from None


def output_layout(model: nn.Module, h: int, w: int) -> str:
    """The output's rows and columns in words, for `model`'s Detect head at input size h x w."""
    from space.blocks import Detect

    detect = next(m for m in model.modules() if isinstance(m, Detect))
    strides = [int(s) for s in detect.stride.tolist()]
    cells = " + ".join(f"{h // s}x{w // s}" for s in strides)
    rows = detect.na * sum((h // s) * (w // s) for s in strides)
    return (f"{rows} rows, one per anchor and grid cell ({detect.na} anchors x ({cells}) at strides "
            f"{', '.join(map(str, strides))}); {5 + detect.nc} columns: x, y, w, h (box centre and size in input "
            f"pixels), objectness, {detect.nc} class scores (both after the sigmoid, 0..1; confidence = objectness x "
            "class score); NMS not included: apply it to the output")


def export_onnx(model: nn.Module, path: str | Path, imgsz: int | tuple[int, int] = 640, *,
                opset: int = OPSET, check: bool = True) -> dict:
    """Write `model` (fused or pruned, float32) as ONNX to `path`; with `check`, run it in onnxruntime on a seeded
    input of batch 2 and compare with PyTorch before the file takes its name.

    Returns {"path", "imgsz", "opset", "exporter", "input_shape", "output_shape", "layout"} and with `check`
    {"max_abs_diff", "max_abs_diff_normalised", "tolerance", "verdict", "shape"}. Raises RepnasError, with `path`
    untouched, when the normalised difference is >= TOLERANCE (see `compare`).
    """
    _require()
    import onnx

    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = DecodedOutput(copy.deepcopy(model)).to("cpu", torch.float32).eval()  # the caller's model stays as is
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rows, columns = wrapped(x).shape[1:]  # (1, N, 5 + nc)
    report = {"path": str(path), "imgsz": [h, w], "opset": opset, "exporter": EXPORTER,
              "input_shape": ["batch", 3, h, w], "output_shape": ["batch", rows, columns],
              "layout": output_layout(wrapped, h, w)}
    with atomic_path(path) as tmp:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes (grid cache, shapes)
            torch.onnx.export(wrapped, (x,), str(tmp), dynamo=False, opset_version=opset, input_names=["images"],
                              output_names=["output"], dynamic_axes={"images": {0: "batch"}, "output": {0: "batch"}})
        graph = onnx.load(str(tmp))
        _fix_output_dims(graph, ["batch", rows, columns])
        onnx.checker.check_model(graph)
        onnx.save(graph, str(tmp))
        if check:
            report |= compare(wrapped, tmp, torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(1)))
            report |= {"tolerance": TOLERANCE,
                       "verdict": "PASS" if report["max_abs_diff_normalised"] < TOLERANCE else "FAIL"}
            if report["verdict"] != "PASS":
                raise RepnasError(f"{path}: onnxruntime's output differs from PyTorch's by {report['max_abs_diff']:.2e}"
                                  f" (normalised {report['max_abs_diff_normalised']:.2e} >= the tolerance "
                                  f"{TOLERANCE:g}); nothing written: the export is not faithful, report the model")
    return report


def _fix_output_dims(graph, dims: list) -> None:
    """Name or fix each dimension of the graph's one output: a str is a symbolic name, an int a fixed size."""
    (output,) = graph.graph.output
    for dim, value in zip(output.type.tensor_type.shape.dim, dims, strict=True):
        if isinstance(value, str):
            dim.dim_param = value
        else:
            dim.dim_value = int(value)  # (setting the value clears the generated dim_param)


def compare(model: nn.Module, path: str | Path, x: torch.Tensor) -> dict:
    """Max absolute difference between PyTorch and onnxruntime on `x`: raw, and with the box columns (pixels) divided
    by the input size so every column is on a 0..1 scale (fp32 rounding of a 640-px coordinate alone is 6e-5)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = (model(x)[0] if not isinstance(model, DecodedOutput) else model(x)).numpy()
    scale = np.ones(want.shape[-1], dtype=np.float64)
    scale[:4] = max(x.shape[-2:])
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    return {"max_abs_diff": float(diff.max()), "max_abs_diff_normalised": float((diff / scale).max()),
            "shape": list(want.shape)}
