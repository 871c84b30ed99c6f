"""YOLOv5 checkpoints both ways: the repnas side of the bridge.

A YOLOv5 `.pt` is a pickled `Model`, and repnas never unpickles. So the pickling happens in the user's YOLOv5
environment, by the standalone script nas/yolov5_bridge.py (`bridge_script()`, printed by `repnas yolov5-bridge`),
and repnas only writes and reads plain files:

    export_bundle(SOURCE, BUNDLE)         BUNDLE/model.yaml   the YOLOv5 model YAML (train-time rows)
                                          BUNDLE/weights.pt   train-time state_dict, when the source has one
                                          BUNDLE/fused.pt     deploy (fused) state_dict
                                          BUNDLE/check.pt     an input and repnas's output on it (the bridge's check)
                                          BUNDLE/bridge.json  nc, class names, forms, where it came from
                                          BUNDLE/bridge.py    the bridge script of this repnas version
    python bridge.py to-yolov5 BUNDLE [--deploy] --out X.pt      (YOLOv5's env) -> a YOLOv5 checkpoint
    python bridge.py from-yolov5 X.pt --out DIR                  (YOLOv5's env) -> DIR/model.yaml + weights.pt
    repnas val DIR (prune, latency, export-model)                 a folder source, read weights-only

Pruned models. YOLOv5 builds every layer from its row's arguments, so a pruning plan converts only when each
layer's channels are what some row can ask for (rows rewritten with explicit widths, both multiples 1.0):
  1. every Conv, RepVGGBlock, C3, Bottleneck and SPPF row outputs a multiple of 8 channels (parse_model rounds
     `args[0] x width_multiple` up to one; `repnas prune --round-to 8` keeps this);
  2. the blocks of one repeated row keep one width, equal to the row's input (YOLOv5 repeats the row's arguments);
  3. a C3's cv1, cv2 and each bottleneck's two convs keep one hidden width, `int(c2 * e)` (C3 has one expansion `e`,
     its bottlenecks `e=1.0`); a Bottleneck's hidden width is `int(c2 * e)`, an SPPF's half its input;
  4. a RepVGG block with SE keeps `out // 16` squeeze neurons (the design document's block derives them from its
     width; repnas's pruning never prunes them).
Otherwise `express_pruned` raises PlanNotExpressible naming the first layer that breaks a rule; such a model deploys
through ONNX (`repnas export-model SOURCE --onnx OUT.onnx`).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from nas.source import SourceError, load_source, load_weights, read_state, recorded_data
from space.errors import RepnasError

BRIDGE_FILE = "yolov5_bridge.py"
BUNDLE_FORMAT = "repnas-yolov5-bundle/1"  # the bridge script's BUNDLE_FORMAT: the two must agree
CHECK_IMGSZ = 128  # side of the check input written to check.pt (a multiple of any max stride up to 128)
CONSISTENCY = 1e-5  # relative difference allowed between fuse(train-time weights) and the source's deploy weights
CHANNEL_MULTIPLE = 8  # YOLOv5's make_divisible(c2 * width_multiple, 8)
WIDTH_MODULES = ("Conv", "RepVGGBlock", "C3", "Bottleneck", "SPPF")


class BridgeError(RepnasError):
    """A model that cannot be exported for the YOLOv5 bridge as given."""


class PlanNotExpressible(BridgeError):
    """A pruning plan that YOLOv5's module arguments cannot build (see the module docstring's rule)."""


def bridge_script() -> str:
    """The standalone converter's text (nas/yolov5_bridge.py): run in the user's YOLOv5 environment; it imports
    torch, PyYAML and YOLOv5, never repnas."""
    return resources.files("nas").joinpath(BRIDGE_FILE).read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------
# Pruned models as YOLOv5 rows


def _expansion(out: int, hidden: int) -> float:
    """A float `e` with int(out * e) == hidden (YOLOv5's `c_ = int(c2 * e)`), exact through a YAML round trip."""
    e = hidden / out
    while int(out * e) < hidden:
        e = math.nextafter(e, math.inf)
    return e


def _refuse(where: str, index: int, name: str, reason: str, source: str) -> PlanNotExpressible:
    return PlanNotExpressible(
        f"{where}: layer {index} ({name}): {reason}, which YOLOv5's module arguments cannot express; deploy it through "
        f"ONNX instead: `repnas export-model {source} --onnx OUT.onnx`")


def _row_args(name: str, layer: nn.Module, raw: list, channels_in: int) -> tuple[int, list | None, str | None]:
    """(the row's repeat count, its args rewritten for `layer`'s actual channels, or None and the reason)."""
    if isinstance(layer, nn.Sequential) and name != "RepVGGBlock":  # a repeated row: every copy takes its args
        parts = [_row_args(name, copy, raw, channels_in) for copy in layer]
        reason = next((r for _, _, r in parts if r), None)
        if reason is None and any(args != parts[0][1] for _, args, _ in parts):
            reason = f"its {len(layer)} repeated {name}s have different widths"
        return len(layer), None if reason else parts[0][1], reason
    if name == "RepVGGBlock":
        blocks = list(layer) if isinstance(layer, nn.Sequential) else [layer]
        outs = [b.rbr_reparam.out_channels for b in blocks]
        if len(set(outs)) > 1:
            return len(blocks), None, f"its {len(blocks)} repeated blocks have widths {outs}, not one"
        if len(blocks) > 1 and channels_in != outs[0]:
            return len(blocks), None, f"its repeated blocks read {channels_in} channels but write {outs[0]}"
        se = blocks[0].se
        if hasattr(se, "down") and se.down.out_channels != outs[0] // 16:
            return len(blocks), None, (f"SE keeps {se.down.out_channels} squeeze neurons, but the block derives "
                                       f"{outs[0]} // 16 = {outs[0] // 16} from its width")
        return len(blocks), [outs[0], *raw[1:]], None
    if name == "Conv":
        return 1, [layer.conv.out_channels, *raw[1:]], None
    if name in ("C3", "Bottleneck"):
        out = (layer.cv3 if name == "C3" else layer.cv2).conv.out_channels
        hidden = layer.cv1.conv.out_channels
        inner = [layer.cv2.conv.out_channels] if name == "C3" else []
        for b in (layer.m if name == "C3" else []):
            inner += [b.cv1.conv.out_channels, b.cv2.conv.out_channels]
        if any(c != hidden for c in inner):
            return 1, None, f"hidden widths {[hidden, *inner]} differ (one expansion e gives one hidden width)"
        flags = [raw[1] if len(raw) > 1 else True, raw[2] if len(raw) > 2 else 1]  # shortcut, groups
        if name == "Bottleneck" and layer.add != (bool(flags[0]) and channels_in == out):
            return 1, None, (f"its residual add is {layer.add}, but YOLOv5 adds only when shortcut and the channels "
                             f"match ({channels_in} -> {out})")
        return (len(layer.m) if name == "C3" else 1), [out, *flags, _expansion(out, hidden)], None
    if name == "SPPF":
        if layer.cv1.conv.out_channels != channels_in // 2:
            return 1, None, (f"its hidden width {layer.cv1.conv.out_channels} is not half its {channels_in} input "
                             "channels")
        return 1, [layer.cv2.conv.out_channels, *raw[1:]], None
    if name == "SEBlock":
        return 1, [layer.down.in_channels, layer.down.out_channels], None
    return 1, list(raw), None


def express_pruned(model: nn.Module, where: str, source: str) -> dict:
    """The YOLOv5 model YAML (rows with explicit widths, multiples 1.0) that builds `model` (a pruned deploy
    DetectionModel) in YOLOv5 with the same layers and parameter names; train-time rows (YOLOv5's deploy form comes
    from the bridge).

    `where` names the model in messages, `source` is the SOURCE a refusal's ONNX command names. Raises
    PlanNotExpressible for the first layer the rule in this module's docstring refuses."""
    from space.builder import build_model

    cfg = model.yaml
    rows = [*cfg["backbone"], *cfg.get("head", [])]
    widths: list[int] = []
    out_rows = []
    for i, (row, layer) in enumerate(zip(rows, model.model)):
        src, _, name, raw = row
        first = src if isinstance(src, int) else src[0]
        channels_in = 3 if i == 0 else widths[first]
        number, args, reason = _row_args(name, layer, list(raw), channels_in)
        if reason is None and name in WIDTH_MODULES and args[0] % CHANNEL_MULTIPLE:
            reason = f"{args[0]} output channels are not a multiple of {CHANNEL_MULTIPLE}"
        if reason is not None:
            raise _refuse(where, i, name, reason, source)
        out_rows.append([src, number, name, args])
        if name == "Concat":
            widths.append(sum(widths[j] for j in src))
        elif name in WIDTH_MODULES or name == "SEBlock":
            widths.append(args[0])
        else:
            widths.append(widths[first] if i else 3)
    n_backbone = len(cfg["backbone"])
    expressed = {k: v for k, v in cfg.items() if k not in ("backbone", "head")}
    expressed |= {"depth_multiple": 1.0, "width_multiple": 1.0, "backbone": out_rows[:n_backbone],
                  "head": out_rows[n_backbone:]}
    rebuilt = build_model(expressed, deploy=True)
    state = model.state_dict()
    own = rebuilt.state_dict()
    misfit = next((k for k in own if k not in state or own[k].shape != state[k].shape), None)
    if misfit is not None:  # the rows above should have caught it: name the tensor rather than guess the layer
        raise _refuse(where, int(misfit.split(".")[1]), rows[int(misfit.split(".")[1])][2],
                      f"tensor {misfit} does not come out as pruned", source)
    return expressed


# ---------------------------------------------------------------------------------------------------------------
# The bundle


@dataclass
class Bundle:
    """What `export_bundle` wrote: the folder, the files of each form (None: not available) and the model's facts."""

    folder: Path
    description: str
    nc: int
    names: list[str]
    forms: dict[str, str | None]
    pruned: bool
    notes: list[str] = field(default_factory=list)


def _class_names(data: str | None, recorded: str | None, nc: int, where: str) -> tuple[list[str], str | None]:
    """Class names from --data, else from the data the source was trained on; ("0".."nc-1", why) otherwise."""
    from nas.data import load_data_config

    path, what = (data, f"--data {data}") if data else (None, "")
    if path is None:
        try:
            path = recorded_data(recorded, where)
            what = f"the data it was trained on, {path},"
        except SourceError:
            return [str(i) for i in range(nc)], f"class names 0..{nc - 1}: the recorded data {recorded} is not here " \
                                                "(--data DATA.yaml gives the names)"
    if path is None:
        return [str(i) for i in range(nc)], f"class names 0..{nc - 1}: no data recorded (--data DATA.yaml gives them)"
    cfg = load_data_config(path)
    if cfg.nc != nc:
        raise BridgeError(f"{where}: the weights have nc={nc}, {what} has {cfg.nc} classes; give --data DATA.yaml of "
                          f"the {nc}-class dataset they were trained on")
    return list(cfg.names), None


def _train_state(candidate: Path | None, cfg: dict, deploy: nn.Module, nc: int) -> dict | None:
    """The train-time state_dict in `candidate` when it is one and fuses to `deploy`'s weights; None when the file
    is absent or holds fused weights. Raises BridgeError when it fuses to other weights."""
    from pruning.reparam import fuse_model

    if candidate is None or not candidate.is_file():
        return None
    state = read_state(candidate, str(candidate))
    if not any(".bn." in k or k.endswith("rbr_dense.conv.weight") for k in state):
        return None  # fused weights: the deploy form only
    model = load_weights(cfg, state, nc=nc, source=str(candidate))
    fused = fuse_model(model).state_dict()
    worst = 0.0
    for k, v in deploy.state_dict().items():
        if v.is_floating_point():
            scale = v.double().abs().max().clamp_min(1e-12)
            worst = max(worst, float((fused[k].double() - v.double()).abs().max() / scale))
    if not worst < CONSISTENCY:
        raise BridgeError(f"{candidate}: fused, these train-time weights differ from the source's deploy weights by "
                          f"{worst:.1e} relative; the folder's weights.pt and fused.pt belong to different runs")
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def export_bundle(source: str, out: str | Path, *, weights: str | None = None, data: str | None = None,
                  results: str = "results", storage: str | None = None) -> Bundle:
    """Write the bundle that `bridge.py to-yolov5` turns into YOLOv5 checkpoints, for any source `repnas val` takes.

    `source`/`weights`/`results`/`storage` as nas.source.load_source (STUDY:TRIAL, a trial, `repnas train` or
    pruned-model folder, MODEL.yaml with --weights); `data` a data.yaml for the class names (default: the data the
    source was trained on). The train-time form is written when the source keeps it (a trial's or `repnas train`'s
    weights.pt, a train-time --weights); a pruned model is rewritten as explicit YOLOv5 rows (`express_pruned`).
    Returns a Bundle. Raises SourceError for a source that does not load, PlanNotExpressible for a pruning plan
    YOLOv5 cannot build, BridgeError for weights that disagree or class names of another dataset."""
    from nas.files import state_dict_bytes, write_bytes_atomic, write_text_atomic
    from pruning.portable import PLAN_FILE
    from space.yamlio import format_model_yaml

    loaded = load_source(source, weights, results=results, storage=storage)
    deploy = loaded.model
    if getattr(deploy, "dialect", "yolov5") != "yolov5":
        raise BridgeError(f"{source}: a model of YOLOv7's dialect, which YOLOv5's parse_model reads otherwise; the "
                          "bridge converts YOLOv5-dialect models (export this one with `repnas export-model`)")
    pruned = loaded.folder is not None and (loaded.folder / PLAN_FILE).is_file()
    if pruned:
        cfg = express_pruned(deploy, loaded.description, source)
        train_state = None
    else:
        cfg = dict(deploy.yaml)
        candidate = Path(weights) if weights else (loaded.folder / "weights.pt" if loaded.folder else None)
        train_state = _train_state(candidate, cfg, deploy, loaded.nc)
    cfg.pop("ch", None)  # YOLOv5 adds it back (3)
    names, note = _class_names(data, loaded.data, loaded.nc, source)
    x = torch.rand(1, 3, CHECK_IMGSZ, CHECK_IMGSZ, generator=torch.Generator().manual_seed(0))  # (1, 3, S, S) in 0..1
    with torch.no_grad():
        expected = deploy.eval()(x)[0]  # (1, N, 5 + nc): decoded, in input pixels
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    forms = {"train": "weights.pt" if train_state is not None else None, "deploy": "fused.pt"}
    header = f"repnas model for YOLOv5: {loaded.description}" + (" (pruned: explicit widths)" if pruned else "")
    write_text_atomic(folder / "model.yaml", format_model_yaml(cfg, header=header))
    if train_state is not None:
        buffer = io.BytesIO()
        torch.save(train_state, buffer)
        write_bytes_atomic(folder / "weights.pt", buffer.getvalue())
    else:
        (folder / "weights.pt").unlink(missing_ok=True)
    write_bytes_atomic(folder / "fused.pt", state_dict_bytes(deploy))
    buffer = io.BytesIO()
    torch.save({"images": x, "output": expected}, buffer)
    write_bytes_atomic(folder / "check.pt", buffer.getvalue())
    meta = {"format": BUNDLE_FORMAT, "source": loaded.description, "nc": loaded.nc, "names": names, "forms": forms,
            "pruned": pruned, "train_imgsz": loaded.train_imgsz, "check": {"file": "check.pt", "imgsz": CHECK_IMGSZ}}
    write_text_atomic(folder / "bridge.json", json.dumps(meta, indent=1) + "\n")
    write_text_atomic(folder / "bridge.py", bridge_script())
    return Bundle(folder, loaded.description, loaded.nc, names, forms, pruned, [note] if note else [])
