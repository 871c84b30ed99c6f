"""Fixtures of the study tests: a tiny space (widths 8|16), 16 synthetic images at 64 px, one epoch per trial."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nas.study import StudySettings
from nas.synth import SynthConfig, make_synthetic

TINY_SPACE = {
    "imgsz": 64, "nc": 2,
    "stages": {name: {"depth": [1], "width": [8, 16], "se": False} for name in ("P1", "P2", "P3", "P4", "P5")},
    "head": {"width": [0.25], "depth": [1]},
}
BASELINE = {f"{name}_{key}": value for name in ("P1", "P2", "P3", "P4", "P5")
            for key, value in (("depth", 1), ("width", 8), ("se", False))} | {"head_width": 0.25, "head_depth": 1}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("study-assets")
    data = make_synthetic(root / "data", SynthConfig(images=16, classes=2, imgsz=64))
    other = make_synthetic(root / "other", SynthConfig(images=10, classes=2, imgsz=64, seed=1))
    space = root / "space.yaml"
    space.write_text(yaml.safe_dump(TINY_SPACE))
    baseline = root / "baseline.yaml"
    baseline.write_text(yaml.safe_dump(BASELINE))
    return {"root": root, "data": data, "other": other, "space": space, "baseline": baseline}


@pytest.fixture
def settings(assets, tmp_path, monkeypatch) -> StudySettings:
    monkeypatch.setenv("REPNAS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return StudySettings(
        name="tiny", data=str(assets["data"]), space=str(assets["space"]), trials=3, seed=0, sampler="random",
        proxy={"epochs": 1, "imgsz": 64, "batch": 8, "cache_images": False}, imgsz=64, device="cpu",
        latency={"warmup": 0, "iters": 2, "rounds": 1}, baseline=str(assets["baseline"]), max_failures=3,
    )


