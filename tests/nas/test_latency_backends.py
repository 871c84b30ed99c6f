"""Latency backends (nas/latency.py) and the study setting that picks one (nas/study/settings.py): `torch` and
`onnxruntime` time a tiny model on the CPU, both the same decoded graph; `cudagraph` needs CUDA (skipped here with
its reason, refused on a CPU with one line); rounds alternate which model goes first; autotuning never goes untimed
into a measurement. A study stores its backend resolved (CUDA: cudagraph, CPU: torch), refuses another one on
resume, reads a study stored without one as torch, and fails a trial whose graph capture fails."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import numpy as np
import optuna
import pytest
import torch

import nas.study
from nas.cli import main
from nas.latency import (
    AUTOTUNE_WARMUP,
    BACKENDS,
    CaptureFailed,
    LatencyBackendError,
    LatencyConfig,
    LatencySession,
    OnnxRuntimeBackend,
    Runner,
    deploy_copy,
    measure_latency,
    warmup_passes,
)
from nas.study import SearchStopped, StudyError, StudySettings, prepare_study, run_search
from nas.study.settings import SETTINGS_FORMAT, latency_config, resolved_latency, upgrade_stored
from pruning.reparam import fuse_model
from space.builder import build_model
from tests.conftest import tiny_yaml

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def fused():
    torch.manual_seed(0)
    return fuse_model(build_model(tiny_yaml())).eval()


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_a_cpu_backend_times_a_tiny_model_against_a_reference(fused, backend):
    lat = measure_latency(fused, 64, 2, "cpu", LatencyConfig(warmup=1, iters=4, rounds=2, threads=1, backend=backend),
                          reference=fused)
    assert lat.backend == backend and lat.iterations == 4 and lat.batch == 2 and lat.dtype == "float32"
    assert lat.median_ms > 0 and lat.latency_ratio == pytest.approx(lat.median_ms / lat.reference_median_ms)
    assert lat.device["type"] == "cpu" and lat.device["threads"] == 1 and lat.warmup == 1
    if backend == "onnxruntime":
        import onnxruntime

        assert lat.device["onnxruntime"] == onnxruntime.__version__
    for when in ("before", "after"):  # the load average around the timed passes, no GPU state on a CPU
        state = lat.conditions[when]
        assert len(state["loadavg"]) == 3 and "gpu" not in state


def test_every_backend_times_the_decoded_output_without_nms(fused):
    cfg = LatencyConfig(warmup=0, iters=1, rounds=1, threads=1)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = fused(x)[0]  # (1, N, 5 + nc): the detector's decoded rows
        eager = deploy_copy(fused, x, cfg)(x)
    runner = OnnxRuntimeBackend().prepare(fused, x, cfg)
    onnx = runner.session.run(None, runner.feed)[0]
    assert eager.shape == want.shape == onnx.shape == (1, 3 * (8 * 8 + 4 * 4 + 2 * 2), 5 + 3)
    assert torch.equal(eager, want)
    np.testing.assert_allclose(onnx, want.numpy(), rtol=1e-4, atol=1e-3)  # box columns are pixels (up to 64)


@pytest.mark.gpu
def test_cudagraph_times_replays_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("cudagraph captures and replays a CUDA graph: no CUDA device on this machine")
    model = fuse_model(build_model(tiny_yaml())).eval()
    lat = measure_latency(model, 64, 1, "cuda", LatencyConfig(warmup=1, iters=4, rounds=2, backend="cudagraph"),
                          reference=model)
    assert lat.backend == "cudagraph" and lat.median_ms > 0 and lat.warmup == AUTOTUNE_WARMUP
    assert lat.device["uuid"].startswith(("GPU-", "MIG-")) and lat.device["pci_bus_id"]


def test_a_backend_that_cannot_run_here_is_one_line(fused, monkeypatch):
    with pytest.raises(LatencyBackendError, match=r"^latency backend 'cudagraph' times on cuda, not on cpu; use "
                                                  r"--latency-backend torch, onnxruntime or another --device$"):
        measure_latency(fused, 64, 1, "cpu", LatencyConfig(backend="cudagraph"))
    with pytest.raises(LatencyBackendError, match="'onnxruntime' times on cpu, not on cuda:0"):
        BACKENDS["onnxruntime"].check(torch.device("cuda:0"))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the onnx extra were not installed
    with pytest.raises(LatencyBackendError) as err:
        measure_latency(fused, 64, 1, "cpu", LatencyConfig(backend="onnxruntime"))
    assert str(err.value) == ("latency backend 'onnxruntime' needs onnx and onnxruntime (onnxruntime is not "
                              'installed): pip install -e ".[onnx]"')
    with pytest.raises(ValueError, match=r"backend='tensorrt' is unknown; use one of torch, cudagraph, onnxruntime"):
        LatencyConfig(backend="tensorrt")


def test_rounds_alternate_which_model_runs_first():
    order = []

    class Named(Runner):
        def __init__(self, name):
            self.name = name

        def run(self, n):
            order.append((self.name, n))
            return [1.0 if self.name == "model" else 2.0] * n

    with LatencySession(64, 1, "cpu", LatencyConfig(iters=8, rounds=4)) as session:
        lat = session.measure(Named("model"), Named("reference"))
    assert order == [("model", 2), ("reference", 2), ("reference", 2), ("model", 2),
                     ("model", 2), ("reference", 2), ("reference", 2), ("model", 2)]
    assert lat.latency_ratio == 0.5 and lat.iterations == 8


def test_warmup_is_never_zero_with_autotuning_on():
    cuda = torch.device("cuda")
    assert warmup_passes(LatencyConfig(warmup=0), cuda) == AUTOTUNE_WARMUP
    assert warmup_passes(LatencyConfig(warmup=5), cuda) == 5
    assert warmup_passes(LatencyConfig(warmup=0, cudnn_benchmark=False), cuda) == 0  # nothing to autotune
    assert warmup_passes(LatencyConfig(warmup=0), CPU) == 0  # cudnn.benchmark is a CUDA setting


# --- the study setting ---------------------------------------------------------------------------------------------


def test_a_new_study_resolves_its_backend_for_its_device():
    assert resolved_latency(None, torch.device("cuda"))["backend"] == "cudagraph"
    assert resolved_latency(None, CPU)["backend"] == "torch"  # the CPU default stays eager (see RESULTS.md)
    assert resolved_latency({"backend": "onnxruntime"}, CPU)["backend"] == "onnxruntime"
    assert latency_config(StudySettings(name="new", latency={"warmup": 1}), torch.device("cuda")).backend == "cudagraph"


def test_a_study_stored_without_a_backend_reads_as_torch():
    latency = {"warmup": 3, "iters": 30, "rounds": 5, "half": True, "channels_last": True, "cudnn_benchmark": True,
               "cuda_graph": False, "threads": 2, "device_type": "cpu"}  # format 2, as stored before backends
    upgraded = upgrade_stored({"format": 2, "latency": latency, "device": "cpu"})
    assert upgraded["format"] == SETTINGS_FORMAT == 3
    assert upgraded["latency"] == {k: v for k, v in latency.items() if k != "cuda_graph"} | {"backend": "torch"}
    assert latency_config(StudySettings(name="old", latency=latency), CPU).backend == "torch"
    graphs = upgrade_stored({"format": 2, "latency": latency | {"cuda_graph": True, "device_type": "cuda"}})
    assert graphs["latency"]["backend"] == "cudagraph"  # it captured graphs: what the backend now names


def test_the_backend_is_stored_frozen_and_times_the_baseline(settings, capsys):
    settings, study = prepare_study(replace(settings, latency=settings.latency | {"backend": "onnxruntime"}))
    stored = json.loads(study.user_attrs["settings"])
    assert stored["format"] == 3 and stored["latency"]["backend"] == "onnxruntime"
    assert study.user_attrs["baseline_latency"]["backend"] == "onnxruntime"
    # resumed without the option: the stored backend; with another: refused naming the field, nothing written
    assert nas.study.merge_settings(StudySettings(name="tiny"), stored).latency["backend"] == "onnxruntime"
    assert main(["search", "--study", "tiny", "--latency-backend", "torch", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "was created with other settings; resuming with latency: {" in err
    assert "'backend': 'onnxruntime'" in err and "'backend': 'torch'" in err and "--force" in err
    assert len(optuna.load_study(study_name="tiny", storage=nas.study.storage_for(settings)).trials) == 1


def test_a_backend_the_study_device_cannot_run_is_refused_before_anything_is_written(settings):
    with pytest.raises(StudyError, match=r"study 'tiny': latency backend 'cudagraph' times on cuda, not on cpu"):
        run_search(replace(settings, latency=settings.latency | {"backend": "cudagraph"}))
    assert not (settings.folder / "study.log").exists()


def test_a_trial_whose_capture_fails_fails_with_the_reason(settings, monkeypatch):
    settings, _ = prepare_study(replace(settings, trials=1))

    def capture_fails(*args, **kwargs):
        raise CaptureFailed("CUDA graph capture failed on cuda:0 (RuntimeError: operation not permitted when stream "
                            "is capturing); the network is not timed eagerly instead")

    monkeypatch.setattr(nas.study.trial, "measure_latency", capture_fails)
    with pytest.raises(SearchStopped):
        run_search(replace(settings, max_failures=1))
    (trial,) = optuna.load_study(study_name="tiny", storage=nas.study.storage_for(settings)).trials
    assert trial.state == optuna.trial.TrialState.FAIL and "latency_ms" not in trial.user_attrs
    assert trial.user_attrs["fail_reason"].startswith("CaptureFailed: CUDA graph capture failed on cuda:0")
