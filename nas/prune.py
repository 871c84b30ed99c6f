"""The pruning job: a fused detector -> pruned to a FLOPs target -> (BatchNorms in, fine-tuned, folded back) ->
evaluated and timed, with a before/after report. `repnas prune` and the search's `--prune-to` both run `prune_job`.

Data flow: mAP of the source; `pruning.channel.prune_to_flops` (magnitude or Taylor importance, the latter from
calibration batches of the training split); mAP right after pruning; `pruning.finetune.insert_batchnorms` after
each pruned conv, calibrated on training batches (output-neutral), `nas.train.fit` with
`ProxyConfig.finetune(epochs=K)`, `fold_batchnorms` (equivalence-checked); mAP after fine-tuning; latency of the
result with the source as the interleaved reference (a ratio that survives a noisy machine).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from nas.data import DataConfig, YoloDataset, index_split, make_loader
from nas.evaluate import evaluate
from nas.latency import LatencyConfig, measure_latency
from nas.loss import DetectionLoss
from nas.train import ProxyConfig, fit, resolve_device
from pruning.channel import PruneResult, prune_to_flops
from pruning.finetune import fold_batchnorms, insert_batchnorms
from space.cost import count_gflops, count_params

LOG = logging.getLogger("repnas.prune")
CALIBRATION_BATCHES = 8


@dataclass
class PruneReport:
    """Before/after figures of one pruning job (`rows()` is the printed table)."""

    result: PruneResult
    model: nn.Module  # the final pruned (and fine-tuned, folded) network
    imgsz: int  # FLOPs and latency input size
    eval_imgsz: int
    map_before: tuple[float, float] | None = None  # (mAP50-95, mAP50)
    map_pruned: tuple[float, float] | None = None
    map_finetuned: tuple[float, float] | None = None
    latency: dict = field(default_factory=dict)
    finetune_epochs: int = 0
    seconds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        r = self.result
        return {
            "target_gflops": r.target_gflops, "gflops_before": r.gflops_before, "gflops_after": r.gflops_after,
            "flops_ratio": r.flops_ratio, "params_before": r.params_before, "params_after": r.params_after,
            "imgsz": self.imgsz, "eval_imgsz": self.eval_imgsz, "importance": r.importance, "round_to": r.round_to,
            "map50_95_before": _at(self.map_before, 0), "map50_before": _at(self.map_before, 1),
            "map50_95_pruned": _at(self.map_pruned, 0), "map50_pruned": _at(self.map_pruned, 1),
            "map50_95_finetuned": _at(self.map_finetuned, 0), "map50_finetuned": _at(self.map_finetuned, 1),
            "finetune_epochs": self.finetune_epochs, "latency": self.latency, "seconds": self.seconds,
            "channels": {k: list(v) for k, v in r.channels.items()},
        }

    def rows(self) -> list[tuple[str, str, str]]:
        """(figure, before, after) rows of the printed table."""
        r, lat = self.result, self.latency

        def fmt(pair, i):
            return "-" if pair is None else f"{pair[i]:.4f}"

        after = self.map_finetuned if self.map_finetuned is not None else self.map_pruned
        rows = [("params", f"{r.params_before:,}", f"{r.params_after:,}"),
                (f"GFLOPs deploy at {self.imgsz}", f"{r.gflops_before:.3f}", f"{r.gflops_after:.3f}"),
                ("mAP50-95 (after pruning)", fmt(self.map_before, 0), fmt(self.map_pruned, 0)),
                ("mAP50 (after pruning)", fmt(self.map_before, 1), fmt(self.map_pruned, 1))]
        if self.map_finetuned is not None:
            rows += [(f"mAP50-95 (after {self.finetune_epochs} fine-tuning epochs)", fmt(self.map_before, 0),
                      fmt(after, 0)),
                     (f"mAP50 (after {self.finetune_epochs} fine-tuning epochs)", fmt(self.map_before, 1),
                      fmt(after, 1))]
        if lat:
            rows += [(f"latency ms ({lat['device']})", f"{lat['reference_median_ms']:.3f}", f"{lat['median_ms']:.3f}"),
                     ("latency ratio", "1.000", f"{lat['latency_ratio']:.3f}")]
        return rows


def _at(pair, i):
    return None if pair is None else pair[i]


def training_batches(data: DataConfig, imgsz: int, batch: int, n: int = CALIBRATION_BATCHES, seed: int = 0) -> list:
    """`n` seeded batches of the training split, letterboxed, unaugmented: (images float 0..1, targets (N, 6))."""
    index = index_split(data.train, data.nc, "train", str(data.source))
    dataset = YoloDataset(index.records, imgsz, augment=False, cache_images=False)
    out = []
    for images, targets, _, _ in make_loader(dataset, batch, shuffle=True, seed=seed):
        out.append((images.float() / 255, targets))
        if len(out) == n:
            break
    return out


def _map(model: nn.Module, data: DataConfig, imgsz: int, device: torch.device) -> tuple[float, float]:
    m = evaluate(model, data, imgsz, batch=32, device=device)
    return m.map50_95, m.map50


def prune_job(model: nn.Module, data: DataConfig | None, target: float | str, *, imgsz: int = 640,
              eval_imgsz: int = 160, importance: str = "taylor", round_to: int = 8, finetune_epochs: int = 0,
              finetune: ProxyConfig | None = None, device: str = "auto", evaluate_before: bool = True,
              latency: LatencyConfig | None = None, measure: bool = True) -> PruneReport:
    """Prune the fused `model` to `target` (see `prune_to_flops`), optionally fine-tune, evaluate and time it.

    `data` (None: no evaluation, no Taylor importance, no fine-tuning) gives calibration batches and the val split.
    `importance` defaults to "taylor": on the trained seed it kept 91.5% of mAP50 at 50% FLOPs where weight
    magnitude ("l2") kept 53.5%, no better than random (benchmarks/RESULTS.md); without data it falls back to "l2".
    `finetune` overrides the fine-tuning preset (`ProxyConfig.finetune(epochs=finetune_epochs, imgsz=eval_imgsz)`).
    """
    dev = resolve_device(device)
    seconds: dict[str, float] = {}
    source = copy.deepcopy(model).to(dev).eval()
    map_before = _map(source, data, eval_imgsz, dev) if data is not None and evaluate_before else None

    start = time.perf_counter()
    if importance == "taylor" and data is None:
        importance = "l2"
    batches, loss_fn = [], None
    if data is not None and (importance == "taylor" or finetune_epochs > 0):
        batches = training_batches(data, eval_imgsz, 8)
    if importance == "taylor":
        from nas.loss import LossHyp

        hyp = LossHyp().scaled(model.detect.nl, model.detect.nc, eval_imgsz)

        def loss_fn(m, batch):
            images, targets = batch
            return DetectionLoss(m, hyp)(m(images.to(dev)), targets.to(dev))[0]

    result = prune_to_flops(source, target, imgsz, importance=importance, round_to=round_to,
                            calibration=[(x.to(dev), t) for x, t in batches] if importance == "taylor" else None,
                            loss_fn=loss_fn)
    seconds["prune"] = time.perf_counter() - start
    pruned = result.model.eval()
    map_pruned = _map(pruned, data, eval_imgsz, dev) if data is not None else None

    map_finetuned = None
    final = pruned
    if finetune_epochs > 0:
        if data is None:
            raise ValueError("fine-tuning needs training data: give --data")
        start = time.perf_counter()
        cfg = finetune or ProxyConfig.finetune(epochs=finetune_epochs, imgsz=eval_imgsz, device=str(dev), quiet=True)
        cfg = replace(cfg, epochs=finetune_epochs)
        with_bn = insert_batchnorms(pruned.cpu(), [x for x, _ in batches], convs=result.pruned_convs)
        fit(with_bn, data, cfg)
        final = fold_batchnorms(with_bn.cpu().eval()).eval()
        seconds["finetune"] = time.perf_counter() - start
        map_finetuned = _map(final.to(dev), data, eval_imgsz, dev)

    lat = {}
    if measure:
        start = time.perf_counter()
        lat_cfg = latency or LatencyConfig.for_device(dev)
        measured = measure_latency(final, imgsz, 1, dev, lat_cfg, reference=source)
        lat = measured.to_dict() | {"device": measured.device.get("name")}
        seconds["latency"] = time.perf_counter() - start
    final = final.cpu().eval()
    # the final network's own figures (fine-tuning does not change shapes, but report what is saved)
    result.gflops_after = count_gflops(final, imgsz)
    result.params_after = count_params(final)
    return PruneReport(result, final, imgsz, eval_imgsz, map_before, map_pruned, map_finetuned, lat,
                       finetune_epochs, seconds)
