"""The YOLOv5 bridge against the real YOLOv5 code: PyPI yolov5 7.0.14 with the design document's RepVGG block, in its
own venv (tests/yolov5env/build.sh; REPNAS_YOLOV5_PYTHON). A small model is trained by repnas on raccoon (a copy of
../shared/data/raccoon), exported as a bundle, converted by the bridge and used by YOLOv5's val.py, detect.py,
export.py and train.py, then converted back.

The environment is torch >= 2.6 here, where YOLOv5's loaders refuse pickled checkpoints: every YOLOv5 command runs
with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 (our own files; a test shows the refusal without it). With torch < 2.6 the
same files load as they are. Measured figures are printed at the end of the run (conftest.FIGURES).
"""

from __future__ import annotations

import json
import os
import pickletools
import re
import shutil
import subprocess
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from nas.data import load_data_config
from nas.evaluate import evaluate, ground_truth, val_dataset
from nas.metrics import coco_map, non_max_suppression
from nas.source import load_source, read_state
from nas.yolov5 import export_bundle
from space.builder import build_model
from space.searchspace import Arch, Stage, load_space
from tests.conftest import SHARED, randomize_batchnorm, tiny_yaml
from tests.nas.test_yolov5_bridge import prune_first_channels
from tests.yolov5.conftest import FIGURES

pytestmark = [pytest.mark.yolov5, pytest.mark.slow]

ARCH = Arch((Stage(1, 32), Stage(1, 48), Stage(2, 96), Stage(4, 192), Stage(1, 384)), 0.5, 1)  # "cheap4"
EPOCHS, IMGSZ = 10, 160  # raccoon: mAP50 ~0.4 after 10-12 epochs of this model
TOLERANCE = 1e-4  # relative output difference (the bar)
BOX_TOLERANCE = 1e-3  # pixels, after NMS
VAL_NMS = {"conf": 0.001, "iou": 0.6, "max_det": 300, "multi_label": True}  # val.py's (and repnas val's)
DETECT_NMS = {"conf": 0.25, "iou": 0.45, "max_det": 1000, "multi_label": False}  # detect.py's
SIDE = Path(__file__).with_name("yolov5_side.py")


# ---------------------------------------------------------------------------------------------------------------
# Running YOLOv5


def _env(work: Path) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", YOLOV5_CONFIG_DIR=str(work / "config"),
                YOLO_CONFIG_DIR=str(work / "config"), TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", PYTHONWARNINGS="ignore",
                MPLBACKEND="Agg")


def _run(python: Path, args: list, work: Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(python), *map(str, args)], capture_output=True, text=True, env=_env(work),
                          cwd=cwd or work, timeout=1200)
    if proc.returncode != 0:
        command = " ".join(map(str, args))
        pytest.fail(f"{command} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _result(proc: subprocess.CompletedProcess) -> dict:
    line = next(line for line in reversed(proc.stdout.splitlines()) if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _all_line(text: str) -> tuple[int, int, float, float]:
    """val.py's summary row: images, instances, mAP50, mAP50-95."""
    match = re.search(r"^\s+all\s+(\d+)\s+(\d+)\s+[\d.]+\s+[\d.]+\s+([\d.]+)\s+([\d.]+)\s*$", text, re.M)
    assert match, f"no 'all' row in val.py's output:\n{text[-2000:]}"
    return int(match[1]), int(match[2]), float(match[3]), float(match[4])


def _pickled_classes(path: Path) -> set[str]:
    """module.name of every class a torch.save file's pickle names, read with pickletools (nothing runs)."""
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.add(f"{strings[-2]}.{strings[-1]}")
        elif op.name == "GLOBAL":
            found.add(arg.replace(" ", "."))
    return found


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _nms_gap(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    """Largest box difference (px) between matched detections, each row of one list matched one-to-one to a row of
    the other with the same class; inf when the counts or classes differ."""
    worst = 0.0
    for a, b in zip(ours, theirs):
        if a.shape != b.shape:
            return float("inf")
        if not len(a):
            continue
        gap = (a[:, None, :4] - b[None, :, :4]).abs().amax(-1)  # (n, n)
        gap[a[:, None, 5] != b[None, :, 5]] = float("inf")
        best, index = gap.min(1)
        if len(set(index.tolist())) != len(a):
            return float("inf")
        worst = max(worst, float(best.max()))
    return worst


# ---------------------------------------------------------------------------------------------------------------
# The model and its conversions, made once


@pytest.fixture(scope="module")
def work(yolov5_python, tmp_path_factory) -> Path:
    """A copy of raccoon (YOLOv5 writes label caches beside it), its data.yaml for YOLOv5 (absolute path: YOLOv5
    resolves a relative one against its own root) and a config folder with a font (YOLOv5 downloads one)."""
    import matplotlib

    source = SHARED / "data" / "raccoon"
    if not source.is_dir():
        pytest.skip(f"{source} is absent (set REPNAS_SHARED)")
    work = tmp_path_factory.mktemp("yolov5")
    shutil.copytree(source, work / "raccoon")
    (work / "yolov5.yaml").write_text(yaml.safe_dump({"path": str(work / "raccoon"), "train": "images/train",
                                                      "val": "images/val", "nc": 1, "names": {0: "raccoon"}}))
    (work / "small.yaml").write_text(yaml.safe_dump({"path": str(work / "raccoon"), "train": "images/val",
                                                     "val": "images/val", "nc": 1, "names": {0: "raccoon"}}))
    (work / "config").mkdir()
    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    shutil.copy(font, work / "config" / "Arial.ttf")
    return work


@pytest.fixture(scope="module")
def trained(work) -> Path:
    """`repnas train` of a small point of the default space on raccoon: EPOCHS epochs at IMGSZ px."""
    from nas.train import ProxyConfig, train_job

    (work / "model.yaml").write_text(ARCH.to_yaml_text(1))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REPNAS_CACHE_DIR", str(work / "cache"))
        report = train_job(work / "model.yaml", work / "raccoon" / "data.yaml",
                           ProxyConfig(epochs=EPOCHS, imgsz=IMGSZ, quiet=True), work / "run")
    FIGURES["trained model"] = (f"{ARCH.to_params()} on raccoon, {EPOCHS} epochs at {IMGSZ} px: mAP50 "
                                f"{report.metrics['map50']:.4f}, mAP50-95 {report.metrics['map50_95']:.4f}")
    return work / "run"


@pytest.fixture(scope="module")
def bundles(work, trained) -> dict[str, Path]:
    """The trained run's bundle, and a pruned copy's (first channels kept in a block, a Conv and a C3)."""
    from pruning.portable import save_pruned

    export_bundle(str(trained), work / "bundle", data=str(work / "raccoon" / "data.yaml"))
    pruned = prune_first_channels(load_source(str(trained)).model, {
        "model.0.rbr_reparam": 24, "model.7.conv": 96, "model.10.cv1.conv": 48, "model.10.cv2.conv": 48,
        "model.10.m.0.cv1.conv": 48, "model.10.m.0.cv2.conv": 48})
    save_pruned(pruned, work / "pruned", info={"data": str(work / "raccoon" / "data.yaml"), "train_imgsz": IMGSZ})
    export_bundle(str(work / "pruned"), work / "pruned_bundle")
    se = randomize_batchnorm(build_model(tiny_yaml(1)))  # SE blocks and an SPPF, which the trained model lacks
    (work / "se.yaml").write_text(yaml.safe_dump(tiny_yaml(1)))
    torch.save(se.state_dict(), work / "se_weights.pt")
    export_bundle(str(work / "se.yaml"), work / "se_bundle", weights=str(work / "se_weights.pt"))
    return {"run": work / "bundle", "pruned": work / "pruned_bundle", "se": work / "se_bundle"}


@pytest.fixture(scope="module")
def checkpoints(yolov5_python, work, bundles) -> dict[str, Path]:
    """The bridge's command line in the PyPI package's import root: train-time, deploy, the pruned deploy, and a
    model with SE blocks (train-time), each checked by the bridge against repnas's output in its bundle (1e-4)."""
    bridge = bundles["run"] / "bridge.py"
    out = {"train": work / "train.pt", "deploy": work / "deploy.pt", "pruned": work / "pruned.pt",
           "se": work / "se.pt"}
    runs = [_run(yolov5_python, [bridge, "--root", "yolov5", "to-yolov5", bundles["run"], "--out", out["train"]],
                 work).stdout,
            _run(yolov5_python, [bridge, "--root", "yolov5", "to-yolov5", bundles["run"], "--deploy", "--out",
                                 out["deploy"]], work).stdout,
            _run(yolov5_python, [bridge, "--root", "yolov5", "to-yolov5", bundles["pruned"], "--deploy", "--out",
                                 out["pruned"]], work).stdout,
            _run(yolov5_python, [bridge, "--root", "yolov5", "to-yolov5", bundles["se"], "--out", out["se"]],
                 work).stdout]
    lines = [next(line for line in text.splitlines() if line.startswith(f"wrote {path}: ")) for text, path in
             zip(runs, out.values())]  # (the first YOLOv5 import here also prints Ultralytics' settings notice)
    new_torch = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 6)
    assert all(("note: torch" in text and "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1" in text) == new_torch for text in runs)
    checks = [re.search(r"to (\S+) relative", line)[1] for line in lines]
    FIGURES["bridge check (repnas output recorded in the bundle)"] = "; ".join(
        f"{k} {check}" for k, check in zip(out, checks))
    return out


@pytest.fixture(scope="module")
def images(work) -> torch.Tensor:
    """The first rect batch of raccoon's val split as repnas's val loader makes it: (8, 3, H, W) float 0..1."""
    from nas.data import make_loader

    dataset = val_dataset(work / "raccoon" / "data.yaml", IMGSZ, 8)
    batch = next(iter(make_loader(dataset, 8, shuffle=False)))[0]
    return batch.float() / 255


@pytest.fixture(scope="module")
def yolov5_outputs(yolov5_python, work, checkpoints, images) -> tuple[dict, dict]:
    """YOLOv5's attempt_load of each checkpoint (as val.py and detect.py load them), its outputs and NMS on `images`
    (not the SE model's: the design document's SEBlock pools a W x W window, so it needs square inputs)."""
    checkpoints = {k: v for k, v in checkpoints.items() if k != "se"}
    torch.save(images, work / "images.pt")
    proc = _run(yolov5_python, [SIDE, "outputs", *checkpoints.values(), "--images", work / "images.pt", "--out",
                                work / "outputs.pt"], work)
    report = _result(proc)
    tensors = torch.load(work / "outputs.pt", weights_only=True)
    return ({name: report[str(path)] for name, path in checkpoints.items()} | {"torch": report["torch"]},
            {name: tensors[str(k)] for k, name in enumerate(checkpoints)})


# ---------------------------------------------------------------------------------------------------------------
# repnas -> YOLOv5


def test_yolov5_computes_what_repnas_computes_raw_and_after_nms(trained, work, yolov5_outputs, images):
    _, outputs = yolov5_outputs
    models = {"train": load_source(str(trained)).model, "deploy": load_source(str(trained)).model,
              "pruned": load_source(str(work / "pruned")).model}
    for name, model in models.items():
        with torch.no_grad():
            pred, maps = model(images)
        theirs = outputs[name]
        raw = max(_rel(theirs["maps"][k], maps[k]) for k in range(len(maps)))
        decoded = _rel(theirs["pred"], pred)
        assert raw < TOLERANCE and decoded < TOLERANCE, (name, raw, decoded)
        gaps, boxes = [], 0
        for settings, key in ((VAL_NMS, "nms_val"), (DETECT_NMS, "nms_detect")):
            ours = non_max_suppression(pred, settings["conf"], settings["iou"], settings["max_det"],
                                       multi_label=settings["multi_label"])
            gap = _nms_gap(ours, theirs[key])
            assert gap < BOX_TOLERANCE, (name, key, gap)
            boxes += sum(len(d) for d in ours)
            gaps.append(f"{sum(len(d) for d in ours)} boxes, max box diff {gap:.1e} px")
        assert boxes > 0, f"{name}: no detections to compare"  # (the pruned model is not fine-tuned: few)
        FIGURES[f"outputs {name}.pt vs repnas"] = (f"raw maps {raw:.1e}, decoded {decoded:.1e} relative on "
                                                   f"{tuple(images.shape)}; NMS val settings: {gaps[0]}; detect "
                                                   f"settings: {gaps[1]}, same classes")


def test_the_deploy_checkpoint_is_yolov5s_fused_form_in_float32(yolov5_outputs):
    report, _ = yolov5_outputs
    report = {k: v for k, v in report.items() if k != "torch"}
    deploy, train = report["deploy"], report["train"]
    assert deploy["class"] == "yolov5.models.yolo.DetectionModel" and deploy["names"] == {"0": "raccoon"}
    blocks = sum(stage.depth for stage in ARCH.stages)
    assert deploy["repvgg"] == deploy["repvgg_deploy"] == blocks  # every RepVGG block with deploy=True, one conv
    assert deploy["convs"] == deploy["convs_fused"] > 0  # no bn, forward = forward_fuse, as YOLOv5's fuse()
    assert train["repvgg_deploy"] == 0 and train["convs_fused"] == 0  # the train-time model, BatchNorms kept
    assert {r["dtypes"][0] for r in report.values()} == {"torch.float32"} and train["nc"] == deploy["nc"] == 1
    assert deploy["keys"] == sorted(["epoch", "best_fitness", "model", "ema", "updates", "optimizer", "date",
                                     "repnas"])
    rows = deploy["yaml_rows"]
    assert rows[0][3] == [32, 3, 2, 1, 1, 1, "zeros", True] and report["pruned"]["yaml_rows"][0][3][0] == 24


def test_yolov5s_loaders_refuse_pickles_under_torch_2_6_without_the_override(yolov5_outputs):
    report, _ = yolov5_outputs
    version = report.pop("torch")
    for name, entry in report.items():
        if tuple(int(v) for v in version.split(".")[:2]) >= (2, 6):
            assert re.search(r"weights.only", entry["refused_without_env"] or "", re.I), name
        else:
            assert entry["refused_without_env"] is None, name
    FIGURES["torch.load in YOLOv5's loaders"] = (f"torch {version}: without TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 "
                                                 f"attempt_load raises {report['deploy']['refused_without_env']}"[:300])


def test_val_py_on_the_checkpoint_beside_repnas_val(yolov5_python, work, trained, checkpoints):
    """val.py and repnas val count the same 40 images and 44 boxes, with the same rect batching (pad 0.5), NMS (conf
    0.001, IoU 0.6, 300 per image) and model outputs. Their gap is, in full: (a) the pixels: YOLOv5 decodes with
    OpenCV and shrinks with INTER_AREA, repnas decodes with PIL and resizes bilinearly; (b) boxes mapped back to the
    original image: YOLOv5 divides x and y by the height's gain, repnas each by its own; (c) AP: val.py integrates an
    interpolated precision envelope (trapezoid rule) with its own matching, pycocotools' COCOeval samples 101 recall
    points. repnas's model, NMS and COCOeval on val.py's own batches, with YOLOv5's mapping, give exactly COCOeval of
    val.py's saved detections: nothing else differs."""
    from nas.metrics import scale_boxes

    proc = _run(yolov5_python, ["-m", "yolov5.val", "--weights", checkpoints["deploy"], "--data", work / "yolov5.yaml",
                                "--imgsz", IMGSZ, "--batch-size", 32, "--conf-thres", 0.001, "--iou-thres", 0.6,
                                "--device", "cpu", "--workers", 0, "--save-json", "--project", work / "runs",
                                "--name", "val", "--exist-ok"], work)
    images, instances, map50, map50_95 = _all_line(proc.stdout + proc.stderr)
    data = load_data_config(work / "raccoon" / "data.yaml")
    model = load_source(str(trained)).model
    ours = evaluate(model, data, IMGSZ, batch=32)
    assert (images, instances) == (ours.images, ours.boxes) == (40, 44)
    records = {r.path.stem: r for r in val_dataset(data, IMGSZ, 32).records}
    truths = [ground_truth(r) for r in records.values()]

    saved = json.loads((work / "runs" / "val" / "deploy_predictions.json").read_text())
    by_image: dict[str, list] = {}
    for d in saved:
        x, y, w, h = d["bbox"]
        by_image.setdefault(str(d["image_id"]), []).append([x, y, x + w, y + h, d["score"], d["category_id"]])
    coco_theirs = coco_map(truths, [np.array(by_image.get(stem, []), dtype=np.float64).reshape(-1, 6)
                                    for stem in records], 1)

    batches = _result(_run(yolov5_python, [SIDE, "val-batches", "--data", work / "yolov5.yaml", "--imgsz", IMGSZ,
                                           "--batch", 32, "--out", work / "val_batches.pt"], work))
    found: dict[str, dict[str, np.ndarray]] = {"repnas": {}, "yolov5": {}}
    for im, files, shapes in zip(torch.load(work / "val_batches.pt", weights_only=True), batches["files"],
                                 batches["shapes"]):
        with torch.no_grad():
            pred = model(im.float() / 255)[0]
        for det, stem, (original, ratio_pad) in zip(non_max_suppression(pred, 0.001, 0.6, 300), files, shapes):
            for mapping, gains in (("repnas", ratio_pad[0]), ("yolov5", [ratio_pad[0][0]] * 2)):
                boxes = det.clone()  # repnas maps x and y each by its own gain, YOLOv5 by the height's gain
                boxes[:, :4] = scale_boxes(boxes[:, :4], im.shape[2:], original, (gains, ratio_pad[1]))
                found[mapping][stem] = boxes.numpy()
    mixed = {k: coco_map(truths, [v[stem] for stem in records], 1) for k, v in found.items()}
    FIGURES["raccoon val, 160 px"] = (
        f"mAP50 / mAP50-95: YOLOv5 val.py {map50:.4f} / {map50_95:.4f}; COCOeval on val.py's saved detections "
        f"{coco_theirs.map50:.4f} / {coco_theirs.map50_95:.4f}; repnas's model, NMS and COCOeval on val.py's "
        f"batches, boxes mapped back as YOLOv5 maps them {mixed['yolov5'].map50:.4f} / "
        f"{mixed['yolov5'].map50_95:.4f}, as repnas maps them {mixed['repnas'].map50:.4f} / "
        f"{mixed['repnas'].map50_95:.4f}; repnas val {ours.map50:.4f} / {ours.map50_95:.4f}")
    assert abs(mixed["yolov5"].map50 - coco_theirs.map50) < 5e-4  # (val.py's JSON rounds boxes and scores)
    assert abs(mixed["yolov5"].map50_95 - coco_theirs.map50_95) < 5e-4
    assert abs(map50 - ours.map50) < 0.05 and abs(map50_95 - ours.map50_95) < 0.05


def test_detect_py_and_export_py_take_the_deploy_checkpoint(yolov5_python, work, trained, checkpoints):
    _run(yolov5_python, ["-m", "yolov5.detect", "--weights", checkpoints["deploy"], "--source",
                         work / "raccoon" / "images" / "val", "--imgsz", IMGSZ, "--device", "cpu", "--save-txt",
                         "--nosave", "--project", work / "runs", "--name", "detect", "--exist-ok"], work)
    labels = list((work / "runs" / "detect" / "labels").glob("*.txt"))
    assert labels and all(line.split()[0] == "0" for f in labels for line in f.read_text().splitlines())
    _run(yolov5_python, ["-m", "yolov5.export", "--weights", checkpoints["deploy"], "--include", "torchscript",
                         "--imgsz", IMGSZ, "--device", "cpu"], work)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        scripted = torch.jit.load(str(checkpoints["deploy"].with_suffix(".torchscript")))
    x = torch.rand(1, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = scripted(x)
        ours = load_source(str(trained)).model(x)[0]
    theirs = theirs[0] if isinstance(theirs, (tuple, list)) else theirs
    assert _rel(theirs, ours) < TOLERANCE
    FIGURES["detect.py / export.py"] = (f"detect.py wrote labels for {len(labels)} of 40 val images; the TorchScript "
                                        f"export matches repnas to {_rel(theirs, ours):.1e} relative")


def test_train_py_transfers_every_item_and_its_checkpoint_comes_back(yolov5_python, work, bundles, checkpoints):
    """train.py --weights: a partial load is silent there, so the whole count is asserted; then the checkpoint
    train.py wrote (fp16 model and EMA, optimizer state) converts back and loads in repnas."""
    proc = _run(yolov5_python, ["-m", "yolov5.train", "--weights", checkpoints["train"], "--data", work / "small.yaml",
                                "--epochs", 1, "--imgsz", 64, "--batch-size", 8, "--device", "cpu", "--workers", 0,
                                "--noplots", "--noautoanchor", "--project", work / "runs", "--name", "train",
                                "--exist-ok"], work)
    match = re.search(r"Transferred (\d+)/(\d+) items", proc.stdout + proc.stderr)
    assert match and match[1] == match[2], (proc.stdout + proc.stderr)[-2000:]
    FIGURES["train.py --weights"] = f"Transferred {match[1]}/{match[2]} items"
    last = work / "runs" / "train" / "weights" / "last.pt"
    _run(yolov5_python, [bundles["run"] / "bridge.py", "--root", "yolov5", "from-yolov5", last, "--out",
                         work / "from_train_py"], work)
    meta = json.loads((work / "from_train_py" / "yolov5.json").read_text())
    assert meta["model"] == "model" and meta["form"] == "train" and meta["names"] == ["raccoon"]  # train.py's
    assert meta["epoch"] == -1  # strip_optimizer moved the EMA into `model` at the end and dropped the rest
    source = load_source(str(work / "from_train_py"))
    assert source.nc == 1 and all(t.dtype != torch.float16 for t in read_state(
        work / "from_train_py" / "weights.pt").values())


# ---------------------------------------------------------------------------------------------------------------
# YOLOv5 -> repnas


def test_there_and_back_gives_identical_tensors(yolov5_python, work, trained, bundles, checkpoints, images):
    bridge = bundles["run"] / "bridge.py"
    for name, weights in (("train", "weights.pt"), ("deploy", "fused.pt")):
        out = work / f"back_{name}"
        _run(yolov5_python, [bridge, "--root", "yolov5", "from-yolov5", checkpoints[name], "--out", out], work)
        before, after = read_state(bundles["run"] / weights), read_state(out / "weights.pt")
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
        written, original = (yaml.safe_load((folder / "model.yaml").read_text()) for folder in (out, bundles["run"]))
        assert [written["backbone"], written["head"], written["anchors"], written["nc"]] == \
            [original["backbone"], original["head"], original["anchors"], original["nc"]]
        assert json.loads((out / "yolov5.json").read_text())["names"] == ["raccoon"]
        with torch.no_grad():
            assert torch.equal(load_source(str(out)).model(images)[0], load_source(str(trained)).model(images)[0])
        assert Arch.from_model_yaml(written, load_space(), str(out)).to_params() == ARCH.to_params()
    FIGURES["repnas -> YOLOv5 -> repnas"] = "train-time and fused state_dicts: identical tensors (torch.equal)"


def test_checkpoints_as_yolov5_training_leaves_them(yolov5_python, work, bundles):
    """Anchors after autoanchor (Detect's buffer, grid units) come back in pixels; EMA by default, `--use model`
    otherwise; YOLOv5's own yolov5n converts too; as --baseline only points of the space are taken, and a converted
    YAML that is not one is refused naming the nearest Arch."""
    from nas.study.settings import StudyError, load_baseline

    out = work / "made"
    out.mkdir()
    made = _result(_run(yolov5_python, [SIDE, "make-checkpoints", "--bundle", bundles["run"], "--bridge",
                                        bundles["run"] / "bridge.py", "--out", out], work))
    reference = torch.load(out / "outputs.pt", weights_only=True)
    anchors = yaml.safe_load((out / "autoanchor" / "model.yaml").read_text())["anchors"]
    assert np.allclose(anchors, made["anchors_px"], atol=1e-3)
    assert anchors != yaml.safe_load((bundles["run"] / "model.yaml").read_text())["anchors"]
    for name, key in (("autoanchor", "ema"), ("autoanchor_model", "model"), ("offspace", "model"),
                      ("yolov5n", "model")):
        assert json.loads((out / name / "yolov5.json").read_text())["model"] == key
        with torch.no_grad():
            ours = load_source(str(out / name)).model(reference["images"])[0]
        assert _rel(ours, reference[f"{name.split('_')[0]}_{key}"]) < TOLERANCE, name
    space = load_space()
    assert load_baseline(str(out / "autoanchor" / "model.yaml"), space).to_params() == ARCH.to_params()
    with pytest.raises(StudyError, match=r"the nearest Arch of the space \(\{'P1_depth': 1, 'P1_width': 32, .*"
                                         r"'head_width': 0\.5.*\}\) writes a different model"):
        load_baseline(str(out / "offspace" / "model.yaml"), space)
    with pytest.raises(StudyError, match=r"not a model YAML of the RepVGG-YOLO layout"):
        load_baseline(str(out / "yolov5n" / "model.yaml"), space)


def test_a_checkouts_import_root(yolov5_python, work, bundles, checkpoints):
    """From a checkout's root the bridge finds `models.yolo` (auto), the checkpoint names that root's classes, and
    the checkout's val.py reads it with the same result as the package's."""
    checkout = yolov5_python.parents[1] / "yolov5-checkout"
    assert (checkout / "models" / "yolo.py").is_file(), "build.sh lays out the checkout-shaped copy"
    out = work / "checkout_deploy.pt"
    line = _run(yolov5_python, [bundles["run"] / "bridge.py", "to-yolov5", bundles["run"], "--deploy", "--out", out],
                work, cwd=checkout).stdout
    assert "(models.yolo)" in line
    classes = _pickled_classes(out)
    assert "models.yolo.DetectionModel" in classes and "models.common.RepVGGBlock" in classes
    assert not any(c.startswith("yolov5.") for c in classes)
    assert "yolov5.models.yolo.DetectionModel" in _pickled_classes(checkpoints["deploy"])
    args = ["--weights", out, "--data", work / "yolov5.yaml", "--imgsz", IMGSZ, "--batch-size", 32, "--device", "cpu",
            "--workers", 0, "--project", work / "runs", "--name", "val_checkout", "--exist-ok"]
    ran = _run(yolov5_python, ["val.py", *args], work, cwd=checkout)
    package = _run(yolov5_python, ["-m", "yolov5.val", *args], work)
    assert _all_line(ran.stdout + ran.stderr) == _all_line(package.stdout + package.stderr)
