"""What a study is: `StudySettings`, its defaults, what is frozen on resume, how stored and given settings merge,
the demo's settings, and the checks that run before anything is written.

A new study stores its settings fully resolved (format 3): `proxy` holds every ProxyConfig field and `latency`
every LatencyConfig field (its `backend` included) plus the device kind and the CPU threads its latency is timed
with, so a later change of a default in the code never changes how a resumed study trains or times, and every host
of one study agrees. Studies stored before are read through `upgrade_stored`: format 1 (only the proxy/latency fields
given, `imgsz`/`batch` for the latency input) is resolved with the defaults of the version that made them (repnas
0.1.0); formats 1 and 2 name no latency backend: theirs is `torch` (eager), or `cudagraph` where they set the
`cuda_graph` flag that the backend replaced.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from nas.data import check_dataset, load_data_config
from nas.device import resolve_device
from nas.earlystop import EarlyStopConfig
from nas.latency import LatencyBackendError, LatencyConfig, latency_backend
from nas.train import ProxyConfig
from space.errors import RepnasError, SpaceConfigError
from space.searchspace import Arch, Space, builtin_spaces, is_seed_source, load_space, seed_arch
from space.yamlio import read_yaml


class StudyError(RepnasError):
    """A study that cannot be created, resumed or exported as asked."""


class SearchStopped(RepnasError):
    """The search stopped before reaching its trial count (too many failures, or nothing left to try)."""


class InvalidStudyName(StudyError):
    """A study name that could escape results/ or is not portable."""


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SAMPLERS = ("tpe", "nsga2", "random")
HEARTBEAT_S = 30.0  # a running trial's lease is renewed this often (nas.study.leases)
SETTINGS_FORMAT = 3  # 1: deltas from the defaults, latency input as imgsz/batch; 2: resolved proxy and latency;
# 3: the latency settings name their backend (LatencyConfig.backend; the `cuda_graph` flag is gone)


@dataclass(frozen=True)
class StudySettings:
    """What a study is. A field left None means "not given": the stored value on resume, else the default.

    `proxy`: ProxyConfig fields (given: those to change; stored: all of them, resolved at creation); `latency`:
    LatencyConfig fields (stored resolved, with `backend`, `device_type` and `threads`; a new study's backend is
    `LatencyConfig.for_device`'s: `cudagraph` on CUDA, `torch` on a CPU); `early_stop`: EarlyStopConfig fields.
    `latency_imgsz`/`latency_batch`: the latency and GFLOPs input (None: the space's imgsz, batch 1; the proxy's
    training input is `proxy["imgsz"]`/`proxy["batch"]`). `baseline`: a YAML with the baseline's Arch params, or a
    model YAML an Arch of the space writes (None: `seed_arch(space)`). `max_latency_ms`/`max_latency_ratio` reject
    slower Archs before training. `keep_weights` k: keep weights only for the front and the top-k by mAP.
    `artifacts`: the shared folder holding trial folders (DIR/NAME/N; None: results/NAME/trials/N). `stale_after`:
    seconds without a heartbeat after which a RUNNING trial of another host is taken for dead. `prune_to`: prune
    each candidate's fused model to this deploy-FLOPs fraction and rank that. `prune_to_latency` r (0 < r < 1): prune
    each candidate to r x its own measured latency (`pruning.latency_target`) and rank that. Raises StudyError on a
    bad value.
    """

    name: str = "default"
    storage: str | None = None  # None: results/NAME/study.log (Optuna journal file)
    data: str | None = None  # data.yaml; None: the built-in synthetic dataset
    space: str | None = None  # space YAML or "default"
    trials: int | None = None
    seed: int | None = None
    sampler: str | None = None  # "tpe", "nsga2" or "random"
    proxy: dict | None = None
    latency_imgsz: int | None = None
    latency_batch: int | None = None
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
    prune_to: float | None = None
    prune_to_latency: float | None = None  # a ratio of each candidate's own measured latency (0.6: "0.6x")
    prune_finetune_epochs: int | None = None  # fine-tuning epochs after pruning (None: ceil(proxy epochs / 5))
    workers: int | None = None  # worker processes on one machine: stored as a resume's default, never frozen
    results: str = "results"  # root folder of study folders
    quiet: bool = True

    def __post_init__(self):
        check_study_name(self.name)
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise StudyError(f"sampler {self.sampler!r} is unknown; use one of {', '.join(SAMPLERS)}")
        for key in ("trials", "max_failures", "latency_batch", "latency_imgsz", "workers"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise StudyError(f"{key}={value!r} must be a positive integer")
        for key in ("keep_weights", "prune_finetune_epochs"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise StudyError(f"{key}={value!r} must be an integer >= 0")
        if self.prune_to is not None and not (isinstance(self.prune_to, (int, float)) and 0.01 <= self.prune_to <= 1):
            raise StudyError(f"prune_to={self.prune_to!r} must be a deploy-FLOPs fraction in [0.01, 1] (1: no pruning)")
        if self.prune_to_latency is not None and not (isinstance(self.prune_to_latency, (int, float))
                                                      and 0 < self.prune_to_latency < 1):
            raise StudyError(f"prune_to_latency={self.prune_to_latency!r} must be a latency ratio in (0, 1), e.g. 0.6")
        if self.prune_to_latency is not None and self.prune_to is not None and self.prune_to < 1:
            raise StudyError("give one pruning target: --prune-to (a FLOPs fraction) or --prune-to-latency (a "
                             "latency ratio), not both")
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


def trial_folder(settings: StudySettings, number: int) -> Path:
    """Trial `number`'s folder: `settings.trials_root / N`."""
    return settings.trials_root / str(number)


# Where each setting's default lives. `proxy` and `latency` are resolved from ProxyConfig and LatencyConfig.
DEFAULTS: dict[str, Any] = {"space": "default", "trials": 20, "seed": 0, "sampler": "tpe", "proxy": {},
                            "latency_batch": 1, "device": "auto", "latency": {}, "max_failures": 5, "early_stop": {},
                            "stale_after": 600.0}
# Changing these mid-study would make trials incomparable (or scatter their files): refused on resume.
FROZEN = ("data", "space", "latency_imgsz", "latency_batch", "proxy", "latency", "baseline", "device", "artifacts",
          "prune_to", "prune_to_latency", "prune_finetune_epochs")
STORED = tuple(f.name for f in fields(StudySettings) if f.name not in ("name", "storage", "results", "quiet"))
# Settings that are not proxy fields however they are passed: the device is its own setting, quiet is the console's.
_NOT_PROXY = ("device", "quiet")

# Format 1 (repnas 0.1.0, commit fde5c52): renamed keys, and the defaults its deltas were taken from.
_V1_RENAMES = {"imgsz": "latency_imgsz", "batch": "latency_batch"}
_V1_PROXY = {"epochs": 60, "imgsz": 160, "batch": 16, "fraction": 1.0, "val_every": 5, "workers": None, "seed": 0,
             "optimizer": "AdamW", "lr0": 0.002, "lrf": 0.01, "momentum": 0.937, "weight_decay": 0.0005,
             "warmup_epochs": 1.0, "warmup_momentum": 0.8, "warmup_bias_lr": 0.0, "cosine": False,
             "nominal_batch": 0, "ema_decay": 0.9999, "ema_tau": 2000.0, "amp": True, "cache_images": True,
             "augment": {"hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4, "translate": 0.1, "scale": 0.25, "fliplr": 0.5,
                         "flipud": 0.0, "mosaic": 0.0},
             "loss": {"box": 0.05, "cls": 0.5, "cls_pw": 1.0, "obj": 1.0, "obj_pw": 1.0, "anchor_t": 4.0,
                      "label_smoothing": 0.0, "fl_gamma": 0.0}}
_V1_LATENCY = {"warmup": 10, "iters": 100, "rounds": 5, "half": True, "channels_last": True, "cudnn_benchmark": True,
               "cuda_graph": False, "threads": None}
_V1_LATENCY_CPU = {"warmup": 3, "iters": 30}


def check_study_name(name: str) -> str:
    """`name` if it can name a folder results/NAME; else InvalidStudyName."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise InvalidStudyName(f"study name {name!r} is not allowed: use letters, digits, '-', '_' and '.', "
                               "starting with a letter or digit (it names the folder results/NAME)")
    return name


def _plain(value: dict) -> dict:
    """`value` as its stored JSON reads back (sorted keys, tuples as lists): what resume compares against."""
    return json.loads(json.dumps(value, sort_keys=True))


def _merge_nested(base: dict, changes: dict) -> dict:
    """`base` with `changes` applied key by key, nested dicts (proxy's loss/augment) merged too."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merge_nested(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def resolved_proxy(changes: dict | None, base: dict | None = None) -> dict:
    """Every ProxyConfig field (but device and quiet) with `changes` applied to `base` (None: today's defaults)."""
    defaults = ProxyConfig().to_dict()
    base = base if base is not None else {k: v for k, v in defaults.items() if k not in _NOT_PROXY}
    for key, value in (changes or {}).items():
        if key in _NOT_PROXY:  # the study's own settings (device, quiet), dropped here as before
            continue
        nested = isinstance(defaults.get(key), dict)
        unknown = [key] if key not in defaults else ([f"{key}.{k}" for k in value if k not in defaults[key]]
                                                  if nested and isinstance(value, dict) else [])
        if unknown:
            fields = ", ".join(f"{key}.{k}" for k in defaults[key]) if nested and key in defaults else ", ".join(
                k for k in defaults if k not in _NOT_PROXY)
            raise StudyError(f"proxy setting {unknown[0]!r} is not a ProxyConfig field (nas/train.py); known: "
                             f"{fields}")
    merged = _merge_nested(base, {k: v for k, v in (changes or {}).items() if k not in _NOT_PROXY})
    try:
        ProxyConfig(**merged)
    except (TypeError, ValueError) as err:
        raise StudyError(f"proxy settings {changes}: {err}") from None
    return _plain(merged)


def resolved_latency(changes: dict | None, device: torch.device, threads: int | None = None) -> dict:
    """Every LatencyConfig field for `device` (`LatencyConfig.for_device`: the backend `cudagraph` on CUDA, `torch` on
    a CPU) with `changes` applied, plus `device_type`; on a CPU `threads` (None: torch's current count) is fixed here,
    so every process of the study times with the same number."""
    merged = asdict(LatencyConfig.for_device(device)) | {k: v for k, v in (changes or {}).items() if k != "device_type"}
    if device.type == "cpu" and merged.get("threads") is None:
        merged["threads"] = threads or torch.get_num_threads()
    try:
        LatencyConfig(**merged)
    except (TypeError, ValueError) as err:
        raise StudyError(f"latency settings {changes}: {err}") from None
    return _plain(merged | {"device_type": device.type})


def upgrade_stored(stored: dict) -> dict:
    """Stored settings in today's format: format 1 keys renamed and its proxy/latency deltas resolved with the
    defaults of the version that wrote them (threads stay unset there: those studies timed with each process's own);
    formats 1 and 2 get the latency backend they timed with (`stored_backend`). Format 3 is returned as it is."""
    if stored.get("format", 1) >= SETTINGS_FORMAT:
        return dict(stored)
    out = dict(stored)
    if stored.get("format", 1) < 2:
        out = {_V1_RENAMES.get(k, k): v for k, v in stored.items()}
        out["proxy"] = resolved_proxy(out.get("proxy"), base=_V1_PROXY)
        device = out.get("device") or "auto"
        kind = "cpu" if device == "cpu" else ("cuda" if str(device).startswith("cuda") or str(device).isdigit()
                                               else None)
        if kind is None:  # "auto": the kind this host resolves it to, as the version that wrote it did in every process
            kind = "cuda" if torch.cuda.is_available() else "cpu"
        base = _V1_LATENCY | (_V1_LATENCY_CPU if kind == "cpu" else {})
        out["latency"] = base | (out.get("latency") or {}) | {"device_type": kind}
    out["latency"] = _plain(with_backend(out.get("latency") or {}))
    out["format"] = SETTINGS_FORMAT
    return out


def stored_backend(latency: dict) -> str:
    """The latency backend of stored latency settings: their `backend`; before backends existed (formats 1 and 2)
    `cudagraph` where they set the `cuda_graph` flag (graphs were captured), else `torch` (eager)."""
    return latency.get("backend") or ("cudagraph" if latency.get("cuda_graph") else "torch")


def with_backend(latency: dict) -> dict:
    """Latency settings with their backend named (`stored_backend`) and the retired `cuda_graph` flag dropped."""
    return {k: v for k, v in latency.items() if k != "cuda_graph"} | {"backend": stored_backend(latency)}


def _normalise(key: str, value: Any) -> Any:
    """Paths become absolute so a study resumed from another folder compares and finds the same files."""
    if value is None:
        return None
    if key == "space" and str(value) in builtin_spaces() and not Path(value).is_file():
        return str(value)  # a built-in space by name ("default", "small")
    if key == "baseline" and is_seed_source(value):
        return str(value)  # the seed design by name
    if key in ("data", "baseline", "artifacts", "space"):
        return str(Path(value).expanduser().resolve())
    if key in ("proxy", "latency", "early_stop"):
        return _plain(value)
    return value


def merge_settings(given: StudySettings, stored: dict | None, *, force: bool = False) -> StudySettings:
    """`given` with its unset fields filled from `stored` (a resumed study, any format) and then the defaults.

    Raises StudyError naming every FROZEN field that `given` explicitly changes in a stored study, unless `force`.
    """
    stored = upgrade_stored(stored) if stored is not None else None
    values, changed = {}, []
    for key in STORED:
        new = _normalise(key, getattr(given, key))
        if stored is not None and key in stored:
            old = stored[key]
            if isinstance(old, dict) and isinstance(new, dict):
                new = _merge_nested(old, new)  # --epochs 20 changes one proxy field, not the others
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


def device_proxy(device_type: str) -> dict:
    """The proxy defaults a new study's trials train with on `device_type` ("cpu", "cuda", "mps"): DEVICE_PROXY's
    keys for that type over ProxyConfig's own defaults (every field, as `resolved_proxy` stores them)."""
    return resolved_proxy(DEVICE_PROXY.get(device_type, {}))


def resolve_settings(settings: StudySettings, *, latency_threads: int | None = None) -> StudySettings:
    """Merged `settings` with the proxy and latency settings fully resolved (idempotent) and the latency input
    size filled in (the space's imgsz unless given). `latency_threads`: CPU threads trials will be timed with.
    Proxy keys not given take the device type's defaults (`device_proxy`: DEVICE_PROXY over ProxyConfig's)."""
    device = resolve_device(settings.device)
    imgsz = settings.latency_imgsz or load_space(settings.space).imgsz
    return replace(settings, latency_imgsz=imgsz, proxy=resolved_proxy(settings.proxy, device_proxy(device.type)),
                   latency=resolved_latency(settings.latency, device, latency_threads))


def settings_json(settings: StudySettings) -> str:
    """The stored form of `settings`: its STORED fields and the format, as sorted JSON."""
    return json.dumps({k: getattr(settings, k) for k in STORED} | {"format": SETTINGS_FORMAT}, sort_keys=True)


def proxy_config(settings: StudySettings) -> ProxyConfig:
    """How the study's trials train: `settings.proxy` on ProxyConfig, with the study's device and quiet flag."""
    try:
        return ProxyConfig(**({"device": settings.device, "quiet": settings.quiet} |
                              {k: v for k, v in (settings.proxy or {}).items() if k not in _NOT_PROXY}))
    except (TypeError, ValueError) as err:
        raise StudyError(f"proxy settings {settings.proxy}: {err}") from None


def latency_config(settings: StudySettings, device: torch.device) -> LatencyConfig:
    """How the study's latency is timed on `device`: `settings.latency` over `LatencyConfig.for_device(device)`;
    stored settings (they name their `device_type`) that name no backend time with `stored_backend`'s (`torch` for a
    study made before backends)."""
    latency = settings.latency or {}
    latency = {k: v for k, v in (with_backend(latency) if "device_type" in latency else latency).items()
               if k != "device_type"}
    try:
        return LatencyConfig.for_device(device, **latency)
    except (TypeError, ValueError) as err:
        raise StudyError(f"latency settings {settings.latency}: {err}") from None


def load_baseline(path: str | None, space: Space) -> Arch:
    """The baseline Arch: `seed_arch(space)` (for None or `seed`), or a YAML of Arch params, or a model YAML an Arch
    of `space` writes.

    Raises StudyError (or the builder's ModelConfigError) naming the file when it is neither, or not of the space.
    """
    if path is None or is_seed_source(path):
        return seed_arch(space)
    from space.builder import build_model

    data = read_yaml(path, StudyError)
    if isinstance(data, dict) and "backbone" in data:
        build_model(path, device="meta")  # a broken model YAML gets the builder's own message (file, row, field)
        try:
            return Arch.from_model_yaml(data, space, f"baseline {path}", what="the baseline")
        except SpaceConfigError as err:
            raise StudyError(str(err)) from None
    if not isinstance(data, dict):
        raise StudyError(f"baseline {path}: expected a mapping of Arch params (P1_depth: 1, ...) or a model YAML")
    return Arch.from_params(data, space, where=f"baseline {path}")


def load_enqueue(path: str, space: Space) -> dict:
    """Arch params of a known candidate to enqueue: a YAML of Arch params or a model YAML (as --baseline)."""
    return load_baseline(path, space).to_params()


# The proxy a new --data study trains its candidates with, by the device type its trials run on; keys not named here
# are ProxyConfig's defaults (60 epochs at 160 px). Chosen by evidence (issue 12, benchmarks/proxy_fidelity.py,
# benchmarks/RESULTS.md "Proxy fidelity"): on a CPU, the highest Kendall τ-b against the reference budget (120
# epochs at 160 px, 2 seeds) among the proxies costing <= 1/4 of it is 15 epochs at 160 px (validated every 3
# epochs, ranked on the last validation; 2 training seeds), at ~1/8 of the reference's CPU time; it does not meet
# the bars (τ-b >= 0.7 against the reference, seed-to-seed τ-b >= 0.8), so confirm the front (`repnas
# confirm`). A GPU keeps ProxyConfig's defaults: no GPU measurement chose otherwise. Options given explicitly win;
# the stored, resolved settings keep a resumed study on the proxy it started with.
DEVICE_PROXY: dict[str, dict[str, Any]] = {"cpu": {"epochs": 15, "imgsz": 160, "val_every": 3}}

# A new study without --data is the demo: the synthetic shapes' demo set (nas.synth.DEMO_DATA: 2 classes, large
# objects, plain background, 64 px), sized to finish on a 2-core CPU in ten minutes (see benchmarks/RESULTS.md).
# At 64 px YOLOv5's objectness gain, scaled by (imgsz/640)^2, is 1/6.25 of the 160-px proxy's: the demo restores
# the proxy's balance (obj 6.25), and trains at a higher rate for its short schedule. Options given explicitly win;
# --data brings the full defaults.
DEMO: dict[str, Any] = {"trials": 8, "proxy": {"epochs": 10, "imgsz": 64, "batch": 16, "val_every": 2, "lr0": 0.004,
                                               "loss": {"obj": 6.25}},
                        "latency_imgsz": 320, "latency": {"warmup": 2, "iters": 10, "rounds": 5}}


def demo_settings(settings: StudySettings) -> StudySettings:
    """`settings` with its unset fields (and unset proxy/latency keys) taken from DEMO."""
    changes = {}
    for key, value in DEMO.items():
        given = getattr(settings, key)
        if isinstance(value, dict):
            changes[key] = _merge_nested(value, given or {})
        elif given is None:
            changes[key] = value
    return replace(settings, **changes)


def check_settings(settings: StudySettings) -> None:
    """Load and check everything a study's settings name (space, data, baseline, device, proxy, latency, early
    stopping) without writing anything; raises the error a trial would otherwise hit."""
    space = load_space(settings.space)
    check_dataset(load_data_config(settings.data))  # nothing usable: refused here, before a study is written
    load_baseline(settings.baseline, space)
    device = resolve_device(settings.device)
    proxy_config(settings)
    backend = latency_config(settings, device).backend
    try:
        latency_backend(backend).check(device)
    except LatencyBackendError as err:
        raise StudyError(f"study {settings.name!r}: {err}") from None
    try:
        EarlyStopConfig(**(settings.early_stop or {}))
    except (TypeError, ValueError) as err:
        raise StudyError(f"early_stop settings {settings.early_stop}: {err}") from None
