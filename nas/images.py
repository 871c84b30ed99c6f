"""Image files to the 8-bit RGB array YOLOv5 trains on, decided by the file's mode and bit depth.

The reference is YOLOv5's loader (`utils/dataloaders.py`: `cv2.imread(path)`, i.e. IMREAD_COLOR, then BGR -> RGB):
three 8-bit channels whatever the file holds. OpenCV's `imread` documentation: without IMREAD_ANYDEPTH a 16-bit
image is converted to 8 bits (for PNG libpng's `png_set_strip_16`: the high byte), alpha is dropped (not
composited), a palette is expanded, grey is replicated, EXIF orientation is applied. Integer images wider than 16
bits and floating-point images have no such 8-bit reading, so they are refused here with their value range, where
PIL's own `convert("RGB")` would clip them (a 16-bit PNG through PIL trained as an almost white frame).

Every conversion is named in the result, phrased for the dataset summary, so the caller can say it once.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from space.errors import RepnasError

GREYSCALE = "greyscale images converted to RGB"
HIGH_BYTE = "16-bit images converted to 8-bit (high byte)"
# mode: the note for its conversion to RGB, done by PIL's convert("RGB"): grey replicated, palette looked up, alpha
# dropped, as cv2.imread; CMYK by the ink formula R = (255 - C)(255 - K) / 255 rounded (OpenCV's JPEG path computes
# it with >> 8: up to 2 levels higher) and YCbCr by ITU-R BT.601 full range (as JPEG); see tests/nas/test_images.py
_EIGHT_BIT = {
    "RGB": None,
    "1": GREYSCALE,  # 0 or 255
    "L": GREYSCALE,
    "LA": "greyscale images with alpha converted to RGB (alpha dropped)",
    "P": "palette images converted to RGB",
    "PA": "palette images with alpha converted to RGB (alpha dropped)",
    "RGBA": "RGBA images converted to RGB (alpha dropped)",
    "RGBX": "RGBX images converted to RGB (padding dropped)",
    "CMYK": "CMYK images converted to RGB (ink formula, ICC profile ignored)",
    "YCbCr": "YCbCr images converted to RGB (BT.601 full range)",
}
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N"}  # unsigned 16-bit greyscale, by byte order


class UnreadableImage(RepnasError):
    """An image with no 8-bit RGB reading: not decodable, or a depth YOLOv5 cannot read.

    `reason` is one line without the file name (the dataset index prints it after the file); str() has both.
    """

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source, self.reason = source, reason


@dataclass(frozen=True)
class RGBImage:
    """A decoded image: `pixels` (H, W, 3) uint8 RGB, EXIF-oriented; `conversions` the summary notes of what was
    done to reach it (empty for an 8-bit RGB file)."""

    pixels: np.ndarray
    conversions: tuple[str, ...]


def read_rgb(source: str | Path | BinaryIO | Image.Image, *, verify: bool = False) -> RGBImage:
    """Decode `source` (a path, an open binary file, or an in-memory PIL image) as YOLOv5's `cv2.imread` would.

    By mode: 8-bit modes (1, L, LA, P, PA, RGB, RGBA, CMYK, YCbCr) become RGB with alpha dropped; 16 bits per
    sample (I;16 and its byte orders, 16-bit RGB/RGBA/LA) keep their high byte; 32-bit integer (I) and float (F)
    raise. `verify=True` also runs PIL's integrity check first (PNG checksums; paths and files only).
    Raises UnreadableImage naming the file, and for a refused depth its mode and value range.
    """
    in_memory = isinstance(source, Image.Image)
    name = str(source if isinstance(source, (str, Path)) else
               getattr(source, "filename", "") or getattr(source, "name", "") or "<in-memory image>")
    try:
        if verify and not in_memory:
            with Image.open(source) as im:
                im.verify()
            if hasattr(source, "seek"):
                source.seek(0)
        with contextlib.nullcontext(source) if in_memory else Image.open(source) as im:
            rawmode = _rawmode(im)  # before loading: loading clears the decoder's tiles
            im = ImageOps.exif_transpose(im)  # a loaded copy, turned as the EXIF orientation says
            im.load()  # full decode: a truncated file fails here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        detail = str(err).splitlines()[0] if str(err) else ""
        raise UnreadableImage(name, f"not a readable image ({type(err).__name__}: {detail})") from None
    return _to_rgb(im, rawmode, name)


def _rawmode(im: Image.Image) -> str:
    """How the file stores its samples ('I;16B', 'RGB;16L', 'F;32F'); '' for an image not read from a file."""
    for tile in getattr(im, "tile", ()):  # an Image made in memory has none
        args = tile[3]  # (codec, extents, offset, args); args is the raw mode or a tuple starting with it
        raw = args if isinstance(args, str) else args[0] if isinstance(args, tuple) and args else None
        if isinstance(raw, str):
            return raw
    return ""


def _sample_bits(mode: str, rawmode: str) -> int:
    """Bits per sample in the file: 16 for 'I;16B', 'RGB;16L', 'LA;16B' ('RGB;16' and 'BGR;16' pack a whole 5-6-5
    pixel in 16 bits: 8), 32 for 32-bit I and F, else 8."""
    base, _, spec = rawmode.partition(";")
    if re.fullmatch(r"16[BLN]?", spec) and not (base in ("RGB", "BGR") and spec == "16"):
        return 16
    digits = re.match(r"\d*", spec).group()
    if mode in ("I", "F"):
        return int(digits) if digits else 32
    return 16 if mode in _SIXTEEN_BIT else 8


def _to_rgb(im: Image.Image, rawmode: str, name: str) -> RGBImage:
    mode, bits = im.mode, _sample_bits(im.mode, rawmode)
    if mode in _SIXTEEN_BIT or (mode == "I" and rawmode in _SIXTEEN_BIT):  # old Pillow opens 16-bit PNG as I
        grey = (np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8)  # (H, W), any byte order
        return RGBImage(np.repeat(grey[:, :, None], 3, axis=2), (HIGH_BYTE, GREYSCALE))
    if mode in ("I", "F"):
        raise UnreadableImage(name, f"{bits}-bit {'float' if mode == 'F' else 'integer'} image (mode {mode}"
                                    f"{', stored as ' + rawmode if rawmode else ''}, {_value_range(im)}) has no "
                                    "8-bit reading in YOLOv5's cv2.imread; scale it to 0..255 and save it as an "
                                    "8-bit PNG or JPEG")
    if mode not in _EIGHT_BIT:
        raise UnreadableImage(name, f"mode {mode} is not decoded (repnas reads {', '.join(_EIGHT_BIT)} and 16-bit "
                                    "greyscale, as YOLOv5's cv2.imread does); save it as an 8-bit RGB PNG or JPEG")
    pixels = np.array(im if mode == "RGB" else im.convert("RGB"))  # (H, W, 3) uint8, a writable copy
    notes = ((HIGH_BYTE,) if bits == 16 else ()) + ((_EIGHT_BIT[mode],) if _EIGHT_BIT[mode] else ())
    return RGBImage(pixels, notes)


def _value_range(im: Image.Image) -> str:
    values = np.asarray(im)
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values.ravel()
    text = f"values {finite.min():g}..{finite.max():g}" if finite.size else "no finite values"
    return text + (f", {values.size - finite.size} not finite" if 0 < finite.size < values.size else "")
