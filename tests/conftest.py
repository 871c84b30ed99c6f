"""Shared test helpers: where ../shared is, a tiny model YAML, and BatchNorm randomisation."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("REPNAS_SHARED", REPO.parent / "shared"))
SEED_YAML = SHARED / "reference" / "seed_model.yaml"
REFERENCE_BLOCK = SHARED / "reference" / "seed_repvgg_block.py"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: these tests compare against ../shared (set REPNAS_SHARED to its folder)")
    return path


@pytest.fixture
def seed_yaml() -> Path:
    return _need(SEED_YAML)


@pytest.fixture(scope="session")
def reference_block():
    """The design document's reference RepVGG module (../shared/reference/seed_repvgg_block.py)."""
    path = _need(REFERENCE_BLOCK)
    spec = importlib.util.spec_from_file_location("seed_repvgg_block", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_yaml(nc: int = 3) -> dict:
    """A small RepVGG-YOLO in YOLOv5 format (SE in P4, every module kind of the seed), fast at 64 px."""
    return {
        "nc": nc,
        "depth_multiple": 1.0,
        "width_multiple": 1.0,
        "anchors": [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]],
        "backbone": [
            [-1, 1, "RepVGGBlock", [16, 3, 2]],
            [-1, 1, "RepVGGBlock", [16, 3, 2]],
            [-1, 1, "RepVGGBlock", [32, 3, 2]],
            [-1, 2, "RepVGGBlock", [32, 3, 1]],
            [-1, 1, "RepVGGBlock", [64, 3, 2, 1, 1, 1, "zeros", False, True]],
            [-1, 1, "RepVGGBlock", [64, 3, 1, 1, 1, 1, "zeros", False, True]],
            [-1, 1, "RepVGGBlock", [64, 3, 2]],
            [-1, 1, "SPPF", [64, 5]],
        ],
        "head": [
            [-1, 1, "Conv", [32, 1, 1]],
            [-1, 1, "nn.Upsample", ["None", 2, "nearest"]],
            [[-1, 5], 1, "Concat", [1]],
            [-1, 1, "C3", [32, False]],
            [-1, 1, "Conv", [16, 1, 1]],
            [-1, 1, "nn.Upsample", ["None", 2, "nearest"]],
            [[-1, 3], 1, "Concat", [1]],
            [-1, 1, "C3", [16, False]],
            [-1, 1, "Conv", [16, 3, 2]],
            [[-1, 12], 1, "Concat", [1]],
            [-1, 1, "C3", [32, False]],
            [-1, 1, "Conv", [32, 3, 2]],
            [[-1, 8], 1, "Concat", [1]],
            [-1, 1, "C3", [64, False]],
            [[15, 18, 21], 1, "Detect", ["nc", "anchors"]],
        ],
    }


@torch.no_grad()
def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running stats, weight and bias for every BatchNorm (identity stats would hide fusion bugs)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.randn(n, generator=g) * 0.3)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / a.norm())


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny test models run fastest on one thread, and a busy 2-core machine punishes OpenMP spin-waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_terminal_summary(terminalreporter):
    """Print the counts that tests/reliability recorded (see tests/reliability/conftest.py)."""
    try:
        from tests.reliability.conftest import COUNTS
    except ImportError:
        return
    if COUNTS:
        terminalreporter.section("repnas reliability counts")
        for key, line in COUNTS.items():
            terminalreporter.write_line(f"{key}: {line}")
