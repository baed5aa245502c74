"""AdamW parameter groups and the warmup + cosine learning-rate schedule.

Weight decay pulls weights towards zero; on norms, biases and the temperature that is harmful (it
shrinks scales that carry meaning), so every parameter with fewer than two dimensions is excluded.
Newly created layers (the projections of a dual encoder built from towers) and the temperature start
from nothing useful and get ``--head-lr``; pretrained weights get the smaller ``--lr`` so a few
epochs cannot wreck what they already know.

The schedule is a pure function of the optimizer step, applied before every step, so resuming needs no
scheduler state beyond the step counter (saved with the training state).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

HEAD_PREFIXES = ("visual_projection.", "text_projection.", "logit_scale")


def param_groups(
    model: nn.Module, *, lr: float, head_lr: float, weight_decay: float, new_heads: bool
) -> list[dict]:
    """Four groups at most: (pretrained | head) × (decay | no decay), trainable parameters only."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        head = name.startswith("logit_scale") or (new_heads and name.startswith(HEAD_PREFIXES))
        decay = param.ndim >= 2
        groups.setdefault((head, decay), []).append(param)
    return [
        {
            "params": params,
            "lr": head_lr if head else lr,
            "initial_lr": head_lr if head else lr,
            "weight_decay": weight_decay if decay else 0.0,
        }
        for (head, decay), params in sorted(groups.items())
    ]


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to zero at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(groups: Iterable[dict], factor: float) -> None:
    for group in groups:
        group["lr"] = group["initial_lr"] * factor
