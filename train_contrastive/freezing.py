"""Which parameters train: ``--lock-vision``, ``--lock-text``, ``--unfreeze-last-n`` and its per-tower
forms ``--vision-blocks`` / ``--text-blocks``.

``--vision-blocks N`` / ``--text-blocks N`` (both at once: ``--unfreeze-last-n N``; see
:attr:`.args.TrainArgs.blocks` for the defaults) keep the last N transformer blocks of a tower
trainable together with everything *after* them (the final norm, CLIP's post-layernorm and
projections, the temperature); embeddings and the blocks below are frozen. ``-1`` trains
everything. A locked tower is frozen entirely, and its projection still trains, so a locked tower can
still be aligned.

A pooler that the pooling does not use (the random pooler transformers adds to a DeiT or BERT tower
whose embedding is the CLS token or the token mean) is always frozen: it gets no gradient, and a
trainable parameter without gradient breaks multi-process (DDP) training.

The result is the index of the first trainable block of each tower (``len(blocks)`` when the tower is
frozen entirely): where :mod:`.features` cuts the tower for caching.
"""

from __future__ import annotations

from torch import nn

from train_contrastive.features import blocks_of, tower_of
from vitrine.model import embedding

# Modules that run before the first block in the families we know (CLIP's pre-layernorm).
_BEFORE_BLOCKS = ("embeddings", "pre_layrnorm")


def apply_freezing(
    model: nn.Module, *, lock_vision: bool, lock_text: bool, unfreeze_last_n: int | dict[str, int]
) -> dict[str, int]:
    """Set ``requires_grad`` on ``model`` and return ``{"vision": start, "text": start}``.

    ``unfreeze_last_n`` is one count for both towers or ``{"vision": n, "text": m}``."""
    starts: dict[str, int] = {}
    pooling = embedding.pooling_of(model)
    for side, locked in (("vision", lock_vision), ("text", lock_text)):
        tower = tower_of(model, side)
        blocks = blocks_of(tower)
        n = unfreeze_last_n[side] if isinstance(unfreeze_last_n, dict) else unfreeze_last_n
        if locked:
            start = len(blocks)
        elif n < 0:
            start = 0
        else:
            start = max(0, len(blocks) - n)
        for name, module in tower.named_children():
            before = name in _BEFORE_BLOCKS and start > 0
            module.requires_grad_(not (locked or before))
        for i, block in enumerate(blocks):
            block.requires_grad_(not locked and i >= start)
        if pooling[side] != "pooler" and getattr(tower, "pooler", None) is not None:
            tower.pooler.requires_grad_(False)
        if locked:
            tower.requires_grad_(False)
        starts[side] = start
    return starts


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
