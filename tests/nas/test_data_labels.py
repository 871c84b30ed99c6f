"""Where nas.data looks for label files: YOLOv5's rule, letter-case variants (used), label files the rule misses
(named, not used), orphan label files, byte-order marks, and images in both train and val.

Each layout puts two images of four (C and D) in it; A and B keep their label at YOLOv5's path. The expected label
path is checked against YOLOv5's own string rule (`img2label_paths` in utils/dataloaders.py), re-typed below.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nas import data
from nas.data import check_dataset, find_label, index_split, label_path, load_data_config

BOX = "0 0.5 0.4375 0.5 0.375\n"
BOX_ROW = [0.0, 0.5, 0.4375, 0.5, 0.375]


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("REPNAS_CACHE_DIR", str(path))
    return path


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="repnas.data")
    return caplog


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "repnas.data" and r.levelno == logging.WARNING]


def infos_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "repnas.data" and r.levelno == logging.INFO]


def save_jpeg(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def write(path: Path, text: str | bytes = BOX) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def yolov5_label_path(image: Path) -> Path:
    """YOLOv5's img2label_paths for one path (utils/dataloaders.py), re-typed: a string rule on `/images/`."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return Path(sb.join(str(image).rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt")


# ---------------------------------------------------------------------------------------------------------------
# Example A: labels/train/C.TXT, and a label cache written by the code before the fix


def example_a(root: Path) -> Path:
    for seed, name in enumerate("ABCD"):
        save_jpeg(root / "images" / "train" / f"{name}.jpg", seed)
    save_jpeg(root / "images" / "val" / "E.jpg", 10)
    for name in "ABD":
        write(root / "labels" / "train" / f"{name}.txt")
    write(root / "labels" / "train" / "C.TXT")
    write(root / "labels" / "val" / "E.txt")
    return write(root / "data.yaml", "path: .\ntrain: images/train\nval: images/val\nnames: [a]\n")


def write_old_cache(cache: Path, images: list[Path], nc: int, version: int, labels: dict[str, list]) -> Path:
    """The label cache file the code before this fix wrote (versions 1 and 2 share the format): keyed on the image
    and `label_path` only, so C.TXT left C a background. Checked byte for byte against that code's output."""
    h = hashlib.sha256(f"v{version} nc={nc}".encode())
    for image in images:
        for p in (image, label_path(image)):
            try:
                st = p.stat()
                h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{p}\0missing\n".encode())
    key = h.hexdigest()
    results = [[{"path": str(p), "height": 32, "width": 48, "labels": labels[p.stem]}, None] for p in images]
    file = cache / "labels" / f"{key[:32]}.json"
    write(file, json.dumps({"key": key, "results": results, "notes": [{}] * len(images)}))
    return file


def test_example_a_case_only_label_is_used_and_warned_despite_an_old_cache(tmp_path: Path, cache: Path,
                                                                          logs) -> None:
    yaml = example_a(tmp_path / "ds")
    cfg = load_data_config(yaml)
    old = {"A": [BOX_ROW], "B": [BOX_ROW], "C": [], "D": [BOX_ROW]}
    stale = [write_old_cache(cache, list(cfg.train), 1, version, old) for version in (1, 2)]

    splits = check_dataset(cfg)

    assert infos_of(logs)[-2:] == ["train: 4 images, 4 boxes, 0 backgrounds, 0 skipped",
                                   "val: 1 images, 1 boxes, 0 backgrounds, 0 skipped"]
    assert warnings_of(logs) == [
        f"{cfg.root}/images/train: 1 label files of train images differ from YOLOv5's label path only in letter "
        f"case (e.g. {cfg.root}/labels/train/C.TXT, expected {cfg.root}/labels/train/C.txt); they are used, but "
        "YOLOv5 on Linux would not find them: rename them"]
    (c,) = [r for r in splits["train"].records if r.path.name == "C.jpg"]
    np.testing.assert_allclose(c.labels, [BOX_ROW])
    assert len(list((cache / "labels").glob("*.json"))) == len(stale) + 2  # the stale files were not trusted


def test_example_a_warns_once_per_process(tmp_path: Path, logs) -> None:
    cfg = load_data_config(example_a(tmp_path / "ds"))
    check_dataset(cfg)
    index_split(cfg.train, cfg.nc, "train", str(cfg.source))  # training indexes the split again
    index_split(cfg.val, cfg.nc, "val", str(cfg.source))  # and each evaluation the val split
    load_data_config(cfg.source)  # every trial of a study loads the data.yaml again
    assert len([m for m in warnings_of(logs) if "letter case" in m]) == 1
    infos = infos_of(logs)
    assert infos.count("train: 4 images, 4 boxes, 0 backgrounds, 0 skipped") == 1  # each summary said once
    assert infos.count("val: 1 images, 1 boxes, 0 backgrounds, 0 skipped") == 1
    assert len([m for m in infos if "dataset root" in m]) == 1  # the data.yaml's root too


# ---------------------------------------------------------------------------------------------------------------
# the loop over layouts

USED, ELSEWHERE, BACKGROUND = "used", "elsewhere", "background"
# layout: (image folder, label files of C and D ({s}: the stem, {l}: the stem in lower case), outcome, the index
# in the label list that the lookup reports (used or elsewhere))
LAYOUTS = {
    "YOLOv5's path": ("images/train", ["labels/train/{s}.txt"], USED, 0),
    "suffix in capitals": ("images/train", ["labels/train/{s}.TXT"], USED, 0),
    "stem in another case": ("images/train", ["labels/train/{l}.txt"], USED, 0),
    "labels folder in capitals": ("images/train", ["Labels/train/{s}.txt"], USED, 0),
    "every part in another case": ("images/train", ["LABELS/Train/{l}.Txt"], USED, 0),
    "exact match wins over a case variant": ("images/train", ["labels/train/{s}.txt", "labels/train/{s}.TXT"],
                                             USED, 0),
    "exact match wins over a file beside the image": ("images/train", ["labels/train/{s}.txt",
                                                                      "images/train/{s}.txt"], USED, 0),
    "no images folder, label beside the image": ("imgs", ["imgs/{s}.txt"], USED, 0),
    "no images folder, label beside in capitals": ("imgs", ["imgs/{s}.TXT"], USED, 0),
    "beside the image in images/": ("images/train", ["images/train/{s}.txt"], ELSEWHERE, 0),
    "beside the image in images/, in capitals": ("images/train", ["images/train/{s}.TXT"], ELSEWHERE, 0),
    "image folder not named images, sibling labels/": ("imgs", ["labels/{s}.txt"], ELSEWHERE, 0),
    "VOC-style JPEGImages/train, labels/train": ("JPEGImages/train", ["labels/train/{s}.txt"], ELSEWHERE, 0),
    "Images/ and Labels/ (YOLOv5 looks beside)": ("Images/train", ["Labels/train/{s}.txt"], ELSEWHERE, 0),
    "no label file anywhere": ("images/train", [], BACKGROUND, None),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_label_layouts(tmp_path: Path, logs, layout: str) -> None:
    folder, label_files, outcome, reported = LAYOUTS[layout]
    root = tmp_path / "ds"
    images = [save_jpeg(root / folder / f"{name}.jpg", seed) for seed, name in enumerate("ABCD")]
    for image in images[:2]:
        write(label_path(image))
    for image in images[2:]:
        for template in label_files:
            write(root / template.format(s=image.stem, l=image.stem.lower()))

    index_split(images, 1, "train", "data.yaml")

    c = images[2]
    expected = label_path(c)
    assert expected == yolov5_label_path(c)  # the rule is YOLOv5's, to the character
    found = root / label_files[reported].format(s="C", l="c") if reported is not None else None
    assert find_label(c) == data.LabelLookup(c, expected, found if outcome == USED else None,
                                             found if outcome == ELSEWHERE else None)
    summary = {USED: "train: 4 images, 4 boxes, 0 backgrounds, 0 skipped",
               ELSEWHERE: f"train: 4 images, 2 boxes, 2 backgrounds, 2 with a label file elsewhere (e.g. {found}), "
                          "0 skipped",
               BACKGROUND: "train: 4 images, 2 boxes, 2 backgrounds, 0 skipped"}[outcome]
    assert infos_of(logs) == [summary]
    if outcome == USED and found != expected:
        assert warnings_of(logs) == [
            f"{c.parent}: 2 label files of train images differ from YOLOv5's label path only in letter case (e.g. "
            f"{found}, expected {expected}); they are used, but YOLOv5 on Linux would not find them: rename them"]
    elif outcome == ELSEWHERE:
        fix = "move them there" if "/images/" in f"/{folder}/" else \
            "move them there, or put the images in an `images` folder beside `labels`"
        assert warnings_of(logs) == [
            f"{c.parent}: 2 train images have a label file where YOLOv5's rule does not look (e.g. {found}, expected "
            f"{expected}); not used, these images train as backgrounds: {fix}"]
    else:
        assert warnings_of(logs) == []


def test_one_warning_per_image_folder(tmp_path: Path, logs) -> None:
    root = tmp_path / "ds"
    images = []
    for part in ("p1", "p2"):
        for seed, name in enumerate("AB"):
            image = save_jpeg(root / "images" / part / f"{name}.jpg", seed)
            write(label_path(image).with_suffix(".TXT"))
            images.append(image)
    index_split(images, 1, "train", "data.yaml")
    lines = warnings_of(logs)
    assert [line.split(":")[0] for line in lines] == [str(root / "images" / "p1"), str(root / "images" / "p2")]
    assert all(": 2 label files of train images differ" in line for line in lines)


def test_labels_only_beside_the_images_are_refused_with_the_place_they_belong(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    images = [save_jpeg(root / "images" / "train" / f"{k}.jpg", k) for k in range(2)]
    for image in images:
        write(image.with_suffix(".txt"))
    with pytest.raises(data.DataError) as err:
        index_split(images, 1, "train", "data.yaml")
    assert str(err.value) == (
        f"data.yaml: train split: labels folder {root}/labels/train does not exist (YOLO labels sit in labels/ beside "
        f"images/); 2 images have a label file where YOLOv5's rule does not look (e.g. {root}/images/train/0.txt, "
        f"expected {root}/labels/train/0.txt); move the label files there or fix the split's path")


def test_a_split_of_misplaced_labels_is_refused_with_the_place_they_belong(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for k in range(2):
        save_jpeg(root / "imgs" / "train" / f"{k}.jpg", k)
        write(root / "labels" / "train" / f"{k}.txt")  # with no `images` folder the rule wants them beside the images
        write(save_jpeg(root / "imgs" / "val" / f"{k}.jpg", 10 + k).with_suffix(".txt"))
    yaml = write(root / "data.yaml", "train: imgs/train\nval: imgs/val\nnames: [a]\n")
    with pytest.raises(data.DataError) as err:
        check_dataset(load_data_config(yaml))
    assert str(err.value) == (
        f"{yaml}: the train split has 2 images but not one labelled box (each is a background: no label file, or an "
        f"empty one); 2 images have a label file where YOLOv5's rule does not look (e.g. {root}/labels/train/0.txt, "
        f"expected {root}/imgs/train/0.txt); put the labels in labels/ beside images/ or fix `train`")


# ---------------------------------------------------------------------------------------------------------------
# the cache sees every candidate


@pytest.mark.parametrize("place, boxes, elsewhere", [("labels/train/C.TXT", 2, 0), ("Labels/train/C.txt", 2, 0),
                                                     ("images/train/C.txt", 1, 1)])
def test_a_label_file_appearing_at_any_candidate_invalidates_the_cache(tmp_path: Path, place: str, boxes: int,
                                                                       elsewhere: int) -> None:
    root = tmp_path / "ds"
    images = [save_jpeg(root / "images" / "train" / f"{name}.jpg", seed) for seed, name in enumerate("BC")]
    write(label_path(images[0]))
    first = index_split(images, 1, "train", "data.yaml")
    assert (first.boxes, len(first.misplaced)) == (1, 0)
    write(root / place)
    second = index_split(images, 1, "train", "data.yaml")
    assert (second.boxes, len(second.misplaced)) == (boxes, elsewhere)


def test_a_case_variant_label_edited_in_place_is_read_again(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    image = save_jpeg(root / "images" / "train" / "C.jpg", 0)
    label = write(root / "labels" / "train" / "C.TXT")
    assert index_split([image], 1, "train", "data.yaml").boxes == 1
    write(label, BOX + "0 0.2 0.2 0.1 0.1\n")
    assert index_split([image], 1, "train", "data.yaml").boxes == 2


# ---------------------------------------------------------------------------------------------------------------
# orphan label files, byte-order marks


def shared_folders(root: Path) -> Path:
    """train and val as .txt lists over one images/ + labels/ (the layout of YOLOv5's coco128 splits by list)."""
    for k in range(4):
        write(label_path(save_jpeg(root / "images" / f"{k}.jpg", k)))
    write(root / "train.txt", "./images/0.jpg\n./images/1.jpg\n./images/2.jpg\n")
    write(root / "val.txt", "./images/3.jpg\n")
    return write(root / "data.yaml", f"path: {root}\ntrain: train.txt\nval: val.txt\nnames: [a]\n")


def test_splits_sharing_one_labels_folder_give_no_orphan_warning(tmp_path: Path, logs) -> None:
    cfg = load_data_config(shared_folders(tmp_path / "ds"))
    assert (len(cfg.train), len(cfg.val)) == (3, 1)
    check_dataset(cfg)
    index_split(cfg.val, cfg.nc, "val", str(cfg.source))  # evaluation indexes val alone
    assert warnings_of(logs) == []


def test_a_real_orphan_in_a_shared_labels_folder_is_warned_once(tmp_path: Path, logs) -> None:
    root = tmp_path / "ds"
    cfg = load_data_config(shared_folders(root))
    orphan = write(root / "labels" / "gone.txt")
    write(root / "labels" / "GONE2.TXT")
    check_dataset(cfg)
    assert warnings_of(logs) == [f"train split: 2 label files have no image (e.g. {root}/labels/GONE2.TXT); they "
                                 "are ignored"]
    assert orphan.is_file()


def test_split_list_and_label_file_with_a_byte_order_mark_are_read(tmp_path: Path, logs) -> None:
    root = tmp_path / "ds"
    shared_folders(root)
    write(root / "train.txt", b"\xef\xbb\xbf./images/0.jpg\r\n./images/1.jpg\r\n")
    write(root / "labels" / "0.txt", b"\xef\xbb\xbf" + BOX.encode())
    cfg = load_data_config(root / "data.yaml")
    assert cfg.train == (root / "images" / "0.jpg", root / "images" / "1.jpg")
    splits = check_dataset(cfg)
    assert splits["train"].summary("train") == "train: 2 images, 2 boxes, 0 backgrounds, 0 skipped"
    np.testing.assert_allclose(splits["train"].records[0].labels, [BOX_ROW])
    assert warnings_of(logs) == []


# ---------------------------------------------------------------------------------------------------------------
# the same image in train and val


def test_images_in_both_train_and_val_are_warned_with_count_and_example(tmp_path: Path, logs) -> None:
    root = tmp_path / "ds"
    for split, seeds in (("train", range(4)), ("val", (1, 2, 7))):
        for seed in seeds:
            write(label_path(save_jpeg(root / "images" / split / f"{split}{seed}.jpg", seed)))
    shutil.copy(root / "images" / "train" / "train3.jpg", root / "images" / "val" / "copy.jpg")  # renamed copy
    write(root / "labels" / "val" / "copy.txt")
    yaml = write(root / "data.yaml", "train: images/train\nval: images/val\nnames: [a]\n")
    check_dataset(load_data_config(yaml))
    check_dataset(load_data_config(yaml))  # once per process
    assert warnings_of(logs) == [
        f"3 val images are also in train (the same file content, e.g. {root}/images/val/copy.jpg and "
        f"{root}/images/train/train3.jpg); they inflate the val mAP: remove them from one split"]


def test_distinct_images_of_equal_size_are_not_duplicates(tmp_path: Path, logs) -> None:
    root = tmp_path / "ds"
    for split, value in (("train", 0), ("val", 1)):
        path = root / "images" / split / "a.bmp"  # BMPs of one size have one file size
        path.parent.mkdir(parents=True)
        Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(path)
        write(label_path(path))
    assert (root / "images/train/a.bmp").stat().st_size == (root / "images/val/a.bmp").stat().st_size
    check_dataset(load_data_config(write(root / "data.yaml", "train: images/train\nval: images/val\nnames: [a]\n")))
    assert warnings_of(logs) == []
