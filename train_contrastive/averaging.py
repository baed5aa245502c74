"""``--ema DECAY``: an exponential moving average of the trainable weights, evaluated and kept instead of
the raw ones.

A short fine-tune on a few thousand pairs ends wherever the last noisy steps left it; an average over the
last few hundred steps sits nearer the middle of the region they explore, which usually ranks a little
better on unseen data (Polyak averaging, the "EMA" of timm and of model soups' greedy cousins). The
average costs one in-place ``lerp`` per trainable tensor and step and one copy of those weights.

Early in training the average would drag in the random start, so the decay used at step ``t`` is
``min(decay, (1 + t) / (10 + t))``: the usual warm-up, which lets the first steps count fully.

Evaluations (per epoch, and the final one) run with the averaged weights swapped in (:meth:`swapped`);
the best evaluation's weights, and so the saved model, are the averaged ones. The average is registered
with ``accelerator.save_state``, so ``--resume`` continues it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from train_contrastive.wise import restore, snapshot


class WeightAverage:
    """The running average of ``model``'s trainable floating-point parameters (``decay`` 0 = off)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError("the averaging decay must be within [0, 1)")
        self.decay = decay
        self.updates = 0
        self.shadow: dict[str, torch.Tensor] = (
            {
                name: p.detach().clone().float()
                for name, p in model.named_parameters()
                if p.requires_grad and p.is_floating_point()
            }
            if decay
            else {}
        )

    @property
    def active(self) -> bool:
        return bool(self.shadow)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the weights after an optimizer step into the average."""
        if not self.active:
            return
        weight = 1.0 - self.current_decay()
        for name, param in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach().float(), weight)
        self.updates += 1

    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s averaged parameters with the average."""
        restore(model, self.shadow)

    @contextmanager
    def swapped(self, model: nn.Module) -> Iterator[None]:
        """Within the block, ``model`` holds the averaged weights; its own come back afterwards."""
        if not self.active:
            yield
            return
        own = snapshot(model)
        self.copy_to(model)
        try:
            yield
        finally:
            restore(model, own)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "shadow": {k: v.cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        for name, value in state["shadow"].items():
            if name in self.shadow:
                self.shadow[name].copy_(value)
