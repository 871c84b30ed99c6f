"""Channel pruning of a fused (deploy) RepVGG-YOLO network to a FLOPs target, on torch-pruning's dependency graph.

The dependency graph hands out coupled groups: one conv's output channels together with every input slice that
reads them (through Concat, Upsample, SPPF's pools, SE's channel scale, C3's joins, Detect's input convs;
YOLOv7's MP, SP and SPPCSPC pools, RepConv, and IDetect, whose implicit layers follow their conv), so a pruned
network always stays consistent. Within a group, an importance score picks which channels go; how many go
is one uniform pruning ratio for all groups, found by bisection so that the deploy GFLOPs (counted as
`space.cost.count_gflops` counts `gflops_deploy`) land within `tolerance` of the target:

    target (0.5, "50%", "2.5G") --parse_target--> GFLOPs
    for each of `steps` iterative steps (geometric intermediate targets):
        groups on the current network; bisection on the ratio against an exact per-conv FLOPs model (then a
        local search moving one or two groups by one level where the levels are coarse); importance picks the
        channels; prune; recount with count_gflops

Kept out of the pruned set: Detect's output convs (their output channels are the predictions), SE's squeeze convs
(`se.down`: their few neurons are neither rounded nor emptied; `se.up` follows its block) and grouped convs with
every conv coupled to their channels (a target below what the rest can reach is refused naming them).
Every pruned conv keeps a multiple of `round_to` output channels, at least `round_to`.
"""

from __future__ import annotations

import copy
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from space.blocks import Detect, RepVGGBlock, SEBlock
from space.cost import count_gflops, count_params, is_deploy
from space.errors import RepnasError
from space.yolov7 import IDetect

IMPORTANCES = ("l1", "l2", "taylor", "random")
MIN_FRACTION = 0.01  # targets below 1% of the unpruned GFLOPs are refused
GROUPED_SHOWN = 3  # grouped convs named in the unreachable-target error, then a count
TRACE_SIZE = 64  # input side for tracing the dependency graph (shapes only; any multiple of the max stride works)

Batch = tuple[torch.Tensor, torch.Tensor]  # (images (B, 3, H, W) float 0..1, targets (N, 6) [img, cls, x, y, w, h])
LossFn = Callable[[nn.Module, Batch], torch.Tensor]  # (model in train mode, batch) -> scalar loss
Importance = Callable[[Any], torch.Tensor]  # torch-pruning group -> one score per channel of the group's root


class PruneError(RepnasError, ValueError):
    """A pruning request that cannot be met as given (bad target, unreachable target, wrong model form)."""


# ---------------------------------------------------------------------------------------------------------------
# Targets

_TARGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(%|g|gflops?|m|mflops?)?\s*$", re.IGNORECASE)


def parse_target(target: float | str, gflops: float) -> float:
    """Target GFLOPs from a fraction of `gflops` (0.5 or "0.5"), a percentage ("50%") or an absolute figure
    ("2.5G" GFLOPs, "800M" MFLOPs). Refused: above 100% or above `gflops`, below 1%, anything else."""
    rule = ("write a fraction in [0.01, 1] (0.5), a percentage in [1%, 100%] ('50%') or absolute GFLOPs ('2.5G')")
    if isinstance(target, bool) or not isinstance(target, (int, float, str)):
        raise PruneError(f"target={target!r} is not a FLOPs target; {rule}")
    if isinstance(target, str):
        match = _TARGET_RE.match(target)
        if match is None:
            raise PruneError(f"target={target!r} is not a FLOPs target; {rule}")
        value, unit = float(match.group(1)), (match.group(2) or "").lower()
    else:
        value, unit = float(target), ""
    if not math.isfinite(value):
        raise PruneError(f"target={target!r} is not finite; {rule}")
    if unit in ("", "%"):
        fraction = value / 100 if unit else value
        shown = f"{value:g}%" if unit else f"{value:g}"
        if fraction > 1:
            hint = " (a plain number is a fraction; write '2.5G' for absolute GFLOPs)" if not unit else ""
            raise PruneError(f"target={target!r}: {shown} is above 100% of the unpruned {gflops:.4g} GFLOPs{hint}; "
                             f"{rule}")
        if fraction < MIN_FRACTION:
            raise PruneError(f"target={target!r}: {shown} is below the 1% minimum; {rule}")
        return fraction * gflops
    absolute = value / 1000 if unit.startswith("m") else value
    if absolute > gflops * (1 + 1e-9):
        raise PruneError(f"target={target!r}: {absolute:.4g} GFLOPs is above the unpruned model's {gflops:.4g} "
                         "GFLOPs at this imgsz; pruning only removes FLOPs, so give a smaller target")
    if absolute < MIN_FRACTION * gflops:
        raise PruneError(f"target={target!r}: {absolute:.4g} GFLOPs is below 1% of the unpruned {gflops:.4g} GFLOPs; "
                         "give a larger target")
    return absolute


# ---------------------------------------------------------------------------------------------------------------
# Importance


class RandomImportance:
    """Uniform random scores from a seeded generator: the baseline that any real criterion should beat."""

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, group) -> torch.Tensor:
        return torch.rand(len(group[0][1]), generator=self.generator)


def make_importance(name: str | Importance, seed: int = 0) -> Importance:
    """The importance callable for `name`: l1/l2 group magnitude, taylor (weight x gradient), or random."""
    import torch_pruning as tp

    if callable(name) and not isinstance(name, str):
        return name
    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1, normalizer=None)
    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2, normalizer=None)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance(normalizer=None)
    if name == "random":
        return RandomImportance(seed)
    raise PruneError(f"importance={name!r} is unknown; use one of {', '.join(IMPORTANCES)} or a callable")


def _accumulate_gradients(model: nn.Module, calibration: Sequence[Batch], loss_fn: LossFn) -> None:
    """Gradients of the summed calibration loss in every weight (for first-order Taylor importance)."""
    was_training = model.training
    model.train()  # Detect returns the raw maps the loss expects
    model.zero_grad(set_to_none=True)
    try:
        with torch.enable_grad():
            for batch in calibration:
                loss = loss_fn(model, batch)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise PruneError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} "
                                     f"{tuple(getattr(loss, 'shape', ()))}")
                if not torch.isfinite(loss):
                    raise PruneError(f"loss_fn returned {loss.item()} on a calibration batch; taylor importance "
                                     "needs a finite loss (check the targets)")
                loss.backward()
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------------------------
# Channel plans


def channel_plan(model: nn.Module) -> dict[str, dict[str, int]]:
    """Every conv's channel counts, by module name: {"model.3.rbr_reparam": {"in": 64, "out": 120}, ...}."""
    return {name: {"in": m.in_channels, "out": m.out_channels}
            for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def sync_channel_attributes(model: nn.Module) -> None:
    """Make the blocks' own channel records (RepVGGBlock.in/out_channels, DetectionModel.layer_info params) match
    their convs after a resize."""
    for module in model.modules():
        if isinstance(module, RepVGGBlock) and module.deploy and isinstance(module.rbr_reparam, nn.Conv2d):
            module.in_channels = module.rbr_reparam.in_channels
            module.out_channels = module.rbr_reparam.out_channels
    info = getattr(model, "layer_info", None)
    if info is not None and len(info) == len(model.model):
        model.layer_info = tuple(replace(li, params=count_params(layer)) for li, layer in zip(info, model.model))


@dataclass
class PruneResult:
    """What `prune_to_flops` produced. `channels`: conv name -> (output channels before, after); `plan`: the
    pruned network's channel plan (see `channel_plan`), what `pruning.portable.save_pruned` writes."""

    model: nn.Module
    target_gflops: float
    gflops_before: float
    gflops_after: float
    params_before: int
    params_after: int
    imgsz: tuple[int, int]
    channels: dict[str, tuple[int, int]]
    plan: dict[str, dict[str, int]]
    importance: str
    round_to: int
    steps: int
    seconds: float
    history: list[float] = field(default_factory=list)  # GFLOPs after each step

    @property
    def flops_ratio(self) -> float:
        return self.gflops_after / self.gflops_before

    @property
    def error(self) -> float:
        """Relative error of the achieved GFLOPs against the target (0.01 = 1% above)."""
        return self.gflops_after / self.target_gflops - 1

    @property
    def pruned_convs(self) -> list[str]:
        """Names of the feature convs whose output channels were pruned: where BatchNorms go before fine-tuning
        (SE's `up` conv follows its block's channels but outputs a channel scale, so it is not listed)."""
        modules = dict(self.model.named_modules())
        return [name for name, (before, after) in self.channels.items()
                if after != before and not isinstance(modules.get(name.rpartition(".")[0]), SEBlock)]


# ---------------------------------------------------------------------------------------------------------------
# The dependency graph and an exact FLOPs model over groups


def _raw_forward(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """DetectionModel.forward up to Detect's output convs: the maps before Detect's view/permute/decode, which
    only reshape channels that are never pruned and would give the tracer reshapes to interpret."""
    outputs: list[Any] = []
    for i, (module, src) in enumerate(zip(model.model, model._from)):
        if src != -1:
            x = outputs[src] if isinstance(src, int) else [x if j == -1 else outputs[j] for j in src]
        if isinstance(module, Detect):
            return [module.level(k, t) for k, t in enumerate(x)]  # (B, na * no, H, W) per level
        x = module(x)
        outputs.append(x if i in model._keep else None)
    raise PruneError("the model has no Detect layer; prune_to_flops prunes DetectionModels")


def _implicit_parameters(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """YOLOv7 IDetect's implicit tensors (1, C, 1, 1), each pruned on its channel dimension (1) with the conv whose
    channels it shifts or scales. The deploy network has none: fusion folds them into the output convs."""
    return [(layer.implicit, 1) for module in model.modules() if isinstance(module, IDetect) and not module.deploy
            for layer in (*module.ia, *module.im)]


def dependency_graph(model: nn.Module, example: torch.Tensor):
    """torch-pruning's dependency graph of a DetectionModel (train-time or fused), traced on `example` (1, C, H, W)
    through the raw maps of its detection head: Concat, Upsample, max-pools (SPPF, MP, SP, SPPCSPC), SE scales and
    YOLOv7's implicit layers each couple the channels they pass on; pruning a group resizes every member."""
    import torch_pruning as tp

    return tp.DependencyGraph().build_dependency(model, example_inputs=example, forward_fn=_raw_forward,
                                                 unwrapped_parameters=_implicit_parameters(model), verbose=False)


@dataclass
class _Group:
    """One coupled group: its root conv, channel count, allowed levels, and the convs it resizes."""

    root: nn.Conv2d
    name: str
    channels: int
    levels: list[int]  # allowed channel counts, descending, levels[0] == channels
    members: list[tuple[int, bool, int]]  # (conv index, is output side, channels removed per root channel)


class _FlopsModel:
    """Conv FLOPs of the network as a function of how many channels each group removes (thop's convention:
    2 x output elements x in/groups x kh x kw); the rest (e.g. Upsample) is a constant measured alongside."""

    def __init__(self, model: nn.Module, imgsz: tuple[int, int], ch: int):
        self.names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        convs = dict(model.named_modules())
        self.index = {convs[n]: k for k, n in enumerate(self.names)}
        meta = copy.deepcopy(model).to("meta")
        spatial: dict[str, int] = {}
        hooks = [m.register_forward_hook(lambda mod, _, y, n=n: spatial.__setitem__(n, y.shape[-2] * y.shape[-1]))
                 for n, m in meta.named_modules() if isinstance(m, nn.Conv2d)]
        with torch.no_grad():
            _raw_forward(meta, torch.zeros(1, ch, *imgsz, device="meta"))
        for h in hooks:
            h.remove()
        self.out0, self.in0, self.coef, self.groups = [], [], [], []
        for n in self.names:
            m = convs[n]
            self.out0.append(m.out_channels)
            self.in0.append(m.in_channels)
            self.groups.append(m.groups)
            self.coef.append(2 * spatial.get(n, 0) * m.kernel_size[0] * m.kernel_size[1] / 1e9)

    def gflops(self, groups: Sequence[_Group], removed: Sequence[int]) -> float:
        out, inp = list(self.out0), list(self.in0)
        for group, r in zip(groups, removed):
            if r:
                for k, is_out, mult in group.members:
                    if is_out:
                        out[k] -= mult * r
                    else:
                        inp[k] -= mult * r
        return sum(c * o * (i // g) for c, o, i, g in zip(self.coef, out, inp, self.groups))


def _groups(dg, flops: _FlopsModel, ignored: list[nn.Module], round_to: int) -> list[_Group]:
    """The prunable groups: rooted at a conv output that no ignored conv shares, with no grouped conv, wider than
    round_to; each member conv with how many of its channels go per channel of the root (4 for SPPF's concat)."""
    groups = []
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d]):
        root = group[0].dep.target.module
        channels = root.out_channels
        sides: dict[tuple[int, bool], set[int]] = {}
        grouped = False
        for dep, idxs in group:
            module = dep.target.module
            if isinstance(module, nn.Conv2d):
                grouped |= module.groups > 1
                key = (flops.index[module], dg.is_out_channel_pruning_fn(dep.handler))
                sides.setdefault(key, set()).update(int(getattr(i, "idx", i)) for i in idxs)
        if grouped or channels <= round_to:
            continue
        members = []
        for (k, is_out), idxs in sides.items():
            assert len(idxs) % channels == 0, f"group of {dg._module2name[root]}: uneven index mapping"
            members.append((k, is_out, len(idxs) // channels))
        levels = [channels, *range(round_to * ((channels - 1) // round_to), 0, -round_to)]
        groups.append(_Group(root, dg._module2name[root], channels, levels, members))
    return groups


def _search(groups: list[_Group], flops: _FlopsModel, target: float, good: float) -> tuple[list[int], float]:
    """Channels to remove per group so that the modelled GFLOPs are closest to `target`.

    One uniform ratio r for all groups: group g sits at the smallest allowed level >= channels x (1 - r). The
    level changes of all groups, sorted by the ratio at which they happen, form one monotone sequence of moves;
    bisection finds the prefix that crosses the target. Where the moves are coarse (few, narrow layers) and that
    prefix misses by more than `good` (relative), a local search moves one or two groups by one level each.
    """
    moves = sorted(((1 - level / g.channels, -g.channels, j, level)
                    for j, g in enumerate(groups) for level in g.levels[1:]))

    def removed_after(n: int) -> list[int]:
        removed = [0] * len(groups)
        for _, _, j, level in moves[:n]:
            removed[j] = groups[j].channels - level
        return removed

    if flops.gflops(groups, removed_after(0)) <= target:
        return removed_after(0), flops.gflops(groups, removed_after(0))
    lo, hi = 0, len(moves)  # the last prefix whose GFLOPs are still >= target lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if flops.gflops(groups, removed_after(mid)) >= target:
            lo = mid
        else:
            hi = mid - 1
    candidates = [removed_after(lo)] + ([removed_after(lo + 1)] if lo < len(moves) else [])
    best_gflops, best = min(((flops.gflops(groups, r), r) for r in candidates), key=lambda c: abs(c[0] - target))
    while abs(best_gflops / target - 1) > good:
        level = [g.levels.index(g.channels - r) for g, r in zip(groups, best)]
        ups = [j for j in range(len(groups)) if level[j] > 0]
        downs = [j for j in range(len(groups)) if level[j] + 1 < len(groups[j].levels)]
        shifts = [{j: -1} for j in ups] + [{j: 1} for j in downs]
        shifts += [{a: -1, b: 1} for a in ups for b in downs if a != b]
        neighbours = []
        for shift in shifts:
            r = list(best)
            for j, d in shift.items():
                r[j] = groups[j].channels - groups[j].levels[level[j] + d]
            neighbours.append((flops.gflops(groups, r), r))
        if not neighbours:
            break
        gflops, removed = min(neighbours, key=lambda c: abs(c[0] - target))
        if abs(gflops - target) >= abs(best_gflops - target):
            break
        best_gflops, best = gflops, removed
    return best, best_gflops


def _apply(dg, groups: list[_Group], removed: list[int], importance: Importance) -> None:
    """Prune each group's `removed` least important channels (all scores first, then all pruning)."""
    chosen = []
    for group, r in zip(groups, removed):
        if not r:
            continue
        pruner = dg.get_pruner_of_module(group.root)
        full = dg.get_pruning_group(group.root, pruner.prune_out_channels, list(range(group.channels)))
        scores = importance(full)
        if scores is None or len(scores) != group.channels:
            raise PruneError(f"importance returned {None if scores is None else len(scores)} scores for "
                             f"{group.name} with {group.channels} channels; return one score per channel")
        chosen.append((group, torch.argsort(scores.detach().float().cpu(), stable=True)[:r].tolist()))
    for group, idxs in chosen:
        pruner = dg.get_pruner_of_module(group.root)
        dg.get_pruning_group(group.root, pruner.prune_out_channels, sorted(idxs)).prune()


def _unreachable(model: nn.Module, target: float | str, target_gflops: float, floor: float, gflops_before: float,
                 imgsz: tuple[int, int], round_to: int) -> str:
    """The one-line refusal of a target below `floor`, the smallest deploy GFLOPs the groups can reach: why the
    floor is where it is, naming the grouped convs (never pruned, nor the convs coupled to them) when there are."""
    grouped = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    shown = ", ".join(grouped[:GROUPED_SHOWN]) + (f" and {len(grouped) - GROUPED_SHOWN} more"
                                                  if len(grouped) > GROUPED_SHOWN else "")
    why = "every pruned conv keeps at least round_to channels; Detect's output convs and SE squeeze convs stay"
    if grouped:
        why += (f"; grouped convolutions are never pruned, nor the convs whose channels they share: {len(grouped)} "
                f"grouped conv{'s' if len(grouped) > 1 else ''} ({shown})")
    (h, w), least = imgsz, f"{floor:.4g} deploy GFLOPs ({floor / gflops_before:.1%})"
    return (f"target={target!r} ({target_gflops:.4g} GFLOPs, {target_gflops / gflops_before:.1%}) is below the "
            f"smallest reachable {least} at imgsz {h}x{w} with round_to={round_to} ({why}); raise the target to at "
            f"least {least} or lower round_to" + (", or build the grouped layers with groups=1" if grouped else ""))


def _ignored(model: nn.Module, keep: Iterable[str]) -> list[nn.Module]:
    modules = dict(model.named_modules())
    ignored: list[nn.Module] = list(model.detect.m)
    ignored += [m.down for m in model.modules() if isinstance(m, SEBlock)]
    for name in keep:
        if not isinstance(modules.get(name), nn.Conv2d):
            convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
            raise PruneError(f"keep: {name!r} is not a conv of the model; name convs as in channel_plan(), e.g. "
                             f"{', '.join(convs[:3])}")
        ignored.append(modules[name])
    return ignored


# ---------------------------------------------------------------------------------------------------------------
# The entry point


def prune_to_flops(
    model: nn.Module,
    target: float | str,
    imgsz: int | tuple[int, int] = 640,
    *,
    importance: str | Importance = "l2",
    round_to: int = 8,
    calibration: Iterable[Batch] | None = None,
    loss_fn: LossFn | None = None,
    steps: int = 3,
    tolerance: float = 0.02,
    keep: Iterable[str] = (),
    seed: int = 0,
    inplace: bool = False,
) -> PruneResult:
    """Prune the fused network `model` (output of `pruning.reparam.fuse_model`) to `target` deploy GFLOPs at
    `imgsz`; a copy unless `inplace`.

    target: a fraction of the unpruned GFLOPs (0.5, "50%") or absolute ("2.5G"); see `parse_target`.
    importance: which channels of a group go first (the count per group is the uniform ratio):
      - "l1" / "l2": group magnitude, the L1 / L2 norm of every weight the channel owns or feeds, averaged over
        the group's convs (torch-pruning's GroupMagnitudeImportance); needs nothing but the weights.
      - "taylor": first-order Taylor |w x dL/dw| summed the same way (GroupTaylorImportance), with gradients of
        `loss_fn(model, batch)` summed over the `calibration` batches (images (B, 3, H, W) float 0..1, targets
        (N, 6) [img, cls, x, y, w, h] normalised), recomputed at each step. pruning does not import nas: build
        the loss there, e.g. `lambda m, b: DetectionLoss(m, hyp)(m(b[0]), b[1])[0]`.
      - "random": seeded uniform scores, the baseline a real criterion must beat.
      - or any callable(group) -> one score per channel of the group's root conv (lowest go first).
    round_to: every pruned conv keeps a multiple of this many output channels (at least round_to); 8 or 16 keep
      CPU/GPU kernels on their fast paths.
    steps: iterative steps with geometric intermediate targets; importance is recomputed after each.
    tolerance: the achieved GFLOPs must be within this fraction of the target, else PruneError.
    keep: names of convs (as in `channel_plan`) whose output channels must not change.
    Returns a PruneResult: the pruned model, its channel plan, params and GFLOPs before/after, the achieved
    error against the target and the seconds taken. Raises PruneError for a model that is not a fused
    DetectionModel, bad arguments, or a target the dependency graph cannot reach within `tolerance`.
    """
    start = time.perf_counter()
    if not (hasattr(model, "detect") and hasattr(model, "model")):
        raise PruneError(f"prune_to_flops prunes a DetectionModel, got {type(model).__name__}")
    if not is_deploy(model):
        raise PruneError("prune_to_flops works on the fused (deploy) network, which has no BatchNorm; call "
                         "pruning.reparam.fuse_model(model) first (or fold_batchnorms after fine-tuning)")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise PruneError(f"round_to={round_to!r} must be a positive integer (8 or 16 suit most kernels)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PruneError(f"steps={steps!r} must be a positive integer")
    if not 0 < tolerance < 1:
        raise PruneError(f"tolerance={tolerance!r} must be in (0, 1), e.g. 0.02 for ±2%")
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    if min(h, w) < 1:
        raise PruneError(f"imgsz={imgsz!r} must be positive")
    name = importance if isinstance(importance, str) else getattr(importance, "__name__", type(importance).__name__)
    scorer = make_importance(importance, seed)
    batches: list[Batch] = []
    if importance == "taylor":
        if calibration is None or loss_fn is None:
            raise PruneError("importance='taylor' needs calibration batches and a loss_fn(model, batch) -> loss; "
                             "give both, or use 'l2'")
        batches = list(calibration)
        if not batches:
            raise PruneError("importance='taylor': calibration gave no batches; give at least one")

    ch = int(getattr(model, "yaml", {}).get("ch", 3))
    gflops_before = count_gflops(model, (h, w), ch)
    target_gflops = parse_target(target, gflops_before)
    if not inplace:
        model = copy.deepcopy(model)
    before = {n: c["out"] for n, c in channel_plan(model).items()}
    params_before = count_params(model)
    device = next(model.parameters()).device
    example = torch.zeros(1, ch, TRACE_SIZE, TRACE_SIZE, device=device)
    ignored = _ignored(model, keep)

    def step_to(goal: float, check_reachable: bool) -> None:
        """Prune `model` towards `goal` GFLOPs: one dependency graph, one plan, one round of importance."""
        dg = dependency_graph(model, example)
        flops = _FlopsModel(model, (h, w), ch)
        groups = _groups(dg, flops, [m for m in ignored if m in dg.module2node], round_to)
        rest = count_gflops(model, (h, w), ch) - flops.gflops(groups, [0] * len(groups))  # non-conv ops
        if check_reachable:
            floor = flops.gflops(groups, [g.channels - g.levels[-1] for g in groups]) + rest
            if target_gflops < floor * (1 - tolerance):
                raise PruneError(_unreachable(model, target, target_gflops, floor, gflops_before, (h, w), round_to))
        removed, _ = _search(groups, flops, goal - rest, tolerance / 4)
        if any(removed):
            if batches:
                _accumulate_gradients(model, batches, loss_fn)
            _apply(dg, groups, removed, scorer)
            if batches:
                model.zero_grad(set_to_none=True)

    history: list[float] = []
    current = gflops_before
    for s in range(1, steps + 1):
        if current <= target_gflops * (1 + tolerance / 4):
            break
        step_to(gflops_before * (target_gflops / gflops_before) ** (s / steps), check_reachable=s == 1)
        current = count_gflops(model, (h, w), ch)
        history.append(current)
    for _ in range(2):  # the conv FLOPs model is exact; this only mops up a drift in the non-conv remainder
        if current <= target_gflops * (1 + tolerance / 2):
            break
        step_to(target_gflops, check_reachable=False)
        current = count_gflops(model, (h, w), ch)
        history.append(current)
    if abs(current / target_gflops - 1) > tolerance:
        raise PruneError(
            f"pruning reached {current:.4g} GFLOPs, not within ±{tolerance:.0%} of the target "
            f"{target_gflops:.4g} at imgsz {h}x{w}: the channel steps of round_to={round_to} are too coarse for this "
            f"model; lower round_to, or give a target near {current:.4g}"
        )
    sync_channel_attributes(model)
    plan = channel_plan(model)
    return PruneResult(
        model=model, target_gflops=target_gflops, gflops_before=gflops_before, gflops_after=current,
        params_before=params_before, params_after=count_params(model), imgsz=(h, w),
        channels={n: (before[n], plan[n]["out"]) for n in before}, plan=plan, importance=str(name),
        round_to=round_to, steps=len(history), seconds=time.perf_counter() - start, history=history,
    )
