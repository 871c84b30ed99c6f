"""Channel pruning to a *measured* latency target: a search over the deploy-FLOPs fraction in which every candidate
is pruned from the unpruned network with importance scores computed once, and timed by the caller.

Latency is not a function of FLOPs that can be written down (launch overhead, kernel shapes, the memory system), so
the fraction is searched on measurements: `time_ratio(pruned)` returns the candidate's latency over the unpruned
network's, measured interleaved with it (nas.prune builds it on nas.latency.measure_latency; pruning does not
import nas). Starting from f = target (latency proportional to FLOPs), each step fits a line ratio = a + b x f by
weighted least squares through every measurement so far and the unpruned network's (1, 1) (latency is locally
affine in FLOPs: an overhead plus a part that scales; the weights favour points near the current estimate), and
times the fraction where the line meets the target; it stops when the fitted fraction stops moving and the last
measurement is near the target. A single CPU measurement of a ratio varies by a few percent, and a search that
stops on the first measurement inside the tolerance keeps a lucky one (the winner's curse); the fit averages them.
The candidate nearest the fitted fraction is returned.

Importance is computed once, on the unpruned network (`importance_table`: Taylor gradients over the calibration
batches, or magnitudes), and every candidate reuses it (`TableImportance`): candidates differ only in how many
channels go, never in the ranking of channels, and the search pays for one importance pass instead of one per step.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from pruning.channel import (
    MIN_FRACTION,
    TRACE_SIZE,
    Batch,
    LossFn,
    PruneError,
    PruneResult,
    _accumulate_gradients,
    _FlopsModel,
    _groups,
    _ignored,
    _raw_forward,
    make_importance,
    prune_to_flops,
)
from space.cost import count_gflops, is_deploy

FRACTION_STEP = 0.01  # the search has converged when the fitted fraction moves less than this
SEARCH_TOLERANCE = 0.015  # stop when the measured ratio is within 1.5% of the target (the check allows 3%)
MAX_EVALS = 8  # timed candidates at most
FLOPS_SLACK = 0.05  # FLOPs tolerance of each candidate's prune: the fraction is a search variable, not a target


def importance_table(model: nn.Module, importance: str = "l2", imgsz: int | tuple[int, int] = 640, *,
                     calibration: Iterable[Batch] | None = None, loss_fn: LossFn | None = None, round_to: int = 8,
                     keep: Iterable[str] = (), seed: int = 0) -> dict[str, torch.Tensor]:
    """One importance score per output channel of every prunable group's root conv of the fused `model` (not
    changed), by the root conv's module name: {"model.3.rbr_reparam": (C,) tensor, ...}.

    `importance` as in `pruning.channel.prune_to_flops` ("taylor" needs `calibration` batches and `loss_fn`).
    Raises PruneError for a model that is not a fused DetectionModel or a Taylor request without batches.
    """
    import torch_pruning as tp

    if not (hasattr(model, "detect") and is_deploy(model)):
        raise PruneError("importance_table scores a fused (deploy) DetectionModel; call fuse_model first")
    work = copy.deepcopy(model)
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    ch = int(getattr(work, "yaml", {}).get("ch", 3))
    if importance == "taylor":
        batches = list(calibration or [])
        if not batches or loss_fn is None:
            raise PruneError("importance='taylor' needs calibration batches and a loss_fn(model, batch) -> loss")
        _accumulate_gradients(work, batches, loss_fn)
    scorer = make_importance(importance, seed)
    example = torch.zeros(1, ch, TRACE_SIZE, TRACE_SIZE, device=next(work.parameters()).device)
    dg = tp.DependencyGraph().build_dependency(work, example_inputs=example, forward_fn=_raw_forward, verbose=False)
    ignored = [m for m in _ignored(work, keep) if m in dg.module2node]
    table = {}
    for group in _groups(dg, _FlopsModel(work, (h, w), ch), ignored, round_to):
        pruner = dg.get_pruner_of_module(group.root)
        full = dg.get_pruning_group(group.root, pruner.prune_out_channels, list(range(group.channels)))
        table[group.name] = scorer(full).detach().float().cpu().clone()
    return table


class TableImportance:
    """An importance for `prune_to_flops` that reads `importance_table`'s scores: the group's root conv is named in
    `model` (the very network being pruned, an unpruned copy of the one the table was computed on)."""

    def __init__(self, table: dict[str, torch.Tensor], model: nn.Module, name: str = "table"):
        self.table, self.__name__ = table, name
        self.names = {id(m): n for n, m in model.named_modules()}

    def __call__(self, group) -> torch.Tensor:
        root = group[0].dep.target.module
        name = self.names.get(id(root))
        scores = self.table.get(name)
        if scores is None or len(scores) != root.out_channels:
            raise PruneError(f"importance table has no scores for {name} with {root.out_channels} channels: "
                             "prune an unpruned copy of the network the table was computed on")
        return scores


@dataclass
class LatencyTargetResult:
    """What `prune_to_latency` produced: the chosen candidate (`result`, pruned at `fraction` of the deploy FLOPs)
    with its measured latency ratio, and every timed candidate as (FLOPs fraction asked, achieved, ratio)."""

    result: PruneResult
    target_ratio: float
    fraction: float
    ratio: float
    evaluations: list[tuple[float, float, float]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    fitted: float | None = None  # the ratio the fit over every measurement predicts for the chosen candidate

    @property
    def error(self) -> float:
        """Relative error of the measured ratio against the target (0.01 = 1% slower than asked)."""
        return self.ratio / self.target_ratio - 1


def prune_to_latency(model: nn.Module, target_ratio: float, time_ratio: Callable[[nn.Module], float],
                     imgsz: int | tuple[int, int] = 640, *, importance: str = "l2",
                     calibration: Sequence[Batch] | None = None, loss_fn: LossFn | None = None, round_to: int = 8,
                     keep: Iterable[str] = (), seed: int = 0, tolerance: float = SEARCH_TOLERANCE,
                     max_evals: int = MAX_EVALS, progress: Callable[[str], None] | None = None
                     ) -> LatencyTargetResult:
    """Prune the fused `model` (not changed) so that its measured latency is `target_ratio` (0 < r < 1) of the
    unpruned network's.

    `time_ratio(candidate)` -> the candidate's latency / the unpruned model's, measured interleaved (a float > 0).
    `imgsz`: the FLOPs input (the size latency is measured at). `importance`, `calibration`, `loss_fn`,
    `round_to`, `keep`, `seed`: as in `prune_to_flops`, but importance is computed once (`importance_table`).
    Stops when a candidate's ratio is within `tolerance` (relative) of the target or after `max_evals` timings,
    returning the candidate nearest the target. Raises PruneError for a ratio outside (0, 1), a non-deploy model,
    or a target below what the smallest reachable network measures (the message gives that ratio).
    """
    say = progress or (lambda line: None)
    if not 0 < target_ratio < 1:
        raise PruneError(f"target latency ratio {target_ratio!r} must be in (0, 1): a fraction of the unpruned "
                         "model's measured latency, e.g. 0.6x")
    start = time.perf_counter()
    table = importance_table(model, importance, imgsz, calibration=calibration, loss_fn=loss_fn, round_to=round_to,
                             keep=keep, seed=seed)
    seconds = {"importance": time.perf_counter() - start}
    say(f"{importance} importance of {len(table)} channel groups computed once ({seconds['importance']:.1f} s)")
    cache: dict[float, tuple[PruneResult, float]] = {}
    evaluations: list[tuple[float, float, float]] = []

    def evaluate(fraction: float) -> tuple[PruneResult, float]:
        fraction = round(fraction, 4)
        if fraction not in cache:
            work = copy.deepcopy(model)
            result = prune_to_flops(work, fraction, imgsz, importance=TableImportance(table, work, importance),
                                    round_to=round_to, keep=keep, steps=1, tolerance=FLOPS_SLACK, inplace=True)
            result.importance = importance
            ratio = float(time_ratio(result.model))
            if not (math.isfinite(ratio) and ratio > 0):
                raise PruneError(f"time_ratio returned {ratio!r}; it must be a positive latency ratio")
            cache[fraction] = (result, ratio)
            evaluations.append((fraction, result.flops_ratio, ratio))
            say(f"candidate at {result.flops_ratio:.3f} of the deploy FLOPs: latency ratio {ratio:.3f} "
                f"(target {target_ratio:.3f})")
        return cache[fraction]

    floor = _floor_fraction(model, imgsz, round_to, keep)
    points = [(1.0, 1.0)]  # (achieved FLOPs fraction, measured ratio); the unpruned network is ratio 1 by definition
    f = min(max(target_ratio, floor), 0.999)  # first guess: latency proportional to FLOPs
    final = f
    for _ in range(max_evals):
        result, ratio = evaluate(f)
        points.append((result.flops_ratio, ratio))
        if f <= floor + 1e-4 and ratio > target_ratio * (1 + tolerance):
            raise PruneError(f"target latency ratio {target_ratio:.3f} cannot be reached: the smallest network "
                             f"pruning reaches ({result.flops_ratio:.1%} of the deploy FLOPs at imgsz {imgsz}, "
                             f"round_to={round_to}) measures {ratio:.3f} of the unpruned latency; raise the target "
                             f"to at least {ratio * (1 + tolerance):.2f}x or lower round_to")
        final = min(max(_solve(points, target_ratio, f), floor), 0.999)
        if abs(final - f) <= FRACTION_STEP and abs(ratio / target_ratio - 1) <= 2 * tolerance:
            break  # the fit and the last measurement agree: the candidate at f is the answer
        f = final
    # the evaluated candidate nearest the fitted solution (the fit averages the noise of single measurements)
    chosen = min(cache, key=lambda fr: abs(cache[fr][0].flops_ratio - final))
    result, ratio = cache[chosen]
    fitted = _predict(points, result.flops_ratio, final)
    seconds["search"] = time.perf_counter() - start - seconds["importance"]
    return LatencyTargetResult(result, target_ratio, result.flops_ratio, ratio, evaluations, seconds, fitted)


def _fit(points: list[tuple[float, float]], near: float) -> tuple[float, float]:
    """Least-squares line ratio = a + b x fraction through the measured points, each weighted by its nearness to
    `near` (latency is locally affine in FLOPs: a fixed overhead plus a part that scales), so several noisy
    measurements average out. Falls back to the line through (1, 1) and the nearest point when the fit is not
    increasing (noise)."""
    import numpy as np

    x = np.array([p[0] for p in points])
    y = np.array([p[1] for p in points])
    w = 1.0 / (0.05 + np.abs(x - near))
    if len(points) >= 3:
        b, a = np.polyfit(x, y, 1, w=np.sqrt(w))
        if b > 0:
            return float(a), float(b)
    k = int(np.argmin(np.abs(x[1:] - near))) + 1
    b = (1.0 - y[k]) / max(1.0 - x[k], 1e-6)
    b = b if b > 0 else 1.0
    return float(1.0 - b), float(b)


def _solve(points: list[tuple[float, float]], target: float, near: float) -> float:
    """The FLOPs fraction at which the fitted line reaches `target`."""
    a, b = _fit(points, near)
    return (target - a) / b


def _predict(points: list[tuple[float, float]], fraction: float, near: float) -> float:
    a, b = _fit(points, near)
    return a + b * fraction


def _floor_fraction(model: nn.Module, imgsz: int | tuple[int, int], round_to: int, keep: Iterable[str]) -> float:
    """The smallest deploy-FLOPs fraction pruning can reach (every group at round_to channels), with a margin."""
    import torch_pruning as tp

    work = copy.deepcopy(model)
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    ch = int(getattr(work, "yaml", {}).get("ch", 3))
    example = torch.zeros(1, ch, TRACE_SIZE, TRACE_SIZE, device=next(work.parameters()).device)
    dg = tp.DependencyGraph().build_dependency(work, example_inputs=example, forward_fn=_raw_forward, verbose=False)
    flops = _FlopsModel(work, (h, w), ch)
    groups = _groups(dg, flops, [m for m in _ignored(work, keep) if m in dg.module2node], round_to)
    total = count_gflops(work, (h, w), ch)
    rest = total - flops.gflops(groups, [0] * len(groups))
    floor = flops.gflops(groups, [g.channels - g.levels[-1] for g in groups]) + rest
    return min(1.0, max(MIN_FRACTION, floor / total * (1 + 2 * FLOPS_SLACK)))
