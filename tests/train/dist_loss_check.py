"""Run under ``accelerate launch`` with 2 processes: each holds half of one fixed batch of embeddings.

Writes, per rank, the global loss, the number of negatives and the gradient reaching its local rows to
``$OUT/rank<R>.json``; the test compares them with one process computing the same loss on the whole batch.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from accelerate import PartialState

from train_contrastive.loss import contrastive_loss


def main() -> None:
    PartialState()  # joins the process group accelerate launch set up (gloo on CPU)
    rank, world = dist.get_rank(), dist.get_world_size()
    out = sys.argv[1]
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(8, 16, generator=generator)
    texts = torch.randn(8, 16, generator=generator)
    local = slice(4 * rank, 4 * rank + 4)
    img = images[local].clone().requires_grad_(True)
    txt = texts[local].clone().requires_grad_(True)
    result = contrastive_loss(img, txt, torch.tensor(2.0))
    result.backward_loss.backward()
    payload = {
        "loss": float(result.loss.detach()),
        "negatives": result.negatives,
        "world": world,
        "image_grad": (img.grad / world).tolist(),
        "text_grad": (txt.grad / world).tolist(),
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(payload, fh)


if __name__ == "__main__":
    main()
