"""decode_image on real files: hostile inputs fail with a reason, every valid one comes back as loaded RGB."""

from __future__ import annotations

import contextlib
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, features

from tests.hostile import EXPECTED_REASONS, jpeg_bytes, make_hostile_folder, pattern, png_header_only
from vitrine.errors import ImageDecodeError
from vitrine.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, decode_image, image_size


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bool]]:
    root = tmp_path_factory.mktemp("hostile")
    return root, make_hostile_folder(root)


def _outcome(source: Path | bytes, **kwargs: object) -> tuple[str, object]:
    """("ok", pixels) or ("error", reason), comparable across runs and threads."""
    try:
        image = decode_image(source, **kwargs)  # type: ignore[arg-type]
    except ImageDecodeError as exc:
        return "error", exc.reason
    assert image.mode == "RGB"
    return "ok", (image.size, image.tobytes())


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_hostile_folder_is_small_complete_and_all_attempted(hostile: tuple[Path, dict[str, bool]]) -> None:
    root, expected = hostile
    files = {p.name: p for p in root.iterdir()}
    assert set(files) == set(expected)
    assert sum(p.stat().st_size for p in files.values()) < 1_000_000
    assert {name for name, ok in expected.items() if not ok} == set(EXPECTED_REASONS)
    # every file has an extension catalogs attempt, so failures get reported rather than skipped
    assert all(p.suffix.lower() in IMAGE_EXTENSIONS for p in files.values())
    assert any(p.suffix == ".JPG" for p in files.values())


def test_every_hostile_file_decodes_or_fails_with_its_reason(hostile: tuple[Path, dict[str, bool]]) -> None:
    root, expected = hostile
    problems = []
    for name, should_decode in expected.items():
        try:
            image = decode_image(root / name)
        except ImageDecodeError as exc:
            assert exc.source == str(root / name)
            if should_decode or not exc.reason.startswith(EXPECTED_REASONS[name]):
                problems.append(f"{name}: unexpected failure {exc.reason!r}")
            continue
        if not should_decode:
            problems.append(f"{name}: decoded but should fail")
        elif image.mode != "RGB" or min(image.size) < 1:
            problems.append(f"{name}: got mode {image.mode} size {image.size}")
    assert not problems, problems


def test_bomb_is_refused_from_the_header(hostile: tuple[Path, dict[str, bool]]) -> None:
    root, _ = hostile
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(root / "bomb_30000x30000.png")
    assert caught.value.reason == "too many pixels: 30000x30000 (900 MP) exceeds the limit of 100 MP"
    assert image_size(root / "bomb_30000x30000.png") == (30000, 30000)


def test_pixel_limit_knob_and_50_megapixels_pass_by_default() -> None:
    photo = jpeg_bytes(Image.fromarray(pattern(128, 96, seed=1)))
    with pytest.raises(ImageDecodeError, match=r"too many pixels: 128x96 \(0.012 MP\)"):
        decode_image(photo, max_pixels=10_000)
    assert decode_image(photo, max_pixels=128 * 96).size == (128, 96)
    # a 50 MP header passes the size check (it then fails only because the pixel data is missing)
    assert DEFAULT_MAX_PIXELS > 8660 * 5774
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(png_header_only(8660, 5774))
    assert not caught.value.reason.startswith("too many pixels")


def test_exif_orientation_is_applied(hostile: tuple[Path, dict[str, bool]]) -> None:
    root, _ = hostile
    path = root / "rotated_exif.jpg"
    assert Image.open(path).size == (80, 40)  # stored landscape
    image = decode_image(path)
    assert image.size == (40, 80) == image_size(path)
    red, blue = np.asarray(image)[5, 20], np.asarray(image)[75, 20]  # stored left half is now on top
    assert red[0] > 200 > red[2] and blue[2] > 200 > blue[0]


def test_transparency_is_flattened_on_white(hostile: tuple[Path, dict[str, bool]]) -> None:
    root, _ = hostile
    rgba = decode_image(root / "rgba.png")
    assert rgba.getpixel((0, 0)) == (255, 255, 255)
    assert rgba.getpixel((31, 0)) == (0, 200, 0)
    palette = decode_image(root / "palette_transparent.png")
    assert palette.getpixel((0, 0)) == (255, 255, 255)
    assert palette.getpixel((19, 0)) == (255, 0, 0)
    half = Image.new("LA", (2, 1), (0, 128))
    assert decode_image(_png(half)).getpixel((0, 0)) == (127, 127, 127)


def test_16_bit_gray_is_scaled_not_clipped(hostile: tuple[Path, dict[str, bool]]) -> None:
    root, _ = hostile
    assert Image.open(root / "gray16.png").convert("L").getpixel((0, 0)) == 255  # the pitfall
    values = np.asarray(decode_image(root / "gray16.png"))
    assert values.min() >= 127 and values.max() <= 129


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.full((4, 4), 0.5, dtype=np.float32), 128),  # F in 0..1
        (np.full((4, 4), 40000, dtype=np.int32), 156),  # I holding 16-bit data
        (np.full((4, 4), 200, dtype=np.int32), 200),  # I holding 8-bit data
    ],
)
def test_float_and_32_bit_modes(array: np.ndarray, expected: int) -> None:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "TIFF")
    assert decode_image(buf.getvalue()).getpixel((0, 0)) == (expected,) * 3


def test_cmyk_bilevel_and_animation(hostile: tuple[Path, dict[str, bool]]) -> None:
    root, _ = hostile
    red = decode_image(root / "cmyk.jpg").getpixel((10, 10))
    assert red[0] > 240 and red[1] < 15 and red[2] < 15
    assert decode_image(root / "animated.gif").getpixel((5, 5)) == (255, 0, 0)  # first frame
    bilevel = Image.new("1", (4, 1), 0)
    bilevel.putpixel((3, 0), 1)
    decoded = decode_image(_png(bilevel))
    assert decoded.getpixel((0, 0)) == (0, 0, 0) and decoded.getpixel((3, 0)) == (255, 255, 255)


def test_bytes_and_path_give_identical_pixels(hostile: tuple[Path, dict[str, bool]]) -> None:
    root, expected = hostile
    for name, should_decode in expected.items():
        data = (root / name).read_bytes()
        assert _outcome(data) == _outcome(root / name), name
        if should_decode:
            assert decode_image(data).tobytes() == decode_image(str(root / name)).tobytes()


def test_filesystem_and_sniffing_reasons(tmp_path: Path) -> None:
    cases = {
        tmp_path / "missing.jpg": "file not found",
        tmp_path: "not a regular file (a directory)",  # one reason, as catalogs report it
    }
    for path, reason in cases.items():
        with pytest.raises(ImageDecodeError) as caught:
            decode_image(path)
        assert caught.value.reason.startswith(reason) and caught.value.source == str(path)
    for data, reason in [
        (b"", "empty file"),
        (b"  <svg xmlns='http://www.w3.org/2000/svg'/>", "unsupported format: SVG"),
        (b"<?xml version='1.0'?><note>not svg</note>", "not an image"),
        (b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00heic" + bytes(64), "unsupported format: HEIC"),
    ]:
        with pytest.raises(ImageDecodeError, match=reason):
            decode_image(data)


@pytest.mark.skipif(not features.check_module("avif"), reason="this Pillow has no AVIF support")
def test_avif_decodes_when_pillow_supports_it() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (255, 0, 0)).save(buf, "AVIF")
    assert decode_image(buf.getvalue()).getpixel((8, 8))[0] > 240
    with pytest.raises(ImageDecodeError, match="truncated or corrupt"):
        decode_image(buf.getvalue()[:40])


def test_draft_size_decodes_large_jpegs_at_reduced_scale() -> None:
    data = jpeg_bytes(Image.fromarray(pattern(2000, 1500, seed=5)), quality=90)
    full = decode_image(data)
    small = decode_image(data, draft_size=224)
    assert full.size == (2000, 1500)
    assert small.size == (500, 375)  # DCT scale 1/4: the smallest that keeps both sides >= 224
    reference = np.asarray(full.resize(small.size, Image.Resampling.BOX), dtype=np.float32)
    assert np.abs(np.asarray(small, dtype=np.float32) - reference).mean() < 3.0
    assert decode_image(data, draft_size=700).size == (1000, 750)
    assert decode_image(data, draft_size=1000).size == (2000, 1500)  # half would make 750 < 1000


def test_draft_size_leaves_a_png_under_three_times_that_size_alone() -> None:
    data = _png(Image.fromarray(pattern(600, 400, seed=6)))
    assert decode_image(data, draft_size=100).tobytes() == decode_image(data).tobytes()


def test_decoding_from_many_threads(hostile: tuple[Path, dict[str, bool]]) -> None:
    root, expected = hostile
    paths = [root / name for name in expected] * 4
    serial = [_outcome(p) for p in paths]
    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(_outcome, paths))
    assert parallel == serial
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt EXIF it skips
def test_randomly_corrupted_files_only_raise_image_decode_error() -> None:
    """Mutated headers and payloads of every format must never leak a raw Pillow/OS/struct error."""
    import random

    base = Image.fromarray(pattern(24, 16, seed=8))
    samples = []
    for fmt in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "ICO", "PPM", "TGA"):
        buf = io.BytesIO()
        base.save(buf, fmt)
        samples.append(buf.getvalue())
    rng = random.Random(0)
    for _ in range(600):
        data = bytearray(rng.choice(samples))
        for _ in range(rng.randint(1, 6)):
            if rng.random() < 0.75:
                data[rng.randrange(len(data))] = rng.randrange(256)
            else:
                del data[rng.randrange(1, len(data)) :]
        try:
            assert decode_image(bytes(data)).mode == "RGB"
        except ImageDecodeError as exc:
            assert exc.reason


def test_large_images_are_reduced_before_conversion_and_match_a_direct_resize() -> None:
    """A 12x-too-large PNG comes back reduced (both sides still >= 3x the draft size), and resized to
    the draft size it is within one grey level of the full decode resized directly."""
    photo = Image.fromarray(pattern(2700, 2016, seed=3))
    data = _png(photo)
    reduced = decode_image(data, draft_size=224)
    assert reduced.mode == "RGB" and reduced.size == (900, 672)  # factor 3: 672 // 224 = 3
    full = decode_image(data)
    assert full.size == (2700, 2016)
    a = np.asarray(reduced.resize((300, 224), Image.Resampling.BICUBIC), np.int16)
    b = np.asarray(full.resize((300, 224), Image.Resampling.BICUBIC), np.int16)
    assert int(np.abs(a - b).max()) <= 1
    palette = decode_image(_png(photo.convert("P")), draft_size=224)  # reduce() cannot take P: after RGB
    assert palette.size == (900, 672) and palette.mode == "RGB"


def test_decoded_pixel_limit_counts_after_the_jpeg_draft_and_admit_sees_the_pixels() -> None:
    big = Image.fromarray(pattern(4000, 3000, seed=4))
    seen: list[int] = []

    @contextlib.contextmanager
    def admit(pixels: int):  # type: ignore[no-untyped-def]
        seen.append(pixels)
        yield

    limit = r"too many pixels: 4000x3000 \(12 MP\) exceeds the limit of 10 MP"
    with pytest.raises(ImageDecodeError, match=limit):
        decode_image(_png(big), max_decoded_pixels=10_000_000, admit=admit)
    assert seen == []  # refused from the header: nothing admitted, nothing decoded
    jpeg = jpeg_bytes(big, quality=80)  # the draft decodes it at 1/8 scale: 500x375
    assert decode_image(jpeg, draft_size=224, max_decoded_pixels=10_000_000, admit=admit).size == (500, 375)
    assert seen == [500 * 375]
