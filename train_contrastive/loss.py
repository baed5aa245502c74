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
class LossOutput:
    loss: torch.Tensor  # the global loss, for logging
    backward_loss: torch.Tensor  # what to call backward on (see the module docstring)
    negatives: int  # candidates each query was ranked against, minus its positive
    accuracy: float  # share of queries (both directions) whose positive scores highest


def _global_pairs(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> tuple:
    """L2-normalised (in float32) embeddings of every process, and the number of processes."""
    _, world = _world()
    images = gather_with_grad(F.normalize(image_embeddings.float(), dim=-1))
    texts = gather_with_grad(F.normalize(text_embeddings.float(), dim=-1))
    return images, texts, world


def _accuracy(scores: torch.Tensor) -> float:
    """Share of queries, both directions, whose positive (the diagonal) scores highest."""
    with torch.no_grad():
        labels = torch.arange(scores.shape[0], device=scores.device)
        hits = (scores.argmax(1) == labels).float().mean() + (scores.argmax(0) == labels).float().mean()
    return float(hits) / 2


def contrastive_loss(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
    margin: float = 0.0,
) -> LossOutput:
    """CLIP's symmetric cross-entropy (InfoNCE) over the global batch.

    Each image's caption must win a softmax over all captions of the global batch, and each caption's
    image one over all images; the loss is the mean of both cross-entropies. ``logit_scale`` is the log
    inverse temperature (a parameter of the model, clamped by the training loop to at most ln 100); it is
    exponentiated here. Embeddings are L2-normalised here in float32, whatever precision the forward ran
    in. ``logit_bias`` and ``margin`` belong to the other losses and are ignored.
    """
    images, texts, world = _global_pairs(image_embeddings, text_embeddings)
    logits = shared_scalar(logit_scale.float(), world).exp() * images @ texts.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    return LossOutput(loss, loss * world, logits.shape[0] - 1, _accuracy(logits))


def sigmoid_loss(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
    margin: float = 0.0,
) -> LossOutput:
    """SigLIP's pairwise sigmoid loss over the global batch (Zhai et al. 2023).

    Every image–caption pair of the global batch is an independent binary problem: with logits
    ``z_ij = exp(logit_scale) · cos(image_i, text_j) + logit_bias``, the loss is
    ``-1/n Σ_ij log σ(y_ij z_ij)`` where ``y_ij`` is +1 for the matching pair and -1 otherwise (n = the
    global batch size: a sum over a row, averaged over rows, as in the paper). No softmax couples the
    pairs, which is why it holds up at small batches. Both the temperature and the bias are learnt; the
    training loop starts them at ln 10 and -10 as the paper does.
    """
    if logit_bias is None:
        raise ValueError("the sigmoid loss needs a learnt bias")
    images, texts, world = _global_pairs(image_embeddings, text_embeddings)
    scale = shared_scalar(logit_scale.float(), world).exp()
    logits = scale * images @ texts.T + shared_scalar(logit_bias.float(), world)
    signs = 2 * torch.eye(logits.shape[0], device=logits.device) - 1
    loss = -F.logsigmoid(signs * logits).sum() / logits.shape[0]
    return LossOutput(loss, loss * world, logits.shape[0] - 1, _accuracy(logits))


def hardest_negative_loss(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    logit_scale: torch.Tensor | None = None,
    logit_bias: torch.Tensor | None = None,
    margin: float = 0.2,
) -> LossOutput:
    """VSE++'s max-margin loss on the hardest negative of each query (Faghri et al. 2018), global batch.

    With cosine similarities ``s``, each image i pays ``max(0, margin - s_ii + max_{j≠i} s_ij)`` (its
    most similar wrong caption) and each caption i ``max(0, margin - s_ii + max_{j≠i} s_ji)`` (its most
    similar wrong image); the loss is their sum averaged over the n pairs (VSE++ sums over the batch;
    the mean keeps the step size independent of the batch). No temperature: ``logit_scale`` is unused
    (the training loop freezes it), as is ``logit_bias``.
    """
    images, texts, world = _global_pairs(image_embeddings, text_embeddings)
    scores = images @ texts.T
    positives = scores.diagonal()
    eye = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    negatives = scores.masked_fill(eye, float("-inf"))
    captions = (margin - positives + negatives.max(dim=1).values).clamp(min=0)
    pictures = (margin - positives + negatives.max(dim=0).values).clamp(min=0)
    loss = (captions + pictures).mean()
    return LossOutput(loss, loss * world, scores.shape[0] - 1, _accuracy(scores))


LOSSES: dict[str, Callable[..., LossOutput]] = {
    "infonce": contrastive_loss,
    "siglip": sigmoid_loss,
    "hardest": hardest_negative_loss,
}
