"""Training-free scores of an architecture (issue #12 item 4): numbers computed from an untrained model in
milliseconds to a second on a CPU, to be ranked against a long training's ranking (benchmarks/zero_cost.py).

Besides deploy params and GFLOPs (`space.searchspace.arch_cost`):

- `entropy_score`: MAE-DET's differential entropy of the backbone's stage outputs under Gaussian weights and inputs
  (Sun et al. 2022, "MAE-DET: Revisiting Maximum Entropy Principle in Zero-Shot NAS for Efficient Object
  Detection"; as DAMO-YOLO's TinyNAS computes it).
- `synflow_score`: synaptic flow at initialisation (Tanaka et al. 2020, "Pruning neural networks without any data
  by iteratively conserving synaptic flow"), summed over the network as in Abdelfattah et al. 2021 ("Zero-Cost
  Proxies for Lightweight NAS").
- `grad_norm_score`: Abdelfattah et al.'s grad_norm on one real minibatch under the detection loss.

Each scoring function works on its own copy: the model passed in keeps its weights, gradients and mode.
`score_arch` builds an Arch and returns every score with its time.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from space.blocks import RepVGGBlock

# MAE-DET's multi-scale entropy prior: the weight of each backbone stage's entropy, by the stage's output stride.
# MAE-DET (and TinyNAS's detection configs) weigh the five downsampling stages C1..C5 as [0, 0, 1, 1, 6]; DAMO-YOLO's
# searches use [0, 0, 1, 1, 16]. Stages at strides 2 and 4 do not count.
MSEP_WEIGHTS: dict[int, float] = {8: 1.0, 16: 1.0, 32: 6.0}
GRAD_NORM_BATCH = 8  # images in the grad_norm minibatch (half ProxyConfig's batch: about a second on one CPU core)
COST_IMGSZ = 640  # params and GFLOPs are the deploy figures at this size, as budgets and tables use


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _input_channels(model: nn.Module) -> int:
    return int(getattr(model, "yaml", {}).get("ch", 3))


def _without_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in `module` (in place) by an Identity; a RepVGG identity branch becomes a skip."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(parent, name, nn.Identity())
    return module


def _weight_layers(model: nn.Module) -> list[nn.Module]:
    """The layers whose weights the zero-cost papers score: every Conv2d and Linear."""
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _backbone_stages(model: nn.Module) -> list[tuple[list[RepVGGBlock], int, int]]:
    """The RepVGG stages at the start of the backbone: [(blocks, output stride, output channels), ...].

    A stage is a stride-2 RepVGG block and the stride-1 blocks after it (`space.searchspace.Arch` writes P1..P5 so);
    the walk stops at the first layer of another kind (e.g. an SPPF) or at the end of the YAML's backbone.
    """
    rows = len(getattr(model, "yaml", {}).get("backbone", model.model))
    stages: list[tuple[list[RepVGGBlock], int, int]] = []
    stride = 1
    for i, layer in enumerate(list(model.model)[:rows]):
        blocks = list(layer) if isinstance(layer, nn.Sequential) else [layer]
        if not all(isinstance(b, RepVGGBlock) for b in blocks):
            break
        if i and model.layer_info[i].from_ != -1:
            raise ValueError(f"entropy_score: backbone layer {i} reads layer {model.layer_info[i].from_}, not the "
                             "one before it; the score needs a chain of RepVGG stages")
        for block in blocks:
            if block.stride > 1 or not stages:
                stride *= block.stride
                stages.append(([], stride, block.out_channels))
            stages[-1][0].append(block)
            stages[-1] = (stages[-1][0], stride, block.out_channels)
    if not stages:
        raise ValueError("entropy_score: the model's backbone does not start with RepVGG blocks; build it from an "
                         "Arch (space.searchspace) or a YAML whose backbone begins with RepVGGBlock rows")
    return stages


# ---------------------------------------------------------------------------------------------------------------
# the scores


@torch.no_grad()
def entropy_score(model: nn.Module, imgsz: int, *, batch: int = 4, seed: int = 0) -> float:
    """MAE-DET's entropy score of the model's RepVGG backbone (nats, up to constants; larger = more expressive).

    A copy of the backbone gets weights ~ N(0, 1) in every conv (biases 0), BatchNorm and the activation removed
    (MAE-DET's linear Gaussian network; TinyNAS's defaults skip_bn and skip_relu); squeeze-excitation stays, being
    part of the architecture. The input is (batch, 3, imgsz, imgsz) ~ N(0, 1). After each block the output's standard
    deviation sigma_b is recorded and the output divided by it, so that nothing overflows; the log std of a stage's
    output F_s is then the sum of log sigma_b over the blocks up to the stage's end. The entropy of a Gaussian
    feature map grows as log std, and TinyNAS adds log(channels) for the map's size:

        H_s = sum_{b <= end of s} log sigma_b + log C_s,     score = sum_s alpha_s H_s

    with the multi-scale entropy prior alpha = MSEP_WEIGHTS by stage stride (0, 0, 1, 1, 6 for P1..P5).
    Deterministic for a seed (weights and input are drawn from one generator seeded with it). No gradients.
    """
    stages = _backbone_stages(model)
    blocks_of = {id(b): k for k, (blocks, _, _) in enumerate(stages) for b in blocks}
    chain = nn.ModuleList(b for blocks, _, _ in stages for b in blocks)
    gaussian = _without_batchnorm(copy.deepcopy(chain)).to("cpu", torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    for layer in _weight_layers(gaussian):  # module order: the draw is a function of the seed and the Arch only
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
        if layer.bias is not None:
            layer.bias.zero_()
    for block in gaussian:
        block.nonlinearity = nn.Identity()
    x = torch.randn(batch, _input_channels(model), imgsz, imgsz, generator=g)  # (B, 3, S, S)
    log_std, stage_entropy = 0.0, {}
    for original, block in zip(chain, gaussian):
        x = block(x)  # (B, C, S / stride, S / stride)
        std = float(x.std())
        log_std += math.log(std)
        x = x / std
        stage_entropy[blocks_of[id(original)]] = log_std  # the last block of a stage leaves its value
    return float(sum(MSEP_WEIGHTS.get(stride, 0.0) * (stage_entropy[k] + math.log(width))
                     for k, (_, stride, width) in enumerate(stages)))


def synflow_score(model: nn.Module, imgsz: int) -> float:
    """SynFlow at the model's weights: sum over every Conv2d/Linear weight theta of |theta * dR/dtheta|.

    On a float64 copy with BatchNorm removed (Abdelfattah et al.'s `bn=False`) and every parameter replaced by its
    absolute value, R is the sum of all outputs (the Detect head's raw training-mode maps) for an all-ones input
    (1, 3, imgsz, imgsz). Float64 because R is a product over the network's depth (Tanaka et al.). For a network
    without biases R is homogeneous of degree 1 in each layer's weights, so the score is (number of layers) x R.
    Uses no random numbers: the score is a function of the weights.
    """
    net = _without_batchnorm(copy.deepcopy(model)).to(torch.float64).train()
    net.zero_grad(set_to_none=True)
    with torch.no_grad():
        for p in net.parameters():
            p.abs_()
    for p in net.parameters():
        p.requires_grad_(True)
    device = next(net.parameters()).device
    x = torch.ones(1, _input_channels(model), imgsz, imgsz, dtype=torch.float64, device=device)
    out = net(x)
    outputs = out if isinstance(out, (list, tuple)) else [out]
    r = sum(o.sum() for o in outputs)
    r.backward()
    with torch.no_grad():
        return sum(float((m.weight * m.weight.grad).abs().sum()) for m in _weight_layers(net)
                   if m.weight.grad is not None)


def grad_norm_score(model: nn.Module, batch_images: torch.Tensor, batch_targets: torch.Tensor) -> float:
    """grad_norm: the sum over every Conv2d/Linear layer of the L2 norm of its weight's gradient (Abdelfattah et
    al. 2021), the gradient being that of YOLOv5's training loss (`nas.loss.DetectionLoss` with
    `LossHyp().scaled(nl, nc, imgsz)`, as `nas.train.fit` computes it) on one minibatch, the model in training mode
    (BatchNorm on batch statistics).

    `batch_images`: (B, 3, S, S), uint8 or float in 0..1 (see `sample_batch`); `batch_targets`: (N, 6) rows of
    [image index, class, cx, cy, w, h] normalised. Runs on a copy, on the model's device. Deterministic.
    """
    from nas.loss import DetectionLoss, LossHyp

    net = copy.deepcopy(model).train()
    net.zero_grad(set_to_none=True)
    for p in net.parameters():
        p.requires_grad_(True)
    device = next(net.parameters()).device
    x = batch_images.to(device)
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()  # (B, 3, S, S)
    detect = net.detect
    loss_fn = DetectionLoss(net, LossHyp().scaled(detect.nl, detect.nc, int(x.shape[-1])))
    loss, _ = loss_fn(net(x), batch_targets.to(device))
    loss.backward()
    with torch.no_grad():
        return sum(float(m.weight.grad.norm()) for m in _weight_layers(net) if m.weight.grad is not None)


# ---------------------------------------------------------------------------------------------------------------
# one Arch, every score


def sample_batch(data: Any, imgsz: int, *, batch: int = GRAD_NORM_BATCH,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random minibatch of `batch` training images of `data` (a data.yaml path or a DataConfig),
    letterboxed to imgsz x imgsz without augmentation: (images (B, 3, S, S) float in 0..1, targets (N, 6))."""
    from nas.data import DataConfig, YoloDataset, collate, index_split, load_data_config

    cfg = data if isinstance(data, DataConfig) else load_data_config(data)
    records = index_split(cfg.train, cfg.nc, "train", str(cfg.source)).records
    pick = np.random.default_rng(seed).choice(len(records), min(batch, len(records)), replace=False)
    dataset = YoloDataset([records[i] for i in sorted(pick)], imgsz, augment=False, cache_images=False)
    images, targets, _, _ = collate([dataset[i] for i in range(len(dataset))])
    return images.float() / 255, targets


def score_arch(params: dict, space, data_cfg: Any, *, imgsz: int = 160, seed: int = 0) -> dict:
    """Every training-free score of the Arch `params` describe in `space`, built for `data_cfg`'s classes.

    `seed` draws the model's initial weights (as `build_model` under `torch.manual_seed(seed)`; the global generator
    is restored afterwards), the entropy score's Gaussian weights and input, and the grad_norm minibatch. Returns
    {"params": deploy params, "gflops_deploy": at 640 px (`arch_cost`), "entropy", "synflow", "grad_norm",
    "ms": {"cost", "build", "batch", "entropy", "synflow", "grad_norm": wall milliseconds}}, where "cost" is the
    one `arch_cost` call that gives params and GFLOPs, "build" builds the model and "batch" loads the minibatch.
    """
    from nas.data import DataConfig, load_data_config
    from space.builder import build_model
    from space.searchspace import Arch, arch_cost

    data = data_cfg if isinstance(data_cfg, DataConfig) else load_data_config(Path(data_cfg))
    arch = Arch.from_params(params, space)
    ms: dict[str, float] = {}

    def timed(name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        value = fn(*args, **kwargs)
        ms[name] = (time.perf_counter() - start) * 1000
        return value

    n_params, gflops = timed("cost", arch_cost, arch, COST_IMGSZ, data.nc)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timed("build", build_model, arch.to_yaml(data.nc))
    images, targets = timed("batch", sample_batch, data, imgsz, seed=seed)
    return {
        "params": n_params,
        "gflops_deploy": gflops,
        "entropy": timed("entropy", entropy_score, model, imgsz, seed=seed),
        "synflow": timed("synflow", synflow_score, model, imgsz),
        "grad_norm": timed("grad_norm", grad_norm_score, model, images, targets),
        "ms": ms,
    }
