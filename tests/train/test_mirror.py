"""``--mirror``: the training cache also holds each image flipped left to right, and every epoch shows
each image or its mirror by a coin that depends only on (seed, epoch, item)."""

from __future__ import annotations

import pytest
import torch

from tests.train.conftest import write_pairs
from train_contrastive.cache import CachedCollator, build_cache
from train_contrastive.data import load_pairs
from train_contrastive.features import frozen_image_states


@pytest.fixture
def mirrored_cache(dual_path, tmp_path):
    from vitrine.model.encoder import load_components

    model, processor, tokenizer = load_components(str(dual_path))
    pairs = load_pairs(str(write_pairs(tmp_path / "pairs", copies=2)))
    common = dict(batch_size=4, num_workers=0, limit=16, dtype=torch.float32, device=torch.device("cpu"))
    cache = build_cache(model, pairs, processor, tokenizer, {"vision": 1, "text": 1}, mirror=True, **common)
    return model, processor, pairs, cache


def test_mirrored_rows_are_the_flipped_pictures_states(mirrored_cache) -> None:
    import numpy as np
    from PIL import Image

    model, processor, pairs, cache = mirrored_cache
    assert cache.mirrored is not None and cache.mirrored.shape == cache.images.shape
    picture = Image.open(pairs.paths[3]).convert("RGB")
    flipped = picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(processor(images=[flipped], return_tensors="np")["pixel_values"]))
    want = frozen_image_states(model, pixels.float(), 1)[0]
    row = int(cache.image_row[3])
    torch.testing.assert_close(cache.mirrored[row], want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(cache.images[row], want, atol=1e-3)  # stripes and noise are not symmetric
    from train_contrastive.features import FeatureCache

    assert torch.equal(FeatureCache.from_state(cache.to_state()).mirrored, cache.mirrored)


def test_each_epoch_shows_the_image_or_its_mirror_by_a_fixed_coin(mirrored_cache) -> None:
    _, _, pairs, cache = mirrored_cache
    collator = CachedCollator(cache, pairs, seed=0)
    items = list(range(len(pairs)))
    rows = cache.image_row[items]

    def shown(epoch: int) -> list[bool]:
        collator.set_epoch(epoch)
        states = collator(items)["image_states"]
        for k, state in enumerate(states):
            assert torch.equal(state, cache.images[rows[k]]) or torch.equal(state, cache.mirrored[rows[k]])
        return [torch.equal(state, cache.mirrored[rows[k]]) for k, state in enumerate(states)]

    seen = [shown(epoch) for epoch in range(4)]
    assert shown(1) == seen[1]  # a pure function of (seed, epoch, item)
    assert any(any(s) for s in seen) and not all(all(s) for s in seen)
    assert len({tuple(s) for s in seen}) > 1


def test_mirror_without_the_cache_is_refused(towers_dir, tmp_path) -> None:
    from train_contrastive.args import TrainArgs
    from train_contrastive.loop import train
    from train_contrastive.state import TrainingError

    args = TrainArgs(
        vision_model=str(towers_dir[0]),
        text_model=str(towers_dir[1]),
        projection_dim=32,
        train_data=str(write_pairs(tmp_path / "pairs", copies=1)),
        output=str(tmp_path / "out"),
        augment=True,
        mirror=True,
        num_workers=0,
        progress=False,
    )
    with pytest.raises(TrainingError, match="--mirror needs the frozen-layer cache"):
        train(args)
