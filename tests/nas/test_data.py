"""nas.data on hand-made datasets: data.yaml, the checked and cached index, letterbox geometry, augmentation.

Images are tiny PIL canvases written into `tmp_path`; the label cache goes to a per-test REPNAS_CACHE_DIR.
Augmentation tests draw one solid white rectangle exactly at each label, so the output image says where the
output boxes must be.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nas import data
from nas.data import (
    PAD_VALUE,
    AugmentConfig,
    DataError,
    YoloDataset,
    collate,
    index_split,
    label_path,
    letterbox,
    load_data_config,
    make_loader,
)

SHARED = Path(os.environ.get("REPNAS_SHARED", Path(__file__).resolve().parents[2].parent / "shared"))
RACCOON = SHARED / "data" / "raccoon" / "data.yaml"
GREY, WHITE = 100, 255


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own label cache folder: nothing touches the home folder."""
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


def save_image(path: Path, width: int, height: int, *, box: tuple[int, int, int, int] | None = None,
               mode: str = "RGB") -> Path:
    """A grey canvas with an optional solid white rectangle `box` (x1, y1, x2, y2 pixels, end exclusive)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((height, width, 3), GREY, np.uint8)
    if box is not None:
        x1, y1, x2, y2 = box
        pixels[y1:y2, x1:x2] = WHITE
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def yolo_line(cls: int, box: tuple[float, float, float, float], width: int, height: int) -> str:
    x1, y1, x2, y2 = box
    return f"{cls} {(x1 + x2) / 2 / width:.8f} {(y1 + y2) / 2 / height:.8f} {(x2 - x1) / width:.8f} " \
           f"{(y2 - y1) / height:.8f}\n"


def write_labels(image: Path, text: str) -> Path:
    path = label_path(image)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def add_image(root: Path, name: str, width: int = 48, height: int = 32, *, labels: str | None = "",
              split: str = "train", mode: str = "RGB") -> Path:
    """An image under root/images/split with its label file (None: no label file)."""
    image = save_image(root / "images" / split / name, width, height, mode=mode)
    if labels is not None:
        write_labels(image, labels)
    return image


def images_of(root: Path, split: str = "train") -> list[Path]:
    return sorted((root / "images" / split).iterdir())


def write_yaml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------------------------
# data.yaml


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    for split in ("train", "val"):
        add_image(root, "a.png", split=split, labels="0 0.5 0.5 0.2 0.2\n")
    return root


@pytest.mark.parametrize(
    "names_yaml, expected",
    [("[cat, dog, 7]", ("cat", "dog", "7")), ("{0: cat, 1: dog, 2: bird}", ("cat", "dog", "bird")),
     ("\n  1: dog\n  0: cat", ("cat", "dog"))],
    ids=["list", "dict", "dict-unordered"],
)
def test_names_as_list_or_index_mapping(tiny_root: Path, names_yaml: str, expected: tuple) -> None:
    yaml = write_yaml(tiny_root / "data.yaml", f"train: images/train\nval: images/val\nnames: {names_yaml}\n")
    cfg = load_data_config(yaml)
    assert cfg.names == expected
    assert cfg.nc == len(expected)


def test_nc_disagreeing_with_names_names_file_field_value_and_fix(tiny_root: Path) -> None:
    yaml = write_yaml(tiny_root / "data.yaml", "train: images/train\nval: images/val\nnc: 5\nnames: [cat, dog]\n")
    with pytest.raises(DataError) as err:
        load_data_config(yaml)
    message = str(err.value)
    assert str(yaml) in message
    assert "'nc'" in message
    assert "5" in message and "2 classes" in message
    assert "make them agree" in message


def test_nc_agreeing_with_names_is_accepted(tiny_root: Path) -> None:
    yaml = write_yaml(tiny_root / "data.yaml", "train: images/train\nval: images/val\nnc: 2\nnames: [cat, dog]\n")
    assert load_data_config(yaml).nc == 2


@pytest.mark.parametrize("missing", ["names", "train", "val"])
def test_missing_required_field_raises_naming_it(tiny_root: Path, missing: str) -> None:
    fields = {"train": "train: images/train", "val": "val: images/val", "names": "names: [cat]"}
    text = "\n".join(v for k, v in fields.items() if k != missing) + "\n"
    yaml = write_yaml(tiny_root / "data.yaml", text)
    with pytest.raises(DataError, match=f"field '{missing}' is missing") as err:
        load_data_config(yaml)
    assert str(yaml) in str(err.value)


def test_relative_path_resolves_against_the_data_yaml_folder(tmp_path: Path, tiny_root: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory must not matter
    yaml = write_yaml(tmp_path / "configs" / "data.yaml",
                      "path: ../ds\ntrain: images/train\nval: images/val\nnames: [cat]\n")
    cfg = load_data_config(yaml)
    assert cfg.root == tiny_root.resolve()
    assert cfg.train == (tiny_root.resolve() / "images" / "train" / "a.png",)


def test_relative_path_falls_back_to_the_working_directory(tmp_path: Path, tiny_root: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # holds ds/, the data.yaml's folder does not
    yaml = write_yaml(tmp_path / "configs" / "data.yaml", "path: ds\ntrain: images/train\nval: images/val\n"
                                                          "names: [cat]\n")
    cfg = load_data_config(yaml)
    assert cfg.root == tiny_root.resolve()
    assert cfg.val == (tiny_root.resolve() / "images" / "val" / "a.png",)


def test_no_path_means_the_data_yaml_folder(tiny_root: Path) -> None:
    yaml = write_yaml(tiny_root / "data.yaml", "train: images/train\nval: images/val\nnames: [cat]\n")
    assert load_data_config(yaml).root == tiny_root


def test_splits_as_folder_list_of_folders_and_txt_list(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    a = add_image(root, "a.png", split="part1")
    b = add_image(root, "b.jpg", split="part2")
    nested = add_image(root, "sub/c.png", split="part2")
    x = add_image(root, "x.png", split="pool")
    y = add_image(root, "y.png", split="pool")
    z = add_image(root, "z.png", split="pool")
    (root / "lists").mkdir()
    (root / "lists" / "val.txt").write_text(f"{x}\n./../images/pool/y.png\n\nimages/pool/z.png\n")
    yaml = write_yaml(root / "data.yaml", "train: [images/part1, images/part2]\nval: lists/val.txt\n"
                                          "test: images/part1\nnames: [cat]\n")
    cfg = load_data_config(yaml)
    assert cfg.train == (a, b, nested)  # folders are searched recursively
    # absolute; './' relative to the .txt's folder; other relative lines relative to `path`
    assert [p.resolve() for p in cfg.val] == [x, y, z]
    single = load_data_config(write_yaml(root / "one.yaml", "train: images/part1\nval: images/part1/a.png\n"
                                                            "names: [cat]\n"))
    assert single.val == (a,)


def test_missing_split_folder_raises_naming_the_path(tiny_root: Path) -> None:
    yaml = write_yaml(tiny_root / "data.yaml", "train: images/train\nval: images/nope\nnames: [cat]\n")
    with pytest.raises(DataError) as err:
        load_data_config(yaml)
    message = str(err.value)
    assert str(tiny_root / "images" / "nope") in message
    assert "'val'" in message and str(yaml) in message


# ---------------------------------------------------------------------------------------------------------------
# index_split: checking images and labels


def test_good_image_gives_record_with_its_size_and_labels(tmp_path: Path) -> None:
    lines = "1 0.5 0.5 0.25 0.5\n0 0.25 0.25 0.1 0.2\n"
    image = add_image(tmp_path, "a.png", width=48, height=32, labels=lines)
    index = index_split([image], 2, "train", "data.yaml")
    (record,) = index.records
    assert record.path == image
    assert (record.height, record.width) == (32, 48)
    expected = np.array([[0, 0.25, 0.25, 0.1, 0.2], [1, 0.5, 0.5, 0.25, 0.5]], np.float32)
    np.testing.assert_allclose(record.labels[np.argsort(record.labels[:, 0])], expected, atol=1e-6)
    assert index.skipped == ()
    assert index.boxes == 2


def test_exif_orientation_is_applied_to_the_recorded_size(tmp_path: Path) -> None:
    image = tmp_path / "images" / "train" / "rot.jpg"
    image.parent.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(np.full((30, 60, 3), GREY, np.uint8)).save(image, exif=exif)
    write_labels(image, "")
    (record,) = index_split([image], 1, "train", "data.yaml").records
    assert (record.height, record.width) == (60, 30)


def test_image_without_label_file_is_a_background(tmp_path: Path, logs) -> None:
    labelled = add_image(tmp_path, "a.png", labels="0 0.5 0.5 0.2 0.2\n")
    background = add_image(tmp_path, "b.png", labels=None)
    index = index_split([labelled, background], 1, "train", "data.yaml")
    records = {r.path.name: r for r in index.records}
    assert records["b.png"].labels.shape == (0, 5)
    assert index.skipped == ()
    assert any("1 backgrounds" in m for m in infos_of(logs))


def test_greyscale_image_is_accepted_and_the_conversion_is_warned(tmp_path: Path, logs) -> None:
    grey = add_image(tmp_path, "grey.png", labels="0 0.5 0.5 0.5 0.5\n", mode="L")
    assert Image.open(grey).mode == "L"
    index = index_split([grey], 1, "train", "data.yaml")
    assert [r.path for r in index.records] == [grey]
    assert any("greyscale" in m and "converted" in m for m in warnings_of(logs))
    image, labels, _, _ = YoloDataset(index.records, 64)[0]
    assert image.shape == (3, 64, 64)
    assert len(labels) == 1


def _truncated_jpeg(path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path, quality=90)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


BAD_IMAGES = {  # name: (how to write the image, reason)
    "truncated.jpg": (_truncated_jpeg, "truncated"),
    "empty.jpg": (lambda p: p.write_bytes(b""), "not a readable image"),
    "text.jpg": (lambda p: p.write_text("this is not a JPEG\n"), "not a readable image"),
    "tiny.png": (lambda p: save_image(p, 8, 8), "smaller than 10 px"),
}
BAD_LABELS = {  # label text: reason
    "7 0.5 0.5 0.2 0.2": "class 7 is not an index in 0..2",
    "-1 0.5 0.5 0.2 0.2": "is not an index",
    "0.5 0.5 0.5 0.2 0.2": "is not an index",
    "0 0.5 0.5 0.2": "4 numbers",
    "0 0.5 nan 0.2 0.2": "non-finite",
    "0 0.5 0.5 -0.2 0.2": "must be positive",
    "0 0.5 0.5 0.2 0": "must be positive",
    "0 1.8 0.5 0.2 0.2": "outside the image",
    "0 0.5 0.5 0.2 1.5": "outside the image",
    "0 0.5 0.5 w 0.2": "is not numbers",
}


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_unreadable_image_is_skipped_with_a_warning(tmp_path: Path, logs, name: str) -> None:
    good = add_image(tmp_path, "good.png", labels="0 0.5 0.5 0.2 0.2\n")
    bad = tmp_path / "images" / "train" / name
    write, reason = BAD_IMAGES[name]
    write(bad)
    write_labels(bad, "0 0.5 0.5 0.2 0.2\n")
    index = index_split([good, bad], 1, "train", "data.yaml")
    assert [r.path for r in index.records] == [good]
    ((file, why),) = index.skipped
    assert file == str(bad) and reason in why
    assert any(str(bad) in m and reason in m for m in warnings_of(logs))
    assert any("1 skipped" in m for m in infos_of(logs))


@pytest.mark.parametrize("line", list(BAD_LABELS))
def test_bad_label_line_skips_its_image_with_a_warning(tmp_path: Path, logs, line: str) -> None:
    good = add_image(tmp_path, "good.png", labels="0 0.5 0.5 0.2 0.2\n")
    bad = add_image(tmp_path, "bad.png", labels=f"1 0.5 0.5 0.2 0.2\n{line}\n")
    index = index_split([good, bad], 3, "train", "data.yaml")
    assert [r.path for r in index.records] == [good]
    ((file, why),) = index.skipped
    assert file == str(bad)
    assert BAD_LABELS[line] in why and "line 2" in why and str(label_path(bad)) in why
    assert any(str(bad) in m and BAD_LABELS[line] in m for m in warnings_of(logs))


def test_polygon_label_becomes_its_bounding_box(tmp_path: Path) -> None:
    image = add_image(tmp_path, "poly.png", labels="0 0.1 0.2 0.5 0.2 0.3 0.6\n")
    (record,) = index_split([image], 1, "train", "data.yaml").records
    np.testing.assert_allclose(record.labels, [[0, 0.3, 0.4, 0.4, 0.4]], atol=1e-6)


def test_tiny_overshoot_is_clipped_not_skipped(tmp_path: Path, logs) -> None:
    image = add_image(tmp_path, "edge.png", labels="0 0.9 0.5 0.21 0.2\n")  # x2 = 1.005
    index = index_split([image], 1, "train", "data.yaml")
    (record,) = index.records
    _, cx, _, w, _ = record.labels[0]
    assert cx + w / 2 == pytest.approx(1.0, abs=1e-6)
    assert cx - w / 2 == pytest.approx(0.795, abs=1e-6)  # the left edge is untouched
    assert index.skipped == ()
    assert index.notes == {"label lines clipped": 1}
    assert index.note_files == {"label lines clipped": (str(label_path(image)),)}
    assert any("1 label lines clipped" in m for m in infos_of(logs))
    assert f"train split: 1 label lines clipped in {label_path(image)}" in warnings_of(logs)  # the file, said once


def test_duplicate_label_lines_are_dropped(tmp_path: Path, logs) -> None:
    line = "0 0.5 0.5 0.2 0.2\n"
    image = add_image(tmp_path, "dup.png", labels=line * 3 + "1 0.3 0.3 0.1 0.1\n")
    index = index_split([image], 2, "train", "data.yaml")
    (record,) = index.records
    assert len(record.labels) == 2
    assert sorted(record.labels[:, 0].tolist()) == [0, 1]
    assert index.notes == {"duplicate labels dropped": 2}
    assert any("2 duplicate labels dropped" in m for m in infos_of(logs))
    assert f"train split: 2 duplicate labels dropped in {label_path(image)}" in warnings_of(logs)


def test_missing_labels_folder_raises(tmp_path: Path) -> None:
    image = add_image(tmp_path, "a.png", labels=None)
    with pytest.raises(DataError) as err:
        index_split([image], 1, "train", "data.yaml")
    message = str(err.value)
    assert str(tmp_path / "labels" / "train") in message
    assert "data.yaml" in message and "train" in message


def test_empty_image_list_raises(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="lists no images"):
        index_split([], 1, "val", "data.yaml")


def test_split_with_every_image_bad_raises(tmp_path: Path, logs) -> None:
    bad = add_image(tmp_path, "a.png", labels="5 0.5 0.5 0.2 0.2\n")
    empty = tmp_path / "images" / "train" / "b.jpg"
    empty.write_bytes(b"")
    with pytest.raises(DataError) as err:
        index_split([bad, empty], 1, "train", "data.yaml")
    message = str(err.value)
    assert "no usable image" in message and "2 skipped" in message
    assert str(bad) in message and "class 5" in message
    assert len(warnings_of(logs)) == 2  # each file was still named


def test_summary_line_counts_images_boxes_backgrounds_and_skipped(tmp_path: Path, logs) -> None:
    images = [
        add_image(tmp_path, "a.png", labels="0 0.5 0.5 0.2 0.2\n0 0.2 0.2 0.1 0.1\n"),
        add_image(tmp_path, "b.png", labels="0 0.5 0.5 0.2 0.2\n"),
        add_image(tmp_path, "c.png", labels=None),
        add_image(tmp_path, "d.png", labels="0 0.5 0.5\n"),
    ]
    index = index_split(images, 1, "train", "data.yaml")
    assert index.summary("train") == "train: 3 images, 3 boxes, 1 backgrounds, 1 skipped"
    assert "train: 3 images, 3 boxes, 1 backgrounds, 1 skipped" in infos_of(logs)


def test_label_files_without_images_are_warned(tmp_path: Path, logs) -> None:
    image = add_image(tmp_path, "a.png", labels="0 0.5 0.5 0.2 0.2\n")
    orphan = tmp_path / "labels" / "train" / "gone.txt"
    orphan.write_text("0 0.5 0.5 0.2 0.2\n")
    index = index_split([image], 1, "train", "data.yaml")
    assert len(index.records) == 1
    assert any("1 label files have no image" in m and str(orphan) in m for m in warnings_of(logs))


# ---------------------------------------------------------------------------------------------------------------
# index_split: the JSON cache


@pytest.fixture
def count_checks(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Records every file index_split actually checks (a cache hit checks none)."""
    checked: list[Path] = []
    real = data._check_one

    def spy(image: Path, nc: int):
        checked.append(image)
        return real(image, nc)

    monkeypatch.setattr(data, "_check_one", spy)
    return checked


def test_second_index_reads_the_cache(tmp_path: Path, cache: Path, count_checks: list[Path]) -> None:
    images = [add_image(tmp_path, "a.png", labels="0 0.5 0.5 0.2 0.2\n"), add_image(tmp_path, "b.png")]
    first = index_split(images, 1, "train", "data.yaml")
    assert len(count_checks) == 2
    files = list((cache / "labels").glob("*.json"))
    assert len(files) == 1
    assert json.loads(files[0].read_text())["results"][0][0]["path"] == str(images[0])
    second = index_split(images, 1, "train", "data.yaml")
    assert len(count_checks) == 2  # nothing re-checked
    assert [r.path for r in second.records] == [r.path for r in first.records]
    np.testing.assert_array_equal(second.records[0].labels, first.records[0].labels)
    assert [p for p in tmp_path.rglob("*.json") if not p.is_relative_to(cache)] == []  # nothing beside the data


def test_cache_is_keyed_on_nc(tmp_path: Path, count_checks: list[Path]) -> None:
    image = add_image(tmp_path, "a.png", labels="2 0.5 0.5 0.2 0.2\n")
    assert len(index_split([image], 3, "train", "data.yaml").records) == 1
    with pytest.raises(DataError, match="no usable image"):  # class 2 is out of range for nc=2
        index_split([image], 2, "train", "data.yaml")
    assert len(count_checks) == 2


def test_changed_label_file_invalidates_the_cache(tmp_path: Path, count_checks: list[Path]) -> None:
    image = add_image(tmp_path, "a.png", labels="0 0.5 0.5 0.2 0.2\n")
    index_split([image], 2, "train", "data.yaml")
    labels = label_path(image)
    labels.write_text("1 0.5 0.5 0.2 0.2\n0 0.1 0.1 0.1 0.1\n")  # new size
    (record,) = index_split([image], 2, "train", "data.yaml").records
    assert len(record.labels) == 2
    assert len(count_checks) == 2
    stat = labels.stat()
    labels.write_text("1 0.5 0.5 0.3 0.2\n0 0.1 0.1 0.1 0.1\n")  # same size: only the mtime tells
    os.utime(labels, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    (record,) = index_split([image], 2, "train", "data.yaml").records
    assert sorted(record.labels[:, 3].tolist()) == pytest.approx([0.1, 0.3])
    assert len(count_checks) == 3


def test_new_label_file_invalidates_the_cache(tmp_path: Path) -> None:
    images = [add_image(tmp_path, "a.png", labels="0 0.5 0.5 0.2 0.2\n"), add_image(tmp_path, "b.png", labels=None)]
    assert index_split(images, 1, "train", "data.yaml").boxes == 1
    write_labels(images[1], "0 0.5 0.5 0.2 0.2\n")
    assert index_split(images, 1, "train", "data.yaml").boxes == 2


def test_corrupt_cache_file_is_ignored_and_rewritten(tmp_path: Path, cache: Path,
                                                     count_checks: list[Path]) -> None:
    image = add_image(tmp_path, "a.png", labels="0 0.5 0.5 0.2 0.2\n")
    index_split([image], 1, "train", "data.yaml")
    (file,) = (cache / "labels").glob("*.json")
    file.write_text("{not json")
    assert len(index_split([image], 1, "train", "data.yaml").records) == 1
    assert len(count_checks) == 2
    assert json.loads(file.read_text())["key"]


def test_index_works_without_a_creatable_cache_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      count_checks: list[Path]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("REPNAS_CACHE_DIR", str(blocker / "cache"))  # its parent is a file: mkdir fails
    image = add_image(tmp_path, "a.png", labels="0 0.5 0.5 0.2 0.2\n")
    for _ in range(2):
        index = index_split([image], 1, "train", "data.yaml")
        assert len(index.records) == 1 and index.boxes == 1
    assert len(count_checks) == 2  # no cache: checked each time
    assert blocker.read_text() == ""


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_index_works_with_a_read_only_cache_folder(tmp_path: Path, cache: Path) -> None:
    cache.mkdir()
    cache.chmod(0o555)
    try:
        image = add_image(tmp_path, "a.png", labels="0 0.5 0.5 0.2 0.2\n")
        assert len(index_split([image], 1, "train", "data.yaml").records) == 1
        assert list(cache.iterdir()) == []
    finally:
        cache.chmod(0o755)


def test_use_cache_false_writes_no_cache(tmp_path: Path, cache: Path) -> None:
    image = add_image(tmp_path, "a.png", labels="0 0.5 0.5 0.2 0.2\n")
    index_split([image], 1, "train", "data.yaml", use_cache=False)
    assert not cache.exists()


# ---------------------------------------------------------------------------------------------------------------
# geometry: letterbox and rect validation batches


def test_letterbox_keeps_aspect_and_returns_ratio_and_pad() -> None:
    img = np.full((50, 100, 3), 200, np.uint8)
    out, ratio, pad = letterbox(img, (64, 64))
    assert out.shape == (64, 64, 3)
    assert ratio == pytest.approx((0.64, 0.64))
    assert pad == pytest.approx((0.0, 16.0))
    assert (out[:16] == PAD_VALUE).all() and (out[48:] == PAD_VALUE).all()
    assert (out[16:48] == 200).all()


def test_letterbox_odd_pad_is_split_as_yolov5() -> None:
    img = np.full((30, 100, 3), 200, np.uint8)
    out, ratio, pad = letterbox(img, (64, 64))  # new size 64x19: 45 rows of padding
    assert ratio == pytest.approx((19 / 30, 0.64))
    assert pad == pytest.approx((0.0, 22.5))
    rows = np.nonzero((out[:, :, 0] == 200).all(1))[0]
    assert (rows.min(), rows.max()) == (22, 40)  # top = round(22.5 - 0.1)


def test_letterbox_without_scaleup_only_pads() -> None:
    img = np.full((20, 30, 3), 200, np.uint8)
    out, ratio, pad = letterbox(img, (64, 64), scaleup=False)
    assert ratio == (1.0, 1.0)
    assert pad == (17.0, 22.0)
    assert (out[22:42, 17:47] == 200).all()
    assert (out == 200).sum() == 20 * 30 * 3


def boxes_to_original(labels: torch.Tensor, image: torch.Tensor, shapes) -> np.ndarray:
    """(n, 6) normalised input labels -> (n, 4) xyxy pixels of the original image, via `shapes`."""
    _, height, width = image.shape
    (_, _), ((gain_h, gain_w), (pad_w, pad_h)) = shapes
    cx, cy, w, h = (labels[:, k].numpy().astype(np.float64) for k in range(2, 6))
    x1, x2 = (cx - w / 2) * width, (cx + w / 2) * width
    y1, y2 = (cy - h / 2) * height, (cy + h / 2) * height
    return np.stack([(x1 - pad_w) / gain_w, (y1 - pad_h) / gain_h, (x2 - pad_w) / gain_w, (y2 - pad_h) / gain_h], 1)


def assert_white_inside(image: torch.Tensor, labels: torch.Tensor, margin: float = 2.0) -> None:
    """The white rectangle of the input image lies inside the (single) label box, ± margin pixels."""
    _, height, width = image.shape
    ys, xs = np.nonzero(image.numpy().min(0) > 230)
    (_, _, cx, cy, w, h) = labels[0].tolist()
    assert xs.min() >= (cx - w / 2) * width - margin and xs.max() + 1 <= (cx + w / 2) * width + margin
    assert ys.min() >= (cy - h / 2) * height - margin and ys.max() + 1 <= (cy + h / 2) * height + margin


VARIED = {"wide.png": (500, 375, (40, 60, 300, 200)), "tall.png": (333, 500, (100, 250, 320, 480)),
          "photo.png": (640, 427, (10, 300, 630, 420)), "square.png": (200, 200, (50, 50, 60, 70))}


@pytest.mark.parametrize("imgsz, batch", [(128, 2), (96, 1), (160, 4)])
def test_rect_validation_maps_boxes_back_to_the_original(tmp_path: Path, imgsz: int, batch: int) -> None:
    images = []
    for name, (width, height, box) in VARIED.items():
        image = save_image(tmp_path / "images" / "val" / name, width, height, box=box)
        write_labels(image, yolo_line(0, box, width, height))
        images.append(image)
    index = index_split(images, 1, "val", "data.yaml")
    dataset = YoloDataset(index.records, imgsz, rect=True, batch_size=batch)
    for k in range(len(dataset)):
        image, labels, path, shapes = dataset[k]
        width, height, box = VARIED[Path(path).name]
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        assert image.shape[1] % 32 == 0 and image.shape[2] % 32 == 0
        assert max(image.shape[1:]) <= imgsz + 32
        assert shapes[0] == (height, width)
        np.testing.assert_allclose(boxes_to_original(labels, image, shapes)[0], box, atol=1.0)
        assert_white_inside(image, labels)
    shapes_seen = []
    for images_batch, labels_batch, paths, _ in make_loader(dataset, batch, shuffle=False):
        assert images_batch.shape[0] == len(paths) <= batch  # one shape per batch, or stacking would fail
        assert labels_batch[:, 0].tolist() == list(range(len(paths)))
        shapes_seen.append(tuple(images_batch.shape[2:]))
    assert len(shapes_seen) == -(-len(VARIED) // batch)


def test_square_validation_without_rect_is_imgsz(tmp_path: Path) -> None:
    width, height, box = VARIED["tall.png"]
    image = save_image(tmp_path / "images" / "val" / "tall.png", width, height, box=box)
    write_labels(image, yolo_line(0, box, width, height))
    dataset = YoloDataset(index_split([image], 1, "val", "data.yaml").records, 96)
    image_t, labels, _, shapes = dataset[0]
    assert image_t.shape == (3, 96, 96)
    np.testing.assert_allclose(boxes_to_original(labels, image_t, shapes)[0], box, atol=1.0)
    assert_white_inside(image_t, labels)


def test_rect_validation_on_raccoon(logs) -> None:
    if not RACCOON.is_file():
        pytest.skip(f"{RACCOON} is absent: this test reads ../shared/data/raccoon (set REPNAS_SHARED)")
    cfg = load_data_config(RACCOON)
    assert cfg.names == ("raccoon",)
    index = index_split(cfg.val, cfg.nc, "val", str(cfg.source))
    assert len(index.records) == 40 and index.skipped == ()
    originals = {str(r.path): r for r in index.records}
    dataset = YoloDataset(index.records, 160, rect=True, batch_size=8)
    checked = 0
    for k in range(len(dataset)):
        image, labels, path, shapes = dataset[k]
        record = originals[path]
        assert image.shape[1] % 32 == 0 and image.shape[2] % 32 == 0
        assert shapes[0] == (record.height, record.width)
        want = record.labels[np.argsort(record.labels[:, 1], kind="stable")]
        got = boxes_to_original(labels[np.argsort(labels[:, 2].numpy(), kind="stable")], image, shapes)
        w0, h0 = record.width, record.height
        expected = np.stack([(want[:, 1] - want[:, 3] / 2) * w0, (want[:, 2] - want[:, 4] / 2) * h0,
                             (want[:, 1] + want[:, 3] / 2) * w0, (want[:, 2] + want[:, 4] / 2) * h0], 1)
        np.testing.assert_allclose(got, expected, atol=1.0)
        checked += len(got)
    assert checked == 44


def test_raccoon_train_split_indexes_cleanly(logs) -> None:
    if not RACCOON.is_file():
        pytest.skip(f"{RACCOON} is absent: this test reads ../shared/data/raccoon (set REPNAS_SHARED)")
    cfg = load_data_config(RACCOON)
    index = index_split(cfg.train, cfg.nc, "train", str(cfg.source))
    assert (len(index.records), index.boxes, index.skipped) == (160, 173, ())
    assert any("3 greyscale image(s) converted" in m for m in warnings_of(logs))


# ---------------------------------------------------------------------------------------------------------------
# augmentation keeps boxes on their objects

AUG_SIZES = [(64, 48), (48, 64), (64, 64), (80, 60), (40, 40)]
NO_HSV = AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0)


def white_rect_dataset(root: Path, hyp: AugmentConfig, imgsz: int = 64, *, full: bool = False) -> YoloDataset:
    """Grey canvases each with one off-centre white rectangle exactly at its label (full: the whole image)."""
    images = []
    for k, (width, height) in enumerate(AUG_SIZES):
        box = (0, 0, width, height) if full else (width // 8, height // 5, width * 5 // 8, height * 3 // 5)
        image = save_image(root / "images" / "train" / f"{k}.png", width, height, box=box)
        write_labels(image, yolo_line(k % 3, box, width, height))
        images.append(image)
    records = index_split(images, 3, "train", "data.yaml").records
    return YoloDataset(records, imgsz, augment=True, hyp=hyp)


def pixel_boxes(labels: torch.Tensor, size: int) -> np.ndarray:
    cx, cy, w, h = (labels[:, k].numpy() for k in range(2, 6))
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1) * size


def touching_border(mask: np.ndarray) -> np.ndarray:
    """The parts of `mask` 4-connected to the image border."""
    reach = np.zeros_like(mask)
    reach[0], reach[-1], reach[:, 0], reach[:, -1] = mask[0], mask[-1], mask[:, 0], mask[:, -1]
    while True:
        grown = reach.copy()
        grown[1:] |= reach[:-1]
        grown[:-1] |= reach[1:]
        grown[:, 1:] |= reach[:, :-1]
        grown[:, :-1] |= reach[:, 1:]
        grown &= mask
        if (grown == reach).all():
            return reach
        reach = grown


def assert_boxes_on_objects(image: torch.Tensor, labels: torch.Tensor, size: int, min_cover: float = 0.75) -> None:
    """White pixels lie inside a label box (± 2 px) and every box of some size is mostly white.

    White outside every box is allowed only where it touches the image border: an object mostly cut off by
    the border is dropped, as YOLOv5's box_candidates does.
    """
    assert image.shape == (3, size, size) and image.dtype == torch.uint8
    lab = labels[:, 2:].numpy()
    assert ((lab >= 0) & (lab <= 1)).all()
    boxes = pixel_boxes(labels, size)
    assert (boxes >= -1e-3).all() and (boxes <= size + 1e-3).all()
    darkest = image.numpy().min(0)  # (S, S): white only where every channel is white
    white = darkest > 230
    inside = np.zeros_like(white)
    for x1, y1, x2, y2 in boxes:
        top, left = max(0, int(np.floor(y1 - 2))), max(0, int(np.floor(x1 - 2)))
        inside[top:int(np.ceil(y2 + 2)), left:int(np.ceil(x2 + 2))] = True
        xi1, yi1, xi2, yi2 = (round(float(v)) for v in (x1, y1, x2, y2))
        if xi2 - xi1 >= 6 and yi2 - yi1 >= 6:
            cover = (darkest[yi1:yi2, xi1:xi2] > (GREY + WHITE) / 2).mean()
            assert cover >= min_cover, f"box {x1:.1f} {y1:.1f} {x2:.1f} {y2:.1f} is only {cover:.0%} object"
    stray = white & ~inside
    assert not (stray & ~touching_border(white)).any(), "white pixels outside every label box"


@pytest.mark.parametrize(
    "hyp",
    [NO_HSV, AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0, fliplr=1.0), AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0, flipud=1.0),
     AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0, mosaic=1.0),
     AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0, mosaic=1.0, fliplr=1.0, flipud=1.0)],
    ids=["default", "fliplr", "flipud", "mosaic", "mosaic-flips"],
)
def test_augmentation_keeps_boxes_on_their_objects(tmp_path: Path, hyp: AugmentConfig) -> None:
    dataset = white_rect_dataset(tmp_path, hyp)
    boxes = 0
    for k in range(40):
        torch.manual_seed(k)
        image, labels, _, _ = dataset[k % len(dataset)]
        assert_boxes_on_objects(image, labels, 64)
        boxes += len(labels)
    assert boxes >= 30  # most objects survive scale and translate


def test_fliplr_mirrors_image_and_labels(tmp_path: Path) -> None:
    plain = white_rect_dataset(tmp_path, AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0, fliplr=0.0))
    flipped = white_rect_dataset(tmp_path, AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0, fliplr=1.0))
    for k in range(len(plain)):
        torch.manual_seed(k)
        image, labels, _, _ = plain[k]
        torch.manual_seed(k)
        image_f, labels_f, _, _ = flipped[k]
        torch.testing.assert_close(image_f, image.flip(2))
        assert len(labels) == len(labels_f) == 1
        torch.testing.assert_close(labels_f[:, 2], 1 - labels[:, 2])
        torch.testing.assert_close(labels_f[:, [0, 1, 3, 4, 5]], labels[:, [0, 1, 3, 4, 5]])


def test_augmentation_keeps_classes_and_scales_boxes_with_the_image(tmp_path: Path) -> None:
    hyp = AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0, translate=0.0, scale=0.0, fliplr=0.0)
    dataset = white_rect_dataset(tmp_path, hyp)
    for k, record in enumerate(dataset.records):
        image, labels, _, _ = dataset[k]
        long_side = max(record.width, record.height)
        want = record.labels[0, 3:] * np.array([record.width, record.height]) * 64 / long_side / 64
        assert labels[0, 1] == record.labels[0, 0]
        np.testing.assert_allclose(labels[0, 4:].numpy(), want, atol=1e-3)
        assert_boxes_on_objects(image, labels, 64, min_cover=0.9)


def test_hsv_augmentation_changes_colours_not_boxes(tmp_path: Path) -> None:
    dataset = white_rect_dataset(tmp_path, AugmentConfig(hsv_h=0.5, hsv_s=0.9, hsv_v=0.9, translate=0, scale=0,
                                                         fliplr=0))
    reference = white_rect_dataset(tmp_path, AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0, translate=0, scale=0,
                                                           fliplr=0))
    torch.manual_seed(0)
    image, labels, _, _ = dataset[0]
    image_ref, labels_ref, _, _ = reference[0]
    torch.testing.assert_close(labels, labels_ref)
    assert not torch.equal(image, image_ref)


def test_mosaic_boxes_stop_at_the_canvas_edge(tmp_path: Path) -> None:
    hyp = AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0, mosaic=1.0, scale=0.9)  # YOLOv5's hyp.scratch-high scale
    dataset = white_rect_dataset(tmp_path, hyp, full=True)
    for k in range(40):
        torch.manual_seed(k)
        image, labels, _, _ = dataset[k % len(dataset)]
        assert_boxes_on_objects(image, labels, 64)


def test_collate_stacks_images_and_numbers_labels_by_image(tmp_path: Path) -> None:
    dataset = white_rect_dataset(tmp_path, AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0, mosaic=1.0))
    torch.manual_seed(0)
    items = [dataset[k] for k in range(4)]
    counts = [len(item[1]) for item in items]
    images, labels, paths, shapes = collate(items)
    assert images.shape == (4, 3, 64, 64) and images.dtype == torch.uint8
    assert labels.shape == (sum(counts), 6) and labels.dtype == torch.float32
    assert labels[:, 0].tolist() == [k for k, n in enumerate(counts) for _ in range(n)]
    assert paths == [item[2] for item in items]
    assert len(shapes) == 4
    torch.testing.assert_close(images[2], items[2][0])


@pytest.mark.parametrize("bad", [{"scale": 1.0}, {"fliplr": 1.5}, {"mosaic": -0.1}, {"hsv_v": 2}])
def test_augment_config_rejects_out_of_range_values(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        AugmentConfig(**bad)


# ---------------------------------------------------------------------------------------------------------------
# make_loader


def test_shuffling_is_reproducible_for_a_seed(tmp_path: Path) -> None:
    images = [add_image(tmp_path, f"{k:02d}.png", width=32, height=32, labels="0 0.5 0.5 0.2 0.2\n")
              for k in range(12)]
    dataset = YoloDataset(index_split(images, 1, "train", "data.yaml").records, 32)

    def order(seed: int) -> list[str]:
        return [p for _, _, paths, _ in make_loader(dataset, 5, shuffle=True, seed=seed) for p in paths]

    first = order(3)
    assert first == order(3)
    assert sorted(first) == sorted(str(p) for p in images)
    assert first != order(4)
    assert [p for _, _, paths, _ in make_loader(dataset, 5, shuffle=False) for p in paths] == [str(p) for p in images]


def test_rect_dataset_refuses_shuffling(tmp_path: Path) -> None:
    image = add_image(tmp_path, "a.png", labels="0 0.5 0.5 0.2 0.2\n")
    dataset = YoloDataset(index_split([image], 1, "val", "data.yaml").records, 64, rect=True)
    with pytest.raises(ValueError, match="shuffle=False"):
        make_loader(dataset, 4, shuffle=True)
    assert len(make_loader(dataset, 4, shuffle=False)) == 1
