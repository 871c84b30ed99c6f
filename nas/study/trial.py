"""One trial: a sampled Arch taken through named phases, in this order:

    build -> cost -> prune probe -> budget -> latency (+ latency budgets) -> train (OOM retry, early stop) -> save
    -> fuse/check -> evaluate -> prune job + fine-tune (re-timed if the plan changed) -> record

Each phase is a function of (`TrialRecorder`, `Candidate`, what it needs) that a test can call on its own; the
recorder is the only way a phase writes anything (trial folder files with their sha256, user attrs, wall seconds
per phase, the trial log). A new per-trial step is a new phase function here, called from `run_trial`.
"""

from __future__ import annotations

import gc
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
import torch

from nas.data import DataConfig
from nas.device import device_label, resolve_device
from nas.earlystop import EarlyStopConfig, Finished, curve_from_attr, should_stop
from nas.evaluate import Metrics, evaluate
from nas.files import FileLock, host_lock_path, state_dict_bytes, write_bytes_atomic
from nas.latency import Latency, measure_latency
from nas.prune import prune_job
from nas.study.attrs import (
    ARCH_KEY,
    BASELINE_KEY,
    BASELINE_LATENCY_MS_KEY,
    CONSTRAINTS_KEY,
    CURVE_KEY,
    DEVICE_KEY,
    FILES_KEY,
    FUSION_ERROR_KEY,
    GFLOPS_DEPLOY_KEY,
    GFLOPS_DEPLOY_UNPRUNED_KEY,
    GFLOPS_IMGSZ_KEY,
    GFLOPS_KEY,
    LATENCY_MEASURED_MS_KEY,
    LATENCY_MS_KEY,
    LATENCY_P90_MS_KEY,
    LATENCY_RATIO_KEY,
    LATENCY_REMEASURED_KEY,
    MAP50_95_KEY,
    MAP50_95_UNPRUNED_KEY,
    MAP50_KEY,
    MAP50_UNPRUNED_KEY,
    OOM_RETRY_KEY,
    PARAMS_KEY,
    PARAMS_TRAIN_KEY,
    PARAMS_UNPRUNED_KEY,
    PARTIAL_MAP50_95_KEY,
    PARTIAL_MAP50_KEY,
    PROXY_KEY,
    PRUNE_FRACTION_KEY,
    PRUNE_KEY,
    PRUNE_LATENCY_SEARCH_KEY,
    PRUNE_LATENCY_TARGET_KEY,
    PRUNED_REASON_KEY,
    REASON_DUPLICATE,
    REASON_EARLY_STOP,
    REASON_REJECTED,
    REJECTED_KEY,
    SECONDS_KEY,
    STOP_RULE_KEY,
    STOPPED_EPOCH_KEY,
)
from nas.study.settings import StudySettings, latency_config, proxy_config, trial_folder
from nas.train import FitResult, ProxyConfig, epochs_csv, fit, seed_everything
from pruning.channel import PruneResult, prune_to_flops
from pruning.portable import save_pruned
from pruning.reparam import fuse_model, fusion_error
from space.builder import build_model
from space.cost import ModelCost, count_gflops, model_cost
from space.searchspace import Arch, Space, sample_arch

FUSION_TOLERANCE = 1e-4


class TrialRejected(optuna.TrialPruned):
    """Pruned before training: over budget, or an Arch already trained in this study. Does not count."""


class TrialRecorder:
    """Everything one trial writes: files in its folder (atomically, sha256 in the FILES_KEY attr, paths relative
    to the trials root), user attrs, wall seconds per phase, and the lines of its trial.log. `report` (None: quiet)
    gets its progress lines, `trial    7 phase train (...)`: one as each phase starts and one per step inside a
    long one (a validation epoch, a fine-tuning epoch); a multi-worker search relays them through the coordinator."""

    def __init__(self, trial: optuna.Trial, folder: Path, trials_root: Path,
                 report: Callable[[str], None] | None = None):
        self.trial, self.folder = trial, folder
        self.rel = folder.relative_to(trials_root).as_posix()
        self.files: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        self.log: list[str] = []
        self.report = report
        folder.mkdir(parents=True, exist_ok=True)

    def set(self, key: str, value: Any) -> None:
        self.trial.set_user_attr(key, value)

    def get(self, key: str, default: Any = None) -> Any:
        return self.trial.user_attrs.get(key, default)

    def save(self, name: str, data: bytes) -> None:
        """Write `data` as FOLDER/name atomically and record its sha256."""
        write_bytes_atomic(self.folder / name, data)
        self.add_file(name, data)

    def add_file(self, name: str, data: bytes | None = None) -> None:
        """Record the sha256 of FOLDER/name (read back when `data` is None: a file another writer made)."""
        import hashlib

        data = (self.folder / name).read_bytes() if data is None else data
        self.files[name] = hashlib.sha256(data).hexdigest()
        self.set(FILES_KEY, {n: {"path": f"{self.rel}/{n}", "sha256": d} for n, d in self.files.items()})

    def note(self, line: str) -> None:
        self.log.append(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}")

    def save_log(self) -> None:
        self.save("trial.log", ("\n".join(self.log) + "\n").encode())

    def progress(self, phase: str, detail: str = "") -> None:
        """One progress line of this trial: `trial    7 phase train (epoch 5/60: ...)` (nothing when quiet)."""
        if self.report is not None:
            self.report(f"trial {self.trial.number:>4} phase {phase}" + (f" ({detail})" if detail else ""))

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase `name` (kept only when the block ends normally); say that it starts."""
        self.progress(name)
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start


@dataclass
class Candidate:
    """What the phases hand each other: the Arch and its networks, costs, latency, training and metrics."""

    baseline: bool
    imgsz: int  # latency and GFLOPs input size
    arch: Arch | None = None
    model: torch.nn.Module | None = None  # train-time network
    cost: ModelCost | None = None
    budget_cost: ModelCost | None = None  # deploy cost at the space's imgsz (what budgets are stated at)
    deployed: torch.nn.Module | None = None  # the network that is timed: fused, pruned when pruned
    fraction: float | None = None
    probe: PruneResult | None = None
    lat: Latency | None = None
    latency_ms: float | None = None
    cfg: ProxyConfig | None = None
    curve: list[list] = field(default_factory=list)
    stop_reason: str | None = None
    result: FitResult | None = None
    fused: torch.nn.Module | None = None
    fusion_error: float | None = None
    map50_95: float | None = None
    map50: float | None = None
    params: int | None = None  # of the ranked network
    gflops_deploy: float | None = None


def _reject(rec: TrialRecorder, key: str, value: float, why: str) -> None:
    rec.set(CONSTRAINTS_KEY, [value])
    rec.trial.set_constraint(key, value)
    rec.set(REJECTED_KEY, why)
    rec.set(PRUNED_REASON_KEY, REASON_REJECTED)
    raise TrialRejected(f"over budget: {why}")


def _taken_archs(study: optuna.Study, number: int) -> list[dict]:
    """Archs of COMPLETE trials and of other RUNNING ones (a parallel worker may be training the same one)."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)
    return [t.user_attrs.get(ARCH_KEY) for t in study.get_trials(deepcopy=False, states=states) if t.number != number]


def phase_build(rec: TrialRecorder, c: Candidate, space: Space, nc: int, seed: int) -> None:
    """Sample the Arch (TrialRejected if it is already trained or training here), write model.yaml, build it with
    the generators seeded by the proxy's `seed` (the same Arch starts from the same weights in any study)."""
    c.arch = sample_arch(rec.trial, space)
    rec.set(ARCH_KEY, c.arch.to_params())
    if c.arch.to_params() in _taken_archs(rec.trial.study, rec.trial.number):
        rec.set(PRUNED_REASON_KEY, REASON_DUPLICATE)
        raise TrialRejected("duplicate: this Arch was already trained in this study")
    rec.save("model.yaml", c.arch.to_yaml_text(nc).encode())
    seed_everything(seed)
    c.model = build_model(c.arch.to_yaml(nc))


def phase_cost(rec: TrialRecorder, c: Candidate, space: Space) -> None:
    """Params and GFLOPs, as built and deployed, at the latency input size (and at the space's, for budgets)."""
    c.cost = model_cost(c.model, c.imgsz)
    c.budget_cost = c.cost if c.imgsz == space.imgsz else model_cost(c.model, space.imgsz)
    rec.set(PARAMS_KEY, c.cost.params_deploy)
    rec.set(PARAMS_TRAIN_KEY, c.cost.params)
    rec.set(GFLOPS_KEY, c.cost.gflops)
    rec.set(GFLOPS_DEPLOY_KEY, c.cost.gflops_deploy)
    rec.set(GFLOPS_IMGSZ_KEY, c.imgsz)
    c.deployed = fuse_model(c.model)
    c.params, c.gflops_deploy = c.cost.params_deploy, c.cost.gflops_deploy


def phase_prune_probe(rec: TrialRecorder, c: Candidate, space: Space, prune_to: float | None,
                      prune_to_latency: float | None = None, settings: StudySettings | None = None) -> None:
    """For --prune-to (or a space's prune_fraction): prune the untrained fused net to learn the pruned shapes.

    Channel counts per group follow the uniform ratio, not the weights: pruning the untrained network gives the
    final shapes, so the pruned model's cost and latency are known before training (checked after). The baseline
    is never pruned. For --prune-to-latency r the fraction is searched on measurements instead
    (`pruning.latency_target.prune_to_latency`, each candidate timed as the study times, interleaved with the
    unpruned network): latency does not depend on the weights either. A candidate that cannot reach r is rejected
    with the reason (not trained, not counted).
    """
    if prune_to_latency is not None and not c.baseline:
        from pruning.channel import PruneError
        from pruning.latency_target import prune_to_latency as search

        unpruned = c.deployed

        def time_ratio(candidate: torch.nn.Module) -> float:
            return time_latency(candidate, settings, unpruned).latency_ratio

        try:
            found = search(unpruned, prune_to_latency, time_ratio, c.imgsz,
                           progress=lambda line: rec.progress("prune", line))
        except PruneError as err:
            _reject(rec, "latency_target", 1.0, str(err))
        rec.set(PRUNE_LATENCY_TARGET_KEY, prune_to_latency)
        rec.set(PRUNE_LATENCY_SEARCH_KEY, [list(e) for e in found.evaluations])
        fraction, c.probe = found.result.flops_ratio, found.result
    else:
        fraction = c.arch.extra("prune_fraction", prune_to)
        if c.baseline or fraction is None or float(fraction) >= 1:
            return
        c.probe = prune_to_flops(c.deployed, float(fraction), c.imgsz)
    c.fraction = float(fraction)
    c.deployed = c.probe.model
    rec.set(PRUNE_FRACTION_KEY, c.fraction)
    rec.set(PARAMS_UNPRUNED_KEY, c.cost.params_deploy)
    rec.set(GFLOPS_DEPLOY_UNPRUNED_KEY, c.cost.gflops_deploy)
    rec.set(PARAMS_KEY, c.probe.params_after)
    rec.set(GFLOPS_DEPLOY_KEY, c.probe.gflops_after)
    at_space = c.probe.gflops_after if c.imgsz == space.imgsz else count_gflops(c.probe.model, space.imgsz)
    c.budget_cost = replace(c.budget_cost, params_deploy=c.probe.params_after, gflops_deploy=at_space)


def phase_budget(rec: TrialRecorder, c: Candidate, space: Space) -> None:
    """Reject (TrialRejected, constraint "budget") an Arch over the space's params/GFLOPs budgets; never the
    baseline, the reference row of every table."""
    violation = space.budget_violation(c.budget_cost.params_deploy, c.budget_cost.gflops_deploy)
    if violation and not c.baseline:
        _reject(rec, "budget", 1.0, violation)
    rec.note(f"built {c.arch.to_params()}: {c.cost.params_deploy:,} params, {c.cost.gflops_deploy:.3f} deploy GFLOPs "
             f"at {c.imgsz}" + (f"; pruned to {c.probe.gflops_after:.3f} GFLOPs ({c.fraction:g})" if c.probe else ""))


def time_latency(network: torch.nn.Module, settings: StudySettings, baseline_fused: torch.nn.Module) -> Latency:
    """How a study times a network, in one place: on the study's device with its LatencyConfig (backend, threads,
    warmup, iterations, rounds, fp16, channels_last...), input size and batch, interleaved round by round with the
    fused baseline, one process of this host at a time (and, on a GPU, no training step of another process at the
    same time: `nas.device.gpu_lock`). The frozen baseline is timed by this too, against itself. A CUDA graph that
    cannot be captured raises `nas.latency.CaptureFailed`: the trial fails with that reason, never timed eagerly."""
    device = resolve_device(settings.device)
    with FileLock(host_lock_path("latency")):  # workers sharing a machine time one at a time
        return measure_latency(network, settings.latency_imgsz, settings.latency_batch, device,
                               latency_config(settings, device), reference=baseline_fused)


def _time(network: torch.nn.Module, settings: StudySettings, baseline_fused: torch.nn.Module,
          baseline_ms: float) -> tuple[Latency, float]:
    """Time `network` (`time_latency`); return the measurement and the objective, ratio x the frozen baseline."""
    lat = time_latency(network, settings, baseline_fused)
    return lat, lat.latency_ratio * baseline_ms


def phase_latency(rec: TrialRecorder, c: Candidate, settings: StudySettings, baseline_fused: torch.nn.Module) -> None:
    """Time the deploy network against the fused baseline; the objective is the ratio x the frozen baseline."""
    baseline_ms = rec.trial.study.user_attrs[BASELINE_LATENCY_MS_KEY]
    c.lat, c.latency_ms = _time(c.deployed, settings, baseline_fused, baseline_ms)
    rec.set(LATENCY_MS_KEY, c.latency_ms)
    rec.set(LATENCY_MEASURED_MS_KEY, c.lat.median_ms)
    rec.set(LATENCY_P90_MS_KEY, c.lat.p90_ms)
    rec.set(LATENCY_RATIO_KEY, c.lat.latency_ratio)
    rec.set(DEVICE_KEY, c.lat.device)
    rec.note(f"latency {c.lat.median_ms:.3f} ms median on {device_label(c.lat.device)} ({c.lat.backend}), ratio "
             f"{c.lat.latency_ratio:.4f} to the baseline -> objective {c.latency_ms:.3f} ms")


def phase_latency_budgets(rec: TrialRecorder, c: Candidate, settings: StudySettings) -> None:
    """Reject (constraint "latency") a non-baseline Arch slower than --max-latency-ms or --max-latency-ratio."""
    if c.baseline:
        return
    if settings.max_latency_ms is not None and c.latency_ms > settings.max_latency_ms:
        _reject(rec, "latency", c.latency_ms / settings.max_latency_ms - 1,
                f"latency {c.latency_ms:.3f} ms > max_latency_ms {settings.max_latency_ms:g}")
    ratio = c.lat.latency_ratio
    if settings.max_latency_ratio is not None and ratio > settings.max_latency_ratio:
        _reject(rec, "latency", ratio / settings.max_latency_ratio - 1,
                f"latency ratio {ratio:.3f} > max_latency_ratio {settings.max_latency_ratio:g}")


def _prune_mode(attrs: dict) -> tuple[str, float | None]:
    """How a trial's ranked network was pruned: ("latency", ratio) for --prune-to-latency (each trial has its own
    FLOPs fraction), else ("flops", fraction or None)."""
    target = attrs.get(PRUNE_LATENCY_TARGET_KEY)
    return ("latency", target) if target is not None else ("flops", attrs.get(PRUNE_FRACTION_KEY))


def _finished_for_rule(study: optuna.Study, mode: tuple[str, float | None] = ("flops", None)) -> list[Finished]:
    """COMPLETE trials with a curve; only those pruned the same way (`_prune_mode`: their latency is the pruned
    one)."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if _prune_mode(t.user_attrs) != mode:
            continue
        latency = t.user_attrs.get(LATENCY_MS_KEY)
        if latency is not None and t.user_attrs.get(CURVE_KEY):
            out.append(Finished(t.number, float(latency), curve_from_attr(t.user_attrs[CURVE_KEY])))
    return out


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "CUDA out of memory" in str(err)


def phase_train(rec: TrialRecorder, c: Candidate, settings: StudySettings, data_cfg: DataConfig) -> None:
    """Train with the proxy; validation epochs feed the early-stopping rule. CUDA out of memory is retried once at
    half the batch (outside the except block, so the failed attempt's frames can be freed first)."""
    c.cfg = proxy_config(settings)
    rec.set(PROXY_KEY, c.cfg.to_dict())
    rule = EarlyStopConfig(**(settings.early_stop or {}))

    start = time.perf_counter()

    def on_validation(epoch: int, losses: dict, map50_95: float, map50: float) -> bool:
        rec.progress("train", f"epoch {epoch}/{c.cfg.epochs}: box {losses['box']:.4f} obj {losses['obj']:.4f} cls "
                              f"{losses['cls']:.4f}; mAP50-95 {map50_95:.4f} mAP50 {map50:.4f}; "
                              f"{time.perf_counter() - start:.0f} s")
        c.curve.append([epoch, map50_95, map50])
        rec.set(CURVE_KEY, c.curve)
        best = max(row[1] for row in c.curve)  # the rule credits the trial with its best validation so far
        if not c.baseline:
            mode = _prune_mode({k: rec.get(k) for k in (PRUNE_FRACTION_KEY, PRUNE_LATENCY_TARGET_KEY)})
            finished = _finished_for_rule(rec.trial.study, mode)
            c.stop_reason = should_stop(epoch, best, c.latency_ms, c.cfg.epochs, finished, rule)
        return bool(c.stop_reason)

    # fit quiet: the trial says its validation epochs itself, and draws no bar (workers share one terminal)
    try:
        c.result = fit(c.model, data_cfg, replace(c.cfg, quiet=True), callbacks=(on_validation,))
    except Exception as err:
        if not (_is_oom(err) and c.cfg.batch >= 2):
            raise
    if c.result is None:
        c.model = None
        gc.collect()
        torch.cuda.empty_cache()
        c.cfg = replace(c.cfg, batch=c.cfg.batch // 2)
        rec.set(OOM_RETRY_KEY, f"CUDA out of memory at batch {c.cfg.batch * 2}; retried at batch {c.cfg.batch}")
        rec.set(PROXY_KEY, c.cfg.to_dict())
        c.curve.clear()
        seed_everything(c.cfg.seed)  # the retry starts from the same initial weights as the first attempt
        c.model = build_model(c.arch.to_yaml(data_cfg.nc))
        rec.progress("train", f"retry at batch {c.cfg.batch} after CUDA out of memory")
        c.result = fit(c.model, data_cfg, replace(c.cfg, quiet=True), callbacks=(on_validation,))
    rec.save("epochs.csv", epochs_csv(c.result.history).encode())


def phase_early_stop(rec: TrialRecorder, c: Candidate) -> None:
    """An early-stopped trial ends here: partial metrics recorded, optuna.TrialPruned raised (it counts)."""
    rec.note(f"trained {len(c.result.history)} epochs in {rec.seconds['train']:.1f} s" +
             (f" ({c.stop_reason})" if c.stop_reason else ""))
    if not c.result.stopped_early:
        return
    epoch, map50_95, map50 = c.curve[-1]
    summary = {"trial": rec.trial.number, "arch": c.arch.to_params(), "stopped": c.stop_reason,
               "stopped_epoch": epoch, "partial_map50_95": map50_95, "partial_map50": map50,
               "latency_ms": c.latency_ms, "seconds": rec.seconds}
    rec.save("metrics.json", json.dumps(summary, indent=2, default=str).encode())
    rec.set(STOPPED_EPOCH_KEY, epoch)
    rec.set(PARTIAL_MAP50_95_KEY, map50_95)
    rec.set(PARTIAL_MAP50_KEY, map50)
    rec.set(SECONDS_KEY, rec.seconds)
    rec.set(STOP_RULE_KEY, c.stop_reason)
    rec.set(PRUNED_REASON_KEY, REASON_EARLY_STOP)
    rec.save_log()
    raise optuna.TrialPruned(c.stop_reason)


def _fusion_error_fp32(model: torch.nn.Module, fused: torch.nn.Module, x: torch.Tensor) -> float:
    """fusion_error with TF32 off: cuDNN's default TF32 convolutions alone differ by ~1e-3 on a GPU."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return fusion_error(model, fused, x)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def phase_fuse(rec: TrialRecorder, c: Candidate) -> torch.device:
    """Fuse the trained network, check it computes the same outputs (RuntimeError beyond FUSION_TOLERANCE), save
    fused.pt; return the device the model is on."""
    c.fused = fuse_model(c.model)
    device = next(c.model.parameters()).device
    x = torch.rand(1, 3, c.cfg.imgsz, c.cfg.imgsz, generator=torch.Generator().manual_seed(0)).to(device)
    c.fusion_error = _fusion_error_fp32(c.model, c.fused, x)
    rec.set(FUSION_ERROR_KEY, c.fusion_error)
    if not c.fusion_error < FUSION_TOLERANCE:
        raise RuntimeError(f"fusion changed the outputs: relative error {c.fusion_error:.2e} >= {FUSION_TOLERANCE:g}")
    rec.save("fused.pt", state_dict_bytes(c.fused))
    return device


def phase_evaluate(c: Candidate, data_cfg: DataConfig, device: torch.device) -> None:
    """mAP50-95 and mAP50 of the fused network. fit's last validation (EMA weights, proxy size) is what was
    trained; the fused model is evaluated again only off the CPU, where fusion is not exact to ~1e-7."""
    metrics: Metrics = c.result.metrics
    if metrics is None or device.type != "cpu":
        metrics = evaluate(c.fused, data_cfg, c.cfg.imgsz, batch=c.cfg.batch * 2, device=device)
    c.map50_95, c.map50 = metrics.map50_95, metrics.map50


def phase_prune(rec: TrialRecorder, c: Candidate, settings: StudySettings, data_cfg: DataConfig,
                baseline_fused: torch.nn.Module, device: torch.device) -> None:
    """Prune the trained fused network to the probe's fraction, fine-tune it, save it under pruned/; the ranked
    figures become the pruned network's (re-timed if its plan differs from the probe's, which is not expected)."""
    rec.set(MAP50_95_UNPRUNED_KEY, c.map50_95)
    rec.set(MAP50_UNPRUNED_KEY, c.map50)
    epochs = settings.prune_finetune_epochs
    epochs = math.ceil(c.cfg.epochs / 5) if epochs is None else epochs
    tune = ProxyConfig.finetune(epochs=max(epochs, 1), imgsz=c.cfg.imgsz, batch=c.cfg.batch, device=str(device),
                                quiet=c.cfg.quiet, cache_images=c.cfg.cache_images)
    report = prune_job(c.fused, data_cfg, c.fraction, imgsz=c.imgsz, eval_imgsz=c.cfg.imgsz, finetune_epochs=epochs,
                       finetune=tune, device=str(device), evaluate_before=False, measure=False,
                       progress=lambda line: rec.progress("prune", line))
    if report.result.plan != c.probe.plan:
        c.lat, c.latency_ms = _time(report.model, settings, baseline_fused,
                                    rec.trial.study.user_attrs[BASELINE_LATENCY_MS_KEY])
        rec.set(LATENCY_MS_KEY, c.latency_ms)
        rec.set(LATENCY_MEASURED_MS_KEY, c.lat.median_ms)
        rec.set(LATENCY_P90_MS_KEY, c.lat.p90_ms)
        rec.set(LATENCY_RATIO_KEY, c.lat.latency_ratio)
        rec.set(LATENCY_REMEASURED_KEY, True)
    save_pruned(report.model, rec.folder / "pruned", report.result.plan,
                info={"data": str(data_cfg.source), "train_imgsz": c.cfg.imgsz, "target": c.fraction})
    for name in ("channels.json", "weights.pt"):
        rec.add_file(f"pruned/{name}")
    c.map50_95, c.map50 = report.map_finetuned or report.map_pruned
    c.params, c.gflops_deploy = report.result.params_after, report.result.gflops_after
    rec.set(PRUNE_KEY, {k: v for k, v in report.to_dict().items() if k != "channels"})


def phase_record(rec: TrialRecorder, c: Candidate, data_cfg: DataConfig) -> tuple[float, float]:
    """metrics.json, trial.log and the result attrs; return the objectives (mAP50-95, latency objective ms)."""
    summary = {"trial": rec.trial.number, "arch": c.arch.to_params(), "map50_95": c.map50_95, "map50": c.map50,
               "latency_ms": c.latency_ms, "latency_ratio": c.lat.latency_ratio, "latency": c.lat.to_dict(),
               "params": c.params, "gflops": c.cost.gflops, "gflops_deploy": c.gflops_deploy, "imgsz": c.imgsz,
               "proxy": c.cfg.to_dict(), "seconds": rec.seconds, "data": str(data_cfg.source),
               "fusion_error": c.fusion_error, "prune_fraction": c.fraction if c.probe else None}
    rec.save("metrics.json", json.dumps(summary, indent=2, default=str).encode())
    rec.note(f"fused (error {c.fusion_error:.2e}) and evaluated: mAP50-95 {c.map50_95:.4f}, mAP50 {c.map50:.4f}; "
             "phases " + ", ".join(f"{k} {v:.1f} s" for k, v in rec.seconds.items()))
    rec.save_log()
    rec.set(MAP50_95_KEY, c.map50_95)
    rec.set(MAP50_KEY, c.map50)
    rec.set(SECONDS_KEY, rec.seconds)
    rec.set(CONSTRAINTS_KEY, [0.0])
    rec.trial.set_constraint("budget", 0.0)
    return c.map50_95, c.latency_ms


def run_trial(trial: optuna.Trial, settings: StudySettings, space: Space, data_cfg: DataConfig,
              baseline_fused: torch.nn.Module, report: Callable[[str], None] | None = None) -> tuple[float, float]:
    """Take one sampled Arch through the phases; return (mAP50-95, latency objective in ms). `report` gets the
    trial's progress lines (`TrialRecorder`) unless `settings.quiet`.

    Raises TrialRejected (over a budget / duplicate) before any training, optuna.TrialPruned when the early-stopping
    rule stops training (partial metrics kept), and lets any other error through (the caller fails the trial).
    """
    rec = TrialRecorder(trial, trial_folder(settings, trial.number), settings.trials_root,
                        None if settings.quiet else report)
    c = Candidate(baseline=bool(trial.user_attrs.get(BASELINE_KEY)), imgsz=settings.latency_imgsz or space.imgsz)
    with rec.phase("build"):
        phase_build(rec, c, space, data_cfg.nc, proxy_config(settings).seed)
        phase_cost(rec, c, space)
        phase_prune_probe(rec, c, space, settings.prune_to, settings.prune_to_latency, settings)
        phase_budget(rec, c, space)
    with rec.phase("latency"):
        phase_latency(rec, c, settings, baseline_fused)
    phase_latency_budgets(rec, c, settings)
    with rec.phase("train"):
        phase_train(rec, c, settings, data_cfg)
    phase_early_stop(rec, c)
    rec.save("weights.pt", state_dict_bytes(c.model))
    with rec.phase("fuse"):
        device = phase_fuse(rec, c)
    with rec.phase("eval"):
        phase_evaluate(c, data_cfg, device)
    if c.probe is not None:
        with rec.phase("prune"):
            phase_prune(rec, c, settings, data_cfg, baseline_fused, device)
    return phase_record(rec, c, data_cfg)
