"""YOLO-format datasets: data.yaml, a checked and cached index of images and labels, letterboxing, augmentation.

Layout (ultralytics/YOLOv5): `data.yaml` with `path`, `train`, `val` (a folder, a list of folders, or a .txt list
of image paths), `names` (a list or a {index: name} dict) and optional `nc`; labels `class cx cy w h` (normalised)
in `labels/...txt` beside `images/...`. Every image and label file is checked once (decodes, EXIF orientation,
size, finite in-range labels) and the result is cached as JSON in a user cache folder keyed on file sizes and
mtimes, never beside the data (which may be read-only). Bad files are skipped with a warning naming the file and
the reason (once per process for the same files).

An image without a label file (or with an empty one) is a background image, as in YOLOv5: it is kept, trains as
"nothing here", and is counted in the split's summary line ("N backgrounds"). A label file without an image (none
of its stem in the image folders it serves, whichever split lists them) is warned about and ignored.
`check_dataset` refuses a dataset with nothing usable: a split with no readable image, or with no labelled box at
all (every image a background usually means the labels are misplaced), and warns about images that are in both
train and val (same file content).

Label lookup (`find_label`) is YOLOv5's rule (`img2label_paths` in utils/dataloaders.py): the last `images` folder of
the image's path becomes `labels` and the suffix `.txt`; with no `images` folder the label sits beside the image. Two
deliberate additions, each warned once per image folder: a label file whose path differs from that only in letter
case is used (YOLOv5 finds it on a case-insensitive file system, not on Linux); a label file the rule misses
(`<stem>.txt` beside an image in `images/`, or a `labels/` folder beside an image folder with another name) is not
used, so the image stays a background as in YOLOv5, and the warning and the summary name it with the expected path.
Split lists and label files may start with a UTF-8 byte-order mark (YOLOv5 skips such a label file as corrupt).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar, copy_context
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from nas.images import UnreadableImage, read_rgb
from space.errors import ConfigError
from space.yamlio import read_yaml

LOG = logging.getLogger("repnas.data")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".mpo"}
MIN_IMAGE_PX = 10
BOX_OVERSHOOT = 0.01  # normalised coordinates up to 1% outside the image are clipped; more is an error
CACHE_VERSION = 3  # 2: images decoded by mode and bit depth (nas.images); 32-bit and float images skipped
#                   3: label lookup (letter-case variants used; the lookup's outcome in the key)
_WARNED: set[tuple[str, str]] = set()  # (content key, split) or (file, "orphan") already warned about
_SAID: set[tuple[str, ...]] = set()  # info lines said once per process (`_info_once`): split summaries, roots
PAD_VALUE = 114  # YOLOv5's letterbox grey


class DataError(ConfigError):
    """A dataset that cannot be used: missing folders, a split with no usable image, names/nc disagreement."""


# ---------------------------------------------------------------------------------------------------------------
# data.yaml


@dataclass(frozen=True)
class DataConfig:
    """A resolved data.yaml: where the data is, the image files of each split, and the class names."""

    source: Path
    root: Path
    train: tuple[Path, ...]
    val: tuple[Path, ...]
    names: tuple[str, ...]

    @property
    def nc(self) -> int:
        return len(self.names)


def _names(raw, where: str) -> tuple[str, ...]:
    if isinstance(raw, list):
        if not raw:
            raise DataError(f"{where}: field 'names': empty list; give one name per class")
        return tuple(str(n) for n in raw)
    if isinstance(raw, dict):
        keys = sorted(raw)
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in keys) or keys != list(range(len(keys))):
            raise DataError(f"{where}: field 'names': keys {keys[:10]} must be the class indices 0..{len(keys) - 1}")
        if not keys:
            raise DataError(f"{where}: field 'names': empty mapping; give one name per class")
        return tuple(str(raw[k]) for k in keys)
    raise DataError(f"{where}: field 'names': {raw!r:.60} must be a list of names or an {{index: name}} mapping")


def _resolve_root(raw, yaml_path: Path) -> Path:
    if raw is None:
        return yaml_path.parent
    if not isinstance(raw, str):
        raise DataError(f"{yaml_path}: field 'path': {raw!r} must be a folder path")
    path = Path(raw).expanduser()
    if path.is_absolute():
        return path
    beside = (yaml_path.parent / path).resolve()
    if beside.is_dir():
        _info_once("%s: dataset root %s (path %r, relative to the data.yaml's folder)", yaml_path, beside, raw)
        return beside
    cwd = (Path.cwd() / path).resolve()
    if cwd.is_dir():
        _info_once("%s: dataset root %s (path %r is not beside the data.yaml; taken relative to the working "
                   "directory)", yaml_path, cwd, raw)
        return cwd
    return beside


def _list_split(entry, root: Path, where: str, split: str) -> tuple[Path, ...]:
    entries = entry if isinstance(entry, list) else [entry]
    files: list[Path] = []
    for item in entries:
        if not isinstance(item, str) or not item:
            raise DataError(f"{where}: field '{split}': {item!r} must be a folder, a .txt list or a list of them")
        path = Path(item).expanduser()
        path = path if path.is_absolute() else root / path
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.suffix == ".txt" and path.is_file():
            for line in path.read_text(encoding="utf-8-sig", errors="replace").splitlines():  # -sig: drops a BOM
                line = line.strip()
                if line:
                    p = Path(line)
                    files.append(p if p.is_absolute() else (path.parent / p if line.startswith("./") else root / p))
        elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            files.append(path)
        else:
            raise DataError(
                f"{where}: field '{split}': {path} does not exist; fix `{split}` (relative to `path`: {root})"
            )
    return tuple(files)


def load_data_config(path: str | Path) -> DataConfig:
    """Read and resolve a data.yaml (ultralytics/YOLOv5 format)."""
    path = Path(path)
    d = read_yaml(path, DataError)
    if not isinstance(d, dict):
        raise DataError(f"{path}: a data.yaml is a mapping with path, train, val and names")
    for key in ("train", "val", "names"):
        if key not in d:
            raise DataError(f"{path}: field '{key}' is missing; a data.yaml needs train, val and names")
    names = _names(d["names"], str(path))
    if "nc" in d and d["nc"] != len(names):
        raise DataError(
            f"{path}: field 'nc': {d['nc']!r} but names lists {len(names)} classes; make them agree (or drop nc)"
        )
    root = _resolve_root(d.get("path"), path)
    train = _list_split(d["train"], root, str(path), "train")
    val = _list_split(d["val"], root, str(path), "val")
    return DataConfig(source=path, root=root, train=train, val=val, names=names)


# ---------------------------------------------------------------------------------------------------------------
# label files: YOLOv5's rule, and the label files it misses

LABEL_ANCESTORS = 3  # for an image folder not named `images`: how many folders up a sibling `labels/` is looked for
_LISTINGS: ContextVar[dict[Path, dict[str, tuple[str, ...]]] | None] = ContextVar("repnas_listings", default=None)


def _images_folder(parts: Sequence[str]) -> int | None:
    """Index of the last folder (not the file) named exactly `images`, or None."""
    for k in range(len(parts) - 2, -1, -1):
        if parts[k] == "images":
            return k
    return None


def label_path(image: Path) -> Path:
    """YOLOv5's rule (`img2label_paths` in utils/dataloaders.py): the last `images` folder in the path becomes
    `labels`, the suffix `.txt`; with no `images` folder the label sits beside the image. Case-sensitive, as there."""
    parts = list(image.parts)
    k = _images_folder(parts)
    if k is not None:
        parts[k] = "labels"
    return Path(*parts).with_suffix(".txt")


@dataclass(frozen=True)
class LabelLookup:
    """Where one image's label file is.

    expected: YOLOv5's path for it (`label_path`). used: the label file read, `expected` or a file whose path differs
    from it only in letter case; None for a background. elsewhere: a label file for this image at a place the rule
    does not look (not read); only set when `used` is None.
    """

    image: Path
    expected: Path
    used: Path | None = None
    elsewhere: Path | None = None

    @property
    def case_only(self) -> bool:
        return self.used is not None and self.used != self.expected


def _listing(folder: Path) -> dict[str, tuple[str, ...]]:
    """The names in `folder` by their case-folded form ({} if it is no readable folder); listed once per index."""
    memo = _LISTINGS.get()
    if memo is not None and folder in memo:
        return memo[folder]
    try:
        names = sorted(os.listdir(folder))
    except OSError:  # missing, not a folder, unreadable
        names = []
    by_key: dict[str, tuple[str, ...]] = {}
    for name in names:
        by_key[name.casefold()] = (*by_key.get(name.casefold(), ()), name)
    if memo is not None:
        memo[folder] = by_key
    return by_key


def _case_variants(parts: Sequence[str], fixed: int) -> list[Path]:
    """Existing files whose path is `parts` with `parts[fixed:]` matched ignoring letter case (sorted by name)."""
    folders = [Path(*parts[:fixed])]
    for name in parts[fixed:-1]:
        folders = [d / n for d in folders for n in _listing(d).get(name.casefold(), ()) if (d / n).is_dir()]
    return [d / n for d in folders for n in _listing(d).get(parts[-1].casefold(), ()) if (d / n).is_file()]


def find_label(image: Path) -> LabelLookup:
    """The label file of `image`: YOLOv5's path if it is a file, else a letter-case variant of it (used), else a
    label file the rule misses (reported, not used).

    The candidates, in order: `label_path(image)` (the exact match wins); the same path with the `labels` folder, the
    folders below it and the file name (stem and `.txt`) matched ignoring case; then, not used: for an image in an
    `images` folder, `<stem>.txt` beside the image (any case); for an image with no `images` folder in its path, a
    `labels` folder (any case) in place of its folder or one of the next LABEL_ANCESTORS - 1 folders up
    (`imgs/a.jpg` -> `labels/a.txt`, `JPEGImages/train/a.jpg` -> `labels/train/a.txt`).
    """
    expected = label_path(image)
    if expected.is_file():
        return LabelLookup(image, expected, expected)
    parts = image.parts
    k = _images_folder(parts)
    found = _case_variants(expected.parts, len(parts) - 1 if k is None else k)
    if found:
        return LabelLookup(image, expected, found[0])
    if k is not None:
        beside = image.with_suffix(".txt").parts
        found = _case_variants(beside, len(beside) - 1)
    else:
        lowest = 1 if image.anchor else 0  # never replace the root
        for j in range(len(parts) - 2, max(len(parts) - 2 - LABEL_ANCESTORS, lowest - 1), -1):
            found = _case_variants((*parts[:j], "labels", *parts[j + 1:-1], expected.name), j)
            if found:
                break
    return LabelLookup(image, expected, None, found[0] if found else None)


def _lookup_warnings(lookups: Sequence[LabelLookup], split: str) -> list[str]:
    """One line per image folder with label files found only by ignoring case, one per folder with label files
    elsewhere (not used)."""
    case_only: dict[Path, list[LabelLookup]] = {}
    elsewhere: dict[Path, list[LabelLookup]] = {}
    for lookup in lookups:
        if lookup.case_only:
            case_only.setdefault(lookup.image.parent, []).append(lookup)
        elif lookup.elsewhere is not None:
            elsewhere.setdefault(lookup.image.parent, []).append(lookup)
    lines = []
    for folder, found in case_only.items():
        lines.append(f"{folder}: {len(found)} label files of {split} images differ from YOLOv5's label path only in "
                     f"letter case (e.g. {found[0].used}, expected {found[0].expected}); they are used, but YOLOv5 on "
                     "Linux would not find them: rename them")
    for folder, found in elsewhere.items():
        fix = ("move them there" if _images_folder(found[0].image.parts) is not None
               else "move them there, or put the images in an `images` folder beside `labels`")
        lines.append(f"{folder}: {len(found)} {split} images have a label file where YOLOv5's rule does not look "
                     f"(e.g. {found[0].elsewhere}, expected {found[0].expected}); not used, these images train as "
                     f"backgrounds: {fix}")
    return lines


def _orphan_labels(lookups: Sequence[LabelLookup]) -> list[Path]:
    """Label files (`*.txt`, any case) in the split's label folders that no image on disk matches by stem.

    An image in the folders the split's images come from counts even if it is in another split (train and val as
    .txt lists over one images/ + labels/ share a labels folder).
    """
    used = {lookup.used for lookup in lookups if lookup.used is not None}
    image_folders: dict[Path, set[Path]] = {}  # label folder -> the image folders whose labels it holds
    for lookup in lookups:
        for label in {lookup.expected, lookup.used} - {None}:
            image_folders.setdefault(label.parent, set()).add(lookup.image.parent)
    orphans = []
    for folder in sorted(image_folders):
        stems = {Path(name).stem.casefold() for d in image_folders[folder] for names in _listing(d).values()
                 for name in names if Path(name).suffix.lower() in IMAGE_SUFFIXES}
        for names in _listing(folder).values():
            for name in names:
                path = folder / name
                if (path.suffix.lower() == ".txt" and path not in used and path.stem.casefold() not in stems
                        and path.is_file()):
                    orphans.append(path)
    return sorted(orphans)


# ---------------------------------------------------------------------------------------------------------------
# checking images and labels (once, cached)


@dataclass(frozen=True)
class ImageRecord:
    """A usable image: its file, its size after EXIF orientation, and its labels (n, 5) class cx cy w h."""

    path: Path
    height: int
    width: int
    labels: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class SplitIndex:
    """The checked contents of one split."""

    records: tuple[ImageRecord, ...]
    skipped: tuple[tuple[str, str], ...]  # (file, reason)
    notes: dict[str, int]
    # label lookups of note (records only): misses (a label file elsewhere, not used) and letter-case matches (used)
    misplaced: tuple[LabelLookup, ...] = ()
    case_only: tuple[LabelLookup, ...] = ()
    orphans: tuple[Path, ...] = ()  # label files in the split's label folders that no image matches
    # note -> the files it happened in, in index order: the label file for a label note, else the image
    note_files: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def boxes(self) -> int:
        return sum(len(r.labels) for r in self.records)

    def summary(self, split: str) -> str:
        backgrounds = sum(1 for r in self.records if len(r.labels) == 0)
        elsewhere = (f"{len(self.misplaced)} with a label file elsewhere (e.g. {self.misplaced[0].elsewhere}), "
                     if self.misplaced else "")
        text = (f"{split}: {len(self.records)} images, {self.boxes} boxes, {backgrounds} backgrounds, {elsewhere}"
                f"{len(self.skipped)} skipped")
        notes = ", ".join(f"{v} {k}" for k, v in sorted(self.notes.items()) if v)
        return f"{text} ({notes})" if notes else text


class _Bad(Exception):
    """A file that cannot be used; the message is the reason."""


LABEL_NOTES = ("label lines clipped", "duplicate labels dropped")  # notes about a label file (others: the image)


def _files_text(files: tuple[str, ...], shown: int = 3) -> str:
    """'a, b, c and 4 more files' (the first `shown` of `files`)."""
    more = f" and {len(files) - shown} more files" if len(files) > shown else ""
    return ", ".join(files[:shown]) + more


def _parse_labels(text: str, nc: int) -> tuple[np.ndarray, dict[str, int]]:
    rows, notes = [], dict.fromkeys(LABEL_NOTES, 0)
    for n, line in enumerate(text.splitlines(), 1):
        tokens = line.split()
        if not tokens:
            continue
        try:
            values = [float(t) for t in tokens]
        except ValueError:
            raise _Bad(f"line {n}: {line.strip()!r:.60} is not numbers") from None
        if len(values) > 5 and len(values) % 2 == 1 and len(values) >= 7:  # a polygon: class x1 y1 x2 y2 ...
            xy = np.array(values[1:]).reshape(-1, 2)
            x1, y1 = xy.min(0)
            x2, y2 = xy.max(0)
            values = [values[0], (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]
        if len(values) != 5:
            raise _Bad(f"line {n}: {len(values)} numbers, a label line is 'class cx cy w h'")
        if not all(math.isfinite(v) for v in values):
            raise _Bad(f"line {n}: non-finite value in {line.strip()!r:.60}")
        cls, cx, cy, w, h = values
        if cls != int(cls) or not 0 <= cls < nc:
            raise _Bad(f"line {n}: class {tokens[0]} is not an index in 0..{nc - 1}")
        if w <= 0 or h <= 0:
            raise _Bad(f"line {n}: box size {w:g}x{h:g} must be positive")
        x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        if min(x1, y1) < -BOX_OVERSHOOT or max(x2, y2) > 1 + BOX_OVERSHOOT:
            raise _Bad(f"line {n}: box {cx:g} {cy:g} {w:g} {h:g} lies outside the image (normalised 0..1)")
        if min(x1, y1) < 0 or max(x2, y2) > 1:
            notes["label lines clipped"] += 1
            x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, 1.0), min(y2, 1.0)
            if x2 - x1 <= 0 or y2 - y1 <= 0:
                raise _Bad(f"line {n}: box is empty once clipped to the image")
        rows.append([cls, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])
    labels = np.array(rows, dtype=np.float32).reshape(-1, 5)
    if len(labels):
        unique = np.unique(labels, axis=0)
        notes["duplicate labels dropped"] = len(labels) - len(unique)
        labels = unique
    return labels, notes


def _check_one(image: Path, nc: int) -> tuple[dict | None, str | None, dict[str, int]]:
    """(record dict, None, notes) for a usable image, (None, reason, {}) otherwise."""
    notes: dict[str, int] = {}
    try:
        try:
            decoded = read_rgb(image, verify=True)  # by mode and bit depth, as YOLOv5's cv2.imread
        except UnreadableImage as err:
            raise _Bad(err.reason) from None
        height, width = decoded.pixels.shape[:2]  # (H, W, 3), EXIF-oriented
        if min(width, height) < MIN_IMAGE_PX:
            raise _Bad(f"image is {width}x{height}, smaller than {MIN_IMAGE_PX} px")
        notes |= dict.fromkeys(decoded.conversions, 1)
        lp = find_label(image).used  # YOLOv5's path, or a letter-case variant of it
        labels = np.zeros((0, 5), np.float32)
        if lp is not None:
            try:
                text = lp.read_text(encoding="utf-8-sig")  # -sig: drops a BOM, where YOLOv5 skips the file
            except UnicodeDecodeError:
                raise _Bad(f"label file {lp} is not UTF-8 text") from None
            try:
                labels, label_notes = _parse_labels(text, nc)
            except _Bad as err:
                raise _Bad(f"label file {lp}: {err}") from None
            notes |= {k: v for k, v in label_notes.items() if v}
        return {"path": str(image), "height": height, "width": width, "labels": labels.tolist()}, None, notes
    except _Bad as err:
        return None, str(err), {}


def cache_dir() -> Path:
    """Where repnas keeps caches: $REPNAS_CACHE_DIR, else $XDG_CACHE_HOME/repnas, else ~/.cache/repnas."""
    if os.environ.get("REPNAS_CACHE_DIR"):
        return Path(os.environ["REPNAS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "repnas"


def _fingerprint(images: Sequence[Path], lookups: Sequence[LabelLookup], nc: int) -> str:
    """The cache key: nc, and per image its file, its label lookup's outcome and each file that names (size, mtime).

    The outcome covers every candidate label path: a label file appearing where the lookup looks changes the key.
    """
    h = hashlib.sha256(f"v{CACHE_VERSION} nc={nc}".encode())
    for image, lookup in zip(images, lookups):
        for p in (image, lookup.expected, lookup.used, lookup.elsewhere):
            if p is None:
                h.update(b"-\n")
                continue
            try:
                st = p.stat()
                h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()


def _read_cache(path: Path, key: str) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("key") == key else None


def _write_cache(path: Path, data: dict) -> None:
    from nas.files import write_text_atomic

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(data))
    except OSError as err:  # read-only home, full disk: work on without a cache
        LOG.debug("label cache not written (%s): %s", path, err)


def index_split(images: Sequence[Path], nc: int, split: str, where: str, *, workers: int = 8,
                use_cache: bool = True) -> SplitIndex:
    """Check every image and label file of a split (or load the cached result) and log what was skipped and which
    label files are out of place (`find_label`).

    A split with no usable image raises DataError after its skipped files are logged (`check_dataset` raises
    before logging anything, for a one-line refusal).
    """
    index, key = _index(images, nc, split, where, workers, use_cache)
    _report(index, key, split, summary=False)
    _require_usable(index, split, where)
    _info_once(index.summary(split), about=(key, split))
    return index


def _info_once(message: str, *args, about: tuple[str, ...] = ()) -> None:
    """Log an info line the first time this process says it (`about`: what it describes, beside its text): a command
    indexes one split several times (the dataset check, training, each evaluation; every trial of a study), and the
    split's summary or the data.yaml's root is news only once. Another dataset with the same counts is said again."""
    line = (*about, message, *map(str, args))
    if line not in _SAID:
        _SAID.add(line)
        LOG.info(message, *args)


def _misplaced_hint(misplaced: Sequence[LabelLookup]) -> str:
    if not misplaced:
        return ""
    return (f"; {len(misplaced)} images have a label file where YOLOv5's rule does not look (e.g. "
            f"{misplaced[0].elsewhere}, expected {misplaced[0].expected})")


def _index(images: Sequence[Path], nc: int, split: str, where: str, workers: int,
           use_cache: bool) -> tuple[SplitIndex, str]:
    """The checked split and its content key; raises when the split lists no image or has no labels folder."""
    if not images:
        raise DataError(f"{where}: the {split} split lists no images; check `{split}` and the folder's contents")
    token = _LISTINGS.set({})  # each folder is listed once for this index: the key and the checks see one state
    try:
        lookups = [find_label(p) for p in images]
        label_dirs = {lookup.expected.parent for lookup in lookups}
        if not any(lookup.used for lookup in lookups) and not any(d.is_dir() for d in label_dirs):
            misplaced = [lookup for lookup in lookups if lookup.elsewhere is not None]
            raise DataError(
                f"{where}: {split} split: labels folder {sorted(label_dirs)[0]} does not exist (YOLO labels sit in "
                f"labels/ beside images/){_misplaced_hint(misplaced)}; "
                + ("move the label files there or fix the split's path" if misplaced
                   else "add the labels or fix the split's path")
            )
        key = _fingerprint(images, lookups, nc)
        cache_file = cache_dir() / "labels" / f"{key[:32]}.json"
        cached = _read_cache(cache_file, key) if use_cache else None
        if cached is None:
            context = copy_context()  # the pool's threads share this index's folder listings
            with ThreadPoolExecutor(max_workers=max(1, min(workers, len(images)))) as pool:
                results = list(pool.map(lambda p: context.copy().run(_check_one, p, nc), images))
            cached = {"key": key, "results": [[r, reason] for r, reason, _ in results],
                      "notes": [n for _, _, n in results]}
            if use_cache:
                _write_cache(cache_file, cached)
        orphans = _orphan_labels(lookups)
    finally:
        _LISTINGS.reset(token)
    records, skipped, notes, misplaced, case_only, note_files = [], [], {}, [], [], {}
    for image, lookup, (record, reason), note in zip(images, lookups, cached["results"], cached["notes"]):
        if record is None:
            skipped.append((str(image), reason))
            continue
        records.append(ImageRecord(Path(record["path"]), record["height"], record["width"],
                                   np.array(record["labels"], np.float32).reshape(-1, 5)))
        if lookup.elsewhere is not None:
            misplaced.append(lookup)
        if lookup.case_only:
            case_only.append(lookup)
        for k, v in note.items():
            notes[k] = notes.get(k, 0) + v
            where = lookup.used if k in LABEL_NOTES and lookup.used is not None else image
            note_files.setdefault(k, []).append(str(where))
    return SplitIndex(tuple(records), tuple(skipped), notes, tuple(misplaced), tuple(case_only), tuple(orphans),
                      {k: tuple(v) for k, v in note_files.items()}), key


def _require_usable(index: SplitIndex, split: str, where: str) -> None:
    if not index.records:
        skipped = index.skipped
        raise DataError(f"{where}: the {split} split has no usable image ({len(skipped)} skipped, first: "
                        f"{skipped[0][0] if skipped else '-'}: {skipped[0][1] if skipped else '-'}); fix the files")


def _report(index: SplitIndex, key: str, split: str, summary: bool = True) -> None:
    """Log a split's skipped files, label files misplaced or without an image, conversions, clipped label lines and
    dropped duplicates with their files (once per process for the same content; an orphan label file once, though
    splits share its folder), and its summary line."""
    first_time = (key, split) not in _WARNED
    _WARNED.add((key, split))
    if first_time:
        for file, reason in index.skipped:
            LOG.warning("%s: skipped: %s", file, reason)
        for line in _lookup_warnings(index.case_only + index.misplaced, split):
            LOG.warning("%s", line)
        orphans = [p for p in index.orphans if (str(p), "orphan") not in _WARNED]
        _WARNED.update((str(p), "orphan") for p in orphans)
        if orphans:
            LOG.warning("%s split: %d label files have no image (e.g. %s); they are ignored", split, len(orphans),
                        orphans[0])
        for note, count in sorted(index.notes.items()):  # every conversion, clip and drop, with its files
            LOG.warning("%s split: %d %s in %s", split, count, note.replace("images", "image(s)"),
                        _files_text(index.note_files.get(note, ())))
    if summary:
        _info_once(index.summary(split), about=(key, split))


def check_dataset(cfg: DataConfig) -> dict[str, SplitIndex]:
    """Index both splits of `cfg` (cached) and refuse a dataset with nothing usable, before any work starts.

    Per-file problems are warnings (the file skipped); a split with no usable image, or with images but not one
    labelled box, raises DataError naming the data.yaml, the split and the fix. Nothing is logged before both
    splits pass, so a refused dataset prints its one error line only. Images in both splits (same file content)
    are warned about: they inflate the val mAP.
    """
    checked = {}
    for split, images in (("train", cfg.train), ("val", cfg.val)):
        index, key = _index(images, cfg.nc, split, str(cfg.source), 8, True)
        _require_usable(index, split, str(cfg.source))
        if index.boxes == 0:
            raise DataError(
                f"{cfg.source}: the {split} split has {len(index.records)} images but not one labelled box (each is a "
                f"background: no label file, or an empty one){_misplaced_hint(index.misplaced)}; put the labels in "
                f"labels/ beside images/ or fix `{split}`"
            )
        checked[split] = (index, key)
    for split, (index, key) in checked.items():
        _report(index, key, split)
    (train, train_key), (val, val_key) = checked["train"], checked["val"]
    if (train_key + val_key, "train+val") not in _WARNED:
        _WARNED.add((train_key + val_key, "train+val"))
        same = _same_content([r.path for r in val.records], [r.path for r in train.records])
        if same:
            LOG.warning("%d val images are also in train (the same file content, e.g. %s and %s); they inflate the "
                        "val mAP: remove them from one split", len(same), *same[0])
    return {split: index for split, (index, _) in checked.items()}


def _same_content(files: Sequence[Path], others: Sequence[Path]) -> list[tuple[Path, Path]]:
    """(file, other) pairs with identical bytes, one per file of `files`: sizes first, sha256 where sizes agree."""
    def by_size(paths: Sequence[Path]) -> dict[int, list[Path]]:
        sizes: dict[int, list[Path]] = {}
        for path in paths:
            with contextlib.suppress(OSError):  # gone since it was checked: nothing to compare
                sizes.setdefault(path.stat().st_size, []).append(path)
        return sizes

    mine, theirs = by_size(files), by_size(others)
    pairs = []
    for size in sorted(mine.keys() & theirs.keys()):
        digests: dict[str, Path] = {}
        for path in theirs[size]:
            digests.setdefault(_sha256(path), path)
        for path in mine[size]:
            if (match := digests.get(_sha256(path))) is not None:
                pairs.append((path, match))
    return sorted(pairs)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError:
        return f"unreadable {path}"  # never equal to another file's digest
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# images: decoding, letterbox, augmentation


def load_image(path: Path, imgsz: int) -> np.ndarray:
    """Decoded RGB image (H, W, 3) uint8, EXIF-oriented, resized so its long side is `imgsz` (aspect kept).

    Decoding follows YOLOv5's cv2.imread by mode and bit depth (`nas.images.read_rgb`: 16-bit keeps its high byte);
    raises UnreadableImage for a file that has no such reading.
    """
    pixels = read_rgb(path).pixels
    h0, w0 = pixels.shape[:2]
    r = imgsz / max(h0, w0)
    if r == 1:
        return pixels
    size = (max(1, round(w0 * r)), max(1, round(h0 * r)))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.BILINEAR)).copy()


def letterbox(img: np.ndarray, shape: tuple[int, int], scaleup: bool = True):
    """Resize `img` (H, W, 3) to fit `shape` (h, w) keeping its aspect, centred on grey padding.

    Returns (image, (ratio_h, ratio_w), (pad_w, pad_h)) in YOLOv5's convention.
    """
    h0, w0 = img.shape[:2]
    r = min(shape[0] / h0, shape[1] / w0)
    if not scaleup:
        r = min(r, 1.0)
    new_w, new_h = round(w0 * r), round(h0 * r)
    if (new_w, new_h) != (w0, h0):
        img = np.asarray(Image.fromarray(img).resize((new_w, new_h), Image.BILINEAR))
    dw, dh = (shape[1] - new_w) / 2, (shape[0] - new_h) / 2
    top, left = round(dh - 0.1), round(dw - 0.1)
    out = np.full((shape[0], shape[1], 3), PAD_VALUE, np.uint8)
    out[top:top + new_h, left:left + new_w] = img
    return out, (new_h / h0, new_w / w0), (dw, dh)


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation (YOLOv5's hyp.scratch-low names and meanings; rotation, shear and perspective off)."""

    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4
    translate: float = 0.1
    scale: float = 0.5
    fliplr: float = 0.5
    flipud: float = 0.0
    mosaic: float = 0.0  # probability of a 4-image mosaic

    def __post_init__(self):
        for name in ("hsv_h", "hsv_s", "hsv_v", "translate", "fliplr", "flipud", "mosaic"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ValueError(f"AugmentConfig: {name}={v} must be in 0..1")
        if not 0 <= self.scale < 1:
            raise ValueError(f"AugmentConfig: scale={self.scale} must be in [0, 1)")


def augment_hsv(img: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Random hue, saturation and value gains, as YOLOv5 (PIL's HSV: hue in 0..255)."""
    if not (cfg.hsv_h or cfg.hsv_s or cfg.hsv_v):
        return img
    gains = rng.uniform(-1, 1, 3) * (cfg.hsv_h, cfg.hsv_s, cfg.hsv_v) + 1
    x = np.arange(256, dtype=np.float32)
    lut_h = ((x * gains[0]) % 256).astype(np.uint8)
    lut_s = np.clip(x * gains[1], 0, 255).astype(np.uint8)
    lut_v = np.clip(x * gains[2], 0, 255).astype(np.uint8)
    hsv = np.asarray(Image.fromarray(img).convert("HSV")).copy()
    hsv[..., 0], hsv[..., 1], hsv[..., 2] = lut_h[hsv[..., 0]], lut_s[hsv[..., 1]], lut_v[hsv[..., 2]]
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))


def _affine(img: np.ndarray, boxes: np.ndarray, out: int, center: tuple[float, float], s: float,
            shift: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Scale `img` by `s` about `center`, move that point to the middle of an `out` square plus `shift`.

    boxes: (n, 4) xyxy pixels -> transformed, clipped, and filtered as YOLOv5's box_candidates.
    """
    ox = out / 2 + shift[0] - s * center[0]  # x_out = s * x_in + ox
    oy = out / 2 + shift[1] - s * center[1]
    coeffs = (1 / s, 0, -ox / s, 0, 1 / s, -oy / s)  # PIL wants the inverse map (out -> in)
    warped = Image.fromarray(img).transform((out, out), Image.AFFINE, coeffs, resample=Image.BILINEAR,
                                            fillcolor=(PAD_VALUE,) * 3)
    if len(boxes):
        moved = boxes * s + np.array([ox, oy, ox, oy], np.float32)
        clipped = moved.clip(0, out)
        w, h = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
        w0, h0 = moved[:, 2] - moved[:, 0], moved[:, 3] - moved[:, 1]
        aspect = np.maximum(w / (h + 1e-16), h / (w + 1e-16))
        keep = (w > 2) & (h > 2) & (w * h / (w0 * h0 + 1e-16) > 0.1) & (aspect < 100)
        boxes = clipped, keep
    else:
        boxes = boxes, np.zeros(0, bool)
    return np.asarray(warped), boxes  # type: ignore[return-value]


def xywhn_to_xyxy(labels: np.ndarray, w: float, h: float, padw: float = 0, padh: float = 0) -> np.ndarray:
    """Label rows (n, 5) class cx cy w h, normalised -> (n, 4) x1 y1 x2 y2 in pixels of a w x h image + padding."""
    xyxy = np.empty((len(labels), 4), np.float32)
    xyxy[:, 0] = w * (labels[:, 1] - labels[:, 3] / 2) + padw
    xyxy[:, 1] = h * (labels[:, 2] - labels[:, 4] / 2) + padh
    xyxy[:, 2] = w * (labels[:, 1] + labels[:, 3] / 2) + padw
    xyxy[:, 3] = h * (labels[:, 2] + labels[:, 4] / 2) + padh
    return xyxy


def _xyxy_to_xywhn(xyxy: np.ndarray, w: float, h: float) -> np.ndarray:
    out = np.empty_like(xyxy)
    out[:, 0] = (xyxy[:, 0] + xyxy[:, 2]) / 2 / w
    out[:, 1] = (xyxy[:, 1] + xyxy[:, 3]) / 2 / h
    out[:, 2] = (xyxy[:, 2] - xyxy[:, 0]) / w
    out[:, 3] = (xyxy[:, 3] - xyxy[:, 1]) / h
    return out


# ---------------------------------------------------------------------------------------------------------------
# the Dataset


class YoloDataset(Dataset):
    """Images and labels of one split, letterboxed to `imgsz`.

    Training (`augment=True`): square `imgsz` images with random scale/translate, flips, HSV and optional mosaic.
    Validation (`rect=True`): images sorted by aspect ratio and letterboxed to per-batch rectangles (YOLOv5's
    rect batches, padded to a multiple of `stride`); iterate in order with the same `batch_size`.
    An item is (image (3, H, W) uint8, labels (n, 6) [0, class, cx, cy, w, h] normalised, path, shapes) where
    shapes = ((h0, w0), ((ratio_h, ratio_w), (pad_w, pad_h))) maps boxes back to the original image.
    """

    def __init__(self, records: Sequence[ImageRecord], imgsz: int, *, augment: bool = False,
                 hyp: AugmentConfig | None = None, rect: bool = False, batch_size: int = 16, stride: int = 32,
                 cache_images: bool = True):
        self.imgsz, self.augment, self.rect, self.stride = imgsz, augment, rect, stride
        self.hyp = hyp or AugmentConfig()
        records = list(records)
        self.batch_shapes: list[tuple[int, int]] | None = None
        if rect:
            aspect = np.array([r.height / r.width for r in records])
            order = np.argsort(aspect, kind="stable")
            records = [records[i] for i in order]
            aspect = aspect[order]
            self.batch_shapes = []
            for start in range(0, len(records), batch_size):
                ar = aspect[start:start + batch_size]
                lo, hi = ar.min(), ar.max()
                hw = (hi, 1) if hi < 1 else (1, 1 / lo) if lo > 1 else (1, 1)
                self.batch_shapes.append(tuple(int(math.ceil(imgsz * v / stride + 0.5) * stride) for v in hw))
            self.batch_size = batch_size
        self.records = records
        self._cache: list[np.ndarray | None] = [None] * len(records)
        if cache_images:
            self.cache_images()

    def __len__(self) -> int:
        return len(self.records)

    def cache_images(self, workers: int = 4) -> None:
        """Decode and resize every image once into RAM (threads; PIL releases the GIL while decoding)."""
        todo = [i for i, c in enumerate(self._cache) if c is None]
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for i, img in zip(todo, pool.map(lambda k: load_image(self.records[k].path, self.imgsz), todo)):
                self._cache[i] = img

    def image(self, i: int) -> np.ndarray:
        img = self._cache[i]
        return load_image(self.records[i].path, self.imgsz) if img is None else img

    def __getitem__(self, i: int):
        record = self.records[i]
        h0, w0 = record.height, record.width
        if self.augment:
            rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
            img, labels = self._train_sample(i, rng)
            shapes = ((h0, w0), ((1.0, 1.0), (0.0, 0.0)))
        else:
            shape = self.batch_shapes[i // self.batch_size] if self.rect else (self.imgsz, self.imgsz)
            small = self.image(i)  # long side imgsz
            img, ratio, pad = letterbox(small, shape, scaleup=False)
            gain = (ratio[0] * small.shape[0] / h0, ratio[1] * small.shape[1] / w0)  # original -> input pixels
            labels = record.labels.copy()
            if len(labels):
                xyxy = xywhn_to_xyxy(labels, w0 * gain[1], h0 * gain[0], pad[0], pad[1])
                labels[:, 1:] = _xyxy_to_xywhn(xyxy, img.shape[1], img.shape[0])
            shapes = ((h0, w0), (gain, pad))
        out = np.zeros((len(labels), 6), np.float32)
        out[:, 1:] = labels
        tensor = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))  # (3, H, W) uint8
        return tensor, torch.from_numpy(out), str(record.path), shapes

    def _train_sample(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        s = self.imgsz
        hyp = self.hyp
        if hyp.mosaic and rng.random() < hyp.mosaic:
            canvas, boxes, classes = self._mosaic(i, rng)
            center = (s, s)  # the middle of the 2s x 2s canvas
        else:
            img = self.image(i)
            h, w = img.shape[:2]
            labels = self.records[i].labels
            canvas = img
            boxes, classes = xywhn_to_xyxy(labels, w, h), labels[:, 0]
            center = (w / 2, h / 2)
        gain = rng.uniform(1 - hyp.scale, 1 + hyp.scale)
        shift = tuple(rng.uniform(-hyp.translate, hyp.translate, 2) * s)
        img, (boxes, keep) = _affine(canvas, boxes, s, center, gain, shift)
        boxes, classes = boxes[keep], classes[keep]
        img = augment_hsv(img, hyp, rng)
        if rng.random() < hyp.fliplr:
            img = img[:, ::-1]
            boxes = np.stack([s - boxes[:, 2], boxes[:, 1], s - boxes[:, 0], boxes[:, 3]], 1) if len(boxes) else boxes
        if rng.random() < hyp.flipud:
            img = img[::-1]
            boxes = np.stack([boxes[:, 0], s - boxes[:, 3], boxes[:, 2], s - boxes[:, 1]], 1) if len(boxes) else boxes
        labels = np.zeros((len(boxes), 5), np.float32)
        if len(boxes):
            labels[:, 0] = classes
            labels[:, 1:] = _xyxy_to_xywhn(boxes.astype(np.float32), s, s)
        return img, labels

    def _mosaic(self, i: int, rng: np.random.Generator):
        """Four images around a random centre of a 2s x 2s grey canvas (YOLOv5's load_mosaic, without warping)."""
        s = self.imgsz
        yc, xc = (int(v) for v in rng.uniform(s / 2, 3 * s / 2, 2))
        others = rng.integers(0, len(self.records), 3)
        canvas = np.full((2 * s, 2 * s, 3), PAD_VALUE, np.uint8)
        all_boxes, all_classes = [], []
        for k, index in enumerate([i, *others.tolist()]):
            img = self.image(index)
            h, w = img.shape[:2]
            if k == 0:  # top left
                x1a, y1a, x2a, y2a = max(xc - w, 0), max(yc - h, 0), xc, yc
                x1b, y1b, x2b, y2b = w - (x2a - x1a), h - (y2a - y1a), w, h
            elif k == 1:  # top right
                x1a, y1a, x2a, y2a = xc, max(yc - h, 0), min(xc + w, 2 * s), yc
                x1b, y1b, x2b, y2b = 0, h - (y2a - y1a), min(w, x2a - x1a), h
            elif k == 2:  # bottom left
                x1a, y1a, x2a, y2a = max(xc - w, 0), yc, xc, min(2 * s, yc + h)
                x1b, y1b, x2b, y2b = w - (x2a - x1a), 0, w, min(y2a - y1a, h)
            else:  # bottom right
                x1a, y1a, x2a, y2a = xc, yc, min(xc + w, 2 * s), min(2 * s, yc + h)
                x1b, y1b, x2b, y2b = 0, 0, min(w, x2a - x1a), min(y2a - y1a, h)
            canvas[y1a:y2a, x1a:x2a] = img[y1b:y2b, x1b:x2b]
            labels = self.records[index].labels
            if len(labels):
                all_boxes.append(xywhn_to_xyxy(labels, w, h, x1a - x1b, y1a - y1b))
                all_classes.append(labels[:, 0])
        if all_boxes:  # clipped to the canvas, as YOLOv5's load_mosaic does
            return canvas, np.concatenate(all_boxes).clip(0, 2 * s), np.concatenate(all_classes)
        return canvas, np.zeros((0, 4), np.float32), np.zeros(0, np.float32)


def collate(batch):
    """Stack images; concatenate labels with their image index in column 0. (B,3,H,W) uint8, (N,6) float."""
    images, labels, paths, shapes = zip(*batch)
    for k, lb in enumerate(labels):
        lb[:, 0] = k
    return torch.stack(images, 0), torch.cat(labels, 0), list(paths), list(shapes)


def make_loader(dataset: YoloDataset, batch_size: int, *, shuffle: bool, workers: int = 0,
                seed: int = 0, pin_memory: bool | None = None) -> DataLoader:
    """A DataLoader with seeded shuffling; rect datasets must not be shuffled.

    Augmentation draws from torch's generator: per worker (seeded by the loader) or, with workers=0, the global one,
    which `nas.train.fit` seeds. `pin_memory`: page-locked batches for the copy to a GPU; callers pass whether they
    run on CUDA, since pinning makes a CUDA context on the process's current device (GPU 0 unless set), which a CPU
    run on a GPU host must not (None: whether CUDA is available, as before).
    """
    if dataset.rect and shuffle:
        raise ValueError("rect batches need the dataset's own order: shuffle=False")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, collate_fn=collate,
                      generator=generator, persistent_workers=workers > 0,
                      pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory, drop_last=False)
