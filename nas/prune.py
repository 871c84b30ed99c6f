"""The pruning job: a fused detector -> pruned to a FLOPs target -> (BatchNorms in, fine-tuned, folded back) ->
evaluated and timed, with a before/after report. `repnas prune` and the search's `--prune-to` both run `prune_job`.

Data flow: mAP of the source; `pruning.channel.prune_to_flops` (magnitude or Taylor importance, the latter from
calibration batches of the training split), or for a latency target
`pruning.latency_target.prune_to_latency` (the FLOPs fraction searched on interleaved measurements against the
source); mAP right after pruning; `pruning.finetune.insert_batchnorms` after
each pruned conv, calibrated on training batches (output-neutral), `nas.train.fit` with
`ProxyConfig.finetune(epochs=K)`, `fold_batchnorms` (equivalence-checked); mAP after fine-tuning; latency of the
result with the source as the interleaved reference (a ratio that survives a noisy machine).
`resolve_prune_data` picks the job's dataset; `save_prune_report` writes the result's folder.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from nas.data import DataConfig, YoloDataset, index_split, make_loader
from nas.device import resolve_device
from nas.evaluate import evaluate
from nas.files import write_text_atomic
from nas.latency import LatencyConfig, measure_latency
from nas.loss import DetectionLoss
from nas.train import ProxyConfig, fit
from pruning.channel import PruneError, PruneResult, parse_target, prune_to_flops
from pruning.finetune import fold_batchnorms, insert_batchnorms
from pruning.portable import save_pruned
from space.cost import count_gflops, count_params

if TYPE_CHECKING:
    from nas.source import Source

LOG = logging.getLogger("repnas.prune")
CALIBRATION_BATCHES = 8
CHECK_RUNS = 3  # independent interleaved re-measurements of a latency target's result
CHECK_TOLERANCE = 0.03  # their median must be within ±3% of the target


@dataclass(frozen=True)
class LatencyTarget:
    """A measured latency target: `ratio` of the unpruned model's latency ("0.6x"), or `ms` milliseconds ("35ms")
    on the device, backend, input size and batch it is timed with."""

    text: str
    ratio: float | None = None
    ms: float | None = None

    @classmethod
    def parse(cls, text: str) -> LatencyTarget:
        """'0.6x' (a ratio in (0, 1)) or '35ms' (> 0). Raises PruneError naming the value and both forms."""
        raw = str(text).strip().lower().replace(" ", "")
        try:
            if raw.endswith("ms"):
                value = float(raw[:-2])
                if math.isfinite(value) and value > 0:
                    return cls(str(text), ms=value)
            elif raw.endswith("x"):
                value = float(raw[:-1])
                if 0 < value < 1:
                    return cls(str(text), ratio=value)
        except ValueError:
            pass
        raise PruneError(f"latency target {text!r} is not a ratio in (0, 1) of the unpruned model's measured latency "
                         "('0.6x') or a positive time in milliseconds ('35ms')")


@dataclass
class PruneReport:
    """Before/after figures of one pruning job (`table()` is the printed report, `to_dict()` prune.json's)."""

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
    latency_target: dict = field(default_factory=dict)  # a latency target's search and its independent check

    def to_dict(self) -> dict:
        r = self.result
        return {"latency_target": self.latency_target or None} | {
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

    def table(self) -> str:
        """The printed report: `rows()` as a before/after table, then the target, what was achieved and how."""
        rows, r = self.rows(), self.result
        width = max(len(row[0]) for row in rows)
        lines = [f"{'':<{width}}  {'before':>14}  {'after':>14}"]
        lines += [f"{name:<{width}}  {before:>14}  {after:>14}" for name, before, after in rows]
        lt = self.latency_target
        if lt:
            check = ", ".join(f"{x:.3f}" for x in lt["check_ratios"])
            lines.append(f"latency target {lt['target']} = ratio {lt['target_ratio']:.3f} at {self.imgsz} px: "
                         f"pruned to {r.flops_ratio:.3f} of the deploy FLOPs after {len(lt['evaluations'])} timed "
                         "candidates; "
                         f"independent check, median of {len(lt['check_ratios'])} interleaved runs ({check}): "
                         f"{lt['check_median']:.3f} ({lt['check_error']:+.1%}, "
                         f"{'within' if lt['within'] else 'NOT within'} ±{CHECK_TOLERANCE:.0%}); mAP at "
                         f"{self.eval_imgsz} px; {r.importance} importance computed once, channels rounded to "
                         f"{r.round_to}; {lt['seconds']:.1f} s to reach the target")
        else:
            lines.append(f"target {r.target_gflops:.3f} GFLOPs at {self.imgsz} px, achieved {r.gflops_after:.3f} "
                         f"({r.error:+.2%}); mAP at {self.eval_imgsz} px; {r.importance} importance, channels rounded "
                         f"to {r.round_to}; {r.seconds:.1f} s to prune")
        return "\n".join(lines)


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


def _measured(say: Callable[[str], None], what: str, evaluate_map: Callable[[], tuple[float, float]]):
    """Evaluate with a line before (what is evaluated) and one after (the figures and the time)."""
    say(f"evaluating {what}")
    start = time.perf_counter()
    pair = evaluate_map()
    say(f"{what}: mAP50-95 {pair[0]:.4f} mAP50 {pair[1]:.4f} ({time.perf_counter() - start:.1f} s)")
    return pair


def prune_job(model: nn.Module, data: DataConfig | None, target: float | str | None, *, imgsz: int = 640,
              eval_imgsz: int = 160, importance: str = "taylor", round_to: int = 8, finetune_epochs: int = 0,
              finetune: ProxyConfig | None = None, device: str = "auto", evaluate_before: bool = True,
              latency: LatencyConfig | None = None, measure: bool = True,
              target_latency: str | LatencyTarget | None = None,
              progress: Callable[[str], None] | None = None) -> PruneReport:
    """Prune the fused `model` to `target` deploy FLOPs or to `target_latency`, optionally fine-tune it, evaluate
    and time it.

    `model`: a fused (deploy-form) detector, e.g. `Source.model` or `pruning.reparam.fuse_model(...)`; it is copied,
    never changed. `target`: a fraction (0.5), a percentage ("50%") or absolute GFLOPs ("2.5G") of its deploy GFLOPs
    at `imgsz` (`pruning.channel.parse_target`). `target_latency` instead of `target` ("0.6x" of the source's
    measured latency, or "35ms"; `LatencyTarget.parse`): the FLOPs fraction is searched on measurements, each
    candidate timed interleaved with the source at `imgsz`, batch 1, with `latency` (importance computed once;
    `pruning.latency_target.prune_to_latency`); after fine-tuning an independent re-measurement (the median of
    CHECK_RUNS interleaved runs) is checked against ±CHECK_TOLERANCE of the target and reported in
    `PruneReport.latency_target`. `imgsz`: the square input side in px of the FLOPs count and the
    latency. `eval_imgsz`: the px side of evaluation, calibration batches and fine-tuning. `data` (None: no
    evaluation, no Taylor importance, no fine-tuning; see `resolve_prune_data`) gives calibration batches of the
    training split and the val split. `importance` defaults to "taylor": on the trained seed it kept 91.5% of mAP50
    at 50% FLOPs where weight magnitude ("l2") kept 53.5%, no better than random (benchmarks/RESULTS.md); without
    data it falls back to "l2". `round_to`: kept channel counts are multiples of it. `finetune_epochs` K > 0: BatchNorms
    go in after each pruned conv, K epochs of `finetune` (default `ProxyConfig.finetune(epochs=K, imgsz=eval_imgsz)`),
    then they are folded back. `evaluate_before`: also measure the source's mAP. `latency`/`measure`: how, and
    whether, to time the result against the source, interleaved (default `LatencyConfig.for_device`). `progress`
    gets one line per step as it starts and ends (calibration batches, pruning, each evaluation, each fine-tuning
    epoch, folding, latency); None: the "repnas.prune" logger at INFO (shown by the CLI unless --quiet).

    Returns a PruneReport: the final network (CPU, eval, deploy form), the PruneResult (GFLOPs at `imgsz`, params),
    (mAP50-95, mAP50) pairs in [0, 1] before, after pruning and after fine-tuning (None where not measured), the
    latency dict (ms, ratio to the source) and seconds per step. Raises PruneError for a model that is not a fused
    detector or a bad target, importance or round_to, for both or neither of `target` and `target_latency`, and
    for a latency target that pruning cannot reach (the message gives the smallest reachable ratio); ValueError
    when `finetune_epochs` > 0 without `data`; the device errors of `resolve_device`; TrainingDiverged when
    fine-tuning diverges.
    """
    say = progress or (lambda line: LOG.info("prune: %s", line))
    dev = resolve_device(device)
    seconds: dict[str, float] = {}
    source = copy.deepcopy(model).to(dev).eval()

    start = time.perf_counter()
    if importance == "taylor" and data is None:
        importance = "l2"
    batches, loss_fn = [], None
    if data is not None and (importance == "taylor" or finetune_epochs > 0):
        batches = training_batches(data, eval_imgsz, 8)
        say(f"{len(batches)} calibration batches of the training split at {eval_imgsz} px "
            f"({time.perf_counter() - start:.1f} s)")
    if importance == "taylor":
        from nas.loss import LossHyp

        hyp = LossHyp().scaled(model.detect.nl, model.detect.nc, eval_imgsz)

        def loss_fn(m, batch):
            images, targets = batch
            return DetectionLoss(m, hyp)(m(images.to(dev)), targets.to(dev))[0]

    if (target is None) == (target_latency is None):
        raise PruneError("give one target: a FLOPs target (--target-flops) or a latency target (--target-latency)")
    before = count_gflops(source, imgsz)
    calibration = [(x.to(dev), t) for x, t in batches] if importance == "taylor" else None
    lat_cfg = latency or LatencyConfig.for_device(dev)
    step = time.perf_counter()
    searched = {}
    if target_latency is not None:
        result, searched = _prune_to_latency(source, target_latency, imgsz, dev, lat_cfg, importance, calibration,
                                             loss_fn, round_to, say)
    else:
        say(f"pruning {before:.3f} -> {parse_target(target, before):.3f} deploy GFLOPs at {imgsz} px ({importance} "
            "importance; each step builds the dependency graph, plans the channel counts, removes channels)")
        result = prune_to_flops(source, target, imgsz, importance=importance, round_to=round_to,
                                calibration=calibration, loss_fn=loss_fn)
    seconds["prune"] = time.perf_counter() - start
    say(f"pruned {result.gflops_before:.3f} -> {result.gflops_after:.3f} GFLOPs, {result.params_before:,} -> "
        f"{result.params_after:,} params in {result.steps} steps ({time.perf_counter() - step:.1f} s)")
    # the source's mAP once pruning succeeded (on a copy): an unreachable target fails before any evaluation
    map_before = None
    if data is not None and evaluate_before:
        map_before = _measured(say, f"the source at {eval_imgsz} px", lambda: _map(source, data, eval_imgsz, dev))
    pruned = result.model.eval()
    if data is not None:
        map_pruned = _measured(say, f"the pruned model at {eval_imgsz} px",
                               lambda: _map(pruned, data, eval_imgsz, dev))
    else:
        map_pruned = None

    map_finetuned = None
    final = pruned
    if finetune_epochs > 0:
        if data is None:
            raise ValueError("fine-tuning needs training data: give --data")
        start = time.perf_counter()
        cfg = finetune or ProxyConfig.finetune(epochs=finetune_epochs, imgsz=eval_imgsz, device=str(dev))
        cfg = replace(cfg, epochs=finetune_epochs)
        with_bn = insert_batchnorms(pruned.cpu(), [x for x, _ in batches], convs=result.pruned_convs)
        say(f"fine-tuning {finetune_epochs} epoch{'s' * (finetune_epochs != 1)} at {cfg.imgsz} px, batch "
            f"{cfg.batch} (BatchNorms inserted after {len(result.pruned_convs)} pruned convs)")
        fit(with_bn, data, cfg, progress=lambda line: say(f"fine-tune {line}"))
        final = fold_batchnorms(with_bn.cpu().eval()).eval()
        seconds["finetune"] = time.perf_counter() - start
        say(f"BatchNorms folded back ({seconds['finetune']:.1f} s fine-tuning)")
        map_finetuned = _measured(say, f"the fine-tuned model at {eval_imgsz} px",
                                  lambda: _map(final.to(dev), data, eval_imgsz, dev))

    lat = {}
    if searched:  # the independent check: fine-tuning changed no shape, so the timed candidate's latency stands
        start = time.perf_counter()
        ratios = []
        for run in range(CHECK_RUNS):
            ratios.append(measure_latency(final.to(dev), imgsz, 1, dev, lat_cfg, reference=source).latency_ratio)
            say(f"latency check {run + 1}/{CHECK_RUNS}: ratio {ratios[-1]:.3f} (target {searched['target_ratio']:.3f})")
        check = statistics.median(ratios)
        searched |= {"check_ratios": ratios, "check_median": check,
                     "check_error": check / searched["target_ratio"] - 1,
                     "within": abs(check / searched["target_ratio"] - 1) <= CHECK_TOLERANCE}
        seconds["latency_check"] = time.perf_counter() - start
    if measure:
        start = time.perf_counter()
        say(f"timing the pruned model against the source at {imgsz} px on {dev} ({lat_cfg.iters} iterations each, "
            "interleaved)")
        measured = measure_latency(final, imgsz, 1, dev, lat_cfg, reference=source)
        lat = measured.to_dict() | {"device": measured.device.get("name")}
        seconds["latency"] = time.perf_counter() - start
        say(f"latency {measured.median_ms:.3f} ms median, ratio {measured.latency_ratio:.3f} to the source "
            f"({seconds['latency']:.1f} s)")
    final = final.cpu().eval()
    # the final network's own figures (fine-tuning does not change shapes, but report what is saved)
    result.gflops_after = count_gflops(final, imgsz)
    result.params_after = count_params(final)
    return PruneReport(result, final, imgsz, eval_imgsz, map_before, map_pruned, map_finetuned, lat,
                       finetune_epochs, seconds, searched)


def _prune_to_latency(source: nn.Module, target: str | LatencyTarget, imgsz: int, dev: torch.device,
                      cfg: LatencyConfig, importance: str, calibration, loss_fn, round_to: int,
                      say: Callable[[str], None]) -> tuple[PruneResult, dict]:
    """`prune_to_latency` with candidates timed against `source` here; an absolute target is turned into a ratio
    by timing the source first. Returns the chosen PruneResult and the search's record for the report."""
    from pruning.latency_target import prune_to_latency

    goal = target if isinstance(target, LatencyTarget) else LatencyTarget.parse(target)
    start = time.perf_counter()
    ratio = goal.ratio
    if ratio is None:
        alone = measure_latency(source, imgsz, 1, dev, cfg)
        ratio = goal.ms / alone.median_ms
        say(f"the source measures {alone.median_ms:.3f} ms at {imgsz} px on {dev}: {goal.text} is ratio {ratio:.3f}")
        if ratio >= 1:
            raise PruneError(f"latency target {goal.text}: the unpruned model already measures "
                             f"{alone.median_ms:.3f} ms at {imgsz} px on {dev}; no pruning is needed")
    say(f"pruning to {ratio:.3f} of the source's measured latency at {imgsz} px on {dev} ({importance} importance "
        f"computed once; each candidate timed interleaved with the source, {cfg.iters} iterations each)")

    def time_ratio(candidate: nn.Module) -> float:
        return measure_latency(candidate, imgsz, 1, dev, cfg, reference=source).latency_ratio

    found = prune_to_latency(source, ratio, time_ratio, imgsz, importance=importance, calibration=calibration,
                             loss_fn=loss_fn, round_to=round_to, progress=say)
    say(f"chose {found.fraction:.3f} of the deploy FLOPs: measured ratio {found.ratio:.3f} ({found.error:+.1%}) after "
        f"{len(found.evaluations)} timed candidates ({time.perf_counter() - start:.1f} s)")
    record = {"target": goal.text, "target_ratio": ratio, "fraction": found.fraction, "search_ratio": found.ratio,
              "fitted_ratio": found.fitted,
              "evaluations": [list(e) for e in found.evaluations], "seconds": time.perf_counter() - start}
    return found.result, record


def resolve_prune_data(data: str | Path | None, source: Source, where: str, *, importance: str = "taylor",
                       finetune_epochs: int = 0, evaluate_before: bool = True) -> DataConfig | None:
    """The dataset a pruning job of `source` uses, or None when the job needs none (no evaluation before or after,
    no Taylor importance, no fine-tuning): `data` (a data.yaml) when given, else the data the model was trained on
    (`source.data`, as its study or training run recorded it), else the built-in synthetic set (said in a warning).

    `where` names the source in messages (the CLI's SOURCE). Raises SourceError (`nas.source.resolve_data`) when
    the dataset's class count is not the weights' or a recorded dataset is not an existing data.yaml, DataError for
    a bad data.yaml.
    """
    from nas.source import resolve_data

    if not (evaluate_before or importance == "taylor" or finetune_epochs > 0):
        return None
    return resolve_data(data, source, where)


def save_prune_report(report: PruneReport, out: str | Path, *, source: str, data: DataConfig | None,
                      target: float | str) -> Path:
    """Write the pruned model into `out` (`pruning.portable.save_pruned`: channels.json and weights.pt, with the
    source's description, the data, the sizes and the target as info) and prune.json (`PruneReport.to_dict`);
    returns `out`."""
    out = Path(out)
    info = {"source": source, "data": str(data.source) if data else None, "train_imgsz": report.eval_imgsz,
            "target": str(target), "imgsz": report.imgsz}
    save_pruned(report.model, out, report.result.plan, info=info)
    summary = {"source": source, "target": str(target)} | report.to_dict()
    write_text_atomic(out / "prune.json", json.dumps(summary, indent=2, default=str) + "\n")
    return out
