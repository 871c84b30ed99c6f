"""Malformed datasets through the real CLI (`repnas train`, `repnas search`), built in tmp folders with PIL/numpy.

Per-file problems are warnings naming the file and the reason; the file is skipped and the rest is used. A dataset
with nothing usable (a missing split folder or labels folder, names/nc disagreement, an empty split, a split whose
every file is bad, a split without one labelled box) is one stderr line naming the data.yaml, the field or split,
the value and the fix, exit code 2, and nothing written: no study, no output folder, no file in the dataset. The
label cache goes to REPNAS_CACHE_DIR, never beside the data.

Images without a label file are YOLO backgrounds: kept on purpose (see nas/data.py's docstring) and counted in the
split's summary line. Label files the lookup rule misses or finds only by ignoring letter case are named once, with
the path the rule expects; images in both train and val are counted once.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from nas.data import label_path
from tests.conftest import tiny_yaml
from tests.reliability.badinput import record_rule, refusal, tree
from tests.studyfixtures import BASELINE, TINY_SPACE

GOOD_LABEL = "0 0.5 0.5 0.3 0.3\n1 0.3 0.3 0.2 0.2\n"


def _png(path: Path, size: int = 64, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _jpeg_bytes(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _label(image: Path, text: str) -> None:
    path = label_path(image)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def make_dataset(root: Path, train: int = 6, val: int = 3, names: list | dict | None = None, **extra) -> Path:
    """root/images/{train,val}/N.png with two boxes each, and root/data.yaml; `extra` goes into the data.yaml."""
    for split, count in (("train", train), ("val", val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        for k in range(count):
            _label(_png(root / "images" / split / f"{k}.png", seed=k), GOOD_LABEL)
    config = {"path": str(root), "train": "images/train", "val": "images/val", "names": names or ["a", "b"]}
    (root / "data.yaml").write_text(yaml.safe_dump(config | extra))
    return root / "data.yaml"


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REPNAS_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(tiny_yaml(2)))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(TINY_SPACE))
    (tmp_path / "baseline.yaml").write_text(yaml.safe_dump(BASELINE))
    return tmp_path


def _train(data: Path, *more: str) -> list[str]:
    return ["train", "model.yaml", "--data", str(data), "--epochs", "1", "--imgsz", "64", "--batch", "4",
            "--device", "cpu", "--loader-workers", "0", "--out", "out", *more]


def _search(data: Path) -> list[str]:
    return ["search", "--study", "d", "--results", "res", "--data", str(data), "--space", "space.yaml",
            "--baseline", "baseline.yaml", "--device", "cpu", "--trials", "1", "--epochs", "1", "--imgsz", "64"]


def _cli_process(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", "REPNAS_CACHE_DIR": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-m", "nas.cli", *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


# ---------------------------------------------------------------------------------------------------------------
# per-file problems: warned, skipped, the rest used

def _write_bad(root: Path, name: str, image: Callable[[Path], object], label: str | None = GOOD_LABEL) -> Path:
    path = root / "images" / "train" / name
    image(path)
    if label is not None:
        _label(path, label)
    return path


PER_FILE = {  # file name: (write the image, its label text or None, the reason in the warning)
    "corrupt.jpg": (lambda p: p.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4), GOOD_LABEL,
                    "not a readable image"),
    "truncated.jpg": (lambda p: p.write_bytes(_jpeg_bytes()[: len(_jpeg_bytes()) // 2]), GOOD_LABEL, "truncated"),
    "zero-byte.jpg": (lambda p: p.write_bytes(b""), GOOD_LABEL, "not a readable image"),
    "not-an-image.jpg": (lambda p: p.write_text("this is a text file, not a JPEG\n"), GOOD_LABEL,
                         "not a readable image"),
    "too-small.png": (lambda p: _png(p, size=8), GOOD_LABEL, "image is 8x8, smaller than 10 px"),
    "class-out-of-range.png": (_png, "5 0.5 0.5 0.2 0.2\n", "line 1: class 5 is not an index in 0..1"),
    "nan.png": (_png, "0 0.5 nan 0.2 0.2\n", "line 1: non-finite value"),
    "inf.png": (_png, "0 0.5 0.5 inf 0.2\n", "line 1: non-finite value"),
    "negative-size.png": (_png, "0 0.5 0.5 -0.2 0.2\n", "line 1: box size -0.2x0.2 must be positive"),
    "outside.png": (_png, "0 1.8 0.5 0.2 0.2\n", "lies outside the image"),
    "not-numbers.png": (_png, "0 0.5 0.5 w 0.2\n", "is not numbers"),
}


def test_per_file_problems_are_warned_skipped_and_the_rest_trains(work, capsys, reliability_report):
    data = make_dataset(work / "ds")
    root = data.parent
    bad = {name: _write_bad(root, name, image, label) for name, (image, label, _) in PER_FILE.items()}
    background = _png(root / "images" / "train" / "background.png", seed=9)  # no label file: a background
    orphan = root / "labels" / "train" / "orphan.txt"
    orphan.write_text(GOOD_LABEL)  # a label without an image
    before = tree(root)

    done = _cli_process(_train(data), work)  # a real process: the log lines reach stderr as a user sees them

    code, out, err = done.returncode, done.stdout, done.stderr.splitlines()
    assert code == 0, err[-5:]
    for name, (_, _, reason) in PER_FILE.items():
        lines = [line for line in err if f"{bad[name]}: skipped:" in line]
        assert len(lines) == 1, (name, lines)  # named once, though both the check and the training index it
        assert reason in lines[0], lines[0]
    assert not any(str(background) in line for line in err)  # a background is not a problem
    assert [line for line in err if "label files have no image" in line] == [
        f"train split: 1 label files have no image (e.g. {orphan}); they are ignored"]
    assert f"train: 7 images, 12 boxes, 1 backgrounds, {len(PER_FILE)} skipped" in err
    assert "val: 3 images, 6 boxes, 0 backgrounds, 0 skipped" in err
    assert (work / "out" / "metrics.json").is_file() and "wrote out/weights.pt" in out
    assert tree(root) == before  # the dataset folder is only read
    assert list((work / "cache" / "labels").glob("*.json"))  # the label cache lives in REPNAS_CACHE_DIR
    reliability_report("bad data files", f"{len(PER_FILE)} kinds of bad image or label file each warned once with "
                                         "file and reason, skipped, the rest trained; backgrounds kept")


def test_label_files_out_of_place_are_named_once_and_counted(work, reliability_report):
    data = make_dataset(work / "ds")  # val's three images are copies of train's first three
    root = data.parent
    labels, images = root / "labels" / "train", root / "images" / "train"
    (labels / "0.txt").rename(labels / "0.TXT")  # found only by ignoring case: used
    (labels / "1.txt").rename(images / "1.txt")  # beside the image, where YOLOv5 does not look: not used
    (labels / "2.txt").write_bytes(b"\xef\xbb\xbf" + GOOD_LABEL.encode())  # a byte-order mark: read
    before = tree(root)

    done = _cli_process(_train(data), work)

    code, err = done.returncode, done.stderr.splitlines()
    assert code == 0, err[-5:]
    expected = {
        "case-only match used": f"{images}: 1 label files of train images differ from YOLOv5's label path only in "
                                f"letter case (e.g. {labels}/0.TXT, expected {labels}/0.txt); they are used, but "
                                "YOLOv5 on Linux would not find them: rename them",
        "label elsewhere named": f"{images}: 1 train images have a label file where YOLOv5's rule does not look (e.g. "
                                 f"{images}/1.txt, expected {labels}/1.txt); not used, these images train as "
                                 "backgrounds: move them there",
        "train/val duplicates": f"3 val images are also in train (the same file content, e.g. {root}/images/val/0.png "
                                f"and {images}/0.png); they inflate the val mAP: remove them from one split",
        "summary counts both": f"train: 6 images, 10 boxes, 1 backgrounds, 1 with a label file elsewhere (e.g. "
                               f"{images}/1.txt), 0 skipped",
    }
    held = [rule for rule, line in expected.items() if err.count(line) == 1]  # summaries too: once per command
    assert held == list(expected), ([r for r in expected if r not in held], err)
    assert not any("skipped:" in line or "have no image" in line for line in err)  # the BOM label was read
    assert tree(root) == before
    reliability_report("label lookup", f"{len(held)}/{len(expected)} label-file rules through `repnas train`: a "
                                       "letter-case match used, a label the rule misses named with its expected path, "
                                       "train/val duplicates counted, each warned once; a BOM label read")


# ---------------------------------------------------------------------------------------------------------------
# nothing usable: one line, exit 2, nothing written

def _drop(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def _edit_yaml(**changes) -> Callable[[Path], None]:
    def edit(data: Path) -> None:
        config = yaml.safe_load(data.read_text())
        for key, value in changes.items():
            if value is None:
                config.pop(key)
            else:
                config[key] = value
        data.write_text(yaml.safe_dump(config))
    return edit


def _every(split: str, what: str, write: Callable[[Path], None]) -> Callable[[Path], None]:
    def edit(data: Path) -> None:
        folder = data.parent / what / split
        for path in sorted(folder.iterdir()):
            write(path)
    return edit


def _labels_beside_images(data: Path) -> None:
    labels = data.parent / "labels" / "train"
    for path in sorted(labels.iterdir()):
        path.rename(data.parent / "images" / "train" / path.name)
    labels.rmdir()


UNUSABLE = {  # rule: (change to a good dataset, expected parts after the data.yaml path)
    "missing split folder": (lambda d: _drop(d.parent / "images" / "val"),
                             ["field 'val'", "images/val does not exist", "fix `val` (relative to `path`"]),
    "missing labels folder": (lambda d: _drop(d.parent / "labels"),
                              ["train split: labels folder", "labels/train does not exist",
                               "add the labels or fix the split's path"]),
    "labels beside the images, not in labels/": (
        _labels_beside_images,
        ["train split: labels folder", "labels/train does not exist", "6 images have a label file where YOLOv5's "
         "rule does not look (e.g. ", "images/train/0.txt, expected ", "move the label files there"]),
    "names/nc mismatch": (_edit_yaml(nc=5), ["field 'nc': 5 but names lists 2 classes",
                                             "make them agree (or drop nc)"]),
    "nc not a number": (_edit_yaml(nc="two"), ["field 'nc': 'two' but names lists 2 classes", "make them agree"]),
    "empty split": (_every("val", "images", _drop), ["the val split lists no images",
                                                    "check `val` and the folder's contents"]),
    "split with every image unreadable": (_every("train", "images", lambda p: p.write_bytes(b"")),
                                          ["the train split has no usable image (6 skipped, first: ",
                                           "images/train/0.png: not a readable image", "fix the files"]),
    "split with every label bad (NaN)": (_every("train", "labels", lambda p: p.write_text("0 nan 0.5 0.2 0.2\n")),
                                         ["the train split has no usable image (6 skipped", "non-finite value",
                                          "fix the files"]),
    "split with every class out of range": (_edit_yaml(names=["a"]),
                                            ["the train split has no usable image (6 skipped",
                                             "line 2: class 1 is not an index in 0..0", "fix the files"]),
    "split without one labelled box": (_every("train", "labels", _drop),
                                       ["the train split has 6 images but not one labelled box",
                                        "put the labels in labels/ beside images/ or fix `train`"]),
    "names missing": (_edit_yaml(names=None), ["field 'names' is missing", "a data.yaml needs train, val and names"]),
    "names empty": (_edit_yaml(names=[]), ["field 'names': empty list", "give one name per class"]),
    "names mapping with a gap": (_edit_yaml(names={0: "a", 2: "b"}),
                                 ["field 'names': keys [0, 2] must be the class indices 0..1"]),
    "split of the wrong type": (_edit_yaml(train=5), ["field 'train': 5 must be a folder, a .txt list or a list"]),
    "root of the wrong type": (_edit_yaml(path=["x"]), ["field 'path': ['x'] must be a folder path"]),
    "data.yaml not a mapping": (lambda d: d.write_text("- images/train\n"),
                                ["a data.yaml is a mapping with path, train, val and names"]),
    "data.yaml missing": (_drop, ["no such file; check the path"]),
}


@pytest.mark.parametrize("rule", list(UNUSABLE))
def test_a_dataset_with_nothing_usable_is_refused_before_anything_is_written(rule, work, capsys,
                                                                             reliability_report):
    data = make_dataset(work / "ds")
    change, parts = UNUSABLE[rule]
    change(data)
    before = tree(work)
    for argv in (_train(data), _search(data)):
        refusal(argv, capsys, [f"{data}: ", *parts])
    assert not (work / "res").exists() and not (work / "out").exists() and not (work / "results").exists()
    assert {k: v for k, v in tree(work).items() if not k.startswith("cache/")} == \
        {k: v for k, v in before.items() if not k.startswith("cache/")}
    record_rule(f"dataset: {rule}", reliability_report)


@pytest.mark.parametrize("command", [_train, _search], ids=["train", "search"])
def test_an_unusable_dataset_prints_one_line_in_a_real_process(command, work):
    """In a real process (logging on, no --quiet) a refused dataset prints its one error line and nothing else,
    though each of its files was bad: the per-file warnings are for datasets that go on."""
    data = make_dataset(work / "ds")
    _every("train", "images", lambda p: p.write_bytes(b""))(data)
    done = _cli_process(command(data), work)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"repnas {command(data)[0]}: error: {data}: the train split has no usable image (6 skipped, first: "
        f"{data.parent / 'images' / 'train' / '0.png'}: not a readable image (UnidentifiedImageError: cannot identify "
        f"image file '{data.parent / 'images' / 'train' / '0.png'}')); fix the files"]
    assert not (work / "res").exists() and not (work / "out").exists()
