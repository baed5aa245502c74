"""WiSE-FT (Wortsman et al., 2022): interpolate the fine-tuned weights with the starting ones.

Fine-tuning on a narrow set of pairs raises recall there and can lower it on everything else; a
weight-space average ``alpha·fine-tuned + (1 - alpha)·start`` keeps most of the gain while recovering
much of the general ability. ``alpha = 1`` is the fine-tuned model, ``0`` the start. It is most
useful when starting from a trained CLIP-family model; a dual encoder built from towers starts from
random projections, so small alphas there mostly bring back noise.
"""

from __future__ import annotations

import torch
from torch import nn


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the trainable floating-point parameters (what fine-tuning can change)."""
    return {
        name: p.detach().to("cpu", copy=True)
        for name, p in model.named_parameters()
        if p.requires_grad and p.is_floating_point()
    }


@torch.no_grad()
def interpolate(model: nn.Module, start: dict[str, torch.Tensor], alpha: float) -> None:
    """In place: every parameter in ``start`` becomes ``alpha·current + (1 - alpha)·start``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError("WiSE-FT alpha must be within [0, 1]")
    for name, param in model.named_parameters():
        if name in start:
            base = start[name].to(param.device, param.dtype)
            param.copy_(alpha * param + (1.0 - alpha) * base)


@torch.no_grad()
def restore(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load a :func:`snapshot` back into ``model`` (e.g. the best evaluation's weights)."""
    for name, param in model.named_parameters():
        if name in weights:
            param.copy_(weights[name].to(param.device, param.dtype))
