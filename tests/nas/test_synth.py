"""nas.synth: the synthetic shapes dataset is valid YOLO data, deterministic, varied, and cached once."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from nas import synth
from nas.data import index_split, load_data_config
from nas.synth import SHAPES, SynthConfig, default_dataset, make_synthetic


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("REPNAS_CACHE_DIR", str(path))
    return path


def label_files(data_yaml: Path) -> dict[str, bytes]:
    root = data_yaml.parent
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "labels").rglob("*.txt"))}


def all_labels(data_yaml: Path) -> np.ndarray:
    """Every label row of the dataset, (n, 5) class cx cy w h."""
    rows = [np.loadtxt(p, ndmin=2).reshape(-1, 5) for p in sorted((data_yaml.parent / "labels").rglob("*.txt"))]
    return np.concatenate(rows)


@pytest.fixture(scope="module")
def sixty(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 images of every shape class: enough to see all classes and the range of sizes."""
    return make_synthetic(tmp_path_factory.mktemp("sixty"), SynthConfig(images=60, classes=len(SHAPES), imgsz=64))


def test_make_synthetic_writes_a_dataset_that_loads_with_nothing_skipped(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="repnas.data")
    data_yaml = make_synthetic(tmp_path / "ds", SynthConfig(images=20, classes=3, imgsz=64, seed=1))
    assert data_yaml == tmp_path / "ds" / "data.yaml"
    cfg = load_data_config(data_yaml)
    assert cfg.names == ("circle", "square", "triangle")
    assert cfg.root == tmp_path / "ds"
    assert (len(cfg.train), len(cfg.val)) == (16, 4)  # val_fraction 0.2
    assert not set(cfg.train) & set(cfg.val)
    boxes = 0
    for split, images in (("train", cfg.train), ("val", cfg.val)):
        index = index_split(images, cfg.nc, split, str(cfg.source))
        assert index.skipped == ()
        assert len(index.records) == len(images)
        assert all((r.height, r.width) == (64, 64) for r in index.records)
        boxes += index.boxes
    assert boxes >= 20  # one to five objects per image
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == []  # RGB images, no orphan labels


def test_val_fraction_sets_the_split_sizes(tmp_path: Path) -> None:
    cfg = load_data_config(make_synthetic(tmp_path, SynthConfig(images=20, imgsz=32, val_fraction=0.25)))
    assert (len(cfg.train), len(cfg.val)) == (15, 5)


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path: Path) -> None:
    config = SynthConfig(images=12, classes=3, imgsz=64, seed=1)
    first = make_synthetic(tmp_path / "a", config)
    again = make_synthetic(tmp_path / "b", config)
    other = make_synthetic(tmp_path / "c", SynthConfig(images=12, classes=3, imgsz=64, seed=2))
    labels = label_files(first)
    assert len(labels) == 12
    assert labels == label_files(again)
    assert first.read_bytes() == again.read_bytes()
    for image in sorted((first.parent / "images").rglob("*.jpg")):
        twin = again.parent / image.relative_to(first.parent)
        assert image.read_bytes() == twin.read_bytes()
    different = label_files(other)
    assert different.keys() == labels.keys()
    assert sum(different[k] != labels[k] for k in labels) >= 10


def test_synth_image_is_deterministic_in_seed_and_index() -> None:
    config = SynthConfig(images=10, imgsz=48, seed=3)
    image, labels = synth.synth_image(config, 4)
    image_again, labels_again = synth.synth_image(config, 4)
    assert labels == labels_again
    np.testing.assert_array_equal(np.asarray(image), np.asarray(image_again))
    assert synth.synth_image(config, 5)[1] != labels


def test_every_class_appears_across_sixty_images(sixty: Path) -> None:
    classes = all_labels(sixty)[:, 0]
    assert set(classes.astype(int).tolist()) == set(range(len(SHAPES)))
    assert (classes == classes.astype(int)).all()


def test_boxes_lie_in_the_image_and_span_small_to_large(sixty: Path) -> None:
    labels = all_labels(sixty)
    _, cx, cy, w, h = labels.T
    assert (w > 0).all() and (h > 0).all()
    tol = 1e-6  # labels are written with 6 decimals
    assert (cx - w / 2 >= -tol).all() and (cx + w / 2 <= 1 + tol).all()
    assert (cy - h / 2 >= -tol).all() and (cy + h / 2 <= 1 + tol).all()
    side = np.maximum(w, h)
    assert side.min() < 0.1
    assert side.max() > 0.3
    assert ((side >= 0.1) & (side <= 0.3)).any()


@pytest.mark.parametrize(
    "bad, field",
    [({"images": 9}, "--images"), ({"images": 2_000_000}, "--images"), ({"classes": 0}, "--classes"),
     ({"classes": len(SHAPES) + 1}, "--classes"), ({"imgsz": 31}, "--imgsz"), ({"imgsz": 8192}, "--imgsz")],
)
def test_synth_config_rejects_bad_values(bad: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field) as err:
        SynthConfig(**bad)
    assert str(next(iter(bad.values()))) in str(err.value)


@pytest.mark.parametrize("bad", [{"val_fraction": 1.0}, {"val_fraction": 1.5}, {"val_fraction": -0.2}, {"seed": -1}])
def test_synth_config_rejects_bad_val_fraction_and_seed(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        SynthConfig(**bad)


def test_default_dataset_is_generated_once_into_the_cache(cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="repnas.data")
    config = SynthConfig(images=12, imgsz=64)
    data_yaml = default_dataset(config)
    assert data_yaml == cache / "datasets" / config.key / "data.yaml"
    assert data_yaml.is_file()
    cfg = load_data_config(data_yaml)
    assert len(cfg.train) + len(cfg.val) == 12
    assert [p.name for p in (cache / "datasets").iterdir()] == [config.key]  # no temporary folder left behind
    stamps = {p: p.stat().st_mtime_ns for p in data_yaml.parent.rglob("*")}
    assert sum("generating" in r.getMessage() for r in caplog.records) == 1

    def must_not_run(*args, **kwargs):
        raise AssertionError("default_dataset regenerated an existing dataset")

    monkeypatch.setattr(synth, "make_synthetic", must_not_run)
    assert default_dataset(config) == data_yaml
    assert {p: p.stat().st_mtime_ns for p in data_yaml.parent.rglob("*")} == stamps
    assert sum("generating" in r.getMessage() for r in caplog.records) == 1


def test_default_dataset_is_keyed_on_the_config(cache: Path) -> None:
    small = default_dataset(SynthConfig(images=10, imgsz=32))
    other = default_dataset(SynthConfig(images=10, imgsz=32, seed=1))
    assert small != other
    assert small.parent.parent == other.parent.parent == cache / "datasets"


def test_sizes_objects_and_clutter_options(tmp_path: Path) -> None:
    cfg = SynthConfig(images=30, classes=2, imgsz=64, sizes=(0.3, 0.5), max_objects=2, clutter=False)
    assert cfg.key != SynthConfig(images=30, classes=2, imgsz=64).key and cfg.key.endswith("-plain-v1")
    data_yaml = make_synthetic(tmp_path / "plain", cfg)
    labels = all_labels(data_yaml)
    per_image = [len(np.loadtxt(p, ndmin=2)) for p in (data_yaml.parent / "labels").rglob("*.txt")]
    assert max(per_image) <= 2 and min(per_image) >= 1
    # a shape's box side is its drawn extent (0.3..0.5 of the image), less for thin rotations of a triangle
    assert labels[:, 3:].max() <= 0.5 * 1.34 + 1e-6 and np.median(labels[:, 3:]) >= 0.25
    assert make_synthetic(tmp_path / "again", cfg).parent.joinpath("labels", "train", "000000.txt").read_bytes() == \
        (data_yaml.parent / "labels" / "train" / "000000.txt").read_bytes()  # deterministic
    with pytest.raises(ValueError, match="--sizes MIN MAX"):
        SynthConfig(sizes=(0.5, 0.2))
    with pytest.raises(ValueError, match="--max-objects"):
        SynthConfig(max_objects=0)
