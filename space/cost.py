"""Parameters and FLOPs, counted in one place: thop MACs x 2 at the stated input size (YOLOv5's convention).

Counting runs on a weightless `meta` copy, so it costs milliseconds at any input size and never touches the
model's device or weights. Two figures per model: `gflops` as built (train-time, multi-branch RepVGG blocks and
BatchNorms) and `gflops_deploy` of the fused network that actually runs; budgets, Pareto columns and pruning
targets use the deploy figure.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ImgSize = int | tuple[int, int]


def _hw(imgsz: ImgSize) -> tuple[int, int]:
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    if h < 1 or w < 1:
        raise ValueError(f"imgsz must be positive, got {imgsz!r}")
    return int(h), int(w)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class _ShapeOnlyBatchNorm(nn.BatchNorm2d):
    """Stands in for a BatchNorm in the meta copy: same shape and the same thop count, no meta kernel (slow)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _stub_batchnorms(model: nn.Module) -> None:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.BatchNorm2d:
                stub = _ShapeOnlyBatchNorm(child.num_features, affine=child.affine, device="meta")
                setattr(module, name, stub)


def count_gflops(model: nn.Module, imgsz: ImgSize = 640, ch: int | None = None) -> float:
    """GFLOPs of one forward pass at `imgsz` (int or (h, w)), batch 1: thop MACs x 2 / 1e9."""
    h, w = _hw(imgsz)
    if ch is None:
        ch = int(getattr(model, "yaml", {}).get("ch", 3))
    meta = copy.deepcopy(model).to("meta")
    _stub_batchnorms(meta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # thop warns about distutils on import and about unknown modules
        from thop import profile  # heavy import, only where counted
        from thop.vision.basic_hooks import count_normalization

        try:
            macs, _ = profile(meta, inputs=(torch.zeros(1, ch, h, w, device="meta"),), verbose=False,
                              custom_ops={_ShapeOnlyBatchNorm: count_normalization})
        except (RuntimeError, ValueError, IndexError) as err:  # joined layers disagree at this size
            raise _size_error(model, (h, w), err) from None
    return 2 * float(macs) / 1e9


def _size_error(model: nn.Module, hw: tuple[int, int], err: Exception):
    """The user error for a model that builds (at the probe size) but cannot run at the input size `hw`."""
    from space.errors import ModelConfigError

    largest = getattr(model, "max_stride", None)  # set by space.builder.build_model
    fix = (f"use an input size that is a multiple of its largest stride {largest}" if largest else
           "use another input size")
    detail = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
    return ModelConfigError(f"the model does not run at a {hw[0]}x{hw[1]} input ({detail}); {fix}")


def is_deploy(model: nn.Module) -> bool:
    """True when no BatchNorm is left: every RepVGG block and Conv has been fused."""
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@dataclass(frozen=True)
class ModelCost:
    """Size and compute of a model as built and in its deploy (fused) form, at `imgsz`."""

    params: int
    gflops: float
    params_deploy: int
    gflops_deploy: float
    imgsz: tuple[int, int]


def model_cost(model: nn.Module, imgsz: ImgSize = 640) -> ModelCost:
    """Cost of a built model; its deploy form is built weightless from `model.yaml` unless it is fused already."""
    from space.builder import build_model

    hw = _hw(imgsz)
    params, gflops = count_params(model), count_gflops(model, hw)
    if is_deploy(model):
        return ModelCost(params, gflops, params, gflops, hw)
    deploy = build_model(model.yaml, deploy=True, device="meta")
    return ModelCost(params, gflops, count_params(deploy), count_gflops(deploy, hw), hw)


def cfg_cost(cfg: str | Path | dict, imgsz: ImgSize = 640, nc: int | None = None) -> ModelCost:
    """Cost of a model YAML (path or dict) without allocating weights."""
    from space.builder import build_model

    hw = _hw(imgsz)
    built = build_model(cfg, nc=nc, device="meta")
    deploy = build_model(cfg, nc=nc, deploy=True, device="meta")
    return ModelCost(count_params(built), count_gflops(built, hw), count_params(deploy), count_gflops(deploy, hw), hw)
