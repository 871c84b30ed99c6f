"""nas.images: every PIL image mode decodes to what YOLOv5's cv2.imread(IMREAD_COLOR) + BGR->RGB gives.

Each case writes raw numpy arrays in a format that holds the mode and computes the expected RGB from those arrays
with numpy (grey replicated, palette looked up, alpha dropped, 16-bit -> high byte, CMYK and YCbCr by formula);
modes with no 8-bit reading (32-bit integer I, float F) are refused with their mode and value range.
"""

from __future__ import annotations

import io
import logging
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nas.data import index_split, label_path, load_image
from nas.images import HIGH_BYTE, UnreadableImage, read_rgb

H, W = 16, 20
RNG = np.random.default_rng(0)
U8 = RNG.integers(0, 256, (H, W, 4), dtype=np.uint8)  # the raw samples every 8-bit case draws from
U16 = RNG.integers(0, 65536, (H, W), dtype=np.uint16)
PALETTE = RNG.integers(0, 256, (256, 3), dtype=np.uint8)


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPNAS_CACHE_DIR", str(tmp_path / "cache"))


def grey(g: np.ndarray) -> np.ndarray:
    return np.repeat(g[:, :, None], 3, axis=2)


def png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG of `arr` (H, W) grey or (H, W, 3) RGB, written by hand: PIL writes no 16-bit colour PNG."""
    h, w = arr.shape[:2]
    colour_type = 0 if arr.ndim == 2 else 2
    rows = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))  # filter byte 0, big-endian

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def saved(im: Image.Image, fmt: str, **kw) -> io.BytesIO:
    out = io.BytesIO()
    im.save(out, fmt, **kw)
    out.seek(0)
    out.name = f"image.{fmt.lower()}"
    return out


def frombytes(mode: str, arr: np.ndarray) -> Image.Image:
    """An image of `mode` holding exactly `arr` (PIL's convert() between 16-bit modes clips to 255)."""
    return Image.frombytes(mode, (W, H), arr.tobytes())


def palette(mode: str, arr: np.ndarray) -> Image.Image:
    im = frombytes(mode, arr)
    im.putpalette(PALETTE.tobytes())
    return im


def ycbcr_to_rgb(ycc: np.ndarray) -> np.ndarray:
    """JPEG's (ITU-R BT.601 full range) YCbCr -> RGB, as libjpeg and libtiff compute it."""
    y, cb, cr = (ycc[..., i].astype(float) for i in range(3))
    rgb = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                    y + 1.772 * (cb - 128)], -1)
    return np.clip(np.rint(rgb), 0, 255)


def cmyk_to_rgb(cmyk: np.ndarray) -> np.ndarray:
    """The ink model OpenCV (JPEG) and libtiff (TIFF) use: R = (255 - C)(255 - K) / 255."""
    c = cmyk.astype(float)
    return np.rint((255 - c[..., :3]) * (255 - c[..., 3:]) / 255)


RAMP = np.repeat(np.repeat(np.arange(0, 256, 16, dtype=np.uint8)[None, :4], H, 0), W // 4, 1)  # smooth: JPEG-safe
INK = "CMYK images converted to RGB (ink formula, ICC profile ignored)"
CMYK_SMOOTH = np.stack([RAMP, RAMP[::-1], 255 - RAMP, RAMP // 2], -1)

Case = tuple[Callable[[], io.BytesIO | Image.Image], np.ndarray, int, tuple[str, ...]]
# id: (the source, the expected RGB from the raw arrays, tolerance in grey levels, conversions named)
CASES: dict[str, Case] = {
    "1 png": (lambda: saved(frombytes("L", (U8[..., 0] > 127).astype(np.uint8) * 255).convert("1"), "PNG"),
              grey(np.where(U8[..., 0] > 127, 255, 0)), 0, ("greyscale images converted to RGB",)),
    "L png": (lambda: saved(frombytes("L", U8[..., 0]), "PNG"), grey(U8[..., 0]), 0,
              ("greyscale images converted to RGB",)),
    "LA png": (lambda: saved(frombytes("LA", U8[..., :2].copy()), "PNG"), grey(U8[..., 0]), 0,
               ("greyscale images with alpha converted to RGB (alpha dropped)",)),
    "P png": (lambda: saved(palette("P", U8[..., 0]), "PNG"), PALETTE[U8[..., 0]], 0,
              ("palette images converted to RGB",)),
    "PA tiff": (lambda: saved(palette("PA", U8[..., :2].copy()), "TIFF"), PALETTE[U8[..., 0]], 0,
                ("palette images with alpha converted to RGB (alpha dropped)",)),
    "RGB png": (lambda: saved(frombytes("RGB", U8[..., :3].copy()), "PNG"), U8[..., :3], 0, ()),
    "RGB jpeg q100 4:4:4": (lambda: saved(frombytes("RGB", CMYK_SMOOTH[..., :3].copy()), "JPEG", quality=100,
                                          subsampling=0), CMYK_SMOOTH[..., :3], 2, ()),
    "RGBA png": (lambda: saved(frombytes("RGBA", U8), "PNG"), U8[..., :3], 0,
                 ("RGBA images converted to RGB (alpha dropped)",)),
    "CMYK tiff": (lambda: saved(frombytes("CMYK", U8), "TIFF"), cmyk_to_rgb(U8), 0, (INK,)),
    "CMYK jpeg (Adobe, inverted)": (lambda: saved(frombytes("CMYK", CMYK_SMOOTH), "JPEG", quality=100),
                                    cmyk_to_rgb(CMYK_SMOOTH), 2, (INK,)),
    "YCbCr tiff": (lambda: saved(frombytes("YCbCr", U8[..., :3].copy()), "TIFF"), ycbcr_to_rgb(U8[..., :3]), 1,
                   ("YCbCr images converted to RGB (BT.601 full range)",)),
    "I;16 png": (lambda: saved(frombytes("I;16", U16), "PNG"), grey(U16 >> 8), 0,
                 (HIGH_BYTE, "greyscale images converted to RGB")),
    "I;16 tiff": (lambda: saved(frombytes("I;16", U16), "TIFF"), grey(U16 >> 8), 0,
                  (HIGH_BYTE, "greyscale images converted to RGB")),
    "I;16B png": (lambda: saved(frombytes("I;16B", U16.astype(">u2")), "PNG"), grey(U16 >> 8), 0,
                  (HIGH_BYTE, "greyscale images converted to RGB")),
    "I;16B tiff": (lambda: saved(frombytes("I;16B", U16.astype(">u2")), "TIFF"), grey(U16 >> 8), 0,
                   (HIGH_BYTE, "greyscale images converted to RGB")),
    "I;16L tiff": (lambda: saved(frombytes("I;16L", U16.astype("<u2")), "TIFF"), grey(U16 >> 8), 0,
                   (HIGH_BYTE, "greyscale images converted to RGB")),
    # PIL writes I;16N to no format (nor I;16L to PNG): the in-memory image goes through read_rgb's PIL-image path
    "I;16N in memory": (lambda: frombytes("I;16N", U16.astype("=u2")), grey(U16 >> 8), 0,
                        (HIGH_BYTE, "greyscale images converted to RGB")),
    "16-bit RGB png": (lambda: io.BytesIO(png16(np.stack([U16, U16[::-1], 65535 - U16], -1))),
                       np.stack([U16 >> 8, U16[::-1] >> 8, (65535 - U16) >> 8], -1), 0, (HIGH_BYTE,)),
}
REFUSED = {  # id: (the source, words the reason must hold)
    "I tiff": (lambda: saved(frombytes("I", (U16.astype(np.int32) - 40000).astype("=i4")), "TIFF"),
               ("32-bit integer image (mode I", f"values {int(U16.min()) - 40000}..{int(U16.max()) - 40000})")),
    "F tiff": (lambda: saved(frombytes("F", np.linspace(-0.5, 1.5, H * W, dtype=np.float32).reshape(H, W)), "TIFF"),
               ("32-bit float image (mode F", "values -0.5..1.5)")),
    "LAB tiff": (lambda: saved(frombytes("LAB", U8[..., :3].copy()), "TIFF"), ("mode LAB is not decoded",)),
}


def test_the_cases_cover_every_pil_mode_of_the_issue() -> None:
    modes = {case.split()[0] for case in [*CASES, *REFUSED]}
    assert {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I;16B", "I;16L", "I;16N", "I",
            "F"} <= modes


@pytest.mark.parametrize("case", CASES)
def test_each_image_mode_decodes_as_yolov5_reads_it(case: str) -> None:
    make, expected, tolerance, conversions = CASES[case]
    source = make()
    decoded = read_rgb(source, verify=not isinstance(source, Image.Image))
    assert decoded.pixels.shape == (H, W, 3) and decoded.pixels.dtype == np.uint8
    assert np.abs(decoded.pixels.astype(int) - expected.astype(int)).max() <= tolerance
    assert decoded.conversions == conversions


@pytest.mark.parametrize("case", REFUSED)
def test_integer_float_and_unknown_modes_are_refused_with_mode_and_value_range(case: str) -> None:
    make, words = REFUSED[case]
    with pytest.raises(UnreadableImage) as err:
        read_rgb(make())
    assert all(w in err.value.reason for w in words), err.value.reason
    assert str(err.value).startswith("image.tiff: ")  # the file is named
    assert "\n" not in str(err.value)


def test_example_b_a_16_bit_grey_ramp_loads_as_its_8_bit_ramp(tmp_path: Path) -> None:
    g8 = np.repeat(np.round(np.linspace(0, 255, 64)).astype(np.uint8)[None, :], 64, 0)  # 0..255 across the width
    path = tmp_path / "g8.png"
    Image.fromarray(g8.astype(np.uint16) * 257).save(path)
    assert Image.open(path).mode == "I;16"
    pixels = load_image(path, 64)
    assert pixels.shape == (64, 64, 3)
    assert np.abs(pixels.astype(int) - grey(g8).astype(int)).max() <= 1


def test_exif_orientation_is_applied_to_16_bit_images(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    path = tmp_path / "turned.png"
    frombytes("I;16", U16).save(path, exif=exif)
    pixels = read_rgb(path).pixels
    assert np.array_equal(pixels, grey(np.rot90(U16, -1) >> 8))  # (W, H, 3)


def test_the_index_says_each_conversion_once_per_kind_and_names_each_skipped_file(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="repnas.data")
    folder = tmp_path / "images" / "train"
    folder.mkdir(parents=True)
    files = {"rgb.png": lambda p: frombytes("RGB", U8[..., :3].copy()).save(p),
             "deep1.png": lambda p: frombytes("I;16", U16).save(p),
             "deep2.png": lambda p: p.write_bytes(png16(np.stack([U16] * 3, -1))),
             "ink.tif": lambda p: frombytes("CMYK", U8).save(p),
             "float.tif": lambda p: frombytes("F", np.full((H, W), 2.5, np.float32)).save(p)}
    for name, write in files.items():
        write(folder / name)
        label_path(folder / name).parent.mkdir(parents=True, exist_ok=True)
        label_path(folder / name).write_text("0 0.5 0.5 0.5 0.5\n")
    index = index_split(sorted(folder.iterdir()), 1, "train", "data.yaml")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sorted(r.path.name for r in index.records) == ["deep1.png", "deep2.png", "ink.tif", "rgb.png"]
    assert warnings == [
        f"{folder / 'float.tif'}: skipped: 32-bit float image (mode F, stored as F;32F, values 2.5..2.5) has no 8-bit "
        "reading in YOLOv5's cv2.imread; scale it to 0..255 and save it as an 8-bit PNG or JPEG",
        f"train split: 2 16-bit image(s) converted to 8-bit (high byte) in {folder / 'deep1.png'}, "
        f"{folder / 'deep2.png'}",
        f"train split: 1 CMYK image(s) converted to RGB (ink formula, ICC profile ignored) in {folder / 'ink.tif'}",
        f"train split: 1 greyscale image(s) converted to RGB in {folder / 'deep1.png'}",
    ]
    assert any(m.startswith("train: 4 images, 4 boxes, 0 backgrounds, 1 skipped") for m in
               [r.getMessage() for r in caplog.records if r.levelno == logging.INFO])
    with pytest.raises(UnreadableImage, match=f"^{folder / 'float.tif'}: 32-bit float image"):
        load_image(folder / "float.tif", 64)  # a file changed after indexing fails loudly, never as a clipped frame
