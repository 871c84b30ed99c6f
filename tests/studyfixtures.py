"""The tiny study every study test runs: a space of widths 8|16 at 64 px, its baseline, a few synthetic images.

`make_tiny_assets(root)` writes the files (with the defaults, exactly those tests/nas/study/data/old_assets.py
writes, which made the committed old studies); `tiny_settings(assets, **changes)` is the StudySettings of a fast
study on them (one proxy epoch at 64 px, latency timed with 2 iterations on the CPU). The pytest fixtures `assets`
and `settings` (tests/nas/conftest.py) are built from these two.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

from nas.study import StudySettings, storage_for
from tests.nas.study.data.old_assets import BASELINE, TINY_SPACE, make_assets

__all__ = ["BASELINE", "TINY_SPACE", "make_tiny_assets", "tiny_settings"]


def make_tiny_assets(root: Path, *, images: int = 16, space: dict | None = None,
                     other: int | None = None) -> dict[str, Path]:
    """Write the tiny study's files under `root`; return {"root", "data", "space", "baseline"} (+ "other").

    `images`: synthetic images (2 classes, 64 px, seed 0) in root/data; `space`: the space YAML's content (default
    TINY_SPACE); the baseline is BASELINE. `other`: also a second dataset of that many images (seed 1), for tests
    that change the study's data.
    """
    from nas.synth import SynthConfig, make_synthetic

    if images == 16 and space is None:
        assets = make_assets(root)
    else:
        root.mkdir(parents=True, exist_ok=True)
        (root / "space.yaml").write_text(yaml.safe_dump(space or TINY_SPACE))
        (root / "baseline.yaml").write_text(yaml.safe_dump(BASELINE))
        assets = {"data": make_synthetic(root / "data", SynthConfig(images=images, classes=2, imgsz=64)),
                  "space": root / "space.yaml", "baseline": root / "baseline.yaml"}
    if other is not None:
        assets["other"] = make_synthetic(root / "other", SynthConfig(images=other, classes=2, imgsz=64, seed=1))
    return {"root": root, **assets}


def tiny_settings(assets: dict[str, Path], **changes) -> StudySettings:
    """Study "tiny" on `assets`: 3 trials, random sampler, 1 epoch at 64 px batch 8 (every proxy key a CPU's defaults
    would fill given, so a new study says nothing of them), latency at 64 px on the CPU
    (no warmup, 2 iterations, 1 round), at most 3 failures; `changes` replace any field."""
    settings = StudySettings(
        name="tiny", data=str(assets["data"]), space=str(assets["space"]), trials=3, seed=0, sampler="random",
        proxy={"epochs": 1, "imgsz": 64, "batch": 8, "cache_images": False, "val_every": 5}, latency_imgsz=64,
        device="cpu",
        latency={"warmup": 0, "iters": 2, "rounds": 1}, baseline=str(assets["baseline"]), max_failures=3,
    )
    return replace(settings, **changes)


def sha256_of(path: Path) -> str:
    """The sha256 of a file's bytes, as a trial's FILES_KEY records it."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load(settings: StudySettings) -> optuna.Study:
    """The study `settings` name, from its storage."""
    return optuna.load_study(study_name=settings.name, storage=storage_for(settings))


def files_intact(study: optuna.Study, root: Path) -> None:
    """Assert every COMPLETE trial's recorded files under `root` (the trials root) match their sha256."""
    for t in study.trials:
        if t.state == TrialState.COMPLETE:
            for entry in t.user_attrs["files"].values():
                assert sha256_of(root / entry["path"]) == entry["sha256"], (t.number, entry)


def searched_tiny_study(root: Path, trials: int) -> dict[str, Path]:
    """Run a finished tiny study of `trials` trials under `root` (results in root/results, run from `root`); return
    its assets. Module-scoped fixtures make it once; tests work on `copy_searched` copies."""
    import os

    from nas.study import run_search

    assets = make_tiny_assets(root / "assets")
    old = Path.cwd()
    os.chdir(root)
    try:
        run_search(tiny_settings(assets, trials=trials, results=str(root / "results")))
    finally:
        os.chdir(old)
    return assets


def copy_searched(root: Path, assets: dict[str, Path], trials: int, tmp_path: Path, monkeypatch) -> StudySettings:
    """A private copy of `searched_tiny_study`'s results in tmp_path (the working folder, with its own cache);
    return its settings."""
    import shutil

    shutil.copytree(root / "results", tmp_path / "results")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REPNAS_CACHE_DIR", str(tmp_path / "cache"))
    return tiny_settings(assets, trials=trials, results=str(tmp_path / "results"))
