"""The search space as data: a space YAML -> Space; an Optuna trial -> Arch; Arch -> YOLOv5/YOLOv7 model YAML.

An Arch is a RepVGG backbone of five stages (P1/2 .. P5/32), each one stride-2 block followed by depth-1
stride-1 blocks of the same width (optionally with squeeze-excitation), under a head of the space's `dialect`:
  - yolov5 (the default): the seed design's PANet head (YOLOv5's head) whose Conv/C3 widths scale by `head_width`
    and whose C3s hold `head_depth` bottlenecks; the model YAML is YOLOv5's.
  - yolov7: a YOLOv7-tiny-style ELAN head (space/spaces/yolov7.yaml): SPPCSPC on P5, top-down and bottom-up ELAN
    blocks of `head_depth` 3x3 convs (YOLOv7-tiny's have 2) whose widths scale by `head_width`, RepConv outputs and
    IDetect; the model YAML is YOLOv7's (it builds in a YOLOv7 checkout that carries the RepVGG block).
`sample_arch` is the only code that calls `trial.suggest_*`; `Arch.from_params` inverts it.

Space YAML (see spaces/default.yaml):

    imgsz: 640                 # input size for cost and budget checks
    nc: 80                     # classes assumed for cost checks
    dialect: yolov5            # the head and YAML dialect: yolov5 (default) or yolov7
    stages:                    # exactly P1..P5, in order
      P1: {depth: [1], width: [32, 48, 64], se: false}
      P2: {depth: [1, 2, 3], width: [32, 64, 96], se: [false, true]}   # se: searchable
      ...
    head: {width: [0.5, 1.0, 1.5], depth: [1, 2]}
    budgets: {max_params: null, max_gflops: null}   # deploy figures at imgsz
    extras:                    # non-architecture dimensions, sampled here too
      prune_fraction: {choices: [0.0, 0.5]}      # or {low: 0.2, high: 0.8, step: 0.1}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from space.blocks import make_divisible
from space.errors import SpaceConfigError
from space.yamlio import format_model_yaml, read_yaml

STAGE_NAMES = ("P1", "P2", "P3", "P4", "P5")
SE_MIN_WIDTH = 32  # SE squeezes to width // 16: offered only where that leaves at least 2 neurons
SEED_HEAD = (256, 256, 128, 128, 128, 256, 256, 512)  # the seed design's head Conv/C3 channels, in row order
# The YOLOv7 head's channels at width x1.0 (YOLOv7-tiny's head, whose backbone ends at 128-256-512 as the seed's
# does): SPPCSPC, P5 lateral, P4 route, ELAN (hidden, out), P4 lateral, P3 route, ELAN, down, ELAN, down, ELAN,
# and the three RepConv outputs
V7_HEAD = {"sppcspc": 256, "lateral5": 128, "route4": 128, "elan4": (64, 128), "lateral4": 64, "route3": 64,
           "elan3": (32, 64), "down3": 128, "elan4_out": (64, 128), "down4": 256, "elan5_out": (128, 256),
           "out": (128, 256, 512)}
V7_SEED_HEAD_DEPTH = 2  # YOLOv7-tiny's ELAN: two chained 3x3 convs
DIALECTS = ("yolov5", "yolov7")
ANCHORS = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]  # P3/8..P5/32
MAX_DEPTH, MAX_WIDTH, MAX_HEAD_DEPTH = 64, 4096, 16


class Trial(Protocol):
    """The part of optuna.trial.Trial (or FixedTrial) that sampling uses."""

    def suggest_categorical(self, name: str, choices: list) -> Any: ...
    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float: ...
    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int: ...


# ---------------------------------------------------------------------------------------------------------------
# Arch: what is built


@dataclass(frozen=True)
class Stage:
    """One backbone stage: `depth` RepVGG blocks of `width` output channels, the first with stride 2."""

    depth: int
    width: int
    se: bool = False

    def __post_init__(self):
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or not 1 <= self.depth <= MAX_DEPTH:
            raise SpaceConfigError(f"Stage: depth={self.depth!r} must be an integer in 1..{MAX_DEPTH}")
        if (isinstance(self.width, bool) or not isinstance(self.width, int) or not 8 <= self.width <= MAX_WIDTH
                or self.width % 8):
            raise SpaceConfigError(
                f"Stage: width={self.width!r} must be a multiple of 8 in 8..{MAX_WIDTH} (YOLOv5 rounds widths "
                "up to multiples of 8, so other values would not build as written)"
            )
        if self.se and self.width < 16:
            raise SpaceConfigError(f"Stage: SE needs width >= 16 (it squeezes to width // 16), got {self.width}")


@dataclass(frozen=True)
class Arch:
    """A candidate architecture (P1..P5 stages + head options) and any non-architecture options (`extras`)."""

    stages: tuple[Stage, ...]
    head_width: float = 1.0
    head_depth: int = 1
    extras: tuple[tuple[str, Any], ...] = field(default=())
    dialect: str = "yolov5"  # the head and YAML dialect (the space's; not an Optuna param)

    def __post_init__(self):
        if len(self.stages) != len(STAGE_NAMES) or not all(isinstance(s, Stage) for s in self.stages):
            raise SpaceConfigError(f"Arch: needs {len(STAGE_NAMES)} Stage objects (P1..P5), got {self.stages!r}")
        if not (isinstance(self.head_width, (int, float)) and 0 < self.head_width <= 8):
            raise SpaceConfigError(f"Arch: head_width={self.head_width!r} must be a number in (0, 8]")
        if (isinstance(self.head_depth, bool) or not isinstance(self.head_depth, int)
                or not 1 <= self.head_depth <= MAX_HEAD_DEPTH):
            raise SpaceConfigError(f"Arch: head_depth={self.head_depth!r} must be an integer in 1..{MAX_HEAD_DEPTH}")
        if self.dialect not in DIALECTS:
            raise SpaceConfigError(f"Arch: dialect={self.dialect!r} must be one of {', '.join(DIALECTS)}")
        object.__setattr__(self, "extras", tuple(sorted(dict(self.extras).items())))

    def extra(self, name: str, default: Any = None) -> Any:
        return dict(self.extras).get(name, default)

    @property
    def head_channels(self) -> tuple[int, ...]:
        """The YOLOv5 head's Conv/C3 channels (SEED_HEAD x head_width, rounded up to multiples of 8)."""
        return tuple(make_divisible(c * self.head_width, 8) for c in SEED_HEAD)

    def _width(self, channels: int) -> int:
        return make_divisible(channels * self.head_width, 8)

    def to_params(self) -> dict[str, Any]:
        """Optuna params that `from_params` turns back into this Arch (e.g. for `study.enqueue_trial`); the dialect
        is the space's, not a param."""
        params: dict[str, Any] = {}
        for name, stage in zip(STAGE_NAMES, self.stages):
            params |= {f"{name}_depth": stage.depth, f"{name}_width": stage.width, f"{name}_se": stage.se}
        params |= {"head_width": self.head_width, "head_depth": self.head_depth}
        return params | dict(self.extras)

    @classmethod
    def from_params(cls, params: dict[str, Any], space: Space, where: str | None = None) -> Arch:
        """The Arch a trial's params describe (the inverse of `sample_arch`); checks every value is in the space.

        `where` names the params' origin in error messages (e.g. "baseline b.yaml"); the space's file is named too.
        """
        origin = f"{where} (space {space.source})" if where else space.source
        return _choose(space, _ParamsChooser(params, origin))

    @classmethod
    def from_model_yaml(cls, cfg: dict, space: Space, where: str, *, what: str = "the model") -> Arch:
        """The Arch whose `to_yaml` writes the model YAML `cfg` (a dict, as yaml.safe_load returns it): the inverse
        of `to_yaml` for a model of the seed's RepVGG-YOLO layout under the space's head (YOLOv5's, or YOLOv7's for
        a `dialect: yolov7` space). `where` names the YAML in error messages, `what` names it in the fix ("give the
        baseline as Arch params instead").

        Raises SpaceConfigError when `cfg` is not of that layout or not of the space's dialect, when a value lies
        outside `space`, or when the nearest Arch of the space would write a different model (then give the Arch
        params instead).
        """
        from space.builder import dialect_of
        from space.errors import ModelConfigError

        try:
            found = dialect_of(cfg, where) if isinstance(cfg, dict) else space.dialect
        except ModelConfigError as err:
            raise SpaceConfigError(str(err)) from None
        if found != space.dialect:
            raise SpaceConfigError(f"{where}: a {found} model YAML, but the space {space.source} writes "
                                   f"{space.dialect} models; give {what} as a model of this space, or search a space "
                                   f"with `dialect: {found}`")
        try:
            rows, params = cfg["backbone"], {}
            k = 0
            for name in STAGE_NAMES:
                args = rows[k][3]
                depth, se = 1, len(args) > 8 and bool(args[8])
                if k + 1 < len(rows) and rows[k + 1][3][2] == 1:
                    depth += rows[k + 1][1]
                    k += 1
                params |= {f"{name}_depth": depth, f"{name}_width": args[0], f"{name}_se": se}
                k += 1
            head = cfg["head"]
            if space.dialect == "yolov7":  # SPPCSPC first; the first ELAN joins its 3x3 convs and two 1x1 convs
                seed_first = V7_HEAD["sppcspc"]
                depth = next(len(row[0]) - 2 for row in head if row[2] == "Concat" and len(row[0]) > 2)
            else:
                seed_first, depth = SEED_HEAD[0], head[3][1]
            first = head[0][3][0]
            widths = [w for w in space.head_width if make_divisible(seed_first * w, 8) == first]
            params |= {"head_width": widths[0] if widths else first / seed_first, "head_depth": depth}
            arch = cls.from_params(params, space)
        except (KeyError, IndexError, TypeError, StopIteration) as err:
            raise SpaceConfigError(f"{where}: not a model YAML of the RepVGG-YOLO layout ({err!r})") from None
        written = arch.to_yaml(cfg.get("nc", 80))
        if [written["backbone"], written["head"]] != [cfg["backbone"], cfg["head"]]:
            raise SpaceConfigError(f"{where}: the nearest Arch of the space ({arch.to_params()}) writes a different "
                                   f"model; give {what} as Arch params instead")
        return arch

    def _rows(self, nc: int | str) -> tuple[list, list, dict[int, str]]:
        backbone: list[list] = []
        comments: dict[int, str] = {}
        outputs: dict[str, int] = {}
        for k, (name, stage) in enumerate(zip(STAGE_NAMES, self.stages)):
            tail = [1, 1, 1, "zeros", False, True] if stage.se else []
            comments[len(backbone)] = f"{name}/{2 ** (k + 1)}"
            backbone.append([-1, 1, "RepVGGBlock", [stage.width, 3, 2, *tail]])
            if stage.depth > 1:
                backbone.append([-1, stage.depth - 1, "RepVGGBlock", [stage.width, 3, 1, *tail]])
            outputs[name] = len(backbone) - 1
        make_head = self._yolov7_head if self.dialect == "yolov7" else self._yolov5_head
        head, head_comments = make_head(outputs, len(backbone), nc)
        return backbone, head, comments | head_comments

    def _yolov5_head(self, outputs: dict[str, int], b: int, nc: int | str) -> tuple[list, dict[int, str]]:
        h, d = self.head_channels, self.head_depth
        up = [-1, 1, "nn.Upsample", ["None", 2, "nearest"]]
        head = [
            [-1, 1, "Conv", [h[0], 1, 1]],                      # b+0: lateral from P5
            up,
            [[-1, outputs["P4"]], 1, "Concat", [1]],
            [-1, d, "C3", [h[1], False]],
            [-1, 1, "Conv", [h[2], 1, 1]],                      # b+4: lateral from P4
            list(up),
            [[-1, outputs["P3"]], 1, "Concat", [1]],
            [-1, d, "C3", [h[3], False]],                       # b+7: P3/8 out
            [-1, 1, "Conv", [h[4], 3, 2]],
            [[-1, b + 4], 1, "Concat", [1]],
            [-1, d, "C3", [h[5], False]],                       # b+10: P4/16 out
            [-1, 1, "Conv", [h[6], 3, 2]],
            [[-1, b], 1, "Concat", [1]],
            [-1, d, "C3", [h[7], False]],                       # b+13: P5/32 out
            [[b + 7, b + 10, b + 13], 1, "Detect", [nc, "anchors"]],
        ]
        return head, {b + 7: "P3/8-small", b + 10: "P4/16-medium", b + 13: "P5/32-large"}

    def _yolov7_head(self, outputs: dict[str, int], b: int, nc: int | str) -> tuple[list, dict[int, str]]:
        """YOLOv7-tiny's head (cfg/training/yolov7-tiny.yaml rows 29-77) with YOLOv7's SPPCSPC in place of its
        hand-written SPP, `head_depth` 3x3 convs per ELAN block (YOLOv7-tiny: 2) and RepConv outputs (yolov7.yaml's);
        activations are YOLOv7's default (SiLU, as in the RepVGG blocks). Rows are YOLOv7's dialect."""
        head: list[list] = []
        w, d = self._width, self.head_depth

        def add(row: list) -> int:
            head.append(row)
            return b + len(head) - 1

        def elan(hidden: int, out: int) -> int:
            add([-1, 1, "Conv", [w(hidden), 1, 1]])
            add([-2, 1, "Conv", [w(hidden), 1, 1]])
            for _ in range(d):
                add([-1, 1, "Conv", [w(hidden), 3, 1]])
            add([list(range(-1, -d - 3, -1)), 1, "Concat", [1]])  # every branch: the 3x3 chain and both 1x1s
            return add([-1, 1, "Conv", [w(out), 1, 1]])

        def up() -> None:
            add([-1, 1, "nn.Upsample", ["None", 2, "nearest"]])

        c = V7_HEAD
        spp = add([-1, 1, "SPPCSPC", [w(c["sppcspc"])]])               # P5 context
        add([-1, 1, "Conv", [w(c["lateral5"]), 1, 1]])
        up()
        add([outputs["P4"], 1, "Conv", [w(c["route4"]), 1, 1]])       # route backbone P4
        add([[-1, -2], 1, "Concat", [1]])
        p4_top = elan(*c["elan4"])
        add([-1, 1, "Conv", [w(c["lateral4"]), 1, 1]])
        up()
        add([outputs["P3"], 1, "Conv", [w(c["route3"]), 1, 1]])       # route backbone P3
        add([[-1, -2], 1, "Concat", [1]])
        p3 = elan(*c["elan3"])                                          # P3/8
        add([-1, 1, "Conv", [w(c["down3"]), 3, 2]])
        add([[-1, p4_top], 1, "Concat", [1]])
        p4 = elan(*c["elan4_out"])                                      # P4/16
        add([-1, 1, "Conv", [w(c["down4"]), 3, 2]])
        add([[-1, spp], 1, "Concat", [1]])
        p5 = elan(*c["elan5_out"])                                      # P5/32
        outs = [add([src, 1, "RepConv", [w(ch), 3, 1]]) for src, ch in zip((p3, p4, p5), c["out"])]
        add([outs, 1, "IDetect", [nc, "anchors"]])
        return head, dict(zip(outs, ("P3/8-small", "P4/16-medium", "P5/32-large")))

    def to_yaml(self, nc: int = 80) -> dict:
        """The model YAML (as a dict, as yaml.safe_load would return it) for `nc` classes: YOLOv5's, or YOLOv7's for
        a YOLOv7-dialect Arch (its IDetect/SPPCSPC/RepConv rows say so; no `dialect` key is written)."""
        backbone, head, _ = self._rows("nc")
        return {"nc": nc, "depth_multiple": 1.0, "width_multiple": 1.0, "anchors": [list(a) for a in ANCHORS],
                "backbone": backbone, "head": head}

    def to_yaml_text(self, nc: int = 80) -> str:
        """`to_yaml` as YOLOv5/YOLOv7-style text: flow rows with `# index-P3/8` comments and the Arch in the
        header."""
        _, _, comments = self._rows("nc")
        depth = "ELAN depth" if self.dialect == "yolov7" else "C3 depth"
        header = "repnas architecture: " + ", ".join(
            f"{n} d{s.depth} w{s.width}{' se' if s.se else ''}" for n, s in zip(STAGE_NAMES, self.stages)
        ) + f"; head width x{self.head_width:g}, {depth} {self.head_depth}"
        if self.dialect == "yolov7":
            header += "\nYOLOv7's dialect (models/yolo.py): RepVGG backbone, YOLOv7-tiny-style ELAN head, IDetect"
        if self.extras:
            header += "\noptions: " + ", ".join(f"{k}={v}" for k, v in self.extras)
        return format_model_yaml(self.to_yaml(nc), header=header, comments=comments)


# ---------------------------------------------------------------------------------------------------------------
# Space: what can be sampled


@dataclass(frozen=True)
class StageSpace:
    name: str
    depth: tuple[int, ...]
    width: tuple[int, ...]
    se: tuple[bool, ...]


@dataclass(frozen=True)
class ExtraDim:
    """A non-architecture dimension: categorical `choices`, or a float/int range (`low`, `high`, `step`, `log`)."""

    name: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    default: Any = None

    @property
    def is_int(self) -> bool:
        return self.choices is None and all(isinstance(v, int) for v in (self.low, self.high, self.step or 1))

    def contains(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices and any(type(value) is type(c) for c in self.choices if c == value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.low <= value <= self.high:
            return False
        if self.step:
            k = (value - self.low) / self.step
            return math.isclose(k, round(k), abs_tol=1e-9)
        return True


@dataclass(frozen=True)
class Space:
    """A loaded search space; `source` names its file in error messages."""

    stages: tuple[StageSpace, ...]
    head_width: tuple[float, ...]
    head_depth: tuple[int, ...]
    imgsz: int = 640
    nc: int = 80
    max_params: int | None = None
    max_gflops: float | None = None
    extras: tuple[ExtraDim, ...] = ()
    source: str = "<space>"
    dialect: str = "yolov5"  # the head its Archs carry and the model YAML they write: yolov5 or yolov7

    def budget_violation(self, params: int, gflops: float) -> str | None:
        """Why deploy `params`/`gflops` break this space's budgets, or None when within them."""
        if self.max_params is not None and params > self.max_params:
            return f"params {params:,} > max_params {self.max_params:,}"
        if self.max_gflops is not None and gflops > self.max_gflops:
            return f"GFLOPs {gflops:.2f} > max_gflops {self.max_gflops:g} at {self.imgsz}px"
        return None


DEFAULT_SPACE = "default"


def default_space_path() -> Path:
    return builtin_space_path(DEFAULT_SPACE)


def builtin_space_path(name: str) -> Path:
    """The YAML of a built-in space by name (space/spaces/NAME.yaml: "default", "small")."""
    return Path(str(resources.files("space.spaces").joinpath(f"{name}.yaml")))


def builtin_spaces() -> list[str]:
    """The names of the built-in spaces."""
    return sorted(p.name[:-5] for p in resources.files("space.spaces").iterdir() if p.name.endswith(".yaml"))


def _fail(where: str, field_: str, value: Any, rule: str) -> SpaceConfigError:
    return SpaceConfigError(f"{where}: field '{field_}': {value!r:.80} {rule}")


def _int_list(where: str, field_: str, value: Any, low: int, high: int) -> tuple[int, ...]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise _fail(where, field_, value, "is empty; give at least one choice")
    for v in items:
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            raise _fail(where, field_, v, f"must be an integer in {low}..{high} (a value or a list of choices)")
    if len(set(items)) != len(items):
        raise _fail(where, field_, value, "repeats a choice; list each once")
    return tuple(items)


def _extra(where: str, name: str, spec: Any) -> ExtraDim:
    at = f"extras.{name}"
    if name in _RESERVED:
        raise _fail(where, at, name, f"collides with an architecture parameter; rename it (reserved: {_RESERVED})")
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        raise _fail(where, at, spec, "must be a list of choices or {choices: [...]} or {low, high[, step, log]}")
    unknown = set(spec) - {"choices", "low", "high", "step", "log", "default"}
    if unknown:
        raise _fail(where, at, sorted(unknown), "are unknown keys; use choices, low, high, step, log, default")
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices or not all(
            c is None or isinstance(c, (bool, int, float, str)) for c in choices
        ):
            raise _fail(where, f"{at}.choices", choices, "must be a non-empty list of numbers, strings or booleans")
        dim = ExtraDim(name, choices=tuple(choices), default=spec.get("default", choices[0]))
    else:
        low, high, step, log = spec.get("low"), spec.get("high"), spec.get("step"), spec.get("log", False)
        for key, v in (("low", low), ("high", high)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise _fail(where, f"{at}.{key}", v, "must be a finite number")
        if low > high:
            raise SpaceConfigError(f"{where}: field '{at}': `low <= high` must hold, but got ({low=}, {high=})")
        if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0):
            raise _fail(where, f"{at}.step", step, "must be a positive number")
        if not isinstance(log, bool) or (log and (low <= 0 or step is not None)):
            raise _fail(where, f"{at}.log", log, "must be true/false; log needs low > 0 and no step")
        dim = ExtraDim(name, low=low, high=high, step=step, log=log, default=spec.get("default", low))
    if not dim.contains(dim.default):
        raise _fail(where, f"{at}.default", dim.default, "is not one of the dimension's values")
    return dim


_RESERVED = (*(f"{n}_{k}" for n in STAGE_NAMES for k in ("depth", "width", "se")), "head_width", "head_depth")
_SPACE_KEYS = ("imgsz", "nc", "stages", "head", "budgets", "extras", "dialect")


def parse_space(data: Any, where: str = "<space dict>") -> Space:
    """Validate a space mapping (as loaded from YAML) into a Space."""
    if not isinstance(data, dict):
        raise SpaceConfigError(f"{where}: a space YAML is a mapping with stages and head; got {type(data).__name__}")
    unknown = [k for k in data if k not in _SPACE_KEYS]
    if unknown:
        raise _fail(where, unknown[0], unknown[0], f"is not a space field; known: {', '.join(_SPACE_KEYS)}")
    imgsz = data.get("imgsz", 640)
    if isinstance(imgsz, bool) or not isinstance(imgsz, int) or not 32 <= imgsz <= 8192 or imgsz % 32:
        raise _fail(where, "imgsz", imgsz, "must be a multiple of 32 in 32..8192")
    nc = data.get("nc", 80)
    if isinstance(nc, bool) or not isinstance(nc, int) or nc < 1:
        raise _fail(where, "nc", nc, "must be a positive integer (classes assumed for cost checks)")
    dialect = data.get("dialect", "yolov5")
    if dialect not in DIALECTS:
        raise _fail(where, "dialect", dialect, f"must be one of {', '.join(DIALECTS)} (the head: YOLOv5's PANet with "
                                               "C3s, or a YOLOv7-tiny-style ELAN head with IDetect)")
    stages = data.get("stages")
    if not isinstance(stages, dict) or list(stages) != list(STAGE_NAMES):
        raise _fail(where, "stages", list(stages) if isinstance(stages, dict) else stages,
                    f"must map exactly {', '.join(STAGE_NAMES)}, in that order, to {{depth, width, se}}")
    stage_spaces = []
    for name, spec in stages.items():
        at = f"stages.{name}"
        if not isinstance(spec, dict) or set(spec) - {"depth", "width", "se"} or not {"depth", "width"} <= set(spec):
            raise _fail(where, at, spec, "must be a mapping with depth, width and optional se")
        depth = _int_list(where, f"{at}.depth", spec["depth"], 1, MAX_DEPTH)
        width = _int_list(where, f"{at}.width", spec["width"], 8, MAX_WIDTH)
        for w in width:
            if w % 8:
                raise _fail(where, f"{at}.width", w, f"is not a multiple of 8 (YOLOv5 would build "
                                                     f"{make_divisible(w, 8)}); use multiples of 8")
        se_raw = spec.get("se", False)
        se_items = se_raw if isinstance(se_raw, list) else [se_raw]
        if not se_items or not all(isinstance(v, bool) for v in se_items) or len(set(se_items)) != len(se_items):
            raise _fail(where, f"{at}.se", se_raw, "must be true, false or [false, true] (searchable)")
        if se_items == [True] and min(width) < SE_MIN_WIDTH:
            raise _fail(where, f"{at}.se", True, f"needs every width >= {SE_MIN_WIDTH} (SE squeezes to width/16), "
                                                 f"but width offers {min(width)}; make se searchable or drop it")
        stage_spaces.append(StageSpace(name, depth, width, tuple(se_items)))
    head = data.get("head", {"width": [1.0], "depth": [1]})
    if not isinstance(head, dict) or set(head) - {"width", "depth"}:
        raise _fail(where, "head", head, "must be a mapping with width (factors) and depth (C3 bottlenecks, or 3x3 "
                                         "convs per ELAN block with dialect: yolov7)")
    hw_raw = head.get("width", [1.0])
    hw_items = hw_raw if isinstance(hw_raw, list) else [hw_raw]
    if not hw_items or not all(
        not isinstance(v, bool) and isinstance(v, (int, float)) and 0 < v <= 8 for v in hw_items
    ) or len(set(hw_items)) != len(hw_items):
        raise _fail(where, "head.width", hw_raw, "must be distinct numbers in (0, 8] (factors on the seed head)")
    head_depth = _int_list(where, "head.depth", head.get("depth", [1]), 1, MAX_HEAD_DEPTH)
    budgets = data.get("budgets") or {}
    if not isinstance(budgets, dict) or set(budgets) - {"max_params", "max_gflops"}:
        raise _fail(where, "budgets", budgets, "must be a mapping with max_params and/or max_gflops")
    for key in ("max_params", "max_gflops"):
        v = budgets.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
            raise _fail(where, f"budgets.{key}", v, "must be a positive number or null")
    extras = data.get("extras") or {}
    if not isinstance(extras, dict):
        raise _fail(where, "extras", extras, "must be a mapping of name -> choices or range")
    return Space(
        stages=tuple(stage_spaces), head_width=tuple(float(v) for v in hw_items), head_depth=head_depth,
        imgsz=imgsz, nc=nc,
        max_params=None if budgets.get("max_params") is None else int(budgets["max_params"]),
        max_gflops=None if budgets.get("max_gflops") is None else float(budgets["max_gflops"]),
        extras=tuple(_extra(where, str(k), v) for k, v in extras.items()), source=where, dialect=dialect,
    )


def smallest_arch(space: Space) -> Arch:
    """The cheapest Arch of `space`: every stage at its least depth and width without SE, the narrowest and
    shallowest head (cost grows with each of these, so no Arch of the space is cheaper)."""
    stages = tuple(Stage(min(st.depth), min(st.width), se=False not in st.se) for st in space.stages)
    return Arch(stages, min(space.head_width), min(space.head_depth),
                tuple((dim.name, dim.default) for dim in space.extras), space.dialect)


def _check_budgets_reachable(space: Space) -> None:
    """A budget below the cheapest Arch would reject every sample: say so at load time, not after a study starts."""
    params, gflops = arch_cost(smallest_arch(space), space.imgsz, space.nc)
    if space.max_params is not None and params > space.max_params:
        raise _fail(space.source, "budgets.max_params", space.max_params,
                    f"is below the smallest Arch of the space ({params:,} deploy params at nc={space.nc}); raise it "
                    "or add smaller depths/widths")
    if space.max_gflops is not None and gflops > space.max_gflops:
        raise _fail(space.source, "budgets.max_gflops", space.max_gflops,
                    f"is below the smallest Arch of the space ({gflops:.3g} deploy GFLOPs at {space.imgsz}px); raise "
                    "it or add smaller depths/widths")


def load_space(path: str | Path | None = None) -> Space:
    """Load a space YAML; None or "default" loads the built-in default space, and a bare name of a built-in space
    that is not a file here (e.g. "small") loads that one.

    Budgets are checked against the space's cheapest Arch here, so a space no Arch of which fits fails at load
    time rather than after a study has started (`parse_space` alone does not build models)."""
    if path is None or str(path) == DEFAULT_SPACE:
        path = default_space_path()
    elif str(path) in builtin_spaces() and not Path(path).is_file():
        path = builtin_space_path(str(path))
    space = parse_space(read_yaml(path, SpaceConfigError), str(path))
    if space.max_params is not None or space.max_gflops is not None:
        _check_budgets_reachable(space)
    return space


# ---------------------------------------------------------------------------------------------------------------
# Sampling and its inverse share one walk over the space, so they cannot drift apart.


class _Chooser(Protocol):
    def categorical(self, name: str, choices: tuple) -> Any: ...
    def extra(self, dim: ExtraDim) -> Any: ...


class _TrialChooser:
    def __init__(self, trial: Trial):
        self.trial = trial

    def categorical(self, name: str, choices: tuple) -> Any:
        return choices[0] if len(choices) == 1 else self.trial.suggest_categorical(name, list(choices))

    def extra(self, dim: ExtraDim) -> Any:
        if dim.choices is not None:
            return self.categorical(dim.name, dim.choices)
        if dim.is_int:
            return self.trial.suggest_int(dim.name, dim.low, dim.high, step=dim.step or 1, log=dim.log)
        return self.trial.suggest_float(dim.name, dim.low, dim.high, step=dim.step, log=dim.log)


class _ParamsChooser:
    def __init__(self, params: dict[str, Any], where: str):
        self.params, self.where, self.used = dict(params), where, set()

    def _get(self, name: str) -> Any:
        if name not in self.params:
            raise SpaceConfigError(f"{self.where}: params lack {name!r}; they come from another space or study")
        self.used.add(name)
        return self.params[name]

    def categorical(self, name: str, choices: tuple) -> Any:
        if len(choices) == 1 and name not in self.params:
            return choices[0]
        value = self._get(name)
        if not any(value == c and type(value) is type(c) for c in choices):
            raise SpaceConfigError(
                f"{self.where}: param {name}={value!r} is not in the space's choices {list(choices)}"
            )
        return value

    def extra(self, dim: ExtraDim) -> Any:
        if dim.choices is not None:
            return self.categorical(dim.name, dim.choices)
        value = self._get(dim.name)
        if not dim.contains(value):
            raise SpaceConfigError(f"{self.where}: param {dim.name}={value!r} is outside {dim.low}..{dim.high}")
        return value


def _choose(space: Space, chooser: _Chooser) -> Arch:
    stages = []
    for st in space.stages:
        depth = chooser.categorical(f"{st.name}_depth", st.depth)
        width = chooser.categorical(f"{st.name}_width", st.width)
        se = chooser.categorical(f"{st.name}_se", st.se) if width >= SE_MIN_WIDTH else False
        stages.append(Stage(depth, width, se))
    head_width = chooser.categorical("head_width", space.head_width)
    head_depth = chooser.categorical("head_depth", space.head_depth)
    extras = tuple((dim.name, chooser.extra(dim)) for dim in space.extras)
    if isinstance(chooser, _ParamsChooser):
        unused = set(chooser.params) - chooser.used
        # a fixed (single-choice) dimension may be present or absent; anything else is foreign
        fixed = {f"{s.name}_{k}" for s in space.stages for k in ("depth", "width", "se")} | {"head_width",
                                                                                           "head_depth"}
        foreign = sorted(unused - fixed)
        if foreign:
            raise SpaceConfigError(f"{chooser.where}: params {foreign} are not dimensions of this space")
    return Arch(tuple(stages), float(head_width), head_depth, extras, space.dialect)


def sample_arch(trial: Trial, space: Space) -> Arch:
    """Sample an Arch with `trial.suggest_*` (the only place that does). Single-choice dimensions are not
    suggested; SE is suggested only for stage widths >= 32."""
    return _choose(space, _TrialChooser(trial))


def seed_arch(space: Space | None = None) -> Arch:
    """The hand design of ../shared/reference/seed_model.yaml (stage depths 1-2-4-14-1, widths 64-64-128-256-512,
    no SE, the seed head); extras take their defaults. Raises if `space` does not contain it.

    For a `dialect: yolov7` space, its equivalent there: the same backbone under the YOLOv7 head at its reference
    setting, YOLOv7-tiny's (width x1.0, two 3x3 convs per ELAN block; that head reads the same 128-256-512 P3-P5
    widths as the seed's)."""
    dialect = space.dialect if space is not None else "yolov5"
    arch = Arch(
        stages=(Stage(1, 64), Stage(2, 64), Stage(4, 128), Stage(14, 256), Stage(1, 512)),
        head_width=1.0, head_depth=V7_SEED_HEAD_DEPTH if dialect == "yolov7" else 1,
        extras=tuple((dim.name, dim.default) for dim in (space.extras if space else ())), dialect=dialect,
    )
    if space is not None:
        try:
            Arch.from_params(arch.to_params(), space)
        except SpaceConfigError as err:
            raise SpaceConfigError(f"the seed design is not a point of this space: {err}; add its values to the "
                                   "space or give the study another baseline") from None
    return arch


SEED_SOURCE = "seed"  # the model source that names the seed design (a file of that name is read instead)


def is_seed_source(source: str | Path | None) -> bool:
    """Whether a model source names the seed design: the word `seed`, with no file or folder of that name here."""
    return source is not None and str(source) == SEED_SOURCE and not Path(source).exists()


def model_yaml_source(source: str | Path, nc: int = 80) -> str | Path | dict:
    """`source` as `build_model` takes it: `seed` (see `is_seed_source`) becomes the seed design's YOLOv5 model YAML
    as a dict (`seed_arch().to_yaml(nc)`: the network of ../shared/reference/seed_model.yaml, which a clone of the
    project lacks); any other source, a model YAML's path, is returned as given."""
    return seed_arch().to_yaml(nc) if is_seed_source(source) else source


def arch_cost(arch: Arch, imgsz: int, nc: int = 80, *, deploy: bool = True) -> tuple[int, float]:
    """(params, GFLOPs) of `arch` at `imgsz` without training or allocating weights.

    Deploy (fused) figures by default: they are what budgets, tables and pruning targets use. `deploy=False`
    gives the as-built (train-time) figures YOLOv5 prints.
    """
    from space.builder import build_model
    from space.cost import count_gflops, count_params

    model = build_model(arch.to_yaml(nc), deploy=deploy, device="meta")
    return count_params(model), count_gflops(model, imgsz)
