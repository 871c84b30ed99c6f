import json

import pytest
import torch

from nas.cli import main
from nas.latency import Latency, LatencyConfig, measure_latency
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
