"""AdamW parameter groups and the warmup + cosine learning-rate schedule.

Weight decay pulls weights towards zero; on norms, biases and the temperature that is harmful (it
shrinks scales that carry meaning), so every parameter with fewer than two dimensions is excluded.
Newly created layers (the projections of a dual encoder built from towers) and the temperature start
from nothing useful and get ``--head-lr``; pretrained weights get the smaller ``--lr`` (per tower:
``--vision-lr``, ``--text-lr``) so a few epochs cannot wreck what they already know.

``--layer-decay D`` (BEiT's layer-wise rate decay, which FT-CLIP found essential when fine-tuning CLIP)
scales a tower's rate by ``D`` per block below its top block: the top block learns at the tower's rate,
the one under it at ``D`` times that, and so on; embeddings sit one step below the lowest block, and
layers above the stack (final norms, poolers) keep the full rate. Low blocks hold the general features,
so they move least.

The schedule is a pure function of the optimizer step, applied before every step, so resuming needs no
scheduler state beyond the step counter (saved with the training state).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from train_contrastive.features import blocks_of, tower_of

HEAD_PREFIXES = ("visual_projection.", "text_projection.", "logit_scale")


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    head_lr: float,
    weight_decay: float,
    new_heads: bool,
    tower_lr: dict[str, float] | None = None,
    layer_decay: float = 1.0,
) -> list[dict]:
    """One group per (learning rate, decay or not), trainable parameters only, lowest rate first.

    ``tower_lr`` (``{"vision": .., "text": ..}``) overrides ``lr`` for the weights of each tower;
    ``layer_decay`` scales it down block by block (module docstring)."""
    rates = {f"{side}_model.": rate for side, rate in (tower_lr or {}).items()}
    depth = _depths_below_top(model) if layer_decay != 1.0 else {}
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        head = name.startswith("logit_scale") or (new_heads and name.startswith(HEAD_PREFIXES))
        rate = head_lr if head else next((r for p, r in rates.items() if name.startswith(p)), lr)
        if not head:
            rate *= layer_decay ** depth.get(name, 0)
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


def _depths_below_top(model: nn.Module) -> dict[str, int]:
    """Parameter name -> how many blocks below its tower's top block it sits (see the docstring).

    Parameters outside both towers and above the block stacks are absent (depth 0)."""
    depth: dict[str, int] = {}
    for side in ("vision", "text"):
        tower = tower_of(model, side)
        blocks = blocks_of(tower)
        inside = {id(p): len(blocks) - 1 - i for i, block in enumerate(blocks) for p in block.parameters()}
        for name, param in tower.named_parameters():
            below = "embed" in name or name.startswith("pre_")
            depth[f"{side}_model.{name}"] = inside.get(id(param), len(blocks) if below else 0)
    return depth


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to zero at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(groups: Iterable[dict], factor: float) -> None:
    for group in groups:
        group["lr"] = group["initial_lr"] * factor
