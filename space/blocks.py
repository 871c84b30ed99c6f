"""Building blocks of RepVGG-YOLO detectors, with YOLOv5's semantics, positional arguments and parameter names.

Positional arguments follow YOLOv5's rows (after the builder prepends the input channels), so a YAML row builds
the same layer here and in a YOLOv5 checkout. Two keyword-only options are ours: `act_layer` (a factory for the
model's activation, which YOLOv5 sets through a class attribute shared by every model in the process) and
`deploy` (build the fused, inference form directly: a conv with bias and no BatchNorm).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

ActLayer = Callable[[], nn.Module]

# The activations a model YAML may name (as `activation:` in YOLOv5's dialect, per row in YOLOv7's), by spelling.
ACTIVATIONS: dict[str, Callable[..., nn.Module]] = {
    "nn.SiLU": nn.SiLU, "nn.ReLU": nn.ReLU, "nn.ReLU6": nn.ReLU6, "nn.LeakyReLU": nn.LeakyReLU,
    "nn.Hardswish": nn.Hardswish, "nn.Mish": nn.Mish, "nn.GELU": nn.GELU, "nn.Sigmoid": nn.Sigmoid,
    "nn.Identity": nn.Identity,
}


@dataclass(frozen=True, repr=False)
class Activation:
    """An activation from the fixed table, named as a YAML names it (`nn.LeakyReLU(0.1)`): calling it makes a fresh
    module, so layers never share one. `slope` is LeakyReLU's negative slope (None: torch's default 0.01)."""

    name: str
    slope: float | None = None

    def __post_init__(self):
        if self.name not in ACTIVATIONS:
            raise ValueError(f"Activation: {self.name!r} is not one of {', '.join(ACTIVATIONS)}")
        if self.slope is not None and self.name != "nn.LeakyReLU":
            raise ValueError(f"Activation: {self.name}() takes no argument, got {self.slope!r}")

    def __call__(self) -> nn.Module:
        cls = ACTIVATIONS[self.name]
        return cls() if self.slope is None else cls(self.slope)

    def __repr__(self) -> str:
        return f"{self.name}({'' if self.slope is None else repr(self.slope)})"


def autopad(kernel_size: int, padding: int | None = None, dilation: int = 1) -> int:
    """'Same' padding for an odd kernel (YOLOv5's autopad)."""
    if dilation > 1:
        kernel_size = dilation * (kernel_size - 1) + 1
    return kernel_size // 2 if padding is None else padding


def make_divisible(x: float, divisor: int = 8) -> int:
    """Smallest multiple of `divisor` that is >= x (YOLOv5's rounding of scaled channel counts)."""
    return math.ceil(x / divisor) * divisor


def _check_groups(name: str, in_channels: int, out_channels: int, groups: int) -> None:
    if groups < 1 or in_channels % groups or out_channels % groups:
        raise ValueError(
            f"{name}: groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}; "
            "choose widths that are multiples of groups"
        )


class Conv(nn.Module):
    """Conv2d + BatchNorm2d + activation. Fused form: BatchNorm is an Identity and the conv carries a bias."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        dilation: int = 1,
        act: bool | nn.Module = True,
        *,
        act_layer: ActLayer = nn.SiLU,
        deploy: bool = False,
    ):
        super().__init__()
        _check_groups("Conv", in_channels, out_channels, groups)
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, autopad(kernel_size, padding, dilation),
            groups=groups, dilation=dilation, bias=deploy,
        )
        self.bn = nn.Identity() if deploy else nn.BatchNorm2d(out_channels)
        if act is True:
            self.act = act_layer()
        elif isinstance(act, nn.Module):
            self.act = act
        else:
            self.act = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """1x1 then 3x3 Conv, with a residual when `shortcut` and the channels match."""

    def __init__(
        self, in_channels: int, out_channels: int, shortcut: bool = True, groups: int = 1, expansion: float = 0.5,
        *, act_layer: ActLayer = nn.SiLU, deploy: bool = False,
    ):
        super().__init__()
        hidden = int(out_channels * expansion)
        self.cv1 = Conv(in_channels, hidden, 1, 1, act_layer=act_layer, deploy=deploy)
        self.cv2 = Conv(hidden, out_channels, 3, 1, groups=groups, act_layer=act_layer, deploy=deploy)
        self.add = shortcut and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP bottleneck with three convolutions (YOLOv5's C3)."""

    def __init__(
        self, in_channels: int, out_channels: int, number: int = 1, shortcut: bool = True, groups: int = 1,
        expansion: float = 0.5, *, act_layer: ActLayer = nn.SiLU, deploy: bool = False,
    ):
        super().__init__()
        hidden = int(out_channels * expansion)
        self.cv1 = Conv(in_channels, hidden, 1, 1, act_layer=act_layer, deploy=deploy)
        self.cv2 = Conv(in_channels, hidden, 1, 1, act_layer=act_layer, deploy=deploy)
        self.cv3 = Conv(2 * hidden, out_channels, 1, act_layer=act_layer, deploy=deploy)
        self.m = nn.Sequential(
            *(Bottleneck(hidden, hidden, shortcut, groups, 1.0, act_layer=act_layer, deploy=deploy)
              for _ in range(number))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained max-pools (YOLOv5's SPPF)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 5,
        *, act_layer: ActLayer = nn.SiLU, deploy: bool = False,
    ):
        super().__init__()
        hidden = in_channels // 2
        self.cv1 = Conv(in_channels, hidden, 1, 1, act_layer=act_layer, deploy=deploy)
        self.cv2 = Conv(hidden * 4, out_channels, 1, 1, act_layer=act_layer, deploy=deploy)
        self.m = nn.MaxPool2d(kernel_size=kernel_size, stride=1, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class Concat(nn.Module):
    """Concatenate a list of tensors along `dimension`."""

    def __init__(self, dimension: int = 1):
        super().__init__()
        self.d = dimension

    def forward(self, x: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(x), self.d)


class SEBlock(nn.Module):
    """Squeeze-excitation as in RepVGG: global average pool, 1x1 down + ReLU, 1x1 up + sigmoid, channel scale.

    Pools over the whole map (non-square inputs work) and takes its channel count from the input at run time,
    so it keeps working after channel pruning changes `down`/`up`.
    """

    def __init__(self, input_channels: int, internal_neurons: int):
        super().__init__()
        if internal_neurons < 1:
            raise ValueError(
                f"SEBlock: internal_neurons={internal_neurons} must be >= 1 (RepVGG uses channels // 16, "
                f"so SE needs at least 16 channels; got input_channels={input_channels})"
            )
        self.down = nn.Conv2d(input_channels, internal_neurons, 1, 1, bias=True)
        self.up = nn.Conv2d(internal_neurons, input_channels, 1, 1, bias=True)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs.mean((2, 3), keepdim=True)  # (B, C, 1, 1)
        x = torch.sigmoid(self.up(nn.functional.relu(self.down(x))))
        return inputs * x


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int, groups: int):
    result = nn.Sequential()
    result.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                                        groups=groups, bias=False))
    result.add_module("bn", nn.BatchNorm2d(out_channels))
    return result


class RepVGGBlock(nn.Module):
    """RepVGG block: 3x3 conv-BN + 1x1 conv-BN (+ identity BN when shapes allow), optional SE, SiLU.

    Signature, positional order and parameter names are the design document's, so a YAML row
    `[256, 3, 1, 1, 1, 1, 'zeros', False, True]` means SE on and weights move both ways. At deploy time the
    branches are one 3x3 conv with bias (`rbr_reparam`); `pruning.reparam.fuse_model` does that conversion.
    """

    _branch = staticmethod(_conv_bn)  # one conv-BN branch (YOLOv7's RepConv names its layers by index)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        dilation: int = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        deploy: bool = False,
        use_se: bool = False,
    ):
        super().__init__()
        if kernel_size != 3 or padding != 1:
            raise ValueError(
                f"RepVGGBlock: kernel_size=3 with padding=1 is required (the 1x1 branch is padded into the 3x3 "
                f"kernel at fusion), got kernel_size={kernel_size}, padding={padding}"
            )
        if dilation != 1 or padding_mode != "zeros":
            raise ValueError(
                f"RepVGGBlock: dilation=1 and padding_mode='zeros' are required (the train-time branches use "
                f"neither), got dilation={dilation}, padding_mode={padding_mode!r}"
            )
        if stride < 1:
            raise ValueError(f"RepVGGBlock: stride={stride} must be >= 1")
        _check_groups("RepVGGBlock", in_channels, out_channels, groups)
        if use_se and out_channels < 16:
            raise ValueError(
                f"RepVGGBlock: SE squeezes to out_channels // 16, so use_se needs out_channels >= 16, "
                f"got {out_channels}; turn SE off or widen the layer"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.groups = stride, groups
        self.deploy = deploy
        self.nonlinearity = nn.SiLU()
        self.se = SEBlock(out_channels, internal_neurons=out_channels // 16) if use_se else nn.Identity()
        self._branches(in_channels, out_channels, stride, groups, deploy)

    def _branches(self, in_channels: int, out_channels: int, stride: int, groups: int, deploy: bool) -> None:
        """The deploy conv, or the 3x3, 1x1 and identity-BN branches (the last when shapes allow), under RepVGG's
        parameter names (YOLOv7's RepConv keeps them, building each conv-BN branch with its own `_branch`)."""
        if deploy:
            self.rbr_reparam = nn.Conv2d(in_channels, out_channels, 3, stride, 1, groups=groups, bias=True)
        else:
            has_identity = out_channels == in_channels and stride == 1
            self.rbr_identity = nn.BatchNorm2d(in_channels) if has_identity else None
            self.rbr_dense = self._branch(in_channels, out_channels, 3, stride, 1, groups)
            self.rbr_1x1 = self._branch(in_channels, out_channels, 1, stride, 0, groups)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.nonlinearity(self.se(self.rbr_reparam(inputs)))
        out = self.rbr_dense(inputs) + self.rbr_1x1(inputs)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(inputs)
        return self.nonlinearity(self.se(out))

    def switch_to_deploy(self, kernel: torch.Tensor, bias: torch.Tensor) -> None:
        """Replace the branches by one 3x3 conv holding `kernel` and `bias` (computed by pruning.reparam)."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, 3, self.stride, 1, groups=self.groups, bias=True)
        conv = conv.to(device=kernel.device, dtype=kernel.dtype)
        with torch.no_grad():
            conv.weight.copy_(kernel)
            conv.bias.copy_(bias)
        self.rbr_reparam = conv
        del self.rbr_dense, self.rbr_1x1
        self.rbr_identity = None
        self.deploy = True


class Detect(nn.Module):
    """YOLOv5's anchor-based detection head.

    Training mode returns the raw maps, one per level, each (B, na, H, W, 5 + nc). Eval mode returns
    (predictions (B, N, 5 + nc) with xywh in input pixels, objectness and class scores after sigmoid, raw maps).
    `anchors` is stored in stride units once the builder has found the strides (YOLOv5's convention).
    """

    def __init__(self, nc: int = 80, anchors: Sequence[Sequence[float]] = (), ch: Sequence[int] = (),
                 inplace: bool = True):
        super().__init__()
        self.nc = nc
        self.no = nc + 5  # outputs per anchor
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.inplace = inplace  # kept for YAML compatibility; the decode below never writes into its input
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32).view(self.nl, -1, 2))
        self.register_buffer("stride", torch.ones(self.nl), persistent=False)  # set by the builder
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)
        self._grids: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def level(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Level `i`'s raw map (B, na * (5 + nc), H, W) from its input feature map (B, C, H, W)."""
        return self.m[i](x)

    def forward(self, x: list[torch.Tensor]):
        x = list(x)
        z = []
        for i in range(self.nl):
            x[i] = self.level(i, x[i])
            bs, _, ny, nx = x[i].shape
            x[i] = x[i].view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            if not self.training:
                grid, anchor_grid = self._grid(nx, ny, i, x[i])
                xy, wh, conf = x[i].sigmoid().split((2, 2, self.nc + 1), 4)
                xy = (xy * 2 + grid) * self.stride[i]
                wh = (wh * 2) ** 2 * anchor_grid
                z.append(torch.cat((xy, wh, conf), 4).view(bs, self.na * nx * ny, self.no))
        return x if self.training else (torch.cat(z, 1), x)

    def _grid(self, nx: int, ny: int, i: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # in-place edits of anchors/stride (builder, autoanchor, load_state_dict) bump their _version: no stale grid
        key = (nx, ny, i, like.device, like.dtype, self.anchors._version, self.stride._version)
        if key not in self._grids:
            shape = 1, self.na, ny, nx, 2
            y = torch.arange(ny, device=like.device, dtype=like.dtype)
            x = torch.arange(nx, device=like.device, dtype=like.dtype)
            yv, xv = torch.meshgrid(y, x, indexing="ij")
            grid = torch.stack((xv, yv), 2).expand(shape) - 0.5  # cell offsets, so xy = 2*sigmoid - 0.5
            anchor_grid = (self.anchors[i] * self.stride[i]).to(like.dtype).view(1, self.na, 1, 1, 2).expand(shape)
            if len(self._grids) > 32:
                self._grids.clear()
            self._grids[key] = (grid, anchor_grid)
        return self._grids[key]

    def _apply(self, fn, recurse=True):
        self._grids = {}
        return super()._apply(fn, recurse)

    CLASS_PRIOR_OFFSET = 0.99999  # YOLOv5's log(0.6 / (nc - offset)) class prior (YOLOv7 writes 0.99)

    def initialize_biases(self) -> None:
        """YOLOv5's prior: about 8 objects per 640 image on each level, class probability 0.6 / nc."""
        with torch.no_grad():
            for conv, s in zip(self.m, self.stride.tolist()):
                b = conv.bias.view(self.na, -1)  # (na, 5 + nc)
                b[:, 4] += math.log(8 / (640 / s) ** 2)
                b[:, 5:5 + self.nc] += math.log(0.6 / (self.nc - self.CLASS_PRIOR_OFFSET))
