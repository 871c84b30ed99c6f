"""Measured latency of a (deploy) model: CUDA events on a GPU, `time.perf_counter` on a CPU.

Latency does not depend on the weights, so a freshly built, fused model can be timed before any training. A
reference model (the study's fused baseline) timed in the same process, interleaved round by round, gives
`latency_ratio`, a figure that survives a noisy, shared machine far better than milliseconds do.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

NOISY_SPREAD = 1.3  # p90 / median above this: the machine was busy while timing (a quiet one stays near 1.05)


@dataclass(frozen=True)
class LatencyConfig:
    """How latency is measured. fp16/channels_last/cudnn.benchmark/CUDA graphs apply on CUDA only."""

    warmup: int = 10
    iters: int = 100  # timed iterations per model, split over `rounds`
    rounds: int = 5  # interleaving rounds with the reference
    half: bool = True
    channels_last: bool = True
    cudnn_benchmark: bool = True
    cuda_graph: bool = False
    threads: int | None = None  # CPU: torch threads while timing (None: leave as is)

    @classmethod
    def for_device(cls, device: torch.device, **changes) -> LatencyConfig:
        """The defaults for `device`: fewer iterations on a CPU, where one forward pass takes 100x longer."""
        base = {} if device.type == "cuda" else {"warmup": 3, "iters": 30}
        return cls(**(base | changes))

    def __post_init__(self):
        if self.warmup < 0 or self.iters < 1 or self.rounds < 1 or self.iters < self.rounds:
            raise ValueError(f"LatencyConfig: need warmup >= 0 and iters >= rounds >= 1, got warmup={self.warmup}, "
                             f"iters={self.iters}, rounds={self.rounds}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"LatencyConfig: threads={self.threads} must be >= 1 or None")


@dataclass(frozen=True)
class Latency:
    """Latency statistics in milliseconds, what was measured, and on what."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    iterations: int
    imgsz: tuple[int, int]
    batch: int
    dtype: str
    device: dict = field(default_factory=dict)
    reference_median_ms: float | None = None
    latency_ratio: float | None = None  # median / reference median, both measured here, interleaved

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def spread(self) -> float:
        """p90 / median: how far the slow tail reaches; above NOISY_SPREAD the figures are not to be trusted."""
        return self.p90_ms / self.median_ms

    @property
    def noisy(self) -> bool:
        return self.spread > NOISY_SPREAD


def noise_warning(lat: Latency) -> str | None:
    """A sentence saying the machine was busy while `lat` was timed (None when its p90/median looks quiet)."""
    if not lat.noisy:
        return None
    return (f"p90/median {lat.spread:.2f} > {NOISY_SPREAD:g}: this machine was busy while timing (other processes "
            "compete for its cores), so these figures are inflated and vary from run to run; time again on a quiet "
            "machine")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device, threads: int | None = None) -> dict:
    """What the numbers were measured on: GPU name, driver, CUDA/cuDNN and torch versions; or CPU and threads."""
    info = {"type": device.type, "torch": torch.__version__}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        info |= {"name": torch.cuda.get_device_name(index), "cuda": torch.version.cuda,
                 "cudnn": torch.backends.cudnn.version(), "driver": _driver_version()}
    else:
        info |= {"name": _cpu_name(), "threads": threads or torch.get_num_threads(), "cores": os.cpu_count()}
    return info


def _driver_version() -> str | None:
    try:
        import pynvml  # optional: nvidia-ml-py

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version
    except Exception:  # no NVML here: the driver stays unknown
        return None


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class _Runner:
    """A copy of one model prepared for timing, with its input; `run(n)` returns n per-iteration times in ms."""

    def __init__(self, model: nn.Module, x: torch.Tensor, cfg: LatencyConfig):
        self.model = copy.deepcopy(model).eval().to(x.device)
        if x.is_cuda:
            if cfg.half:
                self.model.half()
            if cfg.channels_last:
                self.model.to(memory_format=torch.channels_last)
        self.x = x
        self.graph = None
        with torch.inference_mode():
            for _ in range(cfg.warmup):
                self.model(self.x)
            if x.is_cuda and cfg.cuda_graph:
                torch.cuda.synchronize()
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(3):
                        self.model(self.x)
                torch.cuda.current_stream().wait_stream(stream)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.model(self.x)
        if x.is_cuda:
            torch.cuda.synchronize()

    @torch.inference_mode()
    def run(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            if self.x.is_cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                if self.graph is not None:
                    self.graph.replay()
                else:
                    self.model(self.x)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                self.model(self.x)
                times.append((time.perf_counter() - t) * 1000)
        return times


def measure_latency(model: nn.Module, imgsz: int | tuple[int, int] = 640, batch: int = 1,
                    device: str | torch.device = "cpu", cfg: LatencyConfig = LatencyConfig(), *,
                    reference: nn.Module | None = None) -> Latency:
    """Time `model` (a copy, in eval and inference mode) on a seeded input (batch, 3, H, W), `imgsz` an int or
    (H, W) in pixels; with `reference`, time both interleaved round by round (`cfg.rounds`).

    The caller passes the network that runs: the fused (and pruned) deploy form. On CUDA: CUDA events after
    `cfg.warmup` untimed passes, fp16 and channels_last by `cfg`; on a CPU: `time.perf_counter` with `cfg.threads`
    torch threads while timing. Returns Latency: median/p90/mean/std in milliseconds per forward pass, the device
    record (`device_info`), and with `reference` its median and `latency_ratio` = median / reference median.
    Raises ValueError for a non-positive batch or size.
    """
    device = torch.device(device)
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    if batch < 1 or h < 1 or w < 1:
        raise ValueError(f"measure_latency: batch={batch} and imgsz={imgsz} must be positive")
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda and cfg.half else torch.float32
    x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    if cuda and cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    threads_before = torch.get_num_threads()
    benchmark_before = torch.backends.cudnn.benchmark
    try:
        if not cuda and cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cuda:
            torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
        runners = [_Runner(model, x, cfg)] + ([_Runner(reference, x, cfg)] if reference is not None else [])
        samples: list[list[float]] = [[] for _ in runners]
        per_round = [cfg.iters // cfg.rounds + (1 if r < cfg.iters % cfg.rounds else 0) for r in range(cfg.rounds)]
        for n in per_round:  # interleaved: drift on a shared machine hits both models alike
            for runner, times in zip(runners, samples):
                times += runner.run(n)
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads_before)
        torch.backends.cudnn.benchmark = benchmark_before
    times = samples[0]
    median = statistics.median(times)
    ref_median = statistics.median(samples[1]) if reference is not None else None
    return Latency(
        median_ms=median, p90_ms=_percentile(times, 0.9), mean_ms=statistics.fmean(times),
        std_ms=statistics.pstdev(times), iterations=len(times), imgsz=(h, w), batch=batch,
        dtype=str(dtype).replace("torch.", ""), device=device_info(device, threads),
        reference_median_ms=ref_median, latency_ratio=median / ref_median if ref_median else None,
    )
