#!/usr/bin/env python3
"""repnas <-> YOLOv5 checkpoints. Run it with the Python of your YOLOv5 environment, from your checkout's root.

A YOLOv5 `.pt` is a pickled `Model`: it can only be written and read where YOLOv5's code is importable, and repnas
itself never unpickles. So this standalone script (written out by `repnas yolov5-bridge > bridge.py`; it needs
torch, PyYAML and YOLOv5, never repnas) does the pickling on YOLOv5's side, and repnas reads and writes plain files:

    repnas yolov5-bridge SOURCE --out BUNDLE                   # repnas side: model.yaml + state_dicts + bridge.json
    python bridge.py to-yolov5 BUNDLE --out repnas.pt          # train-time Model: train.py --weights, val, detect
    python bridge.py to-yolov5 BUNDLE --deploy --out fused.pt  # YOLOv5's fused form: val.py, detect.py, export.py
    python bridge.py from-yolov5 runs/train/exp/weights/best.pt --out DIR   # DIR/model.yaml + weights.pt for repnas

YOLOv5's code must carry the design document's RepVGG block: the class in models/common.py and `RepVGGBlock` in
the module set of `parse_model` in models/yolo.py. Both import roots work: a checkout's `models.yolo` (found from
the current folder, or --yolov5 DIR) and the PyPI package's `yolov5.models.yolo`; a checkpoint names the classes of
the root it was written with, so write it with the root that will read it.

Tensors stay float32 both ways. to-yolov5 checks the YOLOv5 model against the output repnas recorded in the bundle
(check.pt) and from-yolov5 rebuilds what it wrote in YOLOv5 and checks it against the checkpoint, both to 1e-4
relative; a failed check writes nothing.

torch >= 2.6: YOLOv5 7.0's loaders (val.py, detect.py, export.py, train.py --weights) call torch.load with its
default, which is weights-only from torch 2.6, so they refuse every pickled checkpoint, YOLOv5's own and this
script's output alike. Use them with torch < 2.6, or with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 for files you trust.
This script reads a YOLOv5 checkpoint weights-only itself (torch >= 2.5): torch's restricted unpickler, which builds
only the classes allowed here (YOLOv5's model modules of the import root in use, torch.nn's modules, numpy scalars)
and reads no attribute but a fused Conv's forward_fuse, so a file holding other code is refused, not run.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib
import inspect
import json
import logging
import math
import os
import pickle
import sys
from pathlib import Path

import torch
import yaml
from torch import nn

BUNDLE_FORMAT = "repnas-yolov5-bundle/1"  # bridge.json of `repnas yolov5-bridge SOURCE --out BUNDLE`
IMPORT_FORMAT = "repnas-yolov5-import/1"  # yolov5.json written by from-yolov5
REPNAS_MODULES = ("Conv", "Bottleneck", "C3", "SPPF", "Concat", "SEBlock", "RepVGGBlock", "Detect", "nn.Upsample")
REPVGG_DEFAULTS = (None, 3, 1, 1, 1, 1, "zeros", False, False)  # out_channels, kernel_size, stride, padding,
DEPLOY = 7  # index of `deploy` in a RepVGGBlock row's args     # dilation, groups, padding_mode, deploy, use_se
TOLERANCE = 1e-4  # relative output difference a conversion may show (fusion in float32 is ~1e-6)
CHECK_IMGSZ = 64  # from-yolov5's rebuild check input (two max strides)


class BridgeError(Exception):
    """A conversion that cannot be done as asked: printed as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------------------------
# YOLOv5's code


def find_yolov5(root: str = "auto", checkout: str | None = None):
    """(models.yolo module, models.common module, import root) of the YOLOv5 code importable here.

    root "models" is a checkout's (its root on sys.path: `checkout`, else the current folder), "yolov5" the PyPI
    package's; "auto" tries the checkout first. Raises BridgeError when none is found or it lacks RepVGGBlock.
    """
    if checkout:
        sys.path.insert(0, str(Path(checkout).resolve()))
    elif root != "yolov5" and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    prefixes = {"auto": ("models", "yolov5.models"), "models": ("models",), "yolov5": ("yolov5.models",)}[root]
    problems = []
    for prefix in prefixes:
        try:
            yolo = importlib.import_module(f"{prefix}.yolo")
            common = importlib.import_module(f"{prefix}.common")
        except Exception as err:  # ImportError, or an unrelated `models` package failing in its own way
            problems.append(f"{prefix}.yolo: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            continue
        if not (hasattr(yolo, "DetectionModel") and hasattr(yolo, "parse_model") and hasattr(common, "Conv")):
            problems.append(f"{prefix}.yolo ({getattr(yolo, '__file__', '?')}) is not YOLOv5's")
            continue
        if not hasattr(common, "RepVGGBlock") or "RepVGGBlock" not in inspect.getsource(yolo.parse_model):
            raise BridgeError(f"{Path(yolo.__file__).parent}: YOLOv5 without the RepVGG block; add the design "
                              "document's RepVGGBlock class to models/common.py and RepVGGBlock to the module set of "
                              "parse_model in models/yolo.py")
        return yolo, common, prefix
    raise BridgeError("no YOLOv5 code importable here (" + "; ".join(problems) + "); run this with the Python of your "
                      "YOLOv5 environment from the root of your checkout (or give --yolov5 DIR), or pip install "
                      "yolov5==7.0.14")


def deploy_cfg(cfg: dict) -> dict:
    """The model YAML with every RepVGGBlock row built in its deploy form (the block's `deploy=True`)."""
    cfg = copy.deepcopy(cfg)
    for row in cfg.get("backbone", []) + cfg.get("head", []):
        if row[2] == "RepVGGBlock":
            args = list(row[3]) + list(REPVGG_DEFAULTS[len(row[3]):DEPLOY + 1])
            args[DEPLOY] = True
            row[3] = args
    return cfg


def train_cfg(cfg: dict) -> dict:
    """The inverse of deploy_cfg: RepVGGBlock rows with `deploy` False and trailing defaults dropped (to [c2, k, s])."""
    cfg = copy.deepcopy(cfg)
    for row in cfg.get("backbone", []) + cfg.get("head", []):
        if row[2] == "RepVGGBlock" and len(row[3]) > DEPLOY and row[3][DEPLOY] is True:
            args = list(row[3])
            args[DEPLOY] = False
            while len(args) > 3 and args[-1] == REPVGG_DEFAULTS[len(args) - 1]:
                args.pop()
            row[3] = args
    return cfg


def build(yolo, cfg: dict, nc: int, deploy: bool) -> nn.Module:
    """YOLOv5's DetectionModel of `cfg`; `deploy`: RepVGG rows deploy=True and Convs fused by YOLOv5's fuse()."""
    model = yolo.DetectionModel(copy.deepcopy(deploy_cfg(cfg) if deploy else cfg), ch=3, nc=nc)
    return model.fuse() if deploy else model


def load_exact(model: nn.Module, state: dict, what: str) -> None:
    """load_state_dict, strict, with a one-line account of any misfit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{len(v)} {label} (first {v[0]})" for v, label in
                 ((missing, "missing"), (unexpected, "unexpected"), (shapes, "of another shape")) if v]
        raise BridgeError(f"{what} do not fit the YOLOv5 model built here: {'; '.join(parts)}; is its RepVGGBlock the "
                          "design document's?")
    model.load_state_dict(state)


@torch.no_grad()
def relative_difference(model: nn.Module, images: torch.Tensor, expected: torch.Tensor) -> float:
    """||model(images) - expected|| / ||expected|| with model's eval-mode decoded output (B, N, 5 + nc)."""
    detect = model.model[-1]
    grids = list(detect.grid), list(detect.anchor_grid)  # Detect caches its grids in these lists
    out = model.eval()(images)[0].double()
    detect.grid, detect.anchor_grid = grids  # leave no cached grid behind in the saved model
    if out.shape != expected.shape:
        return math.inf
    return float((out - expected.double()).norm() / expected.double().norm().clamp_min(1e-30))


def weights_only_note() -> str | None:
    """The line to print when this torch's torch.load refuses pickled checkpoints by default (torch >= 2.6)."""
    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if (major, minor) < (2, 6):
        return None
    return (f"note: torch {torch.__version__} >= 2.6: YOLOv5's val.py, detect.py, export.py and train.py load .pt "
            "files with torch.load's default weights_only=True and refuse them; run them with "
            "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 (trusted files only) or use torch < 2.6")


# ---------------------------------------------------------------------------------------------------------------
# repnas -> YOLOv5


def read_bundle(folder: str | Path) -> dict:
    """bridge.json, model.yaml and the weights-only state_dicts of a bundle folder."""
    folder = Path(folder)
    path = folder / "bridge.json"
    if not path.is_file():
        raise BridgeError(f"{folder}: no bridge.json; write a bundle with `repnas yolov5-bridge SOURCE --out {folder}`")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != BUNDLE_FORMAT:
        raise BridgeError(f"{path}: format {meta.get('format')!r} is not {BUNDLE_FORMAT!r}; write the bundle and this "
                          "script with the same repnas version")
    bundle = {"meta": meta, "cfg": yaml.safe_load((folder / "model.yaml").read_text(encoding="utf-8"))}
    for form, name in meta["forms"].items():  # weights-only: a bundle holds tensors, never pickled objects
        bundle[form] = None if name is None else torch.load(folder / name, map_location="cpu", weights_only=True)
    bundle["check"] = torch.load(folder / meta["check"]["file"], map_location="cpu", weights_only=True)
    return bundle


def to_yolov5(bundle_dir: str | Path, out: str | Path, *, deploy: bool, yolo, root: str) -> str:
    """Write BUNDLE as a YOLOv5 checkpoint at `out`: the train-time Model, or with `deploy` YOLOv5's fused form.
    Returns the summary line."""
    bundle = read_bundle(bundle_dir)
    meta = bundle["meta"]
    nc, names = int(meta["nc"]), list(meta["names"])
    if not deploy and bundle["train"] is None:
        raise BridgeError(f"{bundle_dir}: holds only the deploy form ({meta['source']}: a pruned model, or weights "
                          "saved fused), which YOLOv5's train.py cannot train; add --deploy for val.py, detect.py and "
                          "export.py")
    form = "deploy" if deploy else "train"
    model = build(yolo, bundle["cfg"], nc, deploy)
    load_exact(model, bundle[form], f"{bundle_dir}'s {form} weights")
    model.float()
    model.names = dict(enumerate(names))  # as YOLOv5's train.py sets them (val.py and detect.py read these)
    model.nc = nc
    check = bundle["check"]
    diff = relative_difference(model, check["images"], check["output"])
    if not diff < TOLERANCE:
        raise BridgeError(f"{bundle_dir}: the YOLOv5 model's output differs from repnas's by {diff:.2e} relative "
                          f"(tolerance {TOLERANCE:g}); nothing written: is YOLOv5's RepVGGBlock the design document's?")
    ckpt = {"epoch": -1, "best_fitness": None, "model": model, "ema": None, "updates": None, "optimizer": None,
            "date": datetime.datetime.now().isoformat(),
            "repnas": {"source": meta["source"], "form": form, "import_root": root}}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, out)
    what = "deploy (RepVGG deploy=True, Convs fused)" if deploy else "train-time"
    return (f"wrote {out}: {what} YOLOv5 Model ({root}.yolo), nc={nc}, from {meta['source']}; output matches "
            f"repnas's to {diff:.1e} relative")


# ---------------------------------------------------------------------------------------------------------------
# YOLOv5 -> repnas


def _number(value: float):
    value = round(float(value), 3)
    return int(value) if value.is_integer() else value


def _names(model: nn.Module, nc: int) -> list[str]:
    names = getattr(model, "names", None)
    if isinstance(names, dict):
        return [str(names.get(i, i)) for i in range(nc)]
    if isinstance(names, (list, tuple)) and len(names) == nc:
        return [str(n) for n in names]
    return [str(i) for i in range(nc)]


def _form(model: nn.Module, common, path: str) -> bool:
    """Whether `model` is in the fused form (after YOLOv5's fuse() on Convs whose RepVGG rows are deploy=True);
    a model whose RepVGG blocks are deploy but whose Convs still hold BatchNorms is fused here (YOLOv5's fuse())."""
    blocks = [m for m in model.modules() if isinstance(m, common.RepVGGBlock)]
    deploy_blocks = [hasattr(m, "rbr_reparam") for m in blocks]
    convs = [m for m in model.modules() if type(m).__name__ in ("Conv", "DWConv") and hasattr(m, "conv")]
    fused_convs = [not hasattr(m, "bn") for m in convs]
    if any(deploy_blocks) and not all(deploy_blocks):
        raise BridgeError(f"{path}: some RepVGG blocks are in deploy form and some are not; convert the checkpoint "
                          "train.py wrote")
    if blocks and not any(deploy_blocks) and any(fused_convs):
        raise BridgeError(f"{path}: fused Convs beside multi-branch RepVGG blocks (a model after YOLOv5's fuse()); "
                          "convert the checkpoint train.py wrote, whose Convs keep their BatchNorms")
    if (all(deploy_blocks) and blocks) or any(fused_convs):
        if not all(fused_convs):
            model.fuse()  # YOLOv5's own folding of the Convs left with BatchNorms
        return True
    return False


def format_model_yaml(cfg: dict, header: list[str]) -> str:
    """YOLOv5-style text: top keys, one anchor level a line, rows in flow style with `# index` comments."""

    def flow(value) -> str:
        text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20, sort_keys=False).strip()
        return text[:-3].strip() if text.endswith("...") else text

    lines = [f"# {line}" for line in header]
    lines += [f"{k}: {flow(v)}" for k, v in cfg.items() if k not in ("anchors", "backbone", "head")]
    anchors = cfg.get("anchors")
    lines += ["anchors:", *(f"  - {flow(level)}" for level in anchors)] if isinstance(anchors, list) else \
        [f"anchors: {flow(anchors)}"]
    index = 0
    for part in ("backbone", "head"):
        lines.append(f"{part}:")
        rows = cfg.get(part) or []
        for k, row in enumerate(rows):
            lines.append(f"{'  [' if k == 0 else '   '}{flow(row)},  # {index}")
            index += 1
        lines.append("  ]" if rows else "  []")
    text = "\n".join(lines) + "\n"
    assert yaml.safe_load(text) == cfg, "model YAML formatting lost a value"
    return text


# The one bound method a YOLOv5 checkpoint holds: fuse() sets a fused Conv's `forward = forward_fuse`
# (models/yolo.py BaseModel.fuse), which pickles as builtins.getattr(module, "forward_fuse").
_BOUND_METHODS = ("forward_fuse",)


def _bound_method_getter(classes: tuple[type, ...]):
    """The stand-in for builtins.getattr a checkpoint may call: a method of `_BOUND_METHODS` that the class of an
    instance of `classes` defines, bound to that instance; anything else raises pickle.UnpicklingError. Real getattr
    would hand the file any attribute of anything it holds (a method's __func__ and its __globals__, a class's
    __init__), to be stored in the model and called by whoever uses it next. Named builtins.getattr, the global
    the unpickler looks up."""

    def getattr_checked(obj, name, *default):
        if name not in _BOUND_METHODS or not isinstance(obj, classes) or default \
                or not callable(inspect.getattr_static(type(obj), name, None)):
            raise pickle.UnpicklingError(f"Unsupported global: GLOBAL builtins.getattr called as getattr("
                                         f"{type(obj).__name__}, {name!r}); only a fused Conv's forward_fuse is read")
        return getattr(obj, name)

    getattr_checked.__module__, getattr_checked.__qualname__ = "builtins", "getattr"
    return getattr_checked


def _checkpoint_classes(yolo, common) -> list:
    """What a YOLOv5 checkpoint may build: the classes the import root's models/yolo.py and models/common.py define,
    torch.nn's modules, the numpy scalar types YOLOv5 stores (best_fitness), and a getattr that reads only a fused
    Conv's bound `forward_fuse` (`_bound_method_getter`)."""
    import numpy as np

    yolov5 = [obj for module in (yolo, common) for _, obj in inspect.getmembers(module, inspect.isclass)
              if obj.__module__ == module.__name__]
    torch_nn = [obj for _, obj in inspect.getmembers(nn.modules, inspect.isclass) if issubclass(obj, nn.Module)]
    multiarray = getattr(getattr(np, "_core", None), "multiarray", None) or np.core.multiarray
    getter = _bound_method_getter(tuple(obj for obj in yolov5 if issubclass(obj, nn.Module)))
    return [*yolov5, *torch_nn, set, getter, np.dtype, multiarray.scalar,
            *{type(np.dtype(t)) for t in ("float64", "float32", "int64")}]


def _load_checkpoint(path: str, yolo, common):
    """A YOLOv5 checkpoint read by torch's weights-only unpickler with `_checkpoint_classes` allowed: a pickled
    Model is built from those classes alone and nothing else in the file is called. Raises BridgeError for a torch
    without `torch.serialization.safe_globals` (< 2.5) or a file holding any other object."""
    allow = getattr(torch.serialization, "safe_globals", None)
    if allow is None:
        raise BridgeError(f"{path}: reading a pickled YOLOv5 checkpoint without running its code needs torch >= 2.5 "
                          f"(torch.serialization.safe_globals); this environment has torch {torch.__version__}")
    try:
        with allow(_checkpoint_classes(yolo, common)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = [line.strip() for line in str(err).splitlines() if "Unsupported global" in line or "GLOBAL" in line]
        why = " ".join((found[0] if found else str(err).splitlines()[-1]).split())[:200]
        raise BridgeError(f"{path}: holds an object outside YOLOv5's model classes, torch.nn and numpy scalars, so it "
                          f"is refused unread ({why})") from None


def from_yolov5(ckpt_path: str | Path, out: str | Path, *, use: str | None, yolo, common, root: str) -> str:
    """Write a YOLOv5 checkpoint's `ema` (when present, as YOLOv5's attempt_load does) or `model` as
    OUT/model.yaml (anchors as trained, in pixels; nc) + OUT/weights.pt (a weights-only float32 state_dict) +
    OUT/yolov5.json (class names, where it came from). Returns the summary line."""
    path = str(ckpt_path)
    if not Path(path).is_file():
        raise BridgeError(f"{path}: no such file")
    ckpt = _load_checkpoint(path, yolo, common)
    if isinstance(ckpt, dict):
        key = use or ("ema" if ckpt.get("ema") is not None else "model")
        model = ckpt.get(key)
        if model is None:
            raise BridgeError(f"{path}: holds no {key!r} model (keys: {', '.join(map(str, ckpt))})")
    elif isinstance(ckpt, nn.Module) and use is None:
        key, model = "module", ckpt
    else:
        raise BridgeError(f"{path}: not a YOLOv5 checkpoint (a dict with 'model'/'ema'), got {type(ckpt).__name__}")
    model = model.float().cpu().eval()
    detect = model.model[-1]
    if type(detect).__name__ != "Detect" or not isinstance(getattr(model, "yaml", None), dict):
        raise BridgeError(f"{path}: its {key} is not a YOLOv5 detection Model built from a YAML (last layer "
                          f"{type(detect).__name__}); repnas reads detection models")
    cfg = copy.deepcopy(model.yaml)
    for i, row in enumerate(cfg.get("backbone", []) + cfg.get("head", [])):
        if row[2] not in REPNAS_MODULES:
            raise BridgeError(f"{path}: layer {i} is {row[2]}, which repnas does not build (it builds "
                              f"{', '.join(REPNAS_MODULES)}); convert a model of those modules")
    fused = _form(model, common, path)
    nc = int(detect.nc)
    anchors = (detect.anchors * detect.stride.view(-1, 1, 1)).tolist()  # grid units x stride: pixels, as trained
    cfg["nc"] = nc
    cfg["anchors"] = [[_number(v) for pair in level for v in pair] for level in anchors]
    for row in cfg.get("head", []):
        if row[2] == "Detect" and isinstance(row[3][1], list):
            row[3][1] = "anchors"  # literal anchors in the row: the trained ones live in the top-level key now
    cfg = train_cfg(cfg)
    state = {k: (v.float() if v.is_floating_point() else v).detach().clone().contiguous()
             for k, v in model.state_dict().items()}
    check = torch.rand(1, 3, CHECK_IMGSZ, CHECK_IMGSZ, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(check)[0]
    rebuilt = build(yolo, cfg, nc, fused)
    load_exact(rebuilt, state, f"{path}'s {key} weights")
    diff = relative_difference(rebuilt, check, expected)
    if not diff < TOLERANCE:
        raise BridgeError(f"{path}: model.yaml + weights rebuilt in YOLOv5 differ from the checkpoint by {diff:.2e} "
                          f"relative (tolerance {TOLERANCE:g}); nothing written")
    names = _names(model, nc)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header = [f"converted by repnas's YOLOv5 bridge from {path} (its {key}; {'fused' if fused else 'train-time'} "
              "weights in weights.pt)", "anchors: as trained (Detect's buffer x stride, in pixels); class names: "
              "yolov5.json"]
    (out / "model.yaml").write_text(format_model_yaml(cfg, header), encoding="utf-8")
    torch.save(state, out / "weights.pt")
    opt = ckpt.get("opt") if isinstance(ckpt, dict) and isinstance(ckpt.get("opt"), dict) else {}
    meta = {"format": IMPORT_FORMAT, "source": path, "model": key, "form": "deploy" if fused else "train", "nc": nc,
            "names": names, "anchors": cfg["anchors"], "epoch": ckpt.get("epoch") if isinstance(ckpt, dict) else None,
            "imgsz": opt.get("imgsz"), "data": opt.get("data"), "import_root": root, "torch": torch.__version__}
    (out / "yolov5.json").write_text(json.dumps(meta, indent=1, default=str) + "\n", encoding="utf-8")
    return (f"wrote {out}/model.yaml, weights.pt ({'fused' if fused else 'train-time'}, float32) and yolov5.json from "
            f"{path} ({key}, nc={nc}); rebuilt in YOLOv5 it matches to {diff:.1e} relative. repnas: "
            f"`repnas val {out} --data DATA.yaml`; as --baseline only the architecture counts")


# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bridge.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--yolov5", metavar="DIR", help="your YOLOv5 checkout's root (default: the current folder)")
    p.add_argument("--root", choices=("auto", "models", "yolov5"), default="auto",
                   help="import root: a checkout's `models` or the PyPI package's `yolov5` (default: the checkout's "
                        "when importable)")
    p.add_argument("--verbose", action="store_true", help="show YOLOv5's model tables")
    sub = p.add_subparsers(dest="command", required=True)
    to = sub.add_parser("to-yolov5", help="repnas bundle -> YOLOv5 checkpoint")
    to.add_argument("bundle", metavar="BUNDLE", help="folder written by `repnas yolov5-bridge SOURCE --out BUNDLE`")
    to.add_argument("--out", required=True, metavar="OUT.pt")
    to.add_argument("--deploy", action="store_true",
                    help="YOLOv5's fused form (RepVGG deploy=True, Convs fused) for val/detect/export, not train.py")
    back = sub.add_parser("from-yolov5", help="YOLOv5 checkpoint -> model.yaml + weights.pt for repnas")
    back.add_argument("checkpoint", metavar="CKPT.pt")
    back.add_argument("--out", required=True, metavar="DIR")
    back.add_argument("--use", choices=("ema", "model"), help="which model of the checkpoint (default: ema when "
                                                              "present, as YOLOv5's attempt_load)")
    args = p.parse_args(argv)
    try:
        yolo, common, root = find_yolov5(args.root, args.yolov5)
        if not args.verbose:
            logging.getLogger("yolov5").setLevel(logging.WARNING)
        if args.command == "to-yolov5":
            print(to_yolov5(args.bundle, args.out, deploy=args.deploy, yolo=yolo, root=root))
            note = weights_only_note()
            if note:
                print(note)
        else:
            print(from_yolov5(args.checkpoint, args.out, use=args.use, yolo=yolo, common=common, root=root))
    except BridgeError as err:
        print(f"bridge.py {args.command}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
