"""Writes the studies in old_studies/ with the repnas of the day (run once, from the repository root; kept as a record).

The committed studies were made by commit fde5c52 (before nas/study.py became the nas/study/ package), so the tests
in tests/nas/study/test_compat.py show that studies written by that version keep loading, showing, exporting and
resuming. Every path a study stores lies under ROOT (a placeholder folder); the tests rebuild the same assets
(deterministic synthetic data, the tiny space and baseline) under their own folder and rewrite ROOT in a copy.

    python tests/nas/study/data/make_old_studies.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path("/tmp/repnas-old-studies-root")
OUT = Path(__file__).resolve().parent / "old_studies"


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
    from tests.nas.study.data.old_assets import make_assets

    shutil.rmtree(ROOT, ignore_errors=True)
    assets = make_assets(ROOT)
    env = os.environ | {"REPNAS_CACHE_DIR": str(ROOT / "cache"), "OMP_NUM_THREADS": "1"}
    common = ["--results", str(ROOT / "results"), "--space", str(assets["space"]), "--baseline",
              str(assets["baseline"]), "--epochs", "1", "--workers", "1", "--quiet", "--device", "cpu",
              "--sampler", "random"]
    data = ["--data", str(assets["data"]), "--imgsz", "64", "--latency-imgsz", "64", "--batch", "8"]
    runs = {"demo": ["--trials", "2"],
            "data": ["--trials", "3", *data],
            "prune": ["--trials", "2", *data, "--prune-to", "0.5", "--prune-finetune-epochs", "1"]}
    for name, extra in runs.items():
        subprocess.run(["repnas", "search", "--study", name, *common, *extra], check=True, env=env)
    shutil.rmtree(OUT, ignore_errors=True)
    shutil.copytree(ROOT / "results", OUT)


if __name__ == "__main__":
    main()
