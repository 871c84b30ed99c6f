"""Pruned models on disk without pickle: a JSON channel plan beside a plain state_dict.

    FOLDER/channels.json   {"format": "repnas-pruned/1", "nc": 80, "model": {model YAML as a dict},
                            "convs": {"model.0.rbr_reparam": {"in": 3, "out": 40}, ...}, "info": {...}}
    FOLDER/weights.pt      torch.save(state_dict), loaded with torch.load(weights_only=True)

`load_pruned` builds the YAML's deploy form, resizes each conv the plan names, and loads the weights: the same
network, bit for bit. A weights file that holds anything but tensors is refused before any of it runs.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pruning.atomic import write_bytes_atomic
from pruning.channel import PruneError, channel_plan, sync_channel_attributes
from space.cost import is_deploy
from space.errors import RepnasError

FORMAT = "repnas-pruned/1"
PLAN_FILE = "channels.json"
WEIGHTS_FILE = "weights.pt"
MAX_PLAN_BYTES = 16 * 1024 * 1024


class PrunedFileError(PruneError):
    """A pruned-model folder whose channel plan or weights cannot be used as given."""


def save_pruned(model: nn.Module, folder: str | Path, plan: dict[str, dict[str, int]] | None = None, *,
                info: dict[str, Any] | None = None) -> Path:
    """Write `model` (a fused, possibly pruned DetectionModel) as FOLDER/channels.json + FOLDER/weights.pt.

    `plan` defaults to `channel_plan(model)`; a given plan (e.g. `PruneResult.plan`) must match the model.
    `info`: JSON-serialisable extras kept in the plan file (e.g. target and achieved GFLOPs). Returns FOLDER.
    """
    import io

    if not is_deploy(model):
        raise PruneError("save_pruned writes the plain network: fold inserted BatchNorms first "
                         "(pruning.finetune.fold_batchnorms) or fuse a train-time model (pruning.reparam.fuse_model)")
    if not isinstance(getattr(model, "yaml", None), dict):
        raise PruneError(f"save_pruned needs a DetectionModel built from a YAML (model.yaml), "
                         f"got {type(model).__name__}")
    actual = channel_plan(model)
    if plan is not None and plan != actual:
        diff = next(n for n in sorted(set(plan) | set(actual)) if plan.get(n) != actual.get(n))
        raise PruneError(f"plan does not match the model at {diff!r} (plan {plan.get(diff)}, model "
                         f"{actual.get(diff)}); pass the plan of this model or none")
    document = {"format": FORMAT, "nc": int(model.yaml["nc"]), "model": model.yaml, "convs": actual,
                "info": info or {}}
    try:
        text = json.dumps(document, indent=1, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise PruneError(f"save_pruned: info or the model YAML is not JSON-serialisable ({err})") from None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
    write_bytes_atomic(folder / WEIGHTS_FILE, buffer.getvalue())
    write_bytes_atomic(folder / PLAN_FILE, (text + "\n").encode("utf-8"))
    return folder


def _channel_count(value: Any, where: str, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PrunedFileError(f"{where}: field '{field}': {value!r} must be a positive integer (channels)")
    return value


def read_plan(folder: str | Path) -> dict[str, Any]:
    """The validated channels.json of a pruned-model folder (format, nc, model, convs, info)."""
    path = Path(folder) / PLAN_FILE
    if not path.is_file():
        raise PrunedFileError(f"{path}: no such file; a pruned-model folder holds {PLAN_FILE} and {WEIGHTS_FILE} "
                              "(written by pruning.portable.save_pruned)")
    if path.stat().st_size > MAX_PLAN_BYTES:
        raise PrunedFileError(f"{path}: {path.stat().st_size} bytes is over the {MAX_PLAN_BYTES} byte limit for a "
                              "channel plan")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PrunedFileError(f"{path}: not valid JSON ({err}); rewrite it with save_pruned") from None
    if not isinstance(document, dict):
        raise PrunedFileError(f"{path}: expected a JSON object with format, nc, model and convs, "
                              f"got {type(document).__name__}")
    if document.get("format") != FORMAT:
        raise PrunedFileError(f"{path}: field 'format': {document.get('format')!r} is not {FORMAT!r}; this reader "
                              "knows only that format")
    model = document.get("model")
    if not isinstance(model, dict):
        raise PrunedFileError(f"{path}: field 'model': expected the model YAML as an object, got {model!r:.60}")
    nc = document.get("nc")
    if isinstance(nc, bool) or not isinstance(nc, int) or nc < 1 or model.get("nc") != nc:
        raise PrunedFileError(f"{path}: field 'nc': {nc!r} must be a positive integer equal to model.nc "
                              f"({model.get('nc')!r})")
    convs = document.get("convs")
    if not isinstance(convs, dict) or not convs:
        raise PrunedFileError(f"{path}: field 'convs': expected an object of conv name -> {{\"in\": .., \"out\": ..}}")
    for name, counts in convs.items():
        where = f"{path}: convs[{name!r}]"
        if not isinstance(counts, dict) or set(counts) != {"in", "out"}:
            raise PrunedFileError(f"{where}: expected {{\"in\": channels, \"out\": channels}}, got {counts!r:.80}")
        _channel_count(counts["in"], where, "in")
        _channel_count(counts["out"], where, "out")
    info = document.get("info", {})
    if not isinstance(info, dict):
        raise PrunedFileError(f"{path}: field 'info': expected an object, got {type(info).__name__}")
    unknown = set(document) - {"format", "nc", "model", "convs", "info"}
    if unknown:
        raise PrunedFileError(f"{path}: unknown field {sorted(unknown)[0]!r}; known: format, nc, model, convs, info")
    return document


def _resize(model: nn.Module, convs: dict[str, dict[str, int]], where: str) -> None:
    modules = dict(model.named_modules())
    detect_convs = {id(m) for m in model.detect.m}
    for name, counts in convs.items():
        conv = modules.get(name)
        if not isinstance(conv, nn.Conv2d):
            raise PrunedFileError(f"{where}: convs[{name!r}]: the model has no conv of that name "
                                  f"({type(conv).__name__ if conv is not None else 'absent'}); the plan belongs to "
                                  "another model")
        c_in, c_out = counts["in"], counts["out"]
        if c_in > conv.in_channels or c_out > conv.out_channels:
            raise PrunedFileError(f"{where}: convs[{name!r}]: {c_in} -> {c_out} channels exceed the built "
                                  f"{conv.in_channels} -> {conv.out_channels}; pruning only removes channels")
        if c_in % conv.groups or c_out % conv.groups:
            raise PrunedFileError(f"{where}: convs[{name!r}]: {c_in} -> {c_out} channels are not divisible by the "
                                  f"conv's groups={conv.groups}")
        if id(conv) in detect_convs and c_out != conv.out_channels:
            raise PrunedFileError(f"{where}: convs[{name!r}]: Detect's output conv has {conv.out_channels} outputs "
                                  f"(anchors x (5 + nc)), the plan says {c_out}; Detect outputs are never pruned")
        if (c_in, c_out) == (conv.in_channels, conv.out_channels):
            continue
        resized = nn.Conv2d(c_in, c_out, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups,
                            bias=conv.bias is not None, padding_mode=conv.padding_mode)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, resized)
    sync_channel_attributes(model)


def pruned_network(folder: str | Path) -> nn.Module:
    """The pruned network's structure from `folder`'s channels.json alone (CPU, eval mode, weights as freshly
    initialised): what latency needs, which does not depend on the weights (`repnas relatency` re-times trials whose
    weights `repnas clean` removed). Raises PrunedFileError for a missing or invalid plan."""
    from space.builder import build_model

    folder = Path(folder)
    document = read_plan(folder)
    where = str(folder / PLAN_FILE)
    try:
        model = build_model(document["model"], deploy=True)
    except RepnasError as err:
        raise PrunedFileError(f"{where}: field 'model' does not build: {err}") from None
    _resize(model, document["convs"], where)
    return model.eval()


def load_pruned(folder: str | Path) -> nn.Module:
    """Rebuild the pruned model saved in `folder` (on the CPU, in eval mode); outputs equal the saved model's."""
    folder = Path(folder)
    model = pruned_network(folder)
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise PrunedFileError(f"{path}: no such file; save_pruned writes it next to {PLAN_FILE}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # an unpickling refusal (a pickled object) or a corrupt file: the file's fault
        raise PrunedFileError(f"{path}: not a weights-only state_dict, refused without running it "
                              f"({str(err).splitlines()[0]:.160}); save model.state_dict() with torch.save") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise PrunedFileError(f"{path}: expected a state_dict (name -> tensor), got {type(state).__name__}")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:240]
        raise PrunedFileError(f"{path}: the weights do not fit {PLAN_FILE}: {detail}") from None
    return model.eval()
