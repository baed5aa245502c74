"""Encoder runtimes and precisions: export parity per family, the int8 gate, the cache, the fingerprint.

Real exports of tiny random checkpoints (torch.onnx), real ONNX Runtime and OpenVINO sessions, real
static int8 quantization; every runtime is compared with the torch fp32 encoder on the same inputs.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import pattern_image
from vitrine.errors import FingerprintMismatch, ModelLoadError
from vitrine.index.store import IndexStore
from vitrine.model import embedding
from vitrine.model.encoder import Encoder, _normalise, make_fingerprint
from vitrine.model.runtimes import cache
from vitrine.model.runtimes.calibration import Calibration, draw
from vitrine.open_index import encoder_fingerprint, load_encoder

pytest.importorskip("onnxruntime", reason="the onnx runtime is an optional dependency (requirements.txt)")
pytest.importorskip("openvino", reason="the openvino runtime is an optional dependency (requirements.txt)")

IMAGES = [pattern_image(i) for i in range(48)]
TEXTS = ["red stripes", "a small blue pattern with many thin lines", "x", "pattern number 7"]
VARIANTS = [
    ("onnx", "fp32"),
    ("openvino", "fp32"),
    ("openvino", "bf16"),
    ("onnx", "int8"),
    ("openvino", "int8"),
]


@pytest.fixture(scope="module")
def families(clip_path: Path, siglip_path: Path, dual_path: Path) -> dict[str, Path]:
    return {"clip": clip_path, "siglip": siglip_path, "dual": dual_path}


def _torch(path: Path) -> Encoder:
    return Encoder.from_pretrained(str(path), device="cpu", runtime="torch", precision="fp32")


def _calibration(encoder: Encoder, pixels_for_calibration: np.ndarray | None = None) -> Calibration:
    pixels = encoder.preprocess(IMAGES).numpy()
    calibrate = pixels[:16] if pixels_for_calibration is None else pixels_for_calibration
    return Calibration(calibrate, pixels[16:])


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1)  # both are L2-normalised by the encoder


@pytest.mark.parametrize("runtime,precision", VARIANTS)
@pytest.mark.parametrize("family", ["clip", "siglip", "dual"])
def test_export_parity_with_torch_fp32(families, family, runtime, precision):
    reference = _torch(families[family])
    calibration = _calibration(reference) if precision == "int8" else None
    encoder = Encoder.from_pretrained(
        str(families[family]), device="cpu", runtime=runtime, precision=precision, calibration=calibration
    )
    assert (encoder.runtime.runtime, encoder.runtime.precision) == (runtime, precision)
    images, texts = encoder.encode_images(IMAGES[16:]), encoder.encode_texts(TEXTS)
    want_images, want_texts = reference.encode_images(IMAGES[16:]), reference.encode_texts(TEXTS)
    assert images.shape == want_images.shape and images.dtype == np.float32
    if precision == "fp32":
        assert np.abs(images - want_images).max() < 1e-4
        assert np.abs(texts - want_texts).max() < 1e-4
    elif precision == "bf16":
        assert _cosines(images, want_images).min() > 0.99 and _cosines(texts, want_texts).min() > 0.99
    else:  # int8 image tower; the text tower stays fp32 in the same runtime
        [validation] = encoder.fingerprint["validation"]
        assert validation["passed"] and validation["images"] == 32
        assert _cosines(images, want_images).min() >= validation["gate"]["min_cosine"]
        assert np.abs(texts - want_texts).max() < 1e-4
    same_space = precision != "int8"
    assert (encoder.fingerprint["id"] == reference.fingerprint["id"]) is same_space


def test_torch_fp32_is_the_old_path_bit_for_bit(clip_path):
    encoder = _torch(clip_path)
    pixels = encoder.preprocess(IMAGES[:5])
    with torch.inference_mode():
        old = _normalise(embedding.image_features(encoder.model, pixels))
    assert np.array_equal(encoder.encode_pixels(pixels), old)
    legacy = make_fingerprint(
        str(clip_path), encoder.model, encoder.image_processor, encoder.tokenizer, {"draft": 32}, encoder.dim
    )
    assert encoder.fingerprint["id"] == legacy["id"]
    assert encoder.fingerprint["runtime"] == "torch" and encoder.fingerprint["precision"]["image"] == "fp32"


def test_gate_refuses_garbage_calibration_and_falls_back_with_the_reason(dual_path, caplog):
    reference = _torch(dual_path)
    garbage = np.random.default_rng(0).uniform(-300, 300, (16, 3, 32, 32)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="vitrine.runtimes"):
        encoder = Encoder.from_pretrained(
            str(dual_path),
            device="cpu",
            runtime="onnx",
            precision="int8",
            calibration=_calibration(reference, garbage),
        )
    assert encoder.runtime.precision == "fp32"  # the next validated precision
    refused, accepted = encoder.fingerprint["validation"]
    assert not refused["passed"] and refused["precision"] == "int8"
    assert (
        refused["reason"].startswith("cosine to fp32 ")
        and "< 0.98 on 32 held-out images" in refused["reason"]
    )
    assert accepted["passed"] and accepted["precision"] == "fp32"
    assert "onnx int8 refused, falling back: cosine to fp32" in caplog.text
    assert encoder.fingerprint["id"] == reference.fingerprint["id"]


def test_gate_checks_text_to_image_recall_where_captions_exist(clip_path, monkeypatch):
    reference = _torch(clip_path)
    pixels = reference.preprocess(IMAGES).numpy()
    captions = [(f"pattern number {i}",) for i in range(16, 48)]
    monkeypatch.setenv("VITRINE_INT8_MIN_COSINE", "0.5")  # let the recall check decide
    encoder = Encoder.from_pretrained(
        str(clip_path),
        device="cpu",
        runtime="openvino",
        precision="int8",
        calibration=Calibration(pixels[:16], pixels[16:], captions),
    )
    first = encoder.fingerprint["validation"][0]
    assert first["captions"] == 32 and first["recall_fp32"] is not None and first["gate"]["min_cosine"] == 0.5
    dropped = first["recall_fp32"] - first["recall"]
    assert first["passed"] is (dropped <= 0.5)
    if not first["passed"]:
        assert "text→image R@10" in first["reason"] and encoder.runtime.precision != "int8"


def _cache_files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*.onnx")}


def test_exported_and_quantized_models_are_reused_from_the_cache(clip_path, tmp_path):
    checkpoint = shutil.copytree(clip_path, tmp_path / "clip", ignore=shutil.ignore_patterns(cache.BESIDE))
    reference = _torch(checkpoint)
    calibration = _calibration(reference)
    first = Encoder.from_pretrained(
        str(checkpoint), device="cpu", runtime="onnx", precision="int8", calibration=calibration
    )
    root = checkpoint / cache.BESIDE
    files = _cache_files(root)
    assert len(files) == 3  # fp32 image + text towers, int8 image tower
    for runtime in ("onnx", "openvino"):
        again = Encoder.from_pretrained(
            str(checkpoint), device="cpu", runtime=runtime, precision="int8", calibration=calibration
        )
        assert again.runtime.quantization == first.runtime.quantization
    reopened = Encoder.from_pretrained(  # as an index reopens it: by its recorded calibration id
        str(checkpoint),
        device="cpu",
        runtime="onnx",
        precision="int8",
        quantization=first.runtime.quantization,
    )
    assert reopened.fingerprint["id"] == first.fingerprint["id"]
    assert np.array_equal(reopened.encode_images(IMAGES[:4]), first.encode_images(IMAGES[:4]))
    assert _cache_files(root) == files  # nothing exported or quantized again


def test_a_half_written_cache_entry_is_rebuilt_not_trusted(clip_path, tmp_path):
    checkpoint = shutil.copytree(clip_path, tmp_path / "clip", ignore=shutil.ignore_patterns(cache.BESIDE))
    Encoder.from_pretrained(str(checkpoint), device="cpu", runtime="onnx", precision="fp32")
    [entry] = [p for p in (checkpoint / cache.BESIDE).iterdir()]
    (entry / cache.META).unlink()  # as if killed before the entry was complete
    (entry / "image.onnx").write_bytes(b"not a model")
    encoder = Encoder.from_pretrained(str(checkpoint), device="cpu", runtime="onnx", precision="fp32")
    assert np.abs(encoder.encode_texts(TEXTS) - _torch(checkpoint).encode_texts(TEXTS)).max() < 1e-4
    assert (entry / cache.META).is_file() and (entry / "image.onnx").stat().st_size > 1000


def test_int8_model_missing_from_the_cache_is_a_clear_error(clip_path, tmp_path):
    checkpoint = shutil.copytree(clip_path, tmp_path / "clip", ignore=shutil.ignore_patterns(cache.BESIDE))
    with pytest.raises(
        ModelLoadError, match=r"int8 model this index was built with \(calibration 0123\) is not in"
    ):
        Encoder.from_pretrained(
            str(checkpoint), device="cpu", runtime="onnx", precision="int8", quantization="0123"
        )


def test_int8_index_refuses_a_float_encoder_and_back(clip_path, tmp_path):
    reference = _torch(clip_path)
    int8 = Encoder.from_pretrained(
        str(clip_path), device="cpu", runtime="onnx", precision="int8", calibration=_calibration(reference)
    )
    IndexStore.create(tmp_path / "int8", encoder_fingerprint(int8)).close()
    with pytest.raises(
        FingerprintMismatch,
        match=r"index \{.*precision=\{'image': 'int8'.*vs encoder \{.*precision=\{'image': 'fp32'.*"
        r"the index was built with onnx int8: omit --runtime/--precision",
    ):
        IndexStore.open(tmp_path / "int8", expected_fingerprint=reference.fingerprint)
    IndexStore.create(tmp_path / "fp32", encoder_fingerprint(reference)).close()
    with pytest.raises(
        FingerprintMismatch,
        match=r"index \{.*precision=\{'image': 'fp32'.*vs encoder \{.*'int8'.*built with torch fp32",
    ):
        IndexStore.open(tmp_path / "fp32", expected_fingerprint=int8.fingerprint)
    manifest = IndexStore.read_manifest(tmp_path / "int8")["fingerprint"]
    assert manifest["quantization"]["calibration"] == int8.runtime.quantization
    assert manifest["validation"][0]["passed"] and manifest["validation"][0]["cosine_min"] >= 0.98
    # reopening reuses the recorded runtime, precision and calibration: no flags, no catalog
    reopened = load_encoder(tmp_path / "int8", None, device="cpu")
    assert reopened.fingerprint["id"] == int8.fingerprint["id"] and reopened.runtime.runtime == "onnx"


def test_an_index_from_before_runtimes_opens_with_the_default_settings(clip_path, tmp_path):
    encoder = _torch(clip_path)
    old = {k: v for k, v in encoder_fingerprint(encoder).items() if k not in ("runtime", "precision")}
    IndexStore.create(tmp_path / "old", old).close()
    reopened = load_encoder(tmp_path / "old", None, device="cpu")  # runtime torch, precision auto
    assert reopened.runtime.runtime == "torch"
    IndexStore.open(tmp_path / "old", expected_fingerprint=reopened.fingerprint).close()
    onnx = load_encoder(tmp_path / "old", None, device="cpu", runtime="onnx")  # same space: allowed
    IndexStore.open(tmp_path / "old", expected_fingerprint=onnx.fingerprint).close()


def test_a_float_index_reopens_with_its_runtime_and_auto_never_makes_it_int8(clip_path, tmp_path):
    built = Encoder.from_pretrained(str(clip_path), device="cpu", runtime="openvino", precision="fp32")
    IndexStore.create(tmp_path / "ov", encoder_fingerprint(built)).close()
    catalog = [type("Record", (), {"path": "unused.jpg", "captions": ()})()]  # would fail if it were read
    reopened = load_encoder(tmp_path / "ov", None, catalog=catalog, device="cpu")
    assert reopened.runtime.runtime == "openvino" and reopened.runtime.precision in ("fp32", "bf16")
    assert all(t["precision"] != "int8" for t in reopened.fingerprint.get("validation", []))
    IndexStore.open(tmp_path / "ov", expected_fingerprint=reopened.fingerprint).close()


def test_auto_picks_a_validated_precision_and_onnx_has_no_bf16(clip_path):
    reference = _torch(clip_path)
    encoder = Encoder.from_pretrained(
        str(clip_path),
        device="cpu",
        runtime="openvino",
        precision="auto",
        calibration=_calibration(reference),
    )
    tried = {t["precision"]: t["passed"] for t in encoder.fingerprint["validation"]}
    assert "fp32" in tried and "int8" in tried and tried[encoder.runtime.precision]
    with pytest.raises(ModelLoadError, match="ONNX Runtime has no bf16 CPU kernels"):
        Encoder.from_pretrained(str(clip_path), device="cpu", runtime="onnx", precision="bf16")
    with pytest.raises(
        ModelLoadError, match="--precision int8 needs calibration images: build from a catalog"
    ):
        Encoder.from_pretrained(str(clip_path), device="cpu", runtime="openvino", precision="int8")
    with pytest.raises(ModelLoadError, match="--runtime torch has no int8 path"):
        Encoder.from_pretrained(str(clip_path), device="cpu", runtime="torch", precision="int8")


def test_probe_of_a_constant_image_still_encodes(clip_path):
    encoder = Encoder.from_pretrained(str(clip_path), device="cpu", runtime="openvino", precision="fp32")
    assert encoder.encode_images([Image.new("RGB", (40, 30), (10, 10, 10))]).shape == (1, encoder.dim)
    assert encoder.trace() == {"text": "openvino", "image": "openvino"}


def test_calibration_draw_is_seeded_and_holds_out_fewer_images_without_captions():
    from vitrine.catalog.readers import Record

    plain = [Record(f"k{i}", f"/p/{i}.jpg") for i in range(1000)]
    captioned = [Record(f"k{i}", f"/p/{i}.jpg", (f"caption {i}",)) for i in range(1000)]
    first, again = draw(plain), draw(plain)
    assert first.sources == again.sources and len(first.sources) == 64 + 64  # cosine gate only
    assert len(draw(captioned).sources) == 64 + 256  # enough captions for R@10 to resolve half a point
    assert len(set(first.sources)) == len(first.sources) and first.calibrate == 64
