"""Symmetric InfoNCE over the *global* batch, with a learnable temperature.

With N processes each holding B pairs, the useful number of negatives per pair is N·B - 1, not B - 1
(``transformers``' built-in CLIP loss sees the local batch only). :func:`gather_with_grad` collects
every process's embeddings with ``torch.distributed.all_gather`` -- which returns tensors detached from
autograd -- and then puts this process's *own* tensor back into its slot. The resulting global matrix
therefore carries gradients to the local embeddings (as queries and as negatives of everyone else),
and every process computes the same global loss.

Exactness across process counts: the gradient each process gets is the full gradient of the global
loss with respect to *its* embeddings, i.e. its share of the total. DDP then *averages* parameter
gradients over N processes, so :func:`contrastive_loss` returns the loss to back-propagate multiplied
by N (``backward_scale``): N processes with batch B then take exactly the optimizer step one process
takes with batch N·B over the same pairs (tested with two CPU processes).

Batch sizes may differ between processes (a bad file dropped from one batch), so sizes are exchanged
first and tensors padded to the largest before gathering.
"""

from __future__ import annotations

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


@dataclass
class LossOutput:
    loss: torch.Tensor  # the global symmetric InfoNCE, for logging
    backward_loss: torch.Tensor  # what to call backward on (see the module docstring)
    negatives: int  # candidates each query was ranked against, minus its positive
    accuracy: float  # share of queries (both directions) whose positive scores highest


def contrastive_loss(
    image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, logit_scale: torch.Tensor
) -> LossOutput:
    """CLIP's symmetric cross-entropy over the global batch.

    ``logit_scale`` is the log inverse temperature (a parameter of the model, clamped by the training
    loop to at most ln 100); it is exponentiated here. Embeddings are L2-normalised here in float32,
    whatever precision the forward ran in.
    """
    _, world = _world()
    images = gather_with_grad(F.normalize(image_embeddings.float(), dim=-1))
    texts = gather_with_grad(F.normalize(text_embeddings.float(), dim=-1))
    logits = logit_scale.float().exp() * images @ texts.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    with torch.no_grad():
        hits = (logits.argmax(1) == labels).float().mean() + (logits.argmax(0) == labels).float().mean()
    return LossOutput(loss, loss * world, logits.shape[0] - 1, float(hits) / 2)
