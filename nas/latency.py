"""Measured latency of a (deploy) model: CUDA events on a GPU, `time.perf_counter` on a CPU, through a backend.

Latency does not depend on the weights, so a freshly built, fused model can be timed before any training. A
reference model (the study's fused baseline) timed in the same process, interleaved round by round, gives
`latency_ratio`, a figure that survives a noisy, shared machine far better than milliseconds do.

A backend is how the network runs while it is timed: `torch` (eager PyTorch), `cudagraph` (one captured CUDA graph
replayed: no per-kernel launch overhead) and `onnxruntime` (ONNX Runtime's CPU execution provider). Every backend
times the same graph, the fused network with its decoded output (B, N, 5 + nc) and no NMS (`nas.onnx_export`'s
layout). A new backend (TensorRT, ONNX Runtime's CUDA provider) subclasses `LatencyBackend` and joins `BACKENDS`.

On CUDA everything a measurement does (events, synchronisation, warm-up, graph capture) happens on the input's
device and its stream, named explicitly: the current device of a process is cuda:0 unless someone sets it, and a
worker pinned to cuda:1 would otherwise record its events on GPU 0's stream. `LatencySession` prepares networks once
and times them as often as asked (a prune-to-latency bisection reuses its reference); `measure_latency` is one
measurement.
"""

from __future__ import annotations

import copy
import importlib
import os
import platform
import statistics
import tempfile
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from nas.device import gpu_identity, gpu_lock
from nas.onnx_export import DecodedOutput
from space.errors import RepnasError

NOISY_SPREAD = 1.3  # p90 / median above this: the machine was busy while timing (a quiet one stays near 1.05)
AUTOTUNE_WARMUP = 2  # least warm-up passes on CUDA with cudnn.benchmark: the first one autotunes, so never timed
GRAPH_WARMUP = 3  # passes on a side stream before a CUDA graph capture (torch.cuda.graph's documented pattern)


class LatencyBackendError(RepnasError):
    """A latency backend that cannot run here: unknown, on the wrong kind of device, or its runtime missing."""


class CaptureFailed(LatencyBackendError):
    """A CUDA graph could not be captured (or came out empty): the network is not timed eagerly instead."""


@dataclass(frozen=True)
class LatencyConfig:
    """How latency is measured. fp16/channels_last/cudnn.benchmark apply on CUDA only; `backend` is a BACKENDS name
    (`for_device`: `cudagraph` on CUDA, `torch` on a CPU; a config written before backends existed is `torch`)."""

    warmup: int = 10
    iters: int = 100  # timed iterations per model, split over `rounds`
    rounds: int = 5  # interleaving rounds with the reference
    half: bool = True
    channels_last: bool = True
    cudnn_benchmark: bool = True
    backend: str = "torch"
    threads: int | None = None  # CPU: torch threads (and ONNX Runtime's intra-op threads) while timing

    @classmethod
    def for_device(cls, device: torch.device, **changes) -> LatencyConfig:
        """The defaults for `device`: on CUDA the `cudagraph` backend (eager PyTorch at batch 1 on a fast GPU mostly
        times kernel launches); on a CPU eager `torch` (it ranked 12 Archs as ONNX Runtime does, Kendall τ-b 0.94 and
        the same front: benchmarks/RESULTS.md "Latency backends on a CPU") with fewer iterations, where one forward
        pass takes 100x longer."""
        base = {"backend": "cudagraph"} if device.type == "cuda" else {"warmup": 3, "iters": 30}
        return cls(**(base | changes))

    def __post_init__(self):
        if self.warmup < 0 or self.iters < 1 or self.rounds < 1 or self.iters < self.rounds:
            raise ValueError(f"LatencyConfig: need warmup >= 0 and iters >= rounds >= 1, got warmup={self.warmup}, "
                             f"iters={self.iters}, rounds={self.rounds}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"LatencyConfig: threads={self.threads} must be >= 1 or None")
        if self.backend not in BACKENDS:
            raise ValueError(f"LatencyConfig: backend={self.backend!r} is unknown; use one of {', '.join(BACKENDS)}")


@dataclass(frozen=True)
class Latency:
    """Latency statistics in milliseconds, what was measured, how, and on what.

    `device`: `device_info` plus the backend's runtime versions. `conditions`: {"before": ..., "after": ...}, the
    machine's state around the timed passes (`machine_state`: load average; on CUDA NVML clocks, temperature,
    power and utilisation). `warmup`: untimed passes actually run per network (never 0 on CUDA with autotuning).
    """

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
    backend: str = "torch"
    warmup: int | None = None
    conditions: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Latency:
        """A Latency from `to_dict()`'s output (as JSON reads it back: imgsz a list); unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        return cls(**(values | {"imgsz": tuple(values["imgsz"])}))

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
    """What the numbers were measured on: on CUDA the GPU's name, index, UUID and PCI bus id (`gpu_identity`), the
    driver, CUDA/cuDNN and torch versions; on a CPU its name, the threads timed with and the cores."""
    info = {"type": device.type, "torch": torch.__version__}
    if device.type == "cuda":
        info |= gpu_identity(device) | {"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                                        "driver": _driver_version()}
    else:
        info |= {"name": _cpu_name(), "threads": threads or torch.get_num_threads(), "cores": os.cpu_count()}
    return info


_NVML: dict = {}  # {"module": pynvml} once initialised in this process, {"error": why} when it cannot be


def _nvml():
    """pynvml, initialised once per process (nvidia-ml-py, optional); None when absent or failing (reason kept)."""
    if not _NVML:
        try:
            import pynvml

            pynvml.nvmlInit()
            _NVML["module"] = pynvml
        except ImportError:
            _NVML["error"] = "not installed (pip install nvidia-ml-py)"
        except Exception as err:  # no driver, no permission: the record says so
            _NVML["error"] = f"unavailable ({type(err).__name__}: {err})"
    return _NVML.get("module")


def _driver_version() -> str | None:
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        version = nvml.nvmlSystemGetDriverVersion()
    except Exception:  # the driver stays unknown
        return None
    return version.decode() if isinstance(version, bytes) else version


def _gpu_state(uuid: str | None) -> dict:
    """NVML's view of the GPU `uuid` now: SM and memory clocks (MHz), temperature (C), power (W), utilisation of
    the GPU and of its memory over NVML's last sample period (%), and the clock event (throttle) reasons bitmask.
    A reading the GPU does not support is None; without NVML, {"nvml": why}."""
    nvml = _nvml()
    if nvml is None or uuid is None:
        return {"nvml": _NVML.get("error", "no GPU UUID to look the device up by")}
    try:
        handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
    except Exception as err:
        return {"nvml": f"no handle for {uuid} ({type(err).__name__})"}

    def read(fn: Callable, *args, scale: float = 1.0):
        try:
            value = fn(handle, *args)
        except Exception:  # not supported on this GPU
            return None
        return value / scale if scale != 1.0 else value

    util = read(nvml.nvmlDeviceGetUtilizationRates)
    reasons = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
        nvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None)
    return {"sm_clock_mhz": read(nvml.nvmlDeviceGetClockInfo, nvml.NVML_CLOCK_SM),
            "memory_clock_mhz": read(nvml.nvmlDeviceGetClockInfo, nvml.NVML_CLOCK_MEM),
            "temperature_c": read(nvml.nvmlDeviceGetTemperature, nvml.NVML_TEMPERATURE_GPU),
            "power_w": read(nvml.nvmlDeviceGetPowerUsage, scale=1000.0),
            "utilization_gpu_pct": None if util is None else util.gpu,
            "utilization_memory_pct": None if util is None else util.memory,
            "clocks_event_reasons": None if reasons is None else read(reasons)}


def machine_state(device: torch.device, uuid: str | None = None) -> dict:
    """The machine around a measurement: the 1/5/15-minute load average (`os.getloadavg`) and, on CUDA, the GPU
    `uuid`'s NVML state (`_gpu_state`)."""
    state = {"time": time.time()}
    try:
        state["loadavg"] = list(os.getloadavg())
    except OSError:  # not on this platform
        state["loadavg"] = None
    if device.type == "cuda":
        state["gpu"] = _gpu_state(uuid)
    return state


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@contextmanager
def _on_device(device: torch.device) -> Iterator[torch.cuda.Stream | None]:
    """On CUDA: `device` as the current device and its current stream as the current stream, for the block; yields
    that stream (None on a CPU). Kernels, events and captures in the block then all act on the input's device."""
    if device.type != "cuda":
        yield None
        return
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device)
        with torch.cuda.stream(stream):
            yield stream


def _timed(fn: Callable[[], object], n: int, device: torch.device) -> list[float]:
    """Run `fn` n times; return each pass's time in ms: CUDA events recorded on `device`'s current stream around
    each pass, then waited for; `time.perf_counter` on a CPU."""
    times = []
    with _on_device(device) as stream:
        for _ in range(n):
            if stream is None:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1000)
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            fn()
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
    return times


def warmup_passes(cfg: LatencyConfig, device: torch.device) -> int:
    """Untimed passes before timing: `cfg.warmup`, but at least AUTOTUNE_WARMUP on CUDA with cudnn.benchmark on
    (its first pass of a shape autotunes, and an autotuning pass must never be timed)."""
    if device.type == "cuda" and cfg.cudnn_benchmark:
        return max(cfg.warmup, AUTOTUNE_WARMUP)
    return cfg.warmup


def deploy_copy(model: nn.Module, x: torch.Tensor, cfg: LatencyConfig) -> nn.Module:
    """What every backend times: a copy of `model` returning only its decoded output (B, N, 5 + nc), no NMS
    (`nas.onnx_export`'s graph), in eval mode on `x`'s device; on CUDA in fp16 and channels_last as `cfg` says."""
    net = DecodedOutput(copy.deepcopy(model)).eval().to(x.device)
    if x.is_cuda:
        if cfg.half:
            net.half()
        if cfg.channels_last:
            net.to(memory_format=torch.channels_last)
    return net


class Runner(ABC):
    """A network prepared by a backend for one input: `run(n)` times n passes, returns their times in ms."""

    @abstractmethod
    def run(self, n: int) -> list[float]:
        ...


class LatencyBackend(ABC):
    """How a network runs while it is timed. `name` is its `LatencyConfig.backend` value, `device_types` the
    torch device types it runs on; `check` raises LatencyBackendError (one line) when it cannot run on a device
    here, `info` gives its runtime's versions for the latency record, and `prepare` turns a fused model and an input
    into a warmed-up Runner, whose `run` times passes with `_timed` (on CUDA: events on the input's device and
    stream, so a backend's own work must go to that stream, e.g. TensorRT's `execute_async` on it)."""

    name: ClassVar[str]
    device_types: ClassVar[tuple[str, ...]]
    summary: ClassVar[str]  # one phrase for help texts

    def check(self, device: torch.device) -> None:
        if device.type not in self.device_types:
            kinds = " or ".join(self.device_types)
            others = ", ".join(n for n, b in BACKENDS.items() if device.type in b.device_types)
            raise LatencyBackendError(f"latency backend {self.name!r} times on {kinds}, not on {device}; use "
                                      f"--latency-backend {others or 'torch'} or another --device")

    def info(self) -> dict:
        return {}

    @abstractmethod
    def prepare(self, model: nn.Module, x: torch.Tensor, cfg: LatencyConfig) -> Runner:
        ...


class _EagerRunner(Runner):
    def __init__(self, net: nn.Module, x: torch.Tensor):
        self.net, self.x = net, x

    @torch.inference_mode()
    def run(self, n: int) -> list[float]:
        return _timed(lambda: self.net(self.x), n, self.x.device)


class TorchBackend(LatencyBackend):
    """Eager PyTorch: one kernel launch per op, each pass launched from Python (on a fast GPU at batch 1 mostly
    launch overhead)."""

    name, device_types, summary = "torch", ("cpu", "cuda"), "eager PyTorch"

    def prepare(self, model, x, cfg):
        net = deploy_copy(model, x, cfg)
        with torch.inference_mode(), _on_device(x.device):
            for _ in range(warmup_passes(cfg, x.device)):
                net(x)
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
        return _EagerRunner(net, x)


class _GraphRunner(Runner):
    def __init__(self, graph, net: nn.Module, x: torch.Tensor, out: torch.Tensor):
        self.graph = graph
        self.keep = (net, x, out)  # the graph replays into these tensors' memory: they must outlive it

    def run(self, n: int) -> list[float]:
        return _timed(self.graph.replay, n, self.keep[1].device)


class CudaGraphBackend(LatencyBackend):
    """The network captured once as a CUDA graph (`torch.cuda.CUDAGraph`) and replayed: one launch per pass, what a
    deployment that removes launch overhead sees. A capture that fails or comes out empty raises CaptureFailed:
    never timed eagerly in its place."""

    name, device_types, summary = "cudagraph", ("cuda",), "a captured CUDA graph, replayed"

    def prepare(self, model, x, cfg):
        net = deploy_copy(model, x, cfg)
        device = x.device
        with torch.inference_mode(), torch.cuda.device(device):
            main = torch.cuda.current_stream(device)
            side = torch.cuda.Stream(device=device)
            side.wait_stream(main)
            with torch.cuda.stream(side):  # warm-up (and autotuning) off the capture, as torch.cuda.graph asks
                for _ in range(max(warmup_passes(cfg, device), GRAPH_WARMUP)):
                    net(x)
            main.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                        out = net(x)
            except Exception as err:
                reason = (str(err).strip().splitlines() or [""])[0]
                raise CaptureFailed(f"CUDA graph capture failed on {device} ({type(err).__name__}: {reason}); the "
                                    "network is not timed eagerly instead (a front timed as graphs stays graphs): "
                                    "time with --latency-backend torch") from err
            empty = [w for w in caught if "empty" in str(w.message).lower()]
            if empty:
                raise CaptureFailed(f"the CUDA graph captured on {device} is empty ({str(empty[0].message).strip()}); "
                                    "its replay would time nothing: time with --latency-backend torch")
            torch.cuda.synchronize(device)
        return _GraphRunner(graph, net, x, out)


class _OrtRunner(Runner):
    def __init__(self, session, feed: dict):
        self.session, self.feed = session, feed

    def run(self, n: int) -> list[float]:
        return _timed(lambda: self.session.run(None, self.feed), n, torch.device("cpu"))


class OnnxRuntimeBackend(LatencyBackend):
    """ONNX Runtime's CPU execution provider on the network exported by `nas.onnx_export.export_onnx` (into a
    temporary folder, removed once the session is built): all graph optimisations, `cfg.threads` intra-op threads
    (None: torch's count), one inter-op thread, sequential execution, no spin-waiting between runs."""

    name, device_types, summary = "onnxruntime", ("cpu",), "ONNX Runtime, CPU execution provider"

    def check(self, device):
        super().check(device)
        for module in ("onnxruntime", "onnx"):
            try:
                importlib.import_module(module)
            except ImportError:
                raise LatencyBackendError(f"latency backend 'onnxruntime' needs onnx and onnxruntime ({module} is not "
                                          'installed): pip install -e ".[onnx]"') from None

    def info(self):
        import onnxruntime

        return {"onnxruntime": onnxruntime.__version__}

    def prepare(self, model, x, cfg):
        import onnxruntime as ort

        from nas.onnx_export import export_onnx

        options = ort.SessionOptions()
        options.intra_op_num_threads = cfg.threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # no spin-waiting between runs: the candidate's and the reference's sessions alternate, and one's spinning
        # pool would steal the cores the other runs on (measured: p90/median 1.5-2.1 spinning, 1.05-1.26 not)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        with tempfile.TemporaryDirectory(prefix="repnas-latency-") as tmp:
            path = Path(tmp) / "model.onnx"
            export_onnx(model, path, tuple(x.shape[-2:]), check=False)
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x.detach().cpu().float().numpy()}
        for _ in range(cfg.warmup):
            session.run(None, feed)
        return _OrtRunner(session, feed)


BACKENDS: dict[str, LatencyBackend] = {b.name: b for b in (TorchBackend(), CudaGraphBackend(), OnnxRuntimeBackend())}


def latency_backend(name: str) -> LatencyBackend:
    """The backend called `name`; LatencyBackendError naming the known ones otherwise."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise LatencyBackendError(f"latency backend {name!r} is unknown; use one of {', '.join(BACKENDS)}") from None


class LatencySession:
    """Networks timed on one seeded input (batch, 3, H, W) with one device, backend and LatencyConfig.

    A context manager: while open it holds the GPU's lock (`nas.device.gpu_lock`: no training step of another
    process runs on this GPU meanwhile), torch's thread count (`cfg.threads`, CPU) and cudnn.benchmark (CUDA) as
    `cfg` says; all are restored at exit. `prepare(model)` copies and warms a network up once (for `cudagraph`,
    captures it; for `onnxruntime`, exports it) and `measure(runner, reference)` times it, as often as asked, e.g. a
    bisection timing each candidate against one prepared reference. Raises ValueError for a non-positive batch or
    size and LatencyBackendError when the backend cannot run on `device` here.
    """

    def __init__(self, imgsz: int | tuple[int, int], batch: int, device: str | torch.device, cfg: LatencyConfig):
        self.device = torch.device(device)
        self.h, self.w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
        if batch < 1 or self.h < 1 or self.w < 1:
            raise ValueError(f"measure_latency: batch={batch} and imgsz={imgsz} must be positive")
        self.batch, self.cfg = batch, cfg
        self.backend = latency_backend(cfg.backend)
        self.backend.check(self.device)
        cuda = self.device.type == "cuda"
        self.dtype = torch.float16 if cuda and cfg.half else torch.float32
        self.uuid: str | None = None
        self._stack: ExitStack | None = None

    def __enter__(self) -> LatencySession:
        cuda = self.device.type == "cuda"
        with ExitStack() as stack:
            threads, benchmark = torch.get_num_threads(), torch.backends.cudnn.benchmark
            stack.callback(torch.set_num_threads, threads)
            stack.callback(setattr, torch.backends.cudnn, "benchmark", benchmark)
            if not cuda and self.cfg.threads:
                torch.set_num_threads(self.cfg.threads)
            if cuda:
                torch.backends.cudnn.benchmark = self.cfg.cudnn_benchmark
                self.uuid = gpu_identity(self.device)["uuid"]
            stack.enter_context(gpu_lock(self.device).timing())
            x = torch.randn(self.batch, 3, self.h, self.w, generator=torch.Generator().manual_seed(0))
            self.x = x.to(device=self.device, dtype=self.dtype)  # (B, 3, H, W)
            if cuda and self.cfg.channels_last:
                self.x = self.x.contiguous(memory_format=torch.channels_last)
            self._stack = stack.pop_all()  # kept until __exit__ (undone at once if anything above raised)
        return self

    def __exit__(self, *exc) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def prepare(self, model: nn.Module) -> Runner:
        """`model` (fused, pruned: the network that runs) copied, warmed up and ready to time; the caller's model
        is left as it is. Raises CaptureFailed when `cudagraph` cannot capture it."""
        return self.backend.prepare(model, self.x, self.cfg)

    def measure(self, runner: Runner, reference: Runner | None = None) -> Latency:
        """Time `runner` (and `reference`, interleaved: `cfg.rounds` rounds, the two swapping order every round so
        neither always runs first after the other's work) for `cfg.iters` passes each; return its Latency."""
        cfg = self.cfg
        uuid = self.uuid
        timed = [(runner, [])] + ([(reference, [])] if reference is not None else [])
        per_round = [cfg.iters // cfg.rounds + (1 if r < cfg.iters % cfg.rounds else 0) for r in range(cfg.rounds)]
        before = machine_state(self.device, uuid)
        for r, n in enumerate(per_round):  # interleaved: drift on a shared machine hits both models alike
            for run, times in (timed if r % 2 == 0 else timed[::-1]):
                times += run.run(n)
        after = machine_state(self.device, uuid)
        times = timed[0][1]
        median = statistics.median(times)
        ref_median = statistics.median(timed[1][1]) if reference is not None else None
        threads = torch.get_num_threads()
        return Latency(
            median_ms=median, p90_ms=_percentile(times, 0.9), mean_ms=statistics.fmean(times),
            std_ms=statistics.pstdev(times), iterations=len(times), imgsz=(self.h, self.w), batch=self.batch,
            dtype=str(self.dtype).replace("torch.", ""), device=device_info(self.device, threads) | self.backend.info(),
            reference_median_ms=ref_median, latency_ratio=median / ref_median if ref_median else None,
            backend=self.backend.name, warmup=warmup_passes(cfg, self.device),
            conditions={"before": before, "after": after},
        )


def measure_latency(model: nn.Module, imgsz: int | tuple[int, int] = 640, batch: int = 1,
                    device: str | torch.device = "cpu", cfg: LatencyConfig = LatencyConfig(), *,
                    reference: nn.Module | None = None) -> Latency:
    """Time `model` (a copy, in eval and inference mode) on a seeded input (batch, 3, H, W), `imgsz` an int or
    (H, W) in pixels; with `reference`, time both interleaved round by round (`cfg.rounds`).

    The caller passes the network that runs: the fused (and pruned) deploy form, a detector whose decoded output is
    timed. `cfg.backend` runs it (`BACKENDS`); on CUDA: CUDA events on the input's device and stream after the
    warm-up passes (`warmup_passes`), fp16 and channels_last by `cfg`; on a CPU: `time.perf_counter` with
    `cfg.threads` threads. Returns Latency: median/p90/mean/std in milliseconds per forward pass, the device record
    (`device_info`: GPU UUID and PCI bus id), the backend, the machine's state before and after, and with
    `reference` its median and `latency_ratio` = median / reference median. Raises ValueError for a non-positive
    batch or size, LatencyBackendError when the backend cannot run on `device` here, CaptureFailed when a CUDA
    graph cannot be captured.
    """
    with LatencySession(imgsz, batch, device, cfg) as session:
        runner = session.prepare(model)
        ref = session.prepare(reference) if reference is not None else None
        return session.measure(runner, ref)
