"""A folder of hostile and valid image files, generated on the fly for decoding and indexing tests.

Everything is synthesised here (numpy patterns, hand-written PNG chunks), so the folder is small (well
under 1 MB), takes a fraction of a second to build and needs no downloads. ``make_hostile_folder`` returns
``{file name: should_decode}``; ``EXPECTED_REASONS`` gives the reason prefix each failing file must report.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["EXPECTED_REASONS", "jpeg_bytes", "make_hostile_folder", "pattern", "png_header_only"]

EXPECTED_REASONS: dict[str, str] = {
    "empty.jpg": "empty file",
    "truncated.jpg": "truncated or corrupt image data",
    "not_really.png": "not an image",
    "bomb_30000x30000.png": "too many pixels",
    "drawing.svg": "unsupported format: SVG",
    "iphone.heic": "unsupported format: HEIC",
}
"""Reason prefix that decoding each failing hostile file must give."""


def pattern(width: int, height: int, seed: int) -> np.ndarray:
    """A distinct, smooth-ish RGB uint8 pattern (gradients plus a seeded colour) of the given size."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.integers(0, 256, size=3).astype(np.float32)
    freq = rng.uniform(0.02, 0.12, size=3)
    waves = [60 * np.sin(xs * freq[c]) + 60 * np.cos(ys * freq[(c + 1) % 3]) for c in range(3)]
    channels = [base[c] / 2 + waves[c] for c in range(3)]
    return np.clip(np.stack(channels, axis=-1) + 64, 0, 255).astype(np.uint8)


def jpeg_bytes(image: Image.Image, **save_args: object) -> bytes:
    """Encode ``image`` as JPEG in memory."""
    buf = io.BytesIO()
    image.save(buf, "JPEG", **save_args)
    return buf.getvalue()


def _png_bytes(image: Image.Image, **save_args: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **save_args)
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_only(width: int = 30000, height: int = 30000) -> bytes:
    """A syntactically valid PNG header claiming ``width x height`` 1-bit pixels, with a tiny IDAT.

    Nothing of that size is ever allocated: a decoder must refuse it from the header alone.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _truncated_jpeg() -> bytes:
    noisy = np.random.default_rng(7).integers(0, 256, size=(128, 128, 3), dtype=np.uint8)
    data = jpeg_bytes(Image.fromarray(noisy), quality=90)
    return data[: len(data) // 2]


def _cmyk_jpeg() -> bytes:
    cmyk = np.zeros((48, 64, 4), dtype=np.uint8)
    cmyk[..., 1:3] = 255  # magenta + yellow = red
    return jpeg_bytes(Image.fromarray(cmyk, mode="CMYK"), quality=95)


def _gray16_png() -> bytes:
    mid_gray = np.full((40, 56), 128 * 257, dtype=np.uint16)  # 8-bit 128, stored on 16 bits
    return _png_bytes(Image.fromarray(mid_gray))


def _rgba_png() -> bytes:
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)  # left half fully transparent black
    rgba[:, 16:] = (0, 200, 0, 255)  # right half opaque green
    return _png_bytes(Image.fromarray(rgba, mode="RGBA"))


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (24, 16), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def _exif_rotated_jpeg() -> bytes:
    """80x40 stored pixels (left red, right blue) with EXIF orientation 6: displayed 40x80."""
    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    pixels[:, :40] = (255, 0, 0)
    pixels[:, 40:] = (0, 0, 255)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    return jpeg_bytes(image, quality=95, exif=exif.tobytes())


def _palette_transparent_png() -> bytes:
    indices = np.zeros((20, 20), dtype=np.uint8)
    indices[:, 10:] = 1
    image = Image.fromarray(indices, mode="P")
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    return _png_bytes(image, transparency=0)  # index 0 (left half, black) is transparent


def _fake_heic() -> bytes:
    ftyp = struct.pack(">I", 24) + b"ftypheic" + struct.pack(">I", 0) + b"mif1heic"
    return ftyp + bytes(200)


_SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>\n'

_BUILDERS: dict[str, tuple[Callable[[], bytes], bool]] = {
    "empty.jpg": (lambda: b"", False),
    "truncated.jpg": (_truncated_jpeg, False),
    "not_really.png": (lambda: b"This is a text file, not a PNG.\n" * 4, False),
    "bomb_30000x30000.png": (png_header_only, False),
    "drawing.svg": (lambda: _SVG, False),
    "iphone.heic": (_fake_heic, False),
    "cmyk.jpg": (_cmyk_jpeg, True),
    "gray16.png": (_gray16_png, True),
    "rgba.png": (_rgba_png, True),
    "animated.gif": (_animated_gif, True),
    "rotated_exif.jpg": (_exif_rotated_jpeg, True),
    "tiny_1x1.png": (lambda: _png_bytes(Image.new("RGB", (1, 1), (10, 200, 30))), True),
    "wide_4000x20.png": (lambda: _png_bytes(Image.fromarray(pattern(4000, 20, seed=3))), True),
    "café_日本.jpg": (lambda: jpeg_bytes(Image.fromarray(pattern(96, 72, seed=4))), True),
    "palette_transparent.png": (_palette_transparent_png, True),
    "photo_a.jpg": (lambda: jpeg_bytes(Image.fromarray(pattern(128, 96, seed=1))), True),
    "PHOTO_B.JPG": (lambda: jpeg_bytes(Image.fromarray(pattern(96, 128, seed=2))), True),
}


def make_hostile_folder(root: Path) -> dict[str, bool]:
    """Write the hostile set into ``root`` (created if needed); return ``{file name: should_decode}``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, bool] = {}
    for name, (build, ok) in _BUILDERS.items():
        (root / name).write_bytes(build())
        expected[name] = ok
    return expected
