"""The assets the committed old studies name: deterministic, so any folder can hold an identical copy."""

from __future__ import annotations

from pathlib import Path

import yaml

TINY_SPACE = {
    "imgsz": 64, "nc": 2,
    "stages": {name: {"depth": [1], "width": [8, 16], "se": False} for name in ("P1", "P2", "P3", "P4", "P5")},
    "head": {"width": [0.25], "depth": [1]},
}
BASELINE = {f"{name}_{key}": value for name in ("P1", "P2", "P3", "P4", "P5")
            for key, value in (("depth", 1), ("width", 8), ("se", False))} | {"head_width": 0.25, "head_depth": 1}


def make_assets(root: Path) -> dict[str, Path]:
    from nas.synth import SynthConfig, make_synthetic

    root.mkdir(parents=True, exist_ok=True)
    data = make_synthetic(root / "data", SynthConfig(images=16, classes=2, imgsz=64))
    space = root / "space.yaml"
    space.write_text(yaml.safe_dump(TINY_SPACE))
    baseline = root / "baseline.yaml"
    baseline.write_text(yaml.safe_dump(BASELINE))
    return {"data": data, "space": space, "baseline": baseline}
