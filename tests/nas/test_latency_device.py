"""Timing on the right device (nas/latency.py, nas/device.py, nas/study/workers.py), on a CPU-only machine: a
recording stand-in for torch.cuda with two GPUs, where the process's current device is 0 as in any process that never
sets it, shows where a measurement of an input on cuda:1 records its events, synchronises, captures and launches;
the per-GPU lock keeps a training step and a measurement apart (and a waiting measurement goes before the next
step); a `--devices` worker sees only its GPU, a CPU worker none; the baseline can be timed in a worker process."""

from __future__ import annotations

import fcntl
import os
import threading
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import nas.files
from nas.device import GpuLock, gpu_lock
from nas.latency import CaptureFailed, LatencyConfig, measure_latency

# --- a recording torch.cuda with two GPUs ---------------------------------------------------------------------------


class FakeCuda:
    """The state a CUDA process keeps (its current device, each device's current stream) and a log of what acts on
    which device: ("record", d), ("sync", d), ("capture", d), ("launch", current device, current stream's device)."""

    def __init__(self):
        self.current = 0
        self.streams = {0: FakeStream(self, 0), 1: FakeStream(self, 1)}  # each device's current stream
        self.log: list[tuple] = []
        self.capture_error: Exception | None = None
        self.capture_warning: str | None = None

    def index(self, device) -> int:
        if device is None:
            return self.current
        if isinstance(device, int):
            return device
        device = torch.device(device)
        return self.current if device.index is None else device.index

    def launch(self, what: str = "launch") -> None:
        self.log.append((what, self.current, self.streams[self.current].index))


class FakeStream:
    def __init__(self, cuda: FakeCuda, index: int):
        self.cuda, self.index = cuda, index

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.index)

    def wait_stream(self, other: FakeStream) -> None:
        pass

    def synchronize(self) -> None:
        self.cuda.log.append(("sync", self.index))


def install(monkeypatch, cuda: FakeCuda) -> None:
    """Replace the torch.cuda functions and classes a measurement uses with `cuda`'s recording ones."""

    @contextmanager
    def stream_context(stream):  # torch.cuda.stream: the stream's device becomes current too
        before_device, before_stream = cuda.current, cuda.streams[stream.index]
        cuda.current, cuda.streams[stream.index] = stream.index, stream
        try:
            yield
        finally:
            cuda.current, cuda.streams[stream.index] = before_device, before_stream

    @contextmanager
    def device_context(device):  # torch.cuda.device
        before, cuda.current = cuda.current, cuda.index(device)
        try:
            yield
        finally:
            cuda.current = before

    class Event:
        def __init__(self, enable_timing=False):
            self.index = None

        def record(self, stream=None):
            self.index = (stream or cuda.streams[cuda.current]).index
            cuda.log.append(("record", self.index))

        def synchronize(self):
            cuda.log.append(("sync", self.index))

        def elapsed_time(self, end):
            return 1.0

    class CUDAGraph:
        def replay(self):
            cuda.launch("replay")

    @contextmanager
    def graph(cuda_graph, pool=None, stream=None, capture_error_mode="global", **kwargs):  # torch.cuda.graph
        stream = stream or FakeStream(cuda, cuda.current)  # torch's own capture stream: made on the current device
        cuda.log.append(("capture", stream.index))
        if cuda.capture_error is not None:
            raise cuda.capture_error
        with stream_context(stream):
            yield
        if cuda.capture_warning:
            import warnings

            warnings.warn(cuda.capture_warning, UserWarning, stacklevel=2)

    def properties(index):
        return SimpleNamespace(name=f"Fake GPU {index}", uuid=f"fake-uuid-{index}", pci_bus_id=0x60 + index,
                               pci_domain_id=0, pci_device_id=0, major=9, minor=0)

    fakes = {"is_available": lambda: True, "device_count": lambda: 2, "current_device": lambda: cuda.current,
             "set_device": lambda d: setattr(cuda, "current", cuda.index(d)), "device": device_context,
             "Stream": lambda device=None, priority=0: FakeStream(cuda, cuda.index(device)),
             "current_stream": lambda device=None: cuda.streams[cuda.index(device)], "stream": stream_context,
             "Event": Event, "synchronize": lambda device=None: cuda.log.append(("sync", cuda.index(device))),
             "CUDAGraph": CUDAGraph, "graph": graph, "empty_cache": lambda: None,
             "get_device_name": lambda index=None: properties(cuda.index(index)).name,
             "get_device_properties": lambda index=None: properties(cuda.index(index))}
    for name, fake in fakes.items():
        monkeypatch.setattr(torch.cuda, name, fake)

    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):  # a tensor moved to a CUDA device becomes a FakeCudaTensor
        target = kwargs.get("device", next((a for a in args if isinstance(a, (str, torch.device))), None))
        if target is not None and torch.device(target).type == "cuda":
            return FakeCudaTensor(self, torch.device(target))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)


class FakeCudaTensor:
    """An input "on" a CUDA device: what the timer reads of it (device, shape) and nothing that computes."""

    is_cuda = True

    def __init__(self, cpu: torch.Tensor, device: torch.device):
        self.cpu, self.device, self.shape = cpu, device, cpu.shape

    def contiguous(self, memory_format=None) -> FakeCudaTensor:
        return self


class FakeNet(nn.Module):
    """A detector without parameters: each forward pass is one "launch" on the current device and stream, with
    whether this GPU's lock was held meanwhile."""

    def __init__(self, cuda: FakeCuda, lock_path=None):
        super().__init__()
        self.cuda, self.lock_path = cuda, lock_path

    def __deepcopy__(self, memo):  # copies share the one log
        return FakeNet(self.cuda, self.lock_path)

    def forward(self, x):
        self.cuda.launch()
        if self.lock_path is not None:
            self.cuda.log.append(("lock held", _held(self.lock_path)))
        return x, []  # (decoded, raw maps), as Detect in eval mode


def _held(path) -> bool:
    """Whether another open file description holds the flock on `path` now."""
    if not os.path.exists(path):
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


@pytest.fixture
def cuda(monkeypatch, tmp_path) -> FakeCuda:
    monkeypatch.setattr(nas.files, "host_lock_path", lambda name: tmp_path / f"{name}.lock")
    fake = FakeCuda()
    install(monkeypatch, fake)
    return fake


# --- where a measurement on cuda:1 acts -----------------------------------------------------------------------------

BACKENDS = [{"backend": "torch"}, {"backend": "cudagraph"}]


@pytest.mark.parametrize("backend", BACKENDS, ids=["torch", "cudagraph"])
def test_recording_synchronising_capture_and_launches_happen_on_the_inputs_device(cuda, backend):
    model, reference = FakeNet(cuda), FakeNet(cuda)
    lat = measure_latency(model, 64, 1, "cuda:1", LatencyConfig(warmup=1, iters=4, rounds=2, **backend),
                          reference=reference)
    records = [e for e in cuda.log if e[0] == "record"]
    syncs = [e for e in cuda.log if e[0] == "sync"]
    launches = [e for e in cuda.log if e[0] in ("launch", "replay")]
    assert len(records) == 2 * 2 * 4 and syncs and launches  # start and end event of 4 passes, model and reference
    assert {e[1] for e in records} == {1}, "events recorded on another GPU's stream"
    assert {e[1] for e in syncs} == {1}, "synchronised another GPU"
    assert {(e[1], e[2]) for e in launches} == {(1, 1)}, "passes launched with another GPU current"
    if backend["backend"] == "cudagraph":
        captures = [e for e in cuda.log if e[0] == "capture"]
        assert len(captures) == 2 and {e[1] for e in captures} == {1}, "captured on another GPU's stream"
        assert [e[0] for e in launches].count("replay") == 8  # every timed pass is a replay, none eager
    assert cuda.current == 0  # the process's current device is left as it was
    assert lat.device["index"] == 1 and lat.device["uuid"] == "GPU-fake-uuid-1"
    assert lat.device["pci_bus_id"] == "00000000:61:00.0" and lat.device["name"] == "Fake GPU 1"


def test_a_measurement_holds_its_gpus_lock_keyed_by_uuid(cuda, tmp_path):
    path = tmp_path / "gpu-GPU-fake-uuid-1.lock"
    lat = measure_latency(FakeNet(cuda, path), 64, 1, "cuda:1", LatencyConfig(warmup=1, iters=2, rounds=1))
    held = [e[1] for e in cuda.log if e[0] == "lock held"]
    assert len(held) == lat.warmup + 2 and all(held)  # warm-up and timed passes, every one under the lock
    assert not _held(path)  # released after
    assert lat.warmup == 2  # warmup=1 asked, but cudnn.benchmark autotunes on the first pass: never timed


@pytest.mark.parametrize(("error", "warning", "match"), [
    (RuntimeError("operation not permitted when stream is capturing\nmore"), None,
     r"CUDA graph capture failed on cuda:1 \(RuntimeError: operation not permitted when stream is capturing\)"),
    (None, "The CUDA Graph is empty. This usually means that the graph was attempted to be captured on wrong device "
           "or stream.", r"the CUDA graph captured on cuda:1 is empty"),
])
def test_a_capture_that_fails_or_comes_out_empty_is_an_error_not_an_eager_timing(cuda, error, warning, match):
    cuda.capture_error, cuda.capture_warning = error, warning
    with pytest.raises(CaptureFailed, match=match):
        measure_latency(FakeNet(cuda), 64, 1, "cuda:1", LatencyConfig(warmup=1, iters=2, rounds=1,
                                                                       backend="cudagraph"))
    assert not [e for e in cuda.log if e[0] == "record"]  # nothing was timed
    assert cuda.current == 0


# --- the per-GPU lock ----------------------------------------------------------------------------------------------


def _holder(lock_cm, entered: threading.Event, leave: threading.Event, order: list, name: str) -> threading.Thread:
    def run():
        with lock_cm():
            order.append(f"{name} in")
            entered.set()
            leave.wait(30)
            order.append(f"{name} out")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _wait_held(path, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not _held(path):
        assert time.monotonic() < deadline, f"{path} never got held"
        time.sleep(0.01)


def test_a_waiting_measurement_runs_before_the_next_training_step(tmp_path, monkeypatch):
    """Step 1 runs; a measurement arrives and waits; step 2 must wait for the measurement (the gate), not slip in
    first as a bare flock would let a training loop do."""
    monkeypatch.setattr(nas.files, "host_lock_path", lambda name: tmp_path / f"{name}.lock")
    lock, order = GpuLock("GPU-x"), []
    step1_in, step1_out = threading.Event(), threading.Event()
    t1 = _holder(lock.step, step1_in, step1_out, order, "step 1")
    assert step1_in.wait(30)
    timing_in, timing_out = threading.Event(), threading.Event()
    m = _holder(lock.timing, timing_in, timing_out, order, "timing")
    _wait_held(tmp_path / "gpu-GPU-x-gate.lock")  # the measurement holds the gate and waits for the step
    step2_in, step2_out = threading.Event(), threading.Event()
    step1_out.set()
    t1.join(30)
    assert timing_in.wait(30)
    t2 = _holder(lock.step, step2_in, step2_out, order, "step 2")
    timing_out.set()
    m.join(30)
    assert step2_in.wait(30)
    step2_out.set()
    t2.join(30)
    assert order == ["step 1 in", "step 1 out", "timing in", "timing out", "step 2 in", "step 2 out"]


def test_the_gpu_lock_is_a_no_op_off_cuda():
    lock = gpu_lock(torch.device("cpu"))
    with lock.timing(), lock.step(), lock.step():  # nothing is held: nesting cannot deadlock
        pass
    assert not isinstance(lock, GpuLock)


def test_fit_takes_the_lock_for_every_step_and_every_validation(tmp_path, monkeypatch):
    import nas.train
    from nas.data import index_split, load_data_config
    from nas.synth import SynthConfig, make_synthetic
    from nas.train import ProxyConfig, fit
    from space.builder import build_model
    from tests.conftest import tiny_yaml

    monkeypatch.setenv("REPNAS_CACHE_DIR", str(tmp_path / "cache"))
    data = make_synthetic(tmp_path / "shapes", SynthConfig(images=24, classes=3, imgsz=64, seed=3))
    steps, asked = [], []

    class Recording:
        @contextmanager
        def step(self):
            steps.append("in")
            yield
            steps.append("out")

    monkeypatch.setattr(nas.train, "gpu_lock", lambda device: asked.append(device) or Recording())
    result = fit(build_model(tiny_yaml(nc=3)), data, ProxyConfig(epochs=2, imgsz=64, batch=8, val_every=1,
                                                                 device="cpu", quiet=True))
    cfg = load_data_config(data)
    images = len(index_split(cfg.train, cfg.nc, "train", str(cfg.source)).records)
    assert asked == [torch.device("cpu")] and len(result.history) == 2
    assert steps == ["in", "out"] * (2 * -(-images // 8) + 2)  # every training step (2 epochs), both validations


# --- worker processes: each sees only its GPU ----------------------------------------------------------------------


def test_a_devices_worker_sees_only_its_gpu_and_a_cpu_worker_none(monkeypatch):
    from nas.study.settings import StudyError, StudySettings
    from nas.study.workers import cuda_visible, worker_env, worker_gpu

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    settings = StudySettings(name="s", device="cpu")
    assert [worker_gpu(settings, ["1", "0"], i) for i in range(3)] == ["1", "0", "1"]
    assert worker_gpu(settings, [], 0) is None
    assert worker_env("1")["CUDA_VISIBLE_DEVICES"] == "1" and worker_env(None)["CUDA_VISIBLE_DEVICES"] == ""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,GPU-abc")  # this process already sees two GPUs of the machine
    assert cuda_visible("0") == "3" and cuda_visible("1") == "GPU-abc"
    with pytest.raises(StudyError, match=r"--devices 2: this process sees 2 GPU\(s\) \(CUDA_VISIBLE_DEVICES="):
        cuda_visible("2")


def test_run_workers_starts_each_worker_with_its_gpu_as_cuda0(settings, monkeypatch):
    import json

    import nas.study.workers
    from nas.study import prepare_study

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    settings, _ = prepare_study(settings)
    started = []

    class Done:  # a worker that exits at once, having done nothing
        stdout = iter(())

        def __init__(self, command, env, **kwargs):
            started.append((json.loads(command[-1])["device"], env["CUDA_VISIBLE_DEVICES"]))

        def wait(self):
            return 0

    monkeypatch.setattr(nas.study.workers.subprocess, "Popen", Done)
    nas.study.workers.run_workers(settings, 3, ["1", "0"], 0, lambda line: None)
    assert started == [("cuda:0", "5"), ("cuda:0", "4"), ("cuda:0", "5")]
    started.clear()
    nas.study.workers.run_workers(settings, 2, [], 0, lambda line: None)  # the study's device is the CPU
    assert started == [(None, ""), (None, "")]


@pytest.mark.slow  # a process of its own: ~10 s on a busy 2-core machine
def test_the_baseline_is_timed_in_a_process_set_up_as_worker_0(settings):
    from nas.study import prepare_study
    from nas.study.workers import measure_baseline_in_worker

    settings, _ = prepare_study(settings)
    frozen, tries, warning = measure_baseline_in_worker(None, settings, gpu=None, threads=1)
    assert frozen.device["type"] == "cpu" and frozen.device["threads"] == 1 and frozen.backend == "torch"
    assert frozen in tries and frozen.median_ms > 0 and frozen.latency_ratio is not None
    assert warning is None or "noisy" in warning
