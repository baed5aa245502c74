"""The training losses, each over the *global* batch: CLIP's symmetric InfoNCE (the default), SigLIP's
pairwise sigmoid loss and VSE++'s hardest-negative max-margin loss (``--loss``).

With N processes each holding B pairs, the useful number of negatives per pair is N·B - 1, not B - 1
(``transformers``' built-in CLIP loss sees the local batch only). :func:`gather_with_grad` collects
every process's embeddings with ``torch.distributed.all_gather`` -- which returns tensors detached from
autograd -- and then puts this process's *own* tensor back into its slot. The resulting global matrix
therefore carries gradients to the local embeddings (as queries and as negatives of everyone else),
and every process computes the same global loss. All three losses work this way.

Exactness across process counts: the gradient each process gets is the full gradient of the global
loss with respect to *its* embeddings, i.e. its share of the total. DDP then *averages* parameter
gradients over N processes, so :func:`contrastive_loss` returns the loss to back-propagate multiplied
by N (``backward_scale``): N processes with batch B then take exactly the optimizer step one process
takes with batch N·B over the same pairs (tested with two CPU processes).

Batch sizes may differ between processes (a bad file dropped from one batch), so sizes are exchanged
first and tensors padded to the largest before gathering.

Multi-positive targets (``--positives all``): a batch then holds B images and *all* their captions;
``owner[j]`` is the row of the image caption j describes. Every loss reads its positives from ``owner``
(a one-to-one batch is ``owner = arange(B)``): InfoNCE's image→text target is uniform over the image's
own captions, SigLIP labels every own pair +1, VSE++ pays a margin per positive pair.

Queue negatives (``--queue-size``): detached embeddings of earlier steps' images and captions
(:class:`train_contrastive.queue.NegativeQueue`) join each query's candidates as extra negatives. An
entry showing the same *catalog image* as the query's positive (that image seen in an earlier epoch, or
one of its other captions) is masked out, so the queue never supplies a query's positive as a negative.

Soft targets (``--soft-targets ε``, InfoNCE only): Flickr-style data has many near-identical scenes ("a
dog runs through the grass"), so another picture in the batch is often a fine answer to a caption, yet
the one-hot target calls it wrong. A share ε of each target is spread over the batch by how alike the
*captions* are: caption c's target over image j follows ``softmax(cos(c, centroid of j's captions) / τ)``,
and image i's over caption k follows ``softmax(cos(centroid of i's captions, k) / τ)``, with the model's
own detached caption embeddings and a fixed teacher temperature τ (``--soft-temperature``). The model's
learnt temperature would be too sharp: a caption is part of its own picture's centroid, so at 0.05-0.07
nearly all of the soft row lands on the own picture again. Text says what a picture shows, so two
pictures whose captions agree are treated as partly interchangeable (the false-negative correction of
soft-target CLIP variants, with the captions as the teacher).

Parameters of the loss itself (the temperature, SigLIP's bias) enter every entry of the global matrix on
every process, so each process would get their *whole* gradient, and the ``× N`` above then DDP's average
would leave it N times too large: :func:`shared_scalar` gives them a 1/N share of the gradient instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(local: torch.Tensor) -> torch.Tensor:
    """All processes' rows concatenated in rank order; gradients flow to this process's rows."""
    rank, world = _world()
    if world == 1:
        return local
    size = torch.tensor([local.shape[0]], device=local.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    padded = local.new_zeros((max(counts), *local.shape[1:]))
    padded[: local.shape[0]] = local.detach()
    slots = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(slots, padded)
    parts = [slot[:n] for slot, n in zip(slots, counts, strict=True)]
    parts[rank] = local  # the only copy with an autograd history
    return torch.cat(parts)


def shared_scalar(param: torch.Tensor, world: int) -> torch.Tensor:
    """``param``'s value, with 1/``world`` of its gradient (see the module docstring)."""
    if world == 1:
        return param
    return param / world + param.detach() * (1 - 1 / world)


@dataclass
class Negatives:
    """Extra candidates from the queue: L2-normalised, detached embeddings with the catalog index of
    the image each describes (``image_ids`` for queued images, ``text_ids`` for queued captions)."""

    images: torch.Tensor
    image_ids: torch.Tensor
    texts: torch.Tensor
    text_ids: torch.Tensor


@dataclass
class GlobalBatch:
    """The global batch after gathering: normalised embeddings, caption→image rows, catalog ids."""

    images: torch.Tensor  # (n, d)
    texts: torch.Tensor  # (m, d)
    owner: torch.Tensor  # (m,) the row of ``images`` each caption describes
    ids: torch.Tensor  # (n,) catalog index of each image (-1 when unknown)
    world: int


@dataclass
class LossOutput:
    loss: torch.Tensor  # the global loss, for logging
    backward_loss: torch.Tensor  # what to call backward on (see the module docstring)
    negatives: int  # candidates each caption was ranked against, minus its positive image
    accuracy: float  # share of queries (both directions) whose best-scored candidate is a positive
    batch: GlobalBatch  # what the queue takes in after the step

    @property
    def pairs(self) -> int:
        """Images in the global batch."""
        return int(self.batch.images.shape[0])


def _offset(count: int, device: torch.device) -> int:
    """Rows of the global batch held by lower ranks (how far this process's rows are shifted)."""
    rank, world = _world()
    if world == 1:
        return 0
    size = torch.tensor([count], device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    return sum(int(s) for s in sizes[:rank])


def _global_batch(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    owner: torch.Tensor | None,
    ids: torch.Tensor | None,
) -> GlobalBatch:
    """Every process's embeddings, L2-normalised in float32, and their caption→image links."""
    _, world = _world()
    n, device = image_embeddings.shape[0], image_embeddings.device
    if owner is None:
        if text_embeddings.shape[0] != n:
            raise ValueError("captions and images differ in number: give owner (caption -> image row)")
        owner = torch.arange(n, device=device)
    if ids is None:
        ids = torch.full((n,), -1, dtype=torch.long, device=device)
    shift = _offset(n, device)
    return GlobalBatch(
        images=gather_with_grad(F.normalize(image_embeddings.float(), dim=-1)),
        texts=gather_with_grad(F.normalize(text_embeddings.float(), dim=-1)),
        owner=gather_with_grad(owner.to(device, torch.long) + shift),
        ids=gather_with_grad(ids.to(device, torch.long)),
        world=world,
    )


@dataclass
class Direction:
    """One retrieval direction: cosine scores of queries × candidates (the batch's, then the queue's),
    which candidates are a query's positives, and which may be scored at all (queue entries of the
    query's own catalog image may not)."""

    scores: torch.Tensor
    positive: torch.Tensor
    allowed: torch.Tensor
    queued: int = 0  # candidates from the queue, after the batch's


def _same_image(queued_ids: torch.Tensor, query_ids: torch.Tensor) -> torch.Tensor:
    """(queries × queue) True where a queued entry shows the query's own catalog image."""
    queued_ids = queued_ids.to(query_ids.device)
    return (queued_ids[None, :] == query_ids[:, None]) & (query_ids[:, None] >= 0)


def _directions(batch: GlobalBatch, queue: Negatives | None) -> tuple[Direction, Direction]:
    """(image→text, text→image) over the global batch plus the queue."""
    images, texts = batch.images, batch.texts
    rows = torch.arange(images.shape[0], device=images.device)
    own = batch.owner[None, :] == rows[:, None]  # (n, m)
    i2t = Direction(images @ texts.T, own, torch.ones_like(own))
    t2i = Direction(texts @ images.T, own.T, torch.ones_like(own.T))
    if queue is None or not (len(queue.texts) or len(queue.images)):
        return i2t, t2i
    caption_ids = batch.ids[batch.owner]  # the catalog image of each caption
    for d, queries, query_ids, q_emb, q_ids in (
        (i2t, images, batch.ids, queue.texts, queue.text_ids),
        (t2i, texts, caption_ids, queue.images, queue.image_ids),
    ):
        same = _same_image(q_ids, query_ids)
        d.scores = torch.cat([d.scores, queries @ q_emb.to(queries).T], 1)
        d.positive = torch.cat([d.positive, torch.zeros_like(same)], 1)
        d.allowed = torch.cat([d.allowed, ~same], 1)
        d.queued = int(q_emb.shape[0])
    return i2t, t2i


def _accuracy(directions: tuple[Direction, Direction], logits: tuple[torch.Tensor, ...]) -> float:
    """Share of queries, both directions, whose best-scored allowed candidate is a positive."""
    with torch.no_grad():
        hits = []
        for d, z in zip(directions, logits, strict=True):
            best = z.masked_fill(~d.allowed, float("-inf")).argmax(1, keepdim=True)
            hits.append(float(d.positive.gather(1, best).float().mean()))
    return sum(hits) / len(hits)


def _output(
    loss: torch.Tensor, batch: GlobalBatch, directions: tuple[Direction, Direction], logits: tuple
) -> LossOutput:
    t2i = directions[1]
    negatives = int(t2i.allowed[0].sum()) - 1 if len(t2i.allowed) else 0
    return LossOutput(loss, loss * batch.world, negatives, _accuracy(directions, logits), batch)


def contrastive_loss(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
    margin: float = 0.0,
    *,
    owner: torch.Tensor | None = None,
    ids: torch.Tensor | None = None,
    queue: Negatives | None = None,
    soft_targets: float = 0.0,
    soft_temperature: float = 0.1,
) -> LossOutput:
    """CLIP's symmetric cross-entropy (InfoNCE) over the global batch.

    Each image's caption must win a softmax over all captions of the global batch, and each caption's
    image one over all images; the loss is the mean of both cross-entropies. ``logit_scale`` is the log
    inverse temperature (a parameter of the model, clamped by the training loop to at most ln 100); it is
    exponentiated here. Embeddings are L2-normalised here in float32, whatever precision the forward ran
    in. With several captions per image (``owner``) the image→text target is uniform over the image's
    own captions: ``-1/|P_i| Σ_{j∈P_i} log softmax_ij``. ``soft_targets`` moves that share of each
    target onto caption-alike candidates (module docstring). ``logit_bias`` and ``margin`` belong to the
    other losses and are ignored.
    """
    batch = _global_batch(image_embeddings, text_embeddings, owner, ids)
    scale = shared_scalar(logit_scale.float(), batch.world).exp()
    directions = _directions(batch, queue)
    if soft_targets and queue is not None and (len(queue.texts) or len(queue.images)):
        raise ValueError("soft targets cover the batch only: use them without a queue")
    targets = [d.positive.float() / d.positive.sum(1, keepdim=True) for d in directions]
    if soft_targets:
        soft = _caption_similarity_targets(batch, 1.0 / soft_temperature)
        targets = [(1 - soft_targets) * t + soft_targets * q for t, q in zip(targets, soft, strict=True)]
    logits, parts = [], []
    for d, target in zip(directions, targets, strict=True):
        z = (scale * d.scores).masked_fill(~d.allowed, float("-inf"))
        logp = torch.log_softmax(z, dim=1).masked_fill(target == 0, 0.0)
        parts.append(-(target * logp).sum(1).mean())
        logits.append(z)
    loss = (parts[0] + parts[1]) / 2
    return _output(loss, batch, directions, tuple(logits))


def _caption_similarity_targets(batch: GlobalBatch, scale: float) -> tuple[torch.Tensor, ...]:
    """(image→text, text→image) target rows from caption likeness (module docstring), no gradient."""
    with torch.no_grad():
        texts = batch.texts.detach()
        centroids = torch.zeros_like(batch.images).index_add_(0, batch.owner, texts)
        centroids = F.normalize(centroids, dim=-1)
        i2t = torch.softmax(scale * centroids @ texts.T, dim=1)
        t2i = torch.softmax(scale * texts @ centroids.T, dim=1)
    return i2t, t2i


def sigmoid_loss(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
    margin: float = 0.0,
    *,
    owner: torch.Tensor | None = None,
    ids: torch.Tensor | None = None,
    queue: Negatives | None = None,
) -> LossOutput:
    """SigLIP's pairwise sigmoid loss over the global batch (Zhai et al. 2023).

    Every image–caption pair of the global batch is an independent binary problem: with logits
    ``z_ij = exp(logit_scale) · cos(image_i, text_j) + logit_bias``, the loss is
    ``-1/n Σ_ij log σ(y_ij z_ij)`` where ``y_ij`` is +1 for a matching pair and -1 otherwise (n = the
    global number of images: a sum over a row, averaged over rows, as in the paper). No softmax couples
    the pairs, which is why it holds up at small batches. Both the temperature and the bias are learnt;
    the training loop starts them at ln 10 and -10 as the paper does. Queue entries add pairs with
    ``y = -1``: images × queued captions and captions × queued images.
    """
    if logit_bias is None:
        raise ValueError("the sigmoid loss needs a learnt bias")
    batch = _global_batch(image_embeddings, text_embeddings, owner, ids)
    scale = shared_scalar(logit_scale.float(), batch.world).exp()
    bias = shared_scalar(logit_bias.float(), batch.world)
    i2t, t2i = _directions(batch, queue)
    z_i2t, z_t2i = scale * i2t.scores + bias, scale * t2i.scores + bias
    signs = 2 * i2t.positive.float() - 1
    pairs = -F.logsigmoid(signs * z_i2t) * i2t.allowed  # the batch's pairs, then images × queued captions
    n = batch.images.shape[0]
    queued = -F.logsigmoid(-z_t2i[:, n:]) * t2i.allowed[:, n:]  # captions × queued images
    loss = (pairs.sum() + queued.sum()) / n
    return _output(loss, batch, (i2t, t2i), (z_i2t, z_t2i))


def hardest_negative_loss(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    logit_scale: torch.Tensor | None = None,
    logit_bias: torch.Tensor | None = None,
    margin: float = 0.2,
    *,
    owner: torch.Tensor | None = None,
    ids: torch.Tensor | None = None,
    queue: Negatives | None = None,
) -> LossOutput:
    """VSE++'s max-margin loss on the hardest negative of each query (Faghri et al. 2018), global batch.

    With cosine similarities ``s``, each image i pays ``max(0, margin - s_ii + max_{j≠i} s_ij)`` (its
    most similar wrong caption) and each caption i ``max(0, margin - s_ii + max_{j≠i} s_ji)`` (its most
    similar wrong image); the loss is the mean over positive pairs in each direction, summed over the
    two directions (VSE++ sums over the batch; the mean keeps the step size independent of the batch).
    With several captions per image, an image pays once per own caption against its hardest wrong
    caption. No temperature: ``logit_scale`` is unused (the training loop freezes it), as is
    ``logit_bias``.
    """
    batch = _global_batch(image_embeddings, text_embeddings, owner, ids)
    directions = _directions(batch, queue)
    loss = torch.zeros((), device=batch.images.device)
    for d in directions:
        hardest = d.scores.masked_fill(d.positive | ~d.allowed, float("-inf")).max(1, keepdim=True).values
        cost = (margin - d.scores + hardest).clamp(min=0)
        loss = loss + cost[d.positive].mean()
    return _output(loss, batch, directions, tuple(d.scores for d in directions))


LOSSES: dict[str, Callable[..., LossOutput]] = {
    "infonce": contrastive_loss,
    "siglip": sigmoid_loss,
    "hardest": hardest_negative_loss,
}
