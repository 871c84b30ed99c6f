"""ONNX export (nas/onnx_export.py, `repnas export-model`): fixed output dimensions where they are fixed, the output
layout said, the equivalence check's tolerance and verdict printed, and a failing check writes nothing."""

from __future__ import annotations

import pytest
import torch
import yaml

import nas.onnx_export
from nas.cli import main
from nas.onnx_export import TOLERANCE, export_onnx
from pruning.reparam import fuse_model
from space.builder import build_model
from space.errors import RepnasError
from tests.conftest import randomize_batchnorm, tiny_yaml

pytest.importorskip("onnxruntime", reason="ONNX export needs the onnx extra: pip install -e '.[onnx]'")
onnx = pytest.importorskip("onnx", reason="ONNX export needs the onnx extra: pip install -e '.[onnx]'")

NC = 3
ROWS = 3 * (8 * 8 + 4 * 4 + 2 * 2)  # 3 anchors x the P3/8, P4/16, P5/32 grids of a 64-px input


@pytest.fixture(scope="module")
def fused():
    torch.manual_seed(0)
    return fuse_model(randomize_batchnorm(build_model(tiny_yaml(NC))).eval())


def _dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_only_the_batch_axis_is_symbolic_and_every_other_dimension_is_fixed(fused, tmp_path):
    report = export_onnx(fused, tmp_path / "m.onnx", 64)
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert [(v.name, _dims(v)) for v in graph.input] == [("images", ["batch", 3, 64, 64])]
    assert [(v.name, _dims(v)) for v in graph.output] == [("output", ["batch", ROWS, 5 + NC])]  # no generated names
    assert report["output_shape"] == ["batch", ROWS, 5 + NC]
    assert report["tolerance"] == TOLERANCE and report["verdict"] == "PASS"
    assert report["max_abs_diff_normalised"] < TOLERANCE
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_outputs()[0].shape == ["batch", ROWS, 5 + NC]
    out = session.run(None, {"images": torch.rand(3, 3, 64, 64).numpy()})[0]
    assert out.shape == (3, ROWS, 5 + NC)  # the batch stays dynamic
    assert ((out[..., 4:] >= 0) & (out[..., 4:] <= 1)).all()  # objectness and class scores after the sigmoid


def test_the_layout_is_described_in_words(fused):
    assert nas.onnx_export.output_layout(fused, 64, 64) == (
        f"{ROWS} rows, one per anchor and grid cell (3 anchors x (8x8 + 4x4 + 2x2) at strides 8, 16, 32); "
        f"{5 + NC} columns: x, y, w, h (box centre and size in input pixels), objectness, {NC} class scores (both "
        "after the sigmoid, 0..1; confidence = objectness x class score); NMS not included: apply it to the output")


def test_a_check_over_the_tolerance_fails_and_writes_nothing(fused, tmp_path, monkeypatch):
    monkeypatch.setattr(nas.onnx_export, "TOLERANCE", 0.0)  # any difference, even 0, is then too much
    with pytest.raises(RepnasError, match=r"m\.onnx: onnxruntime's output differs .* >= the tolerance 0\b.*nothing "
                                          "written"):
        export_onnx(fused, tmp_path / "m.onnx", 64)
    assert list(tmp_path.iterdir()) == []


def test_export_model_prints_the_shapes_the_layout_and_the_checks_verdict(fused, tmp_path, capsys):
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(tiny_yaml(NC)))
    torch.save(fused.state_dict(), tmp_path / "fused.pt")
    assert main(["export-model", str(tmp_path / "m.yaml"), "--weights", str(tmp_path / "fused.pt"), "--onnx",
                 str(tmp_path / "m.onnx"), "--imgsz", "64", "--results", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"wrote {tmp_path / 'm.onnx'} (opset 17, torch's TorchScript-based exporter (dynamo=False))"
    assert lines[1] == "input  `images` (batch, 3, 64, 64): RGB, float32 0..1, letterboxed"
    assert lines[2].startswith(f"output `output` (batch, {ROWS}, {5 + NC}): {ROWS} rows, one per anchor") and \
        lines[2].endswith("NMS not included: apply it to the output")
    assert lines[3].startswith("check: onnxruntime vs PyTorch on a seeded batch of 2: max abs diff ")
    assert lines[3].endswith(f"with boxes divided by the input size (tolerance {TOLERANCE:g}): PASS")
