"""Re-parameterisation: train-time multi-branch network -> deploy (fused) plain network.

Every RepVGGBlock becomes one 3x3 conv with bias (`rbr_reparam`; its SE is kept), every Conv+BatchNorm folds
into a conv with bias (the BatchNorm becomes an Identity, so state-dict keys are YOLOv5's fused ones), Detect
stays. The arithmetic runs in float64 and is cast back, so a fused float32 model matches its source to ~1e-7.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from space.blocks import Conv, RepVGGBlock


def fold_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d, bias: torch.Tensor | None = None):
    """Kernel and bias of conv(kernel, bias) followed by `bn` in eval mode, as one conv (float64)."""
    std = (bn.running_var.double() + bn.eps).sqrt()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(std)
    scale = gamma / std
    b = torch.zeros_like(std) if bias is None else bias.double()
    return kernel.double() * scale.reshape(-1, 1, 1, 1), beta + (b - bn.running_mean.double()) * scale


def repvgg_kernel_bias(block: RepVGGBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """The 3x3 kernel and bias equal (in eval mode) to the block's 3x3 + 1x1 + identity branches (float64)."""
    k3, b3 = fold_bn(block.rbr_dense.conv.weight, block.rbr_dense.bn)
    k1, b1 = fold_bn(block.rbr_1x1.conv.weight, block.rbr_1x1.bn)
    kernel = k3 + nn.functional.pad(k1, [1, 1, 1, 1])
    bias = b3 + b1
    if block.rbr_identity is not None:
        per_group = block.in_channels // block.groups
        identity = torch.zeros(block.in_channels, per_group, 3, 3, dtype=torch.float64, device=kernel.device)
        idx = torch.arange(block.in_channels, device=kernel.device)
        identity[idx, idx % per_group, 1, 1] = 1.0  # (C, C/g, 3, 3): channel c passes through its own group
        ki, bi = fold_bn(identity, block.rbr_identity)
        kernel, bias = kernel + ki, bias + bi
    return kernel, bias


def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new conv with bias computing bn(conv(x)) in eval mode."""
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    fused = fused.to(device=conv.weight.device, dtype=conv.weight.dtype)
    kernel, bias = fold_bn(conv.weight, bn, conv.bias)
    with torch.no_grad():
        fused.weight.copy_(kernel)
        fused.bias.copy_(bias)
    return fused


@torch.no_grad()
def fuse_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Deploy form of `model`: a copy by default. Fusing an already fused model changes nothing."""
    if not inplace:
        model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, RepVGGBlock) and not module.deploy:
            dtype = module.rbr_dense.conv.weight.dtype
            kernel, bias = repvgg_kernel_bias(module)
            module.switch_to_deploy(kernel.to(dtype), bias.to(dtype))
        elif isinstance(module, Conv) and isinstance(module.bn, nn.BatchNorm2d):
            module.conv = fuse_conv_bn(module.conv, module.bn)
            module.bn = nn.Identity()
    return model


@torch.no_grad()
def fusion_error(model: nn.Module, fused: nn.Module, x: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||a|| between the eval-mode outputs of `model` and `fused` on `x`."""
    was = model.training, fused.training
    model.eval()
    fused.eval()
    try:
        a, b = model(x), fused(x)
    finally:
        model.train(was[0])
        fused.train(was[1])
    a = a[0] if isinstance(a, tuple) else a
    b = b[0] if isinstance(b, tuple) else b
    if isinstance(a, list):
        a, b = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return float((a.double() - b.double()).norm() / a.double().norm().clamp_min(1e-30))
