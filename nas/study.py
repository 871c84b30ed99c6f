"""The search study: Optuna trials that take one sampled Arch each through build -> cost -> budget -> latency ->
proxy training -> fusion -> evaluation, with two objectives (mAP50-95 up, latency_ms down).

Storage: by default an Optuna journal file, `results/NAME/study.log` (`JournalStorage(JournalFileBackend)`): several
worker processes on one machine share it safely through a file lock (appends only, no "database is locked"), which
SQLite under concurrent writers does not do reliably (Optuna itself advises against SQLite for parallel workers).
`--storage URL` takes any Optuna RDB URL (PostgreSQL/MySQL for workers on many machines). Trial files go to
`results/NAME/trials/N/` (or `--artifacts DIR` -> `DIR/NAME/N/`), the live Pareto files to `results/NAME/`.

Workers: `--workers N` starts N worker processes (`python -m nas.study --worker ...`) against the one storage;
each claims trials with `claim_trial` (a file lock around count + ask on a local journal; for any storage, a trial
whose number comes after `--trials` busy ones is released as "surplus", so a study never overshoots). Every
running trial holds a lease: its worker's host and PID and a heartbeat time renewed every HEARTBEAT_S seconds;
`recover_stale_trials` fails a RUNNING trial whose worker is gone (same host: its PID is dead; any host: no
heartbeat for `stale_after` seconds) and enqueues its Arch once more.

The study's settings are stored as JSON in its user attrs when it is created; a resumed study reuses them, and an
explicit change to what makes trials comparable (data, space, imgsz, ...) is refused unless forced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
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

from nas.data import DataConfig, check_dataset, load_data_config
from nas.earlystop import EarlyStopConfig, Finished, curve_from_attr, should_stop
from nas.evaluate import evaluate
from nas.files import file_lock, host_lock_path, state_dict_bytes, write_bytes_atomic, write_text_atomic
from nas.latency import LatencyConfig, measure_latency
from nas.pareto import FORMATS, TrialRecord, export_pareto
from nas.prune import prune_job
from nas.train import ProxyConfig, epochs_csv, fit, resolve_device
from pruning.channel import prune_to_flops
from pruning.portable import save_pruned
from pruning.reparam import fuse_model, fusion_error
from space.blocks import make_divisible
from space.builder import build_model
from space.cost import count_gflops, model_cost
from space.errors import RepnasError
from space.searchspace import SEED_HEAD, STAGE_NAMES, Arch, Space, load_space, sample_arch, seed_arch
from space.yamlio import read_yaml

LOG = logging.getLogger("repnas.study")

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SAMPLERS = ("tpe", "nsga2", "random")
FUSION_TOLERANCE = 1e-4
SETTINGS_ATTR = "settings"
HEARTBEAT_S = 30.0  # a running trial's lease is renewed this often
BASELINE_REPEATS = 3  # measurements of the baseline's latency at creation; the lowest median is frozen


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
    fields; `early_stop` EarlyStopConfig fields. `imgsz`/`batch` are the latency input (None: the space's imgsz,
    batch 1). `baseline` is a YAML with the baseline's Arch params, or a model YAML that an Arch of the space writes
    (None: `seed_arch(space)`). `max_latency_ms`/`max_latency_ratio` reject slower Archs before training.
    `keep_weights` k: keep weights only for the front and the top-k by mAP. `artifacts`: the shared folder holding
    trial folders (DIR/NAME/N; None: results/NAME/trials/N). `stale_after`: seconds without a heartbeat after which
    a RUNNING trial of another host is taken for dead.
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
    max_latency_ms: float | None = None
    max_latency_ratio: float | None = None
    early_stop: dict | None = None
    keep_weights: int | None = None
    artifacts: str | None = None
    stale_after: float | None = None
    prune_to: float | None = None  # prune each candidate's fused model to this deploy-FLOPs fraction, rank that
    prune_finetune_epochs: int | None = None  # fine-tuning epochs after pruning (None: ceil(proxy epochs / 5))
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
        for key in ("keep_weights", "prune_finetune_epochs"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise StudyError(f"{key}={value!r} must be an integer >= 0")
        if self.prune_to is not None and not (isinstance(self.prune_to, (int, float)) and 0.01 <= self.prune_to <= 1):
            raise StudyError(f"prune_to={self.prune_to!r} must be a deploy-FLOPs fraction in [0.01, 1] (1: no pruning)")
        if self.stale_after is not None and isinstance(self.stale_after, (int, float)) and \
                self.stale_after < 3 * HEARTBEAT_S:
            raise StudyError(f"stale_after={self.stale_after!r} must be at least {3 * HEARTBEAT_S:g} s (3 heartbeats): "
                             "a live worker's trial would be taken for dead")
        for key in ("max_latency_ms", "max_latency_ratio", "stale_after"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise StudyError(f"{key}={value!r} must be a positive number")

    @property
    def folder(self) -> Path:
        return Path(self.results) / self.name

    @property
    def trials_root(self) -> Path:
        """Where trial folders live: DIR/NAME for --artifacts DIR, else results/NAME/trials."""
        return Path(self.artifacts) / self.name if self.artifacts else self.folder / "trials"


DEFAULTS: dict[str, Any] = {"space": "default", "trials": 20, "seed": 0, "sampler": "tpe", "proxy": {},
                            "batch": 1, "device": "auto", "latency": {}, "max_failures": 5, "early_stop": {},
                            "stale_after": 600.0}
# Changing these mid-study would make trials incomparable (or scatter their files): refused on resume.
FROZEN = ("data", "space", "imgsz", "batch", "proxy", "latency", "baseline", "device", "artifacts", "prune_to",
          "prune_finetune_epochs")
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
    if key in ("data", "baseline", "artifacts") or (key == "space" and value != "default"):
        return str(Path(value).expanduser().resolve())
    if key in ("proxy", "latency", "early_stop"):
        return json.loads(json.dumps(value, sort_keys=True))
    return value


def merge_settings(given: StudySettings, stored: dict | None, *, force: bool = False) -> StudySettings:
    """`given` with its unset fields filled from `stored` (a resumed study) and then the defaults.

    Raises StudyError naming every FROZEN field that `given` explicitly changes in a stored study, unless `force`.
    """
    values, changed = {}, []
    for key in STORED:
        new = _normalise(key, getattr(given, key))
        if stored is not None and key in stored:
            old = stored[key]
            if isinstance(old, dict) and isinstance(new, dict):
                new = old | new  # --epochs 20 changes one proxy field, not the others
            if new is not None and key in FROZEN and new != old:
                changed.append(f"{key}: {old!r} -> {new!r}")
            values[key] = old if new is None else new
        else:
            values[key] = DEFAULTS.get(key) if new is None else new
    if changed and not force:
        raise StudyError(f"study {given.name!r} was created with other settings; resuming with "
                         f"{'; '.join(changed)} would make its trials incomparable. Drop the option(s) to resume, "
                         "pass --force to accept the change, or start a new study with --study OTHER_NAME")
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
        build_model(path, device="meta")  # a broken model YAML gets the builder's own message (file, row, field)
        return _arch_from_model_yaml(data, space, path)
    if not isinstance(data, dict):
        raise StudyError(f"baseline {path}: expected a mapping of Arch params (P1_depth: 1, ...) or a model YAML")
    return Arch.from_params(data, space, where=f"baseline {path}")


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
    return JournalStorage(JournalFileBackend(str(path), lock_obj=_JournalFlock(path.with_name(path.name + ".flock"))))


class _JournalFlock:
    """The journal's write lock as an flock on a side file: the kernel releases it when its holder dies.

    Optuna's default (a symlink lock) stays behind when a worker is SIGKILLed while appending, and every other
    process then waits out its 30 s grace period before breaking it. Each acquire opens its own descriptor, so the
    threads of one process (a trial and its heartbeat) exclude each other as processes do. One machine's processes
    (or NFS clients with working flock); several hosts share a study through an RDB URL instead. Duck-typed as
    optuna's BaseJournalFileLock (acquire/release), which optuna does not export.
    """

    def __init__(self, path: Path):
        import threading

        self._path = path
        self._held = threading.local()

    def acquire(self) -> bool:
        import fcntl

        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._held.fd = fd
        return True

    def release(self) -> None:
        import fcntl

        fd, self._held.fd = getattr(self._held, "fd", None), None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def make_sampler(settings: StudySettings, stream: int = 0) -> optuna.samplers.BaseSampler:
    """The study's sampler. Optuna 5 samplers read `trial.set_constraint` values (constraints_func is deprecated):
    an over-budget trial sets "budget" = 1.0, so TPE learns where the infeasible region is (NSGA-II and random
    ignore it). `stream` makes each worker process (and each resumed run) draw its own random sequence: the seed is
    settings.seed + 9973 x stream."""
    trials, seed = settings.trials, settings.seed + 9973 * stream
    if settings.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=max(4, min(50, trials // 3)), seed=seed)
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # `group` is experimental
        return optuna.samplers.TPESampler(multivariate=True, group=True, seed=seed,
                                          n_startup_trials=max(3, trials // 4))


def _load_stored(settings: StudySettings) -> dict | None:
    """The stored settings of an existing study, or None (nothing is created when there is no study yet)."""
    if not settings.storage and not (settings.folder / "study.log").is_file():
        return None
    storage = storage_for(settings)
    try:
        study = optuna.load_study(study_name=settings.name, storage=storage)
    except KeyError:
        return None
    raw = study.user_attrs.get(SETTINGS_ATTR)
    return json.loads(raw) if raw else None


def environment() -> dict:
    """Versions that produced a study's numbers: repnas (and its git commit), Python, torch, CUDA, cuDNN, optuna."""
    import platform
    import subprocess
    from importlib import metadata

    try:
        version = metadata.version("repnas")
    except metadata.PackageNotFoundError:
        version = None
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        git = None
    cudnn = torch.backends.cudnn.version() if torch.cuda.is_available() else None
    return {"repnas": version, "git": git, "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": cudnn, "optuna": optuna.__version__, "host": socket.gethostname()}


def load_enqueue(path: str, space: Space) -> dict:
    """Arch params of a known candidate to enqueue: a YAML of Arch params or a model YAML (as --baseline)."""
    return load_baseline(path, space).to_params()


def create_or_load_study(settings: StudySettings, *, enqueue: Sequence[str] = ()) -> optuna.Study:
    """Create the study (frozen baseline latency measured, baseline enqueued as trial 0) or load it.

    `settings` must be resolved (`merge_settings`); `run_search` does that. A loaded study whose stored settings
    differ from `settings` (a forced change) gets them replaced, the change kept in "settings_history".
    `enqueue`: YAMLs of known candidates to enqueue (after the baseline).
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage_for(settings), study_name=settings.name, load_if_exists=True,
                                directions=["maximize", "minimize"], sampler=make_sampler(settings))
    space = load_space(settings.space)
    extra = [load_enqueue(path, space) for path in enqueue]  # all checked before anything is written
    if SETTINGS_ATTR in study.user_attrs:
        if study.user_attrs[SETTINGS_ATTR] != settings_json(settings):
            history = list(study.user_attrs.get("settings_history", []))
            history.append({"time": time.time(), "settings": json.loads(study.user_attrs[SETTINGS_ATTR])})
            study.set_user_attr("settings_history", history)
            study.set_user_attr(SETTINGS_ATTR, settings_json(settings))
    else:
        data_cfg = load_data_config(settings.data)
        baseline = load_baseline(settings.baseline, space)
        device = resolve_device(settings.device)
        fused = fuse_model(build_model(baseline.to_yaml(data_cfg.nc)))
        with file_lock(host_lock_path("latency")):  # frozen for the study's life: the least disturbed of 3
            lat = min((measure_latency(fused, settings.imgsz or space.imgsz, settings.batch, device,
                                       latency_config(settings, device)) for _ in range(BASELINE_REPEATS)),
                      key=lambda m: m.median_ms)
        if SETTINGS_ATTR in study.user_attrs:  # another host created it while this one measured (read afresh)
            if study.user_attrs[SETTINGS_ATTR] != settings_json(settings):
                raise StudyError(f"study {settings.name!r} was created by another process while this one measured "
                                 "its baseline, with other settings; run the same command again to join it with "
                                 "the stored settings (or use another --study name)")
            LOG.info("study %s was created by another process meanwhile: joining it, its baseline latency %.3f ms "
                     "is kept", settings.name, study.user_attrs["baseline_latency_ms"])
        else:
            study.set_user_attr("baseline_latency_ms", lat.median_ms)
            study.set_user_attr("baseline_latency", lat.to_dict())
            study.set_user_attr("baseline_params", baseline.to_params())
            study.set_user_attr("environment", environment())
            study.enqueue_trial(baseline.to_params(), user_attrs={"baseline": True}, skip_if_exists=True)
            study.set_user_attr(SETTINGS_ATTR, settings_json(settings))  # last: without it, not yet created
            LOG.info("created study %s: baseline latency %.3f ms on %s", settings.name, lat.median_ms,
                     lat.device["name"])
    for params in extra:
        study.enqueue_trial(params, user_attrs={"enqueued": True}, skip_if_exists=True)
    return study


# ---------------------------------------------------------------------------------------------------------------
# One trial


class TrialRejected(optuna.TrialPruned):
    """Pruned before training: over budget, or an Arch already trained in this study. Does not count."""


NOT_COUNTED = ("rejected", "duplicate", "surplus")  # pruned_reason values of trials that do not count


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def device_label(info: dict) -> str:
    if info.get("type") == "cuda":
        return str(info.get("name"))
    return f"CPU {info.get('name')}, {info.get('threads')} threads"


def trial_folder(settings: StudySettings, number: int) -> Path:
    return settings.trials_root / str(number)


def _taken_archs(study: optuna.Study, number: int) -> list[dict]:
    """Archs of COMPLETE trials and of other RUNNING ones (a parallel worker may be training the same one)."""
    return [t.user_attrs.get("arch") for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,
                                                                                         TrialState.RUNNING))
            if t.number != number]


def _finished_for_rule(study: optuna.Study, prune_fraction: float | None = None) -> list[Finished]:
    """COMPLETE trials with a curve; only those pruned to the same fraction (their latency is the pruned one)."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.user_attrs.get("prune_fraction") != prune_fraction:
            continue
        latency = t.user_attrs.get("latency_ms")
        if latency is not None and t.user_attrs.get("curve"):
            out.append(Finished(t.number, float(latency), curve_from_attr(t.user_attrs["curve"])))
    return out


def _fusion_error_fp32(model: torch.nn.Module, fused: torch.nn.Module, x: torch.Tensor) -> float:
    """fusion_error with TF32 off: cuDNN's default TF32 convolutions alone differ by ~1e-3 on a GPU."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return fusion_error(model, fused, x)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "CUDA out of memory" in str(err)


def run_trial(trial: optuna.Trial, settings: StudySettings, space: Space, data_cfg: DataConfig,
              baseline_fused: torch.nn.Module) -> tuple[float, float]:
    """Take one sampled Arch through the pipeline; return (mAP50-95, latency objective in ms).

    Raises TrialRejected (over a budget / duplicate) before any training, optuna.TrialPruned when the early-stopping
    rule stops training (partial metrics kept), and lets any other error through. CUDA out of memory in training is
    retried once at half the batch.
    """
    phases: dict[str, float] = {}
    folder = trial_folder(settings, trial.number)
    folder.mkdir(parents=True, exist_ok=True)
    is_baseline = bool(trial.user_attrs.get("baseline"))
    files: dict[str, str] = {}
    rel = folder.relative_to(settings.trials_root).as_posix()

    log: list[str] = []

    def note(line: str) -> None:
        log.append(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}")

    def save(name: str, data: bytes) -> None:
        write_bytes_atomic(folder / name, data)
        files[name] = _sha256(data)
        trial.set_user_attr("files", {n: {"path": f"{rel}/{n}", "sha256": d} for n, d in files.items()})

    def reject(key: str, value: float, why: str) -> None:
        trial.set_user_attr("constraints", [value])
        trial.set_constraint(key, value)
        trial.set_user_attr("rejected", why)
        trial.set_user_attr("pruned_reason", "rejected")
        raise TrialRejected(f"over budget: {why}")

    start = time.perf_counter()
    arch = sample_arch(trial, space)
    trial.set_user_attr("arch", arch.to_params())
    if arch.to_params() in _taken_archs(trial.study, trial.number):
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
    deployed = fuse_model(model)
    fraction = arch.extra("prune_fraction", settings.prune_to)
    probe = None
    if not is_baseline and fraction is not None and float(fraction) < 1:  # the baseline is never pruned
        # Channel counts per group follow the uniform ratio, not the weights: pruning the untrained network gives
        # the final shapes, so the pruned model's cost and latency are known before training (checked after).
        probe = prune_to_flops(deployed, float(fraction), imgsz)
        deployed = probe.model
        trial.set_user_attr("prune_fraction", float(fraction))
        trial.set_user_attr("params_unpruned", cost.params_deploy)
        trial.set_user_attr("gflops_deploy_unpruned", cost.gflops_deploy)
        trial.set_user_attr("params", probe.params_after)
        trial.set_user_attr("gflops_deploy", probe.gflops_after)
        pruned_budget = probe.gflops_after if imgsz == space.imgsz else count_gflops(probe.model, space.imgsz)
        budget_cost = replace(budget_cost, params_deploy=probe.params_after, gflops_deploy=pruned_budget)
    violation = space.budget_violation(budget_cost.params_deploy, budget_cost.gflops_deploy)
    if violation and not is_baseline:  # the baseline is the reference row of every table: never rejected
        reject("budget", 1.0, violation)
    phases["build"] = time.perf_counter() - start
    note(f"built {arch.to_params()}: {cost.params_deploy:,} params, {cost.gflops_deploy:.3f} deploy GFLOPs at {imgsz}"
         + (f"; pruned to {probe.gflops_after:.3f} GFLOPs ({float(fraction):g})" if probe else ""))

    start = time.perf_counter()
    device = resolve_device(settings.device)
    with file_lock(host_lock_path("latency")):  # workers sharing a machine time one at a time
        lat = measure_latency(deployed, imgsz, settings.batch, device, latency_config(settings, device),
                              reference=baseline_fused)
    latency_ms = lat.latency_ratio * trial.study.user_attrs["baseline_latency_ms"]
    trial.set_user_attr("latency_ms", latency_ms)
    trial.set_user_attr("latency_measured_ms", lat.median_ms)
    trial.set_user_attr("latency_p90_ms", lat.p90_ms)
    trial.set_user_attr("latency_ratio", lat.latency_ratio)
    trial.set_user_attr("device", lat.device)
    phases["latency"] = time.perf_counter() - start
    note(f"latency {lat.median_ms:.3f} ms median on {device_label(lat.device)}, ratio {lat.latency_ratio:.4f} to the "
         f"baseline -> objective {latency_ms:.3f} ms")
    if not is_baseline:
        if settings.max_latency_ms is not None and latency_ms > settings.max_latency_ms:
            reject("latency", latency_ms / settings.max_latency_ms - 1,
                   f"latency {latency_ms:.3f} ms > max_latency_ms {settings.max_latency_ms:g}")
        if settings.max_latency_ratio is not None and lat.latency_ratio > settings.max_latency_ratio:
            reject("latency", lat.latency_ratio / settings.max_latency_ratio - 1,
                   f"latency ratio {lat.latency_ratio:.3f} > max_latency_ratio {settings.max_latency_ratio:g}")

    start = time.perf_counter()
    cfg = proxy_config(settings)
    trial.set_user_attr("proxy", cfg.to_dict())
    rule = EarlyStopConfig(**(settings.early_stop or {}))
    curve: list[list] = []
    stop_reason: list[str] = []

    def on_validation(epoch: int, losses: dict, map50_95: float, map50: float) -> bool:
        curve.append([epoch, map50_95, map50])
        trial.set_user_attr("curve", curve)
        best = max(row[1] for row in curve)  # the rule credits the trial with its best validation so far
        reason = None if is_baseline else should_stop(epoch, best, latency_ms, cfg.epochs,
                                                      _finished_for_rule(trial.study, trial.user_attrs.get(
                                                          "prune_fraction")), rule)
        if reason:
            stop_reason.append(reason)
        return bool(reason)

    result = None
    try:
        result = fit(model, data_cfg, cfg, callbacks=(on_validation,))
    except Exception as err:
        if not (_is_oom(err) and cfg.batch >= 2):
            raise
    if result is None:  # out of memory: retry once at half the batch, outside the except block so that the failed
        import gc  # attempt's frames (activations, optimizer state) can be freed first

        del model
        gc.collect()
        torch.cuda.empty_cache()
        cfg = replace(cfg, batch=cfg.batch // 2)
        trial.set_user_attr("oom_retry", f"CUDA out of memory at batch {cfg.batch * 2}; retried at batch {cfg.batch}")
        trial.set_user_attr("proxy", cfg.to_dict())
        curve.clear()
        model = build_model(arch.to_yaml(data_cfg.nc))
        result = fit(model, data_cfg, cfg, callbacks=(on_validation,))
    save("epochs.csv", epochs_csv(result.history).encode())
    phases["train"] = time.perf_counter() - start
    note(f"trained {len(result.history)} epochs in {phases['train']:.1f} s" + (f" ({stop_reason[0]})" if stop_reason
                                                                               else ""))
    if result.stopped_early:
        last = curve[-1]
        summary = {"trial": trial.number, "arch": arch.to_params(), "stopped": stop_reason[0],
                   "stopped_epoch": last[0], "partial_map50_95": last[1], "partial_map50": last[2],
                   "latency_ms": latency_ms, "seconds": phases}
        save("metrics.json", json.dumps(summary, indent=2, default=str).encode())
        trial.set_user_attr("stopped_epoch", last[0])
        trial.set_user_attr("partial_map50_95", last[1])
        trial.set_user_attr("partial_map50", last[2])
        trial.set_user_attr("seconds", phases)
        trial.set_user_attr("pruned_reason", stop_reason[0])
        save("trial.log", ("\n".join(log) + "\n").encode())
        raise optuna.TrialPruned(stop_reason[0])
    save("weights.pt", state_dict_bytes(model))

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
    # fit's last validation (EMA weights, proxy size) is what was trained; the fused model is evaluated again
    # only in float32 on the CPU, where fusion is exact to ~1e-7 and the figure would be the same.
    if result.metrics is not None and x.device.type == "cpu":
        metrics = result.metrics
    else:
        metrics = evaluate(fused, data_cfg, cfg.imgsz, batch=cfg.batch * 2, device=x.device)
    phases["eval"] = time.perf_counter() - start
    map50_95, map50 = metrics.map50_95, metrics.map50
    params, gflops_deploy = cost.params_deploy, cost.gflops_deploy

    if probe is not None:
        start = time.perf_counter()
        trial.set_user_attr("map50_95_unpruned", map50_95)
        trial.set_user_attr("map50_unpruned", map50)
        epochs = settings.prune_finetune_epochs
        epochs = math.ceil(cfg.epochs / 5) if epochs is None else epochs
        tune = ProxyConfig.finetune(epochs=max(epochs, 1), imgsz=cfg.imgsz, batch=cfg.batch, device=str(x.device),
                                    quiet=cfg.quiet, cache_images=cfg.cache_images)
        report = prune_job(fused, data_cfg, float(fraction), imgsz=imgsz, eval_imgsz=cfg.imgsz,
                           finetune_epochs=epochs, finetune=tune, device=str(x.device), evaluate_before=False,
                           measure=False)
        if report.result.plan != probe.plan:  # not expected (see above); then time the network that is ranked
            with file_lock(host_lock_path("latency")):
                lat = measure_latency(report.model, imgsz, settings.batch, device, latency_config(settings, device),
                                      reference=baseline_fused)
            latency_ms = lat.latency_ratio * trial.study.user_attrs["baseline_latency_ms"]
            trial.set_user_attr("latency_ms", latency_ms)
            trial.set_user_attr("latency_ratio", lat.latency_ratio)
            trial.set_user_attr("latency_remeasured", True)
        save_pruned(report.model, folder / "pruned", report.result.plan,
                    info={"data": str(data_cfg.source), "train_imgsz": cfg.imgsz, "target": float(fraction)})
        for name in ("channels.json", "weights.pt"):
            files[f"pruned/{name}"] = _sha256((folder / "pruned" / name).read_bytes())
        map50_95, map50 = report.map_finetuned or report.map_pruned
        params, gflops_deploy = report.result.params_after, report.result.gflops_after
        trial.set_user_attr("prune", {k: v for k, v in report.to_dict().items() if k != "channels"})
        phases["prune"] = time.perf_counter() - start

    summary = {"trial": trial.number, "arch": arch.to_params(), "map50_95": map50_95,
               "map50": map50, "latency_ms": latency_ms, "latency_ratio": lat.latency_ratio,
               "latency": lat.to_dict(), "params": params, "gflops": cost.gflops,
               "gflops_deploy": gflops_deploy, "imgsz": imgsz, "proxy": cfg.to_dict(), "seconds": phases,
               "data": str(data_cfg.source), "fusion_error": error, "prune_fraction": fraction if probe else None}
    save("metrics.json", json.dumps(summary, indent=2, default=str).encode())
    note(f"fused (error {error:.2e}) and evaluated: mAP50-95 {map50_95:.4f}, mAP50 {map50:.4f}; phases "
         + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()))
    save("trial.log", ("\n".join(log) + "\n").encode())
    trial.set_user_attr("map50_95", map50_95)
    trial.set_user_attr("map50", map50)
    trial.set_user_attr("seconds", phases)
    trial.set_user_attr("constraints", [0.0])
    trial.set_constraint("budget", 0.0)
    return map50_95, latency_ms


# ---------------------------------------------------------------------------------------------------------------
# Claiming trials, leases and stale trials


def counts(trial: FrozenTrial) -> bool:
    """Whether a finished trial counts toward --trials: COMPLETE, or PRUNED by the early-stopping rule."""
    if trial.state == TrialState.COMPLETE:
        return True
    return trial.state == TrialState.PRUNED and trial.user_attrs.get("pruned_reason") not in NOT_COUNTED


def _busy(t: FrozenTrial) -> bool:
    return counts(t) or t.state == TrialState.RUNNING


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` still runs on this machine.

    A zombie does not: it has exited and only waits for its parent to reap it, which may take a while (or never
    happen: a container's PID 1 that does not reap), yet signal 0 still reaches it. On Linux its /proc state says so,
    and a worker killed with its coordinator is then taken for dead at once, as it is.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return not Path("/proc/self/stat").is_file()  # Linux: it has just ended; elsewhere there is no /proc
    except OSError:
        return True
    return stat[stat.rindex(")") + 2:][:1] not in ("Z", "X")  # the state letter after "PID (comm) "


def _ask_lock(settings: StudySettings):
    """Count + ask under a file lock when the storage is this machine's journal file (no surplus trials)."""
    from contextlib import nullcontext

    return nullcontext() if settings.storage else file_lock(settings.folder / ".ask.lock")


def claim_trial(study: optuna.Study, settings: StudySettings) -> optuna.Trial | None:
    """A new trial for this worker, or None when the study has (or is running) enough trials to reach --trials.

    Under a local lock, count + ask is atomic. Across hosts (an RDB storage) two workers may ask at once: the trial
    whose number comes after `--trials` busy (counted or running) ones is then released as PRUNED "surplus", which
    does not count, and its enqueued params (if any) are enqueued again.
    """
    with _ask_lock(settings):
        if sum(_busy(t) for t in study.get_trials(deepcopy=False)) >= settings.trials:
            return None
        trial = study.ask()
        _take_lease(trial)
    ahead = sum(_busy(t) for t in study.get_trials(deepcopy=False) if t.number < trial.number)
    if ahead < settings.trials:
        return trial
    trial.set_user_attr("pruned_reason", "surplus")
    fixed = study.get_trials(deepcopy=False)[trial.number].system_attrs.get("fixed_params")
    study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
    if fixed:
        study.enqueue_trial(fixed, user_attrs={k: v for k, v in trial.user_attrs.items()
                                               if k in ("baseline", "enqueued", "requeued_from")})
    return None


def host_id() -> str:
    """This machine: its hostname and, on Linux, its boot id (two containers or hosts may share a hostname)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}" if boot else socket.gethostname()


def _take_lease(trial: optuna.Trial) -> None:
    trial.set_user_attr("host", host_id())
    trial.set_user_attr("pid", os.getpid())
    trial.set_user_attr("heartbeat", time.time())


class Heartbeat:
    """Renews a running trial's lease (user attr "heartbeat" = time.time()) every `interval` seconds in a thread.

    The thread ends when the trial is finished (the storage refuses the write) or `stop()` is called. In a worker
    process started by a coordinator it also ends the process when the coordinator is gone.
    """

    def __init__(self, study: optuna.Study, trial_id: int, interval: float = HEARTBEAT_S,
                 parent_pid: int | None = None):
        import threading

        self._stop = threading.Event()
        self._args = study._storage, trial_id, interval, parent_pid
        self._thread = threading.Thread(target=self._run, name="repnas-heartbeat", daemon=True)

    def _run(self) -> None:
        storage, trial_id, interval, parent = self._args
        while not self._stop.wait(interval):
            if parent is not None and not _pid_alive(parent):
                os._exit(EXIT_ORPHANED)
            try:
                storage.set_trial_user_attr(trial_id, "heartbeat", time.time())
            except optuna.exceptions.UpdateFinishedTrialError:  # finished (or marked stale): nothing to renew
                return
            except Exception as err:  # a storage hiccup (network, lock): try again at the next beat
                LOG.warning("heartbeat of trial id %s failed (%s); retrying", trial_id, err)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


EXIT_ORPHANED = 75


def recover_stale_trials(study: optuna.Study, stale_after: float = DEFAULTS["stale_after"]) -> list[int]:
    """Mark RUNNING trials whose worker is gone as FAILED and re-enqueue their Arch once; return their numbers.

    A worker is gone when it ran on this host and its PID is dead, or when its lease (heartbeat, else the trial's
    start) is older than `stale_after` seconds (any host; hosts' clocks are assumed to agree to well within that).
    """
    host, now = host_id(), time.time()
    marked = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = t.user_attrs
        pid, beat = attrs.get("pid"), attrs.get("heartbeat")
        if beat is None and t.datetime_start is not None:
            beat = t.datetime_start.timestamp()
        if attrs.get("host") == host and isinstance(pid, int) and not _pid_alive(pid):
            reason = "stale: worker died"
        elif isinstance(beat, (int, float)) and now - beat > stale_after:
            reason = f"stale: no heartbeat from {attrs.get('host')} pid {pid} for {now - beat:.0f} s"
        else:
            continue
        try:  # whoever tells FAIL first re-enqueues; a concurrent recoverer (or the trial finishing) wins the race
            study._storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
            study.tell(t.number, state=TrialState.FAIL)
        except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError, ValueError):
            continue
        marked.append(t.number)
        requeue(study, t, "stale")
    return marked


MAX_REQUEUES = 2  # an Arch whose trials keep dying (e.g. the kernel's OOM killer) is not enqueued forever


def requeue(study: optuna.Study, t: FrozenTrial | optuna.Trial, why: str) -> bool:
    """Enqueue the params of a trial that did not finish (stale, interrupted) again, keeping its baseline/enqueued
    marks; at most MAX_REQUEUES times along a chain. Returns whether it was enqueued."""
    frozen = study._storage.get_trial(t._trial_id)
    attrs = frozen.user_attrs
    params = attrs.get("arch") or frozen.system_attrs.get("fixed_params") or frozen.params
    requeues = int(attrs.get("requeues", 0)) + 1
    if not params or requeues > MAX_REQUEUES:
        return False
    keep = {k: attrs[k] for k in ("baseline", "enqueued") if attrs.get(k)}
    # not enqueue_trial(skip_if_exists=True): it matches the unfinished trial itself and would never re-enqueue
    study.enqueue_trial(params, user_attrs={"requeued_from": frozen.number, "requeues": requeues,
                                            "requeue_reason": why} | keep)
    return True


def trial_records(study: optuna.Study, settings: StudySettings) -> list[TrialRecord]:
    """One TrialRecord per trial, for the Pareto files (early-stopped trials keep their partial mAP off the table)."""
    records = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        arch = attrs.get("arch") or {}
        stages = tuple((arch.get(f"{n}_depth"), arch.get(f"{n}_width"), bool(arch.get(f"{n}_se")))
                       for n in STAGE_NAMES) if arch else ()
        model_yaml = attrs.get("files", {}).get("model.yaml", {}).get("path")
        if model_yaml:
            model_yaml = os.path.relpath(settings.trials_root / model_yaml, settings.folder)
        records.append(TrialRecord(
            number=t.number, state=t.state.name, map50_95=attrs.get("map50_95"), map50=attrs.get("map50"),
            latency_ms=attrs.get("latency_ms"), latency_ratio=attrs.get("latency_ratio"),
            device=device_label(attrs["device"]) if "device" in attrs else "", params=attrs.get("params"),
            gflops_deploy=attrs.get("gflops_deploy"), stages=stages, yaml_path=model_yaml,
            is_baseline=bool(attrs.get("baseline")), pruned=attrs.get("prune_fraction"),
        ))
    return records


def trial_line(t: FrozenTrial) -> str:
    """One printed line per finished trial."""
    a = t.user_attrs

    def num(key: str, fmt: str) -> str:
        value = a.get(key, a.get(f"partial_{key}"))
        return format(value, fmt) if value is not None else "-"

    seconds = sum((a.get("seconds") or {}).values())
    why = a.get("fail_reason") or a.get("rejected") or a.get("pruned_reason") or ""
    return (f"trial {t.number:>4} {t.state.name:<8} mAP50-95 {num('map50_95', '.4f'):>7} mAP50 {num('map50', '.4f'):>7}"
            f" latency {num('latency_ms', '.3f'):>8} ms ratio {num('latency_ratio', '.3f'):>6}"
            f" GFLOPs {num('gflops_deploy', '.3f'):>8} {seconds:>7.1f} s" + (f"  {why}" if why else ""))


def export_files(study: optuna.Study, settings: StudySettings, out_dir: str | Path | None = None,
                 formats: Sequence[str] | str = FORMATS) -> dict[str, Path]:
    return export_pareto(trial_records(study, settings), out_dir or settings.folder, formats,
                         title=f"repnas study {settings.name}: mAP50-95 vs latency")


WEIGHT_FILES = ("weights.pt", "fused.pt", "pruned/weights.pt")


def weights_to_keep(study: optuna.Study, keep: int) -> set[int]:
    """Trials whose weights `--keep-weights keep` keeps: the Pareto front and the top-`keep` by mAP50-95.

    Safe to apply at any time: a trial once dominated stays dominated, and one that leaves the top-k never re-enters.
    """
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
    front = {t.number for t in study.best_trials} if done else set()
    top = sorted(done, key=lambda t: (-t.values[0], t.number))[:keep]
    return front | {t.number for t in top}


def clean_weights(study: optuna.Study, settings: StudySettings, keep: int) -> list[Path]:
    """Delete weight files of finished trials outside `weights_to_keep`; return the removed paths."""
    kept = weights_to_keep(study, keep)
    root = settings.trials_root.resolve()
    removed = []
    for t in study.get_trials(deepcopy=False):
        if t.number in kept or t.state in (TrialState.RUNNING, TrialState.WAITING):
            continue
        folder = trial_folder(settings, t.number)
        if not folder.resolve().is_relative_to(root):  # a symlinked trial folder: never delete outside the study
            LOG.warning("weights cleaning: %s leads outside %s; left alone", folder, root)
            continue
        for name in WEIGHT_FILES:
            path = folder / name
            if path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)  # another worker may clean at the same moment
                removed.append(path)
    return removed


def _run_start(study: optuna.Study) -> int:
    """The first trial number a run about to start can create or run: the lowest WAITING one, else the next."""
    trials = study.get_trials(deepcopy=False)
    return min([t.number for t in trials if t.state == TrialState.WAITING] + [len(trials)])


def _failures_since(study: optuna.Study, first: int) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            if t.number >= first and not str(t.user_attrs.get("fail_reason", "")).startswith("stale")]


@dataclass
class _Context:
    """What every trial of a run needs, loaded once per worker."""

    settings: StudySettings
    study: optuna.Study
    space: Space
    data_cfg: DataConfig
    baseline_fused: torch.nn.Module
    first: int  # trials numbered from here on were created by this run (max_failures counts their failures)


def _context(settings: StudySettings, study: optuna.Study, first: int) -> _Context:
    space = load_space(settings.space)
    data_cfg = load_data_config(settings.data)
    baseline = Arch.from_params(study.user_attrs["baseline_params"], space)
    return _Context(settings, study, space, data_cfg, fuse_model(build_model(baseline.to_yaml(data_cfg.nc))), first)


def _safe(what: str, fn: Callable, *args) -> None:
    """Run a reporting/housekeeping step; its failure is logged, never fatal to the worker."""
    try:
        fn(*args)
    except Exception as err:  # e.g. a full disk while writing the Pareto PNG: the study itself is intact
        LOG.warning("%s failed: %s: %s", what, type(err).__name__, err)


def _finish(study: optuna.Study, trial: optuna.Trial, **tell) -> bool:
    """Tell the trial's end; False when it was already finished by someone else (its lease was taken as lost)."""
    try:
        study.tell(trial, **tell)
    except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError, ValueError) as err:
        if study._storage.get_trial(trial._trial_id).state.is_finished():
            return False
        raise err
    return True


def _work(ctx: _Context, report: Callable[[str], None], parent_pid: int | None = None) -> None:
    """One worker's loop: claim a trial, run it, tell it, export; until the study has its trials."""
    settings, study = ctx.settings, ctx.study
    skipped_in_a_row, max_skipped = 0, max(20, 5 * settings.trials)
    while sum(counts(t) for t in study.get_trials(deepcopy=False)) < settings.trials:
        trial = claim_trial(study, settings)
        if trial is None:  # enough trials are running: unless one of them belongs to a dead worker, we are done
            if recover_stale_trials(study, settings.stale_after):
                continue
            return
        folder = trial_folder(settings, trial.number)
        told = True
        try:
            with Heartbeat(study, trial._trial_id, parent_pid=parent_pid):
                values = run_trial(trial, settings, ctx.space, ctx.data_cfg, ctx.baseline_fused)
        except optuna.exceptions.UpdateFinishedTrialError:
            told = False  # marked stale by another process while it ran: its result cannot be recorded
        except optuna.TrialPruned as why:
            try:
                trial.set_user_attr("pruned_reason", trial.user_attrs.get("pruned_reason") or str(why))
                told = _finish(study, trial, state=TrialState.PRUNED)
            except optuna.exceptions.UpdateFinishedTrialError:
                told = False
        except KeyboardInterrupt:
            try:
                trial.set_user_attr("fail_reason", "interrupted")
                if _finish(study, trial, state=TrialState.FAIL):
                    requeue(study, trial, "interrupted")  # the baseline or an enqueued candidate is not lost
            finally:
                _safe("Pareto export", export_files, study, settings)
            raise
        except Exception as err:  # any trial error fails the trial, not the study
            reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
            folder.mkdir(parents=True, exist_ok=True)
            _safe("traceback", write_text_atomic, folder / "traceback.txt", traceback.format_exc())
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # after an OOM the next trial should start from a clean cache
            try:
                trial.set_user_attr("fail_reason", reason)
                told = _finish(study, trial, state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                told = False
        else:
            told = _finish(study, trial, values=values)
        if not told:
            report(f"trial {trial.number:>4} lost its lease (marked stale by another worker); its result is dropped")
            continue
        frozen = study._storage.get_trial(trial._trial_id)
        skipped_in_a_row = 0 if counts(frozen) or frozen.state == TrialState.FAIL else skipped_in_a_row + 1
        report(trial_line(frozen))
        _safe("Pareto export", export_files, study, settings)
        if settings.keep_weights is not None:
            _safe("weights cleaning", clean_weights, study, settings, settings.keep_weights)
        failures = _failures_since(study, ctx.first)
        if len(failures) >= settings.max_failures:
            last = failures[-1]
            raise SearchStopped(f"study {settings.name!r} stopped: {len(failures)} trials failed in this run "
                                f"(max_failures={settings.max_failures}); last: {last.user_attrs.get('fail_reason')}."
                                f" See {trial_folder(settings, last.number) / 'traceback.txt'}")
        if skipped_in_a_row >= max_skipped:
            raise SearchStopped(f"study {settings.name!r} stopped: the last {skipped_in_a_row} sampled Archs were "
                                "over budget or already trained; widen the space or its budgets")


# A new study without --data is the demo: the synthetic shapes' demo set (nas.synth.DEMO_DATA: 2 classes, large
# objects, plain background, 64 px), sized to finish on a 2-core CPU in ten minutes (see benchmarks/RESULTS.md).
# At 64 px YOLOv5's objectness gain, scaled by (imgsz/640)^2, is 1/6.25 of the 160-px proxy's: the demo restores
# the proxy's balance (obj 6.25), and trains at a higher rate for its short schedule. Options given explicitly win;
# --data brings the full defaults.
DEMO: dict[str, Any] = {"trials": 8, "proxy": {"epochs": 10, "imgsz": 64, "batch": 16, "val_every": 2, "lr0": 0.004,
                                               "loss": {"obj": 6.25}},
                        "imgsz": 320, "latency": {"warmup": 2, "iters": 10, "rounds": 5}}


def demo_settings(settings: StudySettings) -> StudySettings:
    """`settings` with its unset fields (and unset proxy/latency keys) taken from DEMO."""
    changes = {}
    for key, value in DEMO.items():
        given = getattr(settings, key)
        if isinstance(value, dict):
            changes[key] = value | (given or {})
        elif given is None:
            changes[key] = value
    return replace(settings, **changes)


def prepare_study(settings: StudySettings, *, force: bool = False,
                  enqueue: Sequence[str] = ()) -> tuple[StudySettings, optuna.Study]:
    """Resolve `settings` against the stored ones and create or load the study (no trial is run)."""
    from nas.synth import DEMO_DATA, default_dataset

    stored = _load_stored(settings)
    if stored is None and settings.data is None:
        settings = demo_settings(settings)
    settings = merge_settings(settings, stored, force=force)
    if settings.data is None:  # only a new study without --data: a stored study always names its data
        settings = replace(settings, data=str(default_dataset(DEMO_DATA).resolve()))
    if settings.imgsz is None:  # latency/cost input size: the space's own unless given
        settings = replace(settings, imgsz=load_space(settings.space).imgsz)
    check_settings(settings)  # bad input fails here, before anything is written
    return settings, create_or_load_study(settings, enqueue=enqueue)


def check_settings(settings: StudySettings) -> None:
    """Load and check everything a study's settings name (space, data, baseline, device, proxy, latency, early
    stopping) without writing anything; raises the error a trial would otherwise hit."""
    space = load_space(settings.space)
    check_dataset(load_data_config(settings.data))  # nothing usable: refused here, before a study is written
    load_baseline(settings.baseline, space)
    device = resolve_device(settings.device)
    proxy_config(settings)
    latency_config(settings, device)
    try:
        EarlyStopConfig(**(settings.early_stop or {}))
    except (TypeError, ValueError) as err:
        raise StudyError(f"early_stop settings {settings.early_stop}: {err}") from None


def default_workers(settings: StudySettings, *, demo: bool, devices: Sequence[str] = ()) -> int:
    """Workers when --workers is not given: 1; the demo on a CPU, one single-threaded worker per core, up to 2.

    The demo's small models at 64 px train faster as one single-threaded process per core than as one process
    using every core (its threads mostly wait on each other at these sizes; see benchmarks/RESULTS.md)."""
    if demo and not devices and resolve_device(settings.device).type == "cpu":
        return min(2, os.cpu_count() or 1)
    return 1


def run_search(settings: StudySettings, *, report: Callable[[str], None] | None = None, workers: int | None = None,
               devices: Sequence[str] = (), force: bool = False, enqueue: Sequence[str] = ()) -> optuna.Study:
    """Run (or resume) a study until `settings.trials` trials count; export the Pareto files after every trial.

    `workers` > 1 (or several `devices`, CUDA indices: worker i uses devices[i % len]) runs that many worker
    processes against the storage; this process coordinates (None: `default_workers`). Raises SearchStopped after
    `max_failures` failed trials in this run, or when the sampler keeps proposing Archs that are over budget or
    already trained. Ctrl-C fails the running trial(s) ("interrupted") and re-raises.
    """
    report = report or (lambda line: None)
    demo = settings.data is None and _load_stored(settings) is None
    settings, study = prepare_study(settings, force=force, enqueue=enqueue)
    if workers is None:
        workers = default_workers(settings, demo=demo, devices=devices)
    stale = recover_stale_trials(study, settings.stale_after)
    requeued = {t.user_attrs.get("requeued_from") for t in study.get_trials(deepcopy=False, states=(
        TrialState.WAITING,))} if stale else set()
    for number in stale:  # requeue() enqueues nothing for a trial killed before its Arch was sampled
        for tmp in trial_folder(settings, number).glob(".*.tmp"):  # what a write cut short by the kill left
            tmp.unlink(missing_ok=True)
        report(f"trial {number:>4} FAILED   stale: its worker is gone; " + (
            "its Arch is enqueued again" if number in requeued else
            f"its Arch is not enqueued again (none sampled yet, or tried {MAX_REQUEUES + 1} times)"))
    first = _run_start(study)
    if workers <= 1 and len(devices) <= 1:
        if devices:
            settings = replace(settings, device=f"cuda:{devices[0]}")  # for this run only, not stored
        study.sampler = make_sampler(settings, len(study.get_trials(deepcopy=False)))  # each run: its own draws
        _work(_context(settings, study, first), report)
    else:
        _run_workers(settings, max(workers, len(devices)), devices, first, report)
    # Once more at the end of every run: a process killed after telling its last trial but before (or while)
    # writing the Pareto files left them behind the study, and a resume with no trial left to run must repair them.
    _safe("Pareto export", export_files, study, settings)
    counted = sum(counts(t) for t in study.get_trials(deepcopy=False))
    running = sum(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False))
    if counted < settings.trials and running:
        report(f"{counted} of {settings.trials} trials counted; {running} still RUNNING in other workers")
    return study


# ---------------------------------------------------------------------------------------------------------------
# Worker processes


def _worker_command(settings: StudySettings, index: int, device: str | None, first: int, threads: int | None):
    import sys

    spec = {"settings": {f.name: getattr(settings, f.name) for f in fields(StudySettings)}, "index": index,
            "device": device, "first": first, "parent": os.getpid(), "threads": threads}
    return [sys.executable, "-m", "nas.study", "--worker", json.dumps(spec)]


def _run_workers(settings: StudySettings, n: int, devices: Sequence[str], first: int,
                 report: Callable[[str], None]) -> None:
    """Start `n` worker processes, relay their lines, wait; stop them all on Ctrl-C or when this process exits."""
    import signal
    import subprocess
    import threading

    threads = None
    if not devices and resolve_device(settings.device).type == "cpu":
        threads = max(1, (os.cpu_count() or 1) // n)  # n workers on one CPU: no oversubscription
    # own sessions: a terminal's Ctrl-C reaches this process only, which forwards one SIGINT to each worker
    procs = [subprocess.Popen(_worker_command(settings, i, f"cuda:{devices[i % len(devices)]}" if devices else None,
                                              first, threads), stdout=subprocess.PIPE, text=True, bufsize=1,
                              start_new_session=True)
             for i in range(n)]

    def relay(i: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            report(f"[worker {i}] {line.rstrip()}")

    relays = [threading.Thread(target=relay, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for thread in relays:
        thread.start()
    try:
        codes = [p.wait() for p in procs]
    except BaseException:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        deadline = time.time() + 30
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    finally:
        for thread in relays:
            thread.join(timeout=5)
    study = load_study(settings.name, storage=settings.storage, results=settings.results)
    if sum(counts(t) for t in study.get_trials(deepcopy=False)) >= settings.trials:
        return  # the study has its trials, whatever a worker said on its way out
    if any(code not in (0, EXIT_STOPPED) for code in codes):
        raise StudyError(f"study {settings.name!r}: worker exit codes {codes} (see their lines above); resume with "
                         f"`repnas resume {settings.name}`")
    if any(code == EXIT_STOPPED for code in codes):
        raise SearchStopped(f"study {settings.name!r} stopped: a worker gave up (see its lines above)")


EXIT_STOPPED = 3


def _die_with_parent() -> None:
    """Linux: ask the kernel to SIGKILL this process when its parent dies (no orphaned workers)."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # elsewhere the heartbeat thread notices the parent is gone


def worker_main(spec_json: str) -> int:
    """Entry point of a worker process started by `_run_workers`."""
    spec = json.loads(spec_json)
    _die_with_parent()
    if not _pid_alive(spec["parent"]):
        return EXIT_ORPHANED
    settings = StudySettings(**spec["settings"])
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    study = load_study(settings.name, storage=settings.storage, results=settings.results)  # made by the coordinator
    study.sampler = make_sampler(settings, 1 + spec["index"] + len(study.get_trials(deepcopy=False)))
    if spec["device"]:
        settings = replace(settings, device=spec["device"])  # this worker's GPU, not the study's setting
    try:
        _work(_context(settings, study, spec["first"]), lambda line: print(line, flush=True), spec["parent"])
    except SearchStopped as err:
        print(f"stopped: {err}", flush=True)
        return EXIT_STOPPED
    except KeyboardInterrupt:
        return 130
    return 0


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
    return export_files(study, stored_settings(study, name, storage, results), out_dir, formats)


def stored_settings(study: optuna.Study, name: str, storage: str | None = None,
                    results: str = "results") -> StudySettings:
    """The settings a study was created with (as far as StudySettings knows them)."""
    stored = json.loads(study.user_attrs.get(SETTINGS_ATTR, "{}"))
    known = {k: v for k, v in stored.items() if k in STORED}
    return StudySettings(name=name, storage=storage, results=results, **known)


def clean_study(name: str, keep: int | None = None, *, storage: str | None = None,
                results: str = "results") -> tuple[list[Path], set[int]]:
    """`repnas clean`: delete weights outside the front and the top-`keep` (default: the study's keep_weights)."""
    study = load_study(name, storage=storage, results=results)
    settings = stored_settings(study, name, storage, results)
    keep = keep if keep is not None else (settings.keep_weights or 0)
    return clean_weights(study, settings, keep), weights_to_keep(study, keep)


def summary_line(study: optuna.Study) -> str:
    trials = study.get_trials(deepcopy=False)
    by_state = {s: sum(t.state == s for t in trials) for s in TrialState}
    rejected = sum(t.state == TrialState.PRUNED and not counts(t) for t in trials)
    front = len(study.best_trials) if by_state[TrialState.COMPLETE] else 0
    return (f"study {study.study_name}: {len(trials)} trials, {by_state[TrialState.COMPLETE]} complete, "
            f"{by_state[TrialState.FAIL]} failed, {rejected} rejected or duplicate; {front} on the Pareto front")




def _reason_template(reason: str) -> str:
    """A failure reason with its figures written as '#': `repnas show` counts failures that differ only in them
    (the batch where a loss became NaN, the bytes CUDA tried to allocate, a dead worker's PID) as one reason."""
    return re.sub(r"\d+(?:\.\d+)?(?:e[+-]?\d+)?", "#", reason)


def show_study(name: str, *, storage: str | None = None, results: str = "results") -> str:
    """One screen about a study: settings, trials by state (failures by reason), the front, time left."""
    from collections import Counter

    import numpy as np

    from nas.pareto import default_reference, hypervolume, pareto_table

    study = load_study(name, storage=storage, results=results)
    settings = stored_settings(study, name, storage, results)
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
    groups: dict[str, set[str]] = {}  # template -> the distinct reasons it stands for
    failures: Counter = Counter()
    for t in trials:
        if t.state == TrialState.FAIL:
            reason = str(t.user_attrs.get("fail_reason", "unknown"))
            failures[_reason_template(reason)] += 1
            groups.setdefault(_reason_template(reason), set()).add(reason)
    if failures:  # a group shows its one message, or its template when its messages differ in their figures,
        # up to its first "; " (this line's separator; the advice after it is in the trial's traceback.txt)
        shown = {key: (next(iter(group)) if len(group) == 1 else key).split("; ")[0][:80]
                 for key, group in groups.items()}
        lines.append("  failed: " + "; ".join(f"{n} x {shown[key]}" for key, n in failures.most_common()))
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


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2]))
    sys.exit("usage: python -m nas.study --worker SPEC_JSON (started by `repnas search --workers N`)")
