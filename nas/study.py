"""The search study: Optuna trials that take one sampled Arch each through build -> cost -> budget -> latency ->
proxy training -> fusion -> evaluation, with two objectives (mAP50-95 up, latency_ms down).

Storage: by default an Optuna journal file, `results/NAME/study.log` (`JournalStorage(JournalFileBackend)`): several
worker processes on one machine share it safely through a file lock, which SQLite under concurrent writers does not
do reliably. `--storage URL` takes any Optuna RDB URL (PostgreSQL/MySQL for many machines). Trial files go to
`results/NAME/trials/N/`, the live Pareto files to `results/NAME/`.

The study's settings are stored as JSON in its user attrs when it is created; a resumed study reuses them, and an
explicit change to what makes trials comparable (data, space, imgsz, ...) is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from nas.data import DataConfig, load_data_config
from nas.evaluate import evaluate
from nas.files import state_dict_bytes, write_bytes_atomic, write_text_atomic
from nas.latency import LatencyConfig, measure_latency
from nas.pareto import FORMATS, TrialRecord, export_pareto
from nas.train import ProxyConfig, epochs_csv, fit, resolve_device
from pruning.reparam import fuse_model, fusion_error
from space.blocks import make_divisible
from space.builder import build_model
from space.cost import model_cost
from space.errors import RepnasError
from space.searchspace import SEED_HEAD, STAGE_NAMES, Arch, Space, load_space, sample_arch, seed_arch
from space.yamlio import read_yaml

LOG = logging.getLogger("repnas.study")

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SAMPLERS = ("tpe", "nsga2", "random")
FUSION_TOLERANCE = 1e-4
SETTINGS_ATTR = "settings"


class StudyError(RepnasError):
    """A study that cannot be created, resumed or exported as asked."""


class SearchStopped(RepnasError):
    """The search stopped before reaching its trial count (too many failures, or nothing left to try)."""


class InvalidStudyName(StudyError):
    """A study name that could escape results/ or is not portable."""


# ---------------------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class StudySettings:
    """What a study is. A field left None means "not given": the stored value on resume, else the default.

    `proxy` holds ProxyConfig fields to change from its defaults (e.g. {"epochs": 5}); `latency` LatencyConfig
    fields. `imgsz`/`batch` are the latency input (None: the space's imgsz, batch 1). `baseline` is a YAML with
    the baseline's Arch params, or a model YAML that an Arch of the space writes (None: `seed_arch(space)`).
    """

    name: str = "default"
    storage: str | None = None  # None: results/NAME/study.log (Optuna journal file)
    data: str | None = None  # data.yaml; None: the built-in synthetic dataset
    space: str | None = None  # space YAML or "default"
    trials: int | None = None
    seed: int | None = None
    sampler: str | None = None  # "tpe", "nsga2" or "random"
    proxy: dict | None = None
    imgsz: int | None = None
    batch: int | None = None
    device: str | None = None
    latency: dict | None = None
    baseline: str | None = None
    max_failures: int | None = None
    results: str = "results"  # root folder of study folders
    quiet: bool = True

    def __post_init__(self):
        check_study_name(self.name)
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise StudyError(f"sampler {self.sampler!r} is unknown; use one of {', '.join(SAMPLERS)}")
        for key in ("trials", "max_failures", "batch", "imgsz"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise StudyError(f"{key}={value!r} must be a positive integer")

    @property
    def folder(self) -> Path:
        return Path(self.results) / self.name


DEFAULTS: dict[str, Any] = {"space": "default", "trials": 20, "seed": 0, "sampler": "tpe", "proxy": {},
                            "batch": 1, "device": "auto", "latency": {}, "max_failures": 5}
# Changing these mid-study would make trials incomparable: refused on resume.
FROZEN = ("data", "space", "imgsz", "batch", "proxy", "latency", "baseline", "device")
STORED = tuple(f.name for f in fields(StudySettings) if f.name not in ("name", "storage", "results", "quiet"))


def check_study_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise InvalidStudyName(f"study name {name!r} is not allowed: use letters, digits, '-', '_' and '.', "
                               "starting with a letter or digit (it names the folder results/NAME)")
    return name


def _normalise(key: str, value: Any) -> Any:
    """Paths become absolute so a study resumed from another folder compares and finds the same files."""
    if value is None:
        return None
    if key in ("data", "baseline") or (key == "space" and value != "default"):
        return str(Path(value).expanduser().resolve())
    if key in ("proxy", "latency"):
        return json.loads(json.dumps(value, sort_keys=True))
    return value


def merge_settings(given: StudySettings, stored: dict | None) -> StudySettings:
    """`given` with its unset fields filled from `stored` (a resumed study) and then the defaults.

    Raises StudyError when `given` explicitly changes a FROZEN field of a stored study.
    """
    values = {}
    for key in STORED:
        new = _normalise(key, getattr(given, key))
        if stored is not None and key in stored:
            old = stored[key]
            if new is not None and key in FROZEN and new != old:
                raise StudyError(f"study {given.name!r} was created with {key}={old!r}; resuming with "
                                 f"{key}={new!r} would make its trials incomparable. Drop the option to resume, "
                                 "or start a new study with --study OTHER_NAME")
            values[key] = old if new is None else new
        else:
            values[key] = DEFAULTS.get(key) if new is None else new
    return replace(given, **values)


def settings_json(settings: StudySettings) -> str:
    return json.dumps({k: getattr(settings, k) for k in STORED}, sort_keys=True)


def proxy_config(settings: StudySettings) -> ProxyConfig:
    try:
        return ProxyConfig(**({"device": settings.device, "quiet": settings.quiet} | (settings.proxy or {})))
    except (TypeError, ValueError) as err:
        raise StudyError(f"proxy settings {settings.proxy}: {err}") from None


def latency_config(settings: StudySettings, device: torch.device) -> LatencyConfig:
    try:
        return LatencyConfig.for_device(device, **(settings.latency or {}))
    except (TypeError, ValueError) as err:
        raise StudyError(f"latency settings {settings.latency}: {err}") from None


def load_baseline(path: str | None, space: Space) -> Arch:
    """The baseline Arch: `seed_arch(space)`, or a YAML of Arch params, or a model YAML an Arch of `space` writes."""
    if path is None:
        return seed_arch(space)
    data = read_yaml(path, StudyError)
    if isinstance(data, dict) and "backbone" in data:
        return _arch_from_model_yaml(data, space, path)
    if not isinstance(data, dict):
        raise StudyError(f"baseline {path}: expected a mapping of Arch params (P1_depth: 1, ...) or a model YAML")
    return Arch.from_params(data, space)


def _arch_from_model_yaml(cfg: dict, space: Space, where: str) -> Arch:
    """Invert `Arch.to_yaml` for a model YAML of the seed's layout; refuse anything it would not write back."""
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
        widths = [w for w in space.head_width if make_divisible(SEED_HEAD[0] * w, 8) == head[0][3][0]]
        params |= {"head_width": widths[0] if widths else head[0][3][0] / SEED_HEAD[0], "head_depth": head[3][1]}
        arch = Arch.from_params(params, space)
    except (KeyError, IndexError, TypeError) as err:
        raise StudyError(f"baseline {where}: not a model YAML of the RepVGG-YOLO layout ({err!r})") from None
    written = arch.to_yaml(cfg.get("nc", 80))
    if [written["backbone"], written["head"]] != [cfg["backbone"], cfg["head"]]:
        raise StudyError(f"baseline {where}: the nearest Arch of the space ({arch.to_params()}) writes a different "
                         "model; give the baseline as Arch params instead")
    return arch


# ---------------------------------------------------------------------------------------------------------------
# Storage and study


def storage_for(settings: StudySettings, *, create: bool = True) -> optuna.storages.BaseStorage | str:
    """The study's storage: the given URL, or the journal file results/NAME/study.log."""
    if settings.storage:
        return settings.storage
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path = settings.folder / "study.log"
    if not create and not path.is_file():
        raise StudyError(f"no study {settings.name!r}: {path} does not exist; start it with "
                         f"`repnas search --study {settings.name}` (or pass --storage URL)")
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def make_sampler(settings: StudySettings) -> optuna.samplers.BaseSampler:
    """The study's sampler. Optuna 5 samplers read `trial.set_constraint` values (constraints_func is deprecated):
    an over-budget trial sets "budget" = 1.0, so TPE learns where the infeasible region is."""
    trials, seed = settings.trials, settings.seed
    if settings.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=max(4, min(50, trials // 3)), seed=seed)
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # `group` is experimental
        return optuna.samplers.TPESampler(multivariate=True, group=True, seed=seed,
                                          n_startup_trials=max(3, trials // 4))


def _load_stored(settings: StudySettings) -> dict | None:
    storage = storage_for(settings)
    try:
        study = optuna.load_study(study_name=settings.name, storage=storage)
    except KeyError:
        return None
    raw = study.user_attrs.get(SETTINGS_ATTR)
    return json.loads(raw) if raw else None


def create_or_load_study(settings: StudySettings) -> optuna.Study:
    """Create the study (frozen baseline latency measured, baseline enqueued as trial 0) or load it.

    `settings` must be resolved (`merge_settings`); `run_search` does that.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage_for(settings), study_name=settings.name, load_if_exists=True,
                                directions=["maximize", "minimize"], sampler=make_sampler(settings))
    if SETTINGS_ATTR in study.user_attrs:
        return study
    space = load_space(settings.space)
    data_cfg = load_data_config(settings.data)
    baseline = load_baseline(settings.baseline, space)
    device = resolve_device(settings.device)
    fused = fuse_model(build_model(baseline.to_yaml(data_cfg.nc)))
    lat = measure_latency(fused, settings.imgsz or space.imgsz, settings.batch, device,
                          latency_config(settings, device))
    study.set_user_attr("baseline_latency_ms", lat.median_ms)
    study.set_user_attr("baseline_latency", lat.to_dict())
    study.set_user_attr("baseline_params", baseline.to_params())
    study.enqueue_trial(baseline.to_params(), user_attrs={"baseline": True})
    study.set_user_attr(SETTINGS_ATTR, settings_json(settings))  # last: a study without it is not yet created
    LOG.info("created study %s: baseline latency %.3f ms on %s", settings.name, lat.median_ms, lat.device["name"])
    return study


# ---------------------------------------------------------------------------------------------------------------
# One trial


class TrialRejected(optuna.TrialPruned):
    """Pruned before training: over budget, or an Arch already trained in this study. Does not count."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def device_label(info: dict) -> str:
    if info.get("type") == "cuda":
        return str(info.get("name"))
    return f"CPU {info.get('name')}, {info.get('threads')} threads"


def trial_folder(settings: StudySettings, number: int) -> Path:
    return settings.folder / "trials" / str(number)


def _completed_archs(study: optuna.Study) -> list[dict]:
    return [t.user_attrs.get("arch") for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]


def _fusion_error_fp32(model: torch.nn.Module, fused: torch.nn.Module, x: torch.Tensor) -> float:
    """fusion_error with TF32 off: cuDNN's default TF32 convolutions alone differ by ~1e-3 on a GPU."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return fusion_error(model, fused, x)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def run_trial(trial: optuna.Trial, settings: StudySettings, space: Space, data_cfg: DataConfig,
              baseline_fused: torch.nn.Module) -> tuple[float, float]:
    """Take one sampled Arch through the pipeline; return (mAP50-95, latency objective in ms).

    Raises TrialRejected (over budget / duplicate) before any training, and lets any other error through.
    """
    phases: dict[str, float] = {}
    folder = trial_folder(settings, trial.number)
    folder.mkdir(parents=True, exist_ok=True)
    is_baseline = bool(trial.user_attrs.get("baseline"))
    files: dict[str, str] = {}

    def save(name: str, data: bytes) -> None:
        write_bytes_atomic(folder / name, data)
        files[name] = _sha256(data)

    start = time.perf_counter()
    arch = sample_arch(trial, space)
    trial.set_user_attr("arch", arch.to_params())
    if arch.to_params() in _completed_archs(trial.study):
        trial.set_user_attr("pruned_reason", "duplicate")
        raise TrialRejected("duplicate: this Arch was already trained in this study")
    save("model.yaml", arch.to_yaml_text(data_cfg.nc).encode())
    model = build_model(arch.to_yaml(data_cfg.nc))
    imgsz = settings.imgsz or space.imgsz
    cost = model_cost(model, imgsz)
    budget_cost = cost if imgsz == space.imgsz else model_cost(model, space.imgsz)
    trial.set_user_attr("params", cost.params_deploy)
    trial.set_user_attr("params_train", cost.params)
    trial.set_user_attr("gflops", cost.gflops)
    trial.set_user_attr("gflops_deploy", cost.gflops_deploy)
    trial.set_user_attr("gflops_imgsz", imgsz)
    violation = space.budget_violation(budget_cost.params_deploy, budget_cost.gflops_deploy)
    if violation and not is_baseline:  # the baseline is the reference row of every table: never rejected
        trial.set_user_attr("constraints", [1.0])
        trial.set_constraint("budget", 1.0)
        trial.set_user_attr("rejected", violation)
        trial.set_user_attr("pruned_reason", "rejected")
        raise TrialRejected(f"over budget: {violation}")
    phases["build"] = time.perf_counter() - start

    start = time.perf_counter()
    device = resolve_device(settings.device)
    lat = measure_latency(fuse_model(model), imgsz, settings.batch, device, latency_config(settings, device),
                          reference=baseline_fused)
    latency_ms = lat.latency_ratio * trial.study.user_attrs["baseline_latency_ms"]
    trial.set_user_attr("latency_ms", latency_ms)
    trial.set_user_attr("latency_measured_ms", lat.median_ms)
    trial.set_user_attr("latency_p90_ms", lat.p90_ms)
    trial.set_user_attr("latency_ratio", lat.latency_ratio)
    trial.set_user_attr("device", lat.device)
    phases["latency"] = time.perf_counter() - start

    start = time.perf_counter()
    cfg = proxy_config(settings)
    result = fit(model, data_cfg, cfg)
    save("weights.pt", state_dict_bytes(model))
    save("epochs.csv", epochs_csv(result.history).encode())
    phases["train"] = time.perf_counter() - start

    start = time.perf_counter()
    fused = fuse_model(model)
    x = torch.rand(1, 3, cfg.imgsz, cfg.imgsz, generator=torch.Generator().manual_seed(0))
    x = x.to(next(model.parameters()).device)
    error = _fusion_error_fp32(model, fused, x)
    trial.set_user_attr("fusion_error", error)
    if not error < FUSION_TOLERANCE:
        raise RuntimeError(f"fusion changed the outputs: relative error {error:.2e} >= {FUSION_TOLERANCE:g}")
    save("fused.pt", state_dict_bytes(fused))
    phases["fuse"] = time.perf_counter() - start

    start = time.perf_counter()
    metrics = evaluate(fused, data_cfg, cfg.imgsz, batch=cfg.batch * 2, device=x.device)
    phases["eval"] = time.perf_counter() - start

    summary = {"trial": trial.number, "arch": arch.to_params(), "map50_95": metrics.map50_95,
               "map50": metrics.map50, "latency_ms": latency_ms, "latency_ratio": lat.latency_ratio,
               "latency": lat.to_dict(), "params": cost.params_deploy, "gflops": cost.gflops,
               "gflops_deploy": cost.gflops_deploy, "imgsz": imgsz, "proxy": cfg.to_dict(), "seconds": phases,
               "data": str(data_cfg.source), "fusion_error": error}
    save("metrics.json", json.dumps(summary, indent=2, default=str).encode())
    trial.set_user_attr("map50_95", metrics.map50_95)
    trial.set_user_attr("map50", metrics.map50)
    trial.set_user_attr("seconds", phases)
    rel = folder.relative_to(settings.folder).as_posix()
    trial.set_user_attr("files", {name: {"path": f"{rel}/{name}", "sha256": digest} for name, digest in files.items()})
    trial.set_user_attr("constraints", [0.0])
    trial.set_constraint("budget", 0.0)
    return metrics.map50_95, latency_ms


# ---------------------------------------------------------------------------------------------------------------
# The search loop


def counts(trial: FrozenTrial) -> bool:
    """Whether a finished trial counts toward --trials: COMPLETE, or PRUNED for a reason other than rejection."""
    if trial.state == TrialState.COMPLETE:
        return True
    return trial.state == TrialState.PRUNED and trial.user_attrs.get("pruned_reason") not in ("rejected", "duplicate")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_stale_trials(study: optuna.Study) -> list[int]:
    """Mark RUNNING trials whose worker process on this host is gone as FAILED and re-enqueue their Arch once.

    Returns the numbers of the trials marked. Trials of other hosts are left alone (their liveness is unknown here).
    """
    host = socket.gethostname()
    waiting = [t.system_attrs.get("fixed_params") for t in study.get_trials(states=(TrialState.WAITING,))]
    marked = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") != host or not isinstance(pid, int) or _pid_alive(pid):
            continue
        study._storage.set_trial_user_attr(t._trial_id, "fail_reason", "stale: worker died")
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        marked.append(t.number)
        params = t.user_attrs.get("arch") or t.system_attrs.get("fixed_params") or t.params
        # not enqueue_trial(skip_if_exists=True): it matches the stale trial itself and would never re-enqueue
        if params and params not in waiting:
            attrs = {"requeued_from": t.number} | ({"baseline": True} if t.user_attrs.get("baseline") else {})
            study.enqueue_trial(params, user_attrs=attrs)
            waiting.append(params)
    return marked


def trial_records(study: optuna.Study, settings: StudySettings) -> list[TrialRecord]:
    """One TrialRecord per trial, for the Pareto files."""
    records = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        arch = attrs.get("arch") or {}
        stages = tuple((arch.get(f"{n}_depth"), arch.get(f"{n}_width"), bool(arch.get(f"{n}_se")))
                       for n in STAGE_NAMES) if arch else ()
        model_yaml = attrs.get("files", {}).get("model.yaml", {}).get("path")
        records.append(TrialRecord(
            number=t.number, state=t.state.name, map50_95=attrs.get("map50_95"), map50=attrs.get("map50"),
            latency_ms=attrs.get("latency_ms"), latency_ratio=attrs.get("latency_ratio"),
            device=device_label(attrs["device"]) if "device" in attrs else "", params=attrs.get("params"),
            gflops_deploy=attrs.get("gflops_deploy"), stages=stages, yaml_path=model_yaml,
            is_baseline=bool(attrs.get("baseline")),
        ))
    return records


def trial_line(t: FrozenTrial) -> str:
    """One printed line per finished trial."""
    a = t.user_attrs

    def num(key: str, fmt: str) -> str:
        return format(a[key], fmt) if a.get(key) is not None else "-"

    seconds = sum((a.get("seconds") or {}).values())
    why = a.get("fail_reason") or a.get("rejected") or a.get("pruned_reason") or ""
    return (f"trial {t.number:>4} {t.state.name:<8} mAP50-95 {num('map50_95', '.4f'):>7} mAP50 {num('map50', '.4f'):>7}"
            f" latency {num('latency_ms', '.3f'):>8} ms ratio {num('latency_ratio', '.3f'):>6}"
            f" GFLOPs {num('gflops_deploy', '.3f'):>8} {seconds:>7.1f} s" + (f"  {why}" if why else ""))


def export_files(study: optuna.Study, settings: StudySettings, out_dir: str | Path | None = None,
                 formats: Sequence[str] | str = FORMATS) -> dict[str, Path]:
    return export_pareto(trial_records(study, settings), out_dir or settings.folder, formats,
                         title=f"repnas study {settings.name}: mAP50-95 vs latency")


def run_search(settings: StudySettings, *, report: Callable[[str], None] | None = None) -> optuna.Study:
    """Run (or resume) a study until `settings.trials` trials count; export the Pareto files after every trial.

    Raises SearchStopped after `max_failures` failed trials in this run, or when the sampler keeps proposing
    Archs that are over budget or already trained. Ctrl-C fails the running trial ("interrupted") and re-raises.
    """
    report = report or (lambda line: None)
    from nas.synth import default_dataset

    settings = merge_settings(settings, _load_stored(settings))
    if settings.data is None:
        settings = replace(settings, data=str(default_dataset().resolve()))
    if settings.imgsz is None:  # latency/cost input size: the space's own unless given
        settings = replace(settings, imgsz=load_space(settings.space).imgsz)
    study = create_or_load_study(settings)
    space = load_space(settings.space)
    data_cfg = load_data_config(settings.data)
    baseline = Arch.from_params(study.user_attrs["baseline_params"], space)
    baseline_fused = fuse_model(build_model(baseline.to_yaml(data_cfg.nc)))
    for number in recover_stale_trials(study):
        report(f"trial {number:>4} FAILED   stale: worker died; its Arch is enqueued again")

    failures, skipped_in_a_row = 0, 0
    max_skipped = max(20, 5 * settings.trials)
    host, pid = socket.gethostname(), os.getpid()
    while sum(counts(t) for t in study.get_trials(deepcopy=False)) < settings.trials:
        trial = study.ask()
        trial.set_user_attr("host", host)
        trial.set_user_attr("pid", pid)
        folder = trial_folder(settings, trial.number)
        try:
            values = run_trial(trial, settings, space, data_cfg, baseline_fused)
        except optuna.TrialPruned as why:
            trial.set_user_attr("pruned_reason", trial.user_attrs.get("pruned_reason") or str(why))
            study.tell(trial, state=TrialState.PRUNED)
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted")
            study.tell(trial, state=TrialState.FAIL)
            export_files(study, settings)
            raise
        except Exception as err:  # any trial error fails the trial, not the study
            reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
            trial.set_user_attr("fail_reason", reason)
            folder.mkdir(parents=True, exist_ok=True)
            write_text_atomic(folder / "traceback.txt", traceback.format_exc())
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # after an OOM the next trial should start from a clean cache
            study.tell(trial, state=TrialState.FAIL)
            failures += 1
        else:
            study.tell(trial, values)
        frozen = study.get_trials(deepcopy=False)[trial.number]
        skipped_in_a_row = 0 if counts(frozen) or frozen.state == TrialState.FAIL else skipped_in_a_row + 1
        report(trial_line(frozen))
        export_files(study, settings)
        if failures >= settings.max_failures:
            raise SearchStopped(f"study {settings.name!r} stopped: {failures} trials failed in this run "
                                f"(max_failures={settings.max_failures}); last: {reason}. See "
                                f"{folder / 'traceback.txt'}")
        if skipped_in_a_row >= max_skipped:
            raise SearchStopped(f"study {settings.name!r} stopped: the last {skipped_in_a_row} sampled Archs were "
                                "over budget or already trained; widen the space or its budgets")
    return study


def load_study(name: str, *, storage: str | None = None, results: str = "results") -> optuna.Study:
    """An existing study by name (default storage results/NAME/study.log), or a StudyError."""
    settings = StudySettings(name=name, storage=storage, results=results)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=name, storage=storage_for(settings, create=False))
    except KeyError:
        raise StudyError(f"no study {name!r} in {storage or settings.folder / 'study.log'}") from None


def export_study(name: str, out_dir: str | Path | None = None, formats: Sequence[str] | str = FORMATS, *,
                 storage: str | None = None, results: str = "results") -> dict[str, Path]:
    """Write the study's Pareto files (default into results/NAME/); return format -> path."""
    study = load_study(name, storage=storage, results=results)
    return export_files(study, StudySettings(name=name, storage=storage, results=results), out_dir, formats)


def summary_line(study: optuna.Study) -> str:
    trials = study.get_trials(deepcopy=False)
    by_state = {s: sum(t.state == s for t in trials) for s in TrialState}
    rejected = sum(t.state == TrialState.PRUNED and not counts(t) for t in trials)
    front = len(study.best_trials) if by_state[TrialState.COMPLETE] else 0
    return (f"study {study.study_name}: {len(trials)} trials, {by_state[TrialState.COMPLETE]} complete, "
            f"{by_state[TrialState.FAIL]} failed, {rejected} rejected or duplicate; {front} on the Pareto front")




def show_study(name: str, *, storage: str | None = None, results: str = "results") -> str:
    """One screen about a study: settings, trials by state (failures by reason), the front, time left."""
    from collections import Counter

    import numpy as np

    from nas.pareto import default_reference, hypervolume, pareto_table

    study = load_study(name, storage=storage, results=results)
    settings = StudySettings(name=name, storage=storage, results=results)
    stored = json.loads(study.user_attrs.get(SETTINGS_ATTR, "{}"))
    trials = study.get_trials(deepcopy=False)
    counted = [t for t in trials if counts(t)]
    target = stored.get("trials") or 0
    lines = [f"study {name} ({storage or settings.folder / 'study.log'})"]
    shown = ("data", "space", "trials", "sampler", "seed", "proxy", "imgsz", "batch", "device", "baseline")
    lines += [f"  {key}: {stored.get(key)}" for key in shown if key in stored]
    baseline_ms = study.user_attrs.get("baseline_latency_ms")
    if baseline_ms is not None:
        lines.append(f"  baseline latency (frozen at creation): {baseline_ms:.3f} ms")
    states = Counter(t.state.name for t in trials)
    lines.append(f"trials: {len(trials)} in all, {len(counted)} of {target} counted; "
                 + ", ".join(f"{n} {s}" for s, n in sorted(states.items())))
    rejected = Counter(t.user_attrs.get("pruned_reason") for t in trials
                       if t.state == TrialState.PRUNED and not counts(t))
    if rejected:
        lines.append("  rejected before training: " + ", ".join(f"{n} {r}" for r, n in rejected.most_common()))
    failures = Counter(str(t.user_attrs.get("fail_reason", "unknown"))[:80] for t in trials
                       if t.state == TrialState.FAIL)
    if failures:
        lines.append("  failed: " + "; ".join(f"{n} x {r}" for r, n in failures.most_common()))
    records = trial_records(study, settings)
    table = pareto_table(records)
    front = table[table["pareto"]] if len(table) else table
    if len(front):
        reference = default_reference(records)
        done = table.dropna(subset=["map50_95", "latency_ms"])
        hv = hypervolume(done["map50_95"].to_numpy(float), done["latency_ms"].to_numpy(float), reference)
        lines.append(f"Pareto front: {len(front)} trials; hypervolume {hv:.4g} (reference mAP50-95 "
                     f"{reference[0]:g}, latency {reference[1]:.3f} ms)")
        lines.append(f"  {'latency_ms':>10} {'mAP50-95':>9} {'mAP50':>7} {'trial':>6}  best mAP at this latency")
        for _, row in front.iterrows():
            mark = " (baseline)" if row["baseline"] else (" beats baseline" if row["dominates_baseline"] else "")
            lines.append(f"  {row['latency_ms']:>10.3f} {row['map50_95']:>9.4f} {row['map50']:>7.4f} "
                         f"{row['trial']:>6}{mark}")
    else:
        lines.append("Pareto front: no finished trial yet")
    seconds = [(t.datetime_complete - t.datetime_start).total_seconds() for t in counted
               if t.datetime_start and t.datetime_complete]
    left = max(target - len(counted), 0)
    if left and seconds:
        eta = float(np.mean(seconds)) * left
        lines.append(f"time left: ~{eta / 60:.1f} min for {left} more trials at {np.mean(seconds):.0f} s each "
                     "(one worker)")
    elif not left:
        lines.append("time left: none, the study has its trials")
    return "\n".join(lines)
