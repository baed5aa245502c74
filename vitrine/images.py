"""Safe image decoding: every image that reaches an encoder passes through :func:`decode_image`.

User folders hold anything: zero-byte files, half-copied JPEGs, text renamed ``.png``, SVGs, iPhone HEICs,
CMYK scans, 16-bit medical PNGs, animated GIFs and the occasional decompression bomb. The contract here is
simple so that a batch can go on after one bad file:

* the result is always a fully loaded ``RGB`` :class:`PIL.Image.Image` (first frame, EXIF orientation
  applied, transparency flattened onto white), or
* :class:`~vitrine.errors.ImageDecodeError` with a short, user-facing ``reason``. No raw Pillow,
  ``OSError``, ``ValueError``, ``SyntaxError`` or ``struct.error`` escapes.

Decoding touches no global state per call, so it is safe to run in worker threads. The only global change
is made once, at import: Pillow's own bomb guard (``Image.MAX_IMAGE_PIXELS``) is raised to
:data:`DEFAULT_MAX_PIXELS` if it is lower, so it does not fire (or warn) before our per-call limit does.
Pillow still refuses images above twice that value while *opening* them; those are reported as
"too many pixels" too. ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never touched: truncated files fail.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

from vitrine.errors import ImageDecodeError
from vitrine.files import read_regular_file

__all__ = ["DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS", "decode_image", "image_size", "read_image_file"]

DEFAULT_MAX_PIXELS: int = 100_000_000
"""Largest width*height accepted by default. A 50-megapixel camera photo passes; a bomb does not."""

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".gif",
        ".webp",
        ".bmp",
        ".tif",
        ".tiff",
        ".ico",
        ".ppm",
        ".pgm",
        ".pbm",
        ".tga",
        # Formats we may not decode but that users keep in photo folders: they are attempted on purpose so
        # that they show up as failures with a reason instead of being silently ignored.
        ".svg",
        ".heic",
        ".heif",
        ".avif",
    }
)
"""Lowercase file extensions (with the dot) that catalogs treat as images."""

Source = str | os.PathLike | bytes
Admit = Callable[[int], AbstractContextManager[object]]

REDUCE_GAP: int = 3
"""Reduce images by whole factors while both sides stay at least this many times the draft size."""

_JPEG_FORMATS = frozenset({"JPEG", "MPO"})
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"heif"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_GENERIC_HEIF_BRANDS = frozenset({b"mif1", b"msf1"})
_SNIFF_BYTES = 1024


def _pillow_has(module: str) -> bool:
    try:
        return bool(features.check_module(module))
    except ValueError:  # a Pillow too old to know the module
        return False


_PILLOW_HAS_AVIF = _pillow_has("avif")

if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < DEFAULT_MAX_PIXELS:
    Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS


def read_image_file(path: str | os.PathLike) -> bytes:
    """A file's bytes as :func:`vitrine.files.read_regular_file` reads them (regular files only, bounded),
    with filesystem errors as :class:`ImageDecodeError` reasons."""
    return read_regular_file(path)


def decode_image(
    source: Source,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
    max_decoded_pixels: int | None = None,
    admit: Admit | None = None,
) -> Image.Image:
    """Decode ``source`` (a path, or the encoded bytes themselves) into a loaded RGB image.

    Knobs:

    * ``max_pixels``: refuse images whose header claims more than this many pixels, before any pixel
      memory is allocated (decompression-bomb guard).
    * ``draft_size``: for JPEGs only, let libjpeg decode at a reduced DCT scale (1/2, 1/4 or 1/8) that
      keeps both sides >= ``draft_size``. This makes indexing large photos several times faster, but the
      pixels differ slightly from a full decode followed by a resize, so the same setting must be used at
      index time and at query time (it belongs in the encoder's preprocessing fingerprint). Other formats
      ignore it. Every format is then reduced by a whole factor (``Image.reduce``, before any mode
      conversion) while both sides stay >= ``REDUCE_GAP * draft_size``: Pillow's own two-step resize
      rule: after the resize to ``draft_size`` the pixels differ from a direct resize by at most one
      grey level, and a huge PNG is converted and preprocessed at a fraction of its size.
    * ``max_decoded_pixels``: refuse images that would still decode to more pixels than this after the
      JPEG draft (a tighter limit for untrusted queries than ``max_pixels``).
    * ``admit``: called with the number of pixels about to be decoded; the context manager it returns is
      held while they are decoded, reduced and converted (a server bounds decodes in flight with it).

    Raises :class:`ImageDecodeError` for anything that is not a decodable image.
    """
    label = "" if isinstance(source, bytes | bytearray | memoryview) else os.fspath(source)
    data = bytes(source) if not label else read_image_file(label)
    try:
        return _decode_bytes(
            data,
            max_pixels=max_pixels,
            draft_size=draft_size,
            max_decoded_pixels=max_decoded_pixels,
            admit=admit,
        )
    except ImageDecodeError as exc:
        raise ImageDecodeError(exc.reason, label) from None


def image_size(source: Source) -> tuple[int, int]:
    """Return the displayed ``(width, height)`` from the header only (EXIF rotation taken into account).

    Nothing is decoded, so this is cheap even for huge files and bombs.
    """
    label = "" if isinstance(source, bytes | bytearray | memoryview) else os.fspath(source)
    data = bytes(source) if not label else read_image_file(label)
    try:
        im = _open(data)
    except ImageDecodeError as exc:
        size = _unchecked_header_size(data) if exc.reason.startswith("too many pixels") else None
        if size is None:
            raise ImageDecodeError(exc.reason, label) from None
        return size
    try:
        width, height = im.size
        return (height, width) if _orientation(im) in (5, 6, 7, 8) else (width, height)
    finally:
        im.close()


def _decode_bytes(
    data: bytes,
    *,
    max_pixels: int,
    draft_size: int | None,
    max_decoded_pixels: int | None,
    admit: Admit | None,
) -> Image.Image:
    im = _open(data, max_pixels)
    try:
        im.seek(0)
        if draft_size and im.format in _JPEG_FORMATS:
            im.draft("RGB", (draft_size, draft_size))
        pixels = im.size[0] * im.size[1]
        if max_decoded_pixels is not None and pixels > max_decoded_pixels:
            raise ImageDecodeError(_too_many_pixels(im.size, max_decoded_pixels))
        with admit(pixels) if admit is not None else contextlib.nullcontext():
            out = _load_rgb(im, draft_size)
            out = im.copy() if out is im else out  # a plain loaded image, independent of the file
            im.close()  # the full-size decode is freed before admit() is released
    except ImageDecodeError:
        raise
    except Exception as exc:
        raise ImageDecodeError(f"cannot convert image ({type(exc).__name__})") from None
    finally:
        im.close()
    return out


def _load_rgb(im: Image.Image, draft_size: int | None) -> Image.Image:
    """Decode, reduce (see :func:`decode_image`), orient and convert to RGB."""
    try:
        im.load()
    except MemoryError:
        raise ImageDecodeError("out of memory while decoding") from None
    except Exception:
        raise ImageDecodeError("truncated or corrupt image data") from None
    reduced = _reduce(im, draft_size)
    out = _to_rgb(_apply_orientation(reduced))
    return _reduce(out, draft_size) if reduced is im else out  # modes reduce() cannot take: after RGB


def _reduce(im: Image.Image, draft_size: int | None) -> Image.Image:
    """``im`` reduced by the largest whole factor that keeps both sides >= REDUCE_GAP * draft_size."""
    if not draft_size:
        return im
    factor = min(im.size) // (REDUCE_GAP * draft_size)
    if factor < 2 or im.mode in ("P", "1") or im.mode.startswith("I;16"):
        return im
    return im.reduce(factor)


def _open(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """``Image.open`` with every failure mapped to a reason; reads the header only.

    ``max_pixels=None`` means "no limit of ours" (header-only callers); Pillow's own guard still applies.
    """
    if not data:
        raise ImageDecodeError("empty file")
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError(_unrecognised_reason(data)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageDecodeError(_bomb_reason(data, max_pixels)) from None
    except Exception:
        raise ImageDecodeError("truncated or corrupt image data") from None
    if max_pixels is not None and im.size[0] * im.size[1] > max_pixels:
        im.close()
        raise ImageDecodeError(_too_many_pixels(im.size, max_pixels))
    return im


def _unrecognised_reason(data: bytes) -> str:
    """Name formats users commonly have but Pillow cannot read, so the failure is actionable."""
    head = data[:_SNIFF_BYTES].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"<svg") or (head.startswith((b"<?xml", b"<!doctype svg")) and b"<svg" in head):
        return "unsupported format: SVG"
    if data[4:8] == b"ftyp":
        brands = {data[i : i + 4] for i in range(8, min(len(data), 64), 4)}
        if data[8:12] in _AVIF_BRANDS:
            return "truncated or corrupt image data" if _PILLOW_HAS_AVIF else "unsupported format: AVIF"
        if brands & _HEIF_BRANDS or data[8:12] in _GENERIC_HEIF_BRANDS:
            return "unsupported format: HEIC/HEIF"
    return "not an image (unrecognised format)"


def _too_many_pixels(size: tuple[int, int], limit: int) -> str:
    width, height = size
    return f"too many pixels: {width}x{height} ({_mp(width * height)}) exceeds the limit of {_mp(limit)}"


def _bomb_reason(data: bytes, max_pixels: int | None) -> str:
    """Reason for an image that Pillow's own guard refused while opening it (above 2x MAX_IMAGE_PIXELS)."""
    size = _unchecked_header_size(data)
    if size is None:
        return "too many pixels: exceeds Pillow's decompression-bomb limit"
    if max_pixels is not None and size[0] * size[1] > max_pixels:
        return _too_many_pixels(size, max_pixels)
    pillow_limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    return _too_many_pixels(size, pillow_limit) + " (raise PIL.Image.MAX_IMAGE_PIXELS to allow it)"


def _unchecked_header_size(data: bytes) -> tuple[int, int] | None:
    """Parse only the header with Pillow's format plugins, without its bomb check, to report the size.

    Plugins read just the header in their constructor, so this allocates no pixel memory.
    """
    prefix = data[:16]
    for fmt in list(Image.ID):
        factory, accept = Image.OPEN[fmt]
        verdict = accept(prefix) if accept else True
        if not verdict or isinstance(verdict, str):
            continue
        try:
            return factory(io.BytesIO(data), "").size
        except Exception:
            continue
    return None


def _mp(pixels: int) -> str:
    megapixels = pixels / 1_000_000
    return f"{megapixels:.0f} MP" if megapixels >= 10 else f"{megapixels:.2g} MP"


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(0x0112, 1)
        return int(value) if isinstance(value, int) else 1
    except Exception:
        return 1


def _apply_orientation(im: Image.Image) -> Image.Image:
    """Rotate/flip per EXIF. A broken EXIF block keeps the stored orientation rather than failing."""
    if _orientation(im) in (1, 0):
        return im  # exif_transpose would copy the whole image for nothing
    try:
        return ImageOps.exif_transpose(im)
    except Exception:
        return im


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB the way a viewer would show it."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_depth_to_rgb(im)
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info
    if has_alpha:
        return _flatten_on_white(im.convert("RGBA"))
    return im.convert("RGB")


def _flatten_on_white(rgba: Image.Image) -> Image.Image:
    """Composite over white: transparent regions of logos and icons must not turn black."""
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_depth_to_rgb(im: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer and float grayscale to 8 bit instead of clipping.

    ``convert("L")`` clips every value above 255 to white, which makes most 16-bit images blank. ``I;16*``
    modes are scaled from 0..65535. For ``I`` and ``F`` the range is not recorded, so the smallest of
    0..255 and 0..65535 (and 0..1 for floats) that holds the data is assumed; beyond that, the data's
    own maximum.
    """
    values = np.asarray(im, dtype=np.float64)
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    if im.mode.startswith("I;16"):
        top = 65535.0
    else:
        peak = float(values.max()) if values.size else 0.0
        ranges = (1.0, 255.0, 65535.0) if im.mode == "F" else (255.0, 65535.0)
        top = next((t for t in ranges if peak <= t), peak)
    scaled = np.clip(values * (255.0 / top), 0, 255).round().astype(np.uint8)
    return Image.fromarray(scaled).convert("RGB")
