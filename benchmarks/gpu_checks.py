"""The GPU checks of issue 15 in one run, within a time budget: each check prints PASS or FAIL with its figures, and
a check that fails or raises is reported while the next one runs. benchmarks/gpu.sh runs it on a lent CUDA machine.

    python3 benchmarks/gpu_checks.py --out DIR [--budget-s 540] [--work EMPTY_DIR] [--only CHECK ...]
    python3 benchmarks/gpu_checks.py --dry-cpu --out DIR     # the same code on a CPU at tiny sizes

Checks, at their CUDA sizes (--dry-cpu: 64 px, batch 1/2, 24 images, eager PyTorch; CUDA-only parts skipped, each
with its reason; timing bars there mean nothing):
  synthetic_data     the synthetic shapes (nas.synth, 240 images, 4 classes, 160 px) every later check trains on.
  graph_vs_eager     the fused seed (nc 80) timed with the `torch` (eager) and `cudagraph` backends at 320/640 px,
                     batch 1/16: graph <= eager (2% allowed for timing noise; the raw ratio is printed), the replayed
                     graph's output equal to eager's (no empty graph), a capture of the same network with every
                     warning an error, and cudnn.benchmark back at its prior value after every session (prior False
                     and prior True).
  ratio_stability    a sampled Arch of the default space (A) and the seed (B), fused, `cudagraph` (the CUDA default),
                     320 px, batch 1: 5 fresh interleaved measurements each way; CV of A/B <= 1% and
                     (A/B) x (B/A) within 3% of 1 in every repeat.
  fp16_channels_last the fused seed's decoded output (B, N, 5 + nc) at 640 px in fp16 + channels_last (what the
                     latency backends time) vs fp32 with TF32 off: max absolute difference <= 1e-2 with the box
                     columns divided by the input size, so that every column is on a 0..1 scale.
  amp_fit_fusion     nas.train.train_job of the seed: 3 epochs with AMP at 160 px, batch 16; finite losses, the
                     GradScaler's scale and its calibration steps (not counted as divergence:
                     nas.train.counts_as_divergence) per epoch; then fused vs unfused outputs (fp32, TF32 off) within
                     the study's FUSION_TOLERANCE.
  amp_calibration    one AMP epoch of the smallest Arch with a GradScaler that starts at 2**40: more than
                     MAX_BAD_STEPS calibration steps (the first steps overflow one after another), no
                     TrainingDiverged, and the scale lower at the end (the old rule raised after 5 such steps).
  prune_finetune     nas.prune.prune_job of that trained, fused model to 50% of its deploy FLOPs at 320 px (Taylor
                     importance on the synthetic set), 1 fine-tuning epoch at 160 px, mAPs and the latency ratio.
  prune_latency      `repnas prune TRAIN --target-latency 0.6x --device cuda --imgsz 640` (l2 importance, no mAP):
                     the independent re-measurement within ±3% of the target, or the one-line reason why the target
                     cannot be reached (both are the issue's accepted outcomes; which one is printed).
  onnx_cuda_weights  nas.onnx_export.export_onnx of the CUDA-trained, fused model, checked by onnxruntime's CPU
                     execution provider; plus onnxruntime vs that model's own CUDA fp32 output (<= 1e-3, boxes / size).
  search_prune_to    `repnas search --data SYNTH --trials 2 --prune-to 0.5 --device cuda` (2 epochs at 160 px,
                     latency at 320 px): 2 COMPLETE trials, the non-baseline one pruned to 0.5 and fine-tuned
                     (a study never prunes its baseline).
  search_workers     the same without pruning, with `--workers 2 --devices 0,0`: 2 COMPLETE trials, each latency
                     record naming the GPU by UUID and seen by its worker through CUDA_VISIBLE_DEVICES=0.
  relatency          `repnas relatency` of the workers' study with `--device cuda --latency-backend cudagraph`: a
                     profile that covers every complete trial, then `repnas show --profile`.
Only small text files go to --out: summary.txt (the table, rewritten after every check so that a killed run leaves
one), results.json (every figure), and the tails of the CLI runs (prune_latency.txt, search_prune_to.txt,
search_workers.txt, relatency.txt). Studies, weights and data stay in the work folder (a fresh /tmp folder).
Exit status 0 when no check failed or raised, 1 otherwise (--dry-cpu: 1 only when a check raised).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from nas.latency import LatencyConfig, LatencySession, deploy_copy, measure_latency
from pruning.reparam import fuse_model
from space.builder import build_model
from space.searchspace import Arch, load_space, sample_arch, seed_arch, smallest_arch

RESERVE_S = 20  # budget kept back for the summary when a CLI run's timeout is set
LOG_LINES = 150  # lines of a CLI run's output kept in --out
GRAPH_SLACK = 0.02  # graph <= eager x (1 + this): timing noise of two separate medians
RATIO_CV_BAR = 0.01
RATIO_PRODUCT_BAR = 0.03
FP16_BAR = 1e-2
ORT_CUDA_BAR = 1e-3  # onnxruntime (CPU fp32) vs CUDA fp32 kernels, boxes divided by the input size
REPEATS = 5


@dataclass(frozen=True)
class Sizes:
    """Sizes of one run: the CUDA checks', or --dry-cpu's tiny ones."""

    latency_imgsz: tuple[int, ...]
    latency_batches: tuple[int, ...]
    ratio_imgsz: int  # ratio stability, the studies' latency and the prune job's FLOPs/latency size
    fp16_imgsz: int
    target_imgsz: int  # prune --target-latency
    train_imgsz: int
    train_batch: int
    images: int  # synthetic set
    iters: int  # timed passes per network and measurement (split over 5 rounds)
    warmup: int


CUDA_SIZES = Sizes((320, 640), (1, 16), 320, 640, 640, 160, 16, 240, 100, 10)
DRY_SIZES = Sizes((64,), (1, 2), 64, 64, 64, 64, 8, 24, 10, 1)


@dataclass
class Outcome:
    """A check's verdict (PASS, FAIL, SKIP, ERROR), its figures in one line, and every figure for results.json."""

    status: str
    line: str
    figures: dict = field(default_factory=dict)


@dataclass
class Context:
    device: torch.device
    dry: bool
    sizes: Sizes
    out: Path
    work: Path
    deadline: float  # time.perf_counter() value by which the run must be done
    start: float
    data: Path | None = None  # the synthetic data.yaml
    trained: Path | None = None  # the AMP fit's `repnas train` folder
    fused: nn.Module | None = None  # its fused network, on the device
    studies: dict[str, int] = field(default_factory=dict)  # study name -> complete trials

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def device_arg(self) -> str:
        return "cuda" if self.cuda else "cpu"

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def latency_cfg(self, **changes) -> LatencyConfig:
        """The device's default LatencyConfig (cudagraph on CUDA) with this run's passes."""
        s = self.sizes
        return LatencyConfig.for_device(self.device, **({"iters": s.iters, "warmup": s.warmup} | changes))


def say(line: str = "") -> None:
    print(line, flush=True)


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


@contextmanager
def exact_fp32() -> Iterator[None]:
    """TF32 off (cuDNN's default TF32 convolutions alone differ from fp32 by ~1e-3) for the block."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def normalised_diff(a: torch.Tensor, b: torch.Tensor, imgsz: int) -> dict:
    """Max |a - b| of two decoded outputs (B, N, 5 + nc), in float64: raw, and with the box columns (pixels) divided
    by `imgsz` so that every column is on a 0..1 scale; the box (px) and score parts apart."""
    diff = (a.detach().double().cpu() - b.detach().double().cpu()).abs()
    return {"max_abs": float(diff.max()), "max_abs_normalised": max(float(diff[..., :4].max()) / imgsz,
                                                                    float(diff[..., 4:].max())),
            "max_box_px": float(diff[..., :4].max()), "max_score": float(diff[..., 4:].max())}


def fused_seed(nc: int = 80) -> nn.Module:
    torch.manual_seed(0)
    return fuse_model(build_model(seed_arch().to_yaml(nc))).eval()


def sampled_arch(seed: int = 0) -> Arch:
    """One Arch of the default space drawn by Optuna's RandomSampler (not the seed design)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space()
    for k in range(seed, seed + 20):
        arch = sample_arch(optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=k)).ask(), space)
        if arch.to_params() != seed_arch(space).to_params():
            return arch
    raise AssertionError("20 random draws were all the seed design")


# ---------------------------------------------------------------------------------------------------------------
# the checks


def check_synthetic_data(ctx: Context) -> Outcome:
    from nas.synth import SynthConfig, make_synthetic

    cfg = SynthConfig(images=ctx.sizes.images, classes=4, imgsz=ctx.sizes.train_imgsz, seed=0)
    ctx.data = make_synthetic(ctx.work / "data", cfg)
    return Outcome("PASS", f"{cfg.images} images, {cfg.classes} classes, {cfg.imgsz} px in {ctx.data.parent}",
                   {"images": cfg.images, "classes": cfg.classes, "imgsz": cfg.imgsz})


def _graph_replay_diff(runner, imgsz: int) -> dict:
    """Replay a `cudagraph` runner's graph and compare its output with the same network run eagerly."""
    net, x, out = runner.keep  # nas.latency._GraphRunner: the graph replays into these tensors
    with torch.inference_mode(), torch.cuda.device(x.device):
        runner.graph.replay()
        eager = net(x)
        torch.cuda.synchronize(x.device)
    return normalised_diff(out, eager, imgsz)


def _strict_capture(model: nn.Module, imgsz: int, batch: int, device: torch.device, cfg: LatencyConfig) -> str | None:
    """Capture `model`'s deploy copy as one CUDA graph (warm-up on a side stream, as torch.cuda.graph's documentation
    asks) with every warning an error; None when clean, else the error in one line. CudaGraphBackend records the
    capture's warnings and fails only on an empty graph: this sees every other warning too."""
    x = torch.randn(batch, 3, imgsz, imgsz, device=device, dtype=torch.float16 if cfg.half else torch.float32)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    net = deploy_copy(model, x, cfg)
    try:
        with warnings.catch_warnings(), torch.inference_mode(), torch.cuda.device(device):
            warnings.simplefilter("error")
            main = torch.cuda.current_stream(device)
            side = torch.cuda.Stream(device=device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                for _ in range(3):
                    net(x)
            main.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side):
                net(x)
            graph.replay()
            torch.cuda.synchronize(device)
    except Exception as err:
        return _first_line(err)
    return None


def check_graph_vs_eager(ctx: Context) -> Outcome:
    s = ctx.sizes
    model = fused_seed()
    prior = torch.backends.cudnn.benchmark
    backends = ("torch", "cudagraph") if ctx.cuda else ("torch",)
    if not ctx.cuda:
        say("  cudagraph: skipped (a CUDA-only backend); eager timing, the session's cudnn.benchmark restore run")
    rows, problems, clocks = [], [], []
    for k, (imgsz, batch) in enumerate((i, b) for i in s.latency_imgsz for b in s.latency_batches):
        medians, replay, capture = {}, None, None
        for backend in (backends if k % 2 == 0 else backends[::-1]):  # which backend goes first alternates
            with LatencySession(imgsz, batch, ctx.device, ctx.latency_cfg(backend=backend)) as session:
                runner = session.prepare(model)  # cudagraph: CaptureFailed on an empty graph
                if backend == "cudagraph":
                    replay = _graph_replay_diff(runner, imgsz)
                lat = session.measure(runner)
            if torch.backends.cudnn.benchmark != prior:
                problems.append(f"cudnn.benchmark {torch.backends.cudnn.benchmark} after {backend} (was {prior})")
            medians[backend] = lat.median_ms
            gpu = lat.conditions.get("before", {}).get("gpu", {})
            clocks.append(gpu.get("sm_clock_mhz"))
        if ctx.cuda:
            capture = _strict_capture(model, imgsz, batch, ctx.device, ctx.latency_cfg())
        row = {"imgsz": imgsz, "batch": batch, "eager_ms": medians["torch"], "graph_ms": medians.get("cudagraph"),
               "replay_vs_eager": replay, "strict_capture": capture or ("clean" if ctx.cuda else None)}
        if ctx.cuda:
            row["graph_over_eager"] = medians["cudagraph"] / medians["torch"]
            if row["graph_over_eager"] > 1 + GRAPH_SLACK:
                problems.append(f"{imgsz}px b{batch}: graph {row['graph_over_eager']:.3f}x eager")
            if replay["max_abs_normalised"] > 1e-3:
                problems.append(f"{imgsz}px b{batch}: replayed graph differs from eager by "
                                f"{replay['max_abs_normalised']:.2e}")
            if capture:
                problems.append(f"{imgsz}px b{batch}: capture with warnings as errors: {capture}")
        rows.append(row)
        say(f"  {imgsz:>4} px batch {batch:>2}: eager {row['eager_ms']:.3f} ms"
            + (f", graph {row['graph_ms']:.3f} ms ({row['graph_over_eager']:.3f}x), replay vs eager "
               f"{replay['max_abs_normalised']:.1e}, strict capture {row['strict_capture']}" if ctx.cuda else ""))
    # prior True must come back too (the sessions above started from `prior`)
    torch.backends.cudnn.benchmark = not prior
    with LatencySession(s.latency_imgsz[0], 1, ctx.device, ctx.latency_cfg(backend="torch", cudnn_benchmark=prior)):
        pass
    if torch.backends.cudnn.benchmark != (not prior):
        problems.append(f"cudnn.benchmark not restored to {not prior}")
    torch.backends.cudnn.benchmark = prior
    cells = "; ".join(f"{r['imgsz']}/{r['batch']}: eager {r['eager_ms']:.3f}"
                      + (f" graph {r['graph_ms']:.3f} ({r['graph_over_eager']:.2f}x)" if ctx.cuda else "") + " ms"
                      for r in rows)
    seen = [c for c in clocks if c is not None]
    clock = f"; SM clock {min(seen)}-{max(seen)} MHz" if seen else ""
    line = cells + clock + "; cudnn.benchmark restored (prior False and True)" * (not any("cudnn" in p for p in
                                                                                              problems))
    if not ctx.cuda:
        line += "; cudagraph skipped (CUDA-only)"
    return Outcome("FAIL" if problems else "PASS", line + ("; " + "; ".join(problems) if problems else ""),
                   {"rows": rows, "problems": problems, "sm_clock_mhz": seen})


def check_ratio_stability(ctx: Context) -> Outcome:
    s = ctx.sizes
    arch = sampled_arch()
    torch.manual_seed(0)
    a = fuse_model(build_model(arch.to_yaml(80))).eval()
    b = fused_seed()
    cfg = ctx.latency_cfg()
    ab, ba = [], []
    for r in range(REPEATS):  # a fresh measurement each (new copies, new capture), as a study times each trial
        ab.append(measure_latency(a, s.ratio_imgsz, 1, ctx.device, cfg, reference=b).latency_ratio)
        ba.append(measure_latency(b, s.ratio_imgsz, 1, ctx.device, cfg, reference=a).latency_ratio)
        say(f"  repeat {r + 1}: A/B {ab[-1]:.4f}, B/A {ba[-1]:.4f}, product {ab[-1] * ba[-1]:.4f}")
    cv = statistics.pstdev(ab) / statistics.fmean(ab)
    cv_ba = statistics.pstdev(ba) / statistics.fmean(ba)
    products = [x * y for x, y in zip(ab, ba)]
    worst = max(abs(p - 1) for p in products)
    ok = cv <= RATIO_CV_BAR and worst <= RATIO_PRODUCT_BAR
    line = (f"{cfg.backend} at {s.ratio_imgsz} px batch 1, {REPEATS} repeats: A/B median {statistics.median(ab):.4f} "
            f"CV {cv:.2%} (bar {RATIO_CV_BAR:.0%}), B/A CV {cv_ba:.2%}; (A/B)x(B/A) "
            f"{min(products):.4f}..{max(products):.4f} (bar 1 ± {RATIO_PRODUCT_BAR:.0%})")
    return Outcome("PASS" if ok else "FAIL", line, {"arch": arch.to_params(), "backend": cfg.backend, "ab": ab,
                                                    "ba": ba, "cv_ab": cv, "cv_ba": cv_ba, "products": products})


def check_fp16_channels_last(ctx: Context) -> Outcome:
    imgsz = ctx.sizes.fp16_imgsz
    model = fused_seed()
    x = torch.rand(1, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(0)).to(ctx.device)  # (1, 3, S, S)
    net32 = deploy_copy(model, x, LatencyConfig(half=False, channels_last=False))
    net16 = deploy_copy(model, x, LatencyConfig())  # on CUDA: fp16 and channels_last, what latency times
    if not ctx.cuda:  # deploy_copy converts on CUDA only; here the same conversion by hand
        net16 = net16.half().to(memory_format=torch.channels_last)
    x16 = x.half().contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), exact_fp32():
        out32 = net32(x)  # (1, N, 5 + nc)
        out16 = net16(x16)
    finite = bool(torch.isfinite(out16).all())
    d = normalised_diff(out16, out32, imgsz)
    ok = finite and d["max_abs_normalised"] <= FP16_BAR
    line = (f"{imgsz} px, {'fp16' if ctx.cuda else 'fp16 on the CPU'} + channels_last vs fp32 (TF32 off): max abs "
            f"diff {d['max_abs_normalised']:.2e} with boxes / {imgsz} px (bar {FP16_BAR:g}, absolute on that 0..1 "
            f"scale); boxes {d['max_box_px']:.3f} px, scores {d['max_score']:.2e}" + ("" if finite else "; NON-FINITE"))
    return Outcome("PASS" if ok else "FAIL", line, d | {"finite": finite, "imgsz": imgsz, "dtype": str(out16.dtype)})


def check_amp_fit_fusion(ctx: Context) -> Outcome:
    from nas.study import FUSION_TOLERANCE
    from nas.train import ProxyConfig, train_job
    from pruning.reparam import fusion_error

    if ctx.data is None:
        return Outcome("SKIP", "no synthetic data (synthetic_data did not finish)")
    s = ctx.sizes
    arch = seed_arch() if ctx.cuda else smallest_arch(load_space())  # the seed trains too slowly on a CPU
    yaml_path = ctx.work / "model.yaml"
    yaml_path.write_text(arch.to_yaml_text(4))
    cfg = ProxyConfig(epochs=3, imgsz=s.train_imgsz, batch=s.train_batch, val_every=3, device=ctx.device_arg,
                      amp=True, seed=0)
    report = train_job(yaml_path, ctx.data, cfg, ctx.work / "train")
    history = report.fit.history
    for h in history:
        say(f"  epoch {h['epoch']}: box {h['box']:.4f} obj {h['obj']:.4f} cls {h['cls']:.4f}, grad scale "
            f"{h.get('grad_scale')}, skipped {h['skipped_steps']} (calibration {h.get('calibration_steps')}), "
            f"{h['train_seconds']:.1f} s")
    problems = []
    if len(history) != 3:
        problems.append(f"{len(history)} epochs, not 3")
    if not all(math.isfinite(h[k]) for h in history for k in ("box", "obj", "cls")):
        problems.append("non-finite epoch losses")
    scale = history[-1].get("grad_scale")
    if ctx.cuda and not (isinstance(scale, float) and math.isfinite(scale) and scale > 0):
        problems.append(f"GradScaler scale {scale!r}")
    model = report.fit.model.eval()
    fused = fuse_model(model)
    x = torch.rand(1, 3, s.train_imgsz, s.train_imgsz, generator=torch.Generator().manual_seed(0)).to(ctx.device)
    with exact_fp32():
        error = fusion_error(model, fused, x)
    if not error < FUSION_TOLERANCE:
        problems.append(f"fusion error {error:.2e} >= {FUSION_TOLERANCE:g}")
    ctx.trained, ctx.fused = report.folder, fused.eval()
    m = report.fit.metrics
    amp = "AMP" if ctx.cuda else "fp32 (AMP is CUDA-only)"
    line = (f"{'seed' if ctx.cuda else 'smallest Arch'}, 3 epochs {amp} at {s.train_imgsz} px: losses "
            f"{history[0]['box'] + history[0]['obj'] + history[0]['cls']:.3f} -> "
            f"{history[-1]['box'] + history[-1]['obj'] + history[-1]['cls']:.3f}, mAP50 {m.map50:.4f}; GradScaler "
            f"scale {scale}, {history[-1].get('calibration_steps')} calibration step(s) of "
            f"{history[-1]['skipped_steps']} skipped; {report.fit.seconds:.1f} s; fusion error {error:.2e} "
            f"(fp32, TF32 off; bar {FUSION_TOLERANCE:g})")
    return Outcome("FAIL" if problems else "PASS", line + ("; " + "; ".join(problems) if problems else ""),
                   {"history": history, "grad_scale": scale, "fusion_error": error, "map50": m.map50,
                    "map50_95": m.map50_95, "seconds": report.fit.seconds})


def high_start_scaler(init_scale: float) -> type:
    """torch.amp.GradScaler starting at `init_scale` instead of 2**16."""

    class HighStart(torch.amp.GradScaler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **(kwargs | {"init_scale": init_scale}))

    return HighStart


def check_amp_calibration(ctx: Context) -> Outcome:
    from nas.train import MAX_BAD_STEPS, ProxyConfig, fit

    if ctx.data is None:
        return Outcome("SKIP", "no synthetic data (synthetic_data did not finish)")
    init = 2.0**40  # fp16 gradients of a loss scaled by 2**40 overflow: the scaler must back off for many steps
    scaler = high_start_scaler(init)
    if not ctx.cuda:
        assert scaler("cpu").get_scale() == init
        return Outcome("SKIP", "AMP is CUDA-only (the high-start scaler built on the CPU: scale "
                               f"{scaler('cpu').get_scale():g})")
    s = ctx.sizes
    real = torch.amp.GradScaler
    torch.amp.GradScaler = scaler  # nas.train.fit looks torch.amp.GradScaler up when it starts
    try:
        torch.manual_seed(0)
        model = build_model(smallest_arch(load_space()).to_yaml(4))
        result = fit(model, ctx.data, ProxyConfig(epochs=1, imgsz=s.train_imgsz, batch=8, val_every=1,
                                                  device=ctx.device_arg, amp=True, quiet=True))
    finally:
        torch.amp.GradScaler = real
    h = result.history[-1]
    ok = h["calibration_steps"] > MAX_BAD_STEPS and h["grad_scale"] < init
    line = (f"1 AMP epoch, GradScaler from 2**40: {h['calibration_steps']} calibration steps (more than "
            f"MAX_BAD_STEPS={MAX_BAD_STEPS}; none counted, no TrainingDiverged), {h['skipped_steps']} skipped, scale "
            f"ended at {h['grad_scale']:g}; box {h['box']:.4f}")
    return Outcome("PASS" if ok else "FAIL", line, {"history": result.history, "init_scale": init})


def check_prune_finetune(ctx: Context) -> Outcome:
    from nas.data import load_data_config
    from nas.prune import prune_job

    if ctx.fused is None:
        return Outcome("SKIP", "no trained model (amp_fit_fusion did not finish)")
    s = ctx.sizes
    report = prune_job(ctx.fused, load_data_config(ctx.data), 0.5, imgsz=s.ratio_imgsz, eval_imgsz=s.train_imgsz,
                       importance="taylor", finetune_epochs=1, device=ctx.device_arg, latency=ctx.latency_cfg(),
                       progress=lambda line: say(f"  {line}"))
    r, lat = report.result, report.latency
    maps = [report.map_before, report.map_pruned, report.map_finetuned]
    map50 = [f"{p[1]:.4f}" if p else "-" for p in maps]
    problems = []
    if abs(r.error) > 0.02:  # prune_to_flops' own tolerance
        problems.append(f"FLOPs {r.gflops_after:.3f} G is {r.error:+.1%} off the 50% target")
    if any(p is None or not all(math.isfinite(v) for v in p) for p in maps):
        problems.append(f"mAPs {maps}")
    ratio = lat.get("latency_ratio")
    if not (ratio and math.isfinite(ratio) and ratio > 0) or lat.get("backend") != ctx.latency_cfg().backend:
        problems.append(f"latency {ratio!r} ({lat.get('backend')})")
    line = (f"{r.gflops_before:.3f} -> {r.gflops_after:.3f} GFLOPs at {s.ratio_imgsz} px ({r.flops_ratio:.3f}); "
            f"mAP50 {map50[0]} -> pruned {map50[1]} -> 1 epoch fine-tuned {map50[2]}; latency ratio "
            f"{ratio if ratio is None else format(ratio, '.3f')} "
            f"({lat.get('backend')}); "
            + ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items()))
    return Outcome("FAIL" if problems else "PASS", line + ("; " + "; ".join(problems) if problems else ""),
                   {"prune": {k: v for k, v in report.to_dict().items() if k != "channels"}})


def run_cli(ctx: Context, label: str, args: list[str], cap_s: float, *, append: bool = False) -> tuple[int | None, str]:
    """`python -m nas.cli ARGS` in its own process group, with a timeout (the smaller of `cap_s` and the budget left
    less RESERVE_S; the whole group is killed at the end of it). Its output goes to WORK/logs/LABEL.log and its last
    LOG_LINES lines to OUT/LABEL.txt (appended with `append`). Returns (exit status or None on a timeout, output)."""
    cmd = [sys.executable, "-m", "nas.cli", *args]
    timeout = max(10.0, min(cap_s, ctx.left() - RESERVE_S))
    say(f"  $ {shlex.join(['python3', '-m', 'nas.cli', *args])}   (timeout {timeout:.0f} s)")
    log = ctx.work / "logs" / f"{label}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("a" if append else "w") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env=os.environ | {"PYTHONUNBUFFERED": "1"})
        try:
            rc: int | None = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = None
    text = log.read_text(errors="replace")
    lines = text.splitlines()
    (ctx.out / f"{label}.txt").write_text("\n".join(lines[-LOG_LINES:]) + "\n")
    this_run = text[text.rfind(f"$ {shlex.join(cmd)}"):].splitlines()[1:]
    for line in this_run[-10:]:
        say(f"  | {line}")
    say(f"  exit {'TIMEOUT' if rc is None else rc} after {time.perf_counter() - start:.1f} s")
    return rc, "\n".join(this_run)


def check_prune_latency(ctx: Context) -> Outcome:
    if ctx.trained is None:
        return Outcome("SKIP", "no trained model (amp_fit_fusion did not finish)")
    s = ctx.sizes
    out = ctx.work / "prune-latency"
    rc, text = run_cli(ctx, "prune_latency", ["prune", str(ctx.trained), "--target-latency", "0.6x", "--device",
                                              ctx.device_arg, "--imgsz", str(s.target_imgsz), "--importance", "l2",
                                              "--no-eval", "--out", str(out)], cap_s=240)
    if rc == 0:
        lt = json.loads((out / "prune.json").read_text())["latency_target"]
        line = (f"0.6x at {s.target_imgsz} px batch 1 ({ctx.latency_cfg().backend}): {len(lt['evaluations'])} timed "
                f"candidates, chose {lt['fraction']:.3f} of the FLOPs (search ratio {lt['search_ratio']:.3f}); "
                f"check, median of {len(lt['check_ratios'])} runs ({', '.join(f'{r:.3f}' for r in lt['check_ratios'])})"
                f": {lt['check_median']:.3f} ({lt['check_error']:+.1%}, {'within' if lt['within'] else 'NOT within'} "
                f"±3%); {lt['seconds']:.1f} s to reach it")
        return Outcome("PASS" if lt["within"] else "FAIL", line, {"latency_target": lt})
    errors = [line for line in text.splitlines() if line.startswith("repnas prune: error:")]
    if rc == 2 and errors and "cannot be reached" in errors[-1]:
        return Outcome("PASS", f"0.6x at {s.target_imgsz} px unreachable, said in one line: {errors[-1]}",
                       {"unreachable": errors[-1]})
    return Outcome("FAIL", f"exit {'TIMEOUT' if rc is None else rc}: {(errors or text.splitlines() or [''])[-1]}")


def check_onnx_cuda_weights(ctx: Context) -> Outcome:
    import onnxruntime as ort

    from nas.onnx_export import export_onnx

    if ctx.fused is None:
        return Outcome("SKIP", "no trained model (amp_fit_fusion did not finish)")
    imgsz = ctx.sizes.ratio_imgsz
    path = ctx.work / "model.onnx"
    report = export_onnx(ctx.fused, path, imgsz)  # RepnasError (nothing written) when onnxruntime disagrees
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(2, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(2))  # (2, 3, S, S)
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    with torch.inference_mode(), exact_fp32():
        want = ctx.fused(x.to(ctx.device))[0]  # the model where it was trained: CUDA, fp32
    cross = normalised_diff(got, want, imgsz)
    still = next(ctx.fused.parameters()).device.type == ctx.device.type
    ok = report["verdict"] == "PASS" and cross["max_abs_normalised"] <= ORT_CUDA_BAR and still
    line = (f"opset {report['opset']}, output {report['output_shape']}; onnxruntime {ort.__version__} (CPU EP) vs "
            f"PyTorch CPU: {report['max_abs_diff_normalised']:.2e} (bar {report['tolerance']:g}), vs PyTorch "
            f"{ctx.device_arg} fp32: {cross['max_abs_normalised']:.2e} (bar {ORT_CUDA_BAR:g}); boxes / {imgsz} px"
            + ("" if still else "; the caller's model left its device"))
    return Outcome("PASS" if ok else "FAIL", line, {"export": {k: v for k, v in report.items() if k != "layout"},
                                                    "vs_device": cross})


def _study_rows(ctx: Context, name: str) -> list[dict]:
    from nas.study import attrs, load_study

    study = load_study(name, results=str(ctx.work / "studies"))
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        device = a.get(attrs.DEVICE_KEY) or {}
        rows.append({"number": t.number, "state": t.state.name, "baseline": bool(a.get(attrs.BASELINE_KEY)),
                     "map50_95": a.get(attrs.MAP50_95_KEY), "latency_ms": a.get(attrs.LATENCY_MS_KEY),
                     "latency_ratio": a.get(attrs.LATENCY_RATIO_KEY), "gflops_deploy": a.get(attrs.GFLOPS_DEPLOY_KEY),
                     "prune_fraction": a.get(attrs.PRUNE_FRACTION_KEY), "pid": a.get(attrs.PID_KEY),
                     "map50_finetuned": (a.get(attrs.PRUNE_KEY) or {}).get("map50_finetuned"),
                     "device": device.get("name"), "uuid": device.get("uuid"),
                     "visible_devices": device.get("visible_devices"), "fail_reason": a.get(attrs.FAIL_REASON_KEY)})
    return rows


def _run_study(ctx: Context, name: str, label: str, extra: list[str], cap_s: float) -> tuple[int | None, list[dict]]:
    s = ctx.sizes
    args = ["search", "--study", name, "--data", str(ctx.data), "--trials", "2", "--epochs", "2", "--val-every", "2",
            "--imgsz", str(s.train_imgsz), "--batch", str(s.train_batch), "--latency-imgsz", str(s.ratio_imgsz),
            "--device", ctx.device_arg, "--results", str(ctx.work / "studies"), "--no-early-stop", "--seed", "0"]
    if not ctx.cuda:  # the CPU's own space and a baseline from it: the seed trains too slowly here
        baseline = ctx.work / "small_baseline.yaml"
        baseline.write_text(json.dumps(smallest_arch(load_space("small")).to_params()))  # JSON is YAML
        args += ["--space", "small", "--baseline", str(baseline)]
    rc, _ = run_cli(ctx, label, args + extra, cap_s)
    if rc is None:
        return rc, []
    run_cli(ctx, label, ["show", name, "--results", str(ctx.work / "studies")], 30, append=True)
    rows = _study_rows(ctx, name)
    for r in rows:
        say(f"  trial {r['number']} {r['state']}{' (baseline)' if r['baseline'] else ''}: mAP50-95 {r['map50_95']}, "
            f"latency ratio {r['latency_ratio']}, pruned to {r['prune_fraction']}, {r['device']} {r['uuid']} "
            f"(CUDA_VISIBLE_DEVICES {r['visible_devices']}), pid {r['pid']}"
            + (f"; failed: {r['fail_reason']}" if r["fail_reason"] else ""))
    ctx.studies[name] = sum(r["state"] == "COMPLETE" for r in rows)
    return rc, rows


def _trial_cells(rows: list[dict]) -> str:
    return "; ".join(f"#{r['number']} {r['state']}" + (f" mAP50-95 {r['map50_95']:.4f} ratio {r['latency_ratio']:.3f}"
                                                       if r["state"] == "COMPLETE" else "")
                     + (f" pruned to {r['prune_fraction']} and fine-tuned (mAP50 {r['map50_finetuned']})"
                        if r["prune_fraction"] is not None else "")
                     + (f" ({r['fail_reason']})" if r["fail_reason"] else "") for r in rows)


def check_search_prune_to(ctx: Context) -> Outcome:
    if ctx.data is None:
        return Outcome("SKIP", "no synthetic data")
    rc, rows = _run_study(ctx, "gpu-prune", "search_prune_to", ["--prune-to", "0.5", "--prune-finetune-epochs", "1"],
                          cap_s=200)
    done = [r for r in rows if r["state"] == "COMPLETE"]
    pruned = [r for r in done if not r["baseline"]]  # the baseline is never pruned (nas.study.trial)
    ok = (rc == 0 and len(done) >= 2 and len(pruned) >= 1
          and all(r["prune_fraction"] == 0.5 and r["map50_finetuned"] is not None for r in pruned))
    return Outcome("PASS" if ok else "FAIL", f"exit {'TIMEOUT' if rc is None else rc}; {_trial_cells(rows)} (the "
                   "baseline is never pruned)", {"trials": rows})


def check_search_workers(ctx: Context) -> Outcome:
    if ctx.data is None:
        return Outcome("SKIP", "no synthetic data")
    extra = ["--workers", "2"] + (["--devices", "0,0"] if ctx.cuda else [])
    if not ctx.cuda:
        say("  --devices 0,0: skipped (CUDA devices); two CPU workers instead")
    rc, rows = _run_study(ctx, "gpu-workers", "search_workers", extra, cap_s=200)
    done = [r for r in rows if r["state"] == "COMPLETE"]
    problems = [] if rc == 0 and len(done) >= 2 else [f"{len(done)} complete trials"]
    if ctx.cuda:
        problems += [f"#{r['number']}: uuid {r['uuid']}, CUDA_VISIBLE_DEVICES {r['visible_devices']}" for r in done
                     if not r["uuid"] or r["visible_devices"] != "0"]
    pids = {r["pid"] for r in done}
    line = (f"exit {'TIMEOUT' if rc is None else rc}; {_trial_cells(rows)}; {len(pids)} worker pid(s); GPU "
            f"{sorted({str(r['uuid']) for r in done})}")
    return Outcome("FAIL" if problems else "PASS", line + ("; " + "; ".join(problems) if problems else ""),
                   {"trials": rows})


def check_relatency(ctx: Context) -> Outcome:
    from nas.study import load_study
    from nas.study.relatency import profile_results, profiles

    name = next((n for n in ("gpu-workers", "gpu-prune") if ctx.studies.get(n)), None)
    if name is None:
        return Outcome("SKIP", "no study with a complete trial (search_workers and search_prune_to did not finish)")
    backend = "cudagraph" if ctx.cuda else "torch"
    if not ctx.cuda:
        say("  --latency-backend cudagraph: skipped (CUDA-only); torch on the CPU instead")
    results = str(ctx.work / "studies")
    rc, _ = run_cli(ctx, "relatency", ["relatency", name, "--results", results, "--device", ctx.device_arg,
                                       "--latency-backend", backend], cap_s=120)
    if rc != 0:
        return Outcome("FAIL", f"relatency {name}: exit {'TIMEOUT' if rc is None else rc}")
    study = load_study(name, results=results)
    profile = list(profiles(study))[-1]
    timed = profile_results(study, profile)
    run_cli(ctx, "relatency", ["show", name, "--results", results, "--profile", profile], 30, append=True)
    rows = {r["number"]: r for r in _study_rows(ctx, name)}
    done = [n for n, r in rows.items() if r["state"] == "COMPLETE"]
    missing = [n for n in done if n not in timed or not timed[n].get("ratio")]
    cells = "; ".join(f"#{n} ratio {rows[n]['latency_ratio']:.3f} -> {timed[n]['ratio']:.3f}" for n in done
                      if n in timed)
    line = f"{name}, profile {profile!r} ({backend}): {cells}" + (f"; not timed: {missing}" if missing else "")
    return Outcome("FAIL" if missing or not done else "PASS", line, {"profile": profile, "timed": timed})


CHECKS: list[tuple[str, Callable[[Context], Outcome], int]] = [  # name, check, seconds it needs at least on a GPU
    ("synthetic_data", check_synthetic_data, 10),
    ("graph_vs_eager", check_graph_vs_eager, 40),
    ("ratio_stability", check_ratio_stability, 30),
    ("fp16_channels_last", check_fp16_channels_last, 10),
    ("amp_fit_fusion", check_amp_fit_fusion, 45),
    ("amp_calibration", check_amp_calibration, 20),
    ("prune_finetune", check_prune_finetune, 40),
    ("prune_latency", check_prune_latency, 50),
    ("onnx_cuda_weights", check_onnx_cuda_weights, 15),
    ("search_prune_to", check_search_prune_to, 90),
    ("search_workers", check_search_workers, 80),
    ("relatency", check_relatency, 30),
]


# ---------------------------------------------------------------------------------------------------------------
# the run


def machine_line(ctx: Context) -> str:
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        what = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        what = f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads), --dry-cpu"
    return (f"{what}; torch {torch.__version__}, Python {platform.python_version()}; "
            f"{time.strftime('%Y-%m-%d %H:%M %Z')}")


def write_summary(ctx: Context, rows: list[dict]) -> str:
    """The table of checks so far, written to OUT/summary.txt and OUT/results.json; returns the table."""
    lines = [f"repnas GPU checks (issue 15): {machine_line(ctx)}"]
    if ctx.dry:
        lines.append("--dry-cpu: tiny sizes on a CPU; CUDA-only parts skipped; timing verdicts mean nothing here")
    lines.append(f"{'check':<20}{'status':<8}{'seconds':>8}  figures")
    lines += [f"{r['check']:<20}{r['status']:<8}{r['seconds']:>8.1f}  {r['line']}" for r in rows]
    lines.append(f"total {time.perf_counter() - ctx.start:.1f} s; " + ", ".join(
        f"{sum(r['status'] == s for r in rows)} {s}" for s in ("PASS", "FAIL", "ERROR", "SKIP")))
    table = "\n".join(lines)
    (ctx.out / "summary.txt").write_text(table + "\n")
    (ctx.out / "results.json").write_text(json.dumps({"machine": machine_line(ctx), "dry_cpu": ctx.dry,
                                                      "checks": rows}, indent=1, default=str) + "\n")
    return table


def run(ctx: Context, only: list[str]) -> list[dict]:
    rows = []
    chosen = [c for c in CHECKS if not only or c[0] in only]
    for k, (name, check, needs) in enumerate(chosen, 1):
        say(f"\n== [{k}/{len(chosen)}] {name}: {time.perf_counter() - ctx.start:.0f} s elapsed, {ctx.left():.0f} s "
            "of the budget left")
        start = time.perf_counter()
        if ctx.left() < needs and not ctx.dry:
            outcome = Outcome("SKIP", f"{ctx.left():.0f} s of the budget left, it needs about {needs} s")
        else:
            try:
                outcome = check(ctx)
            except Exception as err:  # reported, and the next check runs
                traceback.print_exc(file=sys.stdout)
                outcome = Outcome("ERROR", _first_line(err))
            finally:
                if ctx.cuda:
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
        seconds = time.perf_counter() - start
        say(f"-- {name}: {outcome.status} in {seconds:.1f} s: {outcome.line}")
        rows.append({"check": name, "status": outcome.status, "seconds": seconds, "line": outcome.line,
                     "figures": outcome.figures})
        write_summary(ctx, rows)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the small text files that come back")
    parser.add_argument("--work", help="an empty or new folder for data, weights and studies (default: a new /tmp "
                                       "folder)")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="seconds for all checks; a check that would not fit is skipped (default %(default)s)")
    parser.add_argument("--dry-cpu", action="store_true",
                        help="run every check on the CPU at tiny sizes (CUDA-only parts skipped, each with its reason)")
    parser.add_argument("--only", nargs="+", choices=[c[0] for c in CHECKS], help="run these checks only")
    args = parser.parse_args()
    if not args.dry_cpu and not torch.cuda.is_available():
        parser.error("no CUDA device here: run on a GPU machine, or give --dry-cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.work:
        work = Path(args.work)
        if work.exists() and any(work.iterdir()):
            parser.error(f"--work {work} is not empty: give a new or empty folder (studies there would be resumed)")
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="repnas-gpu-checks-"))
    os.environ.setdefault("REPNAS_CACHE_DIR", str(work / "cache"))
    logging.basicConfig(level=logging.INFO, format="  %(message)s", stream=sys.stdout)
    logging.getLogger("repnas.train").setLevel(logging.WARNING)  # the checks print the epochs themselves
    start = time.perf_counter()
    device = torch.device("cpu" if args.dry_cpu else "cuda:0")
    ctx = Context(device, args.dry_cpu, DRY_SIZES if args.dry_cpu else CUDA_SIZES, out, work,
                  start + args.budget_s, start)
    say(f"repnas GPU checks: {machine_line(ctx)}; work folder {work}; budget {args.budget_s:.0f} s")
    rows = run(ctx, args.only or [])
    say("\n" + write_summary(ctx, rows))
    broken = ("ERROR",) if ctx.dry else ("FAIL", "ERROR")  # --dry-cpu: a code path that raised; bars mean nothing
    return 1 if any(r["status"] in broken for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
