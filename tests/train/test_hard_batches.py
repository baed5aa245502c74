"""``--hard-batches``: k-means groups of look-alike images, and an epoch order made of those groups that
depends only on (seed, epoch)."""

from __future__ import annotations

import pytest
import torch

from train_contrastive.hard_batches import GroupedSampler, cached_image_descriptors, cluster


def blobs(centres: int, size: int, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """``centres`` tight clusters of ``size`` unit vectors each, shuffled; and each point's cluster."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.eye(dim)[:centres]  # orthogonal: the groups are unmistakable
    labels = torch.arange(centres).repeat_interleave(size)
    points = means[labels] + 0.02 * torch.randn(centres * size, dim, generator=generator)
    order = torch.randperm(len(points), generator=generator)
    return torch.nn.functional.normalize(points[order], dim=-1), labels[order].tolist()


def test_kmeans_recovers_well_separated_groups() -> None:
    points, labels = blobs(centres=6, size=8)
    clusters = cluster(points, group=8, seed=0)
    assert sorted(p for c in clusters for p in c) == list(range(48))
    assert sorted({labels[p] for p in c}.pop() for c in clusters if len({labels[p] for p in c}) == 1) == list(
        range(6)
    )


def test_grouped_order_is_a_permutation_of_consecutive_groups_fixed_by_seed_and_epoch() -> None:
    indices = list(range(100, 124))  # positions 0..23 map to these item ids
    clusters = [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]
    sampler = GroupedSampler(indices, clusters, group=4, seed=3)
    first = list(sampler)
    assert sorted(first) == indices and len(sampler) == 24
    for start in range(0, 24, 4):  # every cluster splits into whole groups of 4
        assert len({(item - 100) // 8 for item in first[start : start + 4]}) == 1, first
    assert list(sampler) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(second) == indices
    assert list(GroupedSampler(indices, clusters, group=4, seed=3)) == first


def test_clusters_must_cover_every_position_once() -> None:
    with pytest.raises(ValueError, match="exactly once"):
        GroupedSampler([5, 6, 7], [[0, 1], [1, 2]], group=2, seed=0)


def test_descriptors_are_the_pooled_image_features_before_the_projection(dual_path) -> None:
    """Replay from cached states gives the tower's own pooled CLS (unit length), not the projection."""
    from train_contrastive.features import FeatureCache, TextStates, frozen_image_states
    from vitrine.model import embedding
    from vitrine.model.encoder import load_components

    model, _, _ = load_components(str(dual_path))
    model.eval()
    pixels = torch.randn(3, 3, 32, 32)
    states = frozen_image_states(model, pixels, 1)
    empty = TextStates(torch.zeros(0, 1), torch.zeros(1, dtype=torch.long))
    cache = FeatureCache(states, torch.arange(3), empty, torch.zeros(4, dtype=torch.long), {})
    got = cached_image_descriptors(model, cache, [2, 0], start=1, batch_size=2)
    with torch.no_grad():
        output = model.vision_model(pixel_values=pixels, return_dict=True)
        pooled = embedding.pool(output, embedding.pooling_of(model)["vision"], None)
    torch.testing.assert_close(
        got, torch.nn.functional.normalize(pooled[[2, 0]], dim=-1), rtol=1e-5, atol=1e-5
    )


def test_hard_batches_without_the_cache_is_refused_before_training(towers_dir, tmp_path) -> None:
    from tests.train.conftest import write_pairs
    from train_contrastive.args import TrainArgs
    from train_contrastive.loop import train
    from train_contrastive.state import TrainingError

    data = write_pairs(tmp_path / "pairs", copies=1)
    args = TrainArgs(
        vision_model=str(towers_dir[0]),
        text_model=str(towers_dir[1]),
        projection_dim=32,
        train_data=str(data),
        output=str(tmp_path / "out"),
        augment=True,  # pixels change every epoch: nothing is cached
        hard_batches=2,
        num_workers=0,
        progress=False,
    )
    with pytest.raises(TrainingError, match="--hard-batches needs the frozen-layer cache"):
        train(args)
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("group", [-1, 1])
def test_a_group_of_fewer_than_two_images_is_refused(group) -> None:
    from train_contrastive.args import TrainArgs

    with pytest.raises(ValueError, match="--hard-batches"):
        TrainArgs(model="m", train_data="d", output="o", hard_batches=group).validate()
