"""Hard batches: build each training batch from a few groups of images that look alike.

With random batches of 64, most in-batch negatives of a caption are easy (a dog caption against a
football match, a beach, a street); training accuracy within the batch passes 90 % early while recall
over a thousand images stays far lower, so most of each step's negatives teach little. Batches made of
``batch / group`` groups of similar images give every query a handful of look-alike negatives -- the
images it is actually confused with at retrieval time -- at no extra cost per step. It is hard-negative
mining by batch composition (as in dense retrieval's clustered batches), rather than VSE++'s hardest
negative in the loss, which collapses from random projections (bench/RESULTS.md).

"Alike" is decided once, before training, from the start model's pooled image features: k-means
(spherical, FAISS) into ``len(images) / group`` clusters. Fixing it at the start keeps every epoch's
order a pure function of ``(seed, epoch)``, which ``--resume`` relies on (:mod:`.data`). Each epoch
shuffles every cluster, cuts it into groups of ``group`` images, shuffles the groups and concatenates
them; consecutive ``batch`` items then form a batch of a few groups (the remainders of clusters mix
into the next ones).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from train_contrastive.args import TrainArgs
from train_contrastive.data import EpochSampler
from train_contrastive.features import FeatureCache, replay_cached_images, replay_image_pooled


@torch.inference_mode()
def cached_image_descriptors(
    model: nn.Module, cache: FeatureCache, indices: Sequence[int], start: int, batch_size: int
) -> torch.Tensor:
    """Unit-length pooled image features (before the projection) of the cached images ``indices``."""
    was_training = model.training
    model.eval()
    pooled = replay_cached_images(replay_image_pooled, model, cache, list(indices), start, batch_size)
    model.train(was_training)
    return torch.nn.functional.normalize(pooled, dim=-1)


def cluster(descriptors: torch.Tensor, group: int, seed: int) -> list[list[int]]:
    """Positions of ``descriptors`` grouped by spherical k-means into about ``len / group`` clusters
    (empty clusters dropped)."""
    import faiss

    points = np.ascontiguousarray(descriptors.numpy(), dtype=np.float32)
    k = max(1, len(points) // group)
    if k == 1:
        return [list(range(len(points)))]
    # Groups are small by design (a few points per centroid), so faiss's minimum-points warning does
    # not apply; the best of a few restarts guards against two look-alike groups merging.
    kmeans = faiss.Kmeans(
        points.shape[1], k, niter=20, nredo=10, seed=seed, spherical=True, min_points_per_centroid=1
    )
    kmeans.train(points)
    _, assignment = kmeans.index.search(points, 1)
    members: dict[int, list[int]] = {}
    for position, label in enumerate(assignment[:, 0].tolist()):
        members.setdefault(label, []).append(position)
    return [members[label] for label in sorted(members)]


class GroupedSampler(EpochSampler):
    """An epoch order in which consecutive runs of ``group`` items come from one cluster.

    ``clusters`` hold positions into ``indices``. The order depends only on ``(seed, epoch)``.
    """

    def __init__(self, indices: Sequence[int], clusters: list[list[int]], group: int, seed: int) -> None:
        super().__init__(indices, seed)
        if sorted(p for c in clusters for p in c) != list(range(len(self.indices))):
            raise ValueError("clusters must hold every position of indices exactly once")
        self.clusters = clusters
        self.group = group

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        groups: list[list[int]] = []
        for members in self.clusters:
            shuffled = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
            groups.extend(shuffled[s : s + self.group] for s in range(0, len(shuffled), self.group))
        order = torch.randperm(len(groups), generator=generator).tolist()
        return iter([self.indices[p] for g in order for p in groups[g]])


def grouped_sampler(
    model: nn.Module, cache: FeatureCache, usable: list[int], start: int, args: TrainArgs
) -> GroupedSampler:
    """The sampler of ``--hard-batches``: clusters of the start model's image features of ``usable``."""
    descriptors = cached_image_descriptors(model, cache, usable, start, args.eval_batch_size)
    clusters = cluster(descriptors, args.hard_batches, args.seed)
    return GroupedSampler(usable, clusters, args.hard_batches, args.seed)
