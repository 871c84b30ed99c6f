"""Re-parameterisation: train-time multi-branch network -> deploy (fused) plain network.

Every RepVGGBlock, and YOLOv7's RepConv (a RepVGGBlock subclass), becomes one 3x3 conv with bias (`rbr_reparam`;
a block's SE is kept), every Conv+BatchNorm folds into a conv with bias (the BatchNorm becomes an Identity, so
state-dict keys are YOLOv5's/YOLOv7's fused ones), YOLOv7's IDetect folds its implicit layers into its output convs
(YOLOv7's `IDetect.fuse`: conv'(x) = im * (W x + b + W ia)) and drops them, Detect stays. The arithmetic runs in
float64 and is cast back, so a fused float32 model matches its source to ~1e-7.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from space.blocks import Conv, RepVGGBlock
from space.yolov7 import IDetect


def fold_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d, bias: torch.Tensor | None = None):
    """Kernel and bias of conv(kernel, bias) followed by `bn` in eval mode, as one conv (float64)."""
    std = (bn.running_var.double() + bn.eps).sqrt()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(std)
    scale = gamma / std
    b = torch.zeros_like(std) if bias is None else bias.double()
    return kernel.double() * scale.reshape(-1, 1, 1, 1), beta + (b - bn.running_mean.double()) * scale


def repvgg_kernel_bias(block: RepVGGBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """The 3x3 kernel and bias equal (in eval mode) to the block's 3x3 + 1x1 + identity branches (float64).

    Each branch is a (conv, bn) Sequential: named `conv`/`bn` in the RepVGG block, `0`/`1` in YOLOv7's RepConv."""
    k3, b3 = fold_bn(block.rbr_dense[0].weight, block.rbr_dense[1])
    k1, b1 = fold_bn(block.rbr_1x1[0].weight, block.rbr_1x1[1])
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


def idetect_weights_biases(head: IDetect) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per level, the output conv's weight and bias with ImplicitA and ImplicitM folded in (float64), as YOLOv7's
    `IDetect.fuse` computes them: im * (W (x + ia) + b) = (im W) x + im (b + W ia)."""
    weights, biases = [], []
    for conv, ia, im in zip(head.m, head.ia, head.im):
        w = conv.weight.double()  # (no * na, C, 1, 1)
        shift = ia.implicit.double().view(-1)  # (C,)
        scale = im.implicit.double().view(-1)  # (no * na,)
        bias = conv.bias.double() + w.flatten(1) @ shift
        weights.append(w * scale.view(-1, 1, 1, 1))
        biases.append(bias * scale)
    return weights, biases


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
            dtype = module.rbr_dense[0].weight.dtype
            kernel, bias = repvgg_kernel_bias(module)
            module.switch_to_deploy(kernel.to(dtype), bias.to(dtype))
        elif isinstance(module, Conv) and isinstance(module.bn, nn.BatchNorm2d):
            module.conv = fuse_conv_bn(module.conv, module.bn)
            module.bn = nn.Identity()
        elif isinstance(module, IDetect) and not module.deploy:
            dtype = module.m[0].weight.dtype
            weights, biases = idetect_weights_biases(module)
            module.switch_to_deploy([w.to(dtype) for w in weights], [b.to(dtype) for b in biases])
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
