"""Every kind of file and folder repnas creates follows the user's umask (#13 item 8): under umask 0o022 a teammate
can read a shared study folder (files 0o644, folders 0o755); under 0o077 nobody else can (0o600, 0o700).

One driver process per umask runs the real commands in a fresh folder: `data synth` and the default synthetic set
(its folder is made by mkdtemp, 0o700 whatever the umask), a search whose trial 1 fails (traceback.txt), a torn
journal record moved aside by `resume`, `confirm`, `export`, `export-model --onnx`, `prune`, `train` and
`space sample`, with the label cache in that folder. Each kind of file is then checked, and every path there.
The lock file's own rule (0o666 less the umask, so umask 0o002 gives the group write access, which flock needs) is in
tests/nas/test_files.py.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two driver processes of ~40 s each on one CPU thread

REPO = Path(__file__).resolve().parents[2]
MASKS = {0o022: (0o644, 0o755), 0o077: (0o600, 0o700)}

DRIVER = r"""
import os, sys
from pathlib import Path

mask, work = int(sys.argv[1], 8), Path(sys.argv[2])
os.umask(mask)  # before anything is created: the user's umask
work.mkdir()
os.chdir(work)
os.environ["REPNAS_CACHE_DIR"] = str(work / "cache")

import nas.study.run
from nas.cli import main
from nas.synth import SynthConfig, default_dataset
from tests.studyfixtures import make_tiny_assets

real_run_trial = nas.study.run.run_trial

def run_trial(trial, *args, **kwargs):  # trial 1 fails: its traceback.txt is written by the product
    if trial.number == 1:
        raise RuntimeError("injected by test_umask")
    return real_run_trial(trial, *args, **kwargs)

nas.study.run.run_trial = run_trial

def run(*argv):
    code = main(list(argv))
    assert code == 0, (argv, code)

assets = make_tiny_assets(work / "assets")
run("data", "synth", "synth", "--images", "10", "--classes", "2", "--imgsz", "64")
default_dataset(SynthConfig(images=10, classes=2, imgsz=64))
study = ["--data", str(assets["data"]), "--space", str(assets["space"]), "--baseline", str(assets["baseline"]),
         "--epochs", "1", "--imgsz", "64", "--latency-imgsz", "64", "--batch", "8", "--device", "cpu",
         "--sampler", "random", "--quiet"]
run("search", "--study", "tiny", "--trials", "2", *study)
with open(work / "results" / "tiny" / "study.log", "ab") as f:  # a record cut short by a crash
    f.write(b'{"op_code": 4, "worker_id": "torn')
run("resume", "tiny", "--quiet")
run("confirm", "tiny", "--trials", "2", "--epochs", "1", "--quiet")
run("export", "tiny", "--out", "exported")
try:
    import onnx, onnxruntime  # noqa: F401
except ImportError:
    pass
else:
    run("export-model", "tiny:2", "--onnx", "onnx/model.onnx", "--imgsz", "64")
run("prune", "tiny:2", "--target-flops", "60%", "--importance", "l2", "--no-eval", "--imgsz", "64",
    "--device", "cpu", "--out", "pruned", "--quiet")
run("train", "results/tiny/trials/2/model.yaml", "--data", str(assets["data"]), "--epochs", "1", "--imgsz", "64",
    "--batch", "8", "--device", "cpu", "--out", "trained", "--quiet")
run("space", "sample", "--n", "1", "--out", "sampled")
"""

# each kind of file repnas creates: the glob patterns (under the driver's folder) that must match it
KINDS = {
    "trial files (atomic writer)": ["results/tiny/trials/0/" + name for name in
                                    ("weights.pt", "fused.pt", "metrics.json", "epochs.csv", "model.yaml",
                                     "trial.log")],
    "traceback.txt of a failed trial": ["results/tiny/trials/1/traceback.txt"],
    "Pareto files": [f"results/tiny/pareto.{ext}" for ext in ("md", "csv", "html", "json", "png")]
    + ["exported/pareto.csv"],
    "journal study.log": ["results/tiny/study.log"],
    "torn record study.log.torn-*": ["results/tiny/study.log.torn-*"],
    "lock files": ["results/tiny/study.log.flock", "results/tiny/.*.lock"],
    "label cache": ["cache/labels/*.json"],
    "synthetic dataset (data synth)": ["synth/data.yaml", "synth/images/train/*.jpg", "synth/labels/val/*.txt"],
    "default synthetic dataset (cache)": ["cache/datasets/*/data.yaml", "cache/datasets/*/images/train/*.jpg"],
    "confirm run files": ["results/tiny/trials/0/confirm/*/weights.pt", "results/tiny/trials/2/confirm/*/metrics.json",
                          "results/tiny/trials/2/confirm/*/epochs.csv"],
    "ONNX": ["onnx/model.onnx"],
    "pruned model (channels.json, prune.json)": ["pruned/channels.json", "pruned/weights.pt", "pruned/prune.json"],
    "repnas train outputs": ["trained/" + name for name in ("weights.pt", "model.yaml", "epochs.csv", "metrics.json")],
    "sampled model YAMLs": ["sampled/arch_000.yaml"],
}
FOLDERS = ["results", "results/tiny", "results/tiny/trials/0", "results/tiny/trials/2/confirm/*", "cache",
           "cache/labels", "cache/datasets/*", "cache/datasets/*/images/train", "synth/labels/train", "pruned",
           "trained", "sampled", "exported", "onnx"]


@pytest.fixture(scope="module", params=sorted(MASKS), ids=lambda m: f"umask-{m:04o}")
def created(request, tmp_path_factory) -> tuple[int, Path]:
    """(umask, the folder the driver ran every command in under that umask)."""
    mask = request.param
    work = tmp_path_factory.mktemp("umask") / "work"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", DRIVER, f"{mask:o}", str(work)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return mask, work


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _matches(work: Path, patterns: list[str]) -> list[Path]:
    found = []
    for pattern in patterns:
        paths = sorted(work.glob(pattern))
        assert paths, f"{pattern}: nothing created"
        found += paths
    return found


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_kind_of_file_follows_the_umask(created, kind):
    mask, work = created
    if kind == "ONNX":
        pytest.importorskip("onnxruntime", reason="ONNX export needs the onnx extra: pip install -e '.[onnx]'")
    want = MASKS[mask][0]
    modes = {str(p.relative_to(work)): oct(_mode(p)) for p in _matches(work, KINDS[kind])}
    assert modes == dict.fromkeys(modes, oct(want))


def test_folders_and_every_other_path_follow_the_umask(created):
    mask, work = created
    file_mode, folder_mode = MASKS[mask]
    assert {str(p.relative_to(work)): oct(_mode(p)) for p in _matches(work, FOLDERS)} == {
        str(p.relative_to(work)): oct(folder_mode) for p in _matches(work, FOLDERS)}
    wrong = {str(p.relative_to(work)): oct(_mode(p)) for p in work.rglob("*")
             if _mode(p) != (folder_mode if p.is_dir() else file_mode)}
    assert wrong == {}
