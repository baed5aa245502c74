"""AdamW parameter groups and the warmup + cosine learning-rate schedule.

Weight decay pulls weights towards zero; on norms, biases and the temperature that is harmful (it
shrinks scales that carry meaning), so every parameter with fewer than two dimensions is excluded.
Newly created layers (the projections of a dual encoder built from towers) and the temperature start
from nothing useful and get ``--head-lr``; pretrained weights get the smaller ``--lr`` (per tower:
``--vision-lr``, ``--text-lr``) so a few epochs cannot wreck what they already know.

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
    model: nn.Module,
    *,
    lr: float,
    head_lr: float,
    weight_decay: float,
    new_heads: bool,
    tower_lr: dict[str, float] | None = None,
) -> list[dict]:
    """One group per (learning rate, decay or not), trainable parameters only, lowest rate first.

    ``tower_lr`` (``{"vision": .., "text": ..}``) overrides ``lr`` for the weights of each tower."""
    rates = {f"{side}_model.": rate for side, rate in (tower_lr or {}).items()}
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        head = name.startswith("logit_scale") or (new_heads and name.startswith(HEAD_PREFIXES))
        rate = head_lr if head else next((r for p, r in rates.items() if name.startswith(p)), lr)
        groups.setdefault((rate, param.ndim >= 2), []).append(param)
    return [
        {
            "params": params,
            "lr": rate,
            "initial_lr": rate,
            "weight_decay": weight_decay if decay else 0.0,
        }
        for (rate, decay), params in sorted(groups.items(), key=lambda kv: kv[0])
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
