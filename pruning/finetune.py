"""BatchNorms for fine-tuning a plain (fused, pruned) network, and folding them back into its convs.

A fused network trains badly: no normalisation rescales the pruned layers' activations. `insert_batchnorms` puts
an nn.BatchNorm2d after chosen convs, calibrated on training batches so that it changes nothing: running stats are
the conv output's per-channel mean and biased variance over the batches, weight = sqrt(var + eps) and
bias = mean. In eval mode each BatchNorm is then an identity, and in train mode it is one on the calibration
batches too (train mode normalises with exactly those batch statistics). The caller fine-tunes, e.g.
`nas.train.fit(model, data, ProxyConfig.finetune(epochs=K))`, then `fold_batchnorms` folds every BatchNorm into
its conv and checks the result against the unfolded network.

Where a BatchNorm lives (state-dict keys while it is there):
  Conv (space.blocks.Conv, fused: bn is an Identity)  ->  its `bn` slot             model.8.bn.weight
  RepVGGBlock (deploy: rbr_reparam is one conv)       ->  rbr_reparam = Sequential(conv, bn)
                                                          model.3.rbr_reparam.conv.weight, ...rbr_reparam.bn.weight
Folding restores the original modules and keys (model.8.conv.weight, model.3.rbr_reparam.weight). SE's convs and
Detect's output convs get no BatchNorm.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterable

import torch
from torch import nn

from pruning.channel import PruneError
from pruning.reparam import fuse_conv_bn
from space.blocks import Conv, RepVGGBlock

BN_EPS = 1e-3  # YOLOv5's BatchNorm settings (space.builder), so fine-tuning behaves like training
BN_MOMENTUM = 0.03
FOLD_TOLERANCE = 1e-5


class FoldError(PruneError):
    """Folding BatchNorms changed the network's outputs beyond the tolerance."""


def batchnorm_sites(model: nn.Module) -> dict[str, tuple[nn.Module, nn.Conv2d, nn.BatchNorm2d | None]]:
    """The convs that can carry a BatchNorm: conv name (as in `channel_plan` of the plain network) ->
    (owner Conv or RepVGGBlock, the conv, its inserted BatchNorm or None)."""
    sites = {}
    for name, module in model.named_modules():
        if isinstance(module, Conv):
            bn = module.bn if isinstance(module.bn, nn.BatchNorm2d) else None
            sites[f"{name}.conv"] = (module, module.conv, bn)
        elif isinstance(module, RepVGGBlock):
            if not module.deploy:
                raise PruneError(f"{name}: a train-time RepVGGBlock; BatchNorms are inserted into and folded from "
                                 "the fused network: call pruning.reparam.fuse_model first")
            reparam = module.rbr_reparam
            if isinstance(reparam, nn.Sequential):
                sites[f"{name}.rbr_reparam"] = (module, reparam.conv, reparam.bn)
            else:
                sites[f"{name}.rbr_reparam"] = (module, reparam, None)
    return sites


def _images(batch) -> torch.Tensor:
    images = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise PruneError(f"calibration batches must be float images (B, C, H, W) in 0..1, or (images, targets) "
                         f"pairs; got {type(images).__name__} {tuple(getattr(images, 'shape', ()))}")
    return images


class _ChannelStats:
    """Per-channel count, mean and sum of squared deviations, merged batch by batch in float64 (Chan et al.)."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, y: torch.Tensor) -> None:  # y: (B, C, H, W)
        y = y.detach().double().transpose(0, 1).flatten(1)  # (C, B*H*W)
        n_b = y.shape[1]
        mean_b = y.mean(1)
        m2_b = ((y - mean_b[:, None]) ** 2).sum(1)
        if self.mean is None:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta**2 * (self.n * n_b / n)
        self.n = n

    @property
    def var(self) -> torch.Tensor:
        return self.m2 / self.n  # biased: what train-mode BatchNorm normalises with


@torch.no_grad()
def insert_batchnorms(model: nn.Module, batches: Iterable, *, convs: Iterable[str] | None = None,
                      eps: float = BN_EPS, momentum: float = BN_MOMENTUM, inplace: bool = False) -> nn.Module:
    """A copy of the fused `model` (unless `inplace`) with a calibrated, output-neutral BatchNorm after each conv
    in `convs` (names as in `channel_plan`, e.g. `PruneResult.pruned_convs`; None: every Conv and RepVGG conv).

    `batches`: training images (B, C, H, W) float 0..1, or (images, targets) pairs; their pooled statistics set
    each BatchNorm (run all of them through in train mode as one batch and the outputs are unchanged too).
    `eps` and `momentum` are YOLOv5's; `num_batches_tracked` counts the calibration batches, so a cumulative
    average (momentum=None) carries on from them instead of starting over.
    """
    if not inplace:
        model = copy.deepcopy(model)
    sites = batchnorm_sites(model)
    taken = [name for name, (_, _, bn) in sites.items() if bn is not None]
    if taken:
        raise PruneError(f"{taken[0]} already has a BatchNorm ({len(taken)} convs do); fold_batchnorms first")
    names = list(sites) if convs is None else list(dict.fromkeys(convs))
    for name in names:
        if name not in sites:
            raise PruneError(f"convs: {name!r} is not a Conv or RepVGG conv of the model (SE and Detect convs "
                             f"take no BatchNorm); use names such as {', '.join(list(sites)[:3])}")
    stats = {name: _ChannelStats() for name in names}
    hooks = [sites[n][1].register_forward_hook(lambda _m, _x, y, n=n: stats[n].add(y)) for n in names]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    count = 0
    try:
        for batch in batches:
            model(_images(batch).to(device))
            count += 1
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if names and not count:
        raise PruneError("insert_batchnorms: batches gave no images; pass a few training batches")
    for name in names:
        owner, conv, _ = sites[name]
        mean, var = stats[name].mean, stats[name].var
        bn = nn.BatchNorm2d(conv.out_channels, eps=eps, momentum=momentum).to(device=conv.weight.device,
                                                                              dtype=conv.weight.dtype)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.weight.copy_((var + eps).sqrt())
        bn.bias.copy_(mean)
        bn.num_batches_tracked.fill_(count)
        bn.train(was_training)
        if isinstance(owner, Conv):
            owner.bn = bn
        else:
            owner.rbr_reparam = nn.Sequential(OrderedDict(conv=conv, bn=bn))
    return model


@torch.no_grad()
def _raw_maps(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        _, maps = model(x)
    finally:
        model.train(was_training)
    return torch.cat([m.flatten() for m in maps])


@torch.no_grad()
def fold_batchnorms(model: nn.Module, *, inplace: bool = False, example: torch.Tensor | None = None,
                    tol: float = FOLD_TOLERANCE) -> nn.Module:
    """The plain network again: every BatchNorm that `insert_batchnorms` placed folded into its conv (a copy unless
    `inplace`), with the module structure and state-dict keys from before the insertion.

    Checked: the raw maps of both forms in eval mode on `example` (default: a seeded 1x3x64x64 input), computed in
    float64 on the CPU, must agree to a relative error below `tol`; FoldError otherwise.
    """
    sites = {name: site for name, site in batchnorm_sites(model).items() if site[2] is not None}
    if example is None:
        ch = int(getattr(model, "yaml", {}).get("ch", 3))
        side = 2 * int(max(model.stride.max().item(), 32)) if hasattr(model, "stride") else 64
        example = torch.rand(1, ch, side, side, generator=torch.Generator().manual_seed(0))
    reference = copy.deepcopy(model).to("cpu", torch.float64)
    folded = model if inplace else copy.deepcopy(model)
    for name in sites:  # re-resolve in the copy
        owner = folded.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(owner, Conv):
            owner.conv = fuse_conv_bn(owner.conv, owner.bn)
            owner.bn = nn.Identity()
        else:
            owner.rbr_reparam = fuse_conv_bn(owner.rbr_reparam.conv, owner.rbr_reparam.bn)
    x = example.detach().to("cpu", torch.float64)
    a = _raw_maps(reference, x)
    b = _raw_maps(copy.deepcopy(folded).to("cpu", torch.float64), x)
    err = float((a - b).norm() / a.norm().clamp_min(1e-30))
    if not err < tol:
        raise FoldError(f"folding {len(sites)} BatchNorms changed the raw outputs by a relative {err:.2e} (limit "
                        f"{tol:.0e}); check the BatchNorms for non-finite or tiny running_var values")
    return folded
