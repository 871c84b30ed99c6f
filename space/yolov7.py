"""YOLOv7's building blocks, with its positional arguments, numerics and parameter names.

What a YOLOv7 model YAML names (WongKinYiu/yolov7 at commit a207844, `models/common.py` and `models/yolo.py`;
GPL-3.0, so these are written here from the facts: signatures, layer layout, parameter names, arithmetic):

    Conv(c1, c2, k=1, s=1, p=None, g=1, act=True)   act is YOLOv7's 7th argument where YOLOv5 7.0 has dilation;
                                                     True means SiLU, False none, else the given activation
    MP(k=2)                                          max-pool, stride k (downsampling)
    SP(k=3, s=1)                                     max-pool with 'same' padding (YOLOv7-tiny's SPP branches)
    SPPCSPC(c1, c2, n=1, shortcut=False, g=1, e=0.5, k=(5, 9, 13))
    RepConv(c1, c2, k=3, s=1, p=None, g=1, act=True, deploy=False)
    ImplicitA(c), ImplicitM(c)                       YOLOR's learned per-channel shift and scale
    IDetect(nc, anchors, ch)                         Detect with ImplicitA before and ImplicitM after each conv
    Detect(nc, anchors, ch)                          YOLOv7's Detect: YOLOv5's plus an `anchor_grid` buffer

State-dict names are YOLOv7's (`rbr_dense.0.weight`, `model.105.ia.0.implicit`, `model.105.anchor_grid`), so
weights move both ways. The deploy forms (`deploy=True`, what `pruning.reparam.fuse_model` produces): Conv without
BatchNorm, RepConv as one 3x3 conv `rbr_reparam` (as YOLOv7's `fuse_repvgg_block` leaves it), IDetect with its
implicit layers folded into the output convs (as YOLOv7's `IDetect.fuse` computes them) and removed; YOLOv7's own
`fuse()` keeps them as parameters its fused forward no longer uses.

`Conv` subclasses space.blocks.Conv and `RepConv` subclasses space.blocks.RepVGGBlock (the same three branches,
the same deploy conv `rbr_reparam`), so fusion, channel pruning and the BatchNorms of fine-tuning treat them as
the blocks they are.

Training: repnas trains these models with its own YOLOv5 loss and recipe (nas.loss, nas.train: YOLOv5's target
assignment), not YOLOv7's OTA loss (`ComputeLossOTA` in YOLOv7's utils/loss.py, SimOTA-style assignment) nor its
training recipe. The architecture and weights are YOLOv7's; mAP after `repnas train` is not what YOLOv7's
train.py would reach, and a repnas ranking of YOLOv7-dialect models is a ranking under the YOLOv5 loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from space import blocks
from space.blocks import Activation, Detect, RepVGGBlock, autopad

Act = bool | None | nn.Module | Activation


def _act_module(act: Act) -> nn.Module:
    """YOLOv7's rule: True -> SiLU, an activation -> itself (made fresh from an Activation), anything else none."""
    if act is True:
        return nn.SiLU()
    if isinstance(act, Activation):
        return act()
    return act if isinstance(act, nn.Module) else nn.Identity()


class Conv(blocks.Conv):
    """YOLOv7's Conv(c1, c2, k, s, p, g, act): Conv2d + BatchNorm2d + activation, SiLU unless `act` says otherwise.

    The same layer and parameter names as space.blocks.Conv; only the argument order differs (no dilation).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 padding: int | None = None, groups: int = 1, act: Act = True, *, deploy: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups, 1, _act_module(act),
                         deploy=deploy)


class MP(nn.Module):
    """Max-pool with kernel and stride `k` (YOLOv7's MP: the downsampling between ELAN stages)."""

    def __init__(self, k: int = 2):
        super().__init__()
        self.m = nn.MaxPool2d(kernel_size=k, stride=k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x)


class SP(nn.Module):
    """Max-pool with kernel `k`, stride `s` and padding k // 2 (YOLOv7's SP)."""

    def __init__(self, k: int = 3, s: int = 1):
        super().__init__()
        self.m = nn.MaxPool2d(kernel_size=k, stride=s, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x)


class SPPCSPC(nn.Module):
    """YOLOv7's SPPCSPC: a CSP split whose long branch is 1x1-3x3-1x1, parallel max-pools (k), 1x1-3x3; then 1x1.

    Hidden width int(2 * c2 * e). `n`, `shortcut` and `g` are accepted as YOLOv7 accepts them, and unused as there.
    """

    def __init__(self, in_channels: int, out_channels: int, n: int = 1, shortcut: bool = False, g: int = 1,
                 e: float = 0.5, k: Sequence[int] = (5, 9, 13), *, deploy: bool = False):
        super().__init__()
        hidden = int(2 * out_channels * e)
        if hidden < 1:
            raise ValueError(f"SPPCSPC: hidden width int(2 * {out_channels} * {e}) = {hidden}; raise e or the width")

        def conv(c_in: int, c_out: int, kernel: int) -> blocks.Conv:
            return blocks.Conv(c_in, c_out, kernel, 1, deploy=deploy)  # SiLU: YOLOv7's Conv default

        self.cv1 = conv(in_channels, hidden, 1)
        self.cv2 = conv(in_channels, hidden, 1)
        self.cv3 = conv(hidden, hidden, 3)
        self.cv4 = conv(hidden, hidden, 1)
        self.m = nn.ModuleList(nn.MaxPool2d(kernel_size=size, stride=1, padding=size // 2) for size in k)
        self.cv5 = conv((len(self.m) + 1) * hidden, hidden, 1)
        self.cv6 = conv(hidden, hidden, 3)
        self.cv7 = conv(2 * hidden, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.cv4(self.cv3(self.cv1(x)))
        y1 = self.cv6(self.cv5(torch.cat([x1, *(pool(x1) for pool in self.m)], 1)))
        return self.cv7(torch.cat((y1, self.cv2(x)), 1))


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int, groups: int):
    return nn.Sequential(  # YOLOv7 names the branch's layers by index: rbr_dense.0 (conv), rbr_dense.1 (bn)
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class RepConv(RepVGGBlock):
    """YOLOv7's RepConv: 3x3 conv-BN + 1x1 conv-BN (+ identity BN when shapes allow), summed, then `act`.

    The RepVGG block of YOLOv7's head: no SE, its activation chosen per row (SiLU by default), branch layers named
    by index (`rbr_dense.0.weight`, `rbr_dense.1.running_mean`). Deploy form: one 3x3 conv with bias,
    `rbr_reparam`, which `pruning.reparam.fuse_model` computes and `switch_to_deploy` installs.
    """

    _branch = staticmethod(_conv_bn)

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None, groups: int = 1, act: Act = True, deploy: bool = False):
        nn.Module.__init__(self)  # the RepVGG block's own layout (SE, SiLU, named branches) is not YOLOv7's
        if kernel_size != 3 or autopad(kernel_size, padding) != 1:
            raise ValueError(f"RepConv: kernel_size=3 with padding 1 is required (YOLOv7 asserts both), got "
                             f"kernel_size={kernel_size}, padding={padding}")
        if stride < 1:
            raise ValueError(f"RepConv: stride={stride} must be >= 1")
        blocks._check_groups("RepConv", in_channels, out_channels, groups)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.groups = stride, groups
        self.deploy = deploy
        self.act = _act_module(act)
        self._branches(in_channels, out_channels, stride, groups, deploy)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.act(self.rbr_reparam(inputs))
        out = self.rbr_dense(inputs) + self.rbr_1x1(inputs)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(inputs)
        return self.act(out)


class ImplicitA(nn.Module):
    """YOLOR's implicit addition: a learned per-channel shift, `implicit` (1, C, 1, 1), initialised N(0, 0.02)."""

    def __init__(self, channel: int):
        super().__init__()
        self.channel = channel
        self.implicit = nn.Parameter(torch.zeros(1, channel, 1, 1))
        nn.init.normal_(self.implicit, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.implicit + x


class ImplicitM(nn.Module):
    """YOLOR's implicit multiplication: a learned per-channel scale, `implicit` (1, C, 1, 1), initialised N(1, 0.02)."""

    def __init__(self, channel: int):
        super().__init__()
        self.channel = channel
        self.implicit = nn.Parameter(torch.ones(1, channel, 1, 1))
        nn.init.normal_(self.implicit, mean=1.0, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.implicit * x


class DetectV7(Detect):
    """YOLOv7's Detect: YOLOv5's head plus `anchor_grid` (nl, 1, na, 1, 1, 2), the anchors in pixels as a buffer.

    YOLOv7 decodes box sizes with `anchor_grid`; here they come from `anchors` x `stride`, which equals it: the
    builder keeps the two in step (anchors are divided by the strides, anchor_grid is not), and so does YOLOv7.
    """

    CLASS_PRIOR_OFFSET = 0.99  # YOLOv7's Model._initialize_biases: log(0.6 / (nc - 0.99))

    def __init__(self, nc: int = 80, anchors: Sequence[Sequence[float]] = (), ch: Sequence[int] = ()):
        super().__init__(nc, anchors, ch)
        self.register_buffer("anchor_grid", self.anchors.clone().view(self.nl, 1, -1, 1, 1, 2))


class IDetect(DetectV7):
    """YOLOv7's IDetect: each level is ImplicitM(conv(ImplicitA(x))); `ia`/`im` are None in the deploy form.

    Deploy form (`deploy=True`, or after `switch_to_deploy`): the implicit layers are folded into the output convs,
    conv'(x) = im * (W x + b + W ia), as YOLOv7's IDetect.fuse computes it, and removed.
    """

    def __init__(self, nc: int = 80, anchors: Sequence[Sequence[float]] = (), ch: Sequence[int] = (),
                 *, deploy: bool = False):
        super().__init__(nc, anchors, ch)
        self.deploy = deploy
        if deploy:
            self.ia = self.im = None
        else:
            self.ia = nn.ModuleList(ImplicitA(c) for c in ch)
            self.im = nn.ModuleList(ImplicitM(self.no * self.na) for _ in ch)

    def level(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.m[i](x)
        return self.im[i](self.m[i](self.ia[i](x)))

    def switch_to_deploy(self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]) -> None:
        """Install the folded output convs (computed by pruning.reparam) and drop the implicit layers."""
        with torch.no_grad():
            for conv, weight, bias in zip(self.m, weights, biases, strict=True):
                conv.weight.copy_(weight)
                conv.bias.copy_(bias)
        self.ia = self.im = None
        self.deploy = True
