"""Run under ``accelerate launch`` with 2 processes: each holds half of one fixed batch of embeddings.

For each ``--loss``, with one caption per image and with two (``NAME:all``: a multi-positive batch whose
caption→image links must be shifted by the other rank's images), writes per rank the global loss, the
number of negatives, the gradient reaching its local rows and the gradients of the temperature and bias
to ``$OUT/rank<R>.json``; the test compares them with one process computing the same loss on the whole
batch.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from accelerate import PartialState

from train_contrastive.loss import LOSSES


def main() -> None:
    PartialState()  # joins the process group accelerate launch set up (gloo on CPU)
    rank, world = dist.get_rank(), dist.get_world_size()
    out = sys.argv[1]
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(8, 16, generator=generator)
    texts = torch.randn(8, 16, generator=generator)
    two_each = torch.randn(16, 16, generator=generator)
    local = slice(4 * rank, 4 * rank + 4)
    cases = {name: (texts[local], {}, loss) for name, loss in LOSSES.items()} | {
        f"{name}:all": (
            two_each[8 * rank : 8 * rank + 8],
            {"owner": torch.arange(4).repeat_interleave(2)},
            loss,
        )
        for name, loss in LOSSES.items()
    }
    payload = {}
    for name, (captions, links, loss) in cases.items():
        img = images[local].clone().requires_grad_(True)
        txt = captions.clone().requires_grad_(True)
        scale, bias = torch.tensor(2.0, requires_grad=True), torch.tensor(-3.0, requires_grad=True)
        result = loss(img, txt, scale, bias, margin=0.5, **links)
        result.backward_loss.backward()
        payload[name] = {
            "loss": float(result.loss.detach()),
            "negatives": result.negatives,
            "world": world,
            "image_grad": (img.grad / world).tolist(),
            "text_grad": (txt.grad / world).tolist(),
            # DDP averages these over processes; the test does the same
            "scale_grad": None if scale.grad is None else float(scale.grad),
            "bias_grad": None if bias.grad is None else float(bias.grad),
        }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(payload, fh)
    # Leave the group before exiting: a process that exits with gloo's threads still up can abort
    # ("terminate called without an active exception", SIGABRT) and fail the launch after the work is done.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
