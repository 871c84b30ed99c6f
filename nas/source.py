"""Where a trained model comes from: `STUDY:TRIAL`, a trial folder, a pruned-model folder, or a YAML + weights.

`load_source` returns the deploy (fused) network on the CPU in eval mode, with what is known about it (classes,
the data and proxy size it was trained with). Weights are read weights-only; files of a study's trial are checked
against the sha256 recorded in the trial's user attrs before they are used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch
from torch import nn

from pruning.reparam import fuse_model
from space.cost import is_deploy
from space.errors import RepnasError, shorten

LOG = logging.getLogger("repnas.source")
STUDY_TRIAL = re.compile(r"(?P<study>[A-Za-z0-9][A-Za-z0-9._-]*):(?P<trial>\d+)")


class SourceError(RepnasError):
    """A model source that cannot be loaded as given."""


@dataclass
class Source:
    """A loaded model and what is known about it."""

    model: nn.Module  # deploy form, CPU, eval
    description: str
    nc: int
    data: str | None = None  # the dataset it was trained on, when known
    train_imgsz: int | None = None  # the proxy's training size, when known
    cost_imgsz: int | None = None  # the size its GFLOPs and latency were recorded at (a study's latency size)
    folder: Path | None = None
    info: dict = field(default_factory=dict)


def read_state(path: str | Path, what: str = "--weights") -> dict:
    """A weights-only state_dict from `path`; pickled objects are refused, never run."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{what} {path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on foreign pickle protocols: the refusal below says it
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling refusal or corruption is a fault of the file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise SourceError(f"{what} {path}: not a weights-only state_dict ({shorten(first, 160)}); save "
                          "model.state_dict() with torch.save") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SourceError(f"{what} {path}: expected a state_dict (name -> tensor)")
    return state


def weights_nc(model: nn.Module, state: dict) -> int | None:
    """The class count `state` was trained for, read off the shape of its Detect output convs (each
    na x (5 + nc) channels) in `model`'s layout; None when the state has no such tensor."""
    detect = model.detect
    name = next(n for n, m in model.named_modules() if m is detect)
    weight = state.get(f"{name}.m.0.weight")
    if not isinstance(weight, torch.Tensor) or weight.ndim != 4:
        return None
    per_anchor, rest = divmod(weight.shape[0], detect.na)
    return per_anchor - 5 if not rest and per_anchor > 5 else None


def _misfit(model: nn.Module, state: dict) -> str:
    """How `state` differs from `model`'s state_dict, whole: counts and the first of each kind."""
    own = model.state_dict()
    shapes = [k for k in state if k in own and own[k].shape != state[k].shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    parts = []
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} of {len(own)} tensors differ in shape (first {k}: {list(state[k].shape)} in "
                     f"the weights, {list(own[k].shape)} in the model)")
    if missing:
        parts.append(f"{len(missing)} missing from the weights (first {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} not in the model (first {unexpected[0]})")
    return "; ".join(parts) or "the tensors do not load"


def load_weights(model_yaml: str | Path | dict, state: dict, nc: int | None = None, source: str = "weights"):
    """Build MODEL.yaml (its deploy form when `state` is fused) and load `state` into it.

    `nc` None: the class count the weights were trained for (a YAML's `nc` is a default that `repnas train`
    replaces with the data's), else the YAML's. SourceError when the weights do not fit, saying how (whole: counts
    and the first tensor of each kind, never a message cut short)."""
    from space.builder import build_model

    fused = not any(".bn." in k or k.endswith(("rbr_dense.conv.weight", "rbr_dense.0.weight")) or ".ia." in k
                    for k in state)
    model = build_model(model_yaml, nc=nc, deploy=fused)
    found = weights_nc(model, state) if nc is None else None
    if found is not None and found != model.nc:
        model = build_model(model_yaml, nc=found, deploy=fused)
    try:
        model.load_state_dict(state)
    except RuntimeError:
        where = model_yaml if not isinstance(model_yaml, dict) else "the model YAML"
        raise SourceError(f"{source} do not fit {where}: {_misfit(model, state)}; give the YAML these weights were "
                          "trained from") from None
    return model


def _deploy(model: nn.Module) -> nn.Module:
    model = model.to("cpu").eval()
    return model if is_deploy(model) else fuse_model(model)


def _recorded(metrics: dict) -> tuple[str | None, int | None, int | None]:
    """(data, training size, GFLOPs/latency size) as a run's metrics.json records them (a trial's or `repnas
    train`'s: "proxy" is the training config, "imgsz" the size GFLOPs were counted at)."""
    proxy = metrics.get("proxy") if isinstance(metrics.get("proxy"), dict) else {}
    sizes = [v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None
             for v in (proxy.get("imgsz"), metrics.get("imgsz"))]
    data = metrics.get("data")
    return (data if isinstance(data, str) else None), sizes[0], sizes[1]


def _trial_metrics(folder: Path) -> dict:
    path = folder / "metrics.json"
    try:
        metrics = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return metrics if isinstance(metrics, dict) else {}


def _recorded_files(files: object, number: int, source: str) -> dict[str, dict]:
    """A trial's recorded `files` attr, checked: each name a plain relative path inside the trial folder, each
    entry {"path": "N/name", "sha256": hex}. A study edited to point them elsewhere is refused, nothing read."""
    if not isinstance(files, dict):
        raise SourceError(f"{source}: the trial's recorded files are {type(files).__name__}, not a mapping; the study "
                          "was edited or damaged, pick another trial")
    for name, entry in files.items():
        parts = PurePosixPath(name).parts if isinstance(name, str) else ()
        if (not parts or "\\" in name or "\0" in name or PurePosixPath(name).is_absolute()
                or any(p in ("..", ".") for p in parts)):
            raise SourceError(f"{source}: recorded file {name!r} is not a name inside the trial folder; the study was "
                              "edited or damaged, pick another trial")
        if (not isinstance(entry, dict) or entry.get("path") != f"{number}/{name}"
                or not isinstance(entry.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])):
            raise SourceError(f"{source}: recorded file {name!r}: {shorten(repr(entry), 80)} is not {{path: "
                              f"'{number}/{name}', "
                              "sha256: hex}; the study was edited or damaged, pick another trial")
    return files


def recorded_data(value: object, where: str) -> str | None:
    """A dataset path recorded in a file (a study's settings, metrics.json, channels.json), or None.

    It names the data the model was trained on, so it lies outside the results folder by design; it is used only
    when it names an existing .yaml/.yml file (a data.yaml), so a tampered record cannot make repnas read any other
    file. Otherwise a SourceError asks for --data.
    """
    if value is None:
        return None
    path = Path(value) if isinstance(value, str) and value and "\0" not in value else None
    if path is None or path.suffix.lower() not in (".yaml", ".yml") or not path.is_file():
        raise SourceError(f"{where}: recorded data {shorten(repr(value), 120)} is not an existing data.yaml; give "
                          "--data DATA.yaml")
    return str(path)


def resolve_data(data: str | Path | None, source: Source, where: str):
    """The dataset to evaluate or fine-tune `source` on: `data` (--data) when given, else the data it was trained on
    (as its study or run recorded it), else the built-in synthetic set (said in a warning once it fits).

    `where` names the source in messages (the CLI's SOURCE). Returns a DataConfig. Raises SourceError when the
    dataset's class count is not the weights' ("the weights have nc=2, --data ... has 4 classes; pass --data ...")
    or a recorded dataset is not an existing data.yaml, DataError for a bad data.yaml."""
    from nas.data import load_data_config
    from nas.synth import default_dataset

    if data is not None:
        what, fallback = f"--data {data}", False
    else:
        data = recorded_data(source.data, where)
        what, fallback = f"the data it was trained on, {data},", data is None
    if fallback:
        data = default_dataset()
        what = f"the built-in synthetic dataset {data} (no --data given)"
    cfg = load_data_config(data)
    if cfg.nc != source.nc:
        raise SourceError(f"{where}: the weights have nc={source.nc}, {what} has {cfg.nc} classes; pass --data "
                          f"DATA.yaml of the {source.nc}-class dataset they were trained on")
    if fallback:
        LOG.warning("no --data: using the built-in synthetic dataset %s", data)
    return cfg


def source_size(given: int | None, recorded: int | None, default: int, option: str,
                recorded_as: str) -> tuple[int, str]:
    """The input size a command uses and how it was chosen, for the line that says it: `given` (the option),
    else `recorded` (what the source's study or run recorded, `recorded_as` says which), else `default`."""
    if given:
        return given, f"{given} px ({option})"
    if recorded:
        return recorded, f"{recorded} px ({recorded_as}; {option} changes it)"
    return default, f"{default} px (the default: the source records no size; {option} changes it)"


def _check_files(folder: Path, expected: dict) -> None:
    """Each file's sha256 against the one the study recorded."""
    for name, entry in expected.items():
        path = folder / name
        if not path.is_file():
            raise SourceError(f"{path}: missing (weights are kept only for the Pareto front and the top-k when a "
                              "study runs with --keep-weights or `repnas clean`)")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != entry["sha256"]:
            raise SourceError(f"{path}: sha256 {digest[:12]}... differs from the {entry['sha256'][:12]}... recorded "
                              "by the study; the file was changed or damaged")


def _from_folder(folder: Path, expected: dict | None = None) -> Source:
    """A trial folder (model.yaml + fused.pt or weights.pt) or a pruned-model folder (channels.json)."""
    from pruning.portable import PLAN_FILE, load_pruned, read_plan

    if (folder / PLAN_FILE).is_file():
        document = read_plan(folder)
        model = load_pruned(folder)
        info = document.get("info") or {}
        return Source(model, f"pruned model {folder}", int(model.detect.nc), info.get("data"),
                      info.get("train_imgsz"), info.get("imgsz"), folder, info)
    yaml_path = folder / "model.yaml"
    if not yaml_path.is_file():
        raise SourceError(f"{folder}: neither a trial folder (model.yaml + fused.pt) nor a pruned model "
                          f"({PLAN_FILE}); give STUDY:TRIAL, a folder, or MODEL.yaml --weights W.pt")
    for name in ("fused.pt", "weights.pt"):
        path = folder / name
        if not path.is_file():
            continue
        if expected and name in expected:
            _check_files(folder, {name: expected[name]})
        model = load_weights(yaml_path, read_state(path, name), source=str(path))
        metrics = _trial_metrics(folder)
        return Source(_deploy(model), f"trial folder {folder} ({name})", int(model.detect.nc), *_recorded(metrics),
                      folder, {"metrics": metrics})
    raise SourceError(f"{folder}: no fused.pt or weights.pt (weights are kept only for the Pareto front and the "
                      "top-k when a study runs with --keep-weights or `repnas clean`)")


def load_source(source: str, weights: str | None = None, *, results: str = "results",
                storage: str | None = None) -> Source:
    """Load `source`: STUDY:TRIAL (a finished trial of a study; `results`/`storage` say where the study is), a
    trial or pruned-model folder, or a model YAML (with `weights`, a state_dict file of its train-time or fused
    form). Returns a Source: the deploy network (fused, pruned where the trial was; CPU, eval mode) with its class
    count, description, the data it was trained on and its proxy training size when recorded. Raises SourceError
    (one line naming the source and the fix) for a missing study, trial, folder or file, a trial that is not
    COMPLETE, recorded paths that lead outside the trial folder, files whose sha256 differs from the record, and
    weights that are not a weights-only state_dict (pickles are refused, never run) or do not fit the YAML."""
    path = Path(source)
    match = STUDY_TRIAL.fullmatch(source)
    if match and not path.exists():
        from optuna.trial import TrialState

        if weights:
            raise SourceError(f"{source} is a study's trial: it carries its own weights; drop --weights")

        from nas.study import attrs, load_study, stored_settings, trial_folder

        study = load_study(match["study"], storage=storage, results=results)
        number = int(match["trial"])
        trials = study.get_trials(deepcopy=False)
        if number >= len(trials):
            raise SourceError(f"{source}: study {match['study']!r} has trials 0..{len(trials) - 1}")
        trial = trials[number]
        if trial.state != TrialState.COMPLETE:
            raise SourceError(f"{source}: trial {number} is {trial.state.name}, not COMPLETE; pick a finished trial "
                              f"(`repnas show {match['study']}` lists the front)")
        settings = stored_settings(study, match["study"], storage, results)
        folder = trial_folder(settings, number)
        files = _recorded_files(trial.user_attrs.get(attrs.FILES_KEY) or {}, number, source)
        if trial.user_attrs.get(attrs.PRUNE_FRACTION_KEY):  # the ranked network is the pruned one
            _check_files(folder, {k: v for k, v in files.items() if k.startswith("pruned/")})
            folder = folder / "pruned"
        loaded = _from_folder(folder, files)
        loaded.description = f"{source} ({loaded.description})"
        loaded.data = loaded.data or settings.data
        loaded.cost_imgsz = trial.user_attrs.get(attrs.GFLOPS_IMGSZ_KEY) or settings.latency_imgsz or loaded.cost_imgsz
        shown = (attrs.MAP50_95_KEY, attrs.MAP50_KEY, attrs.LATENCY_MS_KEY, attrs.LATENCY_RATIO_KEY,
                 attrs.GFLOPS_DEPLOY_KEY)
        loaded.info["trial_attrs"] = {k: trial.user_attrs.get(k) for k in shown}
        return loaded
    if path.is_dir():
        if weights:
            raise SourceError(f"{source} is a folder: it carries its own weights; drop --weights")
        return _from_folder(path)
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        if not weights:
            raise SourceError(f"{source}: a model YAML needs --weights W.pt (a state_dict of it, train-time or fused)")
        model = load_weights(path, read_state(weights), source=f"--weights {weights}")
        # a run's own folder (`repnas train`'s, a trial's): its metrics.json says the data and the sizes
        beside = Path(weights).resolve().parent == path.resolve().parent
        metrics = _trial_metrics(path.parent) if beside else {}
        return Source(_deploy(model), f"{path} with {weights}", int(model.detect.nc), *_recorded(metrics),
                      info={"metrics": metrics} if metrics else {})
    raise SourceError(f"{source}: no such study trial, folder or model YAML; give STUDY:TRIAL (e.g. default:3), a "
                      "trial folder, a pruned-model folder, or MODEL.yaml --weights W.pt")
