"""YOLOv5 or YOLOv7 model YAML -> DetectionModel, with the parse semantics of each and nothing ever evaluated.

The rules are YOLOv5's `parse_model`: rows `[from, number, module, args]`; `from` an int or a list (negative =
relative; -1 the previous layer); `number` scaled by `depth_multiple` (Python's round, at least 1, only when
> 1); output channels scaled by `width_multiple` and rounded up to a multiple of 8; the input channels are
prepended to the args of channel-mapping modules; C3 gets `number` as its third argument. Modules come from an
explicit registry; the strings `nc`, `anchors` and `None` are resolved from a fixed table; any other string is
accepted only as a literal where the module takes a string (Upsample's mode, RepVGG's padding mode).

Two dialects share that format and differ in what a row means (`dialect_of` decides which one a YAML speaks):
  - yolov5: YOLOv5 7.0's `models/yolo.py` and `common.py` (MODULES). A top-level `activation:` sets every layer's.
  - yolov7: YOLOv7's `models/yolo.py::parse_model` at commit a207844 (MODULES_V7, blocks in space.yolov7):
    a Conv row `[c2, k, s, p, g, act]` gives an activation where YOLOv5 7.0's gives a dilation, written per row as
    YOLOv7's YAMLs write it (`[32, 3, 2, None, 1, nn.LeakyReLU(0.1)]`) and read from the fixed table
    `space.blocks.ACTIVATIONS`, never evaluated; SiLU where a row names none. SPPCSPC gets `number` as its third
    argument (as C3 does in YOLOv5); IDetect/Detect get the input channels appended. The design document's
    RepVGGBlock builds in both.
A YAML speaks YOLOv7 when it says so (`dialect: yolov7`) or names a module only YOLOv7 has (V7_ONLY); any other
YAML, ambiguous ones included, is YOLOv5.

Before allocating any weights the network is built on the `meta` device: its parameter count is bounded and a
shape probe runs, so an absurd YAML fails in milliseconds with the offending row named.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from space import yolov7 as v7
from space.blocks import (
    ACTIVATIONS,
    C3,
    SPPF,
    Activation,
    Bottleneck,
    Concat,
    Conv,
    Detect,
    RepVGGBlock,
    SEBlock,
    make_divisible,
)
from space.errors import ModelConfigError
from space.yamlio import read_yaml

MAX_ROWS = 512
MAX_NUMBER = 256  # repeats of one row, after depth_multiple
MAX_CHANNELS = 16384
MAX_MULTIPLE = 16.0
MAX_NC = 100_000  # classes: far above any detection dataset (LVIS has 1,203)
MAX_PARAMS = 1_000_000_000  # 4 GB of float32 weights
PROBE_SIZE = 256  # YOLOv5 finds the strides with a 256x256 forward pass

MODULES: dict[str, type[nn.Module]] = {
    "Conv": Conv,
    "Bottleneck": Bottleneck,
    "C3": C3,
    "SPPF": SPPF,
    "Concat": Concat,
    "SEBlock": SEBlock,
    "RepVGGBlock": RepVGGBlock,
    "Detect": Detect,
    "nn.Upsample": nn.Upsample,
}
CHANNEL_MODULES = {Conv, Bottleneck, C3, SPPF, RepVGGBlock}  # c1 prepended, c2 scaled (YOLOv5's set)
ACT_MODULES = {Conv, Bottleneck, C3, SPPF}  # take the model's activation and deploy form as keywords

DIALECTS = ("yolov5", "yolov7")
# YOLOv7's names (models/common.py, models/yolo.py at a207844), as far as repnas builds them
MODULES_V7: dict[str, type[nn.Module]] = {
    "Conv": v7.Conv,
    "Concat": Concat,
    "MP": v7.MP,
    "SP": v7.SP,
    "SPPCSPC": v7.SPPCSPC,
    "RepConv": v7.RepConv,
    "RepVGGBlock": RepVGGBlock,
    "nn.Upsample": nn.Upsample,
    "IDetect": v7.IDetect,
    "Detect": v7.DetectV7,
}
V7_ONLY = frozenset(MODULES_V7) - frozenset(MODULES)  # a YAML naming one of these speaks YOLOv7
CHANNEL_MODULES_V7 = {v7.Conv, v7.RepConv, v7.SPPCSPC, RepVGGBlock}  # YOLOv7's list, as far as built here
DEPLOY_MODULES_V7 = {v7.Conv, v7.SPPCSPC, v7.IDetect}  # take the deploy form as a keyword
DETECT_MODULES = {Detect, v7.DetectV7, v7.IDetect}

_NONE = type(None)


@dataclass(frozen=True)
class Arg:
    """One positional YAML argument: its name, accepted types, default, and (for strings) accepted literals."""

    name: str
    types: tuple[type, ...]
    default: Any = None
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None


_I, _F, _B = (int,), (int, float), (bool,)
_ACT = (bool, _NONE, Activation)  # True (SiLU), False or None (none: YOLOv7's rule), or a spelling from ACTIVATIONS
ARGS: dict[str, tuple[Arg, ...]] = {
    "Conv": (Arg("out_channels", _I, low=1), Arg("kernel_size", _I, 1, low=1, high=15),
             Arg("stride", _I, 1, low=1, high=16), Arg("padding", (int, _NONE), None, low=0, high=15),
             Arg("groups", _I, 1, low=1), Arg("dilation", _I, 1, low=1, high=8), Arg("act", _B, True)),
    "Bottleneck": (Arg("out_channels", _I, low=1), Arg("shortcut", _B, True), Arg("groups", _I, 1, low=1),
                   Arg("expansion", _F, 0.5, low=1e-3, high=8)),
    "C3": (Arg("out_channels", _I, low=1), Arg("shortcut", _B, True), Arg("groups", _I, 1, low=1),
           Arg("expansion", _F, 0.5, low=1e-3, high=8)),
    "SPPF": (Arg("out_channels", _I, low=1), Arg("kernel_size", _I, 5, low=1, high=15)),
    "RepVGGBlock": (Arg("out_channels", _I, low=1), Arg("kernel_size", _I, 3, low=1, high=15),
                    Arg("stride", _I, 1, low=1, high=16), Arg("padding", _I, 1, low=0, high=15),
                    Arg("dilation", _I, 1, low=1, high=8), Arg("groups", _I, 1, low=1),
                    Arg("padding_mode", (str,), "zeros", choices=("zeros",)), Arg("deploy", _B, False),
                    Arg("use_se", _B, False)),
    "Concat": (Arg("dimension", _I, 1, low=1, high=1),),
    "SEBlock": (Arg("input_channels", _I, low=1), Arg("internal_neurons", _I, low=1)),
    "Detect": (Arg("nc", _I, low=1), Arg("anchors", (list, int)), Arg("inplace", _B, True)),
    "nn.Upsample": (Arg("size", (int, _NONE), None, low=1, high=MAX_CHANNELS),
                    Arg("scale_factor", (int, float, _NONE), None, low=1e-3, high=16),
                    Arg("mode", (str,), "nearest", choices=("nearest", "bilinear", "bicubic"))),
}
REQUIRED = {"Conv": 1, "Bottleneck": 1, "C3": 1, "SPPF": 1, "RepVGGBlock": 1, "SEBlock": 2, "Detect": 2}

ARGS_V7: dict[str, tuple[Arg, ...]] = {
    "Conv": (Arg("out_channels", _I, low=1), Arg("kernel_size", _I, 1, low=1, high=15),
             Arg("stride", _I, 1, low=1, high=16), Arg("padding", (int, _NONE), None, low=0, high=15),
             Arg("groups", _I, 1, low=1), Arg("act", _ACT, True)),
    "RepConv": (Arg("out_channels", _I, low=1), Arg("kernel_size", _I, 3, low=3, high=3),
                Arg("stride", _I, 1, low=1, high=16), Arg("padding", (int, _NONE), None, low=1, high=1),
                Arg("groups", _I, 1, low=1), Arg("act", _ACT, True), Arg("deploy", _B, False)),
    "SPPCSPC": (Arg("out_channels", _I, low=1), Arg("shortcut", _B, False), Arg("groups", _I, 1, low=1),
                Arg("expansion", _F, 0.5, low=1e-3, high=8), Arg("kernel_sizes", (list,), [5, 9, 13])),
    "MP": (Arg("kernel_size", _I, 2, low=1, high=16),),
    "SP": (Arg("kernel_size", _I, 3, low=1, high=31), Arg("stride", _I, 1, low=1, high=16)),
    "IDetect": ARGS["Detect"][:2],
    "Detect": ARGS["Detect"][:2],
    **{name: ARGS[name] for name in ("Concat", "RepVGGBlock", "nn.Upsample")},
}
REQUIRED_V7 = {"Conv": 1, "RepConv": 1, "SPPCSPC": 1, "RepVGGBlock": 1, "IDetect": 2, "Detect": 2}
MAX_POOLS = 8  # SPPCSPC's parallel max-pools

_ACT_RE = re.compile(r"^\s*(?:torch\.)?(nn\.\w+)\(\s*([-+0-9.eE]*)\s*\)\s*$")
TOP_KEYS = ("nc", "depth_multiple", "width_multiple", "anchors", "backbone", "head", "activation", "ch", "dialect")


@dataclass(frozen=True)
class LayerInfo:
    """One built layer as YOLOv5 prints it: index, from, repeats, params, module name and resolved args."""

    index: int
    from_: int | tuple[int, ...]
    number: int
    params: int
    module: str
    args: tuple


class DetectionModel(nn.Module):
    """A YOLOv5/YOLOv7-layout detector: `model` is an nn.Sequential of layers whose last one is Detect (IDetect).

    State-dict keys are YOLOv5's or YOLOv7's (`model.0.rbr_dense.conv.weight` ... `model.22.anchors`). `yaml` is
    the model dict as built (nc resolved); `layer_info` describes each layer; `dialect` is "yolov5" or "yolov7".
    """

    def __init__(self, layers: Sequence[nn.Module], layer_info: Sequence[LayerInfo], save: Sequence[int],
                 cfg: dict):
        super().__init__()
        self.model = nn.Sequential(*layers)
        self.layer_info = tuple(layer_info)
        self.save = sorted(set(save))
        self.yaml = cfg
        self._from = tuple(info.from_ for info in self.layer_info)
        self._keep = frozenset(self.save)
        self.dialect = dialect_of(cfg)

    @property
    def detect(self) -> Detect:  # YOLOv7's IDetect and Detect are Detect subclasses
        return self.model[-1]

    @property
    def stride(self) -> torch.Tensor:
        return self.detect.stride

    @property
    def nc(self) -> int:
        return self.detect.nc

    def forward(self, x: torch.Tensor):
        outputs: list[torch.Tensor | None] = []
        for i, (module, src) in enumerate(zip(self.model, self._from)):
            if src != -1:
                x = outputs[src] if isinstance(src, int) else [x if j == -1 else outputs[j] for j in src]
            x = module(x)
            outputs.append(x if i in self._keep else None)
        return x


# ---------------------------------------------------------------------------------------------------------------


def _type_names(types: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", bool: "true/false", str: "a string", list: "a list",
             _NONE: "None", Activation: "an activation such as nn.LeakyReLU(0.1)"}
    return " or ".join(names[t] for t in types)


def _check_number(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int):
        return int in types or float in types
    if isinstance(value, float):
        return float in types and math.isfinite(value)
    return False


def parse_activation(spec: Any, where: str, field: str = "activation") -> Activation:
    """The activation a YAML spells `spec` (e.g. "nn.LeakyReLU(0.1)"), looked up in the fixed table
    space.blocks.ACTIVATIONS, never evaluated. Raises ModelConfigError naming `where` and `field`."""
    match = _ACT_RE.match(spec) if isinstance(spec, str) else None
    if match is None or match.group(1) not in ACTIVATIONS:
        raise ModelConfigError(
            f"{where}: field '{field}': {spec!r} is not a known activation; use one of "
            f"{', '.join(name + '()' for name in ACTIVATIONS)} (nn.LeakyReLU(0.1) takes a slope)"
        )
    name, arg = match.groups()
    if not arg:
        return Activation(name)
    if name != "nn.LeakyReLU":
        raise ModelConfigError(f"{where}: field '{field}': {name}() takes no argument, got {spec!r}")
    try:
        slope = float(arg)
    except ValueError:
        raise ModelConfigError(f"{where}: field '{field}': slope {arg!r} is not a number") from None
    if not math.isfinite(slope):
        raise ModelConfigError(f"{where}: field '{field}': slope {arg!r} is not a finite number")
    return Activation(name, slope)


def _activation(spec: Any, where: str) -> Callable[[], nn.Module]:
    return nn.SiLU if spec is None else parse_activation(spec, where)


def dialect_of(cfg: dict, where: str = "<model dict>") -> str:
    """"yolov7" or "yolov5": the explicit top-level `dialect`, else "yolov7" when a row names a module only YOLOv7
    has (V7_ONLY: MP, SP, SPPCSPC, RepConv, IDetect), else "yolov5" (an ambiguous YAML is YOLOv5's)."""
    explicit = cfg.get("dialect")
    if explicit is not None:
        if explicit not in DIALECTS:
            raise ModelConfigError(f"{where}: field 'dialect': {explicit!r:.40} is not a dialect; write one of "
                                   f"{', '.join(DIALECTS)} (or leave it out to detect it from the modules)")
        return explicit
    rows = [row for part in ("backbone", "head") if isinstance(cfg.get(part), list) for row in cfg[part]]
    names = {row[2] for row in rows if isinstance(row, list) and len(row) == 4 and isinstance(row[2], str)}
    return "yolov7" if names & V7_ONLY else "yolov5"


def _positive(cfg: dict, key: str, where: str, default: float | None = None, integer: bool = False) -> Any:
    value = cfg.get(key, default)
    ok = _check_number(value, _I if integer else _F) and 0 < value <= (MAX_CHANNELS if integer else MAX_MULTIPLE)
    if not ok:
        kind = "a positive integer" if integer else f"a number in (0, {MAX_MULTIPLE:g}]"
        raise ModelConfigError(f"{where}: field '{key}': {value!r} is not {kind}; fix the value")
    return value


def _check_anchors(anchors: Any, where: str) -> None:
    if isinstance(anchors, bool) or not isinstance(anchors, (list, int)):
        raise ModelConfigError(
            f"{where}: field 'anchors': {anchors!r} must be a list of levels [w1,h1, w2,h2, ...] or an integer "
            "(anchors per level)"
        )
    if isinstance(anchors, int):
        if not 1 <= anchors <= 64:
            raise ModelConfigError(f"{where}: field 'anchors': {anchors} anchors per level must be in 1..64")
        return
    if not anchors:
        raise ModelConfigError(f"{where}: field 'anchors': empty list; give one [w,h, ...] list per level")
    for k, level in enumerate(anchors):
        if (not isinstance(level, list) or not level or len(level) % 2
                or not all(_check_number(v, _F) and v > 0 for v in level)):
            raise ModelConfigError(
                f"{where}: field 'anchors[{k}]': {level!r} must be a non-empty list of positive w,h pairs"
            )
        if len(level) != len(anchors[0]):
            raise ModelConfigError(
                f"{where}: field 'anchors[{k}]': {len(level) // 2} anchors, but level 0 has "
                f"{len(anchors[0]) // 2}; every level needs the same number"
            )


def _kernel_sizes(value: list, at: str, field: str) -> list[int]:
    """SPPCSPC's max-pool kernels: 1..MAX_POOLS odd sizes (a pool pads k // 2, so an even one changes the size)."""
    if not 1 <= len(value) <= MAX_POOLS or not all(
            _check_number(k, _I) and not isinstance(k, bool) and 1 <= k <= 31 and k % 2 for k in value):
        raise ModelConfigError(f"{at}: field '{field}': {value!r:.60} must be a list of 1..{MAX_POOLS} odd kernel "
                               "sizes in 1..31, e.g. [5, 9, 13]")
    return list(value)


def _resolve_args(name: str, raw: list, table: dict[str, Any], at: str, dialect: str = "yolov5") -> list:
    specs, required = (ARGS_V7, REQUIRED_V7) if dialect == "yolov7" else (ARGS, REQUIRED)
    specs = specs[name]
    if len(raw) > len(specs):
        raise ModelConfigError(
            f"{at}: field 'args': {len(raw)} arguments, but {name} takes at most {len(specs)} "
            f"({', '.join(s.name for s in specs)})"
        )
    if len(raw) < required.get(name, 0):
        raise ModelConfigError(
            f"{at}: field 'args': {raw!r} is missing {', '.join(s.name for s in specs[len(raw):required[name]])}"
        )
    args = []
    for k, (value, spec) in enumerate(zip(raw, specs)):
        field = f"args[{k}] ({spec.name})"
        if isinstance(value, str) and value in table:
            value = table[value]
        if isinstance(value, str) and Activation in spec.types:
            args.append(parse_activation(value, at, field))
            continue
        if isinstance(value, list) and spec.name == "kernel_sizes":
            args.append(_kernel_sizes(value, at, field))
            continue
        if isinstance(value, str) and dialect == "yolov5" and name == "Conv" and k == 5 and _ACT_RE.match(value):
            raise ModelConfigError(
                f"{at}: field '{field}': {value!r} is an activation, which YOLOv7's Conv takes here; YOLOv5's takes a "
                "dilation. For a YOLOv7 YAML write the top-level field `dialect: yolov7`"
            )
        if isinstance(value, str):
            if str not in spec.types or value not in spec.choices:
                allowed = f"one of {list(spec.choices)}" if str in spec.types else _type_names(spec.types)
                raise ModelConfigError(
                    f"{at}: field '{field}': string {value!r} is not accepted (strings are never evaluated; "
                    f"only nc, anchors and None are names); write {allowed}"
                )
        elif value is None:
            if _NONE not in spec.types:
                raise ModelConfigError(f"{at}: field '{field}': None, expected {_type_names(spec.types)}")
        elif isinstance(value, list):
            if list not in spec.types:
                raise ModelConfigError(f"{at}: field '{field}': a list, expected {_type_names(spec.types)}")
        elif not _check_number(value, spec.types):
            raise ModelConfigError(
                f"{at}: field '{field}': {value!r} ({type(value).__name__}), expected {_type_names(spec.types)}"
            )
        elif not isinstance(value, bool) and (
            (spec.low is not None and value < spec.low) or (spec.high is not None and value > spec.high)
        ):
            raise ModelConfigError(
                f"{at}: field '{field}': {value!r} is outside {spec.low:g}..{spec.high if spec.high else 'inf'}; "
                "fix the value"
            )
        args.append(value)
    return args


def _from_indices(src: Any, i: int, at: str) -> int | list[int]:
    items = src if isinstance(src, list) else [src]
    if not items or not all(_check_number(j, _I) and not isinstance(j, bool) for j in items):
        raise ModelConfigError(f"{at}: field 'from': {src!r} must be an integer or a list of integers")
    for j in items:
        if j == -1:
            continue
        if i == 0:
            raise ModelConfigError(f"{at}: field 'from': {j} but layer 0 can only read the input; use -1")
        if j == i:
            raise ModelConfigError(
                f"{at}: field 'from': {j} is this layer itself (a cycle); a layer reads only earlier layers "
                f"0..{i - 1} or -1..-{i}"
            )
        if j > i:
            raise ModelConfigError(
                f"{at}: field 'from': {j} points forward (to layer {j} or later); a layer reads only earlier "
                f"layers 0..{i - 1} or -1..-{i}"
            )
        if j < -i:
            raise ModelConfigError(
                f"{at}: field 'from': {j} is out of range (only {i} earlier layers); use 0..{i - 1} or -1..-{i}"
            )
    if i == 0 and isinstance(src, list):
        raise ModelConfigError(f"{at}: field 'from': layer 0 reads the input only; use -1")
    return src


def _load_cfg(cfg: str | Path | dict) -> tuple[dict, str]:
    if isinstance(cfg, (str, Path)):
        where = str(cfg)
        data = read_yaml(cfg, ModelConfigError)
    elif isinstance(cfg, dict):
        where, data = "<model dict>", cfg
    else:
        raise ModelConfigError(f"model config: expected a YAML path or a dict, got {type(cfg).__name__}")
    if not isinstance(data, dict):
        raise ModelConfigError(
            f"{where}: a model YAML is a mapping with nc, anchors, backbone and head; got {type(data).__name__}"
        )
    return copy.deepcopy(data), where


@dataclass
class _Plan:
    """What parsing decided for one layer, before any module is constructed."""

    module: str
    cls: type[nn.Module]
    args: list
    kwargs: dict
    number: int
    from_: int | list[int]
    out_channels: int
    at: str


def _unknown_module(name: Any, at: str, dialect: str, why: str) -> ModelConfigError:
    """`why`: what made the YAML YOLOv7's ("`dialect: yolov7` says so", "it names MP, IDetect")."""
    registry = MODULES_V7 if dialect == "yolov7" else MODULES
    hint, named = "", isinstance(name, str)  # a YAML may put anything there, a list included
    if named and dialect == "yolov5" and name in V7_ONLY:  # only reachable with an explicit `dialect: yolov5`
        hint = f"; {name} is a YOLOv7 module: write `dialect: yolov7` (or leave `dialect` out)"
    elif named and dialect == "yolov7" and name in MODULES:
        hint = (f"; {name} is YOLOv5's, and this YAML is read as YOLOv7's ({why}), whose parse_model does not build "
                "it; use the YOLOv7 modules")
    return ModelConfigError(f"{at}: field 'module': unknown module {name!r:.60}; known modules: "
                            f"{', '.join(registry)}{hint}")


def _plan_layers(d: dict, where: str, ch: int, deploy: bool) -> tuple[list[_Plan], list[int]]:
    unknown = [k for k in d if k not in TOP_KEYS]
    if unknown:
        raise ModelConfigError(
            f"{where}: unknown top-level field {unknown[0]!r}; known fields: {', '.join(TOP_KEYS)} (fix the name "
            "or remove it)"
        )
    if "nc" not in d:
        raise ModelConfigError(f"{where}: field 'nc' is missing; add the number of classes (e.g. nc: 80)")
    nc = d["nc"]
    if isinstance(nc, bool) or not isinstance(nc, int) or not 0 < nc <= MAX_NC:
        raise ModelConfigError(f"{where}: field 'nc': {nc!r} must be a positive integer up to {MAX_NC:,} (number of "
                               "classes)")
    gd = _positive(d, "depth_multiple", where, 1.0)
    gw = _positive(d, "width_multiple", where, 1.0)
    if "anchors" not in d:
        raise ModelConfigError(f"{where}: field 'anchors' is missing; add YOLOv5's anchors or an integer")
    anchors = d["anchors"]
    _check_anchors(anchors, where)
    dialect = dialect_of(d, where)
    v7_dialect = dialect == "yolov7"
    if v7_dialect and d.get("activation") is not None:
        raise ModelConfigError(f"{where}: field 'activation' is YOLOv5's; a YOLOv7 YAML names activations per row "
                               "(Conv's 6th argument, e.g. nn.LeakyReLU(0.1)), so remove the field")
    registry = MODULES_V7 if v7_dialect else MODULES
    act_layer = _activation(d.get("activation"), where)
    backbone, head = d.get("backbone"), d.get("head", [])
    if not isinstance(backbone, list) or not backbone:
        raise ModelConfigError(
            f"{where}: field 'backbone': {'missing' if backbone is None else repr(backbone)[:60]}; "
            "give a non-empty list of [from, number, module, args] rows"
        )
    if head is None:
        head = []
    if not isinstance(head, list):
        raise ModelConfigError(f"{where}: field 'head': {head!r:.60} must be a list of rows (or empty)")
    rows = [("backbone", k, row) for k, row in enumerate(backbone)] + [("head", k, row) for k, row in enumerate(head)]
    if len(rows) > MAX_ROWS:
        raise ModelConfigError(f"{where}: {len(rows)} rows is over the limit of {MAX_ROWS}; split the model")
    named = [row[2] for _, _, row in rows
             if isinstance(row, list) and len(row) == 4 and isinstance(row[2], str) and row[2] in V7_ONLY]
    why_v7 = "`dialect: yolov7` says so" if "dialect" in d else f"it names {', '.join(dict.fromkeys(named))}"

    na = len(anchors[0]) // 2 if isinstance(anchors, list) else anchors
    no = na * (nc + 5)
    table = {"nc": nc, "anchors": anchors, "None": None}
    chs = [ch]  # output channels of each layer so far (layer 0 reads `ch`)
    plans: list[_Plan] = []
    save: list[int] = []
    for i, (part, k, row) in enumerate(rows):
        at = f"{where}: {part} row {k} (layer {i})"
        if not isinstance(row, list) or len(row) != 4:
            raise ModelConfigError(f"{at}: {row!r:.80} is not a row [from, number, module, args]; fix its shape")
        src, number, name, raw_args = row
        if not isinstance(name, str) or name not in registry:
            raise _unknown_module(name, at, dialect, why_v7)
        at = f"{at}, {name}"
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ModelConfigError(f"{at}: field 'number': {number!r} must be a positive integer")
        if not isinstance(raw_args, list):
            raise ModelConfigError(f"{at}: field 'args': {raw_args!r:.60} must be a list")
        src = _from_indices(src, i, at)
        cls = registry[name]
        args = _resolve_args(name, raw_args, table, at, dialect)
        n = max(round(number * gd), 1) if number > 1 else number
        if n > MAX_NUMBER:
            raise ModelConfigError(f"{at}: field 'number': {number} x depth_multiple {gd} = {n} repeats is over "
                                   f"the limit of {MAX_NUMBER}")
        multi = cls is Concat or cls in DETECT_MODULES
        if multi and not isinstance(src, list):
            raise ModelConfigError(f"{at}: field 'from': {name} joins several layers; give a list such as [-1, 6]")
        if not multi and isinstance(src, list):
            raise ModelConfigError(f"{at}: field 'from': {name} takes one input, got the list {src}")
        kwargs: dict[str, Any] = {}
        if cls in CHANNEL_MODULES or cls in CHANNEL_MODULES_V7:
            c1, c2 = chs[src], args[0]
            if c2 != no:
                c2 = make_divisible(c2 * gw, 8)
            if c2 > MAX_CHANNELS:
                raise ModelConfigError(f"{at}: field 'args[0]': {args[0]} channels x width_multiple {gw} = {c2} is "
                                       f"over the limit of {MAX_CHANNELS}")
            if n > 1 and cls not in (C3, v7.SPPCSPC) and c1 != c2:
                raise ModelConfigError(
                    f"{at}: channel mismatch: {n} repeated {name}s all take the row's input ({c1} channels) but "
                    f"output {c2}; put the channel change in its own row with number 1, then repeat at {c2}"
                )
            args = [c1, c2, *args[1:]]
            if cls in (C3, v7.SPPCSPC):
                args.insert(2, n)
                n = 1
            if cls in ACT_MODULES and not v7_dialect:
                kwargs = {"act_layer": act_layer, "deploy": deploy}
            elif cls in DEPLOY_MODULES_V7:
                kwargs = {"deploy": deploy}
            elif cls in (RepVGGBlock, v7.RepConv) and deploy:
                specs = (ARGS_V7 if v7_dialect else ARGS)[name]
                args += [s.default for s in specs[len(args) - 1:]]
                args[1 + [s.name for s in specs].index("deploy")] = True
        elif cls is Concat:
            c2 = sum(chs[j] for j in src)
        elif cls in DETECT_MODULES:
            if not isinstance(args[1], (list, int)) or isinstance(args[1], bool):
                raise ModelConfigError(f"{at}: field 'args[1] (anchors)': {args[1]!r} must be anchors or an int")
            _check_anchors(args[1], at)
            if isinstance(args[1], int):
                args[1] = [list(range(args[1] * 2))] * len(src)
            if len(args[1]) != len(src):
                raise ModelConfigError(
                    f"{at}: field 'from': {name} reads {len(src)} layers but anchors has {len(args[1])} levels; "
                    "give one anchor list per input"
                )
            args = [*args[:2], [chs[j] for j in src], *args[2:]]
            c2 = chs[-1]
            if cls is v7.IDetect:
                kwargs = {"deploy": deploy}
        elif cls is SEBlock:
            c2 = chs[src]
            if args[0] != c2:
                raise ModelConfigError(
                    f"{at}: channel mismatch: SEBlock input_channels={args[0]} but its input has {c2} channels; "
                    f"write {c2}"
                )
        else:
            c2 = chs[src]
        if i == 0:
            chs = []
        chs.append(c2)
        save.extend(j % i for j in (src if isinstance(src, list) else [src]) if j != -1)
        plans.append(_Plan(name, cls, args, kwargs, n, src, c2, at))
    heads = "IDetect or Detect" if v7_dialect else "Detect"
    if plans[-1].cls not in DETECT_MODULES:
        raise ModelConfigError(f"{where}: the last row must be {heads} (the detection head), got {plans[-1].module}")
    for plan in plans[:-1]:
        if plan.cls in DETECT_MODULES:
            raise ModelConfigError(f"{plan.at}: {plan.module} must be the last row only")
    return plans, save


def _construct(plan: _Plan) -> nn.Module:
    try:
        if plan.number > 1:
            return nn.Sequential(*(plan.cls(*plan.args, **plan.kwargs) for _ in range(plan.number)))
        return plan.cls(*plan.args, **plan.kwargs)
    except (ValueError, TypeError, RuntimeError) as err:
        raise ModelConfigError(f"{plan.at}: cannot build with args {plan.args}: {str(err).splitlines()[0]}") from None


def _yolov5_init(model: nn.Module) -> None:
    """YOLOv5's initialize_weights: BatchNorm eps 1e-3 and momentum 0.03, activations in place."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps, m.momentum = 1e-3, 0.03
        elif type(m) in (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.SiLU):
            m.inplace = True


def _probe(layers: Sequence[nn.Module], plans: Sequence[_Plan], ch: int) -> list[int]:
    """Shape-only forward on the meta device; returns the input heights of Detect's levels."""
    x: Any = torch.zeros(1, ch, PROBE_SIZE, PROBE_SIZE, device="meta")
    outputs: list[Any] = []
    for layer, plan in zip(layers, plans):
        src = plan.from_
        if src != -1:
            x = outputs[src] if isinstance(src, int) else [x if j == -1 else outputs[j] for j in src]
        if plan.cls in DETECT_MODULES:
            return [t.shape[-2] for t in x]
        try:
            with torch.no_grad():
                x = layer(x)
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            shapes = [tuple(t.shape) for t in x] if isinstance(x, list) else tuple(x.shape)
            raise ModelConfigError(
                f"{plan.at}: shape mismatch at a {PROBE_SIZE}x{PROBE_SIZE} input (input {shapes}): "
                f"{str(err).splitlines()[0]}; check 'from' and the strides of the joined layers"
            ) from None
        if x.shape[-1] < 1 or x.shape[-2] < 1:
            raise ModelConfigError(f"{plan.at}: the feature map vanished ({tuple(x.shape)}) at a {PROBE_SIZE}px "
                                   "input; fewer stride-2 layers")
        outputs.append(x)
    raise AssertionError("unreachable: the last plan is Detect")


def _assemble(plans: Sequence[_Plan], layers: Sequence[nn.Module], save: list[int], cfg: dict) -> DetectionModel:
    info = [
        LayerInfo(i, tuple(p.from_) if isinstance(p.from_, list) else p.from_, p.number,
                  sum(t.numel() for t in layer.parameters()), p.module, tuple(p.args))
        for i, (p, layer) in enumerate(zip(plans, layers))
    ]
    return DetectionModel(layers, info, save, cfg)


def build_model(cfg: str | Path | dict, nc: int | None = None, ch: int = 3, *, deploy: bool = False,
                device: str | torch.device | None = None) -> DetectionModel:
    """Build a detector from a YOLOv5 or YOLOv7 model YAML (path or dict), as that project's `models/yolo.py`
    `parse_model` does (the dialect: `dialect_of`, the module docstring).

    `nc` overrides the YAML's class count; `ch` is the input channels (3 for RGB). `deploy=True` builds the fused
    inference form directly (RepVGG blocks and RepConvs as one 3x3 conv, Conv without BatchNorm, IDetect without
    its implicit layers): the structure
    `pruning.reparam.fuse_model` produces, e.g. to load fused weights. `device="meta"` builds a weightless model
    for shape and cost questions. Returns a DetectionModel in train mode whose forward takes images (B, ch, H, W)
    with H, W multiples of its largest stride and returns, in training, one tensor per level
    (B, na, H/s, W/s, 5 + nc), in eval mode (decoded (B, N, 5 + nc) in input pixels, that list).
    Raises ModelConfigError naming the file, row, field and value for anything that cannot be built (unknown
    module, bad `from`, widths not divisible by groups, over MAX_PARAMS parameters, ...).
    """
    d, where = _load_cfg(cfg)
    if nc is not None:
        if isinstance(nc, bool) or not isinstance(nc, int) or not 0 < nc <= MAX_NC:
            raise ModelConfigError(f"{where}: nc override {nc!r} must be a positive integer up to {MAX_NC:,} "
                                   "(number of classes)")
        d["nc"] = nc
    if isinstance(ch, bool) or not isinstance(ch, int) or not 1 <= ch <= 64:
        raise ModelConfigError(f"{where}: input channels ch={ch!r} must be an integer in 1..64")
    d["ch"] = d.get("ch", ch)
    ch = _positive(d, "ch", where, integer=True)
    plans, save = _plan_layers(d, where, ch, deploy)

    with torch.device("meta"):
        meta_layers = [_construct(p) for p in plans]
    params = sum(t.numel() for layer in meta_layers for t in layer.parameters())
    if params > MAX_PARAMS:
        raise ModelConfigError(f"{where}: the model would have {params:,} parameters, over the limit of "
                               f"{MAX_PARAMS:,}; reduce widths, depths or the multiples")
    if not deploy:  # probe shapes on the deploy form: the same shapes, without BatchNorm's slow meta kernel
        plans_deploy, _ = _plan_layers(d, where, ch, deploy=True)
        with torch.device("meta"):
            probe_layers = [_construct(p) for p in plans_deploy]
    else:
        probe_layers = meta_layers
    heights = _probe(probe_layers, plans, ch)
    strides = [PROBE_SIZE / h for h in heights]

    if device is not None and torch.device(device).type == "meta":
        layers = meta_layers
    else:
        layers = [_construct(p) for p in plans]
    model = _assemble(plans, layers, save, d)
    model.max_stride = round(max(strides))  # input sizes must be multiples of it (also on the meta device)
    detect = model.detect
    with torch.no_grad():
        detect.stride.copy_(torch.tensor(strides, dtype=torch.float32))
        if detect.anchors.device.type != "meta":
            detect.anchors /= detect.stride.view(-1, 1, 1)
            if isinstance(detect, v7.DetectV7):
                _check_anchor_order_v7(detect)
            else:
                _check_anchor_order(detect)
            detect.initialize_biases()
    _yolov5_init(model)
    if device is not None:
        model.to(device)
    return model


def _check_anchor_order(detect: Detect) -> None:
    """Anchor areas must grow with stride, as YOLOv5 requires; flip them otherwise (as YOLOv5 does)."""
    area = detect.anchors.prod(-1).mean(-1).view(-1)
    da, ds = area[-1] - area[0], detect.stride[-1] - detect.stride[0]
    if da and da.sign() != ds.sign():
        detect.anchors[:] = detect.anchors.flip(0)


def _check_anchor_order_v7(detect: v7.DetectV7) -> None:
    """YOLOv7's utils/autoanchor.py rule: compare the first and last anchor's pixel area (`anchor_grid`) with the
    strides; flip anchors and anchor_grid together when they disagree."""
    area = detect.anchor_grid.prod(-1).view(-1)
    da, ds = area[-1] - area[0], detect.stride[-1] - detect.stride[0]
    if da.sign() != ds.sign():
        detect.anchors[:] = detect.anchors.flip(0)
        detect.anchor_grid[:] = detect.anchor_grid.flip(0)
