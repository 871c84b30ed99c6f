"""Proxy training: YOLOv5's recipe (SGD with three parameter groups, warm-up, linear or cosine LR, EMA, AMP on
CUDA) sized to rank candidates fast. `fit` trains a built model; `ProxyConfig` says how a model is trained;
`train_job` is `repnas train` as a library call (check the data, build, cost, fit, write the run's folder).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nas.data import (
    AugmentConfig,
    DataConfig,
    YoloDataset,
    check_dataset,
    index_split,
    load_data_config,
    make_loader,
)
from nas.device import gpu_lock, resolve_device
from nas.evaluate import Metrics, evaluate
from nas.files import state_dict_bytes, write_bytes_atomic, write_text_atomic
from nas.loss import DetectionLoss, LossHyp
from space.builder import build_model
from space.cost import ModelCost, model_cost
from space.errors import RepnasError
from space.yamlio import format_model_yaml

LOG = logging.getLogger("repnas.train")


class TrainingDiverged(RepnasError):
    """The loss became NaN or infinite, or the gradients stayed non-finite."""


MAX_BAD_STEPS = 5  # consecutive optimizer steps with non-finite gradients before training gives up
AMP_SCALE_FLOOR = 1.0  # with AMP, a non-finite step while the loss scale is above this is the scaler calibrating


def counts_as_divergence(finite: bool, amp: bool, scale_before: float | None, scale_after: float | None) -> bool:
    """Whether one optimizer step's gradients count toward the MAX_BAD_STEPS non-finite steps in a row.

    `finite`: the step's unscaled gradient norm was finite. `amp`: the step ran with a GradScaler (AMP on CUDA);
    `scale_before`/`scale_after`: its loss scale before `scaler.step` and after `scaler.update` (None without AMP).
    A finite step never counts. Without AMP every non-finite step counts. With AMP a non-finite step is the scaler
    calibrating (torch.amp.GradScaler starts at 2**16 and halves its scale on each step whose scaled fp16 gradients
    overflow, skipping that step: torch's AMP recipe, which YOLOv5's train.py follows) when this step lowered the
    scale and the scale was still above AMP_SCALE_FLOOR; such a step does not count. Gradients that stay non-finite
    once the scale is at the floor (no headroom left for the scaler to take away) count: that is divergence.
    """
    if finite:
        return False
    if not amp or scale_before is None or scale_after is None:
        return True
    return not (scale_after < scale_before and scale_before > AMP_SCALE_FLOOR)


EpochCallback = Callable[[int, dict, float, float], "bool | None"]  # (epoch, losses, map50_95, map50) -> stop?


@dataclass(frozen=True)
class ProxyConfig:
    """How a candidate is trained. Defaults are the proxy: a fast, stable ranking signal (see RESULTS.md)."""

    epochs: int = 60
    imgsz: int = 160
    batch: int = 16
    fraction: float = 1.0  # of the train split, a seeded subset
    val_fraction: float = 1.0  # of the val split used for validation, one fixed subset (seed 0) for every run
    val_every: int = 5  # validate every k epochs (and always after the last)
    device: str = "auto"
    workers: int | None = None  # None: 0 on CPU, min(8, cores) on CUDA
    seed: int = 0
    optimizer: str = "AdamW"  # "AdamW" or "SGD" (nesterov, YOLOv5's from-scratch choice)
    lr0: float = 0.002
    lrf: float = 0.01  # final LR = lr0 * lrf
    momentum: float = 0.937
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    warmup_momentum: float = 0.8
    warmup_bias_lr: float = 0.0
    cosine: bool = False
    nominal_batch: int = 0  # accumulate gradients up to this batch (YOLOv5: 64); 0 = no accumulation
    ema_decay: float = 0.9999
    ema_tau: float = 2000.0  # EMA decay ramps as decay * (1 - exp(-updates / tau)), YOLOv5's rule
    amp: bool = True  # on CUDA only
    cache_images: bool = True
    quiet: bool = False
    obj_ref_imgsz: int | None = None  # objectness gain = loss.obj x (this / 640)^2; None: imgsz (YOLOv5's rule)
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(scale=0.25))
    loss: LossHyp = field(default_factory=LossHyp)

    def __post_init__(self):
        # nested settings may arrive as plain dicts (a stored study's JSON, to_dict()'s output): round-trip them
        for name in ("augment", "loss"):
            value = getattr(self, name)
            if isinstance(value, dict):
                try:
                    default = self.__dataclass_fields__[name].default_factory()
                    object.__setattr__(self, name, replace(default, **value))
                except TypeError as err:
                    raise ValueError(f"ProxyConfig: {name}={value}: {err}") from None
        checks = [
            (self.epochs >= 1, f"epochs={self.epochs} must be >= 1"),
            (self.imgsz >= 32 and self.imgsz % 32 == 0, f"imgsz={self.imgsz} must be a multiple of 32"),
            (self.batch >= 1, f"batch={self.batch} must be >= 1"),
            (0 < self.fraction <= 1, f"fraction={self.fraction} must be in (0, 1]"),
            (0 < self.val_fraction <= 1, f"val_fraction={self.val_fraction} must be in (0, 1]"),
            (self.val_every >= 1, f"val_every={self.val_every} must be >= 1"),
            (self.optimizer in ("SGD", "AdamW"), f"optimizer={self.optimizer!r} must be 'SGD' or 'AdamW'"),
            (self.lr0 > 0 and 0 < self.lrf <= 1, f"lr0={self.lr0} must be > 0 and lrf={self.lrf} in (0, 1]"),
            (self.warmup_epochs >= 0, f"warmup_epochs={self.warmup_epochs} must be >= 0"),
            (self.workers is None or self.workers >= 0, f"workers={self.workers} must be >= 0"),
            (self.obj_ref_imgsz is None or (isinstance(self.obj_ref_imgsz, int) and self.obj_ref_imgsz >= 32),
             f"obj_ref_imgsz={self.obj_ref_imgsz} must be an image size >= 32 or null (the training imgsz)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"ProxyConfig: {message}")

    @classmethod
    def finetune(cls, **changes) -> ProxyConfig:
        """Preset for already-trained weights (e.g. after pruning): low LR, no warm-up, no bias warm-up."""
        preset = {"optimizer": "SGD", "lr0": 0.001, "lrf": 0.1, "warmup_epochs": 0.0, "warmup_bias_lr": 0.0,
                  "cosine": True, "val_every": 1}
        return cls(**(preset | changes))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FitResult:
    """What training produced: per-epoch history, the last evaluation, wall time; `model` holds EMA weights."""

    model: nn.Module
    history: list[dict]
    metrics: Metrics | None
    seconds: float
    stopped_early: bool


EPOCH_COLUMNS = ("epoch", "box", "obj", "cls", "lr", "map50_95", "map50", "train_seconds", "skipped_steps",
                 "grad_scale")


def epochs_csv(history: list[dict]) -> str:
    """`FitResult.history` as CSV text (one row per epoch; mAP empty where the epoch was not validated)."""
    import csv
    import io

    rows = io.StringIO()
    writer = csv.DictWriter(rows, fieldnames=EPOCH_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    return rows.getvalue()


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (call it before building a model: its initial weights are drawn
    from torch's generator)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class ModelEMA:
    """Exponential moving average of weights and buffers (YOLOv5's ModelEMA)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0):
        self.ema = copy.deepcopy(model).eval()
        self.decay, self.tau, self.updates = decay, tau, 0
        for p in self.ema.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        state = model.state_dict()
        for name, value in self.ema.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(d).add_(state[name].detach(), alpha=1 - d)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """YOLOv5's three groups: conv/linear weights with decay; BatchNorm weights and all biases without."""
    decay, no_decay_bn, biases = [], [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if name == "bias":
                biases.append(p)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                no_decay_bn.append(p)
            else:
                decay.append(p)
    return [{"params": no_decay_bn, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay},
            {"params": biases, "weight_decay": 0.0, "is_bias": True}]


def _lr_lambda(cfg: ProxyConfig) -> Callable[[float], float]:
    if cfg.cosine:
        return lambda x: ((1 - math.cos(x * math.pi / cfg.epochs)) / 2) * (cfg.lrf - 1) + 1
    return lambda x: (1 - x / cfg.epochs) * (1.0 - cfg.lrf) + cfg.lrf


def _bar(iterable, total: int, desc: str, show: bool):
    """A tqdm bar over one epoch's batches on a terminal (it goes when the epoch ends: the epoch's line stays)."""
    if not show or not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False)


def epoch_line(record: dict, epochs: int) -> str:
    """One finished epoch as a log line: `epoch 3/60: box 0.0512 obj 0.0321 cls 0.0123, 4.1 s` (+ its mAPs when
    it was validated)."""
    line = (f"epoch {record['epoch']}/{epochs}: box {record['box']:.4f} obj {record['obj']:.4f} "
            f"cls {record['cls']:.4f}, {record['train_seconds']:.1f} s")
    if record.get("map50_95") is not None:
        line += f"; mAP50-95 {record['map50_95']:.4f} mAP50 {record['map50']:.4f}"
    if not record.get("skipped_steps"):
        return line
    calibration = record.get("calibration_steps")
    return line + (f" ({record['skipped_steps']} steps skipped so far"
                   + (f", {calibration} of them AMP's loss scale calibrating)" if calibration else ")"))


def subset_records(records: Sequence, fraction: float, seed: int) -> list:
    """A seeded random subset of `fraction` of the records (all of them when fraction is 1)."""
    if fraction >= 1:
        return list(records)
    rng = np.random.default_rng(seed)
    keep = max(1, round(len(records) * fraction))
    return [records[i] for i in sorted(rng.choice(len(records), keep, replace=False))]


def fit(model: nn.Module, data: str | Path | DataConfig, cfg: ProxyConfig = ProxyConfig(),
        callbacks: Sequence[EpochCallback] = (), *, progress: Callable[[str], None] | None = None) -> FitResult:
    """Train `model` on `data` for `cfg.epochs` epochs; evaluate the EMA every `cfg.val_every` epochs and at the end.

    `model`: a train-time DetectionModel (`space.builder.build_model`) built for the data's classes; it is moved to
    `cfg.device` and trained in place. `data`: a data.yaml path or a loaded DataConfig. Images are letterboxed to
    `cfg.imgsz` px (square), `cfg.batch` per step. The recipe is YOLOv5's train.py (v7.0): three parameter groups,
    weight decay scaled by batch x accumulate / nominal batch, linear warm-up over `cfg.warmup_epochs` (bias LR from
    `warmup_bias_lr`), linear or cosine LR down to lr0 x lrf, EMA with decay x (1 - exp(-updates / tau)), AMP on CUDA.
    After each evaluation every callback gets (epoch from 1, mean box/obj/cls losses of the epoch, mAP50-95, mAP50
    in [0, 1]); a truthy return stops training (not after the last epoch). Unless `cfg.quiet`, every epoch ends
    with one `epoch_line` to `progress` (None: the "repnas.train" logger at INFO, and a tqdm bar over the epoch's
    batches while stderr is a terminal; a caller that gives `progress`, e.g. a search worker, gets lines only).

    Returns a FitResult: `model` (the same object, EMA weights loaded, eval mode, on the device), `history` (one
    dict per epoch with EPOCH_COLUMNS and `calibration_steps`: mAP None where not validated; `skipped_steps` counts
    every step skipped for non-finite gradients so far, `calibration_steps` those of them that were AMP's loss
    scaler calibrating, `grad_scale` the scaler's scale at the epoch's end, None without AMP), `metrics` (the last
    evaluation), `seconds` (wall time), `stopped_early`. Raises RepnasError when the model's nc differs from the
    data's, TrainingDiverged on a non-finite loss or MAX_BAD_STEPS non-finite gradient steps in a row (AMP's
    calibration steps not counted: `counts_as_divergence`), DataError for unusable data, and the device errors of
    `nas.device.resolve_device`.
    """
    start = time.perf_counter()
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and device.index is not None:  # the DataLoader's pin-memory thread and any
        torch.cuda.set_device(device)  # context follow the current device: keep them on the training GPU
    data_cfg = data if isinstance(data, DataConfig) else load_data_config(data)
    detect = model.detect
    if detect.nc != data_cfg.nc:
        raise RepnasError(f"the model has nc={detect.nc} but {data_cfg.source} names {data_cfg.nc} classes; "
                          f"build the model with nc={data_cfg.nc}")
    stride = int(model.stride.max())
    train_index = index_split(data_cfg.train, data_cfg.nc, "train", str(data_cfg.source))
    records = subset_records(train_index.records, cfg.fraction, cfg.seed)
    workers = cfg.workers if cfg.workers is not None else (min(8, torch.get_num_threads()) if device.type == "cuda"
                                                           else 0)
    train_set = YoloDataset(records, cfg.imgsz, augment=True, hyp=cfg.augment, cache_images=cfg.cache_images)
    val_records = subset_records(index_split(data_cfg.val, data_cfg.nc, "val", str(data_cfg.source)).records,
                                 cfg.val_fraction, 0)
    val_set = YoloDataset(val_records, cfg.imgsz,
                          rect=True, batch_size=cfg.batch * 2, stride=stride, cache_images=cfg.cache_images)
    loader = make_loader(train_set, cfg.batch, shuffle=True, workers=workers, seed=cfg.seed,
                         pin_memory=device.type == "cuda")  # pinning on a CPU run would make a context on GPU 0

    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    accumulate = max(round(cfg.nominal_batch / cfg.batch), 1) if cfg.nominal_batch else 1
    weight_decay = cfg.weight_decay * cfg.batch * accumulate / (cfg.nominal_batch or cfg.batch)
    groups = parameter_groups(model, weight_decay)
    if cfg.optimizer == "AdamW":
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr0, betas=(cfg.momentum, 0.999))
    else:
        optimizer = torch.optim.SGD(groups, lr=cfg.lr0, momentum=cfg.momentum, nesterov=True)
    lf = _lr_lambda(cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lf)
    loss_fn = DetectionLoss(model, cfg.loss.scaled(detect.nl, detect.nc, cfg.obj_ref_imgsz or cfg.imgsz))
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    ema = ModelEMA(model, cfg.ema_decay, cfg.ema_tau)

    gpu = gpu_lock(device)  # taken per step: workers sharing a GPU do not train while one times (no-op on a CPU)
    batches = len(loader)
    warmup_iters = round(cfg.warmup_epochs * batches)
    history: list[dict] = []
    metrics: Metrics | None = None
    stopped = False
    last_step = -1
    bad_steps = skipped = calibrating = 0
    for epoch in range(cfg.epochs):
        model.train()
        epoch_start = time.perf_counter()
        sums = torch.zeros(3)
        for i, (images, targets, _, _) in enumerate(_bar(loader, batches, f"epoch {epoch + 1}/{cfg.epochs}",
                                                         show=progress is None and not cfg.quiet)):
            with gpu.step():  # no latency measurement of another process runs on this GPU during a step
                it = i + batches * epoch
                x = images.to(device, non_blocking=True).float() / 255  # (B, 3, S, S)
                if device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                if it < warmup_iters:  # warm-up: LR ramps from 0 (bias: from warmup_bias_lr), momentum ramps up
                    frac = it / warmup_iters
                    for group in optimizer.param_groups:
                        start_lr = cfg.warmup_bias_lr if group.get("is_bias") else 0.0
                        group["lr"] = start_lr + frac * (group["initial_lr"] * lf(epoch) - start_lr)
                        if cfg.optimizer == "SGD":
                            group["momentum"] = cfg.warmup_momentum + frac * (cfg.momentum - cfg.warmup_momentum)
                with torch.autocast(device.type, enabled=use_amp):
                    preds = model(x)
                    loss, items = loss_fn(preds, targets.to(device))
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss became {loss.item()} at epoch {epoch + 1}, batch {i + 1} (box/obj/cls "
                        f"{[round(v, 4) for v in items.tolist()]}); lower lr0 (now {cfg.lr0}) or check the labels"
                    )
                scaler.scale(loss).backward()
                if it - last_step >= accumulate:
                    scaler.unscale_(optimizer)
                    norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
                    finite = bool(torch.isfinite(norm))
                    scale_before = scaler.get_scale() if use_amp and not finite else None
                    if finite or use_amp:  # with AMP the scaler skips a non-finite step itself and lowers its scale
                        scaler.step(optimizer)
                        scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    if finite:
                        ema.update(model)
                        bad_steps = 0
                    else:  # one inf gradient would turn every weight into NaN: skip the step instead
                        skipped += 1
                        scale_after = scaler.get_scale() if use_amp else None
                        if counts_as_divergence(finite, use_amp, scale_before, scale_after):
                            bad_steps += 1
                        else:  # AMP's scaler lowered its scale (calibration): the run of bad steps is left as it is
                            calibrating += 1
                        if bad_steps >= MAX_BAD_STEPS:
                            raise TrainingDiverged(
                                f"gradients were non-finite for {bad_steps} steps in a row (epoch {epoch + 1}, batch "
                                f"{i + 1}); lower lr0 (now {cfg.lr0}) or check the labels"
                            )
                    last_step = it
                sums += items.detach().float().cpu()  # (a device-to-host copy: the step's GPU work is done)
        scheduler.step()
        losses = dict(zip(("box", "obj", "cls"), (sums / max(batches, 1)).tolist()))
        record = {"epoch": epoch + 1, **losses, "lr": optimizer.param_groups[1]["lr"], "skipped_steps": skipped,
                  "calibration_steps": calibrating, "grad_scale": scaler.get_scale() if use_amp else None,
                  "train_seconds": time.perf_counter() - epoch_start, "map50_95": None, "map50": None}
        final = epoch + 1 == cfg.epochs
        if (epoch + 1) % cfg.val_every == 0 or final:
            with gpu.step():
                metrics = evaluate(ema.ema, val_set, cfg.imgsz, device=device, half=use_amp, workers=workers)
            record |= {"map50_95": metrics.map50_95, "map50": metrics.map50, "val_seconds": metrics.seconds}
        history.append(record)
        if not cfg.quiet:
            (progress or LOG.info)(epoch_line(record, cfg.epochs))
        validated = record["map50"] is not None
        if validated and any(cb(epoch + 1, losses, metrics.map50_95, metrics.map50) for cb in callbacks) and not final:
            stopped = True
            break
    model.load_state_dict(ema.ema.state_dict())
    model.eval()
    return FitResult(model, history, metrics, time.perf_counter() - start, stopped)


@dataclass
class TrainReport:
    """What `train_job` wrote and measured. `metrics` is metrics.json's content (mAPs in [0, 1], params, GFLOPs as
    built and deployed at `cfg.imgsz`, epochs run, training seconds, data, device, the resolved proxy)."""

    folder: Path
    fit: FitResult
    cost: ModelCost
    metrics: dict


def train_job(model_yaml: str | Path, data: str | Path | DataConfig, cfg: ProxyConfig, out: str | Path) -> TrainReport:
    """Check the dataset, build `model_yaml` for its classes, train it with `fit` and write the run into `out`.

    `model_yaml`: a YOLOv5-format model YAML (its `nc` is replaced by the data's). `data`: a data.yaml path or a
    loaded DataConfig; it is checked (`nas.data.check_dataset`) before `out` is created, so a dataset with nothing
    usable leaves no folder behind. `cfg`: how to train (epochs, `imgsz` in px, batch, device, loader workers...).
    `out`: the run's folder, created if missing; it receives weights.pt (the EMA state_dict, CPU tensors, loadable
    with `torch.load(..., weights_only=True)`), model.yaml (with the data's nc), epochs.csv (`epochs_csv`) and
    metrics.json, each written atomically (a killed run leaves whole files or none).

    Returns a TrainReport. Raises DataError for a bad or unusable dataset, ModelConfigError for a bad model YAML,
    TrainingDiverged when the loss or gradients stay non-finite, RepnasError for an unusable device.
    """
    data_cfg = data if isinstance(data, DataConfig) else load_data_config(data)
    check_dataset(data_cfg)  # a dataset with nothing usable fails here, before the output folder is made
    seed_everything(cfg.seed)  # the initial weights too: the same seed gives the same run
    model = build_model(model_yaml, nc=data_cfg.nc)
    cost = model_cost(model, cfg.imgsz)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.quiet:
        LOG.info("training %s (%s params) on %s: %d epochs at %d px, batch %d, device %s", model_yaml,
                 f"{cost.params:,}", data_cfg.source, cfg.epochs, cfg.imgsz, cfg.batch, resolve_device(cfg.device))
    result = fit(model, data_cfg, cfg)
    write_bytes_atomic(out / "weights.pt", state_dict_bytes(model))
    write_text_atomic(out / "model.yaml", format_model_yaml(model.yaml | {"nc": data_cfg.nc},
                                                            header=f"trained by repnas on {data_cfg.source}"))
    write_text_atomic(out / "epochs.csv", epochs_csv(result.history))
    metrics = {
        "map50_95": result.metrics.map50_95, "map50": result.metrics.map50, "params": cost.params,
        "gflops": cost.gflops, "params_deploy": cost.params_deploy, "gflops_deploy": cost.gflops_deploy,
        "epochs": len(result.history), "imgsz": cfg.imgsz, "train_seconds": result.seconds,
        "data": str(data_cfg.source), "device": str(next(model.parameters()).device), "proxy": cfg.to_dict(),
    }
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2, default=str))
    return TrainReport(out, result, cost, metrics)
