import json

import pytest
import torch

from nas.cli import main
from nas.device import device_label
from nas.latency import Latency, LatencyConfig, measure_latency, noise_warning
from pruning.reparam import fuse_model
from space.builder import build_model
from tests.conftest import tiny_yaml

FAST = LatencyConfig(warmup=1, iters=6, rounds=3)


def test_measure_latency_reports_statistics_and_the_cpu():
    model = fuse_model(build_model(tiny_yaml()))
    lat = measure_latency(model, 64, batch=2, device="cpu", cfg=FAST)
    assert isinstance(lat, Latency) and lat.iterations == 6
    assert 0 < lat.median_ms <= lat.p90_ms and lat.mean_ms > 0 and lat.std_ms >= 0
    assert lat.imgsz == (64, 64) and lat.batch == 2 and lat.dtype == "float32"
    assert lat.device["type"] == "cpu" and lat.device["threads"] >= 1 and lat.device["name"]
    assert lat.reference_median_ms is None and lat.latency_ratio is None


def test_reference_is_timed_interleaved_and_gives_a_ratio():
    model = fuse_model(build_model(tiny_yaml()))
    reference = fuse_model(build_model(tiny_yaml()))
    lat = measure_latency(model, (64, 96), device="cpu", cfg=FAST, reference=reference)
    assert lat.reference_median_ms > 0
    assert lat.latency_ratio == pytest.approx(lat.median_ms / lat.reference_median_ms)
    assert lat.imgsz == (64, 96)


def test_the_caller_model_and_thread_setting_are_left_alone():
    model = build_model(tiny_yaml()).train()
    threads = torch.get_num_threads()
    measure_latency(model, 64, device="cpu", cfg=LatencyConfig(warmup=0, iters=2, rounds=1, threads=2))
    assert model.training and next(model.parameters()).dtype == torch.float32
    assert torch.get_num_threads() == threads


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="iters >= rounds"):
        LatencyConfig(iters=2, rounds=5)
    with pytest.raises(ValueError, match="threads=0"):
        LatencyConfig(threads=0)


def test_cli_latency_prints_a_table(tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps(tiny_yaml()))
    assert main(["latency", str(path), "--imgsz", "64", "--device", "cpu", "--iters", "3",
                 "--reference", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["form", "imgsz", "batch"]
    assert out[1].split()[:4] == ["fused", "64x64", "1", "float32"]
    assert "measured interleaved" in out[2] and out[3].startswith("device: ")
    assert main(["latency", str(path), "--no-fused", "--imgsz", "64", "--device", "cpu", "--iters", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("as built")


def _latency(median_ms: float, p90_ms: float) -> Latency:
    return Latency(median_ms=median_ms, p90_ms=p90_ms, mean_ms=median_ms, std_ms=0.0, iterations=30, imgsz=(64, 64),
                   batch=1, dtype="float32", device={"type": "cpu", "name": "test", "threads": 1, "torch": "x"})


def test_a_noisy_measurement_is_told_by_its_p90_over_median():
    quiet, noisy = _latency(138.0, 150.0), _latency(314.65, 548.74)  # the latter: the walk's busy baseline
    assert not quiet.noisy and quiet.spread == pytest.approx(150 / 138) and noise_warning(quiet) is None
    assert noisy.noisy and noise_warning(noisy).startswith("p90/median 1.74 > 1.3: this machine was busy")
    assert "spread" not in noisy.to_dict()  # the stored record keeps its fields only


def test_device_label_counts_threads_in_words():
    assert device_label({"type": "cpu", "name": "AMD EPYC", "threads": 1}) == "CPU AMD EPYC, 1 thread"
    assert device_label({"type": "cpu", "name": "AMD EPYC", "threads": 2}) == "CPU AMD EPYC, 2 threads"
    assert device_label({"type": "cuda", "name": "NVIDIA H200"}) == "NVIDIA H200"


def test_cli_latency_warns_when_its_own_p90_over_median_shows_a_busy_machine(tmp_path, capsys, monkeypatch):
    import nas.latency

    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps(tiny_yaml()))
    monkeypatch.setattr(nas.latency, "measure_latency", lambda *a, **k: _latency(100.0, 160.0))
    assert main(["latency", str(path), "--imgsz", "64", "--device", "cpu", "--iters", "3"]) == 0
    out, err = capsys.readouterr()
    assert "device: CPU test, 1 thread; torch x" in out
    assert err.strip() == ("warning: p90/median 1.60 > 1.3: this machine was busy while timing (other processes "
                           "compete for its cores), so these figures are inflated and vary from run to run; time again "
                           "on a quiet machine")
    monkeypatch.setattr(nas.latency, "measure_latency", lambda *a, **k: _latency(100.0, 110.0))
    assert main(["latency", str(path), "--imgsz", "64", "--device", "cpu", "--iters", "3"]) == 0
    assert capsys.readouterr().err == ""


def test_cli_latency_takes_the_backend_by_the_one_name_search_uses(tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps(tiny_yaml()))
    assert main(["latency", str(path), "--imgsz", "64", "--device", "cpu", "--iters", "2", "--threads", "1",
                 "--latency-backend", "onnxruntime"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("; backend onnxruntime")
    assert main(["latency", str(path), "--imgsz", "64", "--device", "cpu", "--latency-backend", "cudagraph"]) == 2
    assert main(["latency", str(path), "--imgsz", "64", "--device", "cpu", "--cuda-graph"]) == 2  # the old flag
    refused = ("repnas latency: error: latency backend 'cudagraph' times on cuda, not on cpu; use --latency-backend "
               "torch, onnxruntime or another --device")
    assert capsys.readouterr().err.splitlines() == [
        refused, "--cuda-graph is deprecated for `repnas latency`; use --latency-backend cudagraph", refused]
